//! The devmem transport over the simulated kernel, in one process: the shared transport
//! conformance suite with a host RX pool and with a Vulkan RX pool (lavapipe in CI; skipped
//! without a Vulkan device unless `DEVCCL_REQUIRE_VULKAN=1`), spills, an exhausted pool,
//! garbage cmsgs injected through the seam, tokens returned only after `recv_consumed`, TX
//! bindings and completions, and the real kernel's refusal on this machine.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devccl_core::config::{DevmemConfig, DevmemKernelKind};
use devccl_core::device::Device;
use devccl_core::memory::{DeviceId, Region};
use devccl_core::testing::conformance::{self, Pair};
use devccl_core::transport::CommContext;
use devccl_core::transport::{Completion, RecvLayout, RecvRequest, SendRequest, Transport, TransportKind};
use devccl_core::{CommId, Error, Rank};
use devccl_transport_devmem::seam::{DevmemKernel, KernelBinding, KernelSteering};
use devccl_transport_devmem::sim::{FragSizing, SimKernel, SimOptions};
use devccl_transport_devmem::transport::{DevmemOptions, DevmemTransport, open_kernel};
use devccl_transport_tcp::TcpOptions;

fn init_logs() {
    let _ = tracing_subscriber::fmt().with_env_filter(std::env::var("RUST_LOG").unwrap_or_default()).try_init();
}

fn sim(opts: SimOptions) -> Arc<dyn DevmemKernel> {
    Arc::new(SimKernel::new(opts).unwrap())
}

fn options(rank: u32, kernel: Arc<dyn DevmemKernel>, dev: Arc<dyn Device>, pool: usize) -> DevmemOptions {
    DevmemOptions {
        tcp: TcpOptions { lanes: 2, ..TcpOptions::new(IpAddr::V4(Ipv4Addr::LOCALHOST), Rank(rank)) },
        kernel,
        pool_device: dev,
        pool_bytes: pool,
        ifname: "lo".into(),
        queues: vec![0],
        stall_limit: Duration::from_secs(2),
    }
}

/// Two transports (ranks 0 and 1) sharing one simulated NIC, activated for one communicator.
fn transports(kernel: Arc<dyn DevmemKernel>, dev: Arc<dyn Device>, pool: usize) -> (DevmemTransport, DevmemTransport) {
    let a = DevmemTransport::new(options(0, kernel.clone(), dev.clone(), pool)).unwrap();
    let b = DevmemTransport::new(options(1, kernel, dev, pool)).unwrap();
    let comm = CommId([9; 16]);
    a.activate(CommContext { comm, rank: Rank(0), world: 2, key: None }).unwrap();
    b.activate(CommContext { comm, rank: Rank(1), world: 2, key: None }).unwrap();
    (a, b)
}

fn connect(a: &DevmemTransport, b: &DevmemTransport) -> Pair {
    let far = Instant::now() + Duration::from_secs(10);
    std::thread::scope(|s| {
        let acc = s.spawn(|| b.accept(Rank(0), far).unwrap());
        let c = a.connect(Rank(1), &b.endpoint(), far).unwrap();
        (c, acc.join().unwrap())
    })
}

fn vulkan() -> Option<Arc<dyn Device>> {
    match devccl_device::open(DeviceId::Vulkan(0)) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                std::env::var("DEVCCL_REQUIRE_VULKAN").as_deref() != Ok("1"),
                "DEVCCL_REQUIRE_VULKAN=1 but no Vulkan device: {e}"
            );
            println!("skipped: no Vulkan device: {e}");
            None
        }
    }
}

fn unpacker() -> Arc<conformance::Unpacker> {
    Arc::new(|pool: &Region| {
        let id = pool.kind().device().ok_or_else(|| Error::Internal("pool without a device".into()))?;
        devccl_device::open(id)
    })
}

/// Run the conformance suite: every check gets a fresh pair of transports (sharing the
/// process's RX pool on the simulated NIC) and connects them. Returns the counters summed
/// over every transport made.
fn conformance_on(kernel: Arc<dyn DevmemKernel>, dev: Arc<dyn Device>, pool: usize) -> HashMap<&'static str, u64> {
    let made: Mutex<Vec<(DevmemTransport, DevmemTransport)>> = Mutex::new(Vec::new());
    let pair = || {
        let (a, b) = transports(kernel.clone(), dev.clone(), pool);
        let p = connect(&a, &b);
        made.lock().unwrap().push((a, b));
        p
    };
    conformance::run_all_with(&pair, unpacker()).unwrap();
    let mut sum = HashMap::new();
    for (a, b) in made.into_inner().unwrap() {
        for (k, v) in a.stats().into_iter().chain(b.stats()) {
            *sum.entry(k).or_insert(0) += v;
        }
    }
    sum
}

