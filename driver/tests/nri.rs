//! The NRI plugin over its wire protocol: against a stand-in runtime built from the same mux and
//! ttrpc layers (every rule, including broken input), and against a real containerd 1.7.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use knd::nri::{
    mux::{self, PLUGIN_CONN, RUNTIME_CONN},
    plugin::{self, Hooks, Identity, IdentityError, PLUGIN_SERVICE, RUNTIME_SERVICE, SUBSCRIBED},
    proto::{nri as api, ttrpc as wire},
    ttrpc::{self, Header, MessageReader, REQUEST, Reply, Service, Status, code},
};
use prost::Message as _;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// Hooks that record what they were called with; pods named `fail-*` fail.
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<String>>);

impl Recorder {
    fn seen(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    fn record(&self, event: String, pod: &api::PodSandbox) -> Result<(), Refused> {
        self.0.lock().unwrap().push(event);
        if pod.name.starts_with("fail") {
            Err(Refused(format!("pod {} has no NIC", pod.name)))
        } else {
            Ok(())
        }
    }
}

/// The stand-in's refusal.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

impl Hooks for Recorder {
    type Error = Refused;

    async fn synchronize(
        &self,
        pods: Vec<api::PodSandbox>,
        containers: Vec<api::Container>,
    ) -> Result<(), Refused> {
        self.0.lock().unwrap().push(format!(
            "sync {} pods {} containers",
            pods.len(),
            containers.len()
        ));
        Ok(())
    }
    async fn run_pod_sandbox(&self, pod: api::PodSandbox) -> Result<(), Refused> {
        self.record(format!("run {}", pod.name), &pod)
    }
    async fn stop_pod_sandbox(&self, pod: api::PodSandbox) -> Result<(), Refused> {
        self.record(format!("stop {}", pod.name), &pod)
    }
    async fn remove_pod_sandbox(&self, pod: api::PodSandbox) -> Result<(), Refused> {
        self.record(format!("remove {}", pod.name), &pod)
    }
    async fn create_container(
        &self,
        pod: api::PodSandbox,
        container: api::Container,
    ) -> Result<api::ContainerAdjustment, Refused> {
        self.record(format!("create {}/{}", pod.name, container.name), &pod)?;
        Ok(api::ContainerAdjustment {
            env: vec![api::KeyValue {
                key: "KND".into(),
                value: container.name,
            }],
            ..api::ContainerAdjustment::default()
        })
    }
}

/// The runtime's side of registration: records RegisterPlugin calls.
#[derive(Debug, Default)]
struct Registrar(Mutex<Vec<api::RegisterPluginRequest>>);

struct RegistrarService(Arc<Registrar>);

impl Service for RegistrarService {
    fn call(&self, service: &str, method: &str, payload: Bytes) -> Reply {
        let answer = if (service, method) == (RUNTIME_SERVICE, "RegisterPlugin") {
            let request = api::RegisterPluginRequest::decode(payload).unwrap();
            self.0.0.lock().unwrap().push(request);
            Ok(api::Empty {}.encode_to_vec())
        } else {
            Err(Status::new(code::UNIMPLEMENTED, "no"))
        };
        Box::pin(async move { answer })
    }
}

/// A stand-in runtime: accepts the plugin's connection, serves RegisterPlugin on conn 2 and
/// calls the plugin on conn 1.
struct StandIn {
    registrar: Arc<Registrar>,
    client: ttrpc::Client,
    reader: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for StandIn {
    /// Closes the connection, as a runtime that goes away does.
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn stand_in(listener: &UnixListener) -> StandIn {
    let (stream, _) = listener.accept().await.unwrap();
    let mut trunk = mux::split(stream, &[PLUGIN_CONN, RUNTIME_CONN]);
    let registrar = Arc::new(Registrar::default());
    tokio::spawn(ttrpc::serve(
        MessageReader::new(trunk.receivers.remove(&RUNTIME_CONN).unwrap()),
        trunk.sender.clone(),
        RUNTIME_CONN,
        Arc::new(RegistrarService(Arc::clone(&registrar))),
    ));
    let client = ttrpc::Client::new(
        MessageReader::new(trunk.receivers.remove(&PLUGIN_CONN).unwrap()),
        trunk.sender.clone(),
        PLUGIN_CONN,
    );
    StandIn {
        registrar,
        client,
        reader: trunk.reader,
    }
}

impl StandIn {
    async fn call(&self, method: &str, request: &impl prost::Message) -> Result<Bytes, Status> {
        self.client
            .call(PLUGIN_SERVICE, method, request, Duration::from_secs(2))
            .await
    }
}

fn pod(name: &str) -> api::PodSandbox {
    api::PodSandbox {
        id: format!("id-{name}"),
        name: name.into(),
        uid: format!("uid-{name}"),
        namespace: "ml".into(),
        ..api::PodSandbox::default()
    }
}

fn state_change(event: i32, name: &str) -> api::StateChangeEvent {
    api::StateChangeEvent {
        event,
        pod: Some(pod(name)),
        container: None,
    }
}

async fn connected() -> (tempfile::TempDir, Arc<Recorder>, StandIn, CancellationToken) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nri.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let hooks = Arc::new(Recorder::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(plugin::run(
        socket,
        Identity::new("knd", "10").unwrap(),
        Arc::clone(&hooks),
        shutdown.clone(),
    ));
    let runtime = stand_in(&listener).await;
    (dir, hooks, runtime, shutdown)
}

#[tokio::test]
async fn the_plugin_registers_configures_synchronizes_and_handles_events() {
    let (_dir, hooks, runtime, shutdown) = connected().await;
    // Registration happens right after connecting.
    for _ in 0..100 {
        if !runtime.registrar.0.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let registered = runtime.registrar.0.lock().unwrap().clone();
    assert_eq!(registered.len(), 1);
    assert_eq!(
        (
            registered[0].plugin_name.as_str(),
            registered[0].plugin_idx.as_str()
        ),
        ("knd", "10")
    );

    let configure = api::ConfigureRequest {
        runtime_name: "stand-in".into(),
        runtime_version: "1".into(),
        ..api::ConfigureRequest::default()
    };
    let answer =
        api::ConfigureResponse::decode(runtime.call("Configure", &configure).await.unwrap())
            .unwrap();
    assert_eq!(answer.events, SUBSCRIBED);
    assert_eq!(
        answer.events, 0xF,
        "run, stop, remove sandbox and create container"
    );

    // Synchronize in two chunks: the first answered with `more` echoed, the hook called once.
    let first = api::SynchronizeRequest {
        pods: vec![pod("a")],
        containers: Vec::new(),
        more: true,
    };
    let answer =
        api::SynchronizeResponse::decode(runtime.call("Synchronize", &first).await.unwrap())
            .unwrap();
    assert!(answer.more && answer.update.is_empty());
    let last = api::SynchronizeRequest {
        pods: vec![pod("b")],
        containers: vec![api::Container::default()],
        more: false,
    };
    let answer =
        api::SynchronizeResponse::decode(runtime.call("Synchronize", &last).await.unwrap())
            .unwrap();
    assert!(!answer.more);

    assert_eq!(hooks.seen(), ["sync 2 pods 1 containers"]);
    shutdown.cancel();
}

#[tokio::test]
async fn pod_and_container_events_reach_the_hooks_and_their_errors_the_runtime() {
    let (_dir, hooks, runtime, shutdown) = connected().await;
    // Events through StateChange (NRI ≤ 0.11) and the dedicated RPCs (0.12).
    runtime
        .call("StateChange", &state_change(1, "p1"))
        .await
        .unwrap();
    runtime
        .call(
            "StopPodSandbox",
            &api::PodSandboxRequest {
                pod: Some(pod("p1")),
            },
        )
        .await
        .unwrap();
    runtime
        .call("StateChange", &state_change(3, "p1"))
        .await
        .unwrap();
    runtime
        .call(
            "RunPodSandbox",
            &api::PodSandboxRequest {
                pod: Some(pod("p2")),
            },
        )
        .await
        .unwrap();
    runtime
        .call("StateChange", &state_change(7, "p2"))
        .await
        .unwrap();
    let create = api::CreateContainerRequest {
        pod: Some(pod("p2")),
        container: Some(api::Container {
            name: "main".into(),
            ..api::Container::default()
        }),
    };
    let answer = api::CreateContainerResponse::decode(
        runtime.call("CreateContainer", &create).await.unwrap(),
    )
    .unwrap();
    assert_eq!(answer.adjust.unwrap().env[0].value, "main");

    // A hook's error reaches the runtime as the call's status.
    let failed = runtime
        .call("StateChange", &state_change(1, "fail-1"))
        .await
        .unwrap_err();
    assert_eq!(failed.code, code::INTERNAL);
    assert!(failed.message.contains("pod fail-1 has no NIC"), "{failed}");

    assert_eq!(
        hooks.seen(),
        [
            "run p1",
            "stop p1",
            "remove p1",
            "run p2",
            "create p2/main",
            "run fail-1"
        ]
    );
    shutdown.cancel();
}

#[tokio::test]
async fn broken_requests_get_ttrpc_errors_and_the_plugin_keeps_serving() {
    let (_dir, hooks, runtime, shutdown) = connected().await;
    let unknown = runtime
        .call("Frobnicate", &api::Empty {})
        .await
        .unwrap_err();
    assert_eq!(unknown.code, code::UNIMPLEMENTED);
    let other_service = runtime
        .client
        .call(
            "some.Other",
            "Configure",
            &api::Empty {},
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
    assert_eq!(other_service.code, code::UNIMPLEMENTED);
    // A payload that is not the method's message.
    let malformed = runtime
        .client
        .call(
            PLUGIN_SERVICE,
            "StateChange",
            &wire::Request {
                service: "\u{1}".into(),
                ..wire::Request::default()
            },
            Duration::from_secs(2),
        )
        .await;
    // Field 1 of StateChangeEvent is an int32: a string there is a wire-type error.
    assert_eq!(malformed.unwrap_err().code, code::INVALID_ARGUMENT);

    runtime
        .call("StateChange", &state_change(1, "after"))
        .await
        .unwrap();
    assert_eq!(hooks.seen(), ["run after"]);
    shutdown.cancel();
}

#[tokio::test]
async fn malformed_frames_get_the_right_ttrpc_status_and_the_plugin_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nri.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let hooks = Arc::new(Recorder::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(plugin::run(
        socket,
        Identity::new("knd", "10").unwrap(),
        Arc::clone(&hooks),
        shutdown.clone(),
    ));
    // A runtime that reads the plugin's responses itself.
    let (stream, _) = listener.accept().await.unwrap();
    let mut trunk = mux::split(stream, &[PLUGIN_CONN, RUNTIME_CONN]);
    tokio::spawn(ttrpc::serve(
        MessageReader::new(trunk.receivers.remove(&RUNTIME_CONN).unwrap()),
        trunk.sender.clone(),
        RUNTIME_CONN,
        Arc::new(RegistrarService(Arc::default())),
    ));
    let mut responses = MessageReader::new(trunk.receivers.remove(&PLUGIN_CONN).unwrap());
    let sender = trunk.sender.clone();
    let send = |stream_id: u32, payload: Vec<u8>| {
        let header = Header {
            length: u32::try_from(payload.len()).unwrap(),
            stream_id,
            kind: REQUEST,
            flags: 0,
        };
        let sender = sender.clone();
        async move {
            sender
                .send_message(PLUGIN_CONN, &header.encode(), &payload)
                .await
                .unwrap();
        }
    };
    let request = |method: &str, payload: Vec<u8>| {
        wire::Request {
            service: PLUGIN_SERVICE.into(),
            method: method.into(),
            payload,
            ..wire::Request::default()
        }
        .encode_to_vec()
    };
    let mut status_of = async |stream_id: u32| {
        loop {
            let Some(ttrpc::Incoming::Message(header, payload)) = responses.next().await else {
                panic!("the connection closed");
            };
            if header.stream_id == stream_id {
                return wire::Response::decode(payload)
                    .unwrap()
                    .status
                    .map_or(0, |s| s.code);
            }
        }
    };
    send(1, vec![0xff, 0xff, 0xff]).await;
    assert_eq!(
        status_of(1).await,
        code::INVALID_ARGUMENT,
        "undecodable request"
    );
    send(2, request("StateChange", Vec::new())).await;
    assert_eq!(status_of(2).await, code::INVALID_ARGUMENT, "even stream id");
    send(3, request("Nope", Vec::new())).await;
    assert_eq!(status_of(3).await, code::UNIMPLEMENTED, "unknown method");
    // An oversized message: header declaring 4 MiB + 1, then that many bytes in one frame.
    let big = u32::try_from(ttrpc::MAX_MESSAGE + 1).unwrap();
    let header = Header {
        length: big,
        stream_id: 5,
        kind: REQUEST,
        flags: 0,
    };
    trunk
        .sender
        .send_raw(&mux::encode_frame(PLUGIN_CONN, &header.encode()))
        .await
        .unwrap();
    let body = mux::encode_frame(PLUGIN_CONN, &vec![0; ttrpc::MAX_MESSAGE + 1]);
    trunk.sender.send_raw(&body).await.unwrap();
    assert_eq!(
        status_of(5).await,
        code::RESOURCE_EXHAUSTED,
        "oversized message"
    );
    // Frames for connection ids nobody uses are dropped.
    trunk
        .sender
        .send_raw(&mux::encode_frame(77, b"stray"))
        .await
        .unwrap();
    // And the plugin still serves.
    send(
        7,
        request("StateChange", state_change(1, "after").encode_to_vec()),
    )
    .await;
    assert_eq!(status_of(7).await, code::OK);
    assert_eq!(hooks.seen(), ["run after"]);
    shutdown.cancel();
}

#[tokio::test]
async fn the_plugin_reconnects_when_the_runtime_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nri.sock");
    let hooks = Arc::new(Recorder::default());
    let shutdown = CancellationToken::new();
    // The runtime is not there yet: the plugin keeps trying.
    let task = tokio::spawn(plugin::run(
        socket.clone(),
        Identity::new("knd", "10").unwrap(),
        Arc::clone(&hooks),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..2 {
        let listener = UnixListener::bind(&socket).unwrap();
        let runtime = stand_in(&listener).await;
        runtime
            .call("StateChange", &state_change(1, &format!("round{round}")))
            .await
            .unwrap();
        drop(runtime);
        drop(listener);
        std::fs::remove_file(&socket).unwrap();
    }
    assert_eq!(hooks.seen(), ["run round0", "run round1"]);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(6), task)
        .await
        .unwrap()
        .unwrap();
}

#[test]
fn plugin_names_and_indexes_are_checked_like_the_runtime_does() {
    assert!(Identity::new("knd", "00").is_ok());
    let name = Identity::new("knd dev", "00").unwrap_err();
    assert_eq!(name, IdentityError::Name("knd dev".into()));
    assert!(name.to_string().contains("[A-Za-z0-9_.+-]+"), "{name}");
    let index = Identity::new("knd", "1").unwrap_err();
    assert_eq!(index, IdentityError::Index("1".into()));
    assert!(index.to_string().contains("two digits"), "{index}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: runs a real containerd"]
async fn the_plugin_registers_with_a_real_containerd_and_survives_its_restart() {
    let mut containerd = knd_testkit::runtime::Containerd::start().unwrap();
    let hooks = Arc::new(Recorder::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(plugin::run(
        containerd.nri_socket(),
        Identity::new("knd", "10").unwrap(),
        Arc::clone(&hooks),
        shutdown.clone(),
    ));
    let synced = |hooks: &Recorder| {
        hooks
            .seen()
            .iter()
            .filter(|e| e.starts_with("sync"))
            .count()
    };
    for _ in 0..300 {
        if synced(&hooks) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        hooks.seen(),
        ["sync 0 pods 0 containers"],
        "containerd log:\n{}",
        containerd.log()
    );
    assert!(
        containerd.log().contains("knd"),
        "containerd logged the plugin:\n{}",
        containerd.log()
    );

    tokio::task::block_in_place(|| containerd.restart()).unwrap();
    for _ in 0..500 {
        if synced(&hooks) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        synced(&hooks),
        2,
        "registered again after the restart:\n{}",
        containerd.log()
    );
    shutdown.cancel();
}
