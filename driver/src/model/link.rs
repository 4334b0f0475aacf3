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

/// A route through an interface (the interface itself is implied), with everything a restore
/// needs to put it back as it was: routing daemons and network managers own routes by protocol,
/// so a route that comes back `proto static` instead of `proto boot` is not the same route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredRoute")]
pub struct Route {
    /// Destination prefix.
    pub destination: IpNet,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// Preferred source address.
    pub source: Option<IpAddr>,
    /// Routing table (254 = main).
    pub table: u32,
    /// Scope (`RT_SCOPE_*`: 0 universe, 200 site, 253 link, 254 host).
    pub scope: u8,
    /// Who added it (`RTPROT_*`: 3 boot, 4 static, 16 dhcp, 186 bgp, …).
    pub protocol: u8,
    /// Next-hop flags (`RTNH_F_*`, e.g. 4 onlink).
    pub flags: u32,
    /// Metric (priority).
    pub metric: Option<u32>,
    /// Route metrics (`RTA_METRICS`) by `RTAX_*` number: mtu, advmss, initcwnd, lock, ….
    pub metrics: BTreeMap<u16, u32>,
    /// The congestion control algorithm set on the route (`RTAX_CC_ALGO`).
    pub congestion_control: Option<String>,
}

/// `RT_SCOPE_UNIVERSE`.
pub const SCOPE_UNIVERSE: u8 = 0;
/// `RT_SCOPE_SITE`.
pub const SCOPE_SITE: u8 = 200;
/// `RT_SCOPE_LINK`.
pub const SCOPE_LINK: u8 = 253;
/// `RT_SCOPE_HOST`.
pub const SCOPE_HOST: u8 = 254;
/// `RTPROT_STATIC`: what routes knd adds for a claim carry, and what records written before
/// protocols were kept are restored with.
pub const PROTOCOL_STATIC: u8 = 4;

impl Route {
    /// A plain route as a claim's configuration gives it: protocol static, no flags or metrics.
    pub fn new(destination: IpNet, table: u32) -> Self {
        Self {
            destination,
            gateway: None,
            source: None,
            table,
            scope: SCOPE_UNIVERSE,
            protocol: PROTOCOL_STATIC,
            flags: 0,
            metric: None,
            metrics: BTreeMap::new(),
            congestion_control: None,
        }
    }
}

/// A route as records hold it; those written before scopes, protocols, flags and metrics were
/// kept have only `link_scope`.
#[derive(Deserialize)]
struct StoredRoute {
    destination: IpNet,
    gateway: Option<IpAddr>,
    source: Option<IpAddr>,
    table: u32,
    #[serde(default)]
    link_scope: bool,
    scope: Option<u8>,
    protocol: Option<u8>,
    #[serde(default)]
    flags: u32,
    metric: Option<u32>,
    #[serde(default)]
    metrics: BTreeMap<u16, u32>,
    congestion_control: Option<String>,
}

impl From<StoredRoute> for Route {
    fn from(stored: StoredRoute) -> Self {
        let linked = if stored.link_scope {
            SCOPE_LINK
        } else {
            SCOPE_UNIVERSE
        };
        Self {
            destination: stored.destination,
            gateway: stored.gateway,
            source: stored.source,
            table: stored.table,
            scope: stored.scope.unwrap_or(linked),
            protocol: stored.protocol.unwrap_or(PROTOCOL_STATIC),
            flags: stored.flags,
            metric: stored.metric,
            metrics: stored.metrics,
            congestion_control: stored.congestion_control,
        }
    }
}

/// An address on an interface with what a restore needs to put it back exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    /// The (local) address and prefix length.
    pub net: IpNet,
    /// IPv4 broadcast address, when set.
    pub broadcast: Option<std::net::Ipv4Addr>,
    /// IPv4 label (`eth0:1`), when set.
    pub label: Option<String>,
    /// Scope (`RT_SCOPE_*`).
    pub scope: u8,
    /// `IFA_F_*` flags (nodad, noprefixroute, mngtmpaddr, …; the kernel's state flags too).
    pub flags: u32,
    /// When it stops being valid (seconds since the epoch; `None`: forever). Kept as a moment,
    /// not a lifetime, so a restore gives back what is left of it.
    pub valid_until: Option<u64>,
    /// When it stops being preferred (seconds since the epoch; `None`: forever).
    pub preferred_until: Option<u64>,
    /// Metric of the prefix route the kernel adds for it (`IFA_RT_PRIORITY`).
    pub route_priority: Option<u32>,
    /// Who added it (`IFA_PROTO`), when said.
    pub protocol: Option<u8>,
}

/// `IFA_F_PERMANENT`: the kernel's mark of an address without lifetimes.
pub const ADDRESS_PERMANENT: u32 = 0x80;

impl Address {
    /// A permanent address of universe scope, as a claim's configuration gives it.
    pub fn new(net: IpNet) -> Self {
        Self {
            net,
            broadcast: None,
            label: None,
            scope: SCOPE_UNIVERSE,
            flags: ADDRESS_PERMANENT,
            valid_until: None,
            preferred_until: None,
            route_priority: None,
            protocol: None,
        }
    }
}

/// Reads a record's addresses: records written before the details were kept have the prefix
/// alone (`"192.168.50.2/24"`), restored as a permanent address of universe scope (what the
/// older knd put back).
pub fn addresses_of_any_age<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<Address>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Plain(IpNet),
        Full(Address),
    }
    let stored = Vec::<Stored>::deserialize(deserializer)?;
    Ok(stored
        .into_iter()
        .map(|a| match a {
            Stored::Plain(net) => Address::new(net),
            Stored::Full(address) => address,
        })
        .collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Records written before protocols, scopes and address details were kept still restore:
    /// as what the older knd would have put back (protocol static, permanent addresses).
    #[test]
    fn records_of_an_older_knd_are_read() {
        let route: Route = serde_json::from_str(
            r#"{"destination":"10.50.0.0/16","gateway":"192.168.50.1","source":null,
                "table":254,"link_scope":true,"metric":null}"#,
        )
        .unwrap();
        assert_eq!((route.scope, route.protocol), (SCOPE_LINK, PROTOCOL_STATIC));
        // Addresses of both ages in one list: the old plain prefix, and what is written now.
        let mut full = Address::new("fd00::2/64".parse().unwrap());
        full.valid_until = Some(1_900_000_000);
        full.label = Some("eth0:1".into());
        let text = format!(
            r#"["192.168.50.2/24",{}]"#,
            serde_json::to_string(&full).unwrap()
        );
        let read = addresses_of_any_age(&mut serde_json::Deserializer::from_str(&text)).unwrap();
        assert_eq!(
            read,
            [Address::new("192.168.50.2/24".parse().unwrap()), full]
        );
        let mut route = Route::new("10.0.0.0/8".parse().unwrap(), 100);
        route.metrics.insert(2, 1400);
        route.congestion_control = Some("reno".into());
        let text = serde_json::to_string(&route).unwrap();
        assert_eq!(serde_json::from_str::<Route>(&text).unwrap(), route);
    }
}
