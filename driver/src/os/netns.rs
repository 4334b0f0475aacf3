//! Network namespaces: handles that keep a namespace alive, and running work inside one.
//!
//! Entering a namespace changes the calling *thread*. Work that must happen in a namespace (netlink
//! sockets, TCX attachment by interface name, sockets for traffic) therefore runs on a dedicated
//! thread that enters it and then exits, so no pooled thread — and never an async runtime worker —
//! is left in a foreign namespace.

use std::{
    fmt,
    fs::File,
    future::Future,
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns, unshare};

/// Errors from namespace handling. Each names the operation and the namespace it concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {path}")]
    Open {
        /// The namespace file (e.g. `/proc/<pid>/ns/net` or `/run/netns/<name>`).
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// `setns(2)` into the namespace failed (not root, or not a network namespace).
    #[error("cannot enter network namespace {namespace}")]
    Enter {
        /// The namespace, as displayed by [`Netns`].
        namespace: String,
        /// What the kernel said.
        #[source]
        source: nix::Error,
    },
    /// `unshare(CLONE_NEWNET)` failed while creating a namespace.
    #[error("cannot create a network namespace")]
    Create(#[source] nix::Error),
    /// The worker thread for the namespace could not be spawned.
    #[error("cannot spawn a thread for network namespace {namespace}")]
    Spawn {
        /// The namespace, as displayed by [`Netns`].
        namespace: String,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The per-namespace async runtime could not be built.
    #[error("cannot start a runtime inside network namespace {namespace}")]
    Runtime {
        /// The namespace, as displayed by [`Netns`].
        namespace: String,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Reading the namespace cookie failed.
    #[error("cannot read the cookie of network namespace {namespace}")]
    Cookie {
        /// The namespace, as displayed by [`Netns`].
        namespace: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An open network namespace. The namespace lives at least as long as this handle.
pub struct Netns {
    fd: OwnedFd,
    /// Where it came from, for messages only.
    origin: Origin,
}

#[derive(Clone)]
enum Origin {
    Path(PathBuf),
    Created,
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::Path(path) => write!(f, "{}", path.display()),
            Origin::Created => write!(f, "anonymous netns (fd {})", self.fd.as_raw_fd()),
        }
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Netns {
    /// Opens the namespace at `path` (`/proc/<pid>/ns/net`, `/run/netns/<name>`, or the path a
    /// container runtime reports for a pod sandbox).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            fd: file.into(),
            origin: Origin::Path(path.to_path_buf()),
        })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// Creates a new, empty network namespace (it has only a `lo`, down). It is destroyed, with
    /// every interface in it, when the last handle and the last process inside it are gone.
    pub fn create() -> Result<Self> {
        let fd = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("knd-netns-new".into())
                .spawn_scoped(scope, || -> Result<OwnedFd> {
                    // This thread exits right after, so its namespace change dies with it.
                    unshare(CloneFlags::CLONE_NEWNET).map_err(Error::Create)?;
                    let file =
                        File::open("/proc/thread-self/ns/net").map_err(|source| Error::Open {
                            path: "/proc/thread-self/ns/net".into(),
                            source,
                        })?;
                    Ok(file.into())
                })
                .map_err(|source| Error::Spawn {
                    namespace: "new".into(),
                    source,
                })?
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        Ok(Self {
            fd,
            origin: Origin::Created,
        })
    }

    /// Whether `path` is a namespace (an nsfs file: a mounted or `/proc` namespace), not the
    /// empty file a namespace was mounted on and that outlives it.
    pub fn is_namespace_file(path: &Path) -> bool {
        const NSFS_MAGIC: i64 = 0x6e73_6673;
        nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC)
    }

    /// Whether the calling thread is in this namespace (same nsfs inode).
    pub fn is_current(&self) -> bool {
        let inode = |stat: nix::sys::stat::FileStat| (stat.st_dev, stat.st_ino);
        match (
            nix::sys::stat::fstat(&self.fd),
            nix::sys::stat::stat("/proc/thread-self/ns/net"),
        ) {
            (Ok(this), Ok(current)) => inode(this) == inode(current),
            _ => false,
        }
    }

    /// Another handle to the same namespace.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
            origin: self.origin.clone(),
        })
    }

    /// Runs `work` on a fresh thread that has entered this namespace, and returns its result.
    ///
    /// Blocks the caller until `work` is done: call it from a blocking context (see
    /// [`Netns::run_async`] for async callers). A panic in `work` is propagated.
    pub fn run<R, F>(&self, work: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let namespace = self.to_string();
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("knd-netns".into())
                .spawn_scoped(scope, || -> Result<R> {
                    self.enter_current_thread()?;
                    Ok(work())
                })
                .map_err(|source| Error::Spawn { namespace, source })?
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Like [`Netns::run`], for async callers: the async runtime's thread is never blocked and
    /// never enters the namespace.
    pub async fn run_async<R, F>(&self, work: F) -> Result<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let handle = self.try_clone().map_err(|source| Error::Spawn {
            namespace: self.to_string(),
            source,
        })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let namespace = self.to_string();
        std::thread::Builder::new()
            .name("knd-netns".into())
            .spawn(move || {
                let result = handle.enter_current_thread().map(|()| work());
                // The receiver may be gone if the caller was cancelled; the result is then moot.
                let _unused = tx.send(result);
            })
            .map_err(|source| Error::Spawn {
                namespace: namespace.clone(),
                source,
            })?;
        // The sender is only dropped unsent if the thread panicked: re-raise it in the caller.
        let Ok(result) = rx.await else {
            panic!("worker thread for {namespace} panicked")
        };
        result
    }

    /// Runs async `work` inside this namespace on a dedicated thread with its own single-threaded
    /// runtime, so sockets it opens (netlink, TCP, …) belong to the namespace.
    pub fn block_on<R, F, Fut>(&self, work: F) -> Result<R>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = R>,
        R: Send,
    {
        let namespace = self.to_string();
        self.run(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| Error::Runtime { namespace, source })?;
            Ok(runtime.block_on(work()))
        })?
    }

    /// [`Netns::block_on`] for async callers: async `work` runs on a dedicated thread inside
    /// this namespace with its own single-threaded runtime, and the caller's runtime is never
    /// blocked and never enters the namespace.
    pub async fn block_on_async<R, F, Fut>(&self, work: F) -> Result<R>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = R>,
        R: Send + 'static,
    {
        let namespace = self.to_string();
        self.run_async(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| Error::Runtime { namespace, source })?;
            Ok(runtime.block_on(work()))
        })
        .await?
    }

    /// The namespace's cookie: a 64-bit identifier that the kernel never reuses while the system
    /// runs, and that eBPF programs read with `bpf_get_netns_cookie`.
    pub fn cookie(&self) -> Result<u64> {
        let namespace = self.to_string();
        self.run(|| socket_netns_cookie().map_err(|source| Error::Cookie { namespace, source }))?
    }

    /// Moves the calling thread into this namespace.
    fn enter_current_thread(&self) -> Result<()> {
        setns(&self.fd, CloneFlags::CLONE_NEWNET).map_err(|source| Error::Enter {
            namespace: self.to_string(),
            source,
        })
    }
}

