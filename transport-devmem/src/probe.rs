//! Capability probe: is devmem TCP usable on an interface, and if not, why and what the
//! operator should do.
//!
//! The only reliable capability test is attempting a bind (devmem-uapi §2.2), so the probe
//! resolves the `netdev` family, reads its ops and policies, reads header-split settings
//! through ethtool netlink, lists dma-buf sources, then sends `BIND_RX` and `BIND_TX` and
//! classifies the kernel's answer. By default the binds carry a *placeholder* fd (a memfd,
//! not a dma-buf): the kernel runs its driver checks before it looks at the fd, so the answer
//! says whether the driver could do devmem without touching any queue.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use serde::Serialize;

use crate::dmabuf::{self, ExportedBuffer, SourceStatus};
use crate::error::Error;
use crate::sys::errno::{EBADF, EBUSY, EEXIST, EINVAL, ENODEV, ENOTSUPP, EOPNOTSUPP, EPERM};
use crate::sys::ethtool::{Ethtool, TcpDataSplit};
use crate::sys::netdev::{BindRx, BindTx, Features, Netdev};
use crate::sys::netlink::Extack;
use crate::sys::{errno_name, iface};

/// The probe's answer: the first thing that stops devmem on this interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Verdict {
    /// Everything devmem needs is there.
    Usable,
    /// The kernel has no `netdev` family or no `bind-rx` op.
    KernelWithoutDevmem,
    /// The kernel has devmem RX but no `bind-tx` op (6.12 - 6.15).
    KernelWithoutDevmemTx,
    /// Binding needs `CAP_NET_ADMIN`, which this process lacks.
    NoPermission,
    /// No interface of that name (or the kernel said ENODEV).
    NoSuchInterface,
    /// No route to the peer.
    NoRoute,
    /// The NIC driver lacks the per-queue management API devmem RX needs.
    DriverLacksQueueApi,
    /// The RX queue is taken (XDP program, AF_XDP socket, another memory provider).
    QueueBusy,
    /// Header split (`tcp-data-split`) is off.
    HeaderSplitOff,
    /// `hds-thresh` is not 0.
    HdsThreshNotZero,
    /// The NIC driver did not opt in to netmem TX.
    NoNetmemTx,
    /// No dma-buf source (no CUDA device with dma-buf export, no udmabuf).
    NoDmabufSource,
    /// The NIC could not attach/map the dma-buf (PCI topology, IOMMU, exporter refused).
    DmabufNotAttachable,
    /// An answer this probe does not know how to read.
    Unexpected,
}

