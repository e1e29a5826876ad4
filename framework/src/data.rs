//! What tasks exchange: pulls ([`DataRequest`] on the serving side, [`DataReply`] on the
//! requesting side), checkpoints, and the typed (serde + postcard) encoding of payloads.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::wire::Rejection;
use crate::{Epoch, TaskId, Term};

/// Identifies a pull across retries: the requester's epoch, the requesting task, the target
/// task, and a sequence number unique within the epoch on the requesting primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PullId {
    /// The epoch the request belongs to.
    pub epoch: Epoch,
    /// The requesting task.
    pub from: TaskId,
    /// The task asked for data.
    pub to: TaskId,
    /// Sequence number within the epoch.
    pub seq: u64,
}

impl std::fmt::Display for PullId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pull {}→{} #{} (epoch {})",
            self.from, self.to, self.seq, self.epoch
        )
    }
}

/// Encoding or decoding a typed payload failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payload codec: {0}")]
pub struct CodecError(pub String);

/// Encodes a value as a payload (postcard: compact, deterministic).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, CodecError> {
    postcard::to_stdvec(value)
        .map(Bytes::from)
        .map_err(|e| CodecError(e.to_string()))
}

/// Decodes a payload written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    postcard::from_bytes(bytes).map_err(|e| CodecError(e.to_string()))
}

/// Why a pull produced no data. Delivered in [`DataReply`] (at most once per request, like an
/// answer) or returned by [`Context::request`](crate::Context::request).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PullError {
    /// The serving task refused the request for good (unknown method, a payload over the frame
    /// limit, a request the server could not decode…). Retrying would not help.
    #[error("task {task} refused the request: {reason}")]
    Refused {
        /// The task asked.
        task: TaskId,
        /// The server's reason.
        reason: String,
    },
    /// The answer's payload could not be decoded as the requested type.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The requester left the request's epoch before the answer arrived (only from
    /// [`Context::request`](crate::Context::request); [`DataReply`]s of an old epoch are never
    /// delivered).
    #[error("the epoch moved on before the answer to {0} arrived")]
    EpochMoved(PullId),
    /// The requesting node is not (or no longer) the task's primary.
    #[error("task {task} is not primary on this node")]
    NotPrimary {
        /// The requesting task.
        task: TaskId,
    },
}

/// The answer to a [`Context::data_request`](crate::Context::data_request), delivered exactly
/// once to [`Task::data_ready`](crate::Task::data_ready) while the requester is still in the
/// request's epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataReply {
    pub(crate) id: PullId,
    pub(crate) method: String,
    pub(crate) server_term: Term,
    pub(crate) result: Result<Bytes, PullError>,
}

impl DataReply {
    /// The request's id.
    pub fn id(&self) -> PullId {
        self.id
    }
    /// The task that answered: the request's target (`id().to`; `id().from` is this task,
    /// the requester).
    pub fn server(&self) -> TaskId {
        self.id.to
    }
    /// The task that answered. Renamed [`server`](DataReply::server): `from()` read as the
    /// requester, which `id().from` is.
    #[deprecated(
        note = "use `DataReply::server()`: the answering task (`id().from` is the requester)"
    )]
    #[allow(clippy::misnamed_getters)]
    pub fn from(&self) -> TaskId {
        self.id.to
    }
    /// The request's epoch (always the requester's current epoch at delivery).
    pub fn epoch(&self) -> Epoch {
        self.id.epoch
    }
    /// The method that was called.
    pub fn method(&self) -> &str {
        &self.method
    }
    /// The term of the primary that answered (0 when the request was refused).
    pub fn server_term(&self) -> Term {
        self.server_term
    }
    /// The answer's bytes, or why there is none.
    pub fn result(&self) -> Result<&Bytes, &PullError> {
        self.result.as_ref()
    }
    /// The answer decoded as `T` (written by [`DataRequest::reply_with`]).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, PullError> {
        let bytes = self.result.as_ref().map_err(Clone::clone)?;
        Ok(decode(bytes)?)
    }
    /// The answer's bytes, or why there is none.
    pub fn into_result(self) -> Result<Bytes, PullError> {
        self.result
    }
}