#[test]
fn conforms_with_a_host_pool() {
    init_logs();
    let c = conformance_on(sim(SimOptions::default()), devccl_core::device::host(), 64 << 20);
    assert!(c["rx_fragments"] > 0 && c["rx_linear_spills"] > 0, "{c:?}");
    assert_eq!(c["tokens_outstanding"], 0, "{c:?}");
}

#[test]
fn conforms_with_a_vulkan_pool() {
    init_logs();
    let Some(dev) = vulkan() else { return };
    let c = conformance_on(sim(SimOptions::default()), dev, 32 << 20);
    assert!(c["rx_fragments"] > 0, "{c:?}");
    assert_eq!(c["tokens_outstanding"], 0, "{c:?}");
}

#[test]
fn conforms_when_every_byte_spills() {
    let k = sim(SimOptions { linear_spill: 1.0, ..SimOptions::default() });
    let c = conformance_on(k, devccl_core::device::host(), 16 << 20);
    assert_eq!(c["rx_fragments"], 0, "{c:?}");
    assert!(c["rx_linear_bytes"] > 4 << 20, "{c:?}");
}

/// Send `len` bytes a -> b; returns b's completion and the destination.
fn one_message(pair: &mut Pair, len: usize, seed: u64) -> (Completion, Region, devccl_core::transport::ReqId) {
    let (a, b) = pair;
    let h = conformance::header(1, 0, len);
    let src = Region::from_vec(conformance::pattern(seed, len));
    let dst = Region::alloc(len);
    let r = b.irecv(RecvRequest { expect: h, dst: dst.full() }).unwrap().unwrap();
    let s = a.isend(SendRequest { header: h, src: src.full() }).unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut rc, mut sc) = (None, None);
    while rc.is_none() || sc.is_none() {
        if sc.is_none() {
            sc = a.test(s).unwrap();
        }
        if rc.is_none() {
            rc = b.test(r).unwrap();
        }
        assert!(Instant::now() < deadline, "message of {len} bytes did not arrive");
    }
    (rc.unwrap(), dst, r)
}

#[test]
fn tokens_stay_out_until_the_receive_is_consumed() {
    let k = SimKernel::new(SimOptions { linear_spill: 0.0, frag_sizing: FragSizing::Mss, ..SimOptions::default() })
        .unwrap();
    let (a, b) = transports(Arc::new(k.clone()), devccl_core::device::host(), 16 << 20);
    let mut pair = connect(&a, &b);
    let (done, dst, r) = one_message(&mut pair, 1 << 20, 3);
    let Completion::Received { layout: RecvLayout::Scattered { pool, frags, spill }, .. } = done else {
        panic!("expected a scattered receive")
    };
    assert!(spill.is_none());
    assert!(frags.len() >= (1 << 20) / 1448, "{} fragments", frags.len());
    let held = k.stats().tokens_outstanding;
    assert_eq!(held as usize, frags.len(), "one token per fragment, all held");
    devccl_core::scatter::gather(&devccl_core::device::HostDevice, &dst.full(), &pool, &frags, None).unwrap();
    assert_eq!(dst.full().to_vec().unwrap(), conformance::pattern(3, 1 << 20));
    assert_eq!(k.stats().tokens_outstanding, held, "not returned before recv_consumed");
    pair.1.recv_consumed(r).unwrap();
    let s = k.stats();
    assert_eq!(s.tokens_outstanding, 0, "{s:?}");
    let c: HashMap<_, _> = b.stats().into_iter().collect();
    assert_eq!(c["tokens_outstanding"], 0);
    assert_eq!(c["tokens_returned"], held);
    // Merged into ranges: far fewer calls than 128-range batches of single tokens.
    assert!(c["dontneed_calls"] <= held.div_ceil(1024) + 1, "{c:?}");
    // TX: heap memory goes as ordinary bytes (counted), exportable memory zero-copy.
    let ca: HashMap<_, _> = a.stats().into_iter().collect();
    assert_eq!((ca["tx_fallback_sends"], ca["tx_devmem_sends"]), (1, 0), "{ca:?}");
    let (src, _) = devccl_core::device::HostDevice.alloc_exportable(300_000).unwrap();
    src.full().with_bytes_mut(|b| b.copy_from_slice(&conformance::pattern(5, 300_000))).unwrap();
    let h = conformance::header(1, 1, 300_000);
    let dst = Region::alloc(300_000);
    let (ca, cb) = &mut pair;
    let r = cb.irecv(RecvRequest { expect: h, dst: dst.full() }).unwrap().unwrap();
    let s = ca.isend(SendRequest { header: h, src: src.full() }).unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut rc, mut sc) = (None, None);
    while rc.is_none() || sc.is_none() {
        sc = sc.or(ca.test(s).unwrap());
        rc = rc.or(cb.test(r).unwrap());
        assert!(Instant::now() < deadline);
    }
    let Some(Completion::Received { layout: RecvLayout::Scattered { pool, frags, spill }, .. }) = rc else { panic!() };
    devccl_core::scatter::gather(&devccl_core::device::HostDevice, &dst.full(), &pool, &frags, spill.as_ref()).unwrap();
    cb.recv_consumed(r).unwrap();
    assert_eq!(dst.full().to_vec().unwrap(), conformance::pattern(5, 300_000));
    let ca: HashMap<_, _> = a.stats().into_iter().collect();
    assert!(ca["tx_devmem_sends"] >= 1 && ca["tx_completions"] >= 1 && ca["tx_bindings"] == 1, "{ca:?}");
    assert_eq!(a.tx_bindings(), 1);
    drop(src);
    assert_eq!(a.tx_bindings(), 0, "the binding goes with the memory");
}