impl Verdict {
    /// Stable kebab-case name.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Usable => "usable",
            Verdict::KernelWithoutDevmem => "kernel-without-devmem",
            Verdict::KernelWithoutDevmemTx => "kernel-without-devmem-tx",
            Verdict::NoPermission => "no-permission",
            Verdict::NoSuchInterface => "no-such-interface",
            Verdict::NoRoute => "no-route",
            Verdict::DriverLacksQueueApi => "driver-lacks-queue-api",
            Verdict::QueueBusy => "queue-busy",
            Verdict::HeaderSplitOff => "header-split-off",
            Verdict::HdsThreshNotZero => "hds-thresh-not-zero",
            Verdict::NoNetmemTx => "no-netmem-tx",
            Verdict::NoDmabufSource => "no-dmabuf-source",
            Verdict::DmabufNotAttachable => "dmabuf-not-attachable",
            Verdict::Unexpected => "unexpected",
        }
    }

    /// What is wrong, in an operator's words (`<if>` stands for the interface).
    pub fn reason(&self) -> &'static str {
        match self {
            Verdict::Usable => {
                "devmem TCP is usable: the kernel, the driver, the header-split \
                settings and a dma-buf source are all in place"
            }
            Verdict::KernelWithoutDevmem => {
                "the kernel has no devmem TCP: no \"netdev\" \
                generic-netlink family with a bind-rx operation (needs Linux 6.12+ built with \
                CONFIG_NET_DEVMEM)"
            }
            Verdict::KernelWithoutDevmemTx => {
                "the kernel has devmem RX but not devmem TX \
                (no bind-tx operation; TX arrived in Linux 6.16)"
            }
            Verdict::NoPermission => {
                "binding a dma-buf to an RX queue needs CAP_NET_ADMIN, \
                which this process does not have"
            }
            Verdict::NoSuchInterface => "there is no network interface <if>",
            Verdict::NoRoute => "the kernel has no route to the peer, so no interface to use",
            Verdict::DriverLacksQueueApi => {
                "the driver of <if> lacks the queue management \
                API devmem RX needs (bind-rx answered EOPNOTSUPP on the ifindex); virtio_net, \
                veth, loopback and ifb are such drivers"
            }
            Verdict::QueueBusy => {
                "the RX queue of <if> is already taken: an XDP program, an \
                AF_XDP socket or another memory provider (devmem or io_uring zero-copy RX) \
                is attached"
            }
            Verdict::HeaderSplitOff => {
                "header split (tcp-data-split) is off on <if>: devmem \
                needs TCP payload split from headers into the dma-buf"
            }
            Verdict::HdsThreshNotZero => {
                "hds-thresh on <if> is not 0: small payloads would \
                stay with the headers in host memory, which devmem does not allow"
            }
            Verdict::NoNetmemTx => {
                "the driver of <if> does not support netmem TX (bind-tx \
                answered \"Driver does not support netmem TX\")"
            }
            Verdict::NoDmabufSource => {
                "this machine has no dma-buf source: no CUDA device \
                that can export dma-bufs and no /dev/udmabuf"
            }
            Verdict::DmabufNotAttachable => {
                "the NIC of <if> could not attach or map the \
                dma-buf (the exporter refused: typically GPU and NIC cannot do peer-to-peer \
                DMA across this PCI topology)"
            }
            Verdict::Unexpected => "the kernel gave an answer this probe does not recognise",
        }
    }

    /// What the operator should do (`<if>` stands for the interface).
    pub fn fix(&self) -> &'static str {
        match self {
            Verdict::Usable => {
                "nothing; steer the flows (ethtool -N <if> flow-type tcp4 ... \
                action <queue>) and keep other traffic off the bound queues (ethtool -X <if> \
                equal N)"
            }
            Verdict::KernelWithoutDevmem => {
                "boot Linux 6.12 or newer (6.16+ for TX) built \
                with CONFIG_NET_DEVMEM=y; devccl falls back to TCP meanwhile"
            }
            Verdict::KernelWithoutDevmemTx => {
                "boot Linux 6.16 or newer for devmem TX; \
                devccl falls back to TCP meanwhile"
            }
            Verdict::NoPermission => {
                "run with CAP_NET_ADMIN (e.g. setcap cap_net_admin+ep \
                on the binary, or a privileged helper that binds for the ranks)"
            }
            Verdict::NoSuchInterface => {
                "pick an existing interface (DEVCCL interface setting) \
                - `ip link` lists them"
            }
            Verdict::NoRoute => "add a route to the peer (ip route) or fix the peer's address",
            Verdict::DriverLacksQueueApi => {
                "use a NIC whose driver supports devmem (gve in \
                DQO-RDA mode, mlx5, bnxt_en, fbnic); devccl falls back to TCP on <if>"
            }
            Verdict::QueueBusy => {
                "detach the XDP program (ip link set <if> xdp off), close \
                AF_XDP sockets on that queue, or bind a different queue"
            }
            Verdict::HeaderSplitOff => "ethtool -G <if> tcp-data-split on",
            Verdict::HdsThreshNotZero => "ethtool -G <if> hds-thresh 0",
            Verdict::NoNetmemTx => {
                "use a NIC whose driver supports netmem TX (gve, mlx5, \
                bnxt_en, fbnic on Linux 6.16+); devccl sends over TCP meanwhile"
            }
            Verdict::NoDmabufSource => {
                "install the NVIDIA driver with the open GPU kernel \
                modules (CUDA DMA_BUF_SUPPORTED=1), or load udmabuf (modprobe udmabuf) for \
                host memory"
            }
            Verdict::DmabufNotAttachable => {
                "put GPU and NIC under the same PCIe switch / root \
                complex, enable peer-to-peer DMA (ACS, IOMMU settings), or use host memory \
                (udmabuf)"
            }
            Verdict::Unexpected => {
                "report the probe output (devccl doctor --json) to the \
                devccl developers"
            }
        }
    }

    /// Order in which problems are reported (lower = more fundamental).
    fn rank(&self) -> u8 {
        match self {
            Verdict::KernelWithoutDevmem => 0,
            Verdict::NoSuchInterface => 1,
            Verdict::NoRoute => 1,
            Verdict::NoPermission => 2,
            Verdict::DriverLacksQueueApi => 3,
            Verdict::QueueBusy => 4,
            Verdict::HeaderSplitOff => 5,
            Verdict::HdsThreshNotZero => 6,
            Verdict::KernelWithoutDevmemTx => 7,
            Verdict::NoNetmemTx => 8,
            Verdict::NoDmabufSource => 9,
            Verdict::DmabufNotAttachable => 10,
            Verdict::Unexpected => 11,
            Verdict::Usable => 12,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What fd a bind attempt carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FdKind {
    /// A memfd (not a dma-buf): reaches the driver checks, can never bind.
    Placeholder,
    /// A real dma-buf: the bind can succeed (and is undone at once).
    Dmabuf,
}

/// How a bind attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "result")]
pub enum BindOutcome {
    /// Bound (then unbound by closing the socket) with this id.
    Bound { id: u32 },
    /// The kernel refused.
    Refused { errno: i32, errno_name: &'static str, extack: Box<Extack> },
    /// Something else failed (socket, timeout).
    Failed { error: String },
    /// Not attempted.
    NotAttempted { why: String },
}

/// One bind attempt and its classification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BindCheck {
    /// `"bind-rx"` or `"bind-tx"`.
    pub op: &'static str,
    /// What fd it carried.
    pub fd: FdKind,
    /// The kernel's answer.
    pub outcome: BindOutcome,
    /// Its reading: [`Verdict::Usable`] means "no blocker found by this check".
    pub verdict: Verdict,
    /// One line for humans.
    pub detail: String,
}

fn is_placeholder_import_error(errno: i32, extack: &Extack, fd: FdKind) -> bool {
    fd == FdKind::Placeholder
        && (errno == EINVAL || errno == EBADF)
        && extack.message.is_none()
        && extack.bad_attr_offset.is_none()
        && extack.missing_type.is_none()
}

fn msg_has(extack: &Extack, needle: &str) -> bool {
    extack.message.as_deref().is_some_and(|m| m.to_ascii_lowercase().contains(&needle.to_ascii_lowercase()))
}

/// Read the kernel's answer to `BIND_RX`.
pub fn classify_bind_rx(result: &Result<u32, Error>, fd: FdKind) -> Verdict {
    let (errno, extack) = match result {
        Ok(_) => return Verdict::Usable,
        Err(Error::Kernel { errno, extack, .. }) => (*errno, extack),
        Err(_) => return Verdict::Unexpected,
    };
    if msg_has(extack, "tcp-data-split is disabled") {
        return Verdict::HeaderSplitOff;
    }
    if msg_has(extack, "hds-thresh is not zero") {
        return Verdict::HdsThreshNotZero;
    }
    if msg_has(extack, "XDP") || msg_has(extack, "already memory provider bound") || errno == EBUSY {
        return Verdict::QueueBusy;
    }
    if msg_has(extack, "failed to bind dmabuf") || msg_has(extack, "failed to map dmabuf") || errno == ENOTSUPP {
        return Verdict::DmabufNotAttachable;
    }
    match errno {
        EPERM => Verdict::NoPermission,
        ENODEV => Verdict::NoSuchInterface,
        EOPNOTSUPP => Verdict::DriverLacksQueueApi,
        EEXIST => Verdict::QueueBusy,
        _ if is_placeholder_import_error(errno, extack, fd) => Verdict::Usable,
        _ => Verdict::Unexpected,
    }
}

/// Read the kernel's answer to `BIND_TX`.
pub fn classify_bind_tx(result: &Result<u32, Error>, fd: FdKind) -> Verdict {
    let (errno, extack) = match result {
        Ok(_) => return Verdict::Usable,
        Err(Error::Kernel { errno, extack, .. }) => (*errno, extack),
        Err(_) => return Verdict::Unexpected,
    };
    if msg_has(extack, "netmem TX") || msg_has(extack, "No DMA-capable device") {
        return Verdict::NoNetmemTx;
    }
    if msg_has(extack, "failed to bind dmabuf") || msg_has(extack, "failed to map dmabuf") || errno == ENOTSUPP {
        return Verdict::DmabufNotAttachable;
    }
    match errno {
        EPERM => Verdict::NoPermission,
        ENODEV => Verdict::NoSuchInterface,
        EOPNOTSUPP => Verdict::NoNetmemTx,
        _ if is_placeholder_import_error(errno, extack, fd) => Verdict::Usable,
        _ => Verdict::Unexpected,
    }
}

fn check_from(op: &'static str, fd: FdKind, res: Result<u32, Error>, verdict: Verdict) -> BindCheck {
    let (outcome, detail) = match &res {
        Ok(id) => (BindOutcome::Bound { id: *id }, format!("{op} bound (id {id}) and released at once")),
        Err(Error::Kernel { errno, extack, .. }) => {
            let mut d = format!("{op} -> {}({errno}){extack}", errno_name(*errno));
            if verdict == Verdict::Usable && fd == FdKind::Placeholder {
                d.push_str(" (the driver checks passed; the placeholder fd is not a dma-buf, as intended)");
            }
            (BindOutcome::Refused { errno: *errno, errno_name: errno_name(*errno), extack: extack.clone() }, d)
        }
        Err(e) => (BindOutcome::Failed { error: e.to_string() }, format!("{op}: {e}")),
    };
    BindCheck { op, fd, outcome, verdict, detail }
}

fn not_attempted(op: &'static str, why: &str) -> BindCheck {
    BindCheck {
        op,
        fd: FdKind::Placeholder,
        outcome: BindOutcome::NotAttempted { why: why.to_owned() },
        verdict: Verdict::Usable,
        detail: format!("{op} not attempted: {why}"),
    }
}

/// Attempt `BIND_RX` on `ifindex` queue `queue` with `fd` and classify (a successful binding is
/// released at once).
pub fn try_bind_rx(
    netdev: &Netdev,
    ifindex: u32,
    fd: std::os::fd::BorrowedFd<'_>,
    kind: FdKind,
    queue: u32,
) -> BindCheck {
    let res = netdev.bind_rx(&BindRx::new(ifindex, fd, &[queue])).map(|b| b.id());
    let v = classify_bind_rx(&res, kind);
    check_from("bind-rx", kind, res, v)
}

/// Attempt `BIND_TX` on `ifindex` with `fd` and classify (a successful binding is released at
/// once).
pub fn try_bind_tx(netdev: &Netdev, ifindex: u32, fd: std::os::fd::BorrowedFd<'_>, kind: FdKind) -> BindCheck {
    let res = netdev.bind_tx(&BindTx::new(ifindex, fd)).map(|b| b.id());
    let v = classify_bind_tx(&res, kind);
    check_from("bind-tx", kind, res, v)
}

/// Which fd the probe binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DmabufUse {
    /// A memfd for both binds: no queue is touched (default).
    Placeholder,
    /// A real dma-buf for `BIND_TX` (harmless: TX binds restart nothing), placeholder for RX.
    RealForTx,
    /// A real dma-buf for both. On a capable NIC a successful `BIND_RX` restarts the RX queue
    /// twice (bind, then unbind): brief disruption of that queue's traffic.
    RealForRxAndTx,
}

/// Probe settings.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Deadline of each netlink request.
    pub timeout: Duration,
    /// Which fd the binds carry.
    pub dmabuf: DmabufUse,
    /// RX queue the RX bind names.
    pub rx_queue: u32,
    /// Size of the real dma-buf, when one is used.
    pub real_len: usize,
    /// Pre-discovered sources (the doctor discovers once for all interfaces).
    pub sources: Option<Vec<SourceStatus>>,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            timeout: Duration::from_secs(5),
            dmabuf: DmabufUse::Placeholder,
            rx_queue: 0,
            real_len: 2 << 20,
            sources: None,
        }
    }
}

