//! Data frame header.

use std::fmt;

use super::{FRAME_MAGIC, WIRE_VERSION, fnv1a32, get_u32, get_u64};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::op::ReduceOp;
use crate::types::{Rank, Seq};

/// Encoded size of a [`FrameHeader`].
pub const HEADER_LEN: usize = 56;
/// Longest abort reason carried in an abort frame (longer ones are truncated).
pub const MAX_ABORT_REASON: usize = 4096;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Collective payload.
    Data = 1,
    /// The sender aborted; the payload is a UTF-8 reason.
    Abort = 2,
}

/// The collective a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CollKind {
    /// all_reduce
    AllReduce = 1,
    /// broadcast
    Broadcast = 2,
    /// reduce
    Reduce = 3,
    /// all_gather
    AllGather = 4,
    /// reduce_scatter
    ReduceScatter = 5,
    /// all_to_all (equal splits)
    AllToAll = 6,
    /// all_to_all_v (per-rank counts)
    AllToAllV = 7,
    /// gather
    Gather = 8,
    /// scatter
    Scatter = 9,
    /// point-to-point send/recv
    SendRecv = 10,
    /// barrier
    Barrier = 11,
}

impl CollKind {
    /// Every kind, in code order.
    pub const ALL: [CollKind; 11] = [
        CollKind::AllReduce,
        CollKind::Broadcast,
        CollKind::Reduce,
        CollKind::AllGather,
        CollKind::ReduceScatter,
        CollKind::AllToAll,
        CollKind::AllToAllV,
        CollKind::Gather,
        CollKind::Scatter,
        CollKind::SendRecv,
        CollKind::Barrier,
    ];

    /// snake_case name, as in the API and `devccl bench <name>`.
    pub const fn name(self) -> &'static str {
        match self {
            CollKind::AllReduce => "all_reduce",
            CollKind::Broadcast => "broadcast",
            CollKind::Reduce => "reduce",
            CollKind::AllGather => "all_gather",
            CollKind::ReduceScatter => "reduce_scatter",
            CollKind::AllToAll => "all_to_all",
            CollKind::AllToAllV => "all_to_all_v",
            CollKind::Gather => "gather",
            CollKind::Scatter => "scatter",
            CollKind::SendRecv => "send_recv",
            CollKind::Barrier => "barrier",
        }
    }

    /// Decode.
    pub fn from_code(c: u8) -> Option<CollKind> {
        CollKind::ALL.iter().copied().find(|k| *k as u8 == c)
    }

    /// True for collectives that reduce (their headers carry an op).
    pub const fn reduces(self) -> bool {
        matches!(self, CollKind::AllReduce | CollKind::Reduce | CollKind::ReduceScatter)
    }

    /// True for rooted collectives.
    pub const fn rooted(self) -> bool {
        matches!(self, CollKind::Broadcast | CollKind::Reduce | CollKind::Gather | CollKind::Scatter)
    }
}

impl fmt::Display for CollKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The 56-byte header in front of every frame.
///
/// ```text
/// off len field
///   0   4 magic "DVCF"
///   4   1 version (1)
///   5   1 frame type (1 data, 2 abort)
///   6   1 collective kind
///   7   1 dtype code
///   8   1 reduce-op code (0xff: none)
///   9   1 algorithm code (0: unspecified)
///  10   2 reserved, zero
///  12   4 root rank (0xffffffff: none)
///  16   8 seq: the call's sequence number on the communicator
///  24   8 count: elements, as the sender's call was made
///  32   4 msg: index of this message between this pair within the call
///  36   4 len: payload bytes that follow
///  40   8 offset: byte offset of the payload in the sender's logical buffer
///  48   4 tag (point-to-point tag; 0 otherwise)
///  52   4 FNV-1a 32 of bytes 0..52
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame type.
    pub frame: FrameType,
    /// Collective.
    pub coll: CollKind,
    /// Element type.
    pub dtype: DType,
    /// Reduction, for reducing collectives.
    pub op: Option<ReduceOp>,
    /// Algorithm code (the collectives crate's numbering; 0 = unspecified).
    pub algo: u8,
    /// Root, for rooted collectives.
    pub root: Option<Rank>,
    /// Call sequence number.
    pub seq: Seq,
    /// Element count of the call.
    pub count: u64,
    /// Message index within the call, per direction of this pair.
    pub msg: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Byte offset of the payload in the sender's buffer (diagnostics).
    pub offset: u64,
    /// Point-to-point tag.
    pub tag: u32,
}

