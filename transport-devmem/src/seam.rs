//! The one seam between the devmem transport and the kernel.
//!
//! The transport (above) makes exactly these calls; two implementations sit below: the real
//! kernel ([`crate::sys`] through libc and netlink) and the simulated kernel
//! (`DEVCCL_DEVMEM=sim`), which answers with the bytes Linux 6.18 produces. The transport's
//! logic exists once and runs unchanged against either.
//!
//! Every call is non-blocking (the sockets are non-blocking; `WouldBlock` means "not now").
//! Byte formats are the kernel's: `recvmsg_devmem` fills `control` with `SOL_SOCKET`
//! `SCM_DEVMEM_DMABUF` / `SCM_DEVMEM_LINEAR` cmsgs (`struct dmabuf_cmsg`, 40 bytes each on
//! x86-64), `dontneed` takes an array of `struct dmabuf_token`, `read_errqueue` fills
//! `control` with `IP_RECVERR`/`IPV6_RECVERR` cmsgs (`struct sock_extended_err`, zerocopy
//! origin). Decode and encode them with [`crate::sys::cmsg`].
//!
//! Implementations: [`real::RealKernel`] and [`crate::sim::SimKernel`].
//!
//! Sizing the buffers (both implementations answer alike):
//! * `recvmsg_devmem`'s `linear` is the `iovec` of the `recvmsg`, and its length is the call's
//!   `len`: the most stream bytes one call consumes, device fragments included (they count
//!   against `len` although the kernel copies none of their bytes). Linear spills are copied
//!   into it. An empty `linear` makes the kernel return 0 with data pending, which reads as
//!   end of stream: always pass a non-empty one.
//! * `control` needs [`RX_CMSG_SPACE`] bytes per fragment. Smaller than one cmsg: `ETOOSMALL`
//!   (errno 525) when nothing was reported yet, else a short return (the rest stays queued).
//! * `read_errqueue` delivers one notification per call; give it at least
//!   [`ERRQUEUE_CONTROL_LEN`] bytes (a smaller buffer truncates the cmsg and the notification
//!   is consumed anyway).

pub mod real;

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;

use crate::error::Result;
use crate::sys::cmsg::{DmabufCmsg, cmsg_space};

/// Control bytes one RX fragment takes (`CMSG_SPACE(sizeof(struct dmabuf_cmsg))`, 40 on
/// 64-bit): size `control` as a multiple of it.
pub const RX_CMSG_SPACE: usize = cmsg_space(DmabufCmsg::SIZE);

/// Control bytes one zerocopy completion takes: `CMSG_SPACE(sizeof(struct sock_extended_err)
/// + sizeof(struct sockaddr_in6))` = 64 for IPv6 sockets (48 for IPv4).
pub const ERRQUEUE_CONTROL_LEN: usize = cmsg_space(16 + 28);

/// A binding made through the seam (RX pool or TX buffer). Dropping it unbinds (the kernel
/// tears a binding down when the netlink socket that made it closes).
pub trait KernelBinding: Send + Sync + fmt::Debug {
    /// The binding id (>= 1): what RX cmsgs carry in `dmabuf_id` and the TX cmsg names.
    fn id(&self) -> u32;
}

/// Flow steering installed for one connection (an ntuple rule on a real NIC). Dropping it
/// removes the rule.
pub trait KernelSteering: Send + Sync + fmt::Debug {
    /// What was installed, for logs (`ethtool -N eth0 flow-type tcp4 ... action 7` or
    /// `simulated: socket 12 -> binding 1`).
    fn describe(&self) -> String;
}

/// The kernel calls the devmem transport makes.
pub trait DevmemKernel: Send + Sync + fmt::Debug {
    /// `real` or `sim` (for logs, counters and `devccl doctor`).
    fn name(&self) -> &'static str;

    /// `NETDEV_CMD_BIND_RX`: install `fd` as the memory provider of RX `queues` of `ifindex`.
    /// The real kernel takes a dma-buf only; the simulator also accepts a mappable fd.
    fn bind_rx(&self, ifindex: u32, fd: BorrowedFd<'_>, queues: &[u32]) -> Result<Box<dyn KernelBinding>>;

    /// `NETDEV_CMD_BIND_TX`: make `fd` a TX source on `ifindex`.
    fn bind_tx(&self, ifindex: u32, fd: BorrowedFd<'_>) -> Result<Box<dyn KernelBinding>>;

    /// Steer the flow of the connected TCP socket `sock` to RX `queue` of `ifindex` (real: an
    /// ntuple rule, needs CAP_NET_ADMIN; the error says which ethtool command the operator
    /// must run instead).
    fn steer(&self, ifindex: u32, sock: BorrowedFd<'_>, queue: u32) -> Result<Box<dyn KernelSteering>>;

    /// Prepare a connected TCP socket for devmem: `SO_ZEROCOPY` on (TX needs it). The same
    /// system call for every implementation (the simulator's sockets are real sockets).
    fn setup_socket(&self, sock: BorrowedFd<'_>) -> io::Result<()> {
        crate::sys::sock::set_zerocopy(sock, true)
    }

    /// `recvmsg(sock, {linear}, control, MSG_SOCK_DEVMEM | MSG_DONTWAIT)`: returns (bytes of the
    /// stream consumed, bytes of `control` written). `Ok((0, 0))` is end of stream;
    /// `WouldBlock`: nothing to report now (the simulator also answers it while its RX pool
    /// has no free niov: return tokens). No cmsg at all means ordinary data in `linear`.
    fn recvmsg_devmem(&self, sock: BorrowedFd<'_>, linear: &mut [u8], control: &mut [u8])
    -> io::Result<(usize, usize)>;

    /// `setsockopt(sock, SOL_SOCKET, SO_DEVMEM_DONTNEED, tokens)` (`tokens`: encoded
    /// `struct dmabuf_token`s): the number of fragments freed.
    fn dontneed(&self, sock: BorrowedFd<'_>, tokens: &[u8]) -> io::Result<u32>;

    /// `sendmsg(sock, iov = ranges as (offset, len) into the TX binding's buffer,
    /// SCM_DEVMEM_DMABUF(binding), MSG_ZEROCOPY | MSG_DONTWAIT)`: bytes sent.
    fn sendmsg_devmem(&self, sock: BorrowedFd<'_>, binding: u32, ranges: &[(u64, usize)]) -> io::Result<usize>;

    /// `recvmsg(sock, MSG_ERRQUEUE | MSG_DONTWAIT)` control bytes (zerocopy completions):
    /// bytes of `control` written, `WouldBlock` when the queue is empty.
    fn read_errqueue(&self, sock: BorrowedFd<'_>, control: &mut [u8]) -> io::Result<usize>;

    /// The socket is about to be closed (the simulator releases its tokens, as the kernel
    /// does on close).
    fn close_socket(&self, sock: BorrowedFd<'_>) {
        let _ = sock;
    }
}
