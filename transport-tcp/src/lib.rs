//! devccl's TCP transport: the fallback that works between any two hosts.
//!
//! - [`TcpTransport`] listens on one address (chosen with [`select_address`] from
//!   `DEVCCL_SOCKET_IFNAME` / `DEVCCL_SOCKET_FAMILY`, IPv4 or IPv6) and implements
//!   [`Transport`](devccl_core::transport::Transport): `connect` opens `lanes` sockets
//!   (`DEVCCL_NSOCKS`) to a peer, `accept` waits for a peer's sockets.
//! - Every socket starts with the handshake of [`devccl_core::wire`] (challenge, Hello,
//!   verdict): the Hello names the communicator, both ranks and the lane, and carries an
//!   HMAC over the acceptor's fresh nonce when `DEVCCL_SECRET` is set. Anything else
//!   arriving at the port (port scanners, HTTP, TLS, truncated or silent clients) is refused
//!   on its own thread, logged, counted ([`TcpTransport::rejected_handshakes`]) and never
//!   disturbs the communicator.
//! - [`TcpConnection`] is the data path: non-blocking sockets with `TCP_NODELAY`; message
//!   `k` of a direction on lane `k % lanes`; one `sendmsg` per send attempt (header and
//!   payload together); receives through a small per-lane buffer, large payloads straight
//!   into the destination. A peer that exits, resets, sends garbage or aborts fails the
//!   pending request with an [`Error::Remote`](devccl_core::Error::Remote) naming it.
//!
//! Socket buffers are left to the kernel's autotuning by default
//! ([`TcpOptions::socket_buffer`] overrides it): on loopback, fixed 4 MiB `SO_SNDBUF`/`SO_RCVBUF`
//! measured no better for messages of 4 MiB and more (a few percent either way, within the
//! noise) and better only for 256 KiB–1 MiB messages, while fixed sizes disable receive
//! autotuning, which long-RTT links need (`examples/pingpong.rs` has the measurements).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod conn;
mod handshake;
mod iface;
mod transport;

pub use conn::{MAX_INFLIGHT, TcpConnection};
pub use handshake::{DEVMEM_HELLO_DOMAIN, HELLO_DOMAIN, MAX_LANES, hello_domain, hello_tag};
pub use iface::{IfFilter, InterfaceAddr, interface_of, interfaces, select_address};
pub use transport::{LATENCY_ESTIMATE_US, Lanes, TcpOptions, TcpTransport, link_speed_mbps};
