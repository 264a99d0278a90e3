//! Connection setup over the Unix socket, before any shared memory is trusted.
//!
//! ```text
//! acceptor                                connector
//!    |  Challenge{nonce}         ------->     |
//!    |  <-------  Hello{comm, from, to, lane 0 of 1, tag}
//!    |  Verdict{status}          ------->     |
//!    |  <-------  Setup{ring bytes} + SCM_RIGHTS [memfd, acceptor's bell, connector's bell]
//!    |  Ready{ok | refused}      ------->     |
//! ```
//!
//! The first three messages are the wire codec's ([`devccl_core::wire`]), the same as TCP's;
//! the tag is `HMAC(key, "devccl-shm-hello-v1", nonce, hello bytes 6..40)` when a secret is
//! configured, zeros otherwise. Only after an accepted Hello does the connector hand over its
//! shared memory, so an unauthenticated client never gets (or gives) a mapping. `Setup` and
//! `Ready` are this transport's own 24-byte messages:
//!
//! ```text
//! 0 4 magic "DVCS" | 4 1 version (1) | 5 1 kind (1 setup, 2 ready) | 6 1 status (ready: 0 ok,
//! 1 refused) | 7 1 reserved | 8 8 ring bytes, little-endian (setup) | 16 8 reserved
//! ```
//!
//! Every step is blocking I/O bounded by a deadline. The acceptor runs each handshake on its
//! own short-lived thread, so a silent or slow client holds only that thread.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use devccl_core::auth::AuthKey;
use devccl_core::handshake::{self as common, read_exact_by, ready_by};
pub(crate) use devccl_core::handshake::{
    Stop, accept_until_closed, acceptor_read_hello, spawn_handshake, write_all_by,
};
use devccl_core::transport::{CommContext, TransportKind};
use devccl_core::wire::{Hello, VerdictStatus};
use devccl_core::{Error, Rank, Result};
use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, sendmsg};

use crate::shm::adopt_received_fd;

/// Domain label of the Hello tag (distinct from TCP's, so a tag made for one transport
/// never verifies on the other).
pub const HELLO_DOMAIN: &str = "devccl-shm-hello-v1";

/// Length of the `Setup` and `Ready` messages.
pub(crate) const SETUP_LEN: usize = 24;
const SETUP_MAGIC: [u8; 4] = *b"DVCS";
const SETUP_VERSION: u8 = 1;
const KIND_SETUP: u8 = 1;
const KIND_READY: u8 = 2;
/// Descriptors a `Setup` carries: the memfd, the acceptor's doorbell, the connector's.
pub(crate) const SETUP_FDS: usize = 3;

/// The Hello's tag for `nonce` under `key` (zeros without a key).
pub fn hello_tag(key: Option<&AuthKey>, nonce: &[u8; 16], hello: &Hello) -> [u8; 32] {
    common::hello_tag(HELLO_DOMAIN, key, nonce, hello)
}

/// One socket per connection: the rings carry all traffic.
fn lanes_ok(lane: u16, lanes: u16) -> Option<String> {
    ((lane, lanes) != (0, 1)).then(|| format!("lane {lane} of {lanes} (shared memory uses exactly one)"))
}

/// Acceptor side, step 3: is this Hello for us? Duplicate connections are the caller's
/// check, under its lock.
pub(crate) fn judge_hello(ctx: &CommContext, nonce: &[u8; 16], h: &Hello) -> (VerdictStatus, String) {
    common::judge_hello(HELLO_DOMAIN, TransportKind::Shm, lanes_ok, ctx, nonce, h)
}

/// Which peer a connector is setting up, for the handshake and its error messages.
#[derive(Debug, Clone)]
pub(crate) struct Dial<'a> {
    /// The rank being connected to.
    pub peer: Rank,
    /// Its published address (for messages).
    pub remote: &'a str,
    /// When the whole connect must be done.
    pub deadline: Instant,
    /// The connect's total time allowance (for timeout messages).
    pub limit: Duration,
}

