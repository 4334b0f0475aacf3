//! `cargo xtask demo`: knd end to end on this machine, no cluster needed.
//!
//! A node (a network namespace) with four stand-in NICs (veths cabled to a switch) and a
//! simulated GPU topology (a fixture host root: two GPUs, each with a NIC on its PCIe switch);
//! the real containerd (CRI + NRI, from the testbed) and the real daemon (`knd run`) inside the
//! node, publishing to an in-process API server and registered with a kubelet stand-in. For two
//! "trainer" pods, a scheduler stand-in picks the NIC aligned with the pod's GPU by evaluating
//! the claim's CEL selector (`pcieRoot` equal to the GPU's) against what knd published; the
//! kubelet stand-in prepares the claims and creates the pods through CRI; knd moves each NIC
//! into its pod and configures it. Then real TCP between the pods over those NICs, shown live
//! from knd's metrics as `knd top` shows them, checked against the kernel's own counters, and
//! everything is taken down again — also on Ctrl-C.
//!
//! With `KND_IMAGE` (`cargo xtask demo --image`) the daemon is the shipped artifact: the OCI
//! image imported into containerd and started through CRI as a host-network pod of the node,
//! with exactly the DaemonSet's image, arguments, environment, security context and volume
//! mounts (read from `deploy/kubernetes/daemonset.yaml`), the demo's directories standing in
//! for the host paths, and an in-cluster service account against an HTTPS API server.

use std::{
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use knd::{
    cli::{
        placement::{Catalog, Claim, Documents},
        templates, top, topo,
    },
    discover::inventory,
    dra::proto::dra_v1,
    os::{netns::Netns, state::StateStore},
};
use knd_testkit::{
    TestHost,
    apiserver::FakeApi,
    bridge,
    claims::{self, CONFIG_HEAD},
    daemonset, kubelet, machines,
    placement::{self, GPU_DRIVER},
    runtime::{self, Containerd, CriClient, cri, pod_config},
    tcp_transfer, veth_pair,
};
use tokio_util::sync::CancellationToken;

const NICS: [&str; 4] = ["nic0", "nic1", "nic2", "nic3"];
/// The pods: name and its address on the claimed NIC.
const PODS: [(&str, &str); 2] = [("trainer-0", "10.77.0.10"), ("trainer-1", "10.77.0.11")];
/// The claim template every pod names, from `knd templates` for this node.
const TEMPLATE: &str = "gpu-nic-aligned";
const TRAFFIC_SECONDS: u32 = 6;
/// The daemon's health checks in the demo: every second, healthy again after 5 quiet seconds.
const HEALTH_INTERVAL: u64 = 1;
const HEALTH_WINDOW: u64 = 5;
/// The per-interface sysctl every claim sets (set to 1).
const SYSCTL: &str = "net.ipv4.conf.net1.arp_ignore";

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let interrupted = CancellationToken::new();
        tokio::spawn({
            let interrupted = interrupted.clone();
            async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("\ninterrupted: taking everything down");
                    interrupted.cancel();
                }
            }
        });
        let started = Instant::now();
        let mut demo = Demo::start().await?;
        let outcome = tokio::select! {
            outcome = demo.run() => outcome,
            () = interrupted.cancelled() => Err(anyhow::anyhow!("interrupted")),
        };
        let teardown = demo.teardown().await;
        if let Err(error) = &teardown {
            eprintln!("teardown: {error:#}");
        }
        outcome?;
        teardown?;
        println!(
            "\ndone in {:.1?}: pods removed, NICs back on the node, daemon and containerd stopped",
            started.elapsed()
        );
        Ok(())
    })
}

/// `knd run` inside the node: a process, or the image's container in a host-network pod.
enum Daemon {
    Process { child: Child, log: PathBuf },
    Container(daemonset::Running),
}

impl Daemon {
    fn log(&self) -> &Path {
        match self {
            Self::Process { log, .. } => log,
            Self::Container(running) => &running.log,
        }
    }

    /// Stops the daemon: SIGTERM to the process, or the container stopped and removed
    /// through CRI (SIGTERM, as kubelet does at the end of the grace period SIGKILL).
    async fn stop(&mut self, cri: &mut CriClient) -> anyhow::Result<()> {
        match self {
            Self::Process { .. } => {
                self.stop_process();
                Ok(())
            }
            Self::Container(running) => running.stop(cri, Duration::from_secs(30)).await,
        }
    }

