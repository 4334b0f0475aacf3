//! knd's NRI hooks: when a pod sandbox starts, attach the NICs of the claims prepared for it
//! into its network namespace; when it stops, give them back; refuse to create containers of a
//! pod whose NICs are not attached; add RDMA character devices to containers.
//!
//! Every pod's attachments are recorded before anything moves and after every change, so a
//! driver restarted after SIGKILL knows what it moved and where.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use super::{plugin::Hooks, proto::nri as api};
use crate::{
    attach,
    discover::inventory::Inventory,
    model::{
        link::LinkStats,
        ports::{ClaimApi, ClaimRef, DeviceReport},
        records::{AttachmentRecord, NetnsId, PodRecord, PodSide, PreparedClaim, PreparedDevice},
    },
    observe::{
        metrics::{ClaimLabels, Telemetry},
        telemetry::Classifiers,
    },
    os::{netns::Netns, state::StateStore},
    publish::resources,
};

/// Whether `record` was made for the namespace now at `path`: the same path and the same
/// identity (records written before identities were kept are trusted by path).
fn same_namespace(record: &PodRecord, path: &Path) -> bool {
    record.netns == path
        && record
            .netns_id
            .is_none_or(|id| Some(id) == NetnsId::of(path))
}

/// Whether the namespace `record` was made for still exists: the nsfs file at its path has the
/// recorded identity (or, for records without one, is a namespace at all).
fn namespace_alive(record: &PodRecord) -> bool {
    let Some(current) = NetnsId::of(&record.netns) else {
        return false;
    };
    match record.netns_id {
        Some(id) => id == current,
        None => Netns::is_namespace_file(&record.netns),
    }
}

/// The recorded namespace, opened only if it is still the one recorded.
fn recorded_namespace(record: &PodRecord) -> Option<Netns> {
    let current = NetnsId::of(&record.netns)?;
    if record.netns_id.is_some_and(|id| id != current) {
        tracing::warn!(pod = %record.pod, netns = %record.netns.display(), "the recorded network namespace was replaced; not entering the new one");
        return None;
    }
    Netns::open(&record.netns).ok()
}