#[test]
fn a_full_pool_stalls_then_fails_naming_its_size() {
    let k = sim(SimOptions { linear_spill: 0.0, ..SimOptions::default() });
    let (a, b) = transports(k, devccl_core::device::host(), 1 << 20);
    let (mut s, mut r) = connect(&a, &b);
    let len = 4 << 20;
    let h = conformance::header(1, 0, len);
    let src = Region::from_vec(conformance::pattern(1, len));
    let dst = Region::alloc(len);
    let rid = r.irecv(RecvRequest { expect: h, dst: dst.full() }).unwrap().unwrap();
    let sid = s.isend(SendRequest { header: h, src: src.full() }).unwrap().unwrap();
    let t = Instant::now();
    let err = loop {
        let _ = s.test(sid);
        match r.test(rid) {
            Ok(None) => {}
            Ok(Some(c)) => panic!("a 4 MiB message cannot fit a 1 MiB pool: {c:?}"),
            Err(e) => break e,
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no error");
        std::thread::sleep(Duration::from_micros(200));
    };
    let msg = err.to_string();
    assert!(t.elapsed() >= Duration::from_secs(2), "stalled first ({:?})", t.elapsed());
    assert!(msg.contains("RX pool (1048576 bytes") && msg.contains("DEVCCL_DEVMEM_POOL_BYTES"), "{msg}");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    r.cancel();
    drop((s, r));
    let c: HashMap<_, _> = b.stats().into_iter().collect();
    assert_eq!(c["tokens_outstanding"], 0, "{c:?}");
    assert!(c["rx_pool_stalls"] >= 1);
}

/// The simulated kernel with every RX control buffer corrupted after `after` good calls.
#[derive(Debug)]
struct Garbage {
    inner: SimKernel,
    armed: AtomicBool,
    seen: Mutex<u32>,
}

impl DevmemKernel for Garbage {
    fn name(&self) -> &'static str {
        "sim+garbage"
    }
    fn bind_rx(
        &self,
        i: u32,
        fd: BorrowedFd<'_>,
        q: &[u32],
    ) -> devccl_transport_devmem::Result<Box<dyn KernelBinding>> {
        self.inner.bind_rx(i, fd, q)
    }
    fn bind_tx(&self, i: u32, fd: BorrowedFd<'_>) -> devccl_transport_devmem::Result<Box<dyn KernelBinding>> {
        self.inner.bind_tx(i, fd)
    }
    fn steer(&self, i: u32, s: BorrowedFd<'_>, q: u32) -> devccl_transport_devmem::Result<Box<dyn KernelSteering>> {
        self.inner.steer(i, s, q)
    }
    fn setup_socket(&self, s: BorrowedFd<'_>) -> io::Result<()> {
        self.inner.setup_socket(s)
    }
    fn recvmsg_devmem(&self, s: BorrowedFd<'_>, linear: &mut [u8], control: &mut [u8]) -> io::Result<(usize, usize)> {
        let (n, c) = self.inner.recvmsg_devmem(s, linear, control)?;
        if self.armed.load(Ordering::Relaxed) && c > 0 {
            *self.seen.lock().unwrap() += 1;
            control[0] = 0xff; // cmsg_len larger than the buffer
        }
        Ok((n, c))
    }
    fn dontneed(&self, s: BorrowedFd<'_>, t: &[u8]) -> io::Result<u32> {
        self.inner.dontneed(s, t)
    }
    fn sendmsg_devmem(&self, s: BorrowedFd<'_>, b: u32, r: &[(u64, usize)]) -> io::Result<usize> {
        self.inner.sendmsg_devmem(s, b, r)
    }
    fn read_errqueue(&self, s: BorrowedFd<'_>, c: &mut [u8]) -> io::Result<usize> {
        self.inner.read_errqueue(s, c)
    }
    fn close_socket(&self, s: BorrowedFd<'_>) {
        self.inner.close_socket(s)
    }
}

