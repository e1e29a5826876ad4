//! Security: TLS and authentication to etcd, per-job etcd roles, and mutual TLS between nodes.
//! Certificates are generated at test time ([`taskgraph_tests::certs`]).

use std::time::Duration;

use bytes::Bytes;
use taskgraph::testing::wire::{
    self, ClientConfig, Header, Inbound, Peers, PingReply, PullAnswer, PullRequest, ServerConfig,
};
use taskgraph::testing::LoadedTls;
use taskgraph::{
    EtcdAuth, EtcdTls, Framework, FrameworkBuilder, JobClient, NodeExit, PeerTls, Secret, Tree,
};
use taskgraph_tests::certs::{Issued, TestCa};
use taskgraph_tests::dataflow::{check_trail, DataflowBuilder};
use taskgraph_tests::etcd::{Etcd, EtcdOptions};
use taskgraph_tests::{apps::Audit, init_logs, job_name};
use tokio::sync::{mpsc, oneshot};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const ROOT_PW: &str = "root-pw-3f9a";
/// A guard against hangs; the refusals under test come back at once.
const GUARD: Duration = Duration::from_secs(60);

/// An etcd with a TLS listener requiring client certificates from `ca`, and auth enabled.
async fn secure_etcd(ca: &TestCa) -> Result<Etcd, Box<dyn std::error::Error>> {
    // Tokens expire after 1 s (default 300 s): the clients must renew them on the way.
    let options = EtcdOptions::default().with_arg("--auth-token-ttl=1");
    Ok(taskgraph_tests::certs::secured_etcd(ca, ROOT_PW, options).await?)
}

fn loaded(ca: &TestCa, id: Option<&Issued>, name: Option<&str>) -> LoadedTls {
    LoadedTls::from_pem(
        ca.cert_pem().as_bytes().to_vec(),
        id.map(|i| (i.cert_pem.clone().into_bytes(), i.key_pem.clone())),
        name.map(str::to_owned),
    )
}

/// A dataflow node of a 3-task binary tree ending at epoch `until`.
fn dataflow_node(endpoints: Vec<String>, job: &str, until: u64, audit: &Audit) -> FrameworkBuilder {
    dataflow_node_paced(endpoints, job, until, Duration::ZERO, audit)
}

/// [`dataflow_node`] whose root pauses `pace` before moving each epoch on.
fn dataflow_node_paced(
    endpoints: Vec<String>,
    job: &str,
    until: u64,
    pace: Duration,
    audit: &Audit,
) -> FrameworkBuilder {
    let tree = Tree::new(3, 2).unwrap_or_else(|e| panic!("{e}"));
    Framework::builder()
        .etcd(endpoints)
        .job(job)
        .tasks(3)
        .replicas(2)
        .links(
            taskgraph::Links::new()
                .link("parents", tree.parents())
                .link("children", tree.children())
                .pair("parents", "children"),
        )
        .lease_ttl(Duration::from_secs(2))
        .etcd_connect_timeout(Duration::from_secs(30))
        .task_builder(DataflowBuilder {
            node: "n".into(),
            audit: audit.clone(),
            until,
            pace,
            state: true,
        })
}

async fn run_to_end(builders: Vec<FrameworkBuilder>) -> Result<Vec<NodeExit>, String> {
    let mut handles = Vec::new();
    for b in builders {
        let fw = b.build().map_err(|e| e.to_string())?;
        handles.push(fw.spawn().await.map_err(|e| e.to_string())?);
    }
    let mut exits = Vec::new();
    for h in handles {
        let exit = tokio::time::timeout(Duration::from_secs(120), h.wait())
            .await
            .map_err(|_| "the job did not finish within 120 s".to_owned())?
            .map_err(|e| e.to_string())?;
        exits.push(exit);
    }
    Ok(exits)
}

