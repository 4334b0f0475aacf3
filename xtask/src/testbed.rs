//! The real-runtime testbed: containerd 1.7 (CRI + NRI) and its helpers, unpacked into
//! `.tools/testbed/root` without touching the system's packages (shared/docs/runtime-testbed.md).
//!
//! containerd, its shims, `ctr` and the CNI plugins come from Debian trixie through a private apt
//! configuration; runc comes from bookworm (trixie's needs a newer glibc). A static pause binary
//! is built with gcc. Everything is checked first, so a second run costs milliseconds.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, ensure};

use crate::setup::{capture, run_checked};

/// `(package, suite)` unpacked into the testbed root.
const PACKAGES: &[(&str, &str)] = &[
    ("containerd", "trixie"),
    ("containernetworking-plugins", "trixie"),
    ("runc", "bookworm"),
];

/// Binaries the tests need, relative to the testbed root.
pub(crate) const BINARIES: &[&str] = &[
    "usr/bin/containerd",
    "usr/bin/containerd-shim-runc-v2",
    "usr/bin/ctr",
    "usr/sbin/runc",
    "usr/lib/cni/bridge",
    "usr/lib/cni/host-local",
    "usr/lib/cni/loopback",
    "pause",
];

const PAUSE_C: &str = r"
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
";

/// The testbed's directory under the workspace.
pub(crate) fn dir(root: &Path) -> PathBuf {
    root.join(".tools/testbed")
}

/// Downloads and unpacks what is missing (root needed only when something is).
pub(crate) fn install(root: &Path) -> anyhow::Result<()> {
    let testbed = dir(root);
    let prefix = testbed.join("root");
    if BINARIES.iter().all(|b| prefix.join(b).exists()) {
        eprintln!("xtask: setup: runtime testbed binaries present");
        return Ok(());
    }
    let started = Instant::now();
    std::fs::create_dir_all(&prefix).with_context(|| format!("creating {}", prefix.display()))?;
    let debs = testbed.join("debs");
    std::fs::create_dir_all(&debs)?;
    for suite in ["trixie", "bookworm"] {
        let wanted: Vec<&str> = PACKAGES
            .iter()
            .filter(|(_, s)| *s == suite)
            .map(|(p, _)| *p)
            .collect();
        let apt = private_apt(&testbed, suite)?;
        run_checked(
            &format!("apt-get update ({suite}, private lists)"),
            Command::new("apt-get").args(&apt).args(["update", "-q"]),
        )?;
        run_checked(
            &format!("apt-get download {} ({suite})", wanted.join(" ")),
            Command::new("apt-get")
                .args(&apt)
                .arg("download")
                .args(&wanted)
                .current_dir(&debs),
        )?;
    }
    for entry in std::fs::read_dir(&debs)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            run_checked(
                &format!(
                    "dpkg -x {}",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ),
                Command::new("dpkg").arg("-x").arg(&path).arg(&prefix),
            )?;
        }
    }
    let source = testbed.join("pause.c");
    std::fs::write(&source, PAUSE_C)?;
    run_checked(
        "gcc -static pause.c (the sandbox's pause process)",
        Command::new("gcc")
            .args(["-Os", "-static", "-o"])
            .arg(prefix.join("pause"))
            .arg(&source),
    )?;
    for binary in BINARIES {
        ensure!(
            prefix.join(binary).exists(),
            "the testbed is missing {binary} after unpacking"
        );
    }
    let version = capture(Command::new(prefix.join("usr/bin/containerd")).arg("--version"))?;
    eprintln!(
        "xtask: setup: runtime testbed ready ({}) in {:.1?}",
        version.trim(),
        started.elapsed()
    );
    Ok(())
}

/// apt options that use only a private sources file and private lists for `suite`, from the
/// same Debian mirror the system uses.
fn private_apt(testbed: &Path, suite: &str) -> anyhow::Result<Vec<String>> {
    let parts = testbed.join(format!("apt-{suite}"));
    let lists = parts.join("lists");
    std::fs::create_dir_all(lists.join("partial"))?;
    let mirror = system_mirror().unwrap_or_else(|| "http://deb.debian.org/debian".to_owned());
    std::fs::write(
        parts.join("knd-testbed.sources"),
        format!(
            "Types: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )?;
    Ok(vec![
        "-o".into(),
        "Dir::Etc::sourcelist=/dev/null".into(),
        "-o".into(),
        format!("Dir::Etc::sourceparts={}", parts.display()),
        "-o".into(),
        format!("Dir::State::Lists={}", lists.display()),
        "-o".into(),
        "APT::Get::List-Cleanup=0".into(),
    ])
}

/// The system's Debian mirror (the first `URIs:` of a deb822 source that serves `debian`).
fn system_mirror() -> Option<String> {
    let text = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("URIs:"))
        .map(str::trim)
        .find(|uri| uri.ends_with("/debian"))
        .map(str::to_owned)
}
