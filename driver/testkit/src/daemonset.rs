//! The kubelet's part in running knd's DaemonSet: its pod template (from
//! `deploy/kubernetes/daemonset.yaml` or the rendered chart) turned into the CRI requests
//! kubelet sends — a host-network sandbox and the `knd` container with the manifest's image,
//! arguments, environment, security context and volume mounts — with a test's directories
//! standing in for the node's host paths, and the service account projected as kubelet
//! projects it. Nothing of the manifest is restated here: every field that decides what knd
//! may do (host network, image, command and arguments, environment, security context, volume
//! mounts) is translated, and a form of them this does not translate (another `valueFrom`,
//! volume type, seccomp type, `subPath`) is an error, so a manifest change cannot slip past
//! the container test. Not translated: resource requests and limits, and the probes (the tests
//! wait for knd's registration socket instead).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Container};
use serde::Deserialize as _;

use crate::runtime::{CriClient, cri};

/// The container of the DaemonSet that is knd.
pub const CONTAINER: &str = "knd";
/// Where kubelet projects a pod's service account.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What kubelet masks and makes read-only in a container that is not privileged
/// (`procMount: Default`); it passes these lists to the runtime explicitly.
const MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The DaemonSet in a manifest file (the first `kind: DaemonSet` document).
pub fn load(path: &Path) -> anyhow::Result<DaemonSet> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    parse(&text).with_context(|| format!("{}", path.display()))
}

/// The DaemonSet in multi-document YAML text.
pub fn parse(text: &str) -> anyhow::Result<DaemonSet> {
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document)?;
        if value.get("kind").and_then(serde_yaml::Value::as_str) == Some("DaemonSet") {
            return Ok(serde_yaml::from_value(value)?);
        }
    }
    bail!("no DaemonSet in the manifest")
}

/// The repository's DaemonSet manifest.
pub fn manifest_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/daemonset.yaml")
}

/// How a test stands in for the node.
#[derive(Debug, Clone, Default)]
pub struct Node {
    /// The node's name (`spec.nodeName`).
    pub name: String,
    /// Host path in the manifest → the directory that stands in for it. Host paths not listed
    /// are the machine's own (e.g. `/sys/fs/cgroup`, `/run/netns`).
    pub host_paths: BTreeMap<String, PathBuf>,
    /// The projected service account: a directory holding `token`, `ca.crt` and `namespace`,
    /// and the `KUBERNETES_SERVICE_*` environment (see `FakeApi::write_service_account`).
    pub service_account: Option<(PathBuf, Vec<(String, String)>)>,
    /// Where the runtime writes the pod's container logs.
    pub log_directory: PathBuf,
}

/// The CRI requests for knd's pod.
#[derive(Debug, Clone)]
pub struct Pod {
    /// For `RunPodSandbox` (and again with `CreateContainer`).
    pub sandbox: cri::PodSandboxConfig,
    /// For `CreateContainer`.
    pub container: cri::ContainerConfig,
}

