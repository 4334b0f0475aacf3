//! NodePrepareResources / NodeUnprepareResources as domain logic: read the claim, take our
//! allocation results and opaque configs, check that each device is this node's to give,
//! validate, record in the state store, answer.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use tokio::sync::watch;

use crate::{
    discover::inventory::Inventory,
    model::{
        claim::{AllocationConfig, Claim},
        config::{self, ConfigError, DeviceLimits, NetworkConfig},
        ports::{ClaimApi, ClaimOutcome, ClaimRef, SourceError},
        records::{PreparedClaim, PreparedDevice},
    },
    os::state::{self, StateStore},
    publish::resources,
};

/// Failures that are not the claim's fault: kubelet gets a gRPC error and retries.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    /// The claim, or what it refers to, could not be read from the API.
    #[error("cannot read claim {claim}")]
    Source {
        /// The claim.
        claim: String,
        /// What could not be read, and why.
        #[source]
        source: SourceError,
    },
    /// The state store failed.
    #[error(transparent)]
    State(#[from] state::Error),
    /// A blocking task died.
    #[error("a worker task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// What preparing one claim came to, before anything is recorded.
enum Planned {
    /// Prepared earlier: the recorded answer.
    Known(Vec<PreparedDevice>),
    /// Prepared now: to be recorded before kubelet hears of it.
    New(PreparedClaim),
    /// The claim's own problem.
    Refused(String),
}

/// What this node can give: its pool and the devices it publishes now. An allocation naming
/// anything else (another pool, a device never published or gone since) is refused at prepare,
/// not discovered at pod start.
#[derive(Debug, Clone)]
pub struct NodeDevices {
    /// This node's pool (the node's name).
    pub pool: String,
    /// The live inventory the pool is published from.
    pub inventory: watch::Receiver<Arc<Inventory>>,
    /// Which NICs are published as shared (`--shared-nics`): only those are allocated as
    /// shares, and they only as shares.
    pub shared: Option<Arc<crate::publish::selector::Selector>>,
}

/// What else happens when a claim is prepared or released (the daemon links the telemetry
/// programs to a prepared claim's NICs ahead of its pod).
#[derive(Clone)]
pub struct ClaimHooks {
    /// Called with each newly prepared claim, once it is recorded.
    pub prepared: Arc<dyn Fn(&PreparedClaim) + Send + Sync>,
    /// Called with the UID of each released claim.
    pub released: Arc<dyn Fn(&str) + Send + Sync>,
}

impl std::fmt::Debug for ClaimHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimHooks").finish_non_exhaustive()
    }
}

/// Prepares and unprepares claims for one driver.
#[derive(Debug)]
pub struct Preparer<S> {
    driver: String,
    node: NodeDevices,
    store: Arc<StateStore>,
    source: S,
    durations: Option<prometheus_client::metrics::histogram::Histogram>,
    alignment: Option<super::alignment::Alignment>,
    hooks: Option<ClaimHooks>,
}

impl<S: ClaimApi> Preparer<S> {
    /// A preparer for `driver` on the node whose devices are `node`, recording into `store`.
    pub fn new(
        driver: impl Into<String>,
        node: NodeDevices,
        store: Arc<StateStore>,
        source: S,
    ) -> Self {
        Self {
            driver: driver.into(),
            node,
            store,
            source,
            durations: None,
            alignment: None,
            hooks: None,
        }
    }

    /// Runs `hooks` as claims are prepared and released.
    #[must_use]
    pub fn with_hooks(mut self, hooks: ClaimHooks) -> Self {
        self.hooks = Some(hooks);
        self
    }

    /// Checks GPU–NIC alignment of claims with GPUs (see [`super::alignment`]).
    #[must_use]
    pub fn with_alignment(mut self, alignment: super::alignment::Alignment) -> Self {
        self.alignment = Some(alignment);
        self
    }

    /// Records how long each call takes in `durations`.
    #[must_use]
    pub fn with_durations(
        mut self,
        durations: prometheus_client::metrics::histogram::Histogram,
    ) -> Self {
        self.durations = Some(durations);
        self
    }

