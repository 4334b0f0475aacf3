//! The Kubernetes API side, through kube-rs and a kubeconfig, against the in-process fake API
//! server: first that the fake enforces the real API's rules (a fake that accepts anything
//! would test nothing), then slice publishing and claim status.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use knd::{
    discover::inventory::{self, Inventory},
    dra::prepare::Preparer,
    k8s::{self, ApiClaims, Publisher, StatusOutcome},
    model::ports::{ClaimApi as _, ClaimRef, DeviceReport},
    os::state::StateStore,
    publish::resources,
};
use knd_testkit::{
    apiserver::{FakeApi, Release},
    claims::{CONFIG_HEAD, allocated_claim, node_devices},
    inventory_of, machines,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn api_status(result: Result<impl std::fmt::Debug, kube::Error>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn slice_json(devices: &serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": {"name": "n1-knd.dev-0"},
        "spec": {"driver": "knd.dev", "nodeName": "n1",
                 "pool": {"name": "n1", "generation": 1, "resourceSliceCount": 1},
                 "devices": devices}
    })
}

/// Creating a slice with each case's devices is refused with 422, the message naming the case's
/// expected text.
async fn refused_as_invalid(slices: &Api<ResourceSlice>, cases: &[(serde_json::Value, &str)]) {
    for (devices, expected) in cases {
        let (code, message) =
            api_status(slices.create(&PostParams::default(), &slice(devices)).await);
        assert_eq!(code, 422, "{devices}: {message}");
        assert!(message.contains(expected), "{devices}: {message}");
    }
}

fn slice(devices: &serde_json::Value) -> ResourceSlice {
    serde_json::from_value(slice_json(devices)).unwrap()
}

fn virtual_nics(count: usize) -> Inventory {
    inventory_of((0..count).map(|i| format!("vnic{i}")))
}

#[tokio::test]
async fn the_fake_api_enforces_resource_slice_validation() {
    let fake = FakeApi::start().await.unwrap();
    let slices: Api<ResourceSlice> = Api::all(fake.client().await.unwrap());
    let pp = PostParams::default();
    let many: Vec<_> = (0..129).map(|i| json!({"name": format!("d{i}")})).collect();
    let long = "x".repeat(65);
    let cases = [
        (json!(many), "spec.devices: Too many: 129"),
        (json!([{"name": "Eth0"}]), "spec.devices[0].name"),
        (
            json!([{"name": "a"}, {"name": "a"}]),
            "Duplicate value: \"a\"",
        ),
        (
            json!([{"name": "a", "attributes": {"knd.dev/if-name": {"string": "x"}}}]),
            "C identifier",
        ),
        (
            json!([{"name": "a", "attributes": {"Bad_Domain/x": {"string": "x"}}}]),
            "DNS subdomain",
        ),
        (
            json!([{"name": "a", "attributes": {"x": {"string": long}}}]),
            "Too long: may not be more than 64",
        ),
        (
            json!([{"name": "a", "attributes": {"x": {"string": "s", "int": 1}}}]),
            "exactly one value",
        ),
        (
            json!([{"name": "a", "attributes": {"x": {"version": "1.2"}}}]),
            "semver",
        ),
    ];
    refused_as_invalid(&slices, &cases).await;
    let attributes: serde_json::Map<_, _> = (0..33)
        .map(|i| (format!("a{i}"), json!({"int": i})))
        .collect();
    let (code, message) = api_status(
        slices
            .create(
                &pp,
                &slice(&json!([{"name": "a", "attributes": attributes}])),
            )
            .await,
    );
    assert_eq!(
        (code, message.contains("Too many: 33")),
        (422, true),
        "{message}"
    );
    let mut two_selections = slice(&json!([]));
    two_selections.spec.all_nodes = Some(true);
    let (code, message) = api_status(slices.create(&pp, &two_selections).await);
    assert_eq!(
        (code, message.contains("exactly one of")),
        (422, true),
        "{message}"
    );
    assert!(fake.slices().is_empty(), "nothing invalid was stored");

    // Updates: resourceVersion required and current, nodeName immutable.
    let created = slices
        .create(&pp, &slice(&json!([{"name": "a"}])))
        .await
        .unwrap();
    let mut stale = created.clone();
    slices.replace("n1-knd.dev-0", &pp, &created).await.unwrap();
    stale.spec.devices = Some(Vec::new());
    let (code, message) = api_status(slices.replace("n1-knd.dev-0", &pp, &stale).await);
    assert_eq!(
        (code, message.contains("has been modified")),
        (409, true),
        "{message}"
    );
    let mut current = slices.get("n1-knd.dev-0").await.unwrap();
    current.spec.node_name = Some("n2".into());
    let (code, message) = api_status(slices.replace("n1-knd.dev-0", &pp, &current).await);
    assert_eq!(
        (code, message.contains("immutable")),
        (422, true),
        "{message}"
    );
    current.spec.node_name = Some("n1".into());
    current.metadata.resource_version = None;
    let (code, message) = api_status(slices.replace("n1-knd.dev-0", &pp, &current).await);
    assert_eq!(
        (code, message.contains("must be specified")),
        (422, true),
        "{message}"
    );
    let (code, _) = api_status(slices.create(&pp, &slice(&json!([]))).await);
    assert_eq!(code, 409, "a second create of the same name");
}

#[tokio::test]
async fn the_fake_api_validates_device_taints_as_1_36_does() {
    let fake = FakeApi::start().await.unwrap();
    let slices: Api<ResourceSlice> = Api::all(fake.client().await.unwrap());
    let cases = [
        // Device taints (KEP-5055, 1.36): 64 devices when any is tainted, at most 16 taints,
        // keys that are label names, values that are label values, known effects.
        (
            json!(
                (0..65)
                    .map(|i| json!({"name": format!("d{i}"),
                    "taints": [{"key": "knd.dev/unhealthy", "effect": "NoSchedule"}]}))
                    .collect::<Vec<_>>()
            ),
            "spec.devices: Too many: 65: must have at most 64 items",
        ),
        (
            json!([{"name": "a", "taints": (0..17)
                .map(|i| json!({"key": format!("k{i}"), "effect": "NoSchedule"}))
                .collect::<Vec<_>>()}]),
            "spec.devices[0].taints: Too many: 17",
        ),
        (
            json!([{"name": "a", "taints": [{"key": "knd.dev/un healthy", "effect": "NoSchedule"}]}]),
            "spec.devices[0].taints[0].key",
        ),
        (
            json!([{"name": "a", "taints": [{"key": "knd.dev/unhealthy", "value": "link down",
                "effect": "NoSchedule"}]}]),
            "spec.devices[0].taints[0].value",
        ),
        (
            json!([{"name": "a", "taints": [{"key": "knd.dev/unhealthy", "effect": "PreferNoSchedule"}]}]),
            "spec.devices[0].taints[0].effect: Unsupported value: \"PreferNoSchedule\"",
        ),
    ];
    refused_as_invalid(&slices, &cases).await;
}

