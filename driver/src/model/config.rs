//! The opaque claim configuration (`apiVersion: knd.dev/v1alpha1`, `kind: NetworkConfig`):
//! strict parsing, validation with field paths, and merging of class and claim configs.
//!
//! Field names are a superset of DraNet's, so its users can bring their configs along.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `apiVersion` knd accepts.
pub const API_VERSION: &str = "knd.dev/v1alpha1";
/// The `kind` knd accepts.
pub const KIND: &str = "NetworkConfig";
/// Largest accepted configuration document, as the API allows for opaque parameters.
pub const MAX_CONFIG_BYTES: usize = 10 * 1024;

/// A configuration problem: where (`interface.mtu`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field, e.g. `config[0].routes[1].gateway`.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// The same error under a parent path (`config[2]` + `interface.mtu`).
    #[must_use]
    pub fn within(self, parent: &str) -> Self {
        let path = if self.path.is_empty() {
            parent.to_owned()
        } else if self.path.starts_with('[') {
            format!("{parent}{}", self.path)
        } else {
            format!("{parent}.{}", self.path)
        };
        Self { path, ..self }
    }
}

/// One `NetworkConfig` document: knd's opaque configuration for a claim or a device class. Every
/// field but `apiVersion` and `kind` is optional; class configs apply first, then claim configs,
/// later ones winning field by field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkConfig {
    /// Must be `knd.dev/v1alpha1`.
    #[schemars(extend("const" = "knd.dev/v1alpha1"))]
    pub api_version: String,
    /// Must be `NetworkConfig`.
    #[schemars(extend("const" = "NetworkConfig"))]
    pub kind: String,
    /// The interface inside the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<InterfaceConfig>,
    /// Routes to add in the pod (replace earlier layers' routes when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<RouteConfig>>,
    /// Policy routing rules to add in the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<RuleConfig>>,
    /// Static neighbor entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbors: Option<Vec<NeighborConfig>>,
    /// ethtool features and private flags to set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ethtool: Option<EthtoolConfig>,
    /// Per-interface sysctls of the claim's own interface in the pod
    /// (`net.ipv4.conf.<interface>.<setting>`, `net.ipv6.conf.<interface>.<setting>` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<BTreeMap<String, String>>")]
    pub sysctls: Option<BTreeMap<SysctlKey, String>>,
    /// How the RDMA device is shared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma: Option<RdmaConfig>,
    /// In-kernel telemetry for this claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<TelemetryConfig>,
    /// Placement requirement relative to the pod's GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<TopologyConfig>,
    /// NCCL settings handed to the pod's containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nccl: Option<NcclConfig>,
    /// How a bandwidth share of a shared NIC is made (only for devices allocated as a share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<ShareConfig>,
}

/// A bandwidth share: a macvlan child of the shared NIC, made in the pod's namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ShareConfig {
    /// The child's macvlan mode (default `bridge`: shares of one NIC reach each other).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MacvlanMode>,
    /// Also police what the share receives to its bandwidth (default: only what it sends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub police_ingress: Option<bool>,
}

/// Macvlan modes a share may use (`passthru` would take the whole NIC, `source` needs a list of
/// senders: neither is a share).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MacvlanMode {
    /// Children of the NIC reach each other inside the NIC's driver.
    #[default]
    Bridge,
    /// Children never reach each other.
    Private,
    /// Children reach each other only through the switch (reflective relay).
    Vepa,
}

/// The interface inside the pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InterfaceConfig {
    /// Name inside the pod (default: keep the host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Addresses in CIDR form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<String>>,
    /// DHCP: only `false` is accepted (DraNet compatibility); knd does not run a DHCP client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<bool>,
    /// MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// MAC address to set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_addr: Option<String>,
    /// `gso_max_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gso_max_size: Option<u32>,
    /// `gro_max_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gro_max_size: Option<u32>,
    /// `gso_ipv4_max_size`.
    #[serde(
        default,
        rename = "gsoIPv4MaxSize",
        skip_serializing_if = "Option::is_none"
    )]
    pub gso_ipv4_max_size: Option<u32>,
    /// `gro_ipv4_max_size`.
    #[serde(
        default,
        rename = "groIPv4MaxSize",
        skip_serializing_if = "Option::is_none"
    )]
    pub gro_ipv4_max_size: Option<u32>,
    /// DraNet's "detach other eBPF programs when the interface moves": only `false` is
    /// accepted; knd does not detach programs it did not attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_ebpf_programs: Option<bool>,
    /// `net.ipv4.conf.<if>.arp_ignore` (0–8) in the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arp_ignore: Option<u8>,
    /// `net.ipv4.conf.<if>.arp_announce` (0–2) in the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arp_announce: Option<u8>,
}

/// A route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteConfig {
    /// Destination CIDR, or `default`.
    pub destination: String,
    /// Next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Preferred source address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `universe`, `site`, `link` or `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Routing table (default: main).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
}

