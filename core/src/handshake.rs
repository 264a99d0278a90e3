//! The connection handshake of stream transports (TCP, shared memory's Unix socket), run
//! once per socket before any data flows, with blocking I/O bounded by a deadline:
//!
//! ```text
//! acceptor                          connector
//!    |  Challenge{nonce}  ------->     |
//!    |  <-------  Hello{transport, comm, from, to, lane, lanes, tag}
//!    |  Verdict{status}   ------->     |
//! ```
//!
//! The tag is `HMAC(key, domain, nonce, hello bytes 6..40)` when a secret is configured,
//! zeros otherwise ([`auth::tag_opt`]); each transport has its own domain label, so a tag made
//! for one never verifies on another. The nonce is fresh per socket, so a recorded Hello
//! cannot be replayed. Garbage is refused on its first bytes (each partial read is checked
//! against the expected message's fixed prefix), not after a timeout. Transports add their
//! own lane rules, error wording and any later setup messages.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{MsgFlags, send};

use crate::auth::{self, AuthKey};
use crate::error::Error;
use crate::transport::{CommContext, TransportKind};
use crate::types::{CommId, Rank};
use crate::wire::{CHALLENGE_LEN, Challenge, HELLO_LEN, Hello, VERDICT_LEN, Verdict, VerdictStatus};

/// Handshakes an acceptor runs at once; more connections are refused until some finish, so
/// a flood of silent clients costs bounded threads and memory.
pub const MAX_HANDSHAKES: usize = 256;

/// Serve a non-blocking `listener` until `closed` is set: sleep until a connection arrives
/// (or `wake`, the eventfd `close` rings, is readable), accept every pending one and hand
/// it to `take`. `what` names the listener in logs. Accept failures such as `EMFILE` back
/// off instead of spinning on a listener that stays readable.
pub fn accept_until_closed<S>(
    listener: &impl AsFd,
    wake: &impl AsFd,
    closed: &AtomicBool,
    what: &str,
    mut accept: impl FnMut() -> std::io::Result<S>,
    mut take: impl FnMut(S),
) {
    loop {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN), PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                tracing::error!(listener = what, "poll on the listener failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if closed.load(Ordering::Acquire) {
            return;
        }
        loop {
            match accept() {
                Ok(conn) => take(conn),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(listener = what, "accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
    }
}

/// Run `work` on a short-lived thread named `name`, unless [`MAX_HANDSHAKES`] already run;
/// `running(owner)` counts them (the owner outlives the thread through its `Arc`). `Err`
/// says why nothing was started.
pub fn spawn_handshake<T: Send + Sync + 'static>(
    owner: &Arc<T>,
    running: fn(&T) -> &AtomicUsize,
    name: &str,
    work: impl FnOnce(&T) + Send + 'static,
) -> Result<(), String> {
    if running(owner).fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES {
        running(owner).fetch_sub(1, Ordering::AcqRel);
        return Err(format!("more than {MAX_HANDSHAKES} handshakes in progress"));
    }
    let o = owner.clone();
    let spawned = std::thread::Builder::new().name(name.into()).stack_size(128 << 10).spawn(move || {
        work(&o);
        running(&o).fetch_sub(1, Ordering::AcqRel);
    });
    spawned.map(drop).map_err(|e| {
        running(owner).fetch_sub(1, Ordering::AcqRel);
        format!("cannot spawn a handshake thread: {e}")
    })
}

/// Why a bounded blocking exchange stopped early.
#[derive(Debug)]
pub enum Stop {
    /// The deadline passed.
    Timeout,
    /// The other side closed after `got` bytes.
    Eof {
        /// Bytes received before the end of stream.
        got: usize,
    },
    /// The bytes so far cannot be the expected message.
    Invalid(String),
    /// The socket failed.
    Io(std::io::Error),
}

impl Stop {
    /// A short description for logs and error messages; `what` names the message.
    pub fn describe(&self, what: &str) -> String {
        match self {
            Stop::Timeout => format!("no complete {what} before the handshake deadline"),
            Stop::Eof { got: 0 } => format!("connection closed before the {what}"),
            Stop::Eof { got } => format!("connection closed after {got} bytes of the {what}"),
            Stop::Invalid(why) => why.clone(),
            Stop::Io(e) => format!("socket error during the {what}: {e}"),
        }
    }
}

/// Wait until `fd` is ready for `flags` (`POLLIN`, `POLLOUT`) or `deadline` passes; for
/// transports' own steps (descriptor passing, say) that need more than read and write.
pub fn ready_by(fd: &impl AsFd, flags: PollFlags, deadline: Instant) -> Result<(), Stop> {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(Stop::Timeout);
        }
        let ms = (deadline - now).max(Duration::from_millis(1)).as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(fd.as_fd(), flags)];
        match poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => return Ok(()),
            Err(e) => return Err(Stop::Io(e.into())),
        }
    }
}

