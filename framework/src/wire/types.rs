//! Domain types of the transport and their conversions from/to the generated protobuf types.
//!
//! Decoding direction (`proto` → domain): one `TryFrom` per request message, failing with
//! [`Rejection::Malformed`] on a missing or invalid field; messages without required fields
//! convert with `From`. Encoding direction (domain → `proto`) is always `From`.

use bytes::Bytes;

use super::proto;
use super::rejection::Rejection;

/// Routing and fencing information carried by every task-to-task message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Header {
    /// Name of the job. A node serves one job and refuses messages for another
    /// ([`Rejection::WrongJob`]). When left empty, [`Peers`](super::Peers) fills in the job of
    /// its [`ClientConfig`](super::ClientConfig).
    pub job: String,
    /// Epoch the sender is in.
    pub epoch: u64,
    /// Sending task.
    pub from_task: u32,
    /// Receiving task.
    pub to_task: u32,
    /// The sender's term as primary of `from_task`; 0 when the sender is not acting as a
    /// primary.
    pub term: u64,
}

/// A data request from task `header.from_task` to the current primary of task
/// `header.to_task`, answered with a [`PullAnswer`].
///
/// The id of a pull is `(header.epoch, header.from_task, header.to_task, seq)`; see
/// [`PullRequest::id`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    /// Routing and fencing information.
    pub header: Header,
    /// Sequence number of the pull within `(epoch, from_task, to_task)`.
    pub seq: u64,
    /// Which of the receiving task's methods is called.
    pub method: String,
    /// Argument bytes, opaque to the transport.
    pub payload: Bytes,
    /// The sender's acknowledgement: every pull it made to this task with a lower `seq` (in
    /// this epoch, under this term) has been delivered, so the server may forget their
    /// answers. 0 acknowledges nothing.
    pub delivered_below: u64,
}

impl PullRequest {
    /// `(epoch, from_task, to_task, seq)`: identifies the pull across retries.
    pub fn id(&self) -> (u64, u32, u32, u64) {
        (
            self.header.epoch,
            self.header.from_task,
            self.header.to_task,
            self.seq,
        )
    }
}

/// The answer to a [`PullRequest`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullAnswer {
    /// Result bytes, opaque to the transport.
    pub payload: Bytes,
    /// The answering primary's term for the pulled task.
    pub server_term: u64,
}

/// The requester of a pull received its answer (`header.epoch`, `header.from_task`,
/// `header.to_task`, `seq`; `header.term` is the requester's): the serving node may drop the
/// answer's bytes at once instead of keeping them until the requester's next pull says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acknowledge {
    /// Routing and fencing information (as the pull's).
    pub header: Header,
    /// The pull's sequence number.
    pub seq: u64,
}

/// A small flag sent by a task to a neighbour over a named link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Routing and fencing information.
    pub header: Header,
    /// Name of the link the flag travels on.
    pub link: String,
    /// The flag itself.
    pub meta: String,
}

/// State shipped by the primary of a task to one of its backups
/// (`header.from_task == header.to_task`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replicate {
    /// Routing and fencing information; `from_task` and `to_task` are the replicated task.
    pub header: Header,
    /// Position of this entry in the primary's replication stream.
    pub index: u64,
    /// Whether `data` is an incremental update or a full snapshot.
    pub kind: ReplicateKind,
    /// Replicated state, opaque to the transport.
    pub data: Bytes,
}

/// What a [`Replicate`] message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicateKind {
    /// An incremental update, to be applied on top of the previous index.
    Update,
    /// A full snapshot, replacing the backup's state.
    Snapshot,
}

/// A node's answer to a ping ("who are you").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PingReply {
    /// The job the node serves.
    pub job: String,
    /// The node's id.
    pub node_id: String,
    /// The task slots the node hosts.
    pub slots: Vec<SlotInfo>,
}

/// One task slot hosted by a node, as reported by [`PingReply`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SlotInfo {
    /// The task.
    pub task: u32,
    /// Whether the node is the task's primary (otherwise a backup).
    pub primary: bool,
    /// The task's term as known by the node.
    pub term: u64,
    /// The epoch the slot is in.
    pub epoch: u64,
}

fn required<T>(field: Option<T>, what: &str) -> Result<T, Rejection> {
    field.ok_or_else(|| Rejection::Malformed {
        reason: format!("missing {what}"),
    })
}

// ---- Header ----

impl From<proto::Header> for Header {
    fn from(h: proto::Header) -> Self {
        Header {
            job: h.job,
            epoch: h.epoch,
            from_task: h.from_task,
            to_task: h.to_task,
            term: h.term,
        }
    }
}

impl From<Header> for proto::Header {
    fn from(h: Header) -> Self {
        proto::Header {
            job: h.job,
            epoch: h.epoch,
            from_task: h.from_task,
            to_task: h.to_task,
            term: h.term,
        }
    }
}

// ---- Pull ----

impl TryFrom<proto::PullRequest> for PullRequest {
    type Error = Rejection;