/// A pull this task must answer, given to [`Task::serve_data`](crate::Task::serve_data).
///
/// Answer it with [`reply`](DataRequest::reply) or [`reply_with`](DataRequest::reply_with),
/// at once or later: the task may keep the request (for instance until it has the data the
/// method asks for) and answer from another handler. The framework answers every retry of the
/// same request with the same reply, and refuses requests of other epochs itself, so a request
/// kept past the end of its epoch is simply dropped. Dropping a request without answering it
/// leaves the requester waiting until its epoch ends (logged as a warning).
#[derive(Debug)]
pub struct DataRequest {
    pub(crate) id: PullId,
    pub(crate) method: String,
    pub(crate) input: Bytes,
    pub(crate) responder: Option<Responder>,
}

/// Where a [`DataRequest`]'s answer goes: back to the serving node's event loop, by a
/// callback the loop builds (so this public-API module knows nothing of the loop's inbox).
pub(crate) struct Responder(pub(crate) Box<dyn FnOnce(Answer) + Send>);

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Responder")
    }
}

/// The serving side's identity of a request: the pull id and the requester's term (a new
/// primary of the requesting task starts its sequence numbers afresh, so its requests must not
/// be confused with its predecessor's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ServeKey {
    pub(crate) id: PullId,
    pub(crate) requester_term: Term,
}

/// How the serving task answered.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    Data(Bytes),
    Refused(Rejection),
    /// Dropped without an answer.
    Abandoned,
}

impl DataRequest {
    /// The request's id.
    pub fn id(&self) -> PullId {
        self.id
    }
    /// The requesting task.
    pub fn from(&self) -> TaskId {
        self.id.from
    }
    /// The request's epoch (always this task's current epoch when it is handed over).
    pub fn epoch(&self) -> Epoch {
        self.id.epoch
    }
    /// The method asked for (application-defined).
    pub fn method(&self) -> &str {
        &self.method
    }
    /// The request's argument bytes.
    pub fn input(&self) -> &Bytes {
        &self.input
    }
    /// The argument decoded as `T` (written by the typed request helpers).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        decode(&self.input)
    }
    /// Answers with `data`.
    pub fn reply(mut self, data: impl Into<Bytes>) {
        self.send(Answer::Data(data.into()));
    }
    /// Answers with `value`, encoded with [`encode`]. If it cannot be encoded, the request is
    /// refused (the requester gets [`PullError::Refused`]) and the error is returned.
    pub fn reply_with<T: Serialize + ?Sized>(mut self, value: &T) -> Result<(), CodecError> {
        match encode(value) {
            Ok(bytes) => {
                self.send(Answer::Data(bytes));
                Ok(())
            }
            Err(e) => {
                self.send(Answer::Refused(Rejection::Malformed {
                    reason: format!("the server could not encode its answer: {e}"),
                }));
                Err(e)
            }
        }
    }
    /// Refuses the request because this task has no such method (the requester gets
    /// [`PullError::Refused`]).
    pub fn unknown_method(mut self) {
        let method = self.method.clone();
        self.send(Answer::Refused(Rejection::UnknownMethod { method }));
    }

    fn send(&mut self, answer: Answer) {
        if let Some(Responder(deliver)) = self.responder.take() {
            deliver(answer);
        }
    }
}

impl Drop for DataRequest {
    fn drop(&mut self) {
        if self.responder.is_some() {
            self.send(Answer::Abandoned);
        }
    }
}

/// A task's last checkpoint, given back to a task value built afresh by
/// [`Task::restore`](crate::Task::restore).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The epoch the primary was in when it wrote the checkpoint.
    pub epoch: Epoch,
    /// The bytes given to [`Context::checkpoint`](crate::Context::checkpoint).
    pub data: Bytes,
}

impl Checkpoint {
    /// The data decoded as `T` (written by [`Context::checkpoint_with`](crate::Context::checkpoint_with)).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        decode(&self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(deprecated)]
    fn a_reply_names_its_server_and_the_old_name_agrees() {
        let reply = DataReply {
            id: PullId {
                epoch: 3,
                from: 1,
                to: 4,
                seq: 0,
            },
            method: "m".into(),
            server_term: 9,
            result: Ok(Bytes::new()),
        };
        // The answering task is the request's target; the requester is `id().from`.
        assert_eq!(reply.server(), 4);
        assert_eq!(reply.id().from, 1);
        assert_eq!(reply.from(), reply.server());
    }
}