/// The whole stack secured: etcd over TLS with a client certificate and a job-scoped user,
/// nodes talking mutual TLS. The job runs to its end with a correct audit trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_runs_end_to_end_with_etcd_tls_auth_and_peer_mtls() -> TestResult {
    init_logs();
    let etcd_ca = TestCa::new("etcd")?;
    let etcd = secure_etcd(&etcd_ca).await?;
    let job = job_name("secure");
    etcd.add_job_user(ROOT_PW, &job, "alice", "alice-pw")
        .await?;
    let client_cert = etcd_ca.issue("alice-client", &[])?;
    let job_ca = TestCa::new("job")?;
    let etcd_tls =
        EtcdTls::new(etcd_ca.cert_path()).identity(client_cert.cert_path(), client_cert.key_path());
    let auth = EtcdAuth::new("alice", Secret::new("alice-pw"));
    let audit = Audit::default();
    let mut builders = Vec::new();
    for i in 0..6 {
        let cert = job_ca.issue(&format!("node{i}"), &["127.0.0.1"])?;
        // 25 epochs of at least 150 ms: the etcd tokens (1 s) expire several times.
        builders.push(
            dataflow_node_paced(
                etcd.tls_endpoints(),
                &job,
                25,
                Duration::from_millis(150),
                &audit,
            )
            .etcd_tls(etcd_tls.clone())
            .etcd_auth(auth.clone())
            .peer_tls(PeerTls::new(
                job_ca.cert_path(),
                cert.cert_path(),
                cert.key_path(),
            )),
        );
    }
    let exits = run_to_end(builders).await?;
    assert!(
        exits
            .iter()
            .all(|e| matches!(e, NodeExit::JobFinished { epoch: 25 })),
        "{exits:?}"
    );
    let bad = check_trail(&audit.events(), 3, 25);
    assert!(bad.is_empty(), "audit trail violations: {bad:?}");
    let client = JobClient::connect_secure(
        &etcd.tls_endpoints(),
        &job,
        Duration::from_secs(5),
        Some(&etcd_tls),
        Some(&auth),
    )
    .await?;
    let state = client.state().await?;
    assert!(
        state.is_some_and(|s| s.finished && s.epoch == 25),
        "{state:?}"
    );
    Ok(())
}

async fn refused(
    endpoints: &[String],
    job: &str,
    tls: Option<&EtcdTls>,
    auth: Option<&EtcdAuth>,
) -> String {
    let attempt = JobClient::connect_secure(endpoints, job, Duration::from_secs(30), tls, auth);
    match tokio::time::timeout(GUARD, attempt).await {
        Err(_) => panic!("no answer within {GUARD:?}: retrying instead of refusing"),
        Ok(Ok(_)) => panic!("connected, but should have been refused"),
        Ok(Err(taskgraph::Error::EtcdRefused { reason, .. })) => reason,
        Ok(Err(other)) => panic!("expected EtcdRefused (no retries), got: {other}"),
    }
}

