//! [`Rejection`]: why a receiver refused a message, and its gRPC encoding.

use prost::Message;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use super::proto;
use super::proto::rejection::Kind;

/// Binary gRPC metadata entry of an error status that carries the protobuf-encoded
/// [`Rejection`] (message `taskgraph.wire.Rejection` of `proto/taskgraph.proto`).
pub const REJECTION_METADATA_KEY: &str = "taskgraph-rejection-bin";

/// Why a receiver refused a message.
///
/// Each variant maps to one gRPC [`Code`] (see [`Rejection::code`]), following tonic's rule:
/// `Unavailable` = retry the same call, `Aborted` = retry at a higher level,
/// `FailedPrecondition` = don't retry. The variant and its fields travel with the status (see
/// [`REJECTION_METADATA_KEY`]), so a client gets back exactly the `Rejection` that the server
/// (or its event loop) produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// This node does not serve `task` as primary: re-resolve the primary and retry.
    /// Code `Unavailable`.
    #[error("this node is not the primary of task {task}")]
    NotPrimary {
        /// The task the message was addressed to.
        task: u32,
    },
    /// The receiver is behind: it has not entered `epoch` for `task` yet. Wait and retry.
    /// Code `Unavailable`.
    #[error("task {task} has not entered epoch {epoch} yet")]
    NotReady {
        /// The task the message was addressed to.
        task: u32,
        /// The epoch of the request.
        epoch: u64,
    },
    /// The request comes from an epoch the receiver has already left: give up.
    /// Code `Aborted`.
    #[error("request is from epoch {request_epoch}, but the receiver is in epoch {current_epoch}")]
    EpochMoved {
        /// The epoch of the request.
        request_epoch: u64,
        /// The receiver's current epoch.
        current_epoch: u64,
    },
    /// The sender claims a term of `task` older than one the receiver has seen: the sender was
    /// deposed. Code `FailedPrecondition`.
    #[error("stale term {term} for task {task}: term {seen} was already seen")]
    StaleTerm {
        /// The task whose term is stale (the sender's task).
        task: u32,
        /// The term the sender claimed.
        term: u64,
        /// The highest term the receiver has seen for `task`.
        seen: u64,
    },
    /// The message is for another job. Code `FailedPrecondition`.
    #[error("wrong job: this node serves job {expected:?}, the message is for job {got:?}")]
    WrongJob {
        /// The job the receiver serves.
        expected: String,
        /// The job named by the message.
        got: String,
    },
    /// A task id is out of range. Code `InvalidArgument`.
    #[error("unknown task {task}: the job has {num_tasks} tasks")]
    UnknownTask {
        /// The offending task id.
        task: u32,
        /// Number of tasks of the job (valid ids are `0..num_tasks`).
        num_tasks: u32,
    },
    /// The pull names a method the receiving task does not have. Code `Unimplemented`.
    #[error("unknown method {method:?}")]
    UnknownMethod {
        /// The method named by the pull.
        method: String,
    },
    /// The message (or its answer) exceeds the frame limit. Code `ResourceExhausted`.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Encoded size of the message, in bytes (0 when unknown).
        size: usize,
        /// The limit, in bytes (0 when unknown).
        limit: usize,
    },
    /// The message could not be decoded or lacks a required field. Code `InvalidArgument`.
    #[error("malformed message: {reason}")]
    Malformed {
        /// What is wrong with it.
        reason: String,
    },
    /// The receiver is shutting down (or its event loop dropped the message). Code `Unavailable`.
    #[error("the receiving node is shutting down")]
    ShuttingDown,
    /// The pull `seq` was already delivered to its requester (by its own acknowledgement), and
    /// its answer forgotten: a late duplicate, given up. Code `Aborted`.
    #[error("pull {seq} was already delivered")]
    Delivered {
        /// The pull's sequence number.
        seq: u64,
    },
}

