//! The Kubernetes API side of the driver (kube-rs): the client, claims read for prepare, the
//! node's ResourceSlices, and claim status written with server-side apply.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::Path,
    sync::Arc,
    time::Duration,
};

use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::Node,
        resource::v1::{
            AllocatedDeviceStatus, Device, DeviceTaint, NetworkDeviceData, ResourceClaim,
            ResourceSlice,
        },
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    discover::inventory::Inventory,
    model::{
        claim::{AllocatedDevice, Allocation, AllocationConfig, Claim, Reservation},
        ports::{ClaimApi, ClaimRef, DeviceReport, SourceError, Taint},
        records::PreparedClaim,
    },
    os::backoff::Backoff,
    publish::resources::{self, NodeOwner, TaintEffect},
};

/// Errors talking to the API server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// What was wrong.
        message: String,
    },
    /// No kubeconfig was given and the in-cluster configuration is missing.
    #[error("no --kubeconfig and no in-cluster configuration: {0}")]
    InCluster(String),
    /// The node this driver runs on is not registered with the API server.
    #[error("node {0} does not exist in the API")]
    NodeNotFound(String),
    /// A request failed.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
}

impl Error {
    fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| Self::Api { action, source }
    }

    /// The HTTP status of an API error, if the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api {
                source: kube::Error::Api(status),
                ..
            } => Some(status.code),
            _ => None,
        }
    }
}

/// A client from `kubeconfig`, or from the in-cluster service account when `None`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let mut config = match kubeconfig {
        Some(path) => {
            let problem = |message: String| Error::Kubeconfig {
                path: path.display().to_string(),
                message,
            };
            let file = Kubeconfig::read_from(path).map_err(|e| problem(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| problem(e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| Error::InCluster(e.to_string()))?,
    };
    // kube's built-in retry backs off for minutes inside a single request, where neither
    // shutdown nor kubelet's deadline can interrupt it. knd retries where it knows the stakes:
    // status writes and publishing retry with a cancellable backoff; prepare fails fast and
    // kubelet retries the call.
    config.default_retry = false;
    Client::try_from(config).map_err(|e| Error::Kubeconfig {
        path: kubeconfig.map_or_else(|| "in-cluster".into(), |p| p.display().to_string()),
        message: e.to_string(),
    })
}

/// What one publication did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// The pool generation now in the API.
    pub generation: i64,
    /// Slices in the pool.
    pub slices: usize,
    /// Devices in the pool.
    pub devices: usize,
    /// Slices created, updated and deleted by this publication (all zero when nothing changed).
    pub created: usize,
    /// See `created`.
    pub updated: usize,
    /// See `created`.
    pub deleted: usize,
    /// The API kept every taint this publication wrote (true when it wrote none).
    pub taints_kept: bool,
    /// The API kept every shared device shared (true when there was none).
    pub shares_kept: bool,
}

/// The Node's `InternalIP` and `ExternalIP` addresses (`status.addresses`).
pub async fn node_addresses(client: Client, node: &str) -> Result<Vec<std::net::IpAddr>, Error> {
    let found = Api::<Node>::all(client)
        .get_opt(node)
        .await
        .map_err(Error::api(format!("read node {node}")))?
        .ok_or_else(|| Error::NodeNotFound(node.to_owned()))?;
    Ok(found
        .status
        .and_then(|s| s.addresses)
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect())
}

/// Publishes the node's pool: one or more ResourceSlices owned by the Node, the pool generation
/// bumped whenever the content changes, slices that are no longer needed deleted.
#[derive(Debug)]
pub struct Publisher {
    slices: Api<ResourceSlice>,
    nodes: Api<Node>,
    driver: String,
    node: String,
    owner: Option<NodeOwner>,
    /// The newest generation this publisher wrote: never goes backwards, even if every slice
    /// was deleted behind its back.
    generation: i64,
    /// The effect of the unhealthy taint; `None`: no taints are published.
    taint_effect: Option<TaintEffect>,
    /// The API server dropped the taints of a write (an API server before 1.36, where device
    /// taints are an alpha feature and off): taints are left out from then on.
    taints_dropped: bool,
    /// The NICs published as shared (consumable bandwidth), if any.
    shared: Option<Arc<crate::publish::selector::Selector>>,
    /// The API server dropped `allowMultipleAllocations` (before 1.36 consumable capacity is
    /// alpha and off): shared NICs are not published at all from then on.
    shares_dropped: bool,
}

