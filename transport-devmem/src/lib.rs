//! devccl devmem-TCP: the transport and the kernel layer under it.
//!
//! Everything devccl needs from the Linux kernel to move tensors with device-memory TCP
//! (see `docs/devmem.md` and `shared/reference/devmem-uapi.md`):
//!
//! * [`sys::netlink`], [`sys::genl`], [`sys::netdev`], [`sys::ethtool`]: a hand-rolled
//!   generic-netlink client for the `netdev` family (family and policy introspection, dumps,
//!   `BIND_RX` / `BIND_TX`, extack decoding) and the ethtool rings query (header split);
//! * [`sys::cmsg`] and [`sys::sock`]: socket-level codecs (`SO_DEVMEM_*` cmsgs, the TX
//!   `SCM_DEVMEM_DMABUF` cmsg, `SO_DEVMEM_DONTNEED` token batching, zerocopy completions);
//! * [`dmabuf`]: dma-buf sources (CUDA through cudarc, udmabuf) behind one trait;
//! * [`probe`]: why devmem is or is not usable on an interface, with the operator's fix;
//! * [`seam`]: the kernel calls the devmem transport makes, implemented by the real kernel
//!   ([`seam::real`]) and by a simulated Linux 6.18 with a simulated devmem NIC ([`sim`]);
//! * [`transport`]: the devmem [`Transport`](devccl_core::transport::Transport) above the
//!   seam (RX pool, scattered receives, token return, TX bindings, counters);
//! * [`doctor`]: the `devccl doctor` report.
//!
//! Unsafe code lives only in `sys/`, in the dma-buf source modules and in the simulator's
//! memory mappings (`sim/mmap.rs`); every block carries a `// SAFETY:` comment.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod dmabuf;
pub mod doctor;
mod error;
pub mod probe;
pub mod seam;
pub mod sim;
pub mod sys;
pub mod transport;

pub use error::{Error, Fault, Result};
pub use sys::netlink::{Extack, PolicyDesc};
