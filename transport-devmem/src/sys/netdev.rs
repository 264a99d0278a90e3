//! The `netdev` generic-netlink family: feature detection, dumps, `BIND_RX` / `BIND_TX`.
//!
//! Ids and semantics: `shared/reference/devmem-uapi.md` §2 (6.18 answers in §9).
#![forbid(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::sys::genl::{self, Family, OpPolicy};
use crate::sys::iface;
use crate::sys::netlink::{AttrSet, DecodeError, GenlMsg, NLM_F_ACK, NLM_F_DUMP, Request, RequestBuilder};
use crate::sys::socket::{DEFAULT_TIMEOUT, Mode, NETLINK_GENERIC, NlSocket};

/// Family name.
pub const FAMILY_NAME: &str = "netdev";
/// `NETDEV_FAMILY_VERSION`.
pub const VERSION: u8 = 1;

/// `NETDEV_CMD_*`.
pub mod cmd {
    pub const DEV_GET: u8 = 1;
    pub const PAGE_POOL_GET: u8 = 5;
    pub const PAGE_POOL_STATS_GET: u8 = 9;
    pub const QUEUE_GET: u8 = 10;
    pub const NAPI_GET: u8 = 11;
    pub const QSTATS_GET: u8 = 12;
    pub const BIND_RX: u8 = 13;
    pub const NAPI_SET: u8 = 14;
    pub const BIND_TX: u8 = 15;
    pub const QUEUE_CREATE: u8 = 16;
}

/// Name of a `NETDEV_CMD_*`.
pub fn cmd_name(c: u32) -> &'static str {
    match c {
        1 => "dev-get",
        2 => "dev-add-ntf",
        3 => "dev-del-ntf",
        4 => "dev-change-ntf",
        5 => "page-pool-get",
        6 => "page-pool-add-ntf",
        7 => "page-pool-del-ntf",
        8 => "page-pool-change-ntf",
        9 => "page-pool-stats-get",
        10 => "queue-get",
        11 => "napi-get",
        12 => "qstats-get",
        13 => "bind-rx",
        14 => "napi-set",
        15 => "bind-tx",
        16 => "queue-create",
        _ => "?",
    }
}

/// `NETDEV_A_DMABUF_*` (bind requests and replies).
pub mod dmabuf_attr {
    pub const IFINDEX: u16 = 1;
    pub const QUEUES: u16 = 2;
    pub const FD: u16 = 3;
    pub const ID: u16 = 4;
    pub const RX_PAGE_SIZE: u16 = 5;
}

/// `NETDEV_A_QUEUE_*`.
pub mod queue_attr {
    pub const ID: u16 = 1;
    pub const IFINDEX: u16 = 2;
    pub const TYPE: u16 = 3;
    pub const NAPI_ID: u16 = 4;
    pub const DMABUF: u16 = 5;
    pub const IO_URING: u16 = 6;
    pub const XSK: u16 = 7;
}

/// `NETDEV_A_DEV_*`.
pub mod dev_attr {
    pub const IFINDEX: u16 = 1;
    pub const XDP_FEATURES: u16 = 3;
    pub const XDP_ZC_MAX_SEGS: u16 = 4;
    pub const XDP_RX_METADATA_FEATURES: u16 = 5;
    pub const XSK_FEATURES: u16 = 6;
}

/// `NETDEV_A_NAPI_*`.
pub mod napi_attr {
    pub const IFINDEX: u16 = 1;
    pub const ID: u16 = 2;
    pub const IRQ: u16 = 3;
    pub const PID: u16 = 4;
    pub const THREADED: u16 = 8;
}

/// `NETDEV_A_PAGE_POOL_*`.
pub mod page_pool_attr {
    pub const ID: u16 = 1;
    pub const IFINDEX: u16 = 2;
    pub const NAPI_ID: u16 = 3;
    pub const INFLIGHT: u16 = 4;
    pub const INFLIGHT_MEM: u16 = 5;
    pub const DETACH_TIME: u16 = 6;
    pub const DMABUF: u16 = 7;
    pub const IO_URING: u16 = 8;
}