#[tokio::test]
async fn the_fake_api_requires_the_token() {
    let fake = FakeApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = fake.write_kubeconfig(dir.path()).unwrap();
    let wrong = std::fs::read_to_string(&path)
        .unwrap()
        .replace(knd_testkit::apiserver::TOKEN, "someone-else");
    std::fs::write(&path, wrong).unwrap();
    let stranger: Api<ResourceSlice> = Api::all(k8s::client(Some(&path)).await.unwrap());
    assert_eq!(
        api_status(stranger.list(&kube::api::ListParams::default()).await).0,
        401
    );
}

fn apply(devices: &serde_json::Value, uid: &str) -> Patch<serde_json::Value> {
    Patch::Apply(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": "c1", "uid": uid}, "status": {"devices": devices}
    }))
}

/// A `status.devices` entry for our device with a Ready condition, plus `extra` fields.
fn ready(device: &str, extra: &serde_json::Value) -> serde_json::Value {
    let mut entry = json!({"driver": "knd.dev", "pool": "node-1", "device": device,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Attached",
                        "message": "", "lastTransitionTime": "2026-11-23T10:00:00Z"}]});
    entry
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    entry
}

/// A fake API with claim `ml/c1` (UID `uid-1`) and a client for its claims.
async fn fake_with_claim() -> (FakeApi, Api<ResourceClaim>) {
    let fake = FakeApi::start().await.unwrap();
    fake.put_claim(allocated_claim(
        "c1",
        "uid-1",
        &format!("{{{CONFIG_HEAD}}}"),
    ));
    let claims = Api::namespaced(fake.client().await.unwrap(), "ml");
    (fake, claims)
}

#[tokio::test]
async fn the_fake_api_enforces_the_claim_status_rules() {
    let (fake, claims) = fake_with_claim().await;
    // knd's identity has the shipped ClusterRole: it reads claims one by one, nothing more.
    let (code, message) = api_status(claims.list(&kube::api::ListParams::default()).await);
    assert_eq!(code, 403, "{message}");
    assert!(
        message.contains("cannot list resource \"resourceclaims\""),
        "{message}"
    );
    let (code, _) = api_status(
        claims
            .delete("c1", &kube::api::DeleteParams::default())
            .await,
    );
    assert_eq!(code, 403);
    let knd = PatchParams::apply("knd.dev");
    let good = ready(
        "pci-0000-b4-00-0",
        &json!({"networkData": {"interfaceName": "net1", "ips": ["10.0.0.2/24"]}}),
    );
    let cases = [
        (
            ready("pci-0000-99-00-0", &json!({})),
            422,
            "must be an allocated device",
        ),
        (
            ready(
                "pci-0000-b4-00-0",
                &json!({"networkData": {"ips": ["10.0.0.300/24"]}}),
            ),
            422,
            "CIDR",
        ),
        (
            ready(
                "pci-0000-b4-00-0",
                &json!({"networkData": {"ips": ["10.0.0.2"]}}),
            ),
            422,
            "CIDR",
        ),
        (
            json!({"driver": "knd.dev", "pool": "node-1", "device": "pci-0000-b4-00-0",
                   "conditions": [{"type": "Ready", "status": "Yes", "reason": "not valid!",
                                   "message": "", "lastTransitionTime": "2026-11-23T10:00:00Z"}]}),
            422,
            "supported values",
        ),
    ];
    for (entry, code, expected) in cases {
        let (actual, message) = api_status(
            claims
                .patch_status("c1", &knd, &apply(&json!([entry]), "uid-1"))
                .await,
        );
        assert_eq!(actual, code, "{message}");
        assert!(message.contains(expected), "{message}");
    }
    let (code, message) = api_status(
        claims
            .patch_status("c1", &knd, &apply(&json!([good.clone()]), "uid-old"))
            .await,
    );
    assert_eq!(
        (code, message.contains("UID in precondition")),
        (409, true),
        "{message}"
    );
    let merge = Patch::Merge(json!({"status": {"devices": []}}));
    assert_eq!(
        api_status(claims.patch_status("c1", &knd, &merge).await).0,
        415
    );
    assert!(
        fake.claim("ml", "c1")
            .unwrap()
            .status
            .unwrap()
            .devices
            .is_none(),
        "nothing written"
    );
}

#[tokio::test]
async fn server_side_apply_keeps_other_managers_entries() {
    let (fake, claims) = fake_with_claim().await;
    let knd = PatchParams::apply("knd.dev");
    let good = ready(
        "pci-0000-b4-00-0",
        &json!({"networkData": {"interfaceName": "net1", "ips": ["10.0.0.2/24"]}}),
    );
    // Apply ownership: another manager's entry survives ours being withdrawn.
    let gpu = json!({"driver": "gpu.nvidia.com", "pool": "node-1", "device": "gpu-5",
        "conditions": [{"type": "Ready", "status": "True", "reason": "Ok", "message": "",
                        "lastTransitionTime": "2026-11-23T10:00:00Z"}]});
    // knd may not write another driver's entries (1.36: resourceclaims/driver is granted
    // for knd.dev only); that driver may, with its own identity.
    let (code, message) = api_status(
        claims
            .patch_status(
                "c1",
                &PatchParams::apply("gpu.nvidia.com"),
                &apply(&json!([gpu]), "uid-1"),
            )
            .await,
    );
    assert_eq!(code, 403, "{message}");
    assert!(message.contains("\"gpu.nvidia.com\""), "{message}");
    let gpu_driver: Api<ResourceClaim> = Api::namespaced(fake.admin_client().await.unwrap(), "ml");
    gpu_driver
        .patch_status(
            "c1",
            &PatchParams::apply("gpu.nvidia.com"),
            &apply(&json!([gpu]), "uid-1"),
        )
        .await
        .unwrap();
    claims
        .patch_status("c1", &knd, &apply(&json!([good]), "uid-1"))
        .await
        .unwrap();
    let devices = |fake: &FakeApi| -> Vec<String> {
        fake.claim("ml", "c1")
            .unwrap()
            .status
            .unwrap()
            .devices
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.device)
            .collect()
    };
    assert_eq!(devices(&fake), ["gpu-5", "pci-0000-b4-00-0"]);
    let (code, message) = api_status(
        claims
            .patch_status(
                "c1",
                &PatchParams::apply("intruder"),
                &apply(&json!([ready("pci-0000-b4-00-0", &json!({}))]), "uid-1"),
            )
            .await,
    );
    assert_eq!(
        (code, message.contains("conflict with \"knd.dev\"")),
        (409, true),
        "{message}"
    );
    claims
        .patch_status("c1", &knd, &apply(&json!([]), "uid-1"))
        .await
        .unwrap();
    assert_eq!(devices(&fake), ["gpu-5"]);
}

