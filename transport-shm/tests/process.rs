//! Across processes: the peer is a child process (this test binary, re-executed to run only
//! `child_main`), so the memfd, the doorbells and the liveness socket really cross a process
//! boundary. The child connects as rank 0 to the parent's rank 1.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use devccl_core::memory::Region;
use devccl_core::testing::conformance::{drive, header, pattern};
use devccl_core::transport::{Connection, Endpoint, RecvRequest, SendRequest, Transport, TransportKind};
use devccl_core::{Error, Rank};
use devccl_transport_shm::ShmTransport;

const SCENARIO: &str = "DEVCCL_SHM_TEST_CHILD";
const ADDR: &str = "DEVCCL_SHM_TEST_ADDR";
const RING: &str = "DEVCCL_SHM_TEST_RING";
const SIZES: &str = "DEVCCL_SHM_TEST_SIZES";

/// Sizes the echo scenario moves: empty, tiny, odd, one more than a 64 KiB ring, and
/// messages many times the ring.
const ECHO_SIZES: [usize; 6] = [0, 8, 4099, (64 << 10) + 1, 1 << 20, 24 << 20];

/// Start the child running `scenario` against the parent transport `t` with rings of `ring`
/// bytes (the connector chooses the ring size).
fn spawn_child(t: &ShmTransport, scenario: &str, ring: usize, sizes: &[usize]) -> Child {
    let sizes: Vec<String> = sizes.iter().map(ToString::to_string).collect();
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_main", "--nocapture", "--test-threads", "1"])
        .env(SCENARIO, scenario)
        .env(ADDR, t.address())
        .env(RING, ring.to_string())
        .env(SIZES, sizes.join(","))
        .stdin(Stdio::null())
        // The harness's chatter; panics go to stderr, which stays.
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the child process")
}

/// The parent's transport, activated as rank 1 of 2.
fn parent() -> ShmTransport {
    let t = transport(1, 4096);
    t.activate(ctx(COMM, 1, 2, Some("s3cret"))).unwrap();
    t
}

fn wait_success(mut c: Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            assert!(st.success(), "child failed: {st}");
            return;
        }
        assert!(Instant::now() < deadline, "child did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Entry point of the child process; does nothing when run as an ordinary test.
#[test]
fn child_main() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    let addr = std::env::var(ADDR).unwrap();
    let ring: usize = std::env::var(RING).unwrap().parse().unwrap();
    let sizes: Vec<usize> =
        std::env::var(SIZES).unwrap().split(',').filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    let t = transport(0, ring);
    t.activate(ctx(COMM, 0, 2, Some("s3cret"))).unwrap();
    let remote = Endpoint { kind: TransportKind::Shm, address: addr, caps: vec![] };
    let mut c = t.connect(Rank(1), &remote, far()).expect("child connects");
    match scenario.as_str() {
        // Receive each message and send it straight back.
        "echo" => {
            for (i, &n) in sizes.iter().enumerate() {
                let buf = Region::alloc(n);
                let h = header(i as u64, 0, n);
                let r = c.irecv(RecvRequest { expect: h, dst: buf.full() }).unwrap().unwrap();
                drive(&mut [&mut c], &[(0, r)], Duration::from_secs(30)).unwrap();
                let s = c.isend(SendRequest { header: h, src: buf.full() }).unwrap().unwrap();
                drive(&mut [&mut c], &[(0, s)], Duration::from_secs(30)).unwrap();
            }
        }
        // Stay connected and idle until killed.
        "idle" => std::thread::sleep(Duration::from_secs(60)),
        // Send 16 MiB messages until killed.
        "stream" => {
            let src = Region::from_vec(pattern(5, 16 << 20));
            for i in 0.. {
                let s = c.isend(SendRequest { header: header(i, 0, src.len()), src: src.full() }).unwrap().unwrap();
                drive(&mut [&mut c], &[(0, s)], Duration::from_secs(60)).unwrap();
            }
        }
        other => panic!("unknown child scenario {other}"),
    }
    drop(c);
    std::process::exit(0);
}

