//! Simulated devmem RX: the NIC filling the pool, `recvmsg(MSG_SOCK_DEVMEM)` and
//! `SO_DEVMEM_DONTNEED`.
//!
//! `recvmsg` follows 6.18's `tcp_recvmsg_locked()` / `tcp_recvmsg_dmabuf()` (net/ipv4/tcp.c):
//! * `len` (the iovec's length, here `linear.len()`) bounds the stream bytes of one call,
//!   device fragments included; the call walks the queued skbs until `len` is used or the
//!   queue is empty;
//! * it never mixes readable (ordinary) and unreadable (device-memory) skbs: `if
//!   (last_copied_dmabuf != -1 && last_copied_dmabuf != !skb_frags_readable(skb)) break;`;
//!   ordinary data comes back with no cmsg at all;
//! * per unreadable skb: its linear part first (`copy_to_iter` into the iovec, then one
//!   `SO_DEVMEM_LINEAR` `dmabuf_cmsg` with only `frag_size` set), then one `SO_DEVMEM_DMABUF`
//!   cmsg per fragment (`frag_offset = net_iov_virtual_addr(niov) + skb_frag_off(frag) +
//!   offset - start`, the size reported, a new token, `dmabuf_id` = the binding id, flags 0);
//!   a fragment partly reported before is reported again from where it stopped, with a new
//!   token;
//! * cmsgs go through `put_cmsg_notrunc()`: `if (!msg->msg_control || msg->msg_controllen <
//!   CMSG_LEN(len)) return -ETOOSMALL;` — the call returns the bytes reported so far, or
//!   `-ETOOSMALL` (525) when there are none (6.18 returns the error verbatim:
//!   `if (err < 0) { if (!copied) copied = err; break; }`);
//! * nothing queued: `EAGAIN` (non-blocking), 0 at end of stream, else the socket's error.
//!
//! `SO_DEVMEM_DONTNEED` follows `sk_setsockopt()` and `sock_devmem_dontneed()`
//! (net/core/sock.c): `optlen < sizeof(int)` is `EINVAL` before anything else; a socket that
//! is not TCP is `EBADF`; `optlen % sizeof(struct dmabuf_token)` or more than
//! `MAX_DONTNEED_TOKENS` (128) ranges is `EINVAL`; then every token number of every range is
//! looked at in order, at most `MAX_DONTNEED_FRAGS` (1024) of them per call (`if (++num_frags
//! > MAX_DONTNEED_FRAGS) goto frag_limit_reached;` — unknown numbers count too), each one
//! `__xa_erase`d; the return value is the number that pinned something. Probed on this 6.18:
//! optlen 0..3 -> `EINVAL` on any socket, 4..7 on UDP -> `EBADF`, 1032 on TCP -> `EINVAL`.

use std::collections::HashMap;
use std::io;
use std::os::fd::BorrowedFd;

use crate::sim::mmap::Dest;
use crate::sim::pool::Pool;
use crate::sim::tokens::{Pinned, TokenTable};
use crate::sim::{Exhaustion, Frag, FragSizing, Shared, SimOptions, SimStats, Skb, SockState};
use crate::sys::cmsg::{
    DmabufCmsg, MAX_DONTNEED_FRAGS, MAX_DONTNEED_TOKENS, SCM_DEVMEM_DMABUF, SCM_DEVMEM_LINEAR, SOL_SOCKET, cmsg_len,
    encode_cmsg,
};
use crate::sys::{errno, sock};

/// Control bytes one RX cmsg takes (`CMSG_LEN(24)` = `CMSG_SPACE(24)` on 64-bit).
const RX_CMSG: usize = cmsg_len(DmabufCmsg::SIZE);

/// Release the niov references a queued skb holds.
pub(crate) fn drop_skb(pools: &mut HashMap<u64, Pool>, skb: &Skb) {
    for f in &skb.frags {
        if let Some(p) = pools.get_mut(&f.pool) {
            p.put(f.niov);
        }
    }
}

fn frag_size(sizing: FragSizing, opts: &SimOptions, s: &mut SockState) -> usize {
    let (mss, niov) = (opts.mss as usize, opts.niov_size as usize);
    match sizing {
        FragSizing::Mss => mss,
        FragSizing::Page => niov,
        FragSizing::Mixed => match s.rng.below(4) {
            0 | 1 => mss,
            2 => niov,
            _ => 1 + s.rng.below(niov),
        },
    }
}

/// Why the simulated NIC stopped taking bytes from the socket.
enum Stop {
    /// `len` bytes are queued.
    Enough,
    /// The socket has nothing more now.
    Dry,
    /// End of stream.
    Eof,
    /// The socket's error.
    Err(io::Error),
    /// No free niov (back-pressure).
    Exhausted,
}

