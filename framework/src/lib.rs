//! taskgraph: fault-tolerant distributed dataflow on etcd.
//!
//! An application is a set of tasks (`0..n`) joined by a topology and advancing in global
//! epochs. For every task the framework elects, with etcd leases, one **primary** node and
//! hot-standby **backups**; spares wait for a slot to open. The application supplies a
//! [`Task`] (event handlers), a [`TaskBuilder`] (a task value per task id), and the
//! [`Links`] of its topology, and runs each node with [`Framework::start`]. The job's first
//! epoch is `0`.
//!
//! A program that only follows a job (an operator's tool, a launcher, a dashboard) uses
//! [`JobClient`]: its status, result and checkpoints, and its typed change stream
//! ([`JobClient::changes`], yielding [`JobChange`]s). The hidden `testing` module holds
//! internals for the workspace's own tests and fuzz targets; it is not part of the API.
//!
//! The standard topologies ([`Tree`], [`Ring`], [`FullMesh`], [`Star`], [`Grid`],
//! [`ParameterServers`], [`Butterfly`]) are re-exported here; each one's `links()` names its
//! links as the table in the [`topology`] module shows.
//!
//! ```no_run
//! use taskgraph::{async_trait, Bytes, Context, DataReply, DataRequest, Epoch, Task, TaskId};
//!
//! /// Sums `epoch · id` over a tree: every task asks its children for their sums.
//! struct Sum { epoch: Epoch, sums: Vec<u64>, waiting: Vec<DataRequest>, counter: u64 }
//!
//! #[async_trait]
//! impl Task for Sum {
//!     async fn enter_epoch(&mut self, ctx: &Context, epoch: Epoch) {
//!         self.epoch = epoch;
//!         self.sums.clear();
//!         // Hot standby: the backups apply this before `replicate` returns.
//!         self.counter += 1;
//!         let _ = ctx.replicate(taskgraph::encode(&self.counter).unwrap_or_default()).await;
//!         for child in ctx.neighbours("children") {
//!             // Returns at once; the answer comes exactly once to `data_ready`, retried through
//!             // failures of the child, cancelled if the epoch moves on.
//!             let _ = ctx.data_request_with(child, "sum", &epoch);
//!         }
//!         self.answer_if_ready(ctx);
//!     }
//!     async fn serve_data(&mut self, ctx: &Context, request: DataRequest) {
//!         match request.method() {
//!             // Keep the request until we can answer it.
//!             "sum" => self.waiting.push(request),
//!             _ => request.unknown_method(),
//!         }
//!         self.answer_if_ready(ctx);
//!     }
//!     async fn data_ready(&mut self, ctx: &Context, reply: DataReply) {
//!         if let Ok(sum) = reply.decode::<u64>() { self.sums.push(sum); }
//!         self.answer_if_ready(ctx);
//!     }
//!     async fn neighbour_failed(&mut self, _ctx: &Context, link: &str, id: TaskId) {
//!         tracing::info!(link, id, "neighbour lost its primary; its pulls are retried");
//!     }
//!     async fn apply_update(&mut self, _ctx: &Context, update: Bytes) {
//!         self.counter = taskgraph::decode(&update).unwrap_or(self.counter);
//!     }
//!     fn snapshot(&self, _ctx: &Context) -> Bytes {
//!         taskgraph::encode(&self.counter).unwrap_or_default()
//!     }
//!     async fn apply_snapshot(&mut self, _ctx: &Context, snapshot: Bytes) {
//!         self.counter = taskgraph::decode(&snapshot).unwrap_or(0);
//!     }
//! }
//!
//! impl Sum {
//!     fn answer_if_ready(&mut self, ctx: &Context) {
//!         if self.sums.len() < ctx.neighbours("children").len() { return; }
//!         let total = self.epoch * u64::from(ctx.task()) + self.sums.iter().sum::<u64>();
//!         for r in self.waiting.drain(..) { let _ = r.reply_with(&total); }
//!         if ctx.task() == 0 {
//!             let (ctx, epoch) = (ctx.clone(), self.epoch);
//!             ctx.clone().spawn(async move { let _ = ctx.inc_epoch(epoch).await; });
//!         } else {
//!             let _ = ctx.flag_meta("parents", "done"); // exactly once to the parent
//!         }
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let tree = taskgraph::Tree::new(7, 2)?;
//!     let exit = taskgraph::Framework::builder()
//!         .etcd(["http://127.0.0.1:2379"])
//!         .job("sum")
//!         .tasks(7)
//!         .replicas(2)
//!         .links(tree.links())
//!         .lease_ttl(std::time::Duration::from_secs(2))
//!         // Any `Fn(TaskId) -> impl Task` closure builds the task values.
//!         .task_builder(|_task: TaskId| Sum { epoch: 0, sums: vec![], waiting: vec![], counter: 0 })
//!         .build()?
//!         .start()
//!         .await?;
//!     println!("node ended: {exit:?}");
//!     Ok(())
//! }
//! ```