/// A policy routing rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleConfig {
    /// Priority (1–32765; 0, 32766 and 32767 belong to the kernel's own rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Source prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Destination prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Table to look up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
}

/// A static neighbor entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NeighborConfig {
    /// The neighbor's IP address.
    pub destination: String,
    /// Its MAC address.
    pub hardware_addr: String,
}

/// The device features a claim may change: offloads of the pod's own traffic. Not listed, so
/// refused: `loopback` (frames back into the device, under other tenants of its port),
/// `rx-all` and `rx-fcs` (errored frames and checksums of the wire), `hw-tc-offload` and
/// `rx-ntuple-filter` (rules in the NIC's switch and flow steering, shared with the other
/// functions of the port), `rx-vlan-filter` (VLAN isolation), `l2-fwd-offload`, and the
/// crypto offloads (keys in the NIC).
pub const ETHTOOL_FEATURES: &[&str] = &[
    "rx-checksum",
    "tx-checksum-ipv4",
    "tx-checksum-ipv6",
    "tx-checksum-ip-generic",
    "tx-checksum-sctp",
    "tx-scatter-gather",
    "tx-scatter-gather-fraglist",
    "tx-tcp-segmentation",
    "tx-tcp-ecn-segmentation",
    "tx-tcp-mangleid-segmentation",
    "tx-tcp6-segmentation",
    "tx-generic-segmentation",
    "tx-udp-segmentation",
    "tx-gso-partial",
    "tx-gso-list",
    "tx-udp_tnl-segmentation",
    "tx-udp_tnl-csum-segmentation",
    "tx-gre-segmentation",
    "tx-gre-csum-segmentation",
    "tx-ipxip4-segmentation",
    "tx-ipxip6-segmentation",
    "rx-gro",
    "rx-gro-hw",
    "rx-lro",
    "rx-gro-list",
    "rx-udp-gro-forwarding",
    "rx-hashing",
    "rx-vlan-hw-parse",
    "tx-vlan-hw-insert",
    "tx-nocache-copy",
];

/// ethtool settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EthtoolConfig {
    /// Features on or off, by their kernel names as `ethtool -k` prints them. Only offloads
    /// that change how the pod's own traffic is handled may be set: checksums, scatter-gather,
    /// segmentation (`tx-tcp-segmentation`, `tx-generic-segmentation`, ...), receive
    /// aggregation (`rx-gro`, `rx-gro-hw`, `rx-lro`, `rx-gro-list`), receive hashing and VLAN
    /// tag offloads; features that reach beyond it (`loopback`, `rx-all`, `rx-fcs`,
    /// `hw-tc-offload`, `rx-ntuple-filter`, `rx-vlan-filter`, ...) are refused. The host's
    /// state of each is recorded and restored when the interface comes back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<BTreeMap<String, bool>>,
    /// Driver private flags: refused when set (they change the device's firmware behaviour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_flags: Option<BTreeMap<String, bool>>,
}

/// RDMA sharing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RdmaConfig {
    /// Shared (the RDMA device stays in the host namespace; the containers get its verbs
    /// devices). `exclusive` (moving the RDMA link with the NIC) is refused.
    pub mode: RdmaMode,
}

/// RDMA sharing modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RdmaMode {
    /// The RDMA device is visible from every namespace (the kernel's default).
    #[default]
    Shared,
    /// The RDMA link moves into the pod's namespace with the NIC.
    Exclusive,
}

/// Telemetry settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TelemetryConfig {
    /// Attach the in-kernel counters (default: yes).
    pub enabled: bool,
}

/// NCCL settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NcclConfig {
    /// Give every container of the pod `NCCL_SOCKET_IFNAME`, `NCCL_IB_HCA`,
    /// `NCCL_IB_GID_INDEX` and `NCCL_TOPO_FILE` for its claimed NICs (default: no). A variable
    /// the container sets itself is left alone.
    pub env: bool,
}

/// Placement requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TopologyConfig {
    /// The worst acceptable distance class between the NIC and the pod's GPUs.
    pub require: DistanceName,
}

/// A distance class as written in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DistanceName {
    /// At most one PCIe switch between the NIC and the GPU.
    #[serde(rename = "PIX")]
    Pix,
    /// Several PCIe switches between them, below one host bridge.
    #[serde(rename = "PXB")]
    Pxb,
    /// The same root complex, through the host bridge.
    #[serde(rename = "PHB")]
    Phb,
    /// The same NUMA node, different root complexes.
    #[serde(rename = "NODE")]
    Node,
    /// Different NUMA nodes.
    #[serde(rename = "SYS")]
    Sys,
}

/// What the device allows, for checks that depend on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceLimits {
    /// The device's largest MTU, when known (`IFLA_MAX_MTU`).
    pub max_mtu: Option<u32>,
}

