//! Helpers shared by the integration tests: transports on loopback, connected pairs, and a
//! hand-rolled connector for feeding a listener exactly the bytes a test wants.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use devccl_core::auth::AuthKey;
use devccl_core::testing::conformance::Pair;
use devccl_core::transport::{CommContext, Transport, TransportKind};
use devccl_core::wire::{CHALLENGE_LEN, Challenge, Hello, VERDICT_LEN, Verdict};
use devccl_core::{CommId, Rank};
use devccl_transport_tcp::{TcpOptions, TcpTransport, hello_tag};

pub const COMM: CommId = CommId([0x42; 16]);

pub fn v4() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

pub fn v6() -> IpAddr {
    "::1".parse().unwrap()
}

pub fn far() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// Route the transport's logs (rejections are warnings) to the test output;
/// `RUST_LOG=debug` shows more.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// A transport for `rank` on `addr` with short handshake timeouts (silent clients are
/// dropped quickly in tests).
pub fn transport(addr: IpAddr, rank: u32, lanes: usize) -> TcpTransport {
    init_logs();
    let mut o = TcpOptions::new(addr, Rank(rank));
    o.lanes = lanes;
    o.handshake_timeout = Duration::from_millis(500);
    o.activation_timeout = Duration::from_secs(10);
    TcpTransport::new(o).expect("listen on loopback")
}

pub fn ctx(comm: CommId, rank: u32, world: usize, secret: Option<&str>) -> CommContext {
    CommContext { comm, rank: Rank(rank), world, key: secret.map(AuthKey::from_secret) }
}

/// Rank 0 connects to rank 1 over `addr` with `lanes` sockets; both transports are dropped
/// afterwards (connections outlive them).
pub fn pair_on(addr: IpAddr, lanes: usize) -> Pair {
    let t0 = transport(addr, 0, lanes);
    let t1 = transport(addr, 1, lanes);
    t0.activate(ctx(COMM, 0, 2, Some("s3cret"))).unwrap();
    t1.activate(ctx(COMM, 1, 2, Some("s3cret"))).unwrap();
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

/// A hand-made connector: does the handshake with std sockets and returns the stream and
/// the verdict byte (0 = accepted).
pub fn raw_connect(to: SocketAddr, hello: Hello, secret: Option<&str>) -> (TcpStream, u8) {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
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

pub fn hello(from: u32, to: u32, lane: u16, lanes: u16) -> Hello {
    Hello {
        transport: TransportKind::Tcp as u8,
        comm: COMM,
        from: Rank(from),
        to: Rank(to),
        lane,
        lanes,
        auth: [0; 32],
    }
}
