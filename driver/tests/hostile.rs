//! A hostile tenant against knd: each test plays one attack from the trust-boundary issue on
//! real namespaces and asserts that the host is untouched.

use std::process::Command;

use knd::{
    attach,
    discover::inventory::uplink,
    model::config::{self, SysctlKey},
    nri::plugin::Hooks as _,
    os::host::HostRoot,
};
use knd_testkit::{TestHost, pods::Node, veth_pair};

/// Reads a sysctl as the namespace `host` sees it.
fn sysctl_in(host: &TestHost, path: &str) -> String {
    host.run(|| std::fs::read_to_string(path).unwrap())
        .unwrap()
        .trim()
        .to_owned()
}

/// Attack 1: keys that try to leave the interface's own `conf` directory — with `..`, a
/// slash, `all`/`default` — never become a key (keys exist only by parsing), and the honest key
/// is written through the writer's `openat2` below the interface's directory. The target of
/// the forged keys is the namespace-wide `all/forwarding` of a throwaway namespace, which must
/// stay 0.
#[test]
#[ignore = "needs root: creates network namespaces"]
fn the_sysctl_writer_stays_in_the_interfaces_directory() {
    let pod = TestHost::new("pod").unwrap();
    let peer = TestHost::new("peer").unwrap();
    veth_pair(&pod, "net1", &peer, "p1").unwrap();
    for forged in [
        "net.ipv4.conf.net1/../all.forwarding",
        "net.ipv4.conf.../all.forwarding",
        "net.ipv4.conf.net1.../all/forwarding",
        "net.ipv4.conf.all.forwarding",
        "net.ipv4.conf./proc/sys/net/ipv4/conf/all.forwarding",
    ] {
        assert!(forged.parse::<SysctlKey>().is_err(), "{forged} parsed");
    }
    assert_eq!(
        sysctl_in(&pod, "/proc/sys/net/ipv4/conf/all/forwarding"),
        "0"
    );
    let key: SysctlKey = "net.ipv4.conf.net1.arp_ignore".parse().unwrap();
    pod.run(|| attach::write_sysctl(&key, "2"))
        .unwrap()
        .unwrap();
    assert_eq!(
        sysctl_in(&pod, "/proc/sys/net/ipv4/conf/net1/arp_ignore"),
        "2"
    );
    // An interface the pod does not have: an error naming the directory, nothing created.
    let key: SysctlKey = "net.ipv4.conf.ghost0.arp_ignore".parse().unwrap();
    let err = pod
        .run(|| attach::write_sysctl(&key, "2"))
        .unwrap()
        .unwrap_err();
    assert!(
        err.to_string().contains("/proc/sys/net/ipv4/conf/ghost0"),
        "{err}"
    );
}

/// Attack 1, through the whole attach path: a claim whose config sets a sysctl of the pod's own
/// `eth0` (around kubelet's sysctl policy) is refused, and `eth0` keeps its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn a_claim_cannot_set_sysctls_of_another_interface_in_the_pod() {
    let (node, pod, switch) = tokio::task::spawn_blocking(|| {
        let node = TestHost::new("node").unwrap();
        let pod = TestHost::new("pod").unwrap();
        let switch = TestHost::new("switch").unwrap();
        veth_pair(&node, "enp1", &switch, "sw1").unwrap();
        veth_pair(&pod, "eth0", &switch, "sw2").unwrap();
        (node, pod, switch)
    })
    .await
    .unwrap();
    // No interface.name: the pod-side name is the host's, `enp1`, known only at attach time.
    let text = r#"{"apiVersion":"knd.dev/v1alpha1","kind":"NetworkConfig",
                   "sysctls":{"net.ipv4.conf.eth0.rp_filter":"2"}}"#;
    let wanted = config::parse(text.as_bytes()).unwrap();
    wanted.validate(config::DeviceLimits::default()).unwrap();
    let before = sysctl_in(&pod, "/proc/sys/net/ipv4/conf/eth0/rp_filter");
    let host_side = attach::record_for(node.netns(), "enp1", &wanted)
        .await
        .unwrap();
    let err = attach::attach(node.netns(), pod.netns(), &host_side, "enp1", &wanted)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("net.ipv4.conf.eth0.rp_filter")
            && err
                .to_string()
                .contains("this claim's interface in the pod is `enp1`"),
        "{err}"
    );
    assert_eq!(
        sysctl_in(&pod, "/proc/sys/net/ipv4/conf/eth0/rp_filter"),
        before
    );
    // The NIC went back to the node.
    let back = attach::record(node.netns(), "enp1").await.unwrap();
    assert_eq!(back.link.name, "enp1");
    drop(switch);
}

