//! Tests of the real-etcd fixtures in `taskgraph_tests::etcd`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::{GetOptions, PutOptions};
use taskgraph_tests::etcd::{
    etcdctl, etcdctl_with_stdin, Etcd, EtcdCluster, EtcdOptions, FixtureError,
};
use taskgraph_tests::http_get;

/// Whether a process with this pid still exists (zombies included).
fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether a process with this pid exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

async fn get_value(client: &mut etcd_client::Client, key: &str) -> Option<Vec<u8>> {
    let resp = client.get(key, None).await.unwrap();
    resp.kvs().first().map(|kv| kv.value().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_kill_restart_keeps_data() {
    let started = Instant::now();
    let etcd = Etcd::start().await.unwrap();
    eprintln!("etcd ready in {:?}", started.elapsed());

    let endpoints = etcd.endpoints();
    assert_eq!(endpoints.len(), 1);
    assert!(
        endpoints[0].starts_with("http://127.0.0.1:"),
        "{endpoints:?}"
    );
    assert!(etcd.is_running());
    let pid = etcd.pid().unwrap();
    assert!(process_exists(pid));

    let mut client = etcd.client().await.unwrap();
    client.put("fixture/k", "v1", None).await.unwrap();
    assert_eq!(
        get_value(&mut client, "fixture/k").await.as_deref(),
        Some(&b"v1"[..])
    );

    // Crash it: requests fail, within the client's request timeout.
    etcd.kill().await.unwrap();
    assert!(!etcd.is_running());
    assert_eq!(etcd.pid(), None);
    assert!(!process_exists(pid), "killed etcd {pid} was not reaped");
    etcd.kill().await.unwrap(); // no-op when dead

    let t = Instant::now();
    let err = client.get("fixture/k", None).await;
    assert!(err.is_err(), "get succeeded against a killed etcd: {err:?}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "get took {:?} to fail",
        t.elapsed()
    );
    eprintln!(
        "get on killed etcd failed after {:?}: {:?}",
        t.elapsed(),
        err.err()
    );

    // Restart on the same port and data dir: the key survives.
    let t = Instant::now();
    etcd.restart().await.unwrap();
    eprintln!("restart took {:?}", t.elapsed());
    assert!(etcd.is_running());
    assert_eq!(etcd.endpoints(), endpoints);
    let new_pid = etcd.pid().unwrap();
    assert_ne!(new_pid, pid);

    let mut fresh = etcd.client().await.unwrap();
    assert_eq!(
        get_value(&mut fresh, "fixture/k").await.as_deref(),
        Some(&b"v1"[..])
    );

    // The old client reconnects by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.get("fixture/k", None).await {
            Ok(resp) => {
                assert_eq!(resp.kvs()[0].value(), b"v1");
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "old client never reconnected: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("old client reconnected {:?} after restart", t.elapsed());

    // The log records both starts.
    let log = std::fs::read_to_string(etcd.log_path()).unwrap();
    assert_eq!(log.matches("=== taskgraph fixture: start #").count(), 2);

    let dir = etcd.dir().to_owned();
    drop(etcd);
    assert!(
        !process_exists(new_pid),
        "etcd {new_pid} outlived its fixture"
    );
    assert!(!dir.exists(), "{} not removed", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_second_lease_is_granted_and_expires() {
    let etcd = Etcd::start().await.unwrap();
    let mut client = etcd.client().await.unwrap();

    let lease = client.lease_grant(1, None).await.unwrap();
    assert_eq!(
        lease.ttl(),
        1,
        "etcd did not grant a 1 s TTL (election timeout flags?)"
    );

    client
        .put(
            "fixture/leased",
            "x",
            Some(PutOptions::new().with_lease(lease.id())),
        )
        .await
        .unwrap();
    assert!(get_value(&mut client, "fixture/leased").await.is_some());

    // Without keep-alives the key disappears after about a second.
    let t = Instant::now();
    let deadline = t + Duration::from_secs(5);
    while get_value(&mut client, "fixture/leased").await.is_some() {
        assert!(
            Instant::now() < deadline,
            "leased key still there after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("1 s lease expired after {:?}", t.elapsed());
    assert!(t.elapsed() >= Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_restart_metrics_and_etcdctl() {
    let etcd = Etcd::start().await.unwrap();

    // etcdctl put, client get.
    etcd.etcdctl(["put", "fixture/ctl", "from-etcdctl"])
        .await
        .unwrap();
    let mut client = etcd.client().await.unwrap();
    assert_eq!(
        get_value(&mut client, "fixture/ctl").await.as_deref(),
        Some(&b"from-etcdctl"[..])
    );

    // Arbitrary bytes through stdin.
    let garbage: &[u8] = b"\x00\xff\xfe{not json\n";
    etcdctl_with_stdin(&etcd.endpoints(), ["put", "fixture/garbage"], Some(garbage))
        .await
        .unwrap();
    let got = get_value(&mut client, "fixture/garbage").await.unwrap();
    // etcdctl 3.4 stores all of stdin, trailing newline included.
    assert_eq!(got, garbage);

    // Client put, etcdctl get.
    client
        .put("fixture/client", "from-client", None)
        .await
        .unwrap();
    let out = etcd
        .etcdctl(["get", "fixture/client", "--print-value-only"])
        .await
        .unwrap();
    assert_eq!(out.trim(), "from-client");

    // Metrics are served.
    let metrics = http_get(&etcd.metrics_url()).await;
    assert!(
        metrics.starts_with("HTTP/1.0 200"),
        "{}",
        &metrics[..metrics.len().min(200)]
    );
    assert!(metrics.contains("etcd_server_has_leader 1"));

    // Graceful stop: etcdctl now fails with an error carrying stderr.
    let pid = etcd.pid().unwrap();
    etcd.stop().await.unwrap();
    assert!(!etcd.is_running());
    assert!(!process_exists(pid));
    let tail = etcd.log_tail(20);
    assert!(tail.contains("received signal; shutting down"), "{tail}");
    // A later --command-timeout overrides the helper's default.
    let t = Instant::now();
    let err = etcd
        .etcdctl(["get", "fixture/ctl", "--command-timeout=1s"])
        .await
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    assert!(matches!(err, FixtureError::Etcdctl { .. }), "{err}");
    eprintln!("etcdctl against stopped etcd: {err}");

    etcd.restart().await.unwrap();
    let out = etcdctl(
        &etcd.endpoints(),
        ["get", "fixture/ctl", "--print-value-only"],
    )
    .await
    .unwrap();
    assert_eq!(out.trim(), "from-etcdctl");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_fail_with_log_tail() {
    let t = Instant::now();
    let err = Etcd::start_with(EtcdOptions::default().with_arg("--no-such-flag-for-etcd"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FixtureError::Exited { .. }), "{msg}");
    assert!(
        msg.contains("no-such-flag-for-etcd"),
        "log tail missing: {msg}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_elects_new_leader_and_member_rejoins() {
    let t = Instant::now();
    let cluster = EtcdCluster::start(3).await.unwrap();
    eprintln!("3-member cluster ready in {:?}", t.elapsed());
    assert_eq!(cluster.len(), 3);
    let endpoints = cluster.endpoints();
    assert_eq!(endpoints.len(), 3);
    let mut distinct = endpoints.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3);

    let old = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let mut client = cluster.client().await.unwrap();
    client.put("fixture/before", "1", None).await.unwrap();

    // Kill the leader: one of the two others takes over.
    cluster.kill(old).await.unwrap();
    assert!(!cluster.is_running(old));
    let t = Instant::now();
    let new = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    eprintln!("new leader {new} (old {old}) after {:?}", t.elapsed());
    assert_ne!(new, old);
    assert!(cluster.is_running(new));

    // The cluster still accepts writes (retry: the client may first pick the dead endpoint).
    let mut leader_client = cluster.member_client(new).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match leader_client.put("fixture/after", "2", None).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "put after failover failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Restart the killed member: it rejoins, follows the leader, and catches up.
    let t = Instant::now();
    cluster.restart(old).await.unwrap();
    eprintln!("member {old} restarted in {:?}", t.elapsed());
    assert!(cluster.is_running(old));
    let leader = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();

    let mut rejoined = cluster.member_client(old).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // A member just restarted may refuse a request or two while it replays its log.
        let seen = match rejoined.status().await {
            Ok(status) => match rejoined
                .get("fixture/after", Some(GetOptions::new().with_serializable()))
                .await
            {
                Ok(resp)
                    if status.leader() == cluster.member_id(leader) && resp.kvs().len() == 1 =>
                {
                    assert_eq!(resp.kvs()[0].value(), b"2");
                    break;
                }
                Ok(resp) => format!("{status:?}, {} keys", resp.kvs().len()),
                Err(e) => format!("get: {e}"),
            },
            Err(e) => format!("status: {e}"),
        };
        assert!(
            Instant::now() < deadline,
            "member {old} did not catch up: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // etcdctl against the cluster, read back by a client of the leader (the first client's
    // connection went to whichever member it picked, perhaps the one killed and restarted:
    // its first request after that can fail, seen once in a full-suite run).
    cluster.etcdctl(["put", "fixture/ctl", "c"]).await.unwrap();
    let mut reader = cluster.member_client(leader).await.unwrap();
    assert_eq!(
        get_value(&mut reader, "fixture/ctl").await.as_deref(),
        Some(&b"c"[..])
    );

    let pids: Vec<u32> = (0..3).map(|i| cluster.pid(i).unwrap()).collect();
    drop(cluster);
    for pid in pids {
        assert!(!process_exists(pid), "etcd {pid} outlived its cluster");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_survives_total_outage_with_restart_all() {
    let cluster = EtcdCluster::start(3).await.unwrap();
    let mut client = cluster.client().await.unwrap();
    client.put("fixture/durable", "yes", None).await.unwrap();

    cluster.kill_all().await.unwrap();
    assert_eq!(cluster.leader().await, None);
    assert!((0..3).all(|i| !cluster.is_running(i)));

    cluster.restart_all().await.unwrap();
    cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let mut fresh = cluster.client().await.unwrap();
    assert_eq!(
        get_value(&mut fresh, "fixture/durable").await.as_deref(),
        Some(&b"yes"[..])
    );
}

const HELPER_ENV: &str = "TASKGRAPH_ETCD_FIXTURE_HELPER";

/// Run as a child process by `etcd_dies_with_a_killed_test_process`: starts an
/// etcd, prints its pid and waits to be killed. Does nothing otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper for etcd_dies_with_a_killed_test_process"]
async fn helper_start_etcd_and_wait() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let etcd = Etcd::start().await.unwrap();
    println!("ETCD_PID={}", etcd.pid().unwrap());
    tokio::time::sleep(Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_dies_with_a_killed_test_process() {
    use tokio::io::AsyncBufReadExt;

    let mut helper = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_start_etcd_and_wait",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(helper.stdout.take().unwrap()).lines();
    let pid: u32 = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(pid) = line.strip_prefix("ETCD_PID=") {
                return pid.trim().parse().unwrap();
            }
        }
        panic!("helper exited without starting etcd");
    })
    .await
    .expect("helper did not start etcd in time");
    assert!(process_alive(pid));

    // SIGKILL: no destructor runs in the helper; etcd must die anyway.
    helper.kill().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "etcd {pid} outlived its killed test process"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
