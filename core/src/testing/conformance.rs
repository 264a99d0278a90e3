//! The transport conformance suite: behaviour every [`Connection`] must show, whatever moves
//! the bytes. A transport's tests call [`run_all`] with a factory that returns a freshly
//! connected pair `(rank 0 side, rank 1 side)`.

use std::time::{Duration, Instant};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::memory::{Region, RegionSlice};
use crate::op::ReduceOp;
use crate::transport::{Completion, Connection, RecvRequest, ReqId, SendRequest, wait_ready};
use crate::types::{Rank, Seq};
use crate::wire::{CollKind, FrameHeader, FrameType};

/// A connected pair: (rank 0's connection to rank 1, rank 1's connection to rank 0).
pub type Pair = (Box<dyn Connection>, Box<dyn Connection>);

/// A data header for message `msg` of `len` bytes in a test all_reduce with sequence `seq`.
pub fn header(seq: u64, msg: u32, len: usize) -> FrameHeader {
    FrameHeader {
        frame: FrameType::Data,
        coll: CollKind::AllReduce,
        dtype: DType::U8,
        op: Some(ReduceOp::Sum),
        algo: 0,
        root: None,
        seq: Seq(seq),
        count: 1 << 20,
        msg,
        len: len as u32,
        offset: 0,
        tag: 0,
    }
}

/// Deterministic test payload.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Drive `pending` requests on `conns` (index into `conns`, request) to completion, polling
/// all connections fairly; errors as soon as any request fails; times out after `limit`.
pub fn drive(
    conns: &mut [&mut Box<dyn Connection>],
    pending: &[(usize, ReqId)],
    limit: Duration,
) -> Result<Vec<Completion>> {
    let deadline = Instant::now() + limit;
    let mut out: Vec<Option<Completion>> = vec![None; pending.len()];
    loop {
        let mut moved = false;
        for (i, (c, id)) in pending.iter().enumerate() {
            if out[i].is_none()
                && let Some(done) = conns[*c].test(*id)?
            {
                out[i] = Some(done);
                moved = true;
            }
        }
        if out.iter().all(Option::is_some) {
            return Ok(out.into_iter().map(Option::unwrap).collect());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout { what: "conformance drive".into(), after: limit });
        }
        if !moved {
            let mut fds = Vec::new();
            for c in conns.iter() {
                c.wait_fds(&mut fds);
            }
            wait_ready(&fds, Duration::from_millis(5))?;
        }
    }
}

