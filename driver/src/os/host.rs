//! The host-root seam: every sysfs, procfs and devfs read goes through [`HostRoot`], so the same
//! discovery runs on the live machine (`/`) and on fixture trees that copy real machines.
//!
//! Paths are resolved by the kernel with `openat2(RESOLVE_IN_ROOT)`: absolute symlinks and `..`
//! stay inside the root, as if the tree were `/` — a fixture can never reach the real machine —
//! and a whole path costs one system call rather than one per component.

use std::{
    fmt,
    fs::File,
    io::Read as _,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use nix::{
    errno::Errno,
    fcntl::{OFlag, OpenHow, ResolveFlag, openat2, readlinkat},
};

/// A directory that stands for `/` of the machine being inventoried.
#[derive(Clone)]
pub struct HostRoot {
    root: PathBuf,
    /// The root's canonical path on disk (to turn resolved paths back into host paths).
    canonical: PathBuf,
    /// The open root; `None` if it could not be opened (every read then reports that).
    fd: Option<Arc<OwnedFd>>,
}

impl PartialEq for HostRoot {
    fn eq(&self, other: &Self) -> bool {
        self.canonical == other.canonical
    }
}

impl Eq for HostRoot {}

impl fmt::Debug for HostRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostRoot({})", self.root.display())
    }
}

/// A problem with one file of the host's tree: what was read, and why it did not do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    /// The file, as a path on the host (e.g. `/sys/class/net/eth0/speed`).
    pub path: String,
    /// What was wrong with it.
    pub reason: String,
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

impl HostRoot {
    /// The tree at `root` (use `/` for the live machine).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let canonical = std::fs::canonicalize(&root).unwrap_or_else(|_| root.clone());
        let fd = File::open(&root)
            .ok()
            .filter(|f| f.metadata().is_ok_and(|m| m.is_dir()))
            .map(|f| Arc::new(OwnedFd::from(f)));
        Self {
            root,
            canonical,
            fd,
        }
    }

    /// True when this is the live machine's own root.
    pub fn is_live(&self) -> bool {
        self.canonical == Path::new("/")
    }

    /// The path of `host_path` (absolute on the host, e.g. `/sys/class/net`) inside this tree,
    /// for messages and for tools that take a path. Reads go through [`HostRoot::read`].
    pub fn path(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }

    /// Opens `host_path` inside the root with `flags` (plus `O_CLOEXEC`).
    fn open(&self, host_path: &str, flags: OFlag) -> Result<OwnedFd, Errno> {
        let fd = self.fd.as_ref().ok_or(Errno::EBADF)?;
        let relative = host_path.trim_start_matches('/');
        let relative = if relative.is_empty() { "." } else { relative };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        openat2_retrying(fd.as_ref(), relative, how)
    }

    /// Opens a host directory to read many of its entries cheaply.
    pub fn dir(&self, host_dir: &str) -> Result<HostDir, FileProblem> {
        let fd = self
            .open(host_dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
            .map_err(|errno| self.problem(host_dir, errno))?;
        Ok(HostDir {
            host: self.clone(),
            path: host_dir.trim_end_matches('/').to_owned(),
            fd,
        })
    }

    /// Names of the entries of a host directory, sorted; empty if it does not exist.
    pub fn list(&self, host_dir: &str) -> Vec<String> {
        self.open(host_dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
            .map(list_fd)
            .unwrap_or_default()
    }

    /// True if the host path exists (following links inside the tree).
    pub fn exists(&self, host_path: &str) -> bool {
        self.open(host_path, OFlag::O_PATH).is_ok()
    }

    /// The trimmed content of a host file; `Ok(None)` if it does not exist or has no value
    /// (sysfs answers `EINVAL` for e.g. the `speed` of a link that is down).
    pub fn read(&self, host_path: &str) -> Result<Option<String>, FileProblem> {
        let fd = match self.open(host_path, OFlag::O_RDONLY) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(None),
            Err(errno) => return Err(self.problem(host_path, errno)),
        };
        read_attribute(fd, host_path)
    }

    /// The base name a host symlink points to (e.g. the driver of a device), if it is a link.
    pub fn link_name(&self, host_path: &str) -> Option<String> {
        let fd = self
            .open(host_path, OFlag::O_PATH | OFlag::O_NOFOLLOW)
            .ok()?;
        let target = readlinkat(&fd, "").ok()?;
        Path::new(&target)
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
    }

    /// Resolves every symlink in a host path inside this tree and returns the host path it
    /// names (absolute, normalised). A missing path or a dangling link is a problem naming
    /// `host_path`.
    pub fn resolve(&self, host_path: &str) -> Result<String, FileProblem> {
        let fd = self
            .open(host_path, OFlag::O_PATH)
            .map_err(|errno| self.problem(host_path, errno))?;
        self.host_path_of(&fd, host_path)
    }

    /// The host path an open descriptor refers to (`host_path` only names it in messages).
    fn host_path_of(&self, fd: &OwnedFd, host_path: &str) -> Result<String, FileProblem> {
        let on_disk = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| problem(host_path, &e.to_string()))?;
        let inside = on_disk
            .strip_prefix(&self.canonical)
            .map_err(|_| problem(host_path, "resolves outside the host root"))?;
        Ok(format!("/{}", inside.to_string_lossy()))
    }

    /// A problem for `host_path` from an `openat2` error, telling a dangling link from a
    /// missing path.
    fn problem(&self, host_path: &str, errno: Errno) -> FileProblem {
        match errno {
            Errno::ENOENT => {
                let dangling = self
                    .open(host_path, OFlag::O_PATH | OFlag::O_NOFOLLOW)
                    .ok()
                    .and_then(|fd| readlinkat(&fd, "").ok());
                match dangling {
                    Some(target) => problem(
                        host_path,
                        &format!("dangling link to {}", target.to_string_lossy()),
                    ),
                    None => problem(host_path, "does not exist"),
                }
            }
            Errno::ELOOP => problem(host_path, "too many levels of symbolic links"),
            Errno::EBADF if self.fd.is_none() => problem(
                host_path,
                &format!("the host root {} cannot be opened", self.root.display()),
            ),
            other => problem(host_path, other.desc()),
        }
    }
}

