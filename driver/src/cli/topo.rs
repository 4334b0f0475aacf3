//! `knd topo`: the GPU×NIC matrix of a node, in `nvidia-smi topo -m`'s distance classes.

use serde::Serialize;

use crate::{
    discover::{
        inventory::{Inventory, Nic},
        pci::PciDevice,
        topology::distance,
    },
    model::distance::Distance,
    publish::resources,
};

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
        let nics_with_pci: Vec<(&Nic, &PciDevice)> = inventory
            .nics
            .iter()
            .filter_map(|nic| nic.pci.as_ref().map(|pci| (nic, pci)))
            .collect();
        let nics = nics_with_pci
            .iter()
            .map(|(nic, pci)| NicEntry {
                device: resources::device_name(nic),
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
