//! The data path under stress and faults: both ranks sending more than a ring at once,
//! sleepers that must always be woken, aborts in the middle of a frame, cancellation, and a
//! peer that leaves with data still in the ring.

mod common;

use std::time::{Duration, Instant};

use common::*;
use devccl_core::memory::Region;
use devccl_core::testing::conformance::{drive, header, pattern};
use devccl_core::transport::{Completion, Connection, RecvRequest, ReqId, SendRequest, wait_ready};
use devccl_core::{Error, Rank, Seq};
use devccl_transport_shm::DEFAULT_RING_BYTES;

fn recv(c: &mut Box<dyn Connection>, seq: u64, dst: &Region) -> ReqId {
    c.irecv(RecvRequest { expect: header(seq, 0, dst.len()), dst: dst.full() }).unwrap().unwrap()
}

fn send(c: &mut Box<dyn Connection>, seq: u64, src: &Region) -> ReqId {
    c.isend(SendRequest { header: header(seq, 0, src.len()), src: src.full() }).unwrap().unwrap()
}

/// Test `id` until it completes, sleeping in `poll` (never spinning) whenever nothing moved.
/// Returns how many sleeps ended by timeout: with a live peer that keeps moving, every
/// timeout is a lost wake-up.
fn wait_sleeping(c: &mut Box<dyn Connection>, id: ReqId, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    let mut timeouts = 0;
    loop {
        if c.test(id).unwrap().is_some() {
            return timeouts;
        }
        assert!(Instant::now() < deadline, "request did not complete");
        let mut fds = Vec::new();
        c.wait_fds(&mut fds);
        assert!(!fds.is_empty());
        if !wait_ready(&fds, Duration::from_millis(500)).unwrap() {
            timeouts += 1;
        }
    }
}

#[test]
fn both_ranks_send_64_mib_at_once_without_deadlock() {
    for ring in [64 << 10, DEFAULT_RING_BYTES] {
        let (a, b) = pair(ring);
        let n = 64 << 20;
        // Each side waits on its own send first (the worst case): it only finishes if
        // testing the send also drains the peer's data into the posted receive.
        let side = |mut c: Box<dyn Connection>, seed: u64, other: u64| {
            let src = Region::from_vec(pattern(seed, n));
            let dst = Region::alloc(n);
            let r = recv(&mut c, 1, &dst);
            let s = send(&mut c, 1, &src);
            drive(&mut [&mut c], &[(0, s)], Duration::from_secs(60)).unwrap();
            drive(&mut [&mut c], &[(0, r)], Duration::from_secs(60)).unwrap();
            assert!(dst.full().to_vec().unwrap() == pattern(other, n), "payload intact (ring {ring})");
        };
        std::thread::scope(|s| {
            s.spawn(|| side(a, 1, 2));
            side(b, 2, 1);
        });
    }
}

#[test]
fn sleepers_are_always_woken() {
    // Ping-pong of small messages, both sides only ever sleeping in poll: every round trip
    // needs two doorbell wake-ups, and a lost one shows as a 500 ms timeout.
    let (mut a, mut b) = pair(64 << 10);
    let rounds = 2000;
    let pong = std::thread::spawn(move || {
        let buf = Region::alloc(8);
        let mut timeouts = 0;
        for i in 0..rounds {
            let r = recv(&mut b, i, &buf);
            timeouts += wait_sleeping(&mut b, r, Duration::from_secs(10));
            let s = send(&mut b, i, &buf);
            timeouts += wait_sleeping(&mut b, s, Duration::from_secs(10));
        }
        timeouts
    });
    let src = Region::from_vec(pattern(3, 8));
    let dst = Region::alloc(8);
    let mut timeouts = 0;
    for i in 0..rounds {
        let r = recv(&mut a, i, &dst);
        let s = send(&mut a, i, &src);
        timeouts += wait_sleeping(&mut a, s, Duration::from_secs(10));
        timeouts += wait_sleeping(&mut a, r, Duration::from_secs(10));
        assert_eq!(dst.full().to_vec().unwrap(), pattern(3, 8));
    }
    assert_eq!((timeouts, pong.join().unwrap()), (0, 0), "lost wake-ups (ping side, pong side)");

    // Streaming through a small ring with sleeping sides: the sender waits for space (the
    // receiver's doorbell on freeing it), the receiver for data.
    let (mut a, mut b) = pair(64 << 10);
    let n = 1 << 20;
    let count = 32;
    let rx = std::thread::spawn(move || {
        let dst = Region::alloc(n);
        let mut timeouts = 0;
        for i in 0..count {
            let r = recv(&mut b, i, &dst);
            timeouts += wait_sleeping(&mut b, r, Duration::from_secs(20));
            assert!(dst.full().to_vec().unwrap() == pattern(i, n));
        }
        timeouts
    });
    let mut timeouts = 0;
    for i in 0..count {
        let src = Region::from_vec(pattern(i, n));
        let s = send(&mut a, i, &src);
        timeouts += wait_sleeping(&mut a, s, Duration::from_secs(20));
    }
    assert_eq!((timeouts, rx.join().unwrap()), (0, 0), "lost wake-ups (sender, receiver)");
}

