//! [`TcpTransport`]: the listener, its acceptor thread, and connection setup.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devccl_core::config::Config;
use devccl_core::listen::Listening;
use devccl_core::transport::{CommContext, Connection, Endpoint, LinkProperties, Transport, TransportKind};
use devccl_core::wire::{Verdict, VerdictStatus};
use devccl_core::{Error, Rank, Result, auth};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::conn::{MAX_INFLIGHT, TcpConnection};
use crate::handshake;
use crate::iface;

/// One-way small-message latency estimate for the cost model, in microseconds. Measured with
/// `examples/pingpong.rs` over loopback on the 2-core development VM: median 8-byte round
/// trip 10.2 µs when both sides busy-poll (5.1 µs one way), 76 µs when they sleep in
/// `poll(2)` (wake-ups dominate). A real NIC adds its own latency; this is the floor.
pub const LATENCY_ESTIMATE_US: f64 = 6.0;

/// How a [`TcpTransport`] listens and connects.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// Local address to listen on; it is also the address published to peers, so it must
    /// be one they can reach (see [`select_address`](crate::select_address)), never
    /// unspecified.
    pub addr: IpAddr,
    /// Port to listen on; 0 picks a free one.
    pub port: u16,
    /// Sockets per outgoing connection (`DEVCCL_NSOCKS`). The connecting side chooses; an
    /// accepted connection has as many lanes as its connector asked for.
    pub lanes: usize,
    /// This process's rank, for log messages until [`Transport::activate`] supplies the
    /// communicator's view.
    pub rank: Rank,
    /// Interface name of `addr` (for [`Transport::properties`]); looked up when `None`.
    pub ifname: Option<String>,
    /// Bound on each handshake's I/O: a client that has not completed its Hello by then is
    /// dropped (and counted as rejected).
    pub handshake_timeout: Duration,
    /// How long an incoming handshake may wait for [`Transport::activate`] (a peer that
    /// finished the rendezvous first may connect before this rank is activated).
    pub activation_timeout: Duration,
    /// `SO_SNDBUF`/`SO_RCVBUF` for data sockets; `None` leaves the kernel's autotuning on
    /// (the measured best on loopback, see the crate docs).
    pub socket_buffer: Option<usize>,
    /// The transport these sockets serve: `Tcp`, or `Devmem` when the devmem transport
    /// listens and connects through this one (its Hello names devmem).
    pub kind: TransportKind,
}

impl TcpOptions {
    /// Options with defaults: ephemeral port, `DEVCCL_NSOCKS`'s default lane count, 10 s
    /// handshakes, 120 s activation wait, kernel-tuned buffers.
    pub fn new(addr: IpAddr, rank: Rank) -> TcpOptions {
        TcpOptions {
            addr,
            port: 0,
            lanes: Config::default().nsocks,
            rank,
            ifname: None,
            handshake_timeout: Duration::from_secs(10),
            activation_timeout: Duration::from_secs(120),
            socket_buffer: None,
            kind: TransportKind::Tcp,
        }
    }

    /// Options from the communicator's configuration: the address from
    /// `DEVCCL_SOCKET_IFNAME` / `DEVCCL_SOCKET_FAMILY` (or the route toward `rendezvous`),
    /// lanes from `DEVCCL_NSOCKS`, the activation wait from `DEVCCL_INIT_TIMEOUT`.
    pub fn from_config(cfg: &Config, rank: Rank, rendezvous: Option<SocketAddr>) -> Result<TcpOptions> {
        let (addr, ifname) = iface::select_address(cfg.socket_ifname.as_deref(), cfg.socket_family, rendezvous)?;
        Ok(TcpOptions {
            lanes: cfg.nsocks,
            ifname: Some(ifname),
            activation_timeout: cfg.init_timeout,
            ..TcpOptions::new(addr, rank)
        })
    }
}

/// Sockets of one peer's connection arriving lane by lane.
#[derive(Debug)]
struct Arriving {
    lanes: u16,
    /// Lanes whose Hello was accepted (the Verdict may still be on its way).
    reserved: Vec<bool>,
    socks: Vec<Option<Socket>>,
}

impl Arriving {
    fn complete(&self) -> bool {
        self.socks.iter().all(Option::is_some)
    }
}

#[derive(Debug, Default)]
struct Arrivals {
    peers: HashMap<u32, Arriving>,
    /// Peers whose connection `accept` already took; a second one is refused.
    taken: HashSet<u32>,
}

/// State shared by the transport, its acceptor thread and the handshake threads.
type Shared = Listening<Arrivals>;