#[test]
fn garbage_cmsgs_are_a_clear_error_and_leak_nothing() {
    let inner = SimKernel::new(SimOptions { linear_spill: 0.0, ..SimOptions::default() }).unwrap();
    let g = Arc::new(Garbage { inner: inner.clone(), armed: AtomicBool::new(false), seen: Mutex::new(0) });
    let (a, b) = transports(g.clone(), devccl_core::device::host(), 16 << 20);
    let mut pair = connect(&a, &b);
    let (done, _dst, r) = one_message(&mut pair, 100_000, 1);
    assert!(matches!(done, Completion::Received { .. }));
    pair.1.recv_consumed(r).unwrap();
    g.armed.store(true, Ordering::Relaxed);
    let (mut s, mut rx) = pair;
    let h = conformance::header(1, 1, 100_000);
    let src = Region::from_vec(vec![7u8; 100_000]);
    let dst = Region::alloc(100_000);
    let rid = rx.irecv(RecvRequest { expect: h, dst: dst.full() }).unwrap().unwrap();
    let sid = s.isend(SendRequest { header: h, src: src.full() }).unwrap().unwrap();
    let t = Instant::now();
    let err = loop {
        let _ = s.test(sid);
        match rx.test(rid) {
            Ok(None) => {}
            Ok(Some(c)) => panic!("garbage accepted: {c:?}"),
            Err(e) => break e,
        }
        assert!(t.elapsed() < Duration::from_secs(10));
    };
    let msg = err.to_string();
    assert!(msg.contains("not devmem cmsgs") && msg.contains("rank 0") && msg.contains("sim+garbage"), "{msg}");
    rx.cancel();
    drop((s, rx));
    assert_eq!(inner.stats().tokens_outstanding, 0, "{:?}", inner.stats());
}

#[test]
fn the_real_kernel_refuses_here_with_its_classified_answer() {
    let cfg = DevmemConfig { kernel: DevmemKernelKind::Real, ..DevmemConfig::default() };
    let kernel = match open_kernel(&cfg) {
        Ok(k) => k,
        Err(r) => {
            // A kernel without the netdev family: that is the refusal.
            assert!(r.reason.contains("kernel"), "{r}");
            println!("real kernel refused at the family: {r}");
            return;
        }
    };
    for ifname in ["lo", "eth0"] {
        if devccl_transport_devmem::sys::iface::if_nametoindex(ifname).is_none() {
            continue;
        }
        let mut o = options(0, kernel.clone(), devccl_core::device::host(), 4 << 20);
        o.ifname = ifname.into();
        match DevmemTransport::new(o) {
            Ok(t) => println!("{ifname}: devmem RX bound on the real kernel: {:?}", t.properties()),
            Err(r) => {
                println!("{ifname}: {r}");
                assert!(r.reason.contains("bind-rx") && r.reason.contains("fix:"), "{r}");
                assert!(r.verdict.is_some(), "{r}");
            }
        }
    }
    let _ = TransportKind::Devmem;
}
