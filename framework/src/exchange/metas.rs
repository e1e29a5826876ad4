//! Metas on their way to neighbours: one sender per neighbour and epoch, which delivers every
//! meta flagged towards that neighbour to its current primary, and again to each new primary
//! of the neighbour (the receiver filters repeats). No etcd writes: metas travel node to node.

use std::sync::Arc;

use tokio::sync::watch;

use super::{
    end_dead_primary, lease_confirmed, pause, primary_changed, primary_of, verdict, SlotEnv,
    Verdict,
};
use crate::wire::{Header, Meta};
use crate::{Epoch, TaskId, Term};

/// Delivers the metas in `outbox` (all flagged towards `to` in `epoch`, in order) until the
/// epoch ends (the sender is aborted then).
pub(crate) async fn send_metas(
    env: Arc<SlotEnv>,
    epoch: Epoch,
    term: Term,
    to: TaskId,
    mut outbox: watch::Receiver<Vec<(String, String)>>,
) {
    let mut view = env.view.clone();
    // (receiver's term, number of metas it acknowledged)
    let mut acked: Option<(Term, usize)> = None;
    let mut delays = crate::retry::PEER.delays();
    loop {
        lease_confirmed(&env).await;
        let target = primary_of(&view.borrow_and_update(), to);
        let metas = outbox.borrow_and_update().clone();
        let Some((addr, their_term, lease)) = target else {
            // No primary: wait for one, ending the leases of dead backups meanwhile.
            if !super::liveness::await_primary(&env, &mut view, to).await {
                return;
            }
            continue;
        };
        let mut done = match acked {
            Some((t, n)) if t == their_term => n,
            _ => 0,
        };
        if done >= metas.len() {
            // Everything is with the current primary: wait for a new meta or a new primary.
            tokio::select! {
                r = outbox.changed() => if r.is_err() { return },
                () = primary_changed(&mut view, to, their_term) => {}
            }
            continue;
        }
        let mut failure = None;
        for (link, meta) in &metas[done..] {
            let msg = Meta {
                header: Header {
                    job: String::new(),
                    epoch,
                    from_task: env.task,
                    to_task: to,
                    term,
                },
                link: link.clone(),
                meta: meta.clone(),
            };
            let sent = tokio::select! {
                r = env.peers.meta(&addr, msg) => r,
                () = primary_changed(&mut view, to, their_term) => break,
            };
            match sent {
                Ok(()) => {
                    env.metrics.meta_sent(env.task);
                    done += 1;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        acked = Some((their_term, done));
        let Some(err) = failure else {
            delays = crate::retry::PEER.delays();
            continue;
        };
        let delay = delays
            .next()
            .unwrap_or(std::time::Duration::from_millis(500));
        match verdict(err) {
            Verdict::Retry => pause(&mut view, to, their_term, delay).await,
            Verdict::Dead => {
                end_dead_primary(&env, to, their_term, lease).await;
                pause(&mut view, to, their_term, delay).await;
            }
            Verdict::Suspect => {
                super::liveness::check_primary(&env, to, their_term).await;
                pause(&mut view, to, their_term, delay).await;
            }
            Verdict::Stop => return,
            Verdict::Fail(reason) => {
                tracing::error!(
                    to,
                    epoch,
                    reason,
                    "a neighbour refuses this task's metas for good"
                );
                return;
            }
        }
    }
}
