//! Kubelet's side for DRA tests and benchmarks: an in-memory [`ClaimApi`], allocated claims
//! shaped as the API server returns them, and gRPC channels over the plugin's unix sockets.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::resource::v1::ResourceClaim;

use knd::{
    dra::prepare::NodeDevices,
    k8s::claim_from,
    model::{
        claim::Claim,
        link::{LinkSettings, OffloadSizes},
        ports::{ClaimApi, ClaimRef, DeviceReport, SourceError},
        records::{AttachmentRecord, HostSide, PodRecord, PodSide},
    },
};

type ClaimMap = HashMap<(String, String), ResourceClaim>;
type Reports = Vec<(ClaimRef, Vec<DeviceReport>)>;
/// Other drivers' published attributes: (driver, pool, device, attribute) → value.
type Attributes = HashMap<(String, String, String, String), String>;
/// Warnings told to claims' owners: (claim, reason, note).
type Warnings = Vec<(ClaimRef, String, String)>;

/// Claims by namespace and name, and the status reports they received, shared between clones.
#[derive(Debug, Clone, Default)]
pub struct MemoryClaims(
    Arc<Mutex<ClaimMap>>,
    Arc<Mutex<Reports>>,
    Arc<Mutex<Attributes>>,
    Arc<Mutex<Warnings>>,
);

impl MemoryClaims {
    /// Adds (or replaces) a claim given as API JSON.
    pub fn add(&self, claim: serde_json::Value) {
        let claim: ResourceClaim = serde_json::from_value(claim).expect("a ResourceClaim");
        let key = (
            claim.metadata.namespace.clone().unwrap_or_default(),
            claim.metadata.name.clone().unwrap_or_default(),
        );
        self.0.lock().expect("not poisoned").insert(key, claim);
    }

    /// Publishes a string attribute of another driver's device (as its ResourceSlice would).
    pub fn publish(&self, driver: &str, pool: &str, device: &str, attribute: &str, value: &str) {
        self.2.lock().expect("not poisoned").insert(
            (driver.into(), pool.into(), device.into(), attribute.into()),
            value.into(),
        );
    }

    /// Forgets every claim.
    pub fn clear(&self) {
        self.0.lock().expect("not poisoned").clear();
    }
}

impl MemoryClaims {
    /// The `attached` reports received so far.
    pub fn reports(&self) -> Reports {
        self.1.lock().expect("not poisoned").clone()
    }

    /// The warnings told so far: (claim, reason, note).
    pub fn warnings(&self) -> Warnings {
        self.3.lock().expect("not poisoned").clone()
    }
}

impl ClaimApi for MemoryClaims {
    fn warn(&self, claim: &ClaimRef, reason: &str, note: &str) {
        self.3.lock().expect("not poisoned").push((
            claim.clone(),
            reason.to_owned(),
            note.to_owned(),
        ));
    }

    fn attached(&self, claim: &ClaimRef, devices: Vec<DeviceReport>) {
        self.1
            .lock()
            .expect("not poisoned")
            .push((claim.clone(), devices));
    }

    async fn pod_claims(
        &self,
        namespace: &str,
        (_, pod_uid): (&str, &str),
    ) -> Result<Vec<Claim>, SourceError> {
        // Converted at the same edge as the daemon's claims (knd::k8s::claim_from).
        Ok(self
            .0
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, claim)| claim_from(claim))
            .filter(|c| c.is_reserved_for(pod_uid))
            .collect())
    }

    async fn device_attribute(
        &self,
        driver: &str,
        pool: &str,
        device: &str,
        attribute: &str,
    ) -> Result<Option<String>, SourceError> {
        Ok(self
            .2
            .lock()
            .expect("not poisoned")
            .get(&(driver.into(), pool.into(), device.into(), attribute.into()))
            .cloned())
    }

    async fn get(&self, namespace: &str, name: &str) -> Result<Option<Claim>, SourceError> {
        Ok(self
            .0
            .lock()
            .expect("not poisoned")
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(claim_from))
    }
}

/// The header every `NetworkConfig` needs.
pub const CONFIG_HEAD: &str = r#""apiVersion":"knd.dev/v1alpha1","kind":"NetworkConfig""#;

