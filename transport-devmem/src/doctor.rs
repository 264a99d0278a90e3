//! `devccl doctor`: per interface, what devmem needs and what is missing, plus the dma-buf
//! sources of this machine. Human-readable through `Display`, machine-readable through
//! `serde::Serialize` (`--json`).
#![forbid(unsafe_code)]

use std::fmt;

use serde::Serialize;

use crate::dmabuf::{self, SourceStatus};
use crate::probe::{self, FamilyInfo, ProbeOptions, ProbeReport, Verdict};
use crate::sys::iface;
use crate::sys::netdev::{Features, Netdev};

/// The doctor's report.
#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    /// `uname -r`.
    pub kernel: String,
    /// Effective uid.
    pub euid: u32,
    /// `CAP_NET_ADMIN` in the effective set.
    pub cap_net_admin: bool,
    /// The `netdev` family, when present.
    pub netdev_family: Option<FamilyInfo>,
    /// Ops of the family (`name flags`), when present.
    pub netdev_ops: Vec<String>,
    /// Why the family could not be read.
    pub netdev_error: Option<String>,
    /// dma-buf sources.
    pub dmabuf_sources: Vec<SourceStatus>,
    /// One report per interface.
    pub interfaces: Vec<ProbeReport>,
    /// Interfaces where devmem is usable.
    pub usable: Vec<String>,
    /// What the devmem transport would do in this process with the current `DEVCCL_*`
    /// settings (filled by `devccl doctor`, which can create the transport).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<TransportCheck>,
}

/// The devmem transport's decision for this process, as the registry makes it.
#[derive(Debug, Clone, Serialize)]
pub struct TransportCheck {
    /// `DEVCCL_DEVMEM`: `real` or `sim`.
    pub kernel: String,
    /// `DEVCCL_TRANSPORTS`.
    pub transports: String,
    /// True when the transport was created (its RX pool bound).
    pub ready: bool,
    /// One line: what it is (`devmem (sim kernel) lo 2 lanes, 16 MiB RX pool on host`) or why
    /// it declined (the kernel's classified answer and the fix).
    pub detail: String,
    /// Interface and RX queues it binds.
    pub interface: String,
    pub queues: Vec<u32>,
    /// The commands an operator runs on a devmem-capable NIC for this interface and these
    /// queues.
    pub operator_steps: Vec<String>,
}

/// What an operator runs once per node so devmem can serve `ifname`'s RX `queues`: header
/// split with threshold 0, ntuple filters, RSS kept off the devmem queues, and (per flow,
/// which devccl installs itself when it holds `CAP_NET_ADMIN`) a steering rule.
pub fn operator_steps(ifname: &str, queues: &[u32]) -> Vec<String> {
    let first = queues.iter().copied().min().unwrap_or(0);
    let q = queues.first().copied().unwrap_or(0);
    let rss = if first > 0 {
        format!(
            "ethtool -X {ifname} equal {first}                    # RSS: ordinary traffic on queues 0..{}",
            first - 1
        )
    } else {
        format!(
            "ethtool -X {ifname} equal <N>                  # RSS on queues 0..N-1 only; then DEVCCL_DEVMEM_QUEUES=N.. \
             (queue 0 carries ordinary traffic: `ethtool -l {ifname}` shows the queue count)"
        )
    };
    vec![
        format!("ethtool -G {ifname} tcp-data-split on          # header split: payload to the dma-buf"),
        format!("ethtool -G {ifname} hds-thresh 0               # every payload byte (Linux 6.14+)"),
        format!("ethtool -K {ifname} ntuple on                  # flow steering"),
        rss,
        format!(
            "ethtool -N {ifname} flow-type tcp4 src-ip <peer> dst-ip <this host> src-port <peer port> dst-port <local \
             port> action {q}   # per data socket; devccl installs these itself with CAP_NET_ADMIN"
        ),
        "setcap cap_net_admin+ep $(command -v devccl)   # bind-rx and steering need CAP_NET_ADMIN (or a privileged \
         helper)"
            .into(),
    ]
}

/// Build the report with default probe options (placeholder fds: nothing is bound, no queue
/// is touched).
pub fn report() -> DoctorReport {
    report_with(&ProbeOptions::default())
}

fn list_interfaces(netdev: Option<&mut Netdev>) -> Vec<String> {
    if let Some(n) = netdev
        && let Ok(devs) = n.devices()
    {
        let names: Vec<String> = devs.into_iter().filter_map(|d| d.ifname).collect();
        if !names.is_empty() {
            return names;
        }
    }
    // No netdev family: list /sys/class/net.
    let mut names: Vec<(u32, String)> = std::fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .map(|n| (iface::if_nametoindex(&n).unwrap_or(u32::MAX), n))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.into_iter().map(|(_, n)| n).collect()
}