    fn stop_process(&mut self) {
        let Self::Process { child, .. } = self else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ignored = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ignored = child.kill();
        let _ignored = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A container is stopped through CRI in the teardown; containerd's clean-up takes
        // what is left.
        self.stop_process();
    }
}

struct Demo {
    node: Arc<TestHost>,
    switch: TestHost,
    /// The host root the daemon reads (kept until the end).
    tree: knd_testkit::sysfs::SysfsTree,
    dir: tempfile::TempDir,
    containerd: Containerd,
    fake: FakeApi,
    daemon: Daemon,
    metrics_url: String,
    cri: CriClient,
    /// Sandbox ids of the pods created so far.
    sandboxes: Vec<String>,
}

/// The simulated machine. The trainers' NICs are RoCE NICs: an RDMA device on the same PCI
/// function, its GID table showing the address the pod will have (the kernel adds those
/// entries when the address is configured; the stand-in tree shows them from the start).
fn roce_machine() -> anyhow::Result<knd_testkit::sysfs::SysfsTree> {
    let tree = machines::two_gpu_rails(NICS);
    for (i, (_, address)) in PODS.iter().enumerate() {
        let device = tree
            .root()
            .join(format!("sys/class/net/{}/device", NICS[i]))
            .canonicalize()?;
        let pci = format!("/{}", device.strip_prefix(tree.root())?.display());
        let name = format!("mlx5_{i}");
        tree.rdma(&pci, &name, Some(NICS[i]), u32::try_from(i)?);
        tree.roce_gids(&name, &[address.parse()?]);
    }
    tree.rdma_cm();
    Ok(tree)
}