impl Publisher {
    /// A publisher for `driver`'s pool on `node`.
    pub fn new(client: Client, driver: &str, node: &str) -> Self {
        Self {
            slices: Api::all(client.clone()),
            nodes: Api::all(client),
            driver: driver.to_owned(),
            node: node.to_owned(),
            owner: None,
            generation: 0,
            taint_effect: Some(TaintEffect::NoSchedule),
            taints_dropped: false,
            shared: None,
            shares_dropped: false,
        }
    }

    /// Publishes the NICs `selector` accepts as shared NICs (see
    /// [`resources::make_shared`]).
    #[must_use]
    pub fn with_shared(
        mut self,
        selector: Option<Arc<crate::publish::selector::Selector>>,
    ) -> Self {
        self.shared = selector;
        self
    }

    /// Whether the API server turned out not to keep shared devices.
    pub fn shares_dropped(&self) -> bool {
        self.shares_dropped
    }

    /// Publishes unhealthy devices' taints with `effect`, or none (`None`).
    #[must_use]
    pub fn with_taint_effect(mut self, effect: Option<TaintEffect>) -> Self {
        self.taint_effect = effect;
        self
    }

    /// Whether the API server turned out not to keep device taints.
    pub fn taints_dropped(&self) -> bool {
        self.taints_dropped
    }

    /// The Node that owns the slices (read once).
    async fn owner(&mut self) -> Result<NodeOwner, Error> {
        if let Some(owner) = &self.owner {
            return Ok(owner.clone());
        }
        let node = self
            .nodes
            .get_opt(&self.node)
            .await
            .map_err(Error::api(format!("read node {}", self.node)))?
            .ok_or_else(|| Error::NodeNotFound(self.node.clone()))?;
        let owner = NodeOwner {
            name: self.node.clone(),
            uid: node.metadata.uid.unwrap_or_default(),
        };
        self.owner = Some(owner.clone());
        Ok(owner)
    }

    /// Makes the API's slices for this pool match `inventory`. Safe to repeat: when the API
    /// already holds this content, nothing is written.
    pub async fn publish(&mut self, inventory: &Inventory) -> Result<Published, Error> {
        self.publish_tainted(inventory, &BTreeMap::new()).await
    }

    /// [`publish`](Self::publish), with `taints` (by device name) on the devices. When the API
    /// server drops them (before 1.36 device taints are alpha and off), says so once and
    /// publishes without them from then on.
    pub async fn publish_tainted(
        &mut self,
        inventory: &Inventory,
        taints: &BTreeMap<String, Taint>,
    ) -> Result<Published, Error> {
        let mut published = self.publish_once(inventory, taints).await?;
        if !self.shares_dropped && !published.shares_kept {
            self.shares_dropped = true;
            tracing::warn!(
                "the API server dropped allowMultipleAllocations (consumable capacity is on by \
                 default from Kubernetes 1.36, alpha before); the shared NICs are not published, \
                 so that no claim gets one whole while it is meant to be shared"
            );
            published = self.publish_once(inventory, taints).await?;
        }
        if self.taints_dropped || published.taints_kept {
            return Ok(published);
        }
        self.taints_dropped = true;
        tracing::warn!(
            "the API server dropped the devices' taints (device taints are on by default from \
             Kubernetes 1.36, alpha before); unhealthy devices are reported to kubelet only"
        );
        self.publish_once(inventory, taints).await
    }