/// A peer's connected, handshaken sockets in lane order, before they become a connection:
/// what [`TcpTransport::connect_lanes`] and [`TcpTransport::accept_lanes`] return (the devmem
/// transport builds its own connection over them).
#[derive(Debug)]
pub struct Lanes {
    /// This rank.
    pub me: Rank,
    /// The peer.
    pub peer: Rank,
    /// The peer's address (its listener for a connector, its socket for an acceptor).
    pub remote: SocketAddr,
    /// The sockets, lane 0 first (blocking, with the handshake's timeouts still set).
    pub socks: Vec<Socket>,
}

/// The TCP transport: one listener per process and communicator, several sockets (lanes)
/// per peer connection, an authenticated handshake on each socket.
///
/// Created before the rendezvous (it listens at once and publishes its
/// [`endpoint`](Transport::endpoint)); incoming handshakes are validated by a background
/// acceptor against the [`CommContext`] given to [`activate`](Transport::activate). By the
/// communicator's convention the lower rank connects and the higher rank accepts.
///
/// The same listener and handshake serve the devmem transport (a devmem connection is a set
/// of TCP sockets): with [`TcpOptions::kind`] = `Devmem` the Hello names devmem and carries
/// devmem's tag domain, and the devmem transport takes the sockets with
/// [`TcpTransport::connect_lanes`] / [`TcpTransport::accept_lanes`].
#[derive(Debug)]
pub struct TcpTransport {
    shared: Arc<Shared>,
    local: SocketAddr,
    opts: TcpOptions,
    ifname: String,
    host: String,
}

impl TcpTransport {
    /// Bind the listener on `opts.addr:opts.port` and start the acceptor thread.
    pub fn new(opts: TcpOptions) -> Result<TcpTransport> {
        if opts.addr.is_unspecified() {
            return Err(Error::usage(format!(
                "TCP transport address {} is unspecified; peers need a reachable address (see select_address)",
                opts.addr
            )));
        }
        if opts.lanes == 0 || opts.lanes > usize::from(handshake::MAX_LANES) {
            return Err(Error::usage(format!(
                "TCP lanes = {} is out of range 1..={}",
                opts.lanes,
                handshake::MAX_LANES
            )));
        }
        if !matches!(opts.kind, TransportKind::Tcp | TransportKind::Devmem) {
            return Err(Error::usage(format!("a TCP listener cannot serve the {} transport", opts.kind)));
        }
        let bind = SocketAddr::new(opts.addr, opts.port);
        let sys = |what: &str| {
            let what = format!("{what} TCP listener on {bind}");
            move |e| Error::system(what, e)
        };
        let listener =
            Socket::new(Domain::for_address(bind), Type::STREAM, Some(Protocol::TCP)).map_err(sys("create"))?;
        // A fixed port must be reusable right after a previous run's sockets linger in
        // TIME_WAIT.
        listener.set_reuse_address(true).map_err(sys("configure"))?;
        if let Some(n) = opts.socket_buffer {
            // Set on the listener so accepted sockets inherit it before the window scale
            // is negotiated.
            listener.set_recv_buffer_size(n).map_err(sys("size buffers of"))?;
            listener.set_send_buffer_size(n).map_err(sys("size buffers of"))?;
        }
        listener.bind(&SockAddr::from(bind)).map_err(sys("bind"))?;
        listener.listen(1024).map_err(sys("listen on"))?;
        listener.set_nonblocking(true).map_err(sys("configure"))?;
        let local = listener
            .local_addr()
            .map_err(sys("query"))?
            .as_socket()
            .ok_or_else(|| Error::Internal("TCP listener has a non-IP address".into()))?;
        let name = format!("{} {local}", if opts.kind == TransportKind::Tcp { "TCP" } else { "devmem" });
        let shared: Arc<Shared> =
            Arc::new(Listening::new(opts.kind, name, opts.handshake_timeout, opts.activation_timeout)?);
        let kind = opts.kind;
        shared.start(format!("devccl-{kind}-accept-{}", local.port()), move |s| acceptor_loop(s, listener, local))?;
        let ifname = opts.ifname.clone().or_else(|| iface::interface_of(opts.addr)).unwrap_or_else(|| "?".into());
        let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
        tracing::debug!(%local, ifname, lanes = opts.lanes, "{kind} transport listening");
        Ok(TcpTransport { shared, local, opts, ifname, host })
    }

    /// The address the listener is bound to (with the actual port).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The interface the listener's address belongs to (`?` when unknown).
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Incoming connections refused so far: invalid or unauthenticated handshakes, clients
    /// that sent nothing before the handshake deadline, and connections turned away because
    /// too many handshakes were in progress.
    pub fn rejected_handshakes(&self) -> u64 {
        self.shared.rejected()
    }

    /// The options this transport was created with.
    pub fn options(&self) -> &TcpOptions {
        &self.opts
    }

    /// The communicator this transport was activated for.
    pub fn context(&self) -> Result<CommContext> {
        self.shared.ctx()
    }

