//! Communicators over real TCP and a real rendezvous, ranks as threads of this process:
//! split, abort while a collective is stuck, several communicators used concurrently,
//! destroy with work outstanding, every collective through the typed API, receives from any
//! rank over TCP and shared memory.

use std::time::{Duration, Instant};

use devccl::{Communicator, Error, InitOptions, ReduceOp};
use devccl_core::config::Config;
use devccl_core::transport::TransportKind;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn cfg() -> Config {
    Config {
        transports: vec![TransportKind::Tcp],
        init_timeout: Duration::from_secs(20),
        timeout: Duration::from_secs(10),
        ..Config::default()
    }
}

/// Start `n` ranks as threads; each runs `f` on its communicator.
fn with_ranks<R: Send>(n: usize, f: impl Fn(Communicator) -> R + Sync) -> Vec<R> {
    with_ranks_on(cfg(), n, f)
}

/// [`with_ranks`] with other settings (transports, timeout).
fn with_ranks_on<R: Send>(config: Config, n: usize, f: impl Fn(Communicator) -> R + Sync) -> Vec<R> {
    let port = free_port();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|rank| {
                let (f, config) = (&f, config.clone());
                s.spawn(move || {
                    let comm = Communicator::init_with(InitOptions {
                        rank,
                        world: n,
                        local_world: Some(n),
                        rendezvous: format!("127.0.0.1:{port}"),
                        host_rendezvous: rank == 0,
                        group: "world".into(),
                        config,
                    })
                    .expect("init");
                    f(comm)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("rank thread")).collect()
    })
}

#[test]
fn split_by_color_and_by_rank_list() {
    let out = with_ranks(4, |c| {
        let r = c.rank();
        // Even and odd ranks, reversed order inside each group.
        let sub = c.split(Some((r % 2) as u32), -(r as i64)).unwrap().expect("member");
        assert_eq!(sub.world_size(), 2);
        let mut v = vec![r as i32];
        sub.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        let mut who = vec![0i32; 2];
        who[sub.rank()] = r as i32;
        sub.all_reduce(&mut who, ReduceOp::Sum).unwrap();
        // Rank list {3, 1}: rank 3 becomes 0.
        let pair = c.split_ranks(&[3, 1]).unwrap();
        let pair_rank = pair.as_ref().map(|p| p.rank());
        if let Some(p) = &pair {
            let mut x = vec![1u8; 3];
            p.all_reduce(&mut x, ReduceOp::Sum).unwrap();
            assert_eq!(x, vec![2; 3]);
        }
        // A color of None takes part but joins nothing.
        let none = c.split(if r == 0 { None } else { Some(7) }, 0).unwrap();
        assert_eq!(none.is_none(), r == 0);
        (v[0], who, pair_rank)
    });
    assert_eq!(out[0].0, 2);
    assert_eq!(out[1].0, 4);
    assert_eq!(out[0].1, vec![2, 0], "key -r orders rank 2 before rank 0");
    assert_eq!(out[1].1, vec![3, 1]);
    assert_eq!(out[3].2, Some(0));
    assert_eq!(out[1].2, Some(1));
    assert_eq!(out[0].2, None);
}

#[test]
fn abort_reaches_ranks_stuck_in_a_collective() {
    let out = with_ranks(3, |c| {
        if c.rank() == 0 {
            std::thread::sleep(Duration::from_millis(300));
            c.abort("giving up on purpose");
            let again = c.barrier().unwrap_err();
            assert!(matches!(again, Error::Aborted { .. }), "{again}");
            return (Duration::ZERO, again.to_string());
        }
        let t = Instant::now();
        let mut v = vec![1f32; 1000];
        let e = c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err();
        (t.elapsed(), e.to_string())
    });
    for (r, (took, msg)) in out.iter().enumerate().skip(1) {
        assert!(msg.contains("giving up on purpose") && msg.contains("rank 0"), "rank {r}: {msg}");
        assert!(*took < Duration::from_secs(5), "rank {r} took {took:?} (timeout is 10 s)");
    }
}

