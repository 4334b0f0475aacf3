//! The real-runtime testbed: containerd 1.7 (CRI + NRI) and its helpers, unpacked into
//! `.tools/testbed/root` without touching the system's packages (shared/docs/runtime-testbed.md).
//!
//! containerd, its shims, `ctr` and the CNI plugins come from Debian trixie through a private apt
//! configuration; runc comes from bookworm (trixie's needs a newer glibc). A static pause binary
//! is built with gcc and packed as an OCI image archive for containerd's sandbox image. Everything is checked first, so a second run costs milliseconds.

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
    "pause-image.tar",
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
/// `/run/netns` as a node has it: a shared mount (as `ip netns add` and systemd leave it), so
/// the namespaces containerd pins there reach containers that mount it with `HostToContainer`
/// propagation (knd's DaemonSet pod in the container test and `demo --image`). Made here, once,
/// so that it is not counted as something a test left behind.
fn shared_netns_dir() -> anyhow::Result<()> {
    const DIR: &str = "/run/netns";
    std::fs::create_dir_all(DIR)?;
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    let line = table.lines().rfind(|l| l.split(' ').nth(4) == Some(DIR));
    if line.is_some_and(|l| l.contains(" shared:")) {
        return Ok(());
    }
    if line.is_none() {
        run_checked(
            "bind-mount /run/netns onto itself",
            Command::new("mount").args(["--bind", DIR, DIR]),
        )?;
    }
    run_checked(
        "make /run/netns a shared mount",
        Command::new("mount").args(["--make-shared", DIR]),
    )
}

pub(crate) fn install(root: &Path) -> anyhow::Result<()> {
    shared_netns_dir()?;
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
    pause_image(&testbed, &prefix)?;
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

/// The image name the testbed's containerd uses as its sandbox image.
pub(crate) const PAUSE_IMAGE: &str = "knd.test/pause:1";

/// Packs `pause` as a one-layer OCI image archive (`pause-image.tar` in `prefix`) that
/// `ctr images import` accepts without a registry.
fn pause_image(testbed: &Path, prefix: &Path) -> anyhow::Result<()> {
    let work = testbed.join("image");
    let _ignored = std::fs::remove_dir_all(&work);
    let blobs = work.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let layer = testbed.join("layer.tar");
    run_checked(
        "tar the pause binary as an image layer",
        Command::new("tar")
            .arg("-C")
            .arg(prefix)
            .args(["--owner=0", "--group=0", "-cf"])
            .arg(&layer)
            .arg("pause"),
    )?;
    let (layer_digest, layer_size) = add_blob(&blobs, &std::fs::read(&layer)?)?;
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Entrypoint":["/pause"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_digest}"]}}}}"#
    );
    let (config_digest, config_size) = add_blob(&blobs, config.as_bytes())?;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_digest}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{layer_digest}","size":{layer_size}}}]}}"#
    );
    let (manifest_digest, manifest_size) = add_blob(&blobs, manifest.as_bytes())?;
    std::fs::write(work.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    std::fs::write(
        work.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_digest}","size":{manifest_size},"annotations":{{"io.containerd.image.name":"{PAUSE_IMAGE}","org.opencontainers.image.ref.name":"1"}}}}]}}"#
        ),
    )?;
    run_checked(
        "pack the pause image",
        Command::new("tar")
            .arg("-C")
            .arg(&work)
            .arg("-cf")
            .arg(prefix.join("pause-image.tar"))
            .args(["oci-layout", "index.json", "blobs"]),
    )?;
    let _ignored = std::fs::remove_file(&layer);
    Ok(())
}

/// Stores `content` under its SHA-256 in `blobs`; returns the hex digest and the size.
fn add_blob(blobs: &Path, content: &[u8]) -> anyhow::Result<(String, usize)> {
    let scratch = blobs.join("incoming");
    std::fs::write(&scratch, content)?;
    let sum = capture(Command::new("sha256sum").arg(&scratch))?;
    let digest = sum
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?
        .to_owned();
    std::fs::rename(&scratch, blobs.join(&digest))?;
    Ok((digest, content.len()))
}
