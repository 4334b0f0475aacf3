//! Builds host-root trees that reproduce real machines' sysfs and procfs: device directories
//! under `/sys/devices`, and every `/sys/class/*` and `/sys/bus/pci/*` entry as a *relative*
//! symlink exactly as the kernel lays it out (`../../../devices/pci0000:00/...`).

use std::{
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use knd::os::host::HostRoot;

/// A PCI function to create.
#[derive(Debug, Clone)]
pub struct PciSpec {
    /// 24-bit class code.
    pub class: u32,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor and device.
    pub subsystem: (u16, u16),
    /// Bound driver, if any.
    pub driver: Option<&'static str>,
    /// Content of `numa_node` (`-1` when the platform has no NUMA information).
    pub numa_node: String,
    /// `sriov_totalvfs` / `sriov_numvfs`, on SR-IOV physical functions.
    pub sriov: Option<(u32, u32)>,
}

impl PciSpec {
    /// A device of `class` from `vendor`.
    pub fn new(
        class: u32,
        vendor: u16,
        device: u16,
        driver: Option<&'static str>,
        numa: i32,
    ) -> Self {
        Self {
            class,
            vendor,
            device,
            subsystem: (vendor, 0x0001),
            driver,
            numa_node: numa.to_string(),
            sriov: None,
        }
    }

    /// A PCIe switch or root port (PCI-to-PCI bridge).
    pub fn bridge(numa: i32) -> Self {
        Self::new(0x06_0400, 0x10b5, 0xc010, Some("pcieport"), numa)
    }
}

/// An interface to create.
#[derive(Debug, Clone)]
pub struct NetSpec {
    /// Interface index.
    pub ifindex: u32,
    /// `iflink` (the peer's index for a veth; the own index otherwise).
    pub iflink: u32,
    /// MAC address.
    pub mac: String,
    /// MTU.
    pub mtu: u32,
    /// `operstate`.
    pub operstate: &'static str,
    /// Content of `speed`; `None` for a file that does not exist.
    pub speed: Option<String>,
    /// ARPHRD type.
    pub link_type: u32,
    /// `DEVTYPE` in `uevent` (e.g. `macvlan`, `vlan`).
    pub devtype: Option<&'static str>,
}

impl NetSpec {
    /// An Ethernet interface that is up at `speed_mbps`.
    pub fn ethernet(ifindex: u32, speed_mbps: u32) -> Self {
        Self {
            ifindex,
            iflink: ifindex,
            mac: format!("0c:42:a1:00:{:02x}:{:02x}", ifindex >> 8, ifindex & 0xff),
            mtu: 1500,
            operstate: "up",
            speed: Some(speed_mbps.to_string()),
            link_type: 1,
            devtype: None,
        }
    }
}

/// A host-root tree in a temporary directory, removed on drop.
#[derive(Debug)]
pub struct SysfsTree {
    dir: tempfile::TempDir,
}

impl Default for SysfsTree {
    fn default() -> Self {
        Self::new()
    }
}

impl SysfsTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("creating a temporary directory"),
        }
    }

    /// Where the tree is on disk.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The tree as a host root.
    pub fn host(&self) -> HostRoot {
        HostRoot::new(self.dir.path())
    }

    fn on_disk(&self, host_path: &str) -> PathBuf {
        self.dir.path().join(host_path.trim_start_matches('/'))
    }

    /// Writes a file (creating its directory).
    pub fn file(&self, host_path: &str, content: &str) {
        let path = self.on_disk(host_path);
        std::fs::create_dir_all(path.parent().expect("a file has a parent")).expect("mkdir");
        std::fs::write(&path, content).expect("write fixture file");
    }

    /// Creates a directory.
    pub fn dir(&self, host_path: &str) {
        std::fs::create_dir_all(self.on_disk(host_path)).expect("mkdir");
    }

    /// Creates `link` pointing at `target` with the relative path the kernel uses.
    pub fn link(&self, link: &str, target: &str) {
        let path = self.on_disk(link);
        std::fs::create_dir_all(path.parent().expect("a link has a parent")).expect("mkdir");
        let _ = std::fs::remove_file(&path);
        symlink(relative(link, target), &path).expect("symlink");
    }

    /// Creates a symlink with a literal target (e.g. a dangling one).
    pub fn raw_link(&self, link: &str, target: &str) {
        let path = self.on_disk(link);
        std::fs::create_dir_all(path.parent().expect("a link has a parent")).expect("mkdir");
        symlink(target, &path).expect("symlink");
    }

    /// Creates the PCI function at the end of `chain` (`[root complex, bridge, …, function]`),
    /// creating the bridges above it as PCI bridges on first use. Returns its device path.
    pub fn pci(&self, chain: &[&str], spec: &PciSpec) -> String {
        let numa: i32 = spec.numa_node.parse().unwrap_or(-1);
        for depth in 2..chain.len() {
            let bridge = device_path(&chain[..depth]);
            if !self.on_disk(&bridge).exists() {
                self.pci_function(&bridge, &PciSpec::bridge(numa));
            }
        }
        let path = device_path(chain);
        self.pci_function(&path, spec);
        path
    }

    fn pci_function(&self, path: &str, spec: &PciSpec) {
        let address = path.rsplit('/').next().expect("a device path has a name");
        self.file(&format!("{path}/class"), &format!("0x{:06x}\n", spec.class));
        self.file(
            &format!("{path}/vendor"),
            &format!("0x{:04x}\n", spec.vendor),
        );
        self.file(
            &format!("{path}/device"),
            &format!("0x{:04x}\n", spec.device),
        );
        self.file(
            &format!("{path}/subsystem_vendor"),
            &format!("0x{:04x}\n", spec.subsystem.0),
        );
        self.file(
            &format!("{path}/subsystem_device"),
            &format!("0x{:04x}\n", spec.subsystem.1),
        );
        self.file(
            &format!("{path}/numa_node"),
            &format!("{}\n", spec.numa_node),
        );
        if let Some((total, enabled)) = spec.sriov {
            self.file(&format!("{path}/sriov_totalvfs"), &format!("{total}\n"));
            self.file(&format!("{path}/sriov_numvfs"), &format!("{enabled}\n"));
        }
        if let Some(driver) = spec.driver {
            let driver_dir = format!("/sys/bus/pci/drivers/{driver}");
            self.dir(&driver_dir);
            self.link(&format!("{path}/driver"), &driver_dir);
            self.link(&format!("{driver_dir}/{address}"), path);
        }
        self.link(&format!("{path}/subsystem"), "/sys/bus/pci");
        self.link(&format!("/sys/bus/pci/devices/{address}"), path);
    }

    /// Links VF `vf` (device path) to its PF as `virtfn{index}` / `physfn`.
    pub fn sriov_vf(&self, pf: &str, vf: &str, index: u32) {
        self.link(&format!("{pf}/virtfn{index}"), vf);
        self.link(&format!("{vf}/physfn"), pf);
    }

    /// Creates interface `name` under `parent` (a device path), or a virtual one when `None`.
    /// Returns its directory.
    pub fn netdev(&self, parent: Option<&str>, name: &str, spec: &NetSpec) -> String {
        let dir = match parent {
            Some(parent) => format!("{parent}/net/{name}"),
            None => format!("/sys/devices/virtual/net/{name}"),
        };
        self.file(&format!("{dir}/ifindex"), &format!("{}\n", spec.ifindex));
        self.file(&format!("{dir}/iflink"), &format!("{}\n", spec.iflink));
        self.file(&format!("{dir}/address"), &format!("{}\n", spec.mac));
        self.file(&format!("{dir}/mtu"), &format!("{}\n", spec.mtu));
        self.file(
            &format!("{dir}/operstate"),
            &format!("{}\n", spec.operstate),
        );
        self.file(&format!("{dir}/type"), &format!("{}\n", spec.link_type));
        if let Some(speed) = &spec.speed {
            self.file(&format!("{dir}/speed"), &format!("{speed}\n"));
        }
        let mut uevent = format!("INTERFACE={name}\nIFINDEX={}\n", spec.ifindex);
        if let Some(devtype) = spec.devtype {
            uevent = format!("DEVTYPE={devtype}\n{uevent}");
        }
        self.file(&format!("{dir}/uevent"), &uevent);
        if let Some(parent) = parent {
            self.link(&format!("{dir}/device"), parent);
        }
        self.link(&format!("/sys/class/net/{name}"), &dir);
        dir
    }

    /// Makes interface directory `member` a lower of `master` (bond member, bridge port,
    /// macvlan parent…): `member/master` and `master/lower_<member>`.
    pub fn enslave(&self, member: &str, master: &str) {
        let member_name = member.rsplit('/').next().expect("named");
        self.link(&format!("{member}/master"), master);
        self.link(&format!("{master}/lower_{member_name}"), member);
    }

    /// Marks interface directory `dir` as a bridge (`bridge/`) or a bond (`bonding/`).
    pub fn mark(&self, dir: &str, what: &str) {
        self.dir(&format!("{dir}/{what}"));
    }

    /// Creates RDMA device `name` on the PCI function `pci`, with one port whose GID table
    /// names `netdev`, and the verbs character device `uverbs{uverbs}`.
    pub fn rdma(&self, pci: &str, name: &str, netdev: Option<&str>, uverbs: u32) {
        let dir = format!("{pci}/infiniband/{name}");
        self.file(&format!("{dir}/node_type"), "1: CA\n");
        self.file(&format!("{dir}/ports/1/state"), "4: ACTIVE\n");
        self.file(&format!("{dir}/ports/1/link_layer"), "Ethernet\n");
        self.file(&format!("{dir}/ports/1/counters/port_xmit_data"), "0\n");
        if let Some(netdev) = netdev {
            self.file(
                &format!("{dir}/ports/1/gid_attrs/ndevs/0"),
                &format!("{netdev}\n"),
            );
            self.file(
                &format!("{dir}/ports/1/gid_attrs/ndevs/1"),
                &format!("{netdev}\n"),
            );
        }
        self.link(&format!("{dir}/device"), pci);
        self.link(&format!("/sys/class/infiniband/{name}"), &dir);
        let verbs_dir = format!("{pci}/infiniband_verbs/uverbs{uverbs}");
        self.file(&format!("{verbs_dir}/ibdev"), &format!("{name}\n"));
        self.file(
            &format!("{verbs_dir}/dev"),
            &format!("231:{}\n", 192 + uverbs),
        );
        self.link(
            &format!("/sys/class/infiniband_verbs/uverbs{uverbs}"),
            &verbs_dir,
        );
    }

    /// Port 1 of RDMA device `name` on Ethernet (RoCE), with the GID table the kernel shows
    /// once `addresses` are on its netdev: the link-local pair (RoCE v1, v2), then a v1 and a
    /// v2 entry of each address (IPv4-mapped), then free (all-zero) entries up to 16.
    pub fn roce_gids(&self, name: &str, addresses: &[std::net::Ipv4Addr]) {
        let port = format!("/sys/class/infiniband/{name}/ports/1");
        let text = |gid: std::net::Ipv6Addr| gid.segments().map(|s| format!("{s:04x}")).join(":");
        let mut rows = vec![
            (
                text("fe80::ff:fe00:1".parse().expect("a GID")),
                "IB/RoCE v1",
            ),
            (text("fe80::ff:fe00:1".parse().expect("a GID")), "RoCE v2"),
        ];
        for address in addresses {
            rows.push((text(address.to_ipv6_mapped()), "IB/RoCE v1"));
            rows.push((text(address.to_ipv6_mapped()), "RoCE v2"));
        }
        for (index, (gid, kind)) in rows.iter().enumerate() {
            self.file(&format!("{port}/gids/{index}"), &format!("{gid}\n"));
            self.file(
                &format!("{port}/gid_attrs/types/{index}"),
                &format!("{kind}\n"),
            );
        }
        for index in rows.len()..16 {
            self.file(
                &format!("{port}/gids/{index}"),
                &format!("{}\n", text(std::net::Ipv6Addr::UNSPECIFIED)),
            );
        }
    }

    /// The `rdma_cm` misc device.
    pub fn rdma_cm(&self) {
        let dir = "/sys/devices/virtual/misc/rdma_cm";
        self.file(&format!("{dir}/dev"), "10:58\n");
        self.link("/sys/class/misc/rdma_cm", dir);
    }

    /// A default IPv4 route through `interface` in `/proc/net/route`.
    pub fn ipv4_default_route(&self, interface: &str) {
        self.file(
            "/proc/net/route",
            &format!(
                "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 {interface}\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                 {interface}\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
            ),
        );
        self.file(
            "/proc/net/ipv6_route",
            "00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
             00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n",
        );
    }
}