/// Header-split state as ethtool reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeaderSplit {
    /// `enabled`, `disabled` or `unknown`.
    pub tcp_data_split: TcpDataSplit,
    /// `hds-thresh`; `None` = unknown.
    pub hds_thresh: Option<u32>,
    /// One line for humans.
    pub detail: String,
}

/// The `netdev` family as the probe saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FamilyInfo {
    pub id: u16,
    pub version: u32,
    pub features: Features,
}

/// Everything the probe learnt about one interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeReport {
    pub interface: String,
    pub ifindex: Option<u32>,
    /// The peer this interface was chosen for.
    pub peer: Option<IpAddr>,
    pub driver: Option<String>,
    pub operstate: Option<String>,
    pub kernel: String,
    pub cap_net_admin: bool,
    pub family: Option<FamilyInfo>,
    pub family_error: Option<String>,
    pub rx: Option<BindCheck>,
    pub tx: Option<BindCheck>,
    pub header_split: Option<HeaderSplit>,
    pub dmabuf_sources: Vec<SourceStatus>,
    /// Every blocker found, most fundamental first.
    pub problems: Vec<Verdict>,
    /// The first problem, or [`Verdict::Usable`].
    pub verdict: Verdict,
    /// [`ProbeReport::reason`], for JSON.
    pub reason: String,
    /// [`ProbeReport::fix`], for JSON.
    pub fix: String,
    /// Extra observations.
    pub notes: Vec<String>,
}

