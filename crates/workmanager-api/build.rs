//! Compiles the wire contract with a pure-Rust protobuf compiler (protox), so a
//! fresh machine needs no `protoc` binary. Produces the prost/tonic code, the
//! proto3-JSON (pbjson) serde impls used by the REST mirror, and the encoded
//! descriptor set served by gRPC reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [root.join("virtufin/workmanager.proto")];
    for f in [
        "virtufin/workmanager.proto",
        "io/cloudevents/v1/cloudevents.proto",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("workmanager_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .btree_map(".")
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;

    let descriptors = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .btree_map(["."])
        .emit_fields()
        .build(&[".virtufin", ".io.cloudevents.v1"])?;
    Ok(())
}