/// Wrong password, no user, missing client certificate, a client certificate from another
/// CA, and etcd's certificate not from the trusted CA: each is a clear `EtcdRefused` at once
/// (not an `EtcdUnreachable` after retrying until the 30 s connect timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_refusals_are_clear_and_not_retried() -> TestResult {
    init_logs();
    let etcd_ca = TestCa::new("etcd")?;
    let etcd = secure_etcd(&etcd_ca).await?;
    let job = job_name("refusals");
    etcd.add_job_user(ROOT_PW, &job, "alice", "alice-pw")
        .await?;
    let eps = etcd.tls_endpoints();
    let good_cert = etcd_ca.issue("alice-client", &[])?;
    let tls =
        EtcdTls::new(etcd_ca.cert_path()).identity(good_cert.cert_path(), good_cert.key_path());
    let auth = EtcdAuth::new("alice", Secret::new("alice-pw"));
    // The good settings work.
    JobClient::connect_secure(&eps, &job, Duration::from_secs(5), Some(&tls), Some(&auth)).await?;

    let wrong = EtcdAuth::new("alice", Secret::new("not-the-password"));
    let r = refused(&eps, &job, Some(&tls), Some(&wrong)).await;
    assert!(r.contains("wrong etcd user or password"), "{r}");
    assert!(!r.contains("not-the-password"), "the password leaked: {r}");

    let r = refused(&eps, &job, Some(&tls), None).await;
    assert!(r.contains("give a user and its password"), "{r}");

    let no_cert = EtcdTls::new(etcd_ca.cert_path());
    let r = refused(&eps, &job, Some(&no_cert), Some(&auth)).await;
    assert!(r.contains("TLS failed"), "{r}");

    let other_ca = TestCa::new("other")?;
    let foreign = other_ca.issue("mallory-client", &[])?;
    let foreign_tls =
        EtcdTls::new(etcd_ca.cert_path()).identity(foreign.cert_path(), foreign.key_path());
    let r = refused(&eps, &job, Some(&foreign_tls), Some(&auth)).await;
    assert!(r.contains("TLS failed"), "{r}");

    // We trust another CA than the one that signed etcd's certificate.
    let wrong_ca =
        EtcdTls::new(other_ca.cert_path()).identity(good_cert.cert_path(), good_cert.key_path());
    let r = refused(&eps, &job, Some(&wrong_ca), Some(&auth)).await;
    assert!(r.contains("TLS failed") && r.contains("certificate"), "{r}");

    // A node (not just a client) with a wrong password ends with the same clear error.
    let audit = Audit::default();
    let node = dataflow_node(eps.clone(), &job, 2, &audit)
        .etcd_tls(tls.clone())
        .etcd_auth(wrong)
        .build()?
        .spawn()
        .await?;
    match tokio::time::timeout(GUARD, node.wait()).await {
        Ok(Err(taskgraph::Error::EtcdRefused { reason, .. })) => {
            assert!(reason.contains("wrong etcd user or password"), "{reason}")
        }
        other => panic!("expected EtcdRefused, got {other:?}"),
    }

    // Settings that cannot work are refused before touching etcd.
    let plain_eps = etcd.endpoints();
    let e = dataflow_node(plain_eps, &job, 2, &audit)
        .etcd_tls(tls.clone())
        .build()
        .map(|_| ())
        .map_err(|e| e.to_string());
    assert!(e.as_ref().is_err_and(|e| e.contains("https://")), "{e:?}");
    let e = dataflow_node(eps.clone(), &job, 2, &audit)
        .etcd_tls(EtcdTls::new(etcd_ca.dir().join("missing.pem")))
        .build()
        .map(|_| ())
        .map_err(|e| e.to_string());
    assert!(
        e.as_ref().is_err_and(|e| e.contains("cannot read")),
        "{e:?}"
    );
    Ok(())
}

