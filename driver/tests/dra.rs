//! A kubelet stand-in: tonic clients over the plugin's real unix sockets, driving registration,
//! NodePrepareResources/NodeUnprepareResources in both API versions, and the health stream.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use knd::{
    dra::{
        self, Registration, Sockets,
        prepare::Preparer,
        proto::{dra_v1, dra_v1beta1, health_v1, health_v1alpha1 as health, registration as reg},
    },
    model::ports::DeviceHealth,
    os::state::StateStore,
};
use knd_testkit::{
    claims::{
        CONFIG_HEAD, MemoryClaims, allocated_claim, attachment_record, node_devices, pod_record,
        unix_channel,
    },
    machines,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

type Claims = MemoryClaims;

fn claim(name: &str, uid: &str, claim_parameters: &str) -> serde_json::Value {
    allocated_claim(name, uid, claim_parameters)
}

async fn channel(path: PathBuf) -> tonic::transport::Channel {
    unix_channel(path).await.unwrap()
}

struct Running {
    plugin: dra::Plugin,
    shutdown: CancellationToken,
    sockets: Sockets,
    health: watch::Sender<Vec<DeviceHealth>>,
    store: Arc<StateStore>,
}

fn start(dir: &Path, claims: &Claims) -> Running {
    let sockets = Sockets::new(
        "knd.dev",
        &dir.join("plugins/knd.dev"),
        &dir.join("registry"),
    );
    let store = Arc::new(StateStore::open(dir.join("state")).unwrap());
    let preparer = Arc::new(Preparer::new(
        "knd.dev",
        node_devices("node-1", &machines::gpu_8x8()),
        Arc::clone(&store),
        claims.clone(),
    ));
    let (health, health_rx) = watch::channel(vec![DeviceHealth {
        pool: "node-1".into(),
        device: "pci-0000-b4-00-0".into(),
        healthy: true,
        reason: String::new(),
        cause: None,
    }]);
    let shutdown = CancellationToken::new();
    let plugin = dra::serve("knd.dev", sockets.clone(), preparer, health_rx, &shutdown).unwrap();
    Running {
        plugin,
        shutdown,
        sockets,
        health,
        store,
    }
}

fn prepare_request<T>(uid: &str, name: &str, make: impl Fn(String, String, String) -> T) -> Vec<T> {
    vec![make("ml".into(), uid.into(), name.into())]
}

#[tokio::test]
async fn registration_advertises_the_four_services_and_takes_kubelets_answer() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), &Claims::default());
    for socket in [&running.sockets.registration, &running.sockets.dra] {
        let mode = std::fs::metadata(socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", socket.display());
    }
    assert!(
        running
            .sockets
            .registration
            .ends_with("registry/knd.dev-reg.sock")
    );
    let mut client = reg::registration_client::RegistrationClient::new(
        channel(running.sockets.registration.clone()).await,
    );
    let info = client
        .get_info(reg::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.r#type, "DRAPlugin");
    assert_eq!(info.name, "knd.dev");
    assert_eq!(Path::new(&info.endpoint), running.sockets.dra);
    assert_eq!(
        info.supported_versions,
        [
            "v1.DRAPlugin",
            "v1beta1.DRAPlugin",
            "v1alpha1.DRAResourceHealth",
            "v1.DRAResourceHealth"
        ]
    );
    let mut registration = running.plugin.registration.clone();
    assert_eq!(*registration.borrow(), Registration::Pending);
    client
        .notify_registration_status(reg::RegistrationStatus {
            plugin_registered: false,
            error: "version skew".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        *registration.borrow_and_update(),
        Registration::Refused("version skew".into())
    );
    client
        .notify_registration_status(reg::RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(*registration.borrow(), Registration::Registered);
    running.shutdown.cancel();
    running.plugin.join().await;
    assert!(
        !running.sockets.registration.exists(),
        "sockets are removed on shutdown"
    );
}

#[tokio::test]
async fn prepare_and_unprepare_in_both_versions_with_layered_config() {
    let dir = tempfile::tempdir().unwrap();
    let claims = Claims::default();
    claims.add(claim(
        "c1",
        "uid-1",
        &format!(r#"{{{CONFIG_HEAD},"interface":{{"name":"net1"}}}}"#),
    ));
    let running = start(dir.path(), &claims);
    let mut v1 =
        dra_v1::dra_plugin_client::DraPluginClient::new(channel(running.sockets.dra.clone()).await);
    let mut v1beta1 = dra_v1beta1::dra_plugin_client::DraPluginClient::new(
        channel(running.sockets.dra.clone()).await,
    );

    let response = v1
        .node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
            claims: prepare_request("uid-1", "c1", |namespace, uid, name| dra_v1::Claim {
                namespace,
                uid,
                name,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let answer = &response.claims["uid-1"];
    assert_eq!(answer.error, "");
    assert_eq!(answer.devices.len(), 1, "only our device, not the GPU");
    let device = &answer.devices[0];
    assert_eq!(
        (
            device.request_names.as_slice(),
            device.pool_name.as_str(),
            device.device_name.as_str()
        ),
        (&["nic".to_owned()][..], "node-1", "pci-0000-b4-00-0")
    );
    let stored = running.store.claims.get("uid-1").unwrap().unwrap();
    assert_eq!(stored.pod_uids, ["pod-uid-1"]);
    let interface = stored.devices[0].config.interface.clone().unwrap();
    assert_eq!(interface.mtu, Some(9000), "class config applied");
    assert_eq!(
        interface.name.as_deref(),
        Some("net1"),
        "claim config applied over it"
    );

    // The same claim through v1beta1, after the API lost it: answered from the store.
    claims.clear();
    let again = v1beta1
        .node_prepare_resources(dra_v1beta1::NodePrepareResourcesRequest {
            claims: prepare_request("uid-1", "c1", |namespace, uid, name| dra_v1beta1::Claim {
                namespace,
                uid,
                name,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.claims["uid-1"].devices[0].device_name,
        "pci-0000-b4-00-0"
    );

    let released = v1beta1
        .node_unprepare_resources(dra_v1beta1::NodeUnprepareResourcesRequest {
            claims: prepare_request("uid-1", "c1", |namespace, uid, name| dra_v1beta1::Claim {
                namespace,
                uid,
                name,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.claims["uid-1"].error, "");
    assert!(running.store.claims.get("uid-1").unwrap().is_none());
    running.shutdown.cancel();
    running.plugin.join().await;
}

#[tokio::test]
async fn bad_claims_get_their_own_error_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let claims = Claims::default();
    let cases = [
        (
            "unknown",
            format!(r#"{{{CONFIG_HEAD},"interface":{{"mtuu":1}}}}"#),
            "config[0].interface.mtuu: unknown field",
        ),
        (
            "cidr",
            format!(r#"{{{CONFIG_HEAD},"interface":{{"addresses":["10.0.0.1/33"]}}}}"#),
            "config[0].interface.addresses[0]: `10.0.0.1/33` is not an IP prefix",
        ),
        (
            "mtu",
            format!(r#"{{{CONFIG_HEAD},"interface":{{"mtu":99999}}}}"#),
            "config[0].interface.mtu: 99999 exceeds the maximum 65535",
        ),
        (
            "type",
            format!(r#"{{{CONFIG_HEAD},"routes":{{"destination":"default"}}}}"#),
            "config[0].routes: invalid type: map",
        ),
    ];
    let mut requests = Vec::new();
    for (i, (name, parameters, _)) in cases.iter().enumerate() {
        let uid = format!("uid-{i}");
        claims.add(claim(name, &uid, parameters));
        requests.push(dra_v1::Claim {
            namespace: "ml".into(),
            uid,
            name: (*name).to_owned(),
        });
    }
    // Not allocated to us, wrong UID, and one that does not exist.
    let mut foreign = claim("foreign", "uid-f", &format!("{{{CONFIG_HEAD}}}"));
    foreign["status"]["allocation"]["devices"]["results"][0]["driver"] = "other.dev".into();
    claims.add(foreign);
    requests.push(dra_v1::Claim {
        namespace: "ml".into(),
        uid: "uid-f".into(),
        name: "foreign".into(),
    });
    claims.add(claim("moved", "uid-new", &format!("{{{CONFIG_HEAD}}}")));
    requests.push(dra_v1::Claim {
        namespace: "ml".into(),
        uid: "uid-old".into(),
        name: "moved".into(),
    });
    requests.push(dra_v1::Claim {
        namespace: "ml".into(),
        uid: "uid-x".into(),
        name: "missing".into(),
    });
    // And one good claim in the same call: it is not held back by the others.
    claims.add(claim("good", "uid-g", &format!("{{{CONFIG_HEAD}}}")));
    requests.push(dra_v1::Claim {
        namespace: "ml".into(),
        uid: "uid-g".into(),
        name: "good".into(),
    });

    let running = start(dir.path(), &claims);
    let mut v1 =
        dra_v1::dra_plugin_client::DraPluginClient::new(channel(running.sockets.dra.clone()).await);
    let response = v1
        .node_prepare_resources(dra_v1::NodePrepareResourcesRequest { claims: requests })
        .await
        .unwrap()
        .into_inner();
    for (i, (_, _, expected)) in cases.iter().enumerate() {
        let error = &response.claims[&format!("uid-{i}")].error;
        assert!(error.starts_with(expected), "{error}\n want {expected}");
    }
    assert!(
        response.claims["uid-f"]
            .error
            .contains("no devices allocated by knd.dev")
    );
    assert!(response.claims["uid-old"].error.contains("has UID uid-new"));
    assert!(
        response.claims["uid-x"]
            .error
            .contains("ml/missing does not exist")
    );
    assert_eq!(response.claims["uid-g"].error, "");
    assert_eq!(response.claims["uid-g"].devices.len(), 1);
    assert_eq!(
        running.store.claims.all().unwrap().len(),
        1,
        "only the good claim is recorded"
    );
    running.shutdown.cancel();
    running.plugin.join().await;
}

/// The allocation is checked against what this node publishes: a device it never published,
/// a device of another pool and an adminAccess request each get their own error at prepare
/// (before, they were prepared and failed only at pod start). A NIC already in one of the
/// claim's pods has left the host's inventory: its attachment record vouches for it.
#[tokio::test]
async fn allocations_this_node_cannot_give_are_refused_naming_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let claims = Claims::default();
    let config = format!("{{{CONFIG_HEAD}}}");
    let with_nic = |name: &str, uid: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut claim = claim(name, uid, &config);
        edit(&mut claim["status"]["allocation"]["devices"]["results"][0]);
        claims.add(claim);
        dra_v1::Claim {
            namespace: "ml".into(),
            uid: uid.into(),
            name: name.into(),
        }
    };
    let requests = vec![
        with_nic("unknown", "uid-u", &|nic| {
            nic["device"] = "no-such-device".into();
        }),
        with_nic("elsewhere", "uid-e", &|nic| nic["pool"] = "node-2".into()),
        with_nic("admin", "uid-a", &|nic| nic["adminAccess"] = true.into()),
        with_nic("attached", "uid-m", &|nic| {
            nic["device"] = "in-the-pod".into();
        }),
        with_nic("someone-elses", "uid-s", &|nic| {
            nic["device"] = "in-another-pod".into();
        }),
        with_nic("good", "uid-g", &|_| {}),
    ];
    let running = start(dir.path(), &claims);
    // "in-the-pod" was moved into a pod of this very claim; "in-another-pod" into a pod of
    // another claim, which does not make it this claim's.
    let store = &running.store;
    store
        .pods
        .put(
            "pod-m",
            &pod_record("pod-m", vec![attachment_record("uid-m", "in-the-pod")]),
        )
        .unwrap();
    store
        .pods
        .put(
            "pod-o",
            &pod_record("pod-o", vec![attachment_record("uid-o", "in-another-pod")]),
        )
        .unwrap();

    let mut v1 =
        dra_v1::dra_plugin_client::DraPluginClient::new(channel(running.sockets.dra.clone()).await);
    let response = v1
        .node_prepare_resources(dra_v1::NodePrepareResourcesRequest { claims: requests })
        .await
        .unwrap()
        .into_inner();
    let error = |uid: &str| response.claims[uid].error.clone();
    assert_eq!(
        error("uid-u"),
        "claim ml/unknown: request nic was allocated device no-such-device, which knd.dev does \
         not publish in pool node-1 (unknown, or gone from this node)"
    );
    assert_eq!(
        error("uid-e"),
        "claim ml/elsewhere: request nic was allocated device pci-0000-b4-00-0 of pool node-2, \
         but this node's pool is node-1"
    );
    assert!(
        error("uid-a").starts_with(
            "claim ml/admin: request nic asks for adminAccess to device pci-0000-b4-00-0; \
             knd.dev refuses it"
        ),
        "{}",
        error("uid-a")
    );
    assert_eq!(error("uid-m"), "");
    assert!(
        error("uid-s").contains("device in-another-pod, which knd.dev does not publish"),
        "{}",
        error("uid-s")
    );
    assert_eq!(error("uid-g"), "");
    let recorded: Vec<String> = store
        .claims
        .all()
        .unwrap()
        .into_iter()
        .map(|(uid, _)| uid)
        .collect();
    assert_eq!(
        recorded,
        ["uid-g", "uid-m"],
        "only the claims prepared are recorded"
    );
    running.shutdown.cancel();
    running.plugin.join().await;
}

#[tokio::test]
async fn health_stream_sends_the_device_list_and_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), &Claims::default());
    let mut client = health::dra_resource_health_client::DraResourceHealthClient::new(
        channel(running.sockets.dra.clone()).await,
    );
    let mut stream = client
        .node_watch_resources(health::NodeWatchResourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.devices.len(), 1);
    assert_eq!(
        first.devices[0].health,
        health::HealthStatus::Healthy as i32
    );
    assert_eq!(
        first.devices[0].device.as_ref().unwrap().device_name,
        "pci-0000-b4-00-0"
    );
    // The v1 stream (newer kubelets) carries the reason as the device's message.
    let mut v1 = health_v1::dra_resource_health_client::DraResourceHealthClient::new(
        channel(running.sockets.dra.clone()).await,
    )
    .node_watch_resources(health_v1::NodeWatchResourcesRequest {})
    .await
    .unwrap()
    .into_inner();
    let first_v1 = v1.message().await.unwrap().unwrap();
    assert_eq!(
        first_v1.devices[0].health,
        health_v1::HealthStatus::Healthy as i32
    );
    assert_eq!(first_v1.devices[0].message, "");
    running.health.send_replace(vec![DeviceHealth {
        pool: "node-1".into(),
        device: "pci-0000-b4-00-0".into(),
        healthy: false,
        reason: "link enp180s0 is down (operstate)".into(),
        cause: Some(knd::model::ports::Cause::LinkDown),
    }]);
    let second = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        second.devices[0].health,
        health::HealthStatus::Unhealthy as i32
    );
    assert!(second.devices[0].last_updated_time > 1_700_000_000);
    let second_v1 = tokio::time::timeout(Duration::from_secs(2), v1.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        second_v1.devices[0].health,
        health_v1::HealthStatus::Unhealthy as i32
    );
    assert_eq!(
        second_v1.devices[0].message,
        "link enp180s0 is down (operstate)"
    );
    running.shutdown.cancel();
    drop(stream);
    drop(v1);
    running.plugin.join().await;
}

#[tokio::test]
async fn a_restarted_plugin_answers_from_its_store_and_replaces_stale_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let claims = Claims::default();
    claims.add(claim("c1", "uid-1", &format!("{{{CONFIG_HEAD}}}")));
    let first = start(dir.path(), &claims);
    let mut v1 =
        dra_v1::dra_plugin_client::DraPluginClient::new(channel(first.sockets.dra.clone()).await);
    let request = || dra_v1::NodePrepareResourcesRequest {
        claims: prepare_request("uid-1", "c1", |namespace, uid, name| dra_v1::Claim {
            namespace,
            uid,
            name,
        }),
    };
    let before = v1
        .node_prepare_resources(request())
        .await
        .unwrap()
        .into_inner();
    // Simulate a crash: the tasks stop but the socket files stay behind.
    first.shutdown.cancel();
    drop(first.plugin);
    claims.clear();
    let second = start(dir.path(), &claims);
    let mut v1 =
        dra_v1::dra_plugin_client::DraPluginClient::new(channel(second.sockets.dra.clone()).await);
    let after = v1
        .node_prepare_resources(request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before, after);
    second.shutdown.cancel();
    second.plugin.join().await;
}
