//! Connection handshake messages.

use super::{HANDSHAKE_MAGIC, WIRE_VERSION, get_u16, get_u32};
use crate::error::{Error, Result};
use crate::types::{CommId, Rank};

/// Encoded size of a [`Challenge`].
pub const CHALLENGE_LEN: usize = 24;
/// Encoded size of a [`Hello`].
pub const HELLO_LEN: usize = 72;
/// Encoded size of a [`Verdict`].
pub const VERDICT_LEN: usize = 8;

const KIND_CHALLENGE: u8 = 1;
const KIND_HELLO: u8 = 2;
const KIND_VERDICT: u8 = 3;

fn check_prefix(b: &[u8], need: usize, kind: u8, what: &str) -> Result<()> {
    let bad = |m: String| Error::Remote { peer: None, message: format!("invalid {what}: {m}") };
    if b.len() < need {
        return Err(bad(format!("{} bytes, need {need}", b.len())));
    }
    if b[0..4] != HANDSHAKE_MAGIC {
        return Err(bad(format!("bad magic {:02x?} (not a devccl peer?)", &b[0..4])));
    }
    if b[4] != WIRE_VERSION {
        return Err(bad(format!("wire version {} (this build speaks {WIRE_VERSION})", b[4])));
    }
    if b[5] != kind {
        return Err(bad(format!("message kind {} (expected {kind})", b[5])));
    }
    Ok(())
}

/// Acceptor → connector: a fresh nonce the connector must authenticate.
///
/// ```text
/// 0 4 magic "DVCH" | 4 1 version | 5 1 kind=1 | 6 2 reserved | 8 16 nonce
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// Random nonce.
    pub nonce: [u8; 16],
}

impl Challenge {
    /// Encode.
    pub fn encode(&self) -> [u8; CHALLENGE_LEN] {
        let mut b = [0u8; CHALLENGE_LEN];
        b[0..4].copy_from_slice(&HANDSHAKE_MAGIC);
        b[4] = WIRE_VERSION;
        b[5] = KIND_CHALLENGE;
        b[8..24].copy_from_slice(&self.nonce);
        b
    }

    /// Decode.
    pub fn decode(b: &[u8]) -> Result<Challenge> {
        check_prefix(b, CHALLENGE_LEN, KIND_CHALLENGE, "handshake challenge")?;
        Ok(Challenge { nonce: b[8..24].try_into().expect("16 bytes") })
    }
}

/// Connector → acceptor: who is calling, on which communicator and lane.
///
/// ```text
///  0  4 magic "DVCH" | 4 1 version | 5 1 kind=2 | 6 1 transport code | 7 1 reserved
///  8 16 comm id
/// 24  4 from rank | 28 4 to rank
/// 32  2 lane | 34 2 lanes in this connection | 36 4 reserved
/// 40 32 auth tag: HMAC-SHA256 over the nonce and bytes 6..40 (zero without a secret)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Which transport the connection is for (its own numbering).
    pub transport: u8,
    /// Communicator.
    pub comm: CommId,
    /// Connecting rank.
    pub from: Rank,
    /// Rank being connected to.
    pub to: Rank,
    /// Socket index within the connection.
    pub lane: u16,
    /// Number of sockets the connection will have.
    pub lanes: u16,
    /// Authentication tag.
    pub auth: [u8; 32],
}

impl Hello {
    /// The bytes the auth tag covers besides the nonce (bytes 6..40 of the encoding).
    pub fn signed_part(&self) -> [u8; 34] {
        let e = self.encode();
        e[6..40].try_into().expect("34 bytes")
    }

    /// Encode.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&HANDSHAKE_MAGIC);
        b[4] = WIRE_VERSION;
        b[5] = KIND_HELLO;
        b[6] = self.transport;
        b[8..24].copy_from_slice(&self.comm.0);
        b[24..28].copy_from_slice(&self.from.0.to_le_bytes());
        b[28..32].copy_from_slice(&self.to.0.to_le_bytes());
        b[32..34].copy_from_slice(&self.lane.to_le_bytes());
        b[34..36].copy_from_slice(&self.lanes.to_le_bytes());
        b[40..72].copy_from_slice(&self.auth);
        b
    }

    /// Decode.
    pub fn decode(b: &[u8]) -> Result<Hello> {
        check_prefix(b, HELLO_LEN, KIND_HELLO, "handshake hello")?;
        Ok(Hello {
            transport: b[6],
            comm: CommId(b[8..24].try_into().expect("16 bytes")),
            from: Rank(get_u32(b, 24)),
            to: Rank(get_u32(b, 28)),
            lane: get_u16(b, 32),
            lanes: get_u16(b, 34),
            auth: b[40..72].try_into().expect("32 bytes"),
        })
    }
}