/// Reads `SO_NETNS_COOKIE` from a throwaway socket opened in the calling thread's namespace.
pub(crate) fn socket_netns_cookie() -> io::Result<u64> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    // An unbound UDP socket: works even in a fresh namespace whose `lo` is still down.
    let socket = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).expect("8 fits in socklen_t");
    // SAFETY: `cookie` and `len` are valid for writes of the sizes passed; the fd stays open for
    // the duration of the call (owned by `socket`).
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_names_the_missing_path() {
        let err = Netns::open("/nonexistent/ns/net").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ns/net"), "{err}");
    }

    #[test]
    fn current_namespace_has_a_stable_cookie() {
        let cookie = socket_netns_cookie().unwrap();
        assert_ne!(cookie, 0);
        assert_eq!(socket_netns_cookie().unwrap(), cookie);
    }

    #[test]
    #[ignore = "needs root: creates network namespaces (cargo xtask test runs it as root)"]
    fn created_namespaces_are_distinct_and_isolated() {
        let a = Netns::create().unwrap();
        let b = Netns::create().unwrap();
        let host = socket_netns_cookie().unwrap();
        let (ca, cb) = (a.cookie().unwrap(), b.cookie().unwrap());
        assert_ne!(ca, cb);
        assert_ne!(ca, host);
        // Same namespace through another handle: same cookie.
        assert_eq!(a.try_clone().unwrap().cookie().unwrap(), ca);
        // The calling thread did not move.
        assert_eq!(socket_netns_cookie().unwrap(), host);
    }

    #[tokio::test]
    #[ignore = "needs root: creates network namespaces (cargo xtask test runs it as root)"]
    async fn async_callers_run_work_inside_without_moving_the_runtime() {
        let ns = Netns::create().unwrap();
        let expected = ns.cookie().unwrap();
        let inside = ns.run_async(socket_netns_cookie).await.unwrap().unwrap();
        assert_eq!(inside, expected);
        assert_ne!(socket_netns_cookie().unwrap(), expected);
    }
}