    async fn publish_once(
        &mut self,
        inventory: &Inventory,
        taints: &BTreeMap<String, Taint>,
    ) -> Result<Published, Error> {
        let taints: BTreeMap<String, DeviceTaint> = match self.taint_effect {
            Some(effect) if !self.taints_dropped => taints
                .iter()
                .filter(|(device, _)| resources::published_nic(inventory, device).is_some())
                .map(|(device, taint)| (device.clone(), resources::device_taint(taint, effect)))
                .collect(),
            _ => BTreeMap::new(),
        };
        let shared = match &self.shared {
            Some(selector) => selector.shared_devices(inventory),
            None => BTreeMap::new(),
        };
        let without_shared;
        let inventory = if self.shares_dropped && !shared.is_empty() {
            let mut kept = inventory.clone();
            kept.nics
                .retain(|nic| !shared.contains_key(&resources::device_name(nic)));
            without_shared = kept;
            &without_shared
        } else {
            inventory
        };
        let shared = if self.shares_dropped {
            BTreeMap::new()
        } else {
            shared
        };
        let owner = self.owner().await?;
        let selector = format!("spec.driver={},spec.nodeName={}", self.driver, self.node);
        let existing: BTreeMap<String, ResourceSlice> = self
            .slices
            .list(&ListParams::default().fields(&selector))
            .await
            .map_err(Error::api("list ResourceSlices"))?
            .items
            .into_iter()
            .map(|s| (s.metadata.name.clone().unwrap_or_default(), s))
            .collect();
        let current = existing
            .values()
            .map(|s| s.spec.pool.generation)
            .max()
            .unwrap_or(0);
        let build = |generation| {
            resources::slices_of(
                inventory,
                (&self.driver, &self.node, generation),
                Some(&owner),
                &taints,
                &shared,
            )
        };
        let devices = inventory.nics.len();
        let unchanged = build(current);
        if !existing.is_empty() && same_pool(&existing, &unchanged) {
            return Ok(Published {
                generation: current,
                slices: unchanged.len(),
                devices,
                taints_kept: true,
                shares_kept: true,
                ..Published::default()
            });
        }
        let generation = current.max(self.generation) + 1;
        let desired = build(generation);
        let mut published = Published {
            generation,
            slices: desired.len(),
            devices,
            taints_kept: true,
            shares_kept: true,
            ..Published::default()
        };
        self.write(&existing, &desired, &mut published).await?;
        self.generation = generation;
        Ok(published)
    }

    /// Writes the new generation first, then removes what it no longer needs: a reader sees the
    /// old pool or an incomplete new one, which the scheduler waits out.
    async fn write(
        &self,
        existing: &BTreeMap<String, ResourceSlice>,
        desired: &[ResourceSlice],
        published: &mut Published,
    ) -> Result<(), Error> {
        for mut slice in desired.iter().cloned() {
            let name = slice.metadata.name.clone().unwrap_or_default();
            if let Some(old) = existing.get(&name) {
                slice
                    .metadata
                    .resource_version
                    .clone_from(&old.metadata.resource_version);
                let stored = self
                    .slices
                    .replace(&name, &PostParams::default(), &slice)
                    .await
                    .map_err(Error::api(format!("update ResourceSlice {name}")))?;
                published.taints_kept &= same_taints(&slice, &stored);
                published.shares_kept &= same_shares(&slice, &stored);
                published.updated += 1;
            } else {
                let stored = self
                    .slices
                    .create(&PostParams::default(), &slice)
                    .await
                    .map_err(Error::api(format!("create ResourceSlice {name}")))?;
                published.taints_kept &= same_taints(&slice, &stored);
                published.shares_kept &= same_shares(&slice, &stored);
                published.created += 1;
            }
        }
        let wanted: Vec<_> = desired
            .iter()
            .filter_map(|s| s.metadata.name.as_ref())
            .collect();
        for (name, old) in existing {
            if wanted.contains(&name) {
                continue;
            }
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: old.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match self.slices.delete(name, &params).await {
                Ok(_) => published.deleted += 1,
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(err) => return Err(Error::api(format!("delete ResourceSlice {name}"))(err)),
            }
        }
        Ok(())
    }
}

