//! Compiles the kubelet plugin and NRI protos (protox, no protoc) for `src/dra/proto.rs` and
//! `src/nri/proto.rs`, and builds the
//! kernel-side programs in `ebpf/` for the BPF target (nightly, `-Z build-std=core`, bpf-linker)
//! so `src/telemetry` can embed the object; aya-build puts it at `$OUT_DIR/knd-probes`.
use std::path::Path;

use anyhow::Context as _;

const PROTOS: [&str; 7] = [
    "proto/pluginregistration.proto",
    "proto/dra_v1.proto",
    "proto/dra_v1beta1.proto",
    "proto/dra_health_v1alpha1.proto",
    "proto/dra_health_v1.proto",
    "proto/ttrpc.proto",
    "proto/nri.proto",
];

fn main() -> anyhow::Result<()> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"]).context("compiling driver/proto")?;
    tonic_prost_build::configure()
        .compile_fds(descriptors)
        .context("generating gRPC code")?;

    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR unset")?;
    let workspace = Path::new(&manifest_dir)
        .parent()
        .context("driver/ has no parent directory")?;
    let ebpf_dir = workspace.join("ebpf");
    // The programs embed the shared map types: rebuild them when those change too.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("common").display()
    );
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("the ebpf/ path is not valid UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "knd-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs in ebpf/ (run `cargo xtask setup` if bpf-linker or the nightly rust-src is missing)")?;

    // `AYA_BUILD_SKIP=1` (aya-build's switch) is for type-checking only: clippy gets its own
    // build-script run, and a second nested eBPF build would cost about 35 s and 190 MB. An
    // empty object keeps `include_bytes!` compiling; the loader refuses it with a clear error.
    let skipped =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let object = Path::new(&std::env::var("OUT_DIR").context("OUT_DIR unset")?).join("knd-probes");
    if skipped && !object.exists() {
        std::fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
    }
    Ok(())
}
