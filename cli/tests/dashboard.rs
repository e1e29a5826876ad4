//! `taskgraph dashboard` in a real browser (Debian's headless chromium, driven over the
//! DevTools protocol) against a real etcd and a running job of in-process nodes.
//!
//! Every wait polls the page's DOM until a condition holds, with a generous deadline; no
//! assertion is about how long something took.

mod browser;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use browser::Browser;
use etcd_client::{Txn, TxnOp};
use serde_json::Value;
use taskgraph::JobClient;
use taskgraph_tests::cluster::{App, Cluster, ClusterConfig};
use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::job_name;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(30);

/// The `taskgraph dashboard` process and the address it printed.
struct Dashboard {
    _child: Child,
    base: String,
}

async fn dashboard(etcd: &Etcd, args: &[&str]) -> Dashboard {
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskgraph"))
        .arg("--etcd")
        .arg(etcd.endpoint())
        .arg("dashboard")
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run taskgraph dashboard: {e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("the dashboard printed no address"))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_default();
    let second = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .unwrap_or_default();
    assert!(
        second.contains("loopback only"),
        "the dashboard says where it listens: {second:?}"
    );
    let url = first
        .strip_prefix("dashboard: ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
    let base = url
        .find("/job/")
        .map_or(url.trim_end_matches('/'), |i| &url[..i])
        .to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{first}");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Dashboard {
        _child: child,
        base,
    }
}

