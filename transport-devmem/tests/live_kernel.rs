//! Live tests against the running kernel (the project's 6.18 machines: CONFIG_NET_DEVMEM=y,
//! virtio_net eth0, no devmem-capable NIC). They need root (CI runs as root) and the
//! `netdev` family; elsewhere each test prints why it skips and passes.
//!
//! Expected answers: shared/reference/devmem-uapi.md §9.

use std::io::{IoSlice, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use devccl_transport_devmem::Error;
use devccl_transport_devmem::dmabuf::{self, CudaSource, UdmabufSource, cuda};
use devccl_transport_devmem::doctor;
use devccl_transport_devmem::probe::{self, FdKind, ProbeOptions, Verdict};
use devccl_transport_devmem::seam::DevmemKernel;
use devccl_transport_devmem::seam::real::RealKernel;
use devccl_transport_devmem::sys::cmsg::{
    self, DevmemRange, DmabufToken, ErrqueueEntry, MSG_ZEROCOPY, SCM_DEVMEM_DMABUF, SOL_SOCKET, TokenBatcher,
};
use devccl_transport_devmem::sys::ethtool::{Ethtool, TcpDataSplit};
use devccl_transport_devmem::sys::netdev::{self, BindRx, BindTx, Netdev, QueueType, cmd};
use devccl_transport_devmem::sys::netlink::NlaType;
use devccl_transport_devmem::sys::{errno, iface, placeholder_fd, sock};

const EINVAL: i32 = errno::EINVAL;

/// `Some(netdev)` when the live tests can run here, else prints why not.
fn live(test: &str) -> Option<Netdev> {
    if iface::euid() != 0 {
        eprintln!("SKIP {test}: not root (euid {}); the live devmem tests need root", iface::euid());
        return None;
    }
    match Netdev::open() {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!("SKIP {test}: no netdev family: {e}");
            None
        }
    }
}

/// (name, ifindex) of lo and, when present, eth0.
fn interfaces(test: &str) -> Vec<(&'static str, u32)> {
    let mut v = vec![("lo", iface::if_nametoindex("lo").expect("lo exists"))];
    match iface::if_nametoindex("eth0") {
        Some(i) => v.push(("eth0", i)),
        None => eprintln!("note {test}: no eth0 here, checking lo only"),
    }
    v
}

fn eth0_or_lo() -> (&'static str, u32) {
    match iface::if_nametoindex("eth0") {
        Some(i) => ("eth0", i),
        None => ("lo", 1),
    }
}

fn kernel_err(r: Result<netdev::Binding, Error>) -> (i32, devccl_transport_devmem::Extack, String) {
    match r {
        Err(e @ Error::Kernel { .. }) => {
            let text = e.to_string();
            let Error::Kernel { errno, extack, .. } = e else { unreachable!() };
            (errno, *extack, text)
        }
        Err(e) => panic!("expected a kernel error, got {e}"),
        Ok(b) => panic!("bind unexpectedly succeeded with id {}", b.id()),
    }
}

fn rx_req(ifindex: Option<u32>, fd: Option<u32>, queues: Vec<(u32, u32)>) -> BindRx {
    BindRx { ifindex, fd, queues, rx_page_size: None, nested_flag: true }
}

#[test]
fn family_ops_and_features() {
    let Some(mut nd) = live("family_ops_and_features") else {
        return;
    };
    let f = nd.family().clone();
    assert_eq!(f.name, "netdev");
    assert!(f.id >= 0x10, "dynamic id {}", f.id);
    assert_eq!(f.version, 1);
    assert_eq!(f.hdrsize, 0);
    let rx = f.op(cmd::BIND_RX).expect("bind-rx op");
    assert!(rx.admin_perm() && rx.can_do());
    let tx = f.op(cmd::BIND_TX).expect("bind-tx op (6.16+)");
    assert!(!tx.admin_perm() && tx.can_do());
    assert!(f.op(cmd::DEV_GET).unwrap().can_dump());
    let groups: Vec<&str> = f.mcast_groups.iter().map(|g| g.name.as_str()).collect();
    assert!(groups.contains(&"mgmt") && groups.contains(&"page-pool"), "{groups:?}");
    let feat = nd.features().unwrap();
    assert!(feat.bind_rx && feat.bind_tx && feat.bind_rx_admin_perm && !feat.bind_tx_admin_perm);
    // 6.18 has no rx-page-size; a newer kernel would say Some(true).
    assert!(feat.rx_page_size.is_some());
    eprintln!("netdev family id {} features {feat:?}", f.id);
}

