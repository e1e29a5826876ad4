//! A dataflow test application on a tree, exercising every exchange of the framework, and the
//! checks of its audit trail.
//!
//! In epoch `e` every task pulls the parameter (`e`) from its parent and the gradients of its
//! children; a task answers a `param` pull only once it has the parameter itself and a `grad`
//! pull only once it has its children's gradients (the serving side holds requests, as the
//! regression example needs). A task's gradient is `e · id` plus its children's, so the root's
//! result for epoch `e` is `e · (0 + 1 + … + n−1)`. Having its gradient, a task flags the meta
//! `done` to its parent; the root moves the job on once it has its result and a `done` from
//! every child. Every task also counts the epochs it entered in a counter that it replicates to
//! its backups and checkpoints in etcd, so a new primary continues the count.
//!
//! With large answers ([`DataflowBuilder::build_with_answers`]), every answer is padded to a
//! given size with a pattern derived from (answering task, epoch, value, position), which the
//! receiver checks byte for byte: a payload cut, mixed up with another answer or served from a
//! stale cache shows as a wrong value in the trail.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use taskgraph::{
    async_trait, Bytes, Checkpoint, Context, DataReply, DataRequest, Epoch, ExitReason, Task,
    TaskBuilder, TaskId, Term,
};

use crate::apps::{Audit, Event};

/// Links of the dataflow app.
pub const PARENTS: &str = "parents";
/// Links of the dataflow app.
pub const CHILDREN: &str = "children";

/// One dataflow task.
#[derive(Debug)]
pub struct DataflowTask {
    task: TaskId,
    node: String,
    audit: Audit,
    until: Epoch,
    pace: Duration,
    state: bool,
    epoch: Epoch,
    param: Option<u64>,
    grads: BTreeMap<TaskId, u64>,
    held_param: Vec<DataRequest>,
    held_grad: Vec<DataRequest>,
    done_from: BTreeSet<TaskId>,
    flagged: bool,
    moved: bool,
    counter: u64,
    /// Size of every answer in bytes (0: the postcard-encoded value alone).
    answer_bytes: usize,
    /// The term this task's slot was elected with (0 before `became_primary`).
    term: Term,
}

/// An answer of `len` bytes (at least 8): `value` (little endian), then 8-byte words, the
/// `k`-th being a mix of `(from, epoch, value)` xor `k`.
pub fn large_answer(from: TaskId, epoch: Epoch, value: u64, len: usize) -> Bytes {
    let word = pattern(from, epoch, value);
    let mut out = Vec::with_capacity(len.max(8));
    out.extend_from_slice(&value.to_le_bytes());
    let mut k = 0u64;
    while out.len() < len {
        let chunk = (word ^ k).to_le_bytes();
        let n = chunk.len().min(len - out.len());
        out.extend_from_slice(&chunk[..n]);
        k += 1;
    }
    out.into()
}

/// The value of an answer written by [`large_answer`] with these arguments, if every byte is
/// as written.
pub fn read_large_answer(bytes: &[u8], from: TaskId, epoch: Epoch, len: usize) -> Option<u64> {
    if bytes.len() != len.max(8) {
        return None;
    }
    let (head, pad) = bytes.split_at(8);
    let value = u64::from_le_bytes(head.try_into().ok()?);
    let word = pattern(from, epoch, value);
    let intact = pad.chunks(8).enumerate().all(|(k, chunk)| {
        let want = (word ^ k as u64).to_le_bytes();
        chunk == &want[..chunk.len()]
    });
    intact.then_some(value)
}

fn pattern(from: TaskId, epoch: Epoch, value: u64) -> u64 {
    value.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (u64::from(from) << 40) ^ epoch.rotate_left(17)
}

impl DataflowTask {
    fn children(ctx: &Context) -> Vec<TaskId> {
        ctx.neighbours(CHILDREN)
    }

    fn grad(&self, ctx: &Context) -> Option<u64> {
        self.param?;
        let children = Self::children(ctx);
        if children.iter().all(|c| self.grads.contains_key(c)) {
            Some(self.epoch * u64::from(self.task) + self.grads.values().sum::<u64>())
        } else {
            None
        }
    }

