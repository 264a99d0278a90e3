//! The devmem transport: devccl's [`Transport`] over device-memory TCP.
//!
//! A devmem connection *is* a TCP connection: the sockets are opened, authenticated and
//! handed over by transport-tcp's listener and handshake ([`TcpTransport`] with
//! `kind = Devmem`); lane 0 becomes the control socket, the others the data sockets (see
//! [`conn`](self::conn) for the data path). Below, every kernel call goes through one seam,
//! [`DevmemKernel`]: the real kernel (`DEVCCL_DEVMEM=real`) or the simulated one
//! (`DEVCCL_DEVMEM=sim`). The logic here exists once and runs unchanged on either.
//!
//! Per process (and NIC): one RX pool, an exportable allocation on the pool's device, bound
//! once to the NIC's RX queues for the transport's life ([`DevmemTransport::new`] refuses,
//! with the kernel's classified answer, when it cannot be bound). Each connection's data
//! sockets are steered to the bound queues. TX bindings are made lazily, one per allocation
//! sent from.
#![forbid(unsafe_code)]

pub mod conn;
pub mod counters;
mod pool;
mod tx;

use std::fmt;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use devccl_core::config::{DevmemConfig, DevmemKernelKind, SimConfig};
use devccl_core::device::Device;
use devccl_core::memory::Region;
use devccl_core::transport::{CommContext, Connection, Endpoint, LinkProperties, Transport, TransportKind};
use devccl_core::{Error, Rank, Result};
use devccl_transport_tcp::{Lanes, TcpOptions, TcpTransport, link_speed_mbps};

pub use self::conn::{DevmemConnection, MAX_INFLIGHT};
pub use self::counters::{Counters, process_counters};
use self::pool::RxPool;
use self::tx::TxCache;
use crate::probe::Verdict;
use crate::seam::DevmemKernel;
use crate::sim::{SimKernel, SimOptions};
use crate::sys::iface;

/// One-way small-message latency estimate for the cost model, in microseconds: a devmem
/// message costs a control write and a data write, a little more than TCP's one.
pub const LATENCY_ESTIMATE_US: f64 = 8.0;

/// The most data sockets per connection (the control socket is one more lane).
pub const MAX_DATA_LANES: usize = 16;

/// How a [`DevmemTransport`] is set up.
#[derive(Debug, Clone)]
pub struct DevmemOptions {
    /// Listener and handshake settings (address, rank, timeouts). `lanes` is the number of
    /// *data* sockets per connection; the control socket comes on top. `kind` is set to
    /// devmem.
    pub tcp: TcpOptions,
    /// The kernel below the seam.
    pub kernel: Arc<dyn DevmemKernel>,
    /// The RX pool's device.
    pub pool_device: Arc<dyn Device>,
    /// The RX pool's size in bytes.
    pub pool_bytes: usize,
    /// Interface whose RX queues the pool is bound to.
    pub ifname: String,
    /// RX queues to bind (and to steer the data sockets to, round robin).
    pub queues: Vec<u32>,
    /// How long a receive may wait for a full pool before it fails naming the pool.
    pub stall_limit: Duration,
}

/// Why devmem cannot serve (the registry falls back to the next transport and logs this).
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The probe's reading of the kernel's answer, where it was the kernel that refused.
    pub verdict: Option<Verdict>,
    /// One line: what failed, the kernel's answer, and the fix.
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// State the transport shares with its connections.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) kernel: Arc<dyn DevmemKernel>,
    pub(crate) pool: Arc<RxPool>,
    pub(crate) tx: TxCache,
    pub(crate) counters: Arc<Counters>,
    pub(crate) host: Arc<dyn Device>,
    pub(crate) stall_limit: Duration,
    fallback_logged: AtomicBool,
    steer_logged: AtomicBool,
    staging: Mutex<Vec<Region>>,
}

impl Shared {
    /// Log once why a send goes as ordinary bytes.
    pub(crate) fn note_fallback(&self, why: &str) {
        if !self.fallback_logged.swap(true, Ordering::Relaxed) {
            tracing::info!("devmem TX: some sends go as ordinary bytes on the data sockets: {why}");
        }
    }

    /// Count an ordinary-byte send (`first`: its first write).
    pub(crate) fn count_fallback(&self, first: bool, bytes: usize) {
        if first {
            counters::add(&self.counters, |c| &c.tx_fallback_sends, 1);
        }
        counters::add(&self.counters, |c| &c.tx_fallback_bytes, bytes as u64);
    }

