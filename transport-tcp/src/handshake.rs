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
//! configured, zeros otherwise ([`auth::tag_opt`]). The nonce is fresh per socket, so a
//! recorded Hello cannot be replayed. Both sides do blocking I/O bounded by a deadline; the
//! acceptor runs each handshake on its own short-lived thread so a silent or slow client
//! holds only that thread, never the listener.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use devccl_core::auth::{self, AuthKey};
use devccl_core::transport::{CommContext, TransportKind};
use devccl_core::wire::{CHALLENGE_LEN, Challenge, HELLO_LEN, Hello, VERDICT_LEN, Verdict, VerdictStatus};
use devccl_core::{CommId, Error, Rank, Result};
use nix::sys::socket::MsgFlags;
use socket2::Socket;

/// Domain label of the Hello tag.
pub const HELLO_DOMAIN: &str = "devccl-tcp-hello-v1";

/// Most lanes an acceptor agrees to per connection (`DEVCCL_NSOCKS` allows 16; the margin
/// lets a newer peer ask for more without a protocol change).
pub const MAX_LANES: u16 = 64;

/// Why a bounded blocking exchange stopped early.
#[derive(Debug)]
pub(crate) enum Stop {
    /// The deadline passed.
    Timeout,
    /// The other side closed after `got` bytes.
    Eof { got: usize },
    /// The bytes so far cannot be the expected message.
    Invalid(String),
    /// The socket failed.
    Io(io::Error),
}

impl Stop {
    /// A short description for logs and error messages.
    pub(crate) fn describe(&self, what: &str) -> String {
        match self {
            Stop::Timeout => format!("no complete {what} before the handshake deadline"),
            Stop::Eof { got: 0 } => format!("connection closed before the {what}"),
            Stop::Eof { got } => format!("connection closed after {got} bytes of the {what}"),
            Stop::Invalid(why) => why.clone(),
            Stop::Io(e) => format!("socket error during the {what}: {e}"),
        }
    }
}

