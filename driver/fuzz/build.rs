//! Generates the ttrpc and NRI messages for the ttrpc target (protox, no protoc).
fn main() {
    for proto in ["../proto/ttrpc.proto", "../proto/nri.proto"] {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(["../proto/ttrpc.proto", "../proto/nri.proto"], ["../proto"])
        .expect("the protos compile");
    prost_build::Config::new()
        .compile_fds(descriptors)
        .expect("prost generates the messages");
}
