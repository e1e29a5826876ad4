//! `taskgraph`: the operator's view of taskgraph jobs in etcd.
//!
//! Every command reads (or, for `failover`, `shutdown` and `gc`, changes) the job's keys in
//! etcd through [`taskgraph::JobClient`]; none needs a node of the job to answer. Errors are
//! one `error:` line and a non-zero exit.

/// `println!` for the command's output, which may go to a pipe that closes early (`taskgraph
/// status JOB | head`): a closed pipe ends the process quietly with success, as for other Unix
/// tools; any other write error is one `error:` line.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            $crate::stdout_failed(&e)
        }
    }};
}

/// Ends the process after a failed write to stdout.
pub(crate) fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write the output: {e}");
    std::process::exit(1)
}

mod dashboard;
mod events;
mod graph;
mod render;
mod security;

use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use security::EtcdConn;
use taskgraph::{JobClient, TaskId};

/// Watch and steer taskgraph jobs.
#[derive(Debug, Parser)]
#[command(name = "taskgraph", version)]
struct Cli {
    /// etcd endpoints (repeat the flag or separate with commas).
    #[arg(
        long,
        global = true,
        env = "TASKGRAPH_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd: Vec<String>,
    #[command(flatten)]
    security: security::EtcdSecurityArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The jobs in etcd: state, epoch, tasks, age.
    Jobs {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One row per task: primary, address, term, backups, health; spares; a summary.
    Status {
        /// The job.
        job: String,
        /// Print JSON (an object with a `tasks` array) instead of a table.
        #[arg(long)]
        json: bool,
        /// Redraw on every change until the job finishes (Ctrl-C to leave).
        #[arg(long)]
        watch: bool,
        /// At most this many task rows: a larger job lists the tasks that need attention
        /// (down, stalled, degraded) first and counts the healthy ones it leaves out.
        #[arg(long, default_value_t = render::DEFAULT_ROWS)]
        rows: usize,
        /// List every task, however large the job.
        #[arg(long, conflicts_with = "rows")]
        all: bool,
    },
    /// A live stream of what happens: epochs, elections, failovers, lost primaries (which
    /// their neighbours see as failures), backups, nodes, checkpoints, shutdown. Ends when the
    /// job finishes. A job that does not exist yet is waited for, with a warning.
    Events {
        /// The job.
        job: String,
        /// Replay from this etcd revision (while etcd still keeps that history).
        #[arg(long)]
        since_revision: Option<i64>,
    },
    /// Failover drill: the task's primary hands over to a backup.
    Failover {
        /// The job.
        job: String,
        /// The task.
        task: TaskId,
        /// How long to wait for the backup to take over.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Ends the job: every node finishes and stops.
    Shutdown {
        /// The job.
        job: String,
    },
    /// Deletes a finished job's keys.
    Gc {
        /// The job.
        job: String,
        /// Delete even if the job is still running (its nodes lose their coordination).
        #[arg(long)]
        force: bool,
    },
    /// The job's topology at its current epoch as Graphviz DOT, nodes coloured by health.
    Graph {
        /// The job.
        job: String,
        /// Also render an SVG with Graphviz `dot` (if installed) into this file.
        #[arg(long)]
        svg: Option<std::path::PathBuf>,
    },
    /// A live picture of a job in the browser (topology coloured by health, epoch progress,
    /// a timeline of events, the result), or of every job when JOB is left out. Read-only.
    Dashboard {
        /// The job (left out: a list of every job, each linking to its page).
        job: Option<String>,
        /// Where to serve the page. A loopback address unless given here explicitly: the
        /// dashboard has no authentication.
        #[arg(long, env = "TASKGRAPH_DASHBOARD_LISTEN", default_value = dashboard::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
    },
    /// Prints the job's result (what its application stored when it ended the job).
    Result {
        /// The job.
        job: String,
        /// Wait until the job finishes.
        #[arg(long)]
        wait: bool,
    },
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // Whether `--listen` was given on the command line (not from the environment).
    let listen_explicit = matches
        .subcommand_matches("dashboard")
        .and_then(|m| m.value_source("listen"))
        == Some(ValueSource::CommandLine);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let outcome = runtime.block_on(run(cli, listen_explicit));
    // Do not wait for background work still in flight (the dashboard's etcd connections).
    runtime.shutdown_background();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            eprintln!("error: {}", e.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Connects for `job` and checks the job exists.
async fn existing(etcd: &EtcdConn, job: &str) -> Result<JobClient, String> {
    let client = etcd.connect(job).await.map_err(|e| e.to_string())?;
    if client.spec().await.map_err(|e| e.to_string())?.is_none() {
        return Err(format!(
            "job {job:?} does not exist (`taskgraph jobs` lists the jobs)"
        ));
    }
    Ok(client)
}

async fn run(cli: Cli, listen_explicit: bool) -> Result<(), String> {
    let etcd = EtcdConn::new(cli.etcd, &cli.security)?;
    match cli.command {
        Command::Jobs { json } => render::jobs(&etcd, json).await,
        Command::Status {
            job,
            json,
            watch,
            rows,
            all,
        } => {
            let client = existing(&etcd, &job).await?;
            let rows = if all { usize::MAX } else { rows };
            if watch {
                render::status_watch(&client, rows).await
            } else {
                render::status(&client, json, rows).await
            }
        }
        Command::Events {
            job,
            since_revision,
        } => {
            // A job not created yet is waited for (see `events::stream`).
            let client = etcd.connect(&job).await.map_err(|e| e.to_string())?;
            events::stream(&client, since_revision).await
        }
        Command::Failover { job, task, wait } => {
            let client = existing(&etcd, &job).await?;
            render::failover(&client, task, wait).await
        }
        Command::Shutdown { job } => {
            let client = existing(&etcd, &job).await?;
            match client.shutdown().await.map_err(|e| e.to_string())? {
                Some(epoch) => {
                    out!("job {job} ends at epoch {epoch}");
                    Ok(())
                }
                None => Err(format!(
                    "job {job:?} has no epoch key: it is not a taskgraph job"
                )),
            }
        }
        Command::Gc { job, force } => {
            let client = existing(&etcd, &job).await?;
            let state = client.state().await.map_err(|e| e.to_string())?;
            if !force && state.is_some_and(|s| !s.finished) {
                return Err(format!(
                    "job {job:?} is still running (epoch {}); `taskgraph shutdown {job}` first, or --force",
                    state.map_or(0, |s| s.epoch)
                ));
            }
            let n = client.delete().await.map_err(|e| e.to_string())?;
            out!("deleted {n} keys of job {job}");
            Ok(())
        }
        Command::Graph { job, svg } => {
            let client = existing(&etcd, &job).await?;
            graph::graph(&client, svg.as_deref()).await
        }
        Command::Dashboard { job, listen } => {
            dashboard::serve(etcd, job, listen, listen_explicit).await
        }
        Command::Result { job, wait } => {
            let client = existing(&etcd, &job).await?;
            render::result(&client, wait).await
        }
    }
}
