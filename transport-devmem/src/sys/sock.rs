//! Socket-level devmem system calls: `SO_ZEROCOPY`, `SO_DEVMEM_DONTNEED`, `sendmsg` with the
//! TX cmsg, `recvmsg(MSG_SOCK_DEVMEM)` and error-queue reads.
//!
//! These act on the caller's sockets and never block longer than the caller's socket does
//! (error-queue reads are always non-blocking).

use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::sys::cmsg::{
    self, DevmemRange, DmabufToken, ErrqueueEntry, MAX_DONTNEED_TOKENS, MSG_ERRQUEUE, MSG_SOCK_DEVMEM, MSG_ZEROCOPY,
    SO_DEVMEM_DONTNEED, SO_ZEROCOPY, SOL_SOCKET, TokenBatcher,
};

/// libc's `CMSG_LEN`, to cross-check [`cmsg::cmsg_len`] against the C library.
pub fn libc_cmsg_len(data: u32) -> usize {
    // SAFETY: CMSG_LEN is pure arithmetic on its argument (libc marks it unsafe only because
    // the CMSG_* family dereferences pointers elsewhere).
    unsafe { libc::CMSG_LEN(data) as usize }
}

/// libc's `CMSG_SPACE`, to cross-check [`cmsg::cmsg_space`] against the C library.
pub fn libc_cmsg_space(data: u32) -> usize {
    // SAFETY: pure arithmetic, as for `libc_cmsg_len`.
    unsafe { libc::CMSG_SPACE(data) as usize }
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Enable or disable `SO_ZEROCOPY` (required for devmem TX).
pub fn set_zerocopy(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let v: libc::c_int = on as libc::c_int;
    // SAFETY: live fd; the value is a local c_int of the passed size.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_SOCKET,
            SO_ZEROCOPY,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// `setsockopt(SO_DEVMEM_DONTNEED)` with an arbitrary option value (for probing the kernel's
/// validation). Returns the number of fragments freed.
pub fn devmem_dontneed_raw(fd: BorrowedFd<'_>, optval: &[u8]) -> io::Result<u32> {
    // SAFETY: live fd; `optval` is valid for reads of its length, which is passed.
    let rc = check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_SOCKET,
            SO_DEVMEM_DONTNEED,
            optval.as_ptr().cast(),
            optval.len() as libc::socklen_t,
        )
    })?;
    Ok(rc as u32)
}

/// One `SO_DEVMEM_DONTNEED` call. At most [`MAX_DONTNEED_TOKENS`] ranges (the kernel answers
/// `EINVAL` above that). Returns the number of fragments freed: unknown tokens are skipped,
/// and at most 1024 fragments are freed per call.
pub fn devmem_dontneed(fd: BorrowedFd<'_>, tokens: &[DmabufToken]) -> io::Result<u32> {
    if tokens.len() > MAX_DONTNEED_TOKENS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} token ranges in one SO_DEVMEM_DONTNEED call (the kernel takes at most {MAX_DONTNEED_TOKENS})",
                tokens.len()
            ),
        ));
    }
    devmem_dontneed_raw(fd, &DmabufToken::encode_all(tokens))
}

/// What returning a batch of tokens did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct DontneedOutcome {
    /// `setsockopt` calls made.
    pub calls: u32,
    /// Fragments asked to be freed.
    pub requested: u64,
    /// Fragments the kernel freed.
    pub freed: u64,
    /// Calls that freed fewer than asked (the tokens were unknown: already returned, or never
    /// handed out on this socket).
    pub short_calls: u32,
}

/// Return every token in `batch`: one call per kernel-sized batch (<= 128 ranges, <= 1024
/// fragments), looping over all of them even when a call frees fewer than asked. Because no
/// batch exceeds the kernel's per-call fragment limit, a short count can only mean unknown
/// tokens; they are counted in [`DontneedOutcome::short_calls`], not retried (a retry could
/// free a token number the kernel has since handed out again).
pub fn return_tokens(fd: BorrowedFd<'_>, batch: &TokenBatcher) -> Result<DontneedOutcome> {
    let mut out = DontneedOutcome::default();
    for b in batch.batches() {
        let want: u64 = b.iter().map(|t| t.token_count as u64).sum();
        let freed = devmem_dontneed(fd, &b)
            .map_err(|e| Error::os("SO_DEVMEM_DONTNEED", &format!("fd {}", fd.as_raw_fd()), e))?
            as u64;
        out.calls += 1;
        out.requested += want;
        out.freed += freed;
        if freed < want {
            out.short_calls += 1;
            tracing::debug!(want, freed, "SO_DEVMEM_DONTNEED freed fewer fragments than asked");
        }
    }
    Ok(out)
}

