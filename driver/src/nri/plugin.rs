//! The NRI plugin: registers with the runtime, answers Configure and Synchronize, and turns pod
//! and container events into calls on [`Hooks`]; reconnects with backoff when the runtime goes.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use super::{
    mux::{self, PLUGIN_CONN, RUNTIME_CONN},
    proto::nri as api,
    ttrpc::{self, MessageReader, Reply, Service, Status, code},
};
use crate::os::backoff::Backoff;

/// ttrpc service name of the runtime's side.
pub const RUNTIME_SERVICE: &str = "nri.pkg.api.v1alpha1.Runtime";
/// ttrpc service name of the plugin's side.
pub const PLUGIN_SERVICE: &str = "nri.pkg.api.v1alpha1.Plugin";

/// NRI event numbers.
pub mod event {
    /// A pod sandbox is being created.
    pub const RUN_POD_SANDBOX: i32 = 1;
    /// A pod sandbox is being stopped.
    pub const STOP_POD_SANDBOX: i32 = 2;
    /// A pod sandbox is being removed.
    pub const REMOVE_POD_SANDBOX: i32 = 3;
    /// A container is being created.
    pub const CREATE_CONTAINER: i32 = 4;

    /// The subscription bit of an event.
    pub const fn mask(event: i32) -> i32 {
        1 << (event - 1)
    }
}

/// The events knd subscribes to.
pub const SUBSCRIBED: i32 = event::mask(event::RUN_POD_SANDBOX)
    | event::mask(event::STOP_POD_SANDBOX)
    | event::mask(event::REMOVE_POD_SANDBOX)
    | event::mask(event::CREATE_CONTAINER);

