//! The shipped artifact under the shipped manifest: knd's container image (as `cargo xtask
//! image` builds it) imported into a real containerd 1.7 and started through CRI as kubelet
//! starts the DaemonSet's pod — host network, the manifest's arguments, environment,
//! capabilities, read-only root filesystem, no privilege escalation, the runtime's default
//! seccomp profile and its volume mounts, the test's directories standing in for the node's
//! host paths, an in-cluster service account against an HTTPS API server. One pod then gets
//! one NIC with an MTU, an address and a sysctl, its traffic is counted exactly, TCP RTT is
//! measured, and the NIC comes back when the pod goes.
//!
//! So every change of the manifests is proved against the code: a capability or mount the
//! code needs and the manifest lost fails here (`KND_DAEMONSET` points the test at another
//! manifest, e.g. one with a capability removed).

use std::{
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use knd::{
    cli::top,
    discover::inventory,
    dra::proto::dra_v1,
    model::link::LinkStats,
    os::{netns::Netns, state::StateStore},
};
use knd_testkit::{
    TestHost,
    apiserver::FakeApi,
    claims::{CONFIG_HEAD, allocated_on},
    daemonset, device_named, kubelet, machines,
    runtime::{self, Containerd, CriClient, cri, pod_config},
    tcp_transfer, veth_pair,
};

const NICS: [&str; 4] = ["nic0", "nic1", "nic2", "nic3"];
const SYSCTL: &str = "net.ipv4.conf.net1.arp_ignore";

/// The image: `KND_IMAGE` (set by `cargo xtask test`), else built here as `cargo xtask image
/// --profile dev` builds it.
fn image() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("KND_IMAGE") {
        return Ok(PathBuf::from(path));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let archive = root.join("target/oci/knd-dev.tar");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(&root)
        .args(["xtask", "image", "--profile", "dev", "--output"])
        .arg(&archive)
        .status()
        .context("running cargo xtask image")?;
    ensure!(status.success(), "cargo xtask image --profile dev failed");
    Ok(archive)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: runs a real containerd, creates network namespaces, loads eBPF"]
async fn the_image_under_the_daemonsets_security_context_attaches_configures_and_counts() {
    let manifest =
        std::env::var_os("KND_DAEMONSET").map_or_else(daemonset::manifest_path, PathBuf::from);
    if let Err(error) = scenario(&manifest).await {
        panic!("{error:#}");
    }
}

/// The same with the DaemonSet the Helm chart renders (its defaults).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: runs a real containerd, creates network namespaces, loads eBPF"]
async fn the_image_under_the_charts_daemonset_attaches_configures_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = std::process::Command::new(root.join(".tools/venv/bin/helm"))
        .args(["template", "knd"])
        .arg(root.join("deploy/helm/knd"))
        .args(["--namespace", "knd-system", "--kube-version", "1.34.0"])
        .output()
        .expect("helm (cargo xtask setup installs it)");
    assert!(
        output.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let manifest = dir.path().join("chart.yaml");
    std::fs::write(&manifest, &output.stdout).unwrap();
    if let Err(error) = scenario(&manifest).await {
        panic!("{error:#}");
    }
}

/// Where the pod's knd serves its metrics: `KND_METRICS_ADDR` or `--metrics-addr`.
fn metrics_addr(container: &cri::ContainerConfig) -> anyhow::Result<String> {
    daemonset::env_value(container, "KND_METRICS_ADDR")
        .map(str::to_owned)
        .or_else(|| {
            container
                .args
                .iter()
                .find_map(|a| a.strip_prefix("--metrics-addr="))
                .map(str::to_owned)
        })
        .context("the DaemonSet sets no metrics address")
}

struct Node {
    host: TestHost,
    peer: TestHost,
    tree: knd_testkit::sysfs::SysfsTree,
    dir: tempfile::TempDir,
}

async fn scenario(manifest: &Path) -> anyhow::Result<()> {
    let archive = tokio::task::spawn_blocking(image).await??;
    let (node, api) = tokio::task::spawn_blocking(|| -> anyhow::Result<_> {
        let host = TestHost::new("node")?;
        let peer = TestHost::new("peer")?;
        for (i, nic) in NICS.iter().enumerate() {
            veth_pair(&host, nic, &peer, &format!("p{i}"))?;
        }
        peer.configure("p0", "10.78.0.1".parse()?, 24)?;
        peer.netlink(|link| async move { link.set_mtu("p0", 9000).await })?;
        let api = host.run(|| std::net::TcpListener::bind("127.0.0.1:0"))??;
        let node = Node {
            host,
            peer,
            tree: machines::two_gpu_rails(NICS),
            dir: tempfile::Builder::new()
                .prefix("knd-image-test-")
                .tempdir()?,
        };
        Ok((node, api))
    })
    .await??;
    let fake = FakeApi::start_tls_on(api)?;
    fake.add_node("node-1");
    let netns = node.host.netns().as_fd().try_clone_to_owned()?;
    let containerd = tokio::task::spawn_blocking(move || {
        Containerd::start_with(runtime::Options {
            netns: Some(netns),
            node_netns_dir: true,
        })
    })
    .await??;
    containerd.import_image(&archive)?;
    let mut cri = containerd.cri().await?;

    let nri_dir = containerd
        .nri_socket()
        .parent()
        .context("NRI directory")?
        .to_path_buf();
    let dir = node.dir.path();
    let standing_in = daemonset::Node::standing_in("node-1", dir, node.tree.root(), &nri_dir)?
        .with_service_account(&fake, &dir.join("serviceaccount"))?;
    let pod = daemonset::pod(&daemonset::load(manifest)?, &standing_in)?;
    let metrics = metrics_addr(&pod.container)?;
    let knd = daemonset::run(&mut cri, &pod).await?;
    let outcome = with_knd(&node, &fake, &mut cri, &knd, &metrics).await;
    let log = knd.log_tail(40);
    let stopped = knd.stop(&mut cri, Duration::from_secs(30)).await;
    outcome.with_context(|| format!("knd's log:\n{log}"))?;
    stopped
}

async fn with_knd(
    node: &Node,
    fake: &FakeApi,
    cri: &mut CriClient,
    knd: &daemonset::Running,
    metrics: &str,
) -> anyhow::Result<()> {
    let dir = node.dir.path();
    let registration = dir.join("registry/knd.dev-reg.sock");
    knd.wait_until(cri, Duration::from_secs(30), || {
        let exists = registration.exists();
        async move { exists }
    })
    .await?;
    kubelet::register(&registration, Duration::from_secs(20)).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.slices().is_empty() {
        knd.check_running(cri).await?;
        ensure!(Instant::now() < deadline, "knd published no slice");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("http://{metrics}/metrics");
    let enabled = pick(
        &scrape(&node.host, &url)?,
        "knd_telemetry_rtt_enabled",
        None,
    )?;
    ensure!(
        (enabled - 1.0).abs() < f64::EPSILON,
        "knd in its container does not measure TCP RTT (knd_telemetry_rtt_enabled {enabled})"
    );

    let device = device_named(&inventory::discover(&node.tree.host()), "nic0")
        .context("nic0 is not in the fixture")?;
    fake.put_claim(claim(&device)?);
    kubelet::prepare(
        &dir.join("plugins/dra.sock"),
        vec![dra_v1::Claim {
            namespace: "ml".into(),
            uid: "claim-uid-w".into(),
            name: "worker-nic".into(),
        }],
    )
    .await?;
    let sandbox = cri
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config("ml", "worker", "pod-uid-w")),
            runtime_handler: String::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("RunPodSandbox: {}", s.message()))?
        .into_inner()
        .pod_sandbox_id;
    let in_pod = check_pod(node, &url);
    cri.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sandbox.clone(),
    })
    .await?;
    cri.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: sandbox,
    })
    .await?;
    in_pod?;
    let back = node
        .host
        .netlink(|link| async move { link.settings("nic0").await })
        .context("nic0 is not back on the node")?;
    ensure!(back.mtu == 1500, "nic0 came back with MTU {}", back.mtu);
    knd.check_running(cri).await
}