#[test]
fn two_communicators_used_concurrently_and_destroy_waits_for_work() {
    let out = with_ranks(3, |c| {
        let sub = c.split(Some(0), c.rank() as i64).unwrap().unwrap();
        let r = c.rank() as i64;
        let (a, b) = std::thread::scope(|s| {
            let h1 = s.spawn(|| {
                let mut acc = 0;
                for k in 0..50 {
                    let mut v = vec![r + k; 100];
                    c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                    acc += v[0];
                }
                acc
            });
            let h2 = s.spawn(|| {
                let mut acc = 0;
                for _ in 0..50 {
                    let mut v = vec![1i64; 5000];
                    sub.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                    acc += v[4999];
                }
                acc
            });
            (h1.join().unwrap(), h2.join().unwrap())
        });
        let works: Vec<_> = (0..5).map(|_| sub.all_reduce_async(vec![1u8; 64], ReduceOp::Sum)).collect();
        sub.clone().destroy().unwrap();
        assert!(works.iter().all(|w| w.test()), "destroy waited for queued work");
        (a, b)
    });
    for (a, b) in out {
        assert_eq!(a, (0..50).map(|k| 3 + 3 * k).sum::<i64>());
        assert_eq!(b, 150);
    }
}

#[test]
fn every_collective_through_the_typed_api() {
    with_ranks(3, |c| {
        let (r, n) = (c.rank(), c.world_size());
        let mut b = vec![r as i32; 4];
        c.broadcast(&mut b, 2).unwrap();
        assert_eq!(b, vec![2; 4]);
        let mut red = vec![0f64; 4];
        c.reduce_into(&[r as f64; 4], &mut red, ReduceOp::Max, 1).unwrap();
        assert_eq!(red, if r == 1 { vec![2.0; 4] } else { vec![0.0; 4] });
        let mut ag = vec![0i32; 2 * n];
        c.all_gather_into(&[r as i32, 10 + r as i32], &mut ag).unwrap();
        assert_eq!(ag, vec![0, 10, 1, 11, 2, 12]);
        let mut rs = vec![0i64; 2];
        c.reduce_scatter_into(&(0..6).map(|i| i as i64).collect::<Vec<_>>(), &mut rs, ReduceOp::Sum).unwrap();
        assert_eq!(rs, vec![6 * r as i64, 6 * r as i64 + 3]);
        let mut a2a = vec![0u8; n];
        c.all_to_all_into(&[10 * r as u8, 10 * r as u8 + 1, 10 * r as u8 + 2], &mut a2a).unwrap();
        assert_eq!(a2a, (0..n).map(|i| (10 * i + r) as u8).collect::<Vec<_>>());
        let mut g = vec![0i32; if r == 0 { n } else { 0 }];
        c.gather_into(&[r as i32 + 5], &mut g, 0).unwrap();
        if r == 0 {
            assert_eq!(g, vec![5, 6, 7]);
        }
        let src: Vec<i8> = if r == 2 { vec![-1, -2, -3] } else { vec![] };
        let mut sc = vec![0i8; 1];
        c.scatter_into(&src, &mut sc, 2).unwrap();
        assert_eq!(sc, vec![-(r as i8) - 1]);
        if r == 0 {
            c.send(&[42i64, 43], 1, 7).unwrap();
        } else if r == 1 {
            let mut got = [0i64; 2];
            c.recv(&mut got, 0, 7).unwrap();
            assert_eq!(got, [42, 43]);
        }
        c.barrier().unwrap();
        // A bad argument is the caller's error and leaves the communicator usable.
        let e = c.all_gather_into(&[1u8], &mut [0u8; 2]).unwrap_err();
        assert!(matches!(e, Error::InvalidUsage(_)), "{e}");
        c.barrier().unwrap();
        let v = c.all_gather_async(vec![r as u8]).wait().unwrap();
        assert_eq!(v, vec![0, 1, 2]);
        let co = c.all_reduce_coalesced_async(vec![vec![1i32; 3], vec![2i32; 1]], ReduceOp::Sum).wait().unwrap();
        assert_eq!(co, vec![vec![3; 3], vec![6]]);
    });
}

