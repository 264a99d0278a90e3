//! The transport registry: which transports this process offers, and which one serves each
//! peer. The only module that names concrete transports; algorithms never do.
//!
//! Order of preference comes from `DEVCCL_TRANSPORTS` (default devmem, shm, tcp). A transport
//! that cannot serve declines with a reason; the reasons are logged at `info` once per
//! communicator (like NCCL_DEBUG=INFO's "NET/..." lines) and the choice per peer is logged too.
//! A declined devmem transport still publishes a placeholder endpoint carrying its reason, so
//! that each peer can say in its per-pair line why devmem is not used between them.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use devccl_core::config::Config;
use devccl_core::memory::DeviceId;
use devccl_core::transport::{Endpoint, Transport, TransportKind};
use devccl_core::{Error, Rank, Result};
use devccl_transport_devmem::transport::{DevmemOptions, DevmemTransport, Refusal};
use devccl_transport_shm::{DEFAULT_RING_BYTES, ShmOptions, ShmTransport, ring_for_world};
use devccl_transport_tcp::{TcpOptions, TcpTransport, select_address};

/// A transport that was not created, and why.
#[derive(Debug, Clone)]
pub struct Decline {
    /// Which.
    pub kind: TransportKind,
    /// Why (with the fix where there is one).
    pub reason: String,
}

/// Transports offered by this process.
#[derive(Debug, Default)]
pub struct Offer {
    /// Created transports, in preference order.
    pub transports: Vec<Arc<dyn Transport>>,
    /// Declined ones.
    pub declined: Vec<Decline>,
}

/// The capability a declined transport's placeholder endpoint carries (its reason), so that
/// peers can say, per pair, why devmem is not used.
pub const DECLINED: &str = "declined";

impl Offer {
    /// What to publish through the rendezvous: the created transports' endpoints, then a
    /// placeholder per declined devmem transport carrying the reason (never connected to).
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let mut v: Vec<Endpoint> = self.transports.iter().map(|t| t.endpoint()).collect();
        for d in self.declined.iter().filter(|d| d.kind == TransportKind::Devmem) {
            v.push(Endpoint { kind: d.kind, address: String::new(), caps: vec![(DECLINED.into(), d.reason.clone())] });
        }
        v
    }
}

/// The devmem transport `cfg` asks for, or why it cannot serve: the kernel (real or
/// simulated), the RX pool's device (`DEVCCL_DEVMEM_POOL`, else cuda:0 when a CUDA device
/// opens, else the host), its size and queues, the interface the data sockets use.
fn devmem(
    cfg: &Config,
    rank: Rank,
    world: usize,
    toward: Option<SocketAddr>,
) -> std::result::Result<DevmemTransport, Refusal> {
    let refuse = |reason: String| Refusal { verdict: None, reason };
    let d = &cfg.devmem;
    let kernel = devccl_transport_devmem::transport::open_kernel(d)?;
    let (addr, data_if) = select_address(cfg.socket_ifname.as_deref(), cfg.socket_family, toward)
        .map_err(|e| refuse(format!("devmem: no address for the data sockets: {e}")))?;
    let ifname = d.ifname.clone().unwrap_or_else(|| data_if.clone());
    let pool_id = match d.pool {
        Some(id) => id,
        None if devccl_device::open(DeviceId::Cuda(0)).is_ok() => DeviceId::Cuda(0),
        None => DeviceId::Host,
    };
    let pool_device = devccl_device::open(pool_id).map_err(|e| {
        refuse(format!("devmem: the RX pool's device {pool_id} (DEVCCL_DEVMEM_POOL) does not open: {e}"))
    })?;
    let queues = d.queues.clone().unwrap_or_else(|| devccl_transport_devmem::transport::default_queues(&ifname));
    let pool_bytes = d
        .pool_bytes
        .unwrap_or_else(|| devccl_transport_devmem::transport::default_pool_bytes(world, cfg.nsocks, queues.len()));
    DevmemTransport::new(DevmemOptions {
        tcp: TcpOptions {
            lanes: cfg.nsocks,
            ifname: Some(data_if),
            activation_timeout: cfg.init_timeout,
            ..TcpOptions::new(addr, rank)
        },
        kernel,
        pool_device,
        pool_bytes,
        ifname,
        queues,
        // A full pool fails the collective well within its no-progress deadline.
        stall_limit: (cfg.timeout / 2).min(std::time::Duration::from_secs(60)),
    })
}

/// Resolve `host:port` to a socket address (first result).
pub fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| Error::usage(format!("cannot resolve rendezvous address '{addr}': {e}")))?
        .next()
        .ok_or_else(|| Error::usage(format!("rendezvous address '{addr}' resolves to nothing")))
}

/// Create the transports `cfg` allows. `toward` is the rendezvous address, whose route picks
/// the default interface.
pub fn offer(cfg: &Config, rank: Rank, world: usize, toward: Option<SocketAddr>) -> Result<Offer> {
    let mut out = Offer::default();
    for &kind in &cfg.transports {
        match kind {
            TransportKind::Tcp => {
                let (addr, ifname) = select_address(cfg.socket_ifname.as_deref(), cfg.socket_family, toward)?;
                let opts = TcpOptions {
                    lanes: cfg.nsocks,
                    ifname: Some(ifname.clone()),
                    activation_timeout: cfg.init_timeout,
                    ..TcpOptions::new(addr, rank)
                };
                let t = TcpTransport::new(opts)?;
                tracing::info!(rank = rank.0, interface = %ifname, endpoint = %t.endpoint().address, "tcp transport listening");
                out.transports.push(Arc::new(t));
            }
            TransportKind::Devmem => match devmem(cfg, rank, world, toward) {
                Ok(t) => {
                    tracing::info!(rank = rank.0, endpoint = %t.endpoint().address, "devmem transport listening: {}", t.properties().name);
                    out.transports.push(Arc::new(t));
                }
                Err(r) => out.declined.push(Decline { kind, reason: r.reason }),
            },
            TransportKind::Shm => {
                let opts = ShmOptions {
                    ring_bytes: ring_for_world(DEFAULT_RING_BYTES, world),
                    ..ShmOptions::from_config(cfg, rank)
                };
                match ShmTransport::new(opts) {
                    Ok(t) => {
                        tracing::info!(rank = rank.0, endpoint = %t.endpoint().address, "shm transport listening");
                        out.transports.push(Arc::new(t));
                    }
                    Err(e) => out.declined.push(Decline { kind, reason: e.to_string() }),
                }
            }
            TransportKind::Mem => {
                out.declined.push(Decline { kind, reason: "in-memory transport exists only in tests".into() })
            }
        }
    }
    for d in &out.declined {
        tracing::info!(rank = rank.0, transport = %d.kind, reason = %d.reason, "transport declined");
    }
    if out.transports.is_empty() {
        let why: Vec<String> = out.declined.iter().map(|d| format!("{}: {}", d.kind, d.reason)).collect();
        let only = match cfg.transports.as_slice() {
            [k] => format!(" (DEVCCL_TRANSPORTS={k} allows nothing else)"),
            _ => String::new(),
        };
        return Err(Error::Unsupported { reason: format!("no usable transport{only}: {}", why.join("; ")) });
    }
    Ok(out)
}