impl FrameHeader {
    /// An abort frame carrying `reason_len` bytes of reason.
    pub fn abort(seq: Seq, reason_len: usize) -> FrameHeader {
        FrameHeader {
            frame: FrameType::Abort,
            coll: CollKind::Barrier,
            dtype: DType::U8,
            op: None,
            algo: 0,
            root: None,
            seq,
            count: 0,
            msg: 0,
            len: reason_len.min(MAX_ABORT_REASON) as u32,
            offset: 0,
            tag: 0,
        }
    }

    /// Encode into exactly [`HEADER_LEN`] bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&FRAME_MAGIC);
        b[4] = WIRE_VERSION;
        b[5] = self.frame as u8;
        b[6] = self.coll as u8;
        b[7] = self.dtype.code();
        b[8] = self.op.map_or(0xff, |o| o.code());
        b[9] = self.algo;
        b[12..16].copy_from_slice(&self.root.map_or(u32::MAX, |r| r.0).to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.count.to_le_bytes());
        b[32..36].copy_from_slice(&self.msg.to_le_bytes());
        b[36..40].copy_from_slice(&self.len.to_le_bytes());
        b[40..48].copy_from_slice(&self.offset.to_le_bytes());
        b[48..52].copy_from_slice(&self.tag.to_le_bytes());
        let sum = fnv1a32(&b[..52]);
        b[52..56].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decode; rejects anything that is not a well-formed header of this version.
    pub fn decode(b: &[u8]) -> Result<FrameHeader> {
        let bad = |what: String| Error::Remote { peer: None, message: format!("invalid frame header: {what}") };
        if b.len() < HEADER_LEN {
            return Err(bad(format!("{} bytes, need {HEADER_LEN}", b.len())));
        }
        if b[0..4] != FRAME_MAGIC {
            return Err(bad(format!("bad magic {:02x?}", &b[0..4])));
        }
        if b[4] != WIRE_VERSION {
            return Err(bad(format!("wire version {} (this build speaks {WIRE_VERSION})", b[4])));
        }
        let sum = get_u32(b, 52);
        if sum != fnv1a32(&b[..52]) {
            return Err(bad("checksum mismatch (corrupted or out-of-sync stream)".into()));
        }
        let frame = match b[5] {
            1 => FrameType::Data,
            2 => FrameType::Abort,
            t => return Err(bad(format!("unknown frame type {t}"))),
        };
        let coll = CollKind::from_code(b[6]).ok_or_else(|| bad(format!("unknown collective {}", b[6])))?;
        let dtype = DType::from_code(b[7]).ok_or_else(|| bad(format!("unknown dtype {}", b[7])))?;
        let op = match b[8] {
            0xff => None,
            c => Some(ReduceOp::from_code(c).ok_or_else(|| bad(format!("unknown op {c}")))?),
        };
        let root = match get_u32(b, 12) {
            u32::MAX => None,
            r => Some(Rank(r)),
        };
        let len = get_u32(b, 36);
        if frame == FrameType::Abort && len as usize > MAX_ABORT_REASON {
            return Err(bad(format!("abort reason of {len} bytes")));
        }
        Ok(FrameHeader {
            frame,
            coll,
            dtype,
            op,
            algo: b[9],
            root,
            seq: Seq(get_u64(b, 16)),
            count: get_u64(b, 24),
            msg: get_u32(b, 32),
            len,
            offset: get_u64(b, 40),
            tag: get_u32(b, 48),
        })
    }

    /// Human-readable call description, e.g. `all_reduce(float, sum, count=1000, seq=7)`.
    pub fn describe(&self) -> String {
        let mut s = format!("{}({}", self.coll, self.dtype);
        if let Some(op) = self.op {
            s += &format!(", {op}");
        }
        if let Some(r) = self.root {
            s += &format!(", root={r}");
        }
        s += &format!(", count={}, seq={}", self.count, self.seq);
        if self.coll == CollKind::SendRecv {
            s += &format!(", tag={}", self.tag);
        }
        s + ")"
    }

