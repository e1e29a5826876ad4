//! Prometheus metrics of a node, and the HTTP endpoints that serve them with the node's health.
//!
//! Every node keeps its own registry (several nodes may share a process, as in tests). When the
//! node is given an address with
//! [`FrameworkBuilder::metrics_addr`](crate::FrameworkBuilder::metrics_addr), it serves
//! over HTTP/1.1:
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /metrics` | the metrics below in the OpenMetrics text format ([`CONTENT_TYPE`]), which Prometheus scrapes natively |
//! | `GET /healthz` | liveness: `200` while the node's event loop is alive and responsive, `503` with a one-line reason otherwise (see below) |
//! | `GET /readyz` | readiness: `200` while the node takes its full part in the job, `503` with a one-line reason otherwise (see below) |
//!
//! The server lives as long as the node: once the node has ended (job finished, stopped,
//! crashed), its port refuses connections.
//!
//! # Liveness (`/healthz`)
//!
//! `200` while the node connects to etcd at start (bounded by the etcd connect timeout, after
//! which the node fails), while it waits for etcd to grant it a lease or to answer a read it
//! cannot go on without, and while its event loop is idle or busy with one event for less than
//! the *stall limit*: three lease TTLs plus the etcd request timeout. `503` when the loop has
//! been busy with one event for longer (a task handler blocks it: the node holds its slot but
//! cannot act in it; restarting the process hands the slot over), or when the node has ended.
//!
//! # Readiness (`/readyz`)
//!
//! `200` when the node's lease is within its local deadline, it has read the job from etcd, the
//! job is running, and:
//!
//! * as **primary**: the task has entered the job's current epoch;
//! * as **backup**: it has applied its primary's state (it could take over now);
//! * as **spare**: no slot is free for it to take — every task has its primary and backups, so
//!   the spare is a healthy reserve. A spare that still has a slot to claim is not ready yet.
//!
//! Spares count as ready so that a StatefulSet's ordered start and rolling updates, which wait
//! for each pod to be ready, never stall on the reserve. Otherwise `503` with the reason:
//! starting, no lease (etcd unreachable), job finished, the epoch not entered yet, the
//! primary's state not received yet, a slot still to claim.
//!
//! # Metrics
//!
//! Every series carries the label `job` (the job's name). Prometheus renames a scraped `job`
//! label to `exported_job` unless the scrape configuration sets `honor_labels: true`. `task` is
//! the id of the task the node serves (as primary, or as backup where noted).
//!
//! | name | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `taskgraph_node_info` | info | `node` | the node's id (its key under `nodes/` in etcd); value 1 |
//! | `taskgraph_epoch` | gauge | | the job's epoch as the node last saw it in etcd (the final epoch once finished) |
//! | `taskgraph_job_finished` | gauge | | 1 once the node has seen the job finish |
//! | `taskgraph_acting` | gauge | | 1 while the node's lease is within its local deadline (it may act in its slot) |
//! | `taskgraph_role` | gauge | `role`, `task` | 1 for the slot the node holds: `role` is `primary`, `backup` or `spare` (`task` empty); one series at a time |
//! | `taskgraph_term` | gauge | `task` | the node's fencing term while it is the task's primary |
//! | `taskgraph_epochs_entered_total` | counter | `task` | epochs the task entered as primary on this node |
//! | `taskgraph_failovers_total` | counter | `task` | times this node took the task over as primary after an earlier primary: a backup promoted, or a spare (or restarted node) taking a task whose earlier primary it had seen in etcd. Counted on the node that takes over, so sum over nodes for a job-wide count |
//! | `taskgraph_neighbour_events_total` | counter | `task`, `event` | neighbour incidents delivered to the task: `event` is `failed` or `restarted` (once per link the neighbour is in) |
//! | `taskgraph_pulls_sent_total` | counter | `task` | data requests the task made |
//! | `taskgraph_pulls_retried_total` | counter | `task` | requests sent again after an attempt failed (connection error, no primary yet, failover of the serving task, answer from a deposed primary) |
//! | `taskgraph_pulls_failed_total` | counter | `task` | requests whose delivered outcome is an error (the serving task refused them) |
//! | `taskgraph_pulls_cancelled_total` | counter | `task` | requests never delivered because the task left their epoch or its slot ended |
//! | `taskgraph_pull_duration_seconds` | histogram | `task` | from the data request to the delivery of its outcome |
//! | `taskgraph_pulls_served_total` | counter | `task` | requests the task answered with data (once per request: retries answered from memory are not counted) |
//! | `taskgraph_kept_answer_bytes` | gauge | | payload bytes of the answers the node keeps so that a retried pull gets the same answer: those of the current epoch its requesters have not acknowledged yet (each pull acknowledges the earlier ones it received, and an answer of 1 MiB or more is acknowledged as soon as it arrives), so about the answers in flight |
//! | `taskgraph_metas_sent_total` | counter | `task` | metas a neighbour's primary acknowledged (a meta is sent again to each new primary of the neighbour) |
//! | `taskgraph_metas_received_total` | counter | `task` | metas delivered to the task (`meta_ready`) |
//! | `taskgraph_lease_grants_total` | counter | | leases etcd granted the node (one at start, one more after each expiry) |
//! | `taskgraph_lease_renewals_total` | counter | | lease keep-alives etcd acknowledged |
//! | `taskgraph_lease_losses_total` | counter | `reason` | `suspended`: the local deadline passed without a renewal (the node stops acting); `expired`: etcd reports the lease gone (the node gives its slot up) |
//! | `taskgraph_inbound_messages_total` | counter | `kind` | messages from other nodes (pulls, metas, pings, replication entries) by where they were handled: `direct` (on the gRPC call's own task, while the event loop was idle: no hop to the loop) or `loop` |
//! | `taskgraph_pull_answers_total` | counter | `kind` | answers to the node's pulls handed to the task's `data_ready`, by where: `direct` (on the fetcher's own task, while the event loop was idle: no hop to the loop) or `loop` (answers awaited with `Context::request` are not counted) |
//! | `taskgraph_runtime_waits_total` | counter | `kind` | messages from other nodes (`message`) and answers to the node's pulls (`answer`) that, arriving while the event loop was idle, found the node's state held by another handler and waited for it on their own task; once they have it they are handled there, or go to the loop if something it must take first (a watch event, a lease change, its own request) came meanwhile |
//! | `taskgraph_liveness_checks_total` | counter | `kind` | checks of other nodes' processes: `hold` (a liveness hold opened: a backup on its primary, a spare on the backups of a task without a primary; one per holder while it lives) or `ping` (a one-off check, e.g. after a hold broke or a call was refused) |
//! | `taskgraph_watch_events_total` | counter | | key changes the node's job watch received: it watches only the epoch, the spec, its own record and draft and slot keys (a spare waiting to be drafted task 0's, a slot holder only those of its task, its neighbours, task 0 and the tasks it talks to outside the topology; the staffer and task 0's backups every record, draft and slot key), so a steady job adds about one per epoch and a slot change elsewhere in the job adds nothing (checkpoints and other nodes' records are not sent to it) |
//! | `taskgraph_watched_key_ranges` | gauge | | key ranges the node's job watch follows: 4 as a spare waiting to be drafted (`epoch`, its record, its draft, and `spec` with task 0's slot keys), plus one per other task whose slot keys it watches while it holds a slot; 1 for the staffer and task 0's backups (every record, draft and slot key in one range) |
//! | `taskgraph_bad_values_total` | counter | `key` | values under a key the framework owns that it refused: `key` is `epoch`, `spec` or `node` (this node's record); logged at error level with the key and the value's fault |
//! | `taskgraph_keys_healed_total` | counter | `key` | bad values this node rewrote (a fenced compare-and-swap on the bad value's revision): `epoch`, `spec` or `node` |
//! | `taskgraph_stalled` | gauge | | 1 while this node sees the job's epoch unmoved for longer than its stall time (see [`FrameworkBuilder::stall_after`](crate::FrameworkBuilder::stall_after)) |
//! | `taskgraph_etcd_requests_total` | counter | `op`, `outcome` | etcd requests by operation (`get`, `txn claim primary`, `lease keep-alive`, `watch`…); `outcome` is `ok`, `error` or `timeout` |
//! | `taskgraph_etcd_request_duration_seconds` | histogram | `op` | latency of etcd requests by operation, whatever their outcome |

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::role::Role;
use crate::{Epoch, TaskId};

/// The content type of `GET /metrics`: the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TaskLabel {
    task: TaskId,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RoleLabels {
    role: &'static str,
    task: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NeighbourLabels {
    task: TaskId,
    event: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KeyLabel {
    key: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    op: &'static str,
    outcome: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 0.5 ms to 16 s.
fn pull_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// 0.5 ms to 4 s.
fn etcd_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// How an etcd request ended, for `taskgraph_etcd_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    Error,
    Timeout,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
        }
    }
}