/// What a `recvmsg` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvMeta {
    /// Return value: bytes consumed from the stream (linear + device for devmem).
    pub bytes: usize,
    /// Valid bytes in the control buffer.
    pub control_len: usize,
    /// `msg_flags` (`MSG_CTRUNC` means the control buffer was too small).
    pub msg_flags: i32,
}

/// `recvmsg` with one data buffer (may be empty) and a control buffer.
pub fn recvmsg_with_control(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    control: &mut [u8],
    flags: i32,
) -> io::Result<RecvMeta> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is valid (no name, no iov, no control).
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    if !control.is_empty() {
        mh.msg_control = control.as_mut_ptr().cast();
        mh.msg_controllen = control.len() as _;
    }
    loop {
        // SAFETY: live fd; `mh` points to `iov` (valid for writes of `buf.len()` bytes) and to
        // `control` (valid for writes of its length); all outlive the call.
        let rc = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut mh, flags) };
        if rc >= 0 {
            return Ok(RecvMeta {
                bytes: rc as usize,
                control_len: mh.msg_controllen as usize,
                msg_flags: mh.msg_flags,
            });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `recvmsg(MSG_SOCK_DEVMEM)`: payload in device memory is described by cmsgs in `control`
/// (parse with [`cmsg::parse_rx_cmsgs`]); bytes not split off land in `linear`.
pub fn recv_devmem(
    fd: BorrowedFd<'_>,
    linear: &mut [u8],
    control: &mut [u8],
    nonblocking: bool,
) -> io::Result<RecvMeta> {
    let flags = MSG_SOCK_DEVMEM | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
    recvmsg_with_control(fd, linear, control, flags)
}

/// `sendmsg` with arbitrary iovecs and control bytes (the TX cmsg is [`cmsg::tx_cmsg`]).
pub fn sendmsg_with_control(fd: BorrowedFd<'_>, iov: &[IoSlice<'_>], control: &[u8], flags: i32) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with struct iovec.
    mh.msg_iov = iov.as_ptr() as *mut libc::iovec;
    mh.msg_iovlen = iov.len() as _;
    if !control.is_empty() {
        mh.msg_control = control.as_ptr() as *mut libc::c_void;
        mh.msg_controllen = control.len() as _;
    }
    loop {
        // SAFETY: live fd; `mh` points to `iov` and `control`, both valid for reads and alive
        // across the call; the kernel does not write through them on sendmsg.
        let rc = unsafe { libc::sendmsg(fd.as_raw_fd(), &mh, flags | libc::MSG_NOSIGNAL) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Send `ranges` of TX binding `binding_id`'s dma-buf: `sendmsg(MSG_ZEROCOPY)` with the
/// `SCM_DEVMEM_DMABUF` cmsg and `iov_base` = offset. The socket needs `SO_ZEROCOPY` and should
/// be bound (`SO_BINDTODEVICE`) to the binding's device. Completions arrive on the error queue
/// ([`read_errqueue`]).
pub fn send_devmem(fd: BorrowedFd<'_>, binding_id: u32, ranges: &[DevmemRange], extra_flags: i32) -> Result<usize> {
    if binding_id == 0 {
        // Id 0 means "not devmem" to the kernel: iov_base would then be read as a pointer.
        return Err(Error::invalid(
            "devmem send with binding id 0 (the kernel would treat the offsets as user pointers)",
        ));
    }
    if ranges.is_empty() {
        return Err(Error::invalid("devmem send with no ranges"));
    }
    let pairs: Vec<(u64, usize)> = ranges.iter().map(|r| (r.offset, r.len)).collect();
    sendmsg_devmem(fd, binding_id, &pairs, extra_flags)
        .map_err(|e| Error::os("devmem sendmsg", &format!("fd {} binding {binding_id}", fd.as_raw_fd()), e))
}

/// The system call under [`send_devmem`], with the kernel's errno as is:
/// `sendmsg(fd, iov = ranges as (offset, len), SCM_DEVMEM_DMABUF(binding_id),
/// MSG_ZEROCOPY | MSG_NOSIGNAL | extra_flags)`. Binding id 0 is refused here
/// (`InvalidInput`): the kernel would read the offsets as pointers into this process.
pub fn sendmsg_devmem(
    fd: BorrowedFd<'_>,
    binding_id: u32,
    ranges: &[(u64, usize)],
    extra_flags: i32,
) -> io::Result<usize> {
    if binding_id == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "devmem send with binding id 0"));
    }
    let iov: Vec<libc::iovec> = ranges
        .iter()
        .map(|&(offset, len)| libc::iovec { iov_base: offset as usize as *mut libc::c_void, iov_len: len })
        .collect();
    let control = cmsg::tx_cmsg(binding_id);
    // SAFETY: an all-zero msghdr is valid.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = iov.as_ptr() as *mut libc::iovec;
    mh.msg_iovlen = iov.len() as _;
    mh.msg_control = control.as_ptr() as *mut libc::c_void;
    mh.msg_controllen = control.len() as _;
    loop {
        // SAFETY: live fd; `iov` and `control` outlive the call. With a non-zero binding id
        // and MSG_ZEROCOPY the kernel treats iov_base as an offset into the bound dma-buf and
        // never dereferences it in this process.
        let rc = unsafe { libc::sendmsg(fd.as_raw_fd(), &mh, MSG_ZEROCOPY | libc::MSG_NOSIGNAL | extra_flags) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Drain the socket's error queue (non-blocking): zerocopy completions and other extended
/// errors, in order.
pub fn read_errqueue(fd: BorrowedFd<'_>) -> Result<Vec<ErrqueueEntry>> {
    let mut out = Vec::new();
    let mut control = [0u8; 512];
    loop {
        match recvmsg_with_control(fd, &mut [], &mut control, MSG_ERRQUEUE | libc::MSG_DONTWAIT) {
            Ok(meta) => {
                let entries = cmsg::parse_errqueue(&control[..meta.control_len]).map_err(|e| Error::Malformed {
                    op: "MSG_ERRQUEUE",
                    iface: format!("fd {}", fd.as_raw_fd()),
                    what: e.0,
                })?;
                out.extend(entries);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
            Err(e) => {
                return Err(Error::os("MSG_ERRQUEUE", &format!("fd {}", fd.as_raw_fd()), e));
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Plain socket queries and non-blocking I/O (what the simulated kernel and the ntuple
// steering need to know about a caller's socket).

fn getsockopt_raw(fd: BorrowedFd<'_>, level: i32, opt: i32, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: live fd; `buf` is valid for writes of `len` bytes and `len` is a valid in/out
    // length pointer for the duration of the call.
    check(unsafe { libc::getsockopt(fd.as_raw_fd(), level, opt, buf.as_mut_ptr().cast(), &mut len) })?;
    Ok(len as usize)
}

fn getsockopt_int(fd: BorrowedFd<'_>, level: i32, opt: i32) -> io::Result<i32> {
    let mut b = [0u8; 4];
    getsockopt_raw(fd, level, opt, &mut b)?;
    Ok(i32::from_ne_bytes(b))
}

/// `SO_COOKIE`: the kernel's 64-bit id of the socket (unique for the boot; a reused fd number
/// gets a new cookie).
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut b = [0u8; 8];
    getsockopt_raw(fd, SOL_SOCKET, libc::SO_COOKIE, &mut b)?;
    Ok(u64::from_ne_bytes(b))
}

/// Whether `SO_ZEROCOPY` is on.
pub fn zerocopy_enabled(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(getsockopt_int(fd, SOL_SOCKET, SO_ZEROCOPY)? != 0)
}

/// `SO_DOMAIN` (`AF_INET`, `AF_INET6`, `AF_UNIX`...).
pub fn socket_domain(fd: BorrowedFd<'_>) -> io::Result<i32> {
    getsockopt_int(fd, SOL_SOCKET, libc::SO_DOMAIN)
}

/// The kernel's `sk_is_tcp()`: an inet socket of type `SOCK_STREAM`, protocol TCP.
pub fn is_tcp(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let domain = socket_domain(fd)?;
    let ty = getsockopt_int(fd, SOL_SOCKET, libc::SO_TYPE)?;
    let proto = getsockopt_int(fd, SOL_SOCKET, libc::SO_PROTOCOL)?;
    Ok(matches!(domain, libc::AF_INET | libc::AF_INET6) && ty == libc::SOCK_STREAM && proto == libc::IPPROTO_TCP)
}

fn ioctl_int(fd: BorrowedFd<'_>, req: libc::Ioctl) -> io::Result<usize> {
    let mut v: libc::c_int = 0;
    // SAFETY: live fd; FIONREAD / TIOCOUTQ write one c_int through the pointer, which points
    // to a local that outlives the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v as *mut libc::c_int) })?;
    Ok(v.max(0) as usize)
}

/// `SIOCINQ` (`FIONREAD`): bytes in the receive queue not yet read.
pub fn inq(fd: BorrowedFd<'_>) -> io::Result<usize> {
    ioctl_int(fd, libc::FIONREAD)
}

/// `SIOCOUTQ` (`TIOCOUTQ`): bytes in the TCP send queue not yet acknowledged by the peer
/// (`write_seq - snd_una`).
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<usize> {
    ioctl_int(fd, libc::TIOCOUTQ)
}

/// Offset of `tcpi_bytes_acked` (`__u64`) in `struct tcp_info` (Linux 4.1+).
const TCPI_BYTES_ACKED_OFFSET: usize = 120;

/// `tcpi_bytes_acked` from `TCP_INFO`: bytes of this connection the peer has acknowledged
/// (the connecting side counts its SYN as one).
pub fn tcp_bytes_acked(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut b = [0u8; 136];
    let n = getsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut b)?;
    if n < TCPI_BYTES_ACKED_OFFSET + 8 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("TCP_INFO of {n} bytes has no tcpi_bytes_acked"),
        ));
    }
    Ok(u64::from_ne_bytes(b[TCPI_BYTES_ACKED_OFFSET..TCPI_BYTES_ACKED_OFFSET + 8].try_into().unwrap()))
}

/// `recv(fd, buf, MSG_DONTWAIT | flags)`, retried on `EINTR`.
fn recv_flags(fd: BorrowedFd<'_>, buf: *mut libc::c_void, len: usize, flags: i32) -> io::Result<usize> {
    loop {
        // SAFETY: live fd; `buf` is valid for writes of `len` bytes (the callers' contract).
        let rc = unsafe { libc::recv(fd.as_raw_fd(), buf, len, libc::MSG_DONTWAIT | flags) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `recv(fd, buf, MSG_PEEK | MSG_DONTWAIT)`: copy what is queued without consuming it.
/// `Ok(0)` is end of stream (or an empty `buf`), `WouldBlock` when nothing is queued.
pub fn peek_nonblocking(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK)
}

/// `recv(fd, buf, MSG_DONTWAIT)` (retried on `EINTR`): `Ok(0)` is end of stream (or an empty
/// `buf`), `WouldBlock` when nothing is queued.
pub fn recv_nonblocking(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: live fd; `buf` is valid for writes of its length.
        let rc = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `send(fd, buf, MSG_DONTWAIT | MSG_NOSIGNAL)` (retried on `EINTR`): bytes queued, possibly
/// fewer than `buf.len()`; `WouldBlock` when the send buffer is full.
pub fn send_nonblocking(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: live fd; `buf` is valid for reads of its length.
        let rc = unsafe {
            libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn sockaddr_of(
    fd: BorrowedFd<'_>,
    f: unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int,
) -> io::Result<SocketAddr> {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: live fd; `ss` is a sockaddr_storage of the passed length (getsockname and
    // getpeername write at most that much).
    check(unsafe { f(fd.as_raw_fd(), (&mut ss as *mut libc::sockaddr_storage).cast(), &mut len) })?;
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: family AF_INET: the storage holds a sockaddr_in.
            let sin = unsafe { &*(&ss as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: family AF_INET6: the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(&ss as *const libc::sockaddr_storage as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Ok(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        other => Err(io::Error::new(io::ErrorKind::Unsupported, format!("socket of address family {other}"))),
    }
}

/// `getsockname` as a [`SocketAddr`] (inet sockets only).
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    sockaddr_of(fd, libc::getsockname)
}

/// `getpeername` as a [`SocketAddr`] (`ENOTCONN` for an unconnected socket).
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    sockaddr_of(fd, libc::getpeername)
}