#[test]
fn p2p_batch_exchanges_large_messages_both_ways_without_deadlock() {
    use devccl::{DType, P2pOp};
    use devccl_core::memory::Region;
    // 24 MiB each way: far beyond socket buffers, so a send-then-receive on both sides
    // would block; in one batch the two progress together.
    let count = 6 << 20;
    let out = with_ranks(3, |c| {
        let (r, n) = (c.rank(), c.world_size());
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let to_next = Region::from_vec(vec![r as f32; count]);
        let to_prev = Region::from_vec(vec![10.0 + r as f32; 1000]);
        let from_prev = Region::alloc(count * 4);
        let from_next = Region::alloc(1000 * 4);
        let ops = vec![
            P2pOp { send: true, peer: next, tag: 1, dtype: DType::F32, buf: to_next.full() },
            P2pOp { send: true, peer: prev, tag: 2, dtype: DType::F32, buf: to_prev.full() },
            P2pOp { send: false, peer: prev, tag: 1, dtype: DType::F32, buf: from_prev.full() },
            P2pOp { send: false, peer: next, tag: 2, dtype: DType::F32, buf: from_next.full() },
        ];
        c.p2p_batch(ops).unwrap();
        // Twice, asynchronously, to check the per-pair sequence numbers stay in step.
        let w = c.p2p_batch_async(vec![
            P2pOp { send: false, peer: prev, tag: 3, dtype: DType::F32, buf: from_prev.full() },
            P2pOp { send: true, peer: next, tag: 3, dtype: DType::F32, buf: to_next.full() },
        ]);
        w.wait().unwrap();
        let a: Vec<f32> = bytemuck::cast_slice(&from_prev.full().to_vec().unwrap()).to_vec();
        let b: Vec<f32> = bytemuck::cast_slice(&from_next.full().to_vec().unwrap()).to_vec();
        // A tag that differs from the sender's is a clear mismatch, not a hang.
        (a[0], a[count - 1], b[0], b[999])
    });
    for (r, (a0, a1, b0, b1)) in out.into_iter().enumerate() {
        let prev = ((r + 2) % 3) as f32;
        let next = ((r + 1) % 3) as f32;
        assert_eq!((a0, a1, b0, b1), (prev, prev, 10.0 + next, 10.0 + next), "rank {r}");
    }
}

/// The device for the device-buffer tests, or why there is none (the test then skips, unless
/// `require` names a variable set to 1).
fn device_or_skip(id: &str, require: &str) -> Option<devccl::DeviceId> {
    let id: devccl::DeviceId = id.parse().unwrap();
    match devccl_device::open(id) {
        Ok(_) => Some(id),
        Err(e) => {
            assert!(std::env::var(require).as_deref() != Ok("1"), "{require}=1 but {id} is unavailable: {e}");
            println!("skipped: {e}");
            None
        }
    }
}

