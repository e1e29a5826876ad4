//! The calling side of a lane: the pulls (and metas and replication entries) from this node to
//! one other node, many in flight on one long-lived gRPC stream (`rpc Lane`) instead of one
//! HTTP/2 stream each.
//!
//! The server names its frame limit when the stream opens (metadata
//! [`LANE_LIMIT_METADATA_KEY`]); a request the server would not decode goes as a unary call,
//! where it is refused alone, instead of breaking the lane for every call on it. So does a meta
//! or a replication entry to a server whose lanes do not carry that kind (an older version: it
//! does not name it in [`LANE_CARRIES_METADATA_KEY`]). A call is
//! registered under a call number, sent, and answered when the server's answer naming that
//! call arrives, in any order. A caller that gives up (its future is dropped)
//! sends a cancel, so the server stops handling the pull, as it does when a unary call is
//! dropped. When the stream ends or breaks, every call still waiting gets its status (each
//! caller classifies it as a failed unary call's) and the next pull opens a new lane: the
//! caller retries as after any failed call, and the server's kept answers make the retry
//! exactly-once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::error::CallError;
use super::proto;
use super::proto::taskgraph_client::TaskgraphClient;
use super::rejection::Rejection;

/// What became of one call on a lane.
#[derive(Debug, Clone)]
pub(super) enum Outcome {
    /// The server's answer to a pull.
    Answer(proto::PullAnswer),
    /// The server took a meta or a replication entry.
    Acked,
    /// The server refused the pull.
    Rejected(Rejection),
    /// The server sent the call back to go as a unary call: a pull whose answer is larger than
    /// the lane takes (the server kept it), or a meta or an entry that found the lane at its
    /// bound.
    LargeAnswer,
    /// Send it as a unary call: the request is larger than the server decodes on the lane, or
    /// of a kind its lanes do not carry.
    Unary,
    /// The lane ended or broke before the answer came (the stream's status).
    Broken(Status),
    /// The answer could not be read.
    Failed(CallError),
    /// The peer does not serve lanes (an older version): use unary calls.
    Unsupported,
}

/// Response metadata of the `Lane` call: the largest encoded message the server decodes
/// (its frame limit), in decimal.
pub(super) const LANE_LIMIT_METADATA_KEY: &str = "taskgraph-lane-limit";

/// Response metadata of the `Lane` call: the kinds of call the lane carries besides pulls,
/// comma-separated (`meta`, `replicate`). Without it, pulls only.
pub(super) const LANE_CARRIES_METADATA_KEY: &str = "taskgraph-lane-carries";

/// What this version's lanes carry besides pulls (the value of [`LANE_CARRIES_METADATA_KEY`]).
pub(super) const LANE_CARRIES: &str = "meta,replicate";

/// The kinds of call besides pulls that a lane's server takes on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Carries {
    metas: bool,
    replicas: bool,
}

impl Carries {
    /// What the server named in [`LANE_CARRIES_METADATA_KEY`] (unknown kinds are ignored).
    fn parse(value: &str) -> Carries {
        let mut carries = Carries::default();
        for kind in value.split(',') {
            match kind.trim() {
                "meta" => carries.metas = true,
                "replicate" => carries.replicas = true,
                _ => {}
            }
        }
        carries
    }

    fn takes(self, call: &proto::lane_pull::What) -> bool {
        use proto::lane_pull::What;
        match call {
            What::Meta(_) => self.metas,
            What::Replicate(_) => self.replicas,
            What::Request(_) | What::Cancel(_) => true,
        }
    }
}

/// One lane to one peer address.
#[derive(Debug)]
pub(super) struct Lane {
    requests: mpsc::UnboundedSender<proto::LanePull>,
    calls: Arc<Mutex<Calls>>,
    state: watch::Receiver<State>,
}

