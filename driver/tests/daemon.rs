//! `knd run` as a process: flags, readiness, publishing to the fake API server through a
//! kubeconfig, kubelet's calls over the real sockets, SIGKILL in the middle of prepare followed
//! by a restart, and a bounded graceful shutdown on SIGTERM.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use knd::{
    dra::{prepare::plan, proto::dra_v1},
    model::ports::ClaimRef,
};
use knd_testkit::{
    apiserver::FakeApi,
    claims::{CONFIG_HEAD, allocated_claim, unix_channel},
    kubelet, machines,
    sysfs::SysfsTree,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

struct Node {
    nri_socket: Option<PathBuf>,
    dir: tempfile::TempDir,
    tree: SysfsTree,
    kubeconfig: PathBuf,
    metrics: SocketAddr,
}

impl Node {
    fn new(fake: &FakeApi) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = fake.write_kubeconfig(dir.path()).unwrap();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        Self {
            nri_socket: None,
            dir,
            tree: machines::sriov(),
            kubeconfig,
            metrics,
        }
    }

    fn registration_socket(&self) -> PathBuf {
        self.dir.path().join("registry/knd.dev-reg.sock")
    }

    fn dra_socket(&self) -> PathBuf {
        self.dir.path().join("plugins/dra.sock")
    }

    fn start(&self) -> Daemon {
        self.start_with(&[], Stdio::inherit())
    }

    /// The daemon with `extra` flags, its log to `stderr`.
    fn start_with(&self, extra: &[&str], stderr: Stdio) -> Daemon {
        let path = |p: &str| self.dir.path().join(p);
        Command::new(env!("CARGO_BIN_EXE_knd"))
            .arg("run")
            .args(["--node-name", "node-1"])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--plugin-dir")
            .arg(path("plugins"))
            .arg("--registry-dir")
            .arg(path("registry"))
            .arg("--state-dir")
            .arg(path("state"))
            .arg("--run-dir")
            .arg(path("state"))
            .arg("--nri-socket")
            .arg(self.nri_socket.clone().unwrap_or_else(|| path("nri.sock")))
            .arg("--host-root")
            .arg(self.tree.root())
            .args(["--metrics-addr", &self.metrics.to_string()])
            .args(["--health-interval", "1"])
            .args(extra)
            .env_remove("KUBECONFIG")
            .env("RUST_LOG", "knd=debug")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map(Daemon)
            .expect("knd starts")
    }

    /// `(status code, body)` of a GET on the daemon's HTTP server.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(self.metrics).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: knd\r\n\r\n").ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        let code = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        Some((code, body))
    }

    async fn wait_for(&self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kubelet's side of registration.
    async fn register(&self) {
        let info = kubelet::register(&self.registration_socket(), Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(Path::new(&info.endpoint), self.dra_socket());
    }
}

/// The daemon process; killed if a test fails while it runs.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ignored = self.0.kill();
        let _ignored = self.0.wait();
    }
}

