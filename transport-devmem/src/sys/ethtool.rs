//! The `ethtool` generic-netlink family, only what devmem needs: `ETHTOOL_MSG_RINGS_GET`
//! (`tcp-data-split`, `hds-thresh`).
#![forbid(unsafe_code)]

use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::sys::genl;
use crate::sys::netlink::{AttrSet, DecodeError, GenlMsg, NLM_F_ACK, Request, RequestBuilder};
use crate::sys::socket::{Mode, NETLINK_GENERIC, NlSocket};

/// Family name.
pub const FAMILY_NAME: &str = "ethtool";
/// `ETHTOOL_GENL_VERSION`.
pub const VERSION: u8 = 1;
/// `ETHTOOL_MSG_RINGS_GET`.
pub const MSG_RINGS_GET: u8 = 15;

/// `ETHTOOL_A_HEADER_*`.
pub mod header_attr {
    pub const DEV_INDEX: u16 = 1;
    pub const DEV_NAME: u16 = 2;
    pub const FLAGS: u16 = 3;
}

/// `ETHTOOL_A_RINGS_*`.
pub mod rings_attr {
    pub const HEADER: u16 = 1;
    pub const RX_MAX: u16 = 2;
    pub const RX_MINI_MAX: u16 = 3;
    pub const RX_JUMBO_MAX: u16 = 4;
    pub const TX_MAX: u16 = 5;
    pub const RX: u16 = 6;
    pub const RX_MINI: u16 = 7;
    pub const RX_JUMBO: u16 = 8;
    pub const TX: u16 = 9;
    pub const RX_BUF_LEN: u16 = 10;
    pub const TCP_DATA_SPLIT: u16 = 11;
    pub const CQE_SIZE: u16 = 12;
    pub const TX_PUSH: u16 = 13;
    pub const RX_PUSH: u16 = 14;
    pub const TX_PUSH_BUF_LEN: u16 = 15;
    pub const TX_PUSH_BUF_LEN_MAX: u16 = 16;
    pub const HDS_THRESH: u16 = 17;
    pub const HDS_THRESH_MAX: u16 = 18;
}

static HEADER_SET: AttrSet =
    AttrSet { name: "header", attrs: &[(1, "dev-index"), (2, "dev-name"), (3, "flags")], nests: &[] };

static RINGS_SET: AttrSet = AttrSet {
    name: "rings",
    attrs: &[(1, "header"), (11, "tcp-data-split"), (17, "hds-thresh")],
    nests: &[(1, &HEADER_SET)],
};

/// `ETHTOOL_TCP_DATA_SPLIT_*` as reported by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TcpDataSplit {
    /// The driver does not report it (attribute absent or 0 = "unknown").
    Unknown,
    /// Header split is off: devmem RX bind fails with "tcp-data-split is disabled".
    Disabled,
    /// Header split is on.
    Enabled,
}

/// Ring parameters relevant to devmem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rings {
    pub rx: Option<u32>,
    pub rx_max: Option<u32>,
    pub tx: Option<u32>,
    pub tx_max: Option<u32>,
    pub rx_buf_len: Option<u32>,
    pub tcp_data_split: TcpDataSplit,
    /// `hds-thresh` (6.14+); `None` when the driver does not report it.
    pub hds_thresh: Option<u32>,
    pub hds_thresh_max: Option<u32>,
}

impl Rings {
    /// Decode a `RINGS_GET` reply.
    pub fn decode(m: &GenlMsg) -> Result<Self, DecodeError> {
        let mut r = Rings {
            rx: None,
            rx_max: None,
            tx: None,
            tx_max: None,
            rx_buf_len: None,
            tcp_data_split: TcpDataSplit::Unknown,
            hds_thresh: None,
            hds_thresh_max: None,
        };
        for a in m.attrs()? {
            match a.ty {
                rings_attr::RX => r.rx = Some(a.u32()?),
                rings_attr::RX_MAX => r.rx_max = Some(a.u32()?),
                rings_attr::TX => r.tx = Some(a.u32()?),
                rings_attr::TX_MAX => r.tx_max = Some(a.u32()?),
                rings_attr::RX_BUF_LEN => r.rx_buf_len = Some(a.u32()?),
                rings_attr::TCP_DATA_SPLIT => {
                    r.tcp_data_split = match a.u8()? {
                        1 => TcpDataSplit::Disabled,
                        2 => TcpDataSplit::Enabled,
                        _ => TcpDataSplit::Unknown,
                    }
                }
                rings_attr::HDS_THRESH => r.hds_thresh = Some(a.u32()?),
                rings_attr::HDS_THRESH_MAX => r.hds_thresh_max = Some(a.u32()?),
                _ => {}
            }
        }
        Ok(r)
    }
}

