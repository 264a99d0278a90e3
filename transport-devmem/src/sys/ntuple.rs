//! Flow steering with ethtool ntuple rules: `ioctl(SIOCETHTOOL)` with `ETHTOOL_SRXCLSRLINS`
//! (insert) and `ETHTOOL_SRXCLSRLDEL` (delete), the same requests `ethtool -N <if> flow-type
//! tcp4 ... action <queue>` makes.
//!
//! Devmem RX only sees a flow's payload when the NIC steers that flow to a queue whose memory
//! provider is the RX dma-buf (devmem-uapi §4). The kernel wants `CAP_NET_ADMIN` for it, and
//! most drivers (virtio_net, loopback) have no ntuple filters at all; every refusal carries
//! the `ethtool -N` command an operator would run instead ([`command`]) and the errno
//! classified ([`SteerRefusal`]).
//!
//! Layouts (`include/uapi/linux/ethtool.h`, x86-64): `struct ethtool_rxnfc` is 192 bytes —
//! `cmd` u32 @0, `flow_type` u32 @4, `data` u64 @8, `fs` (`struct ethtool_rx_flow_spec`,
//! 168 bytes) @16, `rule_cnt` u32 @184; inside `fs`: `flow_type` u32 @0, `h_u` (52-byte
//! union) @4, `h_ext` (20 bytes) @56, `m_u` @76, `m_ext` @128, `ring_cookie` u64 @152,
//! `location` u32 @160. `struct ethtool_tcpip4_spec` = `ip4src`, `ip4dst` (be32), `psrc`,
//! `pdst` (be16), `tos` u8; `struct ethtool_tcpip6_spec` = `ip6src[4]`, `ip6dst[4]` (be32),
//! `psrc`, `pdst`, `tclass`. Mask bits set to 1 mean "compare this bit".

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use serde::Serialize;

use crate::error::Error;
use crate::sys::errno;
use crate::sys::sock;

/// `SIOCETHTOOL`.
pub const SIOCETHTOOL: libc::c_ulong = 0x8946;
/// `ETHTOOL_SRXCLSRLDEL`: delete an RX classification rule.
pub const ETHTOOL_SRXCLSRLDEL: u32 = 0x31;
/// `ETHTOOL_SRXCLSRLINS`: insert an RX classification rule.
pub const ETHTOOL_SRXCLSRLINS: u32 = 0x32;
/// `TCP_V4_FLOW`.
pub const TCP_V4_FLOW: u32 = 0x01;
/// `TCP_V6_FLOW`.
pub const TCP_V6_FLOW: u32 = 0x05;
/// `RX_CLS_LOC_ANY`: let the driver choose the rule's location.
pub const RX_CLS_LOC_ANY: u32 = 0x8000_0000;
/// `sizeof(struct ethtool_rxnfc)` on 64-bit.
pub const RXNFC_SIZE: usize = 192;

const FS: usize = 16;
const FS_H_U: usize = FS + 4;
const FS_M_U: usize = FS + 76;
const FS_RING_COOKIE: usize = FS + 152;
const FS_LOCATION: usize = FS + 160;

/// The TCP flow a rule matches, as seen by the receiving NIC: packets from `src` (the peer) to
/// `dst` (this socket's local address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TcpFlow {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl TcpFlow {
    /// The flow that delivers a connected socket's incoming data. An IPv4-mapped IPv6 pair
    /// (`::ffff:a.b.c.d`) is an IPv4 flow on the wire.
    pub fn of_socket(fd: BorrowedFd<'_>) -> io::Result<Self> {
        let (src, dst) = (sock::peer_addr(fd)?, sock::local_addr(fd)?);
        Ok(TcpFlow { src: unmap(src), dst: unmap(dst) })
    }

    /// IPv4 (`tcp4`) or IPv6 (`tcp6`).
    pub fn is_v4(&self) -> bool {
        self.src.is_ipv4() && self.dst.is_ipv4()
    }
}

fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Where the rule goes in the NIC's rule table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleLocation {
    /// `RX_CLS_LOC_ANY`: the driver picks a free slot and the kernel reports it back.
    Any,
    /// An explicit slot (`ethtool -N ... loc N`).
    At(u32),
}

