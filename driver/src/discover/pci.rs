//! PCI devices as sysfs shows them: identity, driver, NUMA node, SR-IOV relations, and where they
//! sit in the PCIe tree.

use crate::os::host::{
    FileProblem, HostDir, HostRoot, Warnings, read_numa_node, read_number, read_text,
};

/// PCI class codes (the top 16 bits of the 24-bit class) knd cares about.
pub mod class {
    /// Network controllers (`0x02xxxx`).
    pub const NETWORK: u32 = 0x02;
    /// VGA-compatible display controller (`0x0300xx`).
    pub const DISPLAY_VGA: u32 = 0x0300;
    /// 3D controller (`0x0302xx`), e.g. data-centre GPUs.
    pub const DISPLAY_3D: u32 = 0x0302;
    /// Processing accelerators (`0x1200xx`), e.g. AMD Instinct.
    pub const ACCELERATOR: u32 = 0x1200;
}

/// PCI vendor IDs knd recognises.
pub mod vendor {
    /// NVIDIA.
    pub const NVIDIA: u16 = 0x10de;
    /// AMD/ATI.
    pub const AMD: u16 = 0x1002;
}

/// One PCI function.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PciDevice {
    /// Extended BDF, e.g. `0000:03:00.0`.
    pub address: String,
    /// The device's directory under `/sys/devices`, symlinks resolved.
    pub sysfs_path: String,
    /// The root complex (`pciDDDD:BB`) wherever it appears in the resolved path.
    pub root_complex: Option<String>,
    /// Bridges between the root complex and this function, top first (root port first).
    pub upstream: Vec<String>,
    /// 24-bit class code.
    pub class: u32,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor: Option<u16>,
    /// Subsystem device ID.
    pub subsystem_device: Option<u16>,
    /// Bound driver (e.g. `mlx5_core`, `vfio-pci`).
    pub driver: Option<String>,
    /// NUMA node, if the platform reports one (`-1` means it does not).
    pub numa_node: Option<u32>,
    /// `sriov_totalvfs`, on SR-IOV-capable physical functions.
    pub sriov_total_vfs: Option<u32>,
    /// `sriov_numvfs`: VFs currently enabled.
    pub sriov_num_vfs: Option<u32>,
    /// The physical function, when this is a virtual function.
    pub physfn: Option<String>,
    /// Virtual functions of this physical function, by address.
    pub virtfns: Vec<String>,
}

impl PciDevice {
    /// A network controller (class `0x02xxxx`).
    pub fn is_network(&self) -> bool {
        self.class >> 16 == class::NETWORK
    }

    /// A display controller or processing accelerator: what [`PciDevice::is_gpu`] then looks
    /// at more closely.
    pub fn is_gpu_class(&self) -> bool {
        let base = self.class >> 8;
        base == class::DISPLAY_VGA || base == class::DISPLAY_3D || base == class::ACCELERATOR
    }

    /// A GPU or accelerator knd aligns NICs with: NVIDIA display/3D controllers and AMD
    /// display/3D controllers or processing accelerators.
    pub fn is_gpu(&self) -> bool {
        let base = self.class >> 8;
        match self.vendor {
            vendor::NVIDIA => base == class::DISPLAY_VGA || base == class::DISPLAY_3D,
            vendor::AMD => {
                base == class::DISPLAY_3D
                    || base == class::ACCELERATOR
                    || (base == class::DISPLAY_VGA && self.numa_node.is_some())
            }
            _ => false,
        }
    }
}

/// Checks and splits an extended BDF `DDDD:BB:DD.F`.
pub fn is_pci_address(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 12
        && bytes[4] == b':'
        && bytes[7] == b':'
        && bytes[10] == b'.'
        && bytes
            .iter()
            .enumerate()
            .all(|(i, b)| matches!(i, 4 | 7 | 10) || b.is_ascii_hexdigit())
}

/// True for a root complex element of a sysfs path, `pciDDDD:BB` (hex, any case).
pub fn is_root_complex(element: &str) -> bool {
    element.strip_prefix("pci").is_some_and(|rest| {
        let bytes = rest.as_bytes();
        bytes.len() == 7
            && bytes[4] == b':'
            && bytes
                .iter()
                .enumerate()
                .all(|(i, b)| i == 4 || b.is_ascii_hexdigit())
    })
}

/// Splits a resolved `/sys/devices/...` path into its root complex and the bridge chain above
/// the device (the last element is the device itself and is left out).
pub fn placement(sysfs_path: &str) -> (Option<String>, Vec<String>) {
    let elements: Vec<&str> = sysfs_path.split('/').filter(|e| !e.is_empty()).collect();
    // Hyper-V and other virtual buses put the root complex deep in the path: take the last one.
    let Some(rc_index) = elements.iter().rposition(|e| is_root_complex(e)) else {
        return (None, Vec::new());
    };
    let mut chain: Vec<String> = elements[rc_index + 1..]
        .iter()
        .copied()
        .filter(|e| is_pci_address(e))
        .map(str::to_owned)
        .collect();
    chain.pop();
    (Some(elements[rc_index].to_owned()), chain)
}

/// Parses a sysfs hex value such as `0x020000`.
pub fn parse_hex(text: &str) -> Option<u32> {
    let digits = text.strip_prefix("0x").unwrap_or(text);
    u32::from_str_radix(digits, 16).ok()
}

