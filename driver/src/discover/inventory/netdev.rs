//! Network interfaces as sysfs shows them (`/sys/class/net/*`): identity, link state, the PCI
//! function behind them, and how they are stacked (bond members, bridge ports, macvlan lowers).

use crate::{
    discover::pci::is_pci_address,
    os::host::{HostDir, HostRoot, Warnings, read_number, read_text},
};

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
    /// Index of the link this one sits on (a veth's peer, a macvlan's parent); taken to be
    /// `ifindex` for hardware devices.
    pub iflink: Option<u32>,
    /// Link-layer address.
    pub mac: Option<String>,
    /// MTU in bytes.
    pub mtu: Option<u32>,
    /// `operstate` (`up`, `down`, `unknown`, ...).
    pub operstate: Option<String>,
    /// Link speed in Mbit/s, when the link is up and the driver reports it.
    pub speed_mbps: Option<u32>,
    /// ARPHRD link type (read for virtual interfaces only).
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

/// Reads every interface under `/sys/class/net`.
pub fn scan(host: &HostRoot, warnings: &mut Warnings) -> Vec<Netdev> {
    host.list("/sys/class/net")
        .into_iter()
        .filter_map(|name| read_netdev(host, &name, warnings))
        .collect()
}

/// Reads one interface; `None` (with a warning) when its directory cannot be resolved.
pub fn read_netdev(host: &HostRoot, name: &str, warnings: &mut Warnings) -> Option<Netdev> {
    let path = format!("/sys/class/net/{name}");
    let (dir, sysfs_path) = match host.dir(&path).and_then(|d| {
        let resolved = d.resolved()?;
        Ok((d, resolved))
    }) {
        Ok(found) => found,
        Err(problem) => {
            warnings.push(problem);
            return None;
        }
    };
    // The nearest PCI function above the interface in the device tree. (A virtio NIC's `device`
    // link names the virtio device, whose parent is the PCI function.)
    let pci_address = sysfs_path
        .split('/')
        .rev()
        .skip(1)
        .find(|element| is_pci_address(element))
        .map(str::to_owned);
    let speed_mbps = read_text(&dir, "speed", warnings)
        // Drivers report -1 (or 4294967295) for "unknown".
        .and_then(|value| value.parse::<u32>().ok())
        .filter(|s| *s > 0 && *s < u32::MAX);
    let ifindex = read_number(&dir, "ifindex", warnings);
    let is_virtual = pci_address.is_none() && sysfs_path.starts_with("/sys/devices/virtual/");
    let mut lowers = Vec::new();
    let (mut iflink, mut link_type, mut kind) = (ifindex, None, None);
    // Only virtual devices can be bridges, bonds or stacked on others, and only their kind must
    // be guessed: list their directory and read the extra files just for them.
    if is_virtual {
        let entries = dir.list();
        lowers = entries
            .iter()
            .filter_map(|entry| entry.strip_prefix("lower_").map(str::to_owned))
            .collect();
        iflink = read_number(&dir, "iflink", warnings);
        link_type = read_number(&dir, "type", warnings);
        kind = Some(if entries.iter().any(|e| e == "bridge") {
            "bridge".to_owned()
        } else if entries.iter().any(|e| e == "bonding") {
            "bond".to_owned()
        } else {
            virtual_kind(&dir, ifindex, iflink, !lowers.is_empty())
        });
    }
    Some(Netdev {
        name: name.to_owned(),
        ifindex,
        iflink,
        mac: read_text(&dir, "address", warnings),
        mtu: read_number(&dir, "mtu", warnings),
        operstate: read_text(&dir, "operstate", warnings),
        speed_mbps,
        link_type,
        pci_address,
        master: dir.link_name("master"),
        lowers,
        kind,
        sysfs_path,
    })
}

/// The kind of a virtual interface that is neither a bridge nor a bond, from what sysfs shows:
/// `DEVTYPE` in `uevent` (VLANs, wireless), `lower_*` links (a device stacked on another:
/// macvlan, ipvlan — reported as `macvlan`), and a peer link for veth. Sysfs cannot tell
/// everything apart; on the live node netlink's answer replaces this guess.
fn virtual_kind(
    dir: &HostDir,
    ifindex: Option<u32>,
    iflink: Option<u32>,
    has_lowers: bool,
) -> String {
    let devtype = dir.read("uevent").ok().flatten().and_then(|uevent| {
        uevent
            .lines()
            .find_map(|l| l.strip_prefix("DEVTYPE=").map(str::to_owned))
    });
    if let Some(devtype) = devtype {
        return devtype;
    }
    if has_lowers {
        return "macvlan".into();
    }
    // A link pointing at another index with no DEVTYPE: veth (its iflink is the peer's index),
    // or a tunnel, which sysfs cannot tell apart.
    match (ifindex, iflink) {
        (Some(index), Some(link)) if index != link && link != 0 => "veth".into(),
        _ => "virtual".into(),
    }
}
