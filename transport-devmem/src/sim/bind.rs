//! Simulated `BIND_RX` / `BIND_TX` / unbind and flow steering.
//!
//! Checks run in the order of 6.18's `netdev_nl_bind_rx_doit()` (net/core/netdev-genl.c; the
//! answers of a real 6.18 are in devmem-uapi §2.4 and §9): the attribute policy (`ifindex` 0
//! is `ERANGE` "integer out of range" with the policy bounds), `CAP_NET_ADMIN` (`EPERM`, only
//! with [`SimOptions::require_cap_net_admin`](super::SimOptions)), the device (`ENODEV`),
//! the queue nests (`EINVAL` on the offending `queues.id`: id at or above the NIC's queue
//! count), `dma_buf_get()` (`EBADF` for an fd that is not open, `EINVAL` for one that is not
//! mappable memory), then per queue, ascending (the kernel walks its queue bitmap), "designated
//! queue already memory provider bound" (`EEXIST`), unwinding the queues done so far. The id
//! comes from the global xarray in `net_devmem_bind_dmabuf()`, after `dma_buf_get()` and before
//! the queues: `xa_alloc_cyclic(&net_devmem_dmabuf_bindings, &binding->id, binding,
//! xa_limit_32b, &id_alloc_next, GFP_KERNEL)` on an `XA_FLAGS_ALLOC1` array
//! (net/core/devmem.c): cyclic from 1; a bind refused before that takes no id, one refused by
//! a queue spends one (the binding is made, then unbound).
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::error::{Error, Result};
use crate::sim::mmap::{self, Mapping};
use crate::sim::pool::Pool;
use crate::sim::rng::mix;
use crate::sim::{Bound, Shared, State, Steer, TxBuf};
use crate::sys::netdev::{BindRx, BindTx};
use crate::sys::netlink::{Extack, NlaType, PolicyDesc, Request};
use crate::sys::ntuple::{self, NtupleRule, RuleLocation, TcpFlow};
use crate::sys::{errno, iface, sock};

fn ifname(ifindex: u32) -> String {
    iface::if_indextoname(ifindex).unwrap_or_else(|| format!("ifindex {ifindex}"))
}

fn refused(op: &'static str, ifindex: u32, errno: i32, extack: Extack) -> Error {
    Error::Kernel { op, iface: ifname(ifindex), errno, extack: Box::new(extack) }
}

/// Extack flagging the `nth` attribute at `path` of `req` (and optionally a message).
fn bad_attr(req: &Request, path: &str, nth: usize, message: Option<&str>) -> Extack {
    let label = req.labels.iter().filter(|l| l.path == path).nth(nth);
    Extack {
        message: message.map(str::to_owned),
        bad_attr_offset: label.map(|l| l.offset),
        bad_attr: label.map(|l| l.path.clone()),
        ..Extack::default()
    }
}

/// The policy answer for `ifindex` 0 (`NETDEV_A_DMABUF_IFINDEX`: u32, min 1).
fn ifindex_out_of_range(req: &Request) -> Extack {
    let mut x = bad_attr(req, "ifindex", 0, Some("integer out of range"));
    x.policy = Some(PolicyDesc {
        ty: Some(NlaType::U32),
        min_u: Some(1),
        max_u: Some(u32::MAX as u64),
        ..PolicyDesc::default()
    });
    x
}

/// Map the fd (`dma_buf_get()`'s errors: `EBADF`, `EINVAL`).
fn map_fd(fd: BorrowedFd<'_>, writable: bool, unit: usize) -> std::result::Result<Mapping, i32> {
    let size = mmap::file_size(fd)?;
    let usable = (size / unit as u64 * unit as u64) as usize;
    if usable == 0 {
        return Err(errno::EINVAL);
    }
    Mapping::map(fd, usable, writable)
}

/// `id_alloc_next`-style cyclic id from 1, skipping live ones.
fn alloc_id(st: &mut State) -> u32 {
    let mut id = st.next_id.max(1);
    while st.ids.contains_key(&id) {
        id = id.checked_add(1).unwrap_or(1);
    }
    st.next_id = id.wrapping_add(1);
    id
}

