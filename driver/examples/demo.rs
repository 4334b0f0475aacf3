//! `cargo xtask demo`: knd's in-kernel telemetry on stand-in NICs, end to end, on this machine.
//!
//! A node with two NIC-like parent devices cabled to a switch, a macvlan "NIC" on each moved into
//! its own pod namespace (as knd's NRI hook will do), knd's TCX counters attached inside the pods, real TCP and ICMP
//! traffic between them, live per-NIC rates, and a final check against the kernel's own
//! counters. Every namespace is anonymous: the kernel removes all of it when the demo exits, even
//! on Ctrl-C or a kill.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use knd::{
    cli::RateLine,
    telemetry::{AttachmentId, InterfaceTraffic, TrafficProbes},
    testkit::{TestHost, bridge, macvlan, tcp_transfer, veth_pair},
};

const POD_A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
const POD_B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11));
const SECONDS: u32 = 5;

fn main() -> anyhow::Result<()> {
    println!("knd demo: in-kernel per-NIC telemetry on stand-in NICs (no cluster needed)\n");

    let started = Instant::now();
    let node = Arc::new(TestHost::new("node")?);
    let switch = TestHost::new("switch")?;
    let pod_a = Arc::new(TestHost::new("pod-a")?);
    let pod_b = Arc::new(TestHost::new("pod-b")?);
    for (pf, port) in [("pf0", "port0"), ("pf1", "port1")] {
        veth_pair(&node, pf, &switch, port)?;
        node.disable_ipv6(pf)?;
        node.set_up(pf)?;
    }
    bridge(&switch, "switch", &["port0", "port1"])?;
    for (nic, pf, pod, address) in [
        ("nic-a", "pf0", &pod_a, POD_A),
        ("nic-b", "pf1", &pod_b, POD_B),
    ] {
        macvlan(&node, nic, pf)?;
        node.move_link(nic, pod)?;
        pod.configure(nic, address, 24)?;
    }
    println!(
        "  node: NIC parents pf0, pf1 cabled to a switch; nic-a (on pf0) moved into pod-a \
         ({POD_A}), nic-b (on pf1) into pod-b ({POD_B}) in {:.0?}",
        started.elapsed()
    );

    let mut probes = TrafficProbes::new();
    let attach_started = Instant::now();
    let on_a = probes.attach(pod_a.netns(), "nic-a")?;
    let on_b = probes.attach(pod_b.netns(), "nic-b")?;
    println!(
        "  knd: TCX ingress+egress counters attached inside both pods in {:.1?}\n",
        attach_started.elapsed()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, pod_a, pod_b) = (Arc::clone(&stop), Arc::clone(&pod_a), Arc::clone(&pod_b));
        std::thread::spawn(move || -> anyhow::Result<u64> {
            let mut sent = 0_u64;
            while !stop.load(Ordering::Relaxed) {
                pod_b.ping(POD_A, 2)?;
                sent += tcp_transfer(&pod_a, &pod_b, POD_B, 32 << 20)? as u64;
            }
            Ok(sent)
        })
    };

    println!("  {:<6}{}", "NIC", RateLine::header());
    let mut last = [(on_a, probes.traffic(on_a)?), (on_b, probes.traffic(on_b)?)];
    let mut last_at = Instant::now();
    for _ in 0..SECONDS {
        std::thread::sleep(Duration::from_secs(1));
        let seconds = last_at.elapsed().as_secs_f64();
        last_at = Instant::now();
        for (id, previous) in &mut last {
            let now = probes.traffic(*id)?;
            let (interface, _) = probes.describe(*id).context("attachment vanished")?;
            println!(
                "  {interface:<6}{}",
                RateLine::between(previous, &now, seconds)
            );
            *previous = now;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent = traffic
        .join()
        .map_err(|_| anyhow::anyhow!("the traffic thread panicked"))??;
    println!(
        "\n  traffic: {} MiB of TCP from pod-a to pod-b, plus pings",
        sent >> 20
    );

    println!("\n  check: knd's eBPF counters vs the kernel's own interface statistics");
    check(&probes, on_a, &pod_a, "nic-a")?;
    check(&probes, on_b, &pod_b, "nic-b")?;

    probes.detach(on_a)?;
    probes.detach(on_b)?;
    println!(
        "\n  done in {:.1?}; the namespaces and NICs vanish with this process",
        started.elapsed()
    );
    Ok(())
}

/// Prints and verifies that our counters equal the kernel's, once traffic has settled.
fn check(
    probes: &TrafficProbes,
    id: AttachmentId,
    pod: &TestHost,
    interface: &str,
) -> anyhow::Result<()> {
    for _ in 0..20 {
        let before = pod.link_stats(interface)?;
        let ours: InterfaceTraffic = probes.traffic(id)?;
        let after = pod.link_stats(interface)?;
        if before != after {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        println!(
            "  {interface:<6} rx {:>8} pkts {:>12} B | tx {:>8} pkts {:>12} B   kernel: rx {} / {} B, tx {} / {} B",
            ours.rx.packets,
            ours.rx.bytes,
            ours.tx.packets,
            ours.tx.bytes,
            after.rx_packets,
            after.rx_bytes,
            after.tx_packets,
            after.tx_bytes
        );
        ensure!(
            (
                ours.rx.packets,
                ours.rx.bytes,
                ours.tx.packets,
                ours.tx.bytes
            ) == (
                after.rx_packets,
                after.rx_bytes,
                after.tx_packets,
                after.tx_bytes
            ),
            "{interface}: knd's counters differ from the kernel's"
        );
        println!("  {interface:<6} exact match");
        return Ok(());
    }
    anyhow::bail!("traffic on {interface} never settled")
}