impl Dial<'_> {
    /// The error for a failed step.
    pub(crate) fn fail(&self, me: Rank, stage: &str, s: Stop) -> Error {
        let Dial { peer, remote, limit, .. } = *self;
        match s {
            Stop::Timeout => Error::Timeout {
                what: format!("rank {me} connecting to rank {peer} at {remote} over shared memory: {stage}"),
                after: limit,
            },
            other => Error::remote(
                peer,
                format!("shared-memory handshake with rank {peer} at {remote} failed: {}", other.describe(stage)),
            ),
        }
    }
}

/// Connector side: answer the challenge on a freshly connected socket and read the verdict.
pub(crate) fn connector_handshake(sock: &UnixStream, ctx: &CommContext, dial: &Dial<'_>) -> Result<()> {
    let (peer, deadline) = (dial.peer, dial.deadline);
    let hello = Hello {
        transport: TransportKind::Shm as u8,
        comm: ctx.comm,
        from: ctx.rank,
        to: peer,
        lane: 0,
        lanes: 1,
        auth: [0; 32],
    };
    let status = common::connector_exchange(sock, HELLO_DOMAIN, ctx.key.as_ref(), hello, deadline)
        .map_err(|(stage, s)| dial.fail(ctx.rank, stage, s))?;
    if status != VerdictStatus::Ok {
        return Err(Error::remote(
            peer,
            format!(
                "rank {peer} at {} refused the shared-memory connection from rank {}: {}",
                dial.remote,
                ctx.rank,
                status.explain()
            ),
        ));
    }
    Ok(())
}

/// Encode a `Setup` (ring size) or `Ready` (status) message.
fn encode_setup(kind: u8, status: u8, ring: u64) -> [u8; SETUP_LEN] {
    let mut b = [0u8; SETUP_LEN];
    b[0..4].copy_from_slice(&SETUP_MAGIC);
    b[4] = SETUP_VERSION;
    b[5] = kind;
    b[6] = status;
    b[8..16].copy_from_slice(&ring.to_le_bytes());
    b
}

/// Check the fixed prefix of a `Setup`/`Ready` message of `kind`, complete or partial.
fn check_setup_prefix(b: &[u8], kind: u8) -> Option<String> {
    let want = [SETUP_MAGIC[0], SETUP_MAGIC[1], SETUP_MAGIC[2], SETUP_MAGIC[3], SETUP_VERSION, kind];
    let n = b.len().min(want.len());
    if b[..n] == want[..n] {
        return None;
    }
    Some(if b[..n.min(4)] != SETUP_MAGIC[..n.min(4)] {
        format!("bad magic {:02x?} in the shared-memory setup", &b[..n.min(4)])
    } else if n > 4 && b[4] != SETUP_VERSION {
        format!("shared-memory setup version {} (this build speaks {SETUP_VERSION})", b[4])
    } else {
        format!("shared-memory setup message kind {} (expected {kind})", b[5])
    })
}

