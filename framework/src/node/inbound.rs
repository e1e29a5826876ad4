//! The runtime's answers to what arrives from outside the loop: messages from other nodes
//! (pings, pulls, metas, replication entries), admitted by the engine's rules, and what comes
//! back to the slot from the task's own side (answers it served, answers to its pulls, the
//! outputs of its work, its timers), routed by the engine.

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::engine::{Input, Replica, Route, When};
use super::runtime::{Flow, Runtime};
use crate::data::DataReply;
use crate::error::Error;
use crate::inbox::LoopRequest;
use crate::roles::MySlot;
use crate::wire::{
    Acknowledge, Header, Inbound, Meta, PingReply, PullRequest, Rejection, Replicate,
    ReplicateKind, SlotInfo,
};

impl Runtime {
    /// Answers a message from another node (counted in `taskgraph_inbound_messages_total` when
    /// it was sent to the loop, see `DirectServe`).
    pub(super) async fn on_inbound(
        &mut self,
        msg: Inbound,
        stop: &CancellationToken,
    ) -> Result<Flow, Error> {
        match msg {
            Inbound::Replicate(msg, reply) => {
                let (term, index) = (msg.header.term, msg.index);
                let outcome = self.on_replicate(msg, Instant::now()).await;
                let applied = outcome == Ok(true);
                let _ = reply.send(outcome.map(|_| ()));
                if applied {
                    let commands = self
                        .engine
                        .handle(Input::Replicated { term, index }, Instant::now());
                    return self.execute(commands, stop).await;
                }
            }
            other => self.on_direct(other).await,
        }
        Ok(Flow::Continue)
    }

    /// Answers a pull, a meta or a ping, whether the loop or the gRPC handler's task (see
    /// `runtime::DirectServe`) serves it; these never lead to decisions of the engine. A
    /// replication entry must go through the loop: here it is refused.
    pub(super) async fn on_direct(&mut self, msg: Inbound) {
        let now = Instant::now();
        match msg {
            Inbound::Ping(reply) => {
                let _ = reply.send(self.ping_reply());
            }
            Inbound::Pull(req, reply) => self.on_pull(req, reply, now).await,
            Inbound::Meta(msg, reply) => {
                let outcome = self.on_meta(msg, now).await;
                let _ = reply.send(outcome);
            }
            Inbound::Acknowledge(msg, reply) => {
                let _ = reply.send(self.on_acknowledge(&msg));
            }
            Inbound::Replicate(_, reply) => {
                let _ = reply.send(Err(Rejection::ShuttingDown));
            }
        }
    }

    pub(super) fn ping_reply(&self) -> PingReply {
        let slots = match (self.engine.mine(), &self.slot, self.engine.slot()) {
            (MySlot::Primary { task, term }, Some(_), Some(book)) => vec![SlotInfo {
                task,
                primary: true,
                term,
                epoch: book.entered.unwrap_or(0),
            }],
            (MySlot::Backup { task, .. }, Some(s), _) => vec![SlotInfo {
                task,
                primary: false,
                term: 0,
                epoch: s.state.borrow().epoch,
            }],
            _ => vec![],
        };
        PingReply {
            job: self.config.job.clone(),
            node_id: self.holder.node.clone(),
            slots,
        }
    }

    /// The engine's admission of a pull or meta; a sender refused only because this node
    /// does not watch its task's slot keys makes the loop watch them (the sender retries).
    fn admit(&self, header: &Header, now: Instant) -> Result<When, Rejection> {
        let admitted = self.engine.admit(header, now);
        if let Err(Rejection::NotPrimary { task }) = admitted {
            if task == header.from_task && task != header.to_task && self.engine.unwatched(task) {
                let _ = self.requests_tx.send(LoopRequest::WatchTask(task));
            }
        }
        admitted
    }

    /// A pull for this node's task: answered only by the acting primary, in the request's
    /// epoch; early requests wait for the epoch, late ones are told it moved.
    pub(super) async fn on_pull(
        &mut self,
        req: PullRequest,
        reply: crate::exchange::serve::Reply,
        now: Instant,
    ) {
        let (to, epoch) = (req.header.to_task, req.header.epoch);
        let when = self.admit(&req.header, now);
        let Some(s) = self.slot.as_mut() else {
            let _ = reply.send(Err(Rejection::NotPrimary { task: to }));
            return;
        };
        match when {
            Ok(When::Now) => {
                if let Some((key, answer)) = s.serve_pull(req, reply, &self.requests_tx).await {
                    let id = s.id;
                    self.answer_served(id, key, answer, Instant::now());
                }
            }
            Ok(When::Later) => {
                if let Err(reply) = s.serve.hold_pull(req, reply) {
                    let _ = reply.send(Err(Rejection::NotReady { task: to, epoch }));
                }
            }
            Err(r) => {
                let _ = reply.send(Err(r));
            }
        }
    }

    /// A meta for this node's task: delivered once per (sender, link, meta) in the task's
    /// epoch; early ones wait for the epoch.
    pub(super) async fn on_meta(&mut self, msg: Meta, now: Instant) -> Result<(), Rejection> {
        let (to, epoch) = (msg.header.to_task, msg.header.epoch);
        let when = self.admit(&msg.header, now)?;
        let Some(s) = self.slot.as_mut() else {
            return Err(Rejection::NotPrimary { task: to });
        };
        match when {
            When::Now => s.deliver_meta(msg).await,
            When::Later if s.serve.hold_meta(msg) => {}
            When::Later => return Err(Rejection::NotReady { task: to, epoch }),
        }
        Ok(())
    }

