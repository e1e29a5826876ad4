//! Node-to-node transport: gRPC (tonic over HTTP/2) between taskgraph nodes.
//!
//! Nodes exchange five kinds of message, each a unary call, and hold two kinds of stream:
//!
//! * [`PullRequest`] → [`PullAnswer`]: a data request from task A to the current primary of
//!   task B. Pulls from one node to another ride a *lane*: one long-lived stream carrying
//!   many pulls at once, answered in any order ([`Peers::pull`]); a request or answer above
//!   [`LANE_MAX_BYTES`] goes as a unary call of its own;
//! * [`Acknowledge`]: the requester of a large answer received it (the server drops the
//!   answer's bytes at once instead of at the requester's next pull);
//! * [`Meta`]: a small flag from a task to a neighbour, on the lane to that node when its lanes
//!   carry metas ([`Peers::meta`]; a node of an older version gets it as a unary call);
//! * [`Replicate`]: state from a task's primary to its backups, on the lane too when it fits
//!   and the backup's lanes carry replication ([`Peers::replicate`]);
//! * ping → [`PingReply`]: "who are you";
//! * hold → one [`PingReply`], then nothing until the server shuts down: a liveness watch that
//!   costs no calls ([`Peers::hold`], [`Held`]).
//!
//! This module only moves and validates frames; the node's event loop decides answers. The
//! receiving side is [`serve`], which hands each validated message to the loop as an
//! [`Inbound`] carrying a oneshot sender for the answer. The calling side is [`Peers`], a
//! cache of one connection per peer address.
//!
//! A refusal is a [`Rejection`]. It travels as a gRPC status whose code follows tonic's
//! retry rule (see [`Rejection::code`]) and whose binary metadata entry
//! [`REJECTION_METADATA_KEY`] holds the encoded variant with its fields, so the caller gets
//! back exactly the `Rejection` produced by the server ([`CallError::Rejected`]).
//!
//! With [`ServerConfig::tls`] and [`ClientConfig::tls`] (both from
//! [`PeerTls`](crate::PeerTls)) every connection is mutual TLS: the server completes the
//! handshake only with clients whose certificate chains to the job's CA (and, with a configured
//! name, checks every call's client certificate against it); the client verifies the server
//! the same way. Without them the transport is plain text and [`serve`] logs a warning.
//!
//! The generated protobuf types (`proto/taskgraph.proto`) stay private to this module; the
//! rest of the crate sees only the domain types re-exported here.

mod client;
mod codec;
mod error;
mod lane;
mod rejection;
mod server;
mod types;

/// Generated protobuf messages and gRPC service of `proto/taskgraph.proto`.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]
mod proto {
    tonic::include_proto!("taskgraph.wire");
}

pub use client::{ClientConfig, Held, Peers, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HTTP2_KEEPALIVE};
pub use error::{CallError, WireError};
pub use rejection::{Rejection, MAX_REJECTION_TEXT, REJECTION_METADATA_KEY};
pub use server::{
    bind, serve, serve_with, Direct, Handling, Inbound, Lent, ServerConfig,
    SERVER_HTTP2_KEEPALIVE_INTERVAL, SERVER_HTTP2_KEEPALIVE_TIMEOUT, TLS_HANDSHAKE_TIMEOUT,
};
pub use types::{
    Acknowledge, Header, Meta, PingReply, PullAnswer, PullRequest, Replicate, ReplicateKind,
    SlotInfo,
};

/// Default frame limit (64 MiB) of [`ServerConfig::max_frame_bytes`] and
/// [`ClientConfig::max_frame_bytes`]: the largest encoded message, payload plus a few dozen
/// bytes of header, so a payload of exactly 64 MiB needs a higher limit.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Largest encoded pull request or answer carried on a lane (the stream of pulls between two
/// nodes, see [`Peers::pull`]); a larger one goes as a unary call of its own, so one large
/// payload never holds up the small ones queued behind it.
pub const LANE_MAX_BYTES: usize = 1024 * 1024;

/// Calls of one lane a server handles at once (held pulls, and answers waiting for the
/// connection): a pull past it is refused at once with [`Rejection::NotReady`] (retryable, as
/// the node refuses early pulls past its own bound of 4,096), and a meta or a replication entry
/// is sent back to go as a unary call. So a flood costs a bounded amount of memory and the lane
/// stays read (a cancel does not wait behind calls; only a caller that does not read its
/// answers either is held back until it does).
pub const LANE_MAX_CALLS: usize = 16 * 1024;

/// Room for a lane's own fields around a request or an answer, in bytes.
pub(crate) const LANE_OVERHEAD: usize = 32;

/// HTTP/2 flow-control window of one call (stream), in bytes, announced by both ends of every
/// node-to-node connection. hyper's defaults (1 MiB on a server, 2 MiB on a client) make a
/// sender of a large payload stop for a window update every megabyte.
pub const HTTP2_STREAM_WINDOW: u32 = 8 * 1024 * 1024;

/// HTTP/2 flow-control window of a whole connection, in bytes (both ends): room for two large
/// calls in flight before either waits for a window update.
pub const HTTP2_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Largest HTTP/2 DATA frame accepted, in bytes (both ends; the protocol's default is 16 KiB):
/// fewer, larger frames for a payload of many megabytes.
pub const HTTP2_MAX_FRAME: u32 = 1024 * 1024;