pub(crate) fn bind_rx(shared: &Shared, ifindex: u32, fd: BorrowedFd<'_>, queues: &[u32]) -> Result<u32> {
    let opts = &shared.opts;
    if queues.is_empty() {
        // What sys::netdev::Netdev::bind_rx answers before asking the kernel.
        return Err(Error::invalid("bind-rx needs at least one RX queue"));
    }
    let req = BindRx::new(ifindex, fd, queues).request(0, 0);
    if ifindex == 0 {
        return Err(refused("bind-rx", ifindex, errno::ERANGE, ifindex_out_of_range(&req)));
    }
    if opts.require_cap_net_admin && !iface::has_cap_net_admin() {
        return Err(refused("bind-rx", ifindex, errno::EPERM, Extack::default()));
    }
    if iface::if_indextoname(ifindex).is_none() {
        return Err(refused("bind-rx", ifindex, errno::ENODEV, Extack::default()));
    }
    for (i, &q) in queues.iter().enumerate() {
        if q >= opts.rx_queues {
            return Err(refused("bind-rx", ifindex, errno::EINVAL, bad_attr(&req, "queues.id", i, None)));
        }
    }
    let map =
        map_fd(fd, true, opts.niov_size as usize).map_err(|e| refused("bind-rx", ifindex, e, Extack::default()))?;
    let wanted: BTreeSet<u32> = queues.iter().copied().collect();
    let mut st = shared.lock();
    // The binding (and its id) exists before the queues are bound; a queue that refuses
    // unbinds it again, so the id is spent.
    let id = alloc_id(&mut st);
    if wanted.iter().any(|q| st.queue_owner.contains_key(&(ifindex, *q))) {
        let msg =
            Extack { message: Some("designated queue already memory provider bound".into()), ..Extack::default() };
        return Err(refused("bind-rx", ifindex, errno::EEXIST, msg));
    }
    let key = st.new_key();
    let seed = opts.seed ^ mix(id as u64);
    st.pools.insert(key, Pool::new(id, ifindex, wanted.iter().copied().collect(), map, opts.niov_size as usize, seed));
    for &q in &wanted {
        st.queue_owner.insert((ifindex, q), key);
    }
    st.ids.insert(id, Bound::Rx(key));
    tracing::info!(binding = id, ifindex, queues = ?wanted, fd = fd.as_raw_fd(), "simulated devmem RX binding");
    Ok(id)
}

pub(crate) fn bind_tx(shared: &Shared, ifindex: u32, fd: BorrowedFd<'_>) -> Result<u32> {
    let req = BindTx::new(ifindex, fd).request(0, 0);
    if ifindex == 0 {
        return Err(refused("bind-tx", ifindex, errno::ERANGE, ifindex_out_of_range(&req)));
    }
    if iface::if_indextoname(ifindex).is_none() {
        return Err(refused("bind-tx", ifindex, errno::ENODEV, Extack::default()));
    }
    let map = map_fd(fd, false, 1).map_err(|e| refused("bind-tx", ifindex, e, Extack::default()))?;
    let mut st = shared.lock();
    let id = alloc_id(&mut st);
    let key = st.new_key();
    st.tx.insert(key, TxBuf { ifindex, map });
    st.ids.insert(id, Bound::Tx(key));
    tracing::info!(binding = id, ifindex, fd = fd.as_raw_fd(), "simulated devmem TX binding");
    Ok(id)
}

/// The binding handle was dropped (the kernel: its netlink socket closed).
pub(crate) fn unbind(st: &mut State, id: u32) {
    match st.ids.remove(&id) {
        Some(Bound::Rx(key)) => {
            st.queue_owner.retain(|_, k| *k != key);
            if let Some(p) = st.pools.get_mut(&key) {
                p.unbind();
            }
            st.gc_pools();
        }
        Some(Bound::Tx(key)) => {
            st.tx.remove(&key);
        }
        None => {}
    }
    tracing::info!(binding = id, "simulated devmem binding unbound");
}

/// Steer `sock`'s flow to `queue` of `ifindex`: (socket cookie, steering generation,
/// description).
pub(crate) fn steer(shared: &Shared, ifindex: u32, fd: BorrowedFd<'_>, queue: u32) -> Result<(u64, u64, String)> {
    let flow = TcpFlow::of_socket(fd)
        .map_err(|e| Error::os("ntuple steering (socket addresses)", &format!("fd {}", fd.as_raw_fd()), e))?;
    let rule = NtupleRule { flow, queue, location: RuleLocation::Any };
    let Some(name) = iface::if_indextoname(ifindex) else {
        return Err(ntuple::refused(&format!("<ifindex {ifindex}>"), errno::ENODEV, &rule));
    };
    if queue >= shared.opts.rx_queues {
        return Err(ntuple::refused(&name, errno::EINVAL, &rule));
    }
    // Bytes already queued arrived before the rule: ordinary data.
    let waiting = sock::inq(fd).map_err(|e| Error::os("SIOCINQ", &format!("fd {}", fd.as_raw_fd()), e))?;
    let mut st = shared.lock();
    st.steer_generation += 1;
    let generation = st.steer_generation;
    let (cookie, s) =
        st.sock(fd, shared.opts.seed).map_err(|e| Error::os("SO_COOKIE", &format!("fd {}", fd.as_raw_fd()), e))?;
    s.ordinary_left = waiting;
    s.steer = Some(Steer { ifindex, queue, generation });
    let desc =
        format!("simulated: {} (fd {}, {waiting} bytes before it)", ntuple::command(&name, &rule), fd.as_raw_fd());
    tracing::debug!(%desc, "simulated steering");
    Ok((cookie, generation, desc))
}
