//! Attaching a claimed interface to a pod and giving it back, on real namespaces: a node (a
//! throwaway namespace standing in for the host) with a veth NIC cabled to a switch, and pods
//! that already have an `eth0`.

use std::{collections::BTreeMap, net::IpAddr};

use knd::{
    attach,
    model::{
        config::{self, NetworkConfig},
        records::HostSide,
    },
};
use knd_testkit::{TestHost, veth_pair};

/// The changeable device features of `interface` in `netns`, with their wanted state.
async fn features_of(netns: &knd::os::netns::Netns, interface: &str) -> BTreeMap<String, bool> {
    let name = interface.to_owned();
    netns
        .block_on_async(move || async move {
            let mut ethtool = knd::os::ethtool::Ethtool::connect(&name).unwrap();
            ethtool.features(&name).await.unwrap().changeable
        })
        .await
        .unwrap()
}

fn config(json: &str) -> NetworkConfig {
    let text = format!(r#"{{"apiVersion":"knd.dev/v1alpha1","kind":"NetworkConfig",{json}}}"#);
    let parsed = config::parse(text.as_bytes()).unwrap();
    parsed.validate(config::DeviceLimits::default()).unwrap();
    parsed
}

/// The host side without the interface index, which the kernel reassigns when an interface
/// changes namespace and its index is taken there.
fn portable(mut side: HostSide) -> HostSide {
    side.link.index = 0;
    side
}

/// A node with NIC `enp1` (MTU 1500, 192.168.50.2/24, a route to 10.50.0.0/16 via the switch,
/// a static neighbor) and a pod with its own `eth0`.
fn node_and_pod() -> (TestHost, TestHost, TestHost) {
    let node = TestHost::new("node").unwrap();
    let switch = TestHost::new("switch").unwrap();
    let pod = TestHost::new("pod").unwrap();
    veth_pair(&node, "enp1", &switch, "sw1").unwrap();
    veth_pair(&pod, "eth0", &switch, "sw2").unwrap();
    node.configure("enp1", "192.168.50.2".parse().unwrap(), 24)
        .unwrap();
    switch
        .configure("sw1", "192.168.50.1".parse().unwrap(), 24)
        .unwrap();
    node.netlink(|link| async move {
        let route = knd::model::link::Route {
            destination: "10.50.0.0/16".parse().unwrap(),
            gateway: Some("192.168.50.1".parse().unwrap()),
            source: None,
            table: 254,
            link_scope: false,
            metric: None,
        };
        link.add_route("enp1", &route).await?;
        link.add_neighbor(
            "enp1",
            "192.168.50.77".parse().unwrap(),
            "02:00:00:00:50:77",
        )
        .await
    })
    .unwrap();
    (node, switch, pod)
}

fn wanted_config() -> NetworkConfig {
    config(
        r#""interface":{"name":"net1","mtu":9000,"hardwareAddr":"02:00:00:00:00:42","addresses":["10.9.0.2/24"],
                        "gsoMaxSize":131072,"groMaxSize":131072},
           "ethtool":{"features":{"rx-gro":true,"tx-checksum-ip-generic":false}},
           "routes":[{"destination":"10.99.0.0/16","gateway":"10.9.0.1"}],
           "neighbors":[{"destination":"10.9.0.1","hardwareAddr":"02:00:00:00:00:01"}],
           "rules":[{"priority":100,"source":"10.9.0.0/24","table":100}],
           "sysctls":{"net.ipv4.conf.net1.arp_ignore":"1"}"#,
    )
}

