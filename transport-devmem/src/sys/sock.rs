//! Socket-level devmem system calls: `SO_ZEROCOPY`, `SO_DEVMEM_DONTNEED`, `sendmsg` with the
//! TX cmsg, `recvmsg(MSG_SOCK_DEVMEM)` and error-queue reads.
//!
//! These act on the caller's sockets and never block longer than the caller's socket does
//! (error-queue reads are always non-blocking).

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::sys::cmsg::{
    self, DevmemRange, DmabufToken, ErrqueueEntry, MAX_DONTNEED_TOKENS, MSG_ERRQUEUE, MSG_SOCK_DEVMEM, MSG_ZEROCOPY,
    SO_DEVMEM_DONTNEED, SO_ZEROCOPY, SOL_SOCKET, TokenBatcher,
};

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
    let iov: Vec<libc::iovec> = ranges
        .iter()
        .map(|r| libc::iovec { iov_base: r.offset as usize as *mut libc::c_void, iov_len: r.len })
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
            return Err(Error::os("devmem sendmsg", &format!("fd {} binding {binding_id}", fd.as_raw_fd()), e));
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
