//! Device health: on fixture machines (link state, error counters and RDMA port counters in
//! sysfs as the kernel lays them out) and, as root, for an interface attached to a pod, read
//! over netlink inside the pod's namespace while its link goes down and flaps.

use std::{collections::BTreeMap, time::Duration};

use knd::{
    discover::inventory::{Inventory, scan},
    model::ports::DeviceHealth,
    observe::health::{self, InPod, Policy, Tracker},
};
use knd_testkit::{TestHost, device_named, machines, sysfs::SysfsTree, veth_pair};

fn policy() -> Policy {
    Policy {
        window: Duration::from_mins(1),
        flaps: 4,
        errors: 10,
    }
}

fn device_of(inventory: &Inventory, interface: &str) -> String {
    device_named(inventory, interface).unwrap_or_else(|| panic!("no NIC {interface}"))
}

fn find<'a>(health: &'a [DeviceHealth], device: &str) -> &'a DeviceHealth {
    health
        .iter()
        .find(|d| d.device == device)
        .unwrap_or_else(|| panic!("{device} missing from {health:?}"))
}

async fn assess(
    tracker: &mut Tracker,
    tree: &SysfsTree,
    inventory: &Inventory,
) -> Vec<DeviceHealth> {
    health::assess(tracker, &tree.host(), inventory, &BTreeMap::new(), "node-1").await
}

#[tokio::test]
async fn node_devices_turn_unhealthy_with_a_reason_from_sysfs_and_recover() {
    let tree = machines::gpu_8x8();
    let inventory = scan(&tree.host(), None);
    let mut tracker = Tracker::new(policy());
    let first = assess(&mut tracker, &tree, &inventory).await;
    assert_eq!(first.len(), inventory.nics.len());
    assert!(
        first.iter().all(|d| d.healthy && d.reason.is_empty()),
        "{first:?}"
    );
    assert!(first.iter().all(|d| d.pool == "node-1"));

    let nic0 = device_of(&inventory, "enp20s0np0");
    let nic1 = device_of(&inventory, "enp52s0np0");
    let nic2 = device_of(&inventory, "enp84s0np0");
    let net = |name: &str| format!("/sys/class/net/{name}");
    // nic0's link goes down; nic1's CRC errors climb; nic2's RDMA port sees symbol errors.
    tree.file(&format!("{}/operstate", net("enp20s0np0")), "down\n");
    tree.file(
        &format!("{}/statistics/rx_crc_errors", net("enp52s0np0")),
        "3\n",
    );
    tree.file(
        "/sys/class/infiniband/mlx5_2/ports/1/counters/symbol_error",
        "0\n",
    );
    let second = assess(&mut tracker, &tree, &inventory).await;
    assert_eq!(
        find(&second, &nic0).reason,
        "link enp20s0np0 is down (operstate)"
    );
    assert!(!find(&second, &nic0).healthy);
    assert!(
        find(&second, &nic1).healthy,
        "a counter seen for the first time is no rise"
    );
    assert!(find(&second, &nic2).healthy);

    tree.file(&format!("{}/operstate", net("enp20s0np0")), "up\n");
    tree.file(
        &format!("{}/statistics/rx_crc_errors", net("enp52s0np0")),
        "40\n",
    );
    tree.file(
        "/sys/class/infiniband/mlx5_2/ports/1/counters/symbol_error",
        "25\n",
    );
    let third = assess(&mut tracker, &tree, &inventory).await;
    assert!(
        find(&third, &nic0).healthy,
        "link back up: {:?}",
        find(&third, &nic0)
    );
    assert_eq!(
        find(&third, &nic1).reason,
        "error counters rising in the last 60 s: enp52s0np0:rx_crc_errors +37"
    );
    assert_eq!(
        find(&third, &nic2).reason,
        "error counters rising in the last 60 s: mlx5_2/1:symbol_error +25"
    );
    let others = third
        .iter()
        .filter(|d| ![&nic0, &nic1, &nic2].contains(&&d.device));
    assert!(
        others.clone().all(|d| d.healthy),
        "untouched devices stay healthy"
    );
    assert!(others.count() > 0);
}