#[tokio::test]
async fn the_pool_is_published_owned_by_the_node_and_kept_in_step() {
    let fake = FakeApi::start().await.unwrap();
    let node_uid = fake.add_node("gpu-node-1");
    let mut publisher = Publisher::new(fake.client().await.unwrap(), "knd.dev", "gpu-node-1");
    let tree = machines::gpu_8x8();
    let inventory = inventory::discover(&tree.host());
    assert_eq!(inventory.nics.len(), 8);

    let first = publisher.publish(&inventory).await.unwrap();
    assert_eq!((first.generation, first.slices, first.created), (1, 1, 1));
    let stored = fake.slices();
    assert_eq!(stored.len(), 1);
    let slice = &stored[0];
    assert_eq!(slice.spec.devices.as_ref().unwrap().len(), 8);
    assert_eq!(slice.spec.node_name.as_deref(), Some("gpu-node-1"));
    let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Node", node_uid.as_str())
    );

    // Nothing changed: nothing written.
    let writes = fake.writes();
    let again = publisher.publish(&inventory).await.unwrap();
    assert_eq!(
        (
            again.generation,
            again.created + again.updated + again.deleted
        ),
        (1, 0)
    );
    assert_eq!(fake.writes(), writes);

    // A device goes: the same slice, the next generation.
    let mut fewer = inventory.clone();
    fewer.nics.pop();
    let second = publisher.publish(&fewer).await.unwrap();
    assert_eq!((second.generation, second.updated), (2, 1));
    assert_eq!(fake.slices()[0].spec.devices.as_ref().unwrap().len(), 7);

    // 200 devices need two slices, each carrying the pool's slice count.
    let third = publisher.publish(&virtual_nics(200)).await.unwrap();
    assert_eq!(
        (third.generation, third.slices, third.created, third.updated),
        (3, 2, 1, 1)
    );
    let stored = fake.slices();
    assert!(
        stored
            .iter()
            .all(|s| s.spec.pool.generation == 3 && s.spec.pool.resource_slice_count == 2)
    );
    let total: usize = stored
        .iter()
        .map(|s| s.spec.devices.as_ref().unwrap().len())
        .sum();
    assert_eq!(total, 200);

    // Back to one slice: the stale one is deleted.
    let fourth = publisher.publish(&fewer).await.unwrap();
    assert_eq!((fourth.generation, fourth.deleted), (4, 1));
    assert_eq!(fake.slices().len(), 1);

    // Someone deletes the slice: the next publication restores it under a new generation.
    assert!(fake.remove_slice("gpu-node-1-knd.dev-0"));
    let repaired = publisher.publish(&fewer).await.unwrap();
    assert_eq!(
        (repaired.created, repaired.generation),
        (1, 5),
        "generations never go back"
    );
    assert_eq!(fake.slices().len(), 1);

    // Another node's and another driver's slices are not ours to touch.
    let other = Publisher::new(fake.client().await.unwrap(), "knd.dev", "other-node")
        .publish(&virtual_nics(1))
        .await;
    assert!(
        matches!(other, Err(k8s::Error::NodeNotFound(ref n)) if n == "other-node"),
        "{other:?}"
    );
    assert_eq!(fake.slices().len(), 1);
}

/// A pci.ids name of 62 characters but 69 bytes (UTF-8): the API server counts bytes, so if knd
/// cut at 64 characters the whole slice — every device of the node — would be rejected.
const LONG_NON_ASCII_NAME: &str = "Contrôleur Ethernet « ConnectX-7 » à 2 ports 400 Gb/s — réseau";

#[tokio::test]
async fn a_non_ascii_pci_name_over_64_bytes_is_cut_and_the_slice_accepted() {
    let fake = FakeApi::start().await.unwrap();
    fake.add_node("gpu-node-1");
    let tree = machines::gpu_8x8();
    tree.file(
        "/usr/share/misc/pci.ids",
        &format!("15b3  Mellanox Technologies\n\t1021  {LONG_NON_ASCII_NAME}\n"),
    );
    let inventory = inventory::discover(&tree.host());

    // The fake counts bytes like the real API server: the name as it is gets refused.
    let mut uncut = resources::slices(&inventory, "knd.dev", "gpu-node-1", 1, None);
    let devices = uncut[0].spec.devices.as_mut().unwrap();
    let attribute = devices[0]
        .attributes
        .as_mut()
        .unwrap()
        .get_mut("knd.dev/pciDevice")
        .unwrap();
    assert!(LONG_NON_ASCII_NAME.starts_with(attribute.string.as_deref().unwrap()));
    attribute.string = Some(LONG_NON_ASCII_NAME.to_owned());
    let slices: Api<ResourceSlice> = Api::all(fake.client().await.unwrap());
    let (code, message) = api_status(slices.create(&PostParams::default(), &uncut[0]).await);
    assert_eq!(code, 422, "{message}");
    assert!(
        message.contains("string: Too long: may not be more than 64 bytes"),
        "{message}"
    );

    // knd's own publication cuts on a character boundary and the node's pool is accepted.
    let mut publisher = Publisher::new(fake.client().await.unwrap(), "knd.dev", "gpu-node-1");
    publisher.publish(&inventory).await.unwrap();
    let stored = fake.slices();
    let devices = stored[0].spec.devices.as_ref().unwrap();
    assert_eq!(devices.len(), 8);
    for device in devices {
        let name = device.attributes.as_ref().unwrap()["knd.dev/pciDevice"]
            .string
            .clone()
            .unwrap();
        assert_eq!(
            name,
            "Contrôleur Ethernet « ConnectX-7 » à 2 ports 400 Gb/s — r"
        );
        assert!(name.len() <= 64 && LONG_NON_ASCII_NAME.starts_with(&name));
    }
}

