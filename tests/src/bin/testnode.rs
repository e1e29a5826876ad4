//! A taskgraph node running the audit test task, printing one JSON line per status change
//! and per task event, each stamped with the wall-clock time it was taken at (see
//! [`Stamped`]). Used by the process tests (kill -9, SIGSTOP, SIGTERM).

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Wake, Waker};
use std::time::Duration;

use clap::Parser;
use taskgraph::{Framework, NodeStatus, Role};
use taskgraph_tests::apps::{Audit, AuditBuilder, Behaviour};
use taskgraph_tests::cluster::{App, ClusterConfig};
use taskgraph_tests::dataflow::DataflowBuilder;
use taskgraph_tests::process::{now_us, Line, Stamped, StatusLine};
use tokio::sync::watch;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    #[arg(long)]
    job: String,
    #[arg(long)]
    tasks: u32,
    #[arg(long, default_value_t = 2)]
    replicas: u32,
    #[arg(long, default_value_t = 1)]
    ttl_secs: u64,
    #[arg(long)]
    drive_until: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pace_ms: u64,
    /// Run the dataflow app (instead of the audit app) until this epoch.
    #[arg(long)]
    dataflow_until: Option<u64>,
    /// Hold this node's drivers at this epoch (they do not move the job on from it, nor end
    /// it there) until the line `release` arrives on stdin.
    #[arg(long)]
    hold_at: Option<u64>,
    /// The gRPC listen address (default `127.0.0.1:0`); the node advertises the bound one.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

/// Prints `line` stamped with `at_us`: take the stamp first thing where the line's event is
/// seen, so a line stamped before a SIGSTOP describes something that happened before it.
fn print(at_us: u64, line: Line) {
    let stamped = Stamped {
        at_us: Some(at_us),
        line,
    };
    if let Ok(s) = serde_json::to_string(&stamped) {
        println!("{s}");
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    taskgraph_tests::init_logs();
    let args = Args::parse();
    let cluster = ClusterConfig {
        etcd: args.etcd.clone(),
        job: args.job.clone(),
        tasks: args.tasks,
        replicas: args.replicas,
        ttl: Duration::from_secs(args.ttl_secs),
        stall_after: None,
        behaviour: Behaviour {
            drive_until: args.drive_until,
            all_drive: false,
            pace_ms: args.pace_ms,
        },
        app: App::Audit,
        answer_bytes: 0,
    };
    let audit = Audit::with_callback(|_, e| {
        let at = now_us();
        print(at, Line::Event(e.clone()));
    });
    if let Some(epoch) = args.hold_at {
        audit.open_gate_until(epoch);
        let audit = audit.clone();
        // A plain thread: blocking reads of stdin, until it closes.
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                match line {
                    Ok(l) if l.trim() == "release" => audit.open_gate(),
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
    }
    let framework = Framework::builder()
        .etcd(args.etcd)
        .job(args.job)
        .tasks(args.tasks)
        .replicas(args.replicas)
        .links(cluster.links())
        .lease_ttl(cluster.ttl)
        .node_name("proc");
    let framework = match args.listen {
        Some(addr) => framework.listen(addr),
        None => framework,
    };
    let framework = match args.dataflow_until {
        Some(until) => framework.task_builder(DataflowBuilder {
            node: "proc".into(),
            audit,
            until,
            pace: Duration::from_millis(args.pace_ms),
            state: true,
        }),
        None => framework.task_builder(AuditBuilder {
            node: "proc".into(),
            audit,
            behaviour: cluster.behaviour,
        }),
    }
    .build();
    let framework = match framework {
        Ok(f) => f,
        Err(e) => {
            eprintln!("testnode: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // Print status changes from a side task while the node runs.
    let handle = match framework.spawn().await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("testnode: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let mut status = StatusStamps::new(handle.status());
    tokio::spawn(async move {
        let mut next = Some(status.current());
        while let Some((at, s)) = next {
            let (role, task, term) = match s.role {
                Role::Spare => ("spare", None, None),
                Role::Primary { task, term } => ("primary", Some(task), Some(term)),
                Role::Backup { task } => ("backup", Some(task), None),
            };
            print(
                at,
                Line::Status(StatusLine {
                    role: role.into(),
                    task,
                    term,
                    acting: s.acting,
                    epoch: s.epoch,
                    finished: s.finished,
                }),
            );
            next = status.changed().await;
        }
    });
    let result = handle
        .stop_on(async {
            let _ = handle_signals().await;
        })
        .await;
    print(now_us(), Line::Exit(format!("{result:?}")));
    match result {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::from(1),
    }
}

/// The node's status changes, each with the time it was published at.
///
/// This task may run long after the framework published a status (the process is loaded, or
/// it was stopped with SIGSTOP right after the publication): stamping a status when this task
/// reads it would date a status published before a SIGSTOP after the SIGCONT. So the status is
/// read and stamped by the waker of the wait for a change, which the framework calls as it
/// publishes, in its own thread. A status that changed again since is stamped when read.
struct StatusStamps {
    /// Tells when the status changed.
    changes: watch::Receiver<NodeStatus>,
    shared: Arc<Snapshots>,
}

/// What the waker and the printing task share.
struct Snapshots {
    /// Reads the status; its "seen" mark is the last value read (by the waker or the task).
    rx: Mutex<watch::Receiver<NodeStatus>>,
    /// The status the waker read, with the time it read it.
    taken: Mutex<Option<(u64, NodeStatus)>>,
}

impl Snapshots {
    /// Reads the status now, marking it seen: `(now, status)`, and whether it changed since
    /// it was last read.
    fn read(&self) -> (u64, NodeStatus, bool) {
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        let cur = rx.borrow_and_update();
        (now_us(), cur.clone(), cur.has_changed())
    }
}

/// Wakes the printing task, having read and stamped the status first.
struct StampingWaker {
    inner: Waker,
    shared: Arc<Snapshots>,
}

impl Wake for StampingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let (at, s, _) = self.shared.read();
        *self
            .shared
            .taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((at, s));
        self.inner.wake_by_ref();
    }
}

impl StatusStamps {
    fn new(changes: watch::Receiver<NodeStatus>) -> Self {
        let rx = Mutex::new(changes.clone());
        StatusStamps {
            changes,
            shared: Arc::new(Snapshots {
                rx,
                taken: Mutex::new(None),
            }),
        }
    }

    /// The current status, stamped now.
    fn current(&mut self) -> (u64, NodeStatus) {
        self.changes.borrow_and_update();
        let (at, s, _) = self.shared.read();
        (at, s)
    }

    /// Waits for the status to change; `None` once the node is gone.
    async fn changed(&mut self) -> Option<(u64, NodeStatus)> {
        {
            let shared = self.shared.clone();
            let changed = self.changes.changed();
            tokio::pin!(changed);
            std::future::poll_fn(|cx| {
                let waker = Waker::from(Arc::new(StampingWaker {
                    inner: cx.waker().clone(),
                    shared: shared.clone(),
                }));
                changed.as_mut().poll(&mut Context::from_waker(&waker))
            })
            .await
            .ok()?;
        }
        // Marked seen before reading, so a change after the read is waited for next time.
        self.changes.borrow_and_update();
        let taken = self
            .shared
            .taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let (now, cur, changed_since) = self.shared.read();
        Some(match taken {
            // Nothing was published since the waker read the status: it is the one printed,
            // and it was current when the waker stamped it.
            Some(snapshot) if !changed_since => snapshot,
            _ => (now, cur),
        })
    }
}

async fn handle_signals() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    term.recv().await;
    Ok(())
}
