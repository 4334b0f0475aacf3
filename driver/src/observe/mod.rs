//! Observing claimed devices: health verdicts, the in-kernel eBPF telemetry readers, and the Prometheus metrics built from both.

pub mod health;
pub mod metrics;
pub mod telemetry;