    /// Prepares every claim concurrently, then records the newly prepared ones durably in one
    /// batch before answering. Only internal failures fail the whole call.
    pub async fn prepare(
        &self,
        claims: &[ClaimRef],
    ) -> Result<BTreeMap<String, ClaimOutcome>, InternalError> {
        let started = std::time::Instant::now();
        let answers = self.prepare_all(claims).await;
        if let Some(durations) = &self.durations {
            durations.observe(started.elapsed().as_secs_f64());
        }
        answers
    }

    async fn prepare_all(
        &self,
        claims: &[ClaimRef],
    ) -> Result<BTreeMap<String, ClaimOutcome>, InternalError> {
        let outcomes = futures::future::join_all(claims.iter().map(|c| self.prepare_one(c))).await;
        let mut answers = BTreeMap::new();
        let mut new_records = Vec::new();
        for (claim, outcome) in claims.iter().zip(outcomes) {
            let answer = match outcome? {
                Planned::Known(devices) => Ok(devices),
                Planned::New(record) => {
                    let devices = record.devices.clone();
                    new_records.push(record);
                    Ok(devices)
                }
                Planned::Refused(message) => Err(message),
            };
            answers.insert(claim.uid.clone(), answer);
        }
        if !new_records.is_empty() {
            let store = Arc::clone(&self.store);
            let recorded = blocking(move || {
                store
                    .claims
                    .put_all(new_records.iter().map(|r| (r.uid.as_str(), r)))
                    .map(|()| new_records)
            })
            .await??;
            for record in &recorded {
                if let Some(alignment) = &self.alignment {
                    alignment.record(record);
                }
                self.source.prepared(record);
                if let Some(hooks) = &self.hooks {
                    (hooks.prepared)(record);
                }
            }
        }
        Ok(answers)
    }

    async fn prepare_one(&self, claim: &ClaimRef) -> Result<Planned, InternalError> {
        // Idempotent: a claim prepared before (even by an earlier run) gets the same answer.
        let store = Arc::clone(&self.store);
        let uid = claim.uid.clone();
        if let Some(prepared) = blocking(move || store.claims.get(&uid)).await?? {
            return Ok(Planned::Known(prepared.devices));
        }
        let resource = self
            .source
            .get(&claim.namespace, &claim.name)
            .await
            .map_err(|source| InternalError::Source {
                claim: claim.to_string(),
                source,
            })?;
        let Some(resource) = resource else {
            return Ok(Planned::Refused(format!("claim {claim} does not exist")));
        };
        let mut prepared = match plan(&self.driver, claim, &resource) {
            Ok(prepared) => prepared,
            Err(message) => return Ok(Planned::Refused(message)),
        };
        if let Some(message) = self.not_ours(claim, &prepared).await? {
            return Ok(Planned::Refused(message));
        }
        if let Some(alignment) = &self.alignment
            && alignment.policy != super::alignment::Policy::Ignore
        {
            match self.gpus_of(claim, &resource).await {
                Ok(gpus) => {
                    if let Err(message) = alignment.apply(&mut prepared, &gpus) {
                        return Ok(Planned::Refused(message));
                    }
                }
                // Enforcing needs the answer: kubelet retries. Otherwise prepare without it.
                Err(error) if alignment.policy == super::alignment::Policy::Enforce => {
                    return Err(error);
                }
                Err(error) => {
                    tracing::warn!(%claim, %error, "cannot check GPU alignment");
                }
            }
        }
        Ok(Planned::New(prepared))
    }

