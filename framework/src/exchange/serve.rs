//! The serving side's memory of one epoch: answers per pull (so a retried pull gets the same
//! answer and the handler runs at most once per request), requests and metas that arrived
//! before this task entered their epoch, and the metas already delivered.
//!
//! A kept answer is needed only until its requester has it: every pull carries
//! `delivered_below`, the requester's word that all its pulls to this task with a lower
//! sequence number (same epoch and term) have been delivered. The book then forgets those
//! answers, so what it holds is bounded by the pulls in flight, not by all the pulls of the
//! epoch (for answers of many megabytes, the difference between one payload and dozens), and
//! refuses a late duplicate of a forgotten pull with [`Rejection::Delivered`] instead of
//! running the handler again. A requester that received a large answer also says so at once
//! ([`ServeBook::acknowledge`]): the answer's bytes are dropped then, not only at its next pull
//! (a kept answer of many megabytes would otherwise still hold its buffer while the next
//! request's arrives).

use std::collections::{BTreeMap, HashMap, HashSet};

use tokio::sync::oneshot;

use crate::data::{Answer, ServeKey};
use crate::wire::{Meta, PullAnswer, PullRequest, Rejection};
use crate::{Epoch, TaskId, Term};

/// Where the answer to one call of a pull goes.
pub(crate) type Reply = oneshot::Sender<Result<PullAnswer, Rejection>>;

/// Requests and metas of later epochs held at most (beyond, senders are told to retry).
pub(crate) const MAX_EARLY: usize = 4096;

#[derive(Debug)]
enum Served {
    /// The handler has the request; these calls wait for its answer.
    Waiting(Vec<Reply>),
    Done(Result<PullAnswer, Rejection>),
    /// The handler dropped the request without answering.
    Abandoned,
    /// Answered, and the requester said it received the answer: its bytes are gone, and a
    /// late duplicate is refused as delivered.
    Acknowledged,
}

/// What to do with a pull that reached the task in its epoch.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// Answered from memory, or queued behind the handler already running for it.
    Handled,
    /// New: run the handler.
    New,
}

/// The serving side's state of the epoch the task is in.
/// The order of kept answers: per requester (task, term), by sequence number, so the ones a
/// requester has been delivered form a range.
type Order = (TaskId, Term, Epoch, TaskId, u64);

fn order(key: &ServeKey) -> Order {
    (
        key.id.from,
        key.requester_term,
        key.id.epoch,
        key.id.to,
        key.id.seq,
    )
}

#[derive(Debug, Default)]
pub(crate) struct ServeBook {
    epoch: Option<Epoch>,
    answers: BTreeMap<Order, (ServeKey, Served)>,
    /// Per requester (task, term): every pull with a lower sequence number was delivered.
    floors: HashMap<(TaskId, Term), u64>,
    /// Payload bytes of the kept answers.
    kept_bytes: usize,
    early_pulls: Vec<(PullRequest, Reply)>,
    early_metas: Vec<Meta>,
    metas_seen: HashSet<(TaskId, String, String)>,
}