    /// Counts the epoch in the replicated, checkpointed counter. When replication fails (the
    /// lease is unconfirmed, or this node was deposed) the count is shipped with the next one;
    /// the epoch's pulls go on either way (the framework holds them until the lease is
    /// confirmed, and refuses them once the slot is gone).
    async fn keep_state(&mut self, ctx: &Context, term: Term, epoch: Epoch) {
        self.counter += 1;
        let encoded = taskgraph::encode(&self.counter).unwrap_or_default();
        if let Err(e) = ctx.replicate(encoded).await {
            tracing::info!(error = %e, "replicate failed");
            return;
        }
        // Recorded only once replicated and checkpointed: a deposed primary (whose checkpoint
        // is fenced off) records nothing.
        match ctx.checkpoint_with(&self.counter).await {
            Ok(()) => self.record(Event::Counter {
                task: self.task,
                term,
                epoch: Some(epoch),
                value: self.counter,
            }),
            Err(e) => tracing::info!(error = %e, "checkpoint failed"),
        }
    }

    fn record(&self, event: Event) {
        self.audit.record(&self.node, event);
    }

    fn progress(&mut self, ctx: &Context) {
        if let Some(p) = self.param {
            for r in self.held_param.drain(..) {
                reply(r, self.task, p, self.answer_bytes);
            }
        }
        let Some(grad) = self.grad(ctx) else {
            return;
        };
        for r in self.held_grad.drain(..) {
            reply(r, self.task, grad, self.answer_bytes);
        }
        if self.task != 0 {
            if !self.flagged {
                self.flagged = true;
                if let Err(e) = ctx.flag_meta(PARENTS, "done") {
                    tracing::info!(error = %e, "cannot flag done");
                }
            }
            return;
        }
        let children: BTreeSet<TaskId> = Self::children(ctx).into_iter().collect();
        if self.moved || self.done_from != children {
            return;
        }
        self.moved = true;
        let term = ctx.term().unwrap_or(0);
        self.record(Event::Result {
            epoch: self.epoch,
            value: grad,
            term,
        });
        let (ctx, audit, node, epoch, until, pace) = (
            ctx.clone(),
            self.audit.clone(),
            self.node.clone(),
            self.epoch,
            self.until,
            self.pace,
        );
        ctx.clone().spawn(async move {
            audit.gate_open(epoch).await;
            // No sleep for no pace: tokio rounds a sleep up to the next millisecond tick, so
            // even a zero sleep waits up to 1 ms (about 0.5 ms an epoch in the benchmark).
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
            let mut delay = Duration::from_millis(20);
            loop {
                let result = if epoch < until {
                    ctx.inc_epoch(epoch).await.map(|moved| {
                        if moved {
                            audit.record(
                                &node,
                                Event::Moved {
                                    task: 0,
                                    from: epoch,
                                    term,
                                },
                            );
                        }
                    })
                } else {
                    ctx.shutdown_job().await.map(|_| ())
                };
                match result {
                    Ok(()) => return,
                    Err(
                        taskgraph::ContextError::Etcd(_)
                        | taskgraph::ContextError::Suspended { .. },
                    ) => {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_millis(500));
                    }
                    Err(_) => return,
                }
            }
        });
    }
}

/// Answers `r` with `value`, padded to `answer_bytes` if that is not 0.
fn reply(r: DataRequest, task: TaskId, value: u64, answer_bytes: usize) {
    if answer_bytes == 0 {
        let _ = r.reply_with(&value);
    } else {
        let epoch = r.epoch();
        r.reply(large_answer(task, epoch, value, answer_bytes));
    }
}

#[async_trait]
impl Task for DataflowTask {
    async fn restore(&mut self, _ctx: &Context, checkpoint: Checkpoint) {
        if let Ok(c) = checkpoint.decode::<u64>() {
            self.counter = c;
            self.record(Event::Restored {
                task: self.task,
                epoch: checkpoint.epoch,
                counter: c,
            });
        }
    }

    async fn became_primary(&mut self, _ctx: &Context, term: Term) {
        self.term = term;
        self.record(Event::Primary {
            task: self.task,
            term,
        });
        self.record(Event::Counter {
            task: self.task,
            term,
            epoch: None,
            value: self.counter,
        });
    }

    async fn became_backup(&mut self, _ctx: &Context) {
        self.record(Event::Backup { task: self.task });
    }

