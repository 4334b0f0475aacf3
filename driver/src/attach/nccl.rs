//! What NCCL needs to know about a pod's claimed NICs, handed to its containers when the claim
//! asks for it (`nccl: {env: true}`): which interfaces and RDMA ports to use, which GID of each
//! port carries the pod's address, and a topology file placing the pod's GPUs and NICs in the
//! PCIe tree, in the format NCCL reads from `NCCL_TOPO_FILE`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv6Addr},
};

use crate::{
    discover::{
        inventory::{
            Nic,
            rdma::{self, GidEntry, GidType},
        },
        pci::{self, PciDevice},
    },
    os::host::{FileProblem, HostRoot, Warnings},
};

/// Where a container finds its topology file (a read-only bind mount of the file knd wrote).
pub const TOPOLOGY_PATH: &str = "/etc/knd/nccl-topo.xml";

/// One claimed NIC as the pod sees it.
#[derive(Debug, Clone, Copy)]
pub struct PodNic<'a> {
    /// Its interface name in the pod.
    pub interface: &'a str,
    /// Its addresses in the pod.
    pub addresses: &'a [IpAddr],
    /// The device (PCI function and RDMA devices).
    pub nic: &'a Nic,
}

/// The variables and the topology file for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Environment variables, in a fixed order.
    pub env: Vec<(String, String)>,
    /// The topology file's content.
    pub topology: String,
}

/// Why the settings could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    /// A name NCCL's lists or its XML parser cannot carry.
    #[error("`{0}` cannot be handed to NCCL (only letters, digits, '.', '_', '-' and '@')")]
    Name(String),
    /// The port's GID table could not be read.
    #[error("cannot read the GID table of {device} port {port}: {problem}")]
    GidTable {
        /// RDMA device.
        device: String,
        /// Port.
        port: u32,
        /// What went wrong.
        problem: FileProblem,
    },
    /// No GID of the port carries one of the pod's addresses.
    #[error(
        "no GID of {device} port {port} carries an address of {interface} ({addresses}); \
         the table has {entries} entries in use"
    )]
    NoGid {
        /// RDMA device.
        device: String,
        /// Port.
        port: u32,
        /// The pod's interface.
        interface: String,
        /// Its addresses.
        addresses: String,
        /// Entries in use.
        entries: usize,
    },
}

/// The port of an RDMA device NCCL uses, and the GID chosen on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// RDMA device, e.g. `mlx5_0`.
    pub device: String,
    /// Port number.
    pub port: u32,
    /// `None` on InfiniBand (NCCL's default GID 0 is the port GID); the chosen entry on RoCE.
    pub gid: Option<GidEntry>,
}