#[tokio::test]
async fn publishing_reports_api_failures_and_succeeds_on_retry() {
    let fake = FakeApi::start().await.unwrap();
    fake.add_node("n1");
    let mut publisher = Publisher::new(fake.client().await.unwrap(), "knd.dev", "n1");
    fake.fail_next(&[500]);
    let err = publisher.publish(&virtual_nics(3)).await.unwrap_err();
    assert_eq!(err.status(), Some(500), "{err}");
    let ok = publisher.publish(&virtual_nics(3)).await.unwrap();
    assert_eq!((ok.generation, ok.devices), (1, 3));
    // Every slice the publisher writes passes the fake's validation, whatever the inventory.
    for tree in [
        machines::shared_switch(),
        machines::hyperv(),
        machines::sriov(),
        machines::bonded(),
    ] {
        publisher
            .publish(&inventory::discover(&tree.host()))
            .await
            .unwrap();
    }
}

/// The claims port of the daemon over `fake`, never shut down.
async fn api_claims(fake: &FakeApi) -> ApiClaims {
    ApiClaims::new(
        fake.client().await.unwrap(),
        "knd.dev",
        CancellationToken::new(),
    )
}

fn claim_ref(name: &str, uid: &str) -> ClaimRef {
    ClaimRef {
        namespace: "ml".into(),
        uid: uid.into(),
        name: name.into(),
    }
}