/// How far the lane's stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Being set up: calls wait.
    Opening,
    /// Open: the server decodes messages up to `limit` bytes.
    Open {
        /// The server's frame limit.
        limit: usize,
        /// What the server takes on the lane besides pulls.
        carries: Carries,
    },
    /// Ended (or never opened): the next pull opens a new lane.
    Ended,
    /// The server does not serve lanes.
    Unsupported,
}

#[derive(Debug, Default)]
struct Calls {
    next: u64,
    waiting: HashMap<u64, oneshot::Sender<Outcome>>,
    /// The stream ended: no call is registered any more (the next pull opens a new lane).
    ended: bool,
}

fn lock(calls: &Mutex<Calls>) -> std::sync::MutexGuard<'_, Calls> {
    // The map stays consistent even if a holder panicked.
    calls.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Lane {
    /// Opens a lane to `addr` on `client`'s connection; the stream is set up in the
    /// background (pulls sent meanwhile are queued).
    pub(super) fn open(client: TaskgraphClient<Channel>, addr: &str) -> Arc<Lane> {
        let (requests, rx) = mpsc::unbounded_channel();
        let calls = Arc::new(Mutex::new(Calls::default()));
        let (state_tx, state) = watch::channel(State::Opening);
        tokio::spawn(read_answers(
            client,
            rx,
            calls.clone(),
            state_tx,
            addr.to_owned(),
        ));
        Arc::new(Lane {
            requests,
            calls,
            state,
        })
    }

    /// Whether the lane's stream ended (a new one is needed).
    pub(super) fn ended(&self) -> bool {
        *self.state.borrow() == State::Ended || self.requests.is_closed()
    }

    /// Sends `request` (a pull, a meta or a replication entry, of encoded size `size`) and
    /// waits for its outcome; `None` when the lane had ended before the call was registered
    /// (nothing was sent: open a new one). A call registered while the lane opens shares the
    /// open's fate: a lane that fails to open fails its calls with the status, as a unary call
    /// would fail.
    pub(super) async fn call(
        self: &Arc<Self>,
        request: proto::lane_pull::What,
        size: usize,
        answer_limit: usize,
    ) -> Option<Outcome> {
        let (tx, rx) = oneshot::channel();
        let call = {
            let mut calls = lock(&self.calls);
            if calls.ended {
                return None;
            }
            let call = calls.next;
            calls.next += 1;
            calls.waiting.insert(call, tx);
            call
        };
        let mut pending = Pending {
            lane: self,
            call,
            done: false,
        };
        let mut state = self.state.clone();
        let open = state
            .wait_for(|s| *s != State::Opening)
            .await
            .map_or(State::Ended, |s| *s);
        match open {
            // The server would not decode it on the lane, or takes no such call there: alone,
            // as a unary call.
            State::Open { limit, carries }
                if size.saturating_add(super::LANE_OVERHEAD) > limit
                    || !carries.takes(&request) =>
            {
                lock(&self.calls).waiting.remove(&call);
                pending.done = true;
                return Some(Outcome::Unary);
            }
            State::Open { .. } => {
                // A closed channel means the reader is gone or going: it fails the calls
                // registered.
                let _ = self.requests.send(proto::LanePull {
                    call,
                    what: Some(request),
                    answer_limit: u64::try_from(answer_limit).unwrap_or(u64::MAX),
                });
            }
            // Ended (or unsupported): the reader fails every call registered, this one too.
            State::Opening | State::Ended | State::Unsupported => {}
        }
        let outcome = rx.await.unwrap_or_else(|_| {
            Outcome::Failed(CallError::Protocol {
                reason: "a lane dropped a call without an outcome".into(),
            })
        });
        pending.done = true;
        Some(outcome)
    }
}

/// A call in flight: dropped before its outcome, it is forgotten and cancelled at the server.
struct Pending<'a> {
    lane: &'a Arc<Lane>,
    call: u64,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let waiting = lock(&self.lane.calls).waiting.remove(&self.call).is_some();
        if waiting {
            let _ = self.lane.requests.send(proto::LanePull {
                call: self.call,
                what: Some(proto::lane_pull::What::Cancel(proto::LaneCancel {})),
                answer_limit: 0,
            });
        }
    }
}

