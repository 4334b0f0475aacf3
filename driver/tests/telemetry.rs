//! Per-claim telemetry end to end, on a real kernel: two pods get their claimed NICs through
//! knd's hooks, the eBPF programs are attached to them in the background, a known TCP transfer
//! runs between the pods, and the exported metrics are compared with the kernel's own numbers:
//! byte and packet counters with the interfaces' statistics (exactly), the RTT histogram with
//! what `ss -ti` reports for a live connection. The series go when the pods stop.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, TcpListener, TcpStream},
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::fs::OpenOptionsExt as _,
    },
    sync::Arc,
    time::{Duration, Instant},
};

use knd::{
    discover::inventory::rdma::RdmaDevice,
    model::{
        config,
        records::{PreparedClaim, PreparedDevice},
    },
    nri::{plugin::Hooks as _, pods::NodeHooks, proto::nri as api},
    observe::metrics::{self, Telemetry},
    os::state::StateStore,
};
use knd_testkit::{
    TestHost, bridge, claims::MemoryClaims, inventory_of, sysfs::SysfsTree, tcp_transfer, veth_pair,
};
use tokio::sync::watch;

const A_ADDR: &str = "10.60.0.1";
const B_ADDR: &str = "10.60.0.2";

struct Pods {
    node: TestHost,
    _switch: TestHost,
    a: TestHost,
    b: TestHost,
    _dir: tempfile::TempDir,
    tree: SysfsTree,
    hooks: NodeHooks<MemoryClaims>,
    telemetry: Arc<Telemetry>,
    registry: prometheus_client::registry::Registry,
}

/// A host root with the counters of RDMA device `mlx5_0` (port 1) as mlx5 shows them.
fn rdma_counters_tree() -> SysfsTree {
    let tree = SysfsTree::new();
    let dir = "/sys/devices/pci0000:00/0000:00:02.0/infiniband/mlx5_0";
    for (name, value) in [
        ("counters/port_xmit_data", "2500"),
        ("counters/port_rcv_data", "1250"),
        ("counters/port_xmit_packets", "40"),
        ("counters/port_rcv_packets", "20"),
        ("hw_counters/np_cnp_sent", "7"),
        ("hw_counters/rp_cnp_handled", "3"),
        ("hw_counters/out_of_sequence", "2"),
    ] {
        tree.file(&format!("{dir}/ports/1/{name}"), &format!("{value}\n"));
    }
    tree.link("/sys/class/infiniband/mlx5_0", dir);
    tree
}

fn pod_host(name: &str) -> TestHost {
    let pod = TestHost::new(name).unwrap();
    // No IPv6 on interfaces that arrive: no background frames in the exact comparison.
    pod.run(|| {
        for key in ["default", "all"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{key}/disable_ipv6"), "1").unwrap();
        }
    })
    .unwrap();
    pod
}

/// Pod `pod`'s claim of `device` as `net1` with `address`; `extra` is more of its config.
fn claim(uid: &str, pod: &str, device: &str, address: &str, extra: &str) -> PreparedClaim {
    let text = format!(
        r#"{{"apiVersion":"knd.dev/v1alpha1","kind":"NetworkConfig","interface":{{"name":"net1","addresses":["{address}/24"]}}{extra}}}"#
    );
    PreparedClaim {
        uid: uid.into(),
        namespace: "ml".into(),
        name: format!("nic-{pod}"),
        pod_uids: vec![format!("uid-{pod}")],
        devices: vec![PreparedDevice {
            requests: vec!["nic".into()],
            pool: "node-1".into(),
            device: device.into(),
            config: config::parse(text.as_bytes()).unwrap(),
            topology: None,
            share: None,
        }],
    }
}

impl Pods {
    fn new() -> Self {
        Self::with_claim_a("")
    }