/// Connector side: hand over the memfd and both doorbells, then wait for the acceptor to
/// confirm it mapped them.
pub(crate) fn connector_setup(
    sock: &UnixStream,
    me: Rank,
    dial: &Dial<'_>,
    ring: usize,
    fds: [BorrowedFd<'_>; SETUP_FDS],
) -> Result<()> {
    let msg = encode_setup(KIND_SETUP, 0, ring as u64);
    let raw: [RawFd; SETUP_FDS] = fds.map(|f| f.as_raw_fd());
    // The descriptors ride on the first byte; a 24-byte message into a fresh socket's empty
    // buffer is never split in practice, but the remainder is written if it is.
    let sent = loop {
        ready_by(sock, PollFlags::POLLOUT, dial.deadline).map_err(|s| dial.fail(me, "setup", s))?;
        match sendmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &[IoSlice::new(&msg)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(n) => break n,
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => return Err(dial.fail(me, "setup", Stop::Io(e.into()))),
        }
    };
    write_all_by(sock, &msg[sent..], dial.deadline).map_err(|s| dial.fail(me, "setup", s))?;
    let mut buf = [0u8; SETUP_LEN];
    read_exact_by(sock, &mut buf, dial.deadline, |b| check_setup_prefix(b, KIND_READY))
        .map_err(|s| dial.fail(me, "setup confirmation", s))?;
    match buf[6] {
        0 => Ok(()),
        _ => Err(Error::remote(
            dial.peer,
            format!("rank {} at {} could not map this rank's shared memory (its log says why)", dial.peer, dial.remote),
        )),
    }
}

/// Acceptor side: read the `Setup` message and the descriptors that came with it.
pub(crate) fn acceptor_read_setup(
    sock: &UnixStream,
    deadline: Instant,
) -> std::result::Result<(usize, [OwnedFd; SETUP_FDS]), Stop> {
    let mut buf = [0u8; SETUP_LEN];
    let mut got = 0;
    let mut fds: Vec<OwnedFd> = Vec::new();
    while got < SETUP_LEN {
        ready_by(sock, PollFlags::POLLIN, deadline)?;
        let mut space = nix::cmsg_space!([RawFd; SETUP_FDS + 1]);
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let flags = MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT;
        let msg = match recvmsg::<UnixAddr>(sock.as_raw_fd(), &mut iov, Some(&mut space), flags) {
            Ok(m) => m,
            Err(Errno::EINTR | Errno::EAGAIN) => continue,
            Err(e) => return Err(Stop::Io(e.into())),
        };
        // Adopt every received descriptor before anything can fail, so none leaks.
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let n = msg.bytes;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(v) = c {
                    fds.extend(v.into_iter().map(adopt_received_fd));
                }
            }
        }
        if truncated {
            return Err(Stop::Invalid("more descriptors than a shared-memory setup carries".into()));
        }
        if n == 0 {
            return Err(Stop::Eof { got });
        }
        got += n;
        if let Some(why) = check_setup_prefix(&buf[..got], KIND_SETUP) {
            return Err(Stop::Invalid(why));
        }
    }
    let ring = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    let ring =
        usize::try_from(ring).map_err(|_| Stop::Invalid(format!("ring size {ring} does not fit this machine")))?;
    let n = fds.len();
    let fds: [OwnedFd; SETUP_FDS] = fds
        .try_into()
        .map_err(|_| Stop::Invalid(format!("shared-memory setup carried {n} descriptors, expected {SETUP_FDS}")))?;
    Ok((ring, fds))
}

