//! A GPU DRA driver stand-in (the slice and DeviceClass NVIDIA's driver would publish for a
//! fixture machine's GPUs) and the placement simulation: many 1 GPU + 1 NIC allocations on a node
//! whose pods come and go, placed by claim templates through [`knd::cli::placement`] or at random.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::resource::v1::{DeviceClass, ResourceSlice};

use knd::{
    cli::placement::{Catalog, DeviceId, Evaluated},
    discover::{inventory::Inventory, pci::PciDevice, topology},
    model::distance::Distance,
    publish::resources::{NUMA_NODE, PCI_BUS_ID, PCIE_ROOT, Value},
};

/// The stand-in GPU driver's name (NVIDIA's).
pub const GPU_DRIVER: &str = "gpu.nvidia.com";

/// The ResourceSlice a GPU driver publishes for `inventory`'s GPUs on `node`: `gpu-N` in
/// address order, with the standard `pciBusID`, `pcieRoot` and (where the kernel knows it)
/// `numaNode` attributes.
pub fn gpu_slice(inventory: &Inventory, node: &str) -> ResourceSlice {
    let mut gpus: Vec<&PciDevice> = inventory.gpus.iter().collect();
    gpus.sort_by(|a, b| a.address.cmp(&b.address));
    let devices: Vec<serde_json::Value> = gpus
        .iter()
        .enumerate()
        .map(|(i, gpu)| {
            let mut device = serde_json::json!({"name": format!("gpu-{i}"), "attributes": {
                PCI_BUS_ID: {"string": gpu.address},
                PCIE_ROOT: {"string": gpu.root_complex.clone().unwrap_or_default()},
                "productName": {"string": "NVIDIA H100 80GB HBM3"},
            }});
            if let Some(numa) = gpu.numa_node {
                device["attributes"][NUMA_NODE] = serde_json::json!({"int": numa});
            }
            device
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": {"name": format!("{node}-{GPU_DRIVER}")},
        "spec": {"driver": GPU_DRIVER, "nodeName": node,
                 "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                 "devices": devices}
    }))
    .expect("a valid ResourceSlice")
}

/// The GPU driver's DeviceClass.
pub fn gpu_class() -> DeviceClass {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
        "metadata": {"name": GPU_DRIVER},
        "spec": {"selectors": [{"cel": {"expression": format!("device.driver == \"{GPU_DRIVER}\"")}}]}
    }))
    .expect("a valid DeviceClass")
}

/// Everything an allocation on fixture node `node-1` sees: the templates `knd templates` writes
/// for it (classes and claim templates), knd's slices, and the GPU driver stand-in's slice and
/// class.
pub fn node_documents(inventory: &Inventory) -> anyhow::Result<knd::cli::placement::Documents> {
    let generated = knd::cli::templates::generate(inventory, GPU_DRIVER);
    let yaml = knd::cli::templates::to_yaml(&generated, "node-1")?;
    let mut documents = knd::cli::placement::Documents::parse(&yaml, "templates")?;
    documents.slices.extend(knd::publish::resources::slices(
        inventory,
        knd::publish::resources::DRIVER_NAME,
        "node-1",
        1,
        None,
    ));
    documents.slices.push(gpu_slice(inventory, "node-1"));
    documents.classes.push(gpu_class());
    Ok(documents)
}

/// How the simulated pods get their devices.
#[derive(Debug)]
pub enum Strategy<'a> {
    /// Each pod names one of these claim templates (a random one); when its devices are taken,
    /// the others are tried in random order.
    Templates(Vec<Evaluated<'a>>),
    /// A random free GPU and a random free NIC (the "unaligned" placement).
    Random,
}

/// What a simulation placed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Allocations made.
    pub allocations: u64,
    /// Pairs per distance class.
    pub classes: BTreeMap<Distance, u64>,
    /// Pairs at the best class any NIC has to that GPU.
    pub aligned: u64,
}

impl Outcome {
    /// The share of pairs in `class`, 0–1.
    pub fn share(&self, class: Distance) -> f64 {
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let share =
            self.classes.get(&class).copied().unwrap_or(0) as f64 / self.allocations.max(1) as f64;
        share
    }
}

/// A small deterministic generator (xorshift64*), so runs repeat.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        usize::try_from(x % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
    }
}

