//! Errors of the transport: [`CallError`] (client side) and [`WireError`] (server side).

use super::rejection::Rejection;

/// Why a call through [`Peers`](super::Peers) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The TCP connection was refused: nothing listens on the address, i.e. the process is
    /// evidently gone from a live host. Reported on a first connect as well as when the peer
    /// behind a cached connection died (a reconnect is then refused).
    #[error("connection to {addr} refused")]
    Refused {
        /// The address called.
        addr: String,
    },
    /// Any other connect or transport failure: connect timeout, request timeout, reset or
    /// closed connection, invalid address.
    #[error("{addr} unreachable: {reason}")]
    Unreachable {
        /// The address called.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The server, or its event loop, refused the message.
    #[error("rejected: {0}")]
    Rejected(Rejection),
    /// The server answered something this client cannot interpret.
    #[error("protocol error: {reason}")]
    Protocol {
        /// What was wrong with the answer.
        reason: String,
    },
}

impl CallError {
    /// True for [`CallError::Refused`]: evidence that the peer process is gone.
    pub fn is_refused(&self) -> bool {
        matches!(self, CallError::Refused { .. })
    }

    /// Whether retrying may help (possibly after re-resolving the primary): true for
    /// `Refused`, `Unreachable` and rejections that are [`Rejection::retryable`]; false for
    /// other rejections and protocol errors.
    pub fn retryable(&self) -> bool {
        match self {
            CallError::Refused { .. } | CallError::Unreachable { .. } => true,
            CallError::Rejected(rejection) => rejection.retryable(),
            CallError::Protocol { .. } => false,
        }
    }

    /// The rejection, when the peer refused the message.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            CallError::Rejected(rejection) => Some(rejection),
            _ => None,
        }
    }
}

impl From<Rejection> for CallError {
    fn from(rejection: Rejection) -> Self {
        CallError::Rejected(rejection)
    }
}

/// Why [`serve`](super::serve) (or [`bind`](super::bind)) failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Binding or inspecting the listening socket failed.
    #[error("cannot bind/listen: {0}")]
    Bind(#[source] std::io::Error),
    /// The gRPC server failed.
    #[error("transport server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// The TLS settings cannot be used (e.g. no certificate for the server).
    #[error("TLS settings: {0}")]
    Tls(String),
}
