//! Generates the bare tonic services the benchmarks compare the framework against: the echo
//! service and the bare-sum tree.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/echo.proto", "proto/baresum.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        // `bytes` fields become `bytes::Bytes`, as in the framework's own wire code.
        .bytes(".")
        .build_client(true)
        .build_server(true)
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
