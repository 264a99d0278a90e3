//! The simulated kernel (`DEVCCL_DEVMEM=sim`): Linux 6.18's devmem TCP below the seam, with a
//! simulated devmem-capable NIC, for machines without one.
//!
//! The payload really travels over the caller's TCP sockets as ordinary bytes. What the
//! simulator adds is the NIC and the kernel's devmem bookkeeping, answering every seam call
//! with the bytes and errnos Linux 6.18 produces:
//!
//! * **Bindings** ([`SimKernel`]'s `bind_rx` / `bind_tx`): the fd (a dma-buf, or any mappable
//!   fd such as a memfd or a Vulkan export) is mapped `MAP_SHARED`; RX memory is carved into
//!   niovs ([`SimOptions::niov_size`]). Ids are global to the [`SimKernel`], cyclic from 1.
//!   Dropping the binding unbinds: the queues stop delivering into it, fragments already
//!   delivered stay valid until their tokens come back.
//! * **Steering** (`steer`): the socket's flow lands on RX queue `queue` of `ifindex`; while
//!   an RX binding is bound to that queue, the simulated NIC reads the flow's bytes from the
//!   socket straight into the pool at scattered, sub-page offsets (one vectored `recvmsg`
//!   per batch of packets: the one copy TCP makes), as fragments of simulated skbs; `recvmsg_devmem` reports them with the kernel's cmsgs and tokens. A flow
//!   that is not steered, or steered to a queue without a binding, gets ordinary data
//!   (bytes in `linear`, no cmsg), exactly as the kernel does. Bytes already waiting in the
//!   socket when it is steered arrived before the rule: they come out as ordinary data first.
//! * **Linear spills** ([`SimOptions::linear_spill`]): a packet that was "not header-split"
//!   starts an skb whose linear part carries its payload: copied into `linear`, reported with
//!   `SCM_DEVMEM_LINEAR`.
//! * **Pool exhaustion**: no free niov means the NIC cannot take the packet; `recvmsg_devmem`
//!   stops reading the socket (TCP back-pressure) and answers `WouldBlock` when it has nothing
//!   else to report (counted in [`SimStats::pool_exhausted`]).
//! * **TX**: `sendmsg_devmem` reads the ranges out of the TX mapping and writes them to the
//!   socket; completions follow the peer's acknowledgements and come out of `read_errqueue`
//!   with the kernel's `sock_extended_err` bytes, coalesced as the kernel coalesces them.
//!
//! Every rule the simulator reproduces names its kernel source next to the code (`rx.rs`,
//! `tx.rs`, `tokens.rs`, `bind.rs`). The simulator raises no `POLLIN` / `POLLERR` of its own:
//! readiness is the real socket's. `POLLIN` means bytes wait in the socket (or in the
//! simulated queue after a short call), so after a `WouldBlock` caused by pool exhaustion
//! the socket stays readable until tokens come back; completions never raise `POLLERR`, so
//! poll `read_errqueue` (until `WouldBlock`) before waiting for a TX buffer.
//!
//! Thread safety: one lock around the whole simulated kernel; every call takes it, does its
//! non-blocking system calls and returns. Calls for different sockets serialise.

mod bind;
mod mmap;
mod pool;
mod rng;
mod rx;
mod tokens;
mod tx;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::seam::{DevmemKernel, KernelBinding, KernelSteering};
use crate::sys::sock;

use pool::Pool;
use rng::{Rng, mix};
use tokens::TokenTable;

/// How the simulated NIC cuts payload into fragments (each at most one niov).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FragSizing {
    /// One fragment per MSS-sized packet ([`SimOptions::mss`] bytes), packed back to back into
    /// niovs: several fragments share a niov at sub-page offsets, and a fragment is cut where
    /// its niov ends.
    Mss,
    /// Whole niovs (hardware GRO into page-sized buffers): fragments of `niov_size` bytes.
    Page,
    /// A seeded mix per fragment: MSS-sized (1/2), a whole niov (1/4), a random size from 1 to
    /// `niov_size` (1/4), packed like [`FragSizing::Mss`].
    Mixed,
}

