//! Fixture machines: host-root trees modelled on real servers, for discovery and topology tests,
//! benchmarks and the demo. Each lays sysfs out as the kernel does (see [`super::sysfs`]).

use super::sysfs::{NetSpec, PciSpec, SysfsTree, device_path};

const NVIDIA: u16 = 0x10de;
const MELLANOX: u16 = 0x15b3;
const INTEL: u16 = 0x8086;
const ETHERNET: u32 = 0x02_0000;
const INFINIBAND: u32 = 0x02_0700;
const GPU_3D: u32 = 0x03_0200;

fn hex2(n: u32) -> String {
    format!("{n:02x}")
}

/// An 8-GPU, 8-NIC server on two NUMA nodes (DGX-H100-like): GPU *i* and NIC *i* share a PCIe
/// switch under their own root complex; every NIC is SR-IOV capable (16 VFs) with none enabled,
/// as GPUDirect RDMA nodes run them (a PF with VFs enabled is not handed out; see the `sriov`
/// machine), each with a RoCE RDMA device. `eth0` (an on-board NIC) carries the default route.
///
/// Pair *i* sits under root complex `pci0000:BB` (BB = `0x10 + 0x20·i`): root port `BB:01.0`,
/// switch `BB+1:00.0`, GPU `BB+3:00.0`, NIC `BB+4:00.0` (`enpNs0np0`, `mlx5_i`).
pub fn gpu_8x8() -> SysfsTree {
    gpu_8x8_with_vfs(0)
}

/// [`gpu_8x8`] with `vfs` VFs (at most 16) enabled on every NIC, each with a RoCE RDMA device:
/// VF *v* of NIC *i* is `enpNs0v{v}` at `BB+4:00.{v+1}` (then `01.x`), RDMA `mlx5_{8+i·vfs+v}`.
/// With VFs enabled the PFs are not handed out, the VFs are.
pub fn gpu_8x8_with_vfs(vfs: u32) -> SysfsTree {
    let tree = SysfsTree::new();
    let mut ifindex = 2;
    let mut uverbs = 0;
    uplink_nic(&tree, "eth0", &mut ifindex);
    for i in 0..8_u32 {
        let bus = 0x10 + 0x20 * i;
        let numa = i32::from(i >= 4);
        let rc = format!("pci0000:{}", hex2(bus));
        let rp = format!("0000:{}:01.0", hex2(bus));
        let usp = format!("0000:{}:00.0", hex2(bus + 1));
        let gpu_dsp = format!("0000:{}:00.0", hex2(bus + 2));
        let nic_dsp = format!("0000:{}:01.0", hex2(bus + 2));
        let gpu = format!("0000:{}:00.0", hex2(bus + 3));
        tree.pci(
            &[&rc, &rp, &usp, &gpu_dsp, &gpu],
            &PciSpec::new(GPU_3D, NVIDIA, 0x2330, Some("nvidia"), numa),
        );
        let nic_bus = bus + 4;
        let pf_address = format!("0000:{}:00.0", hex2(nic_bus));
        let mut pf_spec = PciSpec::new(ETHERNET, MELLANOX, 0x1021, Some("mlx5_core"), numa);
        pf_spec.sriov = Some((16, vfs));
        let pf = tree.pci(&[&rc, &rp, &usp, &nic_dsp, &pf_address], &pf_spec);
        let pf_name = format!("enp{nic_bus}s0np0");
        let mut spec = NetSpec::ethernet(ifindex, 400_000);
        spec.mtu = 9000;
        tree.netdev(Some(&pf), &pf_name, &spec);
        ifindex += 1;
        tree.rdma(&pf, &format!("mlx5_{i}"), Some(&pf_name), uverbs);
        uverbs += 1;
        for vf in 0..vfs {
            let (device, function) = ((vf + 1) / 8, (vf + 1) % 8);
            let address = format!("0000:{}:{device:02x}.{function}", hex2(nic_bus));
            let path = tree.pci(
                &[&rc, &rp, &usp, &nic_dsp, &address],
                &PciSpec::new(ETHERNET, MELLANOX, 0x101e, Some("mlx5_core"), numa),
            );
            tree.sriov_vf(&pf, &path, vf);
            let name = format!("enp{nic_bus}s0v{vf}");
            tree.netdev(Some(&path), &name, &NetSpec::ethernet(ifindex, 400_000));
            ifindex += 1;
            let rdma = format!("mlx5_{}", 8 + i * vfs + vf);
            tree.rdma(&path, &rdma, Some(&name), uverbs);
            uverbs += 1;
        }
    }
    tree.rdma_cm();
    tree.ipv4_default_route("eth0");
    loopback(&tree);
    // An excerpt of Debian's pci.ids (2023.04.11), for vendor and device names.
    tree.file(
        "/usr/share/misc/pci.ids",
        "# excerpt\n10de  NVIDIA Corporation\n\t2330  GH100[H100 SXM5 80GB]\n\
         15b3  Mellanox Technologies\n\t101e  ConnectX Family mlx5Gen Virtual Function\n\
         \t1021  MT2910 Family [ConnectX-7]\n8086  Intel Corporation\n\
         \t1572  Ethernet Controller X710 for 10GbE SFP+\nC 02  Network controller\n",
    );
    tree
}

