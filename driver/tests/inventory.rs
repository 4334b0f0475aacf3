//! Discovery and topology on fixture machines laid out as the kernel lays out sysfs.

use std::collections::BTreeMap;

use knd::{
    cli::topo::Report,
    discover::inventory::{ExclusionReason, Inventory, Nic, scan},
    model::distance::Distance,
    publish::resources::{self, Value},
};
use knd_testkit::{machines, sysfs::SysfsTree};

fn inventory_of(tree: &SysfsTree) -> Inventory {
    scan(&tree.host(), None)
}

fn nic<'a>(inventory: &'a Inventory, if_name: &str) -> &'a Nic {
    inventory
        .nics
        .iter()
        .find(|n| n.netdev.as_ref().is_some_and(|d| d.name == if_name))
        .unwrap_or_else(|| panic!("no NIC {if_name} in {:?}", names(inventory)))
}

fn names(inventory: &Inventory) -> Vec<String> {
    inventory.nics.iter().map(Nic::display_name).collect()
}

fn attrs(nic: &Nic) -> BTreeMap<String, Value> {
    resources::attributes(nic)
}

fn s(text: &str) -> Value {
    Value::Str(text.to_owned())
}

fn excluded(inventory: &Inventory, device: &str) -> Option<ExclusionReason> {
    inventory
        .excluded
        .iter()
        .find(|e| e.device == device)
        .map(|e| e.reason.clone())
}

