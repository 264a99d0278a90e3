//! [`ShmTransport`]: the Unix-socket listener, its acceptor thread, and connection setup.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devccl_core::config::Config;
use devccl_core::listen::Listening;
use devccl_core::transport::{CommContext, Connection, Endpoint, LinkProperties, Transport, TransportKind};
use devccl_core::wire::{Hello, Verdict, VerdictStatus};
use devccl_core::{Error, Rank, Result, auth};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{getsockopt, sockopt};

use crate::conn::{MAX_INFLIGHT, Parts, ShmConnection};
use crate::handshake::{self, Dial};
use crate::shm::{Mapping, check_ring_size};

/// Ring size per direction when the options do not say otherwise: room for several of the
/// executor's 256 KiB–1 MiB chunks in flight, while two rings per peer still sit
/// comfortably in a shared last-level cache.
pub const DEFAULT_RING_BYTES: usize = 4 << 20;

/// Shared rings one process maps at most, summed over its connections (both directions):
/// a full mesh of a world of `n` ranks has `n - 1` connections per rank, and the host's
/// total is `n / 2` times this, so rings shrink as worlds grow (see [`ring_for_world`]).
pub const RING_BUDGET_BYTES: usize = 256 << 20;

/// Rings are not shrunk below this for the budget: 1 MiB rings measured within a few percent
/// of 4 MiB ones, while 256 KiB rings lost up to 3x on the 2-core development VM at 64 KiB
/// messages, even with both sides busy-polling (on a quiet Xeon host the loss was 10%).
const MIN_SCALED_RING: usize = 1 << 20;

/// The ring size a connection in a world of `world` ranks gets when the options ask for
/// `max`: `max`, or less when `world - 1` connections of two rings each would exceed
/// [`RING_BUDGET_BYTES`] (rounded down to a power of two, at least 1 MiB unless `max` is
/// smaller). The world counts every rank, including those on other hosts, so multi-host
/// jobs err on the small side, which the measurements say costs little.
pub fn ring_for_world(max: usize, world: usize) -> usize {
    let per_ring = RING_BUDGET_BYTES / (2 * world.saturating_sub(1).max(1));
    // Largest power of two not above the share.
    let pow2 = 1usize << (usize::BITS - 1 - per_ring.max(1).leading_zeros());
    max.min(pow2.max(MIN_SCALED_RING))
}

/// One-way small-message latency estimate for the cost model, in microseconds. Measured with
/// `examples/shm_pingpong.rs` on the 2-core development VM: 0.45 µs when both sides poll
/// (0.9 µs round trip), rounded up for the executor's own per-message work. A side that
/// sleeps in `poll` adds the kernel's wake-up, which no transport avoids.
pub const LATENCY_ESTIMATE_US: f64 = 1.0;

/// Link speed reported to the cost model, in Mbit/s: 5 GB/s, what large messages reach per
/// direction when both ranks send at once (4–5 GB/s measured; small, cache-resident
/// messages go several times faster, see the example's docs).
pub const SPEED_ESTIMATE_MBPS: u64 = 40_000;

/// Prefix of published addresses: an abstract-namespace Unix socket.
const ADDR_PREFIX: &str = "unix:@";

/// How a [`ShmTransport`] listens and connects.
#[derive(Debug, Clone)]
pub struct ShmOptions {
    /// This process's rank, for log messages until [`Transport::activate`] supplies the
    /// communicator's view.
    pub rank: Rank,
    /// Bytes per ring (one ring per direction per connection): a power of two between 4 KiB
    /// and 1 GiB. The connecting side chooses; an accepted connection uses its connector's
    /// size. Messages larger than the ring stream through it. In large worlds each
    /// connection gets less (see [`ring_for_world`]), so that one process's rings stay
    /// within [`RING_BUDGET_BYTES`].
    pub ring_bytes: usize,
    /// How long an incoming handshake may wait for [`Transport::activate`] (a peer that
    /// finished the rendezvous first may connect before this rank is activated).
    pub activation_timeout: Duration,
    /// Bound on each handshake's I/O: a client that has not completed a step by then is
    /// dropped (and counted as rejected).
    pub handshake_timeout: Duration,
}

