//! Shared NICs under load: three pods each get a bandwidth share of one NIC (1, 2 and 5 Gbit/s
//! by default; `$KND_BENCH_SHARES` in Gbit/s, comma-separated), made by knd's attach code as
//! macvlan children of the NIC directly in the pods, and held to their shares by knd's own
//! enforcement (`Telemetry::enforce_share`: the eBPF policer on the child, the pacing of the
//! pod's TCP connections from sock_ops). All three send TCP at once, as fast as they can, to a
//! receiver behind the NIC (the "fabric" namespace at the other end of the NIC's veth).
//!
//! Per round and pod, over the same measuring window: the bytes knd counted on the share (its
//! Prometheus metrics, as a scrape reads them), the share interface's own counters read from
//! inside the pod (what `ip -s link` in the pod shows), the payload the receiver got
//! (iperf-style goodput), and the frames the policer dropped. Rounds alternate between enforced
//! and not enforced (the same pods and shares, knd's programs and pacing removed): the contrast.
//!
//! Goals, judged on the median over rounds: each share achieves 85–105 % of its bandwidth on the
//! wire (knd's count of frames, Ethernet headers included, as the policer counts them), and
//! knd's per-claim count agrees with the pod's own interface counters within 1 %.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use knd::{
    attach,
    model::config::{self, MacvlanMode},
    observe::{
        metrics::{ClaimLabels, Telemetry, encode},
        telemetry,
    },
};
use knd_bench::doc::{Chart, ChartKind, Document, Table};
use knd_testkit::{TestHost, is_root, veth_pair};
use serde::Serialize;

const ROUNDS: usize = 5;
const WARMUP: Duration = Duration::from_secs(1);
const WINDOW: Duration = Duration::from_secs(4);
const FABRIC: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 254);
const PORT: u16 = 5300;

/// One pod's share of the NIC.
struct Pod {
    host: TestHost,
    uid: String,
    address: Ipv4Addr,
    /// Bits per second.
    share: u64,
}

/// One pod in one round.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    round: usize,
    enforced: bool,
    pod: usize,
    share_bps: u64,
    /// Frames knd counted leaving the share (bits per second over the window).
    knd_bps: f64,
    /// The share interface's own transmit counter, read in the pod.
    pod_counter_bps: f64,
    /// TCP payload the receiver got.
    goodput_bps: f64,
    /// Frames the policer dropped in the window.
    policed: u64,
}

