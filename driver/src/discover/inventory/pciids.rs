//! Vendor and device names from the pci.ids database, when the host has one installed.

use std::collections::HashMap;

use crate::os::host::HostRoot;

/// Where distributions install pci.ids (Debian's `pci.ids` package, hwdata elsewhere).
const LOCATIONS: &[&str] = &["/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids"];

/// The names of one vendor/device pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// Vendor name, e.g. `Mellanox Technologies`.
    pub vendor: String,
    /// Device name, e.g. `MT28908 Family [ConnectX-6]`, if the database knows the device.
    pub device: Option<String>,
}

/// Looks up names for the given (vendor, device) pairs in one pass over the database: the host's
/// own, else one installed where knd runs (e.g. in its container image). Pairs it does not know
/// are absent from the result; no database at all gives an empty map.
pub fn lookup(host: &HostRoot, wanted: &[(u16, u16)]) -> HashMap<(u16, u16), Names> {
    if wanted.is_empty() {
        return HashMap::new();
    }
    let own = HostRoot::new("/");
    let Some(text) = [host, &own].into_iter().find_map(|root| {
        LOCATIONS
            .iter()
            .find_map(|path| std::fs::read_to_string(root.path(path)).ok())
    }) else {
        return HashMap::new();
    };
    parse(&text, wanted)
}

/// Finds the wanted pairs in pci.ids text.
pub fn parse(text: &str, wanted: &[(u16, u16)]) -> HashMap<(u16, u16), Names> {
    let mut found = HashMap::new();
    let mut vendor: Option<(u16, &str)> = None;
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        // The device classes section ends the vendor list.
        if line.starts_with("C ") {
            break;
        }
        if let Some(rest) = line.strip_prefix('\t') {
            if rest.starts_with('\t') {
                continue; // subsystem line
            }
            let Some((vendor_id, vendor_name)) = vendor else {
                continue;
            };
            if let Some((id, name)) = split_id(rest)
                && wanted.contains(&(vendor_id, id))
            {
                found.insert(
                    (vendor_id, id),
                    Names {
                        vendor: vendor_name.to_owned(),
                        device: Some(name.to_owned()),
                    },
                );
            }
        } else {
            vendor = split_id(line).filter(|(id, _)| wanted.iter().any(|(v, _)| v == id));
            if let Some((vendor_id, vendor_name)) = vendor {
                for &(v, d) in wanted.iter().filter(|(v, _)| *v == vendor_id) {
                    found.entry((v, d)).or_insert_with(|| Names {
                        vendor: vendor_name.to_owned(),
                        device: None,
                    });
                }
            }
        }
    }
    found
}

fn split_id(line: &str) -> Option<(u16, &str)> {
    let (id, name) = line.split_once("  ")?;
    Some((u16::from_str_radix(id.trim(), 16).ok()?, name.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# comment\n\
        10de  NVIDIA Corporation\n\
        \t2330  GH100 [H100 SXM5 80GB]\n\
        \t\t10de 16c1  H100 SXM5 80GB\n\
        15b3  Mellanox Technologies\n\
        \t101b  MT28908 Family [ConnectX-6]\n\
        \t101d  MT2892 Family [ConnectX-6 Dx]\n\
        C 02  Network controller\n\
        \t00  Ethernet controller\n";

    #[test]
    fn known_pairs_get_both_names_and_unknown_devices_the_vendor() {
        let names = parse(
            SAMPLE,
            &[(0x15b3, 0x101b), (0x15b3, 0xffff), (0x1234, 0x0001)],
        );
        assert_eq!(
            names[&(0x15b3, 0x101b)],
            Names {
                vendor: "Mellanox Technologies".into(),
                device: Some("MT28908 Family [ConnectX-6]".into())
            }
        );
        assert_eq!(names[&(0x15b3, 0xffff)].device, None);
        assert!(!names.contains_key(&(0x1234, 0x0001)));
    }

    #[test]
    fn subsystem_and_class_lines_are_not_devices() {
        let names = parse(SAMPLE, &[(0x10de, 0x16c1), (0x10de, 0x2330)]);
        assert_eq!(names[&(0x10de, 0x16c1)].device, None);
        assert_eq!(
            names[&(0x10de, 0x2330)].device.as_deref(),
            Some("GH100 [H100 SXM5 80GB]")
        );
    }
}