impl ShmOptions {
    /// Options with defaults: [`DEFAULT_RING_BYTES`] rings, 120 s activation wait, 10 s
    /// handshakes.
    pub fn new(rank: Rank) -> ShmOptions {
        ShmOptions {
            rank,
            ring_bytes: DEFAULT_RING_BYTES,
            activation_timeout: Duration::from_secs(120),
            handshake_timeout: Duration::from_secs(10),
        }
    }

    /// Options from the communicator's configuration: the activation wait from
    /// `DEVCCL_INIT_TIMEOUT`, defaults otherwise.
    pub fn from_config(cfg: &Config, rank: Rank) -> ShmOptions {
        ShmOptions { activation_timeout: cfg.init_timeout, ..ShmOptions::new(rank) }
    }
}

#[derive(Debug, Default)]
struct Arrivals {
    /// Ranks whose Hello was accepted and whose setup is in progress.
    reserved: HashSet<u32>,
    /// Established connections waiting for `accept`.
    ready: HashMap<u32, ShmConnection>,
    /// Peers whose connection `accept` already took; a second one is refused.
    taken: HashSet<u32>,
}

/// State shared by the transport, its acceptor thread and the handshake threads.
type Shared = Listening<Arrivals>;

/// Where this process runs, as far as shared memory cares: two processes can share memory
/// over an abstract socket only on the same kernel (host name and boot id) and in the same
/// network namespace (abstract socket names are per network namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Locality {
    host: String,
    boot_id: String,
    netns: String,
}

impl Locality {
    fn local() -> Locality {
        let host = devccl_core::bootstrap::HostIdentity::local();
        let netns =
            std::fs::read_link("/proc/self/ns/net").map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        Locality { host: host.hostname, boot_id: host.boot_id, netns }
    }
}

/// The shared-memory transport: one abstract Unix socket per process and communicator for
/// setup and liveness, a memfd with two rings per peer connection for the data.
///
/// Created before the rendezvous (it listens at once and publishes its
/// [`endpoint`](Transport::endpoint)); incoming handshakes are validated by a background
/// acceptor against the [`CommContext`] given to [`activate`](Transport::activate). By the
/// communicator's convention the lower rank connects and the higher rank accepts.
#[derive(Debug)]
pub struct ShmTransport {
    shared: Arc<Shared>,
    /// The published address (`unix:@devccl-...`).
    address: String,
    opts: ShmOptions,
    here: Locality,
}

/// Bind a listener on a fresh random abstract name.
fn bind_abstract() -> Result<(UnixListener, String)> {
    let mut last = None;
    for _ in 0..8 {
        let name: String = auth::nonce().iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("devccl-{name}");
        let addr = SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|e| Error::system("make an abstract socket address", e))?;
        match UnixListener::bind_addr(&addr) {
            Ok(l) => return Ok((l, name)),
            // 128 random bits collide only with a deliberate squatter: pick another.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(Error::system(format!("bind shm listener @{name}"), e)),
        }
    }
    Err(Error::system("bind shm listener", last.unwrap_or_else(|| std::io::Error::other("no attempt"))))
}

impl ShmTransport {
    /// Bind the listener on a random abstract Unix socket name and start the acceptor
    /// thread.
    pub fn new(opts: ShmOptions) -> Result<ShmTransport> {
        check_ring_size(opts.ring_bytes).map_err(|e| Error::usage(format!("shm transport: {e}")))?;
        let (listener, name) = bind_abstract()?;
        listener.set_nonblocking(true).map_err(|e| Error::system("configure shm listener", e))?;
        let address = format!("{ADDR_PREFIX}{name}");
        let shared: Arc<Shared> = Arc::new(Listening::new(
            TransportKind::Shm,
            format!("shm {address}"),
            opts.handshake_timeout,
            opts.activation_timeout,
        )?);
        shared.start("devccl-shm-accept".into(), move |s| acceptor_loop(s, listener))?;
        tracing::debug!(%address, ring = opts.ring_bytes, "shm transport listening");
        Ok(ShmTransport { shared, address, opts, here: Locality::local() })
    }