#[tokio::test]
async fn claim_status_is_applied_with_retries_until_written_or_gone() {
    let fake = FakeApi::start().await.unwrap();
    let shutdown = CancellationToken::new();
    let claims = ApiClaims::new(fake.client().await.unwrap(), "knd.dev", shutdown.clone());
    fake.put_claim(allocated_claim(
        "c1",
        "uid-1",
        &format!("{{{CONFIG_HEAD}}}"),
    ));
    let report = vec![DeviceReport {
        pool: "node-1".into(),
        device: "pci-0000-b4-00-0".into(),
        ready: true,
        reason: "Attached".into(),
        message: "net1 is up in the pod".into(),
        network: Some(k8s_openapi::api::resource::v1::NetworkDeviceData {
            interface_name: Some("net1".into()),
            ips: Some(vec!["10.1.0.5/24".into(), "fd00::5/64".into()]),
            hardware_address: Some("02:00:00:00:00:05".into()),
        }),
        topology: Some(knd::model::distance::Finding {
            gpu: "0000:13:00.0".into(),
            class: knd::model::distance::Distance::Node,
            required: knd::model::distance::Distance::Pxb,
        }),
        share_id: None,
    }];
    fake.fail_next(&[503, 500, 429]);
    let outcome = claims
        .write_status(&claim_ref("c1", "uid-1"), &report)
        .await;
    assert_eq!(outcome, StatusOutcome::Written);
    let devices = fake
        .claim("ml", "c1")
        .unwrap()
        .status
        .unwrap()
        .devices
        .unwrap();
    assert_eq!(devices.len(), 1);
    let network = devices[0].network_data.as_ref().unwrap();
    assert_eq!(network.interface_name.as_deref(), Some("net1"));
    assert_eq!(network.ips.as_ref().unwrap().len(), 2);
    let condition = &devices[0].conditions.as_ref().unwrap()[0];
    assert_eq!(
        (condition.type_.as_str(), condition.status.as_str()),
        ("Ready", "True")
    );
    let aligned = &devices[0].conditions.as_ref().unwrap()[1];
    assert_eq!(
        (
            aligned.type_.as_str(),
            aligned.status.as_str(),
            aligned.reason.as_str()
        ),
        ("TopologyAligned", "False", "NODE")
    );
    assert_eq!(
        aligned.message,
        "NIC pci-0000-b4-00-0 and GPU 0000:13:00.0 are NODE apart (required: PXB or better)"
    );

    // A claim recreated under the same name is not ours; a deleted claim is gone.
    fake.put_claim(allocated_claim(
        "c1",
        "uid-2",
        &format!("{{{CONFIG_HEAD}}}"),
    ));
    assert_eq!(
        claims
            .write_status(&claim_ref("c1", "uid-1"), &report)
            .await,
        StatusOutcome::Gone
    );
    fake.delete_claim("ml", "c1");
    assert_eq!(
        claims
            .write_status(&claim_ref("c1", "uid-2"), &report)
            .await,
        StatusOutcome::Gone
    );

    // Invalid content is not retried forever.
    fake.put_claim(allocated_claim(
        "c1",
        "uid-3",
        &format!("{{{CONFIG_HEAD}}}"),
    ));
    let mut bad = report.clone();
    bad[0].network.as_mut().unwrap().ips = Some(vec!["not-an-ip".into()]);
    assert_eq!(
        claims.write_status(&claim_ref("c1", "uid-3"), &bad).await,
        StatusOutcome::Rejected
    );

    // Shutdown ends a write that keeps failing.
    fake.fail_next(&[503; 50]);
    let writer = claims.clone();
    let pending = tokio::spawn(async move {
        writer
            .write_status(&claim_ref("c1", "uid-3"), &report)
            .await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    shutdown.cancel();
    assert_eq!(pending.await.unwrap(), StatusOutcome::Cancelled);
}

/// `allocated_claim` as the scheduler allocates it on `node`.
fn claim_on(node: &str, name: &str, uid: &str) -> serde_json::Value {
    let mut claim = allocated_claim(name, uid, &format!("{{{CONFIG_HEAD}}}"));
    claim["status"]["allocation"]["nodeSelector"] = knd_testkit::claims::allocated_on(node);
    claim
}

/// Claim `c1` as prepared: one NIC, default configuration, `topology` its GPU finding.
fn prepared_record(
    topology: Option<knd::model::distance::Finding>,
) -> knd::model::records::PreparedClaim {
    knd::model::records::PreparedClaim {
        uid: "uid-1".into(),
        namespace: "ml".into(),
        name: "c1".into(),
        pod_uids: vec!["pod-uid-1".into()],
        devices: vec![knd::model::records::PreparedDevice {
            requests: vec!["nic".into()],
            pool: "node-1".into(),
            device: "pci-0000-b4-00-0".into(),
            config: knd::model::config::default_config(),
            topology,
            share: None,
        }],
    }
}

fn attached_report() -> Vec<DeviceReport> {
    vec![DeviceReport {
        pool: "node-1".into(),
        device: "pci-0000-b4-00-0".into(),
        ready: true,
        reason: "Attached".into(),
        message: "net1 is up in the pod".into(),
        network: None,
        topology: None,
        share_id: None,
    }]
}

/// Since 1.36 the API server lets a node's driver write the status of claims allocated on its
/// node only (`resourceclaims/driver`, `associated-node:patch`): knd on another node gets a
/// 403, which it does not retry; it logs and leaves a Warning Event on the claim. A 1.34 API
/// server has no such check (the shipped admission policy stands in for it, tested in
/// tests/deploy.rs).
#[tokio::test]
async fn a_status_write_the_api_server_forbids_is_given_up_with_a_warning() {
    let fake = FakeApi::start().await.unwrap();
    fake.put_claim(claim_on("node-2", "c1", "uid-1"));
    let shutdown = CancellationToken::new();
    let here = ApiClaims::new(fake.client().await.unwrap(), "knd.dev", shutdown.clone());
    let status_patches = || {
        fake.requests()
            .iter()
            .filter(|r| r.method == "PATCH" && r.path.contains("/resourceclaims/c1/status"))
            .count()
    };
    let outcome = tokio::time::timeout(
        Duration::from_secs(5),
        here.write_status(&claim_ref("c1", "uid-1"), &attached_report()),
    )
    .await
    .expect("a 403 is final");
    assert_eq!(outcome, StatusOutcome::Forbidden);
    assert_eq!(status_patches(), 1, "not retried");
    let claim = fake.claim("ml", "c1").unwrap();
    assert!(claim.status.unwrap().devices.is_none(), "nothing written");
    let event = fake
        .events()
        .into_iter()
        .find(|e| e.reason.as_deref() == Some("StatusNotWritten"))
        .expect("a Warning Event on the claim");
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let note = event.note.unwrap();
    assert!(
        note.contains("403") && note.contains("resourceclaims/driver"),
        "{note}"
    );
    assert_eq!(event.regarding.unwrap().name.as_deref(), Some("c1"));

    // The knd of the claim's node may.
    let there = ApiClaims::new(fake.client_on("node-2").await.unwrap(), "knd.dev", shutdown);
    assert_eq!(
        there
            .write_status(&claim_ref("c1", "uid-1"), &attached_report())
            .await,
        StatusOutcome::Written
    );
    // A 1.34 API server asks only for resourceclaims/status.
    fake.put_claim(claim_on("node-2", "c2", "uid-2"));
    fake.set_release(Release::V1_34);
    assert_eq!(
        here.write_status(&claim_ref("c2", "uid-2"), &attached_report())
            .await,
        StatusOutcome::Written
    );
}

/// Each claim has one status writer and the latest report wins: a "Prepared" whose write
/// failed and waits to be retried never lands after the "Attached" that followed it.
#[tokio::test]
async fn a_late_prepared_status_never_overwrites_attached() {
    let fake = FakeApi::start().await.unwrap();
    fake.put_claim(claim_on("node-1", "c1", "uid-1"));
    let claims = api_claims(&fake).await;
    let prepared = prepared_record(None);
    // The first write ("Prepared") fails and is retried after a backoff; "Attached" comes
    // meanwhile.
    fake.fail_next(&[503]);
    claims.prepared(&prepared);
    while fake.requests().iter().all(|r| !r.path.contains("/status")) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    claims.attached(&claim_ref("c1", "uid-1"), attached_report());
    claims.flushed().await;
    let devices = fake
        .claim("ml", "c1")
        .unwrap()
        .status
        .unwrap()
        .devices
        .unwrap();
    let ready = &devices[0].conditions.as_ref().unwrap()[0];
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Attached")
    );
    // And release, the latest, removes the entries.
    claims.released(&claim_ref("c1", "uid-1"));
    claims.flushed().await;
    let status = fake.claim("ml", "c1").unwrap().status.unwrap();
    assert!(status.devices.is_none(), "{status:?}");
}

/// Shutdown waits for the background work of the claims port: an Event and a status write
/// handed over just before are in the API when `drained` returns.
#[tokio::test]
async fn shutdown_drains_the_events_and_status_writes_in_flight() {
    let fake = FakeApi::start().await.unwrap();
    fake.put_claim(claim_on("node-1", "c1", "uid-1"));
    let claims = api_claims(&fake).await;
    claims.warn(
        &claim_ref("c1", "uid-1"),
        "ReleaseRefused",
        "pod ml/p: not ours",
    );
    claims.attached(&claim_ref("c1", "uid-1"), attached_report());
    claims.drained().await;
    let events = fake.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].reason.as_deref(), Some("ReleaseRefused"));
    let status = fake.claim("ml", "c1").unwrap().status.unwrap();
    assert!(
        status.devices.is_some(),
        "the status write finished: {status:?}"
    );
}

#[tokio::test]
async fn prepare_reads_the_claim_from_the_api_and_reports_it_prepared() {
    let fake = FakeApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(StateStore::open(dir.path()).unwrap());
    let claims = api_claims(&fake).await;
    let own = format!(
        r#"{{{CONFIG_HEAD},"interface":{{"name":"net1","addresses":["10.9.0.2/24"],"hardwareAddr":"02:aa:00:00:00:01"}}}}"#
    );
    fake.put_claim(allocated_claim("c1", "uid-1", &own));
    assert!(claims.get("ml", "missing").await.unwrap().is_none());
    let preparer = Preparer::new(
        "knd.dev",
        node_devices("node-1", &machines::gpu_8x8()),
        store,
        claims,
    );
    let answers = preparer.prepare(&[claim_ref("c1", "uid-1")]).await.unwrap();
    assert_eq!(
        answers["uid-1"].as_ref().unwrap()[0].device,
        "pci-0000-b4-00-0"
    );

    let status = wait_for_devices(&fake, 1).await;
    let entry = &status[0];
    assert_eq!(
        (entry.driver.as_str(), entry.device.as_str()),
        ("knd.dev", "pci-0000-b4-00-0")
    );
    let condition = &entry.conditions.as_ref().unwrap()[0];
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "Prepared")
    );
    let network = entry.network_data.as_ref().unwrap();
    assert_eq!(network.interface_name.as_deref(), Some("net1"));
    assert_eq!(
        network.ips.as_deref(),
        Some(&["10.9.0.2/24".to_owned()][..])
    );
    assert_eq!(
        network.hardware_address.as_deref(),
        Some("02:aa:00:00:00:01")
    );

    preparer
        .unprepare(&[claim_ref("c1", "uid-1")])
        .await
        .unwrap();
    wait_for_devices(&fake, 0).await;
}

