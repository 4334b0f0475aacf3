//! GPU–NIC alignment at prepare time on a fixture topology (shared PCIe switches): for claims
//! holding a GPU of another driver and one of knd's NICs, the class recorded for the claim
//! (PIX, PXB, NODE, SYS), the `knd_claim_gpu_nic_distance` series, and under
//! `--alignment-policy=enforce` the error naming the GPU, the NIC and their class.

use std::sync::Arc;

use knd::{
    discover::inventory::{Inventory, discover},
    dra::{
        alignment::{Alignment, Policy},
        prepare::{NodeDevices, Preparer},
    },
    model::ports::ClaimRef,
    observe::metrics::{Telemetry, encode},
    os::state::StateStore,
    publish::resources::PCI_BUS_ID,
};
use knd_testkit::{
    claims::{CONFIG_HEAD, MemoryClaims},
    device_named, machines,
};
use tokio::sync::watch;

const GPU_DRIVER: &str = "gpu.nvidia.com";

fn device_of(inventory: &Inventory, interface: &str) -> String {
    device_named(inventory, interface).unwrap_or_else(|| panic!("no NIC {interface}"))
}

/// Claim `name` holding GPU `gpu-0` of the GPU driver and our `device`, with `parameters`.
fn claim(name: &str, device: &str, parameters: &str) -> serde_json::Value {
    let parameters: serde_json::Value =
        serde_json::from_str(&format!("{{{CONFIG_HEAD}{parameters}}}")).unwrap();
    serde_json::json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": "ml", "uid": format!("uid-{name}")},
        "spec": {"devices": {"requests": [
            {"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com"}},
            {"name": "nic", "exactly": {"deviceClassName": "knd-nic"}}
        ]}},
        "status": {"allocation": {"devices": {
            "results": [
                {"request": "gpu", "driver": GPU_DRIVER, "pool": "node-1", "device": "gpu-0"},
                {"request": "nic", "driver": "knd.dev", "pool": "node-1", "device": device}
            ],
            "config": [{"source": "FromClaim", "requests": ["nic"],
                        "opaque": {"driver": "knd.dev", "parameters": parameters}}]
        }}}
    })
}

fn reference(name: &str) -> ClaimRef {
    ClaimRef {
        namespace: "ml".into(),
        uid: format!("uid-{name}"),
        name: name.into(),
    }
}

struct Setup {
    dir: tempfile::TempDir,
    claims: MemoryClaims,
    telemetry: Arc<Telemetry>,
    preparer: Preparer<MemoryClaims>,
    inventory: Inventory,
}

fn setup(policy: Policy) -> Setup {
    let tree = machines::shared_switch();
    let inventory = discover(&tree.host());
    let claims = MemoryClaims::default();
    // The GPU driver publishes its GPU at switch A's first GPU.
    claims.publish(GPU_DRIVER, "node-1", "gpu-0", PCI_BUS_ID, "0000:13:00.0");
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(StateStore::open(dir.path()).unwrap());
    let telemetry = Arc::new(Telemetry::new(None, 10));
    // A receiver keeps the last inventory after its sender is gone.
    let (_, receiver) = watch::channel(Arc::new(inventory.clone()));
    let node = NodeDevices {
        pool: "node-1".into(),
        inventory: receiver.clone(),
        shared: None,
    };
    let preparer =
        Preparer::new("knd.dev", node, store, claims.clone()).with_alignment(Alignment {
            policy,
            inventory: receiver,
            distances: telemetry.gpu_nic_distance.clone(),
        });
    Setup {
        dir,
        claims,
        telemetry,
        preparer,
        inventory,
    }
}

#[tokio::test]
async fn each_distance_class_is_recorded_with_its_metric() {
    let s = setup(Policy::Warn);
    let cases = [
        ("pix", "ens1f0", "PIX", true),
        ("pxb", "ens2", "PXB", true),
        ("node", "ens4", "NODE", false),
        ("sys", "ens5f0", "SYS", false),
    ];
    for (name, interface, _, _) in cases {
        s.claims
            .add(claim(name, &device_of(&s.inventory, interface), ""));
    }
    let refs: Vec<ClaimRef> = cases.iter().map(|(n, ..)| reference(n)).collect();
    let answers = s.preparer.prepare(&refs).await.unwrap();
    let registry = s.telemetry.registry();
    let text = encode(&registry);
    for (name, interface, class, aligned) in cases {
        assert!(answers[&format!("uid-{name}")].is_ok(), "{answers:?}");
        let device = device_of(&s.inventory, interface);
        let record = StateStore::open(s.dir.path())
            .unwrap()
            .claims
            .get(&format!("uid-{name}"))
            .unwrap()
            .unwrap();
        let finding = record.devices[0].topology.clone().expect("a finding");
        assert_eq!(
            (
                finding.gpu.as_str(),
                finding.class.as_str(),
                finding.aligned()
            ),
            ("0000:13:00.0", class, aligned),
            "{name}"
        );
        let rank = ["PIX", "PXB", "PHB", "NODE", "SYS"]
            .iter()
            .position(|c| *c == class)
            .unwrap();
        let series = format!(
            "knd_claim_gpu_nic_distance{{namespace=\"ml\",claim=\"{name}\",device=\"{device}\",gpu=\"0000:13:00.0\",class=\"{class}\"}} {rank}\n"
        );
        assert!(text.contains(&series), "{series} missing in:\n{text}");
    }
    // Released claims lose their series.
    s.preparer.unprepare(&refs).await.unwrap();
    let text = encode(&registry);
    assert!(!text.contains("knd_claim_gpu_nic_distance{"), "{text}");
}