    /// The requester of a pull this node's task answered received the answer: its bytes are
    /// dropped. Only this node's own answers are touched (those of the requester's task and
    /// term named in the message), so no term is checked: dropping a deposed requester's
    /// answer harms no one.
    fn on_acknowledge(&mut self, msg: &Acknowledge) -> Result<(), Rejection> {
        let to = msg.header.to_task;
        let primary = matches!(self.engine.mine(), MySlot::Primary { task, .. } if task == to);
        let Some(s) = self.slot.as_mut().filter(|_| primary) else {
            return Err(Rejection::NotPrimary { task: to });
        };
        s.serve.acknowledge(&crate::data::ServeKey {
            id: crate::data::PullId {
                epoch: msg.header.epoch,
                from: msg.header.from_task,
                to,
                seq: msg.seq,
            },
            requester_term: msg.header.term,
        });
        s.report_kept();
        Ok(())
    }

    /// A replication entry for this node's task, as its backup: `Ok(true)` when applied.
    pub(super) async fn on_replicate(
        &mut self,
        msg: Replicate,
        now: Instant,
    ) -> Result<bool, Rejection> {
        let snapshot = msg.kind == ReplicateKind::Snapshot;
        let action = self
            .engine
            .admit_replica(&msg.header, snapshot, msg.index, now)?;
        let Some(s) = self.slot.as_mut() else {
            return Err(Rejection::NotPrimary {
                task: msg.header.to_task,
            });
        };
        match (action, msg.kind) {
            (Replica::Repeat, _) => Ok(false),
            (Replica::Apply, ReplicateKind::Snapshot) => {
                s.task.apply_snapshot(&s.ctx, msg.data).await;
                Ok(true)
            }
            (Replica::Apply, ReplicateKind::Update) => {
                s.task.apply_update(&s.ctx, msg.data).await;
                Ok(true)
            }
        }
    }

    /// The task answered the pull `key` it served in slot `slot`: the answer is kept, stamped
    /// with the term this node was elected with, and sent to the waiting calls if the lease is
    /// valid now (else they retry and get the kept answer once it is).
    pub(super) fn answer_served(
        &mut self,
        slot: u64,
        key: crate::data::ServeKey,
        answer: crate::data::Answer,
        now: Instant,
    ) {
        let acting = self.engine.acting_primary(now).is_some();
        let elected = self.engine.elected();
        let Some(s) = self.slot.as_mut() else {
            return;
        };
        if slot != s.id {
            return;
        }
        match elected {
            // Not this slot's primary any more: the calls retry against the new one.
            None => s
                .serve
                .abandon(key, Rejection::NotPrimary { task: key.id.to }),
            Some(elected) => {
                if s.serve.answer(key, answer, elected, acting) {
                    s.ctx.env().metrics.pull_served(s.ctx.task());
                    s.report_kept();
                }
            }
        }
    }

    /// Requests from the task's side: answers to pulls it served, answers to its pulls, the
    /// outputs of its work, its timers.
    pub(super) async fn on_request(&mut self, req: LoopRequest) {
        let now = Instant::now();
        let req = match req {
            LoopRequest::Answer { slot, key, answer } => {
                return self.answer_served(slot, key, answer, now)
            }
            other => other,
        };
        let route = match &req {
            // The loop takes these itself (see `Runtime::handle`).
            LoopRequest::Kill
            | LoopRequest::Answer { .. }
            | LoopRequest::EpochCommitted { .. }
            | LoopRequest::WatchTask(_)
            | LoopRequest::LeaseKeys(_)
            | LoopRequest::Drafted(_) => return,
            LoopRequest::WorkDone { slot, done } => {
                self.engine.route(*slot, done.id().epoch, None, now)
            }
            LoopRequest::Timer { slot, epoch, .. } => self.engine.route(*slot, *epoch, None, now),
            LoopRequest::Pulled {
                slot,
                id,
                server_term,
                result,
            } => {
                let pulled = result.is_ok().then_some((id.to, *server_term));
                self.engine.route(*slot, id.epoch, pulled, now)
            }
        };
        let Some(s) = self.slot.as_mut() else {
            return;
        };
        match (route, req) {
            (Route::Drop, _) => {}
            (Route::Defer, req) => s.deferred.push(req),
            (Route::Refetch, LoopRequest::Pulled { id, .. }) => s.ctx.refetch(id),
            (Route::Deliver, LoopRequest::WorkDone { done, .. }) => {
                s.task.work_done(&s.ctx, done).await
            }
            (Route::Deliver, LoopRequest::Timer { token, .. }) => s.task.timer(&s.ctx, token).await,
            (
                Route::Deliver,
                LoopRequest::Pulled {
                    id,
                    server_term,
                    result,
                    ..
                },
            ) => {
                let Some(pending) = s.ctx.take_pending(id) else {
                    return;
                };
                s.ctx.env().metrics.pull_delivered(
                    id.from,
                    pending.started.elapsed(),
                    result.is_ok(),
                );
                let reply = DataReply {
                    id,
                    method: pending.method,
                    server_term,
                    result,
                };
                s.task.data_ready(&s.ctx, reply).await;
            }
            _ => {}
        }
    }
}
