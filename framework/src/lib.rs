//! taskgraph: fault-tolerant distributed dataflow on etcd.
//!
//! An application is a set of tasks (`0..n`) joined by a topology and advancing in global
//! epochs. For every task the framework elects, with etcd leases, one **primary** node and
//! hot-standby **backups**; spares wait for a slot to open. The application supplies a
//! [`Task`] (event handlers), a [`TaskBuilder`] (a task value per task id), and the
//! [`Links`] of its topology, and runs each node with [`Framework::start`].
//!
//! ```no_run
//! use std::time::Duration;
//! use taskgraph::{async_trait, Context, Epoch, Framework, Links, Task, TaskId, Tree};
//!
//! struct Counter;
//!
//! #[async_trait]
//! impl Task for Counter {
//!     async fn enter_epoch(&mut self, ctx: &Context, epoch: Epoch) {
//!         // Task 0 drives the job: ten epochs, then done.
//!         if ctx.task() == 0 {
//!             let result = if epoch < 10 { ctx.inc_epoch(epoch).await.map(|_| ()) } else { ctx.shutdown_job().await.map(|_| ()) };
//!             if let Err(e) = result { tracing::warn!(error = %e, "could not move the job on"); }
//!         }
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let tree = Tree::new(3, 2)?;
//!     let exit = Framework::builder()
//!         .etcd(["http://127.0.0.1:2379"])
//!         .job("counter")
//!         .tasks(3)
//!         .replicas(2)
//!         .links(Links::new().link("parents", tree.parents()).link("children", tree.children()).pair("parents", "children"))
//!         .lease_ttl(Duration::from_secs(2))
//!         .task_builder(|_task: TaskId| Box::new(Counter) as Box<dyn Task>)
//!         .build()?
//!         .start()
//!         .await?;
//!     println!("node ended: {exit:?}");
//!     Ok(())
//! }
//! ```

mod app;
mod config;
mod data;
mod error;
pub mod etcd;
mod exchange;
mod framework;
mod node;
mod roles;

pub use app::{Context, ExitReason, Task, TaskBuilder, TaskError};
pub use async_trait::async_trait;
pub use bytes::Bytes;
pub use config::{validate_job_name, Config, JobSpec, MAX_REPLICAS, MAX_TASKS};
pub use data::{decode, encode, Checkpoint, CodecError, DataReply, DataRequest, PullError, PullId};
pub use error::{ConfigError, ContextError, Error, EtcdCause, EtcdError};
pub use framework::{Framework, FrameworkBuilder};
pub use node::{NodeExit, NodeHandle, NodeStatus, Role};
pub use taskgraph_topology as topology;
pub use taskgraph_topology::{Links, Topology, Tree};

/// Identifier of a task: `0..tasks`.
pub type TaskId = u32;
/// The job-wide iteration counter.
pub type Epoch = u64;
/// A primary's fencing token: the etcd revision at which it won its election. Strictly
/// increases per task.
pub type Term = u64;
pub mod wire;