/// Translates `daemonset`'s pod template for `node` as kubelet would, creating the host paths
/// of `DirectoryOrCreate` volumes and checking those of `Directory` ones.
pub fn pod(daemonset: &DaemonSet, node: &Node) -> anyhow::Result<Pod> {
    let template = daemonset
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("the DaemonSet has no pod template")?;
    let container = template
        .containers
        .iter()
        .find(|c| c.name == CONTAINER)
        .with_context(|| format!("the pod template has no container {CONTAINER}"))?;
    let host_network = template.host_network.unwrap_or(false);
    let namespaces = cri::NamespaceOption {
        network: if host_network {
            cri::NamespaceMode::Node
        } else {
            cri::NamespaceMode::Pod
        }
        .into(),
        // kubelet: a container's own PID namespace unless the pod shares one.
        pid: cri::NamespaceMode::Container.into(),
        ipc: cri::NamespaceMode::Pod.into(),
    };
    let name = daemonset
        .metadata
        .name
        .clone()
        .context("the DaemonSet has no name")?;
    let namespace = daemonset
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let sandbox = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: format!("{name}-{}", node.name),
            uid: format!("{name}-pod-uid"),
            namespace,
            attempt: 0,
        }),
        hostname: String::new(),
        log_directory: node.log_directory.to_string_lossy().into_owned(),
        labels: template_labels(daemonset),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: String::new(),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces),
                seccomp: Some(cri::SecurityProfile::default()),
                ..cri::LinuxSandboxSecurityContext::default()
            }),
        }),
        ..cri::PodSandboxConfig::default()
    };
    let image = container
        .image
        .clone()
        .context("the knd container has no image")?;
    let mut mounts = mounts(template, container, node)?;
    let mut envs = env(container, node)?;
    // On a node the state directory has the same path inside knd's container and outside; here
    // a directory of the test stands in for it, and knd is told where the runtime finds it (to
    // bind-mount the pods' NCCL topology files from it).
    let state_dir = envs
        .iter()
        .find(|kv| kv.key == "KND_STATE_DIR")
        .map_or("/var/lib/knd", |kv| kv.value.as_str())
        .to_owned();
    if let Some(mount) = mounts
        .iter()
        .find(|m| m.container_path == state_dir && m.host_path != state_dir)
    {
        envs.push(cri::KeyValue {
            key: "KND_RUNTIME_STATE_DIR".into(),
            value: mount.host_path.clone(),
        });
    }
    if let Some((dir, environment)) = &node.service_account {
        mounts.push(cri::Mount {
            container_path: SERVICE_ACCOUNT_DIR.into(),
            host_path: dir.to_string_lossy().into_owned(),
            readonly: true,
            ..cri::Mount::default()
        });
        envs.extend(environment.iter().map(|(key, value)| cri::KeyValue {
            key: key.clone(),
            value: value.clone(),
        }));
    }
    let container = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: container.name.clone(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec { image }),
        command: container.command.clone().unwrap_or_default(),
        args: container.args.clone().unwrap_or_default(),
        envs,
        mounts,
        log_path: format!("{}/0.log", container.name),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(security_context(container, namespaces)?),
        }),
        ..cri::ContainerConfig::default()
    };
    Ok(Pod { sandbox, container })
}

fn template_labels(daemonset: &DaemonSet) -> std::collections::HashMap<String, String> {
    daemonset
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
        .into_iter()
        .collect()
}

fn env(container: &Container, node: &Node) -> anyhow::Result<Vec<cri::KeyValue>> {
    let mut envs = Vec::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), None) => value.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("spec.nodeName") => node.name.clone(),
                other => bail!(
                    "env {}: valueFrom {other:?} is not translated by the test kit",
                    var.name
                ),
            },
            (None, None) => String::new(),
            (Some(_), Some(_)) => bail!("env {} has both value and valueFrom", var.name),
        };
        envs.push(cri::KeyValue {
            key: var.name.clone(),
            value,
        });
    }
    Ok(envs)
}

fn mounts(
    template: &k8s_openapi::api::core::v1::PodSpec,
    container: &Container,
    node: &Node,
) -> anyhow::Result<Vec<cri::Mount>> {
    let mut mounts = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = template
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .with_context(|| format!("volumeMount {} names no volume", mount.name))?;
        let host = volume.host_path.as_ref().with_context(|| {
            format!(
                "volume {}: only hostPath volumes are translated",
                volume.name
            )
        })?;
        ensure!(
            mount.sub_path.is_none() && mount.sub_path_expr.is_none(),
            "volumeMount {}: subPath is not translated",
            mount.name
        );
        let path = node
            .host_paths
            .get(&host.path)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&host.path));
        match host.type_.as_deref().unwrap_or("") {
            "DirectoryOrCreate" => std::fs::create_dir_all(&path).with_context(|| {
                format!("creating {} for volume {}", path.display(), volume.name)
            })?,
            "Directory" => ensure!(
                path.is_dir(),
                "volume {}: {} (standing in for {}) is not a directory",
                volume.name,
                path.display(),
                host.path
            ),
            "" => {}
            other => bail!(
                "volume {}: hostPath type {other} is not translated",
                volume.name
            ),
        }
        let propagation = match mount.mount_propagation.as_deref() {
            None | Some("None") => cri::MountPropagation::PropagationPrivate,
            Some("HostToContainer") => cri::MountPropagation::PropagationHostToContainer,
            Some("Bidirectional") => cri::MountPropagation::PropagationBidirectional,
            Some(other) => bail!("volumeMount {}: mountPropagation {other}", mount.name),
        };
        mounts.push(cri::Mount {
            container_path: mount.mount_path.clone(),
            host_path: path.to_string_lossy().into_owned(),
            readonly: mount.read_only.unwrap_or(false),
            selinux_relabel: false,
            propagation: propagation.into(),
        });
    }
    Ok(mounts)
}