impl FromStr for FragSizing {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mss" => Ok(FragSizing::Mss),
            "page" => Ok(FragSizing::Page),
            "mixed" => Ok(FragSizing::Mixed),
            _ => Err(format!("fragment sizing {s:?}: expected mss, page or mixed")),
        }
    }
}

impl fmt::Display for FragSizing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FragSizing::Mss => "mss",
            FragSizing::Page => "page",
            FragSizing::Mixed => "mixed",
        })
    }
}

/// What the simulated NIC does with a packet when its RX pool has no free niov.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exhaustion {
    /// Leave it in the socket (a real NIC drops it and TCP retransmits): the flow stalls until
    /// tokens come back. What hardware does.
    Backpressure,
    /// Deliver it as a linear spill (`SCM_DEVMEM_LINEAR`) instead, so the flow never stalls.
    Linear,
}

impl FromStr for Exhaustion {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "backpressure" => Ok(Exhaustion::Backpressure),
            "linear" => Ok(Exhaustion::Linear),
            _ => Err(format!("exhaustion behaviour {s:?}: expected backpressure or linear")),
        }
    }
}

impl fmt::Display for Exhaustion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Exhaustion::Backpressure => "backpressure",
            Exhaustion::Linear => "linear",
        })
    }
}

/// Knobs of the simulated NIC. `DEVCCL_DEVMEM_SIM_*` variables map onto these fields
/// (`NIOV_SIZE`, `LINEAR_SPILL`, `FRAG_SIZING`, `MSS`, `SEED`, `ON_EXHAUSTION`, `RX_QUEUES`,
/// `REQUIRE_CAP_NET_ADMIN`, `MAX_FRAGS_PER_SKB`, `COMPLETE_ON_ACK`); [`FragSizing`] and
/// [`Exhaustion`] parse from their lower-case names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimOptions {
    /// Size of one niov (RX pool page): a power of two, at least 4096. 6.18 only has 4096
    /// (`PAGE_SIZE`); larger sizes model the post-6.18 `rx-page-size`. Default 4096.
    pub niov_size: u32,
    /// Fraction of packets, in `[0, 1]`, that arrive not header-split: their payload is copied
    /// into `linear` with an `SCM_DEVMEM_LINEAR` cmsg. 1.0 makes the whole stream linear.
    /// Default 0.02.
    pub linear_spill: f64,
    /// How payload is cut into fragments. Default [`FragSizing::Mixed`].
    pub frag_sizing: FragSizing,
    /// Packet payload size (spilled packets, [`FragSizing::Mss`]): 1 to `niov_size`. Default
    /// 1448 (Ethernet MTU 1500 with TCP timestamps).
    pub mss: u32,
    /// Seed of every random choice (niov order, fragment sizes, spills). Default `0x5eed`.
    pub seed: u64,
    /// Pool exhaustion behaviour. Default [`Exhaustion::Backpressure`].
    pub on_exhaustion: Exhaustion,
    /// RX queues of every simulated NIC (bind-rx on a queue id at or above this is `EINVAL`).
    /// Default 16.
    pub rx_queues: u32,
    /// Refuse `bind-rx` without `CAP_NET_ADMIN` (`EPERM`), as 6.18 does. Default false, so
    /// unprivileged CI can use the simulated NIC.
    pub require_cap_net_admin: bool,
    /// Most fragments per simulated skb (`MAX_SKB_FRAGS` is 17). Default 17.
    pub max_frags_per_skb: u32,
    /// Report a send complete only once the peer has acknowledged its bytes, as the kernel
    /// does (true), or at the next error-queue read (false). Default true.
    pub complete_on_ack: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            niov_size: 4096,
            linear_spill: 0.02,
            frag_sizing: FragSizing::Mixed,
            mss: 1448,
            seed: 0x5eed,
            on_exhaustion: Exhaustion::Backpressure,
            rx_queues: 16,
            require_cap_net_admin: false,
            max_frags_per_skb: 17,
            complete_on_ack: true,
        }
    }
}