#[test]
fn abort_in_the_middle_of_a_frame_takes_the_socket() {
    // 1 MiB through a 64 KiB ring: the frame is partly written when the sender aborts, so
    // the abort cannot go through the ring (it would be read as payload).
    let (mut a, mut b) = pair(64 << 10);
    let src = Region::from_vec(pattern(1, 1 << 20));
    let s = send(&mut a, 4, &src);
    assert!(a.test(s).unwrap().is_none());
    a.send_abort(Seq(4), "rank 0 lost rank 3");
    // The aborting side refuses further work.
    assert!(matches!(
        a.isend(SendRequest { header: header(5, 0, 1), src: src.slice(0..1) }),
        Err(Error::Aborted { .. })
    ));
    let dst = Region::alloc(1 << 20);
    let r = recv(&mut b, 4, &dst);
    match drive(&mut [&mut b], &[(0, r)], Duration::from_secs(5)) {
        Err(Error::Remote { peer: Some(Rank(0)), message }) => {
            assert!(message.contains("rank 0 lost rank 3"), "{message}")
        }
        other => panic!("expected the abort reason, got {other:?}"),
    }
    // The ring's part of the frame arrived before the abort was seen.
    assert_eq!(dst.slice(0..1000).to_vec().unwrap(), pattern(1, 1 << 20)[..1000]);
}

#[test]
fn abort_when_the_ring_is_full_at_a_frame_boundary() {
    // Frames that exactly fill a 4 KiB ring, then an abort that does not fit.
    let (mut a, mut b) = pair(4096);
    let src = Region::from_vec(pattern(1, 4096 - 56));
    let s = send(&mut a, 1, &src);
    assert!(a.test(s).unwrap().is_some(), "the frame fits exactly");
    a.send_abort(Seq(1), &"x".repeat(2000));
    let dst = Region::alloc(4096 - 56);
    let r = recv(&mut b, 1, &dst);
    drive(&mut [&mut b], &[(0, r)], Duration::from_secs(5)).unwrap();
    let r = recv(&mut b, 2, &dst);
    let e = drive(&mut [&mut b], &[(0, r)], Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains(&"x".repeat(2000)), "{e}");
}

#[test]
fn data_in_the_ring_is_delivered_before_the_close_is_reported() {
    let (mut a, mut b) = pair(64 << 10);
    let src = Region::from_vec(pattern(2, 5000));
    let s = send(&mut a, 1, &src);
    assert!(matches!(a.test(s).unwrap(), Some(Completion::Sent { bytes: 5000 })));
    drop(a);
    let dst = Region::alloc(5000);
    let r = recv(&mut b, 1, &dst);
    drive(&mut [&mut b], &[(0, r)], Duration::from_secs(5)).unwrap();
    assert_eq!(dst.full().to_vec().unwrap(), pattern(2, 5000));
    let r = recv(&mut b, 2, &dst);
    let t = Instant::now();
    let e = drive(&mut [&mut b], &[(0, r)], Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("rank 0 closed its connection"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(1));
}

#[test]
fn cancel_in_the_middle_of_a_frame_poisons_the_connection() {
    let (mut a, mut b) = pair(64 << 10);
    let src = Region::from_vec(pattern(1, 1 << 20));
    let s = send(&mut a, 1, &src);
    assert!(a.test(s).unwrap().is_none());
    a.cancel();
    assert!(a.test(s).unwrap_err().to_string().contains("cancelled in the middle of a frame"));
    // The receiving side, cancelled mid-payload, is poisoned too.
    let dst = Region::alloc(1 << 20);
    let r = recv(&mut b, 1, &dst);
    assert!(b.test(r).unwrap().is_none());
    b.cancel();
    assert!(b.irecv(RecvRequest { expect: header(2, 0, 1), dst: dst.slice(0..1) }).is_err());
}

#[test]
fn queues_answer_not_now_when_full_and_keep_order() {
    // Frames larger than the 4 KiB ring: none completes when posted, so 64 stay queued.
    let (mut a, mut b) = pair(4096);
    let n = 5000;
    let bufs: Vec<Region> = (0..64).map(|i| Region::from_vec(pattern(i, n))).collect();
    let mut pend = Vec::new();
    for (i, buf) in bufs.iter().enumerate() {
        pend.push((0, send(&mut a, i as u64, buf)));
    }
    let extra = Region::from_vec(pattern(99, 10));
    assert!(a.isend(SendRequest { header: header(64, 0, 10), src: extra.full() }).unwrap().is_none());
    let dsts: Vec<Region> = (0..64).map(|_| Region::alloc(n)).collect();
    for (i, d) in dsts.iter().enumerate() {
        pend.push((1, recv(&mut b, i as u64, d)));
    }
    let extra_dst = Region::alloc(10);
    assert!(b.irecv(RecvRequest { expect: header(64, 0, 10), dst: extra_dst.full() }).unwrap().is_none());
    drive(&mut [&mut a, &mut b], &pend, Duration::from_secs(20)).unwrap();
    for (i, d) in dsts.iter().enumerate() {
        assert_eq!(d.full().to_vec().unwrap(), pattern(i as u64, n), "message {i}");
    }
    // Room again.
    let s = send(&mut a, 64, &extra);
    let r = recv(&mut b, 64, &extra_dst);
    drive(&mut [&mut a, &mut b], &[(0, s), (1, r)], Duration::from_secs(5)).unwrap();
    assert_eq!(extra_dst.full().to_vec().unwrap(), pattern(99, 10));
}

#[test]
fn revoked_destination_is_an_error_not_a_write() {
    let (mut a, mut b) = pair(64 << 10);
    let mut buf = vec![0u8; 100];
    let r = Region::scoped(&mut buf, |region| recv(&mut b, 1, region));
    let src = Region::from_vec(pattern(1, 100));
    send(&mut a, 1, &src);
    let e = drive(&mut [&mut b], &[(0, r)], Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("after its collective returned"), "{e}");
    assert_eq!(buf, vec![0u8; 100]);
}

/// Message sizes from a fixed xorshift sequence: mostly small, some several rings long.
fn sizes(seed: u64, n: usize) -> Vec<usize> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 8 {
                0 => 0,
                1..=4 => (x >> 8) as usize % 200,
                5 | 6 => (x >> 8) as usize % 10_000,
                _ => (x >> 8) as usize % 300_000,
            }
        })
        .collect()
}

