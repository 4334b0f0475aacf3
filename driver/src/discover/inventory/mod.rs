//! Node inventory: discovers NICs, RDMA devices and GPUs under a host root, decides which NICs
//! may be handed to pods (never the uplink), and places each one relative to the GPUs.

mod exclusion;
pub mod netdev;

pub mod pciids;
pub mod rdma;
pub mod uplink;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

pub use self::exclusion::{Exclusion, ExclusionReason};
use self::{
    netdev::{Netdev, link_type},
    rdma::{CharDevice, RdmaDevice},
};
use crate::{
    discover::{
        pci::{self, PciDevice},
        topology,
    },
    model::distance::Distance,
    os::host::{HostRoot, Warnings},
};

/// Drivers that hand a device to user space: the kernel has no netdev for it to move.
const USERSPACE_DRIVERS: &[&str] = &["vfio-pci", "uio_pci_generic", "igb_uio", "vfio_pci"];

/// Name prefixes of interfaces that CNI plugins and container runtimes create on the host.
const CNI_PREFIXES: &[&str] = &[
    "veth",
    "cali",
    "lxc",
    "cilium",
    "flannel",
    "cni",
    "vxlan",
    "tunl",
    "weave",
    "kube-",
    "docker",
    "genev_sys",
    "antrea",
    "ovn-",
    "nodelocaldns",
];

/// What knd found on the node.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// Network devices that may be allocated to pods.
    pub nics: Vec<Nic>,
    /// GPUs and accelerators (not published; used for alignment).
    pub gpus: Vec<PciDevice>,
    /// Devices left out, each with the reason.
    pub excluded: Vec<Exclusion>,
    /// The `rdma_cm` character device, when the RDMA stack is loaded.
    pub rdma_cm: Option<CharDevice>,
    /// Files that could not be read or made no sense.
    pub warnings: Warnings,
}

/// A network device that can be handed to a pod.
#[derive(Debug, Clone, Default)]
pub struct Nic {
    /// The interface, if the device has one in the host namespace.
    pub netdev: Option<Netdev>,
    /// The PCI function, for hardware devices.
    pub pci: Option<PciDevice>,
    /// Vendor and device names from pci.ids, when installed.
    pub pci_names: Option<pciids::Names>,
    /// RDMA devices on the same function.
    pub rdma: Vec<RdmaDevice>,
    /// For an SR-IOV VF: its PF's interface name.
    pub pf_name: Option<String>,
    /// The closest GPU, with its distance class.
    pub nearest_gpu: Option<(String, Distance)>,
}

impl Nic {
    /// The interface name, or the RDMA device's name for an RDMA-only device.
    pub fn display_name(&self) -> String {
        self.netdev
            .as_ref()
            .map(|n| n.name.clone())
            .or_else(|| self.rdma.first().map(|r| r.name.clone()))
            .or_else(|| self.pci.as_ref().map(|p| p.address.clone()))
            .unwrap_or_default()
    }
}