/// Most packets one simulated NIC receive places (the iovecs of one `recvmsg`).
const BATCH: usize = 256;

/// A packet the simulated NIC reserved room for before receiving it.
enum Planned {
    /// Not header-split: its payload goes to the skb's linear part.
    Spill(Vec<u8>),
    /// Header-split: `len` bytes at `off` in niov `niov` of the pool (one reference held).
    Frag { niov: u32, off: usize, len: usize },
}

/// Nothing queued on the socket: end of stream, nothing yet, or its error.
fn empty_socket(fd: BorrowedFd<'_>) -> Stop {
    match sock::peek_nonblocking(fd, &mut [0u8; 1]) {
        Ok(0) => Stop::Eof,
        Ok(_) => Stop::Dry, // raced with an arrival: poll sees it, the next call takes it
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Stop::Dry,
        Err(e) => Stop::Err(e),
    }
}

/// The NIC receives: take bytes off the socket into new skbs (fragments in `pool`, spilled
/// packets in host memory) until at least `want` bytes are queued. Packets are planned for
/// what the socket holds (so the receive fills them), room is reserved in the pool, and one
/// `recvmsg` writes them in place: the one copy TCP's receive makes, as the NIC's DMA would.
/// Bytes the NIC did not take (the pool is full) stay in the socket, where poll sees them.
fn arrive(
    fd: BorrowedFd<'_>,
    s: &mut SockState,
    pool_key: u64,
    pool: &mut Pool,
    opts: &SimOptions,
    stats: &mut SimStats,
    want: usize,
) -> Stop {
    let mut queued = s.queued_bytes();
    while queued < want {
        let avail = match sock::inq(fd) {
            Ok(0) => return empty_socket(fd),
            Ok(n) => n,
            Err(e) => return Stop::Err(e),
        };
        let mut plan = Vec::new();
        let (mut planned, mut stop) = (0, None);
        while planned < avail && queued + planned < want && plan.len() < BATCH {
            let left = avail - planned;
            if *s.next_spill.get_or_insert_with(|| s.rng.chance(opts.linear_spill)) {
                let n = (opts.mss as usize).min(left);
                plan.push(Planned::Spill(vec![0; n]));
                planned += n;
            } else {
                let room = pool.room(frag_size(opts.frag_sizing, opts, s).min(left));
                if room == 0 {
                    stats.pool_exhausted += 1; // bytes wait in the socket
                    match opts.on_exhaustion {
                        Exhaustion::Backpressure => {
                            stop = Some(Stop::Exhausted);
                            break;
                        }
                        Exhaustion::Linear => {
                            s.next_spill = Some(true);
                            continue;
                        }
                    }
                }
                let (niov, off) = pool.take(room);
                plan.push(Planned::Frag { niov, off, len: room });
                planned += room;
            }
            s.next_spill = None;
        }
        if plan.is_empty() {
            return stop.unwrap_or(Stop::Enough);
        }
        let got = {
            // Packets that follow each other in one niov are one iovec (the kernel then
            // copies a run, not a packet at a time; the fragments stay per packet).
            let mut dests: Vec<Dest<'_>> = Vec::with_capacity(plan.len());
            for p in plan.iter_mut() {
                match p {
                    Planned::Spill(v) => dests.push(Dest::Host(v)),
                    Planned::Frag { niov, off, len } => {
                        let at = pool.offset(*niov, *off) as usize;
                        match dests.last_mut() {
                            Some(Dest::Pool { off, len: run }) if *off + *run == at => *run += *len,
                            _ => dests.push(Dest::Pool { off: at, len: *len }),
                        }
                    }
                }
            }
            pool.map.recv_into(fd, &mut dests)
        };
        let got = match got {
            Ok(n) => n,
            Err(e) => {
                enqueue(plan, 0, s, pool, pool_key, opts); // gives the reserved room back
                return if e.kind() == io::ErrorKind::WouldBlock { Stop::Dry } else { Stop::Err(e) };
            }
        };
        queued += enqueue(plan, got, s, pool, pool_key, opts);
        if got == 0 {
            return Stop::Eof;
        }
        if got < planned {
            return Stop::Dry;
        }
        if let Some(st) = stop {
            return st;
        }
    }
    Stop::Enough
}