#[test]
fn bind_policies_introspection() {
    let Some(mut nd) = live("bind_policies_introspection") else {
        return;
    };
    let rx = nd.op_policy(cmd::BIND_RX).unwrap();
    let ifindex = rx.do_attr(1).expect("ifindex policy");
    assert_eq!(ifindex.ty, Some(NlaType::U32));
    assert_eq!(ifindex.min_u, Some(1));
    assert_eq!(ifindex.max_u, Some(u32::MAX as u64));
    let queues = rx.do_attr(2).expect("queues policy");
    assert_eq!(queues.ty, Some(NlaType::Nested));
    let qtype = rx.nested_attr(queues, 3).expect("queue type policy");
    assert_eq!((qtype.min_u, qtype.max_u), (Some(0), Some(1)));
    assert_eq!(rx.do_attr(3).unwrap().ty, Some(NlaType::U32));
    let tx = nd.op_policy(cmd::BIND_TX).unwrap();
    assert_eq!(tx.do_attr(1).unwrap().min_u, Some(1));
    assert!(tx.do_attr(3).is_some());
    assert!(tx.do_attr(2).is_none(), "queues are not part of the bind-tx policy");
}

#[test]
fn dumps_list_lo_and_eth0() {
    let Some(mut nd) = live("dumps_list_lo_and_eth0") else {
        return;
    };
    let ifs = interfaces("dumps_list_lo_and_eth0");
    let devs = nd.devices().unwrap();
    for (name, idx) in &ifs {
        let d = devs
            .iter()
            .find(|d| d.ifindex == *idx)
            .unwrap_or_else(|| panic!("{name} missing from dev-get dump: {devs:?}"));
        assert_eq!(d.ifname.as_deref(), Some(*name));
    }
    let queues = nd.queues().unwrap();
    for (name, idx) in &ifs {
        for ty in [QueueType::Rx, QueueType::Tx] {
            assert!(
                queues.iter().any(|q| q.ifindex == *idx && q.id == 0 && q.ty == ty),
                "{name} queue 0 {ty:?} missing: {queues:?}"
            );
        }
    }
    assert!(queues.iter().all(|q| q.dmabuf.is_none()), "nothing is bound here");
    let napis = nd.napis().unwrap();
    if let Some((_, eth0)) = ifs.iter().find(|(n, _)| *n == "eth0") {
        assert!(napis.iter().any(|n| n.ifindex == *eth0), "{napis:?}");
    }
    let pools = nd.page_pools().unwrap();
    assert!(pools.iter().all(|p| p.dmabuf.is_none()));
    eprintln!("{} devices, {} queues, {} napis, {} page pools", devs.len(), queues.len(), napis.len(), pools.len());
}

#[test]
fn bind_rx_on_lo_and_eth0_is_driver_lacks_queue_api() {
    let Some(nd) = live("bind_rx_on_lo_and_eth0") else {
        return;
    };
    let memfd = placeholder_fd().unwrap();
    for (name, idx) in interfaces("bind_rx_on_lo_and_eth0") {
        let res = nd.bind_rx(&BindRx::new(idx, memfd.as_fd(), &[0]));
        let verdict = probe::classify_bind_rx(&res.as_ref().map(|b| b.id()).map_err(clone_err), FdKind::Placeholder);
        let (errno, extack, text) = kernel_err(res);
        assert_eq!(errno, errno::EOPNOTSUPP, "{name}: {text}");
        assert_eq!(extack.bad_attr.as_deref(), Some("ifindex"), "{name}: {text}");
        assert_eq!(extack.message, None);
        assert_eq!(verdict, Verdict::DriverLacksQueueApi);
        assert!(text.contains(name) && text.contains("EOPNOTSUPP(95)"), "{text}");
        eprintln!("{text}");
    }
}