    async fn enter_epoch(&mut self, ctx: &Context, epoch: Epoch) {
        let term = ctx.term().unwrap_or(0);
        self.record(Event::Enter {
            task: self.task,
            epoch,
            term,
        });
        self.epoch = epoch;
        self.param = (self.task == 0).then_some(epoch);
        self.grads.clear();
        self.held_param.clear();
        self.held_grad.clear();
        self.done_from.clear();
        self.flagged = false;
        self.moved = false;
        if self.state {
            self.keep_state(ctx, term, epoch).await;
        }
        for p in ctx.neighbours(PARENTS) {
            if let Err(e) = ctx.data_request(p, "param", Bytes::new()) {
                tracing::info!(error = %e, "cannot pull");
            }
        }
        for c in Self::children(ctx) {
            if let Err(e) = ctx.data_request_with(c, "grad", &epoch) {
                tracing::info!(error = %e, "cannot pull");
            }
        }
        self.progress(ctx);
    }

    async fn serve_data(&mut self, ctx: &Context, request: DataRequest) {
        match request.method() {
            "param" => self.held_param.push(request),
            "grad" => self.held_grad.push(request),
            _ => request.unknown_method(),
        }
        self.progress(ctx);
    }

    async fn data_ready(&mut self, ctx: &Context, reply: DataReply) {
        // An answer is delivered only while the slot acts under its term; read before checking
        // a large payload, which takes long enough for the lease's local deadline to pass
        // meanwhile on a loaded machine (then `term()` says `None` for a moment).
        let term = ctx.term().unwrap_or(self.term);
        let value = if self.answer_bytes == 0 {
            reply.decode::<u64>().ok()
        } else {
            reply.result().ok().and_then(|b| {
                read_large_answer(b, reply.server(), reply.epoch(), self.answer_bytes)
            })
        };
        self.record(Event::Data {
            task: self.task,
            term,
            at_epoch: ctx.epoch(),
            epoch: reply.epoch(),
            from: reply.server(),
            seq: reply.id().seq,
            method: reply.method().to_owned(),
            value,
            server_term: reply.server_term(),
        });
        match (reply.method(), value) {
            ("param", Some(v)) => self.param = Some(v),
            ("grad", Some(v)) => {
                self.grads.insert(reply.server(), v);
            }
            _ => {}
        }
        self.progress(ctx);
    }

    async fn meta_ready(&mut self, ctx: &Context, from: TaskId, link: &str, meta: &str) {
        self.record(Event::Meta {
            task: self.task,
            term: ctx.term().unwrap_or(0),
            epoch: ctx.epoch(),
            from,
            link: link.to_owned(),
            meta: meta.to_owned(),
        });
        if meta == "done" {
            self.done_from.insert(from);
        }
        self.progress(ctx);
    }

    async fn neighbour_failed(&mut self, ctx: &Context, link: &str, neighbour: TaskId) {
        self.record(Event::Neighbour {
            task: self.task,
            term: ctx.term().unwrap_or(0),
            link: link.to_owned(),
            neighbour,
            failed: true,
        });
    }

    async fn neighbour_restarted(&mut self, ctx: &Context, link: &str, neighbour: TaskId) {
        self.record(Event::Neighbour {
            task: self.task,
            term: ctx.term().unwrap_or(0),
            link: link.to_owned(),
            neighbour,
            failed: false,
        });
    }

    async fn apply_update(&mut self, _ctx: &Context, update: Bytes) {
        if let Ok(c) = taskgraph::decode::<u64>(&update) {
            self.counter = c;
        }
    }

    fn snapshot(&self, _ctx: &Context) -> Bytes {
        taskgraph::encode(&self.counter).unwrap_or_default()
    }

    async fn apply_snapshot(&mut self, _ctx: &Context, snapshot: Bytes) {
        if let Ok(c) = taskgraph::decode::<u64>(&snapshot) {
            self.counter = c;
        }
    }

    async fn exit(&mut self, _ctx: &Context, reason: ExitReason) {
        self.record(Event::Exit {
            task: self.task,
            reason: format!("{reason:?}"),
        });
    }
}

/// Builds [`DataflowTask`]s.
#[derive(Debug, Clone)]
pub struct DataflowBuilder {
    /// Node label recorded with each event.
    pub node: String,
    /// Where events go.
    pub audit: Audit,
    /// The root shuts the job down on entering this epoch.
    pub until: Epoch,
    /// Pause before the root moves the job on.
    pub pace: Duration,
    /// Whether tasks keep the replicated and checkpointed epoch counter (one `replicate` and
    /// one etcd write per task and epoch); off to measure the framework's own cost.
    pub state: bool,
}

