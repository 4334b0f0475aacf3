//! `knd templates`: DeviceClasses and ResourceClaimTemplates for this node's topology, ready to
//! apply, so a pod gets a GPU and the NIC next to it by naming a template.
//!
//! - `gpu-nic-aligned`: one GPU and one NIC on the same PCIe root complex
//!   (`matchAttribute: resource.kubernetes.io/pcieRoot`, which GPU DRA drivers publish too);
//!   written when every root with a GPU also has a NIC.
//! - `gpu-nic-rail-N`: where a root holds several GPUs (so `pcieRoot` cannot tell which NIC is
//!   whose), one template per GPU pairing it with the NICs whose `knd.dev/gpuPciBusID` names it.
//! - `gpu-nic-same-numa`: one GPU and one NIC on the same NUMA node
//!   (`matchAttribute: resource.kubernetes.io/numaNode`, KEP-6072, for GPU drivers that publish
//!   the standard attribute); written where the machine has more than one NUMA node.
//! - `gpu-nic-numaN`: one GPU and one NIC on NUMA node N (the NIC by the standard `numaNode`,
//!   the GPU by the PCIe roots of that node, which every GPU driver publishes).
//! - `rdma-nic`: one NIC with an RDMA device.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use crate::{
    discover::inventory::Inventory,
    publish::resources::{DRIVER_NAME, NUMA_NODE, PCI_BUS_ID, PCIE_ROOT},
};

/// The DeviceClass of any NIC knd publishes (as in deploy/kubernetes/deviceclasses.yaml).
pub const NIC_CLASS: &str = "knd-nic";
/// The DeviceClass of NICs with an RDMA device.
pub const RDMA_CLASS: &str = "knd-rdma";
/// The GPU DeviceClass of NVIDIA's DRA driver.
pub const DEFAULT_GPU_CLASS: &str = "gpu.nvidia.com";

/// One generated object with a comment saying what it is for.
#[derive(Debug, Clone)]
pub struct Template {
    /// Shown above the object.
    pub comment: String,
    /// The object.
    pub object: serde_json::Value,
}

/// knd's DeviceClasses: any NIC, and NICs with an RDMA device.
pub fn device_classes() -> Vec<Template> {
    vec![
        Template {
            comment: "Any NIC knd publishes.".to_owned(),
            object: device_class(NIC_CLASS, &format!("device.driver == \"{DRIVER_NAME}\"")),
        },
        Template {
            comment: "NICs with an RDMA device: their claims also get the verbs character devices."
                .to_owned(),
            object: device_class(
                RDMA_CLASS,
                &format!(
                    "device.driver == \"{DRIVER_NAME}\" && \
                     device.attributes[\"{DRIVER_NAME}\"].rdma == true"
                ),
            ),
        },
    ]
}

/// The objects for `inventory`'s topology; `gpu_class` is the GPU driver's DeviceClass.
pub fn generate(inventory: &Inventory, gpu_class: &str) -> Vec<Template> {
    let mut out = device_classes();
    let mut gpus_by_root: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for gpu in &inventory.gpus {
        if let Some(root) = &gpu.root_complex {
            gpus_by_root.entry(root).or_default().push(&gpu.address);
        }
    }
    let nic_roots: BTreeSet<&str> = inventory
        .nics
        .iter()
        .filter_map(|n| n.pci.as_ref()?.root_complex.as_deref())
        .collect();
    let shared = gpus_by_root.values().any(|gpus| gpus.len() > 1);
    let covered = gpus_by_root.keys().all(|root| nic_roots.contains(root));
    if !gpus_by_root.is_empty() && covered {
        let mut comment = "One GPU and one NIC on the same PCIe root complex.".to_owned();
        if shared {
            comment.push_str(
                "\nRoots here hold several GPUs, and NICs at different distances: prefer the \
                 gpu-nic-rail-N templates below.",
            );
        }
        out.push(Template {
            comment,
            object: pair("gpu-nic-aligned", gpu_class, None, None, Some(PCIE_ROOT)),
        });
    }
    if shared {
        let mut gpus: Vec<&str> = inventory.gpus.iter().map(|g| g.address.as_str()).collect();
        gpus.sort_unstable();
        for (rail, gpu) in gpus.into_iter().enumerate() {
            let has_nic = inventory
                .nics
                .iter()
                .any(|n| n.nearest_gpu.as_ref().is_some_and(|(g, _)| g == gpu));
            if !has_nic {
                continue;
            }
            let (domain, name) = PCI_BUS_ID.split_once('/').expect("qualified");
            out.push(Template {
                comment: format!(
                    "Rail {rail}: GPU {gpu} and a NIC knd placed on its rail (PCIe roots here \
                     hold several GPUs, so pcieRoot alone cannot pair them)."
                ),
                object: pair(
                    &format!("gpu-nic-rail-{rail}"),
                    gpu_class,
                    Some(&format!(
                        "device.attributes[\"{domain}\"].{name} == \"{gpu}\""
                    )),
                    Some(&format!(
                        "device.attributes[\"{DRIVER_NAME}\"].gpuPciBusID == \"{gpu}\""
                    )),
                    None,
                ),
            });
        }
    }
    out.extend(numa_pairs(inventory, gpu_class));
    if inventory.nics.iter().any(|n| !n.rdma.is_empty()) {
        out.push(Template {
            comment: "One NIC with an RDMA device.".to_owned(),
            object: claim_template("rdma-nic", &[request("nic", RDMA_CLASS, None)], &[]),
        });
    }
    out
}

