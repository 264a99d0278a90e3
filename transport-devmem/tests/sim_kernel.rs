//! The simulated kernel (`sim::SimKernel`) driven through the seam over real loopback TCP
//! socket pairs: golden cmsg bytes, token numbering, `SO_DEVMEM_DONTNEED` limits, pool
//! exhaustion, linear spills, partial control buffers, TX completions, binding validation.
//! No privilege needed.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use devccl_transport_devmem::Error;
use devccl_transport_devmem::seam::{DevmemKernel, ERRQUEUE_CONTROL_LEN, RX_CMSG_SPACE};
use devccl_transport_devmem::sim::{Exhaustion, FragSizing, SimKernel, SimOptions};
use devccl_transport_devmem::sys::cmsg::{
    self, DmabufCmsg, DmabufToken, ErrqueueEntry, IP_RECVERR, IPV6_RECVERR, RxCmsg, SOL_IP, SOL_IPV6, ZcCompletion,
};
use devccl_transport_devmem::sys::{errno, placeholder_fd, sock};

const LO: u32 = 1;

fn kernel(opts: SimOptions) -> SimKernel {
    SimKernel::new(opts).unwrap()
}

fn opts() -> SimOptions {
    SimOptions { linear_spill: 0.0, frag_sizing: FragSizing::Page, ..SimOptions::default() }
}

/// A memfd of `len` bytes (the RX pool / TX buffer), readable with `read_at`.
fn memfd(len: u64) -> File {
    let f = File::from(placeholder_fd().unwrap());
    f.set_len(len).unwrap();
    f
}

fn tcp_pair_at(addr: &str) -> Option<(TcpStream, TcpStream)> {
    let l = TcpListener::bind(addr).ok()?;
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    for x in [&c, &s] {
        x.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        x.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    Some((c, s))
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    tcp_pair_at("127.0.0.1:0").unwrap()
}

fn wait_inq(s: BorrowedFd<'_>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while sock::inq(s).unwrap() < n {
        assert!(Instant::now() < deadline, "data did not arrive");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// A receiving end: pool memfd, binding, steered server socket, sending client.
struct Rx {
    k: SimKernel,
    pool: File,
    _binding: Box<dyn devccl_transport_devmem::seam::KernelBinding>,
    _steer: Box<dyn devccl_transport_devmem::seam::KernelSteering>,
    client: TcpStream,
    server: TcpStream,
}

fn rx_setup(opts: SimOptions, pool_bytes: u64) -> Rx {
    let k = kernel(opts);
    let pool = memfd(pool_bytes);
    let binding = k.bind_rx(LO, pool.as_fd(), &[3]).unwrap();
    let (client, server) = tcp_pair();
    let steer = k.steer(LO, server.as_fd(), 3).unwrap();
    Rx { k, pool, _binding: binding, _steer: steer, client, server }
}

/// What a stream of `recvmsg_devmem` calls delivered.
#[derive(Default)]
struct Got {
    data: Vec<u8>,
    frags: Vec<DmabufCmsg>,
    linear_cmsgs: usize,
    ordinary_calls: usize,
    /// Calls that reported both linear spills and device fragments (the kernel does: a
    /// spilled packet heads an skb whose other packets are in device memory).
    mixed_calls: usize,
    calls: usize,
}

impl Rx {
    fn fd(&self) -> BorrowedFd<'_> {
        self.server.as_fd()
    }

    /// One call; appends what it delivered (payload read back out of the pool).
    fn recv_once(&self, got: &mut Got, linear_len: usize, control_len: usize) -> std::io::Result<usize> {
        let mut linear = vec![0u8; linear_len];
        let mut control = vec![0u8; control_len];
        let (n, c) = self.k.recvmsg_devmem(self.fd(), &mut linear, &mut control)?;
        got.calls += 1;
        let cm = cmsg::parse_rx_cmsgs(&control[..c]).unwrap();
        if cm.is_empty() {
            got.ordinary_calls += (n > 0) as usize;
            got.data.extend_from_slice(&linear[..n]);
            return Ok(n);
        }
        let (mut lin, mut total) = (0, 0);
        let kinds =
            (cm.iter().any(|m| matches!(m, RxCmsg::Linear { .. })), cm.iter().any(|m| matches!(m, RxCmsg::Dmabuf(_))));
        got.mixed_calls += (kinds == (true, true)) as usize;
        for m in cm {
            match m {
                RxCmsg::Linear { size } => {
                    got.data.extend_from_slice(&linear[lin..lin + size as usize]);
                    lin += size as usize;
                    total += size as usize;
                    got.linear_cmsgs += 1;
                }
                RxCmsg::Dmabuf(d) => {
                    let mut b = vec![0u8; d.frag_size as usize];
                    self.pool.read_exact_at(&mut b, d.frag_offset).unwrap();
                    got.data.extend_from_slice(&b);
                    total += d.frag_size as usize;
                    got.frags.push(d);
                }
            }
        }
        assert_eq!(total, n, "cmsg sizes add up to the return value");
        Ok(n)
    }

    /// Receive `total` bytes; `give_back` returns the tokens after every call.
    fn recv_all(&self, total: usize, linear_len: usize, give_back: bool) -> Got {
        let mut got = Got::default();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.data.len() < total {
            assert!(Instant::now() < deadline, "stalled at {} of {total} bytes", got.data.len());
            let before = got.frags.len();
            match self.recv_once(&mut got, linear_len, 64 * RX_CMSG_SPACE) {
                Ok(0) => panic!("end of stream at {} of {total}", got.data.len()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_micros(200)),
                Err(e) => panic!("{e}"),
            }
            if give_back {
                let toks: Vec<DmabufToken> = got.frags[before..]
                    .iter()
                    .map(|d| DmabufToken { token_start: d.frag_token, token_count: 1 })
                    .collect();
                for chunk in toks.chunks(128) {
                    let n = self.k.dontneed(self.fd(), &DmabufToken::encode_all(chunk)).unwrap();
                    assert_eq!(n as usize, chunk.len());
                }
            }
        }
        got
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed).collect()
}

fn tokens_of(frags: &[DmabufCmsg]) -> Vec<u32> {
    frags.iter().map(|d| d.frag_token).collect()
}

fn dontneed(k: &SimKernel, fd: BorrowedFd<'_>, ranges: &[(u32, u32)]) -> std::io::Result<u32> {
    let t: Vec<DmabufToken> = ranges.iter().map(|&(s, c)| DmabufToken { token_start: s, token_count: c }).collect();
    k.dontneed(fd, &DmabufToken::encode_all(&t))
}

// ------------------------------------------------------------------------------------------
// Golden bytes.

/// The bytes of one RX cmsg, laid out from libc's definitions (CMSG_LEN, SOL_SOCKET, the
/// SCM_* values and `struct dmabuf_cmsg`'s field offsets).
fn libc_rx_cmsg(ty: i32, d: &DmabufCmsg) -> Vec<u8> {
    use std::mem::{offset_of, size_of};
    let payload = size_of::<libc::dmabuf_cmsg>();
    let hdr = size_of::<libc::cmsghdr>();
    let mut v = vec![0u8; sock::libc_cmsg_space(payload as u32)];
    v[offset_of!(libc::cmsghdr, cmsg_len)..][..size_of::<usize>()]
        .copy_from_slice(&sock::libc_cmsg_len(payload as u32).to_ne_bytes());
    v[offset_of!(libc::cmsghdr, cmsg_level)..][..4].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
    v[offset_of!(libc::cmsghdr, cmsg_type)..][..4].copy_from_slice(&ty.to_ne_bytes());
    let p = &mut v[hdr..];
    p[offset_of!(libc::dmabuf_cmsg, frag_offset)..][..8].copy_from_slice(&d.frag_offset.to_ne_bytes());
    p[offset_of!(libc::dmabuf_cmsg, frag_size)..][..4].copy_from_slice(&d.frag_size.to_ne_bytes());
    p[offset_of!(libc::dmabuf_cmsg, frag_token)..][..4].copy_from_slice(&d.frag_token.to_ne_bytes());
    p[offset_of!(libc::dmabuf_cmsg, dmabuf_id)..][..4].copy_from_slice(&d.dmabuf_id.to_ne_bytes());
    p[offset_of!(libc::dmabuf_cmsg, flags)..][..4].copy_from_slice(&d.flags.to_ne_bytes());
    v
}

#[test]
fn golden_rx_dmabuf_cmsg() {
    // One 4 KiB niov: the only place a fragment can land is offset 0.
    let rx = rx_setup(opts(), 4096);
    (&rx.client).write_all(&[0xab; 4096]).unwrap();
    wait_inq(rx.fd(), 4096);
    let mut linear = [0u8; 8192];
    let mut control = [0u8; 4 * RX_CMSG_SPACE];
    let (n, c) = rx.k.recvmsg_devmem(rx.fd(), &mut linear, &mut control).unwrap();
    assert_eq!((n, c), (4096, 40));
    #[rustfmt::skip]
    let want: &[u8] = &[
        40, 0, 0, 0, 0, 0, 0, 0,    // cmsg_len = CMSG_LEN(24)
        1, 0, 0, 0,                 // SOL_SOCKET
        79, 0, 0, 0,                // SCM_DEVMEM_DMABUF
        0, 0, 0, 0, 0, 0, 0, 0,     // frag_offset 0
        0, 0x10, 0, 0,              // frag_size 4096
        1, 0, 0, 0,                 // frag_token 1 (XA_FLAGS_ALLOC1: tokens start at 1)
        1, 0, 0, 0,                 // dmabuf_id 1 (first binding)
        0, 0, 0, 0,                 // flags
    ];
    assert_eq!(&control[..c], want);
    let d = DmabufCmsg { frag_offset: 0, frag_size: 4096, frag_token: 1, dmabuf_id: 1, flags: 0 };
    assert_eq!(&control[..c], libc_rx_cmsg(libc::SCM_DEVMEM_DMABUF, &d));
    assert_eq!(cmsg::parse_rx_cmsgs(&control[..c]).unwrap(), vec![RxCmsg::Dmabuf(d)]);
    assert!(linear.iter().all(|&b| b == 0), "device bytes are not copied");
    let mut b = [0u8; 4096];
    rx.pool.read_exact_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0xab), "the simulated NIC wrote the payload into the pool");
}

