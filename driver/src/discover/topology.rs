//! The PCIe/NUMA topology model: how far apart two PCI devices are, in the classes
//! `nvidia-smi topo -m` uses, so a NIC can be matched to the GPU it serves best.

use crate::{discover::pci::PciDevice, model::distance::Distance};

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
