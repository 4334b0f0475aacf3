//! The TCX traffic counters against the kernel's own interface statistics, on real namespaces and
//! a real veth pair. Root-only tests are ignored with a reason unless run as root (`cargo xtask
//! test` runs them; CI is root).

use std::net::{IpAddr, Ipv4Addr};

use knd::{
    model::link::LinkStats,
    observe::telemetry::{InterfaceTraffic, TrafficProbes, probes_object},
};
use knd_testkit::{TestHost, macvlan, tcp_transfer, veth_pair};
use object::{Object as _, ObjectSection as _};

const A_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1));
const B_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2));

#[test]
fn embedded_object_carries_btf_and_every_program_and_map() {
    let object = object::File::parse(probes_object()).expect("the embedded object is ELF");
    assert_eq!(object.architecture(), object::Architecture::Bpf);
    let btf = object.section_by_name(".BTF").expect("a .BTF section");
    assert!(btf.size() > 0, ".BTF is empty");
    assert!(object.section_by_name(".BTF.ext").is_some(), "no .BTF.ext");
    let symbols: Vec<String> = object
        .symbols()
        .filter_map(|s| object::ObjectSymbol::name(&s).ok().map(str::to_owned))
        .collect();
    for name in [
        "knd_traffic_ingress",
        "knd_traffic_egress",
        "knd_share_ingress",
        "knd_share_egress",
        "knd_sockops",
        "IFACE_STATS",
        "NETNS_RTT",
    ] {
        assert!(
            symbols.iter().any(|s| s == name),
            "{name} missing from {symbols:?}"
        );
    }
}

/// Two hosts joined by a veth pair, addressed, IPv6 off (no background traffic).
fn two_hosts() -> (TestHost, TestHost) {
    let a = TestHost::new("a").unwrap();
    let b = TestHost::new("b").unwrap();
    veth_pair(&a, "veth-a", &b, "veth-b").unwrap();
    (a, b)
}

fn bring_up(a: &TestHost, b: &TestHost) {
    a.configure("veth-a", A_ADDR, 24).unwrap();
    b.configure("veth-b", B_ADDR, 24).unwrap();
}

