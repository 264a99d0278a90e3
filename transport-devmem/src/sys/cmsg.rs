//! Socket-level devmem codecs (pure): RX cmsgs, the TX cmsg, `SO_DEVMEM_DONTNEED` token
//! batches and zerocopy completions from the error queue.
//!
//! Layouts: `shared/reference/devmem-uapi.md` §3 (asm-generic values, x86-64 `cmsghdr`).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::Serialize;

use crate::sys::netlink::DecodeError;

pub const SOL_SOCKET: i32 = 1;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;
pub const SO_ZEROCOPY: i32 = 60;
pub const SO_DEVMEM_LINEAR: i32 = 78;
pub const SO_DEVMEM_DMABUF: i32 = 79;
pub const SO_DEVMEM_DONTNEED: i32 = 80;
pub const SCM_DEVMEM_LINEAR: i32 = SO_DEVMEM_LINEAR;
pub const SCM_DEVMEM_DMABUF: i32 = SO_DEVMEM_DMABUF;
pub const MSG_ERRQUEUE: i32 = 0x2000;
pub const MSG_SOCK_DEVMEM: i32 = 0x200_0000;
pub const MSG_ZEROCOPY: i32 = 0x400_0000;
pub const IP_RECVERR: i32 = 11;
pub const IPV6_RECVERR: i32 = 25;
pub const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
pub const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// Most `dmabuf_token` ranges the kernel accepts in one `SO_DEVMEM_DONTNEED` call.
pub const MAX_DONTNEED_TOKENS: usize = 128;
/// Most fragments the kernel frees in one `SO_DEVMEM_DONTNEED` call.
pub const MAX_DONTNEED_FRAGS: u64 = 1024;

// ------------------------------------------------------------------------------------------
// cmsg framing (struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; }).

const SIZE_T: usize = std::mem::size_of::<usize>();
/// `sizeof(struct cmsghdr)`.
pub const CMSG_HDR_LEN: usize = SIZE_T + 8;

/// `CMSG_ALIGN`.
pub const fn cmsg_align(n: usize) -> usize {
    (n + SIZE_T - 1) & !(SIZE_T - 1)
}

/// `CMSG_LEN`.
pub const fn cmsg_len(data: usize) -> usize {
    CMSG_HDR_LEN + data
}

/// `CMSG_SPACE`.
pub const fn cmsg_space(data: usize) -> usize {
    CMSG_HDR_LEN + cmsg_align(data)
}

/// One control message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmsg<'a> {
    pub level: i32,
    pub ty: i32,
    pub data: &'a [u8],
}

/// Walk a control buffer (as `CMSG_FIRSTHDR` / `CMSG_NXTHDR` do).
pub fn parse_cmsgs(control: &[u8]) -> Result<Vec<Cmsg<'_>>, DecodeError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + CMSG_HDR_LEN <= control.len() {
        let len = usize::from_ne_bytes(control[off..off + SIZE_T].try_into().unwrap());
        let level = i32::from_ne_bytes(control[off + SIZE_T..off + SIZE_T + 4].try_into().unwrap());
        let ty = i32::from_ne_bytes(control[off + SIZE_T + 4..off + SIZE_T + 8].try_into().unwrap());
        if len < CMSG_HDR_LEN || off + len > control.len() {
            return Err(DecodeError(format!(
                "cmsg length {len} at offset {off} does not fit {} control bytes",
                control.len()
            )));
        }
        out.push(Cmsg { level, ty, data: &control[off + CMSG_HDR_LEN..off + len] });
        off += cmsg_align(len);
    }
    Ok(out)
}

/// Encode one control message, padded to `CMSG_SPACE(data.len())`.
pub fn encode_cmsg(level: i32, ty: i32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(cmsg_space(data.len()));
    v.extend_from_slice(&cmsg_len(data.len()).to_ne_bytes());
    v.extend_from_slice(&level.to_ne_bytes());
    v.extend_from_slice(&ty.to_ne_bytes());
    v.extend_from_slice(data);
    v.resize(cmsg_space(data.len()), 0);
    v
}

// ------------------------------------------------------------------------------------------
// RX.

/// `struct dmabuf_cmsg` (24 bytes): where one received fragment landed in the dma-buf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DmabufCmsg {
    /// Byte offset of the fragment from the start of the dma-buf.
    pub frag_offset: u64,
    /// Fragment length.
    pub frag_size: u32,
    /// Token to return with `SO_DEVMEM_DONTNEED`.
    pub frag_token: u32,
    /// Binding id the fragment belongs to.
    pub dmabuf_id: u32,
    /// Reserved (0).
    pub flags: u32,
}

