//! The host-root seam: every sysfs, procfs and devfs read goes through [`HostRoot`], so the same
//! discovery runs on the live machine (`/`) and on fixture trees that copy real machines.

use std::{
    fmt, io,
    path::{Component, Path, PathBuf},
};

/// How many symlinks one resolution may follow before it is declared a loop.
const MAX_LINK_HOPS: usize = 40;

/// A directory that stands for `/` of the machine being inventoried.
#[derive(Clone, PartialEq, Eq)]
pub struct HostRoot {
    root: PathBuf,
}

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
        Self { root: root.into() }
    }

    /// True when this is the live machine's own root.
    pub fn is_live(&self) -> bool {
        self.root == Path::new("/")
    }

    /// The path of `host_path` (absolute on the host, e.g. `/sys/class/net`) inside this tree.
    pub fn path(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }

    /// Names of the entries of a host directory, sorted; empty if it does not exist.
    pub fn list(&self, host_dir: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.path(host_dir)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }

    /// True if the host path exists (following links inside the tree).
    pub fn exists(&self, host_path: &str) -> bool {
        self.resolve(host_path).is_ok()
    }

    /// The trimmed content of a host file; `Ok(None)` if it does not exist.
    pub fn read(&self, host_path: &str) -> Result<Option<String>, FileProblem> {
        let resolved = match self.walk(host_path) {
            Ok(resolved) => resolved,
            Err(Walk::Missing(_)) => return Ok(None),
            Err(Walk::Problem(problem)) => return Err(problem),
        };
        match std::fs::read(self.path(&resolved)) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => Ok(Some(text.trim().to_owned())),
                Err(_) => Err(problem(host_path, "not UTF-8 text")),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // sysfs answers EINVAL for e.g. `speed` of a link that is down: "no value".
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(e) => Err(problem(host_path, &e.to_string())),
        }
    }

    /// The base name a host symlink points to (e.g. the driver of a device), if it is a link.
    pub fn link_name(&self, host_path: &str) -> Option<String> {
        let target = std::fs::read_link(self.path(host_path)).ok()?;
        target
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
    }

    /// Resolves every symlink in a host path inside this tree and returns the host path it
    /// names (absolute, normalised). Absolute link targets are taken relative to the tree's root,
    /// so a fixture can never escape into the real machine. A missing path or a dangling link is
    /// a problem naming `host_path` (and where its links led).
    pub fn resolve(&self, host_path: &str) -> Result<String, FileProblem> {
        self.walk(host_path).map_err(|walk| match walk {
            Walk::Problem(problem) => problem,
            Walk::Missing(missing) if missing == host_path => problem(host_path, "does not exist"),
            Walk::Missing(missing) => problem(
                host_path,
                &format!("dangling link: {missing} does not exist"),
            ),
        })
    }

    fn walk(&self, host_path: &str) -> Result<String, Walk> {
        let mut resolved: Vec<String> = Vec::new();
        let mut pending: Vec<String> = components(host_path).into_iter().rev().collect();
        let mut hops = 0;
        while let Some(part) = pending.pop() {
            match part.as_str() {
                "." => continue,
                ".." => {
                    resolved.pop();
                    continue;
                }
                _ => {}
            }
            resolved.push(part);
            let current = format!("/{}", resolved.join("/"));
            let on_disk = self.path(&current);
            let metadata = match std::fs::symlink_metadata(&on_disk) {
                Ok(metadata) => metadata,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(Walk::Missing(current));
                }
                Err(e) => return Err(Walk::Problem(problem(&current, &e.to_string()))),
            };
            if !metadata.file_type().is_symlink() {
                continue;
            }
            hops += 1;
            if hops > MAX_LINK_HOPS {
                return Err(Walk::Problem(problem(
                    host_path,
                    "too many levels of symbolic links",
                )));
            }
            let target = std::fs::read_link(&on_disk)
                .map_err(|e| Walk::Problem(problem(&current, &e.to_string())))?;
            let target = target.to_string_lossy().into_owned();
            resolved.pop();
            if target.starts_with('/') {
                resolved.clear();
            }
            pending.extend(components(&target).into_iter().rev());
        }
        Ok(format!("/{}", resolved.join("/")))
    }
}

fn problem(host_path: &str, reason: &str) -> FileProblem {
    FileProblem {
        path: host_path.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Why a walk through the tree stopped.
enum Walk {
    /// This host path (reached after following links) does not exist.
    Missing(String),
    /// Anything else.
    Problem(FileProblem),
}

fn components(path: &str) -> Vec<String> {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".to_owned()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
        })
        .collect()
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
    fn missing_dangling_and_looping_paths_are_problems_not_panics() {
        let (_dir, root) = tree();
        assert_eq!(root.read("/sys/class/net/eth9/mtu").unwrap(), None);
        assert_eq!(root.read("/sys/class/net/dangling/mtu").unwrap(), None);
        let err = root.resolve("/sys/class/net/loop").unwrap_err();
        assert!(err.reason.contains("symbolic links"), "{err}");
        let dangling = root.resolve("/sys/class/net/dangling").unwrap_err();
        assert_eq!(dangling.path, "/sys/class/net/dangling");
        assert!(
            dangling.reason.contains("/sys/nowhere does not exist"),
            "{dangling}"
        );
        assert!(!root.exists("/sys/class/net/dangling"));
        assert_eq!(root.list("/sys/class/nothing"), Vec::<String>::new());
        assert_eq!(root.list("/sys/class/net"), ["dangling", "eth1", "loop"]);
    }
}
