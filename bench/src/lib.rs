//! Shared helpers for knd's benchmark harnesses (`benches/`, `harness = false`): timing with
//! HDR histograms and results written as JSON, Markdown and SVG under `bench-results/`.

pub mod doc;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency summary of one measured operation.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// What was measured.
    pub name: String,
    /// Samples taken.
    pub samples: u64,
    /// Median, microseconds.
    pub p50_us: u64,
    /// 90th percentile, microseconds.
    pub p90_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
    /// Slowest sample, microseconds.
    pub max_us: u64,
    /// Mean, microseconds.
    pub mean_us: f64,
    /// The goal for p99, microseconds, if the project set one.
    pub goal_p99_us: Option<u64>,
    /// The goal for p50, microseconds, if the project set one.
    pub goal_p50_us: Option<u64>,
    /// Whether every goal set was met.
    pub met: Option<bool>,
}

impl Summary {
    /// With a goal for the median too: met only if both are.
    #[must_use]
    pub fn with_p50_goal(mut self, goal: Duration) -> Self {
        let goal = u64::try_from(goal.as_micros()).unwrap_or(u64::MAX);
        self.goal_p50_us = Some(goal);
        self.met = Some(self.met.unwrap_or(true) && self.p50_us <= goal);
        self
    }
}

/// Runs `operation` `warmup` times unmeasured, then `samples` times measured.
pub fn measure(
    name: &str,
    warmup: u32,
    samples: u32,
    goal: Option<Duration>,
    mut operation: impl FnMut(),
) -> anyhow::Result<Summary> {
    for _ in 0..warmup {
        operation();
    }
    let mut taken = Vec::with_capacity(samples as usize);
    for _ in 0..samples {
        let started = Instant::now();
        operation();
        taken.push(started.elapsed());
    }
    summarize(name, &taken, goal)
}

/// Summarizes measured durations (one sample each).
pub fn summarize(
    name: &str,
    samples: &[Duration],
    goal: Option<Duration>,
) -> anyhow::Result<Summary> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for sample in samples {
        let micros = u64::try_from(sample.as_micros()).unwrap_or(u64::MAX);
        histogram.saturating_record(micros.max(1));
    }
    let goal_p99_us = goal.map(|g| u64::try_from(g.as_micros()).unwrap_or(u64::MAX));
    let p99_us = histogram.value_at_quantile(0.99);
    Ok(Summary {
        name: name.to_owned(),
        samples: histogram.len(),
        p50_us: histogram.value_at_quantile(0.5),
        p90_us: histogram.value_at_quantile(0.9),
        p99_us,
        max_us: histogram.max(),
        mean_us: histogram.mean(),
        goal_p99_us,
        goal_p50_us: None,
        met: goal_p99_us.map(|goal| p99_us <= goal),
    })
}

/// Prints summaries as a table and writes them (JSON, a Markdown table, a p50/p99 chart) to
/// `bench-results/<suite>.*` under `title`.
pub fn report(suite: &str, title: &str, summaries: &[Summary]) -> anyhow::Result<PathBuf> {
    let mut table = doc::Table::new(
        "Latency",
        &[
            "benchmark",
            "samples",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "max µs",
            "goal",
        ],
    );
    for s in summaries {
        let goals: Vec<String> = [("p50", s.goal_p50_us), ("p99", s.goal_p99_us)]
            .into_iter()
            .filter_map(|(which, goal)| goal.map(|g| format!("{which} ≤ {g} µs")))
            .collect();
        let goal = match s.met {
            _ if goals.is_empty() => String::new(),
            Some(true) => format!("{}: met", goals.join(", ")),
            _ => format!("{}: MISSED", goals.join(", ")),
        };
        table.row(vec![
            s.name.clone(),
            s.samples.to_string(),
            s.p50_us.to_string(),
            s.p90_us.to_string(),
            s.p99_us.to_string(),
            s.max_us.to_string(),
            goal,
        ]);
    }
    print_table(&table);
    #[expect(clippy::cast_precision_loss, reason = "microseconds for a chart")]
    let series = |name: &str, value: fn(&Summary) -> u64| {
        (
            name.to_owned(),
            summaries
                .iter()
                .enumerate()
                .map(|(i, s)| (i as f64, value(s) as f64))
                .collect(),
        )
    };
    let chart = doc::Chart {
        title: title.to_owned(),
        x_label: String::new(),
        y_label: "µs".to_owned(),
        kind: doc::ChartKind::Bars {
            categories: summaries.iter().map(|s| short(&s.name)).collect(),
        },
        series: vec![series("p50", |s| s.p50_us), series("p99", |s| s.p99_us)],
    };
    let mut document = doc::Document::new(suite, title);
    document.tables.push(table);
    document.charts.push(chart);
    document.data = serde_json::to_value(summaries)?;
    document.write(&results_dir())
}

/// A chart label: the name up to its first comma or parenthesis.
fn short(name: &str) -> String {
    name.split([',', '('])
        .next()
        .unwrap_or(name)
        .trim()
        .to_owned()
}

/// Prints a table aligned in columns.
pub fn print_table(table: &doc::Table) {
    let widths: Vec<usize> = (0..table.columns.len())
        .map(|i| {
            table
                .rows
                .iter()
                .filter_map(|r| r.get(i))
                .chain([&table.columns[i]])
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    println!("{}", table.title);
    line(&table.columns);
    for row in &table.rows {
        line(row);
    }
}

/// `$KND_BENCH_RESULTS`, else `bench-results/` at the workspace root.
pub fn results_dir() -> PathBuf {
    std::env::var_os("KND_BENCH_RESULTS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench-results"),
        PathBuf::from,
    )
}

/// The type of the filesystem holding `path` (`ext4`, `xfs`, `tmpfs`, … or its magic number).
pub fn filesystem_of(path: &std::path::Path) -> String {
    let Ok(stat) = nix::sys::statfs::statfs(path) else {
        return "an unknown filesystem".to_owned();
    };
    #[expect(clippy::cast_sign_loss, reason = "a magic number")]
    let magic = stat.filesystem_type().0 as u64;
    match magic {
        0xef53 => "ext4".to_owned(),
        0x5846_5342 => "xfs".to_owned(),
        0x9123_683e => "btrfs".to_owned(),
        0x0102_1994 => "tmpfs".to_owned(),
        0x794c_7630 => "overlayfs".to_owned(),
        other => format!("filesystem 0x{other:x}"),
    }
}

/// A tmpfs mounted over a fresh directory for as long as this lives, as a node's `/run` is.
#[derive(Debug)]
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs (needs root).
    pub fn mount() -> anyhow::Result<Self> {
        use nix::mount::{MsFlags, mount};
        let dir = tempfile::tempdir()?;
        mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755,size=64m"),
        )?;
        Ok(Self { dir })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(error) = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("cannot unmount {}: {error}", self.dir.path().display());
        }
    }
}
