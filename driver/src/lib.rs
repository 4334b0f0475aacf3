//! knd — a Kubernetes Network Driver: gives pods real network hardware (NICs, RDMA devices) through
//! DRA and NRI, placed by PCIe/NUMA topology and measured in the kernel with eBPF.
//!
//! This library does the work; `src/main.rs` only parses the command line and calls [`cli::run`].

// The layers, lowest first: each imports only from itself and the layers above it here
// (checked by tests/layers.rs; docs/architecture.md draws them and the path of a claim).

pub mod model;

pub mod os;

pub mod discover;

pub mod attach;

pub mod publish;

pub mod observe;

// The adapters: each turns its wire types into the model's at its edge; none imports another.
pub mod dra;
pub mod k8s;
pub mod nri;

pub mod daemon;

pub mod cli;
