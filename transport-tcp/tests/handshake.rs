//! Connection setup: authentication, communicator and rank checks, garbage at the listening
//! port, activation order, retries and timeouts.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use devccl_core::memory::Region;
use devccl_core::testing::conformance::{drive, header, pattern};
use devccl_core::transport::{Connection, Endpoint, RecvRequest, SendRequest, Transport, TransportKind};
use devccl_core::wire::{CHALLENGE_LEN, Challenge, VerdictStatus};
use devccl_core::{CommId, Error, Rank};

/// Send one message each way on a fresh pair and check the bytes.
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

#[test]
fn endpoint_and_properties() {
    let t = transport(v4(), 0, 3);
    let e = t.endpoint();
    assert_eq!(e.kind, TransportKind::Tcp);
    assert_eq!(e.address, format!("127.0.0.1:{}", t.local_addr().port()));
    assert_eq!(e.cap("lanes"), Some("3"));
    assert!(e.cap("host").is_some());
    assert_eq!(e.cap("ifname"), Some("lo"));
    let p = t.properties();
    assert_eq!((p.lanes, p.scattered_rx, p.device_memory), (3, false, false));
    assert!(p.name.contains("tcp lo 3 lanes"), "{}", p.name);
    if TcpListener::bind("[::1]:0").is_ok() {
        let t6 = transport(v6(), 0, 1);
        assert_eq!(t6.endpoint().address, format!("[::1]:{}", t6.local_addr().port()));
    }
    assert!(
        devccl_transport_tcp::TcpTransport::new(devccl_transport_tcp::TcpOptions::new(
            "0.0.0.0".parse().unwrap(),
            Rank(0)
        ))
        .is_err()
    );
}

#[test]
fn wrong_secret_is_refused_with_a_clear_error() {
    for (mine, theirs) in [(Some("alpha"), Some("beta")), (Some("alpha"), None), (None, Some("beta"))] {
        let t0 = transport(v4(), 0, 2);
        let t1 = transport(v4(), 1, 2);
        t0.activate(ctx(COMM, 0, 2, mine)).unwrap();
        t1.activate(ctx(COMM, 1, 2, theirs)).unwrap();
        let e = t0.connect(Rank(1), &t1.endpoint(), far()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Remote { peer: Some(Rank(1)), .. }), "{e:?}");
        assert!(msg.contains("DEVCCL_SECRET"), "{msg}");
        assert!(msg.contains(&t1.local_addr().to_string()), "names the address: {msg}");
        eventually("the rejection to be counted", Duration::from_secs(5), || t1.rejected_handshakes() == 1);
        // Nothing was handed to accept.
        assert!(matches!(t1.accept(Rank(0), Instant::now() + Duration::from_millis(50)), Err(Error::Timeout { .. })));
    }
}

#[test]
fn wrong_communicator_and_rank_are_refused() {
    let t0 = transport(v4(), 0, 1);
    let t1 = transport(v4(), 1, 1);
    t0.activate(ctx(CommId([9; 16]), 0, 2, None)).unwrap();
    t1.activate(ctx(COMM, 1, 2, None)).unwrap();
    let e = t0.connect(Rank(1), &t1.endpoint(), far()).unwrap_err().to_string();
    assert!(e.contains("another communicator"), "{e}");
    eventually("rejection counted", Duration::from_secs(5), || t1.rejected_handshakes() == 1);

    // Hand-made Hellos: addressed to another rank, from a rank outside the world, from
    // itself, a lane out of range.
    let to = t1.local_addr();
    let cases = [
        (hello(0, 2, 0, 1), VerdictStatus::WrongRank),
        (hello(5, 1, 0, 1), VerdictStatus::WrongRank),
        (hello(1, 1, 0, 1), VerdictStatus::WrongRank),
        (hello(0, 1, 3, 2), VerdictStatus::BadLane),
    ];
    for (i, (h, want)) in cases.into_iter().enumerate() {
        let (_s, status) = raw_connect(to, h, None);
        assert_eq!(status, want as u8, "case {i}");
        eventually("rejection counted", Duration::from_secs(5), || t1.rejected_handshakes() == 2 + i as u64);
    }
}