/// Parses one opaque parameters document strictly: unknown fields, wrong types and unknown enum
/// values are errors naming the field.
pub fn parse(raw: &[u8]) -> Result<NetworkConfig, ConfigError> {
    if raw.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::new(
            "",
            format!(
                "{} bytes; at most {MAX_CONFIG_BYTES} are allowed",
                raw.len()
            ),
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(raw);
    let config: NetworkConfig =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            let reason = e.into_inner().to_string();
            // serde_json appends " at line L column C"; the path says where already.
            let reason = reason
                .split(" at line ")
                .next()
                .unwrap_or_default()
                .to_owned();
            ConfigError::new(path, reason)
        })?;
    deserializer
        .end()
        .map_err(|e| ConfigError::new("", format!("trailing data after the document: {e}")))?;
    Ok(config)
}

impl NetworkConfig {
    /// Applies `later` over `self`: set fields of `later` win; maps merge key by key; lists are
    /// replaced whole.
    #[must_use]
    pub fn merge(self, later: Self) -> Self {
        fn map<K: Ord, V>(
            a: Option<BTreeMap<K, V>>,
            b: Option<BTreeMap<K, V>>,
        ) -> Option<BTreeMap<K, V>> {
            match (a, b) {
                (Some(mut a), Some(b)) => {
                    a.extend(b);
                    Some(a)
                }
                (a, b) => b.or(a),
            }
        }
        let interface = match (self.interface, later.interface) {
            (Some(a), Some(b)) => Some(InterfaceConfig {
                name: b.name.or(a.name),
                addresses: b.addresses.or(a.addresses),
                dhcp: b.dhcp.or(a.dhcp),
                mtu: b.mtu.or(a.mtu),
                hardware_addr: b.hardware_addr.or(a.hardware_addr),
                gso_max_size: b.gso_max_size.or(a.gso_max_size),
                gro_max_size: b.gro_max_size.or(a.gro_max_size),
                gso_ipv4_max_size: b.gso_ipv4_max_size.or(a.gso_ipv4_max_size),
                gro_ipv4_max_size: b.gro_ipv4_max_size.or(a.gro_ipv4_max_size),
                disable_ebpf_programs: b.disable_ebpf_programs.or(a.disable_ebpf_programs),
                arp_ignore: b.arp_ignore.or(a.arp_ignore),
                arp_announce: b.arp_announce.or(a.arp_announce),
            }),
            (a, b) => b.or(a),
        };
        let ethtool = match (self.ethtool, later.ethtool) {
            (Some(a), Some(b)) => Some(EthtoolConfig {
                features: map(a.features, b.features),
                private_flags: map(a.private_flags, b.private_flags),
            }),
            (a, b) => b.or(a),
        };
        Self {
            api_version: later.api_version,
            kind: later.kind,
            interface,
            routes: later.routes.or(self.routes),
            rules: later.rules.or(self.rules),
            neighbors: later.neighbors.or(self.neighbors),
            ethtool,
            sysctls: map(self.sysctls, later.sysctls),
            rdma: later.rdma.or(self.rdma),
            telemetry: later.telemetry.or(self.telemetry),
            topology: later.topology.or(self.topology),
            nccl: later.nccl.or(self.nccl),
            share: later.share.or(self.share),
        }
    }

    /// Checks every value; the first problem is returned with its path.
    /// The first field set to something knd does not do, by its path, and why: such a value is
    /// refused when the claim is prepared, never ignored. (Prepare validates every layer and the
    /// merged result; attach checks again for records written by an older knd.)
    pub fn unsupported(&self) -> Option<(&'static str, &'static str)> {
        let interface = self.interface.as_ref();
        if interface.is_some_and(|i| i.dhcp == Some(true)) {
            return Some((
                "interface.dhcp",
                "knd does not run a DHCP client; set interface.addresses",
            ));
        }
        if interface.is_some_and(|i| i.disable_ebpf_programs == Some(true)) {
            return Some((
                "interface.disableEbpfPrograms",
                "knd does not detach other parties' eBPF programs from a NIC (they belong to \
                 whoever attached them, and would not come back at release); only `false` is \
                 accepted",
            ));
        }
        if self
            .ethtool
            .as_ref()
            .is_some_and(|e| e.private_flags.as_ref().is_some_and(|f| !f.is_empty()))
        {
            return Some((
                "ethtool.privateFlags",
                "driver private flags are not supported: they change the device's firmware \
                 behaviour, not only the pod's traffic",
            ));
        }
        if self.rdma.is_some_and(|r| r.mode == RdmaMode::Exclusive) {
            return Some((
                "rdma.mode",
                "`exclusive` is not supported: knd leaves RDMA devices in the kernel's shared \
                 mode and hands the containers their verbs devices",
            ));
        }
        None
    }