impl Rejection {
    /// The gRPC status code this rejection travels with.
    pub fn code(&self) -> Code {
        match self {
            Rejection::NotPrimary { .. } | Rejection::NotReady { .. } | Rejection::ShuttingDown => {
                Code::Unavailable
            }
            Rejection::EpochMoved { .. } | Rejection::Delivered { .. } => Code::Aborted,
            Rejection::StaleTerm { .. } | Rejection::WrongJob { .. } => Code::FailedPrecondition,
            Rejection::UnknownTask { .. } | Rejection::Malformed { .. } => Code::InvalidArgument,
            Rejection::UnknownMethod { .. } => Code::Unimplemented,
            Rejection::TooLarge { .. } => Code::ResourceExhausted,
        }
    }

    /// Whether the same call may succeed later (possibly after re-resolving the primary):
    /// true exactly for the `Unavailable` variants (`NotPrimary`, `NotReady`, `ShuttingDown`).
    pub fn retryable(&self) -> bool {
        self.code() == Code::Unavailable
    }

    /// Recovers the rejection carried by `status`, if it carries one (see
    /// [`REJECTION_METADATA_KEY`]). Statuses not produced from a `Rejection` give `None`.
    pub fn from_status(status: &Status) -> Option<Rejection> {
        let bytes = status
            .metadata()
            .get_bin(REJECTION_METADATA_KEY)?
            .to_bytes()
            .ok()?;
        let decoded = proto::Rejection::decode(bytes).ok()?;
        Rejection::try_from(decoded).ok()
    }
}

/// Longest string field (job, method, reason) a rejection carries on the wire; longer ones
/// are truncated, as they travel in HTTP/2 headers (peers echo client-chosen strings). A
/// lane's rejections are cut the same way.
pub const MAX_REJECTION_TEXT: usize = 1024;

impl From<Rejection> for Status {
    /// The status carries the rejection's code, its `Display` text as message, and the encoded
    /// rejection as metadata. String fields are cut to [`MAX_REJECTION_TEXT`] bytes.
    fn from(rejection: Rejection) -> Status {
        let rejection = rejection.truncated();
        let code = rejection.code();
        let message = rejection.to_string();
        let encoded = proto::Rejection::from(rejection).encode_to_vec();
        let mut metadata = MetadataMap::new();
        metadata.insert_bin(REJECTION_METADATA_KEY, MetadataValue::from_bytes(&encoded));
        Status::with_metadata(code, message, metadata)
    }
}