impl RuleLocation {
    fn raw(self) -> u32 {
        match self {
            RuleLocation::Any => RX_CLS_LOC_ANY,
            RuleLocation::At(n) => n,
        }
    }
}

/// An ntuple rule: steer `flow` to RX queue `queue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NtupleRule {
    pub flow: TcpFlow,
    pub queue: u32,
    pub location: RuleLocation,
}

/// The `ethtool -N` command that installs `rule` on `ifname` (what the operator runs when
/// this process may not).
pub fn command(ifname: &str, rule: &NtupleRule) -> String {
    let ty = if rule.flow.is_v4() { "tcp4" } else { "tcp6" };
    let mut c = format!(
        "ethtool -N {ifname} flow-type {ty} src-ip {} dst-ip {} src-port {} dst-port {} action {}",
        rule.flow.src.ip(),
        rule.flow.dst.ip(),
        rule.flow.src.port(),
        rule.flow.dst.port(),
        rule.queue
    );
    if let RuleLocation::At(n) = rule.location {
        c.push_str(&format!(" loc {n}"));
    }
    c
}

/// The `struct ethtool_rxnfc` of an `ETHTOOL_SRXCLSRLINS` request for `rule`.
pub fn encode_insert(rule: &NtupleRule) -> [u8; RXNFC_SIZE] {
    let mut b = [0u8; RXNFC_SIZE];
    let flow_type = if rule.flow.is_v4() { TCP_V4_FLOW } else { TCP_V6_FLOW };
    b[0..4].copy_from_slice(&ETHTOOL_SRXCLSRLINS.to_ne_bytes());
    b[4..8].copy_from_slice(&flow_type.to_ne_bytes());
    b[FS..FS + 4].copy_from_slice(&flow_type.to_ne_bytes());
    match (rule.flow.src.ip(), rule.flow.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            put_tcp4(&mut b[FS_H_U..], s, d, rule.flow.src.port(), rule.flow.dst.port());
            put_tcp4(&mut b[FS_M_U..], Ipv4Addr::BROADCAST, Ipv4Addr::BROADCAST, u16::MAX, u16::MAX);
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(x) => x,
                IpAddr::V4(x) => x.to_ipv6_mapped(),
            };
            put_tcp6(&mut b[FS_H_U..], v6(s), v6(d), rule.flow.src.port(), rule.flow.dst.port());
            let ones = Ipv6Addr::from(u128::MAX);
            put_tcp6(&mut b[FS_M_U..], ones, ones, u16::MAX, u16::MAX);
        }
    }
    b[FS_RING_COOKIE..FS_RING_COOKIE + 8].copy_from_slice(&(rule.queue as u64).to_ne_bytes());
    b[FS_LOCATION..FS_LOCATION + 4].copy_from_slice(&rule.location.raw().to_ne_bytes());
    b
}

fn put_tcp4(b: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) {
    b[0..4].copy_from_slice(&src.octets());
    b[4..8].copy_from_slice(&dst.octets());
    b[8..10].copy_from_slice(&sport.to_be_bytes());
    b[10..12].copy_from_slice(&dport.to_be_bytes());
}

fn put_tcp6(b: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) {
    b[0..16].copy_from_slice(&src.octets());
    b[16..32].copy_from_slice(&dst.octets());
    b[32..34].copy_from_slice(&sport.to_be_bytes());
    b[34..36].copy_from_slice(&dport.to_be_bytes());
}

/// The `struct ethtool_rxnfc` of an `ETHTOOL_SRXCLSRLDEL` request for rule `location`.
pub fn encode_delete(location: u32) -> [u8; RXNFC_SIZE] {
    let mut b = [0u8; RXNFC_SIZE];
    b[0..4].copy_from_slice(&ETHTOOL_SRXCLSRLDEL.to_ne_bytes());
    b[FS_LOCATION..FS_LOCATION + 4].copy_from_slice(&location.to_ne_bytes());
    b
}

/// The location the kernel wrote back into an insert request.
pub fn decode_location(b: &[u8; RXNFC_SIZE]) -> u32 {
    u32::from_ne_bytes(b[FS_LOCATION..FS_LOCATION + 4].try_into().unwrap())
}