    pub fn validate(&self, limits: DeviceLimits) -> Result<(), ConfigError> {
        if self.api_version != API_VERSION {
            return Err(ConfigError::new(
                "apiVersion",
                format!("`{}` is not supported; use {API_VERSION}", self.api_version),
            ));
        }
        if self.kind != KIND {
            return Err(ConfigError::new(
                "kind",
                format!("`{}` is not supported; use {KIND}", self.kind),
            ));
        }
        if let Some((field, why)) = self.unsupported() {
            return Err(ConfigError::new(field, why));
        }
        if let Some(interface) = &self.interface {
            interface
                .validate(limits)
                .map_err(|e| e.within("interface"))?;
        }
        for (i, route) in self.routes.iter().flatten().enumerate() {
            route
                .validate()
                .map_err(|e| e.within(&format!("routes[{i}]")))?;
        }
        for (i, rule) in self.rules.iter().flatten().enumerate() {
            rule.validate()
                .map_err(|e| e.within(&format!("rules[{i}]")))?;
        }
        for (i, neighbor) in self.neighbors.iter().flatten().enumerate() {
            let path = format!("neighbors[{i}]");
            ip(&neighbor.destination).map_err(|e| e.within(&format!("{path}.destination")))?;
            mac(&neighbor.hardware_addr).map_err(|e| e.within(&format!("{path}.hardwareAddr")))?;
        }
        if let Some(ethtool) = &self.ethtool {
            for (field, flags) in [
                ("features", &ethtool.features),
                ("privateFlags", &ethtool.private_flags),
            ] {
                for name in flags.iter().flat_map(BTreeMap::keys) {
                    if name.is_empty()
                        || name.len() > 32
                        || !name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
                    {
                        return Err(ConfigError::new(
                            format!("ethtool.{field}.{name}"),
                            "not an ethtool feature or flag name",
                        ));
                    }
                }
            }
            for name in ethtool.features.iter().flat_map(BTreeMap::keys) {
                if !ETHTOOL_FEATURES.contains(&name.as_str()) {
                    return Err(ConfigError::new(
                        format!("ethtool.features.{name}"),
                        "not a feature a claim may change (only offloads of the pod's own \
                         traffic: checksums, segmentation, receive aggregation and hashing, VLAN \
                         tag offloads)",
                    ));
                }
            }
        }
        for (key, value) in self.sysctls.iter().flatten() {
            sysctl_value(value).map_err(|e| e.within(&format!("sysctls.{key}")))?;
            if let Some(field) = self
                .interface
                .as_ref()
                .and_then(|i| i.sysctl_fields().find(|(_, setting, _)| key.is(setting)))
                .map(|(field, _, _)| field)
            {
                return Err(ConfigError::new(
                    format!("sysctls.{key}"),
                    format!("interface.{field} sets it too; set it in one place"),
                ));
            }
            if let Some(name) = self.interface.as_ref().and_then(|i| i.name.as_deref())
                && key.interface != name
            {
                return Err(ConfigError::new(
                    format!("sysctls.{key}"),
                    format!(
                        "names interface `{}`, but the claim's interface in the pod is `{name}`",
                        key.interface()
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl InterfaceConfig {
    /// The fields that are per-interface IPv4 sysctls in the pod: (field, setting, value).
    pub fn sysctl_fields(&self) -> impl Iterator<Item = (&'static str, &'static str, u8)> {
        [
            ("arpIgnore", "arp_ignore", self.arp_ignore),
            ("arpAnnounce", "arp_announce", self.arp_announce),
        ]
        .into_iter()
        .filter_map(|(field, setting, value)| value.map(|v| (field, setting, v)))
    }

    fn validate(&self, limits: DeviceLimits) -> Result<(), ConfigError> {
        if let Some(name) = &self.name
            && !is_interface_name(name)
        {
            return Err(ConfigError::new(
                "name",
                format!(
                    "`{name}` is not a valid interface name (1-15 bytes, no '/', ':' or spaces)"
                ),
            ));
        }
        for (i, address) in self.addresses.iter().flatten().enumerate() {
            cidr(address).map_err(|e| e.within(&format!("addresses[{i}]")))?;
        }
        if let Some(mtu) = self.mtu {
            if mtu < 68 {
                return Err(ConfigError::new(
                    "mtu",
                    format!("{mtu} is below the minimum 68"),
                ));
            }
            // The device's own limit when known; otherwise the largest MTU Linux accepts on any
            // Ethernet device.
            let (max, whose) = limits
                .max_mtu
                .map_or((65_535, "the maximum"), |max| (max, "the device maximum"));
            if mtu > max {
                return Err(ConfigError::new(
                    "mtu",
                    format!("{mtu} exceeds {whose} {max}"),
                ));
            }
        }
        if let Some(address) = &self.hardware_addr {
            mac(address).map_err(|e| e.within("hardwareAddr"))?;
        }
        for (field, value) in [
            ("gsoMaxSize", self.gso_max_size),
            ("groMaxSize", self.gro_max_size),
            ("gsoIPv4MaxSize", self.gso_ipv4_max_size),
            ("groIPv4MaxSize", self.gro_ipv4_max_size),
        ] {
            // The kernel's ceiling for BIG TCP (GSO_MAX_SIZE) is 512 KiB - 8.
            if let Some(size) = value
                && !(1..=524_280).contains(&size)
            {
                return Err(ConfigError::new(
                    field,
                    format!("{size} is outside 1..=524280"),
                ));
            }
        }
        if let Some(value) = self.arp_ignore
            && value > 8
        {
            return Err(ConfigError::new(
                "arpIgnore",
                format!("{value} is outside 0..=8"),
            ));
        }
        if let Some(value) = self.arp_announce
            && value > 2
        {
            return Err(ConfigError::new(
                "arpAnnounce",
                format!("{value} is outside 0..=2"),
            ));
        }
        Ok(())
    }
}

impl RouteConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let destination = if self.destination == "default" {
            None
        } else {
            Some(cidr(&self.destination).map_err(|e| e.within("destination"))?)
        };
        let gateway = self
            .gateway
            .as_deref()
            .map(|g| ip(g).map_err(|e| e.within("gateway")))
            .transpose()?;
        let source = self
            .source
            .as_deref()
            .map(|s| ip(s).map_err(|e| e.within("source")))
            .transpose()?;
        if let (Some(destination), Some(gateway)) = (destination, gateway)
            && destination.addr().is_ipv4() != gateway.is_ipv4()
        {
            return Err(ConfigError::new(
                "gateway",
                format!("{gateway} is not of the same address family as {destination}"),
            ));
        }
        if let (Some(gateway), Some(source)) = (gateway, source)
            && gateway.is_ipv4() != source.is_ipv4()
        {
            return Err(ConfigError::new(
                "source",
                format!("{source} is not of the same address family as the gateway {gateway}"),
            ));
        }
        if let Some(scope) = &self.scope
            && !["universe", "site", "link", "host"].contains(&scope.as_str())
        {
            return Err(ConfigError::new(
                "scope",
                format!("`{scope}` is not one of universe, site, link, host"),
            ));
        }
        table(self.table)
    }
}

impl RuleConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(priority) = self.priority
            && !(1..=32_765).contains(&priority)
        {
            return Err(ConfigError::new(
                "priority",
                format!("{priority} is outside 1..=32765 (0, 32766 and 32767 are the kernel's)"),
            ));
        }
        for (field, value) in [("source", &self.source), ("destination", &self.destination)] {
            if let Some(value) = value {
                cidr(value).map_err(|e| e.within(field))?;
            }
        }
        if self.source.is_none() && self.destination.is_none() {
            return Err(ConfigError::new(
                "",
                "a rule needs a source or a destination, or it would capture all traffic",
            ));
        }
        table(self.table)
    }
}

/// A name the kernel accepts for an interface (`dev_valid_name`).
pub fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

fn table(table: Option<u32>) -> Result<(), ConfigError> {
    match table {
        // 0 is "unspecified"; 253 (default) and 255 (local) are the kernel's own.
        Some(t @ (0 | 253 | 255)) => Err(ConfigError::new(
            "table",
            format!("table {t} is reserved by the kernel"),
        )),
        _ => Ok(()),
    }
}

fn cidr(text: &str) -> Result<IpNet, ConfigError> {
    text.parse::<IpNet>()
        .map_err(|_| ConfigError::new("", format!("`{text}` is not an IP prefix in CIDR form")))
}

fn ip(text: &str) -> Result<IpAddr, ConfigError> {
    text.parse::<IpAddr>()
        .map_err(|_| ConfigError::new("", format!("`{text}` is not an IP address")))
}

/// A MAC address: 6 (Ethernet) or 20 (InfiniBand) colon-separated bytes, unicast.
fn mac(text: &str) -> Result<(), ConfigError> {
    let bytes: Option<Vec<u8>> = text
        .split(':')
        .map(|b| {
            (b.len() == 2)
                .then(|| u8::from_str_radix(b, 16).ok())
                .flatten()
        })
        .collect();
    match bytes {
        Some(bytes) if bytes.len() == 6 && bytes[0] & 1 == 1 => Err(ConfigError::new(
            "",
            format!("`{text}` is a multicast address"),
        )),
        Some(bytes) if bytes.len() == 6 && bytes.iter().all(|b| *b == 0) => Err(ConfigError::new(
            "",
            format!("`{text}` is the all-zero address"),
        )),
        Some(bytes) if bytes.len() == 6 || bytes.len() == 20 => Ok(()),
        _ => Err(ConfigError::new(
            "",
            format!("`{text}` is not a MAC address"),
        )),
    }
}

/// The address family of a per-interface sysctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SysctlFamily {
    /// `net.ipv4.conf.*`.
    Ipv4,
    /// `net.ipv6.conf.*`.
    Ipv6,
}

impl SysctlFamily {
    /// The directory under `/proc/sys/net` (`ipv4`, `ipv6`).
    pub fn dir(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }
}

/// A per-interface sysctl key, parsed once from `net.<family>.conf.<interface>.<setting>`: only
/// the `conf` settings of one named interface, nothing that changes the whole network namespace
/// (`all`, `default`), let alone the node. The interface may contain dots (`eth0.100`); the
/// setting is what follows the last dot and matches `[a-z0-9_]+`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SysctlKey {
    // Private: a key exists only by parsing, so every key has passed the checks.
    family: SysctlFamily,
    interface: String,
    setting: String,
}

impl std::str::FromStr for SysctlKey {
    type Err = ConfigError;

