//! The PCIe/NUMA topology model: how far apart two PCI devices are, in the classes
//! `nvidia-smi topo -m` uses, so a NIC can be matched to the GPU it serves best.

use std::fmt;

use serde::Serialize;

use crate::{
    config::DistanceName,
    inventory::{Inventory, pci::PciDevice},
};

/// Distance between two PCI devices, best first (the derived order compares closeness).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Distance {
    /// At most one PCIe switch between them.
    Pix,
    /// Several PCIe switches between them, without crossing the host bridge.
    Pxb,
    /// Same root complex (host bridge), reached through it.
    Phb,
    /// Same NUMA node, different root complexes.
    Node,
    /// Different NUMA nodes (crossing the inter-socket link).
    Sys,
}

impl Distance {
    /// Every class, best first.
    pub const ALL: [Self; 5] = [Self::Pix, Self::Pxb, Self::Phb, Self::Node, Self::Sys];

    /// The name `nvidia-smi topo -m` prints.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pix => "PIX",
            Self::Pxb => "PXB",
            Self::Phb => "PHB",
            Self::Node => "NODE",
            Self::Sys => "SYS",
        }
    }

    /// Parses a class name (any case).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(text))
    }
}

impl From<DistanceName> for Distance {
    fn from(name: DistanceName) -> Self {
        match name {
            DistanceName::Pix => Self::Pix,
            DistanceName::Pxb => Self::Pxb,
            DistanceName::Phb => Self::Phb,
            DistanceName::Node => Self::Node,
            DistanceName::Sys => Self::Sys,
        }
    }
}

impl fmt::Display for Distance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The distance class between two PCI devices.
///
/// Under one root complex, the bridges above each device are compared. A PCIe switch shows up
/// in sysfs as an upstream port with its downstream ports below it; below a root port (depth 1)
/// upstream ports sit at even depths. The switches on the path between the devices are counted
/// by their upstream ports: at most one is PIX, more is PXB, and no shared bridge at all means
/// the path turns at the host bridge (PHB). Across root complexes only NUMA nodes are compared;
/// a platform that reports no NUMA node for either device has a single node.
pub fn distance(a: &PciDevice, b: &PciDevice) -> Distance {
    let same_root_complex = a.root_complex.is_some() && a.root_complex == b.root_complex;
    if !same_root_complex {
        return match (a.numa_node, b.numa_node) {
            (Some(x), Some(y)) if x == y => Distance::Node,
            (None, None) => Distance::Node,
            _ => Distance::Sys,
        };
    }
    let common = a
        .upstream
        .iter()
        .zip(&b.upstream)
        .take_while(|(x, y)| x == y)
        .count();
    if common == 0 {
        return Distance::Phb;
    }
    // The deepest shared bridge, then each side's bridges below it; depth counts from 1.
    let shared = std::iter::once(common);
    let below_a = (common + 1)..=a.upstream.len();
    let below_b = (common + 1)..=b.upstream.len();
    let switches = shared
        .chain(below_a)
        .chain(below_b)
        .filter(|depth| depth % 2 == 0)
        .count();
    if switches <= 1 {
        Distance::Pix
    } else {
        Distance::Pxb
    }
}

/// The GPU×NIC matrix of a node (`knd topo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Every GPU.
    pub gpus: Vec<GpuEntry>,
    /// Every published NIC with a PCI function.
    pub nics: Vec<NicEntry>,
    /// One entry per GPU×NIC pair.
    pub pairs: Vec<Pair>,
}

/// A GPU in [`Report`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuEntry {
    /// PCI bus ID.
    #[serde(rename = "pciBusID")]
    pub pci_bus_id: String,
    /// Root complex.
    pub pcie_root: Option<String>,
    /// NUMA node.
    pub numa_node: Option<u32>,
}

/// A NIC in [`Report`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NicEntry {
    /// The published device name.
    pub device: String,
    /// Interface name.
    pub if_name: Option<String>,
    /// PCI bus ID.
    #[serde(rename = "pciBusID")]
    pub pci_bus_id: String,
    /// Root complex.
    pub pcie_root: Option<String>,
    /// NUMA node.
    pub numa_node: Option<u32>,
    /// RDMA device.
    pub rdma_device: Option<String>,
}

/// One GPU×NIC distance in [`Report`], both sides by PCI bus ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pair {
    /// GPU PCI bus ID.
    pub gpu: String,
    /// NIC PCI bus ID.
    pub nic: String,
    /// Distance class.
    pub class: Distance,
}

