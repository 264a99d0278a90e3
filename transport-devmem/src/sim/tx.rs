//! Simulated devmem TX: `sendmsg(MSG_ZEROCOPY)` with `SCM_DEVMEM_DMABUF`, and zerocopy
//! completions on the error queue.
//!
//! `sendmsg` follows 6.18's `tcp_sendmsg_locked()` (net/ipv4/tcp.c): with `MSG_ZEROCOPY`, a
//! non-empty payload and `SOCK_ZEROCOPY` set, the binding is looked up with
//! `net_devmem_get_binding()` (net/core/devmem.c): unknown id or a binding without TX vector
//! (an RX binding) -> `EINVAL`; the socket's route device is not the binding's -> `ENODEV`.
//! A devmem cmsg without `MSG_ZEROCOPY` and `SO_ZEROCOPY` is `EINVAL` (the TX series: "check
//! that MSG_ZEROCOPY and SOCK_ZEROCOPY are provided when sockc.dmabuf_id is provided"); with
//! both and nothing to send, no binding is looked up and the call returns 0 (probed on this
//! 6.18: `SO_ZEROCOPY` + `MSG_ZEROCOPY` + unknown id + no bytes -> 0; without `SO_ZEROCOPY`
//! -> `EINVAL`). The iovecs are offsets into the dma-buf;
//! `zerocopy_fill_skb_from_devmem()` answers `EFAULT` for an offset at or past its end
//! (`net_devmem_get_niov_at()`), which the call returns only when nothing was queued before
//! (else the bytes so far). A call that queues bytes takes the socket's next zerocopy
//! sequence number (`uarg->id = atomic_inc_return(&sk->sk_zckey) - 1`); one that fails gives
//! it back (`msg_zerocopy_put_abort()` decrements `sk_zckey`).
//!
//! Completions follow `__msg_zerocopy_callback()` (net/core/skbuff.c): when a send's last
//! byte is acknowledged a notification `[lo, hi]` is queued on the error queue, merged into
//! the queue's tail when it continues it (`skb_zerocopy_notify_extend()`: `lo == old_hi + 1`
//! and the merged count stays below 2^32). `ee_errno` 0, `ee_origin` `SO_EE_ORIGIN_ZEROCOPY`,
//! `ee_code` 0 (device memory is never copied). `recvmsg(MSG_ERRQUEUE)` hands out one
//! notification per call: `ip_recv_error()` puts `SOL_IP` / `IP_RECVERR` with `struct {
//! sock_extended_err ee; sockaddr_in offender; }` (32 bytes, the offender zeroed for this
//! origin), `ipv6_recv_error()` `SOL_IPV6` / `IPV6_RECVERR` with a `sockaddr_in6` (44 bytes),
//! through `put_cmsg()`, which truncates to the caller's buffer (`MSG_CTRUNC`) and does not
//! write the alignment padding after `CMSG_LEN`. Bytes recorded from this kernel:
//! `sys::recorded::ERRQUEUE_ZEROCOPY_V4` / `_V6`.

use std::io;
use std::os::fd::BorrowedFd;

use crate::sim::{Bound, Shared, SockState};
use crate::sys::cmsg::{CMSG_HDR_LEN, IP_RECVERR, IPV6_RECVERR, SO_EE_ORIGIN_ZEROCOPY, SOL_IP, SOL_IPV6, cmsg_len};
use crate::sys::{errno, iface, sock};

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// Largest piece copied out of the TX mapping per `send`.
const CHUNK: usize = 256 * 1024;

/// The ifindex of the socket's route (the kernel's `__sk_dst_get(sk)->dev`).
fn route_ifindex(fd: BorrowedFd<'_>) -> Option<u32> {
    let peer = sock::peer_addr(fd).ok()?;
    let (name, _) = iface::route_interface(peer.ip()).ok()?;
    iface::if_nametoindex(&name)
}

/// Stream position up to which the peer has acknowledged.
fn acked(fd: BorrowedFd<'_>) -> u64 {
    sock::tcp_bytes_acked(fd).unwrap_or(u64::MAX)
}

/// Move the sends the peer has acknowledged onto the error queue.
fn complete(s: &mut SockState, fd: BorrowedFd<'_>, on_ack: bool, completed: &mut u64) {
    if s.zc_pending.is_empty() {
        return;
    }
    let upto = if on_ack { acked(fd) } else { u64::MAX };
    while let Some(&(id, pos)) = s.zc_pending.front() {
        if pos > upto {
            break;
        }
        s.zc_pending.pop_front();
        *completed += 1;
        match s.errq.back_mut() {
            // skb_zerocopy_notify_extend(): lo == old_hi + 1, sum_len < 2^32.
            Some((lo, hi)) if id == hi.wrapping_add(1) && (hi.wrapping_sub(*lo) as u64 + 2) < (1u64 << 32) => {
                *hi = id;
            }
            _ => s.errq.push_back((id, id)),
        }
    }
}

