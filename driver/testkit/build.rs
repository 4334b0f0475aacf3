//! Compiles the CRI subset the containerd testbed is driven with (`proto/cri.proto`; protox, no
//! protoc). Only tests use it, so the product's build never compiles it.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto/cri.proto");
    let descriptors =
        protox::compile(["proto/cri.proto"], ["proto"]).context("compiling testkit/proto")?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(descriptors)
        .context("generating the CRI client")
}