impl DataflowBuilder {
    /// A task whose every answer is `answer_bytes` long (see [`large_answer`]; 0: the plain
    /// postcard-encoded value, as [`TaskBuilder::build`]).
    pub fn build_with_answers(&self, task: TaskId, answer_bytes: usize) -> Box<dyn Task> {
        Box::new(DataflowTask {
            task,
            node: self.node.clone(),
            audit: self.audit.clone(),
            until: self.until,
            pace: self.pace,
            state: self.state,
            epoch: 0,
            param: None,
            grads: BTreeMap::new(),
            held_param: Vec::new(),
            held_grad: Vec::new(),
            done_from: BTreeSet::new(),
            flagged: false,
            moved: false,
            counter: 0,
            answer_bytes,
            term: 0,
        })
    }
}

impl TaskBuilder for DataflowBuilder {
    fn build(&self, task: TaskId) -> Box<dyn Task> {
        self.build_with_answers(task, 0)
    }
}

/// The root's expected result for epoch `e` with `tasks` tasks.
pub fn expected_result(tasks: u32, e: Epoch) -> u64 {
    e * (u64::from(tasks) * u64::from(tasks.saturating_sub(1)) / 2)
}

/// Checks the audit trail of a dataflow job over a binary tree of `tasks` tasks that ran
/// epochs `0..=until`. Returns every violation found (empty: all good).
pub fn check_trail(events: &[(String, Event)], tasks: u32, until: Epoch) -> Vec<String> {
    let tree = taskgraph::Tree::new(tasks, 2).ok();
    let parent_of = |t: TaskId| tree.as_ref().and_then(|tr| tr.parent_of(t));
    let children_of = |t: TaskId| {
        tree.as_ref()
            .map(|tr| tr.children_of(t))
            .unwrap_or_default()
    };
    let mut bad = Vec::new();
    // Data: exactly once per (node, task, term, epoch, to, seq); of the current epoch; right
    // value; answering term never decreasing per (receiver node, answering task).
    let mut seen_data = HashSet::new();
    let mut last_server_term: HashMap<(String, TaskId, TaskId), Term> = HashMap::new();
    let mut got: HashMap<PrimaryEpoch, BTreeSet<(String, TaskId)>> = HashMap::new();
    let mut seen_meta = HashSet::new();
    let mut neighbour_state: HashMap<(String, TaskId, Term, String, TaskId), bool> = HashMap::new();
    let mut counter_max: HashMap<TaskId, u64> = HashMap::new();
    let mut results: BTreeMap<Epoch, Vec<u64>> = BTreeMap::new();
    let mut entered: HashMap<(String, TaskId, Term), Vec<Epoch>> = HashMap::new();
    // The terms of each task that served its data of an epoch to a neighbour.
    let mut served: HashMap<(TaskId, Epoch), BTreeSet<Term>> = HashMap::new();
    for (node, e) in events {
        match e {
            Event::Data {
                task,
                term,
                at_epoch,
                epoch,
                from,
                seq,
                method,
                value,
                server_term,
            } => {
                if !seen_data.insert((node.clone(), *task, *term, *epoch, *from, *seq)) {
                    bad.push(format!("{node}: duplicate data {e:?}"));
                }
                served
                    .entry((*from, *epoch))
                    .or_default()
                    .insert(*server_term);
                if at_epoch != epoch {
                    bad.push(format!(
                        "{node}: data of epoch {epoch} delivered in epoch {at_epoch}: {e:?}"
                    ));
                }
                let want = match method.as_str() {
                    "param" => Some(*epoch),
                    "grad" => Some(grad_of(*from, *epoch, &children_of)),
                    _ => None,
                };
                if *value != want {
                    bad.push(format!(
                        "{node}: wrong value {value:?}, want {want:?}: {e:?}"
                    ));
                }
                let last = last_server_term
                    .entry((node.clone(), *task, *from))
                    .or_insert(0);
                if *server_term < *last {
                    bad.push(format!(
                        "{node}: answer of task {from} from term {server_term} after term {last}"
                    ));
                }
                *last = (*last).max(*server_term);
                got.entry((node.clone(), *task, *term, *epoch))
                    .or_default()
                    .insert((method.clone(), *from));
            }
            Event::Meta {
                task,
                term,
                epoch,
                from,
                link,
                meta,
            } => {
                if !seen_meta.insert((
                    node.clone(),
                    *task,
                    *term,
                    *epoch,
                    *from,
                    link.clone(),
                    meta.clone(),
                )) {
                    bad.push(format!("{node}: duplicate meta {e:?}"));
                }
                if parent_of(*from) != Some(*task) {
                    bad.push(format!(
                        "{node}: meta from a task that is not a child: {e:?}"
                    ));
                }
            }
            Event::Neighbour {
                task,
                term,
                link,
                neighbour,
                failed,
            } => {
                let state = neighbour_state
                    .entry((node.clone(), *task, *term, link.clone(), *neighbour))
                    .or_insert(false);
                if *state == *failed {
                    bad.push(format!(
                        "{node}: neighbour event out of order or repeated: {e:?}"
                    ));
                }
                *state = *failed;
            }
            Event::Counter {
                task, epoch, value, ..
            } => {
                let max = counter_max.entry(*task).or_insert(0);
                match epoch {
                    // A new primary starts from at least the last count that was both
                    // replicated and checkpointed (recorded with its epoch): a promoted backup
                    // applied it, a spare restores it. A count a new primary started with but
                    // never checkpointed does not raise the bar: when every node of the task
                    // dies, the next one restores the checkpoint and redoes the epoch.
                    None if *value < *max => bad.push(format!(
                        "{node}: task {task} starts with counter {value}, but {max} was already replicated and checkpointed"
                    )),
                    None => {}
                    Some(_) => *max = (*max).max(*value),
                }
            }
            Event::Result { epoch, value, .. } => results.entry(*epoch).or_default().push(*value),
            Event::Enter { task, epoch, term } => entered
                .entry((node.clone(), *task, *term))
                .or_default()
                .push(*epoch),
            _ => {}
        }
    }
    // No loss: a primary that lived through epoch e (entered e and e+1 under one term) got every
    // answer of e.
    for ((node, task, term), epochs) in &entered {
        for w in epochs.windows(2) {
            let e = w[0];
            let mut want = BTreeSet::new();
            if let Some(p) = parent_of(*task) {
                want.insert(("param".to_owned(), p));
            }
            for c in children_of(*task) {
                want.insert(("grad".to_owned(), c));
            }
            let have = got
                .get(&(node.clone(), *task, *term, e))
                .cloned()
                .unwrap_or_default();
            // A primary that took over after an earlier term of its task had already served
            // the task's part of epoch e may see the epoch move on before its own pulls of e
            // are answered: they are cancelled, as promised, and nothing is lost.
            let done_before = served
                .get(&(*task, e))
                .is_some_and(|terms| terms.iter().any(|t| t < term));
            if have != want && !done_before {
                bad.push(format!(
                    "{node}: task {task} (term {term}) left epoch {e} with answers {have:?}, want {want:?}"
                ));
            }
        }
    }
    for e in 0..until {
        match results.get(&e) {
            None => bad.push(format!("no result for epoch {e}")),
            Some(v) if v.iter().any(|x| *x != expected_result(tasks, e)) => bad.push(format!(
                "epoch {e}: results {v:?}, want {}",
                expected_result(tasks, e)
            )),
            Some(_) => {}
        }
    }
    bad
}