impl ProbeReport {
    fn new(ifname: &str) -> Self {
        ProbeReport {
            interface: ifname.to_owned(),
            ifindex: None,
            peer: None,
            driver: iface::driver_of(ifname),
            operstate: iface::operstate(ifname),
            kernel: iface::kernel_release(),
            cap_net_admin: iface::has_cap_net_admin(),
            family: None,
            family_error: None,
            rx: None,
            tx: None,
            header_split: None,
            dmabuf_sources: Vec::new(),
            problems: Vec::new(),
            verdict: Verdict::Usable,
            reason: String::new(),
            fix: String::new(),
            notes: Vec::new(),
        }
    }

    fn finish(mut self) -> Self {
        self.problems.sort_by_key(Verdict::rank);
        self.problems.dedup();
        self.verdict = self.problems.first().copied().unwrap_or(Verdict::Usable);
        self.reason = self.compose_reason();
        self.fix = self.verdict.fix().replace("<if>", &self.interface);
        self
    }

    /// Devmem RX and TX are both usable.
    pub fn is_usable(&self) -> bool {
        self.verdict == Verdict::Usable
    }

    fn compose_reason(&self) -> String {
        let mut s = self.verdict.reason().replace("<if>", &self.interface);
        let specific = match self.verdict {
            Verdict::DriverLacksQueueApi | Verdict::QueueBusy | Verdict::NoPermission => {
                self.rx.as_ref().map(|c| c.detail.clone())
            }
            Verdict::NoNetmemTx => self.tx.as_ref().map(|c| c.detail.clone()),
            Verdict::HeaderSplitOff | Verdict::HdsThreshNotZero => self
                .rx
                .as_ref()
                .filter(|c| c.verdict == self.verdict)
                .map(|c| c.detail.clone())
                .or_else(|| self.header_split.as_ref().map(|h| h.detail.clone())),
            Verdict::DmabufNotAttachable | Verdict::Unexpected => {
                self.rx.iter().chain(self.tx.iter()).find(|c| c.verdict == self.verdict).map(|c| c.detail.clone())
            }
            Verdict::KernelWithoutDevmem => self.family_error.clone(),
            Verdict::NoDmabufSource => Some(
                self.dmabuf_sources
                    .iter()
                    .map(|d| format!("{}: {}", d.device, d.detail))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            _ => None,
        };
        if let Some(d) = specific.filter(|d| !d.is_empty()) {
            s.push_str(" [");
            s.push_str(&d);
            s.push(']');
        }
        s
    }

    /// Why devmem is (not) usable here, naming the interface and the kernel's answer.
    pub fn reason(&self) -> String {
        self.reason.clone()
    }

    /// What the operator should do.
    pub fn fix(&self) -> String {
        self.fix.clone()
    }
}

enum ProbeFd {
    Placeholder(OwnedFd),
    Real(ExportedBuffer),
}

impl ProbeFd {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            ProbeFd::Placeholder(f) => f.as_fd(),
            ProbeFd::Real(b) => b.dmabuf().as_fd(),
        }
    }

    fn kind(&self) -> FdKind {
        match self {
            ProbeFd::Placeholder(_) => FdKind::Placeholder,
            ProbeFd::Real(_) => FdKind::Dmabuf,
        }
    }
}