/// Attack 2: on a node with many IPv6 routes, procfs hands `ipv6_route` out a few lines per
/// read and lists `::/0` last. The reader must read to the end, or the uplink's default route
/// is never seen and the uplink gets published.
#[test]
#[ignore = "needs root: creates network namespaces"]
fn the_default_route_is_found_behind_many_ipv6_routes() {
    let node = TestHost::new("node").unwrap();
    let upstream = TestHost::new("upstream").unwrap();
    veth_pair(&node, "uplink0", &upstream, "up0").unwrap();
    node.set_up("uplink0").unwrap();
    let run = |args: &[&str]| {
        let status = node
            .run(|| Command::new("ip").args(args).status().unwrap())
            .unwrap();
        assert!(status.success(), "ip {args:?}");
    };
    run(&[
        "-6",
        "addr",
        "add",
        "fd00:1::2/64",
        "dev",
        "uplink0",
        "nodad",
    ]);
    for i in 0..100 {
        run(&[
            "-6",
            "route",
            "add",
            &format!("fd10:{i:x}::/48"),
            "via",
            "fd00:1::1",
            "dev",
            "uplink0",
        ]);
    }
    run(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:1::1",
        "dev",
        "uplink0",
    ]);
    let table = node
        .run(|| {
            // /proc/thread-self/net is this thread's namespace: the node's.
            HostRoot::new("/").read("/proc/thread-self/net/ipv6_route")
        })
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        table.len() > 3 * 4096,
        "{} bytes: too few routes for the test",
        table.len()
    );
    assert_eq!(uplink::parse_ipv6_defaults(&table), ["uplink0"]);
    drop(upstream);
}

/// The pod's interface names (the tenant's view).
fn names_in(host: &TestHost) -> Vec<String> {
    let links = host.netlink(|link| async move { link.links().await });
    links.unwrap().into_iter().map(|l| l.name).collect()
}

/// Attack 3: the tenant (NET_ADMIN in its pod) renames the claimed NIC and makes a veth with
/// its name. When the pod stops, release gives back the claimed NIC — found by its index in the
/// pod and checked by identity and peer — and leaves the tenant's veth in the pod: the host
/// never routes the NIC's subnet into an interface the tenant holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn release_takes_back_the_claimed_nic_not_what_the_pod_named_like_it() {
    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    node.prepare(
        "c1",
        "enp1",
        r#""interface":{"name":"net1","addresses":["10.9.0.2/24"]}"#,
    );
    let before = attach::record(node.host.netns(), "enp1").await.unwrap();
    let hooks = node.hooks();
    hooks.run_pod_sandbox(node.sandbox()).await.unwrap();
    node.pod
        .netlink(|link| async move {
            link.rename("net1", "stolen").await?;
            knd_testkit::links::add_veth("net1", "trap").await
        })
        .unwrap();

    hooks.stop_pod_sandbox(node.sandbox()).await.unwrap();
    let names = names_in(&node.pod);
    assert!(
        names.contains(&"net1".to_owned()) && names.contains(&"trap".to_owned()),
        "the tenant's veth stays in the pod: {names:?}"
    );
    assert!(
        !names.contains(&"stolen".to_owned()),
        "the claimed NIC left the pod: {names:?}"
    );
    let mut back = attach::record(node.host.netns(), "enp1").await.unwrap();
    back.link.index = before.link.index;
    assert_eq!(back, before, "the NIC is back as it was");
    let record = node.store.pods.get("pod-1").unwrap().unwrap();
    assert!(record.detached);
}

