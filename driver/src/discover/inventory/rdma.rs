//! RDMA devices (`/sys/class/infiniband/*`), their ports and netdevs, and the character devices a
//! container needs to use them (`/dev/infiniband/uverbsN`, `rdma_cm`).

use crate::{
    discover::pci::is_pci_address,
    os::host::{FileProblem, HostDir, HostRoot, Warnings, read_text},
};

/// A character device node a container must be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharDevice {
    /// Path on the host, e.g. `/dev/infiniband/uverbs0`.
    pub path: String,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

/// One port of an RDMA device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RdmaPort {
    /// Port number (from 1).
    pub number: u32,
    /// `state`, e.g. `4: ACTIVE`.
    pub state: Option<String>,
    /// `link_layer`: `Ethernet` (RoCE) or `InfiniBand`.
    pub link_layer: Option<String>,
    /// Netdevs bound to the port's GIDs (`gid_attrs/ndevs/*`).
    pub netdevs: Vec<String>,
}

/// One RDMA device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RdmaDevice {
    /// Device name, e.g. `mlx5_0`.
    pub name: String,
    /// The PCI function behind it.
    pub pci_address: Option<String>,
    /// Its ports.
    pub ports: Vec<RdmaPort>,
    /// The verbs character device.
    pub uverbs: Option<CharDevice>,
}

/// Reads every RDMA device and the `rdma_cm` character device.
pub fn scan(host: &HostRoot, warnings: &mut Warnings) -> (Vec<RdmaDevice>, Option<CharDevice>) {
    let uverbs = uverbs_by_ibdev(host, warnings);
    let devices = host
        .list("/sys/class/infiniband")
        .into_iter()
        .map(|name| read_device(host, &name, &uverbs, warnings))
        .collect();
    let rdma_cm = host
        .dir("/sys/class/misc/rdma_cm")
        .ok()
        .and_then(|dir| parse_dev(&dir, "/dev/infiniband/rdma_cm", warnings));
    (devices, rdma_cm)
}

fn read_device(
    host: &HostRoot,
    name: &str,
    uverbs: &[(String, CharDevice)],
    warnings: &mut Warnings,
) -> RdmaDevice {
    let path = format!("/sys/class/infiniband/{name}");
    let dir = match host.dir(&path) {
        Ok(dir) => Some(dir),
        Err(problem) => {
            warnings.push(problem);
            None
        }
    };
    let pci_address = dir
        .as_ref()
        .and_then(|d| d.link_name("device"))
        .filter(|a| is_pci_address(a));
    // Ports are numbered from 1 without gaps: probe them rather than list the directory.
    let mut ports: Vec<RdmaPort> = Vec::new();
    if let Some(dir) = &dir {
        for number in 1_u32.. {
            let Ok(port_dir) = dir.subdir(&format!("ports/{number}")) else {
                break;
            };
            // GIDs 0 and 1 are the port's default (link-local) GIDs and name its netdev; the
            // rest of the table (up to 256 entries, mostly empty) adds nothing here.
            let mut netdevs: Vec<String> = Vec::new();
            if let Ok(ndevs) = port_dir.subdir("gid_attrs/ndevs") {
                for gid in ["0", "1"] {
                    if let Ok(Some(netdev)) = ndevs.read(gid)
                        && !netdev.is_empty()
                        && !netdevs.contains(&netdev)
                    {
                        netdevs.push(netdev);
                    }
                }
            }
            ports.push(RdmaPort {
                number,
                state: read_text(&port_dir, "state", warnings),
                link_layer: read_text(&port_dir, "link_layer", warnings),
                netdevs,
            });
        }
    }
    if ports.is_empty() && dir.is_some() {
        warnings.push(FileProblem {
            path: format!("{path}/ports"),
            reason: "no ports: the RDMA device is published without port details".into(),
        });
    }
    RdmaDevice {
        name: name.to_owned(),
        pci_address,
        ports,
        uverbs: uverbs
            .iter()
            .find(|(ibdev, _)| ibdev == name)
            .map(|(_, dev)| dev.clone()),
    }
}

/// `uverbsN` character devices keyed by the RDMA device they serve (their `ibdev` file).
fn uverbs_by_ibdev(host: &HostRoot, warnings: &mut Warnings) -> Vec<(String, CharDevice)> {
    host.list("/sys/class/infiniband_verbs")
        .into_iter()
        .filter(|name| name.starts_with("uverbs"))
        .filter_map(|name| {
            let dir = host
                .dir(&format!("/sys/class/infiniband_verbs/{name}"))
                .ok()?;
            let ibdev = read_text(&dir, "ibdev", warnings)?;
            let dev = parse_dev(&dir, &format!("/dev/infiniband/{name}"), warnings)?;
            Some((ibdev, dev))
        })
        .collect()
}

/// Reads the `dev` file (`MAJOR:MINOR`) of a device directory into the character device at
/// `dev_path`.
fn parse_dev(dir: &HostDir, dev_path: &str, warnings: &mut Warnings) -> Option<CharDevice> {
    let text = read_text(dir, "dev", warnings)?;
    let parsed = text
        .split_once(':')
        .and_then(|(major, minor)| Some((major.parse().ok()?, minor.parse().ok()?)));
    if let Some((major, minor)) = parsed {
        Some(CharDevice {
            path: dev_path.to_owned(),
            major,
            minor,
        })
    } else {
        warnings.push(FileProblem {
            path: format!("{}/dev", dir.path()),
            reason: format!("`{text}` is not MAJOR:MINOR"),
        });
        None
    }
}

/// What a GID table entry is for (`gid_attrs/types/N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GidType {
    /// `RoCE v2`: routable, over UDP/IP (an IPv4 address appears IPv4-mapped).
    RoceV2,
    /// `IB/RoCE v1`: InfiniBand, or RoCE over Ethernet frames only.
    IbOrRoceV1,
}

/// One used entry of a port's GID table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidEntry {
    /// Its index (what `NCCL_IB_GID_INDEX` and `ibv_query_gid` take).
    pub index: u32,
    /// The GID.
    pub gid: std::net::Ipv6Addr,
    /// Its type.
    pub kind: GidType,
}

/// The used entries of `port`'s GID table on RDMA device `device`, by index: `gids/N` parsed as
/// 128-bit GIDs, all-zero (free) ones left out, and `gid_attrs/types/N` (which the kernel
/// refuses to read for free entries) as a [`GidType`]. Anything else in the directory, and
/// entries whose files make no sense, are left out. Fails only when the table cannot be read.
pub fn gid_table(host: &HostRoot, device: &str, port: u32) -> Result<Vec<GidEntry>, FileProblem> {
    let port_dir = host.dir(&format!("/sys/class/infiniband/{device}/ports/{port}"))?;
    let gids = port_dir.subdir("gids")?;
    let mut entries: Vec<GidEntry> = gids
        .list()
        .into_iter()
        .filter_map(|name| {
            let index: u32 = name.parse().ok().filter(|_| !name.starts_with('+'))?;
            let gid: std::net::Ipv6Addr = gids.read(&name).ok()??.parse().ok()?;
            if gid.is_unspecified() {
                return None;
            }
            let kind = match port_dir
                .read(&format!("gid_attrs/types/{index}"))
                .ok()??
                .as_str()
            {
                "RoCE v2" => GidType::RoceV2,
                "IB/RoCE v1" => GidType::IbOrRoceV1,
                _ => return None,
            };
            Some(GidEntry { index, gid, kind })
        })
        .collect();
    entries.sort_by_key(|e| e.index);
    Ok(entries)
}
