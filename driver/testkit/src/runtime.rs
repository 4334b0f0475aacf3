//! A real containerd 1.7 (CRI + NRI) for tests, from the testbed `cargo xtask setup` unpacks
//! into `.tools/testbed/root` (shared/docs/runtime-testbed.md): private root, state, sockets
//! and NRI socket in a temporary directory. Dropped, it leaves nothing behind: its pods stopped
//! and removed through CRI while it runs, then whatever a killed containerd or test left —
//! shims, the pods' processes, the mounts of their namespaces, the CNI bridge — removed by force.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// The unpacked testbed (containerd, shims, runc, CNI plugins, pause).
pub fn testbed_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/testbed/root")
}

/// Numbers the CNI bridges of this process's containerds.
static NEXT_BRIDGE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A running containerd.
#[derive(Debug)]
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The CNI bridge of its pods' `eth0`s (one per containerd, so tests do not share it).
    bridge: String,
    options: Options,
}

/// How a [`Containerd`] runs.
#[derive(Debug, Default)]
pub struct Options {
    /// The network namespace it runs in (a node's), instead of the caller's: host-network pods
    /// share it and its pods' CNI bridge is made there.
    pub netns: Option<std::os::fd::OwnedFd>,
    /// Pin the pods' namespaces under `/run/netns`, as containerd does on a node, instead of
    /// under its private state directory: a container that mounts `/var/run/netns` (knd's
    /// DaemonSet) then sees the paths NRI hands it. `/run/netns` is made a shared mount first
    /// (as iproute2 does), so the pins reach containers started before them.
    pub node_netns_dir: bool,
}

/// Where containerd pins pods' namespaces on a node.
pub const NODE_NETNS_DIR: &str = "/run/netns";