fn placeholder(report: &mut ProbeReport) -> Option<ProbeFd> {
    match crate::sys::placeholder_fd() {
        Ok(f) => Some(ProbeFd::Placeholder(f)),
        Err(e) => {
            report.notes.push(format!("memfd_create failed: {e}"));
            report.problems.push(Verdict::Unexpected);
            None
        }
    }
}

/// Probe interface `ifname` with default options.
pub fn probe_interface(ifname: &str) -> ProbeReport {
    probe_interface_with(ifname, &ProbeOptions::default())
}

/// Probe the interface the route to `peer_ip` uses.
pub fn probe_for_peer(peer_ip: IpAddr) -> ProbeReport {
    probe_for_peer_with(peer_ip, &ProbeOptions::default())
}

/// [`probe_for_peer`] with options.
pub fn probe_for_peer_with(peer_ip: IpAddr, opts: &ProbeOptions) -> ProbeReport {
    match iface::route_interface(peer_ip) {
        Ok((ifname, _src)) => {
            let mut r = probe_interface_with(&ifname, opts);
            r.peer = Some(peer_ip);
            r
        }
        Err(e) => {
            let mut r = ProbeReport::new("?");
            r.peer = Some(peer_ip);
            r.notes.push(format!("route lookup for {peer_ip}: {e}"));
            r.problems.push(Verdict::NoRoute);
            r.finish()
        }
    }
}