/// TLS files that cannot be used are refused when the node is built, naming the setting.
#[tokio::test]
async fn unusable_tls_files_are_refused_at_build() -> TestResult {
    let ca = TestCa::new("job")?;
    let node = ca.issue("node", &["127.0.0.1"])?;
    let other = ca.issue("other", &["127.0.0.1"])?;
    let garbage = ca.dir().join("garbage-key.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    )?;
    let not_pem = ca.dir().join("not-pem.txt");
    std::fs::write(&not_pem, "hello")?;
    let audit = Audit::default();
    let build = |tls: PeerTls| {
        dataflow_node(vec!["http://127.0.0.1:1".into()], "j", 1, &audit)
            .peer_tls(tls)
            .build()
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert!(build(PeerTls::new(
        ca.cert_path(),
        node.cert_path(),
        node.key_path()
    ))
    .is_ok());
    for (tls, needle) in [
        (
            PeerTls::new(ca.cert_path(), node.cert_path(), &garbage),
            "unusable",
        ),
        (
            PeerTls::new(ca.cert_path(), node.cert_path(), other.key_path()),
            "unusable",
        ),
        (
            PeerTls::new(&not_pem, node.cert_path(), node.key_path()),
            "no PEM CERTIFICATE",
        ),
        (
            PeerTls::new(ca.cert_path(), node.cert_path(), ca.dir().join("nope.pem")),
            "cannot read",
        ),
    ] {
        let r = build(tls);
        assert!(
            r.as_ref()
                .is_err_and(|e| e.contains("peer") && e.contains(needle)),
            "{r:?} lacks {needle:?}"
        );
    }
    Ok(())
}

/// An unreachable TLS etcd is not a refusal: the client keeps trying until etcd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_secure_etcd_is_retried_not_refused() -> TestResult {
    init_logs();
    let etcd_ca = TestCa::new("etcd")?;
    let etcd = secure_etcd(&etcd_ca).await?;
    let job = job_name("retried");
    etcd.add_job_user(ROOT_PW, &job, "alice", "alice-pw")
        .await?;
    let cert = etcd_ca.issue("alice-client", &[])?;
    let tls = EtcdTls::new(etcd_ca.cert_path()).identity(cert.cert_path(), cert.key_path());
    let auth = EtcdAuth::new("alice", Secret::new("alice-pw"));
    let eps = etcd.tls_endpoints();
    etcd.kill().await?;
    // Down for good: unreachable (after the timeout), not refused.
    let down =
        JobClient::connect_secure(&eps, &job, Duration::from_secs(1), Some(&tls), Some(&auth))
            .await;
    assert!(
        matches!(down, Err(taskgraph::Error::EtcdUnreachable { .. })),
        "{down:?}"
    );
    // Back while the client is still trying: it connects.
    let connecting = tokio::spawn({
        let (eps, job, tls, auth) = (eps.clone(), job.clone(), tls.clone(), auth.clone());
        async move {
            JobClient::connect_secure(&eps, &job, Duration::from_secs(30), Some(&tls), Some(&auth))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    });
    etcd.restart().await?;
    connecting.await??;
    Ok(())
}

/// Two jobs, two users, each with a role granting readwrite on its own job's prefix only:
/// both jobs run; each user is refused on the other's job, by the framework (a clear error)
/// and by etcdctl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_role_grants_its_own_prefix_only() -> TestResult {
    init_logs();
    let etcd = Etcd::start().await?;
    etcd.enable_auth(ROOT_PW).await?;
    let (job_a, job_b) = (job_name("job-a"), job_name("job-b"));
    etcd.add_job_user(ROOT_PW, &job_a, "alice", "alice-pw")
        .await?;
    etcd.add_job_user(ROOT_PW, &job_b, "bob", "bob-pw").await?;
    let alice = EtcdAuth::new("alice", Secret::new("alice-pw"));
    let bob = EtcdAuth::new("bob", Secret::new("bob-pw"));

    // Both jobs run to the end at the same time, each as its own user.
    let (audit_a, audit_b) = (Audit::default(), Audit::default());
    let a: Vec<_> = (0..3)
        .map(|_| {
            dataflow_node(etcd.endpoints(), &job_a, 3, &audit_a)
                .replicas(1)
                .etcd_auth(alice.clone())
        })
        .collect();
    let b: Vec<_> = (0..3)
        .map(|_| {
            dataflow_node(etcd.endpoints(), &job_b, 3, &audit_b)
                .replicas(1)
                .etcd_auth(bob.clone())
        })
        .collect();
    let (ra, rb) = tokio::join!(run_to_end(a), run_to_end(b));
    for exits in [ra?, rb?] {
        assert!(
            exits
                .iter()
                .all(|e| matches!(e, NodeExit::JobFinished { epoch: 3 })),
            "{exits:?}"
        );
    }

    // Bob on Alice's job: a node and a client are refused with a clear error.
    let intruder = dataflow_node(etcd.endpoints(), &job_a, 3, &audit_b)
        .replicas(1)
        .etcd_auth(bob.clone())
        .build()?
        .spawn()
        .await?;
    match tokio::time::timeout(GUARD, intruder.wait()).await {
        Ok(Err(taskgraph::Error::EtcdRefused { reason, .. })) => {
            assert!(reason.contains("permission denied"), "{reason}");
            assert!(
                reason.contains(&format!("/taskgraph/jobs/{job_a}/")),
                "{reason}"
            );
        }
        other => panic!("expected EtcdRefused, got {other:?}"),
    }
    let r = refused(&etcd.endpoints(), &job_a, None, Some(&bob)).await;
    assert!(r.contains("permission denied"), "{r}");
    let r = refused(&etcd.endpoints(), &job_b, None, Some(&alice)).await;
    assert!(r.contains("permission denied"), "{r}");

    // etcdctl as Bob: no read, no write, no delete on Alice's keys; his own prefix works.
    let bob_flag = "--user=bob:bob-pw";
    let a_spec = format!("/taskgraph/jobs/{job_a}/spec");
    let a_prefix = format!("/taskgraph/jobs/{job_a}/");
    for args in [
        vec![bob_flag, "get", a_spec.as_str()],
        vec![bob_flag, "get", "--prefix", a_prefix.as_str()],
        vec![bob_flag, "put", a_spec.as_str(), "overwritten"],
        vec![bob_flag, "del", "--prefix", a_prefix.as_str()],
        vec![bob_flag, "get", "--prefix", "/taskgraph/jobs/"],
    ] {
        let out = etcd.etcdctl(&args).await;
        assert!(
            out.as_ref()
                .is_err_and(|e| e.to_string().contains("permission denied")),
            "etcdctl {args:?} should be refused: {out:?}"
        );
    }
    let own = etcd
        .etcdctl([
            bob_flag,
            "get",
            &format!("/taskgraph/jobs/{job_b}/epoch"),
            "--print-value-only",
        ])
        .await?;
    assert_eq!(own.trim(), "done 3");
    // Alice's job is untouched.
    let spec = etcd
        .etcdctl([
            &format!("--user=root:{ROOT_PW}"),
            "get",
            &a_spec,
            "--print-value-only",
        ])
        .await?;
    assert!(spec.contains("\"tasks\":3"), "{spec}");
    Ok(())
}

/// Adds etcd user `user` (password `<user>-pw`) with a role `job-<job>` granting `grants`
/// (permission, key, range end), as root; returns the user's credentials.
async fn role_user(
    etcd: &Etcd,
    job: &str,
    user: &str,
    grants: &[(&str, &str, &str)],
) -> Result<EtcdAuth, Box<dyn std::error::Error>> {
    let root = format!("--user=root:{ROOT_PW}");
    let role = format!("job-{job}");
    let password = format!("{user}-pw");
    let pw = format!("--new-user-password={password}");
    let mut commands = vec![vec!["role", "add", role.as_str()]];
    for (permission, key, end) in grants {
        commands.push(vec![
            "role",
            "grant-permission",
            role.as_str(),
            permission,
            key,
            end,
        ]);
    }
    commands.push(vec!["user", "add", user, pw.as_str()]);
    commands.push(vec!["user", "grant-role", user, role.as_str()]);
    for args in commands {
        etcd.etcdctl(std::iter::once(root.as_str()).chain(args))
            .await?;
    }
    Ok(EtcdAuth::new(user, Secret::new(password)))
}

/// A user whose role may only read the job's prefix: a node cannot take part (it must write
/// its record, its lease's keys, the spec of a new job), and is refused at once with a clear
/// error, not retried until the connect timeout. The node's first request, the spec check, is
/// the one etcd refuses; a client, which only reads, connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_role_refuses_a_node_at_once() -> TestResult {
    init_logs();
    let etcd = Etcd::start().await?;
    etcd.enable_auth(ROOT_PW).await?;
    let job = job_name("read-only");
    let prefix = format!("/taskgraph/jobs/{job}/");
    let end = format!("/taskgraph/jobs/{job}0");
    let dave = role_user(&etcd, &job, "dave", &[("read", &prefix, &end)]).await?;
    let audit = Audit::default();
    // Connecting may take this long if refusals were retried: the test tells them apart.
    let node = dataflow_node(etcd.endpoints(), &job, 3, &audit)
        .replicas(1)
        .etcd_auth(dave.clone())
        .etcd_connect_timeout(GUARD * 2)
        .build()?
        .spawn()
        .await?;
    match tokio::time::timeout(GUARD, node.wait()).await {
        Ok(Err(taskgraph::Error::EtcdRefused { reason, .. })) => {
            assert!(reason.contains("permission denied"), "{reason}");
            assert!(reason.contains(&prefix), "{reason}");
        }
        other => panic!("expected EtcdRefused, got {other:?}"),
    }
    // Reading is allowed: a client connects (the job does not exist, so it has no state).
    let client = JobClient::connect_secure(
        &etcd.endpoints(),
        &job,
        Duration::from_secs(5),
        None,
        Some(&dave),
    )
    .await?;
    assert!(client.state().await?.is_none());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Node-to-node mutual TLS, at the transport level.
// ---------------------------------------------------------------------------------------------

const JOB: &str = "job-a";

/// A TLS `wire::serve` answering pings and echoing pulls; counts what reached its loop.
struct TlsServer {
    addr: String,
    seen: mpsc::UnboundedReceiver<&'static str>,
    _stop: oneshot::Sender<()>,
}

async fn tls_server(tls: LoadedTls) -> Result<TlsServer, Box<dyn std::error::Error>> {
    let listener = wire::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (inbound_tx, mut inbound) = mpsc::channel(16);
    let (stop_tx, stop) = oneshot::channel::<()>();
    let config = ServerConfig {
        tls: Some(tls),
        ..ServerConfig::new(JOB, 4)
    };
    tokio::spawn(wire::serve(listener, config, inbound_tx, async move {
        let _ = stop.await;
    }));
    let (seen_tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = inbound.recv().await {
            match msg {
                Inbound::Pull(req, reply) => {
                    let _ = seen_tx.send("pull");
                    let _ = reply.send(Ok(PullAnswer {
                        payload: req.payload,
                        server_term: 1,
                    }));
                }
                Inbound::Ping(reply) => {
                    let _ = seen_tx.send("ping");
                    let _ = reply.send(PingReply {
                        job: JOB.into(),
                        node_id: "server".into(),
                        slots: vec![],
                    });
                }
                _ => {}
            }
        }
    });
    Ok(TlsServer {
        addr,
        seen,
        _stop: stop_tx,
    })
}