#[test]
fn gpu_8x8_publishes_every_nic_with_full_attributes() {
    let tree = machines::gpu_8x8();
    let inventory = inventory_of(&tree);
    assert!(inventory.warnings.is_empty(), "{:?}", inventory.warnings);
    assert_eq!(inventory.gpus.len(), 8);
    // 8 PFs; the uplink and lo are not published.
    assert_eq!(inventory.nics.len(), 8, "{:?}", names(&inventory));
    assert_eq!(
        excluded(&inventory, "eth0"),
        Some(ExclusionReason::DefaultRoute { family: "IPv4" })
    );
    assert_eq!(excluded(&inventory, "lo"), Some(ExclusionReason::Loopback));
    assert!(inventory.rdma_cm.is_some());

    // NIC 5: bus 0xb0 → switch 0xb1, GPU 0xb3:00.0, NIC 0xb4:00.0 (= 180), NUMA 1; interface
    // index 3 + 5 = 8 (eth0 is 2).
    let pf = attrs(nic(&inventory, "enp180s0np0"));
    let expected: BTreeMap<String, Value> = [
        ("knd.dev/ifName", s("enp180s0np0")),
        ("knd.dev/mac", s("0c:42:a1:00:00:08")),
        ("knd.dev/mtu", Value::Int(9000)),
        ("knd.dev/speedMbps", Value::Int(400_000)),
        ("knd.dev/state", s("up")),
        ("knd.dev/virtual", Value::Bool(false)),
        ("knd.dev/rdma", Value::Bool(true)),
        ("knd.dev/rdmaDevice", s("mlx5_5")),
        ("knd.dev/driver", s("mlx5_core")),
        ("knd.dev/pciAddress", s("0000:b4:00.0")),
        ("knd.dev/pciVendorID", s("15b3")),
        ("knd.dev/pciDeviceID", s("1021")),
        ("knd.dev/pciSubsystem", s("15b3:0001")),
        ("knd.dev/numaNode", Value::Int(1)),
        ("knd.dev/sriov", Value::Bool(true)),
        ("knd.dev/sriovVfs", Value::Int(0)),
        ("knd.dev/isSriovVf", Value::Bool(false)),
        ("knd.dev/gpuPciBusID", s("0000:b3:00.0")),
        ("knd.dev/gpuDistance", s("PIX")),
        ("resource.kubernetes.io/numaNode", Value::Int(1)),
        ("resource.kubernetes.io/pciBusID", s("0000:b4:00.0")),
        ("resource.kubernetes.io/pcieRoot", s("pci0000:b0")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (key, value) in &expected {
        assert_eq!(pf.get(key), Some(value), "{key} in {pf:?}");
    }
    // Names come from the host's pci.ids (the fixture carries an excerpt).
    assert_eq!(pf["knd.dev/pciVendor"], s("Mellanox Technologies"));
    assert_eq!(pf["knd.dev/pciDevice"], s("MT2910 Family [ConnectX-7]"));
    assert!(!pf.contains_key("knd.dev/pfName"));
    assert!(pf.len() <= resources::MAX_ATTRIBUTES_PER_DEVICE);

    let uverbs = nic(&inventory, "enp180s0np0").rdma[0]
        .uverbs
        .clone()
        .unwrap();
    assert_eq!(uverbs.path, "/dev/infiniband/uverbs5");
    assert_eq!((uverbs.major, uverbs.minor), (231, 192 + 5));
}

/// With VFs enabled on every NIC, the 64 VFs are published (each with its RDMA device, its
/// PF named) and the PFs are not: a PF's MTU, features and link govern its VFs' tenants.
#[test]
fn gpu_8x8_with_vfs_publishes_the_vfs_not_their_pfs() {
    let tree = machines::gpu_8x8_with_vfs(8);
    let inventory = inventory_of(&tree);
    assert!(inventory.warnings.is_empty(), "{:?}", inventory.warnings);
    assert_eq!(inventory.nics.len(), 64, "{:?}", names(&inventory));
    assert_eq!(
        excluded(&inventory, "0000:b4:00.0"),
        Some(ExclusionReason::SriovPhysicalFunction { vfs: 8 })
    );
    assert!(
        inventory
            .nics
            .iter()
            .all(|n| n.pci.as_ref().unwrap().physfn.is_some())
    );
    let vf = attrs(nic(&inventory, "enp180s0v7"));
    assert_eq!(vf["knd.dev/isSriovVf"], Value::Bool(true));
    assert_eq!(vf["knd.dev/pfName"], s("enp180s0np0"));
    assert_eq!(vf["knd.dev/pciAddress"], s("0000:b4:01.0"));
    assert_eq!(vf["knd.dev/rdmaDevice"], s("mlx5_55"));
    assert_eq!(vf["knd.dev/gpuDistance"], s("PIX"));
    assert_eq!(vf["knd.dev/sriov"], Value::Bool(false));
    assert_eq!(
        vf["knd.dev/pciDevice"],
        s("ConnectX Family mlx5Gen Virtual Function")
    );
    let uverbs = nic(&inventory, "enp180s0v7").rdma[0]
        .uverbs
        .clone()
        .unwrap();
    // uverbs: pair i has 9 (PF, then its 8 VFs): 5 × 9 + 8.
    assert_eq!(uverbs.path, "/dev/infiniband/uverbs53");
    assert_eq!((uverbs.major, uverbs.minor), (231, 192 + 53));
}

#[test]
fn gpu_8x8_pairs_each_gpu_with_its_switch_nic() {
    let tree = machines::gpu_8x8();
    let report = Report::new(&inventory_of(&tree));
    assert_eq!(report.gpus.len(), 8);
    assert_eq!(report.pairs.len(), 8 * 8);
    for i in 0..8_u32 {
        let gpu = format!("0000:{:02x}:00.0", 0x13 + 0x20 * i);
        for j in 0..8_u32 {
            let nic = format!("0000:{:02x}:00.0", 0x14 + 0x20 * j);
            let class = report
                .pairs
                .iter()
                .find(|p| p.gpu == gpu && p.nic == nic)
                .unwrap()
                .class;
            let expected = if i == j {
                Distance::Pix
            } else if (i < 4) == (j < 4) {
                Distance::Node
            } else {
                Distance::Sys
            };
            assert_eq!(class, expected, "GPU {gpu} × NIC {nic}");
        }
    }
}

#[test]
fn shared_switch_shows_every_distance_class() {
    let tree = machines::shared_switch();
    let inventory = inventory_of(&tree);
    assert!(inventory.warnings.is_empty(), "{:?}", inventory.warnings);
    let report = Report::new(&inventory);
    let class = |gpu: &str, nic_if: &str| {
        let pci = nic(&inventory, nic_if)
            .pci
            .as_ref()
            .unwrap()
            .address
            .clone();
        report
            .pairs
            .iter()
            .find(|p| p.gpu == gpu && p.nic == pci)
            .unwrap()
            .class
    };
    let gpu_a = "0000:13:00.0";
    assert_eq!(class(gpu_a, "ens1f0"), Distance::Pix);
    assert_eq!(class("0000:14:00.0", "ens1f1"), Distance::Pix);
    assert_eq!(class(gpu_a, "ens2"), Distance::Pxb);
    assert_eq!(class(gpu_a, "ens3"), Distance::Phb);
    assert_eq!(class(gpu_a, "ens4"), Distance::Node);
    assert_eq!(class(gpu_a, "ens5f0"), Distance::Sys);
    assert_eq!(class("0000:93:00.0", "ens5f1"), Distance::Pix);
    // Both GPUs of a switch are PIX to both its NICs, and pcieRoot is the same for all four
    // (the ambiguity per-rail selectors resolve): the NICs are dealt out as rails, one per GPU.
    let a = attrs(nic(&inventory, "ens1f1"));
    assert_eq!(a["knd.dev/gpuPciBusID"], s("0000:14:00.0"));
    assert_eq!(a["resource.kubernetes.io/pcieRoot"], s("pci0000:10"));
    assert_eq!(
        attrs(nic(&inventory, "ens1f0"))["knd.dev/gpuPciBusID"],
        s(gpu_a)
    );
    assert_eq!(
        attrs(nic(&inventory, "ens5f0"))["knd.dev/gpuPciBusID"],
        s("0000:93:00.0")
    );
    assert_eq!(
        attrs(nic(&inventory, "ens5f1"))["knd.dev/gpuPciBusID"],
        s("0000:94:00.0")
    );
    assert_eq!(
        attrs(nic(&inventory, "ens4"))["knd.dev/gpuDistance"],
        s("NODE")
    );
    assert_eq!(
        attrs(nic(&inventory, "ens2"))["knd.dev/gpuDistance"],
        s("PXB")
    );
    assert_eq!(
        attrs(nic(&inventory, "ens3"))["knd.dev/gpuDistance"],
        s("PHB")
    );
    assert!(report.table().contains("PXB"));
}

#[test]
fn hyper_v_guest_finds_deep_root_complexes_and_protects_the_synthetic_uplink() {
    let tree = machines::hyperv();
    let inventory = inventory_of(&tree);
    assert!(inventory.warnings.is_empty(), "{:?}", inventory.warnings);
    assert_eq!(
        excluded(&inventory, "eth0"),
        Some(ExclusionReason::DefaultRoute { family: "IPv4" })
    );
    assert_eq!(
        excluded(&inventory, "enP30832s1"),
        Some(ExclusionReason::UplinkMember {
            uplink: "eth0".into()
        })
    );
    assert_eq!(names(&inventory), ["ib0", "ib1", "ib2", "ib3"]);
    assert_eq!(inventory.gpus.len(), 4);
    let ib2 = attrs(nic(&inventory, "ib2"));
    assert_eq!(ib2["resource.kubernetes.io/pcieRoot"], s("pci0103:00"));
    assert_eq!(ib2["resource.kubernetes.io/pciBusID"], s("0103:00:00.0"));
    assert_eq!(ib2["knd.dev/numaNode"], Value::Int(1));
    assert_eq!(ib2["resource.kubernetes.io/numaNode"], Value::Int(1));
    assert_eq!(ib2["knd.dev/rdmaDevice"], s("mlx5_ib2"));
    assert_eq!(ib2["knd.dev/mtu"], Value::Int(2044));
    // Every device has its own root complex: the best is the same NUMA node.
    assert_eq!(ib2["knd.dev/gpuDistance"], s("NODE"));
    assert_eq!(ib2["knd.dev/gpuPciBusID"], s("0003:00:00.0"));
    let report = Report::new(&inventory);
    assert!(
        report
            .pairs
            .iter()
            .all(|p| matches!(p.class, Distance::Node | Distance::Sys))
    );
    assert_eq!(report.gpus[0].pcie_root.as_deref(), Some("pci0001:00"));
}

/// A PF with VFs enabled is not handed out (its MTU, features and link govern the VFs, which
/// other pods get); its VFs are, naming it.
#[test]
fn sriov_vfs_are_published_naming_their_pf_and_the_pf_is_not() {
    let tree = machines::sriov();
    let inventory = inventory_of(&tree);
    assert!(inventory.warnings.is_empty(), "{:?}", inventory.warnings);
    assert_eq!(
        names(&inventory),
        ["ens1f0v0", "ens1f0v1", "ens1f0v2", "ens1f0v3"]
    );
    assert_eq!(
        excluded(&inventory, "0000:3b:00.0"),
        Some(ExclusionReason::SriovPhysicalFunction { vfs: 4 })
    );
    let vf = attrs(nic(&inventory, "ens1f0v2"));
    assert_eq!(vf["knd.dev/isSriovVf"], Value::Bool(true));
    assert_eq!(vf["knd.dev/pfName"], s("ens1f0"));
    assert_eq!(vf["knd.dev/driver"], s("iavf"));
    assert_eq!(vf["knd.dev/pciAddress"], s("0000:3b:01.2"));
    assert_eq!(vf["knd.dev/sriov"], Value::Bool(false));
    assert!(!vf.contains_key("knd.dev/gpuDistance"), "no GPUs here");
    // With the VFs disabled again the PF is published, saying what it could offer.
    let pf = machines::path_of(&["pci0000:3a", "0000:3a:00.0", "0000:3b:00.0"]);
    std::fs::write(
        tree.root().join(format!("{}/sriov_numvfs", &pf[1..])),
        "0\n",
    )
    .unwrap();
    let inventory = inventory_of(&tree);
    let pf = attrs(nic(&inventory, "ens1f0"));
    assert_eq!(pf["knd.dev/sriov"], Value::Bool(true));
    assert_eq!(pf["knd.dev/sriovVfs"], Value::Int(0));
    assert_eq!(pf["knd.dev/isSriovVf"], Value::Bool(false));
    assert_eq!(pf["knd.dev/driver"], s("ice"));
}

#[test]
fn bonded_host_excludes_uplink_members_userspace_and_cni_devices_and_survives_broken_files() {
    let tree = machines::bonded();
    let inventory = inventory_of(&tree);
    assert_eq!(
        excluded(&inventory, "bond0"),
        Some(ExclusionReason::DefaultRoute { family: "IPv4" })
    );
    for member in ["eth0", "eth1"] {
        assert_eq!(
            excluded(&inventory, member),
            Some(ExclusionReason::UplinkMember {
                uplink: "bond0".into()
            })
        );
    }
    assert_eq!(
        excluded(&inventory, "0000:5e:00.0"),
        Some(ExclusionReason::UserspaceDriver {
            driver: "vfio-pci".into()
        })
    );
    assert_eq!(
        excluded(&inventory, "docker0"),
        Some(ExclusionReason::Bridge)
    );
    assert_eq!(
        excluded(&inventory, "vethab12cd"),
        Some(ExclusionReason::CniInterface)
    );
    assert_eq!(names(&inventory), ["eth2", "eth3", "mv0"]);

    // numa_node -1: no attribute, no warning. Garbage: no attribute, one warning naming it.
    let eth2 = attrs(nic(&inventory, "eth2"));
    assert!(!eth2.contains_key("knd.dev/numaNode"));
    assert!(!eth2.contains_key("resource.kubernetes.io/numaNode"));
    assert_eq!(
        eth2["knd.dev/rdma"],
        Value::Bool(true),
        "mlx5_9 has no ports but exists"
    );
    assert_eq!(eth2["knd.dev/rdmaDevice"], s("mlx5_9"));
    let eth3 = attrs(nic(&inventory, "eth3"));
    assert!(!eth3.contains_key("knd.dev/numaNode"));
    assert!(!eth3.contains_key("resource.kubernetes.io/numaNode"));
    assert!(
        !eth3.contains_key("knd.dev/speedMbps"),
        "speed -1 means unknown"
    );
    assert_eq!(eth3["knd.dev/state"], s("down"));
    let warnings: Vec<String> = inventory.warnings.iter().map(ToString::to_string).collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("0000:87:00.0/numa_node") && w.contains("abc")),
        "{warnings:?}"
    );
    assert!(
        warnings.iter().any(|w| w.contains("/sys/class/net/ghost")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("/sys/class/infiniband/mlx5_9/ports: no ports")),
        "{warnings:?}"
    );
    assert_eq!(warnings.len(), 3, "{warnings:?}");

    let mv0 = attrs(nic(&inventory, "mv0"));
    assert_eq!(mv0["knd.dev/virtual"], Value::Bool(true));
    assert_eq!(mv0["knd.dev/kind"], s("macvlan"));
    assert!(!mv0.contains_key("resource.kubernetes.io/pcieRoot"));
}