/// Whether the API server kept in `stored` all that `per_device` counts in `sent` (a server
/// with a feature off drops its fields without an error).
fn kept(sent: &ResourceSlice, stored: &ResourceSlice, per_device: fn(&Device) -> usize) -> bool {
    let count = |slice: &ResourceSlice| -> usize {
        slice.spec.devices.iter().flatten().map(per_device).sum()
    };
    count(stored) == count(sent)
}

/// Whether every device of `stored` carries as many taints as in `sent`.
fn same_taints(sent: &ResourceSlice, stored: &ResourceSlice) -> bool {
    kept(sent, stored, |d| d.taints.as_ref().map_or(0, Vec::len))
}

/// Whether the API server kept every shared device of `sent` shared in `stored`.
fn same_shares(sent: &ResourceSlice, stored: &ResourceSlice) -> bool {
    kept(sent, stored, |d| {
        usize::from(d.allow_multiple_allocations == Some(true))
    })
}

/// Whether the API's slices are exactly the wanted ones (names, specs, owners, labels).
fn same_pool(existing: &BTreeMap<String, ResourceSlice>, wanted: &[ResourceSlice]) -> bool {
    existing.len() == wanted.len()
        && wanted.iter().all(|slice| {
            let name = slice.metadata.name.as_deref().unwrap_or_default();
            existing.get(name).is_some_and(|old| {
                old.metadata.owner_references == slice.metadata.owner_references
                    && old.metadata.labels == slice.metadata.labels
                    && serde_json::to_value(&old.spec).ok()
                        == serde_json::to_value(&slice.spec).ok()
            })
        })
}

/// This node's ResourceSlices, every driver's, kept current by a watch (kube's reflector): a
/// prepare reads other drivers' devices here, without a request of its own, however large the
/// cluster and however many claims.
#[derive(Clone)]
struct NodeSlices {
    reader: reflector::Store<ResourceSlice>,
}

impl NodeSlices {
    /// Starts watching `node`'s slices; the watch ends with `shutdown`.
    fn watch(client: Client, node: &str, shutdown: CancellationToken, tasks: &TaskTracker) -> Self {
        let api: Api<ResourceSlice> = Api::all(client);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let (reader, writer) = reflector::store();
        let stream = reflector(writer, watcher(api, config)).default_backoff();
        tasks.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    event = stream.next() => match event {
                        None => return,
                        Some(Ok(_)) => {}
                        Some(Err(error)) => tracing::debug!(
                            %error,
                            "watching this node's ResourceSlices (retrying; lookups ask the server)"
                        ),
                    },
                }
            }
        });
        Self { reader }
    }

    /// Device `device` of `driver`'s pool `pool` as the watch last saw it: `None` before the
    /// watch's first list or when it is not there (published a moment ago: ask the server).
    fn device(&self, driver: &str, pool: &str, device: &str) -> Option<Device> {
        self.reader.wait_until_ready().now_or_never()?.ok()?;
        let slices = self.reader.state();
        let of_driver = slices
            .iter()
            .map(|s| &**s)
            .filter(|s| s.spec.driver == driver);
        device_in(of_driver, pool, device).cloned()
    }
}

/// Device `name` of pool `pool` among `slices`.
fn device_in<'a>(
    slices: impl IntoIterator<Item = &'a ResourceSlice>,
    pool: &str,
    name: &str,
) -> Option<&'a Device> {
    slices
        .into_iter()
        .filter(|slice| slice.spec.pool.name == pool)
        .flat_map(|slice| slice.spec.devices.iter().flatten())
        .find(|d| d.name == name)
}

/// Reads claims for prepare and writes their status with server-side apply.
#[derive(Clone)]
pub struct ApiClaims {
    client: Client,
    driver: String,
    shutdown: CancellationToken,
    /// `reportingInstance` of the Events knd creates (the node's name in the daemon).
    instance: String,
    /// The node whose claims these are: other drivers' devices are looked up among its slices
    /// only, so the API traffic of a prepare does not grow with the cluster.
    node: Option<String>,
    /// That node's slices, kept by a watch (see [`NodeSlices`]).
    node_slices: Option<NodeSlices>,
    writers: Arc<Writers>,
    /// The status writers and Event posts running in the background, drained at shutdown.
    tasks: TaskTracker,
}