    /// Host staging of the pool's device for a device-memory send that cannot go zero-copy.
    pub(crate) fn take_staging(&self, len: usize) -> Result<Region> {
        let mut g = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = (0..g.len()).filter(|&i| g[i].len() >= len).min_by_key(|&i| g[i].len()) {
            return Ok(g.swap_remove(i));
        }
        drop(g);
        self.pool.device.alloc_staging(len.max(4096))
    }

    pub(crate) fn give_staging(&self, r: Region) {
        let mut g = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        if g.len() < 16 {
            g.push(r);
        }
    }
}

/// The devmem transport (see the module docs).
#[derive(Debug)]
pub struct DevmemTransport {
    tcp: TcpTransport,
    sh: Arc<Shared>,
    data_lanes: usize,
}

impl DevmemTransport {
    /// Allocate and bind the RX pool, probe TX binding, and listen. A pool that cannot be
    /// allocated or bound is a [`Refusal`] with the kernel's answer, classified.
    pub fn new(opts: DevmemOptions) -> std::result::Result<DevmemTransport, Refusal> {
        let refuse = |verdict, reason: String| Refusal { verdict, reason };
        let kernel = opts.kernel.clone();
        let dev = opts.pool_device.clone();
        if opts.queues.is_empty() {
            return Err(refuse(None, "devmem: no RX queue to bind (DEVCCL_DEVMEM_QUEUES)".into()));
        }
        let data_lanes = opts.tcp.lanes.clamp(1, MAX_DATA_LANES);
        let ifname = opts.ifname.clone();
        let ifindex = iface::if_nametoindex(&ifname).ok_or_else(|| {
            refuse(
                Some(Verdict::NoSuchInterface),
                format!("devmem: there is no interface {ifname} to bind the RX pool to"),
            )
        })?;
        let pool = pool::bind(&kernel, &dev, opts.pool_bytes, &ifname, ifindex, &opts.queues)?;
        let note = pool::export_note(pool.exported.kind, &*dev);
        let pool_len = pool.len();
        let counters = Arc::new(Counters::default());
        let tx = TxCache::new(kernel.clone(), ifindex, counters.clone());
        // Can this kernel bind memory of the pool's device for TX? (Else every send goes as
        // ordinary bytes, device memory through host staging.)
        match dev.alloc_exportable(4096) {
            Ok((_probe_region, probe_fd)) => match kernel.bind_tx(ifindex, probe_fd.fd.as_fd()) {
                Ok(b) => tracing::debug!(id = b.id(), "devmem TX binding works on {ifname}"),
                Err(e) => tx.refuse(&format!("the {} kernel refused bind-tx on {ifname}: {e}", kernel.name())),
            },
            Err(e) => tracing::debug!("devmem TX probe: {e}"),
        }
        let sh = Arc::new(Shared {
            kernel: kernel.clone(),
            pool,
            tx,
            counters,
            host: devccl_core::device::host(),
            stall_limit: opts.stall_limit,
            fallback_logged: AtomicBool::new(false),
            steer_logged: AtomicBool::new(false),
            staging: Mutex::new(Vec::new()),
        });
        let mut topts = opts.tcp.clone();
        topts.kind = TransportKind::Devmem;
        topts.lanes = data_lanes + 1;
        let tcp = TcpTransport::new(topts).map_err(|e| refuse(None, format!("devmem: cannot listen: {e}")))?;
        tracing::info!(
            kernel = kernel.name(),
            pool = %dev.describe(),
            pool_bytes = pool_len,
            binding = sh.pool.id(),
            interface = %ifname,
            queues = ?sh.pool.queues,
            tx = %sh.tx.refused().map_or("zero-copy".to_string(), |w| format!("ordinary bytes ({w})")),
            endpoint = %tcp.local_addr(),
            "devmem transport ready: RX pool bound ({note})"
        );
        Ok(DevmemTransport { tcp, sh, data_lanes })
    }

    /// The RX pool's device.
    pub fn pool_device(&self) -> &Arc<dyn Device> {
        &self.sh.pool.device
    }

    /// The RX pool's size.
    pub fn pool_bytes(&self) -> usize {
        self.sh.pool.len()
    }

    /// The RX pool's binding id.
    pub fn pool_binding(&self) -> u32 {
        self.sh.pool.id()
    }