impl DmabufCmsg {
    /// Wire size.
    pub const SIZE: usize = 24;

    /// Decode the cmsg payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < Self::SIZE {
            return Err(DecodeError(format!("dmabuf_cmsg of {} bytes, expected {}", b.len(), Self::SIZE)));
        }
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
        Ok(DmabufCmsg {
            frag_offset: u64::from_ne_bytes(b[0..8].try_into().unwrap()),
            frag_size: u32_at(8),
            frag_token: u32_at(12),
            dmabuf_id: u32_at(16),
            flags: u32_at(20),
        })
    }

    /// Encode the cmsg payload.
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&self.frag_offset.to_ne_bytes());
        b[8..12].copy_from_slice(&self.frag_size.to_ne_bytes());
        b[12..16].copy_from_slice(&self.frag_token.to_ne_bytes());
        b[16..20].copy_from_slice(&self.dmabuf_id.to_ne_bytes());
        b[20..24].copy_from_slice(&self.flags.to_ne_bytes());
        b
    }
}

/// One devmem RX control message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RxCmsg {
    /// `SCM_DEVMEM_LINEAR`: `size` bytes were copied into the caller's iovec (not split off
    /// into device memory).
    Linear { size: u32 },
    /// `SCM_DEVMEM_DMABUF`: a fragment in the dma-buf.
    Dmabuf(DmabufCmsg),
}

