//! A raw `AF_NETLINK` socket with a deadline on every request.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys::netlink::{self, GenlMsg, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, Request};

/// `NETLINK_ROUTE`.
pub const NETLINK_ROUTE: i32 = 0;
/// `NETLINK_GENERIC`.
pub const NETLINK_GENERIC: i32 = 16;
const SOL_NETLINK: i32 = 270;
const NETLINK_CAP_ACK: i32 = 10;
const NETLINK_EXT_ACK: i32 = 11;
const NETLINK_GET_STRICT_CHK: i32 = 12;

/// Default deadline of one request (send + every reply datagram up to the final ack/done).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A `do` request sent with `NLM_F_ACK`: data messages, then an ack (`NLMSG_ERROR` 0).
    Do,
    /// A dump: data messages until `NLMSG_DONE`. The netdev family does not set
    /// `NLM_F_MULTI` on the parts, so the flag is never used to find the end.
    Dump,
}

/// A netlink socket (`SOCK_RAW | SOCK_CLOEXEC`) with `NETLINK_EXT_ACK`, `NETLINK_CAP_ACK` and
/// (generic netlink) `NETLINK_GET_STRICT_CHK` set.
///
/// Kernel objects created through it (devmem bindings) live as long as it does: dropping it
/// closes the fd, and the kernel tears them down.
#[derive(Debug)]
pub struct NlSocket {
    fd: OwnedFd,
    seq: u32,
    timeout: Duration,
    protocol: i32,
}

fn last_os_error() -> io::Error {
    io::Error::last_os_error()
}

fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, opt: i32, val: i32) -> io::Result<()> {
    // SAFETY: `fd` is a live socket for the duration of the call; the option value points to a
    // local `c_int` and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&val as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(last_os_error()) } else { Ok(()) }
}

fn set_timeval(fd: BorrowedFd<'_>, opt: i32, d: Duration) -> io::Result<()> {
    // A zero timeval means "block forever": never pass it.
    let d = d.max(Duration::from_millis(1));
    let tv = libc::timeval { tv_sec: d.as_secs() as libc::time_t, tv_usec: d.subsec_micros() as libc::suseconds_t };
    // SAFETY: live fd; `tv` is a properly initialised `struct timeval` of the passed size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(last_os_error()) } else { Ok(()) }
}

