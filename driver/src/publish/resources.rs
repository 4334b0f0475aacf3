//! The published device model: turns the inventory into `resource.k8s.io/v1` Devices and
//! ResourceSlices, within every limit the API enforces.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::resource::v1::{
        CapacityRequestPolicy, CapacityRequestPolicyRange, Device, DeviceAttribute, DeviceCapacity,
        DeviceTaint, ResourcePool, ResourceSlice, ResourceSliceSpec,
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{ObjectMeta, OwnerReference, Time},
    },
};

use crate::{
    discover::inventory::{Inventory, Nic},
    model::ports::Taint,
};

/// knd's driver name, and the domain of its attributes.
pub const DRIVER_NAME: &str = "knd.dev";
/// The standard attribute for the PCIe root complex (KEP-4381).
pub const PCIE_ROOT: &str = "resource.kubernetes.io/pcieRoot";
/// The standard attribute for the PCI bus ID (KEP-4381).
pub const PCI_BUS_ID: &str = "resource.kubernetes.io/pciBusID";
/// The standard attribute for a device's NUMA node (KEP-6072; scalar form), published only
/// when the kernel knows it (`numa_node` is not -1).
pub const NUMA_NODE: &str = "resource.kubernetes.io/numaNode";
/// At most this many devices in one ResourceSlice.
pub const MAX_DEVICES_PER_SLICE: usize = 128;
/// At most this many devices in one ResourceSlice when any of them carries a taint.
pub const MAX_DEVICES_PER_SLICE_WITH_TAINTS: usize = 64;
/// The key of the taint knd puts on a device it judges unhealthy; the value names the cause.
pub const UNHEALTHY_TAINT: &str = "knd.dev/unhealthy";
/// At most this many attributes and capacities on one device.
pub const MAX_ATTRIBUTES_PER_DEVICE: usize = 32;
/// At most this many bytes (UTF-8, as the API server counts them) in a string attribute.
pub const MAX_STRING_ATTRIBUTE: usize = 64;

/// A shared NIC's smallest share and the step shares grow by, bits per second: requests are
/// rounded up to `SHARE_STEP` multiples (the API's `validRange`).
pub const SHARE_STEP: u64 = 10_000_000;
/// The share a request gets that names no bandwidth (or the whole NIC, if it is slower).
pub const SHARE_DEFAULT: u64 = 1_000_000_000;

/// A shared NIC's capacity: its link speed in bits per second; `None` when the kernel does not
/// know the speed (link down, or a virtual device), so it cannot be shared out.
pub fn share_capacity(nic: &Nic) -> Option<u64> {
    nic.netdev
        .as_ref()
        .and_then(|n| n.speed_mbps)
        .filter(|&mbps| mbps > 0)
        .map(|mbps| u64::from(mbps) * 1_000_000)
}

/// Makes `device` a shared NIC of `capacity` bits per second (KEP-5075 consumable capacity):
/// allocatable to many claims at once, each consuming some `bandwidth`; the sum never exceeds
/// the capacity. Requests without a bandwidth get [`SHARE_DEFAULT`]; amounts round up to
/// [`SHARE_STEP`]s.
pub fn make_shared(device: &mut Device, capacity: u64) {
    let quantity = |v: u64| Quantity(crate::model::quantity::format(v));
    device.allow_multiple_allocations = Some(true);
    device.capacity = Some(BTreeMap::from([(
        crate::model::quantity::BANDWIDTH.to_owned(),
        DeviceCapacity {
            value: quantity(capacity),
            request_policy: Some(CapacityRequestPolicy {
                default: Some(quantity(SHARE_DEFAULT.min(capacity))),
                valid_range: Some(CapacityRequestPolicyRange {
                    min: quantity(SHARE_STEP.min(capacity)),
                    max: Some(quantity(capacity)),
                    step: Some(quantity(SHARE_STEP)),
                }),
                valid_values: None,
            }),
        },
    )]));
}

/// The Node a pool's slices belong to (for the owner reference that garbage-collects them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOwner {
    /// Node name.
    pub name: String,
    /// Node UID.
    pub uid: String,
}