fn security_context(
    container: &Container,
    namespaces: cri::NamespaceOption,
) -> anyhow::Result<cri::LinuxContainerSecurityContext> {
    let context = container.security_context.clone().unwrap_or_default();
    let privileged = context.privileged.unwrap_or(false);
    let seccomp = match context.seccomp_profile.as_ref().map(|p| p.type_.as_str()) {
        Some("RuntimeDefault") => cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::RuntimeDefault.into(),
            localhost_ref: String::new(),
        },
        None | Some("Unconfined") => cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Unconfined.into(),
            localhost_ref: String::new(),
        },
        Some(other) => bail!("seccompProfile {other} is not translated"),
    };
    let capabilities = context.capabilities.clone().unwrap_or_default();
    Ok(cri::LinuxContainerSecurityContext {
        capabilities: Some(cri::Capability {
            add_capabilities: capabilities.add.unwrap_or_default(),
            drop_capabilities: capabilities.drop.unwrap_or_default(),
        }),
        privileged,
        namespace_options: Some(namespaces),
        run_as_user: context.run_as_user.map(|value| cri::Int64Value { value }),
        readonly_rootfs: context.read_only_root_filesystem.unwrap_or(false),
        // kubelet sets no_new_privs exactly when allowPrivilegeEscalation is false.
        no_new_privs: context.allow_privilege_escalation == Some(false),
        masked_paths: if privileged {
            Vec::new()
        } else {
            MASKED_PATHS.map(String::from).to_vec()
        },
        readonly_paths: if privileged {
            Vec::new()
        } else {
            READONLY_PATHS.map(String::from).to_vec()
        },
        seccomp: Some(seccomp),
    })
}

/// knd's pod running in a runtime.
#[derive(Debug)]
pub struct Running {
    /// The sandbox.
    pub sandbox_id: String,
    /// The `knd` container.
    pub container_id: String,
    /// Its log (CRI format: time, stream, tag, line).
    pub log: PathBuf,
}

/// Runs `pod` through CRI: sandbox, container, start.
pub async fn run(cri: &mut CriClient, pod: &Pod) -> anyhow::Result<Running> {
    let sandbox_id = cri
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.sandbox.clone()),
            runtime_handler: String::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("RunPodSandbox for knd: {} ({:?})", s.message(), s.code()))?
        .into_inner()
        .pod_sandbox_id;
    let container_id = cri
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.clone(),
            config: Some(pod.container.clone()),
            sandbox_config: Some(pod.sandbox.clone()),
        })
        .await
        .map_err(|s| anyhow::anyhow!("CreateContainer for knd: {} ({:?})", s.message(), s.code()))?
        .into_inner()
        .container_id;
    cri.start_container(cri::StartContainerRequest {
        container_id: container_id.clone(),
    })
    .await
    .map_err(|s| anyhow::anyhow!("StartContainer for knd: {} ({:?})", s.message(), s.code()))?;
    Ok(Running {
        sandbox_id,
        container_id,
        log: Path::new(&pod.sandbox.log_directory).join(&pod.container.log_path),
    })
}

