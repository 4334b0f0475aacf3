//! What a test run left behind on the machine: processes of the runtime testbed and of knd,
//! host interfaces, mounts (namespace files among them) that were not there before it. Taken
//! from `/proc` and `/sys` before and after; the difference fails `cargo xtask test`, naming
//! each thing found.

use std::{collections::BTreeSet, path::Path};

/// What the machine has that a run could leave behind.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    processes: BTreeSet<(u32, String)>,
    links: BTreeSet<String>,
    mounts: BTreeSet<String>,
}

/// Names a process is known by if a test run started it: knd itself and the runtime testbed
/// (containerd, its shims, runc, the pods' pause processes).
const OURS: [&str; 5] = [
    "knd",
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "pause",
];

impl Snapshot {
    /// The machine now.
    pub(crate) fn take() -> Self {
        let mut snapshot = Self::default();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Some(what) = ours(&entry.path()) {
                snapshot.processes.insert((pid, what));
            }
        }
        for entry in std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
        {
            snapshot
                .links
                .insert(entry.file_name().to_string_lossy().into_owned());
        }
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in table.lines() {
            // Mount point and filesystem type: "... <point> <options> [tags] - <type> <source> ..."
            let fields: Vec<&str> = line.split(' ').collect();
            let kind = line.split(" - ").nth(1).and_then(|t| t.split(' ').next());
            if let (Some(point), Some(kind)) = (fields.get(4), kind) {
                snapshot.mounts.insert(format!("{point} ({kind})"));
            }
        }
        snapshot
    }

    /// What `later` has that this one had not, one line each.
    pub(crate) fn left_behind(&self, later: &Self) -> Vec<String> {
        let mut found = Vec::new();
        for (pid, what) in later.processes.difference(&self.processes) {
            found.push(format!("process {pid}: {what}"));
        }
        for link in later.links.difference(&self.links) {
            found.push(format!("interface {link}"));
        }
        for mount in later.mounts.difference(&self.mounts) {
            found.push(format!("mount {mount}"));
        }
        found
    }
}

/// The command line of the process at `/proc/<pid>` if it is one a run may have started, alive
/// (a zombie holds nothing and goes with its parent).
fn ours(process: &Path) -> Option<String> {
    let stat = std::fs::read_to_string(process.join("stat")).ok()?;
    if stat.rsplit(')').next()?.trim_start().starts_with('Z') {
        return None;
    }
    let cmdline = std::fs::read(process.join("cmdline")).ok()?;
    let words: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let program = Path::new(words.first()?).file_name()?.to_string_lossy();
    let knd_run = program == "knd" && words.get(1).is_some_and(|w| w == "run");
    (knd_run
        || (program != "knd" && OURS.contains(&program.as_ref()))
        || words.iter().any(|w| w.contains("/knd-containerd-")))
    .then(|| words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_process_link_or_mount_is_named_and_old_ones_are_not() {
        let before = Snapshot {
            processes: [(1, "containerd --config /etc".to_owned())].into(),
            links: ["lo".to_owned(), "eth0".to_owned()].into(),
            mounts: ["/ (ext4)".to_owned()].into(),
        };
        let mut after = Snapshot {
            processes: before.processes.clone(),
            links: before.links.clone(),
            mounts: before.mounts.clone(),
        };
        assert!(before.left_behind(&after).is_empty());
        after.processes.insert((42, "pause".into()));
        after.links.insert("kndt1a2b0".into());
        after
            .mounts
            .insert("/tmp/knd-containerd-x/netns/cni-1 (nsfs)".into());
        after.links.remove("eth0");
        assert_eq!(
            before.left_behind(&after),
            [
                "process 42: pause",
                "interface kndt1a2b0",
                "mount /tmp/knd-containerd-x/netns/cni-1 (nsfs)"
            ]
        );
    }

    #[test]
    fn this_process_is_not_one_of_ours_but_a_testbed_process_would_be() {
        assert_eq!(ours(Path::new("/proc/self")), None);
    }
}