#[test]
fn golden_rx_linear_cmsg_and_layout_constants() {
    // The local codec's constants are libc's.
    assert_eq!(cmsg::SCM_DEVMEM_DMABUF, libc::SCM_DEVMEM_DMABUF);
    assert_eq!(cmsg::SCM_DEVMEM_LINEAR, libc::SCM_DEVMEM_LINEAR);
    assert_eq!(cmsg::SO_DEVMEM_DMABUF, libc::SO_DEVMEM_DMABUF);
    assert_eq!(cmsg::SO_DEVMEM_LINEAR, libc::SO_DEVMEM_LINEAR);
    assert_eq!(cmsg::SO_DEVMEM_DONTNEED, libc::SO_DEVMEM_DONTNEED);
    assert_eq!(cmsg::SO_ZEROCOPY, libc::SO_ZEROCOPY);
    assert_eq!(cmsg::SOL_SOCKET, libc::SOL_SOCKET);
    assert_eq!(cmsg::MSG_ERRQUEUE, libc::MSG_ERRQUEUE);
    assert_eq!(cmsg::MSG_ZEROCOPY, libc::MSG_ZEROCOPY);
    assert_eq!(DmabufCmsg::SIZE, std::mem::size_of::<libc::dmabuf_cmsg>());
    assert_eq!(std::mem::size_of::<libc::dmabuf_token>(), 8);
    assert_eq!(std::mem::size_of::<libc::sock_extended_err>(), 16);
    assert_eq!(RX_CMSG_SPACE, sock::libc_cmsg_space(24));
    for n in [0u32, 4, 16, 24, 32, 44] {
        assert_eq!(cmsg::cmsg_len(n as usize), sock::libc_cmsg_len(n));
        assert_eq!(cmsg::cmsg_space(n as usize), sock::libc_cmsg_space(n));
    }
    assert_eq!(ERRQUEUE_CONTROL_LEN, sock::libc_cmsg_space(16 + 28));

    let rx = rx_setup(SimOptions { linear_spill: 1.0, ..opts() }, 4096);
    (&rx.client).write_all(b"linear spill!").unwrap();
    wait_inq(rx.fd(), 13);
    let mut linear = [0u8; 64];
    let mut control = [0u8; 2 * RX_CMSG_SPACE];
    let (n, c) = rx.k.recvmsg_devmem(rx.fd(), &mut linear, &mut control).unwrap();
    assert_eq!((n, c), (13, 40));
    #[rustfmt::skip]
    let want: &[u8] = &[
        40, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0,
        78, 0, 0, 0,                // SCM_DEVMEM_LINEAR
        0, 0, 0, 0, 0, 0, 0, 0,     // frag_offset (unused)
        13, 0, 0, 0,                // frag_size: bytes copied into the iovec
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    assert_eq!(&control[..c], want);
    let d = DmabufCmsg { frag_offset: 0, frag_size: 13, frag_token: 0, dmabuf_id: 0, flags: 0 };
    assert_eq!(&control[..c], libc_rx_cmsg(libc::SCM_DEVMEM_LINEAR, &d));
    assert_eq!(&control[..c], cmsg::encode_rx_cmsgs(&[RxCmsg::Linear { size: 13 }]));
    assert_eq!(&linear[..13], b"linear spill!");
    assert_eq!(rx.k.stats().tokens_issued, 0);
}

/// Send on `c` through the simulator and wait until every send is reported complete.
fn tx_setup(k: &SimKernel, c: &TcpStream, len: u64) -> (File, Box<dyn devccl_transport_devmem::seam::KernelBinding>) {
    let buf = memfd(len);
    let b = k.bind_tx(LO, buf.as_fd()).unwrap();
    k.setup_socket(c.as_fd()).unwrap();
    (buf, b)
}

fn read_notification(k: &SimKernel, fd: BorrowedFd<'_>, control: &mut [u8]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match k.read_errqueue(fd, control) {
            Ok(n) => return n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no completion");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn golden_errqueue_completion_v4_and_v6() {
    for (addr, v6) in [("127.0.0.1:0", false), ("[::1]:0", true)] {
        let Some((c, mut s)) = tcp_pair_at(addr) else {
            eprintln!("note: no IPv6 loopback here, {addr} skipped");
            continue;
        };
        let k = kernel(opts());
        let (buf, b) = tx_setup(&k, &c, 8192);
        buf.write_all_at(b"0123456789", 100).unwrap();
        for _ in 0..3 {
            assert_eq!(k.sendmsg_devmem(c.as_fd(), b.id(), &[(100, 10)]).unwrap(), 10);
        }
        let mut got = [0u8; 30];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"012345678901234567890123456789");
        // Wait until the peer acknowledged all three, then read one coalesced notification.
        let deadline = Instant::now() + Duration::from_secs(10);
        while k.socket(c.as_fd()).unwrap().sends_in_flight > 0 {
            let _ = k.read_errqueue(c.as_fd(), &mut [0u8; 0]).err(); // completes without consuming
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut control = [0xaau8; 64];
        let n = read_notification(&k, c.as_fd(), &mut control);
        let (len, level, ty) = if v6 { (60u8, 41u8, 25u8) } else { (48, 0, 11) };
        let mut want = vec![
            len, 0, 0, 0, 0, 0, 0, 0, level, 0, 0, 0, ty, 0, 0, 0, // cmsghdr
            0, 0, 0, 0, // ee_errno 0
            5, 0, 0, 0, // ee_origin ZEROCOPY, ee_type 0, ee_code 0 (device memory: never COPIED)
            0, 0, 0, 0, // ee_info = lo 0
            2, 0, 0, 0, // ee_data = hi 2
        ];
        want.resize(len as usize, 0); // zeroed offender sockaddr
        assert_eq!(n, if v6 { 64 } else { 48 });
        assert_eq!(&control[..len as usize], want);
        if v6 {
            assert_eq!(&control[60..64], &[0xaa; 4], "the kernel does not write CMSG_SPACE padding");
        }
        let (lvl, typ) = if v6 { (SOL_IPV6, IPV6_RECVERR) } else { (SOL_IP, IP_RECVERR) };
        assert_eq!((libc::SOL_IP, libc::IP_RECVERR, libc::SOL_IPV6, libc::IPV6_RECVERR), (0, 11, 41, 25));
        let c0 = &cmsg::parse_cmsgs(&control[..n]).unwrap()[0];
        assert_eq!((c0.level, c0.ty), (lvl, typ));
        assert_eq!(
            cmsg::parse_errqueue(&control[..n]).unwrap(),
            vec![ErrqueueEntry::Zerocopy(ZcCompletion { lo: 0, hi: 2, copied: false })]
        );
        // Same layout as the bytes recorded from this 6.18 kernel (loopback copies, so there
        // ee_code is COPIED = 1; device memory never is).
        let recorded = if v6 { &RECORDED_V6[..] } else { &RECORDED_V4[..] };
        let mut expect = recorded.to_vec();
        expect[22] = 0;
        assert_eq!(&control[..len as usize], &expect[..len as usize]);
        assert_eq!(k.read_errqueue(c.as_fd(), &mut control).unwrap_err().kind(), ErrorKind::WouldBlock);
    }
}

// Copies of sys::recorded::ERRQUEUE_ZEROCOPY_V4 / _V6 (crate-private), recorded on 6.18.
#[rustfmt::skip]
const RECORDED_V4: [u8; 48] = [
    0x30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0b, 0, 0, 0,
    0, 0, 0, 0, 0x05, 0, 0x01, 0, 0, 0, 0, 0, 0x02, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];
#[rustfmt::skip]
const RECORDED_V6: [u8; 64] = [
    0x3c, 0, 0, 0, 0, 0, 0, 0, 0x29, 0, 0, 0, 0x19, 0, 0, 0,
    0, 0, 0, 0, 0x05, 0, 0x01, 0, 0, 0, 0, 0, 0x02, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

#[test]
fn errqueue_truncates_like_put_cmsg() {
    let k = kernel(SimOptions { complete_on_ack: false, ..opts() });
    let (c, _s) = tcp_pair();
    let (_buf, b) = tx_setup(&k, &c, 4096);
    k.sendmsg_devmem(c.as_fd(), b.id(), &[(0, 100)]).unwrap();
    let mut control = [0u8; 24];
    assert_eq!(k.read_errqueue(c.as_fd(), &mut control).unwrap(), 24);
    assert_eq!(&control[..8], &24usize.to_ne_bytes(), "cmsg_len cut to the buffer");
    // The notification was consumed anyway.
    assert_eq!(k.read_errqueue(c.as_fd(), &mut [0u8; 64]).unwrap_err().kind(), ErrorKind::WouldBlock);
    k.sendmsg_devmem(c.as_fd(), b.id(), &[(0, 100)]).unwrap();
    assert_eq!(k.read_errqueue(c.as_fd(), &mut [0u8; 8]).unwrap(), 0, "smaller than a cmsghdr: nothing written");
    assert_eq!(k.stats().tx_notifications, 2);
}

// ------------------------------------------------------------------------------------------
// RX rules.

#[test]
fn tokens_start_at_one_and_reuse_the_lowest_free() {
    let rx = rx_setup(opts(), 64 * 4096);
    (&rx.client).write_all(&pattern(5 * 4096, 1)).unwrap();
    wait_inq(rx.fd(), 5 * 4096);
    let mut got = Got::default();
    rx.recv_once(&mut got, 5 * 4096, 16 * RX_CMSG_SPACE).unwrap();
    assert_eq!(tokens_of(&got.frags), [1, 2, 3, 4, 5]);
    assert_eq!(got.data, pattern(5 * 4096, 1));
    assert!(got.frags.iter().all(|d| d.dmabuf_id == 1 && d.flags == 0 && d.frag_offset % 4096 == 0));
    assert_eq!(dontneed(&rx.k, rx.fd(), &[(2, 1), (4, 1)]).unwrap(), 2);
    (&rx.client).write_all(&[7; 3 * 4096]).unwrap();
    wait_inq(rx.fd(), 3 * 4096);
    let mut got = Got::default();
    rx.recv_once(&mut got, 3 * 4096, 16 * RX_CMSG_SPACE).unwrap();
    assert_eq!(tokens_of(&got.frags), [2, 4, 6], "freed numbers first, lowest first");
    assert_eq!(dontneed(&rx.k, rx.fd(), &[(1, 6)]).unwrap(), 6);
    (&rx.client).write_all(&[8; 4096]).unwrap();
    wait_inq(rx.fd(), 4096);
    let mut got = Got::default();
    rx.recv_once(&mut got, 4096, 4 * RX_CMSG_SPACE).unwrap();
    assert_eq!(tokens_of(&got.frags), [1]);
}

#[test]
fn dontneed_limits_double_free_and_unknown_tokens() {
    let rx = rx_setup(SimOptions { frag_sizing: FragSizing::Mss, mss: 64, ..opts() }, 2048 * 4096);
    // At least 3000 fragments of at most 64 bytes: tokens 1..=N.
    let total = 3000 * 64;
    (&rx.client).write_all(&pattern(total, 2)).unwrap();
    let got = rx.recv_all(total, total, false);
    assert_eq!(got.data, pattern(total, 2));
    let n = got.frags.len() as u32;
    assert_eq!(tokens_of(&got.frags), (1..=n).collect::<Vec<u32>>());
    let k = &rx.k;
    let fd = rx.fd();
    // optlen checks, in the kernel's order.
    assert_eq!(errno_of(&k.dontneed(fd, &[]).unwrap_err()), errno::EINVAL, "optlen 0");
    assert_eq!(errno_of(&k.dontneed(fd, &[0; 3]).unwrap_err()), errno::EINVAL, "optlen < sizeof(int)");
    assert_eq!(errno_of(&k.dontneed(fd, &[0; 7]).unwrap_err()), errno::EINVAL, "not a multiple of 8");
    assert_eq!(errno_of(&dontneed(k, fd, &[(1, 1); 129]).unwrap_err()), errno::EINVAL, "129 ranges");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(errno_of(&k.dontneed(udp.as_fd(), &[0; 8]).unwrap_err()), errno::EBADF);
    assert_eq!(errno_of(&k.dontneed(udp.as_fd(), &[0; 2]).unwrap_err()), errno::EINVAL, "optlen first");
    // 128 ranges are accepted; unknown numbers (0, beyond) free nothing.
    assert_eq!(dontneed(k, fd, &[(0, 1); 128]).unwrap(), 0);
    assert_eq!(dontneed(k, fd, &[(5000, 10)]).unwrap(), 0);
    // One range of 3000: only the first 1024 token numbers are looked at.
    assert_eq!(dontneed(k, fd, &[(1, 3000)]).unwrap(), 1024);
    // Again: 1..=1024 are gone (double free frees nothing) and still count against the limit.
    assert_eq!(dontneed(k, fd, &[(1, 3000)]).unwrap(), 0);
    // Unknown numbers count too: 1000 unknown + 24 known.
    assert_eq!(dontneed(k, fd, &[(1, 1000), (1025, 1000)]).unwrap(), 24);
    assert_eq!(dontneed(k, fd, &[(1049, 952), (2001, 1000)]).unwrap(), 952 + 72);
    assert_eq!(dontneed(k, fd, &[(2073, 928)]).unwrap(), 928);
    assert_eq!(dontneed(k, fd, &[(3001, n - 3000)]).unwrap(), n - 3000);
    let st = k.stats();
    assert_eq!((st.tokens_issued, st.tokens_returned, st.tokens_outstanding), (n as u64, n as u64, 0));
    assert_eq!(st.niovs_free, st.niovs_total);
}

#[test]
fn exhaustion_backpressures_and_resumes_after_dontneed() {
    let rx = rx_setup(opts(), 4 * 4096);
    let total = 256 * 1024;
    let data = pattern(total, 3);
    let writer = {
        let mut c = rx.client.try_clone().unwrap();
        let d = data.clone();
        std::thread::spawn(move || c.write_all(&d).unwrap())
    };
    // Without returning tokens the pool (4 niovs) runs dry after 16 KiB.
    let mut got = Got::default();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rx.recv_once(&mut got, 64 * 1024, 64 * RX_CMSG_SPACE) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if got.data.len() == 4 * 4096 && rx.k.stats().pool_exhausted > 0 {
                    break;
                }
                assert!(Instant::now() < deadline, "{} bytes, stats {:?}", got.data.len(), rx.k.stats());
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(sock::inq(rx.fd()).unwrap() > 0, "the rest waits in the socket");
    assert_eq!(rx.k.pools()[0].free_niovs, 0);
    // Return the tokens: reception resumes (returning after each call from now on).
    let toks: Vec<(u32, u32)> = got.frags.iter().map(|d| (d.frag_token, 1)).collect();
    assert_eq!(dontneed(&rx.k, rx.fd(), &toks).unwrap() as usize, toks.len());
    let rest = rx.recv_all(total - got.data.len(), 64 * 1024, true);
    writer.join().unwrap();
    got.data.extend_from_slice(&rest.data);
    assert_eq!(got.data, data);
    let st = rx.k.stats();
    assert_eq!(st.tokens_outstanding, 0);
    assert_eq!(st.niovs_free, 4);
}

#[test]
fn exhaustion_can_spill_to_linear_instead() {
    let rx = rx_setup(SimOptions { on_exhaustion: Exhaustion::Linear, ..opts() }, 2 * 4096);
    let data = pattern(64 * 1024, 4);
    (&rx.client).write_all(&data).unwrap();
    let got = rx.recv_all(data.len(), 16 * 1024, false);
    assert_eq!(got.data, data);
    assert_eq!(got.frags.len(), 2, "two niovs, never returned");
    assert!(got.linear_cmsgs > 0 && rx.k.stats().pool_exhausted > 0);
}

#[test]
fn scattered_sub_page_out_of_order_fragments_with_spills() {
    let o = SimOptions { linear_spill: 0.1, frag_sizing: FragSizing::Mixed, seed: 42, ..SimOptions::default() };
    let rx = rx_setup(o, 256 * 4096);
    let data = pattern(2 << 20, 5);
    let writer = {
        let mut c = rx.client.try_clone().unwrap();
        let d = data.clone();
        std::thread::spawn(move || c.write_all(&d).unwrap())
    };
    let got = rx.recv_all(data.len(), 128 * 1024, true);
    writer.join().unwrap();
    assert_eq!(got.data, data, "reassembled stream");
    assert!(got.linear_cmsgs > 0, "some packets spilled");
    assert!(got.mixed_calls > 0, "a call may carry spills and fragments together");
    assert_eq!(got.ordinary_calls, 0, "a steered flow never gets ordinary data");
    let f = &got.frags;
    assert!(
        f.iter()
            .all(|d| d.frag_size as u64 <= 4096
                && d.frag_offset / 4096 == (d.frag_offset + d.frag_size as u64 - 1) / 4096)
    );
    assert!(f.iter().any(|d| d.frag_offset % 4096 != 0), "sub-page offsets");
    assert!(f.iter().any(|d| d.frag_size == 1448) && f.iter().any(|d| d.frag_size == 4096), "MSS and page pieces");
    assert!(f.windows(2).any(|w| w[1].frag_offset < w[0].frag_offset), "out of order");
    let mut per_niov = std::collections::HashMap::new();
    for d in f {
        *per_niov.entry(d.frag_offset / 4096).or_insert(0) += 1;
    }
    assert!(per_niov.values().any(|&n| n > 1), "fragments share niovs");
    let st = rx.k.stats();
    assert_eq!(st.tokens_outstanding, 0);
    assert_eq!(st.rx_frag_bytes + st.rx_linear_bytes, data.len() as u64);
}

#[test]
fn linear_only_stream_with_spill_fraction_one() {
    let rx = rx_setup(SimOptions { linear_spill: 1.0, ..opts() }, 4096);
    let data = pattern(300_000, 6);
    (&rx.client).write_all(&data).unwrap();
    let got = rx.recv_all(data.len(), 64 * 1024, false);
    assert_eq!(got.data, data);
    assert!(got.frags.is_empty());
    assert_eq!(got.linear_cmsgs as u64, rx.k.stats().rx_linear_spills);
    assert!(got.linear_cmsgs >= 300_000 / 1448);
    assert_eq!(rx.k.stats().tokens_issued, 0);
}

#[test]
fn partial_control_buffer_returns_short_and_etoosmall_first() {
    let rx = rx_setup(opts(), 16 * 4096);
    let data = pattern(5 * 4096, 7);
    (&rx.client).write_all(&data).unwrap();
    wait_inq(rx.fd(), data.len());
    let mut got = Got::default();
    // Smaller than one cmsg: ETOOSMALL (525), nothing consumed, no token taken.
    for n in [0, 8, 39] {
        let e = rx.recv_once(&mut got, 64 * 1024, n).unwrap_err();
        assert_eq!(errno_of(&e), errno::ETOOSMALL);
    }
    assert_eq!(rx.k.stats().rx_etoosmall, 3);
    // Room for two cmsgs (and a bit): a short return of two fragments.
    assert_eq!(rx.recv_once(&mut got, 64 * 1024, 2 * RX_CMSG_SPACE + 39).unwrap(), 2 * 4096);
    assert_eq!(tokens_of(&got.frags), [1, 2]);
    // A small linear buffer bounds the bytes of a call, cutting a fragment.
    assert_eq!(rx.recv_once(&mut got, 1000, 4 * RX_CMSG_SPACE).unwrap(), 1000);
    assert_eq!(rx.recv_once(&mut got, 64 * 1024, 40 * RX_CMSG_SPACE).unwrap(), 3 * 4096 - 1000);
    assert_eq!(got.data, data);
    let f = &got.frags;
    assert_eq!((f[2].frag_size, f[3].frag_size), (1000, 3096));
    assert_eq!(f[3].frag_offset, f[2].frag_offset + 1000, "the rest of the fragment, with a new token");
    assert_eq!(tokens_of(f), [1, 2, 3, 4, 5, 6]);
    // An empty linear buffer (recvmsg len 0) returns 0 as the kernel does.
    assert_eq!(rx.k.recvmsg_devmem(rx.fd(), &mut [], &mut [0u8; 64]).unwrap_err().kind(), ErrorKind::WouldBlock);
    (&rx.client).write_all(b"x").unwrap();
    wait_inq(rx.fd(), 1);
    assert_eq!(rx.k.recvmsg_devmem(rx.fd(), &mut [], &mut [0u8; 64]).unwrap(), (0, 0));
}

#[test]
fn unsteered_and_pre_steer_bytes_are_ordinary_never_mixed() {
    let k = kernel(opts());
    let pool = memfd(16 * 4096);
    let _b = k.bind_rx(LO, pool.as_fd(), &[0]).unwrap();
    let (mut c, s) = tcp_pair();
    // Not steered: ordinary data, no cmsg — what the real kernel answers.
    c.write_all(b"plain").unwrap();
    wait_inq(s.as_fd(), 5);
    let mut linear = [0u8; 64];
    let mut control = [0u8; 256];
    assert_eq!(k.recvmsg_devmem(s.as_fd(), &mut linear, &mut control).unwrap(), (5, 0));
    assert_eq!(&linear[..5], b"plain");
    // Bytes waiting before the rule stay ordinary; later ones are device memory; no call
    // mixes the two.
    c.write_all(b"before").unwrap();
    wait_inq(s.as_fd(), 6);
    let _steer = k.steer(LO, s.as_fd(), 0).unwrap();
    c.write_all(&[9; 4096]).unwrap();
    wait_inq(s.as_fd(), 6 + 4096);
    assert_eq!(k.recvmsg_devmem(s.as_fd(), &mut linear, &mut control).unwrap(), (6, 0));
    assert_eq!(&linear[..6], b"before");
    let mut big = [0u8; 8192];
    let (n, cl) = k.recvmsg_devmem(s.as_fd(), &mut big, &mut control).unwrap();
    assert_eq!((n, cl), (4096, 40));
    assert!(matches!(cmsg::parse_rx_cmsgs(&control[..cl]).unwrap()[0], RxCmsg::Dmabuf(_)));
    // Steered to a queue without a binding: ordinary.
    let (mut c2, s2) = tcp_pair();
    let _steer2 = k.steer(LO, s2.as_fd(), 5).unwrap();
    c2.write_all(b"unbound queue").unwrap();
    wait_inq(s2.as_fd(), 13);
    assert_eq!(k.recvmsg_devmem(s2.as_fd(), &mut linear, &mut control).unwrap(), (13, 0));
    // End of stream.
    drop(c2);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match k.recvmsg_devmem(s2.as_fd(), &mut linear, &mut control) {
            Ok(r) => break assert_eq!(r, (0, 0)),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(k.stats().rx_ordinary_bytes, 5 + 6 + 13);
}

#[test]
fn close_socket_and_unbind_release_everything() {
    let rx = rx_setup(opts(), 8 * 4096);
    (&rx.client).write_all(&[1; 6 * 4096]).unwrap();
    let got = rx.recv_all(4 * 4096, 4 * 4096, false);
    assert_eq!(got.frags.len(), 4);
    assert_eq!(rx.k.socket(rx.fd()).unwrap().tokens_held, 4);
    wait_inq(rx.fd(), 0);
    // Unbind while tokens are held: the pool drains, the flow turns ordinary.
    let Rx { k, pool, _binding, _steer, client, server } = rx;
    drop(_binding);
    assert!(!k.pools()[0].bound);
    assert_eq!(k.stats().bindings_rx, 0);
    let mut linear = [0u8; 64 * 1024];
    let mut control = [0u8; 64 * RX_CMSG_SPACE];
    // What the NIC had already queued (if anything) still comes as device memory; then
    // ordinary bytes.
    let mut ordinary = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while ordinary == 0 {
        match k.recvmsg_devmem(server.as_fd(), &mut linear, &mut control) {
            Ok((n, 0)) => ordinary += n,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("{e}"),
        }
    }
    // Tokens are still returnable after unbind; close releases what is left.
    assert_eq!(dontneed(&k, server.as_fd(), &[(1, 1)]).unwrap(), 1);
    k.close_socket(server.as_fd());
    let st = k.stats();
    assert_eq!(st.tokens_returned + st.tokens_released_on_close, st.tokens_issued);
    assert_eq!(st.tokens_outstanding, 0);
    assert!(k.pools().is_empty(), "drained pool memory freed: {:?}", k.pools());
    assert!(k.socket(server.as_fd()).is_none());
    drop((pool, _steer, client));
}

#[test]
fn same_seed_same_fragments() {
    let run = || {
        let o = SimOptions { frag_sizing: FragSizing::Mixed, linear_spill: 0.2, seed: 7, ..SimOptions::default() };
        let rx = rx_setup(o, 64 * 4096);
        (&rx.client).write_all(&pattern(100_000, 8)).unwrap();
        wait_inq(rx.fd(), 100_000);
        let got = rx.recv_all(100_000, 200_000, false);
        (got.frags, got.linear_cmsgs)
    };
    assert_eq!(run(), run());
}

// ------------------------------------------------------------------------------------------
// TX.

#[test]
fn tx_sends_and_coalesces_completions() {
    let k = kernel(SimOptions { complete_on_ack: false, ..opts() });
    let (c, mut s) = tcp_pair();
    let (buf, b) = tx_setup(&k, &c, 1 << 20);
    let data = pattern(1 << 20, 9);
    buf.write_all_at(&data, 0).unwrap();
    // Two ranges in one call.
    assert_eq!(k.sendmsg_devmem(c.as_fd(), b.id(), &[(10, 5), (100, 3)]).unwrap(), 8);
    let mut got = [0u8; 8];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got[..5], &data[10..15]);
    assert_eq!(&got[5..], &data[100..103]);
    let ctl_of = |n: &mut [u8]| -> ZcCompletion {
        match cmsg::parse_errqueue(n).unwrap()[0] {
            ErrqueueEntry::Zerocopy(z) => z,
            o => panic!("{o:?}"),
        }
    };
    let mut control = [0u8; 64];
    let n = k.read_errqueue(c.as_fd(), &mut control).unwrap();
    assert_eq!(ctl_of(&mut control[..n]), ZcCompletion { lo: 0, hi: 0, copied: false });
    // Four more before reading: one notification 1..=4.
    for i in 0..4u64 {
        k.sendmsg_devmem(c.as_fd(), b.id(), &[(i * 1000, 1000)]).unwrap();
    }
    let n = k.read_errqueue(c.as_fd(), &mut control).unwrap();
    assert_eq!(ctl_of(&mut control[..n]), ZcCompletion { lo: 1, hi: 4, copied: false });
    assert_eq!(k.read_errqueue(c.as_fd(), &mut control).unwrap_err().kind(), ErrorKind::WouldBlock);
    let mut sink = vec![0u8; 4000];
    s.read_exact(&mut sink).unwrap();
    assert_eq!(&sink[..], &data[..4000]);
    let st = k.stats();
    assert_eq!((st.tx_sends, st.tx_bytes, st.tx_completed, st.tx_notifications), (5, 4008, 5, 2));
}

#[test]
fn tx_partial_writes_wait_for_acks() {
    let k = kernel(opts());
    let (c, s) = tcp_pair();
    let (buf, b) = tx_setup(&k, &c, 16 << 20);
    let data = pattern(16 << 20, 10);
    buf.write_all_at(&data, 0).unwrap();
    // The peer does not read: the send buffer fills and a non-blocking send is partial, then
    // WouldBlock (no sequence number taken); completions wait for the acknowledgements.
    let mut off = 0u64;
    let mut sends = 0u32;
    loop {
        match k.sendmsg_devmem(c.as_fd(), b.id(), &[(off, (16 << 20) - off as usize)]) {
            Ok(n) => {
                off += n as u64;
                sends += 1;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
        assert!(off < 16 << 20, "a 16 MiB stream fits no loopback send buffer");
    }
    assert!(sends >= 1);
    assert_eq!(k.socket(c.as_fd()).unwrap().sends_in_flight as u32 + k.stats().tx_completed as u32, sends);
    // Drain on the other side; every send completes.
    let mut reader = s.try_clone().unwrap();
    let total = off as usize;
    let r = std::thread::spawn(move || {
        let mut v = vec![0u8; total];
        reader.read_exact(&mut v).unwrap();
        v
    });
    let got = r.join().unwrap();
    assert_eq!(got, &data[..total]);
    let mut seen = 0u32;
    let mut control = [0u8; 64];
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen < sends {
        match k.read_errqueue(c.as_fd(), &mut control) {
            Ok(n) => {
                let ErrqueueEntry::Zerocopy(z) = cmsg::parse_errqueue(&control[..n]).unwrap()[0] else { panic!() };
                assert_eq!(z.lo, seen);
                seen = z.hi + 1;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(seen, sends);
}

#[test]
fn device_to_device_through_the_simulator() {
    // Sender: TX binding on a memfd; receiver: RX pool steered; both through one simulated
    // kernel, as two ranks of one process share the process-wide one.
    let rx = rx_setup(SimOptions { linear_spill: 0.05, frag_sizing: FragSizing::Mixed, ..opts() }, 64 * 4096);
    let (src, tx) = tx_setup(&rx.k, &rx.client, 1 << 20);
    let data = pattern(1 << 20, 12);
    src.write_all_at(&data, 0).unwrap();
    let k = rx.k.clone();
    let client = rx.client.try_clone().unwrap();
    let id = tx.id();
    let sender = std::thread::spawn(move || {
        let mut off = 0u64;
        while off < 1 << 20 {
            match k.sendmsg_devmem(client.as_fd(), id, &[(off, (1usize << 20) - off as usize)]) {
                Ok(n) => off += n as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_micros(100)),
                Err(e) => panic!("{e}"),
            }
        }
    });
    let got = rx.recv_all(data.len(), 256 * 1024, true);
    sender.join().unwrap();
    assert_eq!(got.data, data);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = 0;
    while done < rx.k.stats().tx_sends {
        match rx.k.read_errqueue(rx.client.as_fd(), &mut [0u8; ERRQUEUE_CONTROL_LEN]) {
            Ok(_) => done = rx.k.stats().tx_completed,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("{e}"),
        }
    }
    let st = rx.k.stats();
    assert_eq!((st.tokens_outstanding, st.tx_bytes), (0, 1 << 20));
    drop(tx);
}

#[test]
fn tx_errors_match_the_kernel() {
    let k = kernel(opts());
    let (c, _s) = tcp_pair();
    let pool = memfd(4096);
    let rx = k.bind_rx(LO, pool.as_fd(), &[0]).unwrap();
    let buf = memfd(8192);
    let tx = k.bind_tx(LO, buf.as_fd()).unwrap();
    assert_eq!((rx.id(), tx.id()), (1, 2));
    // Without SO_ZEROCOPY: EINVAL (the kernel looks no binding up).
    assert_eq!(errno_of(&k.sendmsg_devmem(c.as_fd(), tx.id(), &[(0, 10)]).unwrap_err()), errno::EINVAL);
    k.setup_socket(c.as_fd()).unwrap();
    assert!(sock::zerocopy_enabled(c.as_fd()).unwrap());
    // Unknown id, RX binding: EINVAL. Nothing to send: 0 (no lookup). Id 0: refused locally.
    assert_eq!(errno_of(&k.sendmsg_devmem(c.as_fd(), 7, &[(0, 10)]).unwrap_err()), errno::EINVAL);
    assert_eq!(errno_of(&k.sendmsg_devmem(c.as_fd(), rx.id(), &[(0, 10)]).unwrap_err()), errno::EINVAL);
    assert_eq!(k.sendmsg_devmem(c.as_fd(), 77, &[(0, 0)]).unwrap(), 0);
    assert_eq!(k.sendmsg_devmem(c.as_fd(), 0, &[(0, 10)]).unwrap_err().kind(), ErrorKind::InvalidInput);
    // Offset at or past the end: EFAULT; a range running past the end: the bytes before it.
    assert_eq!(errno_of(&k.sendmsg_devmem(c.as_fd(), tx.id(), &[(8192, 1)]).unwrap_err()), errno::EFAULT);
    assert_eq!(k.sendmsg_devmem(c.as_fd(), tx.id(), &[(8000, 500)]).unwrap(), 192);
    assert_eq!(k.sendmsg_devmem(c.as_fd(), tx.id(), &[(0, 10), (9000, 10)]).unwrap(), 10);
    // A binding on another device than the socket's route: ENODEV.
    if let Some(eth0) = devccl_transport_devmem::sys::iface::if_nametoindex("eth0") {
        let other = k.bind_tx(eth0, buf.as_fd()).unwrap();
        assert_eq!(errno_of(&k.sendmsg_devmem(c.as_fd(), other.id(), &[(0, 10)]).unwrap_err()), errno::ENODEV);
    }
    // Unbound: EINVAL.
    let id = tx.id();
    drop(tx);
    assert_eq!(errno_of(&k.sendmsg_devmem(c.as_fd(), id, &[(0, 10)]).unwrap_err()), errno::EINVAL);
    // Only the two successful calls took sequence numbers.
    assert_eq!(k.stats().tx_sends, 2);
}

// ------------------------------------------------------------------------------------------
// Bindings and steering.

fn kernel_errno(r: Result<Box<dyn devccl_transport_devmem::seam::KernelBinding>, Error>) -> (i32, Error) {
    match r {
        Err(e) => (e.errno().unwrap_or(-1), e),
        Ok(b) => panic!("bind succeeded with id {}", b.id()),
    }
}

#[test]
fn bind_validation_and_cyclic_ids() {
    let k = kernel(opts());
    let pool = memfd(8 * 4096);
    // ifindex 0: the policy's ERANGE, as the real kernel words it.
    let (e, err) = kernel_errno(k.bind_rx(0, pool.as_fd(), &[0]));
    assert_eq!(e, errno::ERANGE);
    assert_eq!(
        err.to_string(),
        "kernel refused bind-rx on ifindex 0: ERANGE(34); kernel says \"integer out of range\"; \
         bad attribute ifindex; policy: type u32, min 1, max 4294967295"
    );
    assert_eq!(kernel_errno(k.bind_tx(0, pool.as_fd())).0, errno::ERANGE);
    assert_eq!(kernel_errno(k.bind_rx(99999, pool.as_fd(), &[0])).0, errno::ENODEV);
    assert_eq!(kernel_errno(k.bind_tx(99999, pool.as_fd())).0, errno::ENODEV);
    assert!(matches!(k.bind_rx(LO, pool.as_fd(), &[]), Err(Error::InvalidUsage { .. })));
    // Queue id out of range: EINVAL on that queue's id attribute.
    let (e, err) = kernel_errno(k.bind_rx(LO, pool.as_fd(), &[0, 16]));
    assert_eq!(e, errno::EINVAL);
    assert_eq!(err.extack().unwrap().bad_attr.as_deref(), Some("queues.id"));
    // nlmsghdr 16 + genl 4, ifindex @20, fd @28, nests @36 and @56 (20 bytes each: header,
    // id, type): the second nest's id is at 60.
    assert_eq!(err.extack().unwrap().bad_attr_offset, Some(60), "second nest's id");
    // Not a mappable fd: a pipe is EINVAL.
    let (r, _w) = std::io::pipe().unwrap();
    assert_eq!(kernel_errno(k.bind_rx(LO, r.as_fd(), &[0])).0, errno::EINVAL);
    // (A closed fd, EBADF, is checked in sim::mmap's unit tests: borrowing one needs unsafe.)
    assert_eq!(kernel_errno(k.bind_rx(LO, memfd(100).as_fd(), &[0])).0, errno::EINVAL, "smaller than a niov");
    // Ids: 1, 2, 3; binds refused before the binding exists take none; unbinding does not
    // make ids reusable at once.
    let a = k.bind_rx(LO, pool.as_fd(), &[0, 1]).unwrap();
    let b = k.bind_tx(LO, pool.as_fd()).unwrap();
    let c = k.bind_rx(LO, pool.as_fd(), &[2]).unwrap();
    assert_eq!((a.id(), b.id(), c.id()), (1, 2, 3));
    // Queue already bound: EEXIST, nothing bound (the refused binding spent id 4).
    let (e, err) = kernel_errno(k.bind_rx(LO, pool.as_fd(), &[3, 1]));
    assert_eq!(e, errno::EEXIST);
    assert_eq!(err.extack().unwrap().message.as_deref(), Some("designated queue already memory provider bound"));
    drop(a);
    let d = k.bind_rx(LO, pool.as_fd(), &[0, 1]).unwrap();
    assert_eq!(d.id(), 5, "cyclic: neither the freed id 1 nor the spent 4 is next");
    assert_eq!(k.stats().bindings_rx, 2);
    assert_eq!(
        k.pools().iter().map(|p| (p.id, p.queues.clone())).collect::<Vec<_>>(),
        vec![(3, vec![2]), (5, vec![0, 1])]
    );
    // Privilege, when asked for.
    if devccl_transport_devmem::sys::iface::has_cap_net_admin() {
        let strict = kernel(SimOptions { require_cap_net_admin: true, ..opts() });
        assert!(strict.bind_rx(LO, pool.as_fd(), &[0]).is_ok());
    }
}

#[test]
fn steering_validation() {
    let k = kernel(opts());
    let (_c, s) = tcp_pair();
    let e = k.steer(99999, s.as_fd(), 0).unwrap_err();
    assert_eq!(e.errno(), Some(errno::ENODEV));
    let e = k.steer(LO, s.as_fd(), 16).unwrap_err();
    assert_eq!(e.errno(), Some(errno::EINVAL));
    assert!(e.to_string().contains("ethtool -N lo flow-type tcp4 src-ip 127.0.0.1 dst-ip 127.0.0.1"), "{e}");
    let st = k.steer(LO, s.as_fd(), 2).unwrap();
    assert!(st.describe().starts_with("simulated: ethtool -N lo flow-type tcp4"), "{}", st.describe());
    assert_eq!(k.socket(s.as_fd()).unwrap().steered, Some((LO, 2)));
    drop(st);
    assert_eq!(k.socket(s.as_fd()).unwrap().steered, None);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(k.steer(LO, l.as_fd(), 0).is_err(), "a listening socket has no flow");
}

#[test]
fn options_validate_and_parse() {
    assert!(SimOptions::default().validate().is_ok());
    for bad in [
        SimOptions { niov_size: 2048, ..SimOptions::default() },
        SimOptions { niov_size: 6000, ..SimOptions::default() },
        SimOptions { linear_spill: 1.5, ..SimOptions::default() },
        SimOptions { linear_spill: f64::NAN, ..SimOptions::default() },
        SimOptions { mss: 0, ..SimOptions::default() },
        SimOptions { rx_queues: 0, ..SimOptions::default() },
        SimOptions { max_frags_per_skb: 0, ..SimOptions::default() },
    ] {
        assert!(SimKernel::new(bad.clone()).is_err(), "{bad:?}");
    }
    assert_eq!("mixed".parse::<FragSizing>().unwrap(), FragSizing::Mixed);
    assert_eq!("linear".parse::<Exhaustion>().unwrap(), Exhaustion::Linear);
    assert!("x".parse::<FragSizing>().is_err());
    let g = SimKernel::global();
    assert!(SimKernel::init_global(g.options().clone()).is_ok());
    assert!(SimKernel::init_global(SimOptions { seed: 1, ..g.options().clone() }).is_err());
    assert_eq!(g.name(), "sim");
}

#[test]
fn larger_niovs() {
    let rx = rx_setup(SimOptions { niov_size: 16384, ..opts() }, 4 * 16384);
    let data = pattern(40_000, 11);
    (&rx.client).write_all(&data).unwrap();
    let got = rx.recv_all(data.len(), 64 * 1024, false);
    assert_eq!(got.data, data);
    assert!(got.frags.iter().any(|d| d.frag_size > 4096));
    assert!(got.frags.iter().all(|d| d.frag_offset % 16384 + d.frag_size as u64 <= 16384));
}