/// A neighbour incident, for `taskgraph_neighbour_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NeighbourEvent {
    Failed,
    Restarted,
}

/// A check of another node's process, for `taskgraph_liveness_checks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LivenessCheck {
    Hold,
    Ping,
}

/// A lease loss, for `taskgraph_lease_losses_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseLoss {
    Suspended,
    Expired,
}

/// One node's metrics: a registry of its own and handles on every metric in it. Cheap to
/// clone; all clones update the same registry.
#[derive(Clone)]
pub(crate) struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    epoch: Gauge,
    job_finished: Gauge,
    acting: Gauge,
    role: Family<RoleLabels, Gauge>,
    term: Family<TaskLabel, Gauge>,
    epochs_entered: Family<TaskLabel, Counter>,
    failovers: Family<TaskLabel, Counter>,
    neighbour_events: Family<NeighbourLabels, Counter>,
    pulls_sent: Family<TaskLabel, Counter>,
    pulls_retried: Family<TaskLabel, Counter>,
    pulls_failed: Family<TaskLabel, Counter>,
    pulls_cancelled: Family<TaskLabel, Counter>,
    pull_duration: Histograms<TaskLabel>,
    pulls_served: Family<TaskLabel, Counter>,
    metas_sent: Family<TaskLabel, Counter>,
    metas_received: Family<TaskLabel, Counter>,
    lease_grants: Counter,
    lease_renewals: Counter,
    lease_losses: Family<ReasonLabel, Counter>,
    liveness_checks: Family<KindLabel, Counter>,
    inbound: Family<KindLabel, Counter>,
    pull_answers: Family<KindLabel, Counter>,
    runtime_waits: Family<KindLabel, Counter>,
    watch_events: Counter,
    watched_ranges: Gauge,
    etcd_requests: Family<RequestLabels, Counter>,
    etcd_duration: Histograms<OpLabel>,
    bad_values: Family<KeyLabel, Counter>,
    keys_healed: Family<KeyLabel, Counter>,
    stalled: Gauge,
    kept_answer_bytes: Gauge,
    /// The role series published last (removed when the role changes), with the task whose
    /// term series is published.
    published: Mutex<(Option<RoleLabels>, Option<TaskId>)>,
}