async fn status_json(etcd: &Etcd, job: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_taskgraph"))
        .args(["--etcd", etcd.endpoint(), "status", job, "--json"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    )
}

/// What the page shows, for failure messages.
const SHOW: &str = "JSON.stringify({state: document.body.dataset.state, etcd: document.body.dataset.etcd, \
    healthy: document.body.dataset.healthy, updates: document.body.dataset.updates, \
    rows: [...document.querySelectorAll('#tasks tr[data-task]')].map(r => r.dataset.task + ':' + r.dataset.health + ':' + r.dataset.primary), \
    timeline: [...document.querySelectorAll('#timeline li')].slice(0, 8).map(l => l.dataset.kind + ' ' + l.textContent)})";

fn all_healthy(n: u32) -> String {
    format!(
        "document.querySelectorAll('#picture g.task.h-healthy').length === {n} && \
         document.querySelectorAll('#tasks tr[data-health=healthy]').length === {n}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_live_job_in_a_browser() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let job = job_name("dash");
    let (tasks, replicas) = (7u32, 2u32);
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job, tasks, replicas);
    cfg.app = App::Dataflow {
        until: 1_000_000,
        pace_ms: 50,
    };
    let mut c = Cluster::start_staffed(cfg, (tasks * replicas) as usize)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let d = dashboard(&etcd, &[&job]).await;
    let mut b = Browser::launch().await;

    eprintln!("--- the job's page shows every task healthy, the tree drawn, epochs moving");
    b.goto(&format!("{}/job/{job}", d.base)).await;
    b.wait_for("every task is healthy", &all_healthy(tasks), SHOW, WAIT)
        .await;
    let edges = b
        .eval(
            "document.querySelector('#picture path.edges').getAttribute('d').split('M').length - 1",
        )
        .await;
    assert_eq!(edges, 6, "a 7-task tree has 6 edges");
    b.wait_for(
        "the epoch moves and has a rate",
        "Number(document.getElementById('epoch').textContent) > 0 && Number(document.getElementById('rate').textContent) > 0 && document.querySelector('#spark polyline').getAttribute('points').length > 0",
        "document.getElementById('progress').innerText",
        WAIT,
    )
    .await;
    // The hover text names primary and backup with the term.
    let s = status_json(&etcd, &job).await;
    let old = s["tasks"][3]["primary"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let backup = s["tasks"][3]["backups"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let title = b
        .eval("document.querySelector('#task-3 title').textContent")
        .await;
    let title = title.as_str().unwrap_or_default();
    assert!(
        title.contains(&format!("primary {old} (term {}", s["tasks"][3]["term"]))
            && title.contains(&backup),
        "{title}"
    );

    eprintln!("--- failover drill of task 3: new primary and a timeline entry");
    let out = Command::new(env!("CARGO_BIN_EXE_taskgraph"))
        .args(["--etcd", etcd.endpoint(), "failover", &job, "3"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "{out:?}");
    b.wait_for(
        "task 3's row shows the backup as its new primary, the timeline a failover of task 3, the picture rings task 3",
        &format!(
            "document.querySelector('#tasks tr[data-task=\"3\"]').dataset.primary === {backup:?} && \
             !!document.querySelector('#timeline li[data-kind=failover][data-tasks=\"3\"]') && \
             document.getElementById('task-3').classList.contains('recent')"
        ),
        SHOW,
        WAIT,
    )
    .await;
    let entry = b
        .eval("document.querySelector('#timeline li[data-kind=failover][data-tasks=\"3\"]').textContent")
        .await;
    assert!(
        entry
            .as_str()
            .is_some_and(|t| t.contains(&format!("failover: task 3 primary {old} → {backup}"))),
        "{entry}"
    );
    // Clicking the entry marks task 3 in the picture and shows its details.
    b.eval("document.querySelector('#timeline li[data-kind=failover][data-tasks=\"3\"]').click()")
        .await;
    b.wait_for(
        "task 3 is marked in the picture and detailed",
        &format!(
            "document.getElementById('task-3').classList.contains('marked') && \
             document.querySelector('#tasks tr.marked').dataset.task === '3' && \
             document.getElementById('detail').innerText.includes('Task 3') && \
             document.getElementById('detail').innerText.includes({backup:?})"
        ),
        "document.getElementById('detail').innerText",
        WAIT,
    )
    .await;
    b.wait_for(
        "every task is healthy again",
        &all_healthy(tasks),
        SHOW,
        WAIT,
    )
    .await;

    eprintln!("--- a node crashes: its task turns degraded, then recovers when a node joins");
    let s = status_json(&etcd, &job).await;
    let victim = s["tasks"][5]["backups"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let i = (0..c.len())
        .find(|i| c.node_id(*i).as_deref() == Some(victim.as_str()))
        .unwrap_or_else(|| panic!("no node {victim}"));
    c.crash(i);
    b.wait_for(
        "task 5 is drawn degraded",
        "document.getElementById('task-5').classList.contains('h-degraded') && \
         document.querySelector('#tasks tr[data-task=\"5\"]').dataset.health === 'degraded'",
        SHOW,
        WAIT,
    )
    .await;
    c.add_node().await.unwrap_or_else(|e| panic!("{e}"));
    b.wait_for(
        "every task is healthy after a node joined",
        &all_healthy(tasks),
        SHOW,
        WAIT,
    )
    .await;
    b.wait_for(
        "the timeline shows the backup leaving and the node joining",
        "!!document.querySelector('#timeline li[data-kind=backup-left][data-tasks=\"5\"]') && \
         !!document.querySelector('#timeline li[data-kind=joined]')",
        SHOW,
        WAIT,
    )
    .await;
    let shot = target_dir().join("dashboard.png");
    b.screenshot(&shot).await;
    eprintln!("screenshot: {}", shot.display());

    eprintln!("--- the jobs list links to the job; an unknown job and a bad name are named");
    b.goto(&format!("{}/jobs", d.base)).await;
    b.wait_for(
        "the jobs list shows the job as running, with a link",
        &format!(
            "!!document.querySelector('#jobs tr[data-job={job:?}] a[href=\"/job/{job}\"]') && \
             document.querySelector('#jobs tr[data-job={job:?}]').innerText.includes('running')"
        ),
        "document.body.innerText",
        WAIT,
    )
    .await;
    b.goto(&format!("{}/job/no-such-job", d.base)).await;
    b.wait_for(
        "the page says the job does not exist",
        "document.body.dataset.state === 'missing' && \
         !document.getElementById('missing').hidden && \
         document.getElementById('missing').innerText.includes('does not exist')",
        SHOW,
        WAIT,
    )
    .await;
    b.goto(&format!("{}/job/Bad%20Name", d.base)).await;
    b.wait_for(
        "the page says the name is not a job name",
        "document.body.dataset.state === 'refused' && \
         document.getElementById('missing').innerText.toLowerCase().includes('job name')",
        "document.body.innerText",
        WAIT,
    )
    .await;

    eprintln!("--- etcd goes down: the page says it reconnects, then recovers");
    b.goto(&format!("{}/job/{job}", d.base)).await;
    b.wait_for("every task is healthy", &all_healthy(tasks), SHOW, WAIT)
        .await;
    etcd.stop().await.unwrap_or_else(|e| panic!("{e}"));
    b.wait_for(
        "the page says etcd is unreachable and it reconnects",
        "document.body.dataset.etcd === 'reconnecting' && \
         document.getElementById('connection').innerText.includes('reconnecting')",
        SHOW,
        WAIT,
    )
    .await;
    etcd.restart().await.unwrap_or_else(|e| panic!("{e}"));
    b.wait_for(
        "the page is back to live",
        "document.body.dataset.etcd === 'ok' && document.getElementById('connection').hidden",
        SHOW,
        WAIT,
    )
    .await;

    eprintln!("--- the job ends with a result: the page shows it");
    let client = JobClient::connect(&etcd.endpoints(), &job)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let epoch = client.state().await.ok().flatten().map_or(0, |s| s.epoch);
    // What a primary's `shutdown_job_with` writes: the end and the result in one transaction.
    let mut kv = etcd.client().await.unwrap_or_else(|e| panic!("{e}"));
    kv.txn(Txn::new().and_then([
        TxnOp::put(client.keys().epoch(), format!("done {epoch}"), None),
        TxnOp::put(client.keys().result(), r#"{"weights":[0.5,1.5]}"#, None),
    ]))
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    b.wait_for(
        "the page shows the job finished with its result",
        "document.body.dataset.state === 'finished' && \
         !document.getElementById('result-card').hidden && \
         document.getElementById('result').textContent.includes('\"weights\":[0.5,1.5]') && \
         document.querySelectorAll('#picture g.task.h-finished').length === 7",
        SHOW,
        WAIT,
    )
    .await;
    drop(b);
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_names_a_stall_and_its_cause() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let job = job_name("dashstall");
    let mut cfg = ClusterConfig::new(etcd.endpoints(), &job, 3, 1);
    cfg.app = App::Dataflow {
        until: 1_000_000,
        pace_ms: 20,
    };
    cfg.stall_after = Some(Duration::from_secs(1));
    // Two nodes for three tasks: one task stays without a primary, the job cannot move.
    let mut c = Cluster::new(cfg);
    for _ in 0..2 {
        c.add_node().await.unwrap_or_else(|e| panic!("{e}"));
    }
    let d = dashboard(&etcd, &[&job]).await;
    let mut b = Browser::launch().await;
    b.goto(&format!("{}/job/{job}", d.base)).await;

    eprintln!("--- the page names the stall, its cause and the task without a primary");
    b.wait_for(
        "the stall banner names a task without a primary, drawn down, and the timeline has the report",
        "(() => { const free = [...document.querySelectorAll('#tasks tr[data-task]')].find(r => r.dataset.health === 'down'); \
           if (!free) return false; const t = free.dataset.task; \
           return !document.getElementById('stall').hidden && \
             document.getElementById('stall').innerText.includes('has no primary') && \
             document.getElementById('task-' + t).classList.contains('h-down') && \
             [...document.querySelectorAll('#timeline li[data-kind=stall]')].some(l => l.dataset.tasks.split(' ').includes(t)) && \
             document.getElementById('job-state').innerText.includes('stalled'); })()",
        SHOW,
        WAIT,
    )
    .await;

    eprintln!("--- a third node joins: the job moves, the stall is over");
    c.add_node().await.unwrap_or_else(|e| panic!("{e}"));
    b.wait_for(
        "the stall banner goes, the timeline says the stall is over and every task is healthy",
        &format!(
            "document.getElementById('stall').hidden && \
             !!document.querySelector('#timeline li[data-kind=stall-over]') && ({})",
            all_healthy(3)
        ),
        SHOW,
        WAIT,
    )
    .await;
    drop(b);
    c.stop_all().await;
}

/// A 1,000-task job (its keys written straight into etcd, no nodes): every task is drawn,
/// the table pages, the filter and a click in the picture work, and a change still shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_task_job_stays_usable() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let job = job_name("dashbig");
    let tasks = 1000u32;
    let client = JobClient::connect(&etcd.endpoints(), &job)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let keys = client.keys().clone();
    let grid = taskgraph::topology::Grid::new(25, 40).unwrap_or_else(|e| panic!("{e}"));
    let spec = taskgraph::JobSpec {
        version: taskgraph::JobSpec::VERSION,
        tasks,
        replicas: 2,
        links: grid.links().describe(),
        params: Default::default(),
        created_ms: None,
    };
    let holder = |n: u32| format!(r#"{{"node":"n{n}","addr":"127.0.0.1:{}"}}"#, 10_000 + n);
    // Tasks 7, 77, 777 have no primary (down); every tenth task no backup (degraded).
    let mut ops = vec![
        TxnOp::put(keys.spec(), spec.encode(), None),
        TxnOp::put(keys.epoch(), "5", None),
    ];
    for t in 0..tasks {
        if ![7, 77, 777].contains(&t) {
            ops.push(TxnOp::put(keys.primary(t), holder(t), None));
        }
        if t % 10 != 0 {
            ops.push(TxnOp::put(keys.backup(t, 1), holder(t + tasks), None));
        }
    }
    let mut kv = etcd.client().await.unwrap_or_else(|e| panic!("{e}"));
    for chunk in ops.chunks(100) {
        kv.txn(Txn::new().and_then(chunk.to_vec()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let d = dashboard(&etcd, &[&job]).await;
    let mut b = Browser::launch().await;
    let opened = std::time::Instant::now();
    b.goto(&format!("{}/job/{job}", d.base)).await;
    b.wait_for(
        "1,000 tasks drawn and coloured, the table on page 1 of 20",
        "document.querySelectorAll('#picture g.task').length === 1000 && \
         document.querySelectorAll('#picture g.task.h-down').length === 3 && \
         document.querySelectorAll('#picture g.task.h-degraded').length === 100 && \
         document.querySelectorAll('#picture g.task.h-healthy').length === 897 && \
         document.querySelectorAll('#tasks tr[data-task]').length === 50 && \
         document.getElementById('page').innerText.includes('page 1 of 20')",
        SHOW,
        WAIT,
    )
    .await;
    eprintln!(
        "1,000 tasks shown {:?} after opening the page",
        opened.elapsed()
    );
    b.screenshot(&target_dir().join("dashboard-1000.png")).await;
    // Not healthy only: 103 tasks, on three pages.
    b.eval("const f = document.getElementById('filter'); f.value = 'unhealthy'; f.dispatchEvent(new Event('change'))")
        .await;
    b.wait_for(
        "the filter keeps the 103 tasks not healthy",
        "document.getElementById('page').innerText.includes('page 1 of 3 (103 tasks)') && \
         [...document.querySelectorAll('#tasks tr[data-task]')].every(r => r.dataset.health !== 'healthy')",
        SHOW,
        WAIT,
    )
    .await;
    // A click on task 777 in the picture shows it in the table and in the details.
    b.eval("document.querySelector('#task-777 circle').dispatchEvent(new MouseEvent('click', {bubbles: true}))")
        .await;
    b.wait_for(
        "task 777 is marked and detailed",
        "document.querySelector('#tasks tr.marked').dataset.task === '777' && \
         document.getElementById('detail').innerText.includes('Task 777') && \
         document.getElementById('task-777').classList.contains('marked')",
        "document.getElementById('detail').innerText",
        WAIT,
    )
    .await;
    // Still live: task 500 loses its primary.
    kv.delete(keys.primary(500), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.wait_for(
        "task 500 turns down and the timeline says so",
        "document.getElementById('task-500').classList.contains('h-down') && \
         !!document.querySelector('#timeline li[data-kind=lost][data-tasks=\"500\"]')",
        SHOW,
        WAIT,
    )
    .await;
}

/// Expects the dashboard to refuse, with one `error:` line containing `needle`.
async fn refused(envs: &[(&str, &str)], args: &[&str], needle: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_taskgraph"))
        .args(["--etcd", "http://127.0.0.1:1", "dashboard"])
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?}: {out:?}");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
}

#[tokio::test]
async fn the_dashboard_refuses_to_listen_where_it_was_not_told_to() {
    // A non-loopback address from the environment only: refused before anything else.
    refused(
        &[("TASKGRAPH_DASHBOARD_LISTEN", "0.0.0.0:0")],
        &["some-job"],
        "not a loopback address",
    )
    .await;
    refused(&[], &["some-job", "--listen", "localhost"], "--listen").await;
    refused(&[], &["Bad/Name", "--listen", "127.0.0.1:0"], "job name").await;
    // Explicitly on the command line, a non-loopback address is allowed: the command goes
    // on to etcd (here unreachable).
    refused(&[], &["some-job", "--listen", "0.0.0.0:0"], "unreachable").await;
}