/// What netlink tells about the namespace knd runs in, which files under a host root cannot.
#[derive(Debug, Clone, Default)]
pub struct LiveNetwork {
    /// Interfaces with a default route in the main table, with their family.
    pub default_routes: Vec<(String, &'static str)>,
    /// Every interface: index and kind.
    pub links: Vec<crate::os::netlink::LinkEntry>,
    /// Every address, by interface name.
    pub addresses: BTreeMap<String, Vec<IpAddr>>,
}

impl LiveNetwork {
    /// Whether these links are the ones sysfs shows under the host root: then knd runs in the
    /// host's network namespace (hostNetwork), whatever path the host root has, and netlink is
    /// the authority for routes, kinds and addresses.
    fn describes(&self, netdevs: &[Netdev]) -> bool {
        let live: BTreeSet<(&str, u32)> = self
            .links
            .iter()
            .map(|l| (l.name.as_str(), l.index))
            .collect();
        let seen: BTreeSet<(&str, u32)> = netdevs
            .iter()
            .filter_map(|n| Some((n.name.as_str(), n.ifindex?)))
            .collect();
        !live.is_empty() && live == seen && seen.len() == netdevs.len()
    }
}

/// The node's own addresses (the Node's `status.addresses`): an interface that holds one is
/// the node's and is never published.
pub type NodeAddresses = [IpAddr];

/// Scans the host from a blocking context. Netlink is asked first; it is used when it
/// describes the same namespace as the host root's sysfs (see [`LiveNetwork::describes`]).
pub fn discover(host: &HostRoot) -> Inventory {
    // On a thread of its own, so that callers inside an async runtime (tests, the CLI's
    // helpers) can call this too.
    let live = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(crate::os::netlink::Error::Connect)
                    .and_then(|runtime| runtime.block_on(live_network()))
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    match live {
        Ok(live) => scan(host, Some(&live)),
        Err(err) => {
            if host.is_live() {
                tracing::warn!(%err, "reading routes and links over netlink failed; using /proc and sysfs");
            }
            scan(host, None)
        }
    }
}

/// Reads routes, links and addresses over netlink, in the caller's namespace.
pub async fn live_network() -> Result<LiveNetwork, crate::os::netlink::Error> {
    let link = crate::os::netlink::Link::connect()?;
    let links = link.links().await?;
    let mut addresses: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for (index, ip) in link.all_addresses().await? {
        if let Some(entry) = links.iter().find(|l| l.index == index) {
            addresses.entry(entry.name.clone()).or_default().push(ip);
        }
    }
    Ok(LiveNetwork {
        default_routes: link.default_route_interfaces().await?,
        links,
        addresses,
    })
}

/// [`scan_node`] without node addresses.
pub fn scan(host: &HostRoot, live: Option<&LiveNetwork>) -> Inventory {
    scan_node(host, live, &[])
}

/// Scans the host: PCI devices, interfaces, RDMA devices; excludes what must not move (the
/// uplinks, the interfaces holding the node's addresses, and everything stacked with them);
/// ranks the GPUs near each NIC. `live` is used only when it describes the host root's
/// namespace; otherwise default routes come from `proc/net/*route` under the host root,
/// interface kinds from what sysfs shows, and addresses from `proc/net/if_inet6` (IPv6 only).
pub fn scan_node(
    host: &HostRoot,
    live: Option<&LiveNetwork>,
    node_addresses: &NodeAddresses,
) -> Inventory {
    let mut warnings = Warnings::new();
    let pci_devices = pci::scan(host, &mut warnings);
    let mut netdevs = netdev::scan(host, &mut warnings);
    let (rdma_devices, rdma_cm) = rdma::scan(host, &mut warnings);
    let live = live.filter(|live| live.describes(&netdevs));
    let (default_routes, addresses) = match live {
        None => (
            uplink::default_route_interfaces(host, &mut warnings),
            uplink::ipv6_addresses(host, &mut warnings),
        ),
        Some(live) => {
            for netdev in &mut netdevs {
                netdev.kind = live
                    .links
                    .iter()
                    .find(|l| l.name == netdev.name)
                    .and_then(|l| l.kind.clone());
            }
            (live.default_routes.clone(), live.addresses.clone())
        }
    };
    let holding: Vec<(String, IpAddr)> = node_addresses
        .iter()
        .flat_map(|ip| {
            addresses
                .iter()
                .filter(|(_, held)| held.contains(ip))
                .map(|(name, _)| (name.clone(), *ip))
        })
        .collect();

    let gpus: Vec<PciDevice> = pci_devices.iter().filter(|d| d.is_gpu()).cloned().collect();
    let mut excluded = Vec::new();
    let uplink_set = uplink::expand(&default_routes, &holding, &netdevs, &mut excluded);
    let uplink_pci: BTreeSet<&str> = netdevs
        .iter()
        .filter(|n| uplink_set.contains(n.name.as_str()))
        .filter_map(|n| n.pci_address.as_deref())
        .collect();

    let mut nics = Vec::new();
    for device in pci_devices.iter().filter(|d| d.is_network()) {
        // An uplink's function is reported under its interface name already.
        if !uplink_pci.contains(device.address.as_str()) {
            match pci_nic(device, &netdevs, &rdma_devices) {
                Ok(Some(nic)) => nics.push(nic),
                Ok(None) => {}
                Err(exclusion) => excluded.push(exclusion),
            }
        }
    }
    // Interfaces of PCI functions were handled above, whatever became of them.
    for netdev in netdevs.iter().filter(|n| n.pci_address.is_none()) {
        if uplink_set.contains(netdev.name.as_str()) {
            continue;
        }
        if let Some(reason) = virtual_exclusion(netdev, &netdevs) {
            excluded.push(Exclusion {
                device: netdev.name.clone(),
                reason,
            });
        } else {
            nics.push(Nic {
                netdev: Some(netdev.clone()),
                ..Nic::default()
            });
        }
    }
    name_and_place(host, &mut nics, &gpus);
    Inventory {
        nics,
        gpus,
        excluded,
        rdma_cm,
        warnings,
    }
}

/// The NIC a PCI network function offers, `None` if it has nothing to hand out here (no
/// interface and no RDMA device, e.g. already in a pod's namespace), or why it is excluded.
fn pci_nic(
    device: &PciDevice,
    netdevs: &[Netdev],
    rdma_devices: &[RdmaDevice],
) -> Result<Option<Nic>, Exclusion> {
    if let Some(driver) = device
        .driver
        .as_deref()
        .filter(|d| USERSPACE_DRIVERS.contains(d))
    {
        return Err(Exclusion {
            device: device.address.clone(),
            reason: ExclusionReason::UserspaceDriver {
                driver: driver.to_owned(),
            },
        });
    }
    if let Some(vfs) = device.sriov_num_vfs.filter(|n| *n > 0) {
        return Err(Exclusion {
            device: device.address.clone(),
            reason: ExclusionReason::SriovPhysicalFunction { vfs },
        });
    }
    let on = |address: Option<&String>| address == Some(&device.address);
    let netdev = netdevs.iter().find(|n| on(n.pci_address.as_ref())).cloned();
    let rdma: Vec<RdmaDevice> = rdma_devices
        .iter()
        .filter(|r| on(r.pci_address.as_ref()))
        .cloned()
        .collect();
    if netdev.is_none() && rdma.is_empty() {
        return Ok(None);
    }
    let pf_name = device.physfn.as_ref().and_then(|pf| {
        netdevs
            .iter()
            .find(|n| n.pci_address.as_ref() == Some(pf))
            .map(|n| n.name.clone())
    });
    Ok(Some(Nic {
        netdev,
        pci: Some(device.clone()),
        rdma,
        pf_name,
        ..Nic::default()
    }))
}

/// Adds pci.ids names and the nearest GPU to every PCI NIC.
///
/// Where several GPUs are equally close (e.g. two GPUs and two NICs behind one PCIe switch), the
/// NICs sharing that set of GPUs are dealt out to them as rails: the k-th such physical function
/// (in address order) gets the k-th GPU (round robin), and a VF follows its PF.
fn name_and_place(host: &HostRoot, nics: &mut [Nic], gpus: &[PciDevice]) {
    let wanted: Vec<(u16, u16)> = nics
        .iter()
        .filter_map(|n| n.pci.as_ref().map(|p| (p.vendor, p.device)))
        .collect();
    let names = pciids::lookup(host, &wanted);
    // Per NIC: the GPUs at the best distance, lowest address first.
    let closest: Vec<Option<(Vec<String>, Distance)>> = nics
        .iter()
        .map(|nic| {
            let pci = nic.pci.as_ref()?;
            let best = gpus.iter().map(|g| topology::distance(g, pci)).min()?;
            let mut at_best: Vec<String> = gpus
                .iter()
                .filter(|g| topology::distance(g, pci) == best)
                .map(|g| g.address.clone())
                .collect();
            at_best.sort();
            Some((at_best, best))
        })
        .collect();
    // Physical functions sharing the same closest GPUs, in address order, take turns.
    let mut order: Vec<usize> = (0..nics.len())
        .filter(|&i| {
            closest[i].is_some() && nics[i].pci.as_ref().is_some_and(|p| p.physfn.is_none())
        })
        .collect();
    order.sort_by(|&a, &b| {
        let address = |i: usize| nics[i].pci.as_ref().map(|p| p.address.clone());
        address(a).cmp(&address(b))
    });
    let mut turns: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    let mut rail: BTreeMap<String, String> = BTreeMap::new();
    for i in order {
        let (at_best, _) = closest[i].as_ref().expect("filtered");
        let turn = turns.entry(at_best.clone()).or_default();
        let gpu = at_best[*turn % at_best.len()].clone();
        *turn += 1;
        if let Some(pci) = &nics[i].pci {
            rail.insert(pci.address.clone(), gpu);
        }
    }
    for (nic, closest) in nics.iter_mut().zip(closest) {
        let Some(pci) = &nic.pci else { continue };
        nic.pci_names = names.get(&(pci.vendor, pci.device)).cloned();
        nic.nearest_gpu = closest.map(|(at_best, distance)| {
            let own = pci.physfn.as_ref().unwrap_or(&pci.address);
            let gpu = rail
                .get(own)
                .filter(|g| at_best.contains(g))
                .cloned()
                .unwrap_or_else(|| at_best[0].clone());
            (gpu, distance)
        });
    }
}

/// Why a non-PCI interface is not published, if it is not.
fn virtual_exclusion(netdev: &Netdev, all: &[Netdev]) -> Option<ExclusionReason> {
    if netdev.link_type == Some(link_type::LOOPBACK) || netdev.name == "lo" {
        return Some(ExclusionReason::Loopback);
    }
    match netdev.kind.as_deref() {
        Some("bridge") => return Some(ExclusionReason::Bridge),
        Some("bond") => return Some(ExclusionReason::Bond),
        _ => {}
    }
    let on_bridge = netdev
        .master
        .as_ref()
        .and_then(|m| all.iter().find(|n| &n.name == m))
        .is_some_and(|m| m.kind.as_deref() == Some("bridge"));
    let cni_named = CNI_PREFIXES.iter().any(|p| netdev.name.starts_with(p));
    if on_bridge || cni_named {
        return Some(ExclusionReason::CniInterface);
    }
    None
}