impl Demo {
    async fn start() -> anyhow::Result<Self> {
        println!(
            "knd demo: a GPU node with stand-in NICs, real containerd + NRI, the real daemon\n"
        );
        let (node, switch, api_listener, metrics_port) = tokio::task::spawn_blocking(|| {
            let node = TestHost::new("node")?;
            let switch = TestHost::new("switch")?;
            let mut ports = Vec::new();
            for (i, nic) in NICS.iter().enumerate() {
                let port = format!("port{i}");
                veth_pair(&node, nic, &switch, &port)?;
                switch.disable_ipv6(&port)?;
                // Jumbo frames on the switch, as on a GPU cluster's fabric.
                let name = port.clone();
                switch.netlink(|link| async move { link.set_mtu(&name, 9000).await })?;
                ports.push(port);
            }
            let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
            bridge(&switch, "switch", &ports)?;
            // The API server and the metrics endpoint live on the node's loopback.
            let (api, metrics) = node.run(|| -> std::io::Result<_> {
                let api = std::net::TcpListener::bind("127.0.0.1:0")?;
                let metrics = std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port();
                Ok((api, metrics))
            })??;
            anyhow::Ok((node, switch, api, metrics))
        })
        .await??;
        let tree = roce_machine()?;
        println!(
            "node: NICs {} cabled to a switch; simulated GPU topology:",
            NICS.join(", ")
        );
        let scanned = inventory::discover(&tree.host());
        for line in topo::Report::new(&scanned).table().lines() {
            println!("  {line}");
        }

        let image = std::env::var_os("KND_IMAGE").map(PathBuf::from);
        let options = runtime::Options {
            // From the image, knd runs in a host-network pod: containerd runs in the node.
            netns: image
                .as_ref()
                .map(|_| node.netns().as_fd().try_clone_to_owned())
                .transpose()?,
            node_netns_dir: image.is_some(),
        };
        let containerd = tokio::task::spawn_blocking(move || Containerd::start_with(options))
            .await?
            .context("starting containerd (run `cargo xtask setup` as root first)")?;
        let fake = if image.is_some() {
            FakeApi::start_tls_on(api_listener)?
        } else {
            FakeApi::start_on(api_listener)?
        };
        fake.add_node("node-1");
        let dir = tempfile::Builder::new().prefix("knd-demo-").tempdir()?;
        let mut cri = containerd.cri().await?;
        let (daemon, metrics_port) = match &image {
            None => {
                let kubeconfig = fake.write_kubeconfig(dir.path())?;
                let daemon = start_daemon(
                    &node,
                    dir.path(),
                    &tree,
                    &kubeconfig,
                    &containerd,
                    metrics_port,
                )?;
                (daemon, metrics_port)
            }
            Some(archive) => {
                start_container(archive, dir.path(), &tree, &fake, &containerd, &mut cri).await?
            }
        };
        println!(
            "\ncontainerd 1.7 (CRI + NRI) and `knd run` are up; daemon log: {}",
            daemon.log().display()
        );
        Ok(Self {
            node: Arc::new(node),
            switch,
            tree,
            dir,
            containerd,
            fake,
            daemon,
            metrics_url: format!("http://127.0.0.1:{metrics_port}/metrics"),
            cri,
            sandboxes: Vec::new(),
        })
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        let info = kubelet::register(
            &self.dir.path().join("registry/knd.dev-reg.sock"),
            Duration::from_secs(20),
        )
        .await?;
        println!(
            "kubelet stand-in: registered {} ({})",
            info.name,
            info.supported_versions.join(", ")
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.fake.slices().is_empty() {
            ensure!(Instant::now() < deadline, "knd published nothing");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let devices: usize = self
            .fake
            .slices()
            .iter()
            .map(|s| s.spec.devices.as_ref().map_or(0, Vec::len))
            .sum();
        println!("knd published {devices} devices in ResourceSlices of pool node-1");

        self.publish_gpus()?;
        let claims = self.schedule()?;
        kubelet::prepare(&self.dir.path().join("plugins/dra.sock"), claims).await?;
        println!("kubelet stand-in: NodePrepareResources for both claims: ok");

        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.containerd.log().contains("10-knd") {
            ensure!(
                Instant::now() < deadline,
                "knd never connected to containerd over NRI"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (i, (pod, _)) in PODS.iter().enumerate() {
            let started = Instant::now();
            let id = self
                .cri
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(pod_config("ml", pod, &format!("pod-uid-{i}"))),
                    runtime_handler: String::new(),
                })
                .await
                .with_context(|| format!("creating pod {pod}"))?
                .into_inner()
                .pod_sandbox_id;
            self.sandboxes.push(id);
            println!(
                "CRI: pod ml/{pod} running in {:.0?} (knd's NRI hook attached its NIC)",
                started.elapsed()
            );
        }
        for (pod, _) in PODS {
            let status = self.wait_for_status(&format!("{pod}-nic")).await?;
            println!("claim ml/{pod}-nic status: {status}");
        }
        for event in self.fake.events() {
            println!(
                "event on {}: {} {}: {}",
                event
                    .regarding
                    .as_ref()
                    .and_then(|r| r.name.as_deref())
                    .unwrap_or_default(),
                event.type_.as_deref().unwrap_or_default(),
                event.reason.as_deref().unwrap_or_default(),
                event.note.as_deref().unwrap_or_default()
            );
        }

        let pods = self.pod_hosts()?;
        for (pod, (name, _)) in pods.iter().zip(PODS) {
            let path = format!("/proc/sys/{}", SYSCTL.replace('.', "/"));
            let value = pod.run(|| std::fs::read_to_string(&path))??;
            let mtu = pod
                .netlink(|link| async move { link.settings("net1").await })?
                .mtu;
            println!(
                "in {name}: net1 mtu {mtu}, {SYSCTL} = {} (read from the pod's /proc/sys)",
                value.trim()
            );
            ensure!(value.trim() == "1", "{SYSCTL} was not set in {name}");
        }
        self.nccl_in_containers().await?;
        let mut baseline = Vec::new();
        for (i, pod) in pods.iter().enumerate() {
            baseline.push(self.counters(i, pod).await?);
        }
        self.traffic(&pods).await?;
        self.check_counters(&pods, &baseline).await?;
        self.unhealthy_link_tainted().await
    }

    /// The scheduler's loop: trainer-0's switch port goes down, so its NIC in the pod loses
    /// carrier; knd taints the device in its ResourceSlice, keeps the taint through a burst of
    /// flaps without rewriting the slices, and removes it after a quiet health window.
    async fn unhealthy_link_tainted(&self) -> anyhow::Result<()> {
        let claim = self
            .fake
            .claim("ml", &format!("{}-nic", PODS[0].0))
            .context("trainer-0's claim")?;
        let device = claim
            .status
            .and_then(|s| s.allocation)
            .and_then(|a| a.devices)
            .into_iter()
            .flat_map(|d| d.results.into_iter().flatten())
            .find(|r| r.driver == "knd.dev")
            .context("trainer-0's knd.dev device")?
            .device;
        let port = |up: bool| {
            self.switch.netlink(|link| async move {
                if up {
                    link.set_up("port0").await
                } else {
                    link.set_down("port0").await
                }
            })
        };
        let taint = || {
            self.fake
                .slices()
                .iter()
                .flat_map(|s| s.spec.devices.iter().flatten())
                .find(|d| d.name == device)
                .and_then(|d| d.taints.clone())
                .and_then(|mut t| t.pop())
        };
        let writes = || {
            self.fake
                .requests()
                .iter()
                .filter(|r| r.method != "GET" && r.path.contains("/resourceslices"))
                .count()
        };
        let wait = async |what: &str, limit: Duration, done: &dyn Fn() -> bool| {
            let started = Instant::now();
            while !done() {
                ensure!(started.elapsed() < limit, "{what} not within {limit:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(started.elapsed())
        };
        println!(
            "\nhealth: switch port0 down (trainer-0's net1 loses carrier; --health-interval \
             {HEALTH_INTERVAL} s, --health-window {HEALTH_WINDOW} s, --publish-interval 5 s)"
        );
        port(false)?;
        let took = wait("the taint", Duration::from_secs(15), &|| taint().is_some()).await?;
        let added = taint().context("the taint")?;
        println!(
            "  ResourceSlice: {device} tainted {}={}:{} after {took:.1?}",
            added.key,
            added.value.as_deref().unwrap_or_default(),
            added.effect
        );
        ensure!(added.key == "knd.dev/unhealthy" && added.effect == "NoSchedule");
        let before = writes();
        let burst = Instant::now();
        let mut up = false;
        while burst.elapsed() < Duration::from_secs(6) {
            up = !up;
            port(up)?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            ensure!(
                taint().as_ref() == Some(&added),
                "the taint changed in the burst"
            );
        }
        let burst_writes = writes() - before;
        println!(
            "  6 s of flaps (port0 toggled every 300 ms): taint unchanged, {burst_writes} slice writes"
        );
        ensure!(
            burst_writes <= 2,
            "{burst_writes} slice writes in 6 s of flaps"
        );
        port(true)?;
        let quiet = wait(
            "the taint's removal",
            Duration::from_secs(HEALTH_WINDOW + 15),
            &|| taint().is_none(),
        )
        .await?;
        println!("  link up and quiet: taint removed after {quiet:.1?}");
        ensure!(
            quiet >= Duration::from_secs(HEALTH_WINDOW - 1),
            "removed before the window"
        );
        Ok(())
    }

    /// Starts a container in each trainer pod and shows, from the container's own environment
    /// (`/proc/PID/environ` of the process the runtime started) and its mount namespace, the
    /// NCCL variables and the topology file knd handed it at `CreateContainer`.
    async fn nccl_in_containers(&mut self) -> anyhow::Result<()> {
        for (i, ((pod, _), sandbox)) in PODS.iter().zip(self.sandboxes.clone()).enumerate() {
            let id = self
                .cri
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sandbox.clone(),
                    config: Some(cri::ContainerConfig {
                        metadata: Some(cri::ContainerMetadata {
                            name: "trainer".into(),
                            attempt: 0,
                        }),
                        image: Some(cri::ImageSpec {
                            image: "knd.test/pause:1".into(),
                        }),
                        ..cri::ContainerConfig::default()
                    }),
                    sandbox_config: Some(pod_config("ml", pod, &format!("pod-uid-{i}"))),
                })
                .await
                .with_context(|| format!("creating the container of {pod}"))?
                .into_inner()
                .container_id;
            self.cri
                .start_container(cri::StartContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .with_context(|| format!("starting the container of {pod}"))?;
            let status = self
                .cri
                .container_status(cri::ContainerStatusRequest {
                    container_id: id,
                    verbose: true,
                })
                .await?
                .into_inner();
            let info: serde_json::Value =
                serde_json::from_str(status.info.get("info").context("no verbose info")?)?;
            let pid = info["pid"]
                .as_u64()
                .context("no pid in the container's info")?;
            let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
            let nccl: Vec<String> = environ
                .split(|b| *b == 0)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .filter(|v| v.starts_with("NCCL_"))
                .collect();
            println!("in {pod}'s container (pid {pid}): {}", nccl.join(" "));
            ensure!(
                nccl.iter().any(|v| v == "NCCL_SOCKET_IFNAME==net1")
                    && nccl
                        .iter()
                        .any(|v| v == &format!("NCCL_IB_HCA==mlx5_{i}:1"))
                    && nccl.iter().any(|v| v == "NCCL_IB_GID_INDEX=3"),
                "{pod}'s container lacks knd's NCCL variables: {nccl:?}"
            );
            let file = nccl
                .iter()
                .find_map(|v| v.strip_prefix("NCCL_TOPO_FILE="))
                .context("no NCCL_TOPO_FILE")?;
            let topology = std::fs::read_to_string(format!("/proc/{pid}/root{file}"))
                .with_context(|| format!("reading {file} in {pod}'s container"))?;
            if i == 0 {
                println!("{file} in {pod}'s container (first lines):");
                for line in topology.lines().take(8) {
                    println!("  {line}");
                }
            }
            ensure!(
                topology.contains(&format!("<net name=\"mlx5_{i}\" port=\"1\"/>")),
                "{pod}'s topology file does not place its NIC:\n{topology}"
            );
        }
        Ok(())
    }

    /// The scheduler's part: every pod names the template `knd templates` wrote for this node
    /// (a GPU and a NIC on the same PCIe root); knd's allocator (the one behind `knd explain`)
    /// places them on the published slices as the scheduler would. Returns the claims for
    /// kubelet.
    fn schedule(&self) -> anyhow::Result<Vec<dra_v1::Claim>> {
        let documents = self.templates()?;
        let template = documents
            .claims
            .iter()
            .find(|(name, _)| name == TEMPLATE)
            .context("knd templates wrote no gpu-nic-aligned")?;
        let catalog = Catalog::new(&documents.slices, &documents.classes)?;
        let compiled = Claim::compile(TEMPLATE, &template.1)?;
        let evaluated = compiled.evaluate(&catalog);
        let mut in_use = std::collections::HashSet::new();
        let mut claims = Vec::new();
        for (i, (pod, address)) in PODS.iter().enumerate() {
            let allocation = evaluated.allocate(&in_use).map_err(|failures| {
                anyhow::anyhow!("no room for {pod}: {:?}", failures[0].reasons)
            })?;
            let device = |request: &str| {
                allocation
                    .device(request)
                    .cloned()
                    .context("an allocation result per request")
            };
            let (gpu, nic) = (device("gpu")?, device("nic")?);
            println!(
                "scheduler stand-in: {pod} names template {TEMPLATE} (matchAttribute \
                 resource.kubernetes.io/pcieRoot) and gets {GPU_DRIVER} {} and knd.dev {}",
                gpu.device, nic.device
            );
            self.fake.put_claim(claim(
                i,
                pod,
                &template.1,
                &gpu.device,
                &nic.device,
                address,
            )?);
            in_use.extend([gpu, nic]);
            claims.push(dra_v1::Claim {
                namespace: "ml".into(),
                uid: format!("claim-uid-{i}"),
                name: format!("{pod}-nic"),
            });
        }
        Ok(claims)
    }

    /// The GPU driver stand-in publishes the fixture's GPUs with their PCI addresses and roots.
    fn publish_gpus(&self) -> anyhow::Result<()> {
        use k8s_openapi::api::resource::v1::ResourceSlice;
        let slice = placement::gpu_slice(&inventory::discover(&self.tree.host()), "node-1");
        let count = slice.spec.devices.as_ref().map_or(0, Vec::len);
        // The API server listens on the node's loopback: talk to it from there.
        let fake = &self.fake;
        self.node.netns().block_on(|| async move {
            kube::Api::<ResourceSlice>::all(fake.client().await?)
                .create(&kube::api::PostParams::default(), &slice)
                .await?;
            anyhow::Ok(())
        })??;
        println!("GPU driver stand-in: published {count} GPUs ({GPU_DRIVER})");
        Ok(())
    }

    /// What the scheduler sees: the objects `knd templates` writes for this node (its
    /// DeviceClasses and claim templates), the GPU driver's class, and every published slice.
    fn templates(&self) -> anyhow::Result<Documents> {
        let generated = templates::generate(&inventory::discover(&self.tree.host()), GPU_DRIVER);
        let mut documents =
            Documents::parse(&templates::to_yaml(&generated, "node-1")?, "knd templates")?;
        println!(
            "knd templates: {}",
            documents
                .claims
                .iter()
                .map(|(name, _)| name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        documents.slices = self.fake.slices();
        documents.classes.push(placement::gpu_class());
        Ok(documents)
    }

    /// The claim's status once knd wrote it: interface, addresses, MAC, condition.
    async fn wait_for_status(&self, name: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let devices = self
                .fake
                .claim("ml", name)
                .and_then(|c| c.status)
                .and_then(|s| s.devices)
                .unwrap_or_default();
            if let Some(device) = devices.iter().find(|d| {
                d.network_data
                    .as_ref()
                    .is_some_and(|n| n.interface_name.is_some())
            }) {
                let data = device.network_data.clone().unwrap_or_default();
                let ready = device
                    .conditions
                    .iter()
                    .flatten()
                    .map(|c| match c.type_.as_str() {
                        "TopologyAligned" => format!("{}={} ({})", c.type_, c.status, c.reason),
                        _ => format!("{}={}", c.type_, c.status),
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                return Ok(format!(
                    "device {} → interface {} ips {} mac {} [{ready}]",
                    device.device,
                    data.interface_name.unwrap_or_default(),
                    data.ips.unwrap_or_default().join(","),
                    data.hardware_address.unwrap_or_default()
                ));
            }
            ensure!(
                Instant::now() < deadline,
                "claim {name} never got its network data"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The pods' network namespaces, from knd's records.
    fn pod_hosts(&self) -> anyhow::Result<Vec<Arc<TestHost>>> {
        let dir = self.dir.path();
        let store = StateStore::open_in(&dir.join("state"), &dir.join("run"))?;
        (0..PODS.len())
            .map(|i| {
                let record = store
                    .pods
                    .get(&format!("pod-uid-{i}"))?
                    .with_context(|| format!("no record of pod {i}"))?;
                Ok(Arc::new(TestHost::adopt(
                    PODS[i].0,
                    Netns::open(&record.netns)?,
                )))
            })
            .collect()
    }

    /// TCP both ways between the pods over their claimed NICs, with the live view.
    async fn traffic(&self, pods: &[Arc<TestHost>]) -> anyhow::Result<()> {
        println!(
            "\ntraffic: TCP trainer-0 ⇄ trainer-1 over net1 for {TRAFFIC_SECONDS} s; knd top:\n"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::new();
        for (from, to, address) in [(0, 1, PODS[1].1), (1, 0, PODS[0].1)] {
            let (stop, client, server) = (
                Arc::clone(&stop),
                Arc::clone(&pods[from]),
                Arc::clone(&pods[to]),
            );
            let address: IpAddr = address.parse()?;
            senders.push(std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut sent = 0_u64;
                while !stop.load(Ordering::Relaxed) {
                    sent += tcp_transfer(&client, &server, address, 64 << 20)? as u64;
                }
                Ok(sent)
            }));
        }
        let mut previous = self.scrape()?;
        let mut taken = Instant::now();
        for _ in 0..TRAFFIC_SECONDS {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = self.scrape()?;
            let rows = top::rows(&previous, &now, taken.elapsed());
            taken = Instant::now();
            print!("{}", top::render(&rows));
            println!();
            previous = now;
        }
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for sender in senders {
            total += sender
                .join()
                .map_err(|_| anyhow::anyhow!("a sender panicked"))??;
        }
        println!("sent {} MiB in total", total >> 20);
        Ok(())
    }

    fn scrape(&self) -> anyhow::Result<Vec<top::Sample>> {
        let url = self.metrics_url.clone();
        Ok(self
            .node
            .netns()
            .block_on(|| async move { top::scrape(&url).await })??)
    }

    /// For pod `i`: knd's exported rx/tx bytes/packets of its net1 and the kernel's statistics
    /// of net1, read while the latter do not move (a late ACK may still be on its way).
    async fn counters(&self, i: usize, pod: &TestHost) -> anyhow::Result<([f64; 4], [f64; 4])> {
        let name = PODS[i].0;
        for _ in 0..50 {
            let before = pod.link_stats("net1")?;
            let samples = self.scrape()?;
            let after = pod.link_stats("net1")?;
            if before != after {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let value = |metric: &str| {
                samples
                    .iter()
                    .find(|s| {
                        s.name == metric && s.labels.get("pod").map(String::as_str) == Some(name)
                    })
                    .map_or(f64::NAN, |s| s.value)
            };
            let ours = [
                "knd_claim_rx_bytes_total",
                "knd_claim_tx_bytes_total",
                "knd_claim_rx_packets_total",
                "knd_claim_tx_packets_total",
            ]
            .map(value);
            #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
            let kernel = [
                after.rx_bytes,
                after.tx_bytes,
                after.rx_packets,
                after.tx_packets,
            ]
            .map(|v| v as f64);
            return Ok((ours, kernel));
        }
        bail!("the traffic on {name}'s net1 never settled")
    }

    /// What knd counted during the traffic equals what the kernel counted on each pod's net1
    /// (knd counts from the moment its programs were attached, the kernel from the interface's
    /// creation: deltas from `baseline` are compared).
    async fn check_counters(
        &self,
        pods: &[Arc<TestHost>],
        baseline: &[([f64; 4], [f64; 4])],
    ) -> anyhow::Result<()> {
        for (i, pod) in pods.iter().enumerate() {
            let (ours, kernel) = self.counters(i, pod).await?;
            let delta = |now: [f64; 4], then: [f64; 4]| -> [f64; 4] {
                std::array::from_fn(|k| now[k] - then[k])
            };
            let (ours, kernel) = (delta(ours, baseline[i].0), delta(kernel, baseline[i].1));
            let equal = ours.iter().zip(&kernel).all(|(a, b)| (a - b).abs() < 0.5);
            println!(
                "check {}: knd counted rx {:.0} B / {:.0} pkts, tx {:.0} B / {:.0} pkts; the \
                 kernel's statistics of net1: rx {:.0} B / {:.0} pkts, tx {:.0} B / {:.0} pkts → {}",
                PODS[i].0,
                ours[0],
                ours[2],
                ours[1],
                ours[3],
                kernel[0],
                kernel[2],
                kernel[1],
                kernel[3],
                if equal { "equal" } else { "DIFFERENT" }
            );
            ensure!(
                equal,
                "knd's counters differ from the kernel's for {}",
                PODS[i].0
            );
        }
        Ok(())
    }

    /// Removes the pods (knd gives the NICs back), stops the daemon and containerd. Every step
    /// is tried; the first failure is reported.
    async fn teardown(&mut self) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        for id in std::mem::take(&mut self.sandboxes) {
            let stop = cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            };
            if let Err(status) = self.cri.stop_pod_sandbox(stop).await {
                failures.push(format!("stop pod {id}: {}", status.message()));
            }
            let remove = cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.clone(),
            };
            if let Err(status) = self.cri.remove_pod_sandbox(remove).await {
                failures.push(format!("remove pod {id}: {}", status.message()));
            }
        }
        let node = Arc::clone(&self.node);
        let missing = tokio::task::spawn_blocking(move || {
            NICS.iter()
                .filter(|nic| node.link_stats(nic).is_err())
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        })
        .await?;
        if !missing.is_empty() {
            failures.push(format!("not back on the node: {}", missing.join(", ")));
        }
        if let Err(error) = self.daemon.stop(&mut self.cri).await {
            failures.push(format!("stop knd: {error:#}"));
        }
        self.containerd.stop();
        match failures.first() {
            None => Ok(()),
            Some(_) => bail!("{}", failures.join("; ")),
        }
    }
}

fn start_daemon(
    node: &TestHost,
    dir: &Path,
    tree: &knd_testkit::sysfs::SysfsTree,
    kubeconfig: &Path,
    containerd: &Containerd,
    metrics_port: u16,
) -> anyhow::Result<Daemon> {
    use std::os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::process::CommandExt as _,
    };
    let binary = std::env::var_os("KND_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/knd"),
        PathBuf::from,
    );
    ensure!(
        binary.exists(),
        "{} is missing: run `cargo xtask demo`",
        binary.display()
    );
    let log = dir.join("knd.log");
    let netns = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        node.netns().as_fd().as_raw_fd()
    );
    // Its own process group: on Ctrl-C it must stay to give the NICs back.
    let child = Command::new("nsenter")
        .process_group(0)
        .arg(format!("--net={netns}"))
        .arg(&binary)
        .arg("run")
        .args(["--node-name", "node-1"])
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--plugin-dir")
        .arg(dir.join("plugins"))
        .arg("--registry-dir")
        .arg(dir.join("registry"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--nri-socket")
        .arg(containerd.nri_socket())
        .arg("--host-root")
        .arg(tree.root())
        .args(["--health-interval", &HEALTH_INTERVAL.to_string()])
        .args(["--health-window", &HEALTH_WINDOW.to_string()])
        .env_remove("KUBECONFIG")
        .env("RUST_LOG", "knd=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting knd run")?;
    Ok(Daemon::Process { child, log })
}

/// knd from its image: imported into containerd and run through CRI as kubelet runs the
/// DaemonSet's pod on this node. Returns the daemon and its metrics port (the manifest's).
async fn start_container(
    archive: &Path,
    dir: &Path,
    tree: &knd_testkit::sysfs::SysfsTree,
    fake: &FakeApi,
    containerd: &Containerd,
    cri: &mut CriClient,
) -> anyhow::Result<(Daemon, u16)> {
    containerd.import_image(archive)?;
    let manifest = daemonset::manifest_path();
    let nri_dir = containerd
        .nri_socket()
        .parent()
        .context("the NRI socket's directory")?
        .to_path_buf();
    let node = daemonset::Node::standing_in("node-1", dir, tree.root(), &nri_dir)?
        .with_service_account(fake, &dir.join("serviceaccount"))?;
    let mut pod = daemonset::pod(&daemonset::load(&manifest)?, &node)?;
    // The demo's short health window (the manifest keeps the defaults).
    for (key, value) in [
        ("KND_HEALTH_INTERVAL", HEALTH_INTERVAL),
        ("KND_HEALTH_WINDOW", HEALTH_WINDOW),
    ] {
        pod.container.envs.push(cri::KeyValue {
            key: key.to_owned(),
            value: value.to_string(),
        });
    }
    let port = daemonset::env_value(&pod.container, "KND_METRICS_ADDR")
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .context("the DaemonSet sets no KND_METRICS_ADDR")?
        .port();
    let started = Instant::now();
    let running = daemonset::run(cri, &pod).await?;
    let security = pod
        .container
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .context("no security context")?;
    println!(
        "kubelet stand-in: knd's DaemonSet pod from {} — image {}, args {:?}, capabilities {:?} \
         (dropped {:?}), read-only root filesystem {}, no_new_privs {}, seccomp RuntimeDefault, {} \
         mounts; container started in {:.0?}",
        manifest.display(),
        pod.container
            .image
            .as_ref()
            .map_or("", |i| i.image.as_str()),
        pod.container.args,
        security.capabilities.as_ref().map(|c| &c.add_capabilities),
        security.capabilities.as_ref().map(|c| &c.drop_capabilities),
        security.readonly_rootfs,
        security.no_new_privs,
        pod.container.mounts.len(),
        started.elapsed()
    );
    let registration = dir.join("registry/knd.dev-reg.sock");
    running
        .wait_until(cri, Duration::from_secs(30), || {
            let exists = registration.exists();
            async move { exists }
        })
        .await?;
    Ok((Daemon::Container(running), port))
}

/// Claim `i` of `pod`: GPU `gpu` and knd's `device` allocated, the NIC configured as `net1` with
/// `address`/24.
fn claim(
    i: usize,
    pod: &str,
    spec: &k8s_openapi::api::resource::v1::DeviceClaim,
    gpu: &str,
    device: &str,
    address: &str,
) -> anyhow::Result<serde_json::Value> {
    let config: serde_json::Value = serde_json::from_str(&format!(
        r#"{{{CONFIG_HEAD},"interface":{{"name":"net1","mtu":9000,"addresses":["{address}/24"]}},"sysctls":{{"{SYSCTL}":"1"}},"nccl":{{"env":true}}}}"#
    ))?;
    Ok(serde_json::json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": format!("{pod}-nic"), "namespace": "ml", "uid": format!("claim-uid-{i}")},
        "spec": {"devices": spec},
        "status": {
            "allocation": {"nodeSelector": claims::allocated_on("node-1"), "devices": {
                "results": [
                    {"request": "gpu", "driver": GPU_DRIVER, "pool": "node-1", "device": gpu},
                    {"request": "nic", "driver": "knd.dev", "pool": "node-1", "device": device}
                ],
                "config": [{"source": "FromClaim", "requests": ["nic"], "opaque": {"driver": "knd.dev", "parameters": config}}]
            }},
            "reservedFor": [{"resource": "pods", "name": pod, "uid": format!("pod-uid-{i}")}]
        }
    }))
}
