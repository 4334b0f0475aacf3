//! Discovery on this machine's real sysfs and routing table (root: creates interfaces in the
//! host namespace, removed again on drop).

use knd::{
    discover::inventory::{ExclusionReason, discover},
    os::host::HostRoot,
    publish::resources::{self, Value},
};
use knd_testkit::HostInterfaces;

#[test]
#[ignore = "needs root: creates interfaces in the host namespace (cargo xtask test runs it as root)"]
fn live_host_excludes_the_uplink_and_finds_new_veth_and_macvlan() {
    let prefix = format!("kt{}", std::process::id() % 100_000);
    let _interfaces = HostInterfaces::veth_and_macvlan(&prefix).unwrap();
    let inventory = discover(&HostRoot::new("/"));

    // The machine's default route goes through its uplink; it is never published.
    let uplinks: Vec<&str> = inventory
        .excluded
        .iter()
        .filter(|e| matches!(e.reason, ExclusionReason::DefaultRoute { .. }))
        .map(|e| e.device.as_str())
        .collect();
    assert!(
        !uplinks.is_empty(),
        "no default-route uplink found: {:?}",
        inventory.excluded
    );
    assert!(
        std::fs::read_to_string("/proc/net/route")
            .unwrap()
            .lines()
            .any(|l| uplinks.iter().any(|u| l.starts_with(u))),
        "{uplinks:?} do not appear in /proc/net/route"
    );
    for nic in &inventory.nics {
        let name = nic.display_name();
        assert!(!uplinks.contains(&name.as_str()), "uplink {name} published");
    }

    let find = |name: &str| {
        inventory
            .nics
            .iter()
            .find(|n| n.display_name() == name)
            .unwrap_or_else(|| panic!("{name} not discovered"))
    };
    let veth = resources::attributes(find(&format!("{prefix}a")));
    assert_eq!(veth["knd.dev/virtual"], Value::Bool(true));
    assert_eq!(veth["knd.dev/kind"], Value::Str("veth".into()));
    assert_eq!(veth["knd.dev/mtu"], Value::Int(1500));
    assert_eq!(veth["knd.dev/state"], Value::Str("up".into()));
    let mac = std::fs::read_to_string(format!("/sys/class/net/{prefix}a/address")).unwrap();
    assert_eq!(veth["knd.dev/mac"], Value::Str(mac.trim().to_owned()));
    let macvlan = resources::attributes(find(&format!("{prefix}m")));
    assert_eq!(macvlan["knd.dev/kind"], Value::Str("macvlan".into()));
    assert!(!macvlan.contains_key("resource.kubernetes.io/pcieRoot"));
    assert_eq!(
        resources::device_name(find(&format!("{prefix}m"))),
        format!("{prefix}m")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates interfaces in the host namespace (cargo xtask test runs it as root)"]
async fn the_watched_view_follows_link_changes_within_a_second() {
    use std::{sync::Arc, time::Duration};

    use knd::{
        discover::inventory::Inventory,
        publish::watch::{Pacing, Scope, spawn},
    };
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    let shutdown = CancellationToken::new();
    let mut watcher = spawn(
        HostRoot::new("/"),
        Scope::default(),
        Pacing::default(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let prefix = format!("kw{}", std::process::id() % 100_000);
    let (a, m) = (format!("{prefix}a"), format!("{prefix}m"));
    let has =
        |inventory: &Inventory, name: &str| inventory.nics.iter().any(|n| n.display_name() == name);
    assert!(!has(&watcher.inventory.borrow(), &a));
    let scans_before = watcher.scans();

    let created = {
        let prefix = prefix.clone();
        tokio::task::spawn_blocking(move || HostInterfaces::veth_and_macvlan(&prefix))
            .await
            .unwrap()
            .unwrap()
    };
    let up_at = Instant::now();
    let waited = tokio::time::timeout(
        Duration::from_secs(1),
        watcher.inventory.wait_for(|inventory| {
            has(inventory, &a)
                && has(inventory, &m)
                && inventory.nics.iter().all(|n| {
                    n.display_name() != a
                        || n.netdev.as_ref().and_then(|d| d.operstate.as_deref()) == Some("up")
                })
        }),
    )
    .await
    .map(|seen| seen.map(|view| Arc::clone(&view)));
    let Ok(Ok(view)) = waited else {
        let view = watcher.inventory.borrow().clone();
        let names: Vec<(String, Option<String>)> = view
            .nics
            .iter()
            .map(|n| {
                (
                    n.display_name(),
                    n.netdev.as_ref().and_then(|d| d.operstate.clone()),
                )
            })
            .collect();
        panic!(
            "the new interfaces were not in the view within 1 s of being up: {names:?}, {} scans, \
             {} events",
            watcher.scans(),
            watcher.events()
        );
    };
    let appeared = up_at.elapsed();
    let macvlan = view.nics.iter().find(|n| n.display_name() == m).unwrap();
    assert_eq!(
        macvlan.netdev.as_ref().unwrap().kind.as_deref(),
        Some("macvlan"),
        "kinds come from netlink on the live node"
    );

    tokio::task::spawn_blocking(move || drop(created))
        .await
        .unwrap();
    let gone_at = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(1),
        watcher
            .inventory
            .wait_for(|inventory| !has(inventory, &a) && !has(inventory, &m)),
    )
    .await
    .expect("deleted interfaces were still in the view 1 s later")
    .unwrap();
    let vanished = gone_at.elapsed();
    // Creating three links, raising them and deleting them is dozens of notifications; the
    // debounce turns each burst into a few scans.
    let scans = watcher.scans() - scans_before;
    assert!(scans <= 8, "{scans} scans for {} events", watcher.events());
    eprintln!(
        "appeared after {appeared:?}, vanished after {vanished:?}, {scans} scans for {} events",
        watcher.events()
    );
    shutdown.cancel();
    watcher.join().await;
}