/// The device name for a NIC: from the PCI address for hardware (`pci-0000-03-00-0`), else from
/// the interface name, encoded when that is not already a DNS label.
pub fn device_name(nic: &Nic) -> String {
    if let Some(pci) = &nic.pci {
        return format!(
            "pci-{}",
            pci.address.replace([':', '.'], "-").to_lowercase()
        );
    }
    let name = nic.display_name();
    if is_dns_label(&name) && !name.starts_with("pci-") {
        return name;
    }
    // Keep what is readable, then a hash of the exact name so different names never collide.
    let readable: String = name
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let readable = readable.trim_matches('-');
    let readable: String = readable.chars().take(40).collect();
    format!(
        "net-{}-{:08x}",
        readable.trim_end_matches('-'),
        fnv32(name.as_bytes())
    )
    .replace("--", "-")
}

/// The NIC of `inventory` published under `device` (see [`device_name`]).
pub fn published_nic<'a>(inventory: &'a Inventory, device: &str) -> Option<&'a Nic> {
    inventory.nics.iter().find(|nic| device_name(nic) == device)
}

/// True for an RFC 1123 DNS label: 1–63 of `[a-z0-9-]`, starting and ending alphanumeric.
pub fn is_dns_label(text: &str) -> bool {
    let bytes = text.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

fn fnv32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, b| {
        (hash ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// Attribute values before they are turned into API objects.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string (cut to the API's 64 bytes).
    Str(String),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Str(s) => write!(f, "{s:?}"),
            Self::Int(i) => write!(f, "{i}"),
            Self::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// The attributes of one NIC, fully qualified (`knd.dev/ifName`, `resource.kubernetes.io/...`).
pub fn attributes(nic: &Nic) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut put = |name: &str, value: Option<Value>| {
        if let Some(value) = value {
            let key = if name.contains('/') {
                name.to_owned()
            } else {
                format!("{DRIVER_NAME}/{name}")
            };
            out.insert(key, value);
        }
    };
    let string = |s: &str| Some(Value::Str(truncate(s)));
    let int = |n: u32| Some(Value::Int(i64::from(n)));
    let netdev = nic.netdev.as_ref();
    put("ifName", netdev.and_then(|n| string(&n.name)));
    put(
        "mac",
        netdev.and_then(|n| n.mac.as_deref()).and_then(string),
    );
    put("mtu", netdev.and_then(|n| n.mtu).and_then(int));
    put("speedMbps", netdev.and_then(|n| n.speed_mbps).and_then(int));
    put(
        "state",
        netdev.and_then(|n| n.operstate.as_deref()).and_then(string),
    );
    put(
        "kind",
        netdev.and_then(|n| n.kind.as_deref()).and_then(string),
    );
    put("virtual", Some(Value::Bool(nic.pci.is_none())));
    put("rdma", Some(Value::Bool(!nic.rdma.is_empty())));
    put("rdmaDevice", nic.rdma.first().and_then(|r| string(&r.name)));
    if let Some(pci) = &nic.pci {
        let names = nic.pci_names.as_ref();
        put("driver", pci.driver.as_deref().and_then(string));
        put("pciAddress", string(&pci.address));
        put(
            "pciVendor",
            string(&names.map_or_else(|| format!("{:04x}", pci.vendor), |n| n.vendor.clone())),
        );
        put(
            "pciDevice",
            string(
                &names
                    .and_then(|n| n.device.clone())
                    .unwrap_or_else(|| format!("{:04x}", pci.device)),
            ),
        );
        put("pciVendorID", string(&format!("{:04x}", pci.vendor)));
        put("pciDeviceID", string(&format!("{:04x}", pci.device)));
        if let (Some(vendor), Some(device)) = (pci.subsystem_vendor, pci.subsystem_device) {
            put(
                "pciSubsystem",
                string(&format!("{vendor:04x}:{device:04x}")),
            );
        }
        // The standard one matches GPUs of other drivers; knd's own stays for older selectors.
        put("numaNode", pci.numa_node.and_then(int));
        put(NUMA_NODE, pci.numa_node.and_then(int));
        let is_vf = pci.physfn.is_some();
        put(
            "sriov",
            Some(Value::Bool(pci.sriov_total_vfs.unwrap_or(0) > 0)),
        );
        put("sriovVfs", pci.sriov_num_vfs.and_then(int));
        put("isSriovVf", Some(Value::Bool(is_vf)));
        put("pfName", nic.pf_name.as_deref().and_then(string));
        put(PCI_BUS_ID, string(&pci.address));
        put(PCIE_ROOT, pci.root_complex.as_deref().and_then(string));
        if let Some((gpu, distance)) = &nic.nearest_gpu {
            put("gpuPciBusID", string(gpu));
            put("gpuDistance", string(distance.as_str()));
        }
    }
    debug_assert!(
        out.len() <= MAX_ATTRIBUTES_PER_DEVICE,
        "{} attributes",
        out.len()
    );
    out
}

/// The longest prefix of `text` within the API's byte limit that ends on a character boundary,
/// so a non-ASCII pci.ids name is shortened rather than getting the whole slice rejected.
fn truncate(text: &str) -> String {
    let mut end = text.len().min(MAX_STRING_ATTRIBUTE);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The API object for one NIC.
pub fn device(nic: &Nic) -> Device {
    let attributes = attributes(nic)
        .into_iter()
        .map(|(name, value)| {
            let attribute = match value {
                Value::Str(s) => DeviceAttribute {
                    string: Some(s),
                    ..DeviceAttribute::default()
                },
                Value::Int(i) => DeviceAttribute {
                    int: Some(i),
                    ..DeviceAttribute::default()
                },
                Value::Bool(b) => DeviceAttribute {
                    bool: Some(b),
                    ..DeviceAttribute::default()
                },
            };
            (name, attribute)
        })
        .collect();
    Device {
        name: device_name(nic),
        attributes: Some(attributes),
        ..Device::default()
    }
}

/// What a device taint does to claims that do not tolerate it (KEP-5055).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaintEffect {
    /// No new allocation of the device; pods already using it stay.
    NoSchedule,
    /// Also evicts the pods using it (their claims are deallocated).
    NoExecute,
}

impl TaintEffect {
    /// The API's spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoSchedule => "NoSchedule",
            Self::NoExecute => "NoExecute",
        }
    }
}

