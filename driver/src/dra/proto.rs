//! Generated gRPC code for the kubelet plugin APIs (compiled from `driver/proto/` by `build.rs`
//! with protox, no protoc). Kept apart and exempt from the project's lints; the rest of the
//! driver converts to and from its own types at the boundary.
#![allow(
    clippy::all,
    clippy::pedantic,
    clippy::allow_attributes_without_reason,
    clippy::undocumented_unsafe_blocks,
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    unused_qualifications,
    reason = "generated code"
)]

/// `pluginregistration` (kubelet plugin watcher).
pub mod registration {
    tonic::include_proto!("pluginregistration");
}

/// `k8s.io.kubelet.pkg.apis.dra.v1` (kubelet 1.34+).
pub mod dra_v1 {
    tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");
}

/// `k8s.io.kubelet.pkg.apis.dra.v1beta1` (kubelet 1.33, and the fallback of later ones).
pub mod dra_v1beta1 {
    tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1beta1");
}

/// `v1alpha1` DRAResourceHealth (KEP-4680).
pub mod health_v1alpha1 {
    tonic::include_proto!("v1alpha1");
}

/// `v1` DRAResourceHealth: v1alpha1 plus a message per device (kubelets after 1.36).
pub mod health_v1 {
    tonic::include_proto!("v1");
}
