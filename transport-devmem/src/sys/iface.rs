//! Interfaces, addresses, routes and credentials.

use std::ffi::{CStr, CString};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

/// `if_nametoindex`; `None` when there is no such interface.
pub fn if_nametoindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// `if_indextoname`; `None` when there is no such interface.
pub fn if_indextoname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as the function requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Some(s.to_string_lossy().into_owned())
}

/// One interface address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub ifname: String,
    pub addr: IpAddr,
}

/// Every IPv4/IPv6 address of every interface (`getifaddrs`).
pub fn interface_addrs() -> io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; freed with freeifaddrs below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        // SAFETY: ifa_addr is non-null and points to at least a sockaddr header.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        let addr = match family {
            libc::AF_INET => {
                // SAFETY: family AF_INET means the storage is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: family AF_INET6 means the storage is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        out.push(IfAddr { ifname: name, addr });
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The interface the kernel's route to `peer` uses, and the local source address.
///
/// Connects a UDP socket to the peer (no packet is sent; connect on UDP only resolves the
/// route) and maps the source address to its interface. A peer that is one of this host's own
/// addresses (or loopback) is reached through `lo`.
pub fn route_interface(peer: IpAddr) -> io::Result<(String, IpAddr)> {
    let addrs = interface_addrs()?;
    if peer.is_loopback() || addrs.iter().any(|a| a.addr == peer) {
        let lo = addrs.iter().find(|a| a.addr.is_loopback()).map(|a| a.ifname.clone()).unwrap_or_else(|| "lo".into());
        return Ok((lo, peer));
    }
    let bind: SocketAddr = match peer {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(bind)?;
    sock.connect((peer, 9))?;
    let local = sock.local_addr()?.ip();
    let name = addrs.iter().find(|a| a.addr == local).map(|a| a.ifname.clone()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("source address {local} of the route to {peer} is on no interface"),
        )
    })?;
    Ok((name, local))
}

/// Effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether the effective capability set has `CAP_NET_ADMIN` (bit 12 of `CapEff` in
/// `/proc/self/status`).
pub fn has_cap_net_admin() -> bool {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return euid() == 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// Kernel release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Driver bound to the interface (`/sys/class/net/<if>/device/driver`), if any.
pub fn driver_of(ifname: &str) -> Option<String> {
    let p = std::fs::read_link(format!("/sys/class/net/{ifname}/device/driver")).ok()?;
    p.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// `operstate` of the interface (`up`, `down`, `unknown`...).
pub fn operstate(ifname: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/operstate")).ok().map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lo_is_index_1_and_round_trips() {
        assert_eq!(if_nametoindex("lo"), Some(1));
        assert_eq!(if_indextoname(1).as_deref(), Some("lo"));
        assert_eq!(if_nametoindex("no-such-if0"), None);
        assert_eq!(if_nametoindex("bad\0name"), None);
    }

    #[test]
    fn loopback_route_is_lo() {
        let (ifname, _) = route_interface("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(ifname, "lo");
    }
}
