//! The real kernel below the seam: [`crate::sys`] through netlink, libc and the ethtool ioctl.
//!
//! * `bind_rx` / `bind_tx`: `NETDEV_CMD_BIND_RX` / `BIND_TX`, each binding on a netlink socket
//!   of its own ([`crate::sys::netdev::Binding`]); dropping the returned binding closes that socket,
//!   which is how the kernel unbinds.
//! * `steer`: an ntuple rule (`SIOCETHTOOL` / `ETHTOOL_SRXCLSRLINS`, location chosen by the
//!   driver); dropping the returned steering deletes it (`ETHTOOL_SRXCLSRLDEL`). Needs
//!   `CAP_NET_ADMIN` and a NIC with ntuple filters; a refusal is [`Error::Steering`] with the
//!   errno classified and the `ethtool -N` command the operator would run.
//! * socket calls: `SO_ZEROCOPY`, `recvmsg(MSG_SOCK_DEVMEM | MSG_DONTWAIT)`,
//!   `SO_DEVMEM_DONTNEED`, `sendmsg(MSG_ZEROCOPY | MSG_DONTWAIT)` with the TX cmsg,
//!   `recvmsg(MSG_ERRQUEUE | MSG_DONTWAIT)`, with the kernel's errno unchanged.
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::error::{Error, Result};
use crate::seam::{DevmemKernel, KernelBinding, KernelSteering};
use crate::sys::cmsg::MSG_ERRQUEUE;
use crate::sys::netdev::{self, BindRx, BindTx, Netdev};
use crate::sys::ntuple::{self, NtupleRule, RuleLocation, TcpFlow};
use crate::sys::{errno, iface, sock};

/// The running kernel, through one `netdev` netlink client (queries) plus one netlink socket
/// per binding.
#[derive(Debug)]
pub struct RealKernel {
    netdev: Netdev,
}

impl RealKernel {
    /// Resolve the `netdev` family ([`Error::Unsupported`] on a kernel without devmem).
    pub fn open() -> Result<Self> {
        Ok(RealKernel { netdev: Netdev::open()? })
    }

    /// Use an already opened client.
    pub fn from_netdev(netdev: Netdev) -> Self {
        RealKernel { netdev }
    }

    /// The `netdev` client (family, features, dumps).
    pub fn netdev(&self) -> &Netdev {
        &self.netdev
    }

    /// [`DevmemKernel::steer`] with an explicit rule location (`ethtool -N ... loc N`), for a
    /// caller that manages the NIC's rule table itself.
    pub fn steer_at(
        &self,
        ifindex: u32,
        sock: BorrowedFd<'_>,
        queue: u32,
        location: RuleLocation,
    ) -> Result<RealSteering> {
        let flow = TcpFlow::of_socket(sock)
            .map_err(|e| Error::os("ntuple steering (socket addresses)", &format!("fd {}", sock.as_raw_fd()), e))?;
        let rule = NtupleRule { flow, queue, location };
        let Some(ifname) = iface::if_indextoname(ifindex) else {
            return Err(ntuple::refused(&format!("<ifindex {ifindex}>"), errno::ENODEV, &rule));
        };
        match ntuple::insert(&ifname, &rule) {
            Ok(loc) => {
                let command = ntuple::command(&ifname, &rule);
                tracing::info!(iface = %ifname, location = loc, %command, "ntuple steering rule installed");
                Ok(RealSteering { ifname, location: loc, command })
            }
            Err(e) => Err(ntuple::refused(&ifname, e.raw_os_error().unwrap_or(errno::EINVAL), &rule)),
        }
    }
}

/// A binding of the real kernel (owns its netlink socket).
#[derive(Debug)]
pub struct RealBinding(pub netdev::Binding);

impl KernelBinding for RealBinding {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

/// An installed ntuple rule; dropping it deletes the rule.
#[derive(Debug)]
pub struct RealSteering {
    ifname: String,
    location: u32,
    command: String,
}

impl RealSteering {
    /// The rule's location in the NIC's table.
    pub fn location(&self) -> u32 {
        self.location
    }
}

impl KernelSteering for RealSteering {
    fn describe(&self) -> String {
        format!("ntuple rule {} on {}: {}", self.location, self.ifname, self.command)
    }
}

impl Drop for RealSteering {
    fn drop(&mut self) {
        if let Err(e) = ntuple::delete(&self.ifname, self.location) {
            tracing::warn!(iface = %self.ifname, location = self.location, error = %e, "deleting ntuple rule failed");
        }
    }
}

impl DevmemKernel for RealKernel {
    fn name(&self) -> &'static str {
        "real"
    }

    fn bind_rx(&self, ifindex: u32, fd: BorrowedFd<'_>, queues: &[u32]) -> Result<Box<dyn KernelBinding>> {
        Ok(Box::new(RealBinding(self.netdev.bind_rx(&BindRx::new(ifindex, fd, queues))?)))
    }

    fn bind_tx(&self, ifindex: u32, fd: BorrowedFd<'_>) -> Result<Box<dyn KernelBinding>> {
        Ok(Box::new(RealBinding(self.netdev.bind_tx(&BindTx::new(ifindex, fd))?)))
    }

    fn steer(&self, ifindex: u32, sock: BorrowedFd<'_>, queue: u32) -> Result<Box<dyn KernelSteering>> {
        Ok(Box::new(self.steer_at(ifindex, sock, queue, RuleLocation::Any)?))
    }

    fn recvmsg_devmem(&self, sock: BorrowedFd<'_>, linear: &mut [u8], ctl: &mut [u8]) -> io::Result<(usize, usize)> {
        sock::recv_devmem(sock, linear, ctl, true).map(|m| (m.bytes, m.control_len))
    }

    fn dontneed(&self, sock: BorrowedFd<'_>, tokens: &[u8]) -> io::Result<u32> {
        sock::devmem_dontneed_raw(sock, tokens)
    }

    fn sendmsg_devmem(&self, sock: BorrowedFd<'_>, binding: u32, ranges: &[(u64, usize)]) -> io::Result<usize> {
        sock::sendmsg_devmem(sock, binding, ranges, libc::MSG_DONTWAIT)
    }

    fn read_errqueue(&self, sock: BorrowedFd<'_>, control: &mut [u8]) -> io::Result<usize> {
        sock::recvmsg_with_control(sock, &mut [], control, MSG_ERRQUEUE | libc::MSG_DONTWAIT).map(|m| m.control_len)
    }
}