/// Reads every network controller and display/accelerator function under
/// `/sys/bus/pci/devices` (bridges appear only as elements of their paths).
pub fn scan(host: &HostRoot, warnings: &mut Warnings) -> Vec<PciDevice> {
    host.list("/sys/bus/pci/devices")
        .into_iter()
        .filter_map(|address| read_device(host, &address, warnings))
        .collect()
}

/// Reads one PCI function: `None` for functions that are neither network controllers nor
/// display/accelerators, and (with a warning) when its identity cannot be read.
pub fn read_device(host: &HostRoot, address: &str, warnings: &mut Warnings) -> Option<PciDevice> {
    let path = format!("/sys/bus/pci/devices/{address}");
    let dir = match host.dir(&path) {
        Ok(dir) => dir,
        Err(problem) => {
            warnings.push(problem);
            return None;
        }
    };
    let hex = |name: &str, warnings: &mut Warnings| -> Option<u32> {
        let text = read_text(&dir, name, warnings)?;
        parse_hex(&text).or_else(|| {
            warnings.push(FileProblem {
                path: format!("{path}/{name}"),
                reason: format!("`{text}` is not a hexadecimal number"),
            });
            None
        })
    };
    let skipped = |warnings: &mut Warnings| {
        warnings.push(FileProblem {
            path: path.clone(),
            reason: "skipped: class, vendor or device is missing or unreadable".into(),
        });
    };
    let Some(class) = hex("class", warnings) else {
        skipped(warnings);
        return None;
    };
    let mut found = PciDevice {
        address: address.to_owned(),
        class,
        ..PciDevice::default()
    };
    // Bridges and other functions only matter as elements of other devices' paths.
    if !found.is_network() && !found.is_gpu_class() {
        return None;
    }
    let (Some(vendor), Some(device)) = (hex("vendor", warnings), hex("device", warnings)) else {
        skipped(warnings);
        return None;
    };
    let sysfs_path = match dir.resolved() {
        Ok(resolved) => resolved,
        Err(problem) => {
            warnings.push(problem);
            return None;
        }
    };
    let (root_complex, upstream) = placement(&sysfs_path);
    found.root_complex = root_complex;
    found.upstream = upstream;
    found.vendor = u16::try_from(vendor).ok()?;
    found.device = u16::try_from(device).ok()?;
    found.sysfs_path = sysfs_path;
    let id16 = |value: Option<u32>| value.and_then(|v| u16::try_from(v).ok());
    let sriov_total_vfs = read_number(&dir, "sriov_totalvfs", warnings);
    found = PciDevice {
        subsystem_vendor: id16(hex("subsystem_vendor", warnings)),
        subsystem_device: id16(hex("subsystem_device", warnings)),
        driver: dir.link_name("driver"),
        numa_node: read_numa_node(&dir, warnings),
        sriov_num_vfs: sriov_total_vfs.and_then(|_| read_number(&dir, "sriov_numvfs", warnings)),
        physfn: dir.link_name("physfn").filter(|a| is_pci_address(a)),
        // Only a PF with VFs enabled has `virtfnN` links: list the directory just then.
        virtfns: if sriov_total_vfs.unwrap_or(0) > 0 {
            virtfns(&dir)
        } else {
            Vec::new()
        },
        sriov_total_vfs,
        ..found
    };
    Some(found)
}

/// The `virtfnN` links of a physical function, in VF-number order.
fn virtfns(dir: &HostDir) -> Vec<String> {
    let mut numbered: Vec<(u32, String)> = dir
        .list()
        .iter()
        .filter_map(|name| {
            let n: u32 = name.strip_prefix("virtfn")?.parse().ok()?;
            let address = dir.link_name(name)?;
            is_pci_address(&address).then_some((n, address))
        })
        .collect();
    numbered.sort();
    numbered.into_iter().map(|(_, address)| address).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_root_complexes_are_recognised() {
        assert!(is_pci_address("0000:03:00.0"));
        assert!(is_pci_address("c1d5:00:02.7"));
        assert!(!is_pci_address("0000:03:00"));
        assert!(!is_pci_address("pci0000:00"));
        assert!(is_root_complex("pci0000:00"));
        assert!(is_root_complex("pci7870:00"));
        assert!(!is_root_complex("pci0000:0"));
        assert!(!is_root_complex("0000:00:01.0"));
    }

    #[test]
    fn placement_finds_the_chain_on_bare_metal_and_hyper_v() {
        let (rc, chain) = placement(
            "/sys/devices/pci0000:17/0000:17:00.0/0000:18:00.0/0000:19:08.0/0000:1a:00.0",
        );
        assert_eq!(rc.as_deref(), Some("pci0000:17"));
        assert_eq!(chain, ["0000:17:00.0", "0000:18:00.0", "0000:19:08.0"]);

        let (rc, chain) = placement(
            "/sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00/\
             5620e0c7-8062-4dce-aeb7-520c7ef76171/pci7870:00/7870:00:00.0",
        );
        assert_eq!(rc.as_deref(), Some("pci7870:00"));
        assert!(chain.is_empty());

        assert_eq!(placement("/sys/devices/virtual/net/veth0"), (None, vec![]));
    }

    #[test]
    fn hex_values_parse_with_or_without_prefix() {
        assert_eq!(parse_hex("0x020000"), Some(0x02_0000));
        assert_eq!(parse_hex("15b3"), Some(0x15b3));
        assert_eq!(parse_hex("0xzz"), None);
    }
}