/// Why an acceptor refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VerdictStatus {
    /// Accepted.
    Ok = 0,
    /// The auth tag did not verify (wrong or missing secret).
    BadAuth = 1,
    /// Not our communicator.
    WrongComm = 2,
    /// Addressed to another rank, or from a rank that is not a peer.
    WrongRank = 3,
    /// Lane number out of range or duplicated.
    BadLane = 4,
}

/// Acceptor → connector: accepted or why not.
///
/// ```text
/// 0 4 magic "DVCH" | 4 1 version | 5 1 kind=3 | 6 1 status | 7 1 reserved
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The answer.
    pub status: VerdictStatus,
}

impl Verdict {
    /// Encode.
    pub fn encode(&self) -> [u8; VERDICT_LEN] {
        let mut b = [0u8; VERDICT_LEN];
        b[0..4].copy_from_slice(&HANDSHAKE_MAGIC);
        b[4] = WIRE_VERSION;
        b[5] = KIND_VERDICT;
        b[6] = self.status as u8;
        b
    }

    /// Decode.
    pub fn decode(b: &[u8]) -> Result<Verdict> {
        check_prefix(b, VERDICT_LEN, KIND_VERDICT, "handshake verdict")?;
        let status = match b[6] {
            0 => VerdictStatus::Ok,
            1 => VerdictStatus::BadAuth,
            2 => VerdictStatus::WrongComm,
            3 => VerdictStatus::WrongRank,
            4 => VerdictStatus::BadLane,
            s => {
                return Err(Error::Remote { peer: None, message: format!("invalid handshake verdict status {s}") });
            }
        };
        Ok(Verdict { status })
    }
}

impl VerdictStatus {
    /// What the connector should tell its user.
    pub fn explain(self) -> &'static str {
        match self {
            VerdictStatus::Ok => "accepted",
            VerdictStatus::BadAuth => "authentication failed: DEVCCL_SECRET differs between ranks",
            VerdictStatus::WrongComm => "the listener belongs to another communicator (stale address or port reuse)",
            VerdictStatus::WrongRank => "the listener is not the rank we meant to reach, or does not know us",
            VerdictStatus::BadLane => "invalid or duplicate socket lane",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_challenge_and_verdict() {
        let c = Challenge { nonce: [0xab; 16] };
        let mut g = vec![b'D', b'V', b'C', b'H', 1, 1, 0, 0];
        g.extend([0xab; 16]);
        assert_eq!(c.encode().to_vec(), g);
        assert_eq!(Challenge::decode(&g).unwrap(), c);
        let v = Verdict { status: VerdictStatus::BadAuth };
        assert_eq!(v.encode(), [b'D', b'V', b'C', b'H', 1, 3, 1, 0]);
        assert_eq!(Verdict::decode(&v.encode()).unwrap(), v);
        assert!(Verdict::decode(&[b'D', b'V', b'C', b'H', 1, 3, 9, 0]).is_err());
    }

    #[test]
    fn golden_hello() {
        let h = Hello {
            transport: 1,
            comm: CommId([0x11; 16]),
            from: Rank(2),
            to: Rank(5),
            lane: 1,
            lanes: 4,
            auth: [0xcd; 32],
        };
        let mut g = vec![b'D', b'V', b'C', b'H', 1, 2, 1, 0];
        g.extend([0x11; 16]);
        g.extend([2, 0, 0, 0, 5, 0, 0, 0, 1, 0, 4, 0, 0, 0, 0, 0]);
        g.extend([0xcd; 32]);
        assert_eq!(h.encode().to_vec(), g);
        assert_eq!(Hello::decode(&g).unwrap(), h);
        assert_eq!(&h.signed_part()[..], &g[6..40]);
    }

    #[test]
    fn rejects_other_protocols() {
        assert!(Hello::decode(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n......................................").is_err());
        assert!(Hello::decode(&Challenge { nonce: [0; 16] }.encode()).is_err(), "wrong kind");
        let mut v = Verdict { status: VerdictStatus::Ok }.encode();
        v[4] = 2;
        assert!(Verdict::decode(&v).unwrap_err().to_string().contains("version"));
    }
}