/// A small GPU node for the demo, with NICs named as the caller's stand-in interfaces:
///
/// - `pci0000:10` (NUMA 0): a switch holding GPU `13:00.0` and NIC `14:00.0` (`nics[0]`) → PIX;
/// - `pci0000:30` (NUMA 1): a switch holding GPU `33:00.0` and NIC `34:00.0` (`nics[1]`) → PIX;
/// - NIC `51:00.0` (`nics[2]`) alone under `pci0000:50` (NUMA 0) → NODE from the first GPU;
/// - NIC `71:00.0` (`nics[3]`) alone under `pci0000:70` (NUMA 1) → NODE from the second.
///
/// `eno1` carries the default route.
pub fn two_gpu_rails(nics: [&str; 4]) -> SysfsTree {
    let tree = SysfsTree::new();
    let mut ifindex = 2;
    uplink_nic(&tree, "eno1", &mut ifindex);
    for (i, bus) in [0x10_u32, 0x30].into_iter().enumerate() {
        let numa = i32::from(i == 1);
        let rc = format!("pci0000:{}", hex2(bus));
        let rp = format!("0000:{}:01.0", hex2(bus));
        let usp = format!("0000:{}:00.0", hex2(bus + 1));
        let gpu_dsp = format!("0000:{}:00.0", hex2(bus + 2));
        let nic_dsp = format!("0000:{}:01.0", hex2(bus + 2));
        let gpu = format!("0000:{}:00.0", hex2(bus + 3));
        let nic = format!("0000:{}:00.0", hex2(bus + 4));
        tree.pci(
            &[&rc, &rp, &usp, &gpu_dsp, &gpu],
            &PciSpec::new(GPU_3D, NVIDIA, 0x2330, Some("nvidia"), numa),
        );
        let path = tree.pci(
            &[&rc, &rp, &usp, &nic_dsp, &nic],
            &PciSpec::new(ETHERNET, MELLANOX, 0x1021, Some("mlx5_core"), numa),
        );
        tree.netdev(Some(&path), nics[i], &NetSpec::ethernet(ifindex, 400_000));
        ifindex += 1;
    }
    for (i, bus) in [0x50_u32, 0x70].into_iter().enumerate() {
        let path = tree.pci(
            &[
                &format!("pci0000:{}", hex2(bus)),
                &format!("0000:{}:01.0", hex2(bus)),
                &format!("0000:{}:00.0", hex2(bus + 1)),
            ],
            &PciSpec::new(
                ETHERNET,
                MELLANOX,
                0x1021,
                Some("mlx5_core"),
                i32::from(i == 1),
            ),
        );
        tree.netdev(
            Some(&path),
            nics[2 + i],
            &NetSpec::ethernet(ifindex, 400_000),
        );
        ifindex += 1;
    }
    tree.ipv4_default_route("eno1");
    loopback(&tree);
    tree
}

