//! GPU–NIC alignment at prepare time: for each of our NICs in a claim, the distance class
//! (PIX/PXB/PHB/NODE/SYS) to the closest GPU another driver allocated in the same claim, found
//! through that driver's `resource.kubernetes.io/pciBusID` attribute and this node's PCIe
//! topology; checked against the claim's `topology.require` (default PXB: below the same PCIe
//! switch hierarchy) under `--alignment-policy`.

use std::sync::Arc;

use prometheus_client::metrics::{family::Family, gauge::Gauge};
use tokio::sync::watch;

use crate::{
    discover::{inventory::Inventory, topology},
    model::{
        claim::Claim,
        distance::{Distance, Finding},
        records::PreparedClaim,
    },
    observe::metrics::DistanceLabels,
    publish::resources,
};

/// What to do about a NIC far from its pod's GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Do not look.
    Ignore,
    /// Record the class (claim status, metric) and log misalignment.
    Warn,
    /// Also fail the prepare of a misaligned claim, naming the GPU, the NIC and their class.
    Enforce,
}

/// Alignment checking for a preparer.
#[derive(Debug, Clone)]
pub struct Alignment {
    /// The policy.
    pub policy: Policy,
    /// This node's inventory (GPUs and NICs with their PCI paths).
    pub inventory: watch::Receiver<Arc<Inventory>>,
    /// `knd_claim_gpu_nic_distance`: the class's rank, 0 (PIX) … 4 (SYS).
    pub distances: Family<DistanceLabels, Gauge>,
}

/// The GPUs other drivers allocated in `resource`: `(driver, pool, device)`.
pub fn other_devices(driver: &str, resource: &Claim) -> Vec<(String, String, String)> {
    resource
        .allocation
        .iter()
        .flat_map(|a| &a.results)
        .filter(|r| r.driver != driver)
        .map(|r| (r.driver.clone(), r.pool.clone(), r.device.clone()))
        .collect()
}

/// The class between our `device` and the closest of `gpus` (PCI addresses) on this node, or
/// `None` when the NIC or none of the GPUs is a PCI device here.
pub fn closest(inventory: &Inventory, device: &str, gpus: &[String]) -> Option<(String, Distance)> {
    let nic = resources::published_nic(inventory, device)?.pci.as_ref()?;
    gpus.iter()
        .filter_map(|address| {
            let gpu = inventory
                .gpus
                .iter()
                .find(|g| g.address.eq_ignore_ascii_case(address))?;
            Some((gpu.address.clone(), topology::distance(gpu, nic)))
        })
        .min_by_key(|(_, class)| *class)
}

impl Alignment {
    /// Fills in each device's finding from `gpus` (PCI addresses of the claim's GPUs); under
    /// `Enforce`, the error for the first misaligned device.
    pub fn apply(&self, claim: &mut PreparedClaim, gpus: &[String]) -> Result<(), String> {
        if self.policy == Policy::Ignore || gpus.is_empty() {
            return Ok(());
        }
        let inventory = Arc::clone(&self.inventory.borrow());
        for device in &mut claim.devices {
            let required = device
                .config
                .topology
                .map_or(Distance::Pxb, |t| Distance::from(t.require));
            let Some((gpu, class)) = closest(&inventory, &device.device, gpus) else {
                continue;
            };
            let finding = Finding {
                gpu,
                class,
                required,
            };
            if !finding.aligned() {
                let message = format!(
                    "claim {}/{}: {}",
                    claim.namespace,
                    claim.name,
                    finding.describe(&device.device)
                );
                if self.policy == Policy::Enforce {
                    return Err(format!("{message}; --alignment-policy=enforce refuses it"));
                }
                tracing::warn!(%message, "misaligned claim");
            }
            device.topology = Some(finding);
        }
        Ok(())
    }

    /// Exports the findings of a newly prepared claim.
    pub fn record(&self, claim: &PreparedClaim) {
        for device in &claim.devices {
            if let Some(finding) = &device.topology {
                let rank = Distance::ALL
                    .iter()
                    .position(|c| *c == finding.class)
                    .unwrap_or(Distance::ALL.len());
                self.distances
                    .get_or_create(&labels(claim, &device.device, finding))
                    .set(i64::try_from(rank).unwrap_or(i64::MAX));
            }
        }
    }

    /// Removes the series of a released claim.
    pub fn forget(&self, claim: &PreparedClaim) {
        for device in &claim.devices {
            if let Some(finding) = &device.topology {
                self.distances
                    .remove(&labels(claim, &device.device, finding));
            }
        }
    }
}

fn labels(claim: &PreparedClaim, device: &str, finding: &Finding) -> DistanceLabels {
    DistanceLabels {
        namespace: claim.namespace.clone(),
        claim: claim.name.clone(),
        device: device.to_owned(),
        gpu: finding.gpu.clone(),
        class: finding.class.as_str().to_owned(),
    }
}