/// Error is not Clone (io::Error inside); rebuild the kernel variant for classification.
fn clone_err(e: &Error) -> Error {
    match e {
        Error::Kernel { op, iface, errno, extack } => {
            Error::Kernel { op, iface: iface.clone(), errno: *errno, extack: extack.clone() }
        }
        other => Error::Unsupported { reason: other.to_string() },
    }
}

#[test]
fn bind_tx_on_lo_and_eth0_is_no_netmem_tx() {
    let Some(nd) = live("bind_tx_on_lo_and_eth0") else {
        return;
    };
    let memfd = placeholder_fd().unwrap();
    for (name, idx) in interfaces("bind_tx_on_lo_and_eth0") {
        let res = nd.bind_tx(&BindTx::new(idx, memfd.as_fd()));
        let verdict = probe::classify_bind_tx(&res.as_ref().map(|b| b.id()).map_err(clone_err), FdKind::Placeholder);
        let (errno, extack, text) = kernel_err(res);
        assert_eq!(errno, errno::EOPNOTSUPP, "{name}: {text}");
        assert_eq!(extack.message.as_deref(), Some("Driver does not support netmem TX"));
        assert_eq!(verdict, Verdict::NoNetmemTx);
        eprintln!("{text}");
    }
}

#[test]
fn bind_rx_ifindex_0_is_erange_with_policy_bounds() {
    let Some(mut nd) = live("bind_rx_ifindex_0") else {
        return;
    };
    let memfd = placeholder_fd().unwrap();
    let req = BindRx::new(0, memfd.as_fd(), &[0]).request(nd.family().id, 0);
    let err = nd.request(req, "ifindex 0").unwrap_err();
    assert_eq!(err.errno(), Some(errno::ERANGE), "{err}");
    let x = err.extack().unwrap();
    assert_eq!(x.message.as_deref(), Some("integer out of range"));
    assert_eq!(x.bad_attr.as_deref(), Some("ifindex"));
    let p = x.policy.as_ref().expect("policy nest");
    assert_eq!(p.min_u, Some(1));
    assert_eq!(p.max_u, Some(u32::MAX as u64));
    assert_eq!(p.ty, Some(NlaType::U32));
    assert_eq!(
        err.to_string(),
        "kernel refused bind-rx on ifindex 0: ERANGE(34); kernel says \"integer out of range\"; \
         bad attribute ifindex; policy: type u32, min 1, max 4294967295"
    );
}

#[test]
fn missing_attributes_are_named() {
    let Some(nd) = live("missing_attributes_are_named") else {
        return;
    };
    let (_, eth) = eth0_or_lo();
    let memfd = placeholder_fd().unwrap();
    let fdn = std::os::fd::AsRawFd::as_raw_fd(&memfd) as u32;
    // bind-rx without fd -> missing attribute 3 "fd".
    let (errno, x, text) = kernel_err(nd.bind_rx(&rx_req(Some(eth), None, vec![(0, 0)])));
    assert_eq!(errno, EINVAL);
    assert_eq!((x.missing_type, x.missing_name.as_deref()), (Some(3), Some("fd")));
    assert!(text.ends_with("missing attribute 3 (fd)"), "{text}");
    // Without queues -> 2 "queues" (sent raw: bind_rx() refuses an empty queue list itself).
    let mut nd2 = Netdev::open().unwrap();
    let req = rx_req(Some(eth), Some(fdn), vec![]).request(nd2.family().id, 0);
    let e = nd2.request(req, "eth0").unwrap_err();
    let x = e.extack().unwrap();
    assert_eq!((x.missing_type, x.missing_name.as_deref()), (Some(2), Some("queues")));
    assert!(matches!(nd.bind_rx(&rx_req(Some(eth), Some(fdn), vec![])), Err(Error::InvalidUsage { .. })));
    // bind-tx without fd.
    let (errno, x, _) = kernel_err(nd.bind_tx(&BindTx { ifindex: Some(eth), fd: None, queues: vec![] }));
    assert_eq!(errno, EINVAL);
    assert_eq!(x.missing_name.as_deref(), Some("fd"));
}