/// The node selector of an allocation on `node`, as the scheduler writes it for devices of a
/// node-local pool (the API server's node authorisation of status writes reads it).
pub fn allocated_on(node: &str) -> serde_json::Value {
    serde_json::json!({"nodeSelectorTerms": [{"matchFields": [
        {"key": "metadata.name", "operator": "In", "values": [node]}
    ]}]})
}

/// A claim in namespace `ml` allocated one of knd's NICs (request `nic`) and another driver's
/// GPU, with a class config (MTU 9000), `claim_parameters` as the claim's config for the NIC,
/// and another driver's config; allocated on node `node-1` and reserved for pod `pod-uid-1`.
pub fn allocated_claim(name: &str, uid: &str, claim_parameters: &str) -> serde_json::Value {
    let class: serde_json::Value =
        serde_json::from_str(&format!(r#"{{{CONFIG_HEAD},"interface":{{"mtu":9000}}}}"#))
            .expect("valid JSON");
    let own: serde_json::Value = serde_json::from_str(claim_parameters).expect("valid JSON");
    serde_json::json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": "ml", "uid": uid},
        "spec": {"devices": {"requests": [
            {"name": "nic", "exactly": {"deviceClassName": "knd-nic"}},
            {"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com"}}
        ]}},
        "status": {
            "allocation": {"nodeSelector": allocated_on("node-1"), "devices": {
                "results": [
                    {"request": "nic", "driver": "knd.dev", "pool": "node-1", "device": "pci-0000-b4-00-0"},
                    {"request": "gpu", "driver": "gpu.nvidia.com", "pool": "node-1", "device": "gpu-5"}
                ],
                "config": [
                    {"source": "FromClaim", "requests": ["nic"], "opaque": {"driver": "knd.dev", "parameters": own}},
                    {"source": "FromClass", "opaque": {"driver": "knd.dev", "parameters": class}},
                    {"source": "FromClaim", "opaque": {"driver": "gpu.nvidia.com", "parameters": {"sharing": 1}}}
                ]
            }},
            "reservedFor": [{"resource": "pods", "name": "trainer-0", "uid": "pod-uid-1"}]
        }
    })
}

/// What a preparer on node `pool` may give: the devices `machine` publishes (the receiver keeps
/// the inventory after its sender is gone). [`allocated_claim`]'s NIC is on
/// [`machines::gpu_8x8`](crate::machines::gpu_8x8), pool `node-1`.
pub fn node_devices(pool: &str, machine: &crate::sysfs::SysfsTree) -> NodeDevices {
    let inventory = knd::discover::inventory::discover(&machine.host());
    let (_, inventory) = tokio::sync::watch::channel(Arc::new(inventory));
    NodeDevices {
        pool: pool.into(),
        inventory,
        shared: None,
    }
}

/// A pod's record holding `attachments`, as the NRI hooks write it (pod `ml/<uid>`).
pub fn pod_record(pod_uid: &str, attachments: Vec<AttachmentRecord>) -> PodRecord {
    PodRecord {
        pod_uid: pod_uid.into(),
        pod: format!("ml/{pod_uid}"),
        netns: format!("/run/netns/{pod_uid}").into(),
        netns_id: None,
        attachments,
        failure: None,
        detached: false,
    }
}

/// The record of `device` of claim `claim_uid` (`ml/c`, pool `node-1`) moved into a pod as
/// `net1`, its host side an interface of that name with index 7.
pub fn attachment_record(claim_uid: &str, device: &str) -> AttachmentRecord {
    AttachmentRecord {
        claim_uid: claim_uid.into(),
        claim_namespace: "ml".into(),
        claim_name: "c".into(),
        pool: "node-1".into(),
        device: device.into(),
        host: HostSide {
            link: LinkSettings {
                index: 7,
                name: device.into(),
                mtu: 1500,
                mac: None,
                up: true,
                offload_sizes: OffloadSizes::default(),
                identity: None,
                peer: None,
            },
            addresses: Vec::new(),
            routes: Vec::new(),
            neighbors: Vec::new(),
            features: std::collections::BTreeMap::new(),
        },
        pod_name: "net1".into(),
        returned: false,
        share: None,
        pod: Some(PodSide {
            name: "net1".into(),
            addresses: Vec::new(),
            mac: None,
            place: None,
        }),
    }
}

/// A gRPC channel to a unix socket, as kubelet dials plugin endpoints.
pub async fn unix_channel(
    path: std::path::PathBuf,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_static("http://kubelet.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}