impl NlSocket {
    /// Open and bind a netlink socket of `protocol` (`NETLINK_GENERIC`, `NETLINK_ROUTE`).
    pub fn open(protocol: i32, timeout: Duration) -> Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
        if raw < 0 {
            return Err(Error::os("netlink socket", "-", last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd we own exclusively.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let b = fd.as_fd();
        for opt in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
            setsockopt_int(b, SOL_NETLINK, opt, 1).map_err(|e| Error::os("netlink setsockopt", "-", e))?;
        }
        if protocol == NETLINK_GENERIC {
            // Strict checking of dump requests (older kernels may lack it: not fatal).
            let _ = setsockopt_int(b, SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1);
        }
        set_timeval(b, libc::SO_SNDTIMEO, timeout).map_err(|e| Error::os("netlink SO_SNDTIMEO", "-", e))?;
        set_timeval(b, libc::SO_RCVTIMEO, timeout).map_err(|e| Error::os("netlink SO_RCVTIMEO", "-", e))?;
        // SAFETY: zeroed sockaddr_nl is a valid "kernel assigns the port" address.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: live fd; `sa` is a sockaddr_nl of the passed length.
        let rc = unsafe {
            libc::bind(
                b.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(Error::os("netlink bind", "-", last_os_error()));
        }
        // Sequence numbers start at a per-socket value so stale replies never match.
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let seed = (nanos ^ std::process::id()) & 0xffff;
        Ok(NlSocket { fd, seq: 0x1000 + seed, timeout, protocol })
    }

    /// The netlink protocol of this socket.
    pub fn protocol(&self) -> i32 {
        self.protocol
    }

    /// The deadline applied to each request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Next sequence number.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // The kernel is the peer: a zeroed sockaddr_nl (pid 0).
        // SAFETY: zeroed sockaddr_nl is valid.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: live fd; `bytes` is valid for reads of its length; `sa` of passed size.
            let rc = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    0,
                    (&sa as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if rc >= 0 {
                return Ok(());
            }
            let e = last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receive one whole datagram before `deadline`. Sizes the buffer with
    /// `MSG_PEEK | MSG_TRUNC` so a large dump part is never truncated.
    fn recv_datagram(&self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            set_timeval(self.fd.as_fd(), libc::SO_RCVTIMEO, deadline - now)?;
            let mut probe = [0u8; 1];
            // SAFETY: live fd; 1-byte buffer valid for writes; MSG_TRUNC returns the real size.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    probe.as_mut_ptr().cast(),
                    probe.len(),
                    libc::MSG_PEEK | libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return Ok(None),
                    _ => return Err(e),
                }
            }
            let mut buf = vec![0u8; (n as usize).max(16)];
            // SAFETY: live fd; `buf` valid for writes of its length.
            let m = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if m < 0 {
                let e = last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => continue,
                    _ => return Err(e),
                }
            }
            buf.truncate(m as usize);
            return Ok(Some(buf));
        }
    }

    /// Send `req` (its sequence number is replaced by this socket's next one) and collect
    /// the raw data messages (type, flags, payload) until the final ack or `NLMSG_DONE`.
    /// A kernel error becomes [`Error::Kernel`] with the extack's attribute names filled in.
    pub fn transact_raw(&mut self, mut req: Request, mode: Mode, iface: &str) -> Result<Vec<(u16, Vec<u8>)>> {
        let seq = self.next_seq();
        req.set_seq(seq);
        let op = req.op;
        tracing::trace!(op, ?mode, seq, iface, "netlink request");
        self.send(&req.bytes).map_err(|e| Error::os(op, iface, e))?;
        let deadline = Instant::now() + self.timeout;
        let mut out = Vec::new();
        loop {
            let Some(gram) = self.recv_datagram(deadline).map_err(|e| Error::os(op, iface, e))? else {
                return Err(Error::Timeout { op, iface: iface.to_owned(), after: self.timeout });
            };
            let malformed = |what: String| Error::Malformed { op, iface: iface.to_owned(), what };
            let msgs = netlink::parse_messages(&gram).map_err(|e| malformed(e.0))?;
            for m in msgs {
                if m.seq != seq {
                    continue; // stale reply of an earlier, timed-out request
                }
                match m.ty {
                    NLMSG_NOOP => {}
                    NLMSG_OVERRUN => return Err(malformed("NLMSG_OVERRUN".into())),
                    NLMSG_ERROR => {
                        let mut ack = netlink::decode_error(&m).map_err(|e| malformed(e.0))?;
                        if ack.errno == 0 {
                            return Ok(out);
                        }
                        req.annotate(&mut ack.extack);
                        return Err(Error::Kernel {
                            op,
                            iface: iface.to_owned(),
                            errno: ack.errno,
                            extack: Box::new(ack.extack),
                        });
                    }
                    NLMSG_DONE => {
                        let mut ack = netlink::decode_done(&m).map_err(|e| malformed(e.0))?;
                        if ack.errno == 0 {
                            return Ok(out);
                        }
                        req.annotate(&mut ack.extack);
                        return Err(Error::Kernel {
                            op,
                            iface: iface.to_owned(),
                            errno: ack.errno,
                            extack: Box::new(ack.extack),
                        });
                    }
                    // Data message (both modes end on the ack or NLMSG_DONE: see `Mode`).
                    ty => out.push((ty, m.payload.to_vec())),
                }
            }
        }
    }

    /// [`transact_raw`](Self::transact_raw) for generic netlink: data messages decoded as
    /// [`GenlMsg`].
    pub fn transact(&mut self, req: Request, mode: Mode, iface: &str) -> Result<Vec<GenlMsg>> {
        let op = req.op;
        self.transact_raw(req, mode, iface)?
            .into_iter()
            .map(|(_, p)| {
                GenlMsg::from_payload(&p).map_err(|e| Error::Malformed { op, iface: iface.to_owned(), what: e.0 })
            })
            .collect()
    }
}

impl AsFd for NlSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
