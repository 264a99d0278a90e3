//! Ring all-reduce on the in-memory mesh: every world size × count × dtype × op, in place
//! and out of place, bit-exact against the reference reduction.

mod common;

use devccl::testing::{mesh_comms, on_all};
use devccl::{DType, ReduceOp};
use devccl_core::config::Config;
use devccl_core::memory::Region;
use devccl_core::op::reference_reduce;

const COUNTS: [usize; 4] = [0, 1, 1009, 100_003];

fn check_world(n: usize, cfg: &Config) {
    let comms = mesh_comms(n, cfg);
    for dtype in DType::ALL {
        for op in ReduceOp::ALL {
            for (ci, &count) in COUNTS.iter().enumerate() {
                let inputs: Vec<Vec<u8>> = (0..n).map(|r| common::input(dtype, op, r, count)).collect();
                let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
                let expect = reference_reduce(dtype, op, &refs).unwrap();
                let in_place = ci % 2 == 0;
                let outs = on_all(&comms, |c| {
                    let mine = inputs[c.rank()].clone();
                    if in_place {
                        let r = Region::from_vec(mine);
                        c.all_reduce_regions(r.full(), r.full(), dtype, op).unwrap();
                        r.into_vec::<u8>().unwrap()
                    } else {
                        let src = Region::from_vec(mine);
                        let dst = Region::alloc(src.len());
                        c.all_reduce_regions(src.full(), dst.full(), dtype, op).unwrap();
                        let out = dst.full().to_vec().unwrap();
                        assert_eq!(src.full().to_vec().unwrap(), inputs[c.rank()], "input untouched");
                        out
                    }
                });
                for (r, o) in outs.iter().enumerate() {
                    assert!(o == &expect, "world {n} {dtype} {op} count {count} in_place {in_place}: rank {r} differs");
                }
            }
        }
    }
}

#[test]
fn ring_all_reduce_every_world_dtype_op_count() {
    let cfg = Config::default();
    for n in common::WORLDS {
        check_world(n, &cfg);
    }
}

#[test]
fn tiny_chunks_pipeline_deeply() {
    // 64-byte chunks: hundreds of chunks in flight per step, staging slots recycled.
    let cfg = Config { chunk: Some(64), ..Config::default() };
    for n in [2, 3, 5] {
        let comms = mesh_comms(n, &cfg);
        let count = 10_007;
        let inputs: Vec<Vec<u8>> = (0..n).map(|r| common::input(DType::F32, ReduceOp::Sum, r, count)).collect();
        let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
        let expect = reference_reduce(DType::F32, ReduceOp::Sum, &refs).unwrap();
        let outs = on_all(&comms, |c| {
            let r = Region::from_vec(inputs[c.rank()].clone());
            c.all_reduce_regions(r.full(), r.full(), DType::F32, ReduceOp::Sum).unwrap();
            r.into_vec::<u8>().unwrap()
        });
        assert!(outs.iter().all(|o| o == &expect));
    }
}

#[test]
fn typed_api_and_sequence_of_calls() {
    let comms = mesh_comms(3, &Config::default());
    let outs = on_all(&comms, |c| {
        let mut acc = Vec::new();
        for k in 0..20 {
            let mut v = vec![(c.rank() + k) as i64; 5];
            c.all_reduce(&mut v, ReduceOp::Max).unwrap();
            acc.push(v[0]);
            let src = vec![c.rank() as f32 + 1.0; 4];
            let mut dst = vec![0f32; 4];
            c.all_reduce_into(&src, &mut dst, ReduceOp::Avg).unwrap();
            assert_eq!(dst, vec![2.0; 4]);
        }
        acc
    });
    for o in outs {
        assert_eq!(o, (0..20).map(|k| (k + 2) as i64).collect::<Vec<_>>());
    }
}