async fn wait_for_devices(
    fake: &FakeApi,
    count: usize,
) -> Vec<k8s_openapi::api::resource::v1::AllocatedDeviceStatus> {
    for _ in 0..200 {
        let devices = fake
            .claim("ml", "c1")
            .and_then(|c| c.status)
            .and_then(|s| s.devices)
            .unwrap_or_default();
        if devices.len() == count {
            return devices;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the claim status never had {count} device entries");
}

/// A pool with one unhealthy device: slices of 64 (the API's limit once any device carries a
/// taint), the taint with its cause and time stored; untainted, back to slices of 128.
#[tokio::test]
async fn a_tainted_pool_is_cut_into_slices_the_api_accepts() {
    use knd::model::ports::{Cause, Taint};
    let fake = FakeApi::start().await.unwrap();
    fake.add_node("n1");
    let mut publisher = Publisher::new(fake.client().await.unwrap(), "knd.dev", "n1");
    let inventory = virtual_nics(100);
    let taints = [(
        "vnic7".to_owned(),
        Taint {
            cause: Cause::Flapping,
            since_unix_seconds: 1_790_000_000,
        },
    )]
    .into();
    let first = publisher
        .publish_tainted(&inventory, &taints)
        .await
        .unwrap();
    assert_eq!((first.slices, first.taints_kept), (2, true));
    let stored = fake.slices();
    let sizes: Vec<usize> = stored
        .iter()
        .map(|s| s.spec.devices.as_ref().unwrap().len())
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 100);
    assert!(sizes.iter().all(|n| *n <= 64), "{sizes:?}");
    let tainted: Vec<_> = stored
        .iter()
        .flat_map(|s| s.spec.devices.iter().flatten())
        .filter_map(|d| Some((d.name.clone(), d.taints.clone()?)))
        .collect();
    assert_eq!(tainted.len(), 1, "{tainted:?}");
    let (name, taints_of) = &tainted[0];
    assert_eq!(name, "vnic7");
    let taint = &taints_of[0];
    assert_eq!(
        (
            taint.key.as_str(),
            taint.value.as_deref(),
            taint.effect.as_str()
        ),
        ("knd.dev/unhealthy", Some("flapping"), "NoSchedule")
    );
    assert_eq!(
        taint.time_added.as_ref().map(|t| t.0.as_second()),
        Some(1_790_000_000)
    );
    let healthy = publisher
        .publish_tainted(&inventory, &std::collections::BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(healthy.slices, 1);
    assert!(
        fake.slices()
            .iter()
            .flat_map(|s| s.spec.devices.iter().flatten())
            .all(|d| d.taints.is_none())
    );
}

#[test]
fn slices_of_a_large_pool_stay_within_the_api_limits() {
    let slices = resources::slices(&virtual_nics(300), "knd.dev", "n", 1, None);
    assert_eq!(slices.len(), 3);
    assert!(
        slices
            .iter()
            .all(|s| s.spec.devices.as_ref().unwrap().len() <= 128)
    );
}

#[tokio::test]
async fn other_drivers_devices_are_read_from_their_slices() {
    let fake = FakeApi::start().await.unwrap();
    let client = fake.client().await.unwrap();
    let slices: Api<ResourceSlice> = Api::all(client.clone());
    let gpu_slice: ResourceSlice = serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": {"name": "n1-gpu.nvidia.com-0"},
        "spec": {"driver": "gpu.nvidia.com", "nodeName": "n1",
                 "pool": {"name": "n1", "generation": 1, "resourceSliceCount": 1},
                 "devices": [
                     {"name": "gpu-0", "attributes": {
                         "resource.kubernetes.io/pciBusID": {"string": "0000:13:00.0"},
                         "productName": {"string": "H100"}}},
                     {"name": "gpu-1", "attributes": {
                         "resource.kubernetes.io/pciBusID": {"string": "0000:93:00.0"}}}
                 ]}
    }))
    .unwrap();
    slices
        .create(&PostParams::default(), &gpu_slice)
        .await
        .unwrap();
    slices
        .create(&PostParams::default(), &slice(&json!([{"name": "gpu-0"}])))
        .await
        .unwrap();
    let claims = ApiClaims::new(client, "knd.dev", CancellationToken::new());
    let read = |device: &'static str, attribute: &'static str| {
        let claims = claims.clone();
        async move {
            claims
                .device_attribute("gpu.nvidia.com", "n1", device, attribute)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        read("gpu-1", "resource.kubernetes.io/pciBusID")
            .await
            .as_deref(),
        Some("0000:93:00.0")
    );
    // Unqualified names are the driver's own domain.
    assert_eq!(
        read("gpu-0", "gpu.nvidia.com/productName").await.as_deref(),
        Some("H100")
    );
    assert_eq!(read("gpu-9", "resource.kubernetes.io/pciBusID").await, None);
    // knd's own slice has a device of the same name: only the asked driver's slices count.
    assert_eq!(
        claims
            .device_attribute("knd.dev", "n1", "gpu-0", "resource.kubernetes.io/pciBusID")
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn a_prepared_claim_with_a_gpu_gets_an_event_and_the_topology_condition() {
    let fake = FakeApi::start().await.unwrap();
    let claims = api_claims(&fake).await.with_instance("node-1");
    fake.put_claim(allocated_claim(
        "c1",
        "uid-1",
        &format!("{{{CONFIG_HEAD}}}"),
    ));
    let record = prepared_record(Some(knd::model::distance::Finding {
        gpu: "0000:93:00.0".into(),
        class: knd::model::distance::Distance::Sys,
        required: knd::model::distance::Distance::Pxb,
    }));
    claims.prepared(&record);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fake.events().is_empty()
        || fake
            .claim("ml", "c1")
            .unwrap()
            .status
            .unwrap()
            .devices
            .is_none()
    {
        assert!(std::time::Instant::now() < deadline, "no event or status");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let event = &fake.events()[0];
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.reason.as_deref(), Some("TopologyMisaligned"));
    assert_eq!(event.reporting_controller.as_deref(), Some("knd.dev"));
    assert_eq!(event.reporting_instance.as_deref(), Some("node-1"));
    assert_eq!(
        event.note.as_deref(),
        Some("NIC pci-0000-b4-00-0 and GPU 0000:93:00.0 are SYS apart (required: PXB or better)")
    );
    let regarding = event.regarding.as_ref().unwrap();
    assert_eq!(
        (
            regarding.kind.as_deref(),
            regarding.name.as_deref(),
            regarding.uid.as_deref()
        ),
        (Some("ResourceClaim"), Some("c1"), Some("uid-1"))
    );
    let devices = fake
        .claim("ml", "c1")
        .unwrap()
        .status
        .unwrap()
        .devices
        .unwrap();
    let conditions = devices[0].conditions.as_ref().unwrap();
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "TopologyAligned" && c.status == "False")
    );

    // The fake refuses what the API refuses.
    let bad: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
        "metadata": {"generateName": "c1."}, "type": "Loud", "reportingController": "knd.dev",
        "reportingInstance": "node-1", "action": "Prepare", "reason": "X",
        "regarding": {"kind": "ResourceClaim", "name": "c1"}
    }))
    .unwrap();
    let api: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(fake.client().await.unwrap(), "ml");
    let error = api.create(&PostParams::default(), &bad).await.unwrap_err();
    let message = error.to_string();
    assert!(message.contains("eventTime: Required value"), "{message}");
    assert!(message.contains("type: Unsupported value"), "{message}");
}

