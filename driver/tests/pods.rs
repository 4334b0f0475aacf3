//! knd's NRI hooks on real namespaces: a pod sandbox gets the NIC of the claim prepared for it,
//! gives it back when it stops, a failed attachment fails the pod's containers with the claim
//! named, and a restarted driver finishes the job from its state store.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::Arc,
};

use knd::{
    attach,
    nri::{plugin::Hooks as _, pods::HookError, proto::nri as api},
};
use knd_testkit::{TestHost, pods::Node};

fn without_index(mut side: knd::model::records::HostSide) -> knd::model::records::HostSide {
    side.link.index = 0;
    side
}

fn container() -> api::Container {
    api::Container {
        name: "main".into(),
        ..api::Container::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn a_pod_gets_its_claimed_nic_and_gives_it_back_even_after_a_restart() {
    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    node.prepare(
        "c1",
        "enp1",
        r#""interface":{"name":"net1","addresses":["10.9.0.2/24"]}"#,
    );
    let before = attach::record(node.host.netns(), "enp1").await.unwrap();

    let hooks = node.hooks();
    hooks.run_pod_sandbox(node.sandbox()).await.unwrap();
    let inside = attach::record(node.pod.netns(), "net1").await.unwrap();
    assert_eq!(inside.nets(), ["10.9.0.2/24".parse().unwrap()]);
    assert!(attach::record(node.host.netns(), "enp1").await.is_err());
    // Again (a retried hook): nothing changes.
    hooks.run_pod_sandbox(node.sandbox()).await.unwrap();
    let adjust = hooks
        .create_container(node.sandbox(), container())
        .await
        .unwrap();
    assert!(adjust.linux.is_none(), "no RDMA devices to add");
    let reports = node.claims.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].0.name, "claim-c1");
    let network = reports[0].1[0].network.clone().unwrap();
    assert_eq!(network.interface_name.as_deref(), Some("net1"));
    assert_eq!(network.ips, Some(vec!["10.9.0.2/24".to_owned()]));
    assert!(reports[0].1[0].ready);

    // The driver restarts: the new hooks know from the store where enp1 went.
    drop(hooks);
    let restarted = node.hooks();
    restarted
        .stop_pod_sandbox(api::PodSandbox {
            linux: None,
            ..node.sandbox()
        })
        .await
        .unwrap();
    let after = attach::record(node.host.netns(), "enp1").await.unwrap();
    assert_eq!(without_index(after), without_index(before.clone()));
    assert!(attach::record(node.pod.netns(), "net1").await.is_err());
    restarted.remove_pod_sandbox(node.sandbox()).await.unwrap();
    assert!(
        node.store.pods.get("pod-1").unwrap().is_none(),
        "forgotten after removal"
    );
    // Stop and remove again: nothing to do, no error.
    restarted.stop_pod_sandbox(node.sandbox()).await.unwrap();
    restarted.remove_pod_sandbox(node.sandbox()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn a_failed_attachment_fails_the_pod_and_its_containers_naming_the_claim() {
    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    node.prepare("c1", "enp1", r#""interface":{"name":"net1"}"#);
    node.prepare(
        "c2",
        "enp2",
        r#""interface":{"name":"net2","addresses":["10.8.0.2/24"]},"routes":[{"destination":"10.99.0.0/16","gateway":"172.31.0.1"}]"#,
    );
    let before: Vec<_> = host_sides(&node, &["enp1", "enp2"]).await;
    let hooks = node.hooks();
    let error = hooks.run_pod_sandbox(node.sandbox()).await.unwrap_err();
    assert!(
        matches!(&error, HookError::Attach { claim, .. } if claim == "claim ml/claim-c2"),
        "{error:?}"
    );
    // The runtime is told the claim, the interface and the step.
    let error = knd::model::error_chain(&error);
    assert!(error.contains("claim ml/claim-c2"), "{error}");
    assert!(
        error.contains("interface enp2: add route to 10.99.0.0/16"),
        "{error}"
    );
    // Everything given back, including the NIC of the claim that had worked.
    assert_eq!(host_sides(&node, &["enp1", "enp2"]).await, before);
    assert!(attach::record(node.pod.netns(), "net1").await.is_err());
    let refused = hooks
        .create_container(node.sandbox(), container())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("claim ml/claim-c1") && refused.contains("not attached"),
        "{refused}"
    );
    assert!(node.claims.reports().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn a_pod_started_while_knd_was_away_is_refused_then_attached_at_synchronize() {
    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    node.prepare("c1", "enp1", r#""interface":{"name":"net1"}"#);
    let hooks = node.hooks();
    let refused = hooks
        .create_container(node.sandbox(), container())
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("knd was not connected"), "{refused}");
    hooks
        .synchronize(vec![node.sandbox()], Vec::new())
        .await
        .unwrap();
    assert!(attach::record(node.pod.netns(), "net1").await.is_ok());
    hooks
        .create_container(node.sandbox(), container())
        .await
        .unwrap();
    // The runtime's list no longer has the pod, but its namespace lives (a list can be
    // incomplete): the NIC stays where the pod uses it.
    let restarted = node.hooks();
    restarted.synchronize(Vec::new(), Vec::new()).await.unwrap();
    assert!(attach::record(node.pod.netns(), "net1").await.is_ok());
    assert_eq!(node.store.pods.all().unwrap().len(), 1);
    // The namespace dies while knd is away (the kernel hands the NIC back under a name of
    // its own, emulated): the next synchronize gives the NIC back as it was.
    let host = node.host.netns().try_clone().unwrap();
    node.pod
        .netlink(|link| async move {
            let index = link.index("net1").await?;
            link.move_renamed("net1", &host, &format!("dev{index}"))
                .await
        })
        .unwrap();
    drop(node.pod);
    restarted.synchronize(Vec::new(), Vec::new()).await.unwrap();
    assert!(attach::record(node.host.netns(), "enp1").await.is_ok());
    assert!(node.store.pods.all().unwrap().is_empty());
}

/// One pod record that cannot be read (a crash mid-write on a filesystem without atomic
/// rename, a hand edit) is moved aside, logged and counted; it does not fail Synchronize, and
/// the other records are dealt with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn an_unreadable_pod_record_is_moved_aside_and_the_others_synchronized() {
    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    node.prepare("c1", "enp1", r#""interface":{"name":"net1"}"#);
    let telemetry = Arc::new(knd::observe::metrics::Telemetry::new(None, 10));
    let hooks = node.hooks().with_telemetry(Arc::clone(&telemetry));
    let pods = node.dir.path().join("pods");
    std::fs::write(pods.join("pod-broken.json"), b"{\"podUid\": tr").unwrap();
    hooks
        .synchronize(vec![node.sandbox()], Vec::new())
        .await
        .unwrap();
    assert!(
        attach::record(node.pod.netns(), "net1").await.is_ok(),
        "the live pod attached"
    );
    assert!(!pods.join("pod-broken.json").exists());
    assert!(pods.join("quarantine/pod-broken.json").exists());
    assert_eq!(telemetry.quarantined_records.get(), 1);
    let scrape = knd::observe::metrics::encode(&telemetry.registry());
    assert!(
        scrape.contains("knd_quarantined_pod_records_total 1"),
        "{scrape}"
    );
    // The next synchronize has nothing left to trip on.
    hooks
        .synchronize(vec![node.sandbox()], Vec::new())
        .await
        .unwrap();
    assert_eq!(telemetry.quarantined_records.get(), 1);
    hooks.stop_pod_sandbox(node.sandbox()).await.unwrap();
}

async fn host_sides(node: &Node, names: &[&str]) -> Vec<knd::model::records::HostSide> {
    let mut sides = Vec::new();
    for name in names {
        sides.push(without_index(
            attach::record(node.host.netns(), name).await.unwrap(),
        ));
    }
    sides
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn an_attachment_interrupted_by_a_crash_is_undone_and_redone() {
    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    node.prepare("c1", "enp1", r#""interface":{"name":"net1","mtu":1400}"#);
    let before = attach::record(node.host.netns(), "enp1").await.unwrap();
    // What a driver killed right after the move leaves: the NIC in the pod, the record saying
    // it was about to move.
    let claim = node.store.claims.get("c1").unwrap().unwrap();
    attach::attach(
        node.host.netns(),
        node.pod.netns(),
        &before,
        "net1",
        &claim.devices[0].config,
    )
    .await
    .unwrap();
    let sandbox = node.sandbox();
    let netns = sandbox.linux.as_ref().unwrap().namespaces[0].path.clone();
    let record = knd::model::records::PodRecord {
        pod_uid: "pod-1".into(),
        pod: "ml/trainer-0".into(),
        netns: netns.into(),
        netns_id: None,
        attachments: vec![knd::model::records::AttachmentRecord {
            claim_uid: "c1".into(),
            claim_namespace: "ml".into(),
            claim_name: "claim-c1".into(),
            pool: "node-1".into(),
            device: "enp1".into(),
            host: before.clone(),
            pod_name: "net1".into(),
            returned: false,
            share: None,
            pod: None,
        }],
        failure: None,
        detached: false,
    };
    node.store.pods.put("pod-1", &record).unwrap();

    let restarted = node.hooks();
    restarted.run_pod_sandbox(node.sandbox()).await.unwrap();
    let inside = attach::record(node.pod.netns(), "net1").await.unwrap();
    assert_eq!(inside.link.mtu, 1400);
    let stored = node.store.pods.get("pod-1").unwrap().unwrap();
    assert!(stored.attachments[0].pod.is_some(), "{stored:?}");
    restarted.stop_pod_sandbox(node.sandbox()).await.unwrap();
    let after = attach::record(node.host.netns(), "enp1").await.unwrap();
    assert_eq!(without_index(after), without_index(before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn a_corrupt_record_of_another_claim_does_not_stop_the_pod() {
    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    node.prepare("c1", "enp1", r#""interface":{"name":"net1"}"#);
    let claims_dir = node.dir.path().join("claims");
    std::fs::write(claims_dir.join("broken.json"), b"{ not json").unwrap();
    let hooks = node.hooks();
    hooks.run_pod_sandbox(node.sandbox()).await.unwrap();
    hooks
        .create_container(node.sandbox(), container())
        .await
        .unwrap();
    assert!(attach::record(node.pod.netns(), "net1").await.is_ok());
    hooks.stop_pod_sandbox(node.sandbox()).await.unwrap();
}

/// Attack 5: a new sandbox of the same pod (same UID; after a reboot, or re-created while knd
/// was away) must not inherit the old record: knd takes the NIC back from the old namespace
/// and attaches it to the new one, instead of believing it attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn a_new_sandbox_of_the_same_pod_gets_the_nic_not_the_old_record() {
    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    node.prepare("c1", "enp1", r#""interface":{"name":"net1"}"#);
    let hooks = node.hooks();
    hooks.run_pod_sandbox(node.sandbox()).await.unwrap();
    assert!(attach::record(node.pod.netns(), "net1").await.is_ok());

    let second = tokio::task::spawn_blocking(|| TestHost::new("pod-again").unwrap())
        .await
        .unwrap();
    let mut sandbox = node.sandbox();
    sandbox.id = "sandbox-2".into();
    sandbox.linux.as_mut().unwrap().namespaces[0].path =
        format!("/proc/self/fd/{}", second.netns().as_fd().as_raw_fd());
    hooks.run_pod_sandbox(sandbox.clone()).await.unwrap();
    let inside = attach::record(second.netns(), "net1").await;
    assert!(inside.is_ok(), "the new sandbox has no NIC: {inside:?}");
    assert!(
        attach::record(node.pod.netns(), "net1").await.is_err(),
        "the old sandbox kept the NIC"
    );
    hooks.remove_pod_sandbox(sandbox).await.unwrap();
    assert!(attach::record(node.host.netns(), "enp1").await.is_ok());
}

/// `rdma.mode: shared` (the default): the RDMA device stays in the host namespace and every
/// container of the pod gets its verbs device and `rdma_cm` as character devices; a claim whose
/// NIC has no RDMA device adds none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn shared_rdma_gives_every_container_the_claimed_nics_verbs_devices() {
    use knd::discover::inventory::rdma::{CharDevice, RdmaDevice};

    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    let char_device = |path: &str, minor: u32| CharDevice {
        path: path.into(),
        major: 231,
        minor,
    };
    node.inventory.send_modify(|inventory| {
        let inventory = Arc::make_mut(inventory);
        inventory.nics[0].rdma = vec![RdmaDevice {
            name: "mlx5_3".into(),
            uverbs: Some(char_device("/dev/infiniband/uverbs3", 195)),
            ..RdmaDevice::default()
        }];
        inventory.rdma_cm = Some(CharDevice {
            path: "/dev/infiniband/rdma_cm".into(),
            major: 10,
            minor: 58,
        });
    });
    node.prepare(
        "c1",
        "enp1",
        r#""interface":{"name":"net1"},"rdma":{"mode":"shared"}"#,
    );
    let hooks = node.hooks();
    hooks.run_pod_sandbox(node.sandbox()).await.unwrap();
    let adjust = hooks
        .create_container(node.sandbox(), container())
        .await
        .unwrap();
    let devices: Vec<(String, i64, i64)> = adjust
        .linux
        .unwrap()
        .devices
        .into_iter()
        .map(|d| (d.path, d.major, d.minor))
        .collect();
    assert_eq!(
        devices,
        [
            ("/dev/infiniband/uverbs3".to_owned(), 231, 195),
            ("/dev/infiniband/rdma_cm".to_owned(), 10, 58)
        ]
    );
    hooks.stop_pod_sandbox(node.sandbox()).await.unwrap();
}

/// `nccl: {env: true}`: every container of the pod gets NCCL's variables for the claimed NIC —
/// its name in the pod, its RDMA port, the GID index of the pod's address read from the port's
/// GID table — and the topology file bind-mounted read-only, except what the container sets
/// itself; the file goes with the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn a_claim_asking_for_nccl_gets_its_variables_and_topology_file() {
    use knd::{
        attach::nccl::TOPOLOGY_PATH,
        discover::inventory::rdma::{RdmaDevice, RdmaPort},
        nri::pods::NcclFiles,
    };

    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    node.inventory.send_modify(|inventory| {
        Arc::make_mut(inventory).nics[0].rdma = vec![RdmaDevice {
            name: "mlx5_3".into(),
            ports: vec![RdmaPort {
                number: 1,
                link_layer: Some("Ethernet".into()),
                ..RdmaPort::default()
            }],
            ..RdmaDevice::default()
        }];
    });
    // The port's GID table once the pod's address is on the interface: v1 and v2 of the
    // link-local address, then of 10.9.0.2 (IPv4-mapped), then free entries.
    let sysfs = knd_testkit::sysfs::SysfsTree::new();
    let port = "/sys/class/infiniband/mlx5_3/ports/1";
    for (index, gid, kind) in [
        (
            0,
            "fe80:0000:0000:0000:0000:00ff:fe00:0001",
            Some("IB/RoCE v1"),
        ),
        (
            1,
            "fe80:0000:0000:0000:0000:00ff:fe00:0001",
            Some("RoCE v2"),
        ),
        (
            2,
            "0000:0000:0000:0000:0000:ffff:0a09:0002",
            Some("IB/RoCE v1"),
        ),
        (
            3,
            "0000:0000:0000:0000:0000:ffff:0a09:0002",
            Some("RoCE v2"),
        ),
        (4, "0000:0000:0000:0000:0000:0000:0000:0000", None),
    ] {
        sysfs.file(&format!("{port}/gids/{index}"), gid);
        if let Some(kind) = kind {
            sysfs.file(&format!("{port}/gid_attrs/types/{index}"), kind);
        }
    }
    node.prepare(
        "c1",
        "enp1",
        r#""interface":{"name":"net1","addresses":["10.9.0.2/24"]},"nccl":{"env":true}"#,
    );
    let files = tempfile::tempdir().unwrap();
    let hooks = node.hooks().with_nccl(NcclFiles {
        host: sysfs.host(),
        dir: files.path().join("nccl"),
        runtime_dir: "/var/lib/knd/nccl".into(),
    });
    hooks.run_pod_sandbox(node.sandbox()).await.unwrap();
    let mut own = container();
    own.env = vec!["PATH=/bin".into(), "NCCL_IB_HCA=mlx5_9".into()];
    let adjust = hooks.create_container(node.sandbox(), own).await.unwrap();
    let env: Vec<(String, String)> = adjust
        .env
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect();
    assert_eq!(
        env,
        [
            ("NCCL_SOCKET_IFNAME".to_owned(), "=net1".to_owned()),
            ("NCCL_IB_GID_INDEX".to_owned(), "3".to_owned()),
            ("NCCL_TOPO_FILE".to_owned(), TOPOLOGY_PATH.to_owned()),
        ],
        "the container's own NCCL_IB_HCA is left alone"
    );
    assert_eq!(adjust.mounts.len(), 1);
    let mount = &adjust.mounts[0];
    assert_eq!(mount.destination, TOPOLOGY_PATH);
    assert_eq!(mount.source, "/var/lib/knd/nccl/pod-1/topo.xml");
    assert!(mount.options.contains(&"ro".to_owned()), "{mount:?}");
    let written = files.path().join("nccl/pod-1/topo.xml");
    let xml = std::fs::read_to_string(&written).unwrap();
    assert!(
        xml.starts_with("<system version=\"1\" name=\"ml/trainer-0\">"),
        "{xml}"
    );
    // The stand-in NIC is a veth: no PCI function to place (tests/nccl.rs checks the tree).
    assert!(!xml.contains("<pci"), "{xml}");

    // A container that sets NCCL_TOPO_FILE itself gets no mount.
    let mut own = container();
    own.env = vec!["NCCL_TOPO_FILE=/mine.xml".into()];
    let adjust = hooks.create_container(node.sandbox(), own).await.unwrap();
    assert!(adjust.mounts.is_empty());
    assert!(adjust.env.iter().all(|kv| kv.key != "NCCL_TOPO_FILE"));

    hooks.remove_pod_sandbox(node.sandbox()).await.unwrap();
    assert!(!written.exists(), "the file goes with the pod");
}

/// Without `nccl.env` the containers get no variables and no mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces"]
async fn a_claim_without_nccl_gets_no_variables() {
    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    node.prepare("c1", "enp1", r#""interface":{"name":"net1"}"#);
    let hooks = node.hooks();
    hooks.run_pod_sandbox(node.sandbox()).await.unwrap();
    let adjust = hooks
        .create_container(node.sandbox(), container())
        .await
        .unwrap();
    assert!(
        adjust.env.is_empty() && adjust.mounts.is_empty(),
        "{adjust:?}"
    );
    hooks.stop_pod_sandbox(node.sandbox()).await.unwrap();
}

/// A share of a shared NIC: a macvlan child made in the pod (the NIC stays on the node exactly
/// as it was), the claim status names the share, the policer holds it to its bandwidth and
/// counts what it dropped, and release deletes the child and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces and loads eBPF programs"]
async fn a_share_is_made_in_the_pod_held_to_its_bandwidth_and_deleted_at_release() {
    use knd::{model::records::PreparedShare, observe::metrics::Telemetry};
    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    let share_id = "6b0f6f63-3c8e-4f5b-9a43-0d1e2f3a4b5c";
    node.prepare_with(
        "c1",
        "enp1",
        r#""interface":{"name":"net1","addresses":["192.168.50.40/24"],"mtu":1400},
           "neighbors":[{"destination":"192.168.50.99","hardwareAddr":"02:00:00:00:00:99"}]"#,
        Some(PreparedShare {
            id: share_id.into(),
            bandwidth: 10_000_000, // 10 Mbit/s
        }),
    );
    let before = attach::record(node.host.netns(), "enp1").await.unwrap();
    let cgroup = knd::observe::telemetry::default_cgroup_root();
    let telemetry = Arc::new(Telemetry::new(cgroup.as_deref(), 10));
    let hooks = node.hooks().with_telemetry(Arc::clone(&telemetry));
    hooks.run_pod_sandbox(node.sandbox()).await.unwrap();

    // The child is in the pod, configured; the NIC never left the node, and is as it was.
    let inside = attach::record(node.pod.netns(), "net1").await.unwrap();
    assert_eq!(inside.nets(), ["192.168.50.40/24".parse().unwrap()]);
    assert_eq!(inside.link.mtu, 1400);
    assert_eq!(
        attach::record(node.host.netns(), "enp1").await.unwrap(),
        before
    );
    let links = node
        .pod
        .netlink(|link| async move { link.links().await })
        .unwrap();
    let child = links.iter().find(|l| l.name == "net1").unwrap();
    assert_eq!(child.kind.as_deref(), Some("macvlan"), "{child:?}");
    let parent = child.peer.expect("a macvlan has a parent");
    assert_eq!(parent.index, before.link.index, "a child of enp1");
    assert!(
        parent.netnsid.is_some(),
        "whose parent is in another namespace"
    );
    let reports = node.claims.reports();
    assert_eq!(reports[0].1[0].share_id.as_deref(), Some(share_id));
    assert!(reports[0].1[0].ready);

    // 2 MB of UDP at once: the 512 kB bucket passes a quarter, the policer drops the rest.
    node.pod
        .run(|| {
            let socket = std::net::UdpSocket::bind("192.168.50.40:0").unwrap();
            for _ in 0..1_500 {
                socket.send_to(&[0x5a; 1_300], "192.168.50.99:9").unwrap();
            }
        })
        .unwrap();
    let text = loop {
        let text = knd::observe::metrics::encode(&telemetry.registry());
        if text.contains("knd_claim_policed_packets_total") {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let dropped: u64 = text
        .lines()
        .find(|l| {
            l.starts_with("knd_claim_policed_packets_total{")
                && l.contains("direction=\"tx\"")
                && l.contains("claim=\"claim-c1\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    let sent: u64 = text
        .lines()
        .find(|l| l.starts_with("knd_claim_tx_packets_total{") && l.contains("claim=\"claim-c1\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        dropped > 1_000 && sent < 500,
        "sent {sent}, policed {dropped}: {text}"
    );

    // Release: the child goes, the NIC stays as it was.
    hooks.stop_pod_sandbox(node.sandbox()).await.unwrap();
    assert!(attach::record(node.pod.netns(), "net1").await.is_err());
    assert_eq!(
        attach::record(node.host.netns(), "enp1").await.unwrap(),
        before
    );
    hooks.remove_pod_sandbox(node.sandbox()).await.unwrap();
}

/// A crash between making a share and recording where it is in the pod: the restarted driver
/// still finds the child under its intended name, checks it is a child of the claimed NIC, and
/// deletes it at release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: creates network namespaces and loads eBPF programs"]
async fn a_share_whose_place_was_never_recorded_is_still_found_and_deleted() {
    use knd::{model::records::PreparedShare, observe::metrics::Telemetry};
    let node = tokio::task::spawn_blocking(Node::create).await.unwrap();
    node.prepare_with(
        "c1",
        "enp1",
        r#""interface":{"name":"net1","addresses":["192.168.50.41/24"]}"#,
        Some(PreparedShare {
            id: "7b0f6f63-3c8e-4f5b-9a43-0d1e2f3a4b5c".into(),
            bandwidth: 100_000_000,
        }),
    );
    let before = attach::record(node.host.netns(), "enp1").await.unwrap();
    let telemetry = Arc::new(Telemetry::new(None, 10));
    let hooks = node.hooks().with_telemetry(Arc::clone(&telemetry));
    hooks.run_pod_sandbox(node.sandbox()).await.unwrap();
    assert!(attach::record(node.pod.netns(), "net1").await.is_ok());
    // As if knd died before recording the pod side.
    let mut record = node.store.pods.get("pod-1").unwrap().unwrap();
    record.attachments[0].pod = None;
    node.store.pods.put("pod-1", &record).unwrap();
    drop(hooks);
    let restarted = node.hooks();
    restarted.stop_pod_sandbox(node.sandbox()).await.unwrap();
    assert!(
        attach::record(node.pod.netns(), "net1").await.is_err(),
        "deleted"
    );
    assert_eq!(
        attach::record(node.host.netns(), "enp1").await.unwrap(),
        before
    );
}