/// `NETDEV_QUEUE_TYPE_RX`.
pub const QUEUE_TYPE_RX: u32 = 0;
/// `NETDEV_QUEUE_TYPE_TX`.
pub const QUEUE_TYPE_TX: u32 = 1;

/// The `queue-id` subset inside `QUEUES` nests.
pub static QUEUE_ID_SET: AttrSet = AttrSet { name: "queue-id", attrs: &[(1, "id"), (3, "type")], nests: &[] };

/// The `dmabuf` attribute set of bind requests.
pub static DMABUF_SET: AttrSet = AttrSet {
    name: "dmabuf",
    attrs: &[(1, "ifindex"), (2, "queues"), (3, "fd"), (4, "id"), (5, "rx-page-size")],
    nests: &[(2, &QUEUE_ID_SET)],
};

static DUMP_SET: AttrSet = AttrSet { name: "netdev", attrs: &[(1, "ifindex")], nests: &[] };

// ------------------------------------------------------------------------------------------
// Requests (pure, golden-tested).

/// A dump request (`DEV_GET`, `QUEUE_GET`, `NAPI_GET`, `PAGE_POOL_GET`, `QSTATS_GET`).
pub fn dump_request(family_id: u16, command: u8, seq: u32) -> Request {
    RequestBuilder::genl(family_id, NLM_F_DUMP, seq, command, VERSION, cmd_name(command as u32), &DUMP_SET).finish()
}

/// What a `BIND_RX` request carries. Fields are optional so that the error paths the kernel
/// checks (missing attributes, bad nests) can be exercised; [`BindRx::new`] fills all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindRx {
    pub ifindex: Option<u32>,
    pub fd: Option<u32>,
    /// `(queue id, queue type)`; type must be [`QUEUE_TYPE_RX`] for a valid request.
    pub queues: Vec<(u32, u32)>,
    /// `NETDEV_A_DMABUF_RX_PAGE_SIZE` (kernels after 6.18; check [`Features::rx_page_size`]).
    pub rx_page_size: Option<u32>,
    /// Set `NLA_F_NESTED` on the queue nests (always, except to reproduce that error).
    pub nested_flag: bool,
}

impl BindRx {
    /// Bind dma-buf `fd` to RX queues `queues` of `ifindex`.
    pub fn new(ifindex: u32, fd: BorrowedFd<'_>, queues: &[u32]) -> Self {
        BindRx {
            ifindex: Some(ifindex),
            fd: Some(fd.as_raw_fd() as u32),
            queues: queues.iter().map(|&q| (q, QUEUE_TYPE_RX)).collect(),
            rx_page_size: None,
            nested_flag: true,
        }
    }

    /// Encode (attribute order: ifindex, fd, queues..., rx-page-size).
    pub fn request(&self, family_id: u16, seq: u32) -> Request {
        let mut b = RequestBuilder::genl(family_id, NLM_F_ACK, seq, cmd::BIND_RX, VERSION, "bind-rx", &DMABUF_SET);
        if let Some(i) = self.ifindex {
            b.put_u32(dmabuf_attr::IFINDEX, i);
        }
        if let Some(fd) = self.fd {
            b.put_u32(dmabuf_attr::FD, fd);
        }
        for &(id, ty) in &self.queues {
            b.begin_nest(dmabuf_attr::QUEUES, self.nested_flag);
            b.put_u32(queue_attr::ID, id);
            b.put_u32(queue_attr::TYPE, ty);
            b.end_nest();
        }
        if let Some(ps) = self.rx_page_size {
            b.put_u32(dmabuf_attr::RX_PAGE_SIZE, ps);
        }
        b.finish()
    }
}

/// What a `BIND_TX` request carries (optional fields: see [`BindRx`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindTx {
    pub ifindex: Option<u32>,
    pub fd: Option<u32>,
    /// Queues are not part of the TX policy; settable only to reproduce that error.
    pub queues: Vec<(u32, u32)>,
}