#[tokio::test]
async fn a_pods_claims_are_those_it_names_that_are_reserved_for_it() {
    let fake = FakeApi::start().await.unwrap();
    let claims = api_claims(&fake).await;
    // A pod's claims: those it names (its generated claim in status, a direct reference in its
    // spec) and that are reserved for it.
    fake.put_claim(allocated_claim(
        "c1",
        "uid-1",
        &format!("{{{CONFIG_HEAD}}}"),
    ));
    let mut other = allocated_claim("c2", "uid-2", &format!("{{{CONFIG_HEAD}}}"));
    other["status"]["reservedFor"][0]["uid"] = "pod-uid-9".into();
    fake.put_claim(other);
    fake.put_claim(allocated_claim(
        "c3",
        "uid-3",
        &format!("{{{CONFIG_HEAD}}}"),
    ));
    fake.put_pod(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "trainer-0", "namespace": "ml", "uid": "pod-uid-1"},
        "spec": {"containers": [{"name": "main", "image": "x"}],
                 "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "t"},
                                    {"name": "other", "resourceClaimName": "c2"}]},
        "status": {"resourceClaimStatuses": [{"name": "gpu", "resourceClaimName": "c1"}]}
    }));
    let uids = |claims: Vec<knd::model::claim::Claim>| -> Vec<String> {
        claims.into_iter().map(|c| c.uid).collect()
    };
    // c2 is named but reserved for another pod; c3 is reserved for it but not named.
    assert_eq!(
        uids(
            claims
                .pod_claims("ml", ("trainer-0", "pod-uid-1"))
                .await
                .unwrap()
        ),
        ["uid-1"]
    );
    // A pod of that name with another UID, or no such pod: nothing.
    assert!(
        claims
            .pod_claims("ml", ("trainer-0", "pod-uid-7"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        claims
            .pod_claims("ml", ("gone", "pod-uid-1"))
            .await
            .unwrap()
            .is_empty()
    );
}

/// A shared NIC's device and a share of it, as the API and the scheduler hold them
/// (consumable capacity, KEP-5075, 1.36).
#[tokio::test]
async fn the_fake_api_validates_consumable_capacity_and_refuses_an_oversized_share() {
    let fake = FakeApi::start().await.unwrap();
    let slices: Api<ResourceSlice> = Api::all(fake.client().await.unwrap());
    let shared = |policy: serde_json::Value| {
        json!([{"name": "nic0", "allowMultipleAllocations": true,
            "capacity": {"bandwidth": {"value": "10G", "requestPolicy": policy}}}])
    };
    let cases = [
        (
            shared(json!({"default": "1G", "validValues": ["1G"],
                "validRange": {"min": "10M"}})),
            "must not set more than one ValidRequestValues",
        ),
        (
            shared(json!({"default": "20G", "validRange": {"min": "10M", "max": "10G"}})),
            "requestPolicy.default: Invalid value: must be defined and fall within validRange",
        ),
        (
            shared(json!({"validRange": {"min": "10M"}})),
            "requestPolicy.default",
        ),
        (
            shared(json!({"default": "2G", "validValues": ["2G", "1G"]})),
            "must be sorted in ascending order",
        ),
        (
            shared(json!({"default": "1G", "validRange": {"min": "10M", "step": "0"}})),
            "step greater than zero",
        ),
        (
            json!([{"name": "nic0", "capacity": {"bandwidth": {"value": "ten"}}}]),
            "capacity[bandwidth].value: Invalid value: \"ten\"",
        ),
    ];
    refused_as_invalid(&slices, &cases).await;
    // What knd publishes for a shared NIC is accepted.
    let mut device: k8s_openapi::api::resource::v1::Device =
        serde_json::from_value(json!({"name": "nic0"})).unwrap();
    resources::make_shared(&mut device, 10_000_000_000);
    let published = serde_json::to_value(vec![device]).unwrap();
    slices
        .create(&PostParams::default(), &slice(&published))
        .await
        .unwrap();

    // Shares: 6G + 3G fit in 10G, another 2G does not.
    let share = |name: &str, id: &str, bandwidth: &str| {
        json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": "ml", "uid": format!("uid-{name}")},
            "spec": {},
            "status": {"allocation": {"devices": {"results": [{"request": "nic",
                "driver": "knd.dev", "pool": "n1", "device": "nic0", "shareID": id,
                "consumedCapacity": {"bandwidth": bandwidth}}]}}}})
    };
    fake.try_put_claim(share("a", "6b0f6f63-3c8e-4f5b-9a43-0d1e2f3a4b5c", "6G"))
        .unwrap();
    fake.try_put_claim(share("b", "7b0f6f63-3c8e-4f5b-9a43-0d1e2f3a4b5c", "3G"))
        .unwrap();
    let refused = fake
        .try_put_claim(share("c", "8b0f6f63-3c8e-4f5b-9a43-0d1e2f3a4b5c", "2G"))
        .unwrap_err();
    assert!(
        refused[0].contains("would bring device nic0 to 11000000000 of its 10000000000"),
        "{refused:?}"
    );
    let refused = fake
        .try_put_claim(share("d", "Not-A-UUID", "1G"))
        .unwrap_err();
    assert!(
        refused[0].contains("must be a lowercase UUID"),
        "{refused:?}"
    );
    // Re-storing a claim does not count its own share twice.
    fake.try_put_claim(share("a", "6b0f6f63-3c8e-4f5b-9a43-0d1e2f3a4b5c", "7G"))
        .unwrap();
}

