//! The shipped artifact's cost: pod attach latency (RunPodSandbox through CRI on a real
//! containerd 1.7, one NIC claimed, prepared by kubelet's DRA call first) with the daemon run
//! as a process on the node and with the daemon run from its image as the DaemonSet's pod
//! (host network, the manifest's capabilities, read-only root, default seccomp, its mounts),
//! paired in the same run. Rounds alternate which daemon goes first; within a round each pod of
//! one daemon is paired with the pod of the same index of the other. The noise floor beside it
//! (A/A): consecutive pods of the same daemon paired the same way. Needs root, the release
//! binary and the image (`cargo xtask bench container` builds both).
//!
//! Goal: the paired median ratio container/host at most 1.02 (it should be 1: the same binary
//! and the same kernel calls; only the process's confinement — seccomp, capabilities, mounts —
//! differs). Judged here, written beside the table and into `container-ratio.json`.

use std::{
    os::{fd::AsFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use knd::{discover::inventory, dra::proto::dra_v1};
use knd_bench::{report, summarize};
use knd_testkit::{
    TestHost,
    apiserver::FakeApi,
    claims::{CONFIG_HEAD, allocated_on},
    daemonset, device_named, is_root, kubelet, machines,
    runtime::{self, Containerd, CriClient, cri, pod_config},
    veth_pair,
};

const ROUNDS: usize = 10;
const PER_ROUND: usize = 10;
/// The container may make a pod's start at most this much slower (paired median ratio).
const RATIO_GOAL: f64 = 1.02;
const NICS: [&str; 4] = ["nic0", "nic1", "nic2", "nic3"];

/// The two daemons compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Host,
    Container,
}

enum Daemon {
    Process(Child),
    Container(daemonset::Running),
}

struct Bench {
    node: TestHost,
    _switch: TestHost,
    tree: knd_testkit::sysfs::SysfsTree,
    dir: tempfile::TempDir,
    fake: FakeApi,
    containerd: Containerd,
    cri: CriClient,
    binary: PathBuf,
    pod: daemonset::Pod,
    device: String,
    kubeconfig: PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    ensure!(
        is_root(),
        "the container benchmark runs a real containerd: run it as root"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let image = std::env::var_os("KND_IMAGE")
        .map_or_else(|| root.join("target/oci/knd.tar"), PathBuf::from);
    let binary =
        std::env::var_os("KND_BIN").map_or_else(|| root.join("target/release/knd"), PathBuf::from);
    ensure!(
        image.exists() && binary.exists(),
        "{} or {} is missing: run `cargo xtask bench container`",
        image.display(),
        binary.display()
    );
    let mut bench = Bench::start(&image, binary).await?;
    let outcome = bench.run().await;
    bench.containerd.clean_up();
    let (host, container) = outcome?;
    summarize_all(&host, &container)
}

impl Bench {
    async fn start(image: &Path, binary: PathBuf) -> anyhow::Result<Self> {
        let (node, switch, api) = tokio::task::spawn_blocking(|| -> anyhow::Result<_> {
            let node = TestHost::new("node")?;
            let switch = TestHost::new("switch")?;
            for (i, nic) in NICS.iter().enumerate() {
                veth_pair(&node, nic, &switch, &format!("port{i}"))?;
            }
            let api = node.run(|| std::net::TcpListener::bind("127.0.0.1:0"))??;
            Ok((node, switch, api))
        })
        .await??;
        let fake = FakeApi::start_tls_on(api)?;
        fake.add_node("node-1");
        let netns = node.netns().as_fd().try_clone_to_owned()?;
        let containerd = tokio::task::spawn_blocking(move || {
            Containerd::start_with(runtime::Options {
                netns: Some(netns),
                node_netns_dir: true,
            })
        })
        .await??;
        containerd.import_image(image)?;
        let cri = containerd.cri().await?;
        let tree = machines::two_gpu_rails(NICS);
        let dir = tempfile::Builder::new()
            .prefix("knd-bench-container-")
            .tempdir()?;
        let nri_dir = containerd
            .nri_socket()
            .parent()
            .context("NRI directory")?
            .to_path_buf();
        let standing_in =
            daemonset::Node::standing_in("node-1", dir.path(), tree.root(), &nri_dir)?
                .with_service_account(&fake, &dir.path().join("serviceaccount"))?;
        let pod = daemonset::pod(&daemonset::load(&daemonset::manifest_path())?, &standing_in)?;
        let device = device_named(&inventory::discover(&tree.host()), "nic0")
            .context("nic0 is not in the fixture")?;
        let kubeconfig = fake.write_kubeconfig(dir.path())?;
        Ok(Self {
            node,
            _switch: switch,
            tree,
            dir,
            fake,
            containerd,
            cri,
            binary,
            pod,
            device,
            kubeconfig,
        })
    }

    /// The rounds; returns the samples of each daemon, in pairing order.
    async fn run(&mut self) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
        let (mut host, mut container) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let order = if round % 2 == 0 {
                [Mode::Host, Mode::Container]
            } else {
                [Mode::Container, Mode::Host]
            };
            for mode in order {
                let mut daemon = self.start_daemon(mode).await?;
                let samples = self.pods(round, mode).await;
                self.stop_daemon(&mut daemon).await?;
                let samples = samples?;
                match mode {
                    Mode::Host => host.extend(samples),
                    Mode::Container => container.extend(samples),
                }
            }
        }
        Ok((host, container))
    }

    async fn start_daemon(&mut self, mode: Mode) -> anyhow::Result<Daemon> {
        let synchronized = || {
            self.containerd
                .log()
                .matches("Synchronizing NRI (plugin)")
                .count()
        };
        let before = synchronized();
        let dir = self.dir.path();
        let registration = dir.join("registry/knd.dev-reg.sock");
        let _gone = std::fs::remove_file(&registration);
        let daemon = match mode {
            Mode::Host => Daemon::Process(self.spawn_process()?),
            Mode::Container => Daemon::Container(daemonset::run(&mut self.cri, &self.pod).await?),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !registration.exists() || synchronized() == before {
            ensure!(
                Instant::now() < deadline,
                "knd ({mode:?}) did not register and connect to NRI in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kubelet::register(&registration, Duration::from_secs(20)).await?;
        // Synchronize is logged before it is answered; give the reply a moment to land.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(daemon)
    }

    /// `knd run` as a process in the node, on the same directories the container mounts.
    fn spawn_process(&self) -> anyhow::Result<Child> {
        let dir = self.dir.path();
        let netns = self.node.netns().as_fd().try_clone_to_owned()?;
        let mut command = Command::new(&self.binary);
        command
            .arg("run")
            .args(["--node-name", "node-1", "--metrics-addr", "127.0.0.1:9177"])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--plugin-dir")
            .arg(dir.join("plugins"))
            .arg("--registry-dir")
            .arg(dir.join("registry"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--nri-socket")
            .arg(self.containerd.nri_socket())
            .arg("--host-root")
            .arg(self.tree.root())
            .env_remove("KUBECONFIG")
            .env("RUST_LOG", "knd=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("knd-process.log"))?);
        // SAFETY: setns(2) is async-signal-safe; `netns` lives until after the spawn.
        unsafe {
            use std::os::fd::AsRawFd as _;
            let fd = netns.as_raw_fd();
            command.pre_exec(move || {
                let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().context("starting knd run")?;
        drop(netns);
        Ok(child)
    }

    async fn stop_daemon(&mut self, daemon: &mut Daemon) -> anyhow::Result<()> {
        match daemon {
            Daemon::Process(child) => {
                let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
                let deadline = Instant::now() + Duration::from_secs(20);
                while child.try_wait()?.is_none() {
                    if Instant::now() > deadline {
                        child.kill()?;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(())
            }
            Daemon::Container(running) => {
                running.stop(&mut self.cri, Duration::from_secs(20)).await
            }
        }
    }

    /// `PER_ROUND` pods, each with nic0 claimed: prepare, time RunPodSandbox, check the NIC
    /// moved, remove the pod, unprepare.
    async fn pods(&mut self, round: usize, mode: Mode) -> anyhow::Result<Vec<Duration>> {
        let socket = self.dir.path().join("plugins/dra.sock");
        let mut samples = Vec::new();
        for i in 0..PER_ROUND {
            let tag = format!("{round}-{i}-{mode:?}").to_lowercase();
            let claim = dra_v1::Claim {
                namespace: "bench".into(),
                uid: format!("claim-{tag}"),
                name: format!("nic-{tag}"),
            };
            self.fake.put_claim(claim_json(&claim, &tag, &self.device)?);
            kubelet::prepare(&socket, vec![claim.clone()]).await?;
            let started = Instant::now();
            let id = self
                .cri
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(pod_config(
                        "bench",
                        &format!("pod-{tag}"),
                        &format!("pod-{tag}"),
                    )),
                    runtime_handler: String::new(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("RunPodSandbox ({mode:?}): {}", s.message()))?
                .into_inner()
                .pod_sandbox_id;
            samples.push(started.elapsed());
            ensure!(
                self.node.link_stats("nic0").is_err(),
                "pod {tag} started with nic0 still on the node"
            );
            self.cri
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await?;
            self.cri
                .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
                .await?;
            ensure!(
                self.node.link_stats("nic0").is_ok(),
                "nic0 did not come back after pod {tag}"
            );
            kubelet::unprepare(&socket, vec![claim]).await?;
        }
        Ok(samples)
    }
}

fn claim_json(claim: &dra_v1::Claim, tag: &str, device: &str) -> anyhow::Result<serde_json::Value> {
    let config: serde_json::Value = serde_json::from_str(&format!(
        r#"{{{CONFIG_HEAD},"interface":{{"name":"net1","mtu":1450,"addresses":["10.7.0.2/24"]}}}}"#
    ))?;
    Ok(serde_json::json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": claim.name, "namespace": claim.namespace, "uid": claim.uid},
        "spec": {"devices": {"requests": [{"name": "nic", "exactly": {"deviceClassName": "knd-nic"}}]}},
        "status": {
            "allocation": {"nodeSelector": allocated_on("node-1"), "devices": {
                "results": [{"request": "nic", "driver": "knd.dev", "pool": "node-1", "device": device}],
                "config": [{"source": "FromClaim", "requests": ["nic"], "opaque": {"driver": "knd.dev", "parameters": config}}]
            }},
            "reservedFor": [{"resource": "pods", "name": format!("pod-{tag}"), "uid": format!("pod-{tag}")}]
        }
    }))
}

fn summarize_all(host: &[Duration], container: &[Duration]) -> anyhow::Result<()> {
    let on_host = summarize(
        "RunPodSandbox, 1 NIC, knd as a process on the node",
        host,
        None,
    )?;
    let in_container = summarize(
        "RunPodSandbox, 1 NIC, knd from its image under the DaemonSet's security context",
        container,
        None,
    )?;
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    };
    // Each container pod over the host pod of the same index in the same round.
    let paired = median(
        container
            .iter()
            .zip(host)
            .map(|(c, h)| ratio(*c, *h))
            .collect(),
    );
    // A/A: the second of two consecutive pods of the same daemon over the first.
    let noise = median(
        host.chunks(2)
            .chain(container.chunks(2))
            .filter(|pair| pair.len() == 2)
            .map(|pair| ratio(pair[1], pair[0]))
            .collect(),
    );
    let met = paired <= RATIO_GOAL;
    let verdict = format!(
        "container/host RunPodSandbox time, paired median ratio {paired:.3} (goal ≤ {RATIO_GOAL}: \
         {}); A/A (consecutive pods of one daemon) {noise:.3}; {} pairs; host p50 {:.1?}, \
         container p50 {:.1?}",
        if met { "MET" } else { "MISSED" },
        container.len().min(host.len()),
        Duration::from_micros(on_host.p50_us),
        Duration::from_micros(in_container.p50_us),
    );
    println!("{verdict}");
    let markdown = report(
        "container",
        "Attach latency: knd from its image under the DaemonSet's security context vs knd on the host",
        &[on_host, in_container],
    )?;
    let mut text = std::fs::read_to_string(&markdown)?;
    text.push('\n');
    text.push_str(&verdict);
    text.push('\n');
    std::fs::write(&markdown, text)?;
    let json = markdown.with_file_name("container-ratio.json");
    std::fs::write(
        &json,
        serde_json::to_vec_pretty(&serde_json::json!({
            "paired_median_ratio": paired,
            "aa_median_ratio": noise,
            "pairs": container.len().min(host.len()),
            "goal_ratio_at_most": RATIO_GOAL,
            "met": met,
        }))?,
    )?;
    Ok(())
}