#[test]
fn other_bind_errors_match_the_reference() {
    let Some(nd) = live("other_bind_errors") else {
        return;
    };
    let (_, eth) = eth0_or_lo();
    let memfd = placeholder_fd().unwrap();
    let fdn = std::os::fd::AsRawFd::as_raw_fd(&memfd) as u32;
    // No such device.
    let (errno, x, _) = kernel_err(nd.bind_rx(&rx_req(Some(99999), Some(fdn), vec![(0, 0)])));
    assert_eq!(errno, errno::ENODEV);
    assert!(x.is_empty());
    let (errno, _, _) = kernel_err(nd.bind_tx(&BindTx { ifindex: Some(99999), fd: Some(fdn), queues: vec![] }));
    assert_eq!(errno, errno::ENODEV);
    // Queue type 7 (policy max 1).
    let (errno, x, _) = kernel_err(nd.bind_rx(&rx_req(Some(eth), Some(fdn), vec![(0, 7)])));
    assert_eq!(errno, errno::ERANGE);
    assert_eq!(x.bad_attr.as_deref(), Some("queues.type"));
    assert_eq!(x.policy.unwrap().max_u, Some(1));
    // Nest without NLA_F_NESTED.
    let mut r = rx_req(Some(eth), Some(fdn), vec![(0, 0)]);
    r.nested_flag = false;
    let (errno, x, _) = kernel_err(nd.bind_rx(&r));
    assert_eq!(errno, EINVAL);
    assert_eq!(x.message.as_deref(), Some("NLA_F_NESTED is missing"));
    assert_eq!(x.bad_attr.as_deref(), Some("queues"));
    // rx-page-size: unknown on 6.18, accepted by the policy on newer kernels.
    let mut r = rx_req(Some(eth), Some(fdn), vec![(0, 0)]);
    r.rx_page_size = Some(16384);
    let (errno, x, text) = kernel_err(nd.bind_rx(&r));
    if x.message.as_deref() == Some("Unknown attribute type") {
        assert_eq!(errno, EINVAL);
        assert_eq!(x.bad_attr.as_deref(), Some("rx-page-size"));
    } else {
        eprintln!("note: this kernel accepts rx-page-size: {text}");
    }
    // Queues in a bind-tx request.
    let (errno, x, _) = kernel_err(nd.bind_tx(&BindTx { ifindex: Some(eth), fd: Some(fdn), queues: vec![(0, 0)] }));
    assert_eq!(errno, EINVAL);
    assert_eq!(x.message.as_deref(), Some("Unsupported attribute"));
    assert_eq!(x.bad_attr.as_deref(), Some("queues"));
}

#[test]
fn unprivileged_bind_rx_is_no_permission() {
    // Runs this test binary again as uid 65534 (setpriv), filtered to the child test below.
    if live("unprivileged_bind_rx").is_none() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(&exe)
        .args(["--exact", "unprivileged_child", "--nocapture", "--test-threads=1"])
        .env("DEVCCL_DEVMEM_UNPRIV_CHILD", "1")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIP unprivileged_bind_rx: setpriv not runnable: {e}");
            return;
        }
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if text.contains("Permission denied") && !text.contains("CHILD") {
        eprintln!("SKIP unprivileged_bind_rx: test binary not executable as uid 65534: {text}");
        return;
    }
    assert!(out.status.success(), "{text}");
    assert!(text.contains("CHILD bind-rx verdict no-permission"), "{text}");
    assert!(text.contains("CHILD bind-tx verdict no-netmem-tx"), "{text}");
    assert!(text.contains("CHILD dev-get ok"), "{text}");
    assert!(text.contains("CHILD steering refused: no-permission"), "{text}");
}