impl Running {
    /// The container's state: fails when it exited (with its exit code and log tail).
    pub async fn check_running(&self, cri: &mut CriClient) -> anyhow::Result<()> {
        let status = cri
            .container_status(cri::ContainerStatusRequest {
                container_id: self.container_id.clone(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .context("no container status")?;
        ensure!(
            status.state() == cri::ContainerState::ContainerRunning,
            "knd's container is {:?} (exit code {}, {}): {}",
            status.state(),
            status.exit_code,
            status.reason,
            self.log_tail(30)
        );
        Ok(())
    }

    /// The last `lines` lines of the container's log, without the CRI prefixes.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text
            .lines()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap_or(l))
            .collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until `probe` answers true (as kubelet's readiness probe), failing early when the
    /// container exits.
    pub async fn wait_until<F, Fut>(
        &self,
        cri: &mut CriClient,
        patience: Duration,
        mut probe: F,
    ) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + patience;
        loop {
            if probe().await {
                return Ok(());
            }
            self.check_running(cri).await?;
            ensure!(
                Instant::now() < deadline,
                "knd's container not ready after {patience:?}: {}",
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops (SIGTERM, `grace` to exit) and removes the container and its sandbox.
    pub async fn stop(&self, cri: &mut CriClient, grace: Duration) -> anyhow::Result<()> {
        cri.stop_container(cri::StopContainerRequest {
            container_id: self.container_id.clone(),
            timeout: i64::try_from(grace.as_secs()).unwrap_or(30),
        })
        .await?;
        cri.remove_container(cri::RemoveContainerRequest {
            container_id: self.container_id.clone(),
        })
        .await?;
        cri.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: self.sandbox_id.clone(),
        })
        .await?;
        cri.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: self.sandbox_id.clone(),
        })
        .await?;
        Ok(())
    }
}

impl Node {
    /// A node whose host paths are a test's: kubelet's plugin and registry directories and
    /// knd's state under `dir`, the runtime's NRI socket directory `nri_dir`, and the host root
    /// (sysfs, `/proc/net`, `/dev/infiniband`, the PCI names) from the fixture at `host_root`.
    /// `/sys/fs/cgroup` and `/run/netns` stay the machine's own: the programs attach to the
    /// real cgroup hierarchy, and the runtime pins the pods' namespaces where a node's does.
    /// kubelet's plugin registry exists on every node: it is created here.
    pub fn standing_in(
        name: &str,
        dir: &Path,
        host_root: &Path,
        nri_dir: &Path,
    ) -> anyhow::Result<Self> {
        let host = |path: &str| host_root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(dir.join("registry"))?;
        Ok(Self {
            name: name.to_owned(),
            host_paths: BTreeMap::from([
                (
                    "/var/lib/kubelet/plugins/knd.dev".to_owned(),
                    dir.join("plugins"),
                ),
                (
                    "/var/lib/kubelet/plugins_registry".to_owned(),
                    dir.join("registry"),
                ),
                ("/var/run/nri".to_owned(), nri_dir.to_path_buf()),
                ("/var/lib/knd".to_owned(), dir.join("state")),
                ("/run/knd".to_owned(), dir.join("run")),
                // The same directory under its own name: containerd checks the propagation of
                // the mount holding the path as written, and on this machine only /run/netns is
                // a shared mount (on a systemd node / is).
                (
                    "/var/run/netns".to_owned(),
                    PathBuf::from(crate::runtime::NODE_NETNS_DIR),
                ),
                ("/sys".to_owned(), host("/sys")),
                ("/proc/net".to_owned(), host("/proc/net")),
                ("/dev/infiniband".to_owned(), host("/dev/infiniband")),
                ("/usr/share/misc".to_owned(), host("/usr/share/misc")),
            ]),
            service_account: None,
            log_directory: dir.join("pods/knd"),
        })
    }

    /// The same node with the service account `api` projects (see
    /// `FakeApi::write_service_account`), its files written under `dir`.
    pub fn with_service_account(
        mut self,
        api: &crate::apiserver::FakeApi,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let environment = api.write_service_account(dir)?;
        self.service_account = Some((dir.to_path_buf(), environment));
        Ok(self)
    }
}

/// The value of `key` in a container configuration's environment.
pub fn env_value<'a>(container: &'a cri::ContainerConfig, key: &str) -> Option<&'a str> {
    container
        .envs
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| kv.value.as_str())
}
