//! Pauses beyond those of `processes.rs` and `exchange_processes.rs` (which pause a primary):
//! a *backup* stopped with SIGSTOP for longer than the lease TTL, while its primary keeps
//! replicating to it; and the root's primary (the job's driver) paused at the same time as a
//! backup of another task. The job must keep moving while they are stopped, nothing they do
//! after SIGCONT may count (no action under a stale term, no two primaries), and the job must
//! finish with an exact audit trail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use taskgraph_tests::etcd::Etcd;
use taskgraph_tests::fleet::{
    assert_all_finish, assert_trail_with_cut_root, dump, max_epoch, stale_actions, wait_all,
    wait_staffed_at, Job, Proc, WAIT,
};
use taskgraph_tests::process::{Arrivals, Placement, StatusLine};
use taskgraph_tests::{init_logs, job_name};
use tracing::info;

const BIN: &str = env!("CARGO_BIN_EXE_testnode");
/// The length of each pause: longer than the 1 s lease TTL of these jobs.
const PAUSE: Duration = Duration::from_millis(2500);

fn job(etcd: &Etcd, test: &str, tasks: u32, until: u64) -> Job {
    Job {
        bin: BIN.into(),
        etcd: etcd.endpoints(),
        name: job_name(test),
        tasks,
        replicas: 2,
        ttl_secs: 1,
        until,
        pace_ms: 20,
        held: true,
    }
}

fn spawn_all(job: &Job) -> Vec<Proc> {
    let arrivals = Arrivals::default();
    (0..job.tasks * job.replicas)
        .map(|i| Proc::spawn(job, format!("p{i}"), &arrivals, &Placement::default(), None))
        .collect()
}

fn backup_of(st: &[StatusLine], task: u32) -> usize {
    st.iter()
        .position(|s| s.role == "backup" && s.task == Some(task))
        .unwrap_or_else(|| panic!("a backup of task {task}: {st:#?}"))
}

/// Pauses `victims` for [`PAUSE`] and checks that the others move the job on meanwhile; then
/// resumes them, lets the job end, and checks everything.
/// Pauses `victims` past their lease, resumes them and checks the finished job. `cut_root`:
/// the term of the root's primary when it is among the victims (see
/// `assert_trail_with_cut_root`).
async fn pause_and_finish(
    mut nodes: Vec<Proc>,
    victims: &[usize],
    tasks: u32,
    until: u64,
    cut_root: Option<u64>,
) {
    for &v in victims {
        assert!(nodes[v].node.pause().is_ok(), "SIGSTOP {}", nodes[v].name);
        nodes[v]
            .node
            .wait_stopped(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let others: Vec<&Proc> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| !victims.contains(i))
        .map(|(_, n)| n)
        .collect();
    let resume_at = tokio::time::Instant::now() + PAUSE;
    let at = max_epoch(&others.iter().map(|n| n.lines()).collect::<Vec<_>>());
    // The paused nodes stay stopped until the others moved the job on (however long that
    // takes: the job must not need them) and for at least PAUSE, past their leases.
    wait_all(&others, "the job moves on during the pause", WAIT, |all| {
        max_epoch(all) >= at + 3
    })
    .await;
    tokio::time::sleep_until(resume_at).await;
    for &v in victims {
        assert!(nodes[v].node.resume().is_ok(), "SIGCONT {}", nodes[v].name);
    }
    let all: Vec<&Proc> = nodes.iter().collect();
    let at = max_epoch(&all.iter().map(|n| n.lines()).collect::<Vec<_>>());
    wait_all(&all, "the job moves on after SIGCONT", WAIT, |all| {
        max_epoch(all) >= at + 3
    })
    .await;

    info!("--- let the job end");
    for n in &mut nodes {
        n.release().await;
    }
    {
        let mut all: Vec<&mut Proc> = nodes.iter_mut().collect();
        assert_all_finish(&mut all, until).await;
    }
    let all: Vec<&Proc> = nodes.iter().collect();
    let bad = stale_actions(&all);
    assert!(bad.is_empty(), "{}{}", bad.join("\n"), dump(&all));
    // (No check of the statuses' spans here: a stopped process cannot publish that it stopped
    // acting, so its last status claims acting until it runs again; what it does after SIGCONT
    // is what counts, and `stale_actions` checks that.)
    // A root paused after recording the result of its epoch but before moving the epoch on
    // (a SIGSTOP can land anywhere) sees its successor record that epoch's result again.
    assert_trail_with_cut_root(&all, tasks, until, cut_root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_paused_past_its_lease_neither_stalls_the_job_nor_returns_stale() {
    init_logs();
    let etcd = Etcd::start().await.expect("start etcd");
    let (tasks, until) = (3, 300);
    let job = job(&etcd, "pausebackup", tasks, until);
    let nodes = spawn_all(&job);
    let refs: Vec<&Proc> = nodes.iter().collect();
    let st = wait_staffed_at(&refs, 3).await;
    let b = backup_of(&st, 1);
    info!(
        "--- SIGSTOP the backup of task 1 ({}) for {PAUSE:?}",
        nodes[b].name
    );
    pause_and_finish(nodes, &[b], tasks, until, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_and_another_tasks_backup_paused_together_change_nothing() {
    init_logs();
    let etcd = Etcd::start().await.expect("start etcd");
    let (tasks, until) = (3, 300);
    let job = job(&etcd, "pausedriver", tasks, until);
    let nodes = spawn_all(&job);
    let refs: Vec<&Proc> = nodes.iter().collect();
    let st = wait_staffed_at(&refs, 3).await;
    let (root, root_term) = st
        .iter()
        .enumerate()
        .find_map(|(i, s)| s.primary_of(0).map(|t| (i, t)))
        .unwrap_or_else(|| panic!("a primary of task 0: {st:#?}"));
    let b = backup_of(&st, 2);
    info!(
        "--- SIGSTOP the root's primary ({}) and task 2's backup ({}) for {PAUSE:?}",
        nodes[root].name, nodes[b].name
    );
    pause_and_finish(nodes, &[root, b], tasks, until, Some(root_term)).await;
}
