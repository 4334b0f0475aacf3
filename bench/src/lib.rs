//! Shared helpers for knd's benchmark harnesses (`benches/`, `harness = false`): timing with
//! HDR histograms and results written as JSON under `bench-results/`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
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
    /// Whether p99 met the goal.
    pub met: Option<bool>,
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
        met: goal_p99_us.map(|goal| p99_us <= goal),
    })
}

/// Prints summaries as a table and writes them to `bench-results/<suite>.json`.
pub fn report(suite: &str, summaries: &[Summary]) -> anyhow::Result<PathBuf> {
    println!(
        "{:<44} {:>8} {:>10} {:>10} {:>10} {:>10}  goal",
        "benchmark", "samples", "p50 µs", "p90 µs", "p99 µs", "max µs"
    );
    for s in summaries {
        let goal = match (s.goal_p99_us, s.met) {
            (Some(goal), Some(true)) => format!("p99 ≤ {goal} µs: met"),
            (Some(goal), _) => format!("p99 ≤ {goal} µs: MISSED"),
            _ => String::new(),
        };
        println!(
            "{:<44} {:>8} {:>10} {:>10} {:>10} {:>10}  {goal}",
            s.name, s.samples, s.p50_us, s.p90_us, s.p99_us, s.max_us
        );
    }
    let dir = results_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{suite}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(summaries)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("results: {}", path.display());
    Ok(path)
}

/// `$KND_BENCH_RESULTS`, else `bench-results/` at the workspace root.
pub fn results_dir() -> PathBuf {
    std::env::var_os("KND_BENCH_RESULTS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench-results"),
        PathBuf::from,
    )
}