/// Opens the stream and hands each answer to its call until the stream ends; then fails the
/// calls still waiting.
async fn read_answers(
    mut client: TaskgraphClient<Channel>,
    mut rx: mpsc::UnboundedReceiver<proto::LanePull>,
    calls: Arc<Mutex<Calls>>,
    state: watch::Sender<State>,
    addr: String,
) {
    // Dropped before the end (the runtime shuts down), it still ends the lane: no call waits
    // for ever.
    let _end = EndOnDrop {
        calls: calls.clone(),
        state: state.clone(),
    };
    let requests = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let end = match client.lane(requests).await {
        Ok(response) => {
            // Without the server's limit, nothing goes on the lane.
            let limit = response
                .metadata()
                .get(LANE_LIMIT_METADATA_KEY)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            let carries = response
                .metadata()
                .get(LANE_CARRIES_METADATA_KEY)
                .and_then(|v| v.to_str().ok())
                .map_or_else(Carries::default, Carries::parse);
            state.send_replace(State::Open { limit, carries });
            let mut answers = response.into_inner();
            loop {
                match answers.message().await {
                    Ok(Some(answer)) => deliver(&calls, answer),
                    Ok(None) => break None,
                    Err(status) => break Some(status),
                }
            }
        }
        Err(status) => Some(status),
    };
    let unsupported = end
        .as_ref()
        .is_some_and(|s| s.code() == Code::Unimplemented && is_remote(s));
    let waiting = {
        let mut calls = lock(&calls);
        calls.ended = true;
        state.send_replace(if unsupported {
            State::Unsupported
        } else {
            State::Ended
        });
        std::mem::take(&mut calls.waiting)
    };
    let outcome = match end {
        _ if unsupported => Outcome::Unsupported,
        Some(status) => {
            tracing::debug!(%addr, %status, calls = waiting.len(), "wire: a lane ended");
            Outcome::Broken(status)
        }
        None => Outcome::Broken(Status::unavailable("the lane's stream ended")),
    };
    for (_, call) in waiting {
        let _ = call.send(outcome.clone());
    }
}

/// Ends the lane if its reader is dropped before it could: the waiting calls' senders go,
/// so they fail instead of waiting for ever.
struct EndOnDrop {
    calls: Arc<Mutex<Calls>>,
    state: watch::Sender<State>,
}

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        let mut calls = lock(&self.calls);
        if !calls.ended {
            calls.ended = true;
            calls.waiting.clear();
            self.state.send_replace(State::Ended);
        }
    }
}

/// A status the server sent (a status produced in this process carries a source).
pub(super) fn is_remote(status: &Status) -> bool {
    std::error::Error::source(status).is_none()
}

fn deliver(calls: &Mutex<Calls>, answer: proto::LaneAnswer) {
    use proto::lane_answer::Outcome as Wire;
    let Some(waiter) = lock(calls).waiting.remove(&answer.call) else {
        // Its caller gave up.
        return;
    };
    let outcome = match answer.outcome {
        Some(Wire::Answer(answer)) => Outcome::Answer(answer),
        Some(Wire::Rejection(rejection)) => match Rejection::try_from(rejection) {
            Ok(rejection) => Outcome::Rejected(rejection),
            Err(e) => Outcome::Failed(CallError::Protocol {
                reason: format!("a lane answer with an unreadable rejection: {e}"),
            }),
        },
        Some(Wire::Unary(_)) => Outcome::LargeAnswer,
        Some(Wire::Ack(_)) => Outcome::Acked,
        None => Outcome::Failed(CallError::Protocol {
            reason: "a lane answer without an outcome".into(),
        }),
    };
    let _ = waiter.send(outcome);
}