/// In the pod: the NIC configured (name, MTU, sysctl), counted from its first frame, equal to
/// the kernel's statistics.
fn check_pod(node: &Node, url: &str) -> anyhow::Result<()> {
    // The DaemonSet's /var/lib/knd and /run/knd, as the test node maps them.
    let dir = node.dir.path();
    let store = StateStore::open_in(&dir.join("state"), &dir.join("run"))?;
    let record = store
        .pods
        .get("pod-uid-w")?
        .context("knd recorded no pod")?;
    let pod = TestHost::adopt("worker", Netns::open(&record.netns)?);
    let settings = pod.netlink(|link| async move { link.settings("net1").await })?;
    ensure!(settings.mtu == 9000, "net1 has MTU {}", settings.mtu);
    let path = format!("/proc/sys/{}", SYSCTL.replace('.', "/"));
    let value = pod.run(|| std::fs::read_to_string(&path))??;
    ensure!(value.trim() == "1", "{SYSCTL} is {value} in the pod");
    let programs = pod.tcx_programs("net1")?;
    ensure!(programs.len() == 2, "TCX programs on net1: {programs:?}");

    let address: IpAddr = "10.78.0.1".parse()?;
    let before = counters(node, &pod, url)?;
    tcp_transfer(&pod, &node.peer, address, 8 << 20)?;
    let after = counters(node, &pod, url)?;
    let delta = |a: [f64; 4], b: [f64; 4]| -> [f64; 4] { std::array::from_fn(|k| a[k] - b[k]) };
    let (ours, kernel) = (delta(after.0, before.0), delta(after.1, before.1));
    ensure!(
        ours[1] >= f64::from(8_u32 << 20),
        "knd counted {} bytes sent",
        ours[1]
    );
    ensure!(
        ours.iter().zip(&kernel).all(|(a, b)| (a - b).abs() < 0.5),
        "knd counted (rx bytes, tx bytes, rx packets, tx packets) {ours:?}, the kernel {kernel:?}"
    );
    Ok(())
}