/// `RINGS_GET` for one device by index.
pub fn rings_get_request(family_id: u16, ifindex: u32, seq: u32) -> Request {
    let mut b =
        RequestBuilder::genl(family_id, NLM_F_ACK, seq, MSG_RINGS_GET, VERSION, "ethtool-rings-get", &RINGS_SET);
    b.begin_nest(rings_attr::HEADER, true);
    b.put_u32(header_attr::DEV_INDEX, ifindex);
    b.end_nest();
    b.finish()
}

/// A client of the `ethtool` family.
#[derive(Debug)]
pub struct Ethtool {
    sock: NlSocket,
    family_id: u16,
}

impl Ethtool {
    /// Resolve the family; [`Error::Unsupported`] when the kernel lacks ethtool netlink.
    pub fn open(timeout: Duration) -> Result<Self> {
        let mut sock = NlSocket::open(NETLINK_GENERIC, timeout)?;
        match genl::resolve_family(&mut sock, FAMILY_NAME)? {
            Some(f) => Ok(Ethtool { sock, family_id: f.id }),
            None => {
                Err(Error::unsupported("the kernel has no \"ethtool\" generic-netlink family (CONFIG_ETHTOOL_NETLINK)"))
            }
        }
    }

    /// Ring parameters of `ifindex` (`ifname` is used in errors). Drivers without
    /// `get_ringparam` answer `EOPNOTSUPP`.
    pub fn rings(&mut self, ifindex: u32, ifname: &str) -> Result<Rings> {
        let msgs = self.sock.transact(rings_get_request(self.family_id, ifindex, 0), Mode::Do, ifname)?;
        let m = msgs.first().ok_or_else(|| Error::Malformed {
            op: "ethtool-rings-get",
            iface: ifname.to_owned(),
            what: "no rings message".into(),
        })?;
        Rings::decode(m).map_err(|e| Error::Malformed { op: "ethtool-rings-get", iface: ifname.to_owned(), what: e.0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::netlink::{decode_error, parse_messages};
    use crate::sys::recorded::*;

    #[test]
    fn golden_rings_get() {
        // len 32, family 21, REQUEST|ACK, seq 14; cmd 15 version 1;
        // HEADER(1|NLA_F_NESTED) len 12 { DEV_INDEX(1) = 4 }.
        #[rustfmt::skip]
        let want: &[u8] = &[
            32, 0, 0, 0, 21, 0, 5, 0, 14, 0, 0, 0, 0, 0, 0, 0,
            15, 1, 0, 0,
            12, 0, 1, 0x80, 8, 0, 1, 0, 4, 0, 0, 0,
        ];
        assert_eq!(rings_get_request(21, 4, 14).bytes, want);
        assert_eq!(rings_get_request(21, 4, 14).bytes, REQ_RINGS_GET_ETH0);
        assert_eq!(rings_get_request(21, 1, 15).bytes, REQ_RINGS_GET_LO);
    }

    #[test]
    fn decode_recorded_virtio_rings() {
        let msgs = parse_messages(REPLY_RINGS_GET_ETH0_0).unwrap();
        let m = GenlMsg::from_payload(msgs[0].payload).unwrap();
        let r = Rings::decode(&m).unwrap();
        assert_eq!(r.rx, Some(256));
        assert_eq!(r.tx, Some(256));
        assert_eq!(r.rx_max, Some(256));
        // virtio_net reports neither tcp-data-split nor hds-thresh.
        assert_eq!(r.tcp_data_split, TcpDataSplit::Unknown);
        assert_eq!(r.hds_thresh, None);
        // ...then the ack.
        let ack = parse_messages(REPLY_RINGS_GET_ETH0_1).unwrap();
        assert_eq!(decode_error(&ack[0]).unwrap().errno, 0);
    }

    #[test]
    fn decode_split_and_thresh() {
        let m = GenlMsg { cmd: 16, version: 1, attrs: vec![5, 0, 11, 0, 1, 0, 0, 0, 8, 0, 17, 0, 0, 1, 0, 0] };
        let r = Rings::decode(&m).unwrap();
        assert_eq!(r.tcp_data_split, TcpDataSplit::Disabled);
        assert_eq!(r.hds_thresh, Some(256));
    }
}