/// The status writers: at most one per claim, writing the latest report it was given.
#[derive(Debug, Default)]
struct Writers {
    state: std::sync::Mutex<WriterState>,
    idle: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct WriterState {
    /// By claim UID: the newest report not yet taken by its writer.
    pending: HashMap<String, (ClaimRef, Vec<DeviceReport>)>,
    /// Claims whose writer runs.
    running: HashSet<String>,
}

impl Writers {
    fn state(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a newer report than the one being written waits for `uid`.
    fn superseded(&self, uid: &str) -> bool {
        self.state().pending.contains_key(uid)
    }
}

impl std::fmt::Debug for ApiClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClaims")
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

/// How a status write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOutcome {
    /// Written.
    Written,
    /// A newer report for the claim came while this one waited to be retried; the newer one
    /// is written instead.
    Superseded,
    /// The API server does not allow knd to write this claim's status (e.g. the claim is
    /// allocated on another node); retrying cannot help.
    Forbidden,
    /// The claim no longer exists (or is another claim with the same name now).
    Gone,
    /// The API refused the content; retrying cannot help.
    Rejected,
    /// Shutdown came first.
    Cancelled,
}

impl ApiClaims {
    /// Claims of `driver` through `client`; background writes stop when `shutdown` is cancelled.
    pub fn new(client: Client, driver: &str, shutdown: CancellationToken) -> Self {
        Self {
            client,
            driver: driver.to_owned(),
            shutdown,
            instance: driver.to_owned(),
            node: None,
            node_slices: None,
            writers: Arc::default(),
            tasks: TaskTracker::new(),
        }
    }

    /// Hands `devices` to the claim's status writer: written after what is being written now,
    /// replacing any report still waiting (the latest wins; a late "prepared" never overwrites
    /// "attached").
    fn submit(&self, claim: ClaimRef, devices: Vec<DeviceReport>) {
        let uid = claim.uid.clone();
        let mut state = self.writers.state();
        state.pending.insert(uid.clone(), (claim, devices));
        if !state.running.insert(uid.clone()) {
            return;
        }
        drop(state);
        let this = self.clone();
        self.tasks.spawn(async move {
            loop {
                let next = {
                    let mut state = this.writers.state();
                    let next = state.pending.remove(&uid);
                    if next.is_none() {
                        state.running.remove(&uid);
                    }
                    next
                };
                let Some((claim, devices)) = next else {
                    this.writers.idle.notify_waiters();
                    return;
                };
                this.write_status(&claim, &devices).await;
            }
        });
    }