/// Attack 3, deeper: the tenant moves the claimed NIC into a namespace of its own and makes a
/// veth at the NIC's index under its name. The device found there is not the claimed one (its
/// peer differs): release leaves it alone, touches nothing on the host, keeps the pod recorded
/// as holding the NIC, and tells the claim's owner with a Warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn release_refuses_a_device_the_pod_made_at_the_claimed_index() {
    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    node.prepare(
        "c1",
        "enp1",
        r#""interface":{"name":"net1","addresses":["10.9.0.2/24"]}"#,
    );
    let hooks = node.hooks();
    hooks.run_pod_sandbox(node.sandbox()).await.unwrap();
    let record = node.store.pods.get("pod-1").unwrap().unwrap();
    let place = record.attachments[0].pod.as_ref().unwrap().place.unwrap();
    let hideout = tokio::task::spawn_blocking(|| TestHost::new("hideout").unwrap())
        .await
        .unwrap();
    let hideout_ns = hideout.netns().try_clone().unwrap();
    node.pod
        .netlink(|link| async move { link.move_to("net1", &hideout_ns).await })
        .unwrap();
    let index = place.index.to_string();
    let made = node
        .pod
        .run(move || {
            Command::new("ip")
                .args(["link", "add", "net1", "index", &index, "type", "veth"])
                .args(["peer", "name", "trap"])
                .status()
                .unwrap()
        })
        .unwrap();
    assert!(made.success(), "the tenant's veth at index {}", place.index);
    let host_before = names_in(&node.host);

    let refused = hooks.stop_pod_sandbox(node.sandbox()).await.unwrap_err();
    assert!(
        matches!(refused, knd::nri::pods::HookError::NotReturned { .. }),
        "{refused}"
    );
    assert_eq!(names_in(&node.host), host_before, "the host is untouched");
    assert!(names_in(&node.pod).contains(&"net1".to_owned()));
    let record = node.store.pods.get("pod-1").unwrap().unwrap();
    assert!(!record.detached, "still recorded as holding the NIC");
    let warnings = node.claims.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].0.name, "claim-c1");
    assert_eq!(warnings[0].1, "ReleaseRefused");
    assert!(
        warnings[0].2.contains("not the claimed device"),
        "{warnings:?}"
    );
    drop(hideout);
}

/// Attack 3, the MAC: a claim may not give its NIC a MAC address that a host interface already
/// uses (the pod could answer for the host, and a NIC coming back with it could be mistaken
/// for that interface). Refused before anything moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn a_claim_cannot_give_its_nic_a_host_interfaces_mac() {
    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    let enp2 = attach::record(node.host.netns(), "enp2").await.unwrap();
    let mac = enp2.link.mac.clone().unwrap();
    node.prepare(
        "c1",
        "enp1",
        &format!(r#""interface":{{"name":"net1","hardwareAddr":"{mac}"}}"#),
    );
    let before = attach::record(node.host.netns(), "enp1").await.unwrap();
    let err = knd::model::error_chain(
        &node
            .hooks()
            .run_pod_sandbox(node.sandbox())
            .await
            .unwrap_err(),
    );
    assert!(
        err.contains(&format!("set MAC {mac}")) && err.contains("enp2 on the host already uses it"),
        "{err}"
    );
    assert_eq!(
        attach::record(node.host.netns(), "enp1").await.unwrap(),
        before
    );
    assert!(!names_in(&node.pod).contains(&"net1".to_owned()));
}

/// What release finds a returned NIC by, on this machine's real hardware (read only): every
/// interface with a parent device in sysfs reports that device as its identity through
/// netlink, and is found by it.
#[tokio::test]
#[ignore = "needs root: reads the host's real interfaces"]
async fn this_machines_hardware_is_found_by_its_identity() {
    let link = knd::os::netlink::Link::connect().unwrap();
    let entries = link.links().await.unwrap();
    let mut hardware = 0;
    for entry in &entries {
        let device = std::path::Path::new("/sys/class/net")
            .join(&entry.name)
            .join("device");
        let Ok(target) = std::fs::canonicalize(&device) else {
            continue;
        };
        let bus = std::fs::canonicalize(device.join("subsystem")).unwrap();
        let expected = format!(
            "{}/{}",
            bus.file_name().unwrap().to_string_lossy(),
            target.file_name().unwrap().to_string_lossy()
        );
        assert_eq!(
            entry.identity.parent.as_deref(),
            Some(expected.as_str()),
            "{entry:?}"
        );
        let found = link.name_with_identity(&entry.identity).await.unwrap();
        assert_eq!(found.as_deref(), Some(entry.name.as_str()));
        hardware += 1;
    }
    assert!(
        hardware > 0,
        "no hardware interface on this machine: {entries:?}"
    );
}
