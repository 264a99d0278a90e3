//! Choosing the local address data sockets listen on (`DEVCCL_SOCKET_IFNAME`,
//! `DEVCCL_SOCKET_FAMILY`).
//!
//! The filter syntax is NCCL's (`NCCL_SOCKET_IFNAME`): a comma-separated list of interface
//! name prefixes; a leading `^` turns the list into exclusions; a leading `=` (after the `^`,
//! if any) makes the names exact instead of prefixes. Without a filter the interface is the
//! one the kernel routes toward the rendezvous host, which is the address peers can most
//! likely reach us on.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};

use devccl_core::{Error, Result};
use nix::ifaddrs::getifaddrs;
use nix::net::if_::InterfaceFlags;

/// One usable address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddr {
    /// Interface name (`eth0`, `lo`).
    pub name: String,
    /// The address.
    pub addr: IpAddr,
    /// True for loopback interfaces.
    pub loopback: bool,
}

/// Every address of every interface that is up, in the order the kernel lists them.
/// IPv6 link-local addresses are left out: they need a scope id, which devccl's endpoint
/// format does not carry.
pub fn interfaces() -> Result<Vec<InterfaceAddr>> {
    let list = getifaddrs().map_err(|e| Error::system("getifaddrs", std::io::Error::from(e)))?;
    let mut out = Vec::new();
    for ifa in list {
        if !ifa.flags.contains(InterfaceFlags::IFF_UP) {
            continue;
        }
        let Some(sa) = ifa.address.as_ref() else {
            continue;
        };
        let addr = if let Some(v4) = sa.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            let ip = v6.ip();
            if ip.is_unicast_link_local() {
                continue;
            }
            IpAddr::V6(ip)
        } else {
            continue;
        };
        out.push(InterfaceAddr {
            name: ifa.interface_name.clone(),
            addr,
            loopback: ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK),
        });
    }
    Ok(out)
}

/// A parsed NCCL-style interface filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfFilter {
    exclude: bool,
    exact: bool,
    names: Vec<String>,
}

impl IfFilter {
    /// Parse `spec` (see the module docs).
    pub fn parse(spec: &str) -> IfFilter {
        let mut s = spec.trim();
        let exclude = s.starts_with('^');
        if exclude {
            s = &s[1..];
        }
        let exact = s.starts_with('=');
        if exact {
            s = &s[1..];
        }
        let names = s.split(',').map(str::trim).filter(|n| !n.is_empty()).map(String::from).collect();
        IfFilter { exclude, exact, names }
    }

    /// True when interface `name` passes the filter.
    pub fn matches(&self, name: &str) -> bool {
        let listed = self.names.iter().any(|n| if self.exact { name == n } else { name.starts_with(n.as_str()) });
        listed != self.exclude
    }
}

fn family_ok(addr: &IpAddr, family: Option<u8>) -> bool {
    match family {
        Some(4) => addr.is_ipv4(),
        Some(6) => addr.is_ipv6(),
        _ => true,
    }
}

fn family_name(family: Option<u8>) -> &'static str {
    match family {
        Some(4) => "IPv4",
        Some(6) => "IPv6",
        _ => "IPv4 or IPv6",
    }
}

/// Rank candidates: IPv4 before IPv6 (when the family is free), routable before IPv4
/// link-local (169.254/16, usually an unconfigured NIC), then the kernel's order.
fn best(cands: Vec<&InterfaceAddr>) -> Option<&InterfaceAddr> {
    let score = |a: &InterfaceAddr| {
        let link_local = matches!(a.addr, IpAddr::V4(v4) if v4.is_link_local());
        (link_local, a.addr.is_ipv6())
    };
    cands.into_iter().enumerate().min_by_key(|(i, a)| (score(a), *i)).map(|(_, a)| a)
}

/// "lo (127.0.0.1, ::1), eth0 (192.0.2.2)" for error messages.
fn describe(all: &[InterfaceAddr]) -> String {
    let mut by_name: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for a in all {
        by_name.entry(&a.name).or_default().push(a.addr.to_string());
    }
    if by_name.is_empty() {
        return "none with an address".into();
    }
    by_name.iter().map(|(n, a)| format!("{n} ({})", a.join(", "))).collect::<Vec<_>>().join(", ")
}

