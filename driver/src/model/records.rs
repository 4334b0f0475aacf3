//! The records the node keeps: a claim as prepared for kubelet, and a pod's attachments (each
//! interface's host side before the move and pod side after) — what release restores from.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{
    config::NetworkConfig,
    link::{Address, LinkPeer, LinkSettings, Neighbor, Route},
};

/// A claim as prepared for kubelet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedClaim {
    /// Claim UID (the record key).
    pub uid: String,
    /// Claim namespace.
    pub namespace: String,
    /// Claim name.
    pub name: String,
    /// UIDs of the pods the claim is reserved for.
    pub pod_uids: Vec<String>,
    /// Our devices in the claim, with their effective configuration.
    pub devices: Vec<PreparedDevice>,
}

/// One device of a prepared claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDevice {
    /// Requests this device satisfies.
    pub requests: Vec<String>,
    /// Pool name.
    pub pool: String,
    /// Device name.
    pub device: String,
    /// Class and claim configuration, merged and validated.
    pub config: NetworkConfig,
    /// Its distance to the claim's closest GPU, when the claim has GPUs (see
    /// [`crate::dra::alignment`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<crate::model::distance::Finding>,
    /// A share of a shared NIC (`None`: the whole device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<PreparedShare>,
}

/// A share of a shared NIC, as allocated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedShare {
    /// The allocation's `shareID` (the claim status entry carries it).
    pub id: String,
    /// Bits per second the share consumes: what it is paced and policed to.
    pub bandwidth: u64,
}

/// The host side of an interface, recorded before it is moved: what a restore puts back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSide {
    /// Index, name, MTU, MAC, up.
    pub link: LinkSettings,
    /// Its addresses, with their flags, labels, scopes and lifetimes.
    #[serde(deserialize_with = "super::link::addresses_of_any_age")]
    pub addresses: Vec<Address>,
    /// The routes out of it (not the kernel's own), in every table.
    pub routes: Vec<Route>,
    /// Its static neighbor entries (policy rules name interfaces and outlive them, so they
    /// need no restore; these are flushed when the interface leaves).
    #[serde(default)]
    pub neighbors: Vec<Neighbor>,
    /// The host's state of the device features a claim changes (see [`crate::attach::record_for`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub features: BTreeMap<String, bool>,
}

impl HostSide {
    /// The prefixes of its addresses.
    pub fn nets(&self) -> Vec<IpNet> {
        self.addresses.iter().map(|a| a.net).collect()
    }
}

/// What the pod sees after attachment (for the claim's `networkData`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSide {
    /// Interface name in the pod.
    pub name: String,
    /// Addresses in the pod.
    pub addresses: Vec<IpNet>,
    /// MAC address in the pod.
    pub mac: Option<String>,
    /// Where it is in the pod: how release finds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub place: Option<PodPlace>,
}

/// Where the claimed interface is in the pod, read right after the move (before any container
/// of the pod runs): the pod may rename its interfaces and make new ones, but no one can give
/// another device this index while the claimed one holds it, nor make one with the same peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodPlace {
    /// Interface index in the pod.
    pub index: u32,
    /// A virtual interface's peer or parent as the pod sees it (hardware has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<LinkPeer>,
}

/// One claimed interface of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentRecord {
    /// The claim (namespace, name, UID).
    pub claim_uid: String,
    /// Claim namespace.
    pub claim_namespace: String,
    /// Claim name.
    pub claim_name: String,
    /// Pool.
    pub pool: String,
    /// Device.
    pub device: String,
    /// The host side as it was before the move.
    pub host: HostSide,
    /// The name it gets in the pod (recorded before the move, so a restart can find it).
    pub pod_name: String,
    /// The pod side once attached.
    pub pod: Option<PodSide>,
    /// Given back to the host and restored (a later release leaves it alone: whatever the pod
    /// now has under its name is the pod's own).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub returned: bool,
    /// A share of a shared NIC: a child made in the pod (`host` is then the NIC, which never
    /// moves; release deletes the child instead of moving anything back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<PreparedShare>,
}

/// A pod's attachments (state store record, keyed by pod UID).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    /// Pod UID.
    pub pod_uid: String,
    /// `namespace/name` of the pod.
    pub pod: String,
    /// The pod's network namespace (stop and remove events do not carry it).
    pub netns: PathBuf,
    /// The namespace's identity when it was recorded (device and inode of the nsfs file): a
    /// path can be reused by a new sandbox after a reboot or a re-created sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_id: Option<NetnsId>,
    /// Its interfaces.
    pub attachments: Vec<AttachmentRecord>,
    /// Why attaching failed, if it did.
    pub failure: Option<String>,
    /// Whether everything was given back.
    pub detached: bool,
}

/// A network namespace's identity: the nsfs file's device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl NetnsId {
    /// The identity of the namespace at `path`, if it (still) exists.
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(path).ok().map(|m| Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}
