//! A hostile tenant against knd: each test plays one attack from the trust-boundary issue on
//! real namespaces and asserts that the host is untouched.

use std::process::Command;

use knd::{
    attach,
    config::{self, SysctlKey},
    inventory::{host::HostRoot, uplink},
    testkit::{TestHost, veth_pair},
};

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