/// Why a hook failed; the runtime's operation fails with the error and its causes.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The state store could not be read or written.
    #[error("state store")]
    Store(#[from] crate::os::state::Error),
    /// The state store's worker thread died.
    #[error("state store worker failed")]
    Worker(#[from] tokio::task::JoinError),
    /// The pod's network namespace could not be opened.
    #[error("cannot open the pod's network namespace")]
    Namespace(#[source] crate::os::netns::Error),
    /// No netlink connection could be opened inside the pod's network namespace.
    #[error("cannot open netlink in the pod's network namespace")]
    PodNetlink(#[source] crate::os::netlink::Error),
    /// A claimed device has no interface on this node.
    #[error("{claim}: device {device} has no network interface on this node")]
    NoInterface {
        /// The claim.
        claim: String,
        /// The device.
        device: String,
    },
    /// Recording or attaching a claim's interface failed (all moved ones were given back).
    #[error("{claim}")]
    Attach {
        /// The claim.
        claim: String,
        /// The failed step.
        #[source]
        source: attach::StepError,
    },
    /// A pod with claims runs without a network namespace of its own.
    #[error("{claim}: pod {pod} has no network namespace of its own (host network?)")]
    NoNetworkNamespace {
        /// The claim.
        claim: String,
        /// `namespace/name` of the pod.
        pod: String,
    },
    /// The NCCL settings a claim asks for could not be made.
    #[error("{claim}: NCCL settings for pod {pod}")]
    Nccl {
        /// The claim.
        claim: String,
        /// `namespace/name` of the pod.
        pod: String,
        /// Why.
        #[source]
        source: Box<NcclFailure>,
    },
    /// A container starts while its pod's claimed device is not attached.
    #[error("{claim}: its network device is not attached to pod {pod}: {why}")]
    NotAttached {
        /// The claim.
        claim: String,
        /// `namespace/name` of the pod.
        pod: String,
        /// Why (the recorded failure).
        why: String,
    },
    /// The interfaces of an earlier sandbox of the pod could not be given back.
    #[error("pod {pod}: the interfaces of its earlier sandbox could not be given back")]
    EarlierSandbox {
        /// `namespace/name` of the pod.
        pod: String,
    },
    /// An attachment interrupted by a crash could not be undone.
    #[error("pod {pod}: an interrupted attachment could not be undone")]
    Interrupted {
        /// `namespace/name` of the pod.
        pod: String,
    },
    /// Some interfaces could not be given back (they stay recorded, for a later retry).
    #[error("pod {pod}: some interfaces could not be given back")]
    NotReturned {
        /// `namespace/name` of the pod.
        pod: String,
    },
}

/// The hooks, over the state store, the current inventory and the claims API.
#[derive(Debug)]
pub struct NodeHooks<C> {
    store: Arc<StateStore>,
    inventory: watch::Receiver<Arc<Inventory>>,
    host: Netns,
    claims: Arc<C>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    telemetry: Option<Arc<Telemetry>>,
    /// Telemetry attachments running in the background, drained at shutdown.
    tasks: TaskTracker,
    /// Where the pods' NCCL topology files go.
    nccl: Option<NcclFiles>,
}

/// Where knd writes the pods' NCCL topology files, and what it reads to make them.
#[derive(Debug, Clone)]
pub struct NcclFiles {
    /// The host's sysfs (GID tables, PCIe bridges).
    pub host: crate::os::host::HostRoot,
    /// The directory knd writes them to, one subdirectory per pod.
    pub dir: PathBuf,
    /// The same directory as the container runtime sees it, for the bind mount (the same path
    /// unless knd runs in a container that mounts it elsewhere).
    pub runtime_dir: PathBuf,
}

/// Why a pod's NCCL settings could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NcclFailure {
    /// From the devices.
    #[error(transparent)]
    Settings(#[from] attach::nccl::NcclError),
    /// knd runs without a place for the files.
    #[error("knd was started without a directory for NCCL topology files")]
    NoDirectory,
    /// The pod's UID cannot name a directory.
    #[error("pod UID `{0}` is not a UID")]
    Uid(String),
    /// The file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn network_namespace(pod: &api::PodSandbox) -> Option<PathBuf> {
    pod.linux
        .as_ref()?
        .namespaces
        .iter()
        .find(|n| n.r#type == "network" && !n.path.is_empty())
        .map(|n| PathBuf::from(&n.path))
}

fn claim_label(claim: &PreparedClaim) -> String {
    format!("claim {}/{}", claim.namespace, claim.name)
}

impl<C: ClaimApi> NodeHooks<C> {
    /// Hooks attaching from `host` (the namespace interfaces are given back to).
    pub fn new(
        store: Arc<StateStore>,
        inventory: watch::Receiver<Arc<Inventory>>,
        host: Netns,
        claims: Arc<C>,
    ) -> Self {
        Self {
            store,
            inventory,
            host,
            claims,
            locks: Mutex::default(),
            telemetry: None,
            tasks: TaskTracker::new(),
            nccl: None,
        }
    }

    /// Measures every attached interface with `telemetry` (programs attached in the background
    /// once the pod's interfaces are in place, off the runtime's hook).
    #[must_use]
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    /// Hands NCCL settings to the containers of pods whose claims ask for them, writing their
    /// topology files below `files.dir`.
    #[must_use]
    pub fn with_nccl(mut self, files: NcclFiles) -> Self {
        self.nccl = Some(files);
        self
    }

    /// The NCCL variables (those `container` does not set itself) and the topology file's mount
    /// for the devices of `claims` whose configuration asks for them; nothing when none does.
    fn nccl_adjustment(
        &self,
        pod: &api::PodSandbox,
        container: &api::Container,
        claims: &[PreparedClaim],
        record: Option<&PodRecord>,
    ) -> Result<(Vec<api::KeyValue>, Vec<api::Mount>), HookError> {
        let wanted: Vec<(&PreparedClaim, &PreparedDevice)> = claims
            .iter()
            .flat_map(|c| c.devices.iter().map(move |d| (c, d)))
            .filter(|(_, d)| d.config.nccl.is_some_and(|n| n.env))
            .collect();
        let Some((first, _)) = wanted.first() else {
            return Ok((Vec::new(), Vec::new()));
        };
        let failed = |source: NcclFailure| HookError::Nccl {
            claim: claim_label(first),
            pod: format!("{}/{}", pod.namespace, pod.name),
            source: Box::new(source),
        };
        let files = self
            .nccl
            .as_ref()
            .ok_or_else(|| failed(NcclFailure::NoDirectory))?;
        if !is_plain_uid(&pod.uid) {
            return Err(failed(NcclFailure::Uid(pod.uid.clone())));
        }
        let inventory = self.inventory.borrow().clone();
        let attachments: Vec<(&AttachmentRecord, &PodSide)> = record
            .map(|r| r.attachments.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|a| {
                wanted
                    .iter()
                    .any(|(c, d)| c.uid == a.claim_uid && d.device == a.device)
            })
            .filter_map(|a| Some((a, a.pod.as_ref()?)))
            .collect();
        let addresses: Vec<Vec<std::net::IpAddr>> = attachments
            .iter()
            .map(|(_, side)| side.addresses.iter().map(ipnet::IpNet::addr).collect())
            .collect();
        let mut nics = Vec::new();
        for ((attachment, side), addresses) in attachments.iter().zip(&addresses) {
            let Some(nic) = resources::published_nic(&inventory, &attachment.device) else {
                continue;
            };
            nics.push(attach::nccl::PodNic {
                interface: &side.name,
                addresses,
                nic,
            });
        }
        let gpus: Vec<&crate::discover::pci::PciDevice> = wanted
            .iter()
            .filter_map(|(_, d)| d.topology.as_ref())
            .filter_map(|finding| inventory.gpus.iter().find(|g| g.address == finding.gpu))
            .fold(Vec::new(), |mut gpus, gpu| {
                if !gpus
                    .iter()
                    .any(|g: &&crate::discover::pci::PciDevice| g.address == gpu.address)
                {
                    gpus.push(gpu);
                }
                gpus
            });
        let pod_name = format!("{}/{}", pod.namespace, pod.name);
        let settings = attach::nccl::settings(&files.host, &pod_name, &nics, &gpus)
            .map_err(|e| failed(e.into()))?;
        // The container's own variables win (`KEY=VALUE`; a bare `KEY` counts too).
        let own: Vec<&str> = container
            .env
            .iter()
            .map(|entry| entry.split_once('=').map_or(entry.as_str(), |(key, _)| key))
            .collect();
        let env: Vec<api::KeyValue> = settings
            .env
            .into_iter()
            .filter(|(key, _)| !own.contains(&key.as_str()))
            .map(|(key, value)| api::KeyValue { key, value })
            .collect();
        if !env.iter().any(|kv| kv.key == "NCCL_TOPO_FILE") {
            return Ok((env, Vec::new()));
        }
        let mount = write_topology(files, &pod.uid, &settings.topology).map_err(failed)?;
        Ok((env, vec![mount]))
    }

    /// Removes the pod's NCCL topology file, if it has one.
    fn remove_nccl_file(&self, uid: &str) {
        let Some(files) = &self.nccl else { return };
        if !is_plain_uid(uid) {
            return;
        }
        let dir = files.dir.join(uid);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the pod's NCCL topology file");
            }
        }
    }

    /// Starts measuring the attached interfaces of `record` in the background. The task holds
    /// the pod's lock, so a stop that follows waits for it and then removes what it attached.
    fn watch(&self, record: &PodRecord) {
        let Some(telemetry) = self.telemetry.clone() else {
            return;
        };
        let lock = self.lock(&record.pod_uid);
        let store = Arc::clone(&self.store);
        let inventory = self.inventory.clone();
        let record = record.clone();
        // Loading the programs takes tens of milliseconds: done without the pod's lock, so the
        // pod's next event (its first CreateContainer) does not wait for it. Whether the pod
        // still has these interfaces is checked under the lock after, and what was attached
        // for a pod released meanwhile is removed again.
        let still_attached = move |store: &StateStore, record: &PodRecord| {
            let current = store.pods.get(&record.pod_uid).ok().flatten();
            current.is_some_and(|r| !r.detached && r.netns == record.netns)
        };
        self.tasks.spawn(async move {
            if !still_attached(&store, &record) {
                return; // gone, or re-attached elsewhere, meanwhile
            }
            let (claims, _) = store
                .claims
                .matching(|c| c.pod_uids.contains(&record.pod_uid))
                .unwrap_or_default();
            let pod_name = record.pod.rsplit('/').next().unwrap_or_default().to_owned();
            let rdma: HashMap<String, Vec<String>> = {
                let inventory = inventory.borrow();
                record
                    .attachments
                    .iter()
                    .map(|a| {
                        let names = resources::published_nic(&inventory, &a.device)
                            .map(|nic| nic.rdma.iter().map(|r| r.name.clone()).collect())
                            .unwrap_or_default();
                        (a.device.clone(), names)
                    })
                    .collect()
            };
            let (ours, worker) = (record.clone(), Arc::clone(&telemetry));
            let watched = tokio::task::spawn_blocking(
                move || -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
                    let pod_ns = Netns::open(&ours.netns)?;
                    for attachment in &ours.attachments {
                        let Some(side) = &attachment.pod else {
                            continue;
                        };
                        let prepared = claims
                            .iter()
                            .find(|(uid, _)| *uid == attachment.claim_uid)
                            .and_then(|(_, c)| {
                                c.devices.iter().find(|d| d.device == attachment.device)
                            });
                        // A share is held to its bandwidth again after a restart of knd (its
                        // programs went with the old process): its policing programs are
                        // linked first (whatever the claim says of telemetry), and the watch below
                        // counts with them.
                        if let Some(share) = &attachment.share {
                            let (addresses, ingress) =
                                share_terms(side, prepared.map(|d| &d.config));
                            worker.enforce_share(
                                (&ours.pod_uid, &pod_ns, &side.name),
                                share.bandwidth,
                                ingress,
                                &addresses,
                            )?;
                        }
                        // `telemetry: {enabled: false}`: no series (a share keeps the programs
                        // that hold it to its bandwidth).
                        if prepared
                            .and_then(|d| d.config.telemetry)
                            .is_some_and(|t| !t.enabled)
                        {
                            continue;
                        }
                        let request = prepared.map(|d| d.requests.join(",")).unwrap_or_default();
                        let labels = ClaimLabels {
                            namespace: attachment.claim_namespace.clone(),
                            pod: pod_name.clone(),
                            claim: attachment.claim_name.clone(),
                            request,
                            device: attachment.device.clone(),
                            interface: side.name.clone(),
                        };
                        let devices = rdma.get(&attachment.device).cloned().unwrap_or_default();
                        worker.watch(&ours.pod_uid, &pod_ns, labels, devices)?;
                    }
                    Ok(())
                },
            )
            .await;
            match watched {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(
                    error = %crate::model::error_chain(error.as_ref()),
                    "cannot measure a pod's interfaces"
                ),
                Err(error) => tracing::error!(%error, "the telemetry worker failed"),
            }
            let _guard = lock.lock().await;
            if !still_attached(&store, &record) {
                telemetry.unwatch_pod(&record.pod_uid);
            }
        });
    }

    /// Links the counting programs to the NICs of `claim`, just prepared, while they are still
    /// on the host, in the background: the pod's start then only resets their counters (see
    /// [`Telemetry::stage`]). Devices of claims with telemetry off are left alone.
    pub fn stage(&self, claim: &PreparedClaim) {
        let Some(telemetry) = self.telemetry.clone() else {
            return;
        };
        for device in &claim.devices {
            if device.config.telemetry.is_some_and(|t| !t.enabled) {
                continue;
            }
            let (Some(interface), Ok(host)) =
                (self.interface_of(&device.device), self.host.try_clone())
            else {
                continue;
            };
            let (telemetry, uid, name) = (
                Arc::clone(&telemetry),
                claim.uid.clone(),
                device.device.clone(),
            );
            self.tasks.spawn_blocking(move || {
                if let Err(error) = telemetry.stage(&uid, &name, &host, &interface) {
                    tracing::debug!(
                        error = %crate::model::error_chain(&error),
                        "cannot link the counting programs ahead; linked at the pod's start"
                    );
                }
            });
        }
    }

    /// Unlinks what [`Self::stage`] linked for claim `claim_uid` and no pod took.
    pub fn unstage(&self, claim_uid: &str) {
        if let Some(telemetry) = &self.telemetry {
            telemetry.unstage(claim_uid);
        }
    }

    /// Shutdown: waits for the telemetry attachments running in the background.
    pub async fn drained(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// One pod's events are handled one at a time.
    fn lock(&self, pod_uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().expect("pod locks poisoned");
        Arc::clone(locks.entry(pod_uid.to_owned()).or_default())
    }

    /// Runs `work` on the pod records: on this task when they are in memory (tmpfs, as on a
    /// node: tens of microseconds, never waiting on a disk), on the blocking pool otherwise.
    async fn pods_io<T: Send + 'static>(
        &self,
        work: impl FnOnce(&StateStore) -> crate::os::state::Result<T> + Send + 'static,
    ) -> Result<T, HookError> {
        if self.store.pods.in_memory() {
            return Ok(work(&self.store)?);
        }
        let store = Arc::clone(&self.store);
        Ok(tokio::task::spawn_blocking(move || work(&store)).await??)
    }

    /// The prepared claims reserved for `pod_uid` (from memory: the store caches claims).
    fn claims_of(&self, pod_uid: &str) -> Result<Vec<PreparedClaim>, HookError> {
        let (claims, problems) = self
            .store
            .claims
            .matching(|claim| claim.pod_uids.iter().any(|uid| uid == pod_uid))?;
        for problem in problems {
            tracing::error!(%problem, "skipping an unreadable claim record");
        }
        Ok(claims.into_iter().map(|(_, claim)| claim).collect())
    }

    /// Records `record`, atomically but without fsync
    /// ([`crate::os::state::Records::put_unsynced`]): a pod record describes namespaces and
    /// interfaces that do not outlive the machine — when it goes down, every pod's namespace
    /// goes with it and each NIC is back on the host (a share is gone with its namespace) — so
    /// it has to survive a crash of knd, which the page cache does, not one of the machine (on
    /// a node they are in the run directory, a tmpfs).
    async fn save(&self, record: &PodRecord) -> Result<(), HookError> {
        let record = record.clone();
        self.pods_io(move |store| store.pods.put_unsynced(&record.pod_uid, &record))
            .await
    }

    async fn load(&self, pod_uid: &str) -> Result<Option<PodRecord>, HookError> {
        let uid = pod_uid.to_owned();
        self.pods_io(move |store| store.pods.get(&uid)).await
    }

    /// The host interface of `device`, from the current inventory.
    fn interface_of(&self, device: &str) -> Option<String> {
        let inventory = self.inventory.borrow();
        resources::published_nic(&inventory, device)
            .and_then(|nic| nic.netdev.as_ref())
            .map(|netdev| netdev.name.clone())
    }

    async fn attach_pod(&self, pod: &api::PodSandbox, netns_path: &Path) -> Result<(), HookError> {
        let started = std::time::Instant::now();
        let claims = self.claims_of(&pod.uid)?;
        if claims.is_empty() {
            return Ok(());
        }
        if let Some(mut existing) = self.load(&pod.uid).await? {
            let complete =
                existing.failure.is_none() && existing.attachments.iter().all(|a| a.pod.is_some());
            let same = same_namespace(&existing, netns_path);
            if !same && !existing.detached {
                // A new sandbox of the same pod (after a reboot, or re-created while knd was
                // away): the record is for a namespace that is gone or is another one. Give
                // back what it holds, then attach to the new one.
                tracing::warn!(pod = %existing.pod, old = %existing.netns.display(), new = %netns_path.display(), "a pod record belongs to an earlier sandbox; re-attaching");
                if let Some(telemetry) = &self.telemetry {
                    telemetry.unwatch_pod(&pod.uid);
                }
                let old_ns = recorded_namespace(&existing);
                if !self.detach_all(&mut existing, old_ns.as_ref()).await {
                    return Err(HookError::EarlierSandbox { pod: existing.pod });
                }
            } else if complete && !existing.detached {
                // Already attached (e.g. before a restart): make sure it is measured.
                if self
                    .telemetry
                    .as_ref()
                    .is_some_and(|t| !t.watches(&pod.uid))
                {
                    self.watch(&existing);
                }
                return Ok(());
            }
            if same && !existing.detached {
                // A crash interrupted an earlier attempt: give back what it moved first.
                let pod_ns = recorded_namespace(&existing);
                if !self.detach_all(&mut existing, pod_ns.as_ref()).await {
                    return Err(HookError::Interrupted { pod: existing.pod });
                }
            }
        }
        let pod_label = format!("{}/{}", pod.namespace, pod.name);
        let mut record = PodRecord {
            pod_uid: pod.uid.clone(),
            pod: pod_label.clone(),
            netns: netns_path.to_path_buf(),
            netns_id: NetnsId::of(netns_path),
            attachments: Vec::new(),
            failure: None,
            detached: false,
        };
        let mut spent = attach::Spent::default();
        let outcome = self
            .attach_claims(&claims, netns_path, &mut record, &mut spent)
            .await;
        if let Err(error) = &outcome {
            record.failure = Some(crate::model::error_chain(error));
            // Whatever could not be given back stays recorded as attached, for stop to retry.
            record.detached = record.attachments.iter().all(|a| a.pod.is_none());
        }
        self.save(&record).await?;
        match (&outcome, &self.telemetry) {
            (Ok(()), Some(telemetry)) => {
                telemetry
                    .attach_seconds
                    .observe(started.elapsed().as_secs_f64());
                telemetry
                    .attach_kernel_seconds
                    .observe(spent.kernel.as_secs_f64());
                self.watch(&record);
            }
            (Err(_), Some(telemetry)) => {
                telemetry.attach_failures.inc();
                // What started counting as an interface arrived went back with it.
                telemetry.unwatch_pod(&record.pod_uid);
            }
            (_, None) => {}
        }
        outcome
    }

    /// Records every host side first (kept across a crash of knd), then moves one interface
    /// after the other; on a failure gives back what moved and reports which claim and step
    /// failed.
    async fn attach_claims(
        &self,
        claims: &[PreparedClaim],
        netns_path: &Path,
        record: &mut PodRecord,
        spent: &mut attach::Spent,
    ) -> Result<(), HookError> {
        let pod_ns = Netns::open(netns_path).map_err(HookError::Namespace)?;
        // The pod's connection is opened (by a thread entering its namespace) while the host
        // sides are read.
        let (pod, plan) = tokio::join!(
            attach::Pod::open(&pod_ns),
            self.record_host_sides(claims, record)
        );
        let (pod, plan) = (pod.map_err(HookError::PodNetlink)?, plan?);
        // What a crash of knd in the middle of a move needs to undo it.
        self.save(record).await?;
        for (index, (claim, device)) in plan.into_iter().enumerate() {
            let host = record.attachments[index].host.clone();
            let pod_name = record.attachments[index].pod_name.clone();
            let arrived = self.measure_from_arrival(
                (&claim.uid, &device.device),
                &record.pod_uid,
                &pod_ns,
                device,
            );
            let attached = self
                .attach_one(
                    &pod,
                    &record.pod_uid,
                    device,
                    (&host, &pod_name, &mut *spent),
                    arrived,
                )
                .await;
            match attached {
                // Recorded once all are attached (by the caller); a crash before that is
                // undone from the intended names recorded above.
                Ok(side) => record.attachments[index].pod = Some(side),
                Err(error) => {
                    self.detach_all(record, Some(&pod_ns)).await;
                    return Err(HookError::Attach {
                        claim: claim_label(claim),
                        source: error,
                    });
                }
            }
        }
        self.report(record);
        Ok(())
    }

    /// Records the host side of every device of `claims` in `record` (nothing moves yet), and
    /// returns the claims and devices in the order of the attachments recorded.
    async fn record_host_sides<'c>(
        &self,
        claims: &'c [PreparedClaim],
        record: &mut PodRecord,
    ) -> Result<Vec<(&'c PreparedClaim, &'c PreparedDevice)>, HookError> {
        let mut plan = Vec::new();
        for claim in claims {
            for device in &claim.devices {
                let Some(interface) = self.interface_of(&device.device) else {
                    return Err(HookError::NoInterface {
                        claim: claim_label(claim),
                        device: device.device.clone(),
                    });
                };
                // A share leaves the NIC where it is, as it is: only its identity is recorded.
                let host = if device.share.is_some() {
                    attach::record_parent(&self.host, &interface).await
                } else {
                    attach::record_for(&self.host, &interface, &device.config).await
                }
                .map_err(|source| HookError::Attach {
                    claim: claim_label(claim),
                    source,
                })?;
                let pod_name = device
                    .config
                    .interface
                    .as_ref()
                    .and_then(|i| i.name.clone())
                    .unwrap_or_else(|| host.link.name.clone());
                record.attachments.push(AttachmentRecord {
                    claim_uid: claim.uid.clone(),
                    claim_namespace: claim.namespace.clone(),
                    claim_name: claim.name.clone(),
                    pool: device.pool.clone(),
                    device: device.device.clone(),
                    host,
                    pod_name,
                    pod: None,
                    returned: false,
                    share: device.share.clone(),
                });
                plan.push((claim, device));
            }
        }
        Ok(plan)
    }

    /// Attaches one device: moves the NIC in, or makes the share (and holds it to its
    /// bandwidth).
    async fn attach_one<Arrival>(
        &self,
        pod: &attach::Pod<'_>,
        pod_uid: &str,
        device: &PreparedDevice,
        (host, pod_name, spent): (&crate::model::records::HostSide, &str, &mut attach::Spent),
        arrived: impl FnOnce(String, LinkStats) -> Arrival,
    ) -> Result<PodSide, attach::StepError>
    where
        Arrival: Future<Output = ()> + Send,
    {
        let Some(share) = &device.share else {
            return attach::attach_measured(
                &self.host,
                pod,
                host,
                (pod_name, spent),
                &device.config,
                arrived,
            )
            .await;
        };
        let mode = device.config.share.and_then(|s| s.mode).unwrap_or_default();
        let side = attach::attach_share(
            &self.host,
            pod,
            host,
            (pod_name, mode, spent),
            &device.config,
            arrived,
        )
        .await?;
        let enforced = self
            .enforce(pod_uid, pod.netns, &side, device, share.bandwidth)
            .await;
        if let Err(why) = enforced {
            // Made, but it cannot be held to its bandwidth: it goes.
            attach::detach_share(Some(pod.netns), pod_name, host, side.place)
                .await
                .ok();
            return Err(attach::StepError::new(pod_name, "enforce the share", why));
        }
        Ok(side)
    }

    /// Holds the share `side` of `device` to `bandwidth` bits per second (see
    /// [`Telemetry::enforce_share`]); without knd's eBPF programs a share cannot be given.
    async fn enforce(
        &self,
        pod_uid: &str,
        pod_ns: &Netns,
        side: &PodSide,
        device: &PreparedDevice,
        bandwidth: u64,
    ) -> Result<(), String> {
        let Some(telemetry) = self.telemetry.clone() else {
            return Err(
                "knd runs without its eBPF programs, which hold a share to its bandwidth".into(),
            );
        };
        let pod_ns = pod_ns.try_clone().map_err(|e| e.to_string())?;
        let (pod_uid, interface) = (pod_uid.to_owned(), side.name.clone());
        let (addresses, ingress) = share_terms(side, Some(&device.config));
        tokio::task::spawn_blocking(move || {
            telemetry.enforce_share(
                (&pod_uid, &pod_ns, &interface),
                bandwidth,
                ingress,
                &addresses,
            )
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| crate::model::error_chain(&e))
    }

    /// What to do as a claimed interface arrives in pod `pod_uid`'s namespace, before it is set
    /// up there: start counting it (unless its claim turned telemetry off), so that knd's
    /// totals are the interface's own counters since it entered the pod.
    fn measure_from_arrival(
        &self,
        (claim_uid, device_name): (&str, &str),
        pod_uid: &str,
        pod_ns: &Netns,
        device: &PreparedDevice,
    ) -> impl FnOnce(String, LinkStats) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + use<C>
    {
        let enabled = device.config.telemetry.is_none_or(|t| t.enabled);
        let telemetry = self.telemetry.clone().filter(|_| enabled);
        let pod_ns = pod_ns.try_clone().ok();
        let pod_uid = pod_uid.to_owned();
        let claim = (claim_uid.to_owned(), device_name.to_owned());
        // A share's programs police as well; an interface of the pod's own never pays for it.
        let classifiers = if device.share.is_some() {
            Classifiers::Policing
        } else {
            Classifiers::Counting
        };
        move |interface: String, counters: LinkStats| {
            Box::pin(async move {
                let (Some(telemetry), Some(pod_ns)) = (telemetry, pod_ns) else {
                    return;
                };
                let started = tokio::task::spawn_blocking(move || {
                    telemetry.arrive(
                        (&claim.0, &claim.1),
                        &pod_uid,
                        (&pod_ns, &interface, classifiers),
                        counters,
                    )
                })
                .await;
                match started {
                    Ok(Ok(true)) => {}
                    Ok(Ok(false)) => tracing::debug!(
                        "no counting programs loaded ahead: counted from the pod's start"
                    ),
                    Ok(Err(error)) => tracing::warn!(
                        error = %crate::model::error_chain(&error),
                        "cannot measure an interface from its arrival; measured from the pod's start"
                    ),
                    Err(error) => tracing::error!(%error, "the telemetry worker failed"),
                }
            })
        }
    }

    /// Gives back every attached interface of `record`; logs what it cannot, and tells the
    /// claim's owner when the pod holds another device where the claimed one should be.
    async fn detach_all(&self, record: &mut PodRecord, pod_ns: Option<&Netns>) -> bool {
        let mut complete = true;
        for attachment in record.attachments.iter_mut().filter(|a| !a.returned) {
            let place = attachment.pod.as_ref().and_then(|p| p.place);
            let detached = if attachment.share.is_some() {
                attach::detach_share(pod_ns, &attachment.pod_name, &attachment.host, place).await
            } else {
                attach::detach(
                    &self.host,
                    pod_ns,
                    &attachment.pod_name,
                    &attachment.host,
                    place,
                )
                .await
            };
            match detached {
                Ok(()) => {
                    attachment.pod = None;
                    attachment.returned = true;
                }
                Err(error) => {
                    complete = false;
                    tracing::error!(pod = %record.pod, claim = %attachment.claim_name, %error, "cannot give an interface back");
                    if error.not_ours {
                        let claim = ClaimRef {
                            namespace: attachment.claim_namespace.clone(),
                            uid: attachment.claim_uid.clone(),
                            name: attachment.claim_name.clone(),
                        };
                        let note = format!("pod {}: {error}", record.pod);
                        self.claims.warn(&claim, "ReleaseRefused", &note);
                    }
                }
            }
        }
        complete
    }

    async fn release_pod(&self, pod_uid: &str, forget: bool) -> Result<(), HookError> {
        let Some(mut record) = self.load(pod_uid).await? else {
            return Ok(());
        };
        if let Some(telemetry) = &self.telemetry {
            telemetry.unwatch_pod(pod_uid);
        }
        if !record.detached {
            let pod_ns = recorded_namespace(&record);
            if !self.detach_all(&mut record, pod_ns.as_ref()).await {
                self.save(&record).await?;
                return Err(HookError::NotReturned { pod: record.pod });
            }
            record.detached = true;
            self.save(&record).await?;
        }
        if forget {
            let uid = pod_uid.to_owned();
            self.pods_io(move |store| store.pods.remove(&uid)).await?;
        }
        Ok(())
    }

    /// Tells the API the pod's interfaces are ready, with their network data.
    fn report(&self, record: &PodRecord) {
        let prepared = self.claims_of(&record.pod_uid).unwrap_or_default();
        let topology = |claim_uid: &str, device: &str| {
            prepared
                .iter()
                .find(|c| c.uid == claim_uid)
                .and_then(|c| c.devices.iter().find(|d| d.device == device))
                .and_then(|d| d.topology.clone())
        };
        let mut by_claim: HashMap<&str, (ClaimRef, Vec<DeviceReport>)> = HashMap::new();
        for attachment in &record.attachments {
            let Some(side) = &attachment.pod else {
                continue;
            };
            let entry = by_claim.entry(&attachment.claim_uid).or_insert_with(|| {
                (
                    ClaimRef {
                        namespace: attachment.claim_namespace.clone(),
                        uid: attachment.claim_uid.clone(),
                        name: attachment.claim_name.clone(),
                    },
                    Vec::new(),
                )
            });
            entry.1.push(DeviceReport {
                pool: attachment.pool.clone(),
                device: attachment.device.clone(),
                ready: true,
                reason: "Attached".into(),
                message: format!("{} in pod {}", side.name, record.pod),
                network: Some(k8s_openapi::api::resource::v1::NetworkDeviceData {
                    interface_name: Some(side.name.clone()),
                    ips: Some(side.addresses.iter().map(ToString::to_string).collect()),
                    hardware_address: side.mac.clone(),
                }),
                topology: topology(&attachment.claim_uid, &attachment.device),
                share_id: attachment.share.as_ref().map(|s| s.id.clone()),
            });
        }
        for (claim, devices) in by_claim.into_values() {
            self.claims.attached(&claim, devices);
        }
    }

    /// Character devices for the RDMA devices of the pod's claims.
    fn rdma_devices(&self, claims: &[PreparedClaim]) -> Vec<api::LinuxDevice> {
        let inventory = self.inventory.borrow();
        let mut devices = Vec::new();
        let char_device = |path: &str, major: u32, minor: u32| api::LinuxDevice {
            path: path.to_owned(),
            r#type: "c".into(),
            major: i64::from(major),
            minor: i64::from(minor),
            file_mode: Some(api::OptionalFileMode { value: 0o666 }),
            uid: Some(api::OptionalUInt32 { value: 0 }),
            gid: Some(api::OptionalUInt32 { value: 0 }),
        };
        for device in claims.iter().flat_map(|c| &c.devices) {
            let Some(nic) = resources::published_nic(&inventory, &device.device) else {
                continue;
            };
            for rdma in &nic.rdma {
                if let Some(uverbs) = &rdma.uverbs {
                    devices.push(char_device(&uverbs.path, uverbs.major, uverbs.minor));
                }
            }
        }
        if !devices.is_empty()
            && let Some(cm) = &inventory.rdma_cm
        {
            devices.push(char_device(&cm.path, cm.major, cm.minor));
        }
        devices.dedup_by(|a, b| a.path == b.path);
        devices
    }
}

impl<C: ClaimApi> Hooks for NodeHooks<C> {
    type Error = HookError;

    async fn synchronize(
        &self,
        pods: Vec<api::PodSandbox>,
        _containers: Vec<api::Container>,
    ) -> Result<(), HookError> {
        // Pods that started while knd was away: attach now.
        for pod in &pods {
            if let Some(netns) = network_namespace(pod) {
                let lock = self.lock(&pod.uid);
                let _guard = lock.lock().await;
                if let Err(error) = self.attach_pod(pod, &netns).await {
                    tracing::error!(pod = %pod.name, error = %crate::model::error_chain(&error), "cannot attach to a running pod");
                }
            }
        }
        // Pods that went away while knd was away: give their interfaces back once their
        // namespace is gone too (a pod missing from the runtime's list whose namespace lives
        // keeps its NICs until its stop or remove comes). A record that cannot be read is
        // moved aside and counted; it must not stop the work on all the others.
        let live: Vec<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
        let (recorded, unreadable) = self.pods_io(|store| store.pods.all_quarantining()).await?;
        for (aside, problem) in &unreadable {
            tracing::error!(
                record = %aside.display(),
                error = %crate::model::error_chain(problem),
                "an unreadable pod record was moved aside; its interfaces need a look by hand"
            );
            if let Some(telemetry) = &self.telemetry {
                telemetry.quarantined_records.inc();
            }
        }
        for (uid, record) in recorded {
            if live.contains(&uid.as_str()) {
                continue;
            }
            if !record.detached && namespace_alive(&record) {
                tracing::warn!(
                    pod = %record.pod,
                    netns = %record.netns.display(),
                    "the runtime does not list this pod but its network namespace lives: \
                     its interfaces stay until the pod stops"
                );
                continue;
            }
            if let Err(error) = self.release_pod(&uid, true).await {
                tracing::error!(pod_uid = %uid, error = %crate::model::error_chain(&error), "cannot release a pod that is gone");
            }
        }
        Ok(())
    }

    async fn run_pod_sandbox(&self, pod: api::PodSandbox) -> Result<(), HookError> {
        let lock = self.lock(&pod.uid);
        let _guard = lock.lock().await;
        let Some(netns) = network_namespace(&pod) else {
            let claims = self.claims_of(&pod.uid)?;
            return match claims.first() {
                Some(claim) => Err(HookError::NoNetworkNamespace {
                    claim: claim_label(claim),
                    pod: format!("{}/{}", pod.namespace, pod.name),
                }),
                None => Ok(()),
            };
        };
        self.attach_pod(&pod, &netns).await
    }

    async fn stop_pod_sandbox(&self, pod: api::PodSandbox) -> Result<(), HookError> {
        let lock = self.lock(&pod.uid);
        let _guard = lock.lock().await;
        self.release_pod(&pod.uid, false).await
    }

    async fn remove_pod_sandbox(&self, pod: api::PodSandbox) -> Result<(), HookError> {
        let lock = self.lock(&pod.uid);
        let _guard = lock.lock().await;
        let outcome = self.release_pod(&pod.uid, true).await;
        self.remove_nccl_file(&pod.uid);
        self.locks
            .lock()
            .expect("pod locks poisoned")
            .remove(&pod.uid);
        outcome
    }

    async fn create_container(
        &self,
        pod: api::PodSandbox,
        container: api::Container,
    ) -> Result<api::ContainerAdjustment, HookError> {
        let claims = self.claims_of(&pod.uid)?;
        if claims.is_empty() {
            return Ok(api::ContainerAdjustment::default());
        }
        let lock = self.lock(&pod.uid);
        let _guard = lock.lock().await;
        let record = self.load(&pod.uid).await?;
        for claim in &claims {
            let attached = record.as_ref().is_some_and(|r| {
                !r.detached
                    && r.failure.is_none()
                    && r.attachments
                        .iter()
                        .filter(|a| a.claim_uid == claim.uid)
                        .all(|a| a.pod.is_some())
            });
            if !attached {
                let why = record
                    .as_ref()
                    .and_then(|r| r.failure.clone())
                    .unwrap_or_else(|| "knd was not connected when the pod sandbox started".into());
                return Err(HookError::NotAttached {
                    claim: claim_label(claim),
                    pod: format!("{}/{}", pod.namespace, pod.name),
                    why,
                });
            }
        }
        let (env, mounts) = self.nccl_adjustment(&pod, &container, &claims, record.as_ref())?;
        let devices = self.rdma_devices(&claims);
        let cgroup_rules = devices
            .iter()
            .map(|d| api::LinuxDeviceCgroup {
                allow: true,
                r#type: "c".into(),
                major: Some(api::OptionalInt64 { value: d.major }),
                minor: Some(api::OptionalInt64 { value: d.minor }),
                access: "rwm".into(),
            })
            .collect::<Vec<_>>();
        Ok(api::ContainerAdjustment {
            linux: if devices.is_empty() {
                None
            } else {
                Some(api::LinuxContainerAdjustment {
                    devices,
                    resources: Some(api::LinuxResources {
                        devices: cgroup_rules,
                    }),
                })
            },
            env,
            mounts,
            ..api::ContainerAdjustment::default()
        })
    }
}

/// Whether `uid` is a pod UID that is safe as one path component (letters, digits, dashes).
/// What a share attached as `side` is held to besides its bandwidth: its addresses in the pod
/// (their TCP connections are paced) and whether what it receives is policed too
/// (`share.policeIngress` of its claim's configuration, `config`).
fn share_terms(
    side: &PodSide,
    config: Option<&crate::model::config::NetworkConfig>,
) -> (Vec<std::net::IpAddr>, bool) {
    let addresses = side.addresses.iter().map(ipnet::IpNet::addr).collect();
    let ingress = config
        .and_then(|c| c.share)
        .and_then(|s| s.police_ingress)
        .unwrap_or(false);
    (addresses, ingress)
}

fn is_plain_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Writes the pod's NCCL topology file atomically under `files.dir/<uid>/` and returns the
/// read-only bind mount that shows it to the container at [`attach::nccl::TOPOLOGY_PATH`].
fn write_topology(files: &NcclFiles, uid: &str, topology: &str) -> Result<api::Mount, NcclFailure> {
    let dir = files.dir.join(uid);
    let path = dir.join("topo.xml");
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let staged = dir.join(".topo.xml.new");
        std::fs::write(&staged, topology)?;
        std::fs::rename(&staged, &path)
    };
    write().map_err(|source| NcclFailure::Write {
        path: path.clone(),
        source,
    })?;
    Ok(api::Mount {
        destination: attach::nccl::TOPOLOGY_PATH.to_owned(),
        r#type: "bind".to_owned(),
        source: files
            .runtime_dir
            .join(uid)
            .join("topo.xml")
            .to_string_lossy()
            .into_owned(),
        options: vec!["rbind".to_owned(), "ro".to_owned()],
    })
}