/// Places `allocations` GPU+NIC pairs on the node of `catalog`: pods arrive one after another;
/// when nothing fits (all GPUs busy), a random running pod ends first. Distances come from
/// `inventory`'s topology (the GPU's `pciBusID`, the NIC's `pciAddress`).
pub fn simulate(
    inventory: &Inventory,
    catalog: &Catalog,
    strategy: &Strategy<'_>,
    allocations: u64,
    seed: u64,
) -> anyhow::Result<Outcome> {
    let mut rng = Rng(seed | 1);
    let pci_of = |device: &DeviceId| -> Option<&PciDevice> {
        let entry = catalog.devices.iter().find(|d| &d.id == device)?;
        let attribute = if device.driver == GPU_DRIVER {
            PCI_BUS_ID.to_owned()
        } else {
            format!("{}/pciAddress", device.driver)
        };
        let Some(Value::Str(address)) = entry.attributes.get(&attribute) else {
            return None;
        };
        inventory
            .gpus
            .iter()
            .chain(inventory.nics.iter().filter_map(|n| n.pci.as_ref()))
            .find(|p| &p.address == address)
    };
    let nic_pcis: Vec<&PciDevice> = inventory
        .nics
        .iter()
        .filter_map(|n| n.pci.as_ref())
        .collect();
    let best: BTreeMap<&str, Distance> = inventory
        .gpus
        .iter()
        .filter_map(|g| {
            let best = nic_pcis.iter().map(|n| topology::distance(g, n)).min()?;
            Some((g.address.as_str(), best))
        })
        .collect();
    let gpus: Vec<&DeviceId> = catalog
        .devices
        .iter()
        .filter(|d| d.id.driver == GPU_DRIVER)
        .map(|d| &d.id)
        .collect();
    let nics: Vec<&DeviceId> = catalog
        .devices
        .iter()
        .filter(|d| d.id.driver != GPU_DRIVER)
        .map(|d| &d.id)
        .collect();
    anyhow::ensure!(!gpus.is_empty() && !nics.is_empty(), "no GPUs or no NICs");
    let mut in_use: HashSet<DeviceId> = HashSet::new();
    let mut running: Vec<[DeviceId; 2]> = Vec::new();
    let mut outcome = Outcome::default();
    while outcome.allocations < allocations {
        let Some([gpu, nic]) = place(strategy, &gpus, &nics, &in_use, &mut rng) else {
            anyhow::ensure!(!running.is_empty(), "nothing fits on an empty node");
            let ended = running.swap_remove(rng.below(running.len()));
            for device in ended {
                in_use.remove(&device);
            }
            continue;
        };
        let (Some(gpu_pci), Some(nic_pci)) = (pci_of(&gpu), pci_of(&nic)) else {
            anyhow::bail!("{gpu} or {nic} has no PCI address in the inventory");
        };
        let class = topology::distance(gpu_pci, nic_pci);
        *outcome.classes.entry(class).or_default() += 1;
        if best.get(gpu_pci.address.as_str()) == Some(&class) {
            outcome.aligned += 1;
        }
        outcome.allocations += 1;
        in_use.insert(gpu.clone());
        in_use.insert(nic.clone());
        running.push([gpu, nic]);
    }
    Ok(outcome)
}

/// One pod's GPU and NIC, or `None` when nothing fits.
fn place(
    strategy: &Strategy<'_>,
    gpus: &[&DeviceId],
    nics: &[&DeviceId],
    in_use: &HashSet<DeviceId>,
    rng: &mut Rng,
) -> Option<[DeviceId; 2]> {
    match strategy {
        Strategy::Random => {
            let free = |all: &[&DeviceId]| -> Vec<DeviceId> {
                all.iter()
                    .filter(|d| !in_use.contains(**d))
                    .map(|d| (*d).clone())
                    .collect()
            };
            let (free_gpus, free_nics) = (free(gpus), free(nics));
            if free_gpus.is_empty() || free_nics.is_empty() {
                return None;
            }
            let gpu = free_gpus[rng.below(free_gpus.len())].clone();
            let nic = free_nics[rng.below(free_nics.len())].clone();
            Some([gpu, nic])
        }
        Strategy::Templates(templates) => {
            let mut order: Vec<usize> = (0..templates.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            order.into_iter().find_map(|t| {
                let allocation = templates[t].allocate(in_use).ok()?;
                Some([
                    allocation.device("gpu")?.clone(),
                    allocation.device("nic")?.clone(),
                ])
            })
        }
    }
}