#[test]
fn random_sizes_both_ways_through_tiny_rings_stay_intact() {
    // Headers split across the ring's end, partial headers, frames many rings long, and
    // sides that alternate between busy-polling and sleeping.
    for ring in [4096, 64 << 10] {
        let (a, b) = pair(ring);
        let n = 600;
        let side = |mut c: Box<dyn Connection>, tx_seed: u64, rx_seed: u64| {
            let tx = sizes(tx_seed, n);
            let rx = sizes(rx_seed, n);
            let (mut next_tx, mut next_rx) = (0, 0);
            let mut inflight: Vec<(ReqId, Option<(usize, Region)>)> = Vec::new();
            let mut rounds = 0u64;
            while next_tx < n || next_rx < n || !inflight.is_empty() {
                // Keep a few of each in flight.
                while next_rx < n && inflight.iter().filter(|(_, d)| d.is_some()).count() < 4 {
                    let d = Region::alloc(rx[next_rx]);
                    let id = recv(&mut c, next_rx as u64, &d);
                    inflight.push((id, Some((next_rx, d))));
                    next_rx += 1;
                }
                while next_tx < n && inflight.iter().filter(|(_, d)| d.is_none()).count() < 4 {
                    let src = Region::from_vec(pattern(tx_seed * 10_000 + next_tx as u64, tx[next_tx]));
                    let id = send(&mut c, next_tx as u64, &src);
                    inflight.push((id, None));
                    next_tx += 1;
                }
                let mut moved = false;
                let mut i = 0;
                while i < inflight.len() {
                    if c.test(inflight[i].0).unwrap().is_some() {
                        if let (_, Some((k, d))) = inflight.remove(i) {
                            assert!(
                                d.full().to_vec().unwrap() == pattern(rx_seed * 10_000 + k as u64, rx[k]),
                                "message {k}"
                            );
                        }
                        moved = true;
                    } else {
                        i += 1;
                    }
                }
                rounds += 1;
                if !moved && rounds.is_multiple_of(3) {
                    let mut fds = Vec::new();
                    c.wait_fds(&mut fds);
                    wait_ready(&fds, Duration::from_millis(500)).unwrap();
                }
            }
        };
        std::thread::scope(|s| {
            s.spawn(|| side(a, 1, 2));
            side(b, 2, 1);
        });
    }
}

#[test]
fn a_sleeping_receiver_sees_a_short_wrong_frame_at_once() {
    // The receiver expects 1 MiB but the sender's frame is 8 bytes: the receiver must wake
    // for the header alone and report the desync, not wait for a megabyte that never comes.
    let (mut a, mut b) = pair(DEFAULT_RING_BYTES);
    let dst = Region::alloc(1 << 20);
    let r = recv(&mut b, 1, &dst);
    assert!(b.test(r).unwrap().is_none());
    let mut fds = Vec::new();
    b.wait_fds(&mut fds);
    let src = Region::from_vec(pattern(1, 8));
    let t = Instant::now();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        send(&mut a, 1, &src);
        a
    });
    assert!(wait_ready(&fds, Duration::from_secs(5)).unwrap(), "woken by the header");
    drop(fds);
    let e = b.test(r).unwrap_err().to_string();
    assert!(e.contains("protocol desync"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(1));
    drop(sender.join().unwrap());
}