mod app;
mod changes;
mod client;
mod config;
mod data;
mod error;
mod etcd;
mod exchange;
mod framework;
mod health;
mod http;
mod inbox;
mod lend;
pub mod metrics;
mod node;
mod retry;
mod role;
mod roles;
mod security;
mod stall;
mod wait;
mod wire;
mod work;

pub use app::{Context, ExitReason, Task, TaskBuilder, TaskError};
pub use async_trait::async_trait;
pub use bytes::Bytes;
pub use changes::{ChangeEvent, JobChange, JobChanges};
pub use client::{
    Handover, HandoverError, Health, JobClient, JobState, JobStatus, NodeStall, SlotHolder,
    SpareNode, StallNote, StallReason, TaskStatus,
};
pub use config::{validate_job_name, Config, JobSpec, MAX_REPLICAS, MAX_TASKS};
pub use data::{decode, encode, Checkpoint, CodecError, DataReply, DataRequest, PullError, PullId};
pub use error::{ConfigError, ContextError, Error, EtcdCause, EtcdError};
pub use framework::{Framework, FrameworkBuilder};
pub use node::{NodeExit, NodeHandle, NodeStatus, Role};
pub use security::{EtcdAuth, EtcdTls, PeerTls, Secret};
pub use taskgraph_topology as topology;
/// The standard topologies, beside [`Links`] and [`Topology`] (see the
/// [`topology`] module for each one's link names).
pub use taskgraph_topology::{
    Butterfly, FullMesh, Grid, Links, ParameterServers, Ring, Star, Topology, Tree,
};
pub use wait::Finished;
pub use work::{WorkDone, WorkId};

/// Identifier of a task: `0..tasks`.
pub type TaskId = u32;
/// The job-wide iteration counter.
pub type Epoch = u64;
/// A primary's fencing token: the etcd revision at which it won its election. Strictly
/// increases per task.
pub type Term = u64;

#[doc(hidden)]
pub mod testing {
    //! Internals for the workspace's own tests, benchmarks and fuzz targets: the etcd key
    //! layout and its value codecs, the node-to-node wire (client, server, messages), the
    //! loaded TLS material. **Not part of the API**: hidden from the docs, and free to change
    //! in any release. An application follows a job with [`JobClient`](crate::JobClient)
    //! and its typed [`changes`](crate::JobClient::changes).
    //!
    //! It is a module rather than a cargo feature: a feature would be switched on for every
    //! crate of the workspace as soon as the tests crate asks for it (cargo unifies features),
    //! so it would not keep the CLI or the examples off the internals, and the framework's
    //! own integration tests cannot turn on a feature of their crate without
    //! `required-features`, which skips them silently when it is off.

    /// The etcd side: the key layout and the codecs of its values (never the writer).
    pub mod etcd {
        pub use crate::etcd::keys;
    }
    /// The job watch: key ranges followed on one etcd stream, as a node's event loop gets them.
    pub mod watch {
        pub use crate::etcd::keys::KeyRange;
        pub use crate::etcd::watch::{JobEvent, WatchRanges};
        pub use crate::etcd::Kv;

