//! The regression example secured end to end — etcd over TLS with a client certificate and a
//! job-scoped user, nodes on mutual TLS, nodes killed and replaced — and a `grep` of every log of the run (launcher and
//! nodes, at `RUST_LOG=debug`) for the password and key material.

use std::path::Path;
use std::process::{Command, Output};

use taskgraph_tests::certs::{secured_etcd, TestCa};
use taskgraph_tests::etcd::EtcdOptions;

const ROOT_PW: &str = "Root-Secret-9d1c7a";
const PASSWORD: &str = "Alice-Secret-4be2f0";

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every 16-character piece of the base64 body of a PEM private key: none may appear in logs.
fn key_pieces(key_pem: &str) -> Vec<String> {
    key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(|l| {
            l.as_bytes()
                .chunks(16)
                .filter(|c| c.len() == 16)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn all_logs(dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
    {
        out.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secured_run_works_and_its_debug_logs_hold_no_secret() {
    let etcd_ca = TestCa::new("etcd").unwrap_or_else(|e| panic!("{e}"));
    let client = etcd_ca
        .issue("alice-client", &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let etcd = secured_etcd(&etcd_ca, ROOT_PW, EtcdOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let job = format!("secure-{:08x}", rand::random::<u32>());
    etcd.add_job_user(ROOT_PW, &job, "alice", PASSWORD)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let job_ca = TestCa::new("job").unwrap_or_else(|e| panic!("{e}"));
    let node = job_ca
        .issue("node", &["127.0.0.1", "job.taskgraph"])
        .unwrap_or_else(|e| panic!("{e}"));
    let logs = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let node_logs = logs.path().join("nodes");
    let report = logs.path().join("report.json");
    let path = |p: &Path| p.display().to_string();

    let out = tokio::task::spawn_blocking({
        let args = vec![
            "--quiet".to_owned(),
            "--workload=sum".into(),
            "--tasks=3".into(),
            "--epochs=20".into(),
            "--compute-ms=50".into(),
            // Failovers over mTLS too: a node is killed every 400 ms and replaced.
            "--chaos-kill-every=400ms".into(),
            format!("--report={}", path(&report)),
            format!("--etcd={}", etcd.tls_endpoints().join(",")),
            format!("--job={job}"),
            format!("--etcd-ca={}", path(&etcd_ca.cert_path())),
            format!("--etcd-cert={}", path(client.cert_path())),
            format!("--etcd-key={}", path(client.key_path())),
            "--etcd-user=alice".into(),
            format!("--peer-ca={}", path(&job_ca.cert_path())),
            format!("--peer-cert={}", path(node.cert_path())),
            format!("--peer-key={}", path(node.key_path())),
            "--peer-server-name=job.taskgraph".into(),
            format!("--node-logs={}", path(&node_logs)),
        ];
        move || {
            Command::new(env!("CARGO_BIN_EXE_regression"))
                .args(&args)
                .env("RUST_LOG", "debug")
                .env("TASKGRAPH_ETCD_PASSWORD", PASSWORD)
                .output()
                .unwrap_or_else(|e| panic!("cannot run regression: {e}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let launcher = text(&out);
    assert!(out.status.success(), "{launcher}");
    assert!(
        launcher.contains("sums: epoch 1 = 3, epoch 20 = 60"),
        "{launcher}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
    assert!(report["kills"].as_u64().unwrap_or(0) >= 1, "{report}");

    let nodes = all_logs(&node_logs);
    // The run did use what is under test, and logged at debug level.
    assert!(nodes.contains("DEBUG"), "no debug logs:\n{nodes}");
    assert!(nodes.contains("mutual TLS"), "no peer TLS:\n{nodes}");
    assert!(
        nodes.contains("TLS with a client certificate, as etcd user \"alice\""),
        "no etcd TLS and auth:\n{nodes}"
    );
    let everything = format!("{launcher}\n{nodes}");
    for secret in [PASSWORD, ROOT_PW, "PRIVATE KEY"] {
        assert!(
            !everything.contains(secret),
            "{secret:?} is in the logs:\n{everything}"
        );
    }
    for key in [&client.key_pem, &node.key_pem] {
        let pieces = key_pieces(key);
        assert!(pieces.len() > 4, "{key}");
        for piece in pieces {
            assert!(
                !everything.contains(&piece),
                "key material {piece:?} is in the logs"
            );
        }
    }
}