    /// The kernel below the seam (`real` or `sim`).
    pub fn kernel_name(&self) -> &'static str {
        self.sh.kernel.name()
    }

    /// Why sends go as ordinary bytes, when the kernel refused TX binding.
    pub fn tx_refused(&self) -> Option<String> {
        self.sh.tx.refused().map(|s| s.to_string())
    }

    /// TX bindings alive (allocations sent from zero-copy whose memory still exists).
    pub fn tx_bindings(&self) -> usize {
        self.sh.tx.purge();
        self.sh.tx.len()
    }

    /// This transport's counters.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        self.sh.counters.snapshot()
    }

    /// Steer the data sockets and build the connection (which waits for the peer's steering
    /// before it sends payload).
    fn establish(&self, lanes: Lanes) -> Result<Box<dyn Connection>> {
        let Lanes { me, peer, remote, mut socks } = lanes;
        if socks.len() < 2 {
            return Err(Error::remote(peer, format!("rank {peer}'s devmem connection has no data socket")));
        }
        let ctrl = socks.remove(0);
        let sh = &self.sh;
        let mut steering = Vec::with_capacity(socks.len());
        for (i, s) in socks.iter().enumerate() {
            sh.kernel
                .setup_socket(s.as_fd())
                .map_err(|e| Error::system(format!("prepare devmem data socket {i} to rank {peer} ({remote})"), e))?;
            let q = sh.pool.queues[i % sh.pool.queues.len()];
            match sh.kernel.steer(sh.pool.ifindex, s.as_fd(), q) {
                Ok(st) => {
                    counters::add(&sh.counters, |c| &c.steered_sockets, 1);
                    tracing::debug!(%peer, lane = i, "devmem steering: {}", st.describe());
                    steering.push(st);
                }
                Err(e) => {
                    counters::add(&sh.counters, |c| &c.steering_refusals, 1);
                    if !sh.steer_logged.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            %peer,
                            "devmem: a data socket could not be steered to queue {q} of {}: {e}; its payload arrives \
                             as ordinary bytes (counted as rx_unsteered_bytes)",
                            sh.pool.ifname
                        );
                    }
                }
            }
        }
        // Both ends steer their flows before any payload leaves: the connection's first
        // control bytes say "steered", and no payload is sent before the peer's arrived
        // (waiting here instead could deadlock: the peer may be connecting elsewhere first).
        Ok(Box::new(DevmemConnection::new(me, peer, remote, self.sh.clone(), ctrl, socks, steering)?))
    }
}

impl Transport for DevmemTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Devmem
    }

    fn endpoint(&self) -> Endpoint {
        let mut e = self.tcp.endpoint();
        e.kind = TransportKind::Devmem;
        e.caps.retain(|(k, _)| k != "lanes");
        e.caps.extend([
            ("lanes".to_string(), self.data_lanes.to_string()),
            ("kernel".into(), self.kernel_name().into()),
            ("pool".into(), self.sh.pool.device.id().to_string()),
            ("pool_bytes".into(), self.pool_bytes().to_string()),
            ("tx".into(), if self.sh.tx.refused().is_some() { "bytes" } else { "zerocopy" }.into()),
        ]);
        e
    }

    fn properties(&self) -> LinkProperties {
        let ifname = self.tcp.ifname();
        LinkProperties {
            name: format!(
                "devmem ({} kernel) {ifname} {} lanes, {} MiB RX pool on {}",
                self.kernel_name(),
                self.data_lanes,
                self.pool_bytes() >> 20,
                self.sh.pool.device.id()
            ),
            speed_mbps: link_speed_mbps(ifname),
            latency_us: LATENCY_ESTIMATE_US,
            max_inflight: MAX_INFLIGHT,
            lanes: self.data_lanes,
            scattered_rx: true,
            device_memory: true,
        }
    }

    fn activate(&self, ctx: CommContext) -> Result<()> {
        self.tcp.activate(ctx)
    }

    fn connect(&self, peer: Rank, remote: &Endpoint, deadline: Instant) -> Result<Box<dyn Connection>> {
        let lanes = self.tcp.connect_lanes(peer, remote, deadline)?;
        self.establish(lanes)
    }

    fn accept(&self, peer: Rank, deadline: Instant) -> Result<Box<dyn Connection>> {
        let lanes = self.tcp.accept_lanes(peer, deadline)?;
        self.establish(lanes)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.sh.tx.purge();
        let mut v = self.sh.counters.snapshot();
        v.push(("rejected_handshakes", self.tcp.rejected_handshakes()));
        v
    }

    fn close(&self) {
        self.tcp.close();
    }
}

