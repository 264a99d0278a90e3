//! Receives from any rank on the in-memory mesh: racing senders (every message taken once,
//! from the right rank, in each pair's order, blocking and asynchronous), tags (a message
//! with another tag is neither taken nor skipped), collectives in between, and the failure
//! paths (mismatch, timeout, abort, a closed peer, bad arguments).

use std::time::{Duration, Instant};

use devccl::testing::{mesh_comms, on_all};
use devccl::{DType, Error, ReduceOp};
use devccl_core::config::Config;
use devccl_core::memory::Region;

/// Messages each sender sends in the race.
const PER_SENDER: i32 = 25;

fn cfg(timeout: Duration) -> Config {
    // Tiny chunks: every 3-element message travels as two frames.
    Config { timeout, chunk: Some(8), ..Config::default() }
}

/// Message `k` of `rank`: who, which, and a check value.
fn message(rank: usize, k: i32) -> [i32; 3] {
    let r = rank as i32;
    [r, k, r * 1000 + k]
}

#[test]
fn racing_senders_every_message_once_in_pair_order() {
    for n in [2, 4, 5] {
        let comms = mesh_comms(n, &cfg(Duration::from_secs(20)));
        let got = on_all(&comms, |c| {
            if c.rank() != 0 {
                for k in 0..PER_SENDER {
                    c.send(&message(c.rank(), k), 0, 7).unwrap();
                }
                return Vec::new();
            }
            let total = (n - 1) * PER_SENDER as usize;
            let mut seen = Vec::with_capacity(total);
            // Half blocking, half asynchronous (several queued at once).
            while seen.len() < total / 2 {
                let mut buf = [0i32; 3];
                let src = c.recv_any_into(&mut buf, 7).unwrap();
                seen.push((src, buf));
            }
            let mut works = Vec::new();
            for _ in seen.len()..total {
                let out = Region::from_vec(vec![0i32; 3]);
                works.push((c.recv_any_async(DType::I32, out.full(), 7), out));
            }
            for (w, out) in works {
                let src = w.wait().unwrap();
                let v = out.into_vec::<i32>().unwrap();
                seen.push((src, [v[0], v[1], v[2]]));
            }
            seen
        });
        let mut next = vec![0i32; n];
        for &(src, m) in &got[0] {
            assert!(src > 0 && src < n, "n={n}: source {src}");
            // The payload came from the rank reported, and each pair kept its order.
            assert_eq!(m, message(src, next[src]), "n={n}: message from rank {src}");
            next[src] += 1;
        }
        assert!(next[1..].iter().all(|&k| k == PER_SENDER), "n={n}: every message once: {next:?}");
    }
}

#[test]
fn another_tag_is_not_taken_nor_skipped() {
    let comms = mesh_comms(3, &cfg(Duration::from_secs(20)));
    let out = on_all(&comms, |c| match c.rank() {
        1 => {
            c.send(&message(1, 9), 0, 9).unwrap();
            c.send(&message(1, 5), 0, 5).unwrap();
            vec![]
        }
        2 => {
            c.send(&message(2, 5), 0, 5).unwrap();
            vec![]
        }
        _ => {
            let mut a = [0i32; 3];
            // Rank 1's next message has tag 9: only rank 2 can match.
            let first = c.recv_any_into(&mut a, 5).unwrap();
            let mut b = [0i32; 3];
            c.recv(&mut b, 1, 9).unwrap();
            let mut d = [0i32; 3];
            let second = c.recv_any_into(&mut d, 5).unwrap();
            vec![(first, a), (1, b), (second, d)]
        }
    });
    assert_eq!(out[0], vec![(2, message(2, 5)), (1, message(1, 9)), (1, message(1, 5))]);
}

#[test]
fn collectives_in_between_keep_their_order() {
    let comms = mesh_comms(3, &cfg(Duration::from_secs(20)));
    let out = on_all(&comms, |c| {
        let mut v = vec![c.rank() as i64 + 1; 4];
        match c.rank() {
            // Rank 1 enters the all-reduce first: its next message to rank 0 may be part of
            // it, which the any-source receive must not take.
            1 => {
                c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                c.send(&message(1, 1), 0, 0).unwrap();
                (vec![], v)
            }
            2 => {
                c.send(&message(2, 2), 0, 0).unwrap();
                c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                (vec![], v)
            }
            _ => {
                let mut a = [0i32; 3];
                let s = c.recv_any_into(&mut a, 0).unwrap();
                c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                let mut b = [0i32; 3];
                let t = c.recv_any_into(&mut b, 0).unwrap();
                (vec![(s, a), (t, b)], v)
            }
        }
    });
    assert_eq!(out[0].0, vec![(2, message(2, 2)), (1, message(1, 1))]);
    assert!(out.iter().all(|(_, v)| *v == vec![6; 4]));
}