fn shares() -> anyhow::Result<Vec<u64>> {
    let text = std::env::var("KND_BENCH_SHARES").unwrap_or_else(|_| "1,2,5".into());
    text.split(',')
        .map(|g| {
            let gbit: f64 = g
                .trim()
                .parse()
                .context("KND_BENCH_SHARES: Gbit/s, comma-separated")?;
            anyhow::ensure!(gbit > 0.0, "KND_BENCH_SHARES: shares must be positive");
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "checked positive, bits per second"
            )]
            Ok((gbit * 1e9) as u64)
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "the sharing benchmark creates namespaces and loads eBPF programs: run it as root"
    );
    let cgroup = telemetry::default_cgroup_root().context("no cgroup v2 mount")?;
    let started = Instant::now();
    let node = TestHost::new("node")?;
    let fabric = TestHost::new("fabric")?;
    veth_pair(&node, "uplink", &fabric, "wire")?;
    node.disable_ipv6("uplink")?;
    node.set_up("uplink")?;
    fabric.configure("wire", IpAddr::V4(FABRIC), 24)?;
    let telemetry = Arc::new(Telemetry::new(Some(&cgroup), 100));
    anyhow::ensure!(
        telemetry.measures_rtt(),
        "sock_ops did not attach: no pacing"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let parent = runtime.block_on(attach::record(node.netns(), "uplink"))?;
    let mut pods = Vec::new();
    for (i, share) in shares()?.into_iter().enumerate() {
        let host = TestHost::new(&format!("pod{i}"))?;
        let address = Ipv4Addr::new(10, 80, 0, 10 + u8::try_from(i)?);
        let config = config::parse(
            format!(
                r#"{{"apiVersion":"knd.dev/v1alpha1","kind":"NetworkConfig",
                    "interface":{{"name":"net1","addresses":["{address}/24"]}}}}"#
            )
            .as_bytes(),
        )?;
        runtime.block_on(async {
            let pod = attach::Pod::open(host.netns()).await?;
            attach::attach_share(
                node.netns(),
                &pod,
                &parent,
                ("net1", MacvlanMode::Bridge, &mut attach::Spent::default()),
                &config,
                |_, _| async {},
            )
            .await
            .map_err(anyhow::Error::from)
        })?;
        host.disable_ipv6("net1")?;
        pods.push(Pod {
            host,
            uid: format!("pod-{i}"),
            address,
            share,
        });
    }
    let mut samples = Vec::new();
    for round in 0..ROUNDS * 2 {
        let enforced = round % 2 == 0;
        for pod in &pods {
            // Counted either way; enforced or not (the policer and the pacing go with the
            // programs). As the daemon does, a share is enforced first: that links the
            // programs that police, and the watch then counts with them.
            telemetry.unwatch_pod(&pod.uid);
            if enforced {
                enforce(&telemetry, pod)?;
            }
            watch(&telemetry, pod)?;
        }
        let these = run_round(&fabric, &pods, &telemetry, round / 2, enforced)?;
        for s in &these {
            #[expect(clippy::cast_precision_loss, reason = "rates for a line of output")]
            let share = s.share_bps as f64;
            println!(
                "round {} {}: pod{} share {:.1} Gbit/s: knd {:.3} Gbit/s ({:.1} %), in-pod counter \
                 {:.3}, goodput {:.3}, policed {}",
                s.round,
                if s.enforced { "enforced" } else { "free" },
                s.pod,
                gbit(share),
                gbit(s.knd_bps),
                100.0 * s.knd_bps / share,
                gbit(s.pod_counter_bps),
                gbit(s.goodput_bps),
                s.policed
            );
        }
        samples.extend(these);
    }
    let cost = policer_cost(&fabric, &pods[0])?;
    println!(
        "policer: {:.1} ns per frame, net of the counting program's {:.1} ns without it on the \
         same frames ({} frames)",
        cost.net_ns, cost.alone_ns, cost.frames
    );
    let (document, met) = document(&samples, &pods, cost, started.elapsed());
    for table in &document.tables {
        knd_bench::print_table(table);
    }
    document.write(&knd_bench::results_dir())?;
    anyhow::ensure!(met, "a goal was missed (see the table above)");
    Ok(())
}

fn gbit(bps: f64) -> f64 {
    bps / 1e9
}

/// What the daemon does for a claimed interface: count it, with the claim's labels.
fn watch(telemetry: &Telemetry, pod: &Pod) -> anyhow::Result<()> {
    let labels = ClaimLabels {
        namespace: "bench".into(),
        pod: pod.uid.clone(),
        claim: format!("share-{}", pod.uid),
        request: "nic".into(),
        device: "uplink".into(),
        interface: "net1".into(),
    };
    telemetry.watch(&pod.uid, pod.host.netns(), labels, Vec::new())?;
    Ok(())
}

/// What the daemon does for a share: hold it to its bandwidth.
fn enforce(telemetry: &Telemetry, pod: &Pod) -> anyhow::Result<()> {
    telemetry.enforce_share(
        (&pod.uid, pod.host.netns(), "net1"),
        pod.share,
        false,
        &[IpAddr::V4(pod.address)],
    )?;
    Ok(())
}

/// Counters of one pod at one moment: knd's (from the metrics) and the pod's own.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    knd_tx_bytes: u64,
    policed: u64,
    pod_tx_bytes: u64,
}

