//! The crash-safe state store: what the driver has prepared and attached, so that a restarted
//! driver — even after SIGKILL at any instant — knows every prepared claim and every interface
//! it moved.
//!
//! One small JSON file per record, replaced atomically: written to a temporary file, fsynced,
//! renamed over the old one, and the directory fsynced. A reader therefore sees either the old or
//! the new record, never a torn one; leftover temporary files from a crash are removed at open.
//! Records that only matter while the machine runs skip the fsyncs ([`Records::put_unsynced`]):
//! still atomic, and still kept across a crash of the process.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    marker::PhantomData,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use serde::{Serialize, de::DeserializeOwned};

use crate::model::records::PreparedClaim;

/// Errors from the store. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("{operation} {path}")]
    Io {
        /// What was attempted.
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A record does not parse (written by an incompatible version, or edited by hand).
    #[error("record {path} is unreadable")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
    /// A key that is not a safe file name.
    #[error("`{0}` cannot be used as a record key")]
    BadKey(String),
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The records that could be read (by key), and an error for each that could not.
pub type Readable<T> = (Vec<(String, T)>, Vec<Error>);

/// The records that could be read (by key), and where each unreadable one was moved, with why.
pub type Quarantined<T> = (Vec<(String, T)>, Vec<(PathBuf, Error)>);

/// A directory of records of one type, keyed by a file-name-safe string; optionally with every
/// record also held in memory (for records read on hot paths, written only through this value).
#[derive(Debug)]
pub struct Records<T> {
    dir: PathBuf,
    in_memory: bool,
    cache: Option<Mutex<BTreeMap<String, T>>>,
    _type: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned + Clone> Records<T> {
    /// Opens the directory and keeps every record in memory as well: reads are served from
    /// memory, writes go to disk first and then to memory. Only for a directory this process
    /// alone writes. A record that cannot be read at open is logged (naming the file) and left
    /// out, as if it did not exist.
    pub fn open_cached(dir: impl Into<PathBuf>) -> Result<Self> {
        let mut records = Self::open(dir)?;
        let (readable, problems) = records.all_readable()?;
        for problem in problems {
            tracing::error!(problem = %crate::model::error_chain(&problem), "ignoring an unreadable record");
        }
        records.cache = Some(Mutex::new(readable.into_iter().collect()));
        Ok(records)
    }

    fn cached(&self) -> Option<MutexGuard<'_, BTreeMap<String, T>>> {
        self.cache.as_ref().map(|cache| {
            cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        })
    }

    /// Opens (creating, mode 0700) the directory and removes temporary files a crash left.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| io_error("creating", &dir, source))?;
        for entry in fs::read_dir(&dir).map_err(|source| io_error("listing", &dir, source))? {
            let path = entry
                .map_err(|source| io_error("listing", &dir, source))?
                .path();
            if path.extension().is_some_and(|e| e == "tmp") {
                fs::remove_file(&path).map_err(|source| io_error("removing", &path, source))?;
            }
        }
        Ok(Self {
            in_memory: in_memory(&dir),
            dir,
            cache: None,
            _type: PhantomData,
        })
    }

    /// Whether the records are on a filesystem in memory, where reading and writing one never
    /// waits on a disk (so they may be made on an async task rather than the blocking pool).
    pub fn in_memory(&self) -> bool {
        self.in_memory
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        let safe = !key.is_empty()
            && key.len() <= 200
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && !key.starts_with('.');
        if safe {
            Ok(self.dir.join(format!("{key}.json")))
        } else {
            Err(Error::BadKey(key.to_owned()))
        }
    }

    /// Stores `value` under `key`, replacing any earlier record atomically and durably.
    pub fn put(&self, key: &str, value: &T) -> Result<()> {
        self.write(key, value, true)?;
        self.sync_dir()?;
        if let Some(mut cache) = self.cached() {
            cache.insert(key.to_owned(), value.clone());
        }
        Ok(())
    }

    /// Stores `value` under `key`, replacing any earlier record atomically but not durably:
    /// written and renamed into place without fsync. A crash of the process at any instant
    /// (SIGKILL) loses nothing, since the written pages are the kernel's; a crash of the
    /// machine may leave the earlier record, none, or an unreadable one (which the pods store
    /// moves aside). For records that matter only while the machine runs.
    pub fn put_unsynced(&self, key: &str, value: &T) -> Result<()> {
        self.write(key, value, false)?;
        if let Some(mut cache) = self.cached() {
            cache.insert(key.to_owned(), value.clone());
        }
        Ok(())
    }

    /// Stores several records, each atomically; all are durable when this returns (one
    /// directory sync for the batch instead of one per record).
    pub fn put_all<'a>(&self, records: impl IntoIterator<Item = (&'a str, &'a T)>) -> Result<()>
    where
        T: 'a,
    {
        let mut written = Vec::new();
        for (key, value) in records {
            self.write(key, value, true)?;
            written.push((key, value));
        }
        if written.is_empty() {
            return Ok(());
        }
        self.sync_dir()?;
        if let Some(mut cache) = self.cached() {
            for (key, value) in written {
                cache.insert(key.to_owned(), value.clone());
            }
        }
        Ok(())
    }

    /// Writes one record to a temporary file, syncs it (with `sync`), and renames it into place.
    fn write(&self, key: &str, value: &T, sync: bool) -> Result<()> {
        let path = self.path(key)?;
        let temporary = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| Error::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(|source| io_error("creating", &temporary, source))?;
        file.write_all(&bytes)
            .and_then(|()| if sync { file.sync_all() } else { Ok(()) })
            .map_err(|source| io_error("writing", &temporary, source))?;
        drop(file);
        fs::rename(&temporary, &path).map_err(|source| io_error("renaming", &temporary, source))
    }

    /// The record under `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<T>> {
        let path = self.path(key)?;
        if let Some(cache) = self.cached() {
            return Ok(cache.get(key).cloned());
        }
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| Error::Corrupt { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(io_error("reading", &path, source)),
        }
    }

    /// Removes the record under `key` (no error if there is none).
    pub fn remove(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(io_error("removing", &path, source)),
        }
        if let Some(mut cache) = self.cached() {
            cache.remove(key);
        }
        Ok(())
    }

    /// The records (by key, sorted) for which `wanted` holds; from memory when cached.
    pub fn matching(&self, wanted: impl Fn(&T) -> bool) -> Result<Readable<T>> {
        if let Some(cache) = self.cached() {
            let records = cache
                .iter()
                .filter(|(_, value)| wanted(value))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            return Ok((records, Vec::new()));
        }
        let (mut records, problems) = self.all_readable()?;
        records.retain(|(_, value)| wanted(value));
        Ok((records, problems))
    }

    /// Every record, by key, sorted.
    pub fn all(&self) -> Result<Vec<(String, T)>> {
        let (records, mut problems) = self.all_readable()?;
        match problems.pop() {
            Some(problem) => Err(problem),
            None => Ok(records),
        }
    }

    /// Every record that can be read, and an error for each that cannot (a corrupt record must
    /// not stop the work on all the others).
    pub fn all_readable(&self) -> Result<Readable<T>> {
        if let Some(cache) = self.cached() {
            let records = cache.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            return Ok((records, Vec::new()));
        }
        let mut keys: Vec<String> = fs::read_dir(&self.dir)
            .map_err(|source| io_error("listing", &self.dir, source))?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".json").map(str::to_owned)
            })
            .collect();
        keys.sort();
        let mut records = Vec::with_capacity(keys.len());
        let mut problems = Vec::new();
        for key in keys {
            match self.get(&key) {
                Ok(Some(value)) => records.push((key, value)),
                Ok(None) => {}
                Err(problem) => problems.push(problem),
            }
        }
        Ok((records, problems))
    }

    /// Every record that can be read; each one that cannot is moved aside into the
    /// `quarantine` directory beside the records (kept for a human to look at, never read
    /// again) and returned with why it was unreadable.
    pub fn all_quarantining(&self) -> Result<Quarantined<T>> {
        let (records, problems) = self.all_readable()?;
        let mut moved = Vec::new();
        for problem in problems {
            let Error::Corrupt { path, .. } = &problem else {
                return Err(problem);
            };
            let quarantine = self.dir.join("quarantine");
            fs::create_dir_all(&quarantine)
                .map_err(|source| io_error("creating", &quarantine, source))?;
            let name = path.file_name().unwrap_or_default();
            let aside = quarantine.join(name);
            fs::rename(path, &aside).map_err(|source| io_error("moving aside", path, source))?;
            moved.push((aside, problem));
        }
        if !moved.is_empty() {
            self.sync_dir()?;
        }
        Ok((records, moved))
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| io_error("syncing", &self.dir, source))
    }
}