pub(crate) fn sendmsg(shared: &Shared, fd: BorrowedFd<'_>, binding: u32, ranges: &[(u64, usize)]) -> io::Result<usize> {
    if binding == 0 {
        // What sys::sock::sendmsg_devmem refuses before the kernel sees it.
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "devmem send with binding id 0"));
    }
    let size: usize = ranges.iter().map(|r| r.1).sum();
    let zerocopy = sock::zerocopy_enabled(fd)?;
    let mut guard = shared.lock();
    let st = &mut *guard;
    let cookie = st.sock(fd, shared.opts.seed)?.0;
    let s = st.socks.get_mut(&cookie).expect("just looked up");
    if !zerocopy {
        return Err(err(errno::EINVAL));
    }
    if size == 0 {
        return Ok(0);
    }
    let buf = match st.ids.get(&binding) {
        Some(Bound::Tx(key)) => &st.tx[key],
        _ => return Err(err(errno::EINVAL)),
    };
    if s.route_ifindex.is_none() {
        s.route_ifindex = route_ifindex(fd);
    }
    if s.route_ifindex != Some(buf.ifindex) {
        return Err(err(errno::ENODEV));
    }
    let mut sent = 0usize;
    let mut tmp = vec![0u8; CHUNK.min(size)];
    let mut failure = None;
    'ranges: for &(off, len) in ranges {
        let mut pos = off;
        let end = off.saturating_add(len as u64);
        while pos < end {
            if pos >= buf.map.len() as u64 {
                failure = Some(err(errno::EFAULT));
                break 'ranges;
            }
            let n = ((end - pos) as usize).min(buf.map.len() - pos as usize).min(CHUNK);
            buf.map.read(pos as usize, &mut tmp[..n]);
            match sock::send_nonblocking(fd, &tmp[..n]) {
                Ok(w) => {
                    sent += w;
                    pos += w as u64;
                    if w < n {
                        break 'ranges; // send buffer full: a partial write
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break 'ranges;
                }
            }
        }
    }
    if sent == 0 {
        return Err(failure.unwrap_or_else(|| err(errno::EAGAIN)));
    }
    // The send completes once the peer acknowledged up to the stream position after it. Read
    // the acknowledged count first: an ack landing between the two reads can only make the
    // position smaller (early by that ack), never unreachable.
    let base = acked(fd);
    let unacked = sock::outq(fd).unwrap_or(0) as u64;
    let id = s.zc_next;
    s.zc_next = s.zc_next.wrapping_add(1);
    s.zc_pending.push_back((id, base.saturating_add(unacked)));
    st.stats.tx_sends += 1;
    st.stats.tx_bytes += sent as u64;
    complete(s, fd, shared.opts.complete_on_ack, &mut st.stats.tx_completed);
    Ok(sent)
}

/// `put_cmsg(msg, level, ty, data)` into `control`: bytes written (the padding after
/// `CMSG_LEN` is not written, as the kernel does not write it).
fn put_cmsg(control: &mut [u8], level: i32, ty: i32, data: &[u8]) -> usize {
    if control.len() < CMSG_HDR_LEN {
        return 0; // MSG_CTRUNC, nothing written
    }
    let cmlen = cmsg_len(data.len()).min(control.len());
    let size_t = std::mem::size_of::<usize>();
    control[..size_t].copy_from_slice(&cmlen.to_ne_bytes());
    control[size_t..size_t + 4].copy_from_slice(&level.to_ne_bytes());
    control[size_t + 4..CMSG_HDR_LEN].copy_from_slice(&ty.to_ne_bytes());
    control[CMSG_HDR_LEN..cmlen].copy_from_slice(&data[..cmlen - CMSG_HDR_LEN]);
    crate::sys::cmsg::cmsg_space(data.len()).min(control.len())
}

/// The `IP_RECVERR` / `IPV6_RECVERR` payload of a zerocopy completion `[lo, hi]`.
fn completion_payload(v6: bool, lo: u32, hi: u32) -> Vec<u8> {
    let mut d = vec![0u8; 16 + if v6 { 28 } else { 16 }];
    d[4] = SO_EE_ORIGIN_ZEROCOPY; // ee_errno 0, ee_type 0, ee_code 0
    d[8..12].copy_from_slice(&lo.to_ne_bytes());
    d[12..16].copy_from_slice(&hi.to_ne_bytes());
    d
}

pub(crate) fn read_errqueue(shared: &Shared, fd: BorrowedFd<'_>, control: &mut [u8]) -> io::Result<usize> {
    let mut guard = shared.lock();
    let st = &mut *guard;
    let cookie = sock::socket_cookie(fd)?;
    let next = match st.socks.get_mut(&cookie) {
        Some(s) => {
            complete(s, fd, shared.opts.complete_on_ack, &mut st.stats.tx_completed);
            s.errq.pop_front()
        }
        None => None,
    };
    let Some((lo, hi)) = next else {
        // Nothing of the simulator's: whatever the real error queue holds.
        drop(guard);
        return sock::recvmsg_with_control(fd, &mut [], control, crate::sys::cmsg::MSG_ERRQUEUE | libc::MSG_DONTWAIT)
            .map(|m| m.control_len);
    };
    st.stats.tx_notifications += 1;
    let v6 = sock::socket_domain(fd)? == libc::AF_INET6;
    let (level, ty) = if v6 { (SOL_IPV6, IPV6_RECVERR) } else { (SOL_IP, IP_RECVERR) };
    Ok(put_cmsg(control, level, ty, &completion_payload(v6, lo, hi)))
}