fn read(telemetry: &Arc<Telemetry>, pods: &[Pod]) -> anyhow::Result<Vec<Reading>> {
    let text = encode(&telemetry.registry());
    pods.iter()
        .map(|pod| {
            let claim = format!("claim=\"share-{}\"", pod.uid);
            let value = |metric: &str, extra: &str| {
                text.lines()
                    .find(|l| l.starts_with(metric) && l.contains(&claim) && l.contains(extra))
                    .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            Ok(Reading {
                knd_tx_bytes: value("knd_claim_tx_bytes_total{", ""),
                policed: value("knd_claim_policed_packets_total{", "direction=\"tx\""),
                pod_tx_bytes: pod.host.link_stats("net1")?.tx_bytes,
            })
        })
        .collect()
}

/// All pods send at once for the warm-up and the window; counters are read at the window's
/// two ends, the receivers count what arrived inside it.
fn run_round(
    fabric: &TestHost,
    pods: &[Pod],
    telemetry: &Arc<Telemetry>,
    round: usize,
    enforced: bool,
) -> anyhow::Result<Vec<Sample>> {
    let listeners: Vec<TcpListener> = (0..pods.len())
        .map(|i| {
            fabric
                .run(|| {
                    TcpListener::bind(SocketAddr::new(
                        IpAddr::V4(FABRIC),
                        PORT + u16::try_from(i).unwrap_or(0),
                    ))
                })?
                .context("listening in the fabric")
        })
        .collect::<anyhow::Result<_>>()?;
    let start = Instant::now() + Duration::from_millis(200);
    let (window_start, window_end) = (start + WARMUP, start + WARMUP + WINDOW);
    let barrier = Arc::new(Barrier::new(pods.len() + 1));
    std::thread::scope(|scope| -> anyhow::Result<Vec<Sample>> {
        let receivers: Vec<_> = listeners
            .into_iter()
            .map(|listener| {
                scope.spawn(move || -> anyhow::Result<u64> {
                    let (mut stream, _) = listener.accept()?;
                    let mut buffer = vec![0_u8; 256 * 1024];
                    let mut inside = 0_u64;
                    loop {
                        let n = stream.read(&mut buffer)?;
                        if n == 0 {
                            return Ok(inside);
                        }
                        let now = Instant::now();
                        if now >= window_start && now < window_end {
                            inside += n as u64;
                        }
                    }
                })
            })
            .collect();
        let senders: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let barrier = Arc::clone(&barrier);
                scope.spawn(move || -> anyhow::Result<()> {
                    pod.host.run(|| -> anyhow::Result<()> {
                        let target = SocketAddr::new(
                            IpAddr::V4(FABRIC),
                            PORT + u16::try_from(i).unwrap_or(0),
                        );
                        let mut stream = TcpStream::connect(target)?;
                        barrier.wait();
                        let chunk = vec![0x5a_u8; 256 * 1024];
                        while Instant::now() < window_end + Duration::from_millis(100) {
                            stream.write_all(&chunk)?;
                        }
                        Ok(())
                    })?
                })
            })
            .collect();
        barrier.wait();
        std::thread::sleep(window_start.saturating_duration_since(Instant::now()));
        let before = read(telemetry, pods)?;
        std::thread::sleep(window_end.saturating_duration_since(Instant::now()));
        let after = read(telemetry, pods)?;
        for sender in senders {
            sender
                .join()
                .map_err(|_| anyhow::anyhow!("a sender panicked"))??;
        }
        let seconds = WINDOW.as_secs_f64();
        receivers
            .into_iter()
            .zip(pods)
            .enumerate()
            .map(|(i, (receiver, pod))| {
                let goodput = receiver
                    .join()
                    .map_err(|_| anyhow::anyhow!("a receiver panicked"))??;
                let (b, a) = (before[i], after[i]);
                #[expect(clippy::cast_precision_loss, reason = "rates")]
                Ok(Sample {
                    round,
                    enforced,
                    pod: i,
                    share_bps: pod.share,
                    knd_bps: (a.knd_tx_bytes - b.knd_tx_bytes) as f64 * 8.0 / seconds,
                    pod_counter_bps: (a.pod_tx_bytes - b.pod_tx_bytes) as f64 * 8.0 / seconds,
                    goodput_bps: goodput as f64 * 8.0 / seconds,
                    policed: a.policed - b.policed,
                })
            })
            .collect()
    })
}

/// The policer's cost per frame: the counting program with it, less the same program without
/// it on the same frames.
#[derive(Debug, Clone, Copy)]
struct PolicerCost {
    police_ns: f64,
    alone_ns: f64,
    net_ns: f64,
    frames: u64,
    /// Bytes those frames carried (GSO super-frames: one run per up to 64 KiB).
    bytes: u64,
}