/// The API taint for a device knd judged unhealthy: `knd.dev/unhealthy=<cause>:<effect>`, with
/// the moment it was added.
pub fn device_taint(taint: &Taint, effect: TaintEffect) -> DeviceTaint {
    DeviceTaint {
        key: UNHEALTHY_TAINT.to_owned(),
        value: Some(taint.cause.as_str().to_owned()),
        effect: effect.as_str().to_owned(),
        time_added: k8s_openapi::jiff::Timestamp::from_second(taint.since_unix_seconds)
            .ok()
            .map(Time),
    }
}

/// The ResourceSlices for the node's pool: devices sorted by name, at most
/// [`MAX_DEVICES_PER_SLICE`] per slice, every slice carrying the pool's slice count. A node
/// without devices still publishes one empty slice, so the pool's generation is visible.
pub fn slices(
    inventory: &Inventory,
    driver: &str,
    node: &str,
    generation: i64,
    owner: Option<&NodeOwner>,
) -> Vec<ResourceSlice> {
    slices_with_taints(inventory, driver, node, generation, owner, &BTreeMap::new())
}

/// [`slices`], with `taints` (by device name) on their devices; where any device carries one,
/// at most [`MAX_DEVICES_PER_SLICE_WITH_TAINTS`] devices per slice, as the API requires.
pub fn slices_with_taints(
    inventory: &Inventory,
    driver: &str,
    node: &str,
    generation: i64,
    owner: Option<&NodeOwner>,
    taints: &BTreeMap<String, DeviceTaint>,
) -> Vec<ResourceSlice> {
    slices_of(
        inventory,
        (driver, node, generation),
        owner,
        taints,
        &BTreeMap::new(),
    )
}

/// [`slices_with_taints`], with the NICs in `shared` (device name → capacity in bits per
/// second) published as shared NICs ([`make_shared`]).
pub fn slices_of(
    inventory: &Inventory,
    (driver, node, generation): (&str, &str, i64),
    owner: Option<&NodeOwner>,
    taints: &BTreeMap<String, DeviceTaint>,
    shared: &BTreeMap<String, u64>,
) -> Vec<ResourceSlice> {
    let mut devices: Vec<Device> = inventory.nics.iter().map(device).collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    devices.dedup_by(|a, b| a.name == b.name);
    for device in &mut devices {
        device.taints = taints.get(&device.name).map(|t| vec![t.clone()]);
        if let Some(&capacity) = shared.get(&device.name) {
            make_shared(device, capacity);
        }
    }
    let per_slice = if devices.iter().any(|d| d.taints.is_some()) {
        MAX_DEVICES_PER_SLICE_WITH_TAINTS
    } else {
        MAX_DEVICES_PER_SLICE
    };
    let chunks: Vec<Vec<Device>> = if devices.is_empty() {
        vec![Vec::new()]
    } else {
        devices.chunks(per_slice).map(<[Device]>::to_vec).collect()
    };
    let count = i64::try_from(chunks.len()).unwrap_or(i64::MAX);
    chunks
        .into_iter()
        .enumerate()
        .map(|(index, devices)| ResourceSlice {
            metadata: ObjectMeta {
                name: Some(slice_name(driver, node, index)),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "knd".to_owned(),
                )])),
                owner_references: owner.map(|owner| {
                    vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Node".into(),
                        name: owner.name.clone(),
                        uid: owner.uid.clone(),
                        controller: Some(true),
                        block_owner_deletion: None,
                    }]
                }),
                ..ObjectMeta::default()
            },
            spec: ResourceSliceSpec {
                driver: driver.to_owned(),
                node_name: Some(node.to_owned()),
                pool: ResourcePool {
                    name: node.to_owned(),
                    generation,
                    resource_slice_count: count,
                },
                devices: Some(devices),
                ..ResourceSliceSpec::default()
            },
        })
        .collect()
}