    fn from_str(key: &str) -> Result<Self, ConfigError> {
        let refuse = |why: &str| {
            ConfigError::new(
                "",
                format!(
                    "{why}; only net.ipv4.conf.<interface>.<setting> and \
                     net.ipv6.conf.<interface>.<setting> are allowed"
                ),
            )
        };
        let (family, rest) = if let Some(rest) = key.strip_prefix("net.ipv4.conf.") {
            (SysctlFamily::Ipv4, rest)
        } else if let Some(rest) = key.strip_prefix("net.ipv6.conf.") {
            (SysctlFamily::Ipv6, rest)
        } else {
            return Err(refuse("not a per-interface key"));
        };
        let Some((interface, setting)) = rest.rsplit_once('.') else {
            return Err(refuse("no setting after the interface"));
        };
        if interface == "all" || interface == "default" {
            return Err(refuse(&format!("`{interface}` is every interface")));
        }
        if !is_interface_name(interface) {
            return Err(refuse(&format!("`{interface}` is not an interface name")));
        }
        if setting.is_empty()
            || !setting
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(refuse(&format!("`{setting}` is not a setting name")));
        }
        Ok(Self {
            family,
            interface: interface.to_owned(),
            setting: setting.to_owned(),
        })
    }
}

impl TryFrom<String> for SysctlKey {
    /// The reason only: the parser's path names the key already.
    type Error = String;

