//! `cargo xtask <command>`: one-command setup, tests, demo and benchmarks for knd.
//!
//! Every command runs `setup` first, so a fresh clone needs nothing else.

mod image;
mod leftovers;
mod setup;
mod testbed;

use std::{
    fmt::Write as _,
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
    Demo {
        /// Run the daemon from its container image (`cargo xtask image`), started through CRI
        /// with the DaemonSet's security context, environment, arguments and mounts.
        #[arg(long)]
        image: bool,
    },
    /// Build knd's OCI image (from scratch, nothing pulled) into target/oci/knd.tar.
    Image {
        /// The binary's build profile.
        #[arg(long, value_enum, default_value = "release")]
        profile: image::Profile,
        /// Only copy the image's files into this directory (deploy/Dockerfile's build stage).
        #[arg(long)]
        rootfs: Option<PathBuf>,
        /// Where to write the archive (default target/oci/knd.tar).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Run the benchmarks in bench/ (all, or one suite by name) and write JSON, Markdown and SVG
    /// charts under bench-results/ (or `$KND_BENCH_RESULTS`), with index.md over all of them.
    Bench {
        /// One suite: discovery, prepare, api, attach, container, telemetry, collectives or
        /// placement.
        suite: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root)
        .with_context(|| format!("entering the workspace at {}", root.display()))?;
    match &cli.command {
        Task::Setup { build_only: true } => return setup::build_tools(&root),
        // deploy/Dockerfile's build stage: its own packages, no test tools.
        Task::Image {
            profile,
            rootfs: Some(rootfs),
            ..
        } => {
            setup::build_tools(&root)?;
            return image::run(&root, *profile, Some(rootfs), None);
        }
        _ => {}
    }
    setup::run(&root)?;
    match cli.command {
        Task::Setup { .. } => Ok(()),
        Task::Test { args } => test(&args),
        Task::Demo { image } => demo(&root, image),
        Task::Image {
            profile, output, ..
        } => image::run(&root, profile, None, output.as_deref()),
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
    // Silent after success: the test runner's own summary is its final line.
    let mut tests = cargo(&args);
    if setup::is_root() {
        // The container test runs the daemon from its image, assembled as `cargo xtask image`
        // does (from the test profile's binary, which the tests build anyway).
        let binary = image::build_binary(image::Profile::Dev)?;
        let archive = std::env::current_dir()?.join(image::DEV_ARCHIVE);
        let started = Instant::now();
        let built = image::write_archive(
            &image::files(&binary)?,
            &image::daemonset_reference(Path::new("."))?,
            &archive,
        )?;
        eprintln!(
            "xtask: image for the container test: {} {} in {:.1?}",
            built.archive.display(),
            built.digest,
            started.elapsed()
        );
        tests.env("KND_IMAGE", &built.archive);
    }
    eprintln!("xtask: unit and kernel tests: {}", display(&tests));
    let before = leftovers::Snapshot::take();
    let status = tests.status().context("cannot start cargo nextest")?;
    let left = left_behind(&before);
    if !status.success() {
        bail!("unit and kernel tests failed ({status})");
    }
    left?;
    if setup::is_root() && extra.is_empty() {
        // End to end, as a user sees it: the demo's checks (NICs in the pods, NCCL settings in
        // the containers, counters equal to the kernel's, a real link's taint) fail the run.
        demo(&workspace_root()?, false)?;
    }
    Ok(())
}

/// Fails naming every process, interface and mount that was not there at `before` and is
/// still there (after a few seconds' grace for shims that are still exiting).
fn left_behind(before: &leftovers::Snapshot) -> anyhow::Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let found = before.left_behind(&leftovers::Snapshot::take());
        if found.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            for thing in &found {
                eprintln!("xtask: left behind: {thing}");
            }
            bail!(
                "the run left {} things behind on this machine (listed above)",
                found.len()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
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

fn demo(root: &Path, from_image: bool) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    let mut run = cargo(&["run", "--quiet", "--package", "knd", "--example", "demo"]);
    if from_image {
        // The shipped artifact: the release image, run by containerd as the DaemonSet says.
        image::run(root, image::Profile::Release, None, None)?;
        run.env("KND_IMAGE", root.join(image::ARCHIVE));
    } else {
        // The real daemon as a process: build it first.
        run.env("KND_BIN", image::build_binary(image::Profile::Dev)?);
    }
    let before = leftovers::Snapshot::take();
    let outcome = step("demo", run);
    let left = left_behind(&before);
    outcome.and(left)
}

/// The suites in bench/, in the order `cargo xtask bench` runs them.
const SUITES: [&str; 9] = [
    "discovery",
    "prepare",
    "api",
    "attach",
    "container",
    "telemetry",
    "collectives",
    "sharing",
    "placement",
];

/// Runs one suite or all; each writes `<suite>.json`, `.md` and SVG charts into the results
/// directory, and this puts them together in `index.md` and `index.json`.
fn bench(only: Option<&str>) -> anyhow::Result<()> {
    let suites: Vec<&str> = match only {
        Some(suite) if SUITES.contains(&suite) => vec![suite],
        Some(suite) => bail!(
            "no benchmark suite {suite}; the suites: {}",
            SUITES.join(", ")
        ),
        None => SUITES.to_vec(),
    };
    let results = std::env::var_os("KND_BENCH_RESULTS")
        .map_or_else(|| PathBuf::from("bench-results"), PathBuf::from);
    let results = std::path::absolute(&results)?;
    std::fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
    let started = Instant::now();
    let executables = build_benches(&suites)?;
    if suites.contains(&"container") {
        // The container suite compares the release binary with the image made of it.
        image::run(Path::new("."), image::Profile::Release, None, None)?;
    }
    let mut ran = Vec::new();
    for suite in &suites {
        // The built executable itself, so that edits made while the suites run change nothing.
        let mut run = Command::new(&executables[*suite]);
        run.arg("--bench")
            .env("KND_IMAGE", std::path::absolute(image::ARCHIVE)?)
            .env("KND_BIN", std::path::absolute("target/release/knd")?)
            .current_dir("bench")
            .env("KND_BENCH_RESULTS", &results);
        let suite_started = Instant::now();
        let outcome = step(&format!("benchmark {suite}"), run);
        ran.push((
            *suite,
            suite_started.elapsed().as_secs_f64(),
            outcome.is_ok(),
        ));
        if let Err(error) = outcome {
            eprintln!("xtask: {error:#}; going on with the other suites");
        }
    }
    let index = write_index(&results, &ran, started.elapsed().as_secs_f64())?;
    println!("xtask: benchmark results: {}", index.display());
    let failed: Vec<&str> = ran.iter().filter(|r| !r.2).map(|r| r.0).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("benchmark suites failed: {}", failed.join(", "))
    }
}

/// Builds the suites' executables; returns them by suite.
fn build_benches(suites: &[&str]) -> anyhow::Result<std::collections::HashMap<String, PathBuf>> {
    let mut build = cargo(&[
        "bench",
        "--package",
        "knd-bench",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for suite in suites {
        build.args(["--bench", suite]);
    }
    eprintln!("xtask: build the benchmarks: {}", display(&build));
    let started = Instant::now();
    let output = build
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot start cargo")?;
    if !output.status.success() {
        bail!("building the benchmarks failed ({})", output.status);
    }
    let mut executables = std::collections::HashMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_bench = message["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bench"));
        if let (true, Some(name), Some(executable)) = (
            is_bench,
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            executables.insert(name.to_owned(), PathBuf::from(executable));
        }
    }
    for suite in suites {
        if !executables.contains_key(*suite) {
            bail!("cargo built no executable for benchmark {suite}");
        }
    }
    eprintln!(
        "xtask: build the benchmarks: ok in {:.1?}",
        started.elapsed()
    );
    Ok(executables)
}

/// `index.md` (the machine, then every suite's Markdown) and `index.json`.
fn write_index(dir: &Path, ran: &[(&str, f64, bool)], total: f64) -> anyhow::Result<PathBuf> {
    let output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let (date, kernel) = (
        output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        output("uname", &["-r"]),
    );
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mut markdown = format!(
        "# knd benchmarks\n\n{date} · Linux {kernel} · {cpus} CPUs · {total:.0} s in all (build \
         included)\n\n| suite | seconds | result |\n| :--- | ---: | :--- |\n"
    );
    for (suite, seconds, ok) in ran {
        let result = if *ok {
            format!("[{suite}.md]({suite}.md)")
        } else {
            "FAILED".to_owned()
        };
        let _ = writeln!(markdown, "| {suite} | {seconds:.0} | {result} |");
    }
    let mut suites = Vec::new();
    for (suite, seconds, ok) in ran {
        let path = dir.join(format!("{suite}.md"));
        if *ok {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("{suite} wrote no {}", path.display()))?;
            markdown.push('\n');
            markdown.push_str(&text);
        }
        suites.push(serde_json::json!({
            "suite": suite, "seconds": seconds, "ok": ok, "json": format!("{suite}.json"),
        }));
    }
    let summary = serde_json::json!({
        "date": date, "kernel": kernel, "cpus": cpus, "seconds": total, "suites": suites,
    });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    let index = dir.join("index.md");
    std::fs::write(&index, markdown)?;
    Ok(index)
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