impl SimOptions {
    /// Check the ranges documented on each field.
    pub fn validate(&self) -> Result<()> {
        if !self.niov_size.is_power_of_two() || self.niov_size < 4096 {
            return Err(Error::invalid(format!(
                "simulated niov size {} is not a power of two of at least 4096",
                self.niov_size
            )));
        }
        if !(0.0..=1.0).contains(&self.linear_spill) {
            return Err(Error::invalid(format!("linear spill fraction {} is not within [0, 1]", self.linear_spill)));
        }
        if self.mss == 0 || self.mss > self.niov_size {
            return Err(Error::invalid(format!("simulated MSS {} is not within 1..={}", self.mss, self.niov_size)));
        }
        if self.rx_queues == 0 {
            return Err(Error::invalid("a simulated NIC needs at least one RX queue"));
        }
        if !(1..=64).contains(&self.max_frags_per_skb) {
            return Err(Error::invalid(format!("{} fragments per skb is not within 1..=64", self.max_frags_per_skb)));
        }
        Ok(())
    }
}

/// Counters of one simulated kernel, since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SimStats {
    /// Live RX bindings.
    pub bindings_rx: u64,
    /// Live TX bindings.
    pub bindings_tx: u64,
    /// `recvmsg_devmem` calls.
    pub rx_calls: u64,
    /// `SCM_DEVMEM_DMABUF` fragments reported.
    pub rx_frags: u64,
    /// Bytes reported in those fragments.
    pub rx_frag_bytes: u64,
    /// `SCM_DEVMEM_LINEAR` cmsgs reported (linear spills).
    pub rx_linear_spills: u64,
    /// Bytes copied into `linear` by those spills.
    pub rx_linear_bytes: u64,
    /// Bytes delivered as ordinary data (flow not steered to a bound queue).
    pub rx_ordinary_bytes: u64,
    /// Calls answered `ETOOSMALL`.
    pub rx_etoosmall: u64,
    /// Times the simulated NIC had data to place and no free niov.
    pub pool_exhausted: u64,
    /// Tokens handed out.
    pub tokens_issued: u64,
    /// Tokens returned with `SO_DEVMEM_DONTNEED`.
    pub tokens_returned: u64,
    /// Tokens released because their socket closed.
    pub tokens_released_on_close: u64,
    /// Tokens handed out and not (yet) returned or released.
    pub tokens_outstanding: u64,
    /// `SO_DEVMEM_DONTNEED` calls that reached the token table.
    pub dontneed_calls: u64,
    /// Token numbers those calls looked at and found nothing for (unknown, or freed twice).
    pub dontneed_unknown: u64,
    /// Successful `sendmsg_devmem` calls (each is one zerocopy sequence number).
    pub tx_sends: u64,
    /// Bytes they sent.
    pub tx_bytes: u64,
    /// Sends reported complete.
    pub tx_completed: u64,
    /// Completion messages read from error queues.
    pub tx_notifications: u64,
    /// niovs in all RX pools (bound or draining).
    pub niovs_total: u64,
    /// Of those, free (nothing but the simulated NIC references them).
    pub niovs_free: u64,
}

/// One RX pool, for tests and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolSnapshot {
    /// Binding id.
    pub id: u32,
    pub ifindex: u32,
    pub queues: Vec<u32>,
    pub niov_size: usize,
    pub niovs: usize,
    pub free_niovs: usize,
    /// False once the binding was dropped (the pool drains).
    pub bound: bool,
}

/// One socket as the simulator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SocketSnapshot {
    /// Tokens handed out and not returned.
    pub tokens_held: usize,
    /// Bytes the simulated NIC took from the socket and not yet reported.
    pub queued_bytes: usize,
    /// `(ifindex, queue)` the flow is steered to.
    pub steered: Option<(u32, u32)>,
    /// Zerocopy sends not yet reported complete.
    pub sends_in_flight: usize,
}

/// A simulated skb: linear part (a spilled packet's payload) then fragments in device memory.
#[derive(Debug, Default)]
pub(crate) struct Skb {
    pub(crate) head: Vec<u8>,
    pub(crate) frags: Vec<Frag>,
    pub(crate) len: usize,
}