fn to_gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// A fresh registry for node `node` of `job`.
    pub(crate) fn new(job: &str, node: &str) -> Self {
        let labels = [(Cow::Borrowed("job"), Cow::Owned(job.to_owned()))];
        let mut r = Registry::with_prefix_and_labels("taskgraph", labels.into_iter());
        r.register(
            "node",
            "The node's id",
            Info::new(vec![("node".to_owned(), node.to_owned())]),
        );
        let inner = Inner {
            epoch: Gauge::default(),
            job_finished: Gauge::default(),
            acting: Gauge::default(),
            role: Family::default(),
            term: Family::default(),
            epochs_entered: Family::default(),
            failovers: Family::default(),
            neighbour_events: Family::default(),
            pulls_sent: Family::default(),
            pulls_retried: Family::default(),
            pulls_failed: Family::default(),
            pulls_cancelled: Family::default(),
            pull_duration: Family::new_with_constructor(pull_histogram as fn() -> Histogram),
            pulls_served: Family::default(),
            metas_sent: Family::default(),
            metas_received: Family::default(),
            lease_grants: Counter::default(),
            lease_renewals: Counter::default(),
            lease_losses: Family::default(),
            liveness_checks: Family::default(),
            inbound: Family::default(),
            pull_answers: Family::default(),
            runtime_waits: Family::default(),
            watch_events: Counter::default(),
            watched_ranges: Gauge::default(),
            etcd_requests: Family::default(),
            etcd_duration: Family::new_with_constructor(etcd_histogram as fn() -> Histogram),
            bad_values: Family::default(),
            keys_healed: Family::default(),
            stalled: Gauge::default(),
            kept_answer_bytes: Gauge::default(),
            published: Mutex::new((None, None)),
            registry: Registry::default(),
        };
        r.register(
            "epoch",
            "The job's epoch as this node last saw it in etcd",
            inner.epoch.clone(),
        );
        r.register(
            "bad_values",
            "Values under a key the framework owns that it refused",
            inner.bad_values.clone(),
        );
        r.register(
            "keys_healed",
            "Bad values under a key the framework owns that this node rewrote",
            inner.keys_healed.clone(),
        );
        r.register(
            "stalled",
            "1 while this node sees the job's epoch unmoved for longer than its stall time",
            inner.stalled.clone(),
        );
        r.register(
            "job_finished",
            "1 once this node has seen the job finish",
            inner.job_finished.clone(),
        );
        r.register(
            "acting",
            "1 while the node's lease is within its local deadline",
            inner.acting.clone(),
        );
        r.register(
            "role",
            "1 for the slot this node holds (primary, backup or spare)",
            inner.role.clone(),
        );
        r.register(
            "term",
            "This node's fencing term as the task's primary",
            inner.term.clone(),
        );
        r.register(
            "epochs_entered",
            "Epochs the task entered as primary on this node",
            inner.epochs_entered.clone(),
        );
        r.register(
            "failovers",
            "Times this node took the task over as primary after an earlier primary",
            inner.failovers.clone(),
        );
        r.register(
            "neighbour_events",
            "Neighbour incidents delivered to the task",
            inner.neighbour_events.clone(),
        );
        r.register(
            "pulls_sent",
            "Data requests the task made",
            inner.pulls_sent.clone(),
        );
        r.register(
            "pulls_retried",
            "Data requests sent again after a failed attempt",
            inner.pulls_retried.clone(),
        );
        r.register(
            "pulls_failed",
            "Data requests delivered as an error",
            inner.pulls_failed.clone(),
        );
        r.register(
            "pulls_cancelled",
            "Data requests never delivered because the task left their epoch",
            inner.pulls_cancelled.clone(),
        );
        r.register_with_unit(
            "pull_duration",
            "Time from a data request to the delivery of its outcome",
            Unit::Seconds,
            inner.pull_duration.clone(),
        );
        r.register(
            "pulls_served",
            "Data requests the task answered with data",
            inner.pulls_served.clone(),
        );
        r.register(
            "metas_sent",
            "Metas acknowledged by a neighbour's primary",
            inner.metas_sent.clone(),
        );
        r.register(
            "metas_received",
            "Metas delivered to the task",
            inner.metas_received.clone(),
        );
        r.register(
            "lease_grants",
            "Leases etcd granted this node",
            inner.lease_grants.clone(),
        );
        r.register(
            "lease_renewals",
            "Lease keep-alives etcd acknowledged",
            inner.lease_renewals.clone(),
        );
        r.register(
            "lease_losses",
            "Leases suspended (local deadline passed) or expired (etcd dropped them)",
            inner.lease_losses.clone(),
        );
        r.register(
            "liveness_checks",
            "Checks of other nodes' processes: holds opened and one-off pings",
            inner.liveness_checks.clone(),
        );
        r.register(
            "kept_answer_bytes",
            "Payload bytes of the answers kept for retries of pulls this node served",
            inner.kept_answer_bytes.clone(),
        );
        r.register(
            "inbound_messages",
            "Messages from other nodes by where they were handled: on the gRPC handler's task while the loop was idle (direct) or by the event loop (loop)",
            inner.inbound.clone(),
        );
        r.register(
            "pull_answers",
            "Answers to the node's pulls handed to data_ready by where: on the fetcher's task while the loop was idle (direct) or by the event loop (loop)",
            inner.pull_answers.clone(),
        );
        r.register(
            "runtime_waits",
            "Messages (message) and answers to the node's pulls (answer) that found the node's state held by another handler and waited for it on their own task",
            inner.runtime_waits.clone(),
        );
        r.register(
            "watch_events",
            "Key changes the node's job watch received",
            inner.watch_events.clone(),
        );
        r.register(
            "watched_key_ranges",
            "Key ranges the node's job watch follows",
            inner.watched_ranges.clone(),
        );
        r.register(
            "etcd_requests",
            "etcd requests by operation and outcome",
            inner.etcd_requests.clone(),
        );
        r.register_with_unit(
            "etcd_request_duration",
            "Latency of etcd requests by operation",
            Unit::Seconds,
            inner.etcd_duration.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry: r,
                ..inner
            }),
        }
    }

    /// The registry in the OpenMetrics text format.
    pub(crate) fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)?;
        Ok(out)
    }

    /// The job's epoch as the node sees it in etcd, and whether the job has finished.
    pub(crate) fn job_epoch(&self, epoch: Epoch, finished: bool) {
        self.inner.epoch.set(to_gauge(epoch));
        self.inner.job_finished.set(i64::from(finished));
    }

    /// Publishes the node's state: its role (one series), term and lease.
    pub(crate) fn node_state(&self, role: Role, acting: bool) {
        let i = &self.inner;
        i.acting.set(i64::from(acting));
        let (labels, term) = match role {
            Role::Spare => (
                RoleLabels {
                    role: "spare",
                    task: String::new(),
                },
                None,
            ),
            Role::Primary { task, term } => (
                RoleLabels {
                    role: "primary",
                    task: task.to_string(),
                },
                Some((task, term)),
            ),
            Role::Backup { task } => (
                RoleLabels {
                    role: "backup",
                    task: task.to_string(),
                },
                None,
            ),
        };
        let mut published = i.published.lock().unwrap_or_else(PoisonError::into_inner);
        if published.0.as_ref() != Some(&labels) {
            if let Some(old) = published.0.take() {
                i.role.remove(&old);
            }
            i.role.get_or_create(&labels).set(1);
            published.0 = Some(labels);
        }
        let term_task = term.map(|(t, _)| t);
        if published.1 != term_task {
            if let Some(old) = published.1.take() {
                i.term.remove(&TaskLabel { task: old });
            }
            published.1 = term_task;
        }
        if let Some((task, term)) = term {
            i.term
                .get_or_create(&TaskLabel { task })
                .set(to_gauge(term));
        }
    }

    pub(crate) fn epoch_entered(&self, task: TaskId) {
        self.inner
            .epochs_entered
            .get_or_create(&TaskLabel { task })
            .inc();
    }

    pub(crate) fn failover(&self, task: TaskId) {
        self.inner
            .failovers
            .get_or_create(&TaskLabel { task })
            .inc();
    }

    pub(crate) fn neighbour_event(&self, task: TaskId, event: NeighbourEvent) {
        let event = match event {
            NeighbourEvent::Failed => "failed",
            NeighbourEvent::Restarted => "restarted",
        };
        self.inner
            .neighbour_events
            .get_or_create(&NeighbourLabels { task, event })
            .inc();
    }

    pub(crate) fn pull_sent(&self, task: TaskId) {
        self.inner
            .pulls_sent
            .get_or_create(&TaskLabel { task })
            .inc();
    }

    pub(crate) fn pull_retried(&self, task: TaskId) {
        self.inner
            .pulls_retried
            .get_or_create(&TaskLabel { task })
            .inc();
    }

    /// A pull's outcome was delivered `elapsed` after the request; `ok` if it is data.
    pub(crate) fn pull_delivered(&self, task: TaskId, elapsed: Duration, ok: bool) {
        let label = TaskLabel { task };
        self.inner
            .pull_duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        if !ok {
            self.inner.pulls_failed.get_or_create(&label).inc();
        }
    }

    pub(crate) fn pulls_cancelled(&self, task: TaskId, n: usize) {
        if n > 0 {
            self.inner
                .pulls_cancelled
                .get_or_create(&TaskLabel { task })
                .inc_by(n as u64);
        }
    }

    pub(crate) fn pull_served(&self, task: TaskId) {
        self.inner
            .pulls_served
            .get_or_create(&TaskLabel { task })
            .inc();
    }

    pub(crate) fn meta_sent(&self, task: TaskId) {
        self.inner
            .metas_sent
            .get_or_create(&TaskLabel { task })
            .inc();
    }

    pub(crate) fn meta_received(&self, task: TaskId) {
        self.inner
            .metas_received
            .get_or_create(&TaskLabel { task })
            .inc();
    }

    pub(crate) fn lease_granted(&self) {
        self.inner.lease_grants.inc();
    }

    pub(crate) fn lease_renewed(&self) {
        self.inner.lease_renewals.inc();
    }

    pub(crate) fn lease_lost(&self, loss: LeaseLoss) {
        let reason = match loss {
            LeaseLoss::Suspended => "suspended",
            LeaseLoss::Expired => "expired",
        };
        self.inner
            .lease_losses
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Key changes the job watch received.
    pub(crate) fn watch_events(&self, n: u64) {
        self.inner.watch_events.inc_by(n);
    }

    /// The number of key ranges the job watch follows.
    pub(crate) fn set_watched_ranges(&self, n: usize) {
        self.inner.watched_ranges.set(to_gauge(n as u64));
    }

    /// A check of another node's process.
    pub(crate) fn liveness_check(&self, check: LivenessCheck) {
        let kind = match check {
            LivenessCheck::Hold => "hold",
            LivenessCheck::Ping => "ping",
        };
        self.inner
            .liveness_checks
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// A message from another node handled on the gRPC handler's task (`direct`) or by the
    /// event loop.
    pub(crate) fn inbound(&self, direct: bool) {
        let kind = if direct { "direct" } else { "loop" };
        self.inner.inbound.get_or_create(&KindLabel { kind }).inc();
    }

    /// An answer to one of the node's pulls handed to `data_ready`, `direct`ly or by the loop.
    pub(crate) fn answer_handed(&self, direct: bool) {
        let kind = if direct { "direct" } else { "loop" };
        self.inner
            .pull_answers
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// A message (`answer == false`) or an answer to one of the node's pulls found the
    /// runtime held and waits for it on its own task.
    pub(crate) fn runtime_wait(&self, answer: bool) {
        let kind = if answer { "answer" } else { "message" };
        self.inner
            .runtime_waits
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// A bad value refused under `key` (`epoch`, `spec`, `node`).
    pub(crate) fn bad_value(&self, key: &'static str) {
        self.inner.bad_values.get_or_create(&KeyLabel { key }).inc();
    }

    /// A bad value under `key` rewritten by this node.
    pub(crate) fn key_healed(&self, key: &'static str) {
        self.inner
            .keys_healed
            .get_or_create(&KeyLabel { key })
            .inc();
    }

    /// Payload bytes of the answers the node keeps for retries.
    pub(crate) fn kept_answer_bytes(&self, bytes: usize) {
        self.inner
            .kept_answer_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Whether this node sees the job stalled.
    pub(crate) fn stalled(&self, stalled: bool) {
        self.inner.stalled.set(i64::from(stalled));
    }

    /// One etcd request of operation `op`.
    pub(crate) fn etcd_request(&self, op: &'static str, outcome: Outcome, elapsed: Duration) {
        self.inner
            .etcd_requests
            .get_or_create(&RequestLabels {
                op,
                outcome: outcome.label(),
            })
            .inc();
        self.inner
            .etcd_duration
            .get_or_create(&OpLabel { op })
            .observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
    }

    #[test]
    fn one_role_series_at_a_time_and_a_term_only_while_primary() {
        let m = Metrics::new("j", "n0");
        m.node_state(Role::Spare, true);
        m.job_epoch(0, false);
        let t = m.encode().unwrap_or_default();
        assert_eq!(
            sample(&t, r#"taskgraph_role{job="j",role="spare",task=""}"#),
            Some(1.0),
            "{t}"
        );
        m.node_state(Role::Primary { task: 3, term: 42 }, true);
        m.job_epoch(5, false);
        let t = m.encode().unwrap_or_default();
        assert_eq!(
            sample(&t, r#"taskgraph_role{job="j",role="primary",task="3"}"#),
            Some(1.0),
            "{t}"
        );
        assert_eq!(t.matches("taskgraph_role{").count(), 1, "{t}");
        assert_eq!(
            sample(&t, r#"taskgraph_term{job="j",task="3"}"#),
            Some(42.0)
        );
        assert_eq!(sample(&t, r#"taskgraph_epoch{job="j"}"#), Some(5.0));
        m.node_state(Role::Backup { task: 1 }, false);
        m.job_epoch(6, true);
        let t = m.encode().unwrap_or_default();
        assert!(!t.contains("taskgraph_term{"), "{t}");
        assert_eq!(t.matches("taskgraph_role{").count(), 1, "{t}");
        assert_eq!(sample(&t, r#"taskgraph_acting{job="j"}"#), Some(0.0));
        assert_eq!(sample(&t, r#"taskgraph_job_finished{job="j"}"#), Some(1.0));
        assert_eq!(
            sample(&t, r#"taskgraph_node_info{job="j",node="n0"}"#),
            Some(1.0),
            "{t}"
        );
        assert!(t.ends_with("# EOF\n"));
    }

    #[test]
    fn counters_and_histograms_carry_their_labels() {
        let m = Metrics::new("j", "n0");
        m.pull_sent(2);
        m.pull_delivered(2, Duration::from_millis(3), false);
        m.etcd_request("get", Outcome::Timeout, Duration::from_secs(2));
        m.neighbour_event(2, NeighbourEvent::Restarted);
        m.lease_lost(LeaseLoss::Suspended);
        m.liveness_check(LivenessCheck::Hold);
        m.watch_events(3);
        let t = m.encode().unwrap_or_default();
        for (series, value) in [
            (r#"taskgraph_pulls_sent_total{job="j",task="2"}"#, 1.0),
            (r#"taskgraph_pulls_failed_total{job="j",task="2"}"#, 1.0),
            (
                r#"taskgraph_pull_duration_seconds_count{job="j",task="2"}"#,
                1.0,
            ),
            (
                r#"taskgraph_etcd_requests_total{job="j",op="get",outcome="timeout"}"#,
                1.0,
            ),
            (
                r#"taskgraph_etcd_request_duration_seconds_sum{job="j",op="get"}"#,
                2.0,
            ),
            (
                r#"taskgraph_neighbour_events_total{job="j",task="2",event="restarted"}"#,
                1.0,
            ),
            (
                r#"taskgraph_lease_losses_total{job="j",reason="suspended"}"#,
                1.0,
            ),
            (
                r#"taskgraph_liveness_checks_total{job="j",kind="hold"}"#,
                1.0,
            ),
            (r#"taskgraph_watch_events_total{job="j"}"#, 3.0),
        ] {
            assert_eq!(sample(&t, series), Some(value), "{series} in\n{t}");
        }
    }
}
