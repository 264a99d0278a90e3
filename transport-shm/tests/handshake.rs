//! Connection setup: authentication, communicator and rank checks, garbage at the listening
//! socket, invalid shared-memory setups, activation order, locality and timeouts.

mod common;

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::*;
use devccl_core::memory::Region;
use devccl_core::testing::conformance::{Pair, drive, header, pattern};
use devccl_core::transport::{Connection, Endpoint, RecvRequest, SendRequest, Transport, TransportKind};
use devccl_core::wire::{CHALLENGE_LEN, HELLO_LEN, VerdictStatus};
use devccl_core::{CommId, Error, Rank};
use devccl_transport_shm::{DEFAULT_RING_BYTES, ShmOptions, ShmTransport};
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};

/// Send one message each way and check the bytes.
fn exchange(a: &mut Box<dyn Connection>, b: &mut Box<dyn Connection>, seq: u64, len: usize) {
    let (s1, s2) = (Region::from_vec(pattern(seq, len)), Region::from_vec(pattern(seq + 1000, len)));
    let (d1, d2) = (Region::alloc(len), Region::alloc(len));
    let h = header(seq, 0, len);
    let r1 = b.irecv(RecvRequest { expect: h, dst: d1.full() }).unwrap().unwrap();
    let r2 = a.irecv(RecvRequest { expect: h, dst: d2.full() }).unwrap().unwrap();
    let w1 = a.isend(SendRequest { header: h, src: s1.full() }).unwrap().unwrap();
    let w2 = b.isend(SendRequest { header: h, src: s2.full() }).unwrap().unwrap();
    drive(&mut [a, b], &[(1, r1), (0, r2), (0, w1), (1, w2)], Duration::from_secs(20)).unwrap();
    assert_eq!(d1.full().to_vec().unwrap(), pattern(seq, len));
    assert_eq!(d2.full().to_vec().unwrap(), pattern(seq + 1000, len));
}

fn exchange_pair(p: &mut Pair, seq: u64, len: usize) {
    let (a, b) = p;
    exchange(a, b, seq, len);
}

#[test]
fn endpoint_properties_and_counters() {
    let t = transport(0, 64 << 10);
    let e = t.endpoint();
    assert_eq!(e.kind, TransportKind::Shm);
    assert!(e.address.starts_with("unix:@devccl-"), "{}", e.address);
    assert_eq!(e.address, t.address());
    let host = devccl_core::bootstrap::HostIdentity::local();
    assert_eq!(e.cap("host"), Some(host.hostname.as_str()));
    assert_eq!(e.cap("boot_id"), Some(host.boot_id.as_str()));
    assert!(e.cap("netns").is_some());
    assert_eq!(e.cap("ring_bytes"), Some("65536"));
    let p = t.properties();
    assert_eq!((p.lanes, p.max_inflight, p.scattered_rx, p.device_memory), (1, 64, false, false));
    assert!(p.name.starts_with("shm"), "{}", p.name);
    assert!(p.latency_us <= 2.0 && p.speed_mbps >= 10_000, "{p:?}");
    assert_eq!(t.counters(), vec![("rejected_handshakes", 0)]);
    // Two transports never share a name.
    assert_ne!(transport(0, 64 << 10).address(), t.address());
}

#[test]
fn invalid_ring_sizes_are_usage_errors() {
    for ring in [0, 3000, 2048, 1 << 31] {
        let mut o = ShmOptions::new(Rank(0));
        o.ring_bytes = ring;
        match ShmTransport::new(o) {
            Err(Error::InvalidUsage(m)) => assert!(m.contains("power of two"), "{m}"),
            other => panic!("ring {ring}: {other:?}"),
        }
    }
    assert_eq!(ShmOptions::new(Rank(3)).ring_bytes, DEFAULT_RING_BYTES);
}

/// Open a connection, write `bytes`, then either close it or hold it open for `hold`.
fn garbage(t: &ShmTransport, bytes: &[u8], hold: Duration) {
    let mut s = dial(t);
    let mut c = [0u8; CHALLENGE_LEN];
    s.read_exact(&mut c).unwrap();
    let _ = s.write_all(bytes);
    std::thread::sleep(hold);
}