/// A fragment: `len` bytes at `off` in niov `niov` of pool `pool`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Frag {
    pub(crate) pool: u64,
    pub(crate) niov: u32,
    pub(crate) off: u32,
    pub(crate) len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Steer {
    pub(crate) ifindex: u32,
    pub(crate) queue: u32,
    pub(crate) generation: u64,
}

/// Per-socket state (keyed by the socket's `SO_COOKIE`).
#[derive(Debug)]
pub(crate) struct SockState {
    pub(crate) fd: RawFd,
    pub(crate) steer: Option<Steer>,
    /// Ordinary bytes still to deliver (they were in the socket before it was steered).
    pub(crate) ordinary_left: usize,
    pub(crate) rxq: VecDeque<Skb>,
    /// Bytes of the first skb already reported.
    pub(crate) head_off: usize,
    /// Spill decision drawn for the next packet and not used yet.
    pub(crate) next_spill: Option<bool>,
    pub(crate) rng: Rng,
    /// A socket error met while the queue still held data: reported once it is empty.
    pub(crate) pending_err: Option<i32>,
    pub(crate) tokens: TokenTable,
    /// Next zerocopy sequence number.
    pub(crate) zc_next: u32,
    /// Sends not yet complete: (sequence number, stream position that completes it).
    pub(crate) zc_pending: VecDeque<(u32, u64)>,
    /// Completion ranges waiting on the error queue.
    pub(crate) errq: VecDeque<(u32, u32)>,
    pub(crate) route_ifindex: Option<u32>,
}

impl SockState {
    fn new(fd: RawFd, seed: u64) -> Self {
        SockState {
            fd,
            steer: None,
            ordinary_left: 0,
            rxq: VecDeque::new(),
            head_off: 0,
            next_spill: None,
            rng: Rng::new(seed),
            pending_err: None,
            tokens: TokenTable::new(),
            zc_next: 0,
            zc_pending: VecDeque::new(),
            errq: VecDeque::new(),
            route_ifindex: None,
        }
    }

    pub(crate) fn queued_bytes(&self) -> usize {
        self.rxq.iter().map(|s| s.len).sum::<usize>() - self.head_off
    }
}

/// What a binding id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bound {
    /// RX pool (key into `State::pools`).
    Rx(u64),
    /// TX buffer (key into `State::tx`).
    Tx(u64),
}

/// A TX binding's buffer.
#[derive(Debug)]
pub(crate) struct TxBuf {
    pub(crate) ifindex: u32,
    pub(crate) map: mmap::Mapping,
}

/// The whole simulated kernel.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// `id_alloc_next` of the bindings xarray.
    pub(crate) next_id: u32,
    /// Live binding ids.
    pub(crate) ids: BTreeMap<u32, Bound>,
    pub(crate) pools: HashMap<u64, Pool>,
    pub(crate) tx: HashMap<u64, TxBuf>,
    next_key: u64,
    /// RX queue -> pool key.
    pub(crate) queue_owner: HashMap<(u32, u32), u64>,
    pub(crate) socks: HashMap<u64, SockState>,
    fd_cookie: HashMap<RawFd, u64>,
    socks_seen: u64,
    pub(crate) steer_generation: u64,
    pub(crate) stats: SimStats,
}

impl State {
    pub(crate) fn new_key(&mut self) -> u64 {
        self.next_key += 1;
        self.next_key
    }

    /// The state of socket `fd`, created on first use. A different socket than last time on
    /// the same fd number means the old one was closed without `close_socket`: its tokens are
    /// released as the kernel releases them on close.
    pub(crate) fn sock(&mut self, fd: BorrowedFd<'_>, seed: u64) -> io::Result<(u64, &mut SockState)> {
        let cookie = sock::socket_cookie(fd)?;
        let raw = fd.as_raw_fd();
        if let Some(old) = self.fd_cookie.insert(raw, cookie)
            && old != cookie
        {
            self.release_socket(old);
        }
        if !self.socks.contains_key(&cookie) {
            self.socks_seen += 1;
            let s = SockState::new(raw, seed ^ mix(self.socks_seen));
            self.socks.insert(cookie, s);
        }
        Ok((cookie, self.socks.get_mut(&cookie).expect("just inserted")))
    }

