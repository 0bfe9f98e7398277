//! Rebuilds when a migration is added (`sqlx::migrate!` embeds migrations/ at compile time), and
//! generates the gRPC code of proto/ with a pure-Rust protobuf compiler (protox), so that no
//! system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(
        ["proto/dtmgimp.proto", "proto/workflow.proto", "proto/busi.proto"],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(files)?;
    Ok(())
}