    /// Why a device of `prepared` is not this node's to give, if one is not: from another pool,
    /// or neither published now nor already attached to one of this claim's pods (a NIC in a
    /// pod's namespace has left the host's inventory).
    async fn not_ours(
        &self,
        claim: &ClaimRef,
        prepared: &PreparedClaim,
    ) -> Result<Option<String>, InternalError> {
        let pool = &self.node.pool;
        if let Some(device) = prepared.devices.iter().find(|d| d.pool != *pool) {
            return Ok(Some(format!(
                "claim {claim}: request {} was allocated device {} of pool {}, but this node's \
                 pool is {pool}",
                device.requests.join(","),
                device.device,
                device.pool
            )));
        }
        if let Some(message) = self.misallocated_share(claim, prepared) {
            return Ok(Some(message));
        }
        let unpublished: Vec<&PreparedDevice> = {
            let inventory = self.node.inventory.borrow();
            prepared
                .devices
                .iter()
                .filter(|d| resources::published_nic(&inventory, &d.device).is_none())
                .collect()
        };
        if unpublished.is_empty() {
            return Ok(None);
        }
        let store = Arc::clone(&self.store);
        let uid = claim.uid.clone();
        let (pods, _unreadable) = blocking(move || {
            store
                .pods
                .matching(|pod| pod.attachments.iter().any(|a| a.claim_uid == uid))
        })
        .await??;
        let attached: BTreeSet<&str> = pods
            .iter()
            .flat_map(|(_, pod)| &pod.attachments)
            .filter(|a| a.claim_uid == claim.uid && !a.returned)
            .map(|a| a.device.as_str())
            .collect();
        Ok(unpublished
            .iter()
            .find(|d| !attached.contains(d.device.as_str()))
            .map(|device| {
                format!(
                    "claim {claim}: request {} was allocated device {}, which {} does not \
                     publish in pool {pool} (unknown, or gone from this node)",
                    device.requests.join(","),
                    device.device,
                    self.driver
                )
            }))
    }

    /// Why a device of `prepared` was allocated against how it is published, if it was: a share
    /// of a NIC knd does not publish as shared, or a shared NIC allocated whole.
    fn misallocated_share(&self, claim: &ClaimRef, prepared: &PreparedClaim) -> Option<String> {
        let inventory = self.node.inventory.borrow();
        prepared.devices.iter().find_map(|device| {
            let is_shared = self.node.shared.as_ref().is_some_and(|selector| {
                resources::published_nic(&inventory, &device.device)
                    .and_then(|nic| selector.share_capacity(nic))
                    .is_some()
            });
            match (&device.share, is_shared) {
                (Some(_), false) => Some(format!(
                    "claim {claim}: request {} was allocated a share of device {}, which {} does \
                     not publish as a shared NIC",
                    device.requests.join(","),
                    device.device,
                    self.driver
                )),
                (None, true) => Some(format!(
                    "claim {claim}: request {} was allocated device {} whole, but it is a shared \
                     NIC (allocated only in shares: ask for all of its bandwidth to have it alone)",
                    device.requests.join(","),
                    device.device
                )),
                _ => None,
            }
        })
    }

    /// The PCI addresses of the GPUs other drivers allocated in `resource`, or else in the
    /// other claims of its pods.
    async fn gpus_of(
        &self,
        claim: &ClaimRef,
        resource: &Claim,
    ) -> Result<Vec<String>, InternalError> {
        let mut others = super::alignment::other_devices(&self.driver, resource);
        // No GPU in this claim: the pod's other claims.
        if others.is_empty() {
            for pod in resource.pods() {
                let claims = self
                    .source
                    .pod_claims(&claim.namespace, (&pod.name, &pod.uid))
                    .await
                    .map_err(|source| InternalError::Source {
                        claim: claim.to_string(),
                        source,
                    })?;
                for other in &claims {
                    others.extend(super::alignment::other_devices(&self.driver, other));
                }
            }
        }
        let mut gpus = Vec::new();
        for (driver, pool, device) in others {
            let address = self
                .source
                .device_attribute(&driver, &pool, &device, resources::PCI_BUS_ID)
                .await
                .map_err(|source| InternalError::Source {
                    claim: claim.to_string(),
                    source,
                })?;
            gpus.extend(address);
        }
        Ok(gpus)
    }

