//! A GPU DRA driver stand-in (the slice and DeviceClass NVIDIA's driver would publish for a
//! fixture machine's GPUs) and the placement simulation: many 1 GPU + 1 NIC allocations on a node
//! whose pods come and go, placed by claim templates through [`knd::cli::placement`] or at random.

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::{DeviceClass, ResourceSlice};

use knd::{
    cli::placement::{Allocation, Catalog, Claim, DeviceId, Evaluated, Usage},
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
/// for it (classes and claim templates), knd's slices (the NICs in `shared`, device → bits per
/// second, published as shared NICs, as `knd run --shared-nics` makes them), and the GPU driver
/// stand-in's slice and class.
pub fn node_documents(
    inventory: &Inventory,
    shared: &BTreeMap<String, u64>,
) -> anyhow::Result<knd::cli::placement::Documents> {
    let generated = knd::cli::templates::generate(inventory, GPU_DRIVER);
    let yaml = knd::cli::templates::to_yaml(&generated, "node-1")?;
    let mut documents = knd::cli::placement::Documents::parse(&yaml, "templates")?;
    documents.slices.extend(knd::publish::resources::slices_of(
        inventory,
        (knd::publish::resources::DRIVER_NAME, "node-1", 1),
        None,
        &BTreeMap::new(),
        shared,
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
    /// Pods of several kinds arrive in random turn (each kind equally often), each kind naming
    /// its own templates as [`Strategy::Templates`] does; a pod that does not fit waits (running
    /// pods end at random) until it does, so every kind keeps its share of the arrivals.
    Kinds(Vec<Vec<Evaluated<'a>>>),
    /// A random free GPU and a random free NIC, both allocated whole (the "unaligned"
    /// placement).
    Random,
}

/// What a simulation placed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Pods placed.
    pub allocations: u64,
    /// Of those, pods with a GPU and a NIC.
    pub pairs: u64,
    /// Pairs per distance class.
    pub classes: BTreeMap<Distance, u64>,
    /// Pairs at the best class any NIC has to that GPU.
    pub aligned: u64,
    /// Devices allocated as a share of a shared NIC (KEP-5075), not whole.
    pub shares: u64,
    /// Times an arriving pod found no room and a running pod had to end first.
    pub waits: u64,
    /// The pods running at those times, summed (divided by `waits`: how many pods the node
    /// holds when it is full).
    pub running_at_waits: u64,
    /// The most of any shared NIC's capacity allotted at once, per mille.
    pub peak_allotted_permille: u64,
}

impl Outcome {
    /// The share of pairs in `class`, 0–1.
    pub fn share(&self, class: Distance) -> f64 {
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let share =
            self.classes.get(&class).copied().unwrap_or(0) as f64 / self.pairs.max(1) as f64;
        share
    }

    /// How many pods the node held, on average, whenever an arriving pod found it full.
    pub fn full_at(&self) -> f64 {
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let mean = self.running_at_waits as f64 / self.waits.max(1) as f64;
        mean
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

/// Places `allocations` pods on the node of `catalog`: pods arrive one after another; when the
/// next one does not fit, a random running pod ends first. Distances come from `inventory`'s
/// topology (the GPU's `pciBusID`, the NIC's `pciAddress`). Every allocation is checked against
/// the catalog on its own, apart from the allocator: a device allocated whole is not in use, and
/// what shares of a shared NIC consume never exceeds its capacity.
pub fn simulate(
    inventory: &Inventory,
    catalog: &Catalog,
    strategy: &Strategy<'_>,
    allocations: u64,
    seed: u64,
) -> anyhow::Result<Outcome> {
    let mut rng = Rng(seed | 1);
    let nodes = Topology::new(inventory, catalog);
    let devices = |gpu: bool| -> Vec<&DeviceId> {
        catalog
            .devices
            .iter()
            .filter(|d| (d.id.driver == GPU_DRIVER) == gpu)
            .map(|d| &d.id)
            .collect()
    };
    let (gpus, nics) = (devices(true), devices(false));
    anyhow::ensure!(!gpus.is_empty() && !nics.is_empty(), "no GPUs or no NICs");
    let mut usage = Usage::default();
    let mut running: Vec<Allocation> = Vec::new();
    let mut outcome = Outcome::default();
    let mut waiting: Option<usize> = None;
    while outcome.allocations < allocations {
        let kind = *waiting.get_or_insert_with(|| match strategy {
            Strategy::Kinds(kinds) => rng.below(kinds.len()),
            Strategy::Templates(_) | Strategy::Random => 0,
        });
        let Some(allocation) = place(strategy, kind, (&gpus, &nics), &usage, &mut rng) else {
            anyhow::ensure!(!running.is_empty(), "nothing fits on an empty node");
            outcome.waits += 1;
            outcome.running_at_waits += running.len() as u64;
            let ended = running.swap_remove(rng.below(running.len()));
            usage.give_back(&ended);
            continue;
        };
        waiting = None;
        let allotted = check(catalog, &usage, &allocation)?;
        outcome.peak_allotted_permille = outcome.peak_allotted_permille.max(allotted);
        usage.take(&allocation);
        outcome.allocations += 1;
        outcome.shares += allocation.consumed.iter().filter(|c| !c.is_empty()).count() as u64;
        if let (Some(gpu), Some(nic)) = (allocation.device("gpu"), allocation.device("nic")) {
            let (class, best) = nodes.classes(gpu, nic)?;
            outcome.pairs += 1;
            *outcome.classes.entry(class).or_default() += 1;
            if class == best {
                outcome.aligned += 1;
            }
        }
        running.push(allocation);
    }
    Ok(outcome)
}

/// The simulator's own check of `allocation` against what `usage` holds, apart from the
/// allocator: no device allocated whole twice or both whole and shared, and no shared device's
/// capacity exceeded. Returns the most of a shared device's capacity that is allotted with it,
/// per mille.
fn check(catalog: &Catalog, usage: &Usage, allocation: &Allocation) -> anyhow::Result<u64> {
    let mut peak = 0;
    for ((request, device), consumed) in allocation.results.iter().zip(&allocation.consumed) {
        let entry = catalog
            .devices
            .iter()
            .find(|d| &d.id == device)
            .ok_or_else(|| anyhow::anyhow!("{request}: {device} is not in the catalog"))?;
        anyhow::ensure!(
            !usage.whole.contains(device),
            "{request}: {device} is already allocated whole"
        );
        if consumed.is_empty() {
            anyhow::ensure!(
                !usage.consumed.contains_key(device),
                "{request}: {device} allocated whole while shares of it run"
            );
            continue;
        }
        anyhow::ensure!(
            entry.shared,
            "{request}: {device} is not shared but got a share"
        );
        for (name, amount) in consumed {
            let total = entry
                .capacity
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("{request}: {device} has no capacity {name}"))?
                .total;
            let before = usage
                .consumed
                .get(device)
                .and_then(|c| c.get(name))
                .copied()
                .unwrap_or(0);
            anyhow::ensure!(
                before + amount <= total,
                "{request}: {device} oversubscribed: {before} + {amount} of {name} > {total}"
            );
            peak = peak.max((before + amount) * 1000 / total.max(1));
        }
    }
    Ok(peak)
}

/// The PCIe places of the catalog's GPUs and NICs, and the best class any NIC has to each GPU.
struct Topology<'a> {
    catalog: &'a Catalog,
    inventory: &'a Inventory,
    best: BTreeMap<&'a str, Distance>,
}

impl<'a> Topology<'a> {
    fn new(inventory: &'a Inventory, catalog: &'a Catalog) -> Self {
        let nic_pcis: Vec<&PciDevice> = inventory
            .nics
            .iter()
            .filter_map(|n| n.pci.as_ref())
            .collect();
        let best = inventory
            .gpus
            .iter()
            .filter_map(|g| {
                let best = nic_pcis.iter().map(|n| topology::distance(g, n)).min()?;
                Some((g.address.as_str(), best))
            })
            .collect();
        Self {
            catalog,
            inventory,
            best,
        }
    }

    /// `device`'s PCI function, by its published address.
    fn pci(&self, device: &DeviceId) -> Option<&'a PciDevice> {
        let entry = self.catalog.devices.iter().find(|d| &d.id == device)?;
        let attribute = if device.driver == GPU_DRIVER {
            PCI_BUS_ID.to_owned()
        } else {
            format!("{}/pciAddress", device.driver)
        };
        let Some(Value::Str(address)) = entry.attributes.get(&attribute) else {
            return None;
        };
        self.inventory
            .gpus
            .iter()
            .chain(self.inventory.nics.iter().filter_map(|n| n.pci.as_ref()))
            .find(|p| &p.address == address)
    }

    /// The class of `gpu` and `nic`, and the best class any NIC has to `gpu`.
    fn classes(&self, gpu: &DeviceId, nic: &DeviceId) -> anyhow::Result<(Distance, Distance)> {
        let (Some(gpu_pci), Some(nic_pci)) = (self.pci(gpu), self.pci(nic)) else {
            anyhow::bail!("{gpu} or {nic} has no PCI address in the inventory");
        };
        let class = topology::distance(gpu_pci, nic_pci);
        let best = self
            .best
            .get(gpu_pci.address.as_str())
            .copied()
            .unwrap_or(class);
        Ok((class, best))
    }
}

/// One pod of `kind`'s devices, or `None` when nothing fits.
fn place(
    strategy: &Strategy<'_>,
    kind: usize,
    (gpus, nics): (&[&DeviceId], &[&DeviceId]),
    usage: &Usage,
    rng: &mut Rng,
) -> Option<Allocation> {
    let templates = match strategy {
        Strategy::Random => {
            let free = |all: &[&DeviceId]| -> Vec<DeviceId> {
                all.iter()
                    .filter(|d| !usage.whole.contains(**d) && !usage.consumed.contains_key(**d))
                    .map(|d| (*d).clone())
                    .collect()
            };
            let (free_gpus, free_nics) = (free(gpus), free(nics));
            if free_gpus.is_empty() || free_nics.is_empty() {
                return None;
            }
            let gpu = free_gpus[rng.below(free_gpus.len())].clone();
            let nic = free_nics[rng.below(free_nics.len())].clone();
            return Some(Allocation {
                node: None,
                results: vec![("gpu".to_owned(), gpu), ("nic".to_owned(), nic)],
                consumed: vec![BTreeMap::new(), BTreeMap::new()],
            });
        }
        Strategy::Templates(templates) => templates,
        Strategy::Kinds(kinds) => kinds.get(kind)?,
    };
    let mut order: Vec<usize> = (0..templates.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
        .into_iter()
        .find_map(|t| templates[t].allocate_with(usage).ok())
}

/// The bandwidth a GPU pod's NIC share asks for in [`mixed_kinds`], bits per second.
pub const GPU_POD_SHARE: &str = "100G";
/// The bandwidths network-only pods ask for in [`mixed_kinds`], one kind each.
pub const NETWORK_POD_SHARES: [&str; 3] = ["1G", "5G", "25G"];

/// The pods of a mixed node, as claims: a GPU pod (one GPU and the NIC on its PCIe root, by
/// `documents`' `gpu-nic-aligned` template) and three kinds of network-only pods (one NIC of
/// class `knd-nic`). With `shares`, each names the bandwidth it consumes ([`GPU_POD_SHARE`],
/// [`NETWORK_POD_SHARES`]), so on shared NICs it gets that much of one; without, NICs are
/// allocated whole.
pub fn mixed_kinds(
    documents: &knd::cli::placement::Documents,
    shares: bool,
) -> anyhow::Result<Vec<Claim>> {
    let (_, aligned) = documents
        .claims
        .iter()
        .find(|(name, _)| name == "gpu-nic-aligned")
        .ok_or_else(|| anyhow::anyhow!("no gpu-nic-aligned template for this node"))?;
    let mut gpu_pod = serde_json::to_value(aligned)?;
    let nic_request = gpu_pod["requests"]
        .as_array_mut()
        .and_then(|r| r.iter_mut().find(|r| r["name"] == "nic"))
        .ok_or_else(|| anyhow::anyhow!("gpu-nic-aligned has no request nic"))?;
    let ask = |request: &mut serde_json::Value, bandwidth: &str| {
        if shares {
            request["exactly"]["capacity"] =
                serde_json::json!({"requests": {knd::model::quantity::BANDWIDTH: bandwidth}});
        }
    };
    ask(nic_request, GPU_POD_SHARE);
    let mut kinds = vec![Claim::compile(
        "gpu-pod",
        &serde_json::from_value(gpu_pod)?,
    )?];
    for bandwidth in NETWORK_POD_SHARES {
        let mut request = serde_json::json!({"name": "nic", "exactly": {
            "deviceClassName": knd::cli::templates::NIC_CLASS}});
        ask(&mut request, bandwidth);
        let spec = serde_json::json!({"requests": [request]});
        kinds.push(Claim::compile(
            &format!("network-pod-{bandwidth}"),
            &serde_json::from_value(spec)?,
        )?);
    }
    Ok(kinds)
}