/// Extract the devmem cmsgs of a `recvmsg(MSG_SOCK_DEVMEM)` control buffer (other cmsgs are
/// skipped). No devmem cmsg at all means the data was ordinary and sits in the iovec.
pub fn parse_rx_cmsgs(control: &[u8]) -> Result<Vec<RxCmsg>, DecodeError> {
    let mut out = Vec::new();
    for c in parse_cmsgs(control)? {
        if c.level != SOL_SOCKET {
            continue;
        }
        match c.ty {
            SCM_DEVMEM_DMABUF => out.push(RxCmsg::Dmabuf(DmabufCmsg::decode(c.data)?)),
            SCM_DEVMEM_LINEAR => {
                // The kernel puts a full dmabuf_cmsg with only frag_size meaningful.
                let size = if c.data.len() >= DmabufCmsg::SIZE {
                    DmabufCmsg::decode(c.data)?.frag_size
                } else if c.data.len() >= 4 {
                    u32::from_ne_bytes(c.data[0..4].try_into().unwrap())
                } else {
                    return Err(DecodeError("short SCM_DEVMEM_LINEAR cmsg".into()));
                };
                out.push(RxCmsg::Linear { size });
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Encode RX cmsgs exactly as the kernel does (each a full `dmabuf_cmsg`, `CMSG_SPACE(24)` =
/// 40 bytes on 64-bit): what a simulated devmem socket hands to the RX path.
pub fn encode_rx_cmsgs(cmsgs: &[RxCmsg]) -> Vec<u8> {
    let mut v = Vec::with_capacity(cmsgs.len() * cmsg_space(DmabufCmsg::SIZE));
    for c in cmsgs {
        match c {
            RxCmsg::Linear { size } => {
                let d = DmabufCmsg { frag_offset: 0, frag_size: *size, frag_token: 0, dmabuf_id: 0, flags: 0 };
                v.extend(encode_cmsg(SOL_SOCKET, SCM_DEVMEM_LINEAR, &d.encode()));
            }
            RxCmsg::Dmabuf(d) => v.extend(encode_cmsg(SOL_SOCKET, SCM_DEVMEM_DMABUF, &d.encode())),
        }
    }
    v
}

// ------------------------------------------------------------------------------------------
// TX.

/// The `SOL_SOCKET / SCM_DEVMEM_DMABUF` cmsg that makes a `sendmsg(MSG_ZEROCOPY)` send from
/// TX binding `binding_id` (`CMSG_SPACE(4)` = 24 bytes on 64-bit).
pub fn tx_cmsg(binding_id: u32) -> Vec<u8> {
    encode_cmsg(SOL_SOCKET, SCM_DEVMEM_DMABUF, &binding_id.to_ne_bytes())
}

/// One range of a devmem send: `offset` into the TX-bound dma-buf (it goes in `iov_base`),
/// `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DevmemRange {
    pub offset: u64,
    pub len: usize,
}

// ------------------------------------------------------------------------------------------
// SO_DEVMEM_DONTNEED.

/// `struct dmabuf_token`: a run of consecutive tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DmabufToken {
    pub token_start: u32,
    pub token_count: u32,
}

impl DmabufToken {
    /// Encode a slice as the option value (8 bytes each).
    pub fn encode_all(tokens: &[DmabufToken]) -> Vec<u8> {
        let mut v = Vec::with_capacity(tokens.len() * 8);
        for t in tokens {
            v.extend_from_slice(&t.token_start.to_ne_bytes());
            v.extend_from_slice(&t.token_count.to_ne_bytes());
        }
        v
    }
}

/// Collects tokens to return, merging consecutive ones into ranges (as TCPX does), and
/// splits them into calls the kernel accepts whole: at most [`MAX_DONTNEED_TOKENS`] ranges
/// and at most [`MAX_DONTNEED_FRAGS`] fragments per call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenBatcher {
    ranges: Vec<DmabufToken>,
    frags: u64,
}

impl TokenBatcher {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one token.
    pub fn push(&mut self, token: u32) {
        self.push_range(token, 1);
    }

    /// Add `count` consecutive tokens from `start`.
    pub fn push_range(&mut self, start: u32, count: u32) {
        if count == 0 {
            return;
        }
        self.frags += count as u64;
        if let Some(last) = self.ranges.last_mut()
            && last.token_start.checked_add(last.token_count) == Some(start)
            && last.token_count.checked_add(count).is_some()
        {
            last.token_count += count;
            return;
        }
        self.ranges.push(DmabufToken { token_start: start, token_count: count });
    }

    /// Fragments held.
    pub fn frags(&self) -> u64 {
        self.frags
    }

    /// Merged ranges held.
    pub fn ranges(&self) -> &[DmabufToken] {
        &self.ranges
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.ranges.clear();
        self.frags = 0;
    }

    /// Split into per-call batches within both kernel limits (ranges longer than 1024 are
    /// cut).
    pub fn batches(&self) -> Vec<Vec<DmabufToken>> {
        let mut out = Vec::new();
        let mut cur: Vec<DmabufToken> = Vec::new();
        let mut cur_frags: u64 = 0;
        for r in &self.ranges {
            let mut start = r.token_start;
            let mut left = r.token_count as u64;
            while left > 0 {
                if cur.len() == MAX_DONTNEED_TOKENS || cur_frags == MAX_DONTNEED_FRAGS {
                    out.push(std::mem::take(&mut cur));
                    cur_frags = 0;
                }
                let take = left.min(MAX_DONTNEED_FRAGS - cur_frags);
                cur.push(DmabufToken { token_start: start, token_count: take as u32 });
                cur_frags += take;
                left -= take;
                start = start.wrapping_add(take as u32);
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }
}

// ------------------------------------------------------------------------------------------
// Zerocopy completions.

/// `struct sock_extended_err` (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SockExtendedErr {
    pub ee_errno: u32,
    pub ee_origin: u8,
    pub ee_type: u8,
    pub ee_code: u8,
    pub ee_info: u32,
    pub ee_data: u32,
}

impl SockExtendedErr {
    /// Decode the first 16 bytes of an `IP_RECVERR` / `IPV6_RECVERR` payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < 16 {
            return Err(DecodeError(format!("sock_extended_err of {} bytes", b.len())));
        }
        Ok(SockExtendedErr {
            ee_errno: u32::from_ne_bytes(b[0..4].try_into().unwrap()),
            ee_origin: b[4],
            ee_type: b[5],
            ee_code: b[6],
            ee_info: u32::from_ne_bytes(b[8..12].try_into().unwrap()),
            ee_data: u32::from_ne_bytes(b[12..16].try_into().unwrap()),
        })
    }
}

/// Zerocopy sends `lo..=hi` (per-socket 32-bit counter of `MSG_ZEROCOPY` calls) completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ZcCompletion {
    pub lo: u32,
    pub hi: u32,
    /// The kernel copied instead of sending from the buffer (`SO_EE_CODE_ZEROCOPY_COPIED`).
    pub copied: bool,
}

impl ZcCompletion {
    /// Number of sends covered (the range may wrap).
    pub fn count(&self) -> u64 {
        self.hi.wrapping_sub(self.lo) as u64 + 1
    }

    /// Whether send number `id` is covered.
    pub fn covers(&self, id: u32) -> bool {
        id.wrapping_sub(self.lo) <= self.hi.wrapping_sub(self.lo)
    }
}

/// What one error-queue message said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrqueueEntry {
    /// A zerocopy completion.
    Zerocopy(ZcCompletion),
    /// Some other extended error (ICMP, timestamps, a failed zerocopy with `ee_errno`).
    Other(SockExtendedErr),
}

