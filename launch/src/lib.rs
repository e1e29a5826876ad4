//! taskgraph-launch: run a whole taskgraph job on this machine.
//!
//! A [`LocalJob`] starts a private etcd ([`LocalEtcd`]) unless given one, launches
//! `tasks × replicas + spares` node processes of your own binary, optionally kills random
//! nodes with SIGKILL and replaces them ([`Chaos`]), shows a progress bar and the nodes' stall
//! reports, waits for the job to finish, stops everything it started, and returns the
//! [`Outcome`]: the job's result bytes, final epoch, kills, failovers, and how each node
//! ended. A run that fails returns a [`LaunchError`] whose
//! [`exit_code`](LaunchError::exit_code) tells the class (3: stalled and did not heal;
//! 4: shut down before storing its result; 1: anything else). [`LocalArgs`] are the matching
//! command-line flags; [`NodeArgs`] and [`SecurityArgs`] the flags (and `TASKGRAPH_*`
//! variables) of a node process, and [`init_logs`] its logs.
//!
//! One binary plays both parts: run without [`NODE_INDEX_ENV`] it is the launcher; the nodes
//! it starts find their settings in `TASKGRAPH_ETCD`, `TASKGRAPH_JOB` and
//! `TASKGRAPH_NODE_NAME`, and stop when their standard input closes ([`stdin_closed`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use taskgraph::{async_trait, Context, Epoch, Framework, FrameworkBuilder, Task, TaskId};
//! use taskgraph_launch::{launched_node, stdin_closed, Chaos, LocalEtcd, LocalJob};
//!
//! /// Three epochs, then the job ends with a result.
//! struct Count;
//!
//! #[async_trait]
//! impl Task for Count {
//!     async fn enter_epoch(&mut self, ctx: &Context, epoch: Epoch) {
//!         if ctx.task() != 0 {
//!             return;
//!         }
//!         let ctx2 = ctx.clone();
//!         ctx.spawn(async move {
//!             let _ = match epoch {
//!                 3 => ctx2.shutdown_job_with(format!("counted to {epoch}")).await.map(|_| ()),
//!                 _ => ctx2.inc_epoch(epoch).await.map(|_| ()),
//!             };
//!         });
//!     }
//! }
//!
//! /// The same configuration for the nodes and for the launcher's spec.
//! fn framework(etcd: Vec<String>, job: &str) -> Result<FrameworkBuilder, Box<dyn std::error::Error>> {
//!     Ok(Framework::builder()
//!         .etcd(etcd)
//!         .job(job)
//!         .tasks(3)
//!         .replicas(2)
//!         .links(taskgraph::Tree::new(3, 2)?.links())
//!         .lease_ttl(Duration::from_secs(2))
//!         .task_builder(|_: TaskId| Count))
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     if launched_node()?.is_some() {
//!         // A node: its settings come from the launcher's TASKGRAPH_* variables.
//!         let etcd = std::env::var("TASKGRAPH_ETCD")?.split(',').map(String::from).collect();
//!         let job = std::env::var("TASKGRAPH_JOB")?;
//!         let node = framework(etcd, &job)?
//!             .node_name(std::env::var("TASKGRAPH_NODE_NAME")?)
//!             .build()?
//!             .spawn()
//!             .await?;
//!         node.stop_on(stdin_closed()).await?;
//!         return Ok(());
//!     }
//!     // The launcher: a private etcd, 3 tasks × 2 replicas + 1 spare, a kill every 500 ms.
//!     let etcd = LocalEtcd::start().await?;
//!     let spec = framework(etcd.endpoints(), "count")?.build()?.config().spec();
//!     let run = LocalJob::new("count", spec)
//!         .etcd(etcd.endpoints())
//!         .spares(1)
//!         .chaos(Some(Chaos::every(Duration::from_millis(500)).seed(7)))
//!         .epochs(3)
//!         .timeout(Some(Duration::from_secs(120)))
//!         .run()
//!         .await;
//!     etcd.stop().await;
//!     match run {
//!         Ok(outcome) => println!("epoch {}: {:?}", outcome.epoch, outcome.result),
//!         Err(e) => {
//!             eprintln!("error: {e}");
//!             std::process::exit(e.exit_code().into());
//!         }
//!     }
//!     Ok(())
//! }
//! ```
//!
//! To wait for a job's end without launching it, use
//! [`JobClient::wait_finished`](taskgraph::JobClient::wait_finished).

mod args;
mod error;
mod etcd;
mod fleet;
mod follow;
mod job;
mod node;
mod progress;
mod stalls;

pub use args::{init_logs, LocalArgs, LogFormat, NodeArgs, SecurityArgs, PASSWORD_ENV};
pub use error::{ErrorKind, Existing, LaunchError, EXIT_FAILED, EXIT_SHUT_DOWN, EXIT_STALLED};
pub use etcd::LocalEtcd;
pub use fleet::NodeEnd;
pub use job::{Chaos, LocalJob, Outcome};
pub use node::{launched_node, stdin_closed, NODE_INDEX_ENV};