fn pull() -> PullRequest {
    PullRequest {
        header: Header {
            job: JOB.into(),
            epoch: 1,
            from_task: 1,
            to_task: 0,
            term: 1,
        },
        seq: 1,
        method: "data".into(),
        payload: Bytes::from_static(b"secret training data"),
        delivered_below: 0,
    }
}

fn peers(tls: Option<LoadedTls>) -> Peers {
    Peers::new(ClientConfig {
        tls,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Some(Duration::from_secs(10)),
        ..ClientConfig::new(JOB)
    })
}

/// Pulls from the server with `client`; `Ok` with the echoed payload or the error's text.
async fn try_pull(server: &TlsServer, client: &Peers) -> Result<Bytes, String> {
    client
        .pull(&server.addr, pull())
        .await
        .map(|a| a.payload)
        .map_err(|e| e.to_string())
}

/// A node with mutual TLS serves pulls only to peers presenting a certificate from the job's
/// CA: plain text, TLS without a certificate and a certificate from another job's CA are all
/// refused during the handshake, before the request reaches the node's loop; the job's own
/// peers work; a client also refuses a server whose certificate is not from the job's CA or
/// does not carry the configured name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_peers_without_a_certificate_from_the_jobs_ca() -> TestResult {
    init_logs();
    let job_ca = TestCa::new("job-a")?;
    let other_ca = TestCa::new("job-b")?;
    let server_cert = job_ca.issue("server", &["127.0.0.1", "job-a.taskgraph"])?;
    let mut server = tls_server(loaded(&job_ca, Some(&server_cert), None)).await?;

    let plain = try_pull(&server, &peers(None)).await;
    assert!(plain.is_err(), "a plain-text pull got an answer: {plain:?}");

    let no_cert = try_pull(&server, &peers(Some(loaded(&job_ca, None, None)))).await;
    assert!(
        no_cert.is_err(),
        "a pull without a client certificate got: {no_cert:?}"
    );

    let foreign = other_ca.issue("mallory", &["127.0.0.1"])?;
    let other_job = try_pull(&server, &peers(Some(loaded(&job_ca, Some(&foreign), None)))).await;
    assert!(
        other_job.is_err(),
        "a pull with another CA's certificate got: {other_job:?}"
    );
    assert!(
        server.seen.try_recv().is_err(),
        "a refused peer reached the node's loop"
    );

    let own = job_ca.issue("node-2", &["127.0.0.1"])?;
    let good = peers(Some(loaded(&job_ca, Some(&own), None)));
    assert_eq!(
        try_pull(&server, &good).await?,
        Bytes::from_static(b"secret training data")
    );
    assert_eq!(good.ping(&server.addr).await?.node_id, "server");
    assert_eq!(server.seen.recv().await, Some("pull"));

    // The client side: a server whose certificate is from another CA is refused...
    let impostor_cert = other_ca.issue("impostor", &["127.0.0.1"])?;
    let impostor = tls_server(loaded(&other_ca, Some(&impostor_cert), None)).await?;
    let r = try_pull(&impostor, &good).await;
    assert!(
        r.is_err(),
        "the client accepted a server from another CA: {r:?}"
    );
    // ... and with a configured name, so is one whose certificate lacks it.
    let named = peers(Some(loaded(&job_ca, Some(&own), Some("job-a.taskgraph"))));
    assert_eq!(
        try_pull(&server, &named).await?,
        Bytes::from_static(b"secret training data")
    );
    let unnamed_cert = job_ca.issue("unnamed", &["127.0.0.1"])?;
    let unnamed = tls_server(loaded(&job_ca, Some(&unnamed_cert), None)).await?;
    let r = try_pull(&unnamed, &named).await;
    assert!(
        r.is_err(),
        "the client accepted a certificate without the job's name: {r:?}"
    );

    // A server with a configured name refuses callers from the same CA without that name
    // (another job sharing the CA), before the call reaches its loop.
    let mut strict =
        tls_server(loaded(&job_ca, Some(&server_cert), Some("job-a.taskgraph"))).await?;
    let r = try_pull(&strict, &named).await;
    assert!(
        r.as_ref()
            .is_err_and(|e| e.contains("peer certificate refused")),
        "a caller without the job's name was served: {r:?}"
    );
    assert!(
        strict.seen.try_recv().is_err(),
        "a refused peer reached the node's loop"
    );
    let member = job_ca.issue("member", &["127.0.0.1", "job-a.taskgraph"])?;
    let member = peers(Some(loaded(
        &job_ca,
        Some(&member),
        Some("job-a.taskgraph"),
    )));
    assert_eq!(
        try_pull(&strict, &member).await?,
        Bytes::from_static(b"secret training data")
    );
    assert_eq!(strict.seen.recv().await, Some("pull"));
    Ok(())
}

