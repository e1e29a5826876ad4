//! A taskgraph node running the audit test task, printing one JSON line per status change
//! and per task event. Used by the process tests (kill -9, SIGSTOP, SIGTERM).

use std::time::Duration;

use clap::Parser;
use taskgraph::{Framework, Role};
use taskgraph_tests::apps::{Audit, AuditBuilder, Behaviour};
use taskgraph_tests::cluster::{App, ClusterConfig};
use taskgraph_tests::dataflow::DataflowBuilder;
use taskgraph_tests::process::{Line, StatusLine};

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
}

fn print(line: &Line) {
    if let Ok(s) = serde_json::to_string(line) {
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
        behaviour: Behaviour {
            drive_until: args.drive_until,
            all_drive: false,
            pace_ms: args.pace_ms,
        },
        app: App::Audit,
    };
    let audit = Audit::with_callback(|_, e| print(&Line::Event(e.clone())));
    let framework = Framework::builder()
        .etcd(args.etcd)
        .job(args.job)
        .tasks(args.tasks)
        .replicas(args.replicas)
        .links(cluster.links())
        .lease_ttl(cluster.ttl)
        .node_name("proc");
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
    let mut status = handle.status();
    tokio::spawn(async move {
        loop {
            let s = status.borrow_and_update().clone();
            let (role, task, term) = match s.role {
                Role::Spare => ("spare", None, None),
                Role::Primary { task, term } => ("primary", Some(task), Some(term)),
                Role::Backup { task } => ("backup", Some(task), None),
            };
            print(&Line::Status(StatusLine {
                role: role.into(),
                task,
                term,
                acting: s.acting,
                epoch: s.epoch,
                finished: s.finished,
            }));
            if status.changed().await.is_err() {
                return;
            }
        }
    });
    let result = handle
        .stop_on(async {
            let _ = handle_signals().await;
        })
        .await;
    print(&Line::Exit(format!("{result:?}")));
    match result {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::from(1),
    }
}

async fn handle_signals() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    term.recv().await;
    Ok(())
}