/// Reads our counters bracketed by two identical kernel readings, so that no frame can have
/// slipped in between the two sources. Retries a few times if something was in flight.
fn settled(
    probes: &TrafficProbes,
    id: knd::observe::telemetry::AttachmentId,
    host: &TestHost,
    interface: &str,
) -> (InterfaceTraffic, LinkStats) {
    for _ in 0..20 {
        let before = host.link_stats(interface).unwrap();
        let ours = probes.traffic(id).unwrap();
        let after = host.link_stats(interface).unwrap();
        if before == after {
            return (ours, after);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("traffic on {interface} never settled");
}

fn assert_exact(ours: InterfaceTraffic, kernel: LinkStats) {
    assert_eq!(
        (ours.rx.packets, ours.rx.bytes),
        (kernel.rx_packets, kernel.rx_bytes),
        "rx: ours {ours:?} vs kernel {kernel:?}"
    );
    // Egress: the TC hook runs before the device transmits, so a frame the device then drops
    // (a veth whose peer's backlog is full, under load) is ours but counted by the kernel as
    // dropped rather than sent. Without drops the counts are exact; with drops each dropped
    // frame is one of ours, carrying at most one maximal (GSO) frame's bytes.
    assert_eq!(
        ours.tx.packets,
        kernel.tx_packets + kernel.tx_dropped,
        "tx: ours {ours:?} vs kernel {kernel:?}"
    );
    let extra = ours.tx.bytes.checked_sub(kernel.tx_bytes);
    assert!(
        extra
            .is_some_and(|extra| extra <= kernel.tx_dropped * 65_536
                && (extra == 0) == (kernel.tx_dropped == 0)),
        "tx bytes: ours {ours:?} vs kernel {kernel:?}"
    );
}

#[test]
#[ignore = "needs root: namespaces, veth and eBPF (cargo xtask test runs it as root)"]
fn tcx_counters_equal_the_kernels_interface_counters() {
    let (a, b) = two_hosts();
    let mut probes = TrafficProbes::new();
    // Attached while the link is still down: every frame the interface ever carries is seen.
    let id = probes.attach(a.netns(), "veth-a").unwrap();
    bring_up(&a, &b);

    a.ping(B_ADDR, 5).unwrap();
    b.ping(A_ADDR, 3).unwrap();
    let payload = 4 * 1024 * 1024 + 123;
    assert_eq!(tcp_transfer(&a, &b, B_ADDR, payload).unwrap(), payload);
    // And the other way, so both directions carry bulk data.
    assert_eq!(tcp_transfer(&b, &a, A_ADDR, payload).unwrap(), payload);

    let (ours, kernel) = settled(&probes, id, &a, "veth-a");
    assert_exact(ours, kernel);
    // The traffic really went through: both directions carried the payloads.
    assert!(ours.tx.bytes > payload as u64, "{ours:?}");
    assert!(ours.rx.bytes > payload as u64, "{ours:?}");
    assert!(ours.rx.packets >= 8 && ours.tx.packets >= 8, "{ours:?}");

    // A reader (what a scrape holds, with a map handle of its own) reads the same counters
    // without the probes, and still reads them after the detach a pod's stop does.
    let reader = probes.reader(id).unwrap();
    let read = reader.detail().unwrap();
    assert_eq!((read.rx.total(), read.tx.total()), (ours.rx, ours.tx));
    // Detaching stops counting; the peer is untouched by our program all along.
    probes.detach(id).unwrap();
    let after = reader.detail().unwrap();
    assert_eq!(after.rx.total(), ours.rx, "the detached map, frozen");
    assert!(
        probes.traffic(id).is_err(),
        "a detached attachment still answers"
    );
    a.ping(B_ADDR, 2).unwrap();
}

#[test]
#[ignore = "needs root: namespaces, veth and eBPF (cargo xtask test runs it as root)"]
fn counting_starts_at_attach_and_is_per_interface() {
    let (a, b) = two_hosts();
    bring_up(&a, &b);
    a.ping(B_ADDR, 2).unwrap();
    let before_attach = a.link_stats("veth-a").unwrap();

    let mut probes = TrafficProbes::new();
    let on_a = probes.attach(a.netns(), "veth-a").unwrap();
    let on_b = probes.attach(b.netns(), "veth-b").unwrap();
    assert!(
        probes.attach(a.netns(), "veth-a").is_err(),
        "attaching twice to one interface must be refused"
    );
    tcp_transfer(&a, &b, B_ADDR, 1 << 20).unwrap();

    let (ours_a, kernel_a) = settled(&probes, on_a, &a, "veth-a");
    let (ours_b, kernel_b) = settled(&probes, on_b, &b, "veth-b");
    // Since attach: kernel counters minus what they were before.
    assert_eq!(ours_a.tx.bytes, kernel_a.tx_bytes - before_attach.tx_bytes);
    assert_eq!(ours_a.rx.bytes, kernel_a.rx_bytes - before_attach.rx_bytes);
    assert_eq!(
        ours_a.tx.packets,
        kernel_a.tx_packets - before_attach.tx_packets
    );
    // The two ends of one veth see each other's traffic mirrored, each under its own key.
    assert_eq!(ours_a.tx, ours_b.rx);
    assert_eq!(ours_a.rx, ours_b.tx);
    assert!(kernel_b.rx_bytes >= ours_b.rx.bytes);
}

/// A node whose veth `uplink` (its peer `wire` at `B_ADDR` on host `peer`) has a macvlan child
/// `name`, moved into a pod and given `A_ADDR` there: (node, peer, pod).
fn macvlan_in_pod(name: &str) -> (TestHost, TestHost, TestHost) {
    let node = TestHost::new("node").unwrap();
    let peer = TestHost::new("peer").unwrap();
    let pod = TestHost::new("pod").unwrap();
    veth_pair(&node, "uplink", &peer, "wire").unwrap();
    node.disable_ipv6("uplink").unwrap();
    node.set_up("uplink").unwrap();
    macvlan(&node, name, "uplink").unwrap();
    node.move_link(name, &pod).unwrap();
    pod.configure(name, A_ADDR, 24).unwrap();
    peer.configure("wire", B_ADDR, 24).unwrap();
    (node, peer, pod)
}

#[test]
#[ignore = "needs root: namespaces, macvlan and eBPF (cargo xtask test runs it as root)"]
fn counters_work_on_a_macvlan_moved_into_another_namespace() {
    // The shape of a real attachment: a NIC-like device (macvlan on a veth "uplink") is moved
    // into a pod's namespace and watched there.
    let (node, peer, pod) = macvlan_in_pod("nic0");
    let mut probes = TrafficProbes::new();
    let id = probes.attach(pod.netns(), "nic0").unwrap();
    assert!(
        probes.attach(node.netns(), "nic0").is_err(),
        "nic0 no longer exists in the node namespace"
    );
    pod.ping(B_ADDR, 3).unwrap();
    tcp_transfer(&pod, &peer, B_ADDR, 2 << 20).unwrap();
    let (ours, kernel) = settled(&probes, id, &pod, "nic0");
    assert_exact(ours, kernel);
    assert!(ours.tx.bytes > 2 << 20, "{ours:?}");
    assert!(ours.rx.packets > 3, "{ours:?}");
}

/// Sends one UDP datagram from `from` to `to:port` with `payload`.
fn udp(from: &TestHost, to: IpAddr, port: u16, payload: &[u8]) {
    from.run(|| {
        let socket = std::net::UdpSocket::bind((A_ADDR, 0)).unwrap();
        socket.send_to(payload, (to, port)).unwrap();
    })
    .unwrap();
}

#[test]
#[ignore = "needs root: creates network namespaces and loads eBPF programs"]
fn traffic_is_split_by_class_size_and_roce_opcode_and_tcp_rtt_is_sampled() {
    let (a, b) = two_hosts();
    bring_up(&a, &b);
    let mut probes = TrafficProbes::new();
    let id = probes.attach(a.netns(), "veth-a").unwrap();
    let cgroup = knd::observe::telemetry::default_cgroup_root().expect("a cgroup v2 mount");
    let mut sockets = knd::observe::telemetry::SocketProbes::attach(&cgroup).unwrap();
    let cookie = a.netns().cookie().unwrap();
    sockets.watch(cookie).unwrap();

    // ARP resolution first, so that the datagrams below are the only UDP frames.
    a.ping(B_ADDR, 1).unwrap();
    // A RoCEv2 congestion notification (BTH opcode 0x81) and a plain UDP datagram.
    let mut cnp = [0_u8; 28];
    cnp[0] = 0x81;
    udp(&a, B_ADDR, 4791, &cnp);
    udp(&a, B_ADDR, 5000, b"hello");
    let payload = 4 << 20;
    tcp_transfer(&a, &b, B_ADDR, payload).unwrap();

    let detail = probes.detail(id).unwrap();
    let totals = probes.traffic(id).unwrap();
    let (tx, rx) = (&detail.tx, &detail.rx);
    let (tcp, udp_class, roce_class) = (
        knd_common::class::TCP as usize,
        knd_common::class::UDP as usize,
        knd_common::class::ROCE as usize,
    );
    assert!(tx.classes[tcp].bytes > payload as u64, "{detail:?}");
    assert!(rx.classes[tcp].packets > 0, "the ACKs: {detail:?}");
    assert_eq!(tx.classes[udp_class].packets, 1, "{detail:?}");
    assert_eq!(tx.classes[roce_class].packets, 1, "{detail:?}");
    assert_eq!(tx.roce[4].packets, 1, "the CNP's opcode class: {detail:?}");
    assert_eq!(tx.roce.iter().map(|c| c.packets).sum::<u64>(), 1);
    assert_eq!(tx.total(), totals.tx, "classes add up to the totals");
    assert_eq!(rx.total(), totals.rx);
    assert_eq!(tx.sizes.iter().sum::<u64>(), totals.tx.packets);
    assert_eq!(rx.sizes.iter().sum::<u64>(), totals.rx.packets);
    assert!(
        tx.sizes[knd_common::size_bucket(1514) as usize..]
            .iter()
            .sum::<u64>()
            > 0,
        "full-size (or GSO) frames carried the transfer: {:?}",
        tx.sizes
    );

    let rtt = sockets.rtt(cookie).unwrap().expect("watched");
    assert!(rtt.samples > 0, "{rtt:?}");
    assert_eq!(rtt.buckets.iter().sum::<u64>(), rtt.samples);
    assert!(rtt.sum_us > 0);
    // The other end's namespace is not watched: nothing recorded for it.
    assert_eq!(sockets.rtt(b.netns().cookie().unwrap()).unwrap(), None);
    sockets.unwatch(cookie).unwrap();
    assert_eq!(sockets.rtt(cookie).unwrap(), None);
}

/// TCX links follow a device into another namespace (how knd links a claimed NIC on the node
/// ahead of its pod). Once told the device moved, the probes know where it is: a second
/// attachment on it there is refused, and its counters are reset to zero.
#[test]
#[ignore = "needs root: creates network namespaces and loads eBPF programs"]
fn an_attachment_follows_its_device_into_another_namespace() {
    let (a, b) = two_hosts();
    let pod = TestHost::new("pod").unwrap();
    let mut probes = TrafficProbes::new();
    bring_up(&a, &b);
    let id = probes.attach(a.netns(), "veth-a").unwrap();
    a.ping(B_ADDR, 2).unwrap();
    assert!(probes.traffic(id).unwrap().tx.packets > 0);
    let target = pod.netns().try_clone().unwrap();
    a.netlink(|link| async move { link.move_to("veth-a", &target).await })
        .unwrap();
    assert_eq!(
        pod.tcx_programs("veth-a").unwrap(),
        ["knd_traffic_ing", "knd_traffic_egr"],
        "the links moved with the device"
    );
    probes.moved(id, pod.netns(), "veth-a").unwrap();
    assert_eq!(
        probes.describe(id),
        Some(("veth-a", pod.netns().to_string().as_str()))
    );
    let again = probes.attach(pod.netns(), "veth-a");
    assert!(
        matches!(
            again,
            Err(knd::observe::telemetry::Error::AlreadyAttached { .. })
        ),
        "{again:?}"
    );
    probes.reset(id).unwrap();
    let zero = probes.traffic(id).unwrap();
    assert_eq!((zero.rx.packets, zero.tx.packets, zero.tx.bytes), (0, 0, 0));
}

/// A share of a NIC: a macvlan child of the node's uplink in a pod, counted, and policed on
/// egress at `rate` bytes per second.
fn policed_share(
    rate: u64,
    ingress: bool,
) -> (
    TestHost,
    TestHost,
    TestHost,
    TrafficProbes,
    knd::observe::telemetry::AttachmentId,
) {
    use knd::observe::telemetry::ShareLimits;
    use knd_common::{Policer, policer_burst};
    let (node, peer, pod) = macvlan_in_pod("share0");
    let mut probes = TrafficProbes::new();
    let id = probes.attach_policing(pod.netns(), "share0").unwrap();
    let policer = Policer::new(rate, policer_burst(rate));
    let limits = ShareLimits {
        ingress: ingress.then_some(policer),
        egress: Some(policer),
    };
    probes.police(id, limits).unwrap();
    (node, peer, pod, probes, id)
}

#[test]
#[ignore = "needs root: namespaces and eBPF (cargo xtask test runs it as root)"]
fn an_interface_of_its_own_is_counted_by_programs_that_never_touch_a_policer() {
    use knd::observe::telemetry::{Error, ShareLimits};
    let (a, _b) = two_hosts();
    let mut probes = TrafficProbes::new();
    let own = probes.attach(a.netns(), "veth-a").unwrap();
    // What the kernel says the linked programs use: the counters, and nothing of a share.
    let maps = probes.program_maps(own).unwrap();
    assert_eq!(
        maps.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        ["knd_traffic_ingress", "knd_traffic_egress"]
    );
    for (program, maps) in &maps {
        assert_eq!(maps, &["IFACE_STATS"], "{program}");
    }
    let policer = knd_common::Policer::new(1_000_000, knd_common::policer_burst(1_000_000));
    let limits = ShareLimits {
        ingress: None,
        egress: Some(policer),
    };
    let refused = probes.police(own, limits).unwrap_err();
    assert!(
        matches!(&refused, Error::NotPolicing { interface } if interface == "veth-a"),
        "{refused}"
    );
    // A share's programs use the policer and count what it dropped.
    probes.detach(own).unwrap();
    let share = probes.attach_policing(a.netns(), "veth-a").unwrap();
    for (program, mut maps) in probes.program_maps(share).unwrap() {
        maps.sort();
        assert_eq!(maps, ["IFACE_STATS", "POLICED", "POLICER"], "{program}");
    }
    probes.police(share, limits).unwrap();
}

#[test]
#[ignore = "needs root: namespaces, macvlan and eBPF (cargo xtask test runs it as root)"]
fn a_policed_interface_never_sends_above_its_share_and_counts_what_it_dropped() {
    // 400 Mbit/s = 50 MB/s.
    let rate = 50_000_000;
    let (_node, peer, pod, probes, id) = policed_share(rate, false);
    // An unpaced TCP sender: the policer alone holds it below the share (TCP recovers badly
    // from drops at its own interface, so it gets much less: why shares are also paced).
    let bytes = 8 << 20;
    let started = std::time::Instant::now();
    let received = tcp_transfer(&pod, &peer, B_ADDR, bytes).unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(received, bytes);
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let fastest = (bytes as f64 - knd_common::policer_burst(rate) as f64) / rate as f64;
    assert!(
        elapsed >= fastest,
        "{bytes} B in {elapsed:.3} s: faster than the share allows ({fastest:.3} s)"
    );
    let detail = probes.detail(id).unwrap();
    assert!(detail.policed_tx.packets > 0, "{detail:?}");
    assert!(detail.policed_tx.bytes >= detail.policed_tx.packets * 1_000);
    assert_eq!(detail.policed_rx.packets, 0, "ingress is not policed");
    // What the policer dropped never left: knd's transmit counters are still the kernel's.
    let (ours, kernel) = settled(&probes, id, &pod, "share0");
    assert_exact(ours, kernel);
}

#[test]
#[ignore = "needs root: namespaces, macvlan, cgroups and eBPF (cargo xtask test runs it as root)"]
fn a_paced_share_gets_its_rate_without_drops() {
    let rate = 50_000_000;
    let (_node, peer, pod, probes, id) = policed_share(rate, false);
    let cgroup = knd::observe::telemetry::default_cgroup_root().expect("a cgroup v2 mount");
    let mut sockets = knd::observe::telemetry::SocketProbes::attach(&cgroup).unwrap();
    let cookie = pod.netns().cookie().unwrap();
    sockets.pace(cookie, A_ADDR, rate).unwrap();
    let bytes = 100 << 20;
    let started = std::time::Instant::now();
    let received = tcp_transfer(&pod, &peer, B_ADDR, bytes).unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let achieved = received as f64 / elapsed / rate as f64;
    assert!(
        (0.85..=1.05).contains(&achieved),
        "{received} B in {elapsed:.2} s: {achieved:.3} of the share"
    );
    let detail = probes.detail(id).unwrap();
    assert!(
        detail.policed_tx.packets * 100 < detail.tx.total().packets,
        "paced, the flow meets the policer rarely: {:?} of {:?}",
        detail.policed_tx,
        detail.tx.total()
    );
    // Unpaced again, a new connection meets the policer.
    sockets.unpace(cookie, A_ADDR).unwrap();
    tcp_transfer(&pod, &peer, B_ADDR, 4 << 20).unwrap();
    let after = probes.detail(id).unwrap();
    assert!(
        after.policed_tx.packets > detail.policed_tx.packets,
        "{:?} then {:?}",
        detail.policed_tx,
        after.policed_tx
    );
}

#[test]
#[ignore = "needs root: namespaces, macvlan and eBPF (cargo xtask test runs it as root)"]
fn an_ingress_policer_drops_what_exceeds_the_share_after_it_was_counted() {
    let rate = 1_250_000; // 10 Mbit/s
    let (_node, peer, pod, probes, id) = policed_share(rate, true);
    pod.ping(B_ADDR, 1).unwrap();
    // 2 MB at once from the peer: the bucket (512 kB) passes about a quarter.
    peer.run(|| {
        let socket = std::net::UdpSocket::bind((B_ADDR, 0)).unwrap();
        for _ in 0..1_500 {
            socket.send_to(&[0x5a; 1_300], (A_ADDR, 9)).unwrap();
        }
    })
    .unwrap();
    let detail = probes.detail(id).unwrap();
    assert!(detail.policed_rx.packets > 1_000, "{detail:?}");
    assert!(detail.policed_rx.packets < 1_500, "{detail:?}");
    // Counted before the policer: knd's receive counters are the kernel's.
    let (ours, kernel) = settled(&probes, id, &pod, "share0");
    assert_exact(ours, kernel);
}