    /// The state of socket `fd` if the simulator knows it (never creates one).
    pub(crate) fn known_sock(&mut self, fd: BorrowedFd<'_>) -> io::Result<Option<&mut SockState>> {
        let cookie = sock::socket_cookie(fd)?;
        Ok(self.socks.get_mut(&cookie))
    }

    /// Forget a socket: its tokens and queued fragments let go of their niovs.
    pub(crate) fn release_socket(&mut self, cookie: u64) {
        let Some(mut s) = self.socks.remove(&cookie) else {
            return;
        };
        if self.fd_cookie.get(&s.fd) == Some(&cookie) {
            self.fd_cookie.remove(&s.fd);
        }
        let pinned = s.tokens.drain();
        self.stats.tokens_released_on_close += pinned.len() as u64;
        for p in pinned {
            if let Some(pool) = self.pools.get_mut(&p.pool) {
                pool.put(p.niov);
            }
        }
        for skb in s.rxq.drain(..) {
            rx::drop_skb(&mut self.pools, &skb);
        }
        self.gc_pools();
    }

    /// Free the memory of unbound pools nothing references any more.
    pub(crate) fn gc_pools(&mut self) {
        self.pools.retain(|_, p| !p.drained());
    }

    fn snapshot(&self) -> SimStats {
        let mut s = self.stats;
        s.bindings_rx = self.ids.values().filter(|b| matches!(b, Bound::Rx(_))).count() as u64;
        s.bindings_tx = self.ids.values().filter(|b| matches!(b, Bound::Tx(_))).count() as u64;
        s.tokens_outstanding = s.tokens_issued - s.tokens_returned - s.tokens_released_on_close;
        s.niovs_total = self.pools.values().map(|p| p.niovs() as u64).sum();
        s.niovs_free = self.pools.values().map(|p| p.free_niovs() as u64).sum();
        s
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) opts: SimOptions,
    state: Mutex<State>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The simulated kernel. Cheap to clone (all clones are the same kernel).
#[derive(Debug, Clone)]
pub struct SimKernel {
    shared: Arc<Shared>,
}

static GLOBAL: OnceLock<SimKernel> = OnceLock::new();

impl SimKernel {
    /// A simulated kernel of its own (binding ids from 1, its own counters): for tests.
    pub fn new(opts: SimOptions) -> Result<Self> {
        opts.validate()?;
        Ok(SimKernel { shared: Arc::new(Shared { opts, state: Mutex::new(State::default()) }) })
    }

    /// The process-wide simulated kernel (what the transport uses with `DEVCCL_DEVMEM=sim`):
    /// made with [`SimOptions::default`] unless [`SimKernel::init_global`] came first.
    pub fn global() -> SimKernel {
        GLOBAL.get_or_init(|| SimKernel::new(SimOptions::default()).expect("default options are valid")).clone()
    }

    /// Create the process-wide simulated kernel with `opts`. Calling it again with the same
    /// options returns the same kernel; with other options, or after [`SimKernel::global`]
    /// made it with other options, it is an [`Error::InvalidUsage`].
    pub fn init_global(opts: SimOptions) -> Result<SimKernel> {
        opts.validate()?;
        let k = GLOBAL.get_or_init(|| SimKernel::new(opts.clone()).expect("validated"));
        if k.shared.opts != opts {
            return Err(Error::invalid(format!(
                "the process-wide simulated kernel already runs with {:?}, not {opts:?}",
                k.shared.opts
            )));
        }
        Ok(k.clone())
    }

    /// The options it runs with.
    pub fn options(&self) -> &SimOptions {
        &self.shared.opts
    }

    /// Counters so far ("every token returned": `tokens_outstanding == 0` and
    /// `niovs_free == niovs_total`).
    pub fn stats(&self) -> SimStats {
        self.shared.lock().snapshot()
    }

