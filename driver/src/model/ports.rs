//! The ports between the stages and the outside: how claims are read and their status written
//! ([`ClaimApi`]), and what the adapters report (device status, device health).

use k8s_openapi::api::resource::v1::NetworkDeviceData;

use super::{
    claim::Claim,
    records::{PreparedClaim, PreparedDevice},
};

/// A claim as kubelet names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRef {
    /// Namespace.
    pub namespace: String,
    /// UID kubelet expects.
    pub uid: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for ClaimRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why the claims' source could not answer: what was asked, and the cause (in the daemon, the
/// Kubernetes API client's error, kept whole).
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct SourceError {
    /// What was being read (`reading ResourceClaim ml/c1`).
    pub what: String,
    /// Why it could not be.
    #[source]
    pub cause: Box<dyn std::error::Error + Send + Sync>,
}

impl SourceError {
    /// `what` failed because of `cause`.
    pub fn new(
        what: impl Into<String>,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            what: what.into(),
            cause: cause.into(),
        }
    }
}

/// The claims' side of the API: where claims are read from (the Kubernetes API in the daemon, a
/// map in tests) and where their status goes.
pub trait ClaimApi: Send + Sync + 'static {
    /// The claim, or `None` if it does not exist.
    fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<Claim>, SourceError>> + Send;

    /// A string attribute of another driver's device from its ResourceSlices (e.g. a GPU's
    /// `resource.kubernetes.io/pciBusID`), or `None` when it is not published.
    fn device_attribute(
        &self,
        _driver: &str,
        _pool: &str,
        _device: &str,
        _attribute: &str,
    ) -> impl Future<Output = Result<Option<String>, SourceError>> + Send {
        async { Ok(None) }
    }

    /// The other claims of pod `pod` (name, UID) in `namespace` that are reserved for it (a
    /// pod's GPU often comes in a claim of its own).
    fn pod_claims(
        &self,
        _namespace: &str,
        _pod: (&str, &str),
    ) -> impl Future<Output = Result<Vec<Claim>, SourceError>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Called once for each newly prepared claim, after it was recorded; must not block (the
    /// daemon writes the claim's status in the background).
    fn prepared(&self, _claim: &PreparedClaim) {}

    /// Called once for each released claim, after it was forgotten; must not block.
    fn released(&self, _claim: &ClaimRef) {}

    /// Called when a claim's devices were attached to its pod (with what the pod sees); must
    /// not block.
    fn attached(&self, _claim: &ClaimRef, _devices: Vec<DeviceReport>) {}

    /// Tells the claim's owner about something refused on its behalf (a Warning Event with
    /// `reason`); must not block.
    fn warn(&self, _claim: &ClaimRef, _reason: &str, _note: &str) {}
}

/// The outcome for one claim: our devices, or an error meant for the claim's owner.
pub type ClaimOutcome = Result<Vec<PreparedDevice>, String>;

/// What a device's status entry says.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReport {
    /// Pool.
    pub pool: String,
    /// Device.
    pub device: String,
    /// Whether the device is ready for the pod.
    pub ready: bool,
    /// `Ready` condition reason (CamelCase).
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// KEP-4817 network data, when known.
    pub network: Option<NetworkDeviceData>,
    /// Its distance to the claim's closest GPU (the `TopologyAligned` condition).
    pub topology: Option<crate::model::distance::Finding>,
    /// The allocation's `shareID` when the device is a share of a shared NIC (the status
    /// entry's key includes it).
    pub share_id: Option<String>,
}

/// A device's health as reported to kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceHealth {
    /// Pool (the node's name).
    pub pool: String,
    /// Device name.
    pub device: String,
    /// Healthy or not (see [`crate::observe::health`]).
    pub healthy: bool,
    /// Why it is unhealthy (empty when healthy); sent to kubelets that take a message.
    pub reason: String,
    /// The kind of trouble, when unhealthy: what a taint's value names.
    pub cause: Option<Cause>,
}

/// What makes a device unhealthy, in one word a taint value can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    /// Its link (or every RDMA port of an RDMA-only device) is down.
    LinkDown,
    /// Its carrier changes too often.
    Flapping,
    /// An error counter rises.
    Errors,
}

impl Cause {
    /// The taint value: `link-down`, `flapping` or `errors`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::LinkDown => "link-down",
            Self::Flapping => "flapping",
            Self::Errors => "errors",
        }
    }
}

/// A device knd marks as unhealthy in its ResourceSlice: why, and since when (whole seconds
/// since the Unix epoch, as the API stores a taint's `timeAdded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taint {
    /// The cause when the taint was added (kept while the device stays unhealthy, so that a
    /// changing reason does not rewrite the slice).
    pub cause: Cause,
    /// When it was added.
    pub since_unix_seconds: i64,
}