#[test]
fn unprivileged_child() {
    if std::env::var_os("DEVCCL_DEVMEM_UNPRIV_CHILD").is_none() {
        return; // only meaningful when spawned by unprivileged_bind_rx
    }
    assert_ne!(iface::euid(), 0);
    let mut nd = Netdev::open().unwrap();
    let memfd = placeholder_fd().unwrap();
    let rx = nd.bind_rx(&BindRx::new(1, memfd.as_fd(), &[0])).map(|b| b.id());
    assert_eq!(rx.as_ref().unwrap_err().errno(), Some(errno::EPERM));
    println!("CHILD bind-rx verdict {}", probe::classify_bind_rx(&rx, FdKind::Placeholder));
    let tx = nd.bind_tx(&BindTx::new(1, memfd.as_fd())).map(|b| b.id());
    println!("CHILD bind-tx verdict {}", probe::classify_bind_tx(&tx, FdKind::Placeholder));
    let devs = nd.devices().unwrap();
    assert!(!devs.is_empty());
    println!("CHILD dev-get ok ({} devices)", devs.len());
    // An ntuple rule needs CAP_NET_ADMIN: EPERM, with the command for the operator.
    let (_c, s) = tcp_pair();
    let e = RealKernel::from_netdev(nd).steer(1, s.as_fd(), 0).unwrap_err();
    assert_eq!(e.errno(), Some(errno::EPERM), "{e}");
    let Error::Steering { refusal, command, .. } = &e else { panic!("{e}") };
    assert!(command.starts_with("ethtool -N lo flow-type tcp4 "), "{command}");
    println!("CHILD steering refused: {refusal}");
}

#[test]
fn ethtool_rings_header_split() {
    if live("ethtool_rings_header_split").is_none() {
        return;
    }
    let mut et = Ethtool::open(Duration::from_secs(5)).unwrap();
    if let Some(eth0) = iface::if_nametoindex("eth0") {
        let r = et.rings(eth0, "eth0").unwrap();
        assert!(r.rx.is_some() && r.tx.is_some(), "{r:?}");
        if iface::driver_of("eth0").as_deref() == Some("virtio_net") {
            assert_eq!(r.tcp_data_split, TcpDataSplit::Unknown);
            assert_eq!(r.hds_thresh, None);
        }
        eprintln!("eth0 rings {r:?}");
    }
    let e = et.rings(1, "lo").unwrap_err();
    assert_eq!(e.errno(), Some(errno::EOPNOTSUPP), "{e}");
}

#[test]
fn probe_classifies_lo_and_eth0() {
    if live("probe_classifies_lo_and_eth0").is_none() {
        return;
    }
    for (name, _) in interfaces("probe_classifies_lo_and_eth0") {
        let r = probe::probe_interface(name);
        eprintln!("{r}\n");
        assert_eq!(r.verdict, Verdict::DriverLacksQueueApi, "{r}");
        assert_eq!(r.rx.as_ref().unwrap().verdict, Verdict::DriverLacksQueueApi);
        assert_eq!(r.tx.as_ref().unwrap().verdict, Verdict::NoNetmemTx);
        assert!(r.problems.contains(&Verdict::NoNetmemTx));
        if !cuda::driver_present() && UdmabufSource::open().is_err() {
            assert!(r.problems.contains(&Verdict::NoDmabufSource));
        }
        assert!(r.reason().contains(name) && r.reason().contains("EOPNOTSUPP"), "{}", r.reason());
        assert!(!r.fix().is_empty());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["verdict"], "driver-lacks-queue-api");
    }
}