#[test]
fn size_mismatch_is_reported_like_recv() {
    let comms = mesh_comms(2, &cfg(Duration::from_secs(20)));
    let out = on_all(&comms, |c| {
        if c.rank() == 1 { c.send(&[1i32, 2, 3, 4], 0, 1).map(|()| 0) } else { c.recv_any_into(&mut [0i32; 3], 1) }
    });
    let e = out[0].as_ref().unwrap_err();
    assert!(matches!(e, Error::Mismatch { .. }) && e.to_string().contains("count=4"), "{e}");
    assert!(comms[0].poisoned().is_some());
}

#[test]
fn a_peer_whose_next_message_differs_fails_at_once() {
    let comms = mesh_comms(2, &cfg(Duration::from_secs(20)));
    let t = Instant::now();
    let out = on_all(&comms, |c| {
        if c.rank() == 1 { c.send(&message(1, 0), 0, 9).map(|()| 0) } else { c.recv_any_into(&mut [0i32; 3], 5) }
    });
    let e = out[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("recv_any(int32, count=3, tag=5)") && e.contains("tag=9"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "not a timeout: {e}");
}

#[test]
fn nobody_sends_times_out_naming_tag_and_ranks() {
    let comms = mesh_comms(3, &cfg(Duration::from_millis(300)));
    let t = Instant::now();
    let e = comms[0].recv_any_into(&mut [0u8; 8], 11).unwrap_err();
    let took = t.elapsed();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    let m = e.to_string();
    assert!(m.contains("no message with tag 11") && m.contains("rank 1, rank 2"), "{m}");
    assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn abort_wakes_a_waiting_receive() {
    let comms = mesh_comms(2, &cfg(Duration::from_secs(30)));
    let t = Instant::now();
    std::thread::scope(|s| {
        let c = comms[0].clone();
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c.abort("stop waiting");
        });
        let e = comms[0].recv_any_into(&mut [0f32; 2], 0).unwrap_err();
        assert!(matches!(e, Error::Aborted { .. }) && e.to_string().contains("stop waiting"), "{e}");
    });
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn closed_peers_drop_out_and_the_last_one_fails_the_receive() {
    let mut comms = mesh_comms(3, &cfg(Duration::from_millis(500)));
    comms[1].send(&message(1, 0), 0, 2).unwrap();
    drop(comms.pop()); // rank 2 exits
    // Rank 1 still matches; rank 2's close is no failure while rank 1 may send.
    let mut a = [0i32; 3];
    assert_eq!(comms[0].recv_any_into(&mut a, 2).unwrap(), 1);
    assert_eq!(a, message(1, 0));
    // Nothing more from rank 1: a timeout that mentions rank 2's close.
    let e = comms[0].recv_any_into(&mut a, 2).unwrap_err().to_string();
    assert!(e.contains("any of rank 1;") && e.contains("rank 2 closed"), "{e}");

    let mut comms = mesh_comms(3, &cfg(Duration::from_secs(30)));
    comms[1].send(&message(1, 0), 0, 2).unwrap();
    let survivor = comms.remove(0);
    drop(comms); // ranks 1 and 2 exit, rank 1 after sending
    assert_eq!(survivor.recv_any_into(&mut a, 2).unwrap(), 1, "a message sent before the close is received");
    let t = Instant::now();
    let e = survivor.recv_any_into(&mut a, 2).unwrap_err();
    assert!(matches!(e, Error::Remote { .. }) && e.to_string().contains("closed"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "promptly, not after the timeout");
}

#[test]
fn bad_arguments_leave_the_communicator_usable() {
    let comms = mesh_comms(2, &cfg(Duration::from_secs(20)));
    let c = &comms[0];
    let e = c.recv_any_into::<f32>(&mut [], 0).unwrap_err();
    assert!(matches!(e, Error::InvalidUsage(ref m) if m.contains("empty")), "{e}");
    let odd = Region::alloc(7);
    assert!(matches!(c.recv_any(DType::F32, odd.full(), 0), Err(Error::InvalidUsage(_))));
    let ro = Region::scoped_ref(&[0u8; 4], |r| c.recv_any_async(DType::U8, r.full(), 0).wait());
    assert!(matches!(ro, Err(Error::InvalidUsage(ref m)) if m.contains("read-only")), "{ro:?}");
    let solo = mesh_comms(1, &Config::default());
    assert!(matches!(solo[0].recv_any_into(&mut [0u8; 1], 0), Err(Error::InvalidUsage(_))));
    assert!(c.poisoned().is_none());
    let out = on_all(&comms, |c| {
        let mut v = [c.rank() as u32 + 1];
        c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        v[0]
    });
    assert_eq!(out, vec![3, 3]);
}
