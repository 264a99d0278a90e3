//! Interface selection (`DEVCCL_SOCKET_IFNAME`, `DEVCCL_SOCKET_FAMILY`, route to the
//! rendezvous) against this machine's real interfaces.

use std::net::IpAddr;

use devccl_core::config::{Config, Env};
use devccl_core::{Error, Rank};
use devccl_transport_tcp::{TcpOptions, interfaces, select_address};

fn lo4() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

#[test]
fn prefix_and_exact_names() {
    assert_eq!(select_address(Some("lo"), None, None).unwrap(), (lo4(), "lo".to_string()));
    assert_eq!(select_address(Some("=lo"), None, None).unwrap(), (lo4(), "lo".to_string()));
    let e = select_address(Some("=l"), None, None).unwrap_err().to_string();
    assert!(e.contains("DEVCCL_SOCKET_IFNAME==l"), "exact names do not match prefixes: {e}");
    assert_eq!(select_address(Some("nonexistent0,lo"), Some(4), None).unwrap().1, "lo");
}

#[test]
fn exclusion_picks_another_interface() {
    let others: Vec<_> = interfaces().unwrap().into_iter().filter(|a| a.name != "lo").collect();
    match select_address(Some("^lo"), None, None) {
        Ok((addr, name)) => {
            assert_ne!(name, "lo");
            assert!(others.iter().any(|a| a.name == name && a.addr == addr));
            // IPv4 is preferred when the family is free (eth0 here: 192.0.2.2).
            if others.iter().any(|a| a.name == name && a.addr.is_ipv4()) {
                assert!(addr.is_ipv4(), "{addr}");
            }
        }
        Err(e) => assert!(others.is_empty(), "{e}"),
    }
}

#[test]
fn unknown_name_lists_the_interfaces() {
    let e = select_address(Some("nosuchif"), None, None).unwrap_err();
    assert!(matches!(e, Error::InvalidUsage(_)));
    let msg = e.to_string();
    assert!(msg.contains("DEVCCL_SOCKET_IFNAME=nosuchif") && msg.contains("lo (127.0.0.1"), "{msg}");
}

#[test]
fn family_selects_ipv6_on_loopback() {
    if !interfaces().unwrap().iter().any(|a| a.name == "lo" && a.addr.is_ipv6()) {
        eprintln!("skipping: no ::1 on lo");
        return;
    }
    assert_eq!(select_address(Some("lo"), Some(6), None).unwrap(), ("::1".parse().unwrap(), "lo".to_string()));
    assert_eq!(select_address(Some("lo"), Some(4), None).unwrap().0, lo4());
}

#[test]
fn route_toward_the_rendezvous() {
    let to = "127.0.0.1:29500".parse().unwrap();
    assert_eq!(select_address(None, None, Some(to)).unwrap(), (lo4(), "lo".to_string()));
    if interfaces().unwrap().iter().any(|a| a.addr == "::1".parse::<IpAddr>().unwrap()) {
        let to6 = "[::1]:29500".parse().unwrap();
        assert_eq!(select_address(None, None, Some(to6)).unwrap().0, "::1".parse::<IpAddr>().unwrap());
    }
    // Without a rendezvous address: a non-loopback interface when there is one.
    let (addr, _) = select_address(None, None, None).unwrap();
    let any_other = interfaces().unwrap().iter().any(|a| !a.loopback);
    assert_eq!(addr.is_loopback(), !any_other, "{addr}");
}

#[test]
fn options_from_config() {
    let env = Env::from_map(
        [("DEVCCL_SOCKET_IFNAME", "=lo"), ("DEVCCL_NSOCKS", "3"), ("DEVCCL_SOCKET_FAMILY", "ipv4")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    let cfg = Config::from(&env).unwrap();
    let o = TcpOptions::from_config(&cfg, Rank(2), None).unwrap();
    assert_eq!((o.addr, o.lanes, o.rank, o.ifname.as_deref()), (lo4(), 3, Rank(2), Some("lo")));
    assert_eq!(o.activation_timeout, cfg.init_timeout);
}