impl BindTx {
    /// Bind dma-buf `fd` for TX through `ifindex`.
    pub fn new(ifindex: u32, fd: BorrowedFd<'_>) -> Self {
        BindTx { ifindex: Some(ifindex), fd: Some(fd.as_raw_fd() as u32), queues: Vec::new() }
    }

    /// Encode (attribute order: ifindex, fd).
    pub fn request(&self, family_id: u16, seq: u32) -> Request {
        let mut b = RequestBuilder::genl(family_id, NLM_F_ACK, seq, cmd::BIND_TX, VERSION, "bind-tx", &DMABUF_SET);
        if let Some(i) = self.ifindex {
            b.put_u32(dmabuf_attr::IFINDEX, i);
        }
        if let Some(fd) = self.fd {
            b.put_u32(dmabuf_attr::FD, fd);
        }
        for &(id, ty) in &self.queues {
            b.begin_nest(dmabuf_attr::QUEUES, true);
            b.put_u32(queue_attr::ID, id);
            b.put_u32(queue_attr::TYPE, ty);
            b.end_nest();
        }
        b.finish()
    }
}

// ------------------------------------------------------------------------------------------
// Replies.

fn ifname_of(ifindex: u32) -> Option<String> {
    iface::if_indextoname(ifindex)
}

/// One `DEV_GET` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DevInfo {
    pub ifindex: u32,
    /// Resolved with `if_indextoname` (not part of the reply).
    pub ifname: Option<String>,
    pub xdp_features: u64,
    pub xdp_zc_max_segs: Option<u32>,
    pub xdp_rx_metadata_features: u64,
    pub xsk_features: u64,
}

impl DevInfo {
    /// Decode one reply message.
    pub fn decode(m: &GenlMsg) -> Result<Self, DecodeError> {
        let mut d = DevInfo {
            ifindex: 0,
            ifname: None,
            xdp_features: 0,
            xdp_zc_max_segs: None,
            xdp_rx_metadata_features: 0,
            xsk_features: 0,
        };
        for a in m.attrs()? {
            match a.ty {
                dev_attr::IFINDEX => d.ifindex = a.u32()?,
                dev_attr::XDP_FEATURES => d.xdp_features = a.uint()?,
                dev_attr::XDP_ZC_MAX_SEGS => d.xdp_zc_max_segs = Some(a.u32()?),
                dev_attr::XDP_RX_METADATA_FEATURES => d.xdp_rx_metadata_features = a.uint()?,
                dev_attr::XSK_FEATURES => d.xsk_features = a.uint()?,
                _ => {}
            }
        }
        Ok(d)
    }
}

/// Queue direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Rx,
    Tx,
    Other(u32),
}

/// One `QUEUE_GET` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueInfo {
    pub id: u32,
    pub ifindex: u32,
    pub ifname: Option<String>,
    pub ty: QueueType,
    pub napi_id: Option<u32>,
    /// Binding id of an installed devmem provider.
    pub dmabuf: Option<u32>,
    /// An io_uring zero-copy RX provider is installed.
    pub io_uring: bool,
    /// An AF_XDP socket uses the queue.
    pub xsk: bool,
}

impl QueueInfo {
    /// Decode one reply message.
    pub fn decode(m: &GenlMsg) -> Result<Self, DecodeError> {
        let mut q = QueueInfo {
            id: 0,
            ifindex: 0,
            ifname: None,
            ty: QueueType::Rx,
            napi_id: None,
            dmabuf: None,
            io_uring: false,
            xsk: false,
        };
        for a in m.attrs()? {
            match a.ty {
                queue_attr::ID => q.id = a.u32()?,
                queue_attr::IFINDEX => q.ifindex = a.u32()?,
                queue_attr::TYPE => {
                    q.ty = match a.u32()? {
                        QUEUE_TYPE_RX => QueueType::Rx,
                        QUEUE_TYPE_TX => QueueType::Tx,
                        n => QueueType::Other(n),
                    }
                }
                queue_attr::NAPI_ID => q.napi_id = Some(a.u32()?),
                queue_attr::DMABUF => q.dmabuf = Some(a.u32()?),
                queue_attr::IO_URING => q.io_uring = true,
                queue_attr::XSK => q.xsk = true,
                _ => {}
            }
        }
        Ok(q)
    }
}