    /// Shutdown: waits for the status writes and Events running in the background (a status
    /// write stops retrying once shutdown is requested, so this ends).
    pub async fn drained(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Waits until every status handed to the writers is written or given up.
    pub async fn flushed(&self) {
        loop {
            let idle = self.writers.idle.notified();
            if self.writers.state().running.is_empty() {
                return;
            }
            idle.await;
        }
    }

    /// Names this instance in the Events it creates (e.g. the node).
    #[must_use]
    pub fn with_instance(mut self, instance: &str) -> Self {
        instance.clone_into(&mut self.instance);
        self
    }

    /// The claims of node `node`: it names the Events, and other drivers' devices are looked
    /// up among this node's ResourceSlices only (`spec.nodeName`, filtered by the API server),
    /// which a watch keeps (started here: call it inside the runtime; it ends with shutdown).
    #[must_use]
    pub fn on_node(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self.node_slices = Some(NodeSlices::watch(
            self.client.clone(),
            node,
            self.shutdown.clone(),
            &self.tasks,
        ));
        self.with_instance(node)
    }

    /// Waits until the watch of this node's slices has listed them (at once when there is no
    /// such watch).
    pub async fn node_slices_listed(&self) {
        if let Some(slices) = &self.node_slices {
            let _dropped = slices.reader.wait_until_ready().await;
        }
    }

    /// Creates an `events.k8s.io/v1` Event about `claim` (`kind` `Normal` or `Warning`); a
    /// failure is logged, not retried (Events are best effort).
    pub async fn event(
        &self,
        claim: &ClaimRef,
        kind: &str,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        use k8s_openapi::{
            api::{core::v1::ObjectReference, events::v1::Event},
            apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
        };
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", claim.name)),
                namespace: Some(claim.namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            type_: Some(kind.to_owned()),
            reason: Some(reason.to_owned()),
            action: Some(action.to_owned()),
            note: Some(note.chars().take(1024).collect()),
            reporting_controller: Some(self.driver.clone()),
            reporting_instance: Some(self.instance.chars().take(128).collect()),
            regarding: Some(ObjectReference {
                api_version: Some("resource.k8s.io/v1".into()),
                kind: Some("ResourceClaim".into()),
                name: Some(claim.name.clone()),
                namespace: Some(claim.namespace.clone()),
                uid: Some(claim.uid.clone()),
                ..ObjectReference::default()
            }),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &claim.namespace);
        if let Err(error) = api.create(&PostParams::default(), &event).await {
            tracing::warn!(%claim, %error, reason, "cannot create an Event");
        }
    }

    /// The field manager knd applies status as.
    pub fn field_manager(&self) -> String {
        self.driver.clone()
    }

    /// Applies our entries of `claim`'s `status.devices` (an empty list removes them), retrying
    /// with backoff until written, the claim is gone, a newer report for it is handed to its
    /// writer, or the API refuses the write for good (403, 400, 422: logged, and a Warning
    /// Event on the claim says why).
    pub async fn write_status(&self, claim: &ClaimRef, devices: &[DeviceReport]) -> StatusOutcome {
        let api: Api<ResourceClaim> = Api::namespaced(self.client.clone(), &claim.namespace);
        let entries: Vec<AllocatedDeviceStatus> = devices
            .iter()
            .map(|d| AllocatedDeviceStatus {
                driver: self.driver.clone(),
                pool: d.pool.clone(),
                device: d.device.clone(),
                conditions: Some(conditions(d)),
                network_data: d.network.clone(),
                share_id: d.share_id.clone(),
                ..AllocatedDeviceStatus::default()
            })
            .collect();
        let patch = serde_json::json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            // The UID makes the write a precondition: a new claim with the same name is not ours.
            "metadata": {"name": claim.name, "namespace": claim.namespace, "uid": claim.uid},
            "status": {"devices": entries},
        });
        let params = PatchParams::apply(&self.field_manager()).force();
        let mut backoff = Backoff::new(Duration::from_secs(10));
        loop {
            match api
                .patch_status(&claim.name, &params, &Patch::Apply(&patch))
                .await
            {
                Ok(_) => return StatusOutcome::Written,
                Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {
                    tracing::info!(%claim, reason = %status.message, "claim gone; status not written");
                    return StatusOutcome::Gone;
                }
                Err(kube::Error::Api(status)) if matches!(status.code, 400 | 403 | 422) => {
                    let outcome = if status.code == 403 {
                        StatusOutcome::Forbidden
                    } else {
                        StatusOutcome::Rejected
                    };
                    tracing::error!(
                        %claim,
                        code = status.code,
                        reason = %status.message,
                        "the API refused the claim status; not retried"
                    );
                    let note = format!(
                        "knd could not write the status of its devices ({}): {}",
                        status.code, status.message
                    );
                    self.event(claim, "Warning", "StatusNotWritten", "WriteStatus", &note)
                        .await;
                    return outcome;
                }
                Err(err) => {
                    tracing::warn!(%claim, %err, "cannot write claim status; retrying");
                    if !backoff.wait(&self.shutdown).await {
                        return StatusOutcome::Cancelled;
                    }
                    if self.writers.superseded(&claim.uid) {
                        return StatusOutcome::Superseded;
                    }
                }
            }
        }
    }
}