/// A server where each PCIe switch holds two GPUs and two NICs — `pcieRoot` alone cannot pair
/// them — plus NICs placed to show every distance class:
///
/// - switch A under `pci0000:10` (NUMA 0): GPUs `13:00.0`, `14:00.0`; NICs `15:00.0` (`ens1f0`),
///   `16:00.0` (`ens1f1`); a nested switch below it holds NIC `19:00.0` (`ens2`) → PXB;
/// - NIC `1a:00.0` (`ens3`) on another root port of `pci0000:10` → PHB;
/// - NIC `41:00.0` (`ens4`) under `pci0000:40`, NUMA 0 → NODE;
/// - switch B under `pci0000:90` (NUMA 1): GPUs `93:00.0`, `94:00.0`; NICs `95:00.0` (`ens5f0`),
///   `96:00.0` (`ens5f1`) → SYS from switch A's GPUs.
///
/// `eno1` carries the default route.
pub fn shared_switch() -> SysfsTree {
    let tree = SysfsTree::new();
    let mut ifindex = 2;
    uplink_nic(&tree, "eno1", &mut ifindex);
    for (rc_bus, numa, nic_names) in [
        (0x10_u32, 0, ["ens1f0", "ens1f1"]),
        (0x90, 1, ["ens5f0", "ens5f1"]),
    ] {
        let rc = format!("pci0000:{}", hex2(rc_bus));
        let rp = format!("0000:{}:01.0", hex2(rc_bus));
        let usp = format!("0000:{}:00.0", hex2(rc_bus + 1));
        for slot in 0..4_u32 {
            let dsp = format!("0000:{}:{slot:02x}.0", hex2(rc_bus + 2));
            let address = format!("0000:{}:00.0", hex2(rc_bus + 3 + slot));
            let chain = [rc.as_str(), &rp, &usp, &dsp, &address];
            if slot < 2 {
                tree.pci(
                    &chain,
                    &PciSpec::new(GPU_3D, NVIDIA, 0x2330, Some("nvidia"), numa),
                );
            } else {
                let path = tree.pci(
                    &chain,
                    &PciSpec::new(ETHERNET, MELLANOX, 0x101d, Some("mlx5_core"), numa),
                );
                let name = nic_names[(slot - 2) as usize];
                tree.netdev(Some(&path), name, &NetSpec::ethernet(ifindex, 200_000));
                ifindex += 1;
            }
        }
    }
    let nic = |chain: &[&str], name: &str, numa: i32, ifindex: &mut u32| {
        let path = tree.pci(
            chain,
            &PciSpec::new(ETHERNET, MELLANOX, 0x101d, Some("mlx5_core"), numa),
        );
        tree.netdev(Some(&path), name, &NetSpec::ethernet(*ifindex, 200_000));
        *ifindex += 1;
    };
    nic(
        &[
            "pci0000:10",
            "0000:10:01.0",
            "0000:11:00.0",
            "0000:12:04.0",
            "0000:17:00.0",
            "0000:18:00.0",
            "0000:19:00.0",
        ],
        "ens2",
        0,
        &mut ifindex,
    );
    nic(
        &["pci0000:10", "0000:10:02.0", "0000:1a:00.0"],
        "ens3",
        0,
        &mut ifindex,
    );
    nic(
        &["pci0000:40", "0000:40:01.0", "0000:41:00.0"],
        "ens4",
        0,
        &mut ifindex,
    );
    tree.ipv4_default_route("eno1");
    loopback(&tree);
    tree
}