/// What the plugin does on each event. An `Err` fails the runtime's operation with its message
/// (the error and its causes).
pub trait Hooks: Send + Sync + 'static {
    /// Why a hook failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The pods and containers that exist when the plugin connects.
    fn synchronize(
        &self,
        pods: Vec<api::PodSandbox>,
        containers: Vec<api::Container>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// A pod sandbox was created (its network namespace exists; containers do not yet).
    fn run_pod_sandbox(
        &self,
        pod: api::PodSandbox,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// A pod sandbox is stopping (its network namespace still exists).
    fn stop_pod_sandbox(
        &self,
        pod: api::PodSandbox,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// A pod sandbox was removed.
    fn remove_pod_sandbox(
        &self,
        pod: api::PodSandbox,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// A container is being created: what to add to it.
    fn create_container(
        &self,
        pod: api::PodSandbox,
        container: api::Container,
    ) -> impl Future<Output = Result<api::ContainerAdjustment, Self::Error>> + Send;
}

/// A plugin name or index the runtime would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The name has characters the runtime does not take.
    #[error("NRI plugin name `{0}` must match [A-Za-z0-9_.+-]+")]
    Name(String),
    /// The index is not two digits.
    #[error("NRI plugin index `{0}` must be two digits, e.g. 00")]
    Index(String),
}

/// How the plugin presents itself.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Plugin name (`[A-Za-z0-9_.+-]+`).
    pub name: String,
    /// Two-digit index; lower runs first.
    pub index: String,
}

impl Identity {
    /// Checks the name and index the way the runtime will.
    pub fn new(name: &str, index: &str) -> Result<Self, IdentityError> {
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.+-".contains(&b));
        if !name_ok {
            return Err(IdentityError::Name(name.to_owned()));
        }
        if index.len() != 2 || !index.bytes().all(|b| b.is_ascii_digit()) {
            return Err(IdentityError::Index(index.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
            index: index.to_owned(),
        })
    }
}

/// The plugin's ttrpc service: decodes requests and calls the hooks.
struct PluginService<H> {
    hooks: Arc<H>,
    /// Synchronize chunks received so far (the runtime splits large states).
    sync: Mutex<(Vec<api::PodSandbox>, Vec<api::Container>)>,
    shutdown: CancellationToken,
}

fn decode<M: prost::Message + Default>(payload: &Bytes) -> Result<M, Status> {
    M::decode(payload.clone()).map_err(|e| {
        Status::new(
            code::INVALID_ARGUMENT,
            format!("malformed {}: {e}", std::any::type_name::<M>()),
        )
    })
}

fn hook_error(error: impl std::error::Error) -> Status {
    Status::new(code::INTERNAL, crate::model::error_chain(&error))
}

impl<H: Hooks> PluginService<H> {
    async fn handle(self: Arc<Self>, method: String, payload: Bytes) -> Result<Vec<u8>, Status> {
        let empty = || api::Empty {}.encode_to_vec();
        match method.as_str() {
            "Configure" => {
                let request: api::ConfigureRequest = decode(&payload)?;
                tracing::info!(
                    runtime = %request.runtime_name,
                    version = %request.runtime_version,
                    request_timeout_ms = request.request_timeout,
                    "NRI: configured by the runtime"
                );
                Ok(api::ConfigureResponse {
                    events: SUBSCRIBED,
                    request_timeout: 0,
                }
                .encode_to_vec())
            }
            "Synchronize" => {
                let request: api::SynchronizeRequest = decode(&payload)?;
                let (pods, containers) = {
                    let mut pending = self.sync.lock().expect("sync lock poisoned");
                    pending.0.extend(request.pods);
                    pending.1.extend(request.containers);
                    if request.more {
                        return Ok(api::SynchronizeResponse {
                            update: Vec::new(),
                            more: true,
                        }
                        .encode_to_vec());
                    }
                    std::mem::take(&mut *pending)
                };
                self.hooks
                    .synchronize(pods, containers)
                    .await
                    .map_err(hook_error)?;
                Ok(api::SynchronizeResponse::default().encode_to_vec())
            }
            "Shutdown" => {
                tracing::info!("NRI: the runtime is shutting down");
                self.shutdown.cancel();
                Ok(empty())
            }
            "RunPodSandbox" | "StopPodSandbox" | "RemovePodSandbox" => {
                let request: api::PodSandboxRequest = decode(&payload)?;
                let event = match method.as_str() {
                    "RunPodSandbox" => event::RUN_POD_SANDBOX,
                    "StopPodSandbox" => event::STOP_POD_SANDBOX,
                    _ => event::REMOVE_POD_SANDBOX,
                };
                self.pod_event(event, request.pod.unwrap_or_default())
                    .await?;
                Ok(empty())
            }
            "StateChange" => {
                let request: api::StateChangeEvent = decode(&payload)?;
                self.pod_event(request.event, request.pod.unwrap_or_default())
                    .await?;
                Ok(empty())
            }
            "CreateContainer" => {
                let request: api::CreateContainerRequest = decode(&payload)?;
                let adjust = self
                    .hooks
                    .create_container(
                        request.pod.unwrap_or_default(),
                        request.container.unwrap_or_default(),
                    )
                    .await
                    .map_err(hook_error)?;
                Ok(api::CreateContainerResponse {
                    adjust: Some(adjust),
                    update: Vec::new(),
                    evict: Vec::new(),
                }
                .encode_to_vec())
            }
            other => Err(Status::new(
                code::UNIMPLEMENTED,
                format!("{PLUGIN_SERVICE}/{other} is not implemented"),
            )),
        }
    }

    async fn pod_event(&self, event: i32, pod: api::PodSandbox) -> Result<(), Status> {
        let outcome = match event {
            event::RUN_POD_SANDBOX => self.hooks.run_pod_sandbox(pod).await,
            event::STOP_POD_SANDBOX => self.hooks.stop_pod_sandbox(pod).await,
            event::REMOVE_POD_SANDBOX => self.hooks.remove_pod_sandbox(pod).await,
            // Events knd did not subscribe to (a runtime may still send them): nothing to do.
            _ => Ok(()),
        };
        outcome.map_err(hook_error)
    }
}

/// The service as ttrpc sees it: every call shares the plugin's state.
struct Dispatch<H>(Arc<PluginService<H>>);

impl<H: Hooks> Service for Dispatch<H> {
    fn call(&self, service: &str, method: &str, payload: Bytes) -> Reply {
        if service != PLUGIN_SERVICE {
            let status = Status::new(code::UNIMPLEMENTED, format!("unknown service {service}"));
            return Box::pin(async move { Err(status) });
        }
        Box::pin(Arc::clone(&self.0).handle(method.to_owned(), payload))
    }
}

/// Why a session with the runtime ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The socket could not be reached.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The runtime refused the registration.
    #[error("RegisterPlugin failed: {0}")]
    Register(Status),
    /// The trunk failed.
    #[error("the NRI connection failed: {0}")]
    Trunk(std::io::Error),
}

/// One session: connect, register, serve until the runtime closes the connection or
/// `shutdown` is cancelled. Returns `Ok` when the runtime closed the connection cleanly.
pub async fn session<H: Hooks>(
    socket: &Path,
    identity: &Identity,
    hooks: Arc<H>,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| SessionError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let mut trunk = mux::split(stream, &[PLUGIN_CONN, RUNTIME_CONN]);
    let plugin_rx = trunk
        .receivers
        .remove(&PLUGIN_CONN)
        .expect("requested above");
    let runtime_rx = trunk
        .receivers
        .remove(&RUNTIME_CONN)
        .expect("requested above");
    let session_end = shutdown.child_token();
    let service: Arc<dyn Service> = Arc::new(Dispatch(Arc::new(PluginService {
        hooks,
        sync: Mutex::default(),
        shutdown: session_end.clone(),
    })));
    let server = tokio::spawn(ttrpc::serve(
        MessageReader::new(plugin_rx),
        trunk.sender.clone(),
        PLUGIN_CONN,
        service,
    ));
    let client = ttrpc::Client::new(
        MessageReader::new(runtime_rx),
        trunk.sender.clone(),
        RUNTIME_CONN,
    );
    let register = api::RegisterPluginRequest {
        plugin_name: identity.name.clone(),
        plugin_idx: identity.index.clone(),
        nri_version: String::new(),
    };
    let registered = client
        .call(
            RUNTIME_SERVICE,
            "RegisterPlugin",
            &register,
            Duration::from_secs(5),
        )
        .await;
    if let Err(status) = registered {
        trunk.reader.abort();
        server.abort();
        return Err(SessionError::Register(status));
    }
    tracing::info!(name = %identity.name, index = %identity.index, "NRI: registered with the runtime");
    let outcome = tokio::select! {
        () = session_end.cancelled() => Ok(()),
        read = &mut trunk.reader => match read {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(SessionError::Trunk(err)),
            Err(err) => Err(SessionError::Trunk(std::io::Error::other(err.to_string()))),
        },
    };
    trunk.reader.abort();
    server.abort();
    outcome
}

/// Keeps a session with the runtime alive until `shutdown`: reconnects with backoff (100 ms
/// doubling to 5 s) whenever the runtime restarts or is not there yet.
pub async fn run<H: Hooks>(
    socket: PathBuf,
    identity: Identity,
    hooks: Arc<H>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_secs(5));
    while !shutdown.is_cancelled() {
        let started = tokio::time::Instant::now();
        match session(&socket, &identity, Arc::clone(&hooks), &shutdown).await {
            Ok(()) => tracing::info!("NRI: the runtime closed the connection"),
            Err(err) => tracing::warn!(%err, "NRI: session ended"),
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Backoff::new(Duration::from_secs(5));
        }
        if !backoff.wait(&shutdown).await {
            break;
        }
    }
}