/// On `pod`'s share: the share's programs with a policer that never drops (100 Gbit/s, so
/// every frame takes the passing path) and the counting programs without it on the same
/// egress hook, both run on every frame of the same unpaced TCP transfers; the kernel's run-time
/// statistics of each, in 5 rounds of 1 s. The difference is what policing adds per frame.
#[expect(clippy::cast_precision_loss, reason = "nanosecond averages")]
fn policer_cost(fabric: &TestHost, pod: &Pod) -> anyhow::Result<PolicerCost> {
    use knd::observe::telemetry::{ShareLimits, TrafficProbes};
    use knd_common::{Policer, policer_burst};
    let _stats = telemetry::enable_run_stats()?;
    let mut rounds = Vec::new();
    let (mut frames, mut bytes) = (0, 0);
    for round in 0..5 {
        let mut probes = TrafficProbes::new();
        let policed = probes.attach_policing(pod.host.netns(), "net1")?;
        let rate = 12_500_000_000;
        let limits = ShareLimits {
            ingress: None,
            egress: Some(Policer::new(rate, policer_burst(rate))),
        };
        probes.police(policed, limits)?;
        // The counting programs without the policer (an exclusive NIC's), on the same hook
        // (another registry: one refuses a second attachment to an interface): both run on
        // every frame.
        let mut baseline = TrafficProbes::new();
        let alone = baseline.attach(pod.host.netns(), "net1")?;
        let listener = fabric
            .run(|| TcpListener::bind(SocketAddr::new(IpAddr::V4(FABRIC), PORT + 10 + round)))??;
        let target = listener.local_addr()?;
        std::thread::scope(|scope| -> anyhow::Result<()> {
            let receiver = scope.spawn(move || -> std::io::Result<()> {
                let (mut stream, _) = listener.accept()?;
                let mut buffer = vec![0_u8; 256 * 1024];
                while stream.read(&mut buffer)? > 0 {}
                Ok(())
            });
            pod.host.run(|| -> std::io::Result<()> {
                let mut stream = TcpStream::connect(target)?;
                let chunk = vec![0x5a_u8; 256 * 1024];
                let until = Instant::now() + Duration::from_secs(1);
                while Instant::now() < until {
                    stream.write_all(&chunk)?;
                }
                Ok(())
            })??;
            receiver
                .join()
                .map_err(|_| anyhow::anyhow!("the receiver panicked"))??;
            Ok(())
        })?;
        let per_run = |probes: &TrafficProbes, id, name: &str| -> anyhow::Result<(f64, u64)> {
            let stats = probes
                .program_stats(id)?
                .into_iter()
                .find(|s| s.program == name)
                .context("no statistics")?;
            Ok((
                stats.run_time.as_nanos() as f64 / stats.runs.max(1) as f64,
                stats.runs,
            ))
        };
        let (police, runs) = per_run(&probes, policed, knd_common::names::SHARE_EGRESS_PROG)?;
        let (alone, _) = per_run(&baseline, alone, knd_common::names::TRAFFIC_EGRESS_PROG)?;
        anyhow::ensure!(
            probes.detail(policed)?.policed_tx.packets == 0,
            "the cost policer dropped frames"
        );
        frames += runs;
        bytes += probes.detail(policed)?.tx.total().bytes;
        rounds.push((police, alone));
    }
    let police_ns = median(rounds.iter().map(|r| r.0).collect());
    let alone_ns = median(rounds.iter().map(|r| r.1).collect());
    Ok(PolicerCost {
        police_ns,
        alone_ns,
        net_ns: median(rounds.iter().map(|r| r.0 - r.1).collect()),
        frames,
        bytes,
    })
}