/// (node, task, term, epoch): one primary in one epoch.
type PrimaryEpoch = (String, TaskId, Term, Epoch);

fn grad_of(task: TaskId, epoch: Epoch, children_of: &dyn Fn(TaskId) -> Vec<TaskId>) -> u64 {
    epoch * u64::from(task)
        + children_of(task)
            .into_iter()
            .map(|c| grad_of(c, epoch, children_of))
            .sum::<u64>()
}

/// Serialisable settings of the dataflow app (for process nodes).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct DataflowSettings {
    /// The root shuts the job down on entering this epoch.
    pub until: Epoch,
    /// Pause before the root moves on, in milliseconds.
    pub pace_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_answer_reads_back_only_when_every_byte_is_as_written() {
        let a = large_answer(3, 7, 42, 1001);
        assert_eq!(a.len(), 1001);
        assert_eq!(read_large_answer(&a, 3, 7, 1001), Some(42));
        // Another task's, another epoch's, a cut, a flipped byte: refused.
        assert_eq!(read_large_answer(&a, 4, 7, 1001), None);
        assert_eq!(read_large_answer(&a, 3, 8, 1001), None);
        assert_eq!(read_large_answer(&a[..1000], 3, 7, 1001), None);
        let mut flipped = a.to_vec();
        flipped[600] ^= 1;
        assert_eq!(read_large_answer(&flipped, 3, 7, 1001), None);
        // Two chunks swapped.
        let mut swapped = a.to_vec();
        swapped.copy_within(8..16, 24);
        assert_eq!(read_large_answer(&swapped, 3, 7, 1001), None);
    }
}