        /// Follows the ranges `wanted` shows (and their changes) on a fresh connection to
        /// `endpoints`, as a node's job watch does: its events, and the watch's task (which
        /// ends once the receiver is dropped).
        pub async fn follow(
            endpoints: &[String],
            job: &str,
            wanted: tokio::sync::watch::Receiver<WatchRanges>,
        ) -> Result<
            (
                tokio::sync::mpsc::Receiver<JobEvent>,
                tokio::task::JoinHandle<()>,
            ),
            crate::Error,
        > {
            let store = super::store(endpoints, job).await?;
            let (tx, rx) = tokio::sync::mpsc::channel(4096);
            let task = tokio::spawn(crate::etcd::watch::run(store, wanted, None, tx));
            Ok((rx, task))
        }

        /// Joins as a node does, on a fresh connection to `endpoints`: grants a lease of
        /// `ttl_secs`, registers `node` under it and, in the same transaction, reads the ranges
        /// `wanted` shows; then follows them from that read, as the node's job watch does
        /// (the read is its first snapshot). The registration's revision, the events, and the
        /// watch's task.
        pub async fn follow_registered(
            endpoints: &[String],
            job: &str,
            node: &str,
            ttl_secs: i64,
            wanted: tokio::sync::watch::Receiver<WatchRanges>,
        ) -> Result<
            (
                i64,
                tokio::sync::mpsc::Receiver<JobEvent>,
                tokio::task::JoinHandle<()>,
            ),
            crate::Error,
        > {
            let store = super::store(endpoints, job).await?;
            let (lease, _) = store.grant_lease(ttl_secs).await?;
            let ranges = wanted.borrow().clone();
            let record = crate::etcd::keys::NodeRecord {
                addr: "127.0.0.1:1".into(),
                stall: None,
                drafted: true,
            };
            let (registered, kvs, revision) = store
                .register_node_reading(node, &record, lease, &ranges.ranges)
                .await?;
            let (first_tx, first) = tokio::sync::oneshot::channel();
            let _ = first_tx.send(crate::etcd::watch::FirstRead {
                ranges,
                kvs,
                revision,
            });
            let (tx, rx) = tokio::sync::mpsc::channel(4096);
            let task = tokio::spawn(crate::etcd::watch::run(store, wanted, Some(first), tx));
            Ok((registered, rx, task))
        }
    }
    /// A plain-text connection to `endpoints` for job `job`, as a node makes (10 s to connect,
    /// 2 s per request).
    async fn store(endpoints: &[String], job: &str) -> Result<crate::etcd::Store, crate::Error> {
        crate::etcd::Store::connect_secure(
            endpoints,
            job,
            &crate::security::EtcdSecurity::default(),
            std::time::Duration::from_secs(10),
            std::time::Duration::from_secs(2),
        )
        .await
    }

    /// The node-to-node wire: messages, client, server, limits.
    pub mod wire {
        pub use crate::wire::*;
    }
    pub use crate::security::LoadedTls;

    /// The lease keeper, on a lease of its own.
    pub mod lease {
        use std::time::Duration;

        use tokio::sync::watch;
        use tokio::time::Instant;

        pub use crate::etcd::lease::{margin, LeaseId, LeaseState};

        /// A lease of `ttl` granted on a fresh connection to `endpoints` and kept alive by the
        /// node's keeper, as a node keeps its own: the lease id, the TTL etcd granted, the
        /// keeper's states (its first: `Suspended`) and the keeper's task.
        pub async fn keep_alive(
            endpoints: &[String],
            job: &str,
            ttl: Duration,
        ) -> Result<
            (
                LeaseId,
                i64,
                watch::Receiver<LeaseState>,
                tokio::task::JoinHandle<()>,
            ),
            crate::Error,
        > {
            let store = super::store(endpoints, job).await?;
            let granted_at = Instant::now();
            let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
            let (id, granted) = store.grant_lease(secs).await?;
            let (tx, rx) = watch::channel(LeaseState::Suspended { id });
            let keeper = tokio::spawn(crate::etcd::lease::keep_alive(
                store, id, ttl, granted_at, tx,
            ));
            Ok((id, granted, rx, keeper))
        }
    }
}

/// The README's Rust examples, compiled and run as doc tests (`cargo test --doc`), so the
/// guide a newcomer copies from cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