impl ServeBook {
    /// The task enters `epoch`: calls waiting on older epochs are told the epoch moved, and
    /// what arrived early for `epoch` is returned to be handled now (later ones stay held).
    pub(crate) fn enter(&mut self, epoch: Epoch) -> (Vec<(PullRequest, Reply)>, Vec<Meta>) {
        let previous = self.epoch.replace(epoch);
        if previous != Some(epoch) {
            self.floors.clear();
            self.kept_bytes = 0;
            for (_, (key, served)) in std::mem::take(&mut self.answers) {
                if let Served::Waiting(replies) = served {
                    for r in replies {
                        let _ = r.send(Err(Rejection::EpochMoved {
                            request_epoch: key.id.epoch,
                            current_epoch: epoch,
                        }));
                    }
                }
            }
            self.metas_seen.clear();
        }
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early_pulls)
            .into_iter()
            .filter(|(r, _)| r.header.epoch >= epoch)
            .partition(|(r, _)| r.header.epoch == epoch);
        self.early_pulls = later;
        let (metas_now, metas_later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early_metas)
            .into_iter()
            .filter(|m| m.header.epoch >= epoch)
            .partition(|m| m.header.epoch == epoch);
        self.early_metas = metas_later;
        (now, metas_now)
    }

    /// Holds a pull of a later epoch; gives its reply back when too many are held.
    pub(crate) fn hold_pull(&mut self, request: PullRequest, reply: Reply) -> Result<(), Reply> {
        if self.early_pulls.len() >= MAX_EARLY {
            return Err(reply);
        }
        self.early_pulls.push((request, reply));
        Ok(())
    }

    /// Holds a meta of a later epoch; `false` when too many are held.
    pub(crate) fn hold_meta(&mut self, meta: Meta) -> bool {
        if self.early_metas.len() >= MAX_EARLY {
            return false;
        }
        self.early_metas.push(meta);
        true
    }

    /// Whether this is the first time (in this epoch) that `from` flags `meta` on `link`.
    pub(crate) fn first_meta(&mut self, from: TaskId, link: &str, meta: &str) -> bool {
        self.metas_seen
            .insert((from, link.to_owned(), meta.to_owned()))
    }

    /// A pull of the current epoch: answers it from memory, queues it behind the running
    /// handler, or says it is new (then it is recorded as waiting for the handler).
    /// `delivered_below` is the requester's acknowledgement (see the module docs): the answers
    /// it covers are forgotten first.
    pub(crate) fn lookup(&mut self, key: ServeKey, delivered_below: u64, reply: Reply) -> Lookup {
        self.forget_delivered(&key, delivered_below);
        let floor = self
            .floors
            .get(&(key.id.from, key.requester_term))
            .copied()
            .unwrap_or(0);
        if key.id.seq < floor {
            let _ = reply.send(Err(Rejection::Delivered { seq: key.id.seq }));
            return Lookup::Handled;
        }
        match self.answers.get_mut(&order(&key)).map(|(_, s)| s) {
            Some(Served::Done(answer)) => {
                let _ = reply.send(answer.clone());
                Lookup::Handled
            }
            Some(Served::Waiting(replies)) => {
                replies.push(reply);
                Lookup::Handled
            }
            Some(Served::Acknowledged) => {
                let _ = reply.send(Err(Rejection::Delivered { seq: key.id.seq }));
                Lookup::Handled
            }
            Some(Served::Abandoned) => {
                let _ = reply.send(Err(Rejection::NotReady {
                    task: key.id.to,
                    epoch: key.id.epoch,
                }));
                Lookup::Handled
            }
            None => {
                self.answers
                    .insert(order(&key), (key, Served::Waiting(vec![reply])));
                Lookup::New
            }
        }
    }

    /// The requester of `key` received its answer: drops the answer's bytes (a late duplicate
    /// is refused as delivered). Only an answer given counts; anything else is left as it is.
    pub(crate) fn acknowledge(&mut self, key: &ServeKey) {
        if let Some((_, entry)) = self.answers.get_mut(&order(key)) {
            if matches!(entry, Served::Done(Ok(_))) {
                self.kept_bytes -= kept_len(entry);
                *entry = Served::Acknowledged;
            }
        }
    }

    /// Forgets the answers to the requester of `key` below `delivered_below`.
    fn forget_delivered(&mut self, key: &ServeKey, delivered_below: u64) {
        let floor = self
            .floors
            .entry((key.id.from, key.requester_term))
            .or_default();
        if delivered_below <= *floor {
            return;
        }
        let (task, term, epoch, to, _) = order(key);
        let from = (task, term, epoch, to, *floor);
        let to = (task, term, epoch, to, delivered_below);
        *floor = delivered_below;
        while let Some(k) = self.answers.range(from..to).next().map(|(k, _)| *k) {
            if let Some((_, served)) = self.answers.remove(&k) {
                self.kept_bytes -= kept_len(&served);
            }
        }
    }

    /// Payload bytes of the answers kept for retries.
    pub(crate) fn kept_bytes(&self) -> usize {
        self.kept_bytes
    }

    /// The request `key` cannot be answered by this node: its waiting calls get `rejection`.
    pub(crate) fn abandon(&mut self, key: ServeKey, rejection: Rejection) {
        let entry = self
            .answers
            .entry(order(&key))
            .or_insert((key, Served::Abandoned));
        let old = std::mem::replace(&mut entry.1, Served::Abandoned);
        self.kept_bytes -= kept_len(&old);
        if let Served::Waiting(replies) = old {
            for r in replies {
                let _ = r.send(Err(rejection.clone()));
            }
        }
    }

    /// The handler answered `key`: remember the answer, stamped with `term` (the term of the
    /// election this task's primary holds), and send it to every waiting call — but only when
    /// `acting` (the lease is valid now): otherwise the calls are told to retry, and a retry
    /// after the lease is confirmed gets the remembered answer. Returns whether this answered
    /// the request with data (the first answer of a request of the current epoch).
    pub(crate) fn answer(
        &mut self,
        key: ServeKey,
        answer: Answer,
        term: Term,
        acting: bool,
    ) -> bool {
        let Some((_, entry)) = self.answers.get_mut(&order(&key)) else {
            // Of an epoch already left.
            return false;
        };
        let replies = match std::mem::replace(entry, Served::Abandoned) {
            Served::Waiting(replies) => replies,
            done => {
                *entry = done;
                return false;
            }
        };
        let result = match answer {
            Answer::Data(payload) => Ok(PullAnswer {
                payload,
                server_term: term,
            }),
            Answer::Refused(r) => Err(r),
            Answer::Abandoned => {
                tracing::warn!(id = %key.id, "the task dropped a data request without answering it");
                for r in replies {
                    let _ = r.send(Err(Rejection::NotReady {
                        task: key.id.to,
                        epoch: key.id.epoch,
                    }));
                }
                return false;
            }
        };
        for r in replies {
            let _ = r.send(if acting {
                result.clone()
            } else {
                Err(Rejection::NotPrimary { task: key.id.to })
            });
        }
        let data = result.is_ok();
        *entry = Served::Done(result);
        self.kept_bytes += kept_len(entry);
        data
    }
}