/// One `NAPI_GET` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NapiInfo {
    pub id: u32,
    pub ifindex: u32,
    pub ifname: Option<String>,
    pub irq: Option<u32>,
    pub pid: Option<u32>,
    pub threaded: Option<u64>,
}

impl NapiInfo {
    /// Decode one reply message.
    pub fn decode(m: &GenlMsg) -> Result<Self, DecodeError> {
        let mut n = NapiInfo { id: 0, ifindex: 0, ifname: None, irq: None, pid: None, threaded: None };
        for a in m.attrs()? {
            match a.ty {
                napi_attr::IFINDEX => n.ifindex = a.u32()?,
                napi_attr::ID => n.id = a.u32()?,
                napi_attr::IRQ => n.irq = Some(a.u32()?),
                napi_attr::PID => n.pid = Some(a.u32()?),
                napi_attr::THREADED => n.threaded = Some(a.uint()?),
                _ => {}
            }
        }
        Ok(n)
    }
}

/// One `PAGE_POOL_GET` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PagePoolInfo {
    pub id: u64,
    pub ifindex: Option<u32>,
    pub ifname: Option<String>,
    pub napi_id: Option<u64>,
    pub inflight: Option<u64>,
    pub inflight_mem: Option<u64>,
    pub detach_time: Option<u64>,
    /// Binding id when the pool is backed by a devmem provider.
    pub dmabuf: Option<u32>,
    pub io_uring: bool,
}

impl PagePoolInfo {
    /// Decode one reply message.
    pub fn decode(m: &GenlMsg) -> Result<Self, DecodeError> {
        let mut p = PagePoolInfo {
            id: 0,
            ifindex: None,
            ifname: None,
            napi_id: None,
            inflight: None,
            inflight_mem: None,
            detach_time: None,
            dmabuf: None,
            io_uring: false,
        };
        for a in m.attrs()? {
            match a.ty {
                page_pool_attr::ID => p.id = a.uint()?,
                page_pool_attr::IFINDEX => p.ifindex = Some(a.u32()?),
                page_pool_attr::NAPI_ID => p.napi_id = Some(a.uint()?),
                page_pool_attr::INFLIGHT => p.inflight = Some(a.uint()?),
                page_pool_attr::INFLIGHT_MEM => p.inflight_mem = Some(a.uint()?),
                page_pool_attr::DETACH_TIME => p.detach_time = Some(a.uint()?),
                page_pool_attr::DMABUF => p.dmabuf = Some(a.u32()?),
                page_pool_attr::IO_URING => p.io_uring = true,
                _ => {}
            }
        }
        Ok(p)
    }
}

/// Decode the binding id of a bind reply.
pub fn decode_bind_reply(msgs: &[GenlMsg]) -> Result<u32, DecodeError> {
    for m in msgs {
        for a in m.attrs()? {
            if a.ty == dmabuf_attr::ID {
                return a.u32();
            }
        }
    }
    Err(DecodeError("bind reply without a binding id".into()))
}

// ------------------------------------------------------------------------------------------
// Features.

/// What this kernel's `netdev` family offers, from its op list and per-op policies (never
/// from the version number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Features {
    /// `BIND_RX` exists (devmem RX, 6.12+).
    pub bind_rx: bool,
    /// `BIND_RX` needs `CAP_NET_ADMIN` (6.18: yes).
    pub bind_rx_admin_perm: bool,
    /// `BIND_TX` exists (devmem TX, 6.16+).
    pub bind_tx: bool,
    /// `BIND_TX` needs `CAP_NET_ADMIN` (6.18: no).
    pub bind_tx_admin_perm: bool,
    /// `BIND_RX` accepts `rx-page-size` (attribute 5; after 6.18). `None`: policy unknown.
    pub rx_page_size: Option<bool>,
    /// `QUEUE_CREATE` exists (queue leasing; after 6.18).
    pub queue_create: bool,
    /// `PAGE_POOL_STATS_GET` exists (CONFIG_PAGE_POOL_STATS).
    pub page_pool_stats: bool,
}

