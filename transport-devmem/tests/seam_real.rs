//! The real side of the seam (`seam::real::RealKernel`) against the running kernel, and the
//! simulator answering the same calls the same way wherever this machine's kernel can answer
//! (the project's 6.18 machines: virtio_net eth0 and lo, neither devmem- nor ntuple-capable).
//! Tests that bind or steer need root and the `netdev` family; elsewhere they print why they
//! skip and pass. Expected answers: shared/reference/devmem-uapi.md §9.

use std::io::{ErrorKind, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use devccl_transport_devmem::Error;
use devccl_transport_devmem::probe::{self, FdKind, Verdict};
use devccl_transport_devmem::seam::real::RealKernel;
use devccl_transport_devmem::seam::{DevmemKernel, KernelBinding, RX_CMSG_SPACE};
use devccl_transport_devmem::sim::{SimKernel, SimOptions};
use devccl_transport_devmem::sys::cmsg::DmabufToken;
use devccl_transport_devmem::sys::ntuple::SteerRefusal;
use devccl_transport_devmem::sys::{errno, iface, placeholder_fd, sock};

/// `Some(real kernel)` when the privileged live tests can run here, else prints why not.
fn live(test: &str) -> Option<RealKernel> {
    if iface::euid() != 0 {
        eprintln!("SKIP {test}: not root (euid {}); binding and steering need CAP_NET_ADMIN", iface::euid());
        return None;
    }
    match RealKernel::open() {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("SKIP {test}: no netdev family: {e}");
            None
        }
    }
}

/// The real kernel for the socket-level calls (no privilege needed; the `netdev` family must
/// exist because `RealKernel` resolves it).
fn real_kernel(test: &str) -> Option<RealKernel> {
    match RealKernel::open() {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("SKIP {test}: no netdev family: {e}");
            None
        }
    }
}