fn io_error(operation: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Io {
        operation,
        path: path.to_path_buf(),
        source,
    }
}

/// Everything the driver keeps across restarts. Claims are also held in memory (the NRI hooks
/// look up a pod's claims on every sandbox and container start), so one process at a time owns
/// a state directory; others may read `pods`.
#[derive(Debug)]
pub struct StateStore {
    /// Prepared claims by UID (durable: kubelet prepared them and may not ask again after a
    /// reboot).
    pub claims: Records<PreparedClaim>,
    /// Pods' attached interfaces by pod UID (kept across a crash of knd, not across a reboot:
    /// they describe namespaces and moved interfaces that a reboot ends).
    pub pods: Records<crate::model::records::PodRecord>,
}

impl StateStore {
    /// Opens the store with both kinds of records under `dir` (e.g. in tests).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_in(dir.as_ref(), dir.as_ref())
    }

    /// Opens the store with the claims under `state_dir` (on disk, e.g. `/var/lib/knd`) and the
    /// pods under `run_dir` (in memory on a node, e.g. `/run/knd` on tmpfs: a pod record is
    /// written twice per pod start, and there it costs no disk work). Pod records an earlier
    /// knd kept under `state_dir` move to `run_dir` first.
    pub fn open_in(state_dir: &Path, run_dir: &Path) -> Result<Self> {
        let store = Self {
            claims: Records::open_cached(state_dir.join("claims"))?,
            pods: Records::open(run_dir.join("pods"))?,
        };
        let earlier = state_dir.join("pods");
        if earlier != store.pods.dir && earlier.is_dir() {
            move_records(&earlier, &store.pods.dir)?;
        }
        Ok(store)
    }
}