/// A device's status conditions: `Ready`, and `TopologyAligned` when the claim has GPUs (reason:
/// the distance class).
fn conditions(device: &DeviceReport) -> Vec<Condition> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut conditions = vec![Condition {
        type_: "Ready".into(),
        status: if device.ready { "True" } else { "False" }.into(),
        reason: device.reason.clone(),
        message: device.message.clone(),
        last_transition_time: now.clone(),
        observed_generation: None,
    }];
    if let Some(finding) = &device.topology {
        conditions.push(Condition {
            type_: "TopologyAligned".into(),
            status: if finding.aligned() { "True" } else { "False" }.into(),
            reason: finding.class.as_str().to_owned(),
            message: finding.describe(&device.device),
            last_transition_time: now,
            observed_generation: None,
        });
    }
    conditions
}

/// What the claim's status says once it is prepared: not ready yet (the pod's sandbox does not
/// exist), with the network data the configuration already fixes.
pub fn prepared_report(claim: &PreparedClaim) -> Vec<DeviceReport> {
    claim
        .devices
        .iter()
        .map(|device| {
            let interface = device.config.interface.clone().unwrap_or_default();
            let ips = interface.addresses.unwrap_or_default();
            let network =
                (interface.name.is_some() || !ips.is_empty() || interface.hardware_addr.is_some())
                    .then(|| NetworkDeviceData {
                        interface_name: interface.name,
                        ips: (!ips.is_empty()).then_some(ips),
                        hardware_address: interface.hardware_addr,
                    });
            DeviceReport {
                pool: device.pool.clone(),
                device: device.device.clone(),
                ready: false,
                reason: "Prepared".into(),
                message: "prepared; attached when the pod sandbox starts".into(),
                network,
                topology: device.topology.clone(),
                share_id: device.share.as_ref().map(|s| s.id.clone()),
            }
        })
        .collect()
}

/// The claim as the driver reads it: the API object converted at this edge, once.
pub fn claim_from(resource: &ResourceClaim) -> Claim {
    let status = resource.status.as_ref();
    let devices = status
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref());
    Claim {
        uid: resource.metadata.uid.clone().unwrap_or_default(),
        reserved_for: status
            .and_then(|s| s.reserved_for.as_ref())
            .into_iter()
            .flatten()
            .map(|r| Reservation {
                resource: r.resource.clone(),
                name: r.name.clone(),
                uid: r.uid.clone(),
            })
            .collect(),
        allocation: devices.map(|d| Allocation {
            results: d
                .results
                .iter()
                .flatten()
                .map(|r| AllocatedDevice {
                    request: r.request.clone(),
                    driver: r.driver.clone(),
                    pool: r.pool.clone(),
                    device: r.device.clone(),
                    admin_access: r.admin_access == Some(true),
                    share: r.share_id.as_deref().map(|id| {
                        let bandwidth = r
                            .consumed_capacity
                            .as_ref()
                            .and_then(|c| c.get(crate::model::quantity::BANDWIDTH))
                            .map(|q| q.0.as_str());
                        crate::model::claim::Share::parse(id, bandwidth)
                    }),
                })
                .collect(),
            configs: d
                .config
                .iter()
                .flatten()
                .map(|c| AllocationConfig {
                    from_claim: c.source == "FromClaim",
                    requests: c.requests.clone(),
                    opaque: c
                        .opaque
                        .as_ref()
                        .map(|o| (o.driver.clone(), o.parameters.0.clone())),
                })
                .collect(),
        }),
    }
}

impl ClaimApi for ApiClaims {
    async fn get(&self, namespace: &str, name: &str) -> Result<Option<Claim>, SourceError> {
        let api: Api<ResourceClaim> = Api::namespaced(self.client.clone(), namespace);
        let claim = api.get_opt(name).await.map_err(|e| {
            SourceError::new(format!("reading ResourceClaim {namespace}/{name}"), e)
        })?;
        Ok(claim.as_ref().map(claim_from))
    }