impl Serialize for Distance {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Distance {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{text}` is not a distance class (PIX, PXB, PHB, NODE or SYS)"
            ))
        })
    }
}

impl Report {
    /// The matrix for an inventory.
    pub fn new(inventory: &Inventory) -> Self {
        let gpus: Vec<GpuEntry> = inventory
            .gpus
            .iter()
            .map(|gpu| GpuEntry {
                pci_bus_id: gpu.address.clone(),
                pcie_root: gpu.root_complex.clone(),
                numa_node: gpu.numa_node,
            })
            .collect();
        let nics_with_pci: Vec<(&crate::inventory::Nic, &PciDevice)> = inventory
            .nics
            .iter()
            .filter_map(|nic| nic.pci.as_ref().map(|pci| (nic, pci)))
            .collect();
        let nics = nics_with_pci
            .iter()
            .map(|(nic, pci)| NicEntry {
                device: crate::resources::device_name(nic),
                if_name: nic.netdev.as_ref().map(|n| n.name.clone()),
                pci_bus_id: pci.address.clone(),
                pcie_root: pci.root_complex.clone(),
                numa_node: pci.numa_node,
                rdma_device: nic.rdma.first().map(|r| r.name.clone()),
            })
            .collect();
        let pairs = inventory
            .gpus
            .iter()
            .flat_map(|gpu| {
                nics_with_pci.iter().map(move |(_, pci)| Pair {
                    gpu: gpu.address.clone(),
                    nic: pci.address.clone(),
                    class: distance(gpu, pci),
                })
            })
            .collect();
        Self { gpus, nics, pairs }
    }

    /// The matrix as a table: one row per GPU, one column per NIC.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let label = |nic: &NicEntry| nic.if_name.clone().unwrap_or_else(|| nic.device.clone());
        let width = self
            .nics
            .iter()
            .map(|n| label(n).len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = write!(out, "{:<14}", "GPU");
        for nic in &self.nics {
            let _ = write!(out, " {:>width$}", label(nic));
        }
        let _ = writeln!(out, "  {:<10} NUMA", "pcieRoot");
        for gpu in &self.gpus {
            let _ = write!(out, "{:<14}", gpu.pci_bus_id);
            for nic in &self.nics {
                let class = self
                    .pairs
                    .iter()
                    .find(|p| p.gpu == gpu.pci_bus_id && p.nic == nic.pci_bus_id)
                    .map_or("-", |p| p.class.as_str());
                let _ = write!(out, " {class:>width$}");
            }
            let _ = writeln!(
                out,
                "  {:<10} {}",
                gpu.pcie_root.as_deref().unwrap_or("-"),
                gpu.numa_node
                    .map_or_else(|| "-".to_owned(), |n| n.to_string())
            );
        }
        if self.gpus.is_empty() {
            out.push_str("(no GPUs found)\n");
        }
        out.push_str("\nPIX: at most one PCIe switch  PXB: several switches  PHB: same root complex  NODE: same NUMA node  SYS: across NUMA nodes\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(root_complex: &str, upstream: &[&str], numa: Option<u32>) -> PciDevice {
        PciDevice {
            root_complex: Some(root_complex.to_owned()),
            upstream: upstream.iter().map(|s| (*s).to_owned()).collect(),
            numa_node: numa,
            ..PciDevice::default()
        }
    }

    const RP: &str = "0000:00:01.0";
    const USP: &str = "0000:01:00.0";

    #[test]
    fn same_switch_is_pix() {
        let gpu = device("pci0000:00", &[RP, USP, "0000:02:08.0"], Some(0));
        let nic = device("pci0000:00", &[RP, USP, "0000:02:10.0"], Some(0));
        assert_eq!(distance(&gpu, &nic), Distance::Pix);
        assert_eq!(distance(&nic, &gpu), Distance::Pix);
    }

    #[test]
    fn nested_switches_are_pxb_and_a_shared_lower_switch_is_pix() {
        let top = [RP, USP];
        let under = |dsp: &str, usp2: &str, dsp2: &str| {
            let mut chain = top.to_vec();
            chain.extend([dsp, usp2, dsp2]);
            device("pci0000:00", &chain, Some(0))
        };
        let a = under("0000:02:08.0", "0000:03:00.0", "0000:04:00.0");
        let b = under("0000:02:10.0", "0000:06:00.0", "0000:07:00.0");
        assert_eq!(distance(&a, &b), Distance::Pxb);
        let c = under("0000:02:08.0", "0000:03:00.0", "0000:04:08.0");
        assert_eq!(distance(&a, &c), Distance::Pix);
        // One side directly on the top switch, the other one level further down: two switches.
        let d = device("pci0000:00", &[RP, USP, "0000:02:18.0"], Some(0));
        assert_eq!(distance(&a, &d), Distance::Pxb);
    }

    #[test]
    fn different_root_ports_are_phb() {
        let gpu = device("pci0000:00", &["0000:00:01.0"], Some(0));
        let nic = device("pci0000:00", &["0000:00:03.0", "0000:05:00.0"], Some(0));
        assert_eq!(distance(&gpu, &nic), Distance::Phb);
        // Hyper-V style: no bridges at all, same root complex.
        assert_eq!(
            distance(
                &device("pci0001:00", &[], None),
                &device("pci0001:00", &[], None)
            ),
            Distance::Phb
        );
    }

    #[test]
    fn across_root_complexes_numa_decides() {
        let a = device("pci0000:00", &[RP], Some(0));
        let b = device("pci0000:80", &["0000:80:01.0"], Some(0));
        let c = device("pci0000:c0", &["0000:c0:01.0"], Some(1));
        assert_eq!(distance(&a, &b), Distance::Node);
        assert_eq!(distance(&a, &c), Distance::Sys);
        let unknown = device("pci0000:40", &[], None);
        assert_eq!(distance(&a, &unknown), Distance::Sys);
        let other_unknown = device("pci0000:50", &[], None);
        assert_eq!(distance(&unknown, &other_unknown), Distance::Node);
    }

    #[test]
    fn classes_order_best_first_and_round_trip() {
        assert!(Distance::Pix < Distance::Pxb && Distance::Node < Distance::Sys);
        for class in Distance::ALL {
            assert_eq!(
                Distance::parse(&class.to_string().to_lowercase()),
                Some(class)
            );
        }
        assert_eq!(Distance::parse("NV12"), None);
    }
}