    /// The published address (`unix:@devccl-...`).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Incoming connections refused so far: invalid or unauthenticated handshakes, invalid
    /// shared-memory setups, clients that stalled past the handshake deadline, and
    /// connections turned away because too many handshakes were in progress.
    pub fn rejected_handshakes(&self) -> u64 {
        self.shared.rejected()
    }

    /// The options this transport was created with.
    pub fn options(&self) -> &ShmOptions {
        &self.opts
    }

    /// Refuse, with the reason, a peer that published a different host, boot or network
    /// namespace: its memory cannot be shared from here (or its socket name means nothing
    /// here). Missing capabilities are not held against it.
    fn check_locality(&self, peer: Rank, remote: &Endpoint) -> Result<()> {
        let checks = [
            ("host", &self.here.host, "runs on another host"),
            ("boot_id", &self.here.boot_id, "runs under another kernel boot (another VM or machine)"),
            ("netns", &self.here.netns, "is in another network namespace (abstract socket names are per namespace)"),
        ];
        for (key, ours, why) in checks {
            if let Some(theirs) = remote.cap(key)
                && !theirs.is_empty()
                && !ours.is_empty()
                && theirs != ours.as_str()
            {
                return Err(Error::Unsupported {
                    reason: format!(
                        "shared memory cannot reach rank {peer}: it {why} ({key} {theirs:?}, ours {ours:?})"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Connect to an abstract socket, retrying while the listener's queue is full.
fn connect_socket(addr: &SocketAddr, deadline: Instant) -> std::result::Result<UnixStream, String> {
    let mut backoff = Duration::from_millis(1);
    loop {
        let e = match UnixStream::connect_addr(addr) {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        // A full backlog answers EAGAIN; a name nobody listens on answers ECONNREFUSED at
        // once (the peer published it only after binding, so this means it is gone, but a
        // retry until the deadline costs nothing and covers restarts).
        let now = Instant::now();
        if now >= deadline {
            return Err(e.to_string());
        }
        std::thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
}

fn peer_pid(sock: &UnixStream) -> Option<i32> {
    getsockopt(sock, sockopt::PeerCredentials).ok().map(|c| c.pid()).filter(|&p| p > 0)
}

fn new_bell() -> Result<OwnedFd> {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
        .map(OwnedFd::from)
        .map_err(|e| Error::system("eventfd for a shm doorbell", e.into()))
}

impl Transport for ShmTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            kind: TransportKind::Shm,
            address: self.address.clone(),
            caps: vec![
                ("host".into(), self.here.host.clone()),
                ("boot_id".into(), self.here.boot_id.clone()),
                ("netns".into(), self.here.netns.clone()),
                ("ring_bytes".into(), self.opts.ring_bytes.to_string()),
            ],
        }
    }

    fn properties(&self) -> LinkProperties {
        LinkProperties {
            name: format!("shm {} KiB rings", self.opts.ring_bytes >> 10),
            speed_mbps: SPEED_ESTIMATE_MBPS,
            latency_us: LATENCY_ESTIMATE_US,
            max_inflight: MAX_INFLIGHT,
            lanes: 1,
            scattered_rx: false,
            device_memory: false,
        }
    }

    fn activate(&self, ctx: CommContext) -> Result<()> {
        self.shared.activate(ctx, self.opts.rank)
    }

    fn connect(&self, peer: Rank, remote: &Endpoint, deadline: Instant) -> Result<Box<dyn Connection>> {
        let ctx = self.shared.ctx()?;
        if remote.kind != TransportKind::Shm {
            return Err(Error::usage(format!("rank {peer} published a {} endpoint, not shm", remote.kind)));
        }
        let name = remote.address.strip_prefix(ADDR_PREFIX).filter(|n| !n.is_empty()).ok_or_else(|| {
            Error::remote(
                peer,
                format!(
                    "rank {peer} published an invalid shm address {:?} (expected {ADDR_PREFIX}NAME)",
                    remote.address
                ),
            )
        })?;
        self.check_locality(peer, remote)?;
        let addr = SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|e| Error::remote(peer, format!("rank {peer} published an unusable shm address: {e}")))?;
        let start = Instant::now();
        let limit = deadline.saturating_duration_since(start);
        let sock = connect_socket(&addr, deadline).map_err(|last| Error::Timeout {
            what: format!("rank {} connecting to rank {peer} at {}; last error: {last}", ctx.rank, remote.address),
            after: limit,
        })?;
        let dial = Dial { peer, remote: &remote.address, deadline, limit };
        handshake::connector_handshake(&sock, &ctx, &dial)?;
        let ring = ring_for_world(self.opts.ring_bytes, ctx.world);
        let (map, memfd) = Mapping::create(ring).map_err(|e| {
            Error::system(format!("create {} KiB of shared rings for rank {peer}", (2 * ring) >> 10), e)
        })?;
        let (bell, peer_bell) = (new_bell()?, new_bell()?);
        handshake::connector_setup(&sock, ctx.rank, &dial, ring, [memfd.as_fd(), peer_bell.as_fd(), bell.as_fd()])?;
        drop(memfd);
        let pid = peer_pid(&sock);
        tracing::debug!(rank = %ctx.rank, %peer, remote = %remote.address, ring, ?pid, "shm connection established (connector)");
        Ok(Box::new(ShmConnection::new(Parts {
            me: ctx.rank,
            peer,
            remote: remote.address.clone(),
            peer_pid: pid,
            map,
            connector: true,
            bell,
            peer_bell,
            sock,
        })))
    }

    fn accept(&self, peer: Rank, deadline: Instant) -> Result<Box<dyn Connection>> {
        let take = |g: &mut Arrivals| {
            let c = g.ready.remove(&peer.0)?;
            g.taken.insert(peer.0);
            Some(c)
        };
        let c = self.shared.wait_for(self.opts.rank, peer, deadline, take, |_| String::new())?;
        Ok(Box::new(c))
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("rejected_handshakes", self.rejected_handshakes())]
    }

    fn close(&self) {
        // Connections that were never accepted are closed with the table (their peers see
        // the socket close).
        self.shared.close(|a| a.ready.clear());
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        self.close();
    }
}

fn acceptor_loop(shared: &Arc<Shared>, listener: UnixListener) {
    let what = shared.name().to_owned();
    let accept = || listener.accept();
    handshake::accept_until_closed(&listener, shared.wake_fd(), shared.closed_flag(), &what, accept, |(sock, _)| {
        let serve = move |s: &Shared| {
            let pid = peer_pid(&sock);
            if let Err(reason) = serve_handshake(s, sock, pid) {
                let from = pid.map_or("?".to_owned(), |p| format!("pid {p}"));
                s.reject(&from, &reason);
            }
        };
        if let Err(why) = handshake::spawn_handshake(shared, |s| &s.handshakes, "devccl-shm-handshake", serve) {
            shared.reject("?", &why);
        }
    });
}

/// Run one incoming handshake. `Ok` means the connection was handed to a waiting `accept`;
/// `Err` carries the reason for the log (the socket is closed on return).
fn serve_handshake(shared: &Shared, sock: UnixStream, pid: Option<i32>) -> std::result::Result<(), String> {
    let deadline = Instant::now() + shared.handshake_timeout;
    let nonce = auth::nonce();
    let hello = handshake::acceptor_read_hello(&sock, nonce, deadline).map_err(|s| s.describe("handshake hello"))?;
    let ctx = shared.wait_ctx().ok_or_else(|| {
        format!("Hello from rank {} arrived but this transport was not activated in time", hello.from)
    })?;
    let (mut status, mut why) = handshake::judge_hello(&ctx, &nonce, &hello);
    let from = hello.from.0;
    if status == VerdictStatus::Ok {
        let mut g = shared.arrivals();
        if g.taken.contains(&from) || g.reserved.contains(&from) || g.ready.contains_key(&from) {
            (status, why) = (VerdictStatus::BadLane, format!("rank {from} is already connected"));
        } else {
            g.reserved.insert(from);
        }
    }
    let wrote = handshake::write_all_by(&sock, &Verdict { status }.encode(), Instant::now() + shared.handshake_timeout);
    if status != VerdictStatus::Ok {
        return Err(format!("Hello from rank {}: {}: {why}", hello.from, status.explain()));
    }
    let result = wrote.map_err(|s| s.describe("verdict")).and_then(|()| finish_setup(shared, &ctx, &hello, sock, pid));
    let mut g = shared.arrivals();
    g.reserved.remove(&from);
    let conn = result.map_err(|e| format!("rank {from}: {e}"))?;
    if shared.is_closed() {
        return Err("transport closed during the handshake".into());
    }
    g.ready.insert(from, conn);
    drop(g);
    shared.notify_arrivals();
    tracing::debug!(rank = %ctx.rank, peer = %hello.from, ?pid, "shm connection established (acceptor)");
    Ok(())
}

/// After an accepted Hello: receive the connector's memfd and doorbells, map and check
/// them, and confirm.
fn finish_setup(
    shared: &Shared,
    ctx: &CommContext,
    hello: &Hello,
    sock: UnixStream,
    pid: Option<i32>,
) -> std::result::Result<ShmConnection, String> {
    let deadline = Instant::now() + shared.handshake_timeout;
    let (ring, [memfd, bell, peer_bell]) =
        handshake::acceptor_read_setup(&sock, deadline).map_err(|s| s.describe("shared-memory setup"))?;
    let checked = Mapping::open(&memfd, ring).and_then(|map| {
        check_doorbell(&bell)?;
        check_doorbell(&peer_bell)?;
        Ok(map)
    });
    let map = match checked {
        Ok(m) => m,
        Err(why) => {
            // Tell the connector, so it fails now instead of at its deadline.
            let _ = handshake::acceptor_ready(&sock, false, deadline);
            return Err(format!("invalid shared-memory setup: {why}"));
        }
    };
    drop(memfd);
    handshake::acceptor_ready(&sock, true, deadline).map_err(|s| s.describe("setup confirmation"))?;
    Ok(ShmConnection::new(Parts {
        me: ctx.rank,
        peer: hello.from,
        remote: format!("{} (accepted)", shared.name()),
        peer_pid: pid,
        map,
        connector: false,
        bell,
        peer_bell,
        sock,
    }))
}

/// A doorbell from the peer must be an eventfd, and non-blocking: a read of a blocking one
/// with nothing pending would stall this rank's progress forever.
fn check_doorbell(fd: &OwnedFd) -> std::result::Result<(), String> {
    // /proc may be missing in odd sandboxes; then the descriptor is taken on trust (the peer
    // passed the authenticated handshake).
    if let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        let t = target.to_string_lossy();
        if t != "anon_inode:[eventfd]" {
            return Err(format!("doorbell descriptor is {t:?}, not an eventfd"));
        }
    }
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| format!("fcntl on a doorbell: {e}"))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(|e| format!("fcntl on a doorbell: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_shrink_with_the_world_within_the_budget() {
        let four = DEFAULT_RING_BYTES;
        assert_eq!(ring_for_world(four, 2), four);
        assert_eq!(ring_for_world(four, 8), four);
        assert_eq!(ring_for_world(four, 32), four);
        assert_eq!(ring_for_world(four, 33), four, "32 connections x 8 MiB = the budget");
        assert_eq!(ring_for_world(four, 34), 2 << 20);
        assert_eq!(ring_for_world(four, 64), 2 << 20);
        assert_eq!(ring_for_world(four, 129), 1 << 20);
        assert_eq!(ring_for_world(four, 130), 1 << 20, "floor");
        assert_eq!(ring_for_world(four, 100_000), 1 << 20, "floor");
        assert_eq!(ring_for_world(4096, 100_000), 4096, "never above the option");
        assert_eq!(ring_for_world(64 << 10, 2), 64 << 10);
        for world in 2..300 {
            let r = ring_for_world(four, world);
            assert!(r.is_power_of_two());
            assert!(r == MIN_SCALED_RING || 2 * r * (world - 1) <= RING_BUDGET_BYTES, "world {world}");
        }
    }
}