#[test]
fn garbage_is_rejected_and_counted_while_real_connections_work() {
    // World of 3: rank 0 connects before the garbage, rank 2 after it.
    let t0 = transport(0, 64 << 10);
    let t1 = transport(1, 64 << 10);
    let t2 = transport(2, 64 << 10);
    t0.activate(ctx(COMM, 0, 3, None)).unwrap();
    t1.activate(ctx(COMM, 1, 3, None)).unwrap();
    t2.activate(ctx(COMM, 2, 3, None)).unwrap();
    let mut p01 = connect_pair(&t0, &t1);
    let hello_bytes = hello(2, 1).encode();
    std::thread::scope(|s| {
        // Random bytes.
        s.spawn(|| garbage(&t1, &pattern(7, 300), Duration::ZERO));
        // An HTTP request.
        s.spawn(|| garbage(&t1, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Duration::ZERO));
        // A TLS ClientHello's first bytes.
        s.spawn(|| garbage(&t1, &[0x16, 0x03, 0x01, 0x02, 0x00], Duration::ZERO));
        // A truncated Hello, then close.
        s.spawn(|| garbage(&t1, &hello_bytes[..30], Duration::ZERO));
        // A truncated Hello, then silence past the 500 ms handshake deadline.
        s.spawn(|| garbage(&t1, &hello_bytes[..HELLO_LEN - 1], Duration::from_millis(900)));
        // Nothing at all, then close.
        s.spawn(|| garbage(&t1, &[], Duration::ZERO));
        // While they are refused, the established connection carries data.
        exchange_pair(&mut p01, 1, 100_000);
    });
    eventually("6 rejections", Duration::from_secs(5), || t1.rejected_handshakes() == 6);
    assert_eq!(t1.counters(), vec![("rejected_handshakes", 6)]);
    // A new connection still works, and so does the old one.
    let mut p21 = std::thread::scope(|s| {
        let acc = s.spawn(|| t1.accept(Rank(2), far()).unwrap());
        let a = t2.connect(Rank(1), &t1.endpoint(), far()).unwrap();
        (a, acc.join().unwrap())
    });
    exchange_pair(&mut p21, 2, 5000);
    exchange_pair(&mut p01, 3, 1 << 20);
    assert_eq!(t1.rejected_handshakes(), 6);
}

/// Encode a `Setup` message by hand (the layout documented in the handshake module).
fn setup_bytes(ring: u64) -> Vec<u8> {
    let mut b = b"DVCS\x01\x01\x00\x00".to_vec();
    b.extend(ring.to_le_bytes());
    b.extend([0u8; 8]);
    b
}

/// After an accepted Hello, send a `Setup` with `fds` attached and return the `Ready`
/// status byte (None when the acceptor just closed).
fn raw_setup(t: &ShmTransport, from: u32, msg: &[u8], fds: &[OwnedFd]) -> Option<u8> {
    let (mut s, st) = raw_handshake(t, hello(from, 1), None);
    assert_eq!(st, VerdictStatus::Ok as u8);
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = if raw.is_empty() { vec![] } else { vec![ControlMessage::ScmRights(&raw)] };
    sendmsg::<UnixAddr>(s.as_raw_fd(), &[IoSlice::new(msg)], &cmsgs, MsgFlags::empty(), None).unwrap();
    let mut ready = [0u8; 24];
    match s.read_exact(&mut ready) {
        Ok(()) => {
            assert_eq!(&ready[..6], b"DVCS\x01\x02");
            Some(ready[6])
        }
        Err(_) => None,
    }
}

fn pipe_fds(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| {
            let (r, _w) = nix::unistd::pipe().unwrap();
            r
        })
        .collect()
}

fn memfd(len: usize, seal: bool) -> OwnedFd {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(c"t", MFdFlags::MFD_ALLOW_SEALING).unwrap();
    nix::unistd::ftruncate(&fd, len as i64).unwrap();
    if seal {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).unwrap();
    }
    fd
}

fn eventfd() -> OwnedFd {
    nix::sys::eventfd::EventFd::new().unwrap().into()
}

