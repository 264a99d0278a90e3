//! The connection handshake, run once per socket (lane) before any data flows.
//!
//! ```text
//! acceptor                          connector
//!    |  Challenge{nonce}  ------->     |
//!    |  <-------  Hello{comm, from, to, lane, lanes, tag}
//!    |  Verdict{status}   ------->     |
//! ```
//!
//! The tag is `HMAC(key, "devccl-tcp-hello-v1", nonce, hello bytes 6..40)` when a secret is
//! configured, zeros otherwise. The exchange itself is shared with the shared-memory
//! transport ([`devccl_core::handshake`]); this module adds TCP's domain label, its lane rule
//! and its error wording. Both sides do blocking I/O bounded by a deadline; the acceptor runs
//! each handshake on its own short-lived thread so a silent or slow client holds only that
//! thread, never the listener.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use devccl_core::auth::AuthKey;
use devccl_core::handshake::{self as common};
pub(crate) use devccl_core::handshake::{
    Stop, accept_until_closed, acceptor_read_hello, spawn_handshake, write_all_by,
};
use devccl_core::transport::{CommContext, TransportKind};
use devccl_core::wire::{Hello, VerdictStatus};
use devccl_core::{Error, Rank, Result};
use socket2::Socket;

/// Domain label of the Hello tag.
pub const HELLO_DOMAIN: &str = "devccl-tcp-hello-v1";

/// Domain label of the Hello tag on devmem connections (the same handshake over the same
/// kind of sockets, but a tag made for one transport never verifies on the other).
pub const DEVMEM_HELLO_DOMAIN: &str = "devccl-devmem-hello-v1";

/// The Hello tag's domain label for connections of `kind` (TCP or devmem).
pub fn hello_domain(kind: TransportKind) -> &'static str {
    if kind == TransportKind::Devmem { DEVMEM_HELLO_DOMAIN } else { HELLO_DOMAIN }
}

/// Most lanes an acceptor agrees to per connection (`DEVCCL_NSOCKS` allows 16; the margin
/// lets a newer peer ask for more without a protocol change).
pub const MAX_LANES: u16 = 64;

/// The Hello's tag for `nonce` under `key` (zeros without a key).
pub fn hello_tag(key: Option<&AuthKey>, nonce: &[u8; 16], hello: &Hello) -> [u8; 32] {
    common::hello_tag(HELLO_DOMAIN, key, nonce, hello)
}

/// TCP's lane rule: `lane` of `lanes`, at most [`MAX_LANES`].
fn lanes_ok(lane: u16, lanes: u16) -> Option<String> {
    (lanes == 0 || lanes > MAX_LANES || lane >= lanes)
        .then(|| format!("lane {lane} of {lanes} (at most {MAX_LANES} lanes)"))
}

/// Acceptor side, step 3: is this Hello for us? Lane bookkeeping (duplicates, lane count
/// agreement) is the caller's, under its lock.
pub(crate) fn judge_hello(
    kind: TransportKind,
    ctx: &CommContext,
    nonce: &[u8; 16],
    h: &Hello,
) -> (VerdictStatus, String) {
    common::judge_hello(hello_domain(kind), kind, lanes_ok, ctx, nonce, h)
}

/// Which socket a connector is setting up, for the handshake and its error messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dial {
    /// TCP or devmem (the Hello's transport code and tag domain).
    pub kind: TransportKind,
    /// The rank being connected to.
    pub peer: Rank,
    /// Its listener.
    pub remote: SocketAddr,
    /// This socket's lane.
    pub lane: u16,
    /// Lanes in the connection.
    pub lanes: u16,
    /// When the whole connect must be done.
    pub deadline: Instant,
    /// The connect's total time allowance (for timeout messages).
    pub limit: Duration,
}