/// `<node>-<driver>-<index>`: a DNS subdomain (≤253) that is stable across restarts.
fn slice_name(driver: &str, node: &str, index: usize) -> String {
    let node: String = node.chars().take(170).collect();
    format!("{node}-{driver}-{index}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discover::{inventory::netdev::Netdev, pci::PciDevice};

    fn virtual_nic(name: &str) -> Nic {
        Nic {
            netdev: Some(Netdev {
                name: name.into(),
                ..Netdev::default()
            }),
            ..Nic::default()
        }
    }

    #[test]
    fn device_names_are_dns_labels_and_distinct() {
        let pci = Nic {
            pci: Some(PciDevice {
                address: "0000:3B:00.1".into(),
                ..PciDevice::default()
            }),
            ..Nic::default()
        };
        assert_eq!(device_name(&pci), "pci-0000-3b-00-1");
        assert_eq!(device_name(&virtual_nic("eth1")), "eth1");
        let odd = [
            "eth0.100",
            "Eth0_100",
            "enP1s1",
            "pci-0000-00-00-0",
            &"x".repeat(70),
        ];
        let names: Vec<String> = odd.iter().map(|n| device_name(&virtual_nic(n))).collect();
        for name in &names {
            assert!(is_dns_label(name), "{name}");
        }
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
    }

    #[test]
    fn slices_split_at_128_devices_and_share_the_count() {
        let inventory = Inventory {
            nics: (0..300).map(|i| virtual_nic(&format!("nic{i}"))).collect(),
            ..Inventory::default()
        };
        let slices = slices(&inventory, DRIVER_NAME, "node-1", 7, None);
        assert_eq!(slices.len(), 3);
        let sizes: Vec<usize> = slices
            .iter()
            .map(|s| s.spec.devices.as_ref().unwrap().len())
            .collect();
        assert_eq!(sizes, [128, 128, 44]);
        for slice in &slices {
            assert_eq!(slice.spec.pool.resource_slice_count, 3);
            assert_eq!(slice.spec.pool.generation, 7);
            assert_eq!(slice.spec.driver, "knd.dev");
            assert_eq!(slice.spec.node_name.as_deref(), Some("node-1"));
        }
        let empty = slices_for_nothing();
        assert_eq!(empty.len(), 1);
        assert_eq!(empty[0].spec.pool.resource_slice_count, 1);
    }

    fn slices_for_nothing() -> Vec<ResourceSlice> {
        slices(&Inventory::default(), DRIVER_NAME, "n", 1, None)
    }

    #[test]
    fn long_strings_are_cut_to_the_api_limit() {
        let mut nic = virtual_nic("eth1");
        nic.netdev.as_mut().unwrap().operstate = Some("u".repeat(100));
        let attributes = attributes(&nic);
        let Value::Str(state) = &attributes["knd.dev/state"] else {
            panic!("state is a string")
        };
        assert_eq!(state.len(), MAX_STRING_ATTRIBUTE);
    }

    #[test]
    fn non_ascii_strings_are_cut_to_64_bytes_on_a_character_boundary() {
        // 62 characters but 69 bytes: the 64th byte falls inside the last "é".
        let name = "Contrôleur Ethernet « ConnectX-7 » à 2 ports 400 Gb/s — réseau";
        assert_eq!((name.chars().count(), name.len()), (62, 69));
        let cut = truncate(name);
        assert_eq!(
            cut,
            "Contrôleur Ethernet « ConnectX-7 » à 2 ports 400 Gb/s — r"
        );
        assert_eq!(cut.len(), 63);
        assert_eq!(truncate("é".repeat(40).as_str()).len(), 64);
        assert_eq!(truncate("short"), "short");
    }
}
