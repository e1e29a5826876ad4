//! The slot executor: the task value this node holds, its context, the serve book that makes
//! every pull answered at most once, and the spans its handlers run in. It runs the calls the
//! engine decides; it decides nothing.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;
use tracing::{debug, error_span, Instrument, Span};

use crate::app::{Context, SlotState, Task};
use crate::data::{Answer, DataRequest, PullId, Responder, ServeKey};
use crate::exchange::serve::{Lookup, Reply, ServeBook};
use crate::inbox::LoopRequest;
use crate::node::engine::TaskCall;
use crate::wire::{Meta, PullRequest};
use crate::{Epoch, Term};

/// The task value this node holds, with its context and the channel feeding the context.
pub(super) struct SlotRuntime {
    pub(super) task: Box<dyn Task>,
    pub(super) ctx: Context,
    pub(super) state: watch::Sender<SlotState>,
    /// Identifies this slot among the ones the node has taken.
    pub(super) id: u64,
    /// As primary: answers and early arrivals of the current epoch.
    pub(super) serve: ServeBook,
    /// As primary: answers to the task's pulls (and outputs of its work, timers) that arrived
    /// while the lease was past its local deadline; delivered once it is renewed (or dropped
    /// with the slot).
    pub(super) deferred: Vec<LoopRequest>,
    /// As primary: neighbour events the engine decided on a lease that lapsed before the
    /// task could be told (the keeper's news came in the same turn); told once it is renewed
    /// (or dropped with the slot), like `deferred`.
    pub(super) deferred_calls: Vec<TaskCall>,
    /// The slot's span (task, role, term), child of the node's.
    pub(super) span: Span,
    /// As primary: the span of the epoch the task is in (child of `span`).
    pub(super) epoch_span: Option<Span>,
    /// Answers to held pulls the task gave in a handler of this node (outside the handler
    /// `serve_data` of the pull itself): sent when the node's handling of the event ends
    /// ([`Runtime::send_made_answers`](super::runtime::Runtime::send_made_answers)), not by
    /// a trip through the loop's queue.
    pub(super) made: Arc<Mutex<Vec<(ServeKey, Answer)>>>,
    /// The node's [`node_instance`](crate::inbox::node_instance).
    pub(super) node: u64,
}

/// Where an answer given inside `serve_data` waits for the handler to return (`Open`), so the
/// loop sends it without a trip through its own queue; once the handler returned (`Closed`),
/// a later answer goes to the loop.
enum Inline {
    Open(Option<Answer>),
    Closed,
}

impl Drop for SlotRuntime {
    /// The slot's work (the task's spawned work, its pulls and metas) ends with the slot, also
    /// when the node is dropped without stopping (a crash): work that keeps a clone of the
    /// context must not keep the node's lease alive.
    fn drop(&mut self) {
        self.ctx.abort_spawned();
    }
}

impl SlotRuntime {
    /// The innermost span of the slot: its epoch's, or its own.
    pub(super) fn span(&self) -> Span {
        self.epoch_span.clone().unwrap_or_else(|| self.span.clone())
    }

    /// The slot now serves as primary under `term` (in span `span`): its state shows the term
    /// before any handler runs.
    pub(super) fn primary_term(&mut self, term: Term, span: Span) {
        self.span = span;
        self.epoch_span = None;
        self.state.send_modify(|st| st.primary = Some(term));
    }

    /// Enters `epoch`: the state, the context, the serve book and the span; the task's
    /// `enter_epoch`; then the metas and pulls of the epoch that arrived early. Returns the
    /// answers the task gave to early pulls inside `serve_data`, for the loop to send.
    pub(super) async fn enter_epoch(
        &mut self,
        epoch: Epoch,
        requests: &crate::inbox::LoopSender,
    ) -> Vec<(ServeKey, Answer)> {
        self.state.send_modify(|st| st.epoch = epoch);
        self.ctx.begin_epoch(epoch);
        // Everything of this epoch (handlers, pulls and metas started from them, spawned
        // work) is logged in its span.
        let span = error_span!(parent: &self.span, "epoch", epoch);
        self.epoch_span = Some(span.clone());
        let (early_pulls, early_metas) = self.serve.enter(epoch);
        self.report_kept();
        async {
            debug!("entering epoch");
            self.task.enter_epoch(&self.ctx, epoch).await;
            for meta in early_metas {
                self.deliver_meta(meta).await;
            }
            let mut answers = Vec::new();
            for (req, reply) in early_pulls {
                answers.extend(self.serve_pull(req, reply, requests).await);
            }
            answers
        }
        .instrument(span)
        .await
    }

    /// Runs the task's `serve_data` for a pull of its current epoch, unless this request was
    /// already handed to it (then `reply` waits for, or gets, the same answer). An answer given
    /// inside the handler is returned, for the caller to send at once; one given later (a held
    /// pull answered by another handler or by spawned work) goes to the loop as a request.
    pub(super) async fn serve_pull(
        &mut self,
        req: PullRequest,
        reply: Reply,
        requests: &crate::inbox::LoopSender,
    ) -> Option<(ServeKey, Answer)> {
        let id = PullId {
            epoch: req.header.epoch,
            from: req.header.from_task,
            to: req.header.to_task,
            seq: req.seq,
        };
        let key = ServeKey {
            id,
            requester_term: req.header.term,
        };
        let lookup = self.serve.lookup(key, req.delivered_below, reply);
        if req.delivered_below > 0 {
            self.report_kept();
        }
        let Lookup::New = lookup else {
            return None;
        };
        let inline = Arc::new(Mutex::new(Inline::Open(None)));
        let request = DataRequest {
            id,
            method: req.method,
            input: req.payload,
            responder: Some({
                let (slot, tx, inline) = (self.id, requests.clone(), inline.clone());
                let (made, node) = (self.made.clone(), self.node);
                Responder(Box::new(move |answer| {
                    let mut state = inline.lock().unwrap_or_else(PoisonError::into_inner);
                    match &mut *state {
                        Inline::Open(held) => *held = Some(answer),
                        Inline::Closed => {
                            drop(state);
                            if crate::inbox::handled_by(node) {
                                made.lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .push((key, answer));
                            } else {
                                let _ = tx.send(LoopRequest::Answer { slot, key, answer });
                            }
                        }
                    }
                }))
            }),
        };
        self.task.serve_data(&self.ctx, request).await;
        let mut state = inline.lock().unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut *state, Inline::Closed) {
            Inline::Open(Some(answer)) => Some((key, answer)),
            _ => None,
        }
    }

    /// Publishes the bytes of the answers kept for retries.
    pub(super) fn report_kept(&self) {
        self.ctx
            .env()
            .metrics
            .kept_answer_bytes(self.serve.kept_bytes());
    }

    /// Delivers a meta of the current epoch, once per (sender, link, meta).
    pub(super) async fn deliver_meta(&mut self, msg: Meta) {
        if self
            .serve
            .first_meta(msg.header.from_task, &msg.link, &msg.meta)
        {
            self.ctx.env().metrics.meta_received(self.ctx.task());
            self.task
                .meta_ready(&self.ctx, msg.header.from_task, &msg.link, &msg.meta)
                .await;
        }
    }
}