    /// Every RX pool, bound or draining.
    pub fn pools(&self) -> Vec<PoolSnapshot> {
        let st = self.shared.lock();
        let mut v: Vec<PoolSnapshot> = st
            .pools
            .values()
            .map(|p| PoolSnapshot {
                id: p.id,
                ifindex: p.ifindex,
                queues: p.queues.clone(),
                niov_size: p.niov_size,
                niovs: p.niovs(),
                free_niovs: p.free_niovs(),
                bound: p.bound,
            })
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }

    /// What the simulator holds for socket `sock` (`None`: it never saw it).
    pub fn socket(&self, sock: BorrowedFd<'_>) -> Option<SocketSnapshot> {
        let mut st = self.shared.lock();
        let s = st.known_sock(sock).ok()??;
        Some(SocketSnapshot {
            tokens_held: s.tokens.len(),
            queued_bytes: s.queued_bytes(),
            steered: s.steer.map(|x| (x.ifindex, x.queue)),
            sends_in_flight: s.zc_pending.len(),
        })
    }
}

/// A simulated binding; dropping it unbinds.
#[derive(Debug)]
pub struct SimBinding {
    id: u32,
    shared: Arc<Shared>,
}

impl KernelBinding for SimBinding {
    fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for SimBinding {
    fn drop(&mut self) {
        bind::unbind(&mut self.shared.lock(), self.id);
    }
}

/// A simulated steering rule; dropping it removes it.
#[derive(Debug)]
pub struct SimSteering {
    cookie: u64,
    generation: u64,
    desc: String,
    shared: Arc<Shared>,
}

impl KernelSteering for SimSteering {
    fn describe(&self) -> String {
        self.desc.clone()
    }
}

impl Drop for SimSteering {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if let Some(s) = st.socks.get_mut(&self.cookie)
            && s.steer.is_some_and(|x| x.generation == self.generation)
        {
            s.steer = None;
        }
    }
}

impl DevmemKernel for SimKernel {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn bind_rx(&self, ifindex: u32, fd: BorrowedFd<'_>, queues: &[u32]) -> Result<Box<dyn KernelBinding>> {
        let id = bind::bind_rx(&self.shared, ifindex, fd, queues)?;
        Ok(Box::new(SimBinding { id, shared: self.shared.clone() }))
    }

    fn bind_tx(&self, ifindex: u32, fd: BorrowedFd<'_>) -> Result<Box<dyn KernelBinding>> {
        let id = bind::bind_tx(&self.shared, ifindex, fd)?;
        Ok(Box::new(SimBinding { id, shared: self.shared.clone() }))
    }

    fn steer(&self, ifindex: u32, sock: BorrowedFd<'_>, queue: u32) -> Result<Box<dyn KernelSteering>> {
        let (cookie, generation, desc) = bind::steer(&self.shared, ifindex, sock, queue)?;
        Ok(Box::new(SimSteering { cookie, generation, desc, shared: self.shared.clone() }))
    }

    fn recvmsg_devmem(&self, sock: BorrowedFd<'_>, linear: &mut [u8], ctl: &mut [u8]) -> io::Result<(usize, usize)> {
        rx::recvmsg(&self.shared, sock, linear, ctl)
    }

    fn dontneed(&self, sock: BorrowedFd<'_>, tokens: &[u8]) -> io::Result<u32> {
        rx::dontneed(&self.shared, sock, tokens)
    }

    fn sendmsg_devmem(&self, sock: BorrowedFd<'_>, binding: u32, ranges: &[(u64, usize)]) -> io::Result<usize> {
        tx::sendmsg(&self.shared, sock, binding, ranges)
    }

    fn read_errqueue(&self, sock: BorrowedFd<'_>, control: &mut [u8]) -> io::Result<usize> {
        tx::read_errqueue(&self.shared, sock, control)
    }

    fn close_socket(&self, sock: BorrowedFd<'_>) {
        let mut st = self.shared.lock();
        if let Ok(cookie) = sock::socket_cookie(sock) {
            st.release_socket(cookie);
        }
    }
}
