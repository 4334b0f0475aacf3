//! What knd's in-kernel telemetry costs the data path: TCP throughput between two namespaces
//! over a veth, in short runs pinned to one CPU on the same namespaces and veth, in rounds that
//! run each condition once in shuffled order — nothing installed (twice: the second is the A/A
//! control), the do-nothing TC program on both ends (the hook's own cost), the counting TC
//! programs, and everything knd installs for a pod (counting programs plus the sock_ops RTT
//! program watching both namespaces) — each installed before its run and removed after it; the
//! median of the per-round throughput ratios to "nothing". CPU time per packet of the sending
//! and receiving threads from perf-event software counters (task clock); the programs' own cost
//! per run from the kernel's BPF run-time statistics, net of the do-nothing program measured the
//! same way, reported by direction and frame class — bulk TCP's data super-frames (egress on
//! the sender, ingress on the receiver, each per 1500-byte wire packet by the bytes that side
//! itself carried over its own runs), its ACKs (per frame), small UDP frames (per frame) —
//! never dividing one direction's run time by another direction's packets. Needs root.
//!
//! Goals: throughput ratio ≥ 0.98; program cost ≤ 50 ns per packet.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use knd::observe::telemetry::{self, AttachmentId, SocketProbes, TrafficProbes};
use knd_bench::doc::{Chart, ChartKind, Document, Table};
use knd_testkit::{TestHost, is_root, veth_pair};
use perf_event::{Builder, events::Software};
use serde::Serialize;

const RUNS: usize = 60;
const RUN_TIME: Duration = Duration::from_millis(250);
const CPU: usize = 0;

/// Two namespaces joined by a veth pair (`eth1` in a, `eth2` in b), addressed, IPv6 off.
struct Pair {
    a: TestHost,
    b: TestHost,
    b_addr: IpAddr,
}

impl Pair {
    fn new(name: &str, subnet: u8) -> anyhow::Result<Self> {
        let a = TestHost::new(&format!("{name}-a"))?;
        let b = TestHost::new(&format!("{name}-b"))?;
        veth_pair(&a, "eth1", &b, "eth2")?;
        let a_addr: IpAddr = format!("10.{subnet}.0.1").parse()?;
        let b_addr: IpAddr = format!("10.{subnet}.0.2").parse()?;
        a.configure("eth1", a_addr, 24)?;
        b.configure("eth2", b_addr, 24)?;
        Ok(Self { a, b, b_addr })
    }
}

/// One run: throughput, and the sender's and receiver's CPU time per packet sent.
#[derive(Debug, Clone, Copy, Serialize)]
struct Run {
    gbit_per_s: f64,
    sender_ns_per_packet: f64,
    receiver_ns_per_packet: f64,
}

fn pin() -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(CPU)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// This thread's CPU time (task clock), counting from now.
fn task_clock() -> anyhow::Result<perf_event::Counter> {
    let mut counter = Builder::new(Software::TASK_CLOCK)
        .observe_self()
        .any_cpu()
        .build()
        .context("perf_event_open(task-clock)")?;
    counter.enable()?;
    Ok(counter)
}