#[test]
fn invalid_setups_are_refused_and_counted() {
    let t1 = transport(1, 4096);
    t1.activate(ctx(COMM, 1, 2, None)).unwrap();
    let ring = 64u64 << 10;
    let len = 4096 + 2 * ring as usize;
    // No descriptors at all: the acceptor closes.
    assert_eq!(raw_setup(&t1, 0, &setup_bytes(ring), &[]), None);
    // Three pipes instead of a memfd and two eventfds.
    assert_eq!(raw_setup(&t1, 0, &setup_bytes(ring), &pipe_fds(3)), Some(1));
    // An unsealed memfd (it could shrink under the acceptor's mapping).
    assert_eq!(raw_setup(&t1, 0, &setup_bytes(ring), &[memfd(len, false), eventfd(), eventfd()]), Some(1));
    // A sealed memfd of the wrong size for the ring.
    assert_eq!(raw_setup(&t1, 0, &setup_bytes(ring), &[memfd(len - 4096, true), eventfd(), eventfd()]), Some(1));
    // Right size, but never initialised (bad magic in the control page).
    assert_eq!(raw_setup(&t1, 0, &setup_bytes(ring), &[memfd(len, true), eventfd(), eventfd()]), Some(1));
    // A valid-looking memfd with pipes for doorbells.
    let mut fds = vec![memfd(len, true)];
    fds.extend(pipe_fds(2));
    assert_eq!(raw_setup(&t1, 0, &setup_bytes(ring), &fds), Some(1));
    // A ring size that is not a power of two.
    assert_eq!(raw_setup(&t1, 0, &setup_bytes(5000), &[memfd(len, true), eventfd(), eventfd()]), Some(1));
    // A setup message of the wrong kind.
    let mut wrong = setup_bytes(ring);
    wrong[5] = 2;
    assert_eq!(raw_setup(&t1, 0, &wrong, &[]), None);
    eventually("8 rejections", Duration::from_secs(5), || t1.rejected_handshakes() == 8);
    // Rank 0's failed attempts did not use up its slot: the real connection works.
    let t0 = transport(0, 64 << 10);
    t0.activate(ctx(COMM, 0, 2, None)).unwrap();
    let mut p = connect_pair(&t0, &t1);
    exchange_pair(&mut p, 1, 200_000);
}

#[test]
fn wrong_secret_is_refused_naming_devccl_secret() {
    for (s0, s1) in [(Some("a"), Some("b")), (None, Some("b")), (Some("a"), None)] {
        let t0 = transport(0, 4096);
        let t1 = transport(1, 4096);
        t0.activate(ctx(COMM, 0, 2, s0)).unwrap();
        t1.activate(ctx(COMM, 1, 2, s1)).unwrap();
        let e = t0.connect(Rank(1), &t1.endpoint(), far()).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, Error::Remote { peer: Some(Rank(1)), .. }), "{e:?}");
        assert!(m.contains("DEVCCL_SECRET"), "{m}");
        eventually("rejection", Duration::from_secs(5), || t1.rejected_handshakes() == 1);
        let e = t1.accept(Rank(0), Instant::now() + Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert!(e.to_string().contains("1 rejected handshakes"), "{e}");
    }
}

#[test]
fn wrong_communicator_rank_or_duplicate_is_refused() {
    let t1 = transport(1, 4096);
    t1.activate(ctx(COMM, 1, 3, None)).unwrap();
    let other = CommId([9; 16]);
    let t0 = transport(0, 4096);
    t0.activate(ctx(other, 0, 3, None)).unwrap();
    let e = t0.connect(Rank(1), &t1.endpoint(), far()).unwrap_err().to_string();
    assert!(e.contains("another communicator"), "{e}");
    // Addressed to rank 2 but the listener is rank 1.
    let (_s, st) = raw_handshake(&t1, hello(0, 2), None);
    assert_eq!(st, VerdictStatus::WrongRank as u8);
    // A rank outside the world, and the listener's own rank.
    assert_eq!(raw_handshake(&t1, hello(5, 1), None).1, VerdictStatus::WrongRank as u8);
    assert_eq!(raw_handshake(&t1, hello(1, 1), None).1, VerdictStatus::WrongRank as u8);
    // A TCP Hello at the shm socket.
    let mut h = hello(0, 1);
    h.transport = TransportKind::Tcp as u8;
    assert_eq!(raw_handshake(&t1, h, None).1, VerdictStatus::WrongComm as u8);
    // Two lanes.
    let mut h = hello(0, 1);
    h.lanes = 2;
    assert_eq!(raw_handshake(&t1, h, None).1, VerdictStatus::BadLane as u8);
    // A second connection from a rank that is already connected.
    let t0 = transport(0, 4096);
    t0.activate(ctx(COMM, 0, 3, None)).unwrap();
    let _p = connect_pair(&t0, &t1);
    let e = t0.connect(Rank(1), &t1.endpoint(), far()).unwrap_err().to_string();
    assert!(e.contains("refused"), "{e}");
    eventually("7 rejections", Duration::from_secs(5), || t1.rejected_handshakes() == 7);
}

