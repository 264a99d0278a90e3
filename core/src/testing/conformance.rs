//! The transport conformance suite: behaviour every [`Connection`] must show, whatever moves
//! the bytes. A transport's tests call [`run_all`] with a factory that returns a freshly
//! connected pair `(rank 0 side, rank 1 side)`.
//!
//! Receives may complete in place or scattered ([`RecvLayout::Scattered`], devmem): the suite
//! then gathers the payload into the destination itself, on the device [`run_all_with`]'s
//! `unpacker` names for the pool, and calls [`Connection::recv_consumed`], as the executor
//! does.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::memory::{Region, RegionSlice};
use crate::op::ReduceOp;
use crate::transport::{Completion, Connection, Peeked, RecvLayout, RecvRequest, ReqId, SendRequest, wait_ready};
use crate::types::{Rank, Seq};
use crate::wire::{CollKind, FrameHeader, FrameType};

/// The device that gathers a scattered receive out of an RX pool (the pool's own device, or
/// the host for host memory).
pub type Unpacker = dyn Fn(&Region) -> Result<Arc<dyn Device>>;

thread_local! {
    /// The unpacker of the suite running on this thread, and where each posted receive's
    /// payload goes (by connection and request), for scattered completions.
    static UNPACK: RefCell<Option<Arc<Unpacker>>> = const { RefCell::new(None) };
    static DESTS: RefCell<HashMap<(usize, ReqId), RegionSlice>> = RefCell::new(HashMap::new());
}

fn conn_key(c: &dyn Connection) -> usize {
    (c as *const dyn Connection).cast::<()>() as usize
}

/// Post a receive and remember its destination, for a scattered completion.
fn post_recv(c: &mut Box<dyn Connection>, req: RecvRequest) -> Result<Option<ReqId>> {
    let dst = req.dst.clone();
    let id = c.irecv(req)?;
    if let Some(id) = id {
        DESTS.with(|d| d.borrow_mut().insert((conn_key(&**c), id), dst));
    }
    Ok(id)
}

/// A completion of `id` on `c`: a scattered receive is gathered into its destination (on the
/// unpacker's device) and handed back with `recv_consumed`; it then reads as in place.
fn settle(c: &mut Box<dyn Connection>, id: ReqId, done: Completion) -> Result<Completion> {
    let dst = DESTS.with(|d| d.borrow_mut().remove(&(conn_key(&**c), id)));
    let Completion::Received { bytes, layout: RecvLayout::Scattered { pool, frags, spill } } = done else {
        return Ok(done);
    };
    let dst = dst.ok_or_else(|| Error::Internal(format!("conformance: scattered completion of unknown {id:?}")))?;
    let unpack =
        UNPACK.with(|u| u.borrow().clone()).unwrap_or_else(|| Arc::new(|_: &Region| Ok(crate::device::host())));
    let dev = unpack(&pool)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    if dev.id().is_host() || !dst.region.kind().is_host() {
        crate::scatter::gather(&*dev, &dst, &pool, &frags, spill.as_ref())?
            .wait(deadline, "conformance: gather a scattered receive")?;
    } else {
        // A device pool and a host destination: the device gathers into its own staging
        // memory, the CPU copies that into place (as the executor does).
        let temp = dev.alloc_staging(dst.len().max(1))?;
        crate::scatter::gather(&*dev, &temp.slice(0..dst.len()), &pool, &frags, spill.as_ref())?
            .wait(deadline, "conformance: gather a scattered receive")?;
        Region::with_pair(&dst, &temp.slice(0..dst.len()), |d, s| d.copy_from_slice(s))?;
    }
    c.recv_consumed(id)?;
    Ok(Completion::Received { bytes, layout: RecvLayout::InPlace })
}

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
                out[i] = Some(settle(conns[*c], *id, done)?);
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
                post_recv(&mut b, RecvRequest { expect: h, dst: dsts[i].full() })?
                    .ok_or_else(|| Error::Internal("irecv refused".into()))?,
            ));
            pend.push((
                0,
                post_recv(&mut a, RecvRequest { expect: h, dst: back_dst[i].full() })?
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
    let r = post_recv(&mut b, RecvRequest { expect: header(5, 0, 64), dst: dst.full() })?.expect("room for one recv");
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

/// The sending side of a peek check: its sends, tested until they complete.
struct Sender<'a> {
    conn: &'a mut Box<dyn Connection>,
    pending: Vec<ReqId>,
}

impl Sender<'_> {
    /// Test every pending send once (a transport may need that to move a large frame).
    fn pump(&mut self) -> Result<()> {
        let mut left = Vec::new();
        for &id in &self.pending {
            if self.conn.test(id)?.is_none() {
                left.push(id);
            }
        }
        self.pending = left;
        Ok(())
    }
}