#[expect(clippy::cast_precision_loss, reason = "rates for a report")]
fn run_once(pair: &Pair) -> anyhow::Result<Run> {
    let listener = pair
        .b
        .run(|| TcpListener::bind(SocketAddr::new(pair.b_addr, 0)))??;
    let target = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> anyhow::Result<(u64, u64)> {
        pin()?;
        let (mut stream, _) = listener.accept()?;
        let mut clock = task_clock()?;
        let mut buffer = vec![0_u8; 128 * 1024];
        let mut received = 0_u64;
        loop {
            match stream.read(&mut buffer)? {
                0 => break,
                n => received += n as u64,
            }
        }
        Ok((received, clock.read()?))
    });
    let before = pair.a.link_stats("eth1")?;
    let (sent_cpu, elapsed) = pair.a.run(|| -> anyhow::Result<(u64, Duration)> {
        pin()?;
        let mut stream = TcpStream::connect(target)?;
        let chunk = vec![0x5a_u8; 128 * 1024];
        let mut clock = task_clock()?;
        let started = Instant::now();
        while started.elapsed() < RUN_TIME {
            stream.write_all(&chunk)?;
        }
        stream.shutdown(std::net::Shutdown::Write)?;
        Ok((clock.read()?, started.elapsed()))
    })??;
    let Ok(outcome) = receiver.join() else {
        anyhow::bail!("the receiver panicked");
    };
    let (bytes_in, received_cpu) = outcome?;
    let after = pair.a.link_stats("eth1")?;
    let packets = (after.tx_packets - before.tx_packets).max(1) as f64;
    Ok(Run {
        gbit_per_s: bytes_in as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
        sender_ns_per_packet: sent_cpu as f64 / packets,
        receiver_ns_per_packet: received_cpu as f64 / packets,
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[derive(Debug, Serialize)]
struct Report {
    rounds: usize,
    run_seconds: f64,
    throughput_ratio_median: f64,
    control_ratio_median: f64,
    throughput_ratio_goal: f64,
    conditions: Vec<Condition>,
    /// Per condition (same order as `conditions`), every run.
    runs: Vec<Vec<Run>>,
    programs: Vec<ProgramCost>,
    baseline_ns_per_run: f64,
    by_direction: Vec<DirectionCost>,
    worst_net_ns_per_wire_packet: f64,
    net_ns_per_packet_goal: f64,
}

/// What the counting program costs on one direction and class of frames.
#[derive(Debug, Clone, Serialize)]
struct DirectionCost {
    frames: &'static str,
    direction: &'static str,
    runs: u64,
    ns_per_run: f64,
    net_ns_per_run: f64,
    /// Bytes this side carried per run (GSO/GRO super-frames are one run).
    bytes_per_run: f64,
    /// Net cost per 1500-byte packet on the wire (per frame for frames of 1500 B or less).
    net_ns_per_wire_packet: f64,
}

#[derive(Debug, Serialize)]
struct ProgramCost {
    program: String,
    runs: u64,
    ns_per_run: f64,
}

#[expect(clippy::cast_precision_loss, reason = "nanosecond averages")]
fn costs(probes: &TrafficProbes, ids: &[AttachmentId]) -> anyhow::Result<Vec<ProgramCost>> {
    let mut costs = Vec::new();
    for &id in ids {
        for stats in probes.program_stats(id)? {
            costs.push(ProgramCost {
                program: stats.program.to_owned(),
                runs: stats.runs,
                ns_per_run: stats.run_time.as_nanos() as f64 / stats.runs.max(1) as f64,
            });
        }
    }
    Ok(costs)
}

/// What is installed for a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Condition {
    /// Nothing (a second "off" is the A/A control).
    Off,
    /// The do-nothing TC program on both ends: the cost of the TCX hook itself.
    Noop,
    /// The counting TC programs on both ends, no sock_ops.
    Counting,
    /// What knd installs for a pod's NIC: counting programs and the sock_ops RTT program
    /// watching both namespaces.
    Full,
}

const CONDITIONS: [Condition; 5] = [
    Condition::Off,
    Condition::Off,
    Condition::Noop,
    Condition::Counting,
    Condition::Full,
];

/// Installed for one run; dropping it removes everything.
struct Installed {
    _probes: TrafficProbes,
    _sockets: Option<SocketProbes>,
}

impl Installed {
    fn new(pair: &Pair, condition: Condition, cgroup: &std::path::Path) -> anyhow::Result<Self> {
        let mut probes = TrafficProbes::new();
        let mut sockets = None;
        for (host, interface) in [(&pair.a, "eth1"), (&pair.b, "eth2")] {
            match condition {
                Condition::Off => {}
                Condition::Noop => {
                    probes.attach_baseline(host.netns(), interface)?;
                }
                Condition::Counting | Condition::Full => {
                    probes.attach(host.netns(), interface)?;
                }
            }
        }
        if condition == Condition::Full {
            let mut rtt = SocketProbes::attach(cgroup)?;
            for host in [&pair.a, &pair.b] {
                rtt.watch(host.netns().cookie()?)?;
            }
            sockets = Some(rtt);
        }
        Ok(Self {
            _probes: probes,
            _sockets: sockets,
        })
    }
}

/// How long to let the kernel finish deferred work (RCU callbacks, freeing programs and maps)
/// after installing or removing telemetry, before a run starts.
const SETTLE: Duration = Duration::from_millis(150);

/// The order of the conditions in `round`: a Fisher-Yates shuffle driven by a fixed-seed
/// xorshift, so that no condition always follows the same other one (what the previous run
/// left behind would otherwise be charged to one condition) and reruns are comparable.
fn order(round: usize) -> [usize; CONDITIONS.len()] {
    let mut state =
        0x9e37_79b9_7f4a_7c15_u64 ^ (round as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut order = std::array::from_fn(|i| i);
    for i in (1..order.len()).rev() {
        let j = usize::try_from(next() % (i as u64 + 1)).unwrap_or(0);
        order.swap(i, j);
    }
    order
}

/// `RUNS` rounds on the same namespaces; each round runs every condition once, in a shuffled
/// order, installing what it needs before its run and removing it after (and letting the
/// kernel settle after either). Returns the runs per condition (indexes of `CONDITIONS`).
fn rounds(pair: &Pair, cgroup: &std::path::Path) -> anyhow::Result<Vec<Vec<Run>>> {
    let mut runs = vec![Vec::new(); CONDITIONS.len()];
    for round in 0..RUNS {
        for index in order(round) {
            let installed = Installed::new(pair, CONDITIONS[index], cgroup)?;
            std::thread::sleep(SETTLE);
            runs[index].push(run_once(pair)?);
            drop(installed);
            std::thread::sleep(SETTLE);
        }
    }
    Ok(runs)
}

fn print_runs(name: &str, runs: &[Run], off: &[Run]) -> Vec<String> {
    let mut gbps: Vec<f64> = runs.iter().map(|r| r.gbit_per_s).collect();
    let mut tx: Vec<f64> = runs.iter().map(|r| r.sender_ns_per_packet).collect();
    let mut rx: Vec<f64> = runs.iter().map(|r| r.receiver_ns_per_packet).collect();
    let cells = vec![
        name.to_owned(),
        format!("{:.2}", median(&mut gbps)),
        format!("{:.3}", ratio(runs, off)),
        format!("{:.0}", median(&mut tx)),
        format!("{:.0}", median(&mut rx)),
    ];
    println!(
        "{name:<28} median {:>6} Gbit/s, ratio to off {}; CPU per packet: sender {} ns, \
         receiver {} ns",
        cells[1], cells[2], cells[3], cells[4]
    );
    cells
}

/// Sends 64-byte UDP datagrams from a to b for a run's time, as fast as one thread can.
fn udp_flood(pair: &Pair) -> anyhow::Result<()> {
    let receiver = pair
        .b
        .run(|| std::net::UdpSocket::bind(SocketAddr::new(pair.b_addr, 0)))??;
    let target = receiver.local_addr()?;
    pair.a.run(|| -> anyhow::Result<()> {
        pin()?;
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let payload = [0x5a_u8; 64];
        let started = Instant::now();
        while started.elapsed() < RUN_TIME / 2 {
            // A full receive queue drops after the programs ran: that is fine here.
            let _ignored = socket.send_to(&payload, target);
        }
        Ok(())
    })??;
    drop(receiver);
    Ok(())
}

/// The runs of two measurements of the same programs, program by program.
#[expect(clippy::cast_precision_loss, reason = "nanosecond averages")]
fn add(total: Vec<ProgramCost>, more: Vec<ProgramCost>) -> Vec<ProgramCost> {
    if total.is_empty() {
        return more;
    }
    total
        .into_iter()
        .zip(more)
        .map(|(t, m)| {
            let runs = t.runs + m.runs;
            let time = t.ns_per_run * t.runs as f64 + m.ns_per_run * m.runs as f64;
            ProgramCost {
                program: t.program,
                runs,
                ns_per_run: time / runs.max(1) as f64,
            }
        })
        .collect()
}

/// What ran between two snapshots of the same programs.
#[expect(clippy::cast_precision_loss, reason = "nanosecond averages")]
fn delta(before: &[ProgramCost], after: &[ProgramCost]) -> Vec<ProgramCost> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let runs = a.runs - b.runs;
            let time = a.ns_per_run * a.runs as f64 - b.ns_per_run * b.runs as f64;
            ProgramCost {
                program: a.program.clone(),
                runs,
                ns_per_run: time / runs.max(1) as f64,
            }
        })
        .collect()
}