impl Containerd {
    /// Starts containerd with NRI enabled on `nri.sock` in its directory; waits until its API
    /// socket answers.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default())
    }

    /// Starts containerd as [`Self::start`] does, run as `options` say.
    pub fn start_with(options: Options) -> anyhow::Result<Self> {
        let testbed = testbed_root();
        ensure!(
            testbed.join("usr/bin/containerd").exists(),
            "the runtime testbed is missing at {}: run `cargo xtask setup` as root",
            testbed.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("knd-containerd-")
            .tempdir()?;
        let bridge = format!(
            "kndt{:x}{:x}",
            std::process::id() & 0xffff,
            NEXT_BRIDGE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        if options.node_netns_dir {
            shared_mount(Path::new(NODE_NETNS_DIR))?;
        }
        let mut this = Self {
            dir,
            child: None,
            bridge,
            options,
        };
        this.spawn()?;
        this.import_pause_image()?;
        Ok(this)
    }

    /// The runtime's NRI socket.
    pub fn nri_socket(&self) -> PathBuf {
        self.dir.path().join("nri/nri.sock")
    }

    /// Where containerd mounts the pods' network namespaces (one file per sandbox).
    pub fn netns_dir(&self) -> PathBuf {
        if self.options.node_netns_dir {
            return PathBuf::from(NODE_NETNS_DIR);
        }
        self.dir
            .path()
            .join("state/io.containerd.grpc.v1.cri/netns")
    }

    /// Imports an OCI image archive into the CRI namespace, under the name its index gives
    /// (`io.containerd.image.name`).
    pub fn import_image(&self, archive: &Path) -> anyhow::Result<()> {
        self.ctr_import(archive)
    }

    /// The CRI (gRPC) socket.
    pub fn cri_socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// A CRI client, as kubelet has.
    pub async fn cri(&self) -> anyhow::Result<CriClient> {
        let channel = super::claims::unix_channel(self.cri_socket()).await?;
        Ok(cri::runtime_service_client::RuntimeServiceClient::new(
            channel,
        ))
    }

    /// Imports the testbed's pause image (the sandbox image) into the CRI namespace.
    fn import_pause_image(&self) -> anyhow::Result<()> {
        self.ctr_import(&testbed_root().join("pause-image.tar"))
    }

    fn ctr_import(&self, archive: &Path) -> anyhow::Result<()> {
        let output = Command::new(testbed_root().join("usr/bin/ctr"))
            .arg("-a")
            .arg(self.cri_socket())
            .args(["-n", "k8s.io", "images", "import"])
            .arg(archive)
            .output()
            .context("running ctr images import")?;
        ensure!(
            output.status.success(),
            "ctr images import {} failed: {}",
            archive.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Stops containerd (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ignored = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(5);
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

    /// Starts containerd again on the same directories (after [`Self::stop`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let testbed = testbed_root();
        let dir = self.dir.path();
        let config = dir.join("config.toml");
        std::fs::create_dir_all(dir.join("cni"))?;
        std::fs::create_dir_all(dir.join("nri"))?;
        std::fs::write(
            dir.join("cni/10-knd-test.conflist"),
            cni_conflist(dir, &self.bridge),
        )?;
        std::fs::write(
            &config,
            config_toml(dir, &testbed, !self.options.node_netns_dir),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let path = format!(
            "{}:{}",
            testbed.join("usr/bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // Its own process group: a Ctrl-C meant for the test or demo must not stop it before
        // they have removed their pods through it.
        let mut command = Command::new(testbed.join("usr/bin/containerd"));
        if let Some(netns) = &self.options.netns {
            use std::os::fd::AsRawFd as _;
            let fd = netns.as_raw_fd();
            // SAFETY: setns(2) is async-signal-safe, and `self` (the descriptor's owner)
            // outlives the spawn.
            unsafe {
                command.pre_exec(move || {
                    let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                    nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let child = command
            .process_group(0)
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(self.cri_socket().exists() && self.nri_socket().exists()) {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("containerd exited ({status}):\n{}", self.log());
            }
            ensure!(
                Instant::now() < deadline,
                "containerd did not create its sockets in 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Containerd {
    /// Leaves nothing behind (see the module's documentation); every step is tried, and what
    /// could not be removed is returned.
    pub fn clean_up(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if self
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
            && let Err(error) = self.remove_all_pods()
        {
            problems.push(format!("removing the pods through CRI: {error:#}"));
        }
        self.stop();
        let dir = self.dir.path().to_path_buf();
        problems.extend(kill_leftovers(&dir));
        problems.extend(unmount_below(&dir));
        let bridge = self.bridge.clone();
        if let Err(error) = on_fresh_runtime(async move {
            let link = knd::os::netlink::Link::connect()?;
            match link.delete(&bridge).await {
                Err(knd::os::netlink::Error::NoSuchLink(_)) | Ok(()) => Ok(()),
                Err(error) => Err(error),
            }
        }) {
            problems.push(format!("deleting the CNI bridge {}: {error}", self.bridge));
        }
        problems
    }

    /// Stops and removes every pod sandbox through CRI (the CNI plugins run, the namespace
    /// mounts go, the shims exit).
    fn remove_all_pods(&self) -> anyhow::Result<()> {
        let socket = self.cri_socket();
        on_fresh_runtime(async move {
            let channel = super::claims::unix_channel(socket).await?;
            let mut cri = cri::runtime_service_client::RuntimeServiceClient::new(channel);
            let pods = cri
                .list_pod_sandbox(cri::ListPodSandboxRequest::default())
                .await?
                .into_inner()
                .items;
            for pod in pods {
                let id = pod.id;
                cri.stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await?;
                cri.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
                    .await?;
            }
            anyhow::Ok(())
        })
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for problem in self.clean_up() {
            eprintln!("containerd testbed: {problem}");
        }
    }
}

/// Runs `work` to completion on a runtime of its own, on a thread of its own (so it works from
/// synchronous code, from inside another runtime, and from `Drop`).
fn on_fresh_runtime<T: Send + 'static>(work: impl Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(work)
    })
    .join()
    .expect("the clean-up thread")
}

/// Kills what a containerd running from `dir` left: its shims (their command line names its
/// socket) and the pods' processes (each task's `init.pid`).
fn kill_leftovers(dir: &Path) -> Vec<String> {
    use nix::{
        sys::signal::{Signal, kill},
        unistd::Pid,
    };
    let mut pids = Vec::new();
    let tasks = dir.join("state/io.containerd.runtime.v2.task/k8s.io");
    for task in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("init.pid"))
            && let Ok(pid) = text.trim().parse::<i32>()
        {
            pids.push(pid);
        }
    }
    let marker = dir.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&marker) {
            pids.push(pid);
        }
    }
    for pid in &pids {
        let _gone = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let alive = |pid: i32| {
        // A killed child of ours stays a zombie until reaped; zombies hold nothing.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    };
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    pids.into_iter()
        .filter(|p| alive(*p))
        .map(|p| format!("process {p} survived SIGKILL"))
        .collect()
}

/// Unmounts (lazily, deepest first) everything mounted below `dir`: the pods' namespace files,
/// their `/dev/shm`, the rootfs of their sandboxes.
fn unmount_below(dir: &Path) -> Vec<String> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return vec!["cannot read /proc/self/mountinfo".into()];
    };
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(point.replace("\\040", " ")))
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
        .into_iter()
        .filter_map(|point| {
            nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH)
                .err()
                .filter(|e| *e != nix::errno::Errno::EINVAL && *e != nix::errno::Errno::ENOENT)
                .map(|e| format!("unmounting {}: {e}", point.display()))
        })
        .collect()
}

/// A bridge network for the pods' `eth0` (no gateway, no masquerading: iptables is not
/// needed), with a bridge name of its own per containerd.
fn cni_conflist(dir: &Path, bridge: &str) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"knd-test","plugins":[{{"type":"bridge","bridge":"{bridge}","isGateway":false,"ipMasq":false,"ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.254.0.0/16"}}]],"dataDir":"{}/cni-ipam"}}}}]}}"#,
        dir.display()
    )
}