/// Queue the first `got` bytes of `plan` as skbs (a spilled packet starts one; at most
/// `max_frags_per_skb` fragments each) and drop the pool references of packets that got
/// nothing. Returns the bytes queued.
fn enqueue(
    plan: Vec<Planned>,
    mut got: usize,
    s: &mut SockState,
    pool: &mut Pool,
    pool_key: u64,
    opts: &SimOptions,
) -> usize {
    let (mut total, mut skb) = (0, Skb::default());
    for p in plan {
        match p {
            Planned::Spill(mut v) => {
                let n = v.len().min(got);
                if n == 0 {
                    continue;
                }
                if skb.len > 0 {
                    s.rxq.push_back(std::mem::take(&mut skb));
                }
                v.truncate(n);
                (skb.head, skb.len) = (v, n);
                (got, total) = (got - n, total + n);
            }
            Planned::Frag { niov, off, len } => {
                let n = len.min(got);
                if n == 0 {
                    pool.put(niov);
                    continue;
                }
                if skb.frags.len() == opts.max_frags_per_skb as usize {
                    s.rxq.push_back(std::mem::take(&mut skb));
                }
                skb.frags.push(Frag { pool: pool_key, niov, off: off as u32, len: n as u32 });
                skb.len += n;
                (got, total) = (got - n, total + n);
            }
        }
    }
    if skb.len > 0 {
        s.rxq.push_back(skb);
    }
    total
}

/// Where the next cmsg goes.
struct Out<'a> {
    linear: &'a mut [u8],
    lin: usize,
    control: &'a mut [u8],
    ctl: usize,
}

impl Out<'_> {
    /// `put_cmsg_notrunc()`.
    fn cmsg(&mut self, ty: i32, c: &DmabufCmsg) -> Result<(), i32> {
        if self.control.len() - self.ctl < RX_CMSG {
            return Err(errno::ETOOSMALL);
        }
        let b = encode_cmsg(SOL_SOCKET, ty, &c.encode());
        self.control[self.ctl..self.ctl + b.len()].copy_from_slice(&b);
        self.ctl += b.len();
        Ok(())
    }
}

/// `tcp_recvmsg_dmabuf(sk, skb, offset, msg, remaining)`: (bytes reported, error that
/// stopped it).
fn report_skb(
    skb: &Skb,
    mut offset: usize,
    mut remaining: usize,
    out: &mut Out<'_>,
    tokens: &mut TokenTable,
    pools: &mut HashMap<u64, Pool>,
    stats: &mut SimStats,
) -> (usize, Option<i32>) {
    let mut sent = 0;
    let start = skb.head.len();
    if offset < start {
        let copy = (start - offset).min(remaining);
        out.linear[out.lin..out.lin + copy].copy_from_slice(&skb.head[offset..offset + copy]);
        let c = DmabufCmsg { frag_offset: 0, frag_size: copy as u32, frag_token: 0, dmabuf_id: 0, flags: 0 };
        if let Err(e) = out.cmsg(SCM_DEVMEM_LINEAR, &c) {
            return (sent, Some(e));
        }
        out.lin += copy;
        offset += copy;
        remaining -= copy;
        sent += copy;
        stats.rx_linear_spills += 1;
        stats.rx_linear_bytes += copy as u64;
        if remaining == 0 {
            return (sent, None);
        }
    }
    let mut fstart = start;
    for f in &skb.frags {
        let end = fstart + f.len as usize;
        if end > offset {
            let copy = (end - offset).min(remaining);
            let pool = pools.get_mut(&f.pool).expect("a queued fragment keeps its pool alive");
            if out.control.len() - out.ctl < RX_CMSG {
                return (sent, Some(errno::ETOOSMALL));
            }
            let Some(token) = tokens.alloc(Pinned { pool: f.pool, niov: f.niov }) else {
                return (sent, Some(errno::EBUSY));
            };
            let c = DmabufCmsg {
                frag_offset: pool.offset(f.niov, f.off as usize + (offset - fstart)),
                frag_size: copy as u32,
                frag_token: token,
                dmabuf_id: pool.id,
                flags: 0,
            };
            out.cmsg(SCM_DEVMEM_DMABUF, &c).expect("room checked above");
            pool.get(f.niov);
            offset += copy;
            remaining -= copy;
            sent += copy;
            stats.tokens_issued += 1;
            stats.rx_frags += 1;
            stats.rx_frag_bytes += copy as u64;
            if remaining == 0 {
                return (sent, None);
            }
        }
        fstart = end;
    }
    (sent, None)
}

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