    /// Open [`TcpOptions::lanes`] sockets to `peer` (which published `remote`) and run the
    /// handshake on each. Blocks until done or `deadline`.
    pub fn connect_lanes(&self, peer: Rank, remote: &Endpoint, deadline: Instant) -> Result<Lanes> {
        let ctx = self.shared.ctx()?;
        let kind = self.opts.kind;
        if remote.kind != kind {
            return Err(Error::usage(format!("rank {peer} published a {} endpoint, not {kind}", remote.kind)));
        }
        let addr: SocketAddr = remote.address.parse().map_err(|_| {
            Error::remote(peer, format!("rank {peer} published an invalid {kind} address {:?}", remote.address))
        })?;
        let start = Instant::now();
        let limit = deadline.saturating_duration_since(start);
        let lanes = self.opts.lanes as u16;
        let mut socks = Vec::with_capacity(lanes.into());
        for lane in 0..lanes {
            let sock = connect_socket(addr, deadline, self.opts.socket_buffer).map_err(|last| Error::Timeout {
                what: format!(
                    "rank {} connecting to rank {peer} at {addr} (lane {lane} of {lanes}); last error: {last}",
                    ctx.rank
                ),
                after: limit,
            })?;
            let dial = handshake::Dial { kind, peer, remote: addr, lane, lanes, deadline, limit };
            handshake::connector_handshake(&sock, &ctx, &dial)?;
            socks.push(sock);
        }
        tracing::debug!(rank = %ctx.rank, %peer, %addr, lanes, "{kind} connection established (connector)");
        Ok(Lanes { me: ctx.rank, peer, remote: addr, socks })
    }

    /// Wait for `peer`'s sockets (all its lanes, handshaken). Blocks until done or
    /// `deadline`.
    pub fn accept_lanes(&self, peer: Rank, deadline: Instant) -> Result<Lanes> {
        let me = self.shared.rank_or(self.opts.rank);
        let take = |g: &mut Arrivals| {
            if !g.peers.get(&peer.0).is_some_and(Arriving::complete) {
                return None;
            }
            let arriving = g.peers.remove(&peer.0).expect("present");
            g.taken.insert(peer.0);
            Some(arriving.socks.into_iter().map(|s| s.expect("complete")).collect::<Vec<Socket>>())
        };
        let pending = |g: &Arrivals| {
            let (got, of) = g.peers.get(&peer.0).map_or((0, 0), |a| (a.socks.iter().flatten().count(), a.lanes));
            format!("{got} of {of} lanes arrived; ")
        };
        let socks = self.shared.wait_for(me, peer, deadline, take, pending)?;
        let addr = socks[0].peer_addr().ok().and_then(|a| a.as_socket()).unwrap_or(self.local);
        let me = self.shared.rank_or(self.opts.rank);
        tracing::debug!(rank = %me, %peer, %addr, lanes = socks.len(), "{} connection established (acceptor)", self.opts.kind);
        Ok(Lanes { me, peer, remote: addr, socks })
    }
}

fn connect_socket(remote: SocketAddr, deadline: Instant, buf: Option<usize>) -> std::result::Result<Socket, String> {
    let mut backoff = Duration::from_millis(5);
    let mut last = String::from("no attempt");
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(last);
        }
        let attempt = (|| {
            let s = Socket::new(Domain::for_address(remote), Type::STREAM, Some(Protocol::TCP))?;
            if let Some(n) = buf {
                s.set_recv_buffer_size(n)?;
                s.set_send_buffer_size(n)?;
            }
            s.connect_timeout(&SockAddr::from(remote), deadline - now)?;
            Ok::<_, std::io::Error>(s)
        })();
        match attempt {
            Ok(s) => return Ok(s),
            // Not listening yet, or a listen queue overflowing: retry until the deadline.
            Err(e) => last = e.to_string(),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(last);
        }
        std::thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(Duration::from_millis(250));
    }
}

impl Transport for TcpTransport {
    fn kind(&self) -> TransportKind {
        self.opts.kind
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            kind: self.opts.kind,
            address: self.local.to_string(),
            caps: vec![
                ("lanes".into(), self.opts.lanes.to_string()),
                ("host".into(), self.host.clone()),
                ("ifname".into(), self.ifname.clone()),
            ],
        }
    }

    fn properties(&self) -> LinkProperties {
        LinkProperties {
            name: format!("tcp {} {} lanes", self.ifname, self.opts.lanes),
            speed_mbps: link_speed_mbps(&self.ifname),
            latency_us: LATENCY_ESTIMATE_US,
            max_inflight: MAX_INFLIGHT,
            lanes: self.opts.lanes,
            scattered_rx: false,
            device_memory: false,
        }
    }

    fn activate(&self, ctx: CommContext) -> Result<()> {
        self.shared.activate(ctx, self.opts.rank)
    }

    fn connect(&self, peer: Rank, remote: &Endpoint, deadline: Instant) -> Result<Box<dyn Connection>> {
        let l = self.connect_lanes(peer, remote, deadline)?;
        Ok(Box::new(TcpConnection::new(l.me, peer, l.remote, l.socks)?))
    }

    fn accept(&self, peer: Rank, deadline: Instant) -> Result<Box<dyn Connection>> {
        let l = self.accept_lanes(peer, deadline)?;
        Ok(Box::new(TcpConnection::new(l.me, peer, l.remote, l.socks)?))
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("rejected_handshakes", self.rejected_handshakes())]
    }

    fn close(&self) {
        // Sockets whose connection was never accepted are closed with the table.
        self.shared.close(|a| a.peers.clear());
    }
}

