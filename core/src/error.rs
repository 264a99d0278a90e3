//! The one error type of `devccl-core`.
//!
//! Every variant says who is at fault (see [`Fault`]): the caller, the operating system or a
//! driver, a remote peer, the clock, or devccl itself. Messages name the rank, the peer, the
//! collective and its sequence number wherever they are known.

use std::time::Duration;

use crate::types::Rank;

/// Who caused an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The caller used the API wrongly (bad sizes, dtypes, configuration).
    Caller,
    /// An operating-system or driver call failed.
    System,
    /// A peer failed, disagreed with us, or sent something invalid.
    Remote,
    /// A deadline passed.
    Timeout,
    /// A bug in devccl.
    Internal,
}

/// Errors of devccl-core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller passed something invalid. Nothing was sent; the communicator stays usable.
    #[error("invalid usage: {0}")]
    InvalidUsage(String),

    /// An OS or driver call failed.
    #[error("system error: {context}: {source}")]
    System {
        /// What we were doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A peer failed, closed its connection, aborted, or sent something we cannot accept.
    #[error("{}: {message}", match .peer { Some(p) => format!("remote error from rank {p}"), None => "remote error".to_string() })]
    Remote {
        /// The peer at fault, where known.
        peer: Option<Rank>,
        /// What happened.
        message: String,
    },

    /// Ranks called different collectives (or sizes, dtypes, ops, roots).
    #[error("collective mismatch: rank {local_rank} called {local} but rank {peer} called {remote}")]
    Mismatch {
        /// This rank.
        local_rank: Rank,
        /// The peer that disagrees.
        peer: Rank,
        /// What this rank called.
        local: String,
        /// What the peer called.
        remote: String,
    },

    /// A deadline passed.
    #[error("timed out after {}: {what}", round_ms(*after))]
    Timeout {
        /// What we were waiting for (names the peer where known).
        what: String,
        /// The configured limit.
        after: Duration,
    },

    /// The communicator was aborted or poisoned by an earlier failure; the cause is kept.
    #[error("communicator aborted: {cause}")]
    Aborted {
        /// The first error that poisoned the communicator, or the reason given to abort().
        cause: String,
    },

    /// A transport, memory kind or driver cannot serve this request here.
    #[error("unsupported: {reason}")]
    Unsupported {
        /// Why, and where possible the fix.
        reason: String,
    },

    /// A compute device (CUDA, Vulkan) failed or refused an operation.
    #[error("device error on {device}: {message}")]
    Device {
        /// The device (`cuda:0 NVIDIA H200`, `vulkan:0 llvmpipe ...`).
        device: String,
        /// The call that failed and the driver's answer.
        message: String,
    },

    /// A bug in devccl.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            Error::InvalidUsage(_) | Error::Unsupported { .. } => Fault::Caller,
            Error::System { .. } | Error::Device { .. } => Fault::System,
            Error::Remote { .. } | Error::Mismatch { .. } | Error::Aborted { .. } => Fault::Remote,
            Error::Timeout { .. } => Fault::Timeout,
            Error::Internal(_) => Fault::Internal,
        }
    }

    /// Shorthand for [`Error::System`].
    pub fn system(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::System { context: context.into(), source }
    }

    /// Shorthand for [`Error::Remote`] naming a peer.
    pub fn remote(peer: Rank, message: impl Into<String>) -> Self {
        Error::Remote { peer: Some(peer), message: message.into() }
    }

    /// Shorthand for [`Error::InvalidUsage`].
    pub fn usage(message: impl Into<String>) -> Self {
        Error::InvalidUsage(message.into())
    }

    /// True when the error leaves the communicator unusable (anything but a caller mistake
    /// caught before communication started).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Error::InvalidUsage(_) | Error::Unsupported { .. })
    }
}

/// Result alias for devccl-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A duration for messages: whole milliseconds (`4.000393436s` reads as `4s`).
fn round_ms(d: Duration) -> String {
    format!("{:?}", Duration::from_millis(d.as_millis().min(u64::MAX as u128) as u64))
}
