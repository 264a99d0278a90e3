//! Helpers shared by the integration tests: transports, connected pairs, a hand-rolled
//! client for feeding a listener exactly the bytes a test wants, and child processes that
//! act as the peer.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::time::{Duration, Instant};

use devccl_core::auth::AuthKey;
use devccl_core::testing::conformance::Pair;
use devccl_core::transport::{CommContext, Transport, TransportKind};
use devccl_core::wire::{CHALLENGE_LEN, Challenge, Hello, VERDICT_LEN, Verdict};
use devccl_core::{CommId, Rank};
use devccl_transport_shm::{ShmOptions, ShmTransport, hello_tag};

pub const COMM: CommId = CommId([0x42; 16]);

pub fn far() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// Route the transport's logs (rejections are warnings) to the test output;
/// `RUST_LOG=debug` shows more.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// A transport for `rank` with `ring` bytes per ring and short handshake timeouts (silent
/// clients are dropped quickly in tests).
pub fn transport(rank: u32, ring: usize) -> ShmTransport {
    init_logs();
    let mut o = ShmOptions::new(Rank(rank));
    o.ring_bytes = ring;
    o.handshake_timeout = Duration::from_millis(500);
    o.activation_timeout = Duration::from_secs(10);
    ShmTransport::new(o).expect("listen")
}

pub fn ctx(comm: CommId, rank: u32, world: usize, secret: Option<&str>) -> CommContext {
    CommContext { comm, rank: Rank(rank), world, key: secret.map(AuthKey::from_secret) }
}

/// Rank 0 connects to rank 1 with rings of `ring` bytes; both transports are dropped
/// afterwards (connections outlive them).
pub fn pair(ring: usize) -> Pair {
    let t0 = transport(0, ring);
    let t1 = transport(1, ring);
    t0.activate(ctx(COMM, 0, 2, Some("s3cret"))).unwrap();
    t1.activate(ctx(COMM, 1, 2, Some("s3cret"))).unwrap();
    connect_pair(&t0, &t1)
}

/// Connect `t0` (rank 0) to `t1` (rank 1).
pub fn connect_pair(t0: &ShmTransport, t1: &ShmTransport) -> Pair {
    std::thread::scope(|s| {
        let acc = s.spawn(|| t1.accept(Rank(0), far()).expect("accept"));
        let a = t0.connect(Rank(1), &t1.endpoint(), far()).expect("connect");
        (a, acc.join().unwrap())
    })
}

/// Wait until `f` holds (bounded).
pub fn eventually(what: &str, limit: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Open a plain connection to a transport's abstract socket.
pub fn dial(t: &ShmTransport) -> UnixStream {
    let name = t.address().strip_prefix("unix:@").expect("abstract address");
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let s = UnixStream::connect_addr(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// A hand-made connector: does the handshake and returns the stream and the verdict byte
/// (0 = accepted). No shared memory is set up.
pub fn raw_handshake(t: &ShmTransport, hello: Hello, secret: Option<&str>) -> (UnixStream, u8) {
    let mut s = dial(t);
    let mut c = [0u8; CHALLENGE_LEN];
    s.read_exact(&mut c).unwrap();
    let nonce = Challenge::decode(&c).unwrap().nonce;
    let mut h = hello;
    h.auth = hello_tag(secret.map(AuthKey::from_secret).as_ref(), &nonce, &h);
    s.write_all(&h.encode()).unwrap();
    let mut v = [0u8; VERDICT_LEN];
    s.read_exact(&mut v).unwrap();
    let status = Verdict::decode(&v).unwrap().status as u8;
    (s, status)
}

pub fn hello(from: u32, to: u32) -> Hello {
    Hello {
        transport: TransportKind::Shm as u8,
        comm: COMM,
        from: Rank(from),
        to: Rank(to),
        lane: 0,
        lanes: 1,
        auth: [0; 32],
    }
}