/// Read exactly `buf.len()` bytes before `deadline`. `check` sees every prefix received so
/// far and may reject it early. A plain `read` takes no ancillary data, so descriptors a
/// client attaches to these bytes on a Unix socket are discarded by the kernel.
pub fn read_exact_by(
    sock: &impl AsFd,
    buf: &mut [u8],
    deadline: Instant,
    check: impl Fn(&[u8]) -> Option<String>,
) -> Result<(), Stop> {
    let mut got = 0;
    while got < buf.len() {
        ready_by(sock, PollFlags::POLLIN, deadline)?;
        match nix::unistd::read(sock.as_fd(), &mut buf[got..]) {
            Ok(0) => return Err(Stop::Eof { got }),
            Ok(n) => {
                got += n;
                if let Some(why) = check(&buf[..got]) {
                    return Err(Stop::Invalid(why));
                }
            }
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => return Err(Stop::Io(e.into())),
        }
    }
    Ok(())
}

/// Write all of `buf` before `deadline`. `MSG_NOSIGNAL`: a closed peer is an error, not a
/// `SIGPIPE` that kills a host process (Python, say) that did not ignore the signal.
pub fn write_all_by(sock: &impl AsFd, buf: &[u8], deadline: Instant) -> Result<(), Stop> {
    use std::os::fd::AsRawFd;
    let mut sent = 0;
    while sent < buf.len() {
        ready_by(sock, PollFlags::POLLOUT, deadline)?;
        match send(sock.as_fd().as_raw_fd(), &buf[sent..], MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT) {
            Ok(n) => sent += n,
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => return Err(Stop::Io(e.into())),
        }
    }
    Ok(())
}

/// The codec's message without the "remote error:" prefix its Display adds.
pub fn codec_error(e: &Error) -> String {
    match e {
        Error::Remote { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// An early check for a partially received message of `full_len` bytes whose encoding
/// starts like `sample` (magic, version, kind): rejects as soon as the received bytes
/// disagree, explaining why in the codec's own words.
pub fn prefix_check(
    sample: &[u8],
    full_len: usize,
    decode: fn(&[u8]) -> Result<(), String>,
) -> impl Fn(&[u8]) -> Option<String> + use<> {
    let prefix: [u8; 6] = sample[..6].try_into().expect("6-byte prefix");
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
            Err(e) => e,
            Ok(()) => format!("unexpected bytes {:02x?}", &got[..n]),
        })
    }
}

/// The Hello's tag for `nonce` under `key` in `domain` (zeros without a key).
pub fn hello_tag(domain: &str, key: Option<&AuthKey>, nonce: &[u8; 16], hello: &Hello) -> [u8; 32] {
    auth::tag_opt(key, domain, &[nonce, &hello.signed_part()])
}