/// Claim `c<index>`, allocated the sriov machine's first VF.
fn claim_json(index: usize) -> serde_json::Value {
    let mut claim = allocated_claim(
        &format!("c{index}"),
        &format!("uid-{index}"),
        &format!(r#"{{{CONFIG_HEAD},"interface":{{"name":"net{index}"}}}}"#),
    );
    claim["status"]["allocation"]["devices"]["results"][0]["device"] = "pci-0000-3b-01-0".into();
    claim
}

fn claims(range: std::ops::Range<usize>) -> Vec<dra_v1::Claim> {
    range
        .map(|i| dra_v1::Claim {
            namespace: "ml".into(),
            uid: format!("uid-{i}"),
            name: format!("c{i}"),
        })
        .collect()
}

async fn prepare(
    node: &Node,
    claims: Vec<dra_v1::Claim>,
) -> Result<dra_v1::NodePrepareResourcesResponse, String> {
    kubelet::prepare(&node.dra_socket(), claims)
        .await
        .map_err(|e| format!("{e:#}"))
}

fn stop(daemon: &mut Daemon, signal: Signal) -> std::process::ExitStatus {
    kill(Pid::from_raw(i32::try_from(daemon.0.id()).unwrap()), signal).unwrap();
    daemon.0.wait().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_publishes_serves_kubelet_survives_sigkill_and_stops_on_sigterm() {
    let fake = FakeApi::start().await.unwrap();
    fake.add_node("node-1");
    let node = Node::new(&fake);
    let daemon = node.start();

    // Alive at once; ready only after kubelet registered the plugin and the pool is published.
    node.wait_for("/healthz", || {
        node.get("/healthz").is_some_and(|(c, _)| c == 200)
    })
    .await;
    node.wait_for("the published pool", || !fake.slices().is_empty())
        .await;
    let (code, body) = node.get("/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("kubelet has not registered"), "{body}");
    node.register().await;
    node.wait_for("/readyz", || {
        node.get("/readyz").is_some_and(|(c, _)| c == 200)
    })
    .await;
    let slices = fake.slices();
    assert_eq!(slices.len(), 1);
    assert_eq!(
        slices[0].spec.devices.as_ref().unwrap().len(),
        4,
        "the sriov machine's VFs (its PF, with VFs enabled, is not handed out)"
    );
    assert_eq!(slices[0].spec.pool.name, "node-1");

    // A prepare through the API, its status written back.
    fake.put_claim(claim_json(0));
    let answer = prepare(&node, claims(0..1)).await.unwrap();
    assert_eq!(answer.claims["uid-0"].error, "");
    node.wait_for("the claim status", || {
        fake.claim("ml", "c0")
            .and_then(|c| c.status)
            .and_then(|s| s.devices)
            .is_some_and(|d| d.len() == 1)
    })
    .await;

    // The daemon's own metrics.
    let (code, metrics) = node.get("/metrics").unwrap();
    assert_eq!(code, 200, "{metrics}");
    assert!(
        metrics.contains("\nknd_prepare_duration_seconds_count 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("\nknd_published_devices 4\n"), "{metrics}");
    assert_eq!(
        metrics.matches("\nknd_device_healthy{device=").count(),
        4,
        "every device's health: {metrics}"
    );
    assert!(metrics.ends_with("# EOF\n"), "OpenMetrics text");

    let mut daemon = kill_during_prepare(&fake, &node, daemon).await;

    // SIGTERM: a clean, prompt exit that deregisters the plugin.
    let started = Instant::now();
    let status = stop(&mut daemon, Signal::SIGTERM);
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(!node.registration_socket().exists());
    assert!(!node.dra_socket().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_tells_kubelet_which_device_is_unhealthy_and_why() {
    use knd::dra::proto::health_v1 as health;
    let fake = FakeApi::start().await.unwrap();
    fake.add_node("node-1");
    let node = Node::new(&fake);
    let _daemon = node.start();
    node.register().await;
    let inventory = knd::discover::inventory::scan(&node.tree.host(), None);
    let vf2 = knd_testkit::device_named(&inventory, "ens1f0v2").unwrap();
    let mut stream = health::dra_resource_health_client::DraResourceHealthClient::new(
        unix_channel(node.dra_socket()).await.unwrap(),
    )
    .node_watch_resources(health::NodeWatchResourcesRequest {})
    .await
    .unwrap()
    .into_inner();
    let status_of = |message: &health::NodeWatchResourcesResponse| {
        message
            .devices
            .iter()
            .find(|d| d.device.as_ref().is_some_and(|id| id.device_name == vf2))
            .map(|d| (d.health, d.message.clone()))
    };
    let next = async |stream: &mut tonic::Streaming<health::NodeWatchResourcesResponse>| {
        tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a health update within 10 s")
            .unwrap()
            .unwrap()
    };
    let first = next(&mut stream).await;
    assert_eq!(first.devices.len(), 4, "{first:?}");
    assert!(
        first
            .devices
            .iter()
            .all(|d| d.health == health::HealthStatus::Healthy as i32),
        "{first:?}"
    );

    // The VF's link goes down on the node: kubelet hears it, with the reason.
    node.tree
        .file("/sys/class/net/ens1f0v2/operstate", "down\n");
    let down = next(&mut stream).await;
    assert_eq!(
        status_of(&down),
        Some((
            health::HealthStatus::Unhealthy as i32,
            "link ens1f0v2 is down (operstate)".to_owned()
        ))
    );
    assert_eq!(
        down.devices
            .iter()
            .filter(|d| d.health == health::HealthStatus::Healthy as i32)
            .count(),
        3
    );
    node.tree.file("/sys/class/net/ens1f0v2/operstate", "up\n");
    let up = next(&mut stream).await;
    assert_eq!(
        status_of(&up),
        Some((health::HealthStatus::Healthy as i32, String::new()))
    );
}

/// The taints of `device` in the published pool.
fn taints_of(fake: &FakeApi, device: &str) -> Vec<k8s_openapi::api::resource::v1::DeviceTaint> {
    fake.slices()
        .iter()
        .flat_map(|s| s.spec.devices.iter().flatten())
        .find(|d| d.name == device)
        .and_then(|d| d.taints.clone())
        .unwrap_or_default()
}

/// Writes of ResourceSlices the fake has seen.
fn slice_writes(fake: &FakeApi) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.method != "GET" && r.path.contains("/resourceslices"))
        .count()
}

/// The VF's sysfs link state, and its carrier change count.
fn set_link(node: &Node, up: bool, carrier_changes: u64) {
    node.tree.file(
        "/sys/class/net/ens1f0v2/carrier_changes",
        &format!("{carrier_changes}\n"),
    );
    node.tree.file(
        "/sys/class/net/ens1f0v2/operstate",
        if up { "up\n" } else { "down\n" },
    );
}

/// Health closes the scheduler's loop: a device judged unhealthy gets knd's taint in the
/// ResourceSlice within a health interval, keeps it through a burst of flaps (a bounded number
/// of slice writes), and loses it after a quiet window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_device_is_tainted_in_its_slice_and_untainted_after_a_quiet_window() {
    let fake = FakeApi::start().await.unwrap();
    fake.add_node("node-1");
    let node = Node::new(&fake);
    set_link(&node, true, 2);
    let _daemon = node.start_with(
        &["--health-window", "4", "--publish-interval", "2"],
        Stdio::inherit(),
    );
    let inventory = knd::discover::inventory::scan(&node.tree.host(), None);
    let vf2 = knd_testkit::device_named(&inventory, "ens1f0v2").unwrap();
    node.wait_for("the published pool", || !fake.slices().is_empty())
        .await;
    assert!(taints_of(&fake, &vf2).is_empty());

    // Link down: tainted within the health interval (1 s) and the publish pacing.
    set_link(&node, false, 3);
    let down = Instant::now();
    node.wait_for("the taint", || !taints_of(&fake, &vf2).is_empty())
        .await;
    let took = down.elapsed();
    let taint = taints_of(&fake, &vf2).remove(0);
    assert_eq!(taint.key, "knd.dev/unhealthy");
    assert_eq!(taint.value.as_deref(), Some("link-down"));
    assert_eq!(taint.effect, "NoSchedule");
    assert!(taint.time_added.is_some());
    assert!(took < Duration::from_secs(4), "{took:?}");
    // The other devices stay untainted.
    for device in fake.slices()[0].spec.devices.iter().flatten() {
        assert_eq!(
            device.taints.is_some(),
            device.name == vf2,
            "{}",
            device.name
        );
    }

    // A burst of flaps for 8 s, the verdict changing every 500 ms: the taint stays as it was
    // added, and the slices are written at most once per --publish-interval.
    let writes_before = slice_writes(&fake);
    let burst = Instant::now();
    let mut changes = 3;
    while burst.elapsed() < Duration::from_secs(8) {
        changes += 1;
        set_link(&node, changes % 2 == 0, changes);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = taints_of(&fake, &vf2);
        assert_eq!(now.len(), 1, "the taint never leaves during the burst");
        assert_eq!(now[0], taint, "nor changes");
    }
    let burst_writes = slice_writes(&fake) - writes_before;
    assert!(
        burst_writes <= 8 / 2 + 1,
        "{burst_writes} slice writes in an 8 s burst with a 2 s --publish-interval"
    );
    assert_eq!(
        burst_writes, 0,
        "the taint stayed, so nothing needed writing"
    );

    // Up and quiet: the taint goes after the 4 s window (flaps still count for it), not before.
    set_link(&node, true, changes + 1);
    let quiet = Instant::now();
    node.wait_for("the taint to go", || taints_of(&fake, &vf2).is_empty())
        .await;
    let took = quiet.elapsed();
    assert!(took >= Duration::from_secs(4), "removed after {took:?}");
    assert!(took < Duration::from_secs(15), "removed after {took:?}");
    let total = slice_writes(&fake) - writes_before;
    assert_eq!(total, 1, "one write to remove it");
}

/// An API server before 1.36 (device taints alpha and off) drops the taints without an error:
/// knd notices on the first write, says so once, and publishes without them from then on
/// instead of rewriting its slices forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_without_device_taints_gets_no_endless_rewrites() {
    let fake = FakeApi::start().await.unwrap();
    fake.set_release(knd_testkit::apiserver::Release::V1_34);
    fake.add_node("node-1");
    let node = Node::new(&fake);
    set_link(&node, false, 3);
    let log = node.dir.path().join("knd.log");
    let _daemon = node.start_with(
        &["--publish-interval", "1"],
        Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    node.wait_for("the published pool", || !fake.slices().is_empty())
        .await;
    let inventory = knd::discover::inventory::scan(&node.tree.host(), None);
    let vf2 = knd_testkit::device_named(&inventory, "ens1f0v2").unwrap();
    let settled = slice_writes(&fake);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(slice_writes(&fake), settled, "no rewrites");
    assert!(settled <= 2, "{settled} writes");
    assert!(taints_of(&fake, &vf2).is_empty());
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("the API server dropped the devices' taints")
            .count(),
        1,
        "{text}"
    );
}

/// SIGKILL while 40 new claims are being prepared, at several moments; after each restart
/// every claim so far prepares to exactly what its allocation says, and no claim whose answer
/// kubelet received is read from the API again (it was durable before the answer).
async fn kill_during_prepare(fake: &FakeApi, node: &Node, mut daemon: Daemon) -> Daemon {
    let expected = |i: usize| {
        let claim: k8s_openapi::api::resource::v1::ResourceClaim =
            serde_json::from_value(claim_json(i)).unwrap();
        let reference = ClaimRef {
            namespace: "ml".into(),
            uid: format!("uid-{i}"),
            name: format!("c{i}"),
        };
        plan("knd.dev", &reference, &knd::k8s::claim_from(&claim))
            .unwrap()
            .devices
    };
    let mut acknowledged = vec![0];
    let mut outcomes = Vec::new();
    for (round, delay_ms) in [5_u64, 15, 25, 35, 45, 60, 250].into_iter().enumerate() {
        let batch = 1 + 40 * round..1 + 40 * (round + 1);
        for i in batch.clone() {
            fake.put_claim(claim_json(i));
        }
        let in_flight = tokio::spawn({
            let socket = node.dra_socket();
            let batch = claims(batch.clone());
            async move {
                let channel = unix_channel(socket).await.map_err(|e| e.to_string())?;
                dra_v1::dra_plugin_client::DraPluginClient::new(channel)
                    .node_prepare_resources(dra_v1::NodePrepareResourcesRequest { claims: batch })
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|e| e.to_string())
            }
        });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let status = stop(&mut daemon, Signal::SIGKILL);
        assert_eq!(status.code(), None, "killed by a signal");
        let answered = in_flight.await.unwrap().is_ok();
        if answered {
            acknowledged.extend(batch.clone());
        }
        let on_disk =
            std::fs::read_dir(node.dir.path().join("state/claims")).map_or(0, Iterator::count);
        outcomes.push(format!(
            "kill after {delay_ms} ms: {} ({on_disk} claims on disk)",
            if answered { "answered" } else { "not answered" }
        ));
        daemon = node.start();
        node.register().await;
        let requests_before = fake.requests().len();
        let answer = prepare(node, claims(0..batch.end)).await.unwrap();
        for i in 0..batch.end {
            let got = &answer.claims[&format!("uid-{i}")];
            assert_eq!(got.error, "", "claim {i} after a kill at {delay_ms} ms");
            let devices: Vec<_> = got
                .devices
                .iter()
                .map(|d| {
                    (
                        d.pool_name.clone(),
                        d.device_name.clone(),
                        d.request_names.clone(),
                    )
                })
                .collect();
            let want: Vec<_> = expected(i)
                .into_iter()
                .map(|d| (d.pool, d.device, d.requests))
                .collect();
            assert_eq!(devices, want, "claim {i}");
        }
        for request in &fake.requests()[requests_before..] {
            let read = acknowledged.iter().any(|i| {
                request.method == "GET" && request.path.ends_with(&format!("/resourceclaims/c{i}"))
            });
            assert!(
                !read,
                "{request:?}: acknowledged before the kill, so it must come from the store"
            );
        }
        acknowledged.extend(batch);
    }
    eprintln!("{}", outcomes.join("\n"));

    daemon
}

#[test]
fn bad_flags_are_refused_with_the_flag_named() {
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_knd"))
            .arg("run")
            .args(args)
            .env_remove("NODE_NAME")
            .env_remove("KUBECONFIG")
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(run(&[]).contains("--node-name"));
    let bad_driver = run(&["--node-name", "n", "--driver-name", "Knd_Dev"]);
    assert!(
        bad_driver.contains("--driver-name") && bad_driver.contains("DNS subdomain"),
        "{bad_driver}"
    );
    let bad_addr = run(&["--node-name", "n", "--metrics-addr", "nowhere"]);
    assert!(bad_addr.contains("--metrics-addr"), "{bad_addr}");
    let missing_root = run(&["--node-name", "n", "--host-root", "/nonexistent/knd"]);
    assert!(
        missing_root.contains("--host-root /nonexistent/knd is not a directory"),
        "{missing_root}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad_kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&bad_kubeconfig, "clusters: [").unwrap();
    let state = dir.path().join("state");
    let message = run(&[
        "--node-name",
        "n",
        "--kubeconfig",
        bad_kubeconfig.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--run-dir",
        state.to_str().unwrap(),
    ]);
    assert!(
        message.contains("kubeconfig") && message.contains(bad_kubeconfig.to_str().unwrap()),
        "{message}"
    );
    // NODE_NAME is read from the environment.
    let from_env = Command::new(env!("CARGO_BIN_EXE_knd"))
        .args(["run", "--host-root", "/nonexistent/knd"])
        .env("NODE_NAME", "n")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&from_env.stderr).contains("is not a directory"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: runs a real containerd"]
async fn the_daemon_registers_with_containerd_over_nri() {
    let containerd = knd_testkit::runtime::Containerd::start().unwrap();
    let fake = FakeApi::start().await.unwrap();
    fake.add_node("node-1");
    let mut node = Node::new(&fake);
    node.nri_socket = Some(containerd.nri_socket());
    let mut daemon = node.start();
    node.wait_for("containerd to see knd", || {
        containerd.log().contains("10-knd")
    })
    .await;
    let status = stop(&mut daemon, Signal::SIGTERM);
    assert!(status.success(), "{status}");
}