/// Garbage of every kind at the listening port, before and after the real peer connects:
/// each is refused and counted, and the real connection completes and carries data.
#[test]
fn garbage_clients_do_not_harm_the_communicator() {
    let t0 = transport(v4(), 0, 2);
    let t1 = transport(v4(), 1, 2);
    let to = t1.local_addr();
    let mut rejected = 0u64;
    let mut keep = Vec::new();
    let garbage = |keep: &mut Vec<TcpStream>| {
        // Random bytes.
        let mut s = TcpStream::connect(to).unwrap();
        let _ = s.write_all(&pattern(7, 300).iter().map(|b| b | 0x80).collect::<Vec<u8>>());
        keep.push(s);
        // An HTTP request.
        let mut s = TcpStream::connect(to).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
        keep.push(s);
        // A TLS ClientHello's first bytes.
        let mut s = TcpStream::connect(to).unwrap();
        let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]);
        keep.push(s);
        // A valid magic but a truncated Hello, then the client goes quiet (half-open).
        let mut s = TcpStream::connect(to).unwrap();
        let mut c = [0u8; CHALLENGE_LEN];
        s.read_exact(&mut c).unwrap();
        Challenge::decode(&c).unwrap();
        let _ = s.write_all(&hello(0, 1, 0, 2).encode()[..30]);
        keep.push(s);
        // The same, but the client closes its side.
        let mut s = TcpStream::connect(to).unwrap();
        let _ = s.write_all(&hello(0, 1, 0, 2).encode()[..40]);
        let _ = s.shutdown(std::net::Shutdown::Write);
        keep.push(s);
        // A client that connects and sends nothing at all.
        keep.push(TcpStream::connect(to).unwrap());
        6
    };
    rejected += garbage(&mut keep);
    t0.activate(ctx(COMM, 0, 2, Some("k"))).unwrap();
    t1.activate(ctx(COMM, 1, 2, Some("k"))).unwrap();
    let (mut a, mut b) = std::thread::scope(|s| {
        let acc = s.spawn(|| t1.accept(Rank(0), far()).unwrap());
        let a = t0.connect(Rank(1), &t1.endpoint(), far()).unwrap();
        (a, acc.join().unwrap())
    });
    exchange(&mut a, &mut b, 1, 100_000);
    rejected += garbage(&mut keep);
    exchange(&mut a, &mut b, 2, 8);
    // The silent and half-open ones are dropped at the 500 ms handshake deadline.
    eventually("all garbage rejected", Duration::from_secs(10), || t1.rejected_handshakes() == rejected);
    // The listener still serves: a second real peer (a fresh transport) can connect.
    let t2 = transport(v4(), 2, 1);
    t2.activate(ctx(COMM, 2, 4, Some("k"))).unwrap();
    let e = t2.connect(Rank(1), &t1.endpoint(), far()).unwrap_err().to_string();
    assert!(e.contains("not the rank we meant to reach"), "world mismatch is a rank error: {e}");
    exchange(&mut a, &mut b, 3, 1 << 20);
    drop(keep);
}

#[test]
fn incoming_connection_waits_for_activation() {
    let t0 = transport(v4(), 0, 3);
    let t1 = transport(v4(), 1, 3);
    t0.activate(ctx(COMM, 0, 2, None)).unwrap();
    let (mut a, mut b) = std::thread::scope(|s| {
        let conn = s.spawn(|| t0.connect(Rank(1), &t1.endpoint(), far()).unwrap());
        std::thread::sleep(Duration::from_millis(300));
        t1.activate(ctx(COMM, 1, 2, None)).unwrap();
        let b = t1.accept(Rank(0), far()).unwrap();
        (conn.join().unwrap(), b)
    });
    exchange(&mut a, &mut b, 1, 4096);
    assert_eq!(t1.rejected_handshakes(), 0);
}