    fn try_from(m: proto::PullRequest) -> Result<Self, Rejection> {
        Ok(PullRequest {
            header: required(m.header, "PullRequest.header")?.into(),
            seq: m.seq,
            method: m.method,
            payload: m.payload,
            delivered_below: m.delivered_below,
        })
    }
}

impl From<PullRequest> for proto::PullRequest {
    fn from(m: PullRequest) -> Self {
        proto::PullRequest {
            header: Some(m.header.into()),
            seq: m.seq,
            method: m.method,
            payload: m.payload,
            delivered_below: m.delivered_below,
        }
    }
}

impl From<proto::PullAnswer> for PullAnswer {
    fn from(m: proto::PullAnswer) -> Self {
        PullAnswer {
            payload: m.payload,
            server_term: m.server_term,
        }
    }
}

impl From<PullAnswer> for proto::PullAnswer {
    fn from(m: PullAnswer) -> Self {
        proto::PullAnswer {
            payload: m.payload,
            server_term: m.server_term,
        }
    }
}

// ---- Meta ----

impl TryFrom<proto::AcknowledgeRequest> for Acknowledge {
    type Error = Rejection;

    fn try_from(m: proto::AcknowledgeRequest) -> Result<Self, Rejection> {
        Ok(Acknowledge {
            header: required(m.header, "AcknowledgeRequest.header")?.into(),
            seq: m.seq,
        })
    }
}

impl From<Acknowledge> for proto::AcknowledgeRequest {
    fn from(m: Acknowledge) -> Self {
        proto::AcknowledgeRequest {
            header: Some(m.header.into()),
            seq: m.seq,
        }
    }
}

impl TryFrom<proto::MetaRequest> for Meta {
    type Error = Rejection;

    fn try_from(m: proto::MetaRequest) -> Result<Self, Rejection> {
        Ok(Meta {
            header: required(m.header, "MetaRequest.header")?.into(),
            link: m.link,
            meta: m.meta,
        })
    }
}

impl From<Meta> for proto::MetaRequest {
    fn from(m: Meta) -> Self {
        proto::MetaRequest {
            header: Some(m.header.into()),
            link: m.link,
            meta: m.meta,
        }
    }
}

// ---- Replicate ----

impl From<ReplicateKind> for proto::ReplicateKind {
    fn from(k: ReplicateKind) -> Self {
        match k {
            ReplicateKind::Update => proto::ReplicateKind::Update,
            ReplicateKind::Snapshot => proto::ReplicateKind::Snapshot,
        }
    }
}

impl TryFrom<proto::ReplicateRequest> for Replicate {
    type Error = Rejection;

    fn try_from(m: proto::ReplicateRequest) -> Result<Self, Rejection> {
        let header: Header = required(m.header, "ReplicateRequest.header")?.into();
        let kind = match proto::ReplicateKind::try_from(m.kind) {
            Ok(proto::ReplicateKind::Update) => ReplicateKind::Update,
            Ok(proto::ReplicateKind::Snapshot) => ReplicateKind::Snapshot,
            Ok(proto::ReplicateKind::Unspecified) | Err(_) => {
                return Err(Rejection::Malformed {
                    reason: format!("ReplicateRequest.kind: invalid value {}", m.kind),
                })
            }
        };
        if header.from_task != header.to_task {
            return Err(Rejection::Malformed {
                reason: format!(
                    "ReplicateRequest: from_task {} != to_task {}",
                    header.from_task, header.to_task
                ),
            });
        }
        Ok(Replicate {
            header,
            index: m.index,
            kind,
            data: m.data,
        })
    }
}

impl From<Replicate> for proto::ReplicateRequest {
    fn from(m: Replicate) -> Self {
        proto::ReplicateRequest {
            header: Some(m.header.into()),
            index: m.index,
            kind: proto::ReplicateKind::from(m.kind).into(),
            data: m.data,
        }
    }
}

// ---- Ping ----

impl From<proto::SlotInfo> for SlotInfo {
    fn from(s: proto::SlotInfo) -> Self {
        SlotInfo {
            task: s.task,
            primary: s.primary,
            term: s.term,
            epoch: s.epoch,
        }
    }
}

impl From<SlotInfo> for proto::SlotInfo {
    fn from(s: SlotInfo) -> Self {
        proto::SlotInfo {
            task: s.task,
            primary: s.primary,
            term: s.term,
            epoch: s.epoch,
        }
    }
}

impl From<proto::PingReply> for PingReply {
    fn from(m: proto::PingReply) -> Self {
        PingReply {
            job: m.job,
            node_id: m.node_id,
            slots: m.slots.into_iter().map(SlotInfo::from).collect(),
        }
    }
}

impl From<PingReply> for proto::PingReply {
    fn from(m: PingReply) -> Self {
        proto::PingReply {
            job: m.job,
            node_id: m.node_id,
            slots: m.slots.into_iter().map(proto::SlotInfo::from).collect(),
        }
    }
}