/// An open directory of the host tree: reads its own entries with one-component `openat` calls.
#[derive(Debug)]
pub struct HostDir {
    host: HostRoot,
    path: String,
    fd: OwnedFd,
}

impl HostDir {
    /// The directory's host path, as it was opened (links not resolved).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The directory's host path with every link resolved.
    pub fn resolved(&self) -> Result<String, FileProblem> {
        self.host.host_path_of(&self.fd, &self.path)
    }

    fn entry(&self, name: &str) -> String {
        format!("{}/{name}", self.path)
    }

    /// Opens the directory `relative` below this one (e.g. `ports/1`), confined beneath it;
    /// anything that would leave it (an absolute or climbing link) is looked up from the root.
    pub fn subdir(&self, relative: &str) -> Result<HostDir, FileProblem> {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        match openat2_retrying(&self.fd, relative, how) {
            Ok(fd) => Ok(HostDir {
                host: self.host.clone(),
                path: self.entry(relative),
                fd,
            }),
            Err(Errno::EXDEV) => self.host.dir(&self.entry(relative)),
            Err(errno) => Err(self.host.problem(&self.entry(relative), errno)),
        }
    }

    /// [`HostRoot::read`] of the entry `name`. Plain attribute files are opened relative to the
    /// directory without following links; anything else goes through the confined lookup.
    pub fn read(&self, name: &str) -> Result<Option<String>, FileProblem> {
        if name.contains('/') {
            return self.host.read(&self.entry(name));
        }
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match nix::fcntl::openat(&self.fd, name, flags, nix::sys::stat::Mode::empty()) {
            Ok(fd) => read_attribute(fd, &self.entry(name)),
            Err(Errno::ENOENT) => Ok(None),
            // A symlink: resolve it inside the root.
            Err(Errno::ELOOP) => self.host.read(&self.entry(name)),
            Err(errno) => Err(problem(&self.entry(name), errno.desc())),
        }
    }

