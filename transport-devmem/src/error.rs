//! The crate's single error type.
#![forbid(unsafe_code)]

use std::fmt;
use std::time::Duration;

use crate::sys::errno_name;
use crate::sys::netlink::Extack;
use crate::sys::ntuple::SteerRefusal;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Who is at fault for an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// The caller passed something invalid.
    Caller,
    /// The operating system, kernel, driver or machine configuration refused or failed.
    System,
    /// A deadline passed.
    Timeout,
    /// Something this crate did not expect (a reply it cannot decode): a bug here or a kernel
    /// that speaks a different dialect.
    Internal,
}

/// Every error of the devmem kernel layer.
///
/// Messages name the interface (when there is one), the errno and the kernel's own extack text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Fault: the caller. An argument the kernel would reject anyway (binding id 0, unaligned
    /// CUDA range, empty queue list...).
    #[error("invalid usage: {what}")]
    InvalidUsage {
        /// What was wrong.
        what: String,
    },

    /// Fault: the system. The kernel answered a netlink request with an error.
    #[error("kernel refused {op} on {iface}: {}{extack}", ErrnoDisplay(*errno))]
    Kernel {
        /// The request, e.g. `"bind-rx"`.
        op: &'static str,
        /// Interface name (or `"-"` where the request names none).
        iface: String,
        /// Positive errno.
        errno: i32,
        /// The kernel's extended ack (message, bad attribute, policy, missing attribute).
        extack: Box<Extack>,
    },

    /// Fault: the system. A system call failed.
    #[error("{op} on {iface} failed: {source}")]
    Os {
        /// What was attempted.
        op: &'static str,
        /// Interface, device or socket it concerned (or `"-"`).
        iface: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// Fault: timeout. No complete answer before the deadline.
    #[error("{op} on {iface}: no complete reply within {after:?}")]
    Timeout {
        /// The request.
        op: &'static str,
        /// Interface (or `"-"`).
        iface: String,
        /// The deadline that passed.
        after: Duration,
    },

    /// Fault: the system. The machine lacks something this path needs (kernel feature, device
    /// node, driver, library); `reason` says what and how to get it.
    #[error("unsupported: {reason}")]
    Unsupported {
        /// Operator-readable reason.
        reason: String,
    },

    /// Fault: the system (CUDA driver). A CUDA driver call failed.
    #[error("CUDA {op} failed: {name} ({code})")]
    Cuda {
        /// The driver call.
        op: &'static str,
        /// `CUresult` value.
        code: u32,
        /// `CUresult` name, e.g. `CUDA_ERROR_NOT_SUPPORTED`.
        name: String,
    },

    /// Fault: the system. The kernel refused a flow-steering (ntuple) rule. `command` is the
    /// `ethtool -N` line that installs it, for an operator with `CAP_NET_ADMIN` to run.
    #[error("steering on {iface} refused: {}: {}; run instead: {command}", ErrnoDisplay(*errno), refusal.reason())]
    Steering {
        /// Interface the rule was for.
        iface: String,
        /// Positive errno of the `SIOCETHTOOL` ioctl.
        errno: i32,
        /// The errno classified.
        refusal: SteerRefusal,
        /// The equivalent `ethtool -N <if> flow-type ... action <queue>` command.
        command: String,
    },

    /// Fault: internal. A kernel reply this crate could not decode.
    #[error("malformed kernel reply to {op} on {iface}: {what}")]
    Malformed {
        /// The request.
        op: &'static str,
        /// Interface (or `"-"`).
        iface: String,
        /// What was wrong with the bytes.
        what: String,
    },
}

impl Error {
    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            Error::InvalidUsage { .. } => Fault::Caller,
            Error::Kernel { .. } | Error::Os { .. } | Error::Unsupported { .. } | Error::Steering { .. } => {
                Fault::System
            }
            Error::Cuda { .. } => Fault::System,
            Error::Timeout { .. } => Fault::Timeout,
            Error::Malformed { .. } => Fault::Internal,
        }
    }

    /// The positive errno, for kernel and OS errors.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { errno, .. } | Error::Steering { errno, .. } => Some(*errno),
            Error::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The kernel's extended ack, for netlink errors.
    pub fn extack(&self) -> Option<&Extack> {
        match self {
            Error::Kernel { extack, .. } => Some(extack),
            _ => None,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>) -> Self {
        Error::InvalidUsage { what: what.into() }
    }

    pub(crate) fn unsupported(reason: impl Into<String>) -> Self {
        Error::Unsupported { reason: reason.into() }
    }

    pub(crate) fn os(op: &'static str, iface: &str, source: std::io::Error) -> Self {
        Error::Os { op, iface: iface.to_owned(), source }
    }
}

/// `EOPNOTSUPP(95)` style rendering of an errno.
pub(crate) struct ErrnoDisplay(pub i32);

impl fmt::Display for ErrnoDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", errno_name(self.0), self.0)
    }
}
