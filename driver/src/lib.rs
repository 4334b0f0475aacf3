//! knd — a Kubernetes Network Driver: gives pods real network hardware (NICs, RDMA devices) through
//! DRA and NRI, placed by PCIe/NUMA topology and measured in the kernel with eBPF.
//!
//! This library does the work; `src/main.rs` only parses the command line and calls [`cli::run`].

pub mod attach;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dra;
pub mod ethtool;
pub mod health;
pub mod inventory;
pub mod k8s;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod nri;
pub mod placement;
pub mod resources;
pub mod selector;
pub mod state;
pub mod telemetry;
pub mod templates;
pub mod top;
pub mod topology;

/// An error with its causes, `a: b: c`.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