#[test]
fn device_buffers_through_the_typed_api() {
    let Some(dev) = device_or_skip("vulkan", "DEVCCL_REQUIRE_VULKAN") else { return };
    with_ranks(2, |c| {
        use devccl::DeviceBuffer;
        let r = c.rank() as f32;
        let buf = DeviceBuffer::from_slice(dev, &[r + 1.0, 10.0 * (r + 1.0), -r]).unwrap();
        c.all_reduce_device(&buf, ReduceOp::Sum).unwrap();
        assert_eq!(buf.to_vec().unwrap(), vec![3.0, 30.0, -1.0]);
        c.all_reduce_device_async(&buf, ReduceOp::Max).wait().unwrap();
        assert_eq!(buf.to_vec().unwrap(), vec![3.0, 30.0, -1.0]);
        let b = DeviceBuffer::from_slice(dev, &[r; 4]).unwrap();
        c.broadcast_device(&b, 1).unwrap();
        assert_eq!(b.to_vec().unwrap(), vec![1.0; 4]);
        let all = DeviceBuffer::<f32>::alloc(dev, 6).unwrap();
        c.all_gather_device(&buf, &all).unwrap();
        assert_eq!(all.to_vec().unwrap(), vec![3.0, 30.0, -1.0, 3.0, 30.0, -1.0]);
        let part = DeviceBuffer::<f32>::alloc(dev, 3).unwrap();
        c.reduce_scatter_device(&all, &part, ReduceOp::Sum).unwrap();
        assert_eq!(part.to_vec().unwrap(), vec![6.0, 60.0, -2.0]);
        let msg = DeviceBuffer::from_slice(dev, &[7i64 + c.rank() as i64; 5]).unwrap();
        if c.rank() == 0 {
            c.send_device(&msg, 1, 3).unwrap();
        } else {
            c.recv_device(&msg, 0, 3).unwrap();
            assert_eq!(msg.to_vec().unwrap(), vec![7; 5]);
        }
        // A device buffer and a host buffer cannot meet in one call.
        let host = devccl_core::memory::Region::alloc(24);
        let err = c.collective(&devccl::Collective::AllGather, devccl::DType::F32, part.region_slice(), host.full());
        assert!(matches!(err, Err(Error::InvalidUsage(ref m)) if m.contains("different devices")), "{err:?}");
    });
}

#[test]
fn cudarc_slices_blocking_owned_and_stream_ordered() {
    let Some(_) = device_or_skip("cuda", "DEVCCL_REQUIRE_CUDA") else { return };
    use devccl_device::cuda::cudarc::driver::CudaContext;
    with_ranks(2, |c| {
        let ctx = CudaContext::new(0).unwrap();
        let stream = ctx.default_stream();
        let r = c.rank() as f32;
        let mut s = stream.clone_htod(&vec![r + 1.0; 1000]).unwrap();
        c.all_reduce_cuda(&mut s, ReduceOp::Sum).unwrap();
        assert_eq!(stream.clone_dtoh(&s).unwrap(), vec![3.0; 1000]);
        let buf = devccl::DeviceBuffer::from_cuda(s).unwrap();
        let w = c
            .collective_on_cuda_stream(&devccl::Collective::AllReduce { op: ReduceOp::Avg }, &buf, &buf, &stream)
            .unwrap();
        w.wait().unwrap();
        let s = buf.into_cuda().unwrap();
        assert_eq!(stream.clone_dtoh(&s).unwrap(), vec![3.0; 1000]);
    });
}

/// Ranks 1..n send to rank 0, which receives from any rank: three blocking receives of a
/// small message, then three asynchronous ones queued at once of a large one (several
/// frames, over both TCP lanes; larger than nothing in particular on shared memory).
fn recv_any_from_racing_senders(transport: TransportKind) {
    const BIG: usize = 300_000;
    let config = Config { transports: vec![transport], ..cfg() };
    let out = with_ranks_on(config, 4, |c| {
        let r = c.rank();
        if r != 0 {
            c.send(&[r as u32; 5], 0, 3).unwrap();
            c.send(&vec![r as f32 + 0.5; BIG], 0, 4).unwrap();
            c.barrier().unwrap();
            return Vec::new();
        }
        let mut sources = Vec::new();
        for _ in 0..3 {
            let mut buf = [0u32; 5];
            let src = c.recv_any_into(&mut buf, 3).unwrap();
            assert_eq!(buf, [src as u32; 5], "the payload of rank {src}");
            sources.push(src);
        }
        let works: Vec<_> = (0..3)
            .map(|_| {
                let out = devccl_core::memory::Region::from_vec(vec![0f32; BIG]);
                (c.recv_any_async(devccl::DType::F32, out.full(), 4), out)
            })
            .collect();
        for (w, out) in works {
            let src = w.wait().unwrap();
            assert!(out.into_vec::<f32>().unwrap().iter().all(|&x| x == src as f32 + 0.5), "from rank {src}");
            sources.push(src);
        }
        c.barrier().unwrap();
        sources
    });
    let (mut small, mut big) = (out[0][..3].to_vec(), out[0][3..].to_vec());
    small.sort_unstable();
    big.sort_unstable();
    assert_eq!((small, big), (vec![1, 2, 3], vec![1, 2, 3]), "{transport}: {:?}", out[0]);
}