/// Why the kernel refused a steering rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SteerRefusal {
    /// `EPERM`: the process lacks `CAP_NET_ADMIN`.
    NoPermission,
    /// `EOPNOTSUPP` / `ENOTSUPP`: the driver has no ntuple filters (virtio_net, loopback), or
    /// the `ntuple` feature is off.
    NotSupported,
    /// `ENODEV`: no such interface.
    NoSuchInterface,
    /// `EINVAL`: the driver rejected the rule (queue out of range, field it cannot match,
    /// ntuple off on some drivers).
    Rejected,
    /// `ENOSPC`: the rule table is full.
    TableFull,
    /// `EEXIST` / `EBUSY`: the explicit location is taken.
    LocationInUse,
    /// Anything else.
    Other,
}

impl SteerRefusal {
    /// Classify the kernel's errno.
    pub fn classify(errno: i32) -> Self {
        match errno {
            errno::EPERM | libc::EACCES => SteerRefusal::NoPermission,
            errno::EOPNOTSUPP | errno::ENOTSUPP => SteerRefusal::NotSupported,
            errno::ENODEV | libc::ENXIO => SteerRefusal::NoSuchInterface,
            errno::EINVAL | errno::ERANGE => SteerRefusal::Rejected,
            libc::ENOSPC => SteerRefusal::TableFull,
            errno::EEXIST | errno::EBUSY => SteerRefusal::LocationInUse,
            _ => SteerRefusal::Other,
        }
    }

    /// Operator-readable reason.
    pub fn reason(self) -> &'static str {
        match self {
            SteerRefusal::NoPermission => "installing ntuple rules needs CAP_NET_ADMIN, which this process lacks",
            SteerRefusal::NotSupported => {
                "the driver has no ntuple flow steering, or it is off (ethtool -K <if> ntuple on)"
            }
            SteerRefusal::NoSuchInterface => "no such interface",
            SteerRefusal::Rejected => "the driver rejected the rule (queue out of range, or a field it cannot match)",
            SteerRefusal::TableFull => "the NIC's rule table is full",
            SteerRefusal::LocationInUse => "the rule location is already in use",
            SteerRefusal::Other => "unexpected answer",
        }
    }
}

impl fmt::Display for SteerRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SteerRefusal::NoPermission => "no-permission",
            SteerRefusal::NotSupported => "not-supported",
            SteerRefusal::NoSuchInterface => "no-such-interface",
            SteerRefusal::Rejected => "rejected",
            SteerRefusal::TableFull => "table-full",
            SteerRefusal::LocationInUse => "location-in-use",
            SteerRefusal::Other => "other",
        })
    }
}

/// The error for a refused rule: the errno classified and the command the operator runs.
pub fn refused(ifname: &str, errno: i32, rule: &NtupleRule) -> Error {
    Error::Steering {
        iface: ifname.to_owned(),
        errno,
        refusal: SteerRefusal::classify(errno),
        command: command(ifname, rule),
    }
}

#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