pub(crate) fn recvmsg(
    shared: &Shared,
    fd: BorrowedFd<'_>,
    linear: &mut [u8],
    control: &mut [u8],
) -> io::Result<(usize, usize)> {
    let opts = &shared.opts;
    let mut guard = shared.lock();
    let st = &mut *guard;
    st.stats.rx_calls += 1;
    let cookie = st.sock(fd, opts.seed)?.0;
    let s = st.socks.get_mut(&cookie).expect("just looked up");
    let pool_key = s.steer.and_then(|x| st.queue_owner.get(&(x.ifindex, x.queue)).copied());
    if s.rxq.is_empty() {
        if let Some(e) = s.pending_err.take() {
            return Err(err(e));
        }
        // Ordinary data: what the real kernel answers for a flow on an unbound queue.
        let ordinary = if s.ordinary_left > 0 { s.ordinary_left.min(linear.len()) } else { linear.len() };
        if s.ordinary_left > 0 || pool_key.is_none() || linear.is_empty() {
            let m = sock::recv_devmem(fd, &mut linear[..ordinary], control, true)?;
            s.ordinary_left -= m.bytes.min(s.ordinary_left);
            st.stats.rx_ordinary_bytes += m.bytes as u64;
            return Ok((m.bytes, m.control_len));
        }
    }
    if linear.is_empty() {
        return Ok((0, 0)); // len 0: the kernel reports nothing and returns 0
    }
    let stop = match pool_key {
        Some(key) if s.ordinary_left == 0 => {
            let pool = st.pools.get_mut(&key).expect("a bound queue's pool exists");
            arrive(fd, s, key, pool, opts, &mut st.stats, linear.len())
        }
        _ => Stop::Enough,
    };
    let mut out = Out { linear, lin: 0, control, ctl: 0 };
    let mut len = out.linear.len();
    let mut copied = 0;
    let mut failure = None;
    while len > 0 {
        let Some(skb) = s.rxq.front() else { break };
        let skb_len = skb.len;
        let used = (skb_len - s.head_off).min(len);
        let (sent, e) = report_skb(skb, s.head_off, used, &mut out, &mut s.tokens, &mut st.pools, &mut st.stats);
        s.head_off += sent;
        copied += sent;
        len -= sent;
        if s.head_off == skb_len {
            let skb = s.rxq.pop_front().expect("front exists");
            drop_skb(&mut st.pools, &skb);
            s.head_off = 0;
        }
        if e.is_some() || sent < used {
            failure = e;
            break;
        }
    }
    let result = if copied > 0 || failure.is_some() {
        // A socket error met on the way is reported once the queue is empty, as the kernel
        // reports `sk_err` only to a call that has nothing else to return.
        if let Stop::Err(e) = stop {
            s.pending_err = e.raw_os_error();
        }
        match failure {
            Some(e) if copied == 0 => {
                st.stats.rx_etoosmall += (e == errno::ETOOSMALL) as u64;
                Err(err(e))
            }
            _ => Ok((copied, out.ctl)),
        }
    } else {
        match stop {
            Stop::Eof => Ok((0, 0)),
            Stop::Err(e) => Err(e),
            Stop::Enough | Stop::Dry | Stop::Exhausted => Err(err(errno::EAGAIN)),
        }
    };
    st.gc_pools();
    result
}

pub(crate) fn dontneed(shared: &Shared, fd: BorrowedFd<'_>, optval: &[u8]) -> io::Result<u32> {
    if optval.len() < 4 {
        return Err(err(errno::EINVAL));
    }
    if !sock::is_tcp(fd)? {
        return Err(err(errno::EBADF));
    }
    if !optval.len().is_multiple_of(8) || optval.len() > 8 * MAX_DONTNEED_TOKENS {
        return Err(err(errno::EINVAL));
    }
    let mut guard = shared.lock();
    let st = &mut *guard;
    let cookie = sock::socket_cookie(fd)?;
    let Some(s) = st.socks.get_mut(&cookie) else {
        return Ok(0);
    };
    let mut inspected: u64 = 0;
    let mut freed: u32 = 0;
    'ranges: for r in optval.chunks_exact(8) {
        let start = u32::from_ne_bytes(r[0..4].try_into().unwrap());
        let count = u32::from_ne_bytes(r[4..8].try_into().unwrap());
        for j in 0..count {
            inspected += 1;
            if inspected > MAX_DONTNEED_FRAGS {
                break 'ranges;
            }
            if let Some(p) = s.tokens.erase(start.wrapping_add(j)) {
                if let Some(pool) = st.pools.get_mut(&p.pool) {
                    pool.put(p.niov);
                }
                freed += 1;
            }
        }
    }
    st.stats.dontneed_calls += 1;
    st.stats.tokens_returned += freed as u64;
    st.stats.dontneed_unknown += inspected.min(MAX_DONTNEED_FRAGS) - freed as u64;
    st.gc_pools();
    Ok(freed)
}