#[tokio::test]
async fn enforce_refuses_a_misaligned_claim_naming_gpu_nic_and_class() {
    let s = setup(Policy::Enforce);
    let sys = device_of(&s.inventory, "ens5f0");
    let pix = device_of(&s.inventory, "ens1f0");
    let phb = device_of(&s.inventory, "ens3");
    s.claims.add(claim("far", &sys, ""));
    s.claims.add(claim("near", &pix, ""));
    // The claim's own requirement: PHB is acceptable for this one.
    s.claims
        .add(claim("relaxed", &phb, r#","topology":{"require":"PHB"}"#));
    let answers = s
        .preparer
        .prepare(&[reference("far"), reference("near"), reference("relaxed")])
        .await
        .unwrap();
    assert_eq!(
        answers["uid-far"].as_ref().unwrap_err(),
        &format!(
            "claim ml/far: NIC {sys} and GPU 0000:13:00.0 are SYS apart (required: PXB or \
             better); --alignment-policy=enforce refuses it"
        )
    );
    assert!(answers["uid-near"].is_ok(), "{answers:?}");
    assert!(answers["uid-relaxed"].is_ok(), "{answers:?}");
}

#[tokio::test]
async fn ignore_and_claims_without_gpus_record_nothing() {
    let s = setup(Policy::Ignore);
    let sys = device_of(&s.inventory, "ens5f0");
    s.claims.add(claim("far", &sys, ""));
    let answers = s.preparer.prepare(&[reference("far")]).await.unwrap();
    assert!(answers["uid-far"].is_ok());
    let text = encode(&s.telemetry.registry());
    assert!(!text.contains("knd_claim_gpu_nic_distance{"), "{text}");

    // A GPU driver that publishes no PCI address: nothing to compare, no error even under
    // enforce.
    let s = setup(Policy::Enforce);
    let mut unknown = claim("unknown", &sys, "");
    unknown["status"]["allocation"]["devices"]["results"][0]["device"] = "gpu-7".into();
    s.claims.add(unknown);
    let answers = s.preparer.prepare(&[reference("unknown")]).await.unwrap();
    assert!(answers["uid-unknown"].is_ok(), "{answers:?}");
}

#[tokio::test]
async fn a_gpu_in_another_claim_of_the_pod_counts() {
    let s = setup(Policy::Enforce);
    let sys = device_of(&s.inventory, "ens5f0");
    let pix = device_of(&s.inventory, "ens1f0");
    // The pod's GPU claim (the GPU driver's own), and two NIC-only claims for the same pod.
    s.claims.add(serde_json::json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": "gpu", "namespace": "ml", "uid": "uid-gpu"},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com"}}]}},
        "status": {"allocation": {"devices": {"results": [
            {"request": "gpu", "driver": GPU_DRIVER, "pool": "node-1", "device": "gpu-0"}
        ]}}, "reservedFor": [{"resource": "pods", "name": "trainer", "uid": "pod-1"}]}
    }));
    for (name, device) in [("near", &pix), ("far", &sys)] {
        let mut nic_only = claim(name, device, "");
        let results = &mut nic_only["status"]["allocation"]["devices"]["results"];
        *results = serde_json::json!([results[1].clone()]);
        nic_only["status"]["reservedFor"] =
            serde_json::json!([{"resource": "pods", "name": "trainer", "uid": "pod-1"}]);
        s.claims.add(nic_only);
    }
    let answers = s
        .preparer
        .prepare(&[reference("near"), reference("far")])
        .await
        .unwrap();
    assert!(answers["uid-near"].is_ok(), "{answers:?}");
    assert!(
        answers["uid-far"]
            .as_ref()
            .unwrap_err()
            .contains("and GPU 0000:13:00.0 are SYS apart"),
        "{answers:?}"
    );
}
