//! Every schedule generator on the in-memory mesh: every collective × every algorithm that
//! implements it × world sizes 1..9, 13, 16 × counts 0, 1, a prime and a large one, in place
//! and out of place, bit-exact against a reference computed here from exactly representable
//! inputs (so any reduction order gives the same bits).
//!
//! Small worlds run the full dtype × op matrix; larger worlds and the large count rotate
//! through the dtypes and ops so every dtype, every op and every algorithm × world pair is
//! still covered without the suite taking minutes. A static simulation (no threads) checks
//! that the ranks' schedules pair up message for message and cannot deadlock, for many more
//! world sizes than the mesh runs.

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use devccl::algo::{self, Algo, Shape};
use devccl::check;
use devccl::schedule::{Builder, Schedule, StepKind};
use devccl::testing::{mesh_comms, on_all};
use devccl::{Call, CollKind, Communicator, DType, ReduceOp};
use devccl_core::config::Config;
use devccl_core::memory::Region;
use devccl_core::op::reference_reduce;

/// Element counts per call (per rank block for the block collectives).
const COUNTS: [usize; 4] = [0, 1, 1009, 65_537];
const LARGE: usize = 65_537;
/// Pipeline chunk of the main matrix: several chunks per block at the larger counts.
const CHUNK: usize = 4096;
/// What untouched output bytes hold.
const SENTINEL: u8 = 0xA5;

fn reducing(c: CollKind) -> bool {
    matches!(c, CollKind::AllReduce | CollKind::ReduceScatter | CollKind::Reduce)
}

fn rooted(c: CollKind) -> bool {
    matches!(c, CollKind::Broadcast | CollKind::Reduce | CollKind::Gather | CollKind::Scatter)
}

/// One call of one collective as every rank issues it.
#[derive(Debug, Clone, Copy)]
struct Case {
    coll: CollKind,
    algo: Algo,
    dtype: DType,
    op: ReduceOp,
    count: usize,
    root: usize,
    in_place: bool,
    chunk: usize,
}

/// Every rank's input and expected output (`None`: the output must stay untouched).
#[derive(Debug)]
struct Data {
    inputs: Vec<Vec<u8>>,
    expect: Vec<Option<Vec<u8>>>,
}

fn input_elems(coll: CollKind, n: usize, count: usize) -> usize {
    match coll {
        CollKind::ReduceScatter | CollKind::AllToAll | CollKind::Scatter => n * count,
        _ => count,
    }
}

fn output_elems(coll: CollKind, n: usize, count: usize) -> usize {
    match coll {
        CollKind::AllGather | CollKind::AllToAll | CollKind::Gather => n * count,
        _ => count,
    }
}

/// Inputs and the reference results, computed independently of any algorithm.
fn data(coll: CollKind, dtype: DType, op: ReduceOp, n: usize, count: usize, root: usize) -> Data {
    let es = dtype.size();
    let cb = count * es;
    let inputs: Vec<Vec<u8>> = (0..n).map(|r| check::input(dtype, op, r, 0, input_elems(coll, n, count))).collect();
    let concat = || inputs.iter().flat_map(|v| v.iter().copied()).collect::<Vec<u8>>();
    let expect: Vec<Option<Vec<u8>>> = match coll {
        CollKind::AllReduce | CollKind::Reduce => {
            let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
            let sum = reference_reduce(dtype, op, &refs).expect("reference reduction");
            (0..n).map(|r| (coll == CollKind::AllReduce || r == root).then(|| sum.clone())).collect()
        }
        CollKind::ReduceScatter => {
            let all = check::reduced(dtype, op, n, 0, n * count).expect("reference reduction");
            (0..n).map(|r| Some(all[r * cb..(r + 1) * cb].to_vec())).collect()
        }
        CollKind::AllGather => {
            let all = concat();
            (0..n).map(|_| Some(all.clone())).collect()
        }
        CollKind::Gather => {
            let all = concat();
            (0..n).map(|r| (r == root).then(|| all.clone())).collect()
        }
        CollKind::Broadcast => (0..n).map(|_| Some(inputs[root].clone())).collect(),
        CollKind::Scatter => (0..n).map(|r| Some(inputs[root][r * cb..(r + 1) * cb].to_vec())).collect(),
        CollKind::AllToAll => (0..n)
            .map(|r| Some((0..n).flat_map(|i| inputs[i][r * cb..(r + 1) * cb].iter().copied()).collect()))
            .collect(),
        other => unreachable!("{other:?} has no uniform reference"),
    };
    Data { inputs, expect }
}

