//! Test fixtures for taskgraph: a private etcd, in-process nodes, nodes as child processes.

pub mod apps;
pub mod certs;
pub mod cluster;
pub mod dataflow;
pub mod etcd;
pub mod fleet;
pub mod keywait;
pub mod netfault;
pub mod process;
pub mod proxy;
pub mod raw_grpc;

/// Installs a test log subscriber once (respects `RUST_LOG`; quiet by default).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A job name unique to this test run.
pub fn job_name(test: &str) -> String {
    format!("{test}-{:08x}", rand::random::<u32>())
}