/// Acceptor, steps 1-2: send the challenge and read a well-formed Hello.
pub fn acceptor_read_hello(sock: &impl AsFd, nonce: [u8; 16], deadline: Instant) -> Result<Hello, Stop> {
    write_all_by(sock, &Challenge { nonce }.encode(), deadline)?;
    let mut buf = [0u8; HELLO_LEN];
    let sample =
        Hello { transport: 0, comm: CommId::default(), from: Rank(0), to: Rank(0), lane: 0, lanes: 0, auth: [0; 32] };
    let check = prefix_check(&sample.encode(), HELLO_LEN, |b| Hello::decode(b).map(drop).map_err(|e| codec_error(&e)));
    read_exact_by(sock, &mut buf, deadline, check)?;
    Hello::decode(&buf).map_err(|e| Stop::Invalid(codec_error(&e)))
}

/// Acceptor, step 3: is this Hello for us? `lanes_ok` judges the lane fields (transports
/// differ); duplicate connections are the caller's check, under its lock.
pub fn judge_hello(
    domain: &str,
    kind: TransportKind,
    lanes_ok: impl Fn(u16, u16) -> Option<String>,
    ctx: &CommContext,
    nonce: &[u8; 16],
    h: &Hello,
) -> (VerdictStatus, String) {
    // Authentication first: with a different secret every other field is untrustworthy,
    // and "DEVCCL_SECRET differs" is the most useful thing to tell either side.
    if !auth::verify_opt(ctx.key.as_ref(), domain, &[nonce, &h.signed_part()], &h.auth) {
        let why = if ctx.key.is_none() {
            "the peer sent an auth tag but this rank has no DEVCCL_SECRET"
        } else {
            "auth tag does not verify (DEVCCL_SECRET differs or is unset on the peer)"
        };
        return (VerdictStatus::BadAuth, why.into());
    }
    if h.transport != kind as u8 {
        return (VerdictStatus::WrongComm, format!("Hello is for transport code {}, not {kind}", h.transport));
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
    if let Some(why) = lanes_ok(h.lane, h.lanes) {
        return (VerdictStatus::BadLane, why);
    }
    (VerdictStatus::Ok, String::new())
}

/// Connector: read the challenge, send `hello` with its tag, read the verdict. Errors say
/// at which message (`challenge`, `hello`, `verdict`) the exchange stopped.
pub fn connector_exchange(
    sock: &impl AsFd,
    domain: &str,
    key: Option<&AuthKey>,
    mut hello: Hello,
    deadline: Instant,
) -> Result<VerdictStatus, (&'static str, Stop)> {
    let mut cbuf = [0u8; CHALLENGE_LEN];
    let check = prefix_check(&Challenge { nonce: [0; 16] }.encode(), CHALLENGE_LEN, |b| {
        Challenge::decode(b).map(drop).map_err(|e| codec_error(&e))
    });
    read_exact_by(sock, &mut cbuf, deadline, check).map_err(|s| ("challenge", s))?;
    let challenge = Challenge::decode(&cbuf).map_err(|e| ("challenge", Stop::Invalid(codec_error(&e))))?;
    hello.auth = hello_tag(domain, key, &challenge.nonce, &hello);
    write_all_by(sock, &hello.encode(), deadline).map_err(|s| ("hello", s))?;
    let mut vbuf = [0u8; VERDICT_LEN];
    let check = prefix_check(&Verdict { status: VerdictStatus::Ok }.encode(), VERDICT_LEN, |b| {
        Verdict::decode(b).map(drop).map_err(|e| codec_error(&e))
    });
    read_exact_by(sock, &mut vbuf, deadline, check).map_err(|s| ("verdict", s))?;
    Verdict::decode(&vbuf).map(|v| v.status).map_err(|e| ("verdict", Stop::Invalid(codec_error(&e))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn ctx(key: Option<&str>) -> CommContext {
        CommContext { comm: CommId([7; 16]), rank: Rank(1), world: 4, key: key.map(AuthKey::from_secret) }
    }

    #[test]
    fn judge_rejects_what_is_not_for_us() {
        let nonce = [3u8; 16];
        let mk = |key: Option<&str>, f: &dyn Fn(&mut Hello)| {
            let mut h = Hello {
                transport: TransportKind::Tcp as u8,
                comm: CommId([7; 16]),
                from: Rank(0),
                to: Rank(1),
                lane: 0,
                lanes: 1,
                auth: [0; 32],
            };
            f(&mut h);
            h.auth = hello_tag("d", key.map(AuthKey::from_secret).as_ref(), &nonce, &h);
            h
        };
        let judge = |c: &CommContext, h: &Hello| judge_hello("d", TransportKind::Tcp, |_, _| None, c, &nonce, h).0;
        assert_eq!(judge(&ctx(None), &mk(None, &|_| {})), VerdictStatus::Ok);
        assert_eq!(judge(&ctx(Some("s")), &mk(Some("s"), &|_| {})), VerdictStatus::Ok);
        assert_eq!(judge(&ctx(Some("s")), &mk(Some("t"), &|_| {})), VerdictStatus::BadAuth);
        assert_eq!(judge(&ctx(None), &mk(Some("s"), &|_| {})), VerdictStatus::BadAuth);
        assert_eq!(judge(&ctx(None), &mk(None, &|h| h.transport = TransportKind::Shm as u8)), VerdictStatus::WrongComm);
        assert_eq!(judge(&ctx(None), &mk(None, &|h| h.comm = CommId([8; 16]))), VerdictStatus::WrongComm);
        assert_eq!(judge(&ctx(None), &mk(None, &|h| h.to = Rank(2))), VerdictStatus::WrongRank);
        assert_eq!(judge(&ctx(None), &mk(None, &|h| h.from = Rank(1))), VerdictStatus::WrongRank);
        assert_eq!(judge(&ctx(None), &mk(None, &|h| h.from = Rank(9))), VerdictStatus::WrongRank);
        let lanes = |l: u16, n: u16| (l >= n).then(|| "bad".to_string());
        let h = mk(None, &|h| h.lane = 1);
        assert_eq!(judge_hello("d", TransportKind::Tcp, lanes, &ctx(None), &nonce, &h).0, VerdictStatus::BadLane);
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
        let check =
            prefix_check(&sample.encode(), HELLO_LEN, |b| Hello::decode(b).map(drop).map_err(|e| codec_error(&e)));
        assert_eq!(check(b"DV"), None, "a matching prefix waits for more");
        assert!(check(b"GET / HTTP/1.1\r\n").unwrap().contains("magic"));
        assert!(check(&[0x16, 0x03, 0x01]).unwrap().contains("magic"), "TLS ClientHello");
        assert!(check(b"DVCH\x09").unwrap().contains("version"));
        assert!(check(b"DVCH\x01\x01").unwrap().contains("kind"));
    }

    #[test]
    fn exchange_over_a_socket_pair_and_garbage_is_refused_early() {
        let (a, b) = UnixStream::pair().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let acceptor = std::thread::spawn(move || {
            let h = acceptor_read_hello(&a, [5; 16], deadline).unwrap();
            write_all_by(&a, &Verdict { status: VerdictStatus::WrongRank }.encode(), deadline).unwrap();
            h
        });
        let hello =
            Hello { transport: 1, comm: CommId([1; 16]), from: Rank(2), to: Rank(3), lane: 0, lanes: 1, auth: [0; 32] };
        let status = connector_exchange(&b, "d", Some(&AuthKey::from_secret("k")), hello, deadline).unwrap();
        assert_eq!(status, VerdictStatus::WrongRank);
        let got = acceptor.join().unwrap();
        assert_eq!(got.auth, hello_tag("d", Some(&AuthKey::from_secret("k")), &[5; 16], &hello));
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let _ = write_all_by(&b, b"GET / HTTP/1.1\r\n", deadline);
            std::thread::sleep(Duration::from_millis(500));
        });
        let t = Instant::now();
        match acceptor_read_hello(&a, [0; 16], deadline) {
            Err(Stop::Invalid(why)) => assert!(why.contains("magic"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_millis(400), "refused on the first bytes");
        let (a, _b) = UnixStream::pair().unwrap();
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(matches!(acceptor_read_hello(&a, [0; 16], soon), Err(Stop::Timeout)));
    }
}