/// In-place binding: one region (initial contents, Input range, Output range, in bytes),
/// following each collective's in-place convention.
fn in_place_layout(
    case: &Case,
    n: usize,
    r: usize,
    input: &[u8],
) -> (Vec<u8>, std::ops::Range<usize>, std::ops::Range<usize>) {
    let cb = case.count * case.dtype.size();
    match case.coll {
        // Input is this rank's block of Output.
        CollKind::AllGather | CollKind::Gather => {
            let mut init = vec![SENTINEL; n * cb];
            init[r * cb..(r + 1) * cb].copy_from_slice(input);
            (init, r * cb..(r + 1) * cb, 0..n * cb)
        }
        // Output is this rank's block of Input.
        CollKind::ReduceScatter | CollKind::Scatter => (input.to_vec(), 0..n * cb, r * cb..(r + 1) * cb),
        _ => (input.to_vec(), 0..cb, 0..cb),
    }
}

/// What the in-place region must hold afterwards.
fn in_place_after(case: &Case, n: usize, r: usize, init: &[u8], expect: &Option<Vec<u8>>) -> Vec<u8> {
    let cb = case.count * case.dtype.size();
    let _ = n;
    let Some(e) = expect else {
        return init.to_vec();
    };
    match case.coll {
        CollKind::ReduceScatter | CollKind::Scatter => {
            let mut v = init.to_vec();
            v[r * cb..(r + 1) * cb].copy_from_slice(e);
            v
        }
        _ => e.clone(),
    }
}