fn ratio(with: &[Run], without: &[Run]) -> f64 {
    let mut ratios: Vec<f64> = with
        .iter()
        .zip(without)
        .map(|(w, o)| w.gbit_per_s / o.gbit_per_s)
        .collect();
    median(&mut ratios)
}

#[expect(clippy::cast_precision_loss, reason = "run counts")]
fn weighted(costs: &[ProgramCost]) -> f64 {
    let runs: u64 = costs.iter().map(|c| c.runs).sum();
    let time: f64 = costs.iter().map(|c| c.ns_per_run * c.runs as f64).sum();
    time / runs.max(1) as f64
}

/// What the programs cost, from the kernel's run-time statistics.
struct Costs {
    /// The counting programs during bulk TCP.
    programs: Vec<ProgramCost>,
    /// The do-nothing program during the same runs.
    baseline_bulk: Vec<ProgramCost>,
    /// The counting programs during small-frame floods.
    small_ours: Vec<ProgramCost>,
    /// The do-nothing program during the same floods.
    small_base: Vec<ProgramCost>,
    /// Bytes side a sent during the bulk runs.
    sent_bytes: u64,
    /// Bytes side b received during the bulk runs.
    received_bytes: u64,
}

/// The programs' own cost, statistics on: the counting programs and the do-nothing one
/// attached side by side (TCX runs both on every frame), so both are timed on the same frames
/// at the same moments; first bulk TCP, then small frames.
fn program_costs(pair: &Pair) -> anyhow::Result<Costs> {
    let stats = telemetry::enable_run_stats()?;
    let mut probes = TrafficProbes::new();
    let counting = [
        probes.attach(pair.a.netns(), "eth1")?,
        probes.attach(pair.b.netns(), "eth2")?,
    ];
    // The do-nothing program once per side and direction, in the counting programs' order
    // (a ingress, a egress, b ingress, b egress): each direction has its own floor.
    let (mut noops_in, mut noops_out) = (TrafficProbes::new(), TrafficProbes::new());
    let mut noops = Vec::new();
    for (netns, interface) in [(pair.a.netns(), "eth1"), (pair.b.netns(), "eth2")] {
        noops.push((true, noops_in.attach_baseline_one(netns, interface, true)?));
        noops.push((
            false,
            noops_out.attach_baseline_one(netns, interface, false)?,
        ));
    }
    let baseline_costs = || -> anyhow::Result<Vec<ProgramCost>> {
        let mut all = Vec::new();
        for (ingress, id) in &noops {
            let probes = if *ingress { &noops_in } else { &noops_out };
            all.extend(costs(probes, &[*id])?);
        }
        Ok(all)
    };
    let (sent_before, received_before) = (pair.a.link_stats("eth1")?, pair.b.link_stats("eth2")?);
    for _ in 0..RUNS / 8 {
        run_once(pair)?;
    }
    let (sent_after, received_after) = (pair.a.link_stats("eth1")?, pair.b.link_stats("eth2")?);
    let programs = costs(&probes, &counting)?;
    let baseline_bulk = baseline_costs()?;
    // Small frames at a high rate (the regime where a per-packet cost matters: the maps stay in
    // cache between frames, as at 400G), deltas only.
    let (mut small_ours, mut small_base) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let before = (costs(&probes, &counting)?, baseline_costs()?);
        udp_flood(pair)?;
        small_ours = add(small_ours, delta(&before.0, &costs(&probes, &counting)?));
        small_base = add(small_base, delta(&before.1, &baseline_costs()?));
    }
    drop(stats);
    Ok(Costs {
        programs,
        baseline_bulk,
        small_ours,
        small_base,
        sent_bytes: sent_after.tx_bytes - sent_before.tx_bytes,
        received_bytes: received_after.rx_bytes - received_before.rx_bytes,
    })
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "the telemetry benchmark loads eBPF programs: run it as root"
    );
    let pair = Pair::new("bench", 81)?;
    let cgroup = telemetry::default_cgroup_root().context("no cgroup v2 mount")?;
    // Warm-up, then the rounds, the kernel's run-time statistics off (they time every run).
    run_once(&pair)?;
    let runs = rounds(&pair, &cgroup)?;
    let [off, off_again, noop, counting_only, full] = &runs[..] else {
        unreachable!("one list of runs per condition");
    };

    let Costs {
        programs,
        baseline_bulk,
        small_ours,
        small_base,
        sent_bytes,
        received_bytes,
    } = program_costs(&pair)?;
    // The do-nothing program's cost per run (the hook's own), in the same runs.
    let (base, small_floor) = (weighted(&baseline_bulk), weighted(&small_base));
    let floors: Vec<String> = baseline_bulk
        .iter()
        .map(|c| format!("{:.1}", c.ns_per_run))
        .collect();
    let control = ratio(off_again, off);
    let raw = ratio(full, off);
    let mut table = Table::new(
        &format!("TCP throughput, {RUNS} rounds of every condition (medians)"),
        &[
            "condition",
            "Gbit/s",
            "ratio to off",
            "sender CPU ns/packet",
            "receiver CPU ns/packet",
        ],
    );
    for (name, condition) in [
        ("off", off),
        ("off again (A/A control)", off_again),
        ("do-nothing TC program", noop),
        ("counting TC programs", counting_only),
        ("full telemetry (TC + RTT)", full),
    ] {
        table.row(print_runs(name, condition, off));
    }
    let mut notes = Vec::new();
    let mut note = |line: String| {
        println!("{line}");
        notes.push(line);
    };
    note(format!(
        "throughput ratio full telemetry/off (median of {RUNS} rounds, same namespaces): \
         {raw:.3} (goal ≥ 0.98: {}); the A/A control (off vs off) came out at {control:.3}: how \
         far apart identical conditions land on this machine",
        if raw >= 0.98 { "met" } else { "MISSED" }
    ));
    // Programs in attachment order: a's ingress, a's egress, b's ingress, b's egress. a sends
    // the data (a egress, b ingress) and b the ACKs (b egress, a ingress).
    let (costs, rows) = costs_by_direction(
        (&programs, &baseline_bulk),
        (&small_ours, &small_base),
        (sent_bytes, received_bytes),
    );
    let worst = rows
        .iter()
        .map(|r| r.net_ns_per_wire_packet)
        .fold(0.0_f64, f64::max);
    note(format!(
        "program cost net of the do-nothing program of the same side and direction (its own \
         cost during bulk TCP, a in/out and b in/out: {} ns/run; {small_floor:.1} ns/run on \
         average during the small-frame flood), worst direction and frame class: {worst:.1} ns \
         per wire packet (goal ≤ 50 ns: {})",
        floors.join(", "),
        if worst <= 50.0 { "met" } else { "MISSED" }
    ));
    let report = Report {
        rounds: RUNS,
        run_seconds: RUN_TIME.as_secs_f64(),
        throughput_ratio_median: raw,
        control_ratio_median: control,
        throughput_ratio_goal: 0.98,
        conditions: CONDITIONS.to_vec(),
        runs: runs.clone(),
        programs,
        baseline_ns_per_run: base,
        by_direction: rows,
        worst_net_ns_per_wire_packet: worst,
        net_ns_per_packet_goal: 50.0,
    };
    write_document(table, costs, notes, &report)
}

