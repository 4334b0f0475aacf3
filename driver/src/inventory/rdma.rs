//! RDMA devices (`/sys/class/infiniband/*`), their ports and netdevs, and the character devices a
//! container needs to use them (`/dev/infiniband/uverbsN`, `rdma_cm`).

use super::{Warnings, host::HostRoot, pci::is_pci_address};

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

impl RdmaDevice {
    /// Every netdev any port names, deduplicated, in port order.
    pub fn netdevs(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        for name in self.ports.iter().flat_map(|p| p.netdevs.iter()) {
            if !all.contains(name) {
                all.push(name.clone());
            }
        }
        all
    }
}

/// Reads every RDMA device and the `rdma_cm` character device.
pub fn scan(host: &HostRoot, warnings: &mut Warnings) -> (Vec<RdmaDevice>, Option<CharDevice>) {
    let uverbs = uverbs_by_ibdev(host, warnings);
    let devices = host
        .list("/sys/class/infiniband")
        .into_iter()
        .map(|name| read_device(host, &name, &uverbs, warnings))
        .collect();
    let rdma_cm = char_device(
        host,
        "/sys/class/misc/rdma_cm/dev",
        "/dev/infiniband/rdma_cm",
        warnings,
    );
    (devices, rdma_cm)
}

fn read_device(
    host: &HostRoot,
    name: &str,
    uverbs: &[(String, CharDevice)],
    warnings: &mut Warnings,
) -> RdmaDevice {
    let dir = format!("/sys/class/infiniband/{name}");
    let pci_address = host
        .resolve(&format!("{dir}/device"))
        .ok()
        .and_then(|p| p.rsplit('/').next().map(str::to_owned))
        .filter(|a| is_pci_address(a));
    let mut ports: Vec<RdmaPort> = host
        .list(&format!("{dir}/ports"))
        .into_iter()
        .filter_map(|port| {
            let number: u32 = port.parse().ok()?;
            let port_dir = format!("{dir}/ports/{port}");
            let read = |file: &str, warnings: &mut Warnings| match host
                .read(&format!("{port_dir}/{file}"))
            {
                Ok(value) => value.filter(|v| !v.is_empty()),
                Err(problem) => {
                    warnings.push(problem);
                    None
                }
            };
            let mut netdevs: Vec<String> = Vec::new();
            for gid in host.list(&format!("{port_dir}/gid_attrs/ndevs")) {
                if let Some(netdev) = read(&format!("gid_attrs/ndevs/{gid}"), warnings)
                    && !netdevs.contains(&netdev)
                {
                    netdevs.push(netdev);
                }
            }
            Some(RdmaPort {
                number,
                state: read("state", warnings),
                link_layer: read("link_layer", warnings),
                netdevs,
            })
        })
        .collect();
    ports.sort_by_key(|p| p.number);
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
            let dir = format!("/sys/class/infiniband_verbs/{name}");
            let ibdev = match host.read(&format!("{dir}/ibdev")) {
                Ok(Some(ibdev)) if !ibdev.is_empty() => ibdev,
                Ok(_) => return None,
                Err(problem) => {
                    warnings.push(problem);
                    return None;
                }
            };
            let dev = char_device(
                host,
                &format!("{dir}/dev"),
                &format!("/dev/infiniband/{name}"),
                warnings,
            )?;
            Some((ibdev, dev))
        })
        .collect()
}

/// Reads a `dev` file (`MAJOR:MINOR`) into the character device at `dev_path`.
fn char_device(
    host: &HostRoot,
    dev_file: &str,
    dev_path: &str,
    warnings: &mut Warnings,
) -> Option<CharDevice> {
    let text = match host.read(dev_file) {
        Ok(Some(text)) => text,
        Ok(None) => return None,
        Err(problem) => {
            warnings.push(problem);
            return None;
        }
    };
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
        warnings.push(super::host::FileProblem {
            path: dev_file.to_owned(),
            reason: format!("`{text}` is not MAJOR:MINOR"),
        });
        None
    }
}