    /// [`HostRoot::link_name`] of the entry `name`.
    pub fn link_name(&self, name: &str) -> Option<String> {
        if name.contains('/') {
            return self.host.link_name(&self.entry(name));
        }
        let target = readlinkat(&self.fd, name).ok()?;
        Path::new(&target)
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
    }

    /// [`HostRoot::exists`] for the entry `name` (following links, inside the root).
    pub fn exists(&self, name: &str) -> bool {
        self.host.exists(&self.entry(name))
    }

    /// Names of the directory's entries, sorted.
    pub fn list(&self) -> Vec<String> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let Ok(fd) = nix::fcntl::openat(&self.fd, ".", flags, nix::sys::stat::Mode::empty()) else {
            return Vec::new();
        };
        list_fd(fd)
    }
}

/// The most knd reads of one file (a routing table of ~100 000 routes); beyond is an error.
const MAX_FILE_BYTES: usize = 16 << 20;

/// Reads a sysfs attribute or a procfs table, to the end.
fn read_attribute(fd: OwnedFd, host_path: &str) -> Result<Option<String>, FileProblem> {
    let mut file = File::from(fd);
    let mut buffer = [0_u8; 4096];
    let mut bytes = Vec::new();
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            // To the end: sysfs hands out a whole attribute in one read, but procfs tables
            // (`/proc/net/ipv6_route`) come a few whole lines per read, each read shorter than
            // the buffer, and the line that matters may be the last.
            Ok(n) => {
                bytes.extend_from_slice(&buffer[..n]);
                if bytes.len() > MAX_FILE_BYTES {
                    return Err(problem(
                        host_path,
                        &format!("longer than {MAX_FILE_BYTES} bytes"),
                    ));
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(problem(host_path, &e.to_string())),
        }
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(Some(text.trim().to_owned())),
        Err(_) => Err(problem(host_path, "not UTF-8 text")),
    }
}

fn list_fd(fd: OwnedFd) -> Vec<String> {
    let Ok(mut dir) = nix::dir::Dir::from_fd(fd) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .iter()
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str().ok().map(str::to_owned))
        .filter(|name| name != "." && name != "..")
        .collect();
    names.sort();
    names
}

fn problem(host_path: &str, reason: &str) -> FileProblem {
    FileProblem {
        path: host_path.to_owned(),
        reason: reason.to_owned(),
    }
}

/// `openat2`, retried when the kernel reports that a rename or mount elsewhere on the system
/// raced with a confined lookup (`EAGAIN` from `RESOLVE_IN_ROOT`/`RESOLVE_BENEATH`): on a node
/// where pods start and stop, mounts happen all the time, and a scan must not lose devices to
/// them.
fn openat2_retrying<Fd: std::os::fd::AsFd>(
    dirfd: Fd,
    path: &str,
    how: OpenHow,
) -> Result<OwnedFd, Errno> {
    let mut attempts = 0;
    loop {
        match openat2(dirfd.as_fd(), path, how) {
            Err(Errno::EAGAIN) if attempts < 100 => attempts += 1,
            other => return other,
        }
    }
}

/// Problems with individual files met during a scan; each names the file.
pub type Warnings = Vec<FileProblem>;

/// Reads a non-empty text attribute; a read error is a warning naming the file.
pub fn read_text(dir: &HostDir, name: &str, warnings: &mut Warnings) -> Option<String> {
    match dir.read(name) {
        Ok(value) => value.filter(|v| !v.is_empty()),
        Err(problem) => {
            warnings.push(problem);
            None
        }
    }
}