/// Peek on `c` until it finds a frame, an error or the peer's close (sleeping on
/// `peek_fds`), pumping the peer's sends meanwhile; times out after `limit`.
fn peek_until(c: &mut Box<dyn Connection>, tx: &mut Option<Sender<'_>>, limit: Duration) -> Result<Peeked> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = tx.as_mut() {
            t.pump()?;
        }
        match c.peek()? {
            Peeked::Nothing => {}
            other => return Ok(other),
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout { what: "conformance: peek".into(), after: limit });
        }
        let mut fds = Vec::new();
        c.peek_fds(&mut fds);
        if let Some(t) = tx.as_ref() {
            t.conn.wait_fds(&mut fds);
        }
        wait_ready(&fds, Duration::from_millis(5))?;
    }
}

/// Receive the frame `expect` on `c` into a fresh buffer, pumping the peer's sends.
fn recv_pumping(c: &mut Box<dyn Connection>, tx: &mut Sender<'_>, expect: FrameHeader) -> Result<Vec<u8>> {
    let dst = Region::alloc(expect.len as usize);
    let r = post_recv(c, RecvRequest { expect, dst: dst.full() })?
        .ok_or_else(|| Error::Internal("irecv refused".into()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tx.pump()?;
        if let Some(done) = c.test(r)? {
            settle(c, r, done)?;
            return dst.full().to_vec();
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: "conformance: receive after peek".into(),
                after: Duration::from_secs(60),
            });
        }
        let mut fds = Vec::new();
        c.wait_fds(&mut fds);
        tx.conn.wait_fds(&mut fds);
        wait_ready(&fds, Duration::from_millis(5))?;
    }
}

/// `peek` shows the next incoming frame's header without consuming it: again and again,
/// and the next receive then gets that very frame, payload intact; frames of every size,
/// one after another (on TCP, over the lanes in turn); nothing on an idle connection.
pub fn peek_leaves_frames(pair: Pair) -> Result<()> {
    let (mut a, mut b) = pair;
    check(matches!(b.peek()?, Peeked::Nothing), "peek on an idle connection finds nothing")?;
    let sizes = [100usize, 0, 1 << 20, 3, 65_537];
    let srcs: Vec<Region> =
        sizes.iter().enumerate().map(|(i, &n)| Region::from_vec(pattern(40 + i as u64, n))).collect();
    let heads: Vec<FrameHeader> =
        (0..sizes.len()).map(|i| FrameHeader { tag: 10 + i as u32, ..header(8, i as u32, sizes[i]) }).collect();
    let mut pending = Vec::new();
    for i in 0..sizes.len() {
        pending.push(post_send(&mut a, heads[i], srcs[i].full())?);
    }
    let mut tx = Some(Sender { conn: &mut a, pending });
    for i in 0..sizes.len() {
        match peek_until(&mut b, &mut tx, Duration::from_secs(30))? {
            Peeked::Frame(h) => check(h == heads[i], "peek shows the next frame's header")?,
            other => return Err(Error::Internal(format!("conformance: peek found {other:?}, not frame {i}"))),
        }
        match b.peek()? {
            Peeked::Frame(h) => check(h == heads[i], "a second peek shows the same header")?,
            other => return Err(Error::Internal(format!("conformance: second peek found {other:?}"))),
        }
        let got = recv_pumping(&mut b, tx.as_mut().expect("sender"), heads[i])?;
        check(got == pattern(40 + i as u64, sizes[i]), "the receive after a peek gets the peeked frame intact")?;
    }
    check(matches!(b.peek()?, Peeked::Nothing), "nothing left after the last frame")
}