impl Features {
    /// Derive from the op list and (when available) the `BIND_RX` policy.
    pub fn from_family(f: &Family, bind_rx_policy: Option<&OpPolicy>) -> Self {
        let rx = f.op(cmd::BIND_RX);
        let tx = f.op(cmd::BIND_TX);
        Features {
            bind_rx: rx.is_some(),
            bind_rx_admin_perm: rx.is_some_and(|o| o.admin_perm()),
            bind_tx: tx.is_some(),
            bind_tx_admin_perm: tx.is_some_and(|o| o.admin_perm()),
            rx_page_size: bind_rx_policy.map(|p| p.do_attr(dmabuf_attr::RX_PAGE_SIZE).is_some()),
            queue_create: f.op(cmd::QUEUE_CREATE).is_some(),
            page_pool_stats: f.op(cmd::PAGE_POOL_STATS_GET).is_some(),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Client.

/// A client of the `netdev` family (queries). Bindings get a socket of their own: see
/// [`Binding`].
#[derive(Debug)]
pub struct Netdev {
    sock: NlSocket,
    family: Family,
}

impl Netdev {
    /// Resolve the family with the default deadline.
    pub fn open() -> Result<Self> {
        Self::open_with_timeout(DEFAULT_TIMEOUT)
    }

    /// Resolve the family; [`Error::Unsupported`] when the kernel has no `netdev` family.
    pub fn open_with_timeout(timeout: Duration) -> Result<Self> {
        let mut sock = NlSocket::open(NETLINK_GENERIC, timeout)?;
        match genl::resolve_family(&mut sock, FAMILY_NAME)? {
            Some(family) => Ok(Netdev { sock, family }),
            None => Err(Error::unsupported(
                "the kernel has no \"netdev\" generic-netlink family (Linux older than 6.12 \
                 or built without CONFIG_NET_DEVMEM): devmem TCP is unavailable",
            )),
        }
    }

    /// The resolved family (id, version, ops, multicast groups).
    pub fn family(&self) -> &Family {
        &self.family
    }

    /// The deadline of each request.
    pub fn timeout(&self) -> Duration {
        self.sock.timeout()
    }

    /// Per-op policy from the controller.
    pub fn op_policy(&mut self, command: u8) -> Result<OpPolicy> {
        genl::op_policy(&mut self.sock, self.family.id, command)
    }

    /// Feature detection from ops and the `BIND_RX` policy.
    pub fn features(&mut self) -> Result<Features> {
        let pol = if self.family.op(cmd::BIND_RX).is_some() { Some(self.op_policy(cmd::BIND_RX)?) } else { None };
        Ok(Features::from_family(&self.family, pol.as_ref()))
    }

    fn dump(&mut self, command: u8) -> Result<Vec<GenlMsg>> {
        let req = dump_request(self.family.id, command, 0);
        self.sock.transact(req, Mode::Dump, "-")
    }

    fn decode_all<T>(
        op: &'static str,
        msgs: &[GenlMsg],
        f: impl Fn(&GenlMsg) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>> {
        msgs.iter().map(|m| f(m).map_err(|e| Error::Malformed { op, iface: "-".into(), what: e.0 })).collect()
    }

    /// `DEV_GET` dump.
    pub fn devices(&mut self) -> Result<Vec<DevInfo>> {
        let msgs = self.dump(cmd::DEV_GET)?;
        let mut v = Self::decode_all("dev-get", &msgs, DevInfo::decode)?;
        for d in &mut v {
            d.ifname = ifname_of(d.ifindex);
        }
        Ok(v)
    }

    /// `QUEUE_GET` dump (devices that are down are skipped by the kernel).
    pub fn queues(&mut self) -> Result<Vec<QueueInfo>> {
        let msgs = self.dump(cmd::QUEUE_GET)?;
        let mut v = Self::decode_all("queue-get", &msgs, QueueInfo::decode)?;
        for q in &mut v {
            q.ifname = ifname_of(q.ifindex);
        }
        Ok(v)
    }

    /// `NAPI_GET` dump.
    pub fn napis(&mut self) -> Result<Vec<NapiInfo>> {
        let msgs = self.dump(cmd::NAPI_GET)?;
        let mut v = Self::decode_all("napi-get", &msgs, NapiInfo::decode)?;
        for n in &mut v {
            n.ifname = ifname_of(n.ifindex);
        }
        Ok(v)
    }

    /// `PAGE_POOL_GET` dump.
    pub fn page_pools(&mut self) -> Result<Vec<PagePoolInfo>> {
        let msgs = self.dump(cmd::PAGE_POOL_GET)?;
        let mut v = Self::decode_all("page-pool-get", &msgs, PagePoolInfo::decode)?;
        for p in &mut v {
            p.ifname = p.ifindex.and_then(ifname_of);
        }
        Ok(v)
    }

    /// Send a raw request on this (query) socket. Meant for tests of the kernel's error
    /// paths; a bind made this way lives as long as this `Netdev`.
    pub fn request(&mut self, req: Request, iface: &str) -> Result<Vec<GenlMsg>> {
        self.sock.transact(req, Mode::Do, iface)
    }

    /// `BIND_RX` on a socket of its own. The returned [`Binding`] owns that socket: dropping
    /// it unbinds (the kernel restarts the queues with their normal memory provider).
    pub fn bind_rx(&self, req: &BindRx) -> Result<Binding> {
        if req.queues.is_empty() {
            return Err(Error::invalid("bind-rx needs at least one RX queue"));
        }
        self.bind(
            req.request(self.family.id, 0),
            req.ifindex.unwrap_or(0),
            Direction::Rx,
            req.queues.iter().map(|q| q.0).collect(),
        )
    }

    /// `BIND_TX` on a socket of its own; dropping the [`Binding`] unbinds.
    pub fn bind_tx(&self, req: &BindTx) -> Result<Binding> {
        self.bind(req.request(self.family.id, 0), req.ifindex.unwrap_or(0), Direction::Tx, Vec::new())
    }

    fn bind(&self, req: Request, ifindex: u32, direction: Direction, queues: Vec<u32>) -> Result<Binding> {
        let ifname = ifname_of(ifindex).unwrap_or_else(|| format!("ifindex {ifindex}"));
        let mut sock = NlSocket::open(NETLINK_GENERIC, self.sock.timeout())?;
        let op = req.op;
        let msgs = sock.transact(req, Mode::Do, &ifname)?;
        let id = decode_bind_reply(&msgs).map_err(|e| Error::Malformed { op, iface: ifname.clone(), what: e.0 })?;
        tracing::info!(binding = id, iface = %ifname, ?direction, ?queues, "devmem dma-buf bound");
        Ok(Binding { id, ifindex, ifname, direction, queues, sock })
    }
}

/// Direction of a binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Rx,
    Tx,
}

/// A dma-buf bound to a netdev. Owns the netlink socket that made it: the kernel keeps the
/// binding exactly as long as that socket is open, so dropping this value unbinds.
///
/// Tear-down order (devmem-uapi §10.5): stop flows, return tokens, close data sockets, then
/// drop the binding; the dma-buf memory must outlive it.
#[derive(Debug)]
pub struct Binding {
    id: u32,
    ifindex: u32,
    ifname: String,
    direction: Direction,
    queues: Vec<u32>,
    sock: NlSocket,
}

impl Binding {
    /// Kernel binding id (`NETDEV_A_DMABUF_ID`, >= 1): the TX cmsg payload, and what RX cmsgs
    /// carry in `dmabuf_id`.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Interface index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// RX or TX.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// Bound RX queues (empty for TX).
    pub fn queues(&self) -> &[u32] {
        &self.queues
    }

    /// The owning netlink socket.
    pub fn socket(&self) -> &NlSocket {
        &self.sock
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        tracing::info!(binding = self.id, iface = %self.ifname, "devmem dma-buf unbound (netlink socket closed)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::netlink::{genl_messages, parse_messages};
    use crate::sys::recorded::*;

    fn rx(ifindex: Option<u32>, fd: Option<u32>, queues: Vec<(u32, u32)>) -> BindRx {
        BindRx { ifindex, fd, queues, rx_page_size: None, nested_flag: true }
    }

    #[test]
    fn golden_bind_rx() {
        // Hand check: len 56, family 20, flags REQUEST|ACK, seq 6; cmd 13 version 1;
        // IFINDEX(1)=1; FD(3)=4; QUEUES(2|NLA_F_NESTED){ID(1)=0, TYPE(3)=0} (len 20).
        #[rustfmt::skip]
        let want: &[u8] = &[
            56, 0, 0, 0, 20, 0, 5, 0, 6, 0, 0, 0, 0, 0, 0, 0,
            13, 1, 0, 0,
            8, 0, 1, 0, 1, 0, 0, 0,
            8, 0, 3, 0, 4, 0, 0, 0,
            20, 0, 2, 0x80,
            8, 0, 1, 0, 0, 0, 0, 0,
            8, 0, 3, 0, 0, 0, 0, 0,
        ];
        let r = rx(Some(1), Some(4), vec![(0, 0)]).request(20, 6);
        assert_eq!(r.bytes, want);
        assert_eq!(r.bytes, REQ_BIND_RX_LO);
        assert_eq!(r.label_at(20), Some("ifindex"));
        assert_eq!(r.label_at(28), Some("fd"));
        assert_eq!(r.label_at(36), Some("queues"));
        assert_eq!(r.label_at(48), Some("queues.type"));
    }

    #[test]
    fn golden_bind_rx_variants_match_recorded_requests() {
        assert_eq!(rx(Some(0), Some(4), vec![(0, 0)]).request(20, 8).bytes, REQ_BIND_RX_IFINDEX0);
        assert_eq!(rx(Some(4), None, vec![(0, 0)]).request(20, 9).bytes, REQ_BIND_RX_NO_FD);
        let mut nn = rx(Some(4), Some(4), vec![(0, 0)]);
        nn.nested_flag = false;
        assert_eq!(nn.request(20, 10).bytes, REQ_BIND_RX_NOT_NESTED);
        assert_eq!(rx(Some(4), Some(4), vec![(0, 7)]).request(20, 11).bytes, REQ_BIND_RX_QTYPE7);
        assert_eq!(rx(Some(99999), Some(4), vec![(0, 0)]).request(20, 12).bytes, REQ_BIND_RX_NODEV);
    }

    #[test]
    fn golden_bind_rx_page_size_and_two_queues() {
        let mut r = rx(Some(4), Some(9), vec![(2, 0), (3, 0)]);
        r.rx_page_size = Some(16384);
        #[rustfmt::skip]
        let want: &[u8] = &[
            84, 0, 0, 0, 20, 0, 5, 0, 1, 0, 0, 0, 0, 0, 0, 0,
            13, 1, 0, 0,
            8, 0, 1, 0, 4, 0, 0, 0,
            8, 0, 3, 0, 9, 0, 0, 0,
            20, 0, 2, 0x80, 8, 0, 1, 0, 2, 0, 0, 0, 8, 0, 3, 0, 0, 0, 0, 0,
            20, 0, 2, 0x80, 8, 0, 1, 0, 3, 0, 0, 0, 8, 0, 3, 0, 0, 0, 0, 0,
            8, 0, 5, 0, 0, 0x40, 0, 0,
        ];
        assert_eq!(r.request(20, 1).bytes, want);
    }

    #[test]
    fn golden_bind_tx() {
        // len 36, family 20, REQUEST|ACK, seq 7; cmd 15 version 1; IFINDEX=4; FD=4.
        #[rustfmt::skip]
        let want: &[u8] = &[
            36, 0, 0, 0, 20, 0, 5, 0, 7, 0, 0, 0, 0, 0, 0, 0,
            15, 1, 0, 0,
            8, 0, 1, 0, 4, 0, 0, 0,
            8, 0, 3, 0, 4, 0, 0, 0,
        ];
        let r = BindTx { ifindex: Some(4), fd: Some(4), queues: vec![] }.request(20, 7);
        assert_eq!(r.bytes, want);
        assert_eq!(r.bytes, REQ_BIND_TX_ETH0);
    }

    #[test]
    fn golden_dump_requests() {
        // len 20, family 20, REQUEST|DUMP (0x301), seq 3; cmd 1 (dev-get) version 1.
        let want: &[u8] = &[20, 0, 0, 0, 20, 0, 1, 3, 3, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0];
        assert_eq!(dump_request(20, cmd::DEV_GET, 3).bytes, want);
        assert_eq!(dump_request(20, cmd::DEV_GET, 3).bytes, REQ_DEV_GET_DUMP);
        assert_eq!(dump_request(20, cmd::QUEUE_GET, 4).bytes, REQ_QUEUE_GET_DUMP);
        assert_eq!(dump_request(20, cmd::NAPI_GET, 5).bytes, REQ_NAPI_GET_DUMP);
    }

    #[test]
    fn decode_recorded_dev_dump() {
        let msgs = genl_messages(REPLY_DEV_GET_DUMP_0);
        // The parts carry no NLM_F_MULTI; the datagram ends with NLMSG_DONE.
        let raw = parse_messages(REPLY_DEV_GET_DUMP_0).unwrap();
        assert!(raw.iter().filter(|m| m.ty == 20).all(|m| m.flags & 0x2 == 0));
        assert_eq!(raw.last().unwrap().ty, crate::sys::netlink::NLMSG_DONE);
        let devs: Vec<DevInfo> = msgs.iter().map(|m| DevInfo::decode(m).unwrap()).collect();
        assert_eq!(devs.iter().map(|d| d.ifindex).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(devs[3].xdp_features, 0x2b);
        assert_eq!(devs[3].xdp_zc_max_segs, Some(1));
        assert_eq!(devs[0].xdp_features, 0);
    }

    #[test]
    fn decode_recorded_queue_and_napi_dumps() {
        let qs: Vec<QueueInfo> =
            genl_messages(REPLY_QUEUE_GET_DUMP_0).iter().map(|m| QueueInfo::decode(m).unwrap()).collect();
        let rows: Vec<(u32, u32, QueueType, Option<u32>)> =
            qs.iter().map(|q| (q.ifindex, q.id, q.ty, q.napi_id)).collect();
        assert_eq!(
            rows,
            vec![
                (1, 0, QueueType::Rx, None),
                (1, 0, QueueType::Tx, None),
                (4, 0, QueueType::Rx, Some(257)),
                (4, 0, QueueType::Tx, None),
            ]
        );
        assert!(qs.iter().all(|q| q.dmabuf.is_none()));
        let ns: Vec<NapiInfo> =
            genl_messages(REPLY_NAPI_GET_DUMP_0).iter().map(|m| NapiInfo::decode(m).unwrap()).collect();
        assert_eq!(ns.len(), 1);
        assert_eq!((ns[0].id, ns[0].ifindex, ns[0].threaded), (257, 4, Some(0)));
    }

    #[test]
    fn features_from_recorded_6_18() {
        let fam = Family::decode(&genl_messages(REPLY_GETFAMILY_NETDEV_0)[0]).unwrap();
        let pol = OpPolicy::decode(13, &genl_messages(REPLY_GETPOLICY_BIND_RX_0)).unwrap();
        let f = Features::from_family(&fam, Some(&pol));
        assert_eq!(
            f,
            Features {
                bind_rx: true,
                bind_rx_admin_perm: true,
                bind_tx: true,
                bind_tx_admin_perm: false,
                rx_page_size: Some(false),
                queue_create: false,
                page_pool_stats: false,
            }
        );
    }

    #[test]
    fn decode_bind_reply_id() {
        // A synthetic success reply: genl header + ID(4) = 3.
        let m = GenlMsg { cmd: 13, version: 1, attrs: vec![8, 0, 4, 0, 3, 0, 0, 0] };
        assert_eq!(decode_bind_reply(&[m]).unwrap(), 3);
        assert!(decode_bind_reply(&[]).is_err());
    }
}