    /// Check that a received header `got` belongs to the call this rank expects (`self`).
    /// Returns a [`Error::Mismatch`] naming both calls, or a [`Error::Remote`] for a protocol
    /// desynchronisation within the same call (ranks configured with different algorithms or
    /// chunk sizes).
    pub fn check(&self, got: &FrameHeader, local_rank: Rank, peer: Rank) -> Result<()> {
        let same_call = self.coll == got.coll
            && self.dtype == got.dtype
            && self.op == got.op
            && self.root == got.root
            && self.count == got.count
            && self.seq == got.seq
            && (self.coll != CollKind::SendRecv || self.tag == got.tag);
        if !same_call {
            return Err(Error::Mismatch { local_rank, peer, local: self.describe(), remote: got.describe() });
        }
        if self.algo != got.algo || self.msg != got.msg || self.len != got.len {
            return Err(Error::Remote {
                peer: Some(peer),
                message: format!(
                    "protocol desync in {}: expected message {} of {} bytes (algorithm {}), got message {} of {} bytes \
                     (algorithm {}); are DEVCCL_ALGO / DEVCCL_CHUNK / DEVCCL_NCHANNELS the same on every rank?",
                    self.describe(),
                    self.msg,
                    self.len,
                    self.algo,
                    got.msg,
                    got.len,
                    got.algo
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FrameHeader {
        FrameHeader {
            frame: FrameType::Data,
            coll: CollKind::AllReduce,
            dtype: DType::F32,
            op: Some(ReduceOp::Sum),
            algo: 1,
            root: None,
            seq: Seq(7),
            count: 1000,
            msg: 3,
            len: 4096,
            offset: 0x1_0000_0000,
            tag: 0,
        }
    }

    #[test]
    fn golden_bytes() {
        let golden: [u8; HEADER_LEN] = [
            b'D', b'V', b'C', b'F', 1, 1, 1, 0, 0, 1, 0, 0, // magic, ver, data, all_reduce, f32, sum, algo 1
            0xff, 0xff, 0xff, 0xff, // root none
            7, 0, 0, 0, 0, 0, 0, 0, // seq
            0xe8, 0x03, 0, 0, 0, 0, 0, 0, // count 1000
            3, 0, 0, 0, // msg
            0, 0x10, 0, 0, // len 4096
            0, 0, 0, 0, 1, 0, 0, 0, // offset 2^32
            0, 0, 0, 0, // tag
            0x7a, 0xc0, 0xe0, 0x42, // fnv1a32 (computed independently in Python)
        ];
        let enc = sample().encode();
        assert_eq!(&enc[..52], &golden[..52]);
        assert_eq!(u32::from_le_bytes(enc[52..56].try_into().unwrap()), fnv1a32(&golden[..52]));
        assert_eq!(enc, golden, "checksum bytes: {:02x?}", &enc[52..]);
        assert_eq!(FrameHeader::decode(&golden).unwrap(), sample());
    }

    #[test]
    fn round_trip_every_kind() {
        for coll in CollKind::ALL {
            for d in DType::ALL {
                let h = FrameHeader { coll, dtype: d, root: Some(Rank(3)), op: None, ..sample() };
                assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
            }
        }
        let a = FrameHeader::abort(Seq(9), 10);
        assert_eq!(FrameHeader::decode(&a.encode()).unwrap(), a);
    }

    #[test]
    fn rejects_garbage() {
        let mut e = sample().encode();
        assert!(FrameHeader::decode(&e[..10]).is_err());
        e[20] ^= 1;
        let err = FrameHeader::decode(&e).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        let mut v = sample().encode();
        v[4] = 9;
        assert!(FrameHeader::decode(&v).unwrap_err().to_string().contains("version"));
        assert!(FrameHeader::decode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx").is_err());
    }

    #[test]
    fn mismatch_names_both_sides() {
        let mine = sample();
        let theirs = FrameHeader { coll: CollKind::AllGather, op: None, ..sample() };
        let e = mine.check(&theirs, Rank(1), Rank(0)).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("rank 1 called all_reduce(float, sum, count=1000, seq=7)"), "{s}");
        assert!(s.contains("rank 0 called all_gather(float, count=1000, seq=7)"), "{s}");
        let desync = FrameHeader { len: 8, ..sample() };
        assert!(mine.check(&desync, Rank(1), Rank(0)).unwrap_err().to_string().contains("desync"));
        assert!(mine.check(&sample(), Rank(1), Rank(0)).is_ok());
    }

    #[test]
    fn decode_never_panics_on_random_bytes() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..80))| {
            let _ = FrameHeader::decode(&bytes);
        });
    }
}
