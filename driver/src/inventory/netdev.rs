//! Network interfaces as sysfs shows them (`/sys/class/net/*`): identity, link state, the PCI
//! function behind them, and how they are stacked (bond members, bridge ports, macvlan lowers).

use super::{Warnings, host::HostRoot, pci::is_pci_address};

/// ARPHRD (link-layer type) values from `/sys/class/net/*/type`.
pub mod link_type {
    /// Ethernet.
    pub const ETHER: u32 = 1;
    /// InfiniBand (IPoIB).
    pub const INFINIBAND: u32 = 32;
    /// Loopback.
    pub const LOOPBACK: u32 = 772;
}

/// One network interface of the host's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Netdev {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: Option<u32>,
    /// Index of the link this one sits on (a veth's peer, a macvlan's parent); equal to
    /// `ifindex` for physical devices.
    pub iflink: Option<u32>,
    /// Link-layer address.
    pub mac: Option<String>,
    /// MTU in bytes.
    pub mtu: Option<u32>,
    /// `operstate` (`up`, `down`, `unknown`, ...).
    pub operstate: Option<String>,
    /// Link speed in Mbit/s, when the link is up and the driver reports it.
    pub speed_mbps: Option<u32>,
    /// ARPHRD link type.
    pub link_type: Option<u32>,
    /// The PCI function behind it, if any.
    pub pci_address: Option<String>,
    /// The interface's resolved sysfs directory.
    pub sysfs_path: String,
    /// What kind of virtual device it is (`veth`, `macvlan`, `bridge`, `bond`, `vlan`, ...);
    /// `None` for hardware. From sysfs this is a best guess (see [`read_netdev`]); on the live
    /// node the inventory replaces it with netlink's answer.
    pub kind: Option<String>,
    /// The bond or bridge it is enslaved to.
    pub master: Option<String>,
    /// Interfaces it sits on (`lower_*` links: bond members, a macvlan's parent).
    pub lowers: Vec<String>,
}

impl Netdev {
    /// True when no hardware device backs the interface.
    pub fn is_virtual(&self) -> bool {
        self.pci_address.is_none() && self.sysfs_path.starts_with("/sys/devices/virtual/")
    }
}

/// Reads every interface under `/sys/class/net`.
pub fn scan(host: &HostRoot, warnings: &mut Warnings) -> Vec<Netdev> {
    host.list("/sys/class/net")
        .into_iter()
        .filter_map(|name| read_netdev(host, &name, warnings))
        .collect()
}

/// Reads one interface; `None` (with a warning) when its directory cannot be resolved.
pub fn read_netdev(host: &HostRoot, name: &str, warnings: &mut Warnings) -> Option<Netdev> {
    let dir = format!("/sys/class/net/{name}");
    let sysfs_path = match host.resolve(&dir) {
        Ok(path) => path,
        Err(problem) => {
            warnings.push(problem);
            return None;
        }
    };
    let text = |file: &str, warnings: &mut Warnings| match host.read(&format!("{dir}/{file}")) {
        Ok(value) => value.filter(|v| !v.is_empty()),
        Err(problem) => {
            warnings.push(problem);
            None
        }
    };
    let number = |file: &str, warnings: &mut Warnings| {
        super::read_number(host, &format!("{dir}/{file}"), warnings)
    };
    // The nearest PCI function above the interface in the device tree. (A virtio NIC's `device`
    // link names the virtio device, whose parent is the PCI function.)
    let pci_address = sysfs_path
        .split('/')
        .rev()
        .skip(1)
        .find(|element| is_pci_address(element))
        .map(str::to_owned);
    let speed_mbps = match host.read(&format!("{dir}/speed")) {
        // Drivers report -1 (or 4294967295) for "unknown".
        Ok(Some(value)) => value
            .parse::<u32>()
            .ok()
            .filter(|s| *s > 0 && *s < u32::MAX),
        Ok(None) => None,
        Err(problem) => {
            warnings.push(problem);
            None
        }
    };
    let lowers: Vec<String> = host
        .list(&dir)
        .into_iter()
        .filter_map(|entry| entry.strip_prefix("lower_").map(str::to_owned))
        .collect();
    let ifindex = number("ifindex", warnings);
    let iflink = number("iflink", warnings);
    let kind = kind(
        host,
        &dir,
        &sysfs_path,
        pci_address.is_some(),
        ifindex,
        iflink,
        !lowers.is_empty(),
    );
    Some(Netdev {
        name: name.to_owned(),
        ifindex,
        iflink,
        mac: text("address", warnings),
        mtu: number("mtu", warnings),
        operstate: text("operstate", warnings),
        speed_mbps,
        link_type: number("type", warnings),
        pci_address,
        master: host.link_name(&format!("{dir}/master")),
        lowers,
        kind,
        sysfs_path,
    })
}

/// The kind of a virtual interface, from what sysfs shows: `bridge/` and `bonding/`
/// directories, `DEVTYPE` in `uevent` (VLANs, wireless), `lower_*` links (a device stacked on
/// another: macvlan, ipvlan — reported as `macvlan`), and a peer link for veth.
fn kind(
    host: &HostRoot,
    dir: &str,
    sysfs_path: &str,
    has_pci: bool,
    ifindex: Option<u32>,
    iflink: Option<u32>,
    has_lowers: bool,
) -> Option<String> {
    if host.exists(&format!("{dir}/bridge")) {
        return Some("bridge".into());
    }
    if host.exists(&format!("{dir}/bonding")) {
        return Some("bond".into());
    }
    if has_pci || !sysfs_path.starts_with("/sys/devices/virtual/") {
        return None;
    }
    let devtype = host
        .read(&format!("{dir}/uevent"))
        .ok()
        .flatten()
        .and_then(|uevent| {
            uevent
                .lines()
                .find_map(|l| l.strip_prefix("DEVTYPE=").map(str::to_owned))
        });
    if devtype.is_some() {
        return devtype;
    }
    if has_lowers {
        return Some("macvlan".into());
    }
    // A virtual interface whose link points at another index and that has no DEVTYPE: veth
    // (its iflink is the peer's index) — or a tunnel, which sysfs cannot tell apart.
    match (ifindex, iflink) {
        (Some(index), Some(link)) if index != link && link != 0 => Some("veth".into()),
        _ => Some("virtual".into()),
    }
}
