//! End to end with a real containerd 1.7 (CRI + NRI): pods created through CRI, as kubelet
//! creates them, get the NICs of the claims prepared for them, configured inside their network
//! namespaces; stopping and removing the pods gives every NIC back to the node exactly as it was.
//!
//! The node is a throwaway namespace holding veth "NICs" cabled to a switch namespace, so the
//! machine's own interfaces are never touched; containerd's pods are real.

use std::{sync::Arc, time::Duration};

use knd::{
    attach,
    discover::inventory::Inventory,
    model::{
        config,
        records::{HostSide, PreparedClaim, PreparedDevice},
    },
    nri::{
        plugin::{self, Identity},
        pods::NodeHooks,
    },
    os::{netns::Netns, state::StateStore},
};
use knd_testkit::{
    TestHost,
    claims::MemoryClaims,
    inventory_of,
    runtime::{Containerd, cri, pod_config},
    veth_pair,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const PODS: usize = 20;

fn without_index(mut side: HostSide) -> HostSide {
    side.link.index = 0;
    side
}

/// The node (a namespace with `nic0`…`nicN` cabled to a switch namespace) and the switch.
async fn node_with_nics(count: usize) -> (TestHost, TestHost) {
    tokio::task::spawn_blocking(move || {
        let node = TestHost::new("node").unwrap();
        let switch = TestHost::new("switch").unwrap();
        for i in 0..count {
            veth_pair(&node, &format!("nic{i}"), &switch, &format!("port{i}")).unwrap();
            node.configure(
                &format!("nic{i}"),
                format!("192.168.{i}.2").parse().unwrap(),
                24,
            )
            .unwrap();
        }
        (node, switch)
    })
    .await
    .unwrap()
}

/// One prepared claim per pod (`pod-uid-i` gets `nic{i}` as `net1` with its own MTU, address
/// and route); returns the NICs' host sides before anything moved and the inventory.
async fn prepare_claims(node: &TestHost, store: &StateStore) -> (Vec<HostSide>, Inventory) {
    let mut before = Vec::new();
    for i in 0..PODS {
        let name = format!("nic{i}");
        before.push(without_index(
            attach::record(node.netns(), &name).await.unwrap(),
        ));
        let text = format!(
            r#"{{"apiVersion":"knd.dev/v1alpha1","kind":"NetworkConfig","interface":{{"name":"net1","mtu":{mtu},"addresses":["10.{i}.0.2/24"]}},"routes":[{{"destination":"10.{i}.128.0/17","gateway":"10.{i}.0.1"}}]}}"#,
            mtu = 1400 + i
        );
        let claim = PreparedClaim {
            uid: format!("claim-{i}"),
            namespace: "ml".into(),
            name: format!("nic-{i}"),
            pod_uids: vec![format!("pod-uid-{i}")],
            devices: vec![PreparedDevice {
                requests: vec!["nic".into()],
                pool: "node-1".into(),
                device: name,
                config: config::parse(text.as_bytes()).unwrap(),
                topology: None,
                share: None,
            }],
        };
        store.claims.put(&claim.uid, &claim).unwrap();
    }
    (before, inventory_of((0..PODS).map(|i| format!("nic{i}"))))
}

/// knd's NRI plugin, connected to `containerd`.
async fn start_plugin(
    containerd: &Containerd,
    node: &TestHost,
    store: &Arc<StateStore>,
    inventory: Inventory,
    claims: &Arc<MemoryClaims>,
) -> CancellationToken {
    let (_sender, inventory) = watch::channel(Arc::new(inventory));
    let hooks = Arc::new(NodeHooks::new(
        Arc::clone(store),
        inventory,
        node.netns().try_clone().unwrap(),
        Arc::clone(claims),
    ));
    let shutdown = CancellationToken::new();
    tokio::spawn(plugin::run(
        containerd.nri_socket(),
        Identity::new("knd", "10").unwrap(),
        hooks,
        shutdown.clone(),
    ));
    for _ in 0..250 {
        if containerd.log().contains("10-knd") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: runs a real containerd and creates network namespaces"]
async fn twenty_pods_get_their_nics_from_a_real_containerd_and_give_them_back() {
    let containerd = tokio::task::spawn_blocking(Containerd::start)
        .await
        .unwrap()
        .unwrap();
    let (node, switch) = node_with_nics(PODS).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(StateStore::open(dir.path()).unwrap());
    let (before, inventory) = prepare_claims(&node, &store).await;
    let claims = Arc::new(MemoryClaims::default());
    let shutdown = start_plugin(&containerd, &node, &store, inventory, &claims).await;
    let mut client = containerd.cri().await.unwrap();
    let mut sandboxes = Vec::new();
    for i in 0..PODS {
        let response = client
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod_config(
                    "ml",
                    &format!("trainer-{i}"),
                    &format!("pod-uid-{i}"),
                )),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("pod {i}: {e}\n{}", containerd.log()))
            .into_inner();
        sandboxes.push(response.pod_sandbox_id);
    }
    // Inside every pod: the NIC, its name, address, MTU and route.
    for i in 0..PODS {
        let record = store
            .pods
            .get(&format!("pod-uid-{i}"))
            .unwrap()
            .expect("a pod record");
        assert!(record.failure.is_none(), "{:?}", record.failure);
        let pod_ns = Netns::open(&record.netns).unwrap();
        assert!(
            record
                .netns
                .to_string_lossy()
                .contains("io.containerd.grpc.v1.cri/netns/"),
            "the namespace containerd made: {}",
            record.netns.display()
        );
        let inside = attach::record(&pod_ns, "net1").await.unwrap();
        assert_eq!(inside.link.mtu, 1400 + u32::try_from(i).unwrap());
        assert_eq!(inside.nets(), [format!("10.{i}.0.2/24").parse().unwrap()]);
        assert_eq!(inside.routes.len(), 1, "pod {i}: {:?}", inside.routes);
        assert!(
            attach::record(node.netns(), &format!("nic{i}"))
                .await
                .is_err(),
            "nic{i} left the node"
        );
    }
    assert_eq!(claims.reports().len(), PODS, "every claim reported ready");
    for id in &sandboxes {
        client
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .unwrap();
        client
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .unwrap();
    }
    for (i, wanted) in before.iter().enumerate() {
        let after = without_index(
            attach::record(node.netns(), &format!("nic{i}"))
                .await
                .unwrap(),
        );
        assert_eq!(&after, wanted, "nic{i} back exactly as it was");
    }
    assert!(
        store.pods.all().unwrap().is_empty(),
        "nothing left in the store"
    );
    shutdown.cancel();
    drop(switch);
}
