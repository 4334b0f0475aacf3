//! NCCL-style collectives over the data path knd builds: N pod namespaces (2, 4, 8), each with a
//! NIC attached by knd's attach code (a veth whose host end is a port of a bridge, moved into the
//! pod as `eth1` and addressed from its claim config), running ring all_reduce (sum of floats)
//! and ring all_gather over TCP for message sizes from 8 B up by ×2. The same namespaces are also
//! joined by plain veths on a second bridge, without the driver: the reference.
//!
//! Conditions, interleaved per size and round in a shuffled order: knd's NIC with full telemetry
//! (TCX counters on `eth1`, sock_ops RTT for the pod — the knd ring's connections are opened
//! again each time telemetry is installed, since the RTT program measures only connections made
//! after it, as a pod's are), knd's NIC with telemetry off, the plain veth (telemetry off).
//! Reported as nccl-tests does: time per operation, algbw = size / time, busbw = algbw ·
//! 2(n−1)/n (all_reduce) or algbw · (n−1)/n (all_gather), `#wrong` from a checked run (the run
//! fails unless it is 0 everywhere), and the average bus bandwidth over all sizes. Goal: knd's
//! NIC with telemetry within 5 % of the plain veth's average busbw.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    sync::{Arc, Barrier, mpsc},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use knd::{
    attach,
    model::config::NetworkConfig,
    observe::telemetry::{self, SocketProbes, TrafficProbes},
    os::netns::Netns,
};
use knd_bench::doc::{Chart, ChartKind, Document, Table, human_bytes};
use knd_testkit::{TestHost, bridge, is_root};
use serde::Serialize;

const RANKS: [usize; 3] = [2, 4, 8];
const MIN_SIZE: usize = 8;
/// The largest message by default: 16 MiB keeps the suite within minutes on 2 cores (memory is
/// not the limit: 8 ranks hold about 2 × 8 × 16 MiB); `$KND_BENCH_MAX_SIZE` (bytes) sets another.
const DEFAULT_MAX_SIZE: usize = 16 << 20;
/// Bytes each measurement moves through one rank's buffer, at least (sets the iterations).
const BYTES_PER_MEASUREMENT: usize = 48 << 20;
const MAX_ITERATIONS: usize = 100;
const ROUNDS: usize = 5;
const PORT: u16 = 5201;
/// How long to let the kernel finish deferred work (RCU callbacks, freeing programs and maps)
/// after installing or removing telemetry, before measuring.
const SETTLE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Collective {
    AllReduce,
    AllGather,
}

impl Collective {
    const fn name(self) -> &'static str {
        match self {
            Self::AllReduce => "all_reduce",
            Self::AllGather => "all_gather",
        }
    }

    /// nccl-tests' bus bandwidth factor.
    #[expect(clippy::cast_precision_loss, reason = "rank counts")]
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Self::AllReduce => 2.0 * (n - 1.0) / n,
            Self::AllGather => (n - 1.0) / n,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Condition {
    KndTelemetry,
    KndOff,
    PlainVeth,
}

const CONDITIONS: [Condition; 3] = [
    Condition::KndTelemetry,
    Condition::KndOff,
    Condition::PlainVeth,
];

impl Condition {
    const fn label(self) -> &'static str {
        match self {
            Self::KndTelemetry => "knd NIC + telemetry",
            Self::KndOff => "knd NIC, telemetry off",
            Self::PlainVeth => "plain veth",
        }
    }
}

/// A command for every rank: measure, or open the knd-NIC ring's connections again.
#[derive(Debug, Clone, Copy)]
struct Job {
    plain: bool,
    collective: Collective,
    size: usize,
    iterations: usize,
    /// Reconnect the knd ring instead: telemetry was just installed, and the RTT program
    /// (sock_ops) measures only connections established after it, as a pod's are.
    reconnect: bool,
}

/// A rank's answer: the timed iterations' duration and the wrong elements of the checked run.
type Answer = anyhow::Result<(Duration, u64)>;

