//! The requesting side of a pull: one background fetcher per request, retrying with backoff
//! across connection errors, restarts and failovers of the serving task (re-resolving its
//! primary from the watched view), until the answer is delivered or the epoch ends.

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use super::{
    end_dead_primary, lease_confirmed, lock, pause, primary_changed, primary_of, verdict,
    EpochBook, SlotEnv, Verdict,
};
use crate::data::{DataReply, PullError, PullId};
use crate::inbox::LoopRequest;
use crate::wire::{Header, PullRequest};
use crate::Term;

/// Fetches the answer to `id` and hands it over (see [`deliver`]). Runs in the slot's
/// [`EpochBook`]: aborted when the requester leaves the epoch.
pub(crate) async fn fetch(
    env: Arc<SlotEnv>,
    book: Weak<Mutex<EpochBook>>,
    id: PullId,
    term: Term,
    method: String,
    input: Bytes,
) {
    let mut view = env.view.clone();
    let mut delays = crate::retry::PEER.delays();
    let mut attempts = 0u64;
    loop {
        let target = primary_of(&view.borrow_and_update(), id.to);
        let Some((addr, their_term, lease)) = target else {
            // No primary right now: wait for one, meanwhile ending the leases of dead backups
            // (they would keep a spare from taking the task over until their TTL).
            if !Box::pin(super::liveness::await_primary(&env, &mut view, id.to)).await {
                return;
            }
            continue;
        };
        // Sent with every attempt, so a retry also carries the latest acknowledgement.
        let delivered_below = book.upgrade().map_or(0, |b| {
            let b = lock(&b);
            if b.epoch == id.epoch {
                b.delivered_below(id.to)
            } else {
                0
            }
        });
        let request = PullRequest {
            header: header(id, term),
            seq: id.seq,
            method: method.clone(),
            payload: input.clone(),
            delivered_below,
        };
        lease_confirmed(&env).await;
        if attempts > 0 {
            env.metrics.pull_retried(id.from);
        }
        attempts += 1;
        let outcome = tokio::select! {
            r = env.peers.pull(&addr, request) => r,
            // The pulled task failed over while its old primary held the call: ask the new one.
            () = primary_changed(&mut view, id.to, their_term) => continue,
        };
        let delay = delays
            .next()
            .unwrap_or(std::time::Duration::from_millis(500));
        match outcome {
            Ok(answer) => {
                // Only the primary this request was sent to, under the term etcd shows for it,
                // may answer (a node claiming another term is either deposed or lying).
                if answer.server_term == their_term {
                    // A large answer is acknowledged before the task sees it, so the server
                    // has dropped its bytes before the task's next pull arrives (its buffer
                    // is then reused instead of fresh memory being faulted in). Safe whatever
                    // becomes of the answer here: it is in this node's memory, and a refetch
                    // (after a failover) goes to another primary.
                    if answer.payload.len() >= ACKNOWLEDGE_FROM {
                        Box::pin(acknowledge(&env, &addr, id, term)).await;
                    }
                    if deliver(&env, &book, id, Ok(answer.payload), answer.server_term).await {
                        return;
                    }
                }
                tracing::debug!(%id, server_term = answer.server_term, "dropped an answer from a deposed primary");
                pause(&mut view, id.to, their_term, delay).await;
            }
            Err(e) => match verdict(e) {
                Verdict::Retry => pause(&mut view, id.to, their_term, delay).await,
                Verdict::Dead => {
                    Box::pin(end_dead_primary(&env, id.to, their_term, lease)).await;
                    pause(&mut view, id.to, their_term, delay).await;
                }
                Verdict::Suspect => {
                    Box::pin(super::liveness::check_primary(&env, id.to, their_term)).await;
                    pause(&mut view, id.to, their_term, delay).await;
                }
                Verdict::Stop => return,
                Verdict::Fail(reason) => {
                    let _ = Box::pin(deliver(
                        &env,
                        &book,
                        id,
                        Err(PullError::Refused {
                            task: id.to,
                            reason,
                        }),
                        0,
                    ))
                    .await;
                    return;
                }
            },
        }
    }
}

/// The header of the calls about pull `id`, sent under the requester's `term` (the job is
/// filled in by the client).
fn header(id: PullId, term: Term) -> Header {
    Header {
        job: String::new(),
        epoch: id.epoch,
        from_task: id.from,
        to_task: id.to,
        term,
    }
}

/// Answers from this size on are acknowledged as soon as they arrive
/// ([`Acknowledge`](crate::wire::Acknowledge)), so the serving node drops their bytes at once
/// instead of at the requester's next pull; smaller ones are not worth a call of their own.
pub(crate) const ACKNOWLEDGE_FROM: usize = 1 << 20;

/// Tells the primary at `addr` that the answer to `id` (asked under `term`) arrived. Once:
/// if it is lost, the server drops the bytes at the requester's next pull or when its epoch
/// ends, as without it.
async fn acknowledge(env: &SlotEnv, addr: &str, id: PullId, term: Term) {
    let msg = crate::wire::Acknowledge {
        header: header(id, term),
        seq: id.seq,
    };
    let sent = tokio::time::timeout(
        crate::exchange::liveness::MONITOR_TIMEOUT,
        env.peers.acknowledge(addr, msg),
    )
    .await;
    if let Ok(Err(e)) = sent {
        tracing::debug!(%id, error = %e, "the acknowledgement of a large answer was not taken");
    }
}

/// Hands an outcome over: to the waiter of [`Context::request`](crate::Context::request)
/// directly, otherwise to the task's `data_ready` — on this task when the event loop is idle
/// (see [`DirectRequests`](crate::inbox::DirectRequests)), else through the loop. Returns
/// `false` when the answer comes from a term lower than one already seen in etcd for the
/// serving task (fencing): it is dropped and the fetcher keeps trying.
pub(crate) async fn deliver(
    env: &SlotEnv,
    book: &Weak<Mutex<EpochBook>>,
    id: PullId,
    result: Result<Bytes, PullError>,
    server_term: Term,
) -> bool {
    if result.is_ok() && server_term < env.fence.seen(id.to) {
        return false;
    }
    let Some(book) = book.upgrade() else {
        return true;
    };
    let waiter = {
        let mut book = lock(&book);
        if book.epoch != id.epoch {
            return true;
        }
        match book.pending().get(&id) {
            None => return true,
            Some(p) if p.waiter.is_some() => book.remove_pending(&id),
            Some(_) => None,
        }
    };
    if let Some(p) = waiter {
        env.metrics
            .pull_delivered(id.from, p.started.elapsed(), result.is_ok());
        if let Some(w) = p.waiter {
            let _ = w.send(DataReply {
                id,
                method: p.method,
                server_term,
                result,
            });
        }
        return true;
    }
    let req = LoopRequest::Pulled {
        slot: env.slot,
        id,
        server_term,
        result,
    };
    let direct = env.direct.upgrade();
    crate::inbox::hand_over(direct.as_deref(), &env.loop_tx, req).await;
    true
}