#[tokio::test]
async fn unreadable_or_garbled_counters_are_ignored_not_fatal() {
    let tree = machines::gpu_8x8();
    let inventory = scan(&tree.host(), None);
    let mut tracker = Tracker::new(policy());
    let nic0 = device_of(&inventory, "enp20s0np0");
    tree.file("/sys/class/net/enp20s0np0/carrier_changes", "lots\n");
    tree.file(
        "/sys/class/net/enp20s0np0/statistics/rx_errors",
        "\u{1}\u{2}\n",
    );
    let health = assess(&mut tracker, &tree, &inventory).await;
    assert!(find(&health, &nic0).healthy, "{:?}", find(&health, &nic0));
}

/// A veth `eth9` in pod `pod`, its peer `peer9` in `wire`.
fn pod_with_nic() -> (TestHost, TestHost) {
    let pod = TestHost::new("pod").unwrap();
    let wire = TestHost::new("wire").unwrap();
    veth_pair(&pod, "eth9", &wire, "peer9").unwrap();
    pod.set_up("eth9").unwrap();
    wire.set_up("peer9").unwrap();
    (pod, wire)
}

fn set_down(host: &TestHost, interface: &str) {
    host.netlink(|link| async move { link.set_down(interface).await })
        .unwrap();
}

#[tokio::test]
#[ignore = "needs root: creates network namespaces (cargo xtask test runs it as root)"]
async fn an_attached_device_is_read_in_its_pod_while_its_link_goes_down_and_flaps() {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let (pod, wire) = pod_with_nic();
    let attached = BTreeMap::from([(
        "nic-attached".to_owned(),
        InPod {
            netns: format!("/proc/self/fd/{}", pod.netns().as_fd().as_raw_fd()).into(),
            interface: "eth9".to_owned(),
        },
    )]);
    // The device left the node's sysfs with its interface: it is known from the records only.
    let empty = SysfsTree::new();
    let inventory = Inventory::default();
    let mut tracker = Tracker::new(policy());
    let mut assess = async || {
        let health =
            health::assess(&mut tracker, &empty.host(), &inventory, &attached, "node-1").await;
        assert_eq!(health.len(), 1);
        health[0].clone()
    };
    let up = assess().await;
    assert!(up.healthy, "{up:?}");
    assert_eq!(up.device, "nic-attached");

    // The far end goes down: no carrier on eth9.
    set_down(&wire, "peer9");
    let down = assess().await;
    assert!(!down.healthy);
    assert!(
        down.reason.starts_with("link eth9 is ") && down.reason.ends_with("(operstate)"),
        "{down:?}"
    );
    // Up, down, up: four carrier changes since the first reading.
    wire.set_up("peer9").unwrap();
    set_down(&wire, "peer9");
    wire.set_up("peer9").unwrap();
    let flapping = assess().await;
    assert!(!flapping.healthy);
    assert!(
        flapping.reason.starts_with("carrier of eth9 is flapping: ")
            && flapping
                .reason
                .ends_with(" carrier changes in the last 60 s"),
        "{flapping:?}"
    );
}

#[test]
fn the_records_say_which_devices_are_in_which_pod() {
    use knd::{
        model::records::{AttachmentRecord, PodRecord, PodSide},
        os::state::StateStore,
    };
    use knd_testkit::claims::{attachment_record, pod_record};
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let attachment = |device: &str, pod: Option<&str>| AttachmentRecord {
        pod: pod.map(|name| PodSide {
            name: name.into(),
            ..attachment_record("uid", device).pod.unwrap()
        }),
        ..attachment_record("uid", device)
    };
    let record = |uid: &str, attachments, detached| PodRecord {
        detached,
        ..pod_record(uid, attachments)
    };
    store
        .pods
        .put(
            "p1",
            &record(
                "p1",
                vec![attachment("nic-a", Some("net1")), attachment("nic-b", None)],
                false,
            ),
        )
        .unwrap();
    store
        .pods
        .put(
            "p2",
            &record("p2", vec![attachment("nic-c", Some("net1"))], true),
        )
        .unwrap();
    let attached = health::attached(&store);
    assert_eq!(
        attached,
        BTreeMap::from([(
            "nic-a".to_owned(),
            InPod {
                netns: "/run/netns/p1".into(),
                interface: "net1".into()
            }
        )]),
        "not yet moved (nic-b) and given back (p2) are on the node"
    );
}