/// `nic-share-1g`: a 1 Gbit/s share (the request policy's default, written out) of a shared
/// NIC, for a node whose `knd run --shared-nics` makes `shared` (device → bits per second)
/// shared; nothing when it makes none. Class `knd-nic`: only shared NICs have the `bandwidth`
/// capacity the request names, so it never lands on a NIC allocated whole.
pub fn share(shared: &BTreeMap<String, u64>) -> Option<Template> {
    if shared.is_empty() {
        return None;
    }
    let nics: Vec<String> = shared
        .iter()
        .map(|(device, bps)| format!("{device} ({})", crate::model::quantity::format(*bps)))
        .collect();
    let mut nic = request("nic", NIC_CLASS, None);
    nic["exactly"]["capacity"] = json!({"requests": {
        crate::model::quantity::BANDWIDTH: crate::model::quantity::format(
            crate::publish::resources::SHARE_DEFAULT
        )
    }});
    Some(Template {
        comment: format!(
            "A 1 Gbit/s share of a shared NIC: {} (a macvlan child made in the pod, held to its \
             bandwidth).",
            nics.join(", ")
        ),
        object: claim_template("nic-share-1g", &[nic], &[]),
    })
}

/// `gpu-nic-numaN` for every NUMA node that has both GPUs and NICs.
fn numa_pairs(inventory: &Inventory, gpu_class: &str) -> Vec<Template> {
    let mut roots: BTreeMap<u32, BTreeSet<&str>> = BTreeMap::new();
    for gpu in &inventory.gpus {
        if let (Some(numa), Some(root)) = (gpu.numa_node, &gpu.root_complex) {
            roots.entry(numa).or_default().insert(root);
        }
    }
    let nic_numa: BTreeSet<u32> = inventory
        .nics
        .iter()
        .filter_map(|n| n.pci.as_ref()?.numa_node)
        .collect();
    if roots.len() < 2 {
        // One NUMA node: every pair is NUMA-aligned already.
        return Vec::new();
    }
    let (domain, name) = PCIE_ROOT.split_once('/').expect("qualified");
    let (numa_domain, numa_name) = NUMA_NODE.split_once('/').expect("qualified");
    let same = Template {
        comment: "One GPU and one NIC on the same NUMA node, for GPU drivers that publish the \
                  standard numaNode attribute (KEP-6072)."
            .to_owned(),
        object: pair("gpu-nic-same-numa", gpu_class, None, None, Some(NUMA_NODE)),
    };
    let pinned = roots
        .into_iter()
        .filter(|(numa, _)| nic_numa.contains(numa))
        .map(|(numa, roots)| {
            let list: Vec<String> = roots.iter().map(|r| format!("\"{r}\"")).collect();
            Template {
                comment: format!(
                    "One GPU and one NIC on NUMA node {numa} (GPUs found by their PCIe roots)."
                ),
                object: pair(
                    &format!("gpu-nic-numa{numa}"),
                    gpu_class,
                    Some(&format!(
                        "device.attributes[\"{domain}\"].{name} in [{}]",
                        list.join(", ")
                    )),
                    Some(&format!(
                        "device.attributes[\"{numa_domain}\"].{numa_name} == {numa}"
                    )),
                    None,
                ),
            }
        });
    std::iter::once(same).chain(pinned).collect()
}

fn device_class(name: &str, expression: &str) -> serde_json::Value {
    json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": name},
        "spec": {"selectors": [{"cel": {"expression": expression}}]}
    })
}

fn request(name: &str, class: &str, selector: Option<&str>) -> serde_json::Value {
    let mut exactly = json!({"deviceClassName": class, "allocationMode": "ExactCount", "count": 1});
    if let Some(expression) = selector {
        exactly["selectors"] = json!([{"cel": {"expression": expression}}]);
    }
    json!({"name": name, "exactly": exactly})
}

fn claim_template(
    name: &str,
    requests: &[serde_json::Value],
    constraints: &[serde_json::Value],
) -> serde_json::Value {
    let mut devices = json!({"requests": requests});
    if !constraints.is_empty() {
        devices["constraints"] = json!(constraints);
    }
    json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": name},
        "spec": {"spec": {"devices": devices}}
    })
}

/// A template of one GPU and one NIC.
fn pair(
    name: &str,
    gpu_class: &str,
    gpu_selector: Option<&str>,
    nic_selector: Option<&str>,
    match_attribute: Option<&str>,
) -> serde_json::Value {
    let constraints: Vec<serde_json::Value> = match_attribute
        .map(|a| json!({"requests": ["gpu", "nic"], "matchAttribute": a}))
        .into_iter()
        .collect();
    claim_template(
        name,
        &[
            request("gpu", gpu_class, gpu_selector),
            request("nic", NIC_CLASS, nic_selector),
        ],
        &constraints,
    )
}

/// The templates as one YAML stream, each document under its comment.
pub fn to_yaml(templates: &[Template], node: &str) -> Result<String, serde_yaml::Error> {
    let mut text = format!(
        "# Generated by `knd templates` for node {node}; valid on nodes with the same topology.\n"
    );
    for template in templates {
        text.push_str("---\n");
        for line in template.comment.lines() {
            text.push_str("# ");
            text.push_str(line);
            text.push('\n');
        }
        text.push_str(&serde_yaml::to_string(&template.object)?);
    }
    Ok(text)
}
