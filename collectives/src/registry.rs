//! The transport registry: which transports this process offers, and which one serves each
//! peer. The only module that names concrete transports; algorithms never do.
//!
//! Order of preference comes from `DEVCCL_TRANSPORTS` (default devmem, shm, tcp). A transport
//! that cannot serve declines with a reason; the reasons are logged at `info` once per
//! communicator (like NCCL_DEBUG=INFO's "NET/..." lines) and the choice per peer is logged too.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use devccl_core::config::Config;
use devccl_core::transport::{Transport, TransportKind};
use devccl_core::{Error, Rank, Result};
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
    let probe_iface = || -> String {
        select_address(cfg.socket_ifname.as_deref(), cfg.socket_family, toward)
            .map(|(_, i)| i)
            .unwrap_or_else(|_| "lo".into())
    };
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
            TransportKind::Devmem => {
                // Ask the kernel whether devmem could work on the interface our data would use,
                // so the reason logged is this host's real one (and its fix).
                let ifname = probe_iface();
                let report = devccl_transport_devmem::probe::probe_interface(&ifname);
                let reason = if report.is_usable() {
                    format!(
                        "{ifname} passes the devmem probe, but this build has no devmem data path yet (kernel layer only); using the next transport"
                    )
                } else {
                    format!("{ifname}: {} (fix: {})", report.reason(), report.fix())
                };
                out.declined.push(Decline { kind, reason })
            }
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
        return Err(Error::Unsupported { reason: format!("no usable transport ({})", why.join("; ")) });
    }
    Ok(out)
}