/// Whether `dir` is on a filesystem in memory (tmpfs or ramfs).
pub fn in_memory(dir: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| matches!(s.filesystem_type().0, TMPFS_MAGIC | RAMFS_MAGIC))
}

/// Moves every record file (`*.json`) from `from` into `to` (a record already in `to` is the
/// newer one and stays); `from` is removed once empty.
fn move_records(from: &Path, to: &Path) -> Result<()> {
    for entry in fs::read_dir(from).map_err(|source| io_error("listing", from, source))? {
        let path = entry
            .map_err(|source| io_error("listing", from, source))?
            .path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if path.extension().is_none_or(|e| e != "json") || !path.is_file() {
            continue;
        }
        let target = to.join(name);
        if !target.exists() {
            // Across filesystems a rename is refused: copied beside, then renamed into place
            // (a crash leaves a temporary file, removed at the next open, never a torn record).
            let temporary = to.join(format!("{name}.tmp"));
            fs::rename(&path, &target)
                .or_else(|_| {
                    fs::copy(&path, &temporary).and_then(|_| fs::rename(&temporary, &target))
                })
                .map_err(|source| io_error("moving", &path, source))?;
        }
        fs::remove_file(&path)
            .or_else(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|source| io_error("removing", &path, source))?;
    }
    // What is left (a quarantine directory) stays for a human to look at.
    fs::remove_dir(from).ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::records::PreparedDevice;

    fn claim(uid: &str, generation: usize) -> PreparedClaim {
        PreparedClaim {
            uid: uid.into(),
            namespace: "ml".into(),
            name: format!("claim-{generation}"),
            pod_uids: vec!["pod-1".into()],
            devices: vec![PreparedDevice {
                requests: vec!["nic".into()],
                pool: "node-1".into(),
                device: "pci-0000-b4-00-0".into(),
                config: crate::model::config::default_config(),
                topology: None,
                share: None,
            }],
        }
    }

    #[test]
    fn records_round_trip_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store.claims.put("uid-1", &claim("uid-1", 1)).unwrap();
        store.claims.put("uid-2", &claim("uid-2", 1)).unwrap();
        store
            .claims
            .put_all([("uid-1", &claim("uid-1", 2)), ("uid-4", &claim("uid-4", 1))])
            .unwrap();
        store.claims.remove("uid-4").unwrap();
        store.claims.remove("uid-2").unwrap();
        store.claims.remove("uid-2").unwrap();
        // A crash mid-write leaves a temporary file behind: reopening cleans it up.
        fs::write(dir.path().join("claims/uid-3.json.tmp"), "{\"half").unwrap();
        let reopened = StateStore::open(dir.path()).unwrap();
        let all = reopened.claims.all().unwrap();
        assert_eq!(all, vec![("uid-1".to_owned(), claim("uid-1", 2))]);
        assert!(!dir.path().join("claims/uid-3.json.tmp").exists());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(dir.path().join("claims/uid-1.json"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn bad_keys_and_corrupt_records_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        for key in ["", "../escape", "a/b", ".hidden"] {
            assert!(
                matches!(store.claims.get(key), Err(Error::BadKey(_))),
                "{key}"
            );
        }
        fs::write(dir.path().join("pods/uid-9.json"), "not json").unwrap();
        let err = store.pods.get("uid-9").unwrap_err().to_string();
        assert!(err.contains("uid-9.json"), "{err}");
    }

    #[test]
    fn cached_records_follow_writes_and_skip_what_they_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("claims")).unwrap();
        fs::write(dir.path().join("claims/bad.json"), "not json").unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(store.claims.get("bad").unwrap(), None);
        store.claims.put("uid-1", &claim("uid-1", 1)).unwrap();
        let mut other = claim("uid-2", 1);
        other.pod_uids = vec!["pod-2".into()];
        store.claims.put_all([("uid-2", &other)]).unwrap();
        let (for_pod_2, _) = store
            .claims
            .matching(|c| c.pod_uids.iter().any(|p| p == "pod-2"))
            .unwrap();
        assert_eq!(for_pod_2, vec![("uid-2".to_owned(), other)]);
        store.claims.remove("uid-1").unwrap();
        assert_eq!(store.claims.get("uid-1").unwrap(), None);
        // What is in memory is what is on disk.
        let fresh = Records::<PreparedClaim>::open(dir.path().join("claims")).unwrap();
        let (on_disk, problems) = fresh.all_readable().unwrap();
        assert_eq!(on_disk, store.claims.all().unwrap());
        assert_eq!(problems.len(), 1, "the unreadable record is still there");
    }

    #[test]
    fn pod_records_an_earlier_knd_kept_with_the_claims_move_to_the_run_directory() {
        let (state, run) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let pod = |uid: &str, pod: &str| crate::model::records::PodRecord {
            pod_uid: uid.into(),
            pod: pod.into(),
            netns: "/var/run/netns/cni-1".into(),
            netns_id: None,
            attachments: Vec::new(),
            failure: None,
            detached: false,
        };
        let earlier = StateStore::open(state.path()).unwrap();
        earlier.claims.put("uid-1", &claim("uid-1", 1)).unwrap();
        earlier.pods.put("pod-1", &pod("pod-1", "ml/old")).unwrap();
        earlier.pods.put("pod-2", &pod("pod-2", "ml/old")).unwrap();
        // A record already in the run directory is the newer one.
        let newer = Records::open(run.path().join("pods")).unwrap();
        newer.put("pod-2", &pod("pod-2", "ml/new")).unwrap();

        let store = StateStore::open_in(state.path(), run.path()).unwrap();
        assert_eq!(store.claims.all().unwrap().len(), 1);
        assert_eq!(
            store.pods.all().unwrap(),
            vec![
                ("pod-1".to_owned(), pod("pod-1", "ml/old")),
                ("pod-2".to_owned(), pod("pod-2", "ml/new")),
            ]
        );
        assert!(!state.path().join("pods").exists());
        store
            .pods
            .put_unsynced("pod-3", &pod("pod-3", "ml/x"))
            .unwrap();
        assert!(run.path().join("pods/pod-3.json").is_file());
    }
}