/// An Azure-style Hyper-V guest (ND H100 v5-like): every PCI device in its own PCI domain deep
/// under `VMBUS:00/<guid>/pciDDDD:00/`, four GPUs and four InfiniBand VFs (`ib0`–`ib3`, RDMA
/// `mlx5_ib0`–`mlx5_ib3`) split over two NUMA nodes, and the synthetic `eth0` (hv_netvsc, no
/// PCI) with its accelerated-networking VF `enP30832s1` enslaved to it; `eth0` has the default
/// route.
pub fn hyperv() -> SysfsTree {
    let tree = SysfsTree::new();
    let vmbus = "LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00";
    let chain = |guid: &str, domain: &str| {
        vec![
            format!("{vmbus}/{guid}"),
            format!("pci{domain}:00"),
            format!("{domain}:00:00.0"),
        ]
    };
    let mut ifindex = 2;
    let synthetic = format!("/sys/devices/{vmbus}/000d3a6f-4e3c-000d-3a6f-4e3c000d3a6f");
    let mut spec = NetSpec::ethernet(ifindex, 100_000);
    spec.mac = "00:0d:3a:6f:4e:3c".into();
    let eth0 = tree.netdev(Some(&synthetic), "eth0", &spec);
    ifindex += 1;
    let vf_chain = chain("5620e0c7-8062-4dce-aeb7-520c7ef76171", "7870");
    let vf_refs: Vec<&str> = vf_chain.iter().map(String::as_str).collect();
    let vf = tree.pci(
        &vf_refs,
        &PciSpec::new(ETHERNET, MELLANOX, 0x101a, Some("mlx5_core"), 0),
    );
    let mut vf_spec = NetSpec::ethernet(ifindex, 100_000);
    vf_spec.mac = "00:0d:3a:6f:4e:3c".into();
    let vf_dir = tree.netdev(Some(&vf), "enP30832s1", &vf_spec);
    ifindex += 1;
    tree.enslave(&vf_dir, &eth0);
    for i in 0..4_u32 {
        let numa = i32::from(i >= 2);
        let gpu_chain = chain(
            &format!("{:08x}-0000-4000-8000-00000000000{i}", 0x1000 + i),
            &format!("{:04x}", 1 + i),
        );
        let gpu_refs: Vec<&str> = gpu_chain.iter().map(String::as_str).collect();
        tree.pci(
            &gpu_refs,
            &PciSpec::new(GPU_3D, NVIDIA, 0x2330, Some("nvidia"), numa),
        );
        let nic_chain = chain(
            &format!("{:08x}-0000-4000-8000-00000000001{i}", 0x2000 + i),
            &format!("{:04x}", 0x101 + i),
        );
        let nic_refs: Vec<&str> = nic_chain.iter().map(String::as_str).collect();
        let nic = tree.pci(
            &nic_refs,
            &PciSpec::new(INFINIBAND, MELLANOX, 0x101e, Some("mlx5_core"), numa),
        );
        let name = format!("ib{i}");
        let mut ib = NetSpec::ethernet(ifindex, 400_000);
        ib.link_type = 32;
        ib.mtu = 2044;
        ib.mac = format!("00:00:10:49:fe:80:00:00:00:00:00:00:00:15:5d:ff:fd:33:ff:{i:02x}");
        tree.netdev(Some(&nic), &name, &ib);
        ifindex += 1;
        tree.rdma(&nic, &format!("mlx5_ib{i}"), Some(&name), i);
    }
    tree.rdma_cm();
    tree.ipv4_default_route("eth0");
    loopback(&tree);
    tree
}

/// An SR-IOV host: an Intel E810 PF `ens1f0` (`0000:3b:00.0`, 8 VFs possible, 4 enabled) whose
/// VFs `ens1f0v0`–`ens1f0v3` (`0000:3b:01.0`–`0000:3b:01.3`, iavf) are up; `eno1` has the
/// default route.
pub fn sriov() -> SysfsTree {
    let tree = SysfsTree::new();
    let mut ifindex = 2;
    uplink_nic(&tree, "eno1", &mut ifindex);
    let chain = ["pci0000:3a", "0000:3a:00.0"];
    let mut pf_spec = PciSpec::new(ETHERNET, INTEL, 0x1593, Some("ice"), 0);
    pf_spec.sriov = Some((8, 4));
    let pf = tree.pci(&[chain[0], chain[1], "0000:3b:00.0"], &pf_spec);
    tree.netdev(Some(&pf), "ens1f0", &NetSpec::ethernet(ifindex, 25_000));
    ifindex += 1;
    for vf in 0..4_u32 {
        let address = format!("0000:3b:01.{vf}");
        let path = tree.pci(
            &[chain[0], chain[1], &address],
            &PciSpec::new(ETHERNET, INTEL, 0x1889, Some("iavf"), 0),
        );
        tree.sriov_vf(&pf, &path, vf);
        tree.netdev(
            Some(&path),
            &format!("ens1f0v{vf}"),
            &NetSpec::ethernet(ifindex, 25_000),
        );
        ifindex += 1;
    }
    tree.ipv4_default_route("eno1");
    loopback(&tree);
    tree
}