/// Build the report with `opts` (its `sources` are discovered once if not given).
pub fn report_with(opts: &ProbeOptions) -> DoctorReport {
    let sources = opts.sources.clone().unwrap_or_else(dmabuf::discover);
    let opts = ProbeOptions { sources: Some(sources.clone()), ..opts.clone() };
    let mut netdev = Netdev::open_with_timeout(opts.timeout);
    let (family, ops, err) = match &mut netdev {
        Ok(n) => {
            let features = n.features().unwrap_or_else(|_| Features::from_family(n.family(), None));
            let ops = n
                .family()
                .ops
                .iter()
                .map(|o| format!("{} ({})", crate::sys::netdev::cmd_name(o.id), o.flags_str()))
                .collect();
            (Some(FamilyInfo { id: n.family().id, version: n.family().version, features }), ops, None)
        }
        Err(e) => (None, Vec::new(), Some(dmabuf::unsupported_reason(e))),
    };
    let names = list_interfaces(netdev.as_mut().ok());
    drop(netdev);
    let interfaces: Vec<ProbeReport> = names.iter().map(|n| probe::probe_interface_with(n, &opts)).collect();
    let usable = interfaces.iter().filter(|r| r.verdict == Verdict::Usable).map(|r| r.interface.clone()).collect();
    DoctorReport {
        kernel: iface::kernel_release(),
        euid: iface::euid(),
        cap_net_admin: iface::has_cap_net_admin(),
        netdev_family: family,
        netdev_ops: ops,
        netdev_error: err,
        dmabuf_sources: sources,
        interfaces,
        usable,
        transport: None,
    }
}

impl DoctorReport {
    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

impl fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "devccl doctor: devmem TCP")?;
        writeln!(f, "kernel {}, euid {}, CAP_NET_ADMIN {}", self.kernel, self.euid, yes(self.cap_net_admin))?;
        match (&self.netdev_family, &self.netdev_error) {
            (Some(fam), _) => {
                let ft = &fam.features;
                writeln!(
                    f,
                    "netdev family: id {} version {}; bind-rx {}{}, bind-tx {}{}, rx-page-size {}, queue-create {}",
                    fam.id,
                    fam.version,
                    yes(ft.bind_rx),
                    if ft.bind_rx_admin_perm { " (needs CAP_NET_ADMIN)" } else { "" },
                    yes(ft.bind_tx),
                    if ft.bind_tx && !ft.bind_tx_admin_perm { " (any user)" } else { "" },
                    match ft.rx_page_size {
                        Some(b) => yes(b),
                        None => "unknown",
                    },
                    yes(ft.queue_create),
                )?;
                writeln!(f, "  ops: {}", self.netdev_ops.join(", "))?;
            }
            (None, Some(e)) => writeln!(f, "netdev family: missing - {e}")?,
            (None, None) => writeln!(f, "netdev family: unknown")?,
        }
        writeln!(f)?;
        writeln!(f, "dma-buf sources:")?;
        for s in &self.dmabuf_sources {
            writeln!(f, "  {} {}: {}", if s.available { "[ok ]" } else { "[NO ]" }, s.device, s.detail)?;
        }
        for r in &self.interfaces {
            writeln!(f)?;
            writeln!(f, "{r}")?;
        }
        writeln!(f)?;
        if self.usable.is_empty() {
            write!(f, "devmem TCP is usable on no interface: devccl will use its fallback transports")?;
        } else {
            write!(f, "devmem TCP is usable on: {}", self.usable.join(", "))?;
        }
        if let Some(t) = &self.transport {
            writeln!(f)?;
            writeln!(f)?;
            writeln!(f, "devmem transport (DEVCCL_DEVMEM={}, DEVCCL_TRANSPORTS={}):", t.kernel, t.transports)?;
            writeln!(f, "  {} {}", if t.ready { "[ok ]" } else { "[NO ]" }, t.detail)?;
            writeln!(
                f,
                "  per peer: a pair of ranks uses devmem only when both offer it; otherwise it falls back (staged) to \
                 shm or tcp, and DEVCCL_DEBUG=info says why in that pair's \"connected\" line"
            )?;
            writeln!(f, "  operator steps on a devmem NIC for {} (RX queues {:?}):", t.interface, t.queues)?;
            for (i, s) in t.operator_steps.iter().enumerate() {
                if i + 1 < t.operator_steps.len() {
                    writeln!(f, "    {s}")?;
                } else {
                    write!(f, "    {s}")?;
                }
            }
        }
        Ok(())
    }
}