/// What the wanted configuration makes of `net1` inside the pod.
async fn check_inside_the_pod(pod: &TestHost) {
    let inside = attach::record(pod.netns(), "net1").await.unwrap();
    assert_eq!(inside.link.mtu, 9000);
    assert!(inside.link.up);
    assert_eq!(inside.addresses, ["10.9.0.2/24".parse().unwrap()]);
    assert_eq!(inside.link.offload_sizes.gso_max_size, Some(131_072));
    assert_eq!(inside.link.offload_sizes.gro_max_size, Some(131_072));
    assert_eq!(inside.neighbors.len(), 1, "the pod's static neighbor");
    assert_eq!(inside.routes.len(), 1);
    assert_eq!(
        inside.routes[0].gateway,
        Some("10.9.0.1".parse::<IpAddr>().unwrap())
    );
    let pod_clone = pod.netns().try_clone().unwrap();
    let arp_ignore = tokio::task::spawn_blocking(move || {
        pod_clone
            .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/conf/net1/arp_ignore").unwrap())
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(arp_ignore.trim(), "1");
    let features = features_of(pod.netns(), "net1").await;
    assert_eq!(features.get("rx-gro"), Some(&true));
    assert_eq!(features.get("tx-checksum-ip-generic"), Some(&false));
    let pod_clone = pod.netns().try_clone().unwrap();
    let rules = tokio::task::spawn_blocking(move || {
        pod_clone.run(|| {
            std::process::Command::new("ip")
                .args(["-4", "rule", "show"])
                .output()
                .unwrap()
        })
    })
    .await
    .unwrap()
    .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    assert!(
        rules.contains("100:\tfrom 10.9.0.0/24 lookup 100"),
        "{rules}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn an_interface_is_configured_in_the_pod_and_restored_exactly_on_the_host() {
    let (node, switch, pod) = tokio::task::spawn_blocking(node_and_pod).await.unwrap();
    let wanted = wanted_config();
    let before = attach::record_for(node.netns(), "enp1", &wanted)
        .await
        .unwrap();
    assert_eq!(
        before.features,
        [
            ("rx-gro".to_owned(), false),
            ("tx-checksum-ip-generic".to_owned(), true)
        ]
        .into(),
        "the host's state of the features the claim changes"
    );
    assert_eq!(before.link.mtu, 1500);
    assert_eq!(before.addresses, ["192.168.50.2/24".parse().unwrap()]);
    assert_eq!(before.routes.len(), 1, "{:?}", before.routes);
    assert_eq!(before.neighbors.len(), 1, "{:?}", before.neighbors);
    assert_eq!(before.link.offload_sizes.gso_max_size, Some(65536));

    let side = attach::attach(node.netns(), pod.netns(), &before, "net1", &wanted)
        .await
        .unwrap();
    assert_eq!(side.name, "net1");
    assert_eq!(side.mac.as_deref(), Some("02:00:00:00:00:42"));
    check_inside_the_pod(&pod).await;
    let node_view = attach::record(node.netns(), "enp1").await;
    assert!(
        node_view
            .unwrap_err()
            .to_string()
            .contains("does not exist"),
        "gone from the node"
    );

    assert!(side.place.is_some(), "where it is in the pod is recorded");
    attach::detach(node.netns(), Some(pod.netns()), "net1", &before, side.place)
        .await
        .unwrap();
    let after = attach::record_for(node.netns(), "enp1", &wanted)
        .await
        .unwrap();
    assert_eq!(
        portable(after),
        portable(before.clone()),
        "name, MTU, MAC, up, GSO/GRO sizes, addresses, routes and neighbors as before"
    );
    assert!(attach::record(pod.netns(), "net1").await.is_err());
    let features = features_of(node.netns(), "enp1").await;
    assert_eq!(
        features.get("rx-gro"),
        Some(&false),
        "host features restored"
    );
    assert_eq!(features.get("tx-checksum-ip-generic"), Some(&true));
    // Detaching again is harmless.
    attach::detach(node.netns(), Some(pod.netns()), "net1", &before, side.place)
        .await
        .unwrap();
    assert_eq!(
        portable(
            attach::record_for(node.netns(), "enp1", &wanted)
                .await
                .unwrap()
        ),
        portable(before.clone())
    );
    drop(switch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn a_failed_step_is_named_and_undone() {
    let (node, _switch, pod) = tokio::task::spawn_blocking(node_and_pod).await.unwrap();
    let before = attach::record(node.netns(), "enp1").await.unwrap();
    // The gateway is not on any connected network: the route step fails after the move.
    let unreachable = config(
        r#""interface":{"name":"net1","mtu":4000,"addresses":["10.9.0.2/24"]},
           "routes":[{"destination":"10.99.0.0/16","gateway":"172.31.0.1"}]"#,
    );
    let error = attach::attach(node.netns(), pod.netns(), &before, "net1", &unreachable)
        .await
        .unwrap_err();
    assert_eq!(error.interface, "enp1");
    assert_eq!(error.step, "add route to 10.99.0.0/16");
    assert!(!error.reason.is_empty());
    assert_eq!(
        portable(attach::record(node.netns(), "enp1").await.unwrap()),
        portable(before.clone()),
        "undone"
    );
    assert!(attach::record(pod.netns(), "net1").await.is_err());

    // A name the pod already uses: the move itself fails, nothing changes.
    let taken = config(r#""interface":{"name":"eth0"}"#);
    let error = attach::attach(node.netns(), pod.netns(), &before, "eth0", &taken)
        .await
        .unwrap_err();
    assert_eq!(error.step, "move into the pod as eth0");
    assert!(
        error
            .reason
            .contains("already has an interface called eth0"),
        "{error}"
    );
    assert_eq!(
        portable(attach::record(node.netns(), "enp1").await.unwrap()),
        portable(before.clone())
    );

    // A feature the device cannot change: named, and everything undone.
    let fixed = config(r#""ethtool":{"features":{"rx-lro":true}}"#);
    let error = attach::attach(node.netns(), pod.netns(), &before, "net1", &fixed)
        .await
        .unwrap_err();
    assert_eq!(error.step, "ethtool", "{error}");
    assert!(
        error.reason.contains("cannot change feature rx-lro"),
        "{error}"
    );
    assert_eq!(
        portable(attach::record(node.netns(), "enp1").await.unwrap()),
        portable(before.clone())
    );

    // What this build cannot apply is refused before anything moves.
    let private = config(r#""ethtool":{"privateFlags":{"legacy-rx":true}}"#);
    let error = attach::attach(node.netns(), pod.netns(), &before, "net1", &private)
        .await
        .unwrap_err();
    assert!(
        error
            .reason
            .contains("ethtool.privateFlags is not supported"),
        "{error}"
    );
    assert_eq!(
        portable(attach::record(node.netns(), "enp1").await.unwrap()),
        portable(before.clone())
    );
}

/// A NIC the kernel hands back from a dying pod comes with the MAC address the claim gave it;
/// another host interface may carry that address too. Release finds the device by what was
/// recorded of it on the host and nobody in the pod can change — the permanent MAC or parent
/// device of hardware, the peer of a veth as here (see `netlink::recorded`) — so the host
/// interface carrying the claim's MAC is left exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn a_nic_handed_back_by_a_dying_pod_is_never_found_by_the_mac_the_claim_set() {
    let (node, switch, pod) = tokio::task::spawn_blocking(node_and_pod).await.unwrap();
    let before = attach::record(node.netns(), "enp1").await.unwrap();
    let wanted = config(
        r#""interface":{"name":"net1","mtu":9000,"hardwareAddr":"02:00:00:00:00:43","addresses":["10.9.0.2/24"]}"#,
    );
    attach::attach(node.netns(), pod.netns(), &before, "net1", &wanted)
        .await
        .unwrap();
    // The pod's namespace dies: the kernel hands the NIC back to the host under a name of its
    // choosing and with the pod's MAC (emulated). A host interface `decoy` also has that MAC
    // (set after the attach, which would have refused it).
    let node_ns = node.netns().try_clone().unwrap();
    pod.netlink(|link| async move { link.move_renamed("net1", &node_ns, "dev77").await })
        .unwrap();
    veth_pair(&node, "decoy", &switch, "sw9").unwrap();
    node.netlink(|link| async move { link.set_mac("decoy", "02:00:00:00:00:43").await })
        .unwrap();
    let decoy = attach::record(node.netns(), "decoy").await.unwrap();
    attach::detach(node.netns(), None, "net1", &before, None)
        .await
        .unwrap();
    assert_eq!(
        attach::record(node.netns(), "decoy").await.unwrap(),
        decoy,
        "the interface with the claim's MAC is untouched"
    );
    assert_eq!(
        portable(attach::record(node.netns(), "enp1").await.unwrap()),
        portable(before),
        "host MAC, MTU, addresses, routes and neighbors restored"
    );
}