/// Probe interface `ifname`.
pub fn probe_interface_with(ifname: &str, opts: &ProbeOptions) -> ProbeReport {
    let mut r = ProbeReport::new(ifname);
    r.dmabuf_sources = opts.sources.clone().unwrap_or_else(dmabuf::discover);
    if !r.dmabuf_sources.iter().any(|s| s.available) {
        r.problems.push(Verdict::NoDmabufSource);
    }

    let Some(ifindex) = iface::if_nametoindex(ifname) else {
        r.problems.push(Verdict::NoSuchInterface);
        return r.finish();
    };
    r.ifindex = Some(ifindex);

    let mut netdev = match Netdev::open_with_timeout(opts.timeout) {
        Ok(n) => n,
        Err(e) => {
            r.family_error = Some(dmabuf::unsupported_reason(&e));
            r.problems.push(if matches!(e, Error::Unsupported { .. }) {
                Verdict::KernelWithoutDevmem
            } else {
                Verdict::Unexpected
            });
            return r.finish();
        }
    };
    let features = match netdev.features() {
        Ok(f) => f,
        Err(e) => {
            r.notes.push(format!("policy dump failed: {e}"));
            Features::from_family(netdev.family(), None)
        }
    };
    r.family =
        Some(FamilyInfo { id: netdev.family().id, version: netdev.family().version, features: features.clone() });
    if !features.bind_rx {
        r.family_error = Some("the netdev family has no bind-rx operation".into());
        r.problems.push(Verdict::KernelWithoutDevmem);
    }
    if !features.bind_tx {
        r.problems.push(Verdict::KernelWithoutDevmemTx);
    }

    // Header split, as the driver reports it.
    r.header_split = Some(match Ethtool::open(opts.timeout).and_then(|mut e| e.rings(ifindex, ifname)) {
        Ok(rings) => {
            let split = match rings.tcp_data_split {
                TcpDataSplit::Enabled => "tcp-data-split on".to_owned(),
                TcpDataSplit::Disabled => "tcp-data-split off".to_owned(),
                TcpDataSplit::Unknown => "tcp-data-split unknown (the driver does not report it)".to_owned(),
            };
            let thresh = match rings.hds_thresh {
                Some(t) => format!("hds-thresh {t}"),
                None => "hds-thresh unknown (not reported)".to_owned(),
            };
            if rings.tcp_data_split == TcpDataSplit::Disabled {
                r.problems.push(Verdict::HeaderSplitOff);
            }
            if rings.hds_thresh.is_some_and(|t| t != 0) {
                r.problems.push(Verdict::HdsThreshNotZero);
            }
            HeaderSplit {
                tcp_data_split: rings.tcp_data_split,
                hds_thresh: rings.hds_thresh,
                detail: format!("{split}, {thresh}"),
            }
        }
        Err(e) => HeaderSplit {
            tcp_data_split: TcpDataSplit::Unknown,
            hds_thresh: None,
            detail: format!(
                "unknown: ethtool rings query failed: {}",
                match &e {
                    Error::Kernel { errno, .. } => format!("{}({errno})", errno_name(*errno)),
                    other => other.to_string(),
                }
            ),
        },
    });

    // The fds the binds carry.
    let want_real = opts.dmabuf != DmabufUse::Placeholder;
    let real = if want_real {
        match dmabuf::first_available().and_then(|s| s.allocate(opts.real_len)) {
            Ok(buf) => {
                r.notes.push(format!("real dma-buf for the bind: {}", buf.how()));
                Some(ProbeFd::Real(buf))
            }
            Err(e) => {
                r.notes.push(format!(
                    "no real dma-buf, binding a placeholder fd instead: {}",
                    dmabuf::unsupported_reason(&e)
                ));
                None
            }
        }
    } else {
        None
    };
    let ph = placeholder(&mut r);
    let rx_fd = match (opts.dmabuf, &real) {
        (DmabufUse::RealForRxAndTx, Some(b)) => Some(b),
        _ => ph.as_ref(),
    };
    let tx_fd = real.as_ref().or(ph.as_ref());

    r.rx = Some(match (features.bind_rx, rx_fd) {
        (false, _) => not_attempted("bind-rx", "the kernel has no bind-rx operation"),
        (true, None) => not_attempted("bind-rx", "no fd to bind"),
        (true, Some(fd)) => try_bind_rx(&netdev, ifindex, fd.fd(), fd.kind(), opts.rx_queue),
    });
    r.tx = Some(match (features.bind_tx, tx_fd) {
        (false, _) => not_attempted("bind-tx", "the kernel has no bind-tx operation"),
        (true, None) => not_attempted("bind-tx", "no fd to bind"),
        (true, Some(fd)) => try_bind_tx(&netdev, ifindex, fd.fd(), fd.kind()),
    });
    for c in [&r.rx, &r.tx].into_iter().flatten() {
        if c.verdict != Verdict::Usable {
            r.problems.push(c.verdict);
        }
    }
    r.finish()
}