/// knd's and the kernel's rx/tx bytes/packets of the pod's net1, read while the kernel's do
/// not move.
fn counters(node: &Node, pod: &TestHost, url: &str) -> anyhow::Result<([f64; 4], [f64; 4])> {
    let labels = Some(("pod", "worker"));
    for _ in 0..50 {
        let before = pod.link_stats("net1")?;
        let samples = scrape(&node.host, url)?;
        let after = pod.link_stats("net1")?;
        if before == after {
            let mut ours = [0.0; 4];
            for (slot, name) in ours.iter_mut().zip([
                "knd_claim_rx_bytes_total",
                "knd_claim_tx_bytes_total",
                "knd_claim_rx_packets_total",
                "knd_claim_tx_packets_total",
            ]) {
                *slot = pick(&samples, name, labels)?;
            }
            return Ok((ours, kernel(&after)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("the traffic on net1 never settled")
}

#[expect(clippy::cast_precision_loss, reason = "test counts far below 2^52")]
fn kernel(stats: &LinkStats) -> [f64; 4] {
    [
        stats.rx_bytes,
        stats.tx_bytes,
        stats.rx_packets,
        stats.tx_packets,
    ]
    .map(|v| v as f64)
}

/// knd's metrics, scraped from the node's loopback.
fn scrape(node: &TestHost, url: &str) -> anyhow::Result<Vec<top::Sample>> {
    let url = url.to_owned();
    Ok(node
        .netns()
        .block_on(|| async move { top::scrape(&url).await })??)
}

/// The value of `name` (with the label `labels`, if given) in `samples`.
fn pick(samples: &[top::Sample], name: &str, labels: Option<(&str, &str)>) -> anyhow::Result<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v))
        })
        .map(|s| s.value)
        .with_context(|| format!("knd exports no {name}"))
}

fn claim(device: &str) -> anyhow::Result<serde_json::Value> {
    let config: serde_json::Value = serde_json::from_str(&format!(
        r#"{{{CONFIG_HEAD},"interface":{{"name":"net1","mtu":9000,"addresses":["10.78.0.10/24"]}},"sysctls":{{"{SYSCTL}":"1"}}}}"#
    ))?;
    Ok(serde_json::json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": "worker-nic", "namespace": "ml", "uid": "claim-uid-w"},
        "spec": {"devices": {"requests": [{"name": "nic", "exactly": {"deviceClassName": "knd-nic"}}]}},
        "status": {
            "allocation": {"nodeSelector": allocated_on("node-1"), "devices": {
                "results": [{"request": "nic", "driver": "knd.dev", "pool": "node-1", "device": device}],
                "config": [{"source": "FromClaim", "requests": ["nic"], "opaque": {"driver": "knd.dev", "parameters": config}}]
            }},
            "reservedFor": [{"resource": "pods", "name": "worker", "uid": "pod-uid-w"}]
        }
    }))
}