#[test]
fn async_work_completes_in_issue_order_and_mixes_with_blocking_calls() {
    let comms = mesh_comms(4, &Config::default());
    let outs = on_all(&comms, |c| {
        let r = c.rank() as i32;
        // Different sizes so a reordering would show up as a mismatch error.
        let works: Vec<_> =
            (0..12).map(|k| c.all_reduce_async(vec![r + k; 1 + k as usize * 1000], ReduceOp::Sum)).collect();
        let mut blocking = vec![1i64; 7];
        c.all_reduce(&mut blocking, ReduceOp::Sum).unwrap();
        assert_eq!(blocking, vec![4; 7]);
        let later = c.all_reduce_async(vec![r as f64; 3], ReduceOp::Max);
        let mut got = Vec::new();
        for (k, w) in works.into_iter().enumerate() {
            let v = w.wait().unwrap();
            assert_eq!(v.len(), 1 + k * 1000);
            got.push(v[0]);
        }
        assert!(later.wait_timeout(std::time::Duration::from_secs(30)));
        assert_eq!(later.wait().unwrap(), vec![3.0; 3]);
        got
    });
    for o in outs {
        assert_eq!(o, (0..12).map(|k| 6 + 4 * k).collect::<Vec<i32>>());
    }
}

#[test]
fn reduce_on_arrival_through_payload_sinks() {
    // Pieces of 1..61 bytes split elements of every dtype; every algorithm's receive-reduces
    // go through the sink path when their dependencies allow.
    for algo in ["ring", "rd", "hd", "tree"] {
        let cfg = Config { algo: Some(algo.into()), chunk: Some(4096), ..Config::default() };
        for n in [2, 3, 5] {
            let comms = devccl::testing::mesh_comms_with(n, &cfg, true);
            for dtype in DType::ALL {
                for op in ReduceOp::ALL {
                    let count = 10_007;
                    let inputs: Vec<Vec<u8>> = (0..n).map(|r| common::input(dtype, op, r, count)).collect();
                    let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
                    let expect = reference_reduce(dtype, op, &refs).unwrap();
                    let outs = on_all(&comms, |c| {
                        let src = Region::from_vec(inputs[c.rank()].clone());
                        let dst = Region::alloc(src.len());
                        c.all_reduce_regions(src.full(), dst.full(), dtype, op).unwrap();
                        let r = Region::from_vec(inputs[c.rank()].clone());
                        c.all_reduce_regions(r.full(), r.full(), dtype, op).unwrap();
                        (dst.full().to_vec().unwrap(), r.into_vec::<u8>().unwrap())
                    });
                    for (r, (oop, ip)) in outs.iter().enumerate() {
                        assert!(oop == &expect && ip == &expect, "{algo} n={n} {dtype} {op}: rank {r} differs");
                    }
                }
            }
        }
    }
}

#[test]
fn channels_split_the_contiguous_collectives() {
    use devccl::Collective;
    for nch in [2, 3] {
        let cfg = Config { nchannels: Some(nch), chunk: Some(256), ..Config::default() };
        for n in [1, 2, 3, 4, 7] {
            let comms = mesh_comms(n, &cfg);
            for count in [0usize, 1, 2, 1009, 20_011] {
                for (dtype, op) in
                    [(DType::F32, ReduceOp::Sum), (DType::I64, ReduceOp::Max), (DType::BF16, ReduceOp::Avg)]
                {
                    let inputs: Vec<Vec<u8>> = (0..n).map(|r| common::input(dtype, op, r, count)).collect();
                    let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
                    let reduced = reference_reduce(dtype, op, &refs).unwrap();
                    let root = n - 1;
                    let outs = on_all(&comms, |c| {
                        let r = Region::from_vec(inputs[c.rank()].clone());
                        c.all_reduce_regions(r.full(), r.full(), dtype, op).unwrap();
                        let b = Region::from_vec(inputs[c.rank()].clone());
                        c.collective(&Collective::Broadcast { root }, dtype, b.full(), b.full()).unwrap();
                        let src = Region::from_vec(inputs[c.rank()].clone());
                        let dst = Region::alloc(src.len());
                        c.collective(&Collective::Reduce { op, root }, dtype, src.full(), dst.full()).unwrap();
                        (r.into_vec::<u8>().unwrap(), b.into_vec::<u8>().unwrap(), dst.full().to_vec().unwrap())
                    });
                    for (r, (ar, bc, rd)) in outs.iter().enumerate() {
                        let what = format!("{nch} channels, n={n}, count={count}, {dtype} {op}, rank {r}");
                        assert!(ar == &reduced, "all_reduce: {what}");
                        assert!(bc == &inputs[root], "broadcast: {what}");
                        if r == root {
                            assert!(rd == &reduced, "reduce: {what}");
                        }
                    }
                }
            }
        }
    }
}