/// Pick the local address (and its interface name) for data sockets.
///
/// - `cfg_ifname`: `DEVCCL_SOCKET_IFNAME` (NCCL syntax, see the module docs).
/// - `family`: `DEVCCL_SOCKET_FAMILY` as `Some(4)` / `Some(6)`.
/// - `toward`: the rendezvous address; without a filter the address of the route toward it
///   is used (found with a connected UDP socket, which sends nothing).
///
/// With neither a filter nor a usable route, the first non-loopback interface of the family
/// is used, then loopback. When nothing fits, an [`Error::InvalidUsage`] lists the
/// interfaces that exist.
pub fn select_address(
    cfg_ifname: Option<&str>,
    family: Option<u8>,
    toward: Option<SocketAddr>,
) -> Result<(IpAddr, String)> {
    let all = interfaces()?;
    if let Some(spec) = cfg_ifname.map(str::trim).filter(|s| !s.is_empty()) {
        let filter = IfFilter::parse(spec);
        let cands: Vec<&InterfaceAddr> =
            all.iter().filter(|a| filter.matches(&a.name) && family_ok(&a.addr, family)).collect();
        return best(cands).map(|a| (a.addr, a.name.clone())).ok_or_else(|| {
            Error::usage(format!(
                "DEVCCL_SOCKET_IFNAME={spec} matches no interface that is up with an {} address; interfaces: {}",
                family_name(family),
                describe(&all)
            ))
        });
    }
    if let Some(dest) = toward.filter(|d| family_ok(&d.ip(), family))
        && let Some(local) = route_source(dest)
    {
        if let Some(a) = all.iter().find(|a| a.addr == local) {
            return Ok((local, a.name.clone()));
        }
        tracing::debug!(%local, %dest, "route source address belongs to no listed interface; using the fallback");
    }
    let non_loop: Vec<&InterfaceAddr> = all.iter().filter(|a| !a.loopback && family_ok(&a.addr, family)).collect();
    let pick = best(non_loop).or_else(|| best(all.iter().filter(|a| family_ok(&a.addr, family)).collect()));
    pick.map(|a| (a.addr, a.name.clone())).ok_or_else(|| {
        Error::usage(format!(
            "no interface that is up has an {} address (DEVCCL_SOCKET_FAMILY); interfaces: {}",
            family_name(family),
            describe(&all)
        ))
    })
}

/// The local address the kernel would use to reach `dest` (no packet is sent: connecting a
/// UDP socket only consults the routing table).
fn route_source(dest: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if dest.is_ipv4() { "0.0.0.0:0".parse().ok()? } else { "[::]:0".parse().ok()? };
    let s = UdpSocket::bind(bind).ok()?;
    // Port 0 cannot be connected to; any port gives the same route.
    let dest = if dest.port() == 0 { SocketAddr::new(dest.ip(), 9) } else { dest };
    s.connect(dest).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// The interface that owns `addr`, when one does.
pub fn interface_of(addr: IpAddr) -> Option<String> {
    interfaces().ok()?.into_iter().find(|a| a.addr == addr).map(|a| a.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_syntax() {
        let f = IfFilter::parse("eth,ib");
        assert!(f.matches("eth0") && f.matches("ib1") && !f.matches("lo"));
        let f = IfFilter::parse("^lo,docker");
        assert!(f.matches("eth0") && !f.matches("lo") && !f.matches("docker0"));
        let f = IfFilter::parse("=eth0");
        assert!(f.matches("eth0") && !f.matches("eth01"));
        let f = IfFilter::parse("^=lo");
        assert!(!f.matches("lo") && f.matches("lo2"));
    }

    #[test]
    fn ranking_prefers_routable_ipv4() {
        let a = |n: &str, s: &str| InterfaceAddr { name: n.into(), addr: s.parse().unwrap(), loopback: false };
        let list = [a("x", "169.254.1.1"), a("y", "fd00::1"), a("z", "10.0.0.1")];
        assert_eq!(best(list.iter().collect()).unwrap().name, "z");
        assert_eq!(best(list[..2].iter().collect()).unwrap().name, "y");
    }
}
