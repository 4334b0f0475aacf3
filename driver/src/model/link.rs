//! An interface as the kernel describes it: what identifies it, its settings, routes and
//! neighbors, its counters and a health reading — values read by the OS seams and recorded by the
//! stages above.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The kernel's own traffic statistics for one interface (`IFLA_STATS64`, as in `/proc/net/dev`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Frames received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Frames the interface dropped on transmit (after the egress hook saw them; e.g. a veth
    /// whose peer's backlog was full).
    pub tx_dropped: u64,
}

/// The settings of an interface that knd changes in a pod and restores on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkSettings {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MTU.
    pub mtu: u32,
    /// MAC address (`aa:bb:…`), when it has one.
    pub mac: Option<String>,
    /// Administratively up.
    pub up: bool,
    /// Segmentation and aggregation limits (a device property: it follows the device across
    /// namespaces, so a restore puts the host's values back).
    #[serde(default)]
    pub offload_sizes: OffloadSizes,
    /// What identifies the device whatever its name or MAC (none in records written before
    /// identities were kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<DeviceIdentity>,
    /// What a virtual interface is linked to, as this namespace sees it (a veth's peer is one
    /// device: it identifies the veth while both live).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<LinkPeer>,
}

/// What identifies a device whatever its name, MAC address or namespace: what the kernel
/// reports and nobody holding the device can change. Hardware has a permanent MAC address and a
/// parent device (its PCI function); a virtual interface has only its kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceIdentity {
    /// `IFLA_INFO_KIND` (`veth`, `macvlan`, ...); none for hardware.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `IFLA_PERM_ADDRESS`: the address burnt into the device (`aa:bb:...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permanent_mac: Option<String>,
    /// The parent device as `bus/name` (`IFLA_PARENT_DEV_BUS_NAME`, `IFLA_PARENT_DEV_NAME`),
    /// e.g. `pci/0000:3b:00.1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// What a virtual interface is linked to (a veth's peer, a macvlan's parent), as the namespace
/// it is in sees it: the peer's namespace (`IFLA_LINK_NETNSID`, absent for the same namespace)
/// and index there (`IFLA_LINK`). While both namespaces live no one can make another device
/// with the same peer: a namespace id, once given, is not reassigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkPeer {
    /// `IFLA_LINK_NETNSID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netnsid: Option<i32>,
    /// `IFLA_LINK`.
    pub index: u32,
}

/// A static neighbor entry: this IP address is at this MAC address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Neighbor {
    /// The neighbor's IP address.
    pub ip: IpAddr,
    /// Its MAC address (`aa:bb:…`).
    pub mac: String,
}

/// The largest GSO/GRO packets the stack builds for (and receives from) the device, bytes:
/// `gso_max_size`, `gro_max_size` and their IPv4 variants (BIG TCP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OffloadSizes {
    /// `gso_max_size`.
    pub gso_max_size: Option<u32>,
    /// `gro_max_size`.
    pub gro_max_size: Option<u32>,
    /// `gso_ipv4_max_size`.
    pub gso_ipv4_max_size: Option<u32>,
    /// `gro_ipv4_max_size`.
    pub gro_ipv4_max_size: Option<u32>,
}

/// A route through an interface (the interface itself is implied).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination prefix.
    pub destination: IpNet,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// Preferred source address.
    pub source: Option<IpAddr>,
    /// Routing table (254 = main).
    pub table: u32,
    /// `link` scope (on-link, no gateway) rather than `universe`.
    pub link_scope: bool,
    /// Metric.
    pub metric: Option<u32>,
}

/// Interface error counters watched for a rise (`/sys/class/net/*/statistics`, `IFLA_STATS64`).
/// Drops are left out: a full queue under load is not a sick device.
pub const LINK_ERRORS: [&str; 13] = [
    "rx_errors",
    "tx_errors",
    "rx_crc_errors",
    "rx_frame_errors",
    "rx_fifo_errors",
    "rx_missed_errors",
    "rx_length_errors",
    "rx_over_errors",
    "tx_aborted_errors",
    "tx_carrier_errors",
    "tx_fifo_errors",
    "tx_heartbeat_errors",
    "tx_window_errors",
];

/// What an interface looked like at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkReading {
    /// Its name where it was read.
    pub interface: String,
    /// `operstate` (`up`, `down`, `lowerlayerdown`, `unknown`, …).
    pub operstate: String,
    /// Carrier changes since the interface was created.
    pub carrier_changes: Option<u64>,
    /// Error counters ([`LINK_ERRORS`]) the kernel reported.
    pub errors: BTreeMap<String, u64>,
}
