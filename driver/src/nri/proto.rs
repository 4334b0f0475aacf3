//! Generated protobuf messages for ttrpc's envelope and NRI's API (compiled from `driver/proto/`
//! by `build.rs` with protox). Kept apart and exempt from the project's lints.
#![allow(
    clippy::all,
    clippy::pedantic,
    clippy::allow_attributes_without_reason,
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    unused_qualifications,
    reason = "generated code"
)]

/// `ttrpc`: Request, Response, Status.
pub mod ttrpc {
    tonic::include_proto!("ttrpc");
}

/// `nri.pkg.api.v1alpha1`: the messages of NRI's Runtime and Plugin services.
pub mod nri {
    tonic::include_proto!("nri.pkg.api.v1alpha1");
}