impl Rejection {
    /// The rejection with its string fields cut to [`MAX_REJECTION_TEXT`] bytes.
    pub(super) fn truncated(self) -> Rejection {
        match self {
            Rejection::WrongJob { expected, got } => Rejection::WrongJob {
                expected: truncate(expected),
                got: truncate(got),
            },
            Rejection::UnknownMethod { method } => Rejection::UnknownMethod {
                method: truncate(method),
            },
            Rejection::Malformed { reason } => Rejection::Malformed {
                reason: truncate(reason),
            },
            other => other,
        }
    }
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_REJECTION_TEXT {
        let mut end = MAX_REJECTION_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl From<Rejection> for proto::Rejection {
    fn from(rejection: Rejection) -> Self {
        use proto::rejection as r;
        let kind = match rejection {
            Rejection::NotPrimary { task } => Kind::NotPrimary(r::NotPrimary { task }),
            Rejection::NotReady { task, epoch } => Kind::NotReady(r::NotReady { task, epoch }),
            Rejection::EpochMoved {
                request_epoch,
                current_epoch,
            } => Kind::EpochMoved(r::EpochMoved {
                request_epoch,
                current_epoch,
            }),
            Rejection::StaleTerm { task, term, seen } => {
                Kind::StaleTerm(r::StaleTerm { task, term, seen })
            }
            Rejection::WrongJob { expected, got } => Kind::WrongJob(r::WrongJob { expected, got }),
            Rejection::UnknownTask { task, num_tasks } => {
                Kind::UnknownTask(r::UnknownTask { task, num_tasks })
            }
            Rejection::UnknownMethod { method } => Kind::UnknownMethod(r::UnknownMethod { method }),
            Rejection::TooLarge { size, limit } => Kind::TooLarge(r::TooLarge {
                size: to_u64(size),
                limit: to_u64(limit),
            }),
            Rejection::Malformed { reason } => Kind::Malformed(r::Malformed { reason }),
            Rejection::ShuttingDown => Kind::ShuttingDown(r::ShuttingDown {}),
            Rejection::Delivered { seq } => Kind::Delivered(r::Delivered { seq }),
        };
        proto::Rejection { kind: Some(kind) }
    }
}

impl TryFrom<proto::Rejection> for Rejection {
    type Error = Rejection;

    /// Fails (with `Malformed`) only when the variant is missing or unknown to this version.
    fn try_from(msg: proto::Rejection) -> Result<Self, Self::Error> {
        let kind = msg.kind.ok_or_else(|| Rejection::Malformed {
            reason: "rejection without a (known) kind".into(),
        })?;
        Ok(match kind {
            Kind::NotPrimary(m) => Rejection::NotPrimary { task: m.task },
            Kind::NotReady(m) => Rejection::NotReady {
                task: m.task,
                epoch: m.epoch,
            },
            Kind::EpochMoved(m) => Rejection::EpochMoved {
                request_epoch: m.request_epoch,
                current_epoch: m.current_epoch,
            },
            Kind::StaleTerm(m) => Rejection::StaleTerm {
                task: m.task,
                term: m.term,
                seen: m.seen,
            },
            Kind::WrongJob(m) => Rejection::WrongJob {
                expected: m.expected,
                got: m.got,
            },
            Kind::UnknownTask(m) => Rejection::UnknownTask {
                task: m.task,
                num_tasks: m.num_tasks,
            },
            Kind::UnknownMethod(m) => Rejection::UnknownMethod { method: m.method },
            Kind::TooLarge(m) => Rejection::TooLarge {
                size: to_usize(m.size),
                limit: to_usize(m.limit),
            },
            Kind::Malformed(m) => Rejection::Malformed { reason: m.reason },
            Kind::ShuttingDown(_) => Rejection::ShuttingDown,
            Kind::Delivered(m) => Rejection::Delivered { seq: m.seq },
        })
    }
}

/// Recognises tonic's own size-limit statuses ("Error, decoded message length too large:
/// found N bytes, the limit is: M bytes", code `OutOfRange` in tonic 0.14) and turns them into
/// [`Rejection::TooLarge`].
pub(crate) fn tonic_size_limit(status: &Status) -> Option<Rejection> {
    if !matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted) {
        return None;
    }
    let message = status.message();
    if !message.contains("message length too large") {
        return None;
    }
    let number_after = |marker: &str| -> usize {
        message
            .split_once(marker)
            .map(|(_, rest)| rest.trim_start())
            .and_then(|rest| {
                let end = rest
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len());
                rest[..end].parse().ok()
            })
            .unwrap_or(0)
    };
    Some(Rejection::TooLarge {
        size: number_after("found"),
        limit: number_after("the limit is:"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rejection_survives_the_status_it_travels_in() {
        let all = [
            Rejection::NotPrimary { task: 1 },
            Rejection::NotReady { task: 1, epoch: 2 },
            Rejection::EpochMoved {
                request_epoch: 1,
                current_epoch: 2,
            },
            Rejection::StaleTerm {
                task: 1,
                term: 2,
                seen: 3,
            },
            Rejection::WrongJob {
                expected: "a".into(),
                got: "b".into(),
            },
            Rejection::UnknownTask {
                task: 9,
                num_tasks: 2,
            },
            Rejection::UnknownMethod { method: "m".into() },
            Rejection::TooLarge { size: 5, limit: 4 },
            Rejection::Malformed { reason: "r".into() },
            Rejection::ShuttingDown,
            Rejection::Delivered { seq: 7 },
        ];
        for r in all {
            let status = Status::from(r.clone());
            assert_eq!(status.code(), r.code());
            assert_eq!(Rejection::from_status(&status), Some(r));
        }
    }
}
