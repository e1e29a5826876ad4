//! Generates the node-to-node protobuf/gRPC code (used only inside `taskgraph::wire`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/taskgraph.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        // `bytes` fields become `bytes::Bytes`, so payloads are not copied.
        .bytes(".")
        // Our codec turns undecodable requests into InvalidArgument (see wire/codec.rs).
        .codec_path("crate::wire::codec::WireCodec")
        .build_client(true)
        .build_server(true)
        .compile_protos(&[proto], &["proto"])?;
    Ok(())
}
