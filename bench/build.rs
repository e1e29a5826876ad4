//! Generates the bare tonic echo service the benchmarks compare the framework against.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/echo.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        // `bytes` fields become `bytes::Bytes`, as in the framework's own wire code.
        .bytes(".")
        .build_client(true)
        .build_server(true)
        .compile_protos(&[proto], &["proto"])?;
    Ok(())
}