/// Parse the control buffer of a `recvmsg(MSG_ERRQUEUE)`.
pub fn parse_errqueue(control: &[u8]) -> Result<Vec<ErrqueueEntry>, DecodeError> {
    let mut out = Vec::new();
    for c in parse_cmsgs(control)? {
        let is_recverr = (c.level == SOL_IP && c.ty == IP_RECVERR) || (c.level == SOL_IPV6 && c.ty == IPV6_RECVERR);
        if !is_recverr {
            continue;
        }
        let e = SockExtendedErr::decode(c.data)?;
        if e.ee_origin == SO_EE_ORIGIN_ZEROCOPY && e.ee_errno == 0 {
            out.push(ErrqueueEntry::Zerocopy(ZcCompletion {
                lo: e.ee_info,
                hi: e.ee_data,
                copied: e.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0,
            }));
        } else {
            out.push(ErrqueueEntry::Other(e));
        }
    }
    Ok(out)
}

/// Tracks `MSG_ZEROCOPY` sends of one socket and their completions, so a dma-buf range is
/// reused only once the send that used it is covered.
#[derive(Debug, Clone, Default)]
pub struct ZcTracker {
    next: u32,
    /// Lowest send id not yet known complete.
    low: u32,
    /// Completed ranges above `low` (start -> end inclusive), from out-of-order completions.
    ahead: BTreeMap<u32, u32>,
    copied: u64,
}

impl ZcTracker {
    /// Fresh socket: the first zerocopy send gets id 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a successful `MSG_ZEROCOPY` sendmsg; returns its id.
    pub fn on_send(&mut self) -> u32 {
        let id = self.next;
        self.next = self.next.wrapping_add(1);
        id
    }

    /// Sends not yet completed.
    pub fn pending(&self) -> u32 {
        let ahead: u32 = self.ahead.iter().map(|(s, e)| e.wrapping_sub(*s).wrapping_add(1)).sum();
        self.next.wrapping_sub(self.low).wrapping_sub(ahead)
    }

    /// Completions that said the kernel copied.
    pub fn copied(&self) -> u64 {
        self.copied
    }

    /// Whether send `id` has completed.
    pub fn is_complete(&self, id: u32) -> bool {
        let rel = id.wrapping_sub(self.low);
        if rel >= self.next.wrapping_sub(self.low) {
            return rel >= 0x8000_0000; // below low (already retired)
        }
        self.ahead.iter().any(|(s, e)| id.wrapping_sub(*s) <= e.wrapping_sub(*s))
    }