#[test]
fn missing_identity_files_skip_the_device_with_a_warning() {
    let tree = machines::sriov();
    let vf =
        |f: u32| machines::path_of(&["pci0000:3a", "0000:3a:00.0", &format!("0000:3b:01.{f}")]);
    std::fs::remove_file(tree.root().join(format!("{}/class", &vf(1)[1..]))).unwrap();
    std::fs::write(
        tree.root().join(format!("{}/vendor", &vf(2)[1..])),
        "not hex",
    )
    .unwrap();
    let inventory = inventory_of(&tree);
    // A function whose identity cannot be read is not published, not even by its interface.
    assert_eq!(names(&inventory), ["ens1f0v0", "ens1f0v3"]);
    let warnings: Vec<String> = inventory.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "/sys/bus/pci/devices/0000:3b:01.1: skipped: class, vendor or device is missing or \
             unreadable",
            "/sys/bus/pci/devices/0000:3b:01.2/vendor: `not hex` is not a hexadecimal number",
            "/sys/bus/pci/devices/0000:3b:01.2: skipped: class, vendor or device is missing or \
             unreadable",
        ]
    );
}

#[test]
fn slices_of_the_largest_fixture_respect_api_limits() {
    let tree = machines::gpu_8x8();
    let slices = resources::slices(
        &inventory_of(&tree),
        resources::DRIVER_NAME,
        "gpu-node-1",
        3,
        None,
    );
    assert_eq!(slices.len(), 1, "8 devices fit one slice");
    let devices = slices[0].spec.devices.as_ref().unwrap();
    assert_eq!(devices.len(), 8);
    for device in devices {
        assert!(resources::is_dns_label(&device.name), "{}", device.name);
        let attributes = device.attributes.as_ref().unwrap();
        assert!(attributes.len() <= 32);
        for (name, value) in attributes {
            let id = name.rsplit('/').next().unwrap();
            assert!(id.len() <= 32 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            let set = [
                value.bool.is_some(),
                value.int.is_some(),
                value.string.is_some(),
                value.version.is_some(),
            ];
            assert_eq!(set.iter().filter(|x| **x).count(), 1, "{name}");
            if let Some(s) = &value.string {
                assert!(s.chars().count() <= 64, "{name}={s}");
            }
        }
    }
    assert!(devices.iter().any(|d| d.name == "pci-0000-b4-00-0"));
}

/// Every file of a fixture, replaced in turn by garbage, never makes discovery panic, and
/// whatever is still published stays within the API's limits.
#[test]
fn garbage_in_any_file_never_panics() {
    let tree = machines::bonded();
    let mut files = Vec::new();
    let mut pending = vec![tree.root().to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    assert!(files.len() > 100, "{} files", files.len());
    let garbage: [&[u8]; 5] = [b"", b"\xff\xfe\x00", b"-1", b"99999999999999999999", b"0x"];
    for file in &files {
        let original = std::fs::read(file).unwrap();
        for bytes in garbage {
            std::fs::write(file, bytes).unwrap();
            let inventory = inventory_of(&tree);
            for device in resources::slices(&inventory, resources::DRIVER_NAME, "n", 1, None)
                .iter()
                .flat_map(|s| s.spec.devices.clone().unwrap_or_default())
            {
                assert!(resources::is_dns_label(&device.name), "{}", device.name);
                assert!(device.attributes.unwrap_or_default().len() <= 32);
            }
        }
        std::fs::write(file, original).unwrap();
    }
}

#[test]
#[ignore = "needs root: mounts file systems"]
fn discovery_is_stable_while_the_node_mounts_and_unmounts() {
    // Pods starting and stopping mount all the time; confined lookups (openat2 with
    // RESOLVE_IN_ROOT) fail with EAGAIN when a mount races them, and must be retried.
    let tree = machines::gpu_8x8();
    let expected = inventory_of(&tree).nics.len();
    let target = tempfile::tempdir().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let stop = std::sync::Arc::clone(&stop);
        let target = target.path().to_path_buf();
        std::thread::spawn(move || {
            let mut mounts = 0_u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                nix::mount::mount(
                    Some("tmpfs"),
                    &target,
                    Some("tmpfs"),
                    nix::mount::MsFlags::empty(),
                    None::<&str>,
                )
                .unwrap();
                nix::mount::umount(&target).unwrap();
                mounts += 1;
            }
            mounts
        })
    };
    for round in 0..30 {
        assert_eq!(inventory_of(&tree).nics.len(), expected, "scan {round}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mounts = churn.join().unwrap();
    assert!(mounts > 30, "the mounts really raced the scans ({mounts})");
}

/// The inventory watch rescans on netlink events (debounced) and on its resync timer only.
#[tokio::test]
async fn without_events_only_the_resync_timer_rescans() {
    let tree = machines::sriov();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let quiet = knd::publish::watch::spawn(
        tree.host(),
        knd::publish::watch::Scope::default(),
        knd::publish::watch::Pacing::default(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let periodic = knd::publish::watch::spawn(
        tree.host(),
        knd::publish::watch::Scope::default(),
        knd::publish::watch::Pacing {
            debounce: std::time::Duration::from_millis(10),
            resync: std::time::Duration::from_millis(100),
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    assert_eq!(quiet.inventory.borrow().nics.len(), 4);
    tokio::time::sleep(std::time::Duration::from_millis(550)).await;
    shutdown.cancel();
    // Every scan after the first was caused by a netlink event (another test may change
    // this namespace's links), never by a timer.
    assert!(
        quiet.scans() - 1 <= quiet.events(),
        "{} scans, {} events",
        quiet.scans(),
        quiet.events()
    );
    assert!(periodic.scans() >= 4, "{} scans", periodic.scans());
    quiet.join().await;
    periodic.join().await;
}