fn first_diff(got: &[u8], want: &[u8]) -> String {
    if got.len() != want.len() {
        return format!("length {} != {}", got.len(), want.len());
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    let wrong = got.iter().zip(want).filter(|(a, b)| a != b).count();
    format!("{wrong} bytes differ, first at byte {i}: got {:#04x} want {:#04x}", got[i], want[i])
}

/// Run `case` on this rank and compare.
fn run_rank(c: &Communicator, case: &Case, data: &Data) -> Result<(), String> {
    let (r, n) = (c.rank(), c.world_size());
    let es = case.dtype.size();
    let call = Call {
        coll: case.coll,
        dtype: case.dtype,
        op: reducing(case.coll).then_some(case.op),
        root: rooted(case.coll).then_some(case.root),
        count: case.count,
        algo: case.algo,
        tag: 0,
    };
    let shape = Shape { rank: r, n, count: case.count, esize: es, chunk_bytes: case.chunk, root: case.root };
    let build = |b: &mut Builder| algo::build(case.coll, case.algo, b, shape).expect("supported pair");
    let input = &data.inputs[r];
    let expect = &data.expect[r];
    if case.in_place {
        let (init, ir, or) = in_place_layout(case, n, r, input);
        let want = in_place_after(case, n, r, &init, expect);
        let reg = Region::from_vec(init);
        c.run_schedule(call, build, reg.slice(ir), reg.slice(or)).map_err(|e| format!("rank {r}: {e}"))?;
        let got = reg.full().to_vec().map_err(|e| e.to_string())?;
        if got != want {
            return Err(format!("rank {r} in place: {}", first_diff(&got, &want)));
        }
    } else {
        let out_bytes = output_elems(case.coll, n, case.count) * es;
        let src = Region::from_vec(input.clone());
        let dst = Region::from_vec(vec![SENTINEL; out_bytes]);
        c.run_schedule(call, build, src.full(), dst.full()).map_err(|e| format!("rank {r}: {e}"))?;
        let got = dst.full().to_vec().map_err(|e| e.to_string())?;
        let want = expect.clone().unwrap_or_else(|| vec![SENTINEL; out_bytes]);
        if got != want {
            return Err(format!("rank {r} out of place: {}", first_diff(&got, &want)));
        }
        if src.full().to_vec().map_err(|e| e.to_string())? != *input {
            return Err(format!("rank {r}: the input was modified"));
        }
    }
    Ok(())
}

/// Run `cases` (all on the same data) on every rank; panics naming the failures.
fn run_cases(comms: &[Communicator], cases: &[Case], data: &Data) {
    let results = on_all(comms, |c| cases.iter().map(|case| run_rank(c, case, data)).collect::<Vec<_>>());
    let mut failures = Vec::new();
    for (r, per_rank) in results.iter().enumerate() {
        for (case, res) in cases.iter().zip(per_rank) {
            if let Err(e) = res {
                failures.push(format!("n={} {case:?}: rank {r}: {e}", comms.len()));
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures[..failures.len().min(8)].join("\n"));
}

/// The (dtype, op, count, root) calls to make for `coll` on `n` ranks: the full
/// dtype × op matrix on small worlds, every dtype with rotating ops on larger ones, and two
/// rotating picks (one of them avg for reducing collectives) at the large count.
fn combos(coll: CollKind, n: usize) -> Vec<(DType, ReduceOp, usize, usize)> {
    let ops: &[ReduceOp] = if reducing(coll) { &ReduceOp::ALL } else { &[ReduceOp::Sum] };
    let mut out = Vec::new();
    for (ci, &count) in COUNTS.iter().enumerate() {
        let pairs: Vec<(DType, ReduceOp)> = if count == LARGE {
            let avg = if reducing(coll) { ReduceOp::Avg } else { ReduceOp::Sum };
            vec![(DType::ALL[(n + ci) % 8], ops[n % ops.len()]), (DType::ALL[(n + ci + 3) % 8], avg)]
        } else if n <= 4 {
            DType::ALL.iter().flat_map(|&d| ops.iter().map(move |&o| (d, o))).collect()
        } else {
            DType::ALL.iter().enumerate().map(|(i, &d)| (d, ops[(i + n + ci) % ops.len()])).collect()
        };
        for (k, (dtype, op)) in pairs.into_iter().enumerate() {
            out.push((dtype, op, count, (n / 2 + ci + k) % n));
        }
    }
    out
}

/// Every algorithm of `coll`, in place (when the collective has that form) and out of
/// place, over every world size and combo.
fn check_collective(coll: CollKind) {
    let algos = algo::supported(coll);
    assert!(!algos.is_empty());
    let in_place_forms: &[bool] = if coll == CollKind::AllToAll { &[false] } else { &[false, true] };
    for n in common::WORLDS {
        let comms = mesh_comms(n, &Config::default());
        for (dtype, op, count, root) in combos(coll, n) {
            let data = data(coll, dtype, op, n, count, root);
            let cases: Vec<Case> = algos
                .iter()
                .flat_map(|&algo| {
                    in_place_forms.iter().map(move |&in_place| Case {
                        coll,
                        algo,
                        dtype,
                        op,
                        count,
                        root,
                        in_place,
                        chunk: CHUNK,
                    })
                })
                .collect();
            run_cases(&comms, &cases, &data);
        }
    }
}

#[test]
fn all_reduce_every_algorithm_world_dtype_op_count() {
    check_collective(CollKind::AllReduce);
}

#[test]
fn reduce_scatter_every_algorithm_world_dtype_op_count() {
    check_collective(CollKind::ReduceScatter);
}

#[test]
fn all_gather_every_algorithm_world_dtype_count() {
    check_collective(CollKind::AllGather);
}

#[test]
fn broadcast_every_algorithm_world_dtype_count_root() {
    check_collective(CollKind::Broadcast);
}

#[test]
fn reduce_every_algorithm_world_dtype_op_count_root() {
    check_collective(CollKind::Reduce);
}

#[test]
fn all_to_all_every_world_dtype_count() {
    check_collective(CollKind::AllToAll);
}

#[test]
fn gather_every_algorithm_world_dtype_count_root() {
    check_collective(CollKind::Gather);
}

#[test]
fn scatter_every_algorithm_world_dtype_count_root() {
    check_collective(CollKind::Scatter);
}

#[test]
fn tiny_chunks_pipeline_every_algorithm() {
    // 64-byte chunks: hundreds of messages per block, every slot ring wraps many times and
    // the per-chunk dependencies carry the whole pipeline.
    for n in [2, 3, 5, 8] {
        let comms = mesh_comms(n, &Config::default());
        for coll in [
            CollKind::AllReduce,
            CollKind::ReduceScatter,
            CollKind::AllGather,
            CollKind::Broadcast,
            CollKind::Reduce,
            CollKind::AllToAll,
            CollKind::Gather,
            CollKind::Scatter,
        ] {
            let (dtype, op, count, root) = (DType::F32, ReduceOp::Avg, 3001, n - 1);
            let data = data(coll, dtype, op, n, count, root);
            let cases: Vec<Case> = algo::supported(coll)
                .iter()
                .flat_map(|&algo| {
                    [false, true]
                        .into_iter()
                        .filter(|&ip| !ip || coll != CollKind::AllToAll)
                        .map(move |in_place| Case { coll, algo, dtype, op, count, root, in_place, chunk: 64 })
                })
                .collect();
            run_cases(&comms, &cases, &data);
        }
    }
}

#[test]
fn all_to_all_v_unequal_counts_and_gaps() {
    // Counts vary per pair (some zero); blocks are packed with gaps that must stay
    // untouched; small chunks cut the larger blocks into several messages.
    let count = |i: usize, j: usize| ((i * 5 + j * 3 + 1) % 4) * 150 + (j % 3);
    for n in [1, 2, 3, 5, 8, 13] {
        let comms = mesh_comms(n, &Config::default());
        for dtype in [DType::F64, DType::BF16, DType::U8] {
            let es = dtype.size();
            let layout = |counts: Vec<usize>| {
                let displs: Vec<usize> =
                    counts.iter().scan(0, |at, &c| Some(std::mem::replace(at, *at + c + 2))).collect();
                let len = displs.last().zip(counts.last()).map(|(d, c)| d + c).unwrap_or(0);
                (counts, displs, len)
            };
            let outs = on_all(&comms, |c| {
                let r = c.rank();
                let (sc, sd, slen) = layout((0..n).map(|j| count(r, j)).collect());
                let (rc, rd, rlen) = layout((0..n).map(|i| count(i, r)).collect());
                let input = check::input(dtype, ReduceOp::Sum, r, 0, slen);
                let src = Region::from_vec(input);
                let dst = Region::from_vec(vec![SENTINEL; rlen * es]);
                let call = Call {
                    coll: CollKind::AllToAllV,
                    dtype,
                    op: None,
                    root: None,
                    count: 0,
                    algo: Algo::Direct,
                    tag: 0,
                };
                c.run_schedule(
                    call,
                    |b| algo::direct::all_to_all_v(b, r, n, es, &sc, &sd, &rc, &rd, 256),
                    src.full(),
                    dst.full(),
                )
                .unwrap();
                (rc, rd, dst.full().to_vec().unwrap())
            });
            for (r, (rc, rd, got)) in outs.iter().enumerate() {
                let mut want = vec![SENTINEL; got.len()];
                for i in 0..n {
                    // Rank i's block for r starts at i's send displacement for r.
                    let sd: usize = (0..r).map(|j| count(i, j) + 2).sum();
                    let theirs = check::input(dtype, ReduceOp::Sum, i, sd, rc[i]);
                    want[rd[i] * es..(rd[i] + rc[i]) * es].copy_from_slice(&theirs);
                }
                assert!(*got == want, "n={n} {dtype} rank {r}: {}", first_diff(got, &want));
            }
        }
    }
}

#[test]
fn send_recv_around_a_ring() {
    for n in [2, 3, 4, 9] {
        let comms = mesh_comms(n, &Config::default());
        for bytes in [0usize, 1, 1009, 100_000] {
            let outs = on_all(&comms, |c| {
                let r = c.rank();
                let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
                let src = Region::from_vec(check::input(DType::U8, ReduceOp::Sum, r, 0, bytes));
                let dst = Region::from_vec(vec![SENTINEL; bytes]);
                let call = Call {
                    coll: CollKind::SendRecv,
                    dtype: DType::U8,
                    op: None,
                    root: None,
                    count: bytes,
                    algo: Algo::Direct,
                    tag: 7,
                };
                c.run_schedule(
                    call,
                    |b| {
                        algo::p2p::send(b, next, bytes, 4096);
                        algo::p2p::recv(b, prev, bytes, 4096);
                    },
                    src.full(),
                    dst.full(),
                )
                .unwrap();
                dst.full().to_vec().unwrap()
            });
            for (r, got) in outs.iter().enumerate() {
                let want = check::input(DType::U8, ReduceOp::Sum, (r + n - 1) % n, 0, bytes);
                assert!(*got == want, "n={n} bytes={bytes} rank {r}");
            }
        }
    }
}

#[test]
fn barrier_holds_everyone_until_the_last_arrives() {
    for n in common::WORLDS {
        let comms = mesh_comms(n, &Config::default());
        for round in 0..3 {
            // A different rank is late each round.
            let late = (round * 5 + 1) % n;
            let times = on_all(&comms, |c| {
                if c.rank() == late {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let arrived = Instant::now();
                let empty = Region::alloc(0);
                let call = Call {
                    coll: CollKind::Barrier,
                    dtype: DType::U8,
                    op: None,
                    root: None,
                    count: 0,
                    algo: Algo::Dissemination,
                    tag: 0,
                };
                let shape = Shape { rank: c.rank(), n, count: 0, esize: 1, chunk_bytes: CHUNK, root: 0 };
                c.run_schedule(
                    call,
                    |b| algo::build(CollKind::Barrier, Algo::Dissemination, b, shape).unwrap(),
                    empty.full(),
                    empty.full(),
                )
                .unwrap();
                (arrived, Instant::now())
            });
            let last_arrival = times.iter().map(|t| t.0).max().unwrap();
            for (r, (_, left)) in times.iter().enumerate() {
                assert!(*left >= last_arrival, "n={n}: rank {r} left the barrier before rank {late} arrived");
            }
        }
    }
}

/// Static check of a set of schedules (one per rank): simulates the executor's rules —
/// per-peer FIFO matching, sends posted in order once their dependencies are done, direct
/// receives posted once theirs are, staged receives taken off the wire in order and reduced
/// once their dependencies are done — with unlimited buffering, and requires every step to
/// complete with matching message lengths.
fn simulate(scheds: &[Schedule]) -> Result<(), String> {
    let n = scheds.len();
    let mut pending: Vec<Vec<u32>> = scheds.iter().map(|s| s.ndeps.clone()).collect();
    let mut done: Vec<Vec<bool>> = scheds.iter().map(|s| vec![false; s.len()]).collect();
    let mut arrived: Vec<Vec<bool>> = scheds.iter().map(|s| vec![false; s.len()]).collect();
    // Per rank and peer: the send and receive steps in schedule order, and cursors.
    let mut sends = vec![vec![Vec::new(); n]; n];
    let mut recvs = vec![vec![Vec::new(); n]; n];
    for (r, s) in scheds.iter().enumerate() {
        for (i, st) in s.steps.iter().enumerate() {
            match st {
                StepKind::Send { peer, .. } => sends[r][peer.idx()].push(i),
                StepKind::Recv { peer, .. } | StepKind::RecvReduce { peer, .. } => recvs[r][peer.idx()].push(i),
                _ => {}
            }
        }
    }
    let mut scur = vec![vec![0usize; n]; n];
    let mut rcur = vec![vec![0usize; n]; n];
    let mut wire: Vec<Vec<VecDeque<usize>>> = vec![vec![VecDeque::new(); n]; n];
    let complete = |r: usize, i: usize, pending: &mut Vec<Vec<u32>>, done: &mut Vec<Vec<bool>>| {
        done[r][i] = true;
        for &t in scheds[r].successors(i as u32) {
            pending[r][t as usize] -= 1;
        }
    };
    loop {
        let mut moved = false;
        for r in 0..n {
            for p in 0..n {
                while let Some(&i) = sends[r][p].get(scur[r][p]) {
                    if pending[r][i] > 0 {
                        break;
                    }
                    wire[r][p].push_back(scheds[r].steps[i].len());
                    scur[r][p] += 1;
                    complete(r, i, &mut pending, &mut done);
                    moved = true;
                }
                while let Some(&i) = recvs[r][p].get(rcur[r][p]) {
                    let staged = matches!(scheds[r].steps[i], StepKind::RecvReduce { .. });
                    if (!staged && pending[r][i] > 0) || wire[p][r].is_empty() {
                        break;
                    }
                    let len = wire[p][r].pop_front().unwrap();
                    if len != scheds[r].steps[i].len() {
                        return Err(format!(
                            "rank {r} expected {} bytes from rank {p}, got {len}",
                            scheds[r].steps[i].len()
                        ));
                    }
                    rcur[r][p] += 1;
                    arrived[r][i] = true;
                    if !staged {
                        complete(r, i, &mut pending, &mut done);
                    }
                    moved = true;
                }
            }
            for i in 0..scheds[r].len() {
                let local = scheds[r].steps[i].peer().is_none();
                let staged_ready = matches!(scheds[r].steps[i], StepKind::RecvReduce { .. }) && arrived[r][i];
                if !done[r][i] && pending[r][i] == 0 && (local || staged_ready) {
                    complete(r, i, &mut pending, &mut done);
                    moved = true;
                }
            }
        }
        if !moved {
            break;
        }
    }
    for r in 0..n {
        if let Some(i) = done[r].iter().position(|d| !d) {
            return Err(format!("deadlock: rank {r} never completes step {i} {:?}", scheds[r].steps[i]));
        }
        for (p, q) in wire[r].iter().enumerate() {
            if !q.is_empty() {
                return Err(format!("rank {r} sent {} messages rank {p} never received", q.len()));
            }
        }
    }
    Ok(())
}

#[test]
fn simulator_catches_mismatch_and_deadlock() {
    use devccl::schedule::{Buf, Loc};
    let send = |peer: usize, len: usize| StepKind::Send { peer: peer.into(), src: Loc::new(Buf::Input, 0), len };
    let recv = |peer: usize, len: usize| StepKind::Recv { peer: peer.into(), dst: Loc::new(Buf::Output, 0), len };
    let sched = |steps: Vec<(StepKind, Vec<u32>)>| {
        let mut b = Builder::new();
        for (k, deps) in steps {
            let deps: Vec<Option<u32>> = deps.into_iter().map(Some).collect();
            b.step(k, &deps);
        }
        b.build()
    };
    // Lengths disagree.
    let bad_len = [sched(vec![(send(1, 8), vec![])]), sched(vec![(recv(0, 4), vec![])])];
    assert!(simulate(&bad_len).unwrap_err().contains("expected 4 bytes"));
    // Both ranks receive before they send: a cycle.
    let cycle = [
        sched(vec![(recv(1, 4), vec![]), (send(1, 4), vec![0])]),
        sched(vec![(recv(0, 4), vec![]), (send(0, 4), vec![0])]),
    ];
    assert!(simulate(&cycle).unwrap_err().contains("deadlock"));
    // A message nobody receives.
    let extra = [sched(vec![(send(1, 4), vec![]), (send(1, 4), vec![])]), sched(vec![(recv(0, 4), vec![])])];
    assert!(simulate(&extra).is_err());
}

#[test]
fn schedules_pair_up_and_complete_for_many_worlds() {
    // Far more world sizes than the mesh runs, tiny chunks (2 elements): every rank's
    // messages must match its peers' one for one, and the DAGs must not deadlock.
    let colls = [
        CollKind::AllReduce,
        CollKind::ReduceScatter,
        CollKind::AllGather,
        CollKind::Broadcast,
        CollKind::Reduce,
        CollKind::AllToAll,
        CollKind::Gather,
        CollKind::Scatter,
        CollKind::Barrier,
    ];
    for coll in colls {
        for &algo in algo::supported(coll) {
            for n in (1..=24).chain([31, 32, 33]) {
                for count in [1, 5, 37] {
                    for root in if rooted(coll) { vec![0, n / 2, n - 1] } else { vec![0] } {
                        let scheds: Vec<Schedule> = (0..n)
                            .map(|rank| {
                                let mut b = Builder::new();
                                let sh = Shape { rank, n, count, esize: 4, chunk_bytes: 8, root };
                                algo::build(coll, algo, &mut b, sh).unwrap();
                                b.build()
                            })
                            .collect();
                        if let Err(e) = simulate(&scheds) {
                            panic!("{coll:?} {algo} n={n} count={count} root={root}: {e}");
                        }
                    }
                }
            }
        }
    }
}

/// Largest number of bytes any rank sends, in units of `unit` bytes.
fn max_sent(coll: CollKind, algo: Algo, n: usize, count: usize, unit: usize) -> f64 {
    (0..n)
        .map(|rank| {
            let mut b = Builder::new();
            let sh = Shape { rank, n, count, esize: 1, chunk_bytes: 1 << 20, root: 0 };
            algo::build(coll, algo, &mut b, sh).unwrap();
            let s = b.build();
            s.steps.iter().map(|st| if let StepKind::Send { len, .. } = st { *len } else { 0 }).sum::<usize>()
        })
        .max()
        .unwrap_or(0) as f64
        / unit as f64
}

#[test]
fn bytes_on_the_wire_match_docs_algorithms_md() {
    // The per-rank send volumes docs/algorithms.md states, measured from the schedules.
    // S = the all-reduce/broadcast/reduce buffer, B = one rank's block (S = n·B).
    let count = 720_720; // divisible by every n used, so blocks are equal
    for n in [6usize, 8, 13] {
        let nf = n as f64;
        let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let (pf, lg) = (p as f64, p.trailing_zeros() as f64);
        let fold = if p == n { 0.0 } else { 1.0 };
        let cases: [(CollKind, Algo, f64); 20] = [
            (CollKind::AllReduce, Algo::Ring, 2.0 * (nf - 1.0) / nf),
            (CollKind::AllReduce, Algo::RecursiveDoubling, lg + fold),
            (CollKind::AllReduce, Algo::HalvingDoubling, 2.0 * (pf - 1.0) / pf + fold),
            (CollKind::AllReduce, Algo::Tree, 2.0),
            (CollKind::ReduceScatter, Algo::Ring, nf - 1.0),
            (CollKind::ReduceScatter, Algo::HalvingDoubling, if p == n { nf - 1.0 } else { nf }),
            (CollKind::ReduceScatter, Algo::Direct, nf - 1.0),
            (CollKind::AllGather, Algo::Ring, nf - 1.0),
            (CollKind::AllGather, Algo::RecursiveDoubling, nf - 1.0),
            (CollKind::AllGather, Algo::Direct, nf - 1.0),
            (CollKind::Broadcast, Algo::Ring, 1.0),
            (CollKind::Broadcast, Algo::Tree, if n % 2 == 1 { 1.5 } else { 1.0 }),
            (CollKind::Broadcast, Algo::Direct, nf - 1.0),
            (CollKind::Reduce, Algo::Ring, 1.0),
            (CollKind::Reduce, Algo::Tree, 1.0),
            (CollKind::Reduce, Algo::Direct, 1.0),
            (CollKind::AllToAll, Algo::Direct, nf - 1.0),
            // The root's largest child subtree: relabelled ranks p/2..p, or p..n.
            (CollKind::Gather, Algo::Tree, (p / 2).max(n - p) as f64),
            (CollKind::Scatter, Algo::Direct, nf - 1.0),
            (CollKind::Scatter, Algo::Tree, nf - 1.0),
        ];
        for (coll, algo, want) in cases {
            let per_call = if matches!(coll, CollKind::AllReduce | CollKind::Broadcast | CollKind::Reduce) {
                count
            } else {
                count / n
            };
            let got = max_sent(coll, algo, n, per_call, per_call);
            assert!((got - want).abs() < 1e-9, "{coll:?} {algo} n={n}: a rank sends {got}× instead of {want}×");
        }
    }
}

#[test]
fn dispatcher_matches_the_support_table() {
    for coll in CollKind::ALL {
        for algo in Algo::ALL {
            let mut b = Builder::new();
            let sh = Shape { rank: 0, n: 2, count: 3, esize: 4, chunk_bytes: 1024, root: 0 };
            let res = algo::build(coll, algo, &mut b, sh);
            let uniform = !matches!(coll, CollKind::AllToAllV | CollKind::SendRecv);
            assert_eq!(res.is_ok(), uniform && algo::supported(coll).contains(&algo), "{coll:?} × {algo}: {res:?}");
            if let Err(e) = res {
                assert!(!e.is_empty());
            }
        }
    }
}