/// (name, ifindex) of lo and, when present, eth0.
fn interfaces() -> Vec<(&'static str, u32)> {
    let mut v = vec![("lo", iface::if_nametoindex("lo").expect("lo exists"))];
    if let Some(i) = iface::if_nametoindex("eth0") {
        v.push(("eth0", i));
    }
    v
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

fn wait_inq(s: &TcpStream, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while sock::inq(s.as_fd()).unwrap() < n {
        assert!(Instant::now() < deadline, "data did not arrive");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn bind_err(r: Result<Box<dyn KernelBinding>, Error>) -> Error {
    match r {
        Err(e) => e,
        Ok(b) => panic!("bind unexpectedly succeeded with id {}", b.id()),
    }
}

#[test]
fn real_binds_are_refused_through_the_seam() {
    let Some(k) = live("real_binds_are_refused_through_the_seam") else {
        return;
    };
    assert_eq!(k.name(), "real");
    let memfd = placeholder_fd().unwrap();
    for (name, idx) in interfaces() {
        let e = bind_err(k.bind_rx(idx, memfd.as_fd(), &[0]));
        assert_eq!(e.errno(), Some(errno::EOPNOTSUPP), "{name}: {e}");
        assert_eq!(e.extack().unwrap().bad_attr.as_deref(), Some("ifindex"), "{name}: {e}");
        assert_eq!(probe::classify_bind_rx(&Err(e), FdKind::Placeholder), Verdict::DriverLacksQueueApi);
        let e = bind_err(k.bind_tx(idx, memfd.as_fd()));
        assert_eq!(e.errno(), Some(errno::EOPNOTSUPP), "{name}: {e}");
        assert_eq!(e.extack().unwrap().message.as_deref(), Some("Driver does not support netmem TX"));
        eprintln!("{name}: {e}");
        assert_eq!(probe::classify_bind_tx(&Err(e), FdKind::Placeholder), Verdict::NoNetmemTx);
    }
    assert!(matches!(k.bind_rx(1, memfd.as_fd(), &[]), Err(Error::InvalidUsage { .. })));
}

#[test]
fn sim_bind_errors_read_like_the_real_kernels() {
    let Some(real) = live("sim_bind_errors_read_like_the_real_kernels") else {
        return;
    };
    let sim = SimKernel::new(SimOptions::default()).unwrap();
    let memfd = placeholder_fd().unwrap();
    // The answers the real kernel gives before its driver check (devmem-uapi §9): the
    // simulator gives the same errno, extack and message.
    for (ifindex, errno) in [(0, errno::ERANGE), (99999, errno::ENODEV)] {
        let r = bind_err(real.bind_rx(ifindex, memfd.as_fd(), &[0]));
        let s = bind_err(sim.bind_rx(ifindex, memfd.as_fd(), &[0]));
        assert_eq!(r.errno(), Some(errno));
        assert_eq!((r.errno(), r.extack(), r.to_string()), (s.errno(), s.extack(), s.to_string()));
        let r = bind_err(real.bind_tx(ifindex, memfd.as_fd()));
        let s = bind_err(sim.bind_tx(ifindex, memfd.as_fd()));
        assert_eq!((r.errno(), r.extack(), r.to_string()), (s.errno(), s.extack(), s.to_string()));
    }
}

#[test]
fn real_steering_is_refused_with_the_ethtool_command() {
    let Some(k) = live("real_steering_is_refused_with_the_ethtool_command") else {
        return;
    };
    let (c, s) = tcp_pair();
    let (peer, local) = (c.local_addr().unwrap(), s.local_addr().unwrap());
    for (name, idx) in interfaces() {
        let e = k.steer(idx, s.as_fd(), 0).unwrap_err();
        let want = format!(
            "ethtool -N {name} flow-type tcp4 src-ip 127.0.0.1 dst-ip 127.0.0.1 src-port {} dst-port {} action 0",
            peer.port(),
            local.port()
        );
        match &e {
            Error::Steering { iface, errno, refusal, command } => {
                assert_eq!(iface, name);
                assert_eq!(*errno, errno::EOPNOTSUPP, "{e}");
                assert_eq!(*refusal, SteerRefusal::NotSupported);
                assert_eq!(command, &want);
            }
            other => panic!("{name}: expected a steering refusal, got {other}"),
        }
        assert_eq!(e.errno(), Some(errno::EOPNOTSUPP));
        assert!(e.to_string().contains(&want), "{e}");
        eprintln!("{e}");
    }
    let e = k.steer(99999, s.as_fd(), 0).unwrap_err();
    assert!(matches!(e, Error::Steering { refusal: SteerRefusal::NoSuchInterface, .. }), "{e}");
    // A socket without a peer has no flow to steer.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(matches!(k.steer(1, l.as_fd(), 0), Err(Error::Os { .. })));
}

/// What `recvmsg_devmem` answers on a plain (unsteered) loopback TCP socket: the same for the
/// real kernel and the simulator.
fn plain_loopback_recv(k: &dyn DevmemKernel) -> Vec<String> {
    let mut log = Vec::new();
    let (mut c, s) = tcp_pair();
    let fd = s.as_fd();
    let mut linear = [0u8; 64];
    let mut control = [0u8; 4 * RX_CMSG_SPACE];
    let record = |log: &mut Vec<String>, what: &str, r: std::io::Result<(usize, usize)>| {
        log.push(format!("{what}: {:?}", r.map_err(|e| e.raw_os_error())));
    };
    record(&mut log, "nothing queued", k.recvmsg_devmem(fd, &mut linear, &mut control));
    c.write_all(b"hello-devmem").unwrap();
    wait_inq(&s, 12);
    // An empty iovec (recvmsg len 0) returns 0 although data is queued: it reads like EOF.
    record(&mut log, "empty linear, data queued", k.recvmsg_devmem(fd, &mut [], &mut control));
    // A control buffer too small for any devmem cmsg does not matter for ordinary data.
    let r = k.recvmsg_devmem(fd, &mut linear[..5], &mut [0u8; 8]);
    log.push(format!("5-byte linear, 8-byte control: {:?} {:?}", r.as_ref().ok(), &linear[..5]));
    let r = k.recvmsg_devmem(fd, &mut linear, &mut control);
    log.push(format!("rest: {:?} {:?}", r.as_ref().ok(), &linear[..7]));
    drop(c);
    std::thread::sleep(Duration::from_millis(20));
    record(&mut log, "end of stream", k.recvmsg_devmem(fd, &mut linear, &mut control));
    record(&mut log, "end of stream again", k.recvmsg_devmem(fd, &mut linear, &mut control));
    k.close_socket(fd);
    log
}

#[test]
fn recvmsg_devmem_on_plain_loopback_tcp() {
    let Some(real) = real_kernel("recvmsg_devmem_on_plain_loopback_tcp") else {
        return;
    };
    let real = plain_loopback_recv(&real);
    let want = [
        "nothing queued: Err(Some(11))",
        "empty linear, data queued: Ok((0, 0))",
        "5-byte linear, 8-byte control: Some((5, 0)) [104, 101, 108, 108, 111]",
        "rest: Some((7, 0)) [45, 100, 101, 118, 109, 101, 109]",
        "end of stream: Ok((0, 0))",
        "end of stream again: Ok((0, 0))",
    ];
    assert_eq!(real, want, "what 6.18 answers (no queue bound: ordinary bytes, no cmsg)");
    let sim = SimKernel::new(SimOptions::default()).unwrap();
    assert_eq!(plain_loopback_recv(&sim), want, "the simulator answers alike for an unsteered socket");
}

/// Token return, devmem sends and the error queue where nothing is bound: every answer the
/// real kernel gives here, in order.
fn socket_answers(k: &dyn DevmemKernel) -> Vec<String> {
    let mut log = Vec::new();
    let (c, s) = tcp_pair();
    let one = DmabufToken::encode_all(&[DmabufToken { token_start: 1, token_count: 1 }]);
    let mut push =
        |what: &str, r: std::io::Result<String>| log.push(format!("{what}: {:?}", r.map_err(|e| e.raw_os_error())));
    push("dontneed unknown token", k.dontneed(s.as_fd(), &one).map(|n| n.to_string()));
    push("dontneed 128 ranges", k.dontneed(s.as_fd(), &one.repeat(128)).map(|n| n.to_string()));
    push("dontneed 129 ranges", k.dontneed(s.as_fd(), &one.repeat(129)).map(|n| n.to_string()));
    push("dontneed run of 5000", {
        let t = DmabufToken::encode_all(&[DmabufToken { token_start: 0, token_count: 5000 }]);
        k.dontneed(s.as_fd(), &t).map(|n| n.to_string())
    });
    push("dontneed optlen 0", k.dontneed(s.as_fd(), &[]).map(|n| n.to_string()));
    push("dontneed optlen 7", k.dontneed(s.as_fd(), &one[..7]).map(|n| n.to_string()));
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    push("dontneed on UDP", k.dontneed(udp.as_fd(), &one).map(|n| n.to_string()));
    push("dontneed on UDP, optlen 2", k.dontneed(udp.as_fd(), &one[..2]).map(|n| n.to_string()));
    push("send, no SO_ZEROCOPY", k.sendmsg_devmem(c.as_fd(), 77, &[(0, 16)]).map(|n| n.to_string()));
    k.setup_socket(c.as_fd()).unwrap();
    push("send, unknown binding", k.sendmsg_devmem(c.as_fd(), 77, &[(0, 16)]).map(|n| n.to_string()));
    push("send, nothing to send", k.sendmsg_devmem(c.as_fd(), 77, &[(0, 0)]).map(|n| n.to_string()));
    push("error queue empty", k.read_errqueue(c.as_fd(), &mut [0u8; 64]).map(|n| n.to_string()));
    log
}

#[test]
fn token_send_and_errqueue_answers_match() {
    let Some(real) = real_kernel("token_send_and_errqueue_answers_match") else {
        return;
    };
    let real = socket_answers(&real);
    let want = [
        "dontneed unknown token: Ok(\"0\")",
        "dontneed 128 ranges: Ok(\"0\")",
        "dontneed 129 ranges: Err(Some(22))",
        "dontneed run of 5000: Ok(\"0\")",
        "dontneed optlen 0: Err(Some(22))",
        "dontneed optlen 7: Err(Some(22))",
        "dontneed on UDP: Err(Some(9))",
        "dontneed on UDP, optlen 2: Err(Some(22))",
        "send, no SO_ZEROCOPY: Err(Some(22))",
        "send, unknown binding: Err(Some(22))",
        "send, nothing to send: Ok(\"0\")",
        "error queue empty: Err(Some(11))",
    ];
    assert_eq!(real, want, "what 6.18 answers");
    let sim = SimKernel::new(SimOptions::default()).unwrap();
    assert_eq!(socket_answers(&sim), want, "the simulator answers alike");
}

#[test]
fn setup_socket_turns_zerocopy_on() {
    let Some(k) = real_kernel("setup_socket_turns_zerocopy_on") else {
        return;
    };
    let (c, _s) = tcp_pair();
    assert!(!sock::zerocopy_enabled(c.as_fd()).unwrap());
    k.setup_socket(c.as_fd()).unwrap();
    assert!(sock::zerocopy_enabled(c.as_fd()).unwrap());
    let err = k.recvmsg_devmem(c.as_fd(), &mut [0u8; 4], &mut []).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WouldBlock);
}