    async fn pod_claims(
        &self,
        namespace: &str,
        (pod_name, pod_uid): (&str, &str),
    ) -> Result<Vec<Claim>, SourceError> {
        // The pod names its claims (templates' generated names in its status): one GET per
        // claim of the pod rather than a LIST of the namespace.
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.client.clone(), namespace);
        let Some(pod) = pods
            .get_opt(pod_name)
            .await
            .map_err(|e| SourceError::new(format!("reading Pod {namespace}/{pod_name}"), e))?
        else {
            return Ok(Vec::new());
        };
        if pod.metadata.uid.as_deref() != Some(pod_uid) {
            return Ok(Vec::new());
        }
        let generated = pod
            .status
            .iter()
            .flat_map(|s| s.resource_claim_statuses.iter().flatten())
            .filter_map(|s| s.resource_claim_name.clone());
        let direct = pod
            .spec
            .iter()
            .flat_map(|s| s.resource_claims.iter().flatten())
            .filter_map(|c| c.resource_claim_name.clone());
        let mut names: Vec<String> = generated.chain(direct).collect();
        names.sort();
        names.dedup();
        let claims: Api<ResourceClaim> = Api::namespaced(self.client.clone(), namespace);
        let mut found = Vec::new();
        for name in names {
            if let Some(claim) = claims
                .get_opt(&name)
                .await
                .map_err(|e| {
                    SourceError::new(format!("reading ResourceClaim {namespace}/{name}"), e)
                })?
                .as_ref()
                .map(claim_from)
                && claim.is_reserved_for(pod_uid)
            {
                found.push(claim);
            }
        }
        Ok(found)
    }

    async fn device_attribute(
        &self,
        driver: &str,
        pool: &str,
        device: &str,
        attribute: &str,
    ) -> Result<Option<String>, SourceError> {
        // Unqualified attribute names belong to the driver's own domain.
        let short = attribute
            .strip_prefix(driver)
            .and_then(|rest| rest.strip_prefix('/'));
        let value_of = |device: &Device| {
            device
                .attributes
                .as_ref()
                .and_then(|attributes| {
                    attributes
                        .get(attribute)
                        .or_else(|| short.and_then(|s| attributes.get(s)))
                })
                .and_then(|value| value.string.clone())
        };
        // The watched slices of this node first: no request at all.
        if let Some(found) = self
            .node_slices
            .as_ref()
            .and_then(|slices| slices.device(driver, pool, device))
        {
            return Ok(value_of(&found));
        }
        // Not (yet) seen there: ask the server. On a node, its own slices: what a prepare reads
        // stays the same however large the cluster. (Devices of pools that are not node-local
        // are not GPUs next to this NIC.)
        let api: Api<ResourceSlice> = Api::all(self.client.clone());
        let selector = match &self.node {
            Some(node) => format!("spec.driver={driver},spec.nodeName={node}"),
            None => format!("spec.driver={driver}"),
        };
        let slices = api
            .list(&ListParams::default().fields(&selector))
            .await
            .map_err(|e| SourceError::new(format!("listing {driver}'s ResourceSlices"), e))?;
        Ok(device_in(&slices.items, pool, device).and_then(value_of))
    }

    fn prepared(&self, claim: &PreparedClaim) {
        let this = self.clone();
        let reference = ClaimRef {
            namespace: claim.namespace.clone(),
            uid: claim.uid.clone(),
            name: claim.name.clone(),
        };
        let report = prepared_report(claim);
        self.submit(reference.clone(), report.clone());
        self.tasks.spawn(async move {
            for device in &report {
                if let Some(finding) = &device.topology {
                    let (kind, reason) = if finding.aligned() {
                        ("Normal", "TopologyAligned")
                    } else {
                        ("Warning", "TopologyMisaligned")
                    };
                    let note = finding.describe(&device.device);
                    this.event(&reference, kind, reason, "Prepare", &note).await;
                }
            }
        });
    }

    fn attached(&self, claim: &ClaimRef, devices: Vec<DeviceReport>) {
        self.submit(claim.clone(), devices);
    }

    fn warn(&self, claim: &ClaimRef, reason: &str, note: &str) {
        let (this, claim) = (self.clone(), claim.clone());
        let (reason, note) = (reason.to_owned(), note.to_owned());
        self.tasks.spawn(async move {
            this.event(&claim, "Warning", &reason, "Release", &note)
                .await;
        });
    }

    fn released(&self, claim: &ClaimRef) {
        self.submit(claim.clone(), Vec::new());
    }
}
