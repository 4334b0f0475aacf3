//! Discovery on this machine's real sysfs and routing table (root: creates interfaces in the
//! host namespace, removed again on drop).

use knd::{
    cli::discover,
    inventory::{ExclusionReason, host::HostRoot},
    resources::{self, Value},
    testkit::HostInterfaces,
};

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