fn ethtool_ioctl(ifname: &str, buf: &mut [u8; RXNFC_SIZE]) -> io::Result<()> {
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ || ifname.contains('\0') {
        return Err(io::Error::from_raw_os_error(errno::ENODEV));
    }
    let mut ifr = IfreqData { name: [0; libc::IFNAMSIZ], data: buf.as_mut_ptr().cast(), _pad: [0; 16] };
    ifr.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd we own exclusively.
    let s = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: live fd; `ifr` is a 40-byte struct ifreq whose ifr_data points to `buf`, a
    // 192-byte struct ethtool_rxnfc the kernel reads and (for inserts) writes back; both
    // outlive the call.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), SIOCETHTOOL as libc::Ioctl, &mut ifr as *mut IfreqData) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Insert `rule` on `ifname`; returns the rule's location (the driver's choice for
/// [`RuleLocation::Any`]).
pub fn insert(ifname: &str, rule: &NtupleRule) -> io::Result<u32> {
    let mut b = encode_insert(rule);
    ethtool_ioctl(ifname, &mut b)?;
    Ok(decode_location(&b))
}

/// Delete the rule at `location` on `ifname`.
pub fn delete(ifname: &str, location: u32) -> io::Result<()> {
    let mut b = encode_delete(location);
    ethtool_ioctl(ifname, &mut b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddrV4, SocketAddrV6};

    fn v4_rule(location: RuleLocation) -> NtupleRule {
        NtupleRule {
            flow: TcpFlow {
                src: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 40000)),
                dst: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 5000)),
            },
            queue: 3,
            location,
        }
    }

    #[test]
    fn golden_insert_tcp4() {
        let b = encode_insert(&v4_rule(RuleLocation::Any));
        let mut want = [0u8; RXNFC_SIZE];
        want[0] = 0x32; // cmd ETHTOOL_SRXCLSRLINS
        want[4] = 1; // flow_type TCP_V4_FLOW
        want[16] = 1; // fs.flow_type
        want[20..24].copy_from_slice(&[10, 0, 0, 2]); // h_u.ip4src
        want[24..28].copy_from_slice(&[10, 0, 0, 1]); // h_u.ip4dst
        want[28..30].copy_from_slice(&[0x9c, 0x40]); // psrc 40000 big-endian
        want[30..32].copy_from_slice(&[0x13, 0x88]); // pdst 5000
        want[92..104].copy_from_slice(&[0xff; 12]); // m_u: addresses and ports compared
        want[168] = 3; // ring_cookie = queue 3
        want[176..180].copy_from_slice(&[0, 0, 0, 0x80]); // location RX_CLS_LOC_ANY
        assert_eq!(b, want);
        assert_eq!(decode_location(&b), RX_CLS_LOC_ANY);
    }

    #[test]
    fn golden_insert_tcp6_and_delete() {
        let rule = NtupleRule {
            flow: TcpFlow {
                src: SocketAddr::V6(SocketAddrV6::new("fd00::2".parse().unwrap(), 1, 0, 0)),
                dst: SocketAddr::V6(SocketAddrV6::new("fd00::1".parse().unwrap(), 2, 0, 0)),
            },
            queue: 9,
            location: RuleLocation::At(7),
        };
        let b = encode_insert(&rule);
        assert_eq!(&b[0..8], &[0x32, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(b[20], 0xfd);
        assert_eq!(b[35], 2);
        assert_eq!(b[51], 1);
        assert_eq!(&b[52..56], &[0, 1, 0, 2]);
        assert!(b[92..128].iter().all(|&x| x == 0xff));
        assert_eq!(b[168], 9);
        assert_eq!(decode_location(&b), 7);
        assert_eq!(
            command("eth0", &rule),
            "ethtool -N eth0 flow-type tcp6 src-ip fd00::2 dst-ip fd00::1 src-port 1 dst-port 2 action 9 loc 7"
        );
        let d = encode_delete(7);
        assert_eq!(&d[0..4], &[0x31, 0, 0, 0]);
        assert_eq!(d[176], 7);
        assert_eq!(d.iter().map(|&x| x as u32).sum::<u32>(), 0x31 + 7);
    }

    #[test]
    fn command_and_classification() {
        assert_eq!(
            command("eth0", &v4_rule(RuleLocation::Any)),
            "ethtool -N eth0 flow-type tcp4 src-ip 10.0.0.2 dst-ip 10.0.0.1 src-port 40000 dst-port 5000 action 3"
        );
        assert_eq!(SteerRefusal::classify(95), SteerRefusal::NotSupported);
        assert_eq!(SteerRefusal::classify(1), SteerRefusal::NoPermission);
        assert_eq!(SteerRefusal::classify(19), SteerRefusal::NoSuchInterface);
        assert_eq!(SteerRefusal::classify(22), SteerRefusal::Rejected);
        assert_eq!(SteerRefusal::classify(28), SteerRefusal::TableFull);
        assert_eq!(SteerRefusal::classify(5), SteerRefusal::Other);
    }

    #[test]
    fn mapped_v6_is_a_v4_flow() {
        let a: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        assert_eq!(unmap(a), "127.0.0.1:80".parse::<SocketAddr>().unwrap());
        let f = TcpFlow { src: unmap(a), dst: "127.0.0.1:81".parse().unwrap() };
        assert!(f.is_v4());
    }
}