/// `--shared-nics`: the NICs it selects are published shared, with their link speed as
/// bandwidth; an API server without consumable capacity (1.34) drops the sharing, and knd then
/// leaves those NICs out rather than let them be allocated whole.
#[tokio::test]
async fn shared_nics_are_published_with_bandwidth_and_withheld_from_servers_without_sharing() {
    let fake = FakeApi::start().await.unwrap();
    fake.add_node("gpu-node-1");
    let mut inventory = inventory_of(["eth1", "eth2"]);
    for nic in &mut inventory.nics {
        nic.netdev.as_mut().unwrap().speed_mbps = Some(100_000);
    }
    let selector = knd::publish::selector::Selector::compile(
        "device.attributes[\"knd.dev\"].ifName == \"eth1\"",
    )
    .unwrap();
    let mut publisher = Publisher::new(fake.client().await.unwrap(), "knd.dev", "gpu-node-1")
        .with_shared(Some(Arc::new(selector)));
    publisher.publish(&inventory).await.unwrap();
    let devices: Vec<_> = fake
        .slices()
        .into_iter()
        .flat_map(|s| s.spec.devices.unwrap_or_default())
        .collect();
    assert_eq!(devices.len(), 2);
    let eth1 = devices.iter().find(|d| d.name == "eth1").unwrap();
    assert_eq!(eth1.allow_multiple_allocations, Some(true));
    let bandwidth = &eth1.capacity.as_ref().unwrap()["bandwidth"];
    assert_eq!(bandwidth.value.0, "100G");
    let policy = bandwidth.request_policy.as_ref().unwrap();
    assert_eq!(policy.default.as_ref().unwrap().0, "1G");
    let range = policy.valid_range.as_ref().unwrap();
    assert_eq!(
        (
            range.min.0.as_str(),
            range.step.as_ref().unwrap().0.as_str()
        ),
        ("10M", "10M")
    );
    let eth2 = devices.iter().find(|d| d.name == "eth2").unwrap();
    assert_eq!(eth2.allow_multiple_allocations, None, "not selected");
    assert!(!publisher.shares_dropped());

    // A 1.34 server: the sharing is dropped, so the shared NIC is left out altogether.
    let old = FakeApi::start().await.unwrap();
    old.set_release(Release::V1_34);
    old.add_node("gpu-node-1");
    let selector = knd::publish::selector::Selector::compile(
        "device.attributes[\"knd.dev\"].ifName == \"eth1\"",
    )
    .unwrap();
    let mut publisher = Publisher::new(old.client().await.unwrap(), "knd.dev", "gpu-node-1")
        .with_shared(Some(Arc::new(selector)));
    publisher.publish(&inventory).await.unwrap();
    assert!(publisher.shares_dropped());
    let names: Vec<String> = old
        .slices()
        .into_iter()
        .flat_map(|s| s.spec.devices.unwrap_or_default())
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["eth2"]);
    // And it stays so, without rewrites.
    let writes = old.requests().iter().filter(|r| r.method != "GET").count();
    publisher.publish(&inventory).await.unwrap();
    assert_eq!(
        old.requests().iter().filter(|r| r.method != "GET").count(),
        writes
    );
}

/// On a node, other drivers' devices come from a watch of this node's ResourceSlices (kube's
/// reflector against the fake's watch): once the watch has listed them, GPU lookups make no
/// request of their own; a GPU slice published later reaches them through the watch, a deleted
/// one leaves; another node's slices are never in it.
#[tokio::test]
async fn gpu_lookups_read_the_watched_slices_of_this_node() {
    use knd_testkit::placement::{GPU_DRIVER, gpu_slice};
    let fake = FakeApi::start().await.unwrap();
    let gpus = inventory::discover(&machines::gpu_8x8().host());
    let address = gpus.gpus.iter().map(|g| g.address.clone()).min().unwrap();
    fake.create_slices(&[gpu_slice(&gpus, "node-2")]).unwrap();
    let shutdown = CancellationToken::new();
    let claims =
        ApiClaims::new(fake.client().await.unwrap(), "knd.dev", shutdown.clone()).on_node("node-1");
    tokio::time::timeout(Duration::from_secs(10), claims.node_slices_listed())
        .await
        .expect("the watch lists this node's slices");
    // Listed first, then watched from the list's version.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let watch = loop {
        if let Some(watch) = fake
            .requests()
            .into_iter()
            .find(|r| r.path.contains("watch=true"))
        {
            break watch;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            fake.requests()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        watch.path.contains("fieldSelector=spec.nodeName%3Dnode-1"),
        "{watch:?}"
    );
    let lookup = |pool: &'static str| {
        let claims = claims.clone();
        async move {
            claims
                .device_attribute(GPU_DRIVER, pool, "gpu-0", "resource.kubernetes.io/pciBusID")
                .await
                .unwrap()
        }
    };
    let requests = || fake.requests().len();

    // Not on this node yet: asked of the server, not found.
    let before = requests();
    assert_eq!(lookup("node-1").await, None);
    assert_eq!(requests(), before + 1, "a miss asks the server");

    // Published: once the watch brings it, lookups are served without a request.
    fake.create_slices(&[gpu_slice(&gpus, "node-1")]).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let before = requests();
        let found = lookup("node-1").await;
        if found.is_some() && requests() == before {
            assert_eq!(found, Some(address.clone()));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watch never brought it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = requests();
    for _ in 0..20 {
        assert_eq!(lookup("node-1").await, Some(address.clone()));
    }
    assert_eq!(requests(), before, "20 lookups, no request");

    // Another node's slices are neither watched nor listed (not GPUs next to this NIC): each
    // lookup there asks the server, for this node's slices, and finds nothing.
    let before = requests();
    assert_eq!(lookup("node-2").await, None);
    assert_eq!(lookup("node-2").await, None);
    assert_eq!(requests(), before + 2);

    // Deleted: the watch takes it away; lookups miss and ask again.
    assert!(fake.remove_slice("node-1-gpu.nvidia.com"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while lookup("node-1").await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deletion never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    claims.drained().await;
}
