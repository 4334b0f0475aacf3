//! `knd run` killed with SIGKILL, again and again, while a kubelet stand-in creates and removes
//! 20 pods through a real containerd 1.7 (CRI + NRI); restarted at once each time, as its
//! DaemonSet would. Afterwards every running pod has its NIC configured inside its namespace
//! (and may create containers), every removed pod's NIC is back on the node exactly as it was,
//! and nothing is left behind: no stray interfaces, no records of pods that are gone.
//!
//! The node is a namespace holding veth "NICs" cabled to a switch namespace; the daemon runs
//! inside it (through nsenter), with a fixture host root listing those interfaces and the fake
//! API server on the node's loopback. One thing veths do differently from hardware is emulated:
//! when a pod's namespace dies with a physical NIC inside, the kernel hands the NIC back (named
//! `dev<ifindex>`) instead of destroying it, as it destroys veths. The test holds every pod
//! namespace and, when containerd lets go of one, hands its NICs back the same way.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use knd::{
    attach,
    dra::proto::dra_v1,
    model::records::HostSide,
    os::{netlink::Link, netns::Netns},
};
use knd_testkit::{
    TestHost,
    apiserver::FakeApi,
    claims::{self, CONFIG_HEAD},
    kubelet,
    runtime::{Containerd, CriClient, cri, pod_config},
    sysfs::{NetSpec, SysfsTree},
    veth_pair,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

const PODS: usize = 20;
/// When the daemon dies, one kill after the other.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// This long after the previous restart (it may be mid-hook or between hooks).
    After(u64),
    /// While a pod's NIC is being attached: recorded, not yet configured in the pod.
    MidAttach,
    /// While a pod's NIC is being given back: back on the node, its record not yet updated.
    MidDetach,
}
const KILLS: [Moment; 6] = [
    Moment::After(150),
    Moment::MidAttach,
    Moment::MidDetach,
    Moment::After(400),
    Moment::MidAttach,
    Moment::MidDetach,
];

fn without_index(mut side: HostSide) -> HostSide {
    side.link.index = 0;
    side
}

/// The node's daemon: `knd run` inside the node's namespace.
struct Daemon {
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ignored = self.child.kill();
        let _ignored = self.child.wait();
    }
}

struct Node {
    host: TestHost,
    _switch: TestHost,
    dir: tempfile::TempDir,
    tree: SysfsTree,
    kubeconfig: PathBuf,
    nri_socket: PathBuf,
}

impl Node {
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn start(&self) -> Daemon {
        let path = |p: &str| self.dir.path().join(p);
        let netns = format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.host.netns().as_fd().as_raw_fd()
        );
        let child = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .arg(env!("CARGO_BIN_EXE_knd"))
            .arg("run")
            .args(["--node-name", "node-1", "--metrics-addr", "127.0.0.1:0"])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--plugin-dir")
            .arg(path("plugins"))
            .arg("--registry-dir")
            .arg(path("registry"))
            .arg("--state-dir")
            .arg(self.state())
            .arg("--run-dir")
            .arg(self.state())
            .arg("--nri-socket")
            .arg(&self.nri_socket)
            .arg("--host-root")
            .arg(self.tree.root())
            .env_remove("KUBECONFIG")
            .env("RUST_LOG", "knd=info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("knd starts");
        Daemon { child }
    }

    async fn interface(&self, name: &str) -> Option<HostSide> {
        attach::record(self.host.netns(), name)
            .await
            .ok()
            .map(without_index)
    }
}

/// The claim of pod `i`: `nic{i}` as `net1` with its own MTU, address and route.
fn claim(i: usize) -> serde_json::Value {
    let config: serde_json::Value = serde_json::from_str(&format!(
        r#"{{{CONFIG_HEAD},"interface":{{"name":"net1","mtu":{mtu},"addresses":["10.{i}.0.2/24"]}},"routes":[{{"destination":"10.{i}.128.0/17","gateway":"10.{i}.0.1"}}]}}"#,
        mtu = 1400 + i
    ))
    .unwrap();
    serde_json::json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": format!("nic-{i}"), "namespace": "ml", "uid": format!("claim-{i}")},
        "spec": {"devices": {"requests": [{"name": "nic", "exactly": {"deviceClassName": "knd-nic"}}]}},
        "status": {
            "allocation": {"nodeSelector": claims::allocated_on("node-1"), "devices": {
                "results": [{"request": "nic", "driver": "knd.dev", "pool": "node-1", "device": format!("nic{i}")}],
                "config": [{"source": "FromClaim", "opaque": {"driver": "knd.dev", "parameters": config}}]
            }},
            "reservedFor": [{"resource": "pods", "name": format!("trainer-{i}"), "uid": format!("pod-uid-{i}")}]
        }
    })
}