    /// Apply a completion.
    pub fn complete(&mut self, c: ZcCompletion) {
        if c.copied {
            self.copied += c.count();
        }
        self.ahead.insert(c.lo, c.hi);
        // Retire every range that now starts at `low`.
        while let Some(hi) = self.ahead.remove(&self.low) {
            self.low = hi.wrapping_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::recorded::*;

    #[test]
    fn cmsg_sizes_x86_64() {
        assert_eq!(CMSG_HDR_LEN, 16);
        assert_eq!(cmsg_len(24), 40);
        assert_eq!(cmsg_space(24), 40);
        assert_eq!(cmsg_len(4), 20);
        assert_eq!(cmsg_space(4), 24);
    }

    #[test]
    fn golden_tx_cmsg() {
        // cmsg_len = CMSG_LEN(4) = 20 (size_t), level SOL_SOCKET = 1, type 79, id 7, 4 pad.
        #[rustfmt::skip]
        let want: &[u8] = &[
            20, 0, 0, 0, 0, 0, 0, 0,
            1, 0, 0, 0,
            79, 0, 0, 0,
            7, 0, 0, 0,
            0, 0, 0, 0,
        ];
        assert_eq!(tx_cmsg(7), want);
    }

    #[test]
    fn golden_rx_cmsgs_roundtrip() {
        let frag = DmabufCmsg { frag_offset: 0x1_0000_2000, frag_size: 4096, frag_token: 5, dmabuf_id: 3, flags: 0 };
        let bytes = encode_rx_cmsgs(&[RxCmsg::Dmabuf(frag), RxCmsg::Linear { size: 100 }]);
        #[rustfmt::skip]
        let want: &[u8] = &[
            40, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 79, 0, 0, 0,
            0x00, 0x20, 0, 0, 1, 0, 0, 0,   // frag_offset
            0, 0x10, 0, 0,                   // frag_size 4096
            5, 0, 0, 0,                      // token
            3, 0, 0, 0,                      // dmabuf id
            0, 0, 0, 0,                      // flags
            40, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 78, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0,
            100, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(bytes, want);
        assert_eq!(parse_rx_cmsgs(&bytes).unwrap(), vec![RxCmsg::Dmabuf(frag), RxCmsg::Linear { size: 100 }]);
    }

    #[test]
    fn rx_cmsgs_skip_others_and_reject_truncation() {
        let mut v = encode_cmsg(SOL_IP, 8, &[1, 2, 3, 4]);
        v.extend(encode_cmsg(SOL_SOCKET, SCM_DEVMEM_DMABUF, &[0; 24]));
        assert_eq!(parse_rx_cmsgs(&v).unwrap().len(), 1);
        let short = encode_cmsg(SOL_SOCKET, SCM_DEVMEM_DMABUF, &[0; 12]);
        assert!(parse_rx_cmsgs(&short).is_err());
        let mut bad = encode_cmsg(SOL_SOCKET, SCM_DEVMEM_DMABUF, &[0; 24]);
        bad[0] = 200;
        assert!(parse_rx_cmsgs(&bad).is_err());
    }

    #[test]
    fn golden_dontneed_tokens() {
        let t =
            [DmabufToken { token_start: 1, token_count: 2 }, DmabufToken { token_start: 0x0102_0304, token_count: 1 }];
        assert_eq!(DmabufToken::encode_all(&t), vec![1, 0, 0, 0, 2, 0, 0, 0, 4, 3, 2, 1, 1, 0, 0, 0]);
    }

    #[test]
    fn batcher_merges_and_respects_limits() {
        let mut b = TokenBatcher::new();
        for t in [1, 2, 3, 7, 8, 20] {
            b.push(t);
        }
        assert_eq!(b.ranges().len(), 3);
        assert_eq!(b.frags(), 6);
        assert_eq!(b.batches().len(), 1);

        // 300 isolated tokens -> 128 + 128 + 44 ranges.
        let mut b = TokenBatcher::new();
        for t in 0..300u32 {
            b.push(t * 2);
        }
        let sizes: Vec<usize> = b.batches().iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![128, 128, 44]);

        // One run of 2500 -> 1024 + 1024 + 452 fragments.
        let mut b = TokenBatcher::new();
        b.push_range(10, 2500);
        let batches = b.batches();
        let frags: Vec<u32> = batches.iter().map(|x| x.iter().map(|t| t.token_count).sum()).collect();
        assert_eq!(frags, vec![1024, 1024, 452]);
        assert_eq!(batches[1][0].token_start, 10 + 1024);

        // Mixed: frag limit reached before range limit.
        let mut b = TokenBatcher::new();
        for i in 0..10u32 {
            b.push_range(i * 1000, 300);
        }
        for batch in b.batches() {
            assert!(batch.len() <= MAX_DONTNEED_TOKENS);
            assert!(batch.iter().map(|t| t.token_count as u64).sum::<u64>() <= MAX_DONTNEED_FRAGS);
        }
        let total: u64 = b.batches().iter().flatten().map(|t| t.token_count as u64).sum();
        assert_eq!(total, 3000);
    }

    #[test]
    fn decode_recorded_zerocopy_completions() {
        // Three MSG_ZEROCOPY sends on loopback: one completion 0..=2, copied (lo copies).
        for ctl in [ERRQUEUE_ZEROCOPY_V4, ERRQUEUE_ZEROCOPY_V6] {
            let e = parse_errqueue(ctl).unwrap();
            assert_eq!(e, vec![ErrqueueEntry::Zerocopy(ZcCompletion { lo: 0, hi: 2, copied: true })]);
        }
        let c = parse_cmsgs(ERRQUEUE_ZEROCOPY_V6).unwrap();
        assert_eq!((c[0].level, c[0].ty), (SOL_IPV6, IPV6_RECVERR));
    }

    #[test]
    fn tracker_handles_out_of_order_and_wrap() {
        let mut t = ZcTracker::new();
        for _ in 0..5 {
            t.on_send();
        }
        assert_eq!(t.pending(), 5);
        t.complete(ZcCompletion { lo: 3, hi: 4, copied: false });
        assert!(t.is_complete(3) && !t.is_complete(0));
        assert_eq!(t.pending(), 3);
        t.complete(ZcCompletion { lo: 0, hi: 2, copied: true });
        assert_eq!(t.pending(), 0);
        assert!(t.is_complete(1));
        assert_eq!(t.copied(), 3);
        let c = ZcCompletion { lo: u32::MAX - 1, hi: 1, copied: false };
        assert_eq!(c.count(), 4);
        assert!(c.covers(0) && c.covers(u32::MAX) && !c.covers(2));
    }
}
