//! The `taskgraph` CLI against an etcd with TLS (client certificates required) and
//! authentication: settings from flags and `TASKGRAPH_*` variables, the password from
//! `TASKGRAPH_ETCD_PASSWORD` or a file, and one clear error line for each wrong setting.

use std::process::Output;
use std::time::Duration;

use taskgraph::{EtcdAuth, EtcdTls, Framework, NodeExit, Secret, Tree};
use taskgraph_tests::apps::Audit;
use taskgraph_tests::certs::{secured_etcd, TestCa};
use taskgraph_tests::dataflow::DataflowBuilder;
use taskgraph_tests::etcd::EtcdOptions;
use taskgraph_tests::job_name;
use tokio::process::Command;

const ROOT_PW: &str = "root-pw-77";
const PASSWORD: &str = "alice-pw-42";

fn show(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reads_a_secured_etcd_and_explains_refusals() {
    let ca = TestCa::new("etcd").unwrap_or_else(|e| panic!("{e}"));
    let client = ca
        .issue("alice-client", &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let etcd = secured_etcd(&ca, ROOT_PW, EtcdOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let job = job_name("cli-secure");
    etcd.add_job_user(ROOT_PW, &job, "alice", PASSWORD)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let endpoint = etcd.tls_endpoints().join(",");

    // A short job run by alice's nodes.
    let tls = EtcdTls::new(ca.cert_path()).identity(client.cert_path(), client.key_path());
    let tree = Tree::new(3, 2).unwrap_or_else(|e| panic!("{e}"));
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let node = Framework::builder()
            .etcd([endpoint.clone()])
            .job(&job)
            .tasks(3)
            .links(
                taskgraph::Links::new()
                    .link("parents", tree.parents())
                    .link("children", tree.children())
                    .pair("parents", "children"),
            )
            .etcd_tls(tls.clone())
            .etcd_auth(EtcdAuth::new("alice", Secret::new(PASSWORD)))
            .task_builder(DataflowBuilder {
                node: "n".into(),
                audit: Audit::default(),
                until: 2,
                pace: Duration::ZERO,
                state: false,
            })
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
            .spawn()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        nodes.push(node);
    }
    for n in nodes {
        let exit = tokio::time::timeout(Duration::from_secs(60), n.wait()).await;
        assert!(
            matches!(exit, Ok(Ok(NodeExit::JobFinished { epoch: 2 }))),
            "{exit:?}"
        );
    }

    let pw_file = ca.dir().join("password");
    std::fs::write(&pw_file, format!("{PASSWORD}\n")).unwrap_or_else(|e| panic!("{e}"));
    let run = |args: Vec<String>, password: Option<&'static str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskgraph"));
        cmd.args(&args)
            .env("TASKGRAPH_ETCD", &endpoint)
            .env("TASKGRAPH_ETCD_CA", ca.cert_path())
            .env("TASKGRAPH_ETCD_CERT", client.cert_path())
            .env("TASKGRAPH_ETCD_KEY", client.key_path())
            .env("TASKGRAPH_ETCD_USER", "alice")
            .env_remove("TASKGRAPH_ETCD_PASSWORD")
            .env_remove("TASKGRAPH_ETCD_PASSWORD_FILE");
        if let Some(p) = password {
            cmd.env("TASKGRAPH_ETCD_PASSWORD", p);
        }
        async move {
            cmd.output()
                .await
                .unwrap_or_else(|e| panic!("cannot run taskgraph: {e}"))
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

    // The settings from the environment, the password from TASKGRAPH_ETCD_PASSWORD...
    let out = run(args(&["status", &job, "--json"]), Some(PASSWORD)).await;
    assert!(out.status.success(), "{}", show(&out));
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)));
    assert_eq!(status["state"]["finished"], true, "{status}");
    // ... or from a file.
    let file_flag = format!("--etcd-password-file={}", pw_file.display());
    let out = run(args(&["status", &job, &file_flag]), None).await;
    assert!(out.status.success(), "{}", show(&out));

    // One clear line for each wrong setting; the password is never echoed.
    let refused = |out: Output, needle: &str| {
        let all = show(&out);
        assert!(!out.status.success(), "accepted: {all}");
        assert!(!all.contains(PASSWORD), "the password leaked: {all}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("no error line: {all}"));
        assert!(line.contains(needle), "{line:?} lacks {needle:?}: {all}");
    };
    refused(
        run(args(&["status", &job]), None).await,
        "TASKGRAPH_ETCD_PASSWORD",
    );
    refused(
        run(args(&["status", &job]), Some("wrong")).await,
        "wrong etcd user or password",
    );
    // Alice's role covers her job only: listing every job is refused.
    refused(
        run(args(&["jobs"]), Some(PASSWORD)).await,
        "permission denied",
    );
    let other = ca.dir().join("missing-ca.pem");
    let ca_flag = format!("--etcd-ca={}", other.display());
    refused(
        run(args(&["status", &job, &ca_flag]), Some(PASSWORD)).await,
        "cannot read",
    );
}