/// Makes `dir` a shared mount point (bind-mounted onto itself first if it is none), as
/// `ip netns add` does for `/run/netns`: mounts made below it later reach the containers that
/// mount it with `HostToContainer` propagation.
fn shared_mount(dir: &Path) -> anyhow::Result<()> {
    use nix::mount::{MsFlags, mount};
    std::fs::create_dir_all(dir)?;
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    let wanted = dir.to_string_lossy();
    let line = table
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(&*wanted));
    if line.is_some_and(|l| l.contains(" shared:")) {
        return Ok(());
    }
    if line.is_none() {
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .with_context(|| format!("bind-mounting {} onto itself", dir.display()))?;
    }
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .with_context(|| format!("making {} a shared mount", dir.display()))
}

fn config_toml(dir: &Path, testbed: &Path, netns_under_state: bool) -> String {
    let d = dir.display();
    let t = testbed.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd-ttrpc.sock"

[plugins."io.containerd.nri.v1.nri"]
  disable = false
  disable_connections = false
  socket_path = "{d}/nri/nri.sock"
  plugin_config_path = "{d}/nri-conf.d"
  plugin_path = "{d}/nri-plugins"
  plugin_registration_timeout = "5s"
  plugin_request_timeout = "2s"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "knd.test/pause:1"
  netns_mounts_under_state_dir = {netns_under_state}
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{t}/usr/lib/cni"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{t}/usr/sbin/runc"
        Root = "{d}/runc"
        SystemdCgroup = false
"#
    )
}

/// The CRI client (k8s.io/cri-api `runtime.v1`, the subset in `driver/proto/cri.proto`).
pub mod cri {
    #![allow(
        clippy::all,
        clippy::pedantic,
        clippy::allow_attributes_without_reason,
        missing_docs,
        missing_debug_implementations,
        unreachable_pub,
        unused_qualifications,
        reason = "generated code"
    )]
    tonic::include_proto!("runtime.v1");
}

/// A CRI client of `containerd`, as kubelet has.
pub type CriClient = cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>;

/// A pod sandbox configuration as kubelet sends it (metadata and labels only).
pub fn pod_config(namespace: &str, name: &str, uid: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_owned(),
            uid: uid.to_owned(),
            namespace: namespace.to_owned(),
            attempt: 0,
        }),
        hostname: name.to_owned(),
        labels: [("app".to_owned(), "knd-test".to_owned())].into(),
        ..cri::PodSandboxConfig::default()
    }
}