/// Payload bytes held by a kept answer.
fn kept_len(served: &Served) -> usize {
    match served {
        Served::Done(Ok(answer)) => answer.payload.len(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::PullId;
    use crate::wire::Header;
    use bytes::Bytes;

    fn key(epoch: Epoch, seq: u64) -> ServeKey {
        ServeKey {
            id: PullId {
                epoch,
                from: 1,
                to: 0,
                seq,
            },
            requester_term: 5,
        }
    }

    fn pull(epoch: Epoch) -> PullRequest {
        PullRequest {
            header: Header {
                epoch,
                ..Header::default()
            },
            seq: 0,
            method: "m".into(),
            payload: Bytes::new(),
            delivered_below: 0,
        }
    }

    #[test]
    fn a_retried_pull_gets_the_same_answer_and_the_handler_runs_once() {
        let mut book = ServeBook::default();
        book.enter(3);
        let (tx1, mut rx1) = oneshot::channel();
        assert!(matches!(book.lookup(key(3, 0), 0, tx1), Lookup::New));
        let (tx2, mut rx2) = oneshot::channel();
        assert!(matches!(book.lookup(key(3, 0), 0, tx2), Lookup::Handled));
        book.answer(key(3, 0), Answer::Data(Bytes::from_static(b"x")), 9, true);
        let a1 = rx1.try_recv().ok().and_then(Result::ok);
        let a2 = rx2.try_recv().ok().and_then(Result::ok);
        assert_eq!(a1, a2);
        assert_eq!(a1.map(|a| a.server_term), Some(9));
        let (tx3, mut rx3) = oneshot::channel();
        assert!(matches!(book.lookup(key(3, 0), 0, tx3), Lookup::Handled));
        assert_eq!(rx3.try_recv().ok().and_then(Result::ok), a2);
    }

    #[test]
    fn a_kept_answer_shares_its_bytes_with_every_call_instead_of_copying_them() {
        let mut book = ServeBook::default();
        book.enter(3);
        let payload = Bytes::from(vec![7u8; 8 << 20]);
        let (tx1, mut rx1) = oneshot::channel();
        assert!(matches!(book.lookup(key(3, 0), 0, tx1), Lookup::New));
        book.answer(key(3, 0), Answer::Data(payload.clone()), 9, true);
        let (tx2, mut rx2) = oneshot::channel();
        assert!(matches!(book.lookup(key(3, 0), 0, tx2), Lookup::Handled));
        for rx in [&mut rx1, &mut rx2] {
            let answer = rx.try_recv().ok().and_then(Result::ok);
            let sent = answer.map(|a| a.payload).unwrap_or_default();
            // The same memory as the task's reply: the book and the wire hold one copy.
            assert_eq!(sent.as_ptr(), payload.as_ptr());
            assert_eq!(sent.len(), payload.len());
        }
    }

    /// Serves `seq` (acknowledging `below`) with an answer of `len` bytes.
    fn serve(book: &mut ServeBook, seq: u64, below: u64, len: usize) {
        let (tx, _rx) = oneshot::channel();
        assert!(matches!(book.lookup(key(3, seq), below, tx), Lookup::New));
        book.answer(key(3, seq), Answer::Data(vec![0u8; len].into()), 9, true);
    }

    #[test]
    fn answers_the_requester_acknowledged_are_forgotten_and_their_duplicates_refused() {
        let mut book = ServeBook::default();
        book.enter(3);
        serve(&mut book, 0, 0, 100);
        serve(&mut book, 1, 0, 100);
        serve(&mut book, 2, 1, 100);
        // Pull 0 is acknowledged by pull 2: two answers are kept.
        assert_eq!(book.kept_bytes(), 200);
        // Pull 1 is still kept: its retry gets the same answer.
        let (tx, mut rx) = oneshot::channel();
        assert!(matches!(book.lookup(key(3, 1), 1, tx), Lookup::Handled));
        assert_eq!(
            rx.try_recv()
                .ok()
                .and_then(Result::ok)
                .map(|a| a.payload.len()),
            Some(100)
        );
        // A late duplicate of pull 0 does not run the handler again.
        let (tx, mut rx) = oneshot::channel();
        assert!(matches!(book.lookup(key(3, 0), 1, tx), Lookup::Handled));
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(Rejection::Delivered { seq: 0 }))
        ));
        // An acknowledgement never goes back, and covers only its own requester and term.
        serve(&mut book, 3, 3, 100);
        assert_eq!(book.kept_bytes(), 100);
        let other_term = ServeKey {
            requester_term: 6,
            ..key(3, 0)
        };
        let (tx, _rx) = oneshot::channel();
        assert!(matches!(book.lookup(other_term, 0, tx), Lookup::New));
        let (tx, mut rx) = oneshot::channel();
        assert!(matches!(book.lookup(key(3, 3), 0, tx), Lookup::Handled));
        assert!(rx.try_recv().ok().and_then(Result::ok).is_some());
        // A new epoch starts from nothing.
        book.enter(4);
        assert_eq!(book.kept_bytes(), 0);
    }

    #[test]
    fn an_answer_its_requester_received_drops_its_bytes_and_a_late_duplicate_is_refused() {
        let mut book = ServeBook::default();
        book.enter(3);
        serve(&mut book, 0, 0, 100);
        serve(&mut book, 1, 0, 100);
        book.acknowledge(&key(3, 1));
        assert_eq!(
            book.kept_bytes(),
            100,
            "pull 1's bytes are dropped, pull 0's kept"
        );
        let (tx, mut rx) = oneshot::channel();
        assert!(matches!(book.lookup(key(3, 1), 0, tx), Lookup::Handled));
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(Rejection::Delivered { seq: 1 }))
        ));
        // Twice, or for a pull never answered or never seen: nothing changes.
        book.acknowledge(&key(3, 1));
        let (tx, _rx) = oneshot::channel();
        assert!(matches!(book.lookup(key(3, 2), 0, tx), Lookup::New));
        book.acknowledge(&key(3, 2));
        book.acknowledge(&key(3, 9));
        book.answer(key(3, 2), Answer::Data(vec![0u8; 50].into()), 9, true);
        assert_eq!(book.kept_bytes(), 150);
        // The next pull's floor passes the acknowledged answer: it goes with the others.
        serve(&mut book, 3, 3, 10);
        assert_eq!(book.kept_bytes(), 10);
    }

    #[test]
    fn an_answer_given_while_the_lease_is_suspended_is_kept_with_its_term_and_not_sent() {
        let mut book = ServeBook::default();
        book.enter(3);
        let (tx1, mut rx1) = oneshot::channel();
        assert!(matches!(book.lookup(key(3, 0), 0, tx1), Lookup::New));
        book.answer(key(3, 0), Answer::Data(Bytes::from_static(b"x")), 9, false);
        assert!(matches!(
            rx1.try_recv(),
            Ok(Err(Rejection::NotPrimary { task: 0 }))
        ));
        // Once the lease is confirmed, the retry gets the answer, stamped with the real term.
        let (tx2, mut rx2) = oneshot::channel();
        assert!(matches!(book.lookup(key(3, 0), 0, tx2), Lookup::Handled));
        let a = rx2.try_recv().ok().and_then(Result::ok);
        assert_eq!(a.map(|a| a.server_term), Some(9));
    }

    #[test]
    fn an_abandoned_request_tells_its_calls_to_retry() {
        let mut book = ServeBook::default();
        book.enter(3);
        let (tx, mut rx) = oneshot::channel();
        assert!(matches!(book.lookup(key(3, 0), 0, tx), Lookup::New));
        book.abandon(key(3, 0), Rejection::NotPrimary { task: 0 });
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(Rejection::NotPrimary { task: 0 }))
        ));
    }

    #[test]
    fn entering_an_epoch_refuses_waiting_calls_and_releases_early_requests() {
        let mut book = ServeBook::default();
        book.enter(3);
        let (tx, mut rx) = oneshot::channel();
        book.lookup(key(3, 0), 0, tx);
        let (early, _r) = oneshot::channel();
        assert!(book.hold_pull(pull(4), early).is_ok());
        let (later, _r2) = oneshot::channel();
        assert!(book.hold_pull(pull(5), later).is_ok());
        let (now, _) = book.enter(4);
        assert_eq!(now.len(), 1);
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(Rejection::EpochMoved {
                request_epoch: 3,
                current_epoch: 4
            }))
        ));
        let (now, _) = book.enter(5);
        assert_eq!(now.len(), 1);
    }

    #[test]
    fn metas_are_first_once_per_epoch() {
        let mut book = ServeBook::default();
        book.enter(1);
        assert!(book.first_meta(2, "children", "done"));
        assert!(!book.first_meta(2, "children", "done"));
        book.enter(2);
        assert!(book.first_meta(2, "children", "done"));
    }
}