fn is_would_block(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Time left before `deadline`, at least 1 ms (a zero socket timeout means "forever").
fn left(deadline: Instant) -> Option<Duration> {
    let now = Instant::now();
    (now < deadline).then(|| (deadline - now).max(Duration::from_millis(1)))
}

/// Read exactly `buf.len()` bytes before `deadline`. `check` sees every prefix received so
/// far and may reject it early (garbage is refused on its first bytes, not after a timeout).
pub(crate) fn read_exact_by(
    sock: &Socket,
    buf: &mut [u8],
    deadline: Instant,
    check: impl Fn(&[u8]) -> Option<String>,
) -> std::result::Result<(), Stop> {
    let mut got = 0;
    while got < buf.len() {
        let t = left(deadline).ok_or(Stop::Timeout)?;
        sock.set_read_timeout(Some(t)).map_err(Stop::Io)?;
        let mut r: &Socket = sock;
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(Stop::Eof { got }),
            Ok(n) => {
                got += n;
                if let Some(why) = check(&buf[..got]) {
                    return Err(Stop::Invalid(why));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted || is_would_block(&e) => {}
            Err(e) => return Err(Stop::Io(e)),
        }
    }
    Ok(())
}

/// Write all of `buf` before `deadline` (MSG_NOSIGNAL: a closed peer is an error, not a
/// SIGPIPE that kills the process).
pub(crate) fn write_all_by(sock: &Socket, buf: &[u8], deadline: Instant) -> std::result::Result<(), Stop> {
    let mut sent = 0;
    while sent < buf.len() {
        let t = left(deadline).ok_or(Stop::Timeout)?;
        sock.set_write_timeout(Some(t)).map_err(Stop::Io)?;
        match sock.send_with_flags(&buf[sent..], MsgFlags::MSG_NOSIGNAL.bits()) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted || is_would_block(&e) => {}
            Err(e) => return Err(Stop::Io(e)),
        }
    }
    Ok(())
}

/// The first 6 bytes of every handshake message of a kind: magic, version, kind.
fn prefix_of(encoded: &[u8]) -> [u8; 6] {
    encoded[..6].try_into().expect("6 bytes")
}

/// An early check for a partially received message: rejects as soon as the received bytes
/// disagree with the fixed prefix, explaining why with the codec's own words.
fn prefix_check(prefix: [u8; 6], full_len: usize, decode: fn(&[u8]) -> Result<()>) -> impl Fn(&[u8]) -> Option<String> {
    move |got: &[u8]| {
        let n = got.len().min(prefix.len());
        if got[..n] == prefix[..n] {
            return None;
        }
        // Pad to full length so the decoder reports the real problem (magic, version, kind)
        // instead of "too short".
        let mut padded = vec![0u8; full_len.max(got.len())];
        padded[..got.len()].copy_from_slice(got);
        Some(match decode(&padded) {
            Err(e) => describe_codec_error(&e),
            Ok(()) => format!("unexpected bytes {:02x?}", &got[..n]),
        })
    }
}

/// The codec's message without the "remote error:" prefix its Display adds.
fn describe_codec_error(e: &Error) -> String {
    match e {
        Error::Remote { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// The Hello's tag for `nonce` under `key` (zeros without a key).
pub fn hello_tag(key: Option<&AuthKey>, nonce: &[u8; 16], hello: &Hello) -> [u8; 32] {
    auth::tag_opt(key, HELLO_DOMAIN, &[nonce, &hello.signed_part()])
}

/// Acceptor side, steps 1-2: send the challenge and read a well-formed Hello.
pub(crate) fn acceptor_read_hello(
    sock: &Socket,
    nonce: [u8; 16],
    deadline: Instant,
) -> std::result::Result<Hello, Stop> {
    write_all_by(sock, &Challenge { nonce }.encode(), deadline)?;
    let mut buf = [0u8; HELLO_LEN];
    let sample =
        Hello { transport: 0, comm: CommId::default(), from: Rank(0), to: Rank(0), lane: 0, lanes: 0, auth: [0; 32] };
    let check = prefix_check(prefix_of(&sample.encode()), HELLO_LEN, |b| Hello::decode(b).map(drop));
    read_exact_by(sock, &mut buf, deadline, check)?;
    Hello::decode(&buf).map_err(|e| Stop::Invalid(describe_codec_error(&e)))
}

/// Acceptor side, step 3: is this Hello for us? Lane bookkeeping (duplicates, lane count
/// agreement) is the caller's, under its lock.
pub(crate) fn judge_hello(ctx: &CommContext, nonce: &[u8; 16], h: &Hello) -> (VerdictStatus, String) {
    // Authentication first: with a different secret every other field is untrustworthy,
    // and "DEVCCL_SECRET differs" is the most useful thing to tell either side.
    if !auth::verify_opt(ctx.key.as_ref(), HELLO_DOMAIN, &[nonce, &h.signed_part()], &h.auth) {
        let why = if ctx.key.is_none() {
            "the peer sent an auth tag but this rank has no DEVCCL_SECRET"
        } else {
            "auth tag does not verify (DEVCCL_SECRET differs or is unset on the peer)"
        };
        return (VerdictStatus::BadAuth, why.into());
    }
    if h.transport != TransportKind::Tcp as u8 {
        return (VerdictStatus::WrongComm, format!("Hello is for transport code {}, not tcp", h.transport));
    }
    if h.comm != ctx.comm {
        return (VerdictStatus::WrongComm, format!("communicator {} is not ours ({})", h.comm, ctx.comm));
    }
    if h.to != ctx.rank {
        return (VerdictStatus::WrongRank, format!("addressed to rank {}, this is rank {}", h.to, ctx.rank));
    }
    if h.from.idx() >= ctx.world || h.from == ctx.rank {
        return (VerdictStatus::WrongRank, format!("rank {} is not a peer in a world of {}", h.from, ctx.world));
    }
    if h.lanes == 0 || h.lanes > MAX_LANES || h.lane >= h.lanes {
        return (VerdictStatus::BadLane, format!("lane {} of {} (at most {MAX_LANES} lanes)", h.lane, h.lanes));
    }
    (VerdictStatus::Ok, String::new())
}

/// Which socket a connector is setting up, for the handshake and its error messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dial {
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
    let Dial { peer, remote, lane, lanes, deadline, limit } = *dial;
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
    let mut cbuf = [0u8; CHALLENGE_LEN];
    let check = prefix_check(prefix_of(&Challenge { nonce: [0; 16] }.encode()), CHALLENGE_LEN, |b| {
        Challenge::decode(b).map(drop)
    });
    read_exact_by(sock, &mut cbuf, deadline, check).map_err(|s| fail("challenge", s))?;
    let challenge = Challenge::decode(&cbuf).map_err(|e| fail("challenge", Stop::Invalid(describe_codec_error(&e))))?;
    let mut hello = Hello {
        transport: TransportKind::Tcp as u8,
        comm: ctx.comm,
        from: ctx.rank,
        to: peer,
        lane,
        lanes,
        auth: [0; 32],
    };
    hello.auth = hello_tag(ctx.key.as_ref(), &challenge.nonce, &hello);
    write_all_by(sock, &hello.encode(), deadline).map_err(|s| fail("hello", s))?;
    let mut vbuf = [0u8; VERDICT_LEN];
    let check = prefix_check(prefix_of(&Verdict { status: VerdictStatus::Ok }.encode()), VERDICT_LEN, |b| {
        Verdict::decode(b).map(drop)
    });
    read_exact_by(sock, &mut vbuf, deadline, check).map_err(|s| fail("verdict", s))?;
    let verdict = Verdict::decode(&vbuf).map_err(|e| fail("verdict", Stop::Invalid(describe_codec_error(&e))))?;
    if verdict.status != VerdictStatus::Ok {
        return Err(Error::remote(
            peer,
            format!(
                "rank {peer} at {remote} refused the connection from rank {} (lane {lane} of {lanes}): {}",
                ctx.rank,
                verdict.status.explain()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(judge_hello(&ctx(None), &n, &hello(None, &n)).0, VerdictStatus::Ok);
        assert_eq!(judge_hello(&ctx(Some("s")), &n, &hello(Some("s"), &n)).0, VerdictStatus::Ok);
        assert_eq!(judge_hello(&ctx(Some("s")), &n, &hello(Some("t"), &n)).0, VerdictStatus::BadAuth);
        assert_eq!(judge_hello(&ctx(Some("s")), &n, &hello(None, &n)).0, VerdictStatus::BadAuth);
        assert_eq!(judge_hello(&ctx(None), &n, &hello(Some("s"), &n)).0, VerdictStatus::BadAuth);
        assert_eq!(
            judge_hello(&ctx(Some("s")), &[4; 16], &hello(Some("s"), &n)).0,
            VerdictStatus::BadAuth,
            "nonce is bound"
        );
        let mut h = hello(None, &n);
        h.comm = CommId([8; 16]);
        assert_eq!(judge_hello(&ctx(None), &n, &h).0, VerdictStatus::WrongComm);
        let mut h = hello(None, &n);
        h.to = Rank(2);
        assert_eq!(judge_hello(&ctx(None), &n, &h).0, VerdictStatus::WrongRank);
        for from in [1, 3, 99] {
            let mut h = hello(None, &n);
            h.from = Rank(from);
            assert_eq!(judge_hello(&ctx(None), &n, &h).0, VerdictStatus::WrongRank);
        }
        for (lane, lanes) in [(2, 2), (0, 0), (0, 65)] {
            let mut h = hello(None, &n);
            (h.lane, h.lanes) = (lane, lanes);
            assert_eq!(judge_hello(&ctx(None), &n, &h).0, VerdictStatus::BadLane);
        }
    }

    #[test]
    fn tag_covers_the_signed_fields() {
        let n = [9u8; 16];
        let mut h = hello(Some("k"), &n);
        h.from = Rank(2);
        assert_eq!(judge_hello(&ctx(Some("k")), &n, &h).0, VerdictStatus::BadAuth, "from is signed");
    }

    #[test]
    fn early_prefix_check_names_the_problem() {
        let sample = Hello {
            transport: 0,
            comm: CommId::default(),
            from: Rank(0),
            to: Rank(0),
            lane: 0,
            lanes: 0,
            auth: [0; 32],
        };
        let check = prefix_check(prefix_of(&sample.encode()), HELLO_LEN, |b| Hello::decode(b).map(drop));
        assert_eq!(check(b"DV"), None, "a matching prefix waits for more");
        assert!(check(b"GET / HTTP/1.1\r\n").unwrap().contains("magic"));
        assert!(check(&[0x16, 0x03, 0x01]).unwrap().contains("magic"), "TLS ClientHello");
        assert!(check(b"DVCH\x09").unwrap().contains("version"));
        assert!(check(b"DVCH\x01\x01").unwrap().contains("kind"));
    }
}