/// Reads a decimal number; garbage is a warning naming the file.
pub fn read_number(dir: &HostDir, name: &str, warnings: &mut Warnings) -> Option<u32> {
    let text = read_text(dir, name, warnings)?;
    text.parse().ok().or_else(|| {
        warnings.push(FileProblem {
            path: format!("{}/{name}", dir.path()),
            reason: format!("`{text}` is not a non-negative number"),
        });
        None
    })
}

/// Reads a `numa_node` file: `-1` means "no NUMA information" and is not a warning.
pub fn read_numa_node(dir: &HostDir, warnings: &mut Warnings) -> Option<u32> {
    match dir.read("numa_node") {
        Ok(Some(text)) if text == "-1" => None,
        _ => read_number(dir, "numa_node", warnings),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn tree() -> (tempfile::TempDir, HostRoot) {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        let dev = root.path("/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0");
        std::fs::create_dir_all(dev.join("net/eth1")).unwrap();
        std::fs::write(dev.join("numa_node"), "1\n").unwrap();
        std::fs::create_dir_all(root.path("/sys/bus/pci/devices")).unwrap();
        symlink(
            "../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0",
            root.path("/sys/bus/pci/devices/0000:01:00.0"),
        )
        .unwrap();
        std::fs::create_dir_all(root.path("/sys/class/net")).unwrap();
        symlink(
            "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/net/eth1",
            root.path("/sys/class/net/eth1"),
        )
        .unwrap();
        symlink("../../nowhere", root.path("/sys/class/net/dangling")).unwrap();
        symlink("loop", root.path("/sys/class/net/loop")).unwrap();
        (dir, root)
    }

    #[test]
    fn relative_and_absolute_links_resolve_inside_the_tree() {
        let (_dir, root) = tree();
        assert_eq!(
            root.resolve("/sys/bus/pci/devices/0000:01:00.0").unwrap(),
            "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0"
        );
        assert_eq!(
            root.resolve("/sys/class/net/eth1/../../numa_node").unwrap(),
            "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/numa_node"
        );
        assert_eq!(
            root.read("/sys/bus/pci/devices/0000:01:00.0/numa_node")
                .unwrap()
                .as_deref(),
            Some("1")
        );
    }

    #[test]
    fn absolute_links_and_dot_dot_cannot_leave_the_root() {
        let (_dir, root) = tree();
        // Outside the tree these would reach the real machine's files.
        symlink("/etc/hostname", root.path("/sys/class/net/escape")).unwrap();
        assert_eq!(root.read("/sys/class/net/escape").unwrap(), None);
        assert_eq!(root.read("/../../../../etc/hostname").unwrap(), None);
        assert_eq!(root.resolve("/sys/../../sys/bus").unwrap(), "/sys/bus");
    }

    #[test]
    fn a_missing_root_reports_itself() {
        let root = HostRoot::new("/nonexistent/host/root");
        let err = root.resolve("/sys").unwrap_err();
        assert!(
            err.reason
                .contains("/nonexistent/host/root cannot be opened"),
            "{err}"
        );
        assert!(root.list("/sys").is_empty());
    }

    #[test]
    fn missing_dangling_and_looping_paths_are_problems_not_panics() {
        let (_dir, root) = tree();
        assert_eq!(root.read("/sys/class/net/eth9/mtu").unwrap(), None);
        assert_eq!(root.read("/sys/class/net/dangling/mtu").unwrap(), None);
        let err = root.resolve("/sys/class/net/loop").unwrap_err();
        assert!(err.reason.contains("symbolic links"), "{err}");
        let dangling = root.resolve("/sys/class/net/dangling").unwrap_err();
        assert_eq!(dangling.path, "/sys/class/net/dangling");
        assert!(
            dangling.reason.contains("dangling link to ../../nowhere"),
            "{dangling}"
        );
        assert!(!root.exists("/sys/class/net/eth9"));
        assert!(!root.exists("/sys/class/net/dangling"));
        assert_eq!(root.list("/sys/class/nothing"), Vec::<String>::new());
        assert_eq!(root.list("/sys/class/net"), ["dangling", "eth1", "loop"]);
    }
}