fn post_send(c: &mut Box<dyn Connection>, h: FrameHeader, src: RegionSlice) -> Result<ReqId> {
    loop {
        if let Some(id) = c.isend(SendRequest { header: h, src: src.clone() })? {
            return Ok(id);
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn check(cond: bool, what: &str) -> Result<()> {
    if cond { Ok(()) } else { Err(Error::Internal(format!("conformance: {what}"))) }
}

/// Messages of many sizes (0 bytes to 4 MiB), several in flight both ways, arrive intact and
/// in order.
pub fn ordered_payloads(pair: Pair) -> Result<()> {
    let (mut a, mut b) = pair;
    let sizes = [0usize, 1, 7, 56, 4096, 65_537, 1 << 20, 4 << 20, 3, 0, 128 << 10];
    let srcs: Vec<Region> = sizes.iter().enumerate().map(|(i, &n)| Region::from_vec(pattern(i as u64, n))).collect();
    let dsts: Vec<Region> = sizes.iter().map(|&n| Region::alloc(n)).collect();
    let back_src: Vec<Region> =
        sizes.iter().enumerate().map(|(i, &n)| Region::from_vec(pattern(100 + i as u64, n))).collect();
    let back_dst: Vec<Region> = sizes.iter().map(|&n| Region::alloc(n)).collect();
    // Post in waves no larger than any transport's queue.
    for wave in (0..sizes.len()).collect::<Vec<_>>().chunks(4) {
        let mut pend = Vec::new();
        for &i in wave {
            let h = header(1, i as u32, sizes[i]);
            pend.push((
                1,
                b.irecv(RecvRequest { expect: h, dst: dsts[i].full() })?
                    .ok_or_else(|| Error::Internal("irecv refused".into()))?,
            ));
            pend.push((
                0,
                a.irecv(RecvRequest { expect: h, dst: back_dst[i].full() })?
                    .ok_or_else(|| Error::Internal("irecv refused".into()))?,
            ));
            pend.push((0, post_send(&mut a, h, srcs[i].full())?));
            pend.push((1, post_send(&mut b, h, back_src[i].full())?));
        }
        let done = drive(&mut [&mut a, &mut b], &pend, Duration::from_secs(60))?;
        for c in done {
            match c {
                Completion::Sent { .. } | Completion::Received { .. } => {}
            }
        }
    }
    for i in 0..sizes.len() {
        check(dsts[i].full().to_vec()? == pattern(i as u64, sizes[i]), "payload a->b intact")?;
        check(back_dst[i].full().to_vec()? == pattern(100 + i as u64, sizes[i]), "payload b->a intact")?;
    }
    Ok(())
}

/// A header that differs from the expected one is a [`Error::Mismatch`] naming both calls.
pub fn mismatch_detected(pair: Pair) -> Result<()> {
    let (mut a, mut b) = pair;
    let src = Region::from_vec(pattern(1, 64));
    let dst = Region::alloc(64);
    let mut theirs = header(5, 0, 64);
    theirs.coll = CollKind::AllGather;
    theirs.op = None;
    let s = post_send(&mut a, theirs, src.full())?;
    let r = b.irecv(RecvRequest { expect: header(5, 0, 64), dst: dst.full() })?.expect("room for one recv");
    match drive(&mut [&mut a, &mut b], &[(0, s), (1, r)], Duration::from_secs(30)) {
        Err(Error::Mismatch { local_rank, peer, local, remote }) => {
            check(local_rank == Rank(1) && peer == Rank(0), "mismatch names ranks")?;
            check(local.starts_with("all_reduce") && remote.starts_with("all_gather"), "mismatch names calls")?;
            Ok(())
        }
        other => Err(Error::Internal(format!("conformance: expected a mismatch, got {other:?}"))),
    }
}

/// An abort frame from the peer fails the pending receive with the peer's reason.
pub fn abort_reaches_peer(pair: Pair) -> Result<()> {
    let (mut a, mut b) = pair;
    let dst = Region::alloc(16);
    let r = b.irecv(RecvRequest { expect: header(2, 0, 16), dst: dst.full() })?.expect("room for one recv");
    a.send_abort(Seq(2), "rank 0 saw rank 7 die");
    match drive(&mut [&mut a, &mut b], &[(1, r)], Duration::from_secs(30)) {
        Err(Error::Remote { peer: Some(Rank(0)), message }) if message.contains("rank 7 die") => Ok(()),
        other => Err(Error::Internal(format!("conformance: expected the abort reason, got {other:?}"))),
    }
}

/// When the peer's connection goes away, a pending receive fails promptly naming the peer.
pub fn peer_drop_detected(pair: Pair) -> Result<()> {
    let (a, mut b) = pair;
    let dst = Region::alloc(16);
    let r = b.irecv(RecvRequest { expect: header(3, 0, 16), dst: dst.full() })?.expect("room for one recv");
    drop(a);
    let t = Instant::now();
    match drive(&mut [&mut b], &[(0, r)], Duration::from_secs(10)) {
        Err(Error::Remote { peer: Some(Rank(0)), .. }) => check(t.elapsed() < Duration::from_secs(5), "prompt"),
        other => Err(Error::Internal(format!("conformance: expected a closed-connection error, got {other:?}"))),
    }
}

/// After `cancel`, a revoked buffer is never touched and the connection reports no stale
/// completion.
pub fn cancel_forgets(pair: Pair) -> Result<()> {
    let (_a, mut b) = pair;
    let dst = Region::alloc(8);
    let r = b.irecv(RecvRequest { expect: header(4, 0, 8), dst: dst.full() })?.expect("room for one recv");
    b.cancel();
    check(b.test(r)?.is_none(), "cancelled request does not complete")
}

/// Run every check; each gets a fresh pair from `make`.
pub fn run_all(make: &dyn Fn() -> Pair) -> Result<()> {
    let checks: [(&str, fn(Pair) -> Result<()>); 5] = [
        ("ordered_payloads", ordered_payloads),
        ("mismatch_detected", mismatch_detected),
        ("abort_reaches_peer", abort_reaches_peer),
        ("peer_drop_detected", peer_drop_detected),
        ("cancel_forgets", cancel_forgets),
    ];
    for (name, f) in checks {
        f(make()).map_err(|e| Error::Internal(format!("conformance check {name} failed: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::mesh;
    use crate::transport::Transport;

    fn mem_pair() -> Pair {
        let m = mesh(2);
        let far = Instant::now() + Duration::from_secs(5);
        let a = m[0].connect(Rank(1), &m[1].endpoint(), far).unwrap();
        let b = m[1].accept(Rank(0), far).unwrap();
        (a, b)
    }

    #[test]
    fn mem_transport_conforms() {
        run_all(&mem_pair).unwrap();
    }
}