/// An abort frame is what `peek` reports as the peer's error (and a receive afterwards
/// fails too).
pub fn peek_sees_abort(pair: Pair) -> Result<()> {
    let (mut a, mut b) = pair;
    a.send_abort(Seq(3), "rank 0 gave up on rank 5");
    match peek_until(&mut b, &mut None, Duration::from_secs(30)) {
        Err(Error::Remote { peer: Some(Rank(0)), message }) if message.contains("gave up on rank 5") => {}
        other => return Err(Error::Internal(format!("conformance: expected the abort from peek, got {other:?}"))),
    }
    let dst = Region::alloc(16);
    match b.irecv(RecvRequest { expect: header(3, 0, 16), dst: dst.full() }) {
        Err(_) => Ok(()),
        Ok(None) => Err(Error::Internal("conformance: irecv refused".into())),
        Ok(Some(r)) => match drive(&mut [&mut b], &[(0, r)], Duration::from_secs(10)) {
            Err(Error::Remote { .. } | Error::Aborted { .. }) => Ok(()),
            other => Err(Error::Internal(format!("conformance: a receive after the abort gave {other:?}"))),
        },
    }
}

/// A frame sent before the peer's connection went away is still peeked and received;
/// then `peek` reports the close promptly, naming the peer.
pub fn peek_sees_close(pair: Pair) -> Result<()> {
    let (mut a, mut b) = pair;
    let h = header(9, 0, 64);
    let src = Region::from_vec(pattern(9, 64));
    let s = post_send(&mut a, h, src.full())?;
    drive(&mut [&mut a], &[(0, s)], Duration::from_secs(30))?;
    drop(a);
    match peek_until(&mut b, &mut None, Duration::from_secs(10))? {
        Peeked::Frame(got) => check(got == h, "the frame sent before the close")?,
        other => return Err(Error::Internal(format!("conformance: expected the last frame, got {other:?}"))),
    }
    let dst = Region::alloc(64);
    let r = post_recv(&mut b, RecvRequest { expect: h, dst: dst.full() })?.expect("room for one recv");
    drive(&mut [&mut b], &[(0, r)], Duration::from_secs(10))?;
    check(dst.full().to_vec()? == pattern(9, 64), "payload before the close intact")?;
    let t = Instant::now();
    match peek_until(&mut b, &mut None, Duration::from_secs(10))? {
        Peeked::Closed(Error::Remote { peer: Some(Rank(0)), .. }) => {
            check(t.elapsed() < Duration::from_secs(5), "prompt")
        }
        other => Err(Error::Internal(format!("conformance: expected the close, got {other:?}"))),
    }
}

/// Run every check; each gets a fresh pair from `make`. Scattered receives are gathered on
/// the host (host-memory RX pools).
pub fn run_all(make: &dyn Fn() -> Pair) -> Result<()> {
    run_all_with(make, Arc::new(|_: &Region| Ok(crate::device::host())))
}

/// [`run_all`], gathering scattered receives on the device `unpacker` names for their pool.
pub fn run_all_with(make: &dyn Fn() -> Pair, unpacker: Arc<Unpacker>) -> Result<()> {
    UNPACK.with(|u| *u.borrow_mut() = Some(unpacker));
    let r = run_checks(make);
    UNPACK.with(|u| *u.borrow_mut() = None);
    DESTS.with(|d| d.borrow_mut().clear());
    r
}

/// A named conformance check.
type Check = (&'static str, fn(Pair) -> Result<()>);

fn run_checks(make: &dyn Fn() -> Pair) -> Result<()> {
    let checks: [Check; 8] = [
        ("ordered_payloads", ordered_payloads),
        ("mismatch_detected", mismatch_detected),
        ("abort_reaches_peer", abort_reaches_peer),
        ("peer_drop_detected", peer_drop_detected),
        ("cancel_forgets", cancel_forgets),
        ("peek_leaves_frames", peek_leaves_frames),
        ("peek_sees_abort", peek_sees_abort),
        ("peek_sees_close", peek_sees_close),
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