    fn try_from(key: String) -> Result<Self, String> {
        key.parse().map_err(|e: ConfigError| e.reason)
    }
}

impl From<SysctlKey> for String {
    fn from(key: SysctlKey) -> Self {
        key.to_string()
    }
}

impl fmt::Display for SysctlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "net.{}.conf.{}.{}",
            self.family.dir(),
            self.interface,
            self.setting
        )
    }
}

impl SysctlKey {
    /// The IPv4 key of `setting` for `interface` (a valid interface name).
    pub fn ipv4(interface: &str, setting: &str) -> Result<Self, ConfigError> {
        format!("net.ipv4.conf.{interface}.{setting}").parse()
    }

    /// Whether this is the IPv4 `setting` (whatever the interface).
    pub fn is(&self, setting: &str) -> bool {
        self.family == SysctlFamily::Ipv4 && self.setting == setting
    }

    /// The address family.
    pub fn family(&self) -> SysctlFamily {
        self.family
    }

    /// The interface: one path component, a valid interface name, not `all` or `default`.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The setting (`rp_filter`, `arp_ignore`, ...): the file's name below
    /// `/proc/sys/net/<family>/conf/<interface>/`.
    pub fn setting(&self) -> &str {
        &self.setting
    }
}

fn sysctl_value(value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > 64 || value.contains(['\n', '\0']) {
        return Err(ConfigError::new(
            "",
            format!("`{value}` is not a sysctl value"),
        ));
    }
    Ok(())
}

