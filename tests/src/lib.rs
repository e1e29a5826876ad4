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
pub mod prometheus;
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

/// Plain HTTP/1.0 GET of a `http://host:port/path` URL on loopback (an etcd's `/metrics`,
/// `/health`); returns the whole response, headers included. Panics on a malformed URL or a
/// refused connection (test helper).
pub async fn http_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("not an http:// URL: {url}"));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .unwrap_or_else(|e| panic!("connect {authority}: {e}"));
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap_or_else(|e| panic!("send to {authority}: {e}"));
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .await
        .unwrap_or_else(|e| panic!("read from {authority}: {e}"));
    body
}