fn mark(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "[ok ]",
        Some(false) => "[NO ]",
        None => "[ ? ]",
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut head = format!("interface {}", self.interface);
        let mut bits = Vec::new();
        if let Some(i) = self.ifindex {
            bits.push(format!("ifindex {i}"));
        }
        if let Some(d) = &self.driver {
            bits.push(format!("driver {d}"));
        }
        if let Some(s) = &self.operstate {
            bits.push(format!("state {s}"));
        }
        if let Some(p) = self.peer {
            bits.push(format!("route to {p}"));
        }
        if !bits.is_empty() {
            head.push_str(&format!(" ({})", bits.join(", ")));
        }
        writeln!(f, "{head}")?;
        let kernel_ok = self.family.as_ref().map(|fam| fam.features.bind_rx && fam.features.bind_tx);
        let kernel_ok = if self.family_error.is_some() { Some(false) } else { kernel_ok };
        writeln!(
            f,
            "  {} kernel: netdev family with bind-rx and bind-tx{}",
            mark(kernel_ok),
            self.family_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
        )?;
        let needs_admin = self.family.as_ref().is_some_and(|fam| fam.features.bind_rx_admin_perm);
        writeln!(
            f,
            "  {} permission: CAP_NET_ADMIN {}",
            mark(Some(self.cap_net_admin || !needs_admin)),
            if self.cap_net_admin { "held" } else { "missing" }
        )?;
        for (label, check) in [("RX queue API (bind-rx)", &self.rx), ("netmem TX (bind-tx)", &self.tx)] {
            match check {
                Some(c) => {
                    let ok = match &c.outcome {
                        BindOutcome::NotAttempted { .. } => None,
                        _ => Some(c.verdict == Verdict::Usable),
                    };
                    writeln!(f, "  {} {label}: {}", mark(ok), c.detail)?
                }
                None => writeln!(f, "  {} {label}: not checked", mark(None))?,
            }
        }
        match &self.header_split {
            Some(h) => {
                let ok = match (h.tcp_data_split, h.hds_thresh) {
                    (TcpDataSplit::Disabled, _) => Some(false),
                    (_, Some(t)) if t != 0 => Some(false),
                    (TcpDataSplit::Enabled, Some(0)) => Some(true),
                    _ => None,
                };
                writeln!(f, "  {} header split: {}", mark(ok), h.detail)?
            }
            None => writeln!(f, "  {} header split: not checked", mark(None))?,
        }
        let avail: Vec<&str> = self.dmabuf_sources.iter().filter(|s| s.available).map(|s| s.device.as_str()).collect();
        writeln!(
            f,
            "  {} dma-buf source: {}",
            mark(Some(!avail.is_empty())),
            if avail.is_empty() { "none available".to_owned() } else { avail.join(", ") }
        )?;
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        writeln!(f, "  verdict: {} - {}", self.verdict, self.reason)?;
        if self.problems.len() > 1 {
            let rest: Vec<&str> = self.problems[1..].iter().map(Verdict::name).collect();
            writeln!(f, "  also: {}", rest.join(", "))?;
        }
        write!(f, "  fix: {}", self.fix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::netlink::{PolicyDesc, decode_error, parse_messages};
    use crate::sys::recorded::*;

    fn kernel_err(op: &'static str, reply: &[u8], req: crate::sys::netlink::Request) -> Result<u32, Error> {
        let m = parse_messages(reply).unwrap();
        let mut ack = decode_error(&m[0]).unwrap();
        req.annotate(&mut ack.extack);
        Err(Error::Kernel { op, iface: "eth0".into(), errno: ack.errno, extack: Box::new(ack.extack) })
    }

    fn rx_req(
        ifindex: Option<u32>,
        fd: Option<u32>,
        q: Vec<(u32, u32)>,
        nested: bool,
        seq: u32,
    ) -> crate::sys::netlink::Request {
        BindRx { ifindex, fd, queues: q, rx_page_size: None, nested_flag: nested }.request(20, seq)
    }

    #[test]
    fn recorded_bind_rx_lo_is_driver_lacks_queue_api() {
        let res = kernel_err("bind-rx", REPLY_BIND_RX_LO_0, rx_req(Some(1), Some(4), vec![(0, 0)], true, 6));
        let e = res.as_ref().unwrap_err().extack().unwrap().clone();
        assert_eq!(e.bad_attr.as_deref(), Some("ifindex"));
        assert_eq!(e.message, None);
        assert_eq!(classify_bind_rx(&res, FdKind::Placeholder), Verdict::DriverLacksQueueApi);
        let text = res.unwrap_err().to_string();
        assert_eq!(text, "kernel refused bind-rx on eth0: EOPNOTSUPP(95); bad attribute ifindex");
    }

    #[test]
    fn recorded_bind_tx_is_no_netmem_tx() {
        let req = BindTx { ifindex: Some(4), fd: Some(4), queues: vec![] }.request(20, 7);
        let res = kernel_err("bind-tx", REPLY_BIND_TX_ETH0_0, req);
        assert_eq!(classify_bind_tx(&res, FdKind::Placeholder), Verdict::NoNetmemTx);
        assert_eq!(
            res.unwrap_err().to_string(),
            "kernel refused bind-tx on eth0: EOPNOTSUPP(95); kernel says \"Driver does not support netmem TX\""
        );
    }

    #[test]
    fn recorded_missing_fd_is_named() {
        let res = kernel_err("bind-rx", REPLY_BIND_RX_NO_FD_0, rx_req(Some(4), None, vec![(0, 0)], true, 9));
        let e = res.as_ref().unwrap_err();
        assert_eq!(e.errno(), Some(EINVAL));
        let x = e.extack().unwrap();
        assert_eq!(x.missing_type, Some(3));
        assert_eq!(x.missing_name.as_deref(), Some("fd"));
        assert!(e.to_string().ends_with("missing attribute 3 (fd)"), "{e}");
        assert_eq!(classify_bind_rx(&res, FdKind::Placeholder), Verdict::Unexpected);
    }

    #[test]
    fn recorded_policy_errors_name_the_attribute() {
        let res = kernel_err("bind-rx", REPLY_BIND_RX_QTYPE7_0, rx_req(Some(4), Some(4), vec![(0, 7)], true, 11));
        let x = res.as_ref().unwrap_err().extack().unwrap().clone();
        assert_eq!(x.bad_attr.as_deref(), Some("queues.type"));
        assert_eq!(x.policy.as_ref().unwrap().max_u, Some(1));
        let res = kernel_err("bind-rx", REPLY_BIND_RX_NOT_NESTED_0, rx_req(Some(4), Some(4), vec![(0, 0)], false, 10));
        let x = res.as_ref().unwrap_err().extack().unwrap().clone();
        assert_eq!(x.message.as_deref(), Some("NLA_F_NESTED is missing"));
        assert_eq!(x.bad_attr.as_deref(), Some("queues"));
        assert_eq!(x.policy, Some(PolicyDesc { ty: Some(crate::sys::netlink::NlaType::Nested), ..Default::default() }));
    }

    #[test]
    fn recorded_enodev_and_eperm() {
        let res = kernel_err("bind-rx", REPLY_BIND_RX_NODEV_0, rx_req(Some(99999), Some(4), vec![(0, 0)], true, 12));
        assert_eq!(classify_bind_rx(&res, FdKind::Placeholder), Verdict::NoSuchInterface);
        let res = kernel_err("bind-rx", REPLY_BIND_RX_UNPRIV_0, rx_req(Some(1), Some(4), vec![(0, 0)], true, 16));
        assert_eq!(res.as_ref().unwrap_err().errno(), Some(EPERM));
        assert_eq!(classify_bind_rx(&res, FdKind::Placeholder), Verdict::NoPermission);
    }

    fn synthetic(errno: i32, msg: Option<&str>) -> Result<u32, Error> {
        Err(Error::Kernel {
            op: "bind-rx",
            iface: "eth1".into(),
            errno,
            extack: Box::new(Extack { message: msg.map(str::to_owned), ..Default::default() }),
        })
    }

    #[test]
    fn source_derived_answers_classify() {
        // Messages from net/core (devmem-uapi §2.4), not observable without a devmem NIC.
        let ph = FdKind::Placeholder;
        assert_eq!(
            classify_bind_rx(&synthetic(EINVAL, Some("tcp-data-split is disabled")), ph),
            Verdict::HeaderSplitOff
        );
        assert_eq!(classify_bind_rx(&synthetic(EINVAL, Some("hds-thresh is not zero")), ph), Verdict::HdsThreshNotZero);
        assert_eq!(
            classify_bind_rx(&synthetic(EEXIST, Some("designated queue already memory provider bound")), ph),
            Verdict::QueueBusy
        );
        assert_eq!(
            classify_bind_rx(&synthetic(EBUSY, Some("designated queue already in use by AF_XDP")), ph),
            Verdict::QueueBusy
        );
        assert_eq!(
            classify_bind_rx(&synthetic(ENOTSUPP, Some("Failed to bind dmabuf to device")), FdKind::Dmabuf),
            Verdict::DmabufNotAttachable
        );
        // A capable driver with the placeholder memfd: dma_buf_get says EINVAL, no extack.
        assert_eq!(classify_bind_rx(&synthetic(EINVAL, None), ph), Verdict::Usable);
        assert_eq!(classify_bind_tx(&synthetic(EBADF, None), ph), Verdict::Usable);
        assert_eq!(classify_bind_rx(&synthetic(EINVAL, None), FdKind::Dmabuf), Verdict::Unexpected);
        assert_eq!(
            classify_bind_tx(&synthetic(EOPNOTSUPP, Some("No DMA-capable device found for netmem TX")), ph),
            Verdict::NoNetmemTx
        );
        assert_eq!(classify_bind_rx(&Ok(3), FdKind::Dmabuf), Verdict::Usable);
        assert_eq!(
            classify_bind_rx(
                &Err(Error::Timeout { op: "bind-rx", iface: "x".into(), after: Duration::from_secs(1) }),
                ph
            ),
            Verdict::Unexpected
        );
    }

    #[test]
    fn every_verdict_has_reason_and_fix() {
        use Verdict::*;
        for v in [
            Usable,
            KernelWithoutDevmem,
            KernelWithoutDevmemTx,
            NoPermission,
            NoSuchInterface,
            NoRoute,
            DriverLacksQueueApi,
            QueueBusy,
            HeaderSplitOff,
            HdsThreshNotZero,
            NoNetmemTx,
            NoDmabufSource,
            DmabufNotAttachable,
            Unexpected,
        ] {
            assert!(!v.reason().is_empty() && !v.fix().is_empty(), "{v}");
            assert_eq!(serde_json::to_value(v).unwrap(), serde_json::Value::String(v.name().into()));
        }
        assert_eq!(HeaderSplitOff.fix(), "ethtool -G <if> tcp-data-split on");
        assert_eq!(HdsThreshNotZero.fix(), "ethtool -G <if> hds-thresh 0");
    }

    #[test]
    fn missing_interface_report() {
        let opts = ProbeOptions { sources: Some(vec![]), ..Default::default() };
        let r = probe_interface_with("nosuchif9", &opts);
        assert_eq!(r.verdict, Verdict::NoSuchInterface);
        assert_eq!(r.problems, vec![Verdict::NoSuchInterface, Verdict::NoDmabufSource]);
        assert!(r.reason().contains("nosuchif9"), "{}", r.reason());
        assert!(r.to_string().contains("verdict: no-such-interface"));
    }
}
