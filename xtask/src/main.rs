//! `cargo xtask <command>`: one-command setup, tests, demo and benchmarks for knd.
//!
//! Every command runs `setup` first, so a fresh clone needs nothing else.

mod setup;
mod testbed;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "knd project automation")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install everything the build and the tests need (idempotent; seconds when done before).
    Setup {
        /// Only what building knd needs (nightly rust-src, bpf-linker): for container images.
        #[arg(long)]
        build_only: bool,
    },
    /// Format check, clippy (all crates, eBPF included, warnings denied), unit and kernel tests.
    Test {
        /// Extra arguments for the test runner (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The local end-to-end demo (root): a simulated GPU node with stand-in NICs, containerd
    /// with NRI and the real daemon, two pods given aligned NICs, live per-claim numbers.
    Demo,
    /// Run the benchmarks in bench/ (all, or one suite by name).
    Bench {
        /// One suite to run.
        suite: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root)
        .with_context(|| format!("entering the workspace at {}", root.display()))?;
    if let Task::Setup { build_only: true } = cli.command {
        return setup::build_tools(&root);
    }
    setup::run(&root)?;
    match cli.command {
        Task::Setup { .. } => Ok(()),
        Task::Test { args } => test(&args),
        Task::Demo => demo(),
        Task::Bench { suite } => bench(suite.as_deref()),
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask/ has no parent directory")
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    step("rustfmt", cargo(&["fmt", "--all", "--", "--check"]))?;
    let mut clippy = cargo(&["clippy", "--all-targets", "--", "-D", "warnings"]);
    // Clippy has its own build-script run; the eBPF object it would build is never used, and
    // the BPF code is checked by the next step.
    clippy.env("AYA_BUILD_SKIP", "1");
    step("clippy (user-space crates)", clippy)?;
    step(
        "clippy (eBPF crate, for the BPF target)",
        cargo(&[
            "+nightly",
            "clippy",
            "--package",
            "knd-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    step("doc tests", cargo(&["test", "--doc", "--quiet"]))?;
    step("fuzz the claim config parser (20 s)", fuzz("config", 20)?)?;
    step(
        "fuzz NRI's mux and ttrpc layers with runtime-side bytes (20 s)",
        fuzz("ttrpc", 20)?,
    )?;

    let mut args = vec!["nextest", "run", "--no-fail-fast"];
    if setup::is_root() {
        // Kernel tests are `#[ignore = "needs root …"]` so that without root they show as
        // ignored, never as passed. As root they all run.
        args.extend(["--run-ignored", "all"]);
    } else {
        eprintln!(
            "xtask: not root: the kernel tests (namespaces, veth, eBPF) will show as ignored; \
             run as root to execute them"
        );
    }
    args.extend(extra.iter().map(String::as_str));
    // Last, and silent after success: the test runner's own summary is the final line.
    let mut tests = cargo(&args);
    eprintln!("xtask: unit and kernel tests: {}", display(&tests));
    let status = tests.status().context("cannot start cargo nextest")?;
    if !status.success() {
        bail!("unit and kernel tests failed ({status})");
    }
    Ok(())
}

/// A bounded libFuzzer run of one target in `driver/fuzz`: new inputs go to a scratch corpus
/// under `target/`, the checked-in seeds are read only. Any crash fails the step.
fn fuzz(target: &str, seconds: u32) -> anyhow::Result<Command> {
    let corpus = PathBuf::from("target/fuzz-corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let mut command = cargo(&["+nightly", "fuzz", "run", "--sanitizer", "none"]);
    command
        .args(["--fuzz-dir", "driver/fuzz", target])
        .arg(&corpus)
        .arg(format!("driver/fuzz/seeds/{target}"))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"));
    let tools = std::fs::canonicalize(".tools/bin").context("locating .tools/bin")?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools];
    paths.extend(std::env::split_paths(&path));
    command.env(
        "PATH",
        std::env::join_paths(paths).context("building PATH")?,
    );
    Ok(command)
}

fn demo() -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    // The demo runs the real daemon as a process: build it first.
    step(
        "build knd",
        cargo(&["build", "--quiet", "--package", "knd", "--bin", "knd"]),
    )?;
    let mut run = cargo(&["run", "--quiet", "--package", "knd", "--example", "demo"]);
    run.env("KND_BIN", Path::new("target/debug/knd").canonicalize()?);
    step("demo", run)
}

fn bench(suite: Option<&str>) -> anyhow::Result<()> {
    let mut args = vec!["bench", "--package", "knd-bench"];
    if let Some(suite) = suite {
        args.extend(["--bench", suite]);
    }
    step("benchmarks", cargo(&args))
}

fn cargo(args: &[&str]) -> Command {
    let mut command = Command::new("cargo");
    command.args(args);
    command
}

/// Runs one step, printing its name and how long it took; fails naming the step.
fn step(name: &str, mut command: Command) -> anyhow::Result<()> {
    eprintln!("xtask: {name}: {}", display(&command));
    let started = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("{name}: cannot start {}", display(&command)))?;
    if !status.success() {
        bail!("{name} failed ({status}): {}", display(&command));
    }
    eprintln!("xtask: {name}: ok in {:.1?}", started.elapsed());
    Ok(())
}

fn display(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