    /// Pods whose claim a has `extra` in its config.
    fn with_claim_a(extra: &str) -> Self {
        let node = TestHost::new("node").unwrap();
        let switch = TestHost::new("switch").unwrap();
        veth_pair(&node, "enp1", &switch, "sw1").unwrap();
        veth_pair(&node, "enp2", &switch, "sw2").unwrap();
        for port in ["sw1", "sw2"] {
            switch.disable_ipv6(port).unwrap();
        }
        bridge(&switch, "br0", &["sw1", "sw2"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(StateStore::open(dir.path()).unwrap());
        store
            .claims
            .put("claim-a", &claim("claim-a", "a", "enp1", A_ADDR, extra))
            .unwrap();
        store
            .claims
            .put("claim-b", &claim("claim-b", "b", "enp2", B_ADDR, ""))
            .unwrap();
        let mut inventory = inventory_of(["enp1", "enp2"]);
        // enp1 stands in for a RoCE NIC: an RDMA device whose counters sysfs shows.
        inventory.nics[0].rdma = vec![RdmaDevice {
            name: "mlx5_0".into(),
            ..RdmaDevice::default()
        }];
        let tree = rdma_counters_tree();
        let (_inventory, inventory) = watch::channel(Arc::new(inventory));
        let cgroup = knd::observe::telemetry::default_cgroup_root();
        // Programs loaded ahead, as the daemon keeps them.
        let telemetry = Arc::new(
            Telemetry::new(cgroup.as_deref(), 100)
                .with_host_root(tree.host())
                .with_ready_programs(2),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while telemetry.ready_programs() < 2 {
            assert!(
                Instant::now() < deadline,
                "the programs were never loaded ahead"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(telemetry.measures_rtt(), "the sock_ops program attached");
        let hooks = NodeHooks::new(
            store,
            inventory,
            node.netns().try_clone().unwrap(),
            Arc::new(MemoryClaims::default()),
        )
        .with_telemetry(Arc::clone(&telemetry));
        let registry = telemetry.registry();
        Self {
            node,
            _switch: switch,
            a: pod_host("a"),
            b: pod_host("b"),
            _dir: dir,
            tree,
            hooks,
            telemetry,
            registry,
        }
    }

    /// Both pods start and get their NICs; returns once the programs (attached in the
    /// background, off the runtime's hook) measure both.
    async fn start_both(&self) {
        for (pod, name) in [(&self.a, "a"), (&self.b, "b")] {
            self.hooks
                .run_pod_sandbox(Self::sandbox(pod, name))
                .await
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(self.telemetry.watches("uid-a") && self.telemetry.watches("uid-b")) {
            assert!(Instant::now() < deadline, "never measured");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Both pods stop (their NICs go back to the node).
    async fn stop_both(&self) {
        for (pod, name) in [(&self.a, "a"), (&self.b, "b")] {
            self.hooks
                .stop_pod_sandbox(Self::sandbox(pod, name))
                .await
                .unwrap();
        }
    }

    fn sandbox(pod: &TestHost, name: &str) -> api::PodSandbox {
        api::PodSandbox {
            id: format!("sandbox-{name}"),
            name: format!("trainer-{name}"),
            uid: format!("uid-{name}"),
            namespace: "ml".into(),
            linux: Some(api::LinuxPodSandbox {
                namespaces: vec![api::LinuxNamespace {
                    r#type: "network".into(),
                    path: format!("/proc/self/fd/{}", pod.netns().as_fd().as_raw_fd()),
                }],
                ..api::LinuxPodSandbox::default()
            }),
            ..api::PodSandbox::default()
        }
    }

    fn scrape(&self) -> String {
        metrics::encode(&self.registry)
    }
}

/// The value of the series `metric` whose labels include every `label="value"` in `labels`.
fn value(text: &str, metric: &str, labels: &[&str]) -> Option<u64> {
    text.lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")))
        .find(|line| labels.iter().all(|l| line.contains(l)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// `(upper bound, samples in that bucket)` of a histogram series, from its cumulative buckets.
fn histogram(text: &str, metric: &str, labels: &[&str]) -> Vec<(f64, f64)> {
    let mut cumulative: Vec<(f64, f64)> = text
        .lines()
        .filter(|line| line.starts_with(&format!("{metric}_bucket{{")))
        .filter(|line| labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| {
            let le = line.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, line.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    cumulative.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut previous = 0.0;
    cumulative
        .into_iter()
        .map(|(bound, count)| {
            let here = count - previous;
            previous = count;
            (bound, here)
        })
        .collect()
}

/// A connection from pod a to pod b that stays open: the smoothed RTT `ss -ti` reports for it
/// in pod a, seconds, after a few round trips.
fn ss_rtt(pods: &Pods) -> f64 {
    let listener = pods
        .b
        .run(|| TcpListener::bind((B_ADDR.parse::<IpAddr>().unwrap(), 0)).unwrap())
        .unwrap();
    let target = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buffer = [0_u8; 64];
        while let Ok(n) = stream.read(&mut buffer) {
            if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                break;
            }
        }
    });
    let report = pods
        .a
        .run(|| {
            let mut stream = TcpStream::connect(target).unwrap();
            let mut buffer = [0_u8; 5];
            for _ in 0..20 {
                stream.write_all(b"ping!").unwrap();
                stream.read_exact(&mut buffer).unwrap();
            }
            let output = std::process::Command::new("ss")
                .args(["-tin", "state", "established", "dst", B_ADDR])
                .output()
                .unwrap();
            drop(stream);
            String::from_utf8_lossy(&output.stdout).into_owned()
        })
        .unwrap();
    echo.join().unwrap();
    let rtt_ms: f64 = report
        .split("rtt:")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no rtt in ss output: {report}"));
    rtt_ms / 1000.0
}

/// A scrape, and both pods' kernel statistics of net1 from the same moment (read until they do
/// not move across the scrape).
fn settled(
    pods: &Pods,
) -> (
    String,
    knd::model::link::LinkStats,
    knd::model::link::LinkStats,
) {
    for _ in 0..100 {
        let before = (
            pods.a.link_stats("net1").unwrap(),
            pods.b.link_stats("net1").unwrap(),
        );
        let text = pods.scrape();
        let after = (
            pods.a.link_stats("net1").unwrap(),
            pods.b.link_stats("net1").unwrap(),
        );
        if before == after {
            return (text, after.0, after.1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the pods' traffic never settled");
}

/// What the claim's exported counters grew by between two scrapes equals what the kernel's
/// statistics of its interface grew by between the same moments.
fn check_counters(
    (text_before, text): (&str, &str),
    claim: &str,
    (before, kernel): (&knd::model::link::LinkStats, &knd::model::link::LinkStats),
) {
    let labels = [
        &*format!("claim=\"{claim}\""),
        "interface=\"net1\"",
        "namespace=\"ml\"",
        "request=\"nic\"",
    ];
    let ours = |metric: &str| {
        let at = |text: &str| {
            value(text, metric, &labels).unwrap_or_else(|| panic!("{metric} for {claim}:\n{text}"))
        };
        at(text) - at(text_before)
    };
    assert_eq!(
        ours("knd_claim_tx_bytes_total"),
        kernel.tx_bytes - before.tx_bytes,
        "{claim}"
    );
    assert_eq!(
        ours("knd_claim_rx_bytes_total"),
        kernel.rx_bytes - before.rx_bytes,
        "{claim}"
    );
    assert_eq!(
        ours("knd_claim_tx_packets_total"),
        kernel.tx_packets - before.tx_packets,
        "{claim}"
    );
    assert_eq!(
        ours("knd_claim_rx_packets_total"),
        kernel.rx_packets - before.rx_packets,
        "{claim}"
    );
    assert!(
        kernel.tx_packets > before.tx_packets,
        "{claim} carried traffic"
    );
}

/// `knd top`'s view of the interval between two scrapes: pod a's send rate × the interval is
/// exactly what the kernel counted.
fn check_top(
    text_before: &str,
    text: &str,
    (before_a, after_a): (&knd::model::link::LinkStats, &knd::model::link::LinkStats),
) {
    let rows = knd::cli::top::rows(
        &knd::cli::top::parse(text_before).unwrap(),
        &knd::cli::top::parse(text).unwrap(),
        Duration::from_secs(1),
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    let row_a = rows.iter().find(|r| r.interface.claim == "nic-a").unwrap();
    #[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
    let tx_bits = ((after_a.tx_bytes - before_a.tx_bytes) * 8) as f64;
    assert!(
        (row_a.tx_gbps * 1e9 - tx_bits).abs() < 0.5,
        "{} vs {tx_bits}",
        row_a.tx_gbps * 1e9
    );
    assert!(
        row_a.rtt_p50.is_some() && row_a.rtt_p99 >= row_a.rtt_p50,
        "{row_a:?}"
    );
    assert!(
        knd::cli::top::render(&rows).contains("ml/trainer-a"),
        "{}",
        knd::cli::top::render(&rows)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces and loads eBPF programs"]
async fn claim_metrics_equal_the_kernels_counters_and_go_with_the_pod() {
    let pods = tokio::task::spawn_blocking(Pods::new).await.unwrap();
    pods.start_both().await;
    let (text_before, before_a, before_b) = tokio::task::block_in_place(|| settled(&pods));

    let payload = 8 << 20;
    let (a, b) = (&pods.a, &pods.b);
    let sent = tokio::task::block_in_place(|| {
        tcp_transfer(a, b, B_ADDR.parse().unwrap(), payload).unwrap()
    });
    assert_eq!(sent, payload);
    let ss = tokio::task::block_in_place(|| ss_rtt(&pods));

    let (text, after_a, after_b) = tokio::task::block_in_place(|| settled(&pods));
    for (claim, before, after) in [
        ("nic-a", &before_a, &after_a),
        ("nic-b", &before_b, &after_b),
    ] {
        check_counters((&text_before, &text), claim, (before, after));
    }
    let a_sent = value(
        &text,
        "knd_claim_class_bytes_total",
        &["claim=\"nic-a\"", "direction=\"tx\"", "class=\"tcp\""],
    )
    .unwrap();
    assert!(a_sent > payload as u64, "the transfer is TCP: {a_sent}");

    check_top(&text_before, &text, (&before_a, &after_a));

    // The RDMA device behind pod a's NIC: sysfs counters, data in 4-byte words.
    let rdma = |metric: &str, extra: &[&str]| {
        let mut labels = vec!["claim=\"nic-a\"", "rdma_device=\"mlx5_0\"", "port=\"1\""];
        labels.extend_from_slice(extra);
        value(&text, metric, &labels).unwrap_or_else(|| panic!("{metric}:\n{text}"))
    };
    assert_eq!(rdma("knd_claim_rdma_tx_bytes_total", &[]), 10_000);
    assert_eq!(rdma("knd_claim_rdma_rx_bytes_total", &[]), 5_000);
    assert_eq!(rdma("knd_claim_rdma_tx_packets_total", &[]), 40);
    assert_eq!(rdma("knd_claim_rdma_cnp_total", &["kind=\"sent\""]), 7);
    assert_eq!(rdma("knd_claim_rdma_cnp_total", &["kind=\"handled\""]), 3);
    assert_eq!(
        rdma(
            "knd_claim_rdma_hw_events_total",
            &["counter=\"out_of_sequence\""]
        ),
        2
    );
    assert!(
        !text.contains(
            "claim=\"nic-b\",request=\"nic\",device=\"enp2\",interface=\"net1\",rdma_device"
        ),
        "pod b's NIC has no RDMA device"
    );

    // RTT: samples, and the kernel's own smoothed RTT falls inside the histogram's range.
    let rtt = histogram(&text, "knd_claim_tcp_rtt_seconds", &["claim=\"nic-a\""]);
    let samples: f64 = rtt.iter().map(|(_, n)| n).sum();
    assert!(samples > 0.0, "RTT samples for pod a:\n{text}");
    let lowest = rtt.iter().position(|(_, n)| *n > 0.0).unwrap();
    let highest = rtt.iter().rposition(|(_, n)| *n > 0.0).unwrap();
    let floor = if lowest == 0 { 0.0 } else { rtt[lowest - 1].0 };
    let ceiling = rtt[highest].0;
    assert!(
        floor <= ss && ss <= ceiling,
        "ss -ti says {ss} s; the histogram spans ({floor}, {ceiling}] s: {rtt:?}"
    );
    eprintln!(
        "ss -ti: srtt {:.1} µs; histogram: {samples} samples in ({:.1}, {:.1}] µs",
        ss * 1e6,
        floor * 1e6,
        ceiling * 1e6
    );

    // Pod a stops: its series go, pod b's stay.
    pods.hooks
        .stop_pod_sandbox(Pods::sandbox(&pods.a, "a"))
        .await
        .unwrap();
    let text = pods.scrape();
    assert!(!text.contains("claim=\"nic-a\""), "{text}");
    assert!(text.contains("claim=\"nic-b\""), "{text}");
    assert!(!pods.telemetry.watches("uid-a"));
    pods.hooks
        .stop_pod_sandbox(Pods::sandbox(&pods.b, "b"))
        .await
        .unwrap();
    let text = pods.scrape();
    assert!(!text.contains("knd_claim_"), "{text}");
    assert!(
        text.contains("knd_telemetry_watched_interfaces 0"),
        "{text}"
    );
    drop(pods.node);
}

/// Counting starts before the interface's first frame in the pod: the programs are linked as it
/// arrives, down, before knd configures it. A pod whose container starts a TCP transfer the
/// moment RunPodSandbox returns (while the claim's series are not even registered yet) is
/// counted exactly: knd's totals equal the kernel's counters of its interface less their values
/// when it entered the pod — both directions, bytes and frames — and that baseline is exported
/// and equals the counters the NIC had on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces and loads eBPF programs"]
async fn counting_starts_with_the_first_frame_in_the_pod() {
    first_frame(false).await;
}

/// The same with the programs linked to the NIC while it was still on the node, as the daemon
/// does once the claim is prepared (they follow the device into the pod): what they counted on
/// the node is reset as it arrives, and the pod's count is still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces and loads eBPF programs"]
async fn programs_linked_on_the_node_count_exactly_from_the_pods_first_frame() {
    first_frame(true).await;
}

async fn first_frame(staged: bool) {
    let pods = tokio::task::spawn_blocking(Pods::new).await.unwrap();
    pods.hooks
        .run_pod_sandbox(Pods::sandbox(&pods.b, "b"))
        .await
        .unwrap();
    // Frames the NIC carried on the node before: the baseline is not zero.
    let on_the_node = tokio::task::block_in_place(|| {
        pods.node
            .configure("enp1", "10.61.0.1".parse().unwrap(), 24)
            .unwrap();
        pods.node.ping("10.61.0.9".parse().unwrap(), 1).ok();
        pods.node.link_stats("enp1").unwrap()
    });
    assert!(on_the_node.tx_packets > 0, "{on_the_node:?}");
    if staged {
        pods.hooks.stage(&claim("claim-a", "a", "enp1", A_ADDR, ""));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pods.telemetry.is_staged("claim-a", "enp1") {
            assert!(Instant::now() < deadline, "never linked ahead");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Frames the programs count on the node, then forget as the NIC enters the pod.
        tokio::task::block_in_place(|| pods.node.ping("10.61.0.9".parse().unwrap(), 1).ok());
    }
    let on_the_node = tokio::task::block_in_place(|| pods.node.link_stats("enp1").unwrap());
    pods.hooks
        .run_pod_sandbox(Pods::sandbox(&pods.a, "a"))
        .await
        .unwrap();
    assert!(
        !pods.telemetry.is_staged("claim-a", "enp1"),
        "the pod took what was linked ahead"
    );
    // The container starts sending at once.
    let (a, b) = (&pods.a, &pods.b);
    let sent = tokio::task::block_in_place(|| {
        tcp_transfer(a, b, B_ADDR.parse().unwrap(), 1 << 20).unwrap()
    });
    assert_eq!(sent, 1 << 20);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pods.telemetry.watches("uid-a") {
        assert!(Instant::now() < deadline, "never measured");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (text, kernel, _) = tokio::task::block_in_place(|| settled(&pods));
    let labels = ["claim=\"nic-a\"", "interface=\"net1\""];
    let ours = |metric: &str, extra: &[&str]| {
        let mut all = labels.to_vec();
        all.extend_from_slice(extra);
        value(&text, metric, &all).unwrap_or_else(|| panic!("{metric} {extra:?}:\n{text}"))
    };
    let baseline = [
        ours("knd_claim_baseline_bytes", &["direction=\"rx\""]),
        ours("knd_claim_baseline_bytes", &["direction=\"tx\""]),
        ours("knd_claim_baseline_packets", &["direction=\"rx\""]),
        ours("knd_claim_baseline_packets", &["direction=\"tx\""]),
    ];
    assert_eq!(
        baseline,
        [
            on_the_node.rx_bytes,
            on_the_node.tx_bytes,
            on_the_node.rx_packets,
            on_the_node.tx_packets
        ],
        "the baseline is what the NIC had counted on the node"
    );
    assert_eq!(
        [
            ours("knd_claim_rx_bytes_total", &[]),
            ours("knd_claim_tx_bytes_total", &[]),
            ours("knd_claim_rx_packets_total", &[]),
            ours("knd_claim_tx_packets_total", &[]),
        ],
        [
            kernel.rx_bytes - baseline[0],
            kernel.tx_bytes - baseline[1],
            kernel.rx_packets - baseline[2],
            kernel.tx_packets - baseline[3],
        ],
        "knd counted every frame since the NIC entered the pod"
    );
    assert!(
        text.contains("knd_claim_attached_timestamp_seconds{"),
        "{text}"
    );
    pods.stop_both().await;
    drop(pods.node);
}

/// `telemetry: {enabled: false}` is honoured: the claim's interface carries no program (read from
/// the kernel) and exports no series, while the other pod's claim is measured as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces and loads eBPF programs"]
async fn a_claim_with_telemetry_off_gets_no_programs_and_no_series() {
    let pods =
        tokio::task::spawn_blocking(|| Pods::with_claim_a(r#","telemetry":{"enabled":false}"#))
            .await
            .unwrap();
    for (pod, name) in [(&pods.a, "a"), (&pods.b, "b")] {
        pods.hooks
            .run_pod_sandbox(Pods::sandbox(pod, name))
            .await
            .unwrap();
    }
    // Every background attachment has finished.
    pods.hooks.drained().await;
    assert!(pods.telemetry.watches("uid-b"));
    assert!(!pods.telemetry.watches("uid-a"));
    let on_a = pods.a.tcx_programs("net1").unwrap();
    assert_eq!(
        on_a,
        Vec::<String>::new(),
        "no program on the claim without telemetry"
    );
    let on_b = pods.b.tcx_programs("net1").unwrap();
    assert_eq!(
        on_b.len(),
        2,
        "both directions measured on the other: {on_b:?}"
    );
    let text = pods.scrape();
    assert!(!text.contains("claim=\"nic-a\""), "{text}");
    assert!(text.contains("claim=\"nic-b\""), "{text}");
    pods.stop_both().await;
    drop(pods.node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces and loads eBPF programs"]
async fn a_pod_stopped_while_its_programs_load_leaves_nothing_measured() {
    let pods = tokio::task::spawn_blocking(Pods::new).await.unwrap();
    for round in 0..3 {
        pods.hooks
            .run_pod_sandbox(Pods::sandbox(&pods.a, "a"))
            .await
            .unwrap();
        // Stopped at once: the programs are still loading in the background (they do so
        // without the pod's lock), and what they attach must be removed again.
        pods.hooks
            .stop_pod_sandbox(Pods::sandbox(&pods.a, "a"))
            .await
            .unwrap();
        pods.hooks
            .remove_pod_sandbox(Pods::sandbox(&pods.a, "a"))
            .await
            .unwrap();
        // Loading takes ~50 ms; a second is plenty for the background work to finish.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!pods.telemetry.watches("uid-a"), "round {round}");
        let text = pods.scrape();
        assert!(!text.contains("claim=\"nic-a\""), "round {round}: {text}");
        assert!(pods.node.link_stats("enp1").is_ok(), "the NIC is back");
    }
    drop(pods.node);
}

/// A scrape stuck in a slow read (a sysfs counter that answers only when the test writes it)
/// does not hold up a pod's stop: the stop finishes while the scrape still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces and loads eBPF programs"]
async fn a_pod_stops_while_a_scrape_is_stuck_in_a_read() {
    let pods = Arc::new(tokio::task::spawn_blocking(Pods::new).await.unwrap());
    pods.start_both().await;
    let fifo = pods
        .tree
        .root()
        .join("sys/devices/pci0000:00/0000:00:02.0/infiniband/mlx5_0/ports/1/hw_counters/stuck");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let scrape = std::thread::spawn({
        let pods = Arc::clone(&pods);
        move || pods.scrape()
    });
    // A writer can open the FIFO without blocking once the scrape has opened it to read; the
    // scrape then waits in read() until the writer writes or closes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let writer = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
        {
            Ok(writer) => break writer,
            Err(error) if error.raw_os_error() == Some(libc::ENXIO) => {
                assert!(
                    Instant::now() < deadline,
                    "the scrape never read the counter"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(error) => panic!("{error}"),
        }
    };
    // The stop runs on a thread of its own, so that a stop blocked on the scrape fails the
    // test after a while instead of hanging it.
    let (done, stopped) = std::sync::mpsc::channel();
    std::thread::spawn({
        let (pods, runtime) = (Arc::clone(&pods), tokio::runtime::Handle::current());
        move || {
            let stop = pods.hooks.stop_pod_sandbox(Pods::sandbox(&pods.a, "a"));
            done.send(runtime.block_on(stop))
        }
    });
    tokio::task::block_in_place(|| stopped.recv_timeout(Duration::from_secs(10)))
        .expect("the stop waited for the scrape")
        .unwrap();
    assert!(!pods.telemetry.watches("uid-a"));
    assert!(!scrape.is_finished(), "the scrape was still reading");
    (&writer).write_all(b"5\n").unwrap();
    drop(writer);
    let text = tokio::task::spawn_blocking(move || scrape.join().unwrap())
        .await
        .unwrap();
    assert!(text.contains("knd_claim_tx_bytes_total"), "{text}");
    assert!(!pods.scrape().contains("claim=\"nic-a\""));
}

/// Metric names (with their sample suffixes) a scrape declares or carries.
fn exported_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#')
            && let Some(name) = line.split(['{', ' ']).next()
        {
            names.insert(name.to_owned());
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces and loads eBPF programs"]
async fn the_dashboard_and_alerts_use_only_metrics_the_driver_exports() {
    let pods = tokio::task::spawn_blocking(Pods::new).await.unwrap();
    pods.start_both().await;
    let (a, b) = (&pods.a, &pods.b);
    tokio::task::block_in_place(|| tcp_transfer(a, b, B_ADDR.parse().unwrap(), 1 << 20).unwrap());
    // The daemon's health loop feeds the device health gauge (checked in tests/daemon.rs).
    pods.telemetry
        .set_device_health(&[knd::model::ports::DeviceHealth {
            pool: "node-1".into(),
            device: "enp1".into(),
            healthy: true,
            reason: String::new(),
            cause: None,
        }]);
    // The preparer feeds the alignment series (checked in tests/alignment.rs).
    let mut aligned = PreparedClaim {
        uid: "uid-x".into(),
        namespace: "ml".into(),
        name: "x".into(),
        pod_uids: Vec::new(),
        devices: Vec::new(),
    };
    aligned.devices.push(PreparedDevice {
        requests: vec!["nic".into()],
        pool: "node-1".into(),
        device: "enp1".into(),
        config: config::default_config(),
        topology: Some(knd::model::distance::Finding {
            gpu: "0000:13:00.0".into(),
            class: knd::model::distance::Distance::Pix,
            required: knd::model::distance::Distance::Pxb,
        }),
        share: None,
    });
    let (_, inventory) = watch::channel(Arc::new(knd::discover::inventory::Inventory::default()));
    knd::dra::alignment::Alignment {
        policy: knd::dra::alignment::Policy::Warn,
        inventory,
        distances: pods.telemetry.gpu_nic_distance.clone(),
    }
    .record(&aligned);
    let exported = exported_names(&pods.scrape());
    assert!(
        exported.contains("knd_claim_rx_bytes_total"),
        "{exported:?}"
    );

    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring");
    let referenced = regex::Regex::new(r"knd_[a-z0-9_]+").unwrap();
    for file in ["grafana-dashboard.json", "prometheusrule.yaml"] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        let names: std::collections::BTreeSet<&str> =
            referenced.find_iter(&text).map(|m| m.as_str()).collect();
        assert!(names.len() >= 5, "{file}: {names:?}");
        let unknown: Vec<&&str> = names.iter().filter(|n| !exported.contains(**n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics knd does not export: {unknown:?}\nexported: {exported:?}"
        );
    }
    drop(pods.node);
}