/// The body of `GET /metrics` at `addr` (HTTP/1.0, read to the end).
async fn get_metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut conn) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = conn
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
        .await;
    let mut body = String::new();
    let _ = conn.read_to_string(&mut body).await;
    body
}

/// A draft that etcd refuses (here: the job's role may not write task 2's primary key) is not
/// final: the staffer drafts again after a pause, without waiting for a change in the job —
/// in a quiet job none may come. Once the permission is granted (an auth change, invisible to
/// the job's watch), the waiting node gets the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_etcd_refused_is_tried_again_without_a_change_in_the_job() -> TestResult {
    init_logs();
    let etcd = Etcd::start().await?;
    etcd.enable_auth(ROOT_PW).await?;
    let job = job_name("denied");
    let prefix = format!("/taskgraph/jobs/{job}/");
    let end = format!("/taskgraph/jobs/{job}0");
    let denied = format!("{prefix}tasks/2/primary");
    let after = format!("{prefix}tasks/2/primary0");
    // Read and write on the whole prefix except task 2's primary key, which is read-only.
    let grants = [
        ("readwrite", prefix.as_str(), denied.as_str()),
        ("read", denied.as_str(), after.as_str()),
        ("readwrite", after.as_str(), end.as_str()),
    ];
    let auth = role_user(&etcd, &job, "carol", &grants).await?;
    let (root, role) = (format!("--user=root:{ROOT_PW}"), format!("job-{job}"));
    let audit = Audit::default();
    // The root paces its epochs for ever: once staffed, nothing in the job changes by itself.
    let node = || {
        dataflow_node_paced(
            etcd.endpoints(),
            &job,
            1_000,
            Duration::from_secs(3600),
            &audit,
        )
        .etcd_auth(auth.clone())
        .metrics_addr(([127, 0, 0, 1], 0).into())
    };
    let mut handles = Vec::new();
    for _ in 0..2 {
        handles.push(node().build()?.spawn().await?);
    }
    let deadline = tokio::time::Instant::now() + GUARD;
    // Tasks 0 and 1 get their primaries; task 2 cannot.
    loop {
        let serving: Vec<_> = handles
            .iter()
            .filter_map(|h| match h.status().borrow().role {
                taskgraph::Role::Primary { task, .. } => Some(task),
                _ => None,
            })
            .collect();
        if serving.len() == 2 {
            assert!(!serving.contains(&2), "{serving:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not staffed: {serving:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let third = node().build()?.spawn().await?;
    let addrs: Vec<_> = handles.iter().filter_map(|h| h.metrics_addr()).collect();
    // The staffer (task 0's primary) drafts the third node into task 2 and is refused: its
    // drafts are counted as etcd errors…
    let refused = r#"taskgraph_etcd_requests_total{job=""#;
    tokio::time::timeout(GUARD, async {
        loop {
            for addr in &addrs {
                let text = get_metrics(*addr).await;
                if text.lines().any(|l| {
                    l.starts_with(refused)
                        && l.contains(r#"op="txn draft""#)
                        && l.contains(r#"outcome="error""#)
                }) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .map_err(|_| "the staffer never tried task 2")?;
    let free = etcd
        .etcdctl([root.as_str(), "get", denied.as_str()])
        .await?;
    assert!(free.trim().is_empty(), "task 2 was claimed: {free}");
    let mut status = third.status();
    // …until the permission is granted.
    etcd.etcdctl([
        root.as_str(),
        "role",
        "grant-permission",
        role.as_str(),
        "readwrite",
        denied.as_str(),
        after.as_str(),
    ])
    .await?;
    tokio::time::timeout(GUARD, async {
        loop {
            if matches!(
                status.borrow().role,
                taskgraph::Role::Primary { task: 2, .. }
            ) {
                break;
            }
            if status.changed().await.is_err() {
                panic!("the third node ended");
            }
        }
    })
    .await
    .map_err(|_| "the third node never took task 2 after the grant")?;
    for h in handles.into_iter().chain([third]) {
        let exit = h.stop().await?;
        assert_eq!(exit, NodeExit::Stopped, "a node did not stop cleanly");
    }
    Ok(())
}
