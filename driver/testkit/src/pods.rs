//! A node with two NICs and a pod, on real namespaces, with knd's NRI hooks over a state store,
//! an inventory and in-memory claims: the harness of the pod tests and the hostile-tenant tests.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::Arc,
};

use tokio::sync::watch;

use super::{TestHost, claims::MemoryClaims, inventory_of, veth_pair};
use knd::{
    discover::inventory::Inventory,
    model::{
        config,
        records::{PreparedClaim, PreparedDevice},
    },
    nri::{pods::NodeHooks, proto::nri as api},
    os::state::StateStore,
};

/// A node (namespace) with NICs `enp1` (192.168.50.2/24) and `enp2` cabled to a switch, a pod
/// with its own `eth0`, a state store, an inventory of the two NICs and in-memory claims.
#[derive(Debug)]
pub struct Node {
    /// The node.
    pub host: TestHost,
    /// The switch both sides are cabled to.
    pub switch: TestHost,
    /// The pod.
    pub pod: TestHost,
    /// knd's state store.
    pub store: Arc<StateStore>,
    /// Where the store lives.
    pub dir: tempfile::TempDir,
    /// The inventory the hooks see.
    pub inventory: watch::Sender<Arc<Inventory>>,
    /// The claims API the hooks report to.
    pub claims: Arc<MemoryClaims>,
}

impl Node {
    /// Builds it (blocking: run it on a blocking thread).
    #[must_use]
    pub fn create() -> Self {
        let node = TestHost::new("node").expect("test node");
        let switch = TestHost::new("switch").expect("test node");
        let pod = TestHost::new("pod").expect("test node");
        for (nic, port) in [("enp1", "sw1"), ("enp2", "sw2")] {
            veth_pair(&node, nic, &switch, port).expect("test node");
        }
        veth_pair(&pod, "eth0", &switch, "sw9").expect("test node");
        node.configure("enp1", "192.168.50.2".parse().expect("test node"), 24)
            .expect("test node");
        let dir = tempfile::tempdir().expect("test node");
        let store = Arc::new(StateStore::open(dir.path()).expect("test node"));
        let (inventory, _) = watch::channel(Arc::new(inventory_of(["enp1", "enp2"])));
        Self {
            host: node,
            switch,
            pod,
            store,
            dir,
            inventory,
            claims: Arc::new(MemoryClaims::default()),
        }
    }

    /// Hooks as a freshly started driver has them.
    #[must_use]
    pub fn hooks(&self) -> NodeHooks<MemoryClaims> {
        NodeHooks::new(
            Arc::clone(&self.store),
            self.inventory.subscribe(),
            self.host.netns().try_clone().expect("test node"),
            Arc::clone(&self.claims),
        )
    }

    /// Records claim `uid` for pod `pod-1` with `device` and the config fields `config_json`.
    pub fn prepare(&self, uid: &str, device: &str, config_json: &str) {
        self.prepare_with(uid, device, config_json, None);
    }

    /// [`Self::prepare`], the device allocated as `share` of a shared NIC (or whole: `None`).
    pub fn prepare_with(
        &self,
        uid: &str,
        device: &str,
        config_json: &str,
        share: Option<knd::model::records::PreparedShare>,
    ) {
        let text =
            format!(r#"{{"apiVersion":"knd.dev/v1alpha1","kind":"NetworkConfig",{config_json}}}"#);
        let claim = PreparedClaim {
            uid: uid.into(),
            namespace: "ml".into(),
            name: format!("claim-{uid}"),
            pod_uids: vec!["pod-1".into()],
            devices: vec![PreparedDevice {
                requests: vec!["nic".into()],
                pool: "node-1".into(),
                device: device.into(),
                config: config::parse(text.as_bytes()).expect("test node"),
                topology: None,
                share,
            }],
        };
        self.store.claims.put(uid, &claim).expect("test node");
    }

    /// The pod's sandbox as the runtime describes it.
    #[must_use]
    pub fn sandbox(&self) -> api::PodSandbox {
        api::PodSandbox {
            id: "sandbox-1".into(),
            name: "trainer-0".into(),
            uid: "pod-1".into(),
            namespace: "ml".into(),
            linux: Some(api::LinuxPodSandbox {
                namespaces: vec![api::LinuxNamespace {
                    r#type: "network".into(),
                    path: format!("/proc/self/fd/{}", self.pod.netns().as_fd().as_raw_fd()),
                }],
                ..api::LinuxPodSandbox::default()
            }),
            ..api::PodSandbox::default()
        }
    }
}