#[test]
fn connect_retries_until_the_listener_appears() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let t0 = transport(v4(), 0, 2);
    t0.activate(ctx(COMM, 0, 2, None)).unwrap();
    let remote = Endpoint { kind: TransportKind::Tcp, address: format!("127.0.0.1:{port}"), caps: vec![] };
    std::thread::scope(|s| {
        let late = s.spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut o = devccl_transport_tcp::TcpOptions::new(v4(), Rank(1));
            o.port = port;
            let t1 = devccl_transport_tcp::TcpTransport::new(o).unwrap();
            t1.activate(ctx(COMM, 1, 2, None)).unwrap();
            t1.accept(Rank(0), far()).unwrap()
        });
        let mut a = t0.connect(Rank(1), &remote, far()).unwrap();
        let mut b = late.join().unwrap();
        exchange(&mut a, &mut b, 9, 10);
    });
}

#[test]
fn connect_and_accept_time_out_clearly() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let t0 = transport(v4(), 0, 1);
    t0.activate(ctx(COMM, 0, 2, None)).unwrap();
    let remote = Endpoint { kind: TransportKind::Tcp, address: format!("127.0.0.1:{port}"), caps: vec![] };
    let t = Instant::now();
    let e = t0.connect(Rank(1), &remote, Instant::now() + Duration::from_millis(400)).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3));
    let msg = e.to_string();
    assert!(matches!(e, Error::Timeout { .. }) && msg.contains("rank 1") && msg.contains("refused"), "{msg}");
    let e = t0.accept(Rank(1), Instant::now() + Duration::from_millis(100)).unwrap_err().to_string();
    assert!(e.contains("waiting for rank 1"), "{e}");
    let bad = Endpoint { kind: TransportKind::Tcp, address: "not an address".into(), caps: vec![] };
    assert!(t0.connect(Rank(1), &bad, far()).is_err());
    // A transport that is not activated refuses to connect.
    let t2 = transport(v4(), 2, 1);
    assert!(matches!(t2.connect(Rank(1), &remote, far()), Err(Error::InvalidUsage(_))));
}

#[test]
fn duplicate_lanes_and_second_connections_are_refused() {
    let t1 = transport(v4(), 1, 1);
    t1.activate(ctx(COMM, 1, 2, None)).unwrap();
    let to = t1.local_addr();
    let (_l0, st) = raw_connect(to, hello(0, 1, 0, 2), None);
    assert_eq!(st, VerdictStatus::Ok as u8);
    let (_dup, st) = raw_connect(to, hello(0, 1, 0, 2), None);
    assert_eq!(st, VerdictStatus::BadLane as u8, "duplicate lane");
    let (_other, st) = raw_connect(to, hello(0, 1, 1, 3), None);
    assert_eq!(st, VerdictStatus::BadLane as u8, "lane count disagrees with lane 0's");
    let (_l1, st) = raw_connect(to, hello(0, 1, 1, 2), None);
    assert_eq!(st, VerdictStatus::Ok as u8);
    let b = t1.accept(Rank(0), far()).unwrap();
    assert_eq!(b.peer(), Rank(0));
    let (_again, st) = raw_connect(to, hello(0, 1, 0, 1), None);
    assert_eq!(st, VerdictStatus::BadLane as u8, "rank 0 is already connected");
    eventually("rejections counted", Duration::from_secs(5), || t1.rejected_handshakes() == 3);
}

#[test]
fn close_stops_the_listener_and_wakes_accept() {
    let t1 = transport(v4(), 1, 1);
    let addr: SocketAddr = t1.local_addr();
    std::thread::scope(|s| {
        let w = s.spawn(|| t1.accept(Rank(0), far()));
        std::thread::sleep(Duration::from_millis(100));
        t1.close();
        assert!(w.join().unwrap().is_err());
    });
    eventually("the listener to close", Duration::from_secs(2), || TcpStream::connect(addr).is_err());
}