#[test]
fn recv_any_from_racing_senders_over_tcp_and_shm() {
    for transport in [TransportKind::Tcp, TransportKind::Shm] {
        recv_any_from_racing_senders(transport);
    }
}

#[test]
fn recv_any_times_out_when_nobody_sends_and_fails_at_once_when_the_peer_exits() {
    let timeout = Duration::from_millis(1500);
    let done = std::sync::Barrier::new(4);
    for transport in [TransportKind::Tcp, TransportKind::Shm] {
        let config = Config { transports: vec![transport], timeout, ..cfg() };
        let out = with_ranks_on(config, 4, |c| {
            if c.rank() == 0 {
                let t = Instant::now();
                let e = c.recv_any_into(&mut [0i64; 2], 11).unwrap_err();
                let took = t.elapsed();
                done.wait(); // the others stay connected until rank 0 gave up
                return Some((took, e));
            }
            done.wait();
            None
        });
        let (took, e) = out[0].as_ref().unwrap();
        assert!(matches!(e, Error::Timeout { .. }), "{transport}: {e}");
        let m = e.to_string();
        assert!(m.contains("no message with tag 11 arrived from any of rank 1, rank 2, rank 3"), "{transport}: {m}");
        assert!(*took >= timeout && *took < timeout + Duration::from_secs(2), "{transport}: {took:?}");
    }
    // The only peer exits without sending: the receive fails promptly, naming it.
    for transport in [TransportKind::Tcp, TransportKind::Shm] {
        let config = Config { transports: vec![transport], ..cfg() };
        let out = with_ranks_on(config, 2, |c| {
            if c.rank() == 1 {
                return None; // drops the communicator: its connections close
            }
            let t = Instant::now();
            let e = c.recv_any_into(&mut [0u8; 4], 0).unwrap_err();
            Some((t.elapsed(), e))
        });
        let (took, e) = out[0].as_ref().unwrap();
        let m = e.to_string();
        assert!(matches!(e, Error::Remote { .. }) && m.contains("rank 1 closed"), "{transport}: {m}");
        assert!(*took < Duration::from_secs(5), "{transport}: {took:?} (timeout is 10 s)");
    }
}

#[test]
fn recv_any_into_device_buffers() {
    let Some(dev) = device_or_skip("vulkan", "DEVCCL_REQUIRE_VULKAN") else { return };
    let out = with_ranks(3, |c| {
        use devccl::DeviceBuffer;
        let r = c.rank();
        if r != 0 {
            let host = vec![r as i32 * 10; 1000];
            // One sender sends from device memory, the other from host memory.
            if r == 1 {
                c.send_device(&DeviceBuffer::from_slice(dev, &host).unwrap(), 0, 6).unwrap();
            } else {
                c.send(&host, 0, 6).unwrap();
            }
            return Vec::new();
        }
        let buf = DeviceBuffer::<i32>::alloc(dev, 1000).unwrap();
        (0..2)
            .map(|_| {
                let src = c.recv_any_device(&buf, 6).unwrap();
                assert_eq!(buf.to_vec().unwrap(), vec![src as i32 * 10; 1000]);
                src
            })
            .collect()
    });
    let mut s = out[0].clone();
    s.sort_unstable();
    assert_eq!(s, vec![1, 2]);
}