/// The hardware's side of a pod namespace's death: the test holds every namespace containerd
/// mounts; when containerd removes one, any NIC still inside goes back to the node as
/// `dev<ifindex>` (what the kernel does with a physical NIC), then the namespace is let go.
struct Hardware {
    stop: Arc<AtomicBool>,
    handed_back: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hardware {
    fn start(netns_dir: PathBuf, node: Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let handed_back = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::spawn({
            let (stop, handed_back) = (stop.clone(), handed_back.clone());
            move || {
                let mut held = HashMap::<PathBuf, Netns>::new();
                while !stop.load(Ordering::Relaxed) {
                    for entry in std::fs::read_dir(&netns_dir).into_iter().flatten() {
                        let path = entry.unwrap().path();
                        if held.contains_key(&path) {
                            continue;
                        }
                        let mounted = Netns::is_namespace_file(&path);
                        if mounted && let Ok(netns) = Netns::open(&path) {
                            held.insert(path, netns);
                        }
                    }
                    let gone: Vec<PathBuf> = held.keys().filter(|p| !p.exists()).cloned().collect();
                    for path in gone {
                        let netns = held.remove(&path).unwrap();
                        handed_back.fetch_add(hand_back(&netns, &node), Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        Self {
            stop,
            handed_back,
            thread: Some(thread),
        }
    }

    fn handed_back(&self) -> usize {
        self.handed_back.load(Ordering::Relaxed)
    }
}

impl Drop for Hardware {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ignored = thread.join();
        }
    }
}

/// Moves every NIC (a veth other than CNI's `eth0`) out of `pod` into `node` as
/// `dev<ifindex>`; returns how many.
fn hand_back(pod: &Netns, node: &Netns) -> usize {
    pod.block_on(|| async {
        let link = Link::connect()?;
        let mut moved = 0;
        for (name, kind) in link.kinds().await? {
            if kind != "veth" || name == "eth0" {
                continue;
            }
            let index = link.index(&name).await?;
            link.move_renamed(&name, node, &format!("dev{index}"))
                .await?;
            moved += 1;
        }
        Ok::<_, knd::os::netlink::Error>(moved)
    })
    .expect("a thread in the pod namespace")
    .expect("NICs handed back")
}

/// Runs a CRI call until it succeeds, as kubelet retries a failed sandbox operation; records
/// each failure.
macro_rules! with_retries {
    ($what:expr, $failures:expr, $call:expr) => {{
        let mut attempts = 0;
        loop {
            match $call {
                Ok(value) => break value,
                Err(status) => {
                    $failures
                        .lock()
                        .unwrap()
                        .push(format!("{}: {}", $what, status.message()));
                    attempts += 1;
                    assert!(attempts < 50, "{} kept failing: {:?}", $what, $failures);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }};
}

/// Kubelet's stream: creates pods 0..20 one after the other; after each odd pod, stops and
/// removes the even pod before it. Returns the sandbox ids of the pods left running.
async fn kubelet_stream(
    mut client: CriClient,
    failures: Arc<Mutex<Vec<String>>>,
    stopping: Arc<Mutex<Option<usize>>>,
) -> BTreeMap<usize, String> {
    let mut running = BTreeMap::new();
    for i in 0..PODS {
        let config = pod_config("ml", &format!("trainer-{i}"), &format!("pod-uid-{i}"));
        let id = with_retries!(
            format!("create pod {i}"),
            failures,
            client
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: String::new(),
                })
                .await
                .map(|r| r.into_inner().pod_sandbox_id)
        );
        running.insert(i, id);
        if i % 2 == 1 {
            let id = running.remove(&(i - 1)).unwrap();
            *stopping.lock().unwrap() = Some(i - 1);
            let request = || cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            };
            with_retries!(
                format!("stop pod {}", i - 1),
                failures,
                client.stop_pod_sandbox(request()).await
            );
            with_retries!(
                format!("remove pod {}", i - 1),
                failures,
                client
                    .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                    .await
            );
            *stopping.lock().unwrap() = None;
        }
    }
    running
}

/// Waits for `moment`; false if the stream ended first.
async fn reached(
    moment: Moment,
    node: &Node,
    stream: &tokio::task::JoinHandle<BTreeMap<usize, String>>,
    stopping: &Mutex<Option<usize>>,
) -> bool {
    let store = knd::os::state::StateStore::open(node.state()).unwrap();
    let since = Instant::now();
    let since_wall = std::time::SystemTime::now();
    loop {
        if stream.is_finished() {
            return false;
        }
        let records = || {
            store
                .pods
                .all_readable()
                .map(|(r, _)| r)
                .unwrap_or_default()
        };
        let now = match moment {
            Moment::After(ms) => since.elapsed() >= Duration::from_millis(ms),
            // A record this daemon wrote (not one an earlier kill left behind).
            Moment::MidAttach => records().iter().any(|(uid, r)| {
                let fresh = std::fs::metadata(node.state().join(format!("pods/{uid}.json")))
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t >= since_wall);
                fresh
                    && r.failure.is_none()
                    && !r.detached
                    && r.attachments.iter().any(|a| a.pod.is_none())
            }),
            Moment::MidDetach => {
                let pod = *stopping.lock().unwrap();
                match pod {
                    Some(i) => {
                        let uid = format!("pod-uid-{i}");
                        records().iter().any(|(u, r)| *u == uid && !r.detached)
                            && node.interface(&format!("nic{i}")).await.is_some()
                    }
                    None => false,
                }
            }
        };
        if now {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn node_with_nics(
    containerd: &Containerd,
    fake_listener: &mut Option<std::net::TcpListener>,
) -> Node {
    let (host, switch, listener) = tokio::task::spawn_blocking(|| {
        let host = TestHost::new("node").unwrap();
        let switch = TestHost::new("switch").unwrap();
        for i in 0..PODS {
            veth_pair(&host, &format!("nic{i}"), &switch, &format!("port{i}")).unwrap();
            host.configure(
                &format!("nic{i}"),
                format!("192.168.{i}.2").parse().unwrap(),
                24,
            )
            .unwrap();
        }
        let listener = host
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        (host, switch, listener)
    })
    .await
    .unwrap();
    *fake_listener = Some(listener);
    // The host root lists the node's NICs, as sysfs does for virtual interfaces.
    let tree = SysfsTree::new();
    for i in 0..PODS {
        let index = u32::try_from(100 + i).unwrap();
        tree.netdev(None, &format!("nic{i}"), &NetSpec::ethernet(index, 10_000));
    }
    Node {
        host,
        _switch: switch,
        dir: tempfile::tempdir().unwrap(),
        tree,
        kubeconfig: PathBuf::new(),
        nri_socket: containerd.nri_socket(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: runs a real containerd and creates network namespaces"]
async fn sigkill_while_pods_start_and_stop_loses_no_nic() {
    let containerd = tokio::task::spawn_blocking(Containerd::start)
        .await
        .unwrap()
        .unwrap();
    let mut listener = None;
    let mut node = node_with_nics(&containerd, &mut listener).await;
    let fake = FakeApi::start_on(listener.take().unwrap()).unwrap();
    fake.add_node("node-1");
    node.kubeconfig = fake.write_kubeconfig(node.dir.path()).unwrap();
    let mut before = Vec::new();
    for i in 0..PODS {
        before.push(node.interface(&format!("nic{i}")).await.unwrap());
        fake.put_claim(claim(i));
    }
    let hardware = Hardware::start(
        containerd.netns_dir(),
        node.host.netns().try_clone().unwrap(),
    );

    // Kubelet prepares every claim before the pods start.
    let mut daemon = node.start();
    let registration = node.dir.path().join("registry/knd.dev-reg.sock");
    kubelet::register(&registration, Duration::from_secs(20))
        .await
        .unwrap();
    let claims = (0..PODS)
        .map(|i| dra_v1::Claim {
            namespace: "ml".into(),
            uid: format!("claim-{i}"),
            name: format!("nic-{i}"),
        })
        .collect();
    kubelet::prepare(&node.dir.path().join("plugins/dra.sock"), claims)
        .await
        .unwrap();
    let wait_nri = Instant::now() + Duration::from_secs(20);
    while !containerd.log().contains("10-knd") {
        assert!(
            Instant::now() < wait_nri,
            "knd never connected to containerd"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The stream, and SIGKILL + restart at fixed moments during it.
    let failures = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let stopping = Arc::new(Mutex::new(None));
    let stream = tokio::spawn(kubelet_stream(
        containerd.cri().await.unwrap(),
        Arc::clone(&failures),
        Arc::clone(&stopping),
    ));
    let mut kills = Vec::new();
    let mut missed = Vec::new();
    for moment in KILLS {
        if !reached(moment, &node, &stream, &stopping).await {
            missed.push(moment);
            continue;
        }
        let pid = Pid::from_raw(i32::try_from(daemon.child.id()).unwrap());
        kill(pid, Signal::SIGKILL).unwrap();
        assert_eq!(
            daemon.child.wait().unwrap().code(),
            None,
            "killed by a signal"
        );
        kills.push(format!("{moment:?} at {:?}", started.elapsed()));
        daemon = node.start();
    }
    let running = stream.await.unwrap();
    let stream_time = started.elapsed();
    // Every planned kill happened at its moment, mid-attach and mid-detach included.
    assert!(
        missed.is_empty(),
        "the stream ended before these kills: {missed:?}; done: {kills:?}"
    );

    check_running_pods(&containerd, &node, &running).await;
    check_removed_pods(&node, &before, &running).await;

    // containerd saw hooks cut off by the kills (event 1: RunPodSandbox, 2: StopPodSandbox).
    let log = containerd.log();
    let cut = |event: u8| {
        log.matches(&format!("failed to handle event {event}: ttrpc: closed"))
            .count()
    };
    assert!(
        cut(1) + cut(2) > 0,
        "no kill landed inside a hook: {kills:?}"
    );
    eprintln!(
        "stream of {PODS} creations and {} removals: {stream_time:?}; kills: {kills:#?}; \
         hooks cut off: {} RunPodSandbox, {} StopPodSandbox; NICs the kernel would have \
         handed back: {}; failed CRI calls kubelet retried: {:#?}",
        PODS - running.len(),
        cut(1),
        cut(2),
        hardware.handed_back(),
        failures.lock().unwrap()
    );
    drop(daemon);
    drop(hardware);
}

/// Every running pod has its NIC inside, configured, and may create containers.
async fn check_running_pods(
    containerd: &Containerd,
    node: &Node,
    running: &BTreeMap<usize, String>,
) {
    let mut client = containerd.cri().await.unwrap();
    let store = knd::os::state::StateStore::open(node.state()).unwrap();
    let settle = Instant::now() + Duration::from_secs(20);
    for (&i, sandbox) in running {
        let uid = format!("pod-uid-{i}");
        let inside = loop {
            let attached = store.pods.get(&uid).ok().flatten().filter(|r| {
                r.failure.is_none() && !r.detached && r.attachments.iter().all(|a| a.pod.is_some())
            });
            if let Some(record) = attached {
                break record;
            }
            assert!(
                Instant::now() < settle,
                "pod {i} never got its NIC: {:?}",
                store.pods.get(&uid)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            inside.netns.starts_with(containerd.netns_dir()) && inside.netns.exists(),
            "pod {i}: a live containerd namespace: {}",
            inside.netns.display()
        );
        let pod_ns = Netns::open(&inside.netns).unwrap();
        let net1 = attach::record(&pod_ns, "net1").await.unwrap();
        assert_eq!(net1.link.mtu, 1400 + u32::try_from(i).unwrap(), "pod {i}");
        assert_eq!(net1.nets(), [format!("10.{i}.0.2/24").parse().unwrap()]);
        assert_eq!(net1.routes.len(), 1, "pod {i}: {:?}", net1.routes);
        assert!(
            node.interface(&format!("nic{i}")).await.is_none(),
            "nic{i} is in the pod"
        );
        client
            .create_container(container(i, sandbox))
            .await
            .unwrap_or_else(|e| panic!("pod {i} may run containers: {e}"));
    }
}

/// Every removed pod's NIC is back exactly as it was; nothing else is left: no NIC under a
/// kernel-given name, no record of a pod that is gone.
async fn check_removed_pods(node: &Node, before: &[HostSide], running: &BTreeMap<usize, String>) {
    let settle = Instant::now() + Duration::from_secs(20);
    for i in (0..PODS).filter(|i| !running.contains_key(i)) {
        loop {
            let now = node.interface(&format!("nic{i}")).await;
            if now.as_ref() == Some(&before[i]) {
                break;
            }
            assert!(
                Instant::now() < settle,
                "nic{i} never came back as it was: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let names = node
        .host
        .netlink(|link| async move { link.kinds().await })
        .unwrap();
    assert_eq!(
        names.keys().filter(|n| n.starts_with("nic")).count(),
        PODS - running.len(),
        "{names:?}"
    );
    assert!(!names.keys().any(|n| n.starts_with("dev")), "{names:?}");
    let store = knd::os::state::StateStore::open(node.state()).unwrap();
    let mut recorded: Vec<String> = store
        .pods
        .all()
        .unwrap()
        .into_iter()
        .map(|(uid, _)| uid)
        .collect();
    let mut wanted: Vec<String> = running.keys().map(|i| format!("pod-uid-{i}")).collect();
    wanted.sort();
    recorded.sort();
    assert_eq!(recorded, wanted, "the records of running pods only");
}

fn container(i: usize, sandbox: &str) -> cri::CreateContainerRequest {
    cri::CreateContainerRequest {
        pod_sandbox_id: sandbox.to_owned(),
        config: Some(cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "main".into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: "knd.test/pause:1".into(),
            }),
            ..cri::ContainerConfig::default()
        }),
        sandbox_config: Some(pod_config(
            "ml",
            &format!("trainer-{i}"),
            &format!("pod-uid-{i}"),
        )),
    }
}