/// Connector side: answer the challenge on a freshly connected socket and read the verdict.
pub(crate) fn connector_handshake(sock: &Socket, ctx: &CommContext, dial: &Dial) -> Result<()> {
    let Dial { kind, peer, remote, lane, lanes, deadline, limit } = *dial;
    let fail = |stage: &str, s: Stop| -> Error {
        match s {
            Stop::Timeout => Error::Timeout {
                what: format!(
                    "rank {} connecting to rank {peer} at {remote} (lane {lane} of {lanes}): {stage}",
                    ctx.rank
                ),
                after: limit,
            },
            other => Error::remote(
                peer,
                format!(
                    "handshake with rank {peer} at {remote} (lane {lane} of {lanes}) failed: {}",
                    other.describe(stage)
                ),
            ),
        }
    };
    let hello = Hello { transport: kind as u8, comm: ctx.comm, from: ctx.rank, to: peer, lane, lanes, auth: [0; 32] };
    let status = common::connector_exchange(sock, hello_domain(kind), ctx.key.as_ref(), hello, deadline)
        .map_err(|(stage, s)| fail(stage, s))?;
    if status != VerdictStatus::Ok {
        return Err(Error::remote(
            peer,
            format!(
                "rank {peer} at {remote} refused the connection from rank {} (lane {lane} of {lanes}): {}",
                ctx.rank,
                status.explain()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use devccl_core::CommId;

    fn ctx(key: Option<&str>) -> CommContext {
        CommContext { comm: CommId([7; 16]), rank: Rank(1), world: 3, key: key.map(AuthKey::from_secret) }
    }

    fn hello(key: Option<&str>, nonce: &[u8; 16]) -> Hello {
        let mut h =
            Hello { transport: 1, comm: CommId([7; 16]), from: Rank(0), to: Rank(1), lane: 0, lanes: 2, auth: [0; 32] };
        h.auth = hello_tag(key.map(AuthKey::from_secret).as_ref(), nonce, &h);
        h
    }

    #[test]
    fn judge_accepts_and_rejects() {
        let n = [3u8; 16];
        assert_eq!(judge_hello(TransportKind::Tcp, &ctx(None), &n, &hello(None, &n)).0, VerdictStatus::Ok);
        assert_eq!(judge_hello(TransportKind::Tcp, &ctx(Some("s")), &n, &hello(Some("s"), &n)).0, VerdictStatus::Ok);
        assert_eq!(
            judge_hello(TransportKind::Tcp, &ctx(Some("s")), &n, &hello(Some("t"), &n)).0,
            VerdictStatus::BadAuth
        );
        assert_eq!(judge_hello(TransportKind::Tcp, &ctx(Some("s")), &n, &hello(None, &n)).0, VerdictStatus::BadAuth);
        assert_eq!(judge_hello(TransportKind::Tcp, &ctx(None), &n, &hello(Some("s"), &n)).0, VerdictStatus::BadAuth);
        assert_eq!(
            judge_hello(TransportKind::Tcp, &ctx(Some("s")), &[4; 16], &hello(Some("s"), &n)).0,
            VerdictStatus::BadAuth,
            "nonce is bound"
        );
        let mut h = hello(None, &n);
        h.comm = CommId([8; 16]);
        assert_eq!(judge_hello(TransportKind::Tcp, &ctx(None), &n, &h).0, VerdictStatus::WrongComm);
        let mut h = hello(None, &n);
        h.to = Rank(2);
        assert_eq!(judge_hello(TransportKind::Tcp, &ctx(None), &n, &h).0, VerdictStatus::WrongRank);
        for from in [1, 3, 99] {
            let mut h = hello(None, &n);
            h.from = Rank(from);
            assert_eq!(judge_hello(TransportKind::Tcp, &ctx(None), &n, &h).0, VerdictStatus::WrongRank);
        }
        for (lane, lanes) in [(2, 2), (0, 0), (0, 65)] {
            let mut h = hello(None, &n);
            (h.lane, h.lanes) = (lane, lanes);
            assert_eq!(judge_hello(TransportKind::Tcp, &ctx(None), &n, &h).0, VerdictStatus::BadLane);
        }
    }

    #[test]
    fn tag_covers_the_signed_fields() {
        let n = [9u8; 16];
        let mut h = hello(Some("k"), &n);
        h.from = Rank(2);
        assert_eq!(
            judge_hello(TransportKind::Tcp, &ctx(Some("k")), &n, &h).0,
            VerdictStatus::BadAuth,
            "from is signed"
        );
    }
}
