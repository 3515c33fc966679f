//! Generates the gRPC code for the CA's API from `proto/` with tonic-prost-build.
//!
//! This needs `protoc` and the well-known types (`google/protobuf/struct.proto`): on Debian the
//! packages `protobuf-compiler` and `libprotobuf-dev`, which `tests/run.sh` and
//! `deploy/local/demo.sh` install. Set `PROTOC` to use another compiler.

fn main() -> anyhow::Result<()> {
    use anyhow::Context as _;
    // Only the gRPC client and server use the generated code; the pure library needs no protoc.
    if std::env::var_os("CARGO_FEATURE_CLIENT").is_none() {
        return Ok(());
    }
    let protos = ["proto/ca.proto", "proto/trust_bundle.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&protos, &["proto", "/usr/include"])
        .context(
            "compiling ca/proto: is protoc installed? (apt-get install protobuf-compiler \
             libprotobuf-dev, or set PROTOC)",
        )?;
    Ok(())
}