/// `/sys/devices/<root complex>/<bridge>/…/<function>`.
pub fn device_path(chain: &[&str]) -> String {
    format!("/sys/devices/{}", chain.join("/"))
}

/// The relative path from the directory holding `link` to `target` (both absolute host paths),
/// as sysfs writes it: up to the deepest directory shared with the target's *parent*, then down
/// (so a link to an ancestor reads `../../../virtio2`, not `../..`).
pub fn relative(link: &str, target: &str) -> String {
    let from: Vec<&str> = link.split('/').filter(|s| !s.is_empty()).collect();
    let from = &from[..from.len().saturating_sub(1)];
    let to: Vec<&str> = target.split('/').filter(|s| !s.is_empty()).collect();
    let to_parent = &to[..to.len().saturating_sub(1)];
    let common = from
        .iter()
        .zip(to_parent)
        .take_while(|(a, b)| a == b)
        .count();
    let mut parts: Vec<&str> = std::iter::repeat_n("..", from.len() - common).collect();
    parts.extend(&to[common..]);
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::relative;

    #[test]
    fn links_are_relative_as_the_kernel_makes_them() {
        assert_eq!(
            relative(
                "/sys/bus/pci/devices/0000:00:05.0",
                "/sys/devices/pci0000:00/0000:00:05.0"
            ),
            "../../../devices/pci0000:00/0000:00:05.0"
        );
        assert_eq!(
            relative(
                "/sys/class/net/eth0",
                "/sys/devices/pci0000:00/0000:00:03.0/virtio2/net/eth0"
            ),
            "../../devices/pci0000:00/0000:00:03.0/virtio2/net/eth0"
        );
        assert_eq!(
            relative(
                "/sys/devices/pci0000:00/0000:00:05.0/driver",
                "/sys/bus/pci/drivers/virtio-pci"
            ),
            "../../../bus/pci/drivers/virtio-pci"
        );
        assert_eq!(
            relative(
                "/sys/devices/pci0000:00/0000:00:03.0/virtio2/net/eth0/device",
                "/sys/devices/pci0000:00/0000:00:03.0/virtio2"
            ),
            "../../../virtio2"
        );
    }
}