#[test]
fn child_process_echoes_every_size() {
    for ring in [64 << 10, 4 << 20] {
        let t = parent();
        let child = spawn_child(&t, "echo", ring, &ECHO_SIZES);
        let mut c = t.accept(Rank(0), far()).expect("accept the child");
        let srcs: Vec<Region> = ECHO_SIZES.iter().map(|&n| Region::from_vec(pattern(n as u64, n))).collect();
        let dsts: Vec<Region> = ECHO_SIZES.iter().map(|&n| Region::alloc(n)).collect();
        // Everything posted at once: both directions stream concurrently.
        let mut pend = Vec::new();
        for (i, &n) in ECHO_SIZES.iter().enumerate() {
            let h = header(i as u64, 0, n);
            pend.push((0, c.irecv(RecvRequest { expect: h, dst: dsts[i].full() }).unwrap().unwrap()));
            pend.push((0, c.isend(SendRequest { header: h, src: srcs[i].full() }).unwrap().unwrap()));
        }
        drive(&mut [&mut c], &pend, Duration::from_secs(60)).unwrap();
        for (i, &n) in ECHO_SIZES.iter().enumerate() {
            assert!(dsts[i].full().to_vec().unwrap() == pattern(n as u64, n), "message {i} of {n} bytes (ring {ring})");
        }
        wait_success(child);
    }
}

/// The error a receive gets once the child is killed, and how long it took.
fn killed_child_error(scenario: &str, c: &mut Box<dyn Connection>, child: &mut Child) -> (Error, Duration) {
    let dst = Region::alloc(16 << 20);
    let mut msg = 0;
    let mut post = |c: &mut Box<dyn Connection>| {
        let h = header(msg, 0, dst.len());
        msg += 1;
        c.irecv(RecvRequest { expect: h, dst: dst.full() }).unwrap().unwrap()
    };
    let mut r = post(c);
    if scenario == "stream" {
        // Let a few messages through so the kill lands mid-stream.
        for _ in 0..3 {
            drive(&mut [&mut *c], &[(0, r)], Duration::from_secs(30)).unwrap();
            r = post(c);
        }
    } else {
        // Nothing arrives: the receive is pending when the child dies.
        assert!(c.test(r).unwrap().is_none());
    }
    let t = Instant::now();
    child.kill().unwrap();
    let e = loop {
        // Keep the receive queue full, as an executor would.
        match drive(&mut [&mut *c], &[(0, r)], Duration::from_secs(10)) {
            Ok(_) => r = post(c),
            Err(e) => break e,
        }
    };
    let took = t.elapsed();
    let _ = child.wait();
    (e, took)
}

#[test]
fn killed_child_fails_a_pending_receive_within_a_second() {
    for scenario in ["idle", "stream"] {
        let t = parent();
        let mut child = spawn_child(&t, scenario, 64 << 10, &[]);
        let mut c = t.accept(Rank(0), far()).expect("accept the child");
        let (e, took) = killed_child_error(scenario, &mut c, &mut child);
        let msg = e.to_string();
        assert!(matches!(e, Error::Remote { peer: Some(Rank(0)), .. }), "{scenario}: {e:?}");
        assert!(msg.contains("rank 0 closed its connection (process exited?)"), "{scenario}: {msg}");
        assert!(msg.contains(&format!("pid {}", child.id())), "{scenario}: the message names the pid: {msg}");
        assert!(took < Duration::from_secs(1), "{scenario}: error after {took:?}");
        // The connection stays failed.
        let d = Region::alloc(1);
        assert!(c.irecv(RecvRequest { expect: header(99, 0, 1), dst: d.full() }).is_err());
    }
}

#[test]
fn killed_child_fails_a_blocked_send() {
    // The child never reads: the parent's 1 MiB message fills the 64 KiB ring and waits for
    // space that never comes.
    let t = parent();
    let mut child = spawn_child(&t, "idle", 64 << 10, &[]);
    let mut c = t.accept(Rank(0), far()).expect("accept the child");
    let src = Region::from_vec(pattern(1, 1 << 20));
    let s = c.isend(SendRequest { header: header(0, 0, src.len()), src: src.full() }).unwrap().unwrap();
    assert!(c.test(s).unwrap().is_none(), "cannot fit the ring");
    let t0 = Instant::now();
    child.kill().unwrap();
    let e = drive(&mut [&mut c], &[(0, s)], Duration::from_secs(10)).unwrap_err();
    assert!(matches!(e, Error::Remote { peer: Some(Rank(0)), .. }), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    let _ = child.wait();
}