    /// Releases every claim (forgets it; interfaces are given back when the pod stops).
    pub async fn unprepare(
        &self,
        claims: &[ClaimRef],
    ) -> Result<BTreeMap<String, Result<(), String>>, InternalError> {
        let mut outcomes = BTreeMap::new();
        for claim in claims {
            let store = Arc::clone(&self.store);
            let uid = claim.uid.clone();
            let known = blocking(move || {
                let known = store.claims.get(&uid)?;
                store.claims.remove(&uid).map(|()| known)
            })
            .await??;
            if let Some(record) = known {
                if let Some(alignment) = &self.alignment {
                    alignment.forget(&record);
                }
                self.source.released(claim);
                if let Some(hooks) = &self.hooks {
                    (hooks.released)(&claim.uid);
                }
            }
            outcomes.insert(claim.uid.clone(), Ok(()));
        }
        Ok(outcomes)
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, InternalError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(InternalError::Task)
}

/// What preparing `claim` means for `driver`, or the error to report on the claim.
pub fn plan(driver: &str, claim: &ClaimRef, resource: &Claim) -> Result<PreparedClaim, String> {
    let actual_uid = &resource.uid;
    if *actual_uid != claim.uid {
        return Err(format!(
            "claim {claim} has UID {actual_uid}, but kubelet asked for UID {}",
            claim.uid
        ));
    }
    let Some(devices) = &resource.allocation else {
        return Err(format!("claim {claim} is not allocated"));
    };
    let results: Vec<_> = devices
        .results
        .iter()
        .filter(|r| r.driver == driver)
        .collect();
    if results.is_empty() {
        return Err(format!(
            "claim {claim} has no devices allocated by {driver}"
        ));
    }
    if let Some(admin) = results.iter().find(|r| r.admin_access) {
        return Err(format!(
            "claim {claim}: request {} asks for adminAccess to device {}; {driver} refuses it: \
             a NIC is moved into one pod's namespace, so it cannot also be handed to an \
             administrator's pod",
            admin.request, admin.device
        ));
    }
    let configs = parse_configs(driver, &devices.configs).map_err(|e| e.to_string())?;
    let prepared_devices = results
        .iter()
        .map(|result| {
            let config = configs
                .iter()
                .filter(|c| applies(c.requests.as_deref(), &result.request))
                .fold(config::default_config(), |merged, c| {
                    merged.merge(c.config.clone())
                });
            // Layers are valid alone; what only their combination decides (a sysctl of one
            // layer naming another interface than the `interface.name` of another) is checked
            // on the merged result.
            config.validate(DeviceLimits::default()).map_err(|e| {
                format!(
                    "claim {claim}: the configuration of request {} (merged from its layers): {e}",
                    result.request
                )
            })?;
            let share = share_of(result, &config).map_err(|e| {
                format!(
                    "claim {claim}: request {} (device {}): {e}",
                    result.request, result.device
                )
            })?;
            Ok(PreparedDevice {
                requests: vec![result.request.clone()],
                pool: result.pool.clone(),
                device: result.device.clone(),
                config,
                topology: None,
                share,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(PreparedClaim {
        uid: claim.uid.clone(),
        namespace: claim.namespace.clone(),
        name: claim.name.clone(),
        pod_uids: resource
            .reserved_for
            .iter()
            .map(|r| r.uid.clone())
            .collect(),
        devices: prepared_devices,
    })
}

/// The share `result` was allocated, if it is one, checked against what a share can be
/// configured with: a share is a child of a NIC other claims share, so nothing that would
/// change the NIC itself (ethtool features, RDMA devices) applies, and it is always measured
/// (its enforcement and its telemetry are the same programs).
fn share_of(
    result: &crate::model::claim::AllocatedDevice,
    config: &NetworkConfig,
) -> Result<Option<crate::model::records::PreparedShare>, String> {
    let Some(share) = &result.share else {
        if config.share.is_some() {
            return Err(
                "share: applies only to a device allocated as a share (the device was \
                 allocated whole)"
                    .into(),
            );
        }
        return Ok(None);
    };
    let share = share.clone()?;
    let bandwidth = share.bandwidth.ok_or(
        "the allocation result has a shareID but no consumedCapacity.bandwidth: knd cannot \
         tell the share's rate",
    )?;
    if bandwidth == 0 {
        return Err("consumedCapacity.bandwidth is 0".into());
    }
    for (set, field) in [
        (config.ethtool.is_some(), "ethtool"),
        (config.rdma.is_some(), "rdma"),
        (
            config.telemetry.is_some_and(|t| !t.enabled),
            "telemetry.enabled: false",
        ),
    ] {
        if set {
            return Err(format!(
                "{field}: refused for a share of a shared NIC (it would change the NIC other \
                 claims share, or leave the share unenforced)"
            ));
        }
    }
    Ok(Some(crate::model::records::PreparedShare {
        id: share.id,
        bandwidth,
    }))
}

/// One of our opaque configs, parsed and validated on its own.
#[derive(Debug)]
struct Layer {
    requests: Option<Vec<String>>,
    config: NetworkConfig,
}

/// Our opaque configs in the order they apply: class configs first, then claim configs; each
/// validated alone so an error names `config[i]` as it appears in the claim's status.
fn parse_configs(driver: &str, entries: &[AllocationConfig]) -> Result<Vec<Layer>, ConfigError> {
    let mut layers: Vec<(bool, Layer)> = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let Some((_, parameters)) = entry.opaque.as_ref().filter(|(d, _)| d == driver) else {
            continue;
        };
        let raw = serde_json::to_vec(parameters).unwrap_or_default();
        let parent = format!("config[{index}]");
        let config = config::parse(&raw).map_err(|e| e.within(&parent))?;
        config
            .validate(DeviceLimits::default())
            .map_err(|e| e.within(&parent))?;
        layers.push((
            entry.from_claim,
            Layer {
                requests: entry.requests.clone().filter(|r| !r.is_empty()),
                config,
            },
        ));
    }
    // Stable: class configs keep their order, then claim configs keep theirs.
    layers.sort_by_key(|(from_claim, _)| *from_claim);
    Ok(layers.into_iter().map(|(_, layer)| layer).collect())
}

/// Whether a config for `requests` (none: the whole claim) applies to a result of `request`
/// (`main` or the subrequest `main/sub`).
fn applies(requests: Option<&[String]>, request: &str) -> bool {
    let parent = request.split('/').next().unwrap_or(request);
    requests.is_none_or(|list| list.iter().any(|r| r == request || r == parent))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::claim::{AllocatedDevice, Allocation};

    /// A tenant's claim config names the pod's `eth0` in a sysctl while the class config names
    /// the claim's interface `net1`: each layer is valid alone, the merged one is refused.
    #[test]
    fn layers_that_only_together_name_another_interface_are_refused() {
        let opaque = |from_claim: bool, parameters: serde_json::Value| AllocationConfig {
            from_claim,
            requests: None,
            opaque: Some((
                "knd.dev".into(),
                serde_json::json!({"apiVersion": "knd.dev/v1alpha1", "kind": "NetworkConfig"})
                    .as_object()
                    .unwrap()
                    .clone()
                    .into_iter()
                    .chain(parameters.as_object().unwrap().clone())
                    .collect::<serde_json::Map<_, _>>()
                    .into(),
            )),
        };
        let claim = Claim {
            uid: "u1".into(),
            reserved_for: Vec::new(),
            allocation: Some(Allocation {
                results: vec![AllocatedDevice {
                    request: "nic".into(),
                    driver: "knd.dev".into(),
                    pool: "n".into(),
                    device: "d".into(),
                    admin_access: false,
                    share: None,
                }],
                configs: vec![
                    opaque(false, serde_json::json!({"interface": {"name": "net1"}})),
                    opaque(
                        true,
                        serde_json::json!({"sysctls": {"net.ipv4.conf.eth0.rp_filter": "0"}}),
                    ),
                ],
            }),
        };
        let reference = ClaimRef {
            namespace: "ml".into(),
            uid: "u1".into(),
            name: "c".into(),
        };
        let err = plan("knd.dev", &reference, &claim).unwrap_err();
        assert!(
            err.contains("request nic")
                && err.contains("sysctls.net.ipv4.conf.eth0.rp_filter")
                && err.contains("the claim's interface in the pod is `net1`"),
            "{err}"
        );
    }

    #[test]
    fn configs_apply_to_their_requests_and_subrequests() {
        assert!(applies(None, "nic"));
        let list = vec!["nic".to_owned()];
        assert!(applies(Some(&list), "nic"));
        assert!(applies(Some(&list), "nic/fast"));
        assert!(!applies(Some(&list), "gpu"));
        let sub = vec!["nic/fast".to_owned()];
        assert!(applies(Some(&sub), "nic/fast"));
        assert!(!applies(Some(&sub), "nic/slow"));
    }
}