/// The suite's JSON, Markdown and chart.
fn write_document(
    table: Table,
    costs: Table,
    notes: Vec<String>,
    report: &Report,
) -> anyhow::Result<()> {
    let mut document = Document::new("telemetry", "Telemetry overhead");
    document.notes = notes;
    let chart = Chart {
        title: "TCP throughput per condition (median of the rounds)".to_owned(),
        x_label: String::new(),
        y_label: "Gbit/s".to_owned(),
        kind: ChartKind::Bars {
            categories: table.rows.iter().map(|r| r[0].clone()).collect(),
        },
        series: vec![(
            "Gbit/s".to_owned(),
            table
                .rows
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    (
                        f64::from(u32::try_from(i).unwrap_or(0)),
                        r[1].parse().unwrap_or(0.0),
                    )
                })
                .collect(),
        )],
    };
    document.tables = vec![table, costs];
    document.charts.push(chart);
    document.data = serde_json::to_value(report)?;
    document.write(&knd_bench::results_dir())?;
    Ok(())
}

/// The counting programs' cost by direction and frame class, net of the do-nothing program,
/// each per wire packet by the bytes its own side carried over its own runs.
#[expect(clippy::cast_precision_loss, reason = "averages for a report")]
fn costs_by_direction(
    (bulk, bulk_floor): (&[ProgramCost], &[ProgramCost]),
    (small, small_floor): (&[ProgramCost], &[ProgramCost]),
    (sent_bytes, received_bytes): (u64, u64),
) -> (Table, Vec<DirectionCost>) {
    let row = |frames, direction, cost: &ProgramCost, floor: &ProgramCost, bytes: Option<u64>| {
        let net = cost.ns_per_run - floor.ns_per_run;
        let bytes_per_run = bytes.map_or(0.0, |b| b as f64 / cost.runs.max(1) as f64);
        DirectionCost {
            frames,
            direction,
            runs: cost.runs,
            ns_per_run: cost.ns_per_run,
            net_ns_per_run: net,
            bytes_per_run,
            net_ns_per_wire_packet: net / (bytes_per_run / 1500.0).max(1.0),
        }
    };
    let mut rows = Vec::new();
    if let ([a_in, a_out, b_in, b_out], [fa_in, fa_out, fb_in, fb_out]) = (bulk, bulk_floor) {
        let data = "bulk TCP data";
        rows.push(row(
            data,
            "egress (sender)",
            a_out,
            fa_out,
            Some(sent_bytes),
        ));
        rows.push(row(
            data,
            "ingress (receiver)",
            b_in,
            fb_in,
            Some(received_bytes),
        ));
        let acks = "bulk TCP ACKs";
        rows.push(row(acks, "egress (receiver)", b_out, fb_out, None));
        rows.push(row(acks, "ingress (sender)", a_in, fa_in, None));
    }
    if let ([_, a_out, b_in, _], [_, fa_out, fb_in, _]) = (small, small_floor) {
        let small = "64-byte UDP";
        rows.push(row(small, "egress (sender)", a_out, fa_out, None));
        rows.push(row(small, "ingress (receiver)", b_in, fb_in, None));
    }
    let mut table = Table::new(
        "Counting programs by direction and frame class (kernel run-time statistics, net of the \
         do-nothing program)",
        &[
            "frames",
            "direction",
            "runs",
            "ns per run",
            "net ns per run",
            "bytes per run",
            "net ns per wire packet",
        ],
    );
    for r in &rows {
        println!(
            "  {} {}: {:.1} ns/run ({:.1} net) over {} runs, {:.0} B/run: {:.1} ns per wire packet",
            r.frames,
            r.direction,
            r.ns_per_run,
            r.net_ns_per_run,
            r.runs,
            r.bytes_per_run,
            r.net_ns_per_wire_packet
        );
        table.row(vec![
            r.frames.to_owned(),
            r.direction.to_owned(),
            r.runs.to_string(),
            format!("{:.1}", r.ns_per_run),
            format!("{:.1}", r.net_ns_per_run),
            if r.bytes_per_run > 0.0 {
                format!("{:.0}", r.bytes_per_run)
            } else {
                "—".to_owned()
            },
            format!("{:.1}", r.net_ns_per_wire_packet),
        ]);
    }
    (table, rows)
}