/// The link speed of `ifname` in Mbit/s from sysfs (0: unknown; loopback reports an error).
pub fn link_speed_mbps(ifname: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/speed"))
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|&s| s > 0)
        .map_or(0, |s| s as u64)
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.close();
    }
}

fn acceptor_loop(shared: &Arc<Shared>, listener: Socket, local: SocketAddr) {
    let what = shared.name().to_owned();
    let accept = || listener.accept();
    handshake::accept_until_closed(&listener, shared.wake_fd(), shared.closed_flag(), &what, accept, |(sock, addr)| {
        let remote = addr.as_socket().unwrap_or(local);
        let serve = move |s: &Shared| {
            if let Err(reason) = serve_handshake(s, sock, remote) {
                s.reject(&remote.to_string(), &reason);
            }
        };
        if let Err(why) = handshake::spawn_handshake(shared, |s| &s.handshakes, "devccl-tcp-handshake", serve) {
            shared.reject(&remote.to_string(), &why);
        }
    });
}

/// Run one incoming handshake. `Ok` means the socket was handed to a waiting `accept`;
/// `Err` carries the reason for the log (the socket is closed on return).
fn serve_handshake(shared: &Shared, sock: Socket, remote: SocketAddr) -> std::result::Result<(), String> {
    let deadline = Instant::now() + shared.handshake_timeout;
    let nonce = auth::nonce();
    let hello = handshake::acceptor_read_hello(&sock, nonce, deadline).map_err(|s| s.describe("handshake hello"))?;
    let ctx = shared.wait_ctx().ok_or_else(|| {
        format!("Hello from rank {} arrived but this transport was not activated in time", hello.from)
    })?;
    let (mut status, mut why) = handshake::judge_hello(shared.kind(), &ctx, &nonce, &hello);
    let (from, lane) = (hello.from.0, usize::from(hello.lane));
    if status == VerdictStatus::Ok {
        let mut g = shared.arrivals();
        if g.taken.contains(&from) {
            (status, why) = (VerdictStatus::BadLane, format!("rank {from} is already connected"));
        } else {
            let a = g.peers.entry(from).or_insert_with(|| Arriving {
                lanes: hello.lanes,
                reserved: vec![false; hello.lanes.into()],
                socks: (0..hello.lanes).map(|_| None).collect(),
            });
            if a.lanes != hello.lanes {
                (status, why) = (
                    VerdictStatus::BadLane,
                    format!("lane count {} differs from earlier lanes' {}", hello.lanes, a.lanes),
                );
            } else if a.reserved[lane] {
                (status, why) = (VerdictStatus::BadLane, format!("duplicate lane {lane}"));
            } else {
                a.reserved[lane] = true;
            }
        }
    }
    // The Verdict is written outside the lock: a client that does not read cannot stall
    // other handshakes (8 bytes into an empty send buffer do not block in practice, but
    // the deadline bounds it regardless).
    let verdict_deadline = Instant::now() + shared.handshake_timeout;
    let wrote = handshake::write_all_by(&sock, &Verdict { status }.encode(), verdict_deadline);
    if status != VerdictStatus::Ok {
        return Err(format!(
            "Hello from rank {} (lane {lane} of {}): {}: {why}",
            hello.from,
            hello.lanes,
            status.explain()
        ));
    }
    let mut g = shared.arrivals();
    if let Err(s) = wrote {
        if let Some(a) = g.peers.get_mut(&from) {
            a.reserved[lane] = false;
        }
        return Err(format!("rank {from} lane {lane}: {}", s.describe("verdict")));
    }
    match g.peers.get_mut(&from) {
        Some(a) => a.socks[lane] = Some(sock),
        // close() cleared the table meanwhile.
        None => return Err("transport closed during the handshake".into()),
    }
    drop(g);
    shared.notify_arrivals();
    tracing::debug!(%remote, rank = %hello.from, lane, lanes = hello.lanes, "accepted {} lane", shared.kind());
    Ok(())
}