#[test]
fn probe_for_peer_uses_the_route() {
    if live("probe_for_peer_uses_the_route").is_none() {
        return;
    }
    let r = probe::probe_for_peer(IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(r.interface, "lo");
    assert_eq!(r.peer, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    assert_eq!(r.verdict, Verdict::DriverLacksQueueApi);
    // A public address goes out through the default route (eth0 here), if there is one.
    match iface::route_interface("192.0.2.1".parse().unwrap()) {
        Ok((ifname, src)) => {
            let r = probe::probe_for_peer_with(
                "192.0.2.1".parse().unwrap(),
                &ProbeOptions { sources: Some(vec![]), ..Default::default() },
            );
            assert_eq!(r.interface, ifname);
            eprintln!("route to 192.0.2.1 via {ifname} from {src}: {}", r.verdict);
        }
        Err(e) => eprintln!("note: no default route here: {e}"),
    }
}

#[test]
fn doctor_report_lists_lo_and_eth0() {
    if live("doctor_report").is_none() {
        return;
    }
    let rep = doctor::report();
    let text = rep.to_string();
    eprintln!("{text}");
    for (name, _) in interfaces("doctor_report") {
        assert!(rep.interfaces.iter().any(|r| r.interface == name), "{text}");
        assert!(text.contains(&format!("interface {name} (")), "{text}");
    }
    assert!(text.contains("dma-buf sources:"));
    let v: serde_json::Value = serde_json::from_str(&rep.to_json()).unwrap();
    assert!(v["interfaces"].as_array().unwrap().len() >= 2);
    assert_eq!(v["netdev_family"]["features"]["bind_tx"], true);
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    for x in [&c, &s] {
        x.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        x.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    (c, s)
}

#[test]
fn dontneed_limits_on_loopback_tcp() {
    if live("dontneed_limits").is_none() {
        return;
    }
    let (_c, s) = tcp_pair();
    let fd = s.as_fd();
    let one = DmabufToken { token_start: 0, token_count: 1 };
    // Unknown token: nothing freed.
    assert_eq!(sock::devmem_dontneed(fd, &[one]).unwrap(), 0);
    // 128 ranges: accepted.
    assert_eq!(sock::devmem_dontneed(fd, &[one; 128]).unwrap(), 0);
    // 129: the kernel says EINVAL (our wrapper refuses before asking).
    let raw = DmabufToken::encode_all(&[one; 129]);
    assert_eq!(sock::devmem_dontneed_raw(fd, &raw).unwrap_err().raw_os_error(), Some(EINVAL));
    assert_eq!(sock::devmem_dontneed(fd, &[one; 129]).unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    // optlen not a multiple of 8.
    assert_eq!(sock::devmem_dontneed_raw(fd, &raw[..7]).unwrap_err().raw_os_error(), Some(EINVAL));
    // Not a TCP socket.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(sock::devmem_dontneed(udp.as_fd(), &[one]).unwrap_err().raw_os_error(), Some(errno::EBADF));
    // Batched return: 300 isolated tokens + a run of 2500 -> calls within both limits.
    let mut b = TokenBatcher::new();
    for t in 0..300u32 {
        b.push(1_000_000 + 2 * t);
    }
    b.push_range(5_000_000, 2500);
    let out = sock::return_tokens(fd, &b).unwrap();
    assert_eq!(out.requested, 2800);
    assert_eq!(out.freed, 0, "unknown tokens free nothing");
    assert_eq!(out.calls as usize, b.batches().len());
    assert_eq!(out.short_calls, out.calls);
}

#[test]
fn recv_devmem_on_ordinary_data_has_no_devmem_cmsgs() {
    if live("recv_devmem_on_ordinary_data").is_none() {
        return;
    }
    let (mut c, s) = tcp_pair();
    c.write_all(b"hello-devmem").unwrap();
    let mut buf = [0u8; 64];
    let mut control = [0u8; 4096];
    let meta = sock::recv_devmem(s.as_fd(), &mut buf, &mut control, false).unwrap();
    assert_eq!(&buf[..meta.bytes], b"hello-devmem");
    assert_eq!(meta.control_len, 0);
    assert!(cmsg::parse_rx_cmsgs(&control[..meta.control_len]).unwrap().is_empty());
}

#[test]
fn tx_cmsg_validation() {
    if live("tx_cmsg_validation").is_none() {
        return;
    }
    let (c, mut s) = tcp_pair();
    let fd = c.as_fd();
    let data = [b'x'; 64];
    // id 7 without SO_ZEROCOPY / MSG_ZEROCOPY: EINVAL.
    let e = sock::sendmsg_with_control(fd, &[IoSlice::new(&data)], &cmsg::tx_cmsg(7), 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(EINVAL));
    // 8-byte payload: EINVAL.
    let bad = cmsg::encode_cmsg(SOL_SOCKET, SCM_DEVMEM_DMABUF, &7u64.to_ne_bytes());
    let e = sock::sendmsg_with_control(fd, &[IoSlice::new(&data)], &bad, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(EINVAL));
    // SO_ZEROCOPY + MSG_ZEROCOPY, no such binding: EINVAL.
    sock::set_zerocopy(fd, true).unwrap();
    let e = sock::sendmsg_with_control(fd, &[IoSlice::new(&data)], &cmsg::tx_cmsg(7), MSG_ZEROCOPY).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(EINVAL));
    // Through the offset API: same answer, as an Os error naming the binding.
    let e = sock::send_devmem(fd, 7, &[DevmemRange { offset: 0, len: 64 }], 0).unwrap_err();
    assert_eq!(e.errno(), Some(EINVAL));
    assert!(e.to_string().contains("binding 7"), "{e}");
    // Binding id 0 is refused before the kernel sees it.
    assert!(matches!(
        sock::send_devmem(fd, 0, &[DevmemRange { offset: 0, len: 64 }], 0),
        Err(Error::InvalidUsage { .. })
    ));
    // id 0 = "not devmem": sent as ordinary data.
    let n = sock::sendmsg_with_control(fd, &[IoSlice::new(b"yyyyyyyyyyyyyyyy")], &cmsg::tx_cmsg(0), 0).unwrap();
    assert_eq!(n, 16);
    let mut got = [0u8; 16];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"yyyyyyyyyyyyyyyy");
}

#[test]
fn zerocopy_completions_from_the_error_queue() {
    if live("zerocopy_completions").is_none() {
        return;
    }
    let (c, mut s) = tcp_pair();
    let fd = c.as_fd();
    sock::set_zerocopy(fd, true).unwrap();
    let mut tracker = cmsg::ZcTracker::new();
    let payload = [b'z'; 1000];
    for _ in 0..3 {
        let n = sock::sendmsg_with_control(fd, &[IoSlice::new(&payload)], &[], MSG_ZEROCOPY).unwrap();
        assert_eq!(n, 1000);
        tracker.on_send();
    }
    let mut sink = vec![0u8; 3000];
    s.read_exact(&mut sink).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while tracker.pending() > 0 && Instant::now() < deadline {
        for e in sock::read_errqueue(fd).unwrap() {
            match e {
                ErrqueueEntry::Zerocopy(z) => tracker.complete(z),
                ErrqueueEntry::Other(o) => panic!("unexpected extended error {o:?}"),
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(tracker.pending(), 0, "all three sends completed");
    assert!((0..3).all(|i| tracker.is_complete(i)));
    // Loopback never sends from user pages: the kernel reports the copy.
    assert_eq!(tracker.copied(), 3);
}

#[test]
fn dmabuf_sources_answer_unsupported_here() {
    let found = dmabuf::discover();
    eprintln!("{found:#?}");
    if !std::path::Path::new("/dev/udmabuf").exists() {
        let e = UdmabufSource::open().unwrap_err();
        assert!(matches!(&e, Error::Unsupported { reason } if reason.contains("/dev/udmabuf does not exist")), "{e}");
        assert!(found.iter().any(|s| !s.available && s.detail.contains("CONFIG_UDMABUF")));
    }
    if !cuda::driver_present() {
        let e = CudaSource::open(0).unwrap_err();
        assert!(matches!(&e, Error::Unsupported { .. }), "{e}");
        #[cfg(feature = "cuda")]
        assert!(e.to_string().contains("libcuda not found"), "{e}");
        assert!(dmabuf::first_available().is_err());
    }
}