#[test]
fn handshake_waits_for_activation() {
    let t0 = transport(0, 64 << 10);
    let t1 = transport(1, 64 << 10);
    t0.activate(ctx(COMM, 0, 2, Some("k"))).unwrap();
    let mut p = std::thread::scope(|s| {
        let a = s.spawn(|| t0.connect(Rank(1), &t1.endpoint(), far()).unwrap());
        std::thread::sleep(Duration::from_millis(300));
        t1.activate(ctx(COMM, 1, 2, Some("k"))).unwrap();
        let b = t1.accept(Rank(0), far()).unwrap();
        (a.join().unwrap(), b)
    });
    exchange_pair(&mut p, 1, 64);
    // Used before activation: a usage error, not a hang.
    let t2 = transport(0, 4096);
    assert!(matches!(t2.connect(Rank(1), &t1.endpoint(), far()), Err(Error::InvalidUsage(_))));
    assert!(t1.activate(ctx(COMM, 1, 2, None)).is_err(), "activated twice");
}

#[test]
fn peers_elsewhere_are_unsupported_with_the_reason() {
    let t0 = transport(0, 4096);
    let t1 = transport(1, 4096);
    t0.activate(ctx(COMM, 0, 2, None)).unwrap();
    t1.activate(ctx(COMM, 1, 2, None)).unwrap();
    for (key, words) in
        [("host", "another host"), ("boot_id", "another kernel boot"), ("netns", "another network namespace")]
    {
        let mut ep = t1.endpoint();
        for c in &mut ep.caps {
            if c.0 == key {
                c.1 = "elsewhere".into();
            }
        }
        match t0.connect(Rank(1), &ep, far()) {
            Err(Error::Unsupported { reason }) => {
                assert!(reason.contains(words) && reason.contains("rank 1"), "{reason}")
            }
            other => panic!("{key}: {other:?}"),
        }
    }
    // Wrong kind and malformed addresses.
    let mut ep = t1.endpoint();
    ep.kind = TransportKind::Tcp;
    assert!(matches!(t0.connect(Rank(1), &ep, far()), Err(Error::InvalidUsage(_))));
    let ep = Endpoint { kind: TransportKind::Shm, address: "127.0.0.1:5".into(), caps: vec![] };
    assert!(t0.connect(Rank(1), &ep, far()).unwrap_err().to_string().contains("invalid shm address"));
    // Without capabilities (an older peer) the address alone is used.
    let ep = Endpoint { kind: TransportKind::Shm, address: t1.address().into(), caps: vec![] };
    let mut p = std::thread::scope(|s| {
        let b = s.spawn(|| t1.accept(Rank(0), far()).unwrap());
        (t0.connect(Rank(1), &ep, far()).unwrap(), b.join().unwrap())
    });
    exchange_pair(&mut p, 1, 10);
}

#[test]
fn unreachable_and_silent_peers_time_out() {
    let t0 = transport(0, 4096);
    t0.activate(ctx(COMM, 0, 2, None)).unwrap();
    // A listener that went away.
    let gone = {
        let t = transport(1, 4096);
        t.endpoint()
    };
    let start = Instant::now();
    let e = t0.connect(Rank(1), &gone, Instant::now() + Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(e.to_string().contains("rank 0 connecting to rank 1"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(2));
    // A listener that never activates: the connector's deadline bounds the wait.
    let t1 = transport(1, 4096);
    let e = t0.connect(Rank(1), &t1.endpoint(), Instant::now() + Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    // accept() without a connector.
    let e = t1.accept(Rank(0), Instant::now() + Duration::from_millis(50)).unwrap_err();
    assert!(e.to_string().contains("waiting for rank 0"), "{e}");
}

#[test]
fn close_stops_the_listener() {
    let t1 = transport(1, 4096);
    t1.activate(ctx(COMM, 1, 2, None)).unwrap();
    let ep = t1.endpoint();
    t1.close();
    assert!(matches!(t1.accept(Rank(0), far()), Err(Error::InvalidUsage(_))));
    let t0 = transport(0, 4096);
    t0.activate(ctx(COMM, 0, 2, None)).unwrap();
    assert!(t0.connect(Rank(1), &ep, Instant::now() + Duration::from_millis(200)).is_err());
}