/// The JSON Schema of [`NetworkConfig`] (published as `deploy/networkconfig.schema.json`).
pub fn json_schema() -> String {
    let mut schema = schemars::schema_for!(NetworkConfig);
    schema.insert(
        "$id".into(),
        "https://knd.dev/schemas/networkconfig.v1alpha1.json".into(),
    );
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// The default config a claim gets when neither class nor claim sets one.
pub fn default_config() -> NetworkConfig {
    NetworkConfig {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        ..NetworkConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::distance::Distance;

    fn parse_validate(json: &str) -> Result<NetworkConfig, ConfigError> {
        let config = parse(json.as_bytes())?;
        config.validate(DeviceLimits {
            max_mtu: Some(9216),
        })?;
        Ok(config)
    }

    const HEAD: &str = r#""apiVersion":"knd.dev/v1alpha1","kind":"NetworkConfig""#;

    #[test]
    fn a_full_config_parses_and_validates() {
        let config = parse_validate(&format!(
            r#"{{{HEAD},
              "interface":{{"name":"net1","addresses":["10.0.0.2/24","fd00::2/64"],"mtu":9000,
                "hardwareAddr":"02:00:00:00:00:01","gsoMaxSize":65536,"groIPv4MaxSize":65536,
                "disableEbpfPrograms":false,"arpIgnore":1}},
              "routes":[{{"destination":"10.1.0.0/16","gateway":"10.0.0.1","table":100}},
                        {{"destination":"default","gateway":"10.0.0.1","scope":"universe"}}],
              "rules":[{{"priority":100,"source":"10.0.0.0/24","table":100}}],
              "neighbors":[{{"destination":"10.0.0.1","hardwareAddr":"02:00:00:00:00:02"}}],
              "ethtool":{{"features":{{"rx-gro-hw":true}},"privateFlags":{{}}}},
              "sysctls":{{"net.ipv4.conf.net1.rp_filter":"0"}},
              "rdma":{{"mode":"shared"}},"telemetry":{{"enabled":true}},
              "topology":{{"require":"PXB"}}}}"#
        ))
        .unwrap();
        assert_eq!(config.interface.as_ref().unwrap().mtu, Some(9000));
        assert_eq!(config.rdma.unwrap().mode, RdmaMode::Shared);
        assert_eq!(
            Distance::from(config.topology.unwrap().require),
            Distance::Pxb
        );
    }

    #[test]
    fn each_kind_of_mistake_names_its_field() {
        let cases = [
            (
                r#","interface":{"mtu":99999}"#,
                "interface.mtu: 99999 exceeds the device maximum 9216",
            ),
            (
                r#","interface":{"mtu":"1500"}"#,
                "interface.mtu: invalid type: string \"1500\", expected u32",
            ),
            (
                r#","interface":{"mtuu":1500}"#,
                "interface.mtuu: unknown field `mtuu`, expected one of `name`",
            ),
            (
                r#","interface":{"addresses":["10.0.0.1/33"]}"#,
                "interface.addresses[0]: `10.0.0.1/33` is not an IP prefix in CIDR form",
            ),
            (
                r#","routes":[{"destination":"10.0.0.0/8"},{"destination":"fd00::/8","gateway":"10.0.0.1"}]"#,
                "routes[1].gateway: 10.0.0.1 is not of the same address family as fd00::/8",
            ),
            (
                r#","rules":[{"priority":32766,"source":"10.0.0.0/8"}]"#,
                "rules[0].priority: 32766 is outside 1..=32765",
            ),
            (
                r#","neighbors":[{"destination":"10.0.0.1","hardwareAddr":"01:00:5e:00:00:01"}]"#,
                "neighbors[0].hardwareAddr: `01:00:5e:00:00:01` is a multicast address",
            ),
            (
                r#","sysctls":{"net.core.somaxconn":"1024"}"#,
                "sysctls.net.core.somaxconn: not a per-interface key; only net.ipv4.conf",
            ),
            (
                r#","sysctls":{"net.ipv4.conf.all.forwarding":"1"}"#,
                "sysctls.net.ipv4.conf.all.forwarding: `all` is every interface; only",
            ),
            (
                r#","rdma":{"mode":"private"}"#,
                "rdma.mode: unknown variant `private`",
            ),
            (
                r#","topology":{"require":"NV12"}"#,
                "topology.require: unknown variant `NV12`",
            ),
            (
                r#","interface":{"dhcp":true}"#,
                "interface.dhcp: knd does not run a DHCP client",
            ),
            (
                r#","interface":{"disableEbpfPrograms":true}"#,
                "interface.disableEbpfPrograms: knd does not detach other parties' eBPF",
            ),
            (
                r#","ethtool":{"privateFlags":{"rx_striding_rq":false}}"#,
                "ethtool.privateFlags: driver private flags are not supported",
            ),
            (
                r#","rdma":{"mode":"exclusive"}"#,
                "rdma.mode: `exclusive` is not supported",
            ),
            (
                r#","interface":{"name":"net1","arpIgnore":1},"sysctls":{"net.ipv4.conf.net1.arp_ignore":"2"}"#,
                "sysctls.net.ipv4.conf.net1.arp_ignore: interface.arpIgnore sets it too",
            ),
            (
                r#","interface":{"name":"a/b"}"#,
                "interface.name: `a/b` is not a valid interface name",
            ),
        ];
        for (tail, expected) in cases {
            let json = format!("{{{HEAD}{tail}}}");
            let err = parse_validate(&json).unwrap_err().to_string();
            assert!(
                err.starts_with(expected),
                "{json}\n  gave: {err}\n  want: {expected}"
            );
        }
        let err =
            parse_validate(r#"{"apiVersion":"dra.net/v1","kind":"NetworkConfig"}"#).unwrap_err();
        assert_eq!(err.path, "apiVersion");
        let err = parse(b"{").unwrap_err();
        assert!(err.reason.contains("EOF"), "{err}");
        let err = parse(&vec![b' '; MAX_CONFIG_BYTES + 1]).unwrap_err();
        assert!(err.reason.contains("at most 10240"), "{err}");
    }

    #[test]
    fn later_layers_win_field_by_field() {
        let class = parse(
            format!(
                r#"{{{HEAD},"interface":{{"mtu":9000,"name":"net1"}},"routes":[{{"destination":"10.0.0.0/8"}}],
                   "sysctls":{{"net.ipv4.conf.net1.rp_filter":"0","net.ipv4.conf.net1.arp_notify":"1"}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let claim = parse(
            format!(
                r#"{{{HEAD},"interface":{{"mtu":1500}},"sysctls":{{"net.ipv4.conf.net1.rp_filter":"2"}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let merged = class.merge(claim);
        let interface = merged.interface.as_ref().unwrap();
        assert_eq!(interface.mtu, Some(1500));
        assert_eq!(interface.name.as_deref(), Some("net1"));
        assert_eq!(
            merged.routes.as_ref().unwrap().len(),
            1,
            "unset lists are kept"
        );
        let sysctls = merged.sysctls.unwrap();
        let key = |text: &str| text.parse::<SysctlKey>().unwrap();
        assert_eq!(sysctls[&key("net.ipv4.conf.net1.rp_filter")], "2");
        assert_eq!(sysctls[&key("net.ipv4.conf.net1.arp_notify")], "1");
    }

    #[test]
    fn the_published_schema_is_current() {
        let published = include_str!("../../../deploy/networkconfig.schema.json");
        assert!(
            published == json_schema(),
            "deploy/networkconfig.schema.json is stale: regenerate it with `knd config-schema > \
             deploy/networkconfig.schema.json`"
        );
        let schema: serde_json::Value = serde_json::from_str(published).unwrap();
        assert_eq!(
            schema["additionalProperties"], false,
            "unknown fields are rejected"
        );
        assert!(schema["properties"]["interface"].is_object());
    }

    /// A tenant writes the claim config: no key may name a file outside the interface's own
    /// `conf` directory, nor another interface than the claim's.
    #[test]
    fn sysctl_keys_cannot_reach_other_files_or_interfaces() {
        for hostile in [
            "net.ipv4.conf./proc/sys/kernel.core_pattern",
            "net.ipv4.conf.../../kernel.core_pattern",
            "net.ipv4.conf.net1/../../../kernel.core_pattern",
            "net.ipv4.conf...core_pattern",
            "net.ipv4.conf.net1.../core_pattern",
            "net.ipv4.conf.net1.Core",
            "net.ipv4.conf.net1.",
            "net.ipv4.conf.default.forwarding",
            "net.ipv6.conf.all.disable_ipv6",
            "net.ipv4.conf.a-very-long-interface-name.rp_filter",
            "net.ipv4.ip_forward",
            "kernel.core_pattern",
        ] {
            let json = format!(r#"{{{HEAD},"sysctls":{{"{hostile}":"1"}}}}"#);
            let err = parse_validate(&json).expect_err(hostile);
            assert!(err.to_string().contains(hostile), "{hostile}: {err}");
        }
        let key: SysctlKey = "net.ipv6.conf.eth0.100.accept_ra".parse().unwrap();
        assert_eq!(
            (key.family(), key.interface(), key.setting()),
            (SysctlFamily::Ipv6, "eth0.100", "accept_ra")
        );
        assert_eq!(key.to_string(), "net.ipv6.conf.eth0.100.accept_ra");
        // The pod's own eth0 is not the claim's interface.
        let err = parse_validate(&format!(
            r#"{{{HEAD},"interface":{{"name":"net1"}},"sysctls":{{"net.ipv4.conf.eth0.rp_filter":"0"}}}}"#
        ))
        .unwrap_err();
        assert_eq!(err.path, "sysctls.net.ipv4.conf.eth0.rp_filter");
        assert!(
            err.reason
                .contains("the claim's interface in the pod is `net1`"),
            "{err}"
        );
    }

    /// Features that reach beyond the pod's own traffic (into the port other functions share)
    /// are refused, naming the feature; offloads pass.
    #[test]
    fn only_offloads_of_the_pods_own_traffic_may_be_changed() {
        for hostile in [
            "loopback",
            "rx-all",
            "rx-fcs",
            "hw-tc-offload",
            "rx-ntuple-filter",
            "rx-vlan-filter",
            "l2-fwd-offload",
        ] {
            let json = format!(r#"{{{HEAD},"ethtool":{{"features":{{"{hostile}":true}}}}}}"#);
            let err = parse_validate(&json).expect_err(hostile);
            assert_eq!(err.path, format!("ethtool.features.{hostile}"));
            assert!(
                err.reason.contains("not a feature a claim may change"),
                "{err}"
            );
        }
        let json = format!(
            r#"{{{HEAD},"ethtool":{{"features":{{"rx-gro-hw":true,"tx-tcp-segmentation":false}}}}}}"#
        );
        parse_validate(&json).unwrap();
    }

    #[test]
    fn paths_nest_under_their_parent() {
        let e = ConfigError::new("interface.mtu", "x").within("config[2]");
        assert_eq!(e.path, "config[2].interface.mtu");
        let e = ConfigError::new("[0]", "x").within("addresses");
        assert_eq!(e.path, "addresses[0]");
    }
}