/// The GID of a RoCE port that carries one of `addresses`: RoCE v2 before v1 (NCCL's default
/// is v2, and only v2 is routed), and within a type an IPv4 address (IPv4-mapped in the
/// table) before an IPv6 one; link-local IPv6 addresses only when nothing else matches.
pub fn choose_gid(table: &[GidEntry], addresses: &[IpAddr]) -> Option<GidEntry> {
    let mut wanted: Vec<Ipv6Addr> = addresses
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(v4) => Some(v4.to_ipv6_mapped()),
            IpAddr::V6(_) => None,
        })
        .collect();
    let (link_local, global): (Vec<Ipv6Addr>, Vec<Ipv6Addr>) = addresses
        .iter()
        .filter_map(|a| match a {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
        .partition(Ipv6Addr::is_unicast_link_local);
    wanted.extend(global);
    wanted.extend(link_local);
    [GidType::RoceV2, GidType::IbOrRoceV1]
        .into_iter()
        .flat_map(|kind| wanted.iter().map(move |gid| (kind, *gid)))
        .find_map(|(kind, gid)| {
            table
                .iter()
                .find(|e| e.kind == kind && e.gid == gid)
                .copied()
        })
}

/// The RDMA port of each NIC that has one (its first port), with the GID its pod address has.
pub fn ports(host: &HostRoot, nics: &[PodNic<'_>]) -> Result<Vec<Port>, NcclError> {
    let mut ports = Vec::new();
    for nic in nics {
        for device in &nic.nic.rdma {
            let Some(port) = device.ports.first() else {
                continue;
            };
            checked_name(&device.name)?;
            let gid = if port.link_layer.as_deref() == Some("InfiniBand") {
                None
            } else {
                let table =
                    rdma::gid_table(host, &device.name, port.number).map_err(|problem| {
                        NcclError::GidTable {
                            device: device.name.clone(),
                            port: port.number,
                            problem,
                        }
                    })?;
                let chosen = choose_gid(&table, nic.addresses).ok_or_else(|| NcclError::NoGid {
                    device: device.name.clone(),
                    port: port.number,
                    interface: nic.interface.to_owned(),
                    addresses: nic
                        .addresses
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    entries: table.len(),
                })?;
                Some(chosen)
            };
            ports.push(Port {
                device: device.name.clone(),
                port: port.number,
                gid,
            });
        }
    }
    Ok(ports)
}

/// The settings for a pod with `nics` and `gpus` (the GPUs allocated with its NICs).
pub fn settings(
    host: &HostRoot,
    pod: &str,
    nics: &[PodNic<'_>],
    gpus: &[&PciDevice],
) -> Result<Settings, NcclError> {
    let mut env = Vec::new();
    let interfaces = nics
        .iter()
        .map(|n| checked_name(n.interface))
        .collect::<Result<Vec<_>, _>>()?;
    // `=` asks NCCL for these names exactly (without it, `net1` also matches `net10`).
    env.push((
        "NCCL_SOCKET_IFNAME".to_owned(),
        format!("={}", interfaces.join(",")),
    ));
    let ports = ports(host, nics)?;
    if !ports.is_empty() {
        let hcas: Vec<String> = ports
            .iter()
            .map(|p| format!("{}:{}", p.device, p.port))
            .collect();
        env.push(("NCCL_IB_HCA".to_owned(), format!("={}", hcas.join(","))));
        let mut indexes: Vec<u32> = ports
            .iter()
            .filter_map(|p| p.gid.map(|g| g.index))
            .collect();
        indexes.sort_unstable();
        indexes.dedup();
        match indexes.as_slice() {
            [] => {}
            [one] => env.push(("NCCL_IB_GID_INDEX".to_owned(), one.to_string())),
            // One variable for every port: where the ports differ, let NCCL find each port's
            // entry by the pod's address family and RoCE version instead.
            _ => {
                let v4 = ports
                    .iter()
                    .filter_map(|p| p.gid)
                    .all(|g| g.gid.to_ipv4_mapped().is_some());
                let family = if v4 { "AF_INET" } else { "AF_INET6" };
                env.push(("NCCL_IB_ADDR_FAMILY".to_owned(), family.to_owned()));
                let v2 = ports
                    .iter()
                    .filter_map(|p| p.gid)
                    .all(|g| g.kind == GidType::RoceV2);
                env.push((
                    "NCCL_IB_ROCE_VERSION_NUM".to_owned(),
                    if v2 { "2" } else { "1" }.to_owned(),
                ));
            }
        }
    }
    env.push(("NCCL_TOPO_FILE".to_owned(), TOPOLOGY_PATH.to_owned()));
    let topology = topology_xml(host, pod, nics, gpus)?;
    Ok(Settings { env, topology })
}

/// `name`, if NCCL's comma-separated lists and its XML parser (no escapes) can carry it.
fn checked_name(name: &str) -> Result<&str, NcclError> {
    let fine = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if fine {
        Ok(name)
    } else {
        Err(NcclError::Name(name.to_owned()))
    }
}

/// A `<pci>` element of the topology, with what sits below it.
#[derive(Debug, Default)]
struct PciNode {
    attributes: Vec<(&'static str, String)>,
    children: BTreeMap<String, PciNode>,
    /// `<net>` elements of a `<nic>` below it (attributes each).
    nets: Vec<Vec<(&'static str, String)>>,
}

/// The ancestors NCCL itself gives a PCI function when it walks sysfs (`ncclTopoGetXmlFromSys`):
/// it climbs two path components at a time, so each PCIe switch appears once (its upstream
/// port; downstream ports and root ports are skipped), and a function whose climb reaches the
/// root complex hangs from the CPU. Top first.
pub fn nccl_ancestors(upstream: &[String]) -> Vec<&str> {
    let mut ancestors = Vec::new();
    let mut at = upstream.len();
    while at >= 2 {
        at -= 2;
        ancestors.push(upstream[at].as_str());
    }
    ancestors.reverse();
    ancestors
}

fn pci_attributes(device: &PciDevice) -> Vec<(&'static str, String)> {
    let mut attributes = vec![
        ("busid", device.address.clone()),
        ("class", format!("0x{:06x}", device.class)),
        ("vendor", format!("0x{:04x}", device.vendor)),
        ("device", format!("0x{:04x}", device.device)),
    ];
    if let Some(vendor) = device.subsystem_vendor {
        attributes.push(("subsystem_vendor", format!("0x{vendor:04x}")));
    }
    if let Some(id) = device.subsystem_device {
        attributes.push(("subsystem_device", format!("0x{id:04x}")));
    }
    attributes
}

/// The topology file: `<system version="1">`, a `<cpu numaid>` per NUMA node, the PCIe
/// switches as NCCL's own detection nests them ([`nccl_ancestors`]), the GPUs' functions (NCCL
/// adds the `<gpu>` element with its device index and compute capability itself, from the
/// driver), and each NIC's function with a `<nic>` whose `<net>` names are those NCCL's
/// transports use: the RDMA device and port for IB/RoCE, the pod's interface for sockets.
/// Link speeds and widths are left for NCCL to read.
fn topology_xml(
    host: &HostRoot,
    pod: &str,
    nics: &[PodNic<'_>],
    gpus: &[&PciDevice],
) -> Result<String, NcclError> {
    let mut cpus: BTreeMap<i64, PciNode> = BTreeMap::new();
    for gpu in gpus {
        place(&mut cpus, host, gpu);
    }
    for nic in nics {
        let Some(function) = &nic.nic.pci else {
            continue;
        };
        let node = place(&mut cpus, host, function);
        for device in &nic.nic.rdma {
            if let Some(port) = device.ports.first() {
                node.nets.push(vec![
                    ("name", checked_name(&device.name)?.to_owned()),
                    ("port", port.number.to_string()),
                ]);
            }
        }
        node.nets
            .push(vec![("name", checked_name(nic.interface)?.to_owned())]);
    }
    let mut xml = String::new();
    let pod_name: String = pod
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "./-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let _ = writeln!(xml, "<system version=\"1\" name=\"{pod_name}\">");
    for (numa, cpu) in &cpus {
        let _ = writeln!(xml, "  <cpu numaid=\"{numa}\">");
        for child in cpu.children.values() {
            write_pci(&mut xml, child, 4);
        }
        let _ = writeln!(xml, "  </cpu>");
    }
    xml.push_str("</system>\n");
    Ok(xml)
}

/// The node of `device` in the tree, made with its ancestors where missing.
fn place<'t>(
    cpus: &'t mut BTreeMap<i64, PciNode>,
    host: &HostRoot,
    device: &PciDevice,
) -> &'t mut PciNode {
    let numa = device.numa_node.map_or(-1, i64::from);
    let mut node = cpus.entry(numa).or_default();
    for bridge in nccl_ancestors(&device.upstream) {
        node = node.children.entry(bridge.to_owned()).or_insert_with(|| {
            let mut warnings = Warnings::default();
            let attributes = pci::read_device(host, bridge, &mut warnings).map_or_else(
                // Unreadable here: still a bridge (NCCL reads the rest where it can).
                || {
                    vec![
                        ("busid", bridge.to_owned()),
                        ("class", "0x060400".to_owned()),
                    ]
                },
                |b| pci_attributes(&b),
            );
            PciNode {
                attributes,
                ..PciNode::default()
            }
        });
    }
    node.children
        .entry(device.address.clone())
        .or_insert_with(|| PciNode {
            attributes: pci_attributes(device),
            ..PciNode::default()
        })
}

fn write_pci(xml: &mut String, node: &PciNode, indent: usize) {
    let pad = " ".repeat(indent);
    let attributes = |list: &[(&str, String)]| -> String {
        list.iter().fold(String::new(), |mut out, (k, v)| {
            let _ = write!(out, " {k}=\"{v}\"");
            out
        })
    };
    let _ = write!(xml, "{pad}<pci{}", attributes(&node.attributes));
    if node.children.is_empty() && node.nets.is_empty() {
        xml.push_str("/>\n");
        return;
    }
    xml.push_str(">\n");
    if !node.nets.is_empty() {
        let _ = writeln!(xml, "{pad}  <nic>");
        for net in &node.nets {
            let _ = writeln!(xml, "{pad}    <net{}/>", attributes(net));
        }
        let _ = writeln!(xml, "{pad}  </nic>");
    }
    for child in node.children.values() {
        write_pci(xml, child, indent + 2);
    }
    let _ = writeln!(xml, "{pad}</pci>");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u32, gid: &str, kind: GidType) -> GidEntry {
        GidEntry {
            index,
            gid: gid.parse().unwrap(),
            kind,
        }
    }

    /// A RoCE port with an IPv4 and an IPv6 address: the table a mlx5 port shows (a v1 and a
    /// v2 entry for every address, the link-local pair first).
    fn roce_table() -> Vec<GidEntry> {
        vec![
            entry(0, "fe80::1", GidType::IbOrRoceV1),
            entry(1, "fe80::1", GidType::RoceV2),
            entry(2, "::ffff:10.0.0.2", GidType::IbOrRoceV1),
            entry(3, "::ffff:10.0.0.2", GidType::RoceV2),
            entry(4, "fd00::2", GidType::IbOrRoceV1),
            entry(5, "fd00::2", GidType::RoceV2),
        ]
    }

    #[test]
    fn the_ipv4_mapped_roce_v2_entry_wins() {
        let addresses: Vec<IpAddr> = ["fd00::2", "10.0.0.2", "fe80::1"]
            .map(|a| a.parse().unwrap())
            .to_vec();
        assert_eq!(choose_gid(&roce_table(), &addresses).unwrap().index, 3);
        // IPv6 only: its v2 entry; link-local only: the link-local v2 entry.
        assert_eq!(
            choose_gid(&roce_table(), &["fd00::2".parse().unwrap()])
                .unwrap()
                .index,
            5
        );
        assert_eq!(
            choose_gid(&roce_table(), &["fe80::1".parse().unwrap()])
                .unwrap()
                .index,
            1
        );
        // A port with RoCE v1 entries only (v2 disabled): the v1 entry of the address.
        let v1: Vec<GidEntry> = roce_table()
            .into_iter()
            .filter(|e| e.kind == GidType::IbOrRoceV1)
            .collect();
        assert_eq!(choose_gid(&v1, &addresses).unwrap().index, 2);
        // An address the table does not carry (another interface's): nothing.
        assert_eq!(
            choose_gid(&roce_table(), &["10.9.9.9".parse().unwrap()]),
            None
        );
    }

    #[test]
    fn nccl_climbs_two_levels_at_a_time() {
        let chain = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        // Root port only: the function hangs from the CPU.
        assert!(nccl_ancestors(&chain(&["0000:00:01.0"])).is_empty());
        // Root port, switch upstream port, switch downstream port: the switch only.
        assert_eq!(
            nccl_ancestors(&chain(&["0000:10:01.0", "0000:11:00.0", "0000:12:00.0"])),
            ["0000:11:00.0"]
        );
        // Two switches stacked.
        assert_eq!(
            nccl_ancestors(&chain(&[
                "0000:10:01.0",
                "0000:11:00.0",
                "0000:12:00.0",
                "0000:13:00.0",
                "0000:14:00.0"
            ])),
            ["0000:11:00.0", "0000:13:00.0"]
        );
    }

    #[test]
    fn names_that_would_break_a_list_or_the_xml_are_refused() {
        for bad in ["net1,net2", "a\"b", "a<b", "", "a b"] {
            assert!(checked_name(bad).is_err(), "{bad}");
        }
        assert_eq!(checked_name("mlx5_0").unwrap(), "mlx5_0");
    }
}