/// Acceptor side: confirm (or refuse) the setup.
pub(crate) fn acceptor_ready(sock: &UnixStream, ok: bool, deadline: Instant) -> std::result::Result<(), Stop> {
    write_all_by(sock, &encode_setup(KIND_READY, u8::from(!ok), 0), deadline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devccl_core::CommId;

    fn ctx(key: Option<&str>) -> CommContext {
        CommContext { comm: CommId([7; 16]), rank: Rank(1), world: 3, key: key.map(AuthKey::from_secret) }
    }

    fn hello(key: Option<&str>, nonce: &[u8; 16]) -> Hello {
        let mut h = Hello {
            transport: TransportKind::Shm as u8,
            comm: CommId([7; 16]),
            from: Rank(0),
            to: Rank(1),
            lane: 0,
            lanes: 1,
            auth: [0; 32],
        };
        h.auth = hello_tag(key.map(AuthKey::from_secret).as_ref(), nonce, &h);
        h
    }

    #[test]
    fn judge_accepts_and_rejects() {
        let n = [3u8; 16];
        let judge = |c: &CommContext, h: &Hello| judge_hello(c, &n, h).0;
        assert_eq!(judge(&ctx(None), &hello(None, &n)), VerdictStatus::Ok);
        assert_eq!(judge(&ctx(Some("s")), &hello(Some("s"), &n)), VerdictStatus::Ok);
        assert_eq!(judge(&ctx(Some("s")), &hello(Some("t"), &n)), VerdictStatus::BadAuth);
        assert_eq!(judge(&ctx(Some("s")), &hello(None, &n)), VerdictStatus::BadAuth);
        assert_eq!(judge(&ctx(None), &hello(Some("s"), &n)), VerdictStatus::BadAuth);
        assert_eq!(
            judge_hello(&ctx(Some("s")), &[4; 16], &hello(Some("s"), &n)).0,
            VerdictStatus::BadAuth,
            "nonce is bound"
        );
        // A TCP Hello (even one with a valid TCP tag layout) is not for us.
        let mut h = hello(None, &n);
        h.transport = TransportKind::Tcp as u8;
        assert_eq!(judge(&ctx(None), &h), VerdictStatus::WrongComm);
        let mut h = hello(None, &n);
        h.comm = CommId([8; 16]);
        assert_eq!(judge(&ctx(None), &h), VerdictStatus::WrongComm);
        let mut h = hello(None, &n);
        h.to = Rank(2);
        assert_eq!(judge(&ctx(None), &h), VerdictStatus::WrongRank);
        for from in [1, 3, 99] {
            let mut h = hello(None, &n);
            h.from = Rank(from);
            assert_eq!(judge(&ctx(None), &h), VerdictStatus::WrongRank);
        }
        for (lane, lanes) in [(1, 2), (0, 2), (0, 0)] {
            let mut h = hello(None, &n);
            (h.lane, h.lanes) = (lane, lanes);
            assert_eq!(judge(&ctx(None), &h), VerdictStatus::BadLane);
        }
    }

    #[test]
    fn tag_is_domain_separated_from_tcp() {
        let n = [9u8; 16];
        let h = hello(Some("k"), &n);
        let key = AuthKey::from_secret("k");
        let tcp_tag = key.tag("devccl-tcp-hello-v1", &[&n, &h.signed_part()]);
        assert_ne!(tcp_tag, h.auth);
    }

    #[test]
    fn setup_prefix_check() {
        let s = encode_setup(KIND_SETUP, 0, 4096);
        assert_eq!(check_setup_prefix(&s, KIND_SETUP), None);
        assert_eq!(check_setup_prefix(&s[..3], KIND_SETUP), None);
        assert!(check_setup_prefix(&s, KIND_READY).unwrap().contains("kind"));
        assert!(check_setup_prefix(b"GET /", KIND_SETUP).unwrap().contains("magic"));
        assert!(check_setup_prefix(b"DVCS\x07", KIND_SETUP).unwrap().contains("version"));
    }

    #[test]
    fn fds_travel_with_the_setup() {
        use std::os::fd::AsFd;
        let (a, b) = UnixStream::pair().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let (map, memfd) = crate::shm::Mapping::create(8192).unwrap();
        let e1 = nix::sys::eventfd::EventFd::new().unwrap();
        let e2 = nix::sys::eventfd::EventFd::new().unwrap();
        let dial = Dial { peer: Rank(1), remote: "test", deadline, limit: Duration::from_secs(5) };
        std::thread::scope(|s| {
            let acc = s.spawn(|| {
                let (ring, fds) = acceptor_read_setup(&b, deadline).unwrap();
                assert_eq!(ring, 8192);
                let m = crate::shm::Mapping::open(&fds[0], ring).unwrap();
                acceptor_ready(&b, true, deadline).unwrap();
                m
            });
            connector_setup(&a, Rank(0), &dial, 8192, [memfd.as_fd(), e1.as_fd(), e2.as_fd()]).unwrap();
            let m = acc.join().unwrap();
            map.write(crate::shm::RingId::ToAcceptor, 0, b"hello");
            let mut got = [0u8; 5];
            m.read(crate::shm::RingId::ToAcceptor, 0, &mut got);
            assert_eq!(&got, b"hello");
        });
    }
}
