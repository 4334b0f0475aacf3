//! A real containerd 1.7 (CRI + NRI) for tests, from the testbed `cargo xtask setup` unpacks
//! into `.tools/testbed/root` (shared/docs/runtime-testbed.md): private root, state, sockets
//! and NRI socket in a temporary directory, stopped and cleaned up when dropped.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// The unpacked testbed (containerd, shims, runc, CNI plugins, pause).
pub fn testbed_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/testbed/root")
}

/// A running containerd.
#[derive(Debug)]
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Containerd {
    /// Starts containerd with NRI enabled on `nri.sock` in its directory; waits until its API
    /// socket answers.
    pub fn start() -> anyhow::Result<Self> {
        let testbed = testbed_root();
        ensure!(
            testbed.join("usr/bin/containerd").exists(),
            "the runtime testbed is missing at {}: run `cargo xtask setup` as root",
            testbed.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("knd-containerd-")
            .tempdir()?;
        let mut this = Self { dir, child: None };
        this.spawn()?;
        Ok(this)
    }

    /// The runtime's NRI socket.
    pub fn nri_socket(&self) -> PathBuf {
        self.dir.path().join("nri.sock")
    }

    /// The CRI (gRPC) socket.
    pub fn cri_socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
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
        std::fs::write(&config, config_toml(dir, &testbed))
            .with_context(|| format!("writing {}", config.display()))?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let path = format!(
            "{}:{}",
            testbed.join("usr/bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new(testbed.join("usr/bin/containerd"))
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

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config_toml(dir: &Path, testbed: &Path) -> String {
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
  socket_path = "{d}/nri.sock"
  plugin_config_path = "{d}/nri-conf.d"
  plugin_path = "{d}/nri-plugins"
  plugin_registration_timeout = "5s"
  plugin_request_timeout = "2s"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "knd.test/pause:1"
  netns_mounts_under_state_dir = true
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