/// Ring connections of one rank on one network.
struct Ring {
    next: TcpStream,
    previous: TcpStream,
}

fn subnet_address(plain: bool, rank: usize) -> IpAddr {
    let host = u8::try_from(rank + 1).expect("few ranks");
    IpAddr::from([10, if plain { 78 } else { 77 }, 0, host])
}

/// N pods on a node: knd's NICs on bridge `kbr`, plain veths on bridge `pbr`.
struct Cluster {
    node: TestHost,
    pods: Vec<TestHost>,
}

impl Cluster {
    async fn new(n: usize) -> anyhow::Result<Self> {
        let node = TestHost::new("node")?;
        let pods: Vec<TestHost> = (0..n)
            .map(|i| TestHost::new(&format!("rank{i}")))
            .collect::<Result<_, _>>()?;
        let mut knd_ports = Vec::new();
        let mut plain_ports = Vec::new();
        for (i, pod) in pods.iter().enumerate() {
            let (nic, knd_port, plain_port) =
                (format!("nic{i}"), format!("kp{i}"), format!("pp{i}"));
            node.netlink(|link| async move {
                knd_testkit::links::add_veth(&nic, &knd_port).await?;
                knd_testkit::links::add_veth("ref0", &plain_port).await?;
                link.move_to("ref0", pod.netns()).await
            })?;
            knd_ports.push(format!("kp{i}"));
            plain_ports.push(format!("pp{i}"));
            // knd's part: what RunPodSandbox does for a claim of this NIC with this config.
            let config: NetworkConfig = serde_json::from_value(serde_json::json!({
                "apiVersion": "knd.dev/v1alpha1", "kind": "NetworkConfig",
                "interface": {"addresses": [format!("{}/24", subnet_address(false, i))]}
            }))?;
            let side = attach::record(node.netns(), &format!("nic{i}"))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            attach::attach(node.netns(), pod.netns(), &side, "eth1", &config)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            pod.disable_ipv6("eth1")?;
            pod.configure("ref0", subnet_address(true, i), 24)?;
            // As on a collective-tuned host: a connection idle between operations keeps its
            // window (otherwise every measurement starts with slow start again).
            pod.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_slow_start_after_idle", "0"))??;
        }
        bridge(
            &node,
            "kbr",
            &knd_ports.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        bridge(
            &node,
            "pbr",
            &plain_ports.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        Ok(Self { node, pods })
    }
}

/// Sends `out` to `send` while receiving `into` from `receive`, both non-blocking, waiting in
/// poll(2) when neither can move.
fn exchange(
    to: &mut TcpStream,
    out: &[u8],
    receive: &mut TcpStream,
    into: &mut [u8],
) -> anyhow::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let (mut sent, mut received) = (0, 0);
    while sent < out.len() || received < into.len() {
        let mut moved = false;
        if sent < out.len() {
            match to.write(&out[sent..]) {
                Ok(n) => {
                    sent += n;
                    moved = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("sending to the next rank"),
            }
        }
        if received < into.len() {
            match receive.read(&mut into[received..]) {
                Ok(0) => anyhow::bail!("the previous rank closed the connection"),
                Ok(n) => {
                    received += n;
                    moved = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("receiving from the previous rank"),
            }
        }
        if !moved {
            let mut fds = Vec::with_capacity(2);
            if sent < out.len() {
                fds.push(PollFd::new(to.as_fd(), PollFlags::POLLOUT));
            }
            if received < into.len() {
                fds.push(PollFd::new(receive.as_fd(), PollFlags::POLLIN));
            }
            poll(&mut fds, PollTimeout::from(10_000_u16)).context("poll")?;
        }
    }
    Ok(())
}

/// Element range of chunk `c` of `count` elements split in `n`.
fn chunk(count: usize, n: usize, c: usize) -> std::ops::Range<usize> {
    (c * count / n)..((c + 1) * count / n)
}

/// One rank's side of a ring collective over `data` (`size` bytes, floats).
fn collective(
    ring: &mut Ring,
    kind: Collective,
    rank: usize,
    n: usize,
    data: &mut [u8],
    scratch: &mut [u8],
) -> anyhow::Result<()> {
    let count = data.len() / 4;
    let bytes = |c: usize| {
        let r = chunk(count, n, c);
        (r.start * 4)..(r.end * 4)
    };
    let mut step = |send_chunk: usize, receive_chunk: usize, reduce: bool| -> anyhow::Result<()> {
        let (out, into) = (bytes(send_chunk), bytes(receive_chunk));
        if out.is_empty() && into.is_empty() {
            return Ok(());
        }
        let incoming = &mut scratch[..into.len()];
        exchange(&mut ring.next, &data[out], &mut ring.previous, incoming)?;
        let target = &mut data[into];
        if reduce {
            for (t, s) in target.chunks_exact_mut(4).zip(incoming.chunks_exact(4)) {
                let sum = f32::from_ne_bytes([t[0], t[1], t[2], t[3]])
                    + f32::from_ne_bytes([s[0], s[1], s[2], s[3]]);
                t.copy_from_slice(&sum.to_ne_bytes());
            }
        } else {
            target.copy_from_slice(incoming);
        }
        Ok(())
    };
    let at = |offset: usize| (rank + 2 * n - offset) % n;
    if kind == Collective::AllReduce {
        // Reduce-scatter: after n−1 steps rank r holds the sum of chunk r+1.
        for s in 0..n - 1 {
            step(at(s), at(s + 1), true)?;
        }
        // All-gather of the reduced chunks.
        for s in 0..n - 1 {
            step(at(s + n - 1), at(s + n), false)?;
        }
    } else {
        for s in 0..n - 1 {
            step(at(s), at(s + 1), false)?;
        }
    }
    Ok(())
}

/// The value element `j` of rank `r` starts with (small integers: float sums stay exact).
#[expect(clippy::cast_precision_loss, reason = "small integers")]
fn initial(rank: usize, j: usize) -> f32 {
    ((rank * 3 + j) % 17) as f32
}

fn fill(data: &mut [u8], kind: Collective, rank: usize, n: usize) {
    let count = data.len() / 4;
    for j in 0..count {
        let value = match kind {
            Collective::AllReduce => initial(rank, j),
            // all_gather: only the rank's own chunk is its input.
            Collective::AllGather if chunk(count, n, rank).contains(&j) => initial(rank, j),
            Collective::AllGather => -1.0,
        };
        data[j * 4..j * 4 + 4].copy_from_slice(&value.to_ne_bytes());
    }
}

/// Elements that differ from the expected result.
fn wrong(data: &[u8], kind: Collective, n: usize) -> u64 {
    let count = data.len() / 4;
    (0..count)
        .filter(|&j| {
            let got = f32::from_ne_bytes(data[j * 4..j * 4 + 4].try_into().expect("4 bytes"));
            let want = match kind {
                Collective::AllReduce => (0..n).map(|r| initial(r, j)).sum(),
                Collective::AllGather => {
                    let owner = (0..n)
                        .find(|&r| chunk(count, n, r).contains(&j))
                        .unwrap_or(0);
                    initial(owner, j)
                }
            };
            (got - want).abs() > f32::EPSILON
        })
        .count() as u64
}

/// One rank: connects its rings, then runs jobs until the channel closes.
fn rank_main(
    rank: usize,
    n: usize,
    barrier: &Barrier,
    jobs: &mpsc::Receiver<Job>,
    answers: &mpsc::Sender<Answer>,
) -> anyhow::Result<()> {
    // Ranks take CPUs in turn, as NCCL binds a rank per GPU: the placement no longer changes
    // between measurements (unpinned, the scheduler's choices made mid sizes bimodal).
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut set = nix::sched::CpuSet::new();
    set.set(rank % cpus)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    let listeners: Vec<TcpListener> = [false, true]
        .iter()
        .map(|&plain| TcpListener::bind(SocketAddr::new(subnet_address(plain, rank), PORT)))
        .collect::<Result<_, _>>()?;
    barrier.wait();
    let connect = |plain: bool, listener: &TcpListener| -> anyhow::Result<Ring> {
        let next = TcpStream::connect(SocketAddr::new(subnet_address(plain, (rank + 1) % n), PORT))
            .with_context(|| format!("rank {rank} connecting to the next rank"))?;
        let (previous, _) = listener.accept()?;
        for stream in [&next, &previous] {
            stream.set_nodelay(true)?;
            stream.set_nonblocking(true)?;
        }
        Ok(Ring { next, previous })
    };
    let mut rings = Vec::new();
    for (plain, listener) in [false, true].into_iter().zip(&listeners) {
        rings.push(connect(plain, listener)?);
    }
    barrier.wait();
    let mut data = Vec::new();
    let mut scratch = Vec::new();
    while let Ok(job) = jobs.recv() {
        if job.reconnect {
            barrier.wait();
            let answer = connect(false, &listeners[0]).map(|ring| {
                rings[0] = ring;
                (Duration::ZERO, 0)
            });
            barrier.wait();
            answers.send(answer).ok();
            continue;
        }
        let ring = &mut rings[usize::from(job.plain)];
        let answer = (|| -> Answer {
            data.resize(job.size, 0);
            scratch.resize(job.size / n + 8, 0);
            fill(&mut data, job.collective, rank, n);
            barrier.wait();
            collective(ring, job.collective, rank, n, &mut data, &mut scratch)?;
            let wrong = wrong(&data, job.collective, n);
            barrier.wait();
            let started = Instant::now();
            for _ in 0..job.iterations {
                collective(ring, job.collective, rank, n, &mut data, &mut scratch)?;
            }
            Ok((started.elapsed(), wrong))
        })();
        answers.send(answer).ok();
    }
    Ok(())
}

/// Telemetry as the daemon installs it for the pods' claims.
struct Telemetry {
    _probes: TrafficProbes,
    _sockets: SocketProbes,
}

impl Telemetry {
    fn install(cluster: &Cluster, cgroup: &std::path::Path) -> anyhow::Result<Self> {
        let mut probes = TrafficProbes::new();
        let mut sockets = SocketProbes::attach(cgroup)?;
        for pod in &cluster.pods {
            probes.attach(pod.netns(), "eth1")?;
            sockets.watch(pod.netns().cookie()?)?;
        }
        Ok(Self {
            _probes: probes,
            _sockets: sockets,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
struct Point {
    ranks: usize,
    collective: Collective,
    condition: Condition,
    size: usize,
    /// Median over the rounds, microseconds per operation.
    time_us: f64,
    algbw_gb_s: f64,
    busbw_gb_s: f64,
    wrong: u64,
    /// Microseconds per operation in each round, in round order.
    round_times_us: Vec<f64>,
}

fn max_size() -> usize {
    std::env::var("KND_BENCH_MAX_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&s: &usize| s >= MIN_SIZE)
        .unwrap_or(DEFAULT_MAX_SIZE)
}

/// Runs every size for one collective on `n` ranks.
fn sweep(
    cluster: &Cluster,
    n: usize,
    kind: Collective,
    cgroup: &std::path::Path,
    jobs: &[mpsc::Sender<Job>],
    answers: &mpsc::Receiver<Answer>,
    seed: &mut u64,
) -> anyhow::Result<Vec<Point>> {
    let mut points = Vec::new();
    let mut installed: Option<Telemetry> = None;
    let mut size = MIN_SIZE;
    while size <= max_size() {
        let iterations = (BYTES_PER_MEASUREMENT / size).clamp(1, MAX_ITERATIONS);
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); CONDITIONS.len()];
        let mut wrongs = [0_u64; 3];
        for _ in 0..ROUNDS {
            let mut order = [0, 1, 2];
            for i in (1..order.len()).rev() {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                order.swap(i, usize::try_from(*seed % (i as u64 + 1)).unwrap_or(0));
            }
            for c in order {
                let condition = CONDITIONS[c];
                let job = Job {
                    plain: condition == Condition::PlainVeth,
                    collective: kind,
                    size,
                    iterations,
                    reconnect: false,
                };
                // Telemetry changes only between conditions that differ in it; the kernel's
                // deferred work after loading or freeing programs settles before measuring.
                let wanted = condition == Condition::KndTelemetry;
                if wanted != installed.is_some() {
                    installed = if wanted {
                        let telemetry = Telemetry::install(cluster, cgroup)?;
                        // Connections of the knd ring made under telemetry, as a pod's are.
                        let reconnect = Job {
                            reconnect: true,
                            ..job
                        };
                        for sender in jobs {
                            sender.send(reconnect)?;
                        }
                        for _ in 0..n {
                            answers.recv()??;
                        }
                        Some(telemetry)
                    } else {
                        None
                    };
                    std::thread::sleep(SETTLE);
                }
                for sender in jobs {
                    sender.send(job)?;
                }
                let mut slowest = Duration::ZERO;
                for _ in 0..n {
                    let (elapsed, wrong) = answers.recv()??;
                    slowest = slowest.max(elapsed);
                    wrongs[c] += wrong;
                }
                #[expect(clippy::cast_precision_loss, reason = "iteration counts")]
                times[c].push(slowest.as_secs_f64() * 1e6 / iterations as f64);
            }
        }
        for (c, condition) in CONDITIONS.into_iter().enumerate() {
            let round_times_us = times[c].clone();
            times[c].sort_by(f64::total_cmp);
            let time_us = times[c][times[c].len() / 2];
            #[expect(clippy::cast_precision_loss, reason = "sizes")]
            let algbw = size as f64 / (time_us * 1e-6) / 1e9;
            points.push(Point {
                ranks: n,
                collective: kind,
                condition,
                size,
                time_us,
                algbw_gb_s: algbw,
                busbw_gb_s: algbw * kind.bus_factor(n),
                wrong: wrongs[c],
                round_times_us,
            });
        }
        size *= 2;
    }
    Ok(points)
}

/// Runs both collectives on `n` ranks.
async fn ranks(n: usize, cgroup: &std::path::Path, seed: &mut u64) -> anyhow::Result<Vec<Point>> {
    let cluster = Cluster::new(n).await?;
    let barrier = Arc::new(Barrier::new(n));
    let (answer_tx, answers) = mpsc::channel();
    let mut jobs = Vec::new();
    let mut workers = Vec::new();
    for rank in 0..n {
        let (job_tx, job_rx) = mpsc::channel();
        jobs.push(job_tx);
        let (barrier, answer_tx) = (Arc::clone(&barrier), answer_tx.clone());
        let netns: Netns = cluster.pods[rank].netns().try_clone()?;
        workers.push(std::thread::spawn(move || -> anyhow::Result<()> {
            netns
                .run(move || rank_main(rank, n, &barrier, &job_rx, &answer_tx))
                .map_err(|e| anyhow::anyhow!("{e}"))?
        }));
    }
    let mut points = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for kind in [Collective::AllReduce, Collective::AllGather] {
            points.extend(sweep(&cluster, n, kind, cgroup, &jobs, &answers, seed)?);
        }
        Ok(())
    })();
    drop(jobs);
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("a rank panicked"))??;
    }
    result?;
    drop(cluster.node);
    Ok(points)
}

/// nccl-tests' layout: one line per size, the three conditions side by side.
fn print_nccl_style(n: usize, kind: Collective, points: &[Point]) {
    let redop = if kind == Collective::AllReduce {
        "sum"
    } else {
        "none"
    };
    println!("#\n# {}_perf (knd ring over TCP), {n} ranks", kind.name());
    print!("# {:>40}", "");
    for condition in CONDITIONS {
        print!(" {:>31}", condition.label());
    }
    println!();
    print!(
        "#  {:>10}  {:>12}  {:>6}  {:>6}  {:>5}",
        "size", "count", "type", "redop", "root"
    );
    for _ in CONDITIONS {
        print!(
            "  {:>9} {:>6} {:>6} {:>6}",
            "time", "algbw", "busbw", "#wrong"
        );
    }
    println!();
    print!(
        "#  {:>10}  {:>12}  {:>6}  {:>6}  {:>5}",
        "(B)", "(elements)", "", "", ""
    );
    for _ in CONDITIONS {
        print!("  {:>9} {:>6} {:>6} {:>6}", "(us)", "(GB/s)", "(GB/s)", "");
    }
    println!();
    let mut size = MIN_SIZE;
    while size <= max_size() {
        print!(
            "   {size:>10}  {:>12}  {:>6}  {redop:>6}  {:>5}",
            size / 4,
            "float",
            -1
        );
        for condition in CONDITIONS {
            if let Some(p) = points
                .iter()
                .find(|p| p.size == size && p.condition == condition)
            {
                print!(
                    "  {:>9.1} {:>6.2} {:>6.2} {:>6}",
                    p.time_us, p.algbw_gb_s, p.busbw_gb_s, p.wrong
                );
            }
        }
        println!();
        size *= 2;
    }
    for condition in CONDITIONS {
        println!(
            "# Avg bus bandwidth ({}): {:.3} GB/s; to the plain veth's, paired by round: {:.3}",
            condition.label(),
            average_busbw(points, condition),
            paired_ratio(points, condition)
        );
    }
}

/// nccl-tests' average bus bandwidth of a condition over the plain veth's, paired by round (each
/// round measured every condition back to back at each size): the median over rounds of
/// mean-over-sizes busbw ratios.
#[expect(clippy::cast_precision_loss, reason = "averages")]
fn paired_ratio(points: &[Point], condition: Condition) -> f64 {
    let average = |condition: Condition, round: usize| {
        let values: Vec<f64> = points
            .iter()
            .filter(|p| p.condition == condition)
            .filter_map(|p| {
                let time = p.round_times_us.get(round)?;
                Some(p.size as f64 / (time * 1e-6) / 1e9 * p.collective.bus_factor(p.ranks))
            })
            .collect();
        values.iter().sum::<f64>() / values.len().max(1) as f64
    };
    let mut ratios: Vec<f64> = (0..ROUNDS)
        .map(|r| average(condition, r) / average(Condition::PlainVeth, r).max(1e-12))
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

#[expect(clippy::cast_precision_loss, reason = "averages")]
fn average_busbw(points: &[Point], condition: Condition) -> f64 {
    let values: Vec<f64> = points
        .iter()
        .filter(|p| p.condition == condition)
        .map(|p| p.busbw_gb_s)
        .collect();
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "the collectives benchmark creates namespaces and loads eBPF programs: run it as root"
    );
    let cgroup = telemetry::default_cgroup_root().context("no cgroup v2 mount")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut all = Vec::new();
    for n in RANKS {
        let points = runtime.block_on(ranks(n, &cgroup, &mut seed))?;
        for kind in [Collective::AllReduce, Collective::AllGather] {
            let these: Vec<Point> = points
                .iter()
                .filter(|p| p.collective == kind)
                .cloned()
                .collect();
            print_nccl_style(n, kind, &these);
        }
        all.extend(points);
    }
    let wrong: u64 = all.iter().map(|p| p.wrong).sum();
    let document = document(&all, started.elapsed());
    for table in &document.tables[..1] {
        knd_bench::print_table(table);
    }
    document.write(&knd_bench::results_dir())?;
    anyhow::ensure!(
        wrong == 0,
        "{wrong} wrong elements in the checked runs: the collectives computed wrong results"
    );
    Ok(())
}

/// The report: a summary table (average busbw per ranks × collective × condition, the goal),
/// per-size tables and busbw charts.
#[expect(clippy::cast_precision_loss, reason = "sizes for a report")]
fn document(points: &[Point], elapsed: Duration) -> Document {
    let mut document = Document::new("collectives", "NCCL-style collectives over knd's NICs");
    document.notes.push(format!(
        "Ring all_reduce (sum of floats) and all_gather over TCP between N pod namespaces, sizes \
         {} to {} by ×2, {ROUNDS} rounds per size with the conditions in shuffled order (median \
         reported); busbw by nccl-tests' formulas. *knd NIC*: a veth moved into the pod and \
         addressed by knd's attach code, its host end a port of a bridge; *plain veth*: the same \
         namespaces joined by veths on a second bridge, without the driver. Ranks are pinned to \
         CPUs in turn; the pods keep TCP windows across idle gaps \
         (`tcp_slow_start_after_idle=0`). *Paired by round*: nccl-tests' average bus bandwidth \
         (mean of busbw over all sizes) of each round over the plain veth's in the same round, \
         median over rounds; the goal (within 5 %) is checked on it, since measurements minutes \
         apart drift more than 5 % on a shared 2-core VM (the knd-NIC-without-telemetry column is \
         the control: the same path minus telemetry). Took {elapsed:.0?}.",
        human_bytes(MIN_SIZE as f64),
        human_bytes(max_size() as f64)
    ));
    let mut summary = Table::new(
        "Average bus bandwidth over all sizes (GB/s)",
        &[
            "collective",
            "ranks",
            "knd NIC + telemetry",
            "knd NIC, telemetry off",
            "plain veth",
            "ratio of the medians, knd+telemetry / plain",
            "paired by round, knd+telemetry / plain",
            "paired by round, knd off / plain",
            "goal ≥ 0.95",
        ],
    );
    for kind in [Collective::AllReduce, Collective::AllGather] {
        for n in RANKS {
            let these: Vec<Point> = points
                .iter()
                .filter(|p| p.collective == kind && p.ranks == n)
                .cloned()
                .collect();
            let [on, off, plain] = CONDITIONS.map(|c| average_busbw(&these, c));
            let paired = paired_ratio(&these, Condition::KndTelemetry);
            summary.row(vec![
                kind.name().to_owned(),
                n.to_string(),
                format!("{on:.3}"),
                format!("{off:.3}"),
                format!("{plain:.3}"),
                format!("{:.3}", on / plain.max(1e-12)),
                format!("{paired:.3}"),
                format!("{:.3}", paired_ratio(&these, Condition::KndOff)),
                if paired >= 0.95 { "met" } else { "MISSED" }.to_owned(),
            ]);
            let mut table = Table::new(
                &format!("{} · {n} ranks", kind.name()),
                &[
                    "size",
                    "condition",
                    "time µs",
                    "algbw GB/s",
                    "busbw GB/s",
                    "#wrong",
                ],
            );
            for p in &these {
                table.row(vec![
                    human_bytes(p.size as f64),
                    p.condition.label().to_owned(),
                    format!("{:.1}", p.time_us),
                    format!("{:.3}", p.algbw_gb_s),
                    format!("{:.3}", p.busbw_gb_s),
                    p.wrong.to_string(),
                ]);
            }
            document.tables.push(table);
            document.charts.push(Chart {
                title: format!("{} busbw, {n} ranks", kind.name()),
                x_label: "size".to_owned(),
                y_label: "busbw (GB/s)".to_owned(),
                kind: ChartKind::Lines { log_x: true },
                series: CONDITIONS
                    .iter()
                    .map(|&c| {
                        (
                            c.label().to_owned(),
                            these
                                .iter()
                                .filter(|p| p.condition == c)
                                .map(|p| (p.size as f64, p.busbw_gb_s))
                                .collect(),
                        )
                    })
                    .collect(),
            });
        }
    }
    document.tables.insert(0, summary);
    document.data = serde_json::to_value(points).unwrap_or_default();
    document
}
