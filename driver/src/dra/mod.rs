//! The DRA kubelet plugin: plugin registration, the DRAPlugin service in its v1 and v1beta1
//! versions, and the DRAResourceHealth stream, served over unix sockets.

pub mod alignment;
pub mod prepare;
pub mod proto;
mod service;

use std::{
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{net::UnixListener, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use self::prepare::Preparer;
pub use self::service::{Registration, SUPPORTED_VERSIONS};
use crate::model::ports::{ClaimApi, DeviceHealth};

/// Errors that stop the plugin from serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket could not be created.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Something else occupies a socket path.
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
}

/// Where the plugin's sockets live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sockets {
    /// `<registry-dir>/<driver>-reg.sock`, watched by kubelet's plugin manager.
    pub registration: PathBuf,
    /// `<plugin-dir>/dra.sock`, the endpoint advertised to kubelet.
    pub dra: PathBuf,
}

impl Sockets {
    /// The standard layout for `driver` under the given directories.
    pub fn new(driver: &str, plugin_dir: &Path, registry_dir: &Path) -> Self {
        Self {
            registration: registry_dir.join(format!("{driver}-reg.sock")),
            dra: plugin_dir.join("dra.sock"),
        }
    }
}

/// The running plugin.
#[derive(Debug)]
pub struct Plugin {
    /// What kubelet said about the registration.
    pub registration: watch::Receiver<Registration>,
    tasks: Vec<JoinHandle<()>>,
    sockets: Sockets,
}

impl Plugin {
    /// Waits for both servers to stop (after the shutdown token is cancelled) and removes the
    /// sockets, which deregisters the plugin from kubelet.
    pub async fn join(self) {
        for task in self.tasks {
            if let Err(err) = task.await {
                tracing::error!(%err, "a plugin server task failed");
            }
        }
        for path in [&self.sockets.registration, &self.sockets.dra] {
            let _ignored = std::fs::remove_file(path);
        }
    }
}

/// Starts the DRA socket first, then the registration socket (kubelet dials the endpoint as soon
/// as it sees the registration socket), and serves until `shutdown` is cancelled.
pub fn serve<S: ClaimApi>(
    driver: &str,
    sockets: Sockets,
    preparer: Arc<Preparer<S>>,
    health: watch::Receiver<Vec<DeviceHealth>>,
    shutdown: &CancellationToken,
) -> Result<Plugin, Error> {
    let dra_listener = listen(&sockets.dra)?;
    let (registration_tx, registration) = watch::channel(Registration::Pending);
    let dra_task = spawn_server(
        "DRA",
        service::dra_router(preparer, health),
        dra_listener,
        shutdown,
    );
    let registration_listener = listen(&sockets.registration)?;
    let registrar =
        service::registration_router(driver, &sockets.dra.to_string_lossy(), registration_tx);
    let registration_task =
        spawn_server("registration", registrar, registration_listener, shutdown);
    Ok(Plugin {
        registration,
        tasks: vec![dra_task, registration_task],
        sockets,
    })
}

/// Serves `router` on `listener` until `shutdown` is cancelled.
fn spawn_server(
    name: &'static str,
    router: tonic::transport::server::Router,
    listener: UnixListener,
    shutdown: &CancellationToken,
) -> JoinHandle<()> {
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let incoming = UnixListenerStream::new(listener);
        if let Err(err) = router
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
        {
            tracing::error!(%err, server = name, "a plugin server stopped");
        }
    })
}

/// Binds a unix socket with mode 0600, replacing a stale socket left by an earlier run.
fn listen(path: &Path) -> Result<UnixListener, Error> {
    let error = |source| Error::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(error)?;
        }
        Ok(_) => return Err(Error::NotASocket(path.to_path_buf())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(error)?;
    Ok(listener)
}