/// A host with a bonded uplink and the usual clutter, including broken sysfs entries:
///
/// - `bond0` over `eth0` + `eth1` (the two ports `0000:3b:00.0`/`.1`) carries the default route;
/// - `0000:5e:00.0`, a NIC bound to `vfio-pci` (no interface);
/// - `eth2` (`0000:86:00.0`, `numa_node` `-1`) with a macvlan `mv0` on it, and an RDMA device
///   `mlx5_9` whose `ports/` directory is empty;
/// - `eth3` (`0000:87:00.0`) whose `numa_node` holds garbage and whose `speed` is `-1` (down);
/// - `docker0` (a bridge) with `vethab12cd` enslaved, and `lo`;
/// - `/sys/class/net/ghost`, a dangling link.
pub fn bonded() -> SysfsTree {
    let tree = SysfsTree::new();
    let mut ifindex = 2;
    let bond = tree.netdev(None, "bond0", &NetSpec::ethernet(ifindex, 50_000));
    tree.mark(&bond, "bonding");
    ifindex += 1;
    for (function, name) in [(0, "eth0"), (1, "eth1")] {
        let address = format!("0000:3b:00.{function}");
        let path = tree.pci(
            &["pci0000:3a", "0000:3a:00.0", &address],
            &PciSpec::new(ETHERNET, 0x14e4, 0x16d7, Some("bnxt_en"), 0),
        );
        let dir = tree.netdev(Some(&path), name, &NetSpec::ethernet(ifindex, 25_000));
        ifindex += 1;
        tree.enslave(&dir, &bond);
    }
    tree.pci(
        &["pci0000:5d", "0000:5d:00.0", "0000:5e:00.0"],
        &PciSpec::new(ETHERNET, INTEL, 0x1592, Some("vfio-pci"), 0),
    );
    let eth2_pci = tree.pci(
        &["pci0000:85", "0000:85:00.0", "0000:86:00.0"],
        &PciSpec::new(ETHERNET, MELLANOX, 0x101d, Some("mlx5_core"), -1),
    );
    let eth2 = tree.netdev(
        Some(&eth2_pci),
        "eth2",
        &NetSpec::ethernet(ifindex, 100_000),
    );
    ifindex += 1;
    tree.dir(&format!("{eth2_pci}/infiniband/mlx5_9/ports"));
    tree.link(&format!("{eth2_pci}/infiniband/mlx5_9/device"), &eth2_pci);
    tree.link(
        "/sys/class/infiniband/mlx5_9",
        &format!("{eth2_pci}/infiniband/mlx5_9"),
    );
    let mut macvlan = NetSpec::ethernet(ifindex, 100_000);
    macvlan.iflink = ifindex - 1;
    macvlan.speed = None;
    let mv0 = tree.netdev(None, "mv0", &macvlan);
    ifindex += 1;
    tree.link(&format!("{mv0}/lower_eth2"), &eth2);
    let mut eth3_spec = PciSpec::new(ETHERNET, MELLANOX, 0x101d, Some("mlx5_core"), 0);
    eth3_spec.numa_node = "abc".into();
    let eth3_pci = tree.pci(&["pci0000:85", "0000:85:01.0", "0000:87:00.0"], &eth3_spec);
    let mut down = NetSpec::ethernet(ifindex, 0);
    down.speed = Some("-1".into());
    down.operstate = "down";
    tree.netdev(Some(&eth3_pci), "eth3", &down);
    ifindex += 1;
    let docker0 = tree.netdev(None, "docker0", &NetSpec::ethernet(ifindex, 0));
    tree.mark(&docker0, "bridge");
    ifindex += 1;
    let mut veth = NetSpec::ethernet(ifindex, 10_000);
    veth.iflink = 99;
    let veth_dir = tree.netdev(None, "vethab12cd", &veth);
    tree.enslave(&veth_dir, &docker0);
    tree.raw_link("/sys/class/net/ghost", "../../devices/virtual/net/ghost");
    tree.ipv4_default_route("bond0");
    loopback(&tree);
    tree
}

/// An on-board Intel NIC under `pci0000:00` carrying the machine's default route.
fn uplink_nic(tree: &SysfsTree, name: &str, ifindex: &mut u32) {
    let path = tree.pci(
        &["pci0000:00", "0000:00:1c.0", "0000:01:00.0"],
        &PciSpec::new(ETHERNET, INTEL, 0x1572, Some("i40e"), 0),
    );
    tree.netdev(Some(&path), name, &NetSpec::ethernet(*ifindex, 10_000));
    *ifindex += 1;
}

fn loopback(tree: &SysfsTree) {
    let mut lo = NetSpec::ethernet(1, 0);
    lo.link_type = 772;
    lo.mac = "00:00:00:00:00:00".into();
    lo.speed = None;
    lo.mtu = 65536;
    lo.operstate = "unknown";
    tree.netdev(None, "lo", &lo);
}

/// The device path of a function below the given chain (for tests that corrupt a fixture).
pub fn path_of(chain: &[&str]) -> String {
    device_path(chain)
}