fn cost_table(cost: PolicerCost) -> Table {
    let mut table = Table::new(
        "What policing adds per frame (egress, kernel BPF run-time statistics, median of 5 rounds)",
        &[
            "counting + policer ns/frame",
            "counting alone ns/frame",
            "policer, net ns/frame",
            "frames",
            "bytes/frame",
            "net ns per 1500-byte wire packet",
        ],
    );
    #[expect(clippy::cast_precision_loss, reason = "averages for a report")]
    let per_frame = cost.bytes as f64 / cost.frames.max(1) as f64;
    table.row(vec![
        format!("{:.1}", cost.police_ns),
        format!("{:.1}", cost.alone_ns),
        format!("{:.1}", cost.net_ns),
        cost.frames.to_string(),
        format!("{per_frame:.0}"),
        format!("{:.2}", cost.net_ns * 1500.0 / per_frame.max(1.0)),
    ]);
    table
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The report and whether every goal was met.
#[expect(clippy::cast_precision_loss, reason = "rates for a report")]
fn document(
    samples: &[Sample],
    pods: &[Pod],
    cost: PolicerCost,
    elapsed: Duration,
) -> (Document, bool) {
    let mut document = Document::new("sharing", "Bandwidth shares of one NIC, enforced");
    document.notes.push(format!(
        "Three pods, each with a share of one NIC (a veth to a receiver namespace) made by knd \
         as a macvlan child in the pod, all sending TCP at once for {WARMUP:?} + a {WINDOW:?} \
         window; {ROUNDS} enforced rounds alternating with {ROUNDS} without enforcement (knd's \
         programs and pacing removed, same pods). *knd* = the share's transmitted frames as \
         knd's metrics count them (Ethernet headers included, what the policer meters); *in-pod \
         counter* = the share interface's own counter read inside the pod; *goodput* = TCP \
         payload at the receiver. Medians over rounds. This kernel has no `fq` qdisc: shares are \
         held by the eBPF policer and TCP's own pacing (`SO_MAX_PACING_RATE` from sock_ops), \
         not EDT. Took {elapsed:.0?}."
    ));
    let mut table = Table::new(
        "Per share, median over rounds (Gbit/s)",
        &[
            "pod",
            "share",
            "knd (enforced)",
            "of share",
            "goal 85–105 %",
            "in-pod counter",
            "knd vs in-pod",
            "goal ≤ 1 %",
            "goodput",
            "policed frames/round",
            "knd (not enforced)",
        ],
    );
    let mut met = true;
    let mut bars = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let of = |enforced: bool| -> Vec<&Sample> {
            samples
                .iter()
                .filter(|s| s.pod == i && s.enforced == enforced)
                .collect()
        };
        let (on, off) = (of(true), of(false));
        let knd = median(on.iter().map(|s| s.knd_bps).collect());
        let counter = median(on.iter().map(|s| s.pod_counter_bps).collect());
        let goodput = median(on.iter().map(|s| s.goodput_bps).collect());
        let policed = median(on.iter().map(|s| s.policed as f64).collect());
        let free = median(off.iter().map(|s| s.knd_bps).collect());
        let ratio = knd / pod.share as f64;
        let agreement = median(
            on.iter()
                .chain(off.iter())
                .map(|s| (s.knd_bps - s.pod_counter_bps).abs() / s.pod_counter_bps.max(1.0))
                .collect(),
        );
        let share_ok = (0.85..=1.05).contains(&ratio);
        let agree_ok = agreement <= 0.01;
        met &= share_ok && agree_ok;
        let verdict = |ok: bool| if ok { "MET" } else { "MISSED" }.to_owned();
        table.row(vec![
            format!("pod{i}"),
            format!("{:.1}", gbit(pod.share as f64)),
            format!("{:.3}", gbit(knd)),
            format!("{:.1} %", 100.0 * ratio),
            verdict(share_ok),
            format!("{:.3}", gbit(counter)),
            format!("{:.3} %", 100.0 * agreement),
            verdict(agree_ok),
            format!("{:.3}", gbit(goodput)),
            format!("{policed:.0}"),
            format!("{:.3}", gbit(free)),
        ]);
        bars.push((i, pod.share, knd, free));
    }
    document.tables.push(table);
    document.tables.push(cost_table(cost));
    let categories: Vec<String> = bars.iter().map(|(i, ..)| format!("pod{i}")).collect();
    document.charts.push(Chart {
        title: "Share, achieved with enforcement, and without".into(),
        x_label: "pod".into(),
        y_label: "Gbit/s".into(),
        kind: ChartKind::Bars { categories },
        series: vec![
            (
                "share".into(),
                bars.iter()
                    .map(|&(i, share, ..)| (i as f64, gbit(share as f64)))
                    .collect(),
            ),
            (
                "knd, enforced".into(),
                bars.iter()
                    .map(|&(i, _, knd, _)| (i as f64, gbit(knd)))
                    .collect(),
            ),
            (
                "knd, not enforced".into(),
                bars.iter()
                    .map(|&(i, .., free)| (i as f64, gbit(free)))
                    .collect(),
            ),
        ],
    });
    document.data = serde_json::to_value(samples).unwrap_or_default();
    (document, met)
}