/// The kernel `cfg` selects, one per process: the running one (its `netdev` family must
/// resolve) or the process-wide simulated one, made with `cfg`'s knobs.
pub fn open_kernel(cfg: &DevmemConfig) -> std::result::Result<Arc<dyn DevmemKernel>, Refusal> {
    static REAL: OnceLock<std::result::Result<Arc<dyn DevmemKernel>, String>> = OnceLock::new();
    static SIM: Mutex<Option<Arc<dyn DevmemKernel>>> = Mutex::new(None);
    match cfg.kernel {
        DevmemKernelKind::Real => {
            let k = REAL.get_or_init(|| match crate::seam::real::RealKernel::open() {
                Ok(k) => Ok(Arc::new(k) as Arc<dyn DevmemKernel>),
                Err(e) => Err(e.to_string()),
            });
            k.clone().map_err(|e| Refusal {
                verdict: Some(Verdict::KernelWithoutDevmem),
                reason: format!(
                    "devmem (real kernel): {} [{e}] (fix: {})",
                    Verdict::KernelWithoutDevmem.reason(),
                    Verdict::KernelWithoutDevmem.fix()
                ),
            })
        }
        DevmemKernelKind::Sim => {
            let opts = sim_options(&cfg.sim)
                .map_err(|e| Refusal { verdict: None, reason: format!("devmem (simulated kernel): {e}") })?;
            let mut g = SIM.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(k) = g.as_ref() {
                return Ok(k.clone());
            }
            let k = SimKernel::init_global(opts)
                .map_err(|e| Refusal { verdict: None, reason: format!("devmem (simulated kernel): {e}") })?;
            let k: Arc<dyn DevmemKernel> = Arc::new(k);
            *g = Some(k.clone());
            Ok(k)
        }
    }
}

/// The simulated kernel's options from `DEVCCL_DEVMEM_SIM_*` (the simulator's defaults for
/// what is not set).
pub fn sim_options(c: &SimConfig) -> crate::Result<SimOptions> {
    let d = SimOptions::default();
    let word = |v: &Option<String>| v.as_deref().map(str::to_owned);
    let o = SimOptions {
        niov_size: c.niov_size.unwrap_or(d.niov_size),
        linear_spill: c.linear_spill.unwrap_or(d.linear_spill),
        frag_sizing: match word(&c.frag_sizing) {
            Some(v) => v.parse().map_err(|e: String| crate::Error::InvalidUsage { what: e })?,
            None => d.frag_sizing,
        },
        mss: c.mss.unwrap_or(d.mss),
        seed: c.seed.unwrap_or(d.seed),
        on_exhaustion: match word(&c.on_exhaustion) {
            Some(v) => v.parse().map_err(|e: String| crate::Error::InvalidUsage { what: e })?,
            None => d.on_exhaustion,
        },
        rx_queues: c.rx_queues.unwrap_or(d.rx_queues),
        require_cap_net_admin: c.require_cap_net_admin.unwrap_or(d.require_cap_net_admin),
        max_frags_per_skb: c.max_frags_per_skb.unwrap_or(d.max_frags_per_skb),
        complete_on_ack: c.complete_on_ack.unwrap_or(d.complete_on_ack),
    };
    o.validate()?;
    Ok(o)
}

/// The RX pool size when `DEVCCL_DEVMEM_POOL_BYTES` does not say: the largest TCP receive
/// window (`net.ipv4.tcp_rmem`'s maximum) times the data sockets of all `world - 1` peers,
/// plus 4 MiB (a ring's worth of buffers) per bound queue; at least 16 MiB, at most 1 GiB,
/// rounded up to whole 2 MiB (a GPU's allocation granularity).
pub fn default_pool_bytes(world: usize, data_lanes: usize, queues: usize) -> usize {
    let rmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse::<usize>().ok()))
        .unwrap_or(6 << 20);
    let want = rmem * data_lanes.max(1) * world.saturating_sub(1).max(1) + (4 << 20) * queues.max(1);
    want.clamp(16 << 20, 1 << 30).next_multiple_of(2 << 20)
}

/// The RX queues to bind by default: the interface's last RX queue (ordinary traffic is
/// kept on the others with `ethtool -X <if> equal N`), queue 0 when sysfs does not say.
pub fn default_queues(ifname: &str) -> Vec<u32> {
    let n = std::fs::read_dir(format!("/sys/class/net/{ifname}/queues"))
        .map(|rd| rd.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("rx-")).count())
        .unwrap_or(0);
    vec![n.saturating_sub(1) as u32]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_sizes() {
        let one = default_pool_bytes(2, 2, 1);
        assert!(one >= 16 << 20 && one.is_multiple_of(2 << 20), "{one}");
        assert!(default_pool_bytes(64, 16, 4) <= 1 << 30);
        assert_eq!(default_queues("lo"), vec![0]);
        assert_eq!(default_queues("nosuchif0"), vec![0]);
    }
}
