//! Netlink wire codec: message and attribute encoding, parsing, and extended-ack decoding.
//!
//! Pure code (no system calls). Byte order is the host's (netlink is host-endian); this crate
//! only targets little-endian Linux, which the golden tests pin down.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;

/// `sizeof(struct nlmsghdr)`.
pub const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct genlmsghdr)`.
pub const GENL_HDRLEN: usize = 4;
/// `sizeof(struct nlattr)`.
pub const NLA_HDRLEN: usize = 4;

pub const NLM_F_REQUEST: u16 = 0x01;
pub const NLM_F_MULTI: u16 = 0x02;
pub const NLM_F_ACK: u16 = 0x04;
pub const NLM_F_ROOT: u16 = 0x100;
pub const NLM_F_MATCH: u16 = 0x200;
pub const NLM_F_DUMP: u16 = NLM_F_ROOT | NLM_F_MATCH;
/// On `NLMSG_ERROR`: the request payload was not echoed (`NETLINK_CAP_ACK`).
pub const NLM_F_CAPPED: u16 = 0x100;
/// On `NLMSG_ERROR` / `NLMSG_DONE`: extack TLVs follow.
pub const NLM_F_ACK_TLVS: u16 = 0x200;

pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;

pub const NLA_F_NESTED: u16 = 0x8000;
pub const NLA_F_NET_BYTEORDER: u16 = 0x4000;
pub const NLA_TYPE_MASK: u16 = 0x3fff;

/// `NLMSGERR_ATTR_*`: extack TLVs after an error / done message.
pub mod nlmsgerr {
    pub const MSG: u16 = 1;
    pub const OFFS: u16 = 2;
    pub const COOKIE: u16 = 3;
    pub const POLICY: u16 = 4;
    pub const MISS_TYPE: u16 = 5;
    pub const MISS_NEST: u16 = 6;
}

/// `NL_POLICY_TYPE_ATTR_*`: attributes describing one policy entry (extack policy nest and
/// `CTRL_CMD_GETPOLICY` dumps).
pub mod policy_attr {
    pub const TYPE: u16 = 1;
    pub const MIN_VALUE_S: u16 = 2;
    pub const MAX_VALUE_S: u16 = 3;
    pub const MIN_VALUE_U: u16 = 4;
    pub const MAX_VALUE_U: u16 = 5;
    pub const MIN_LENGTH: u16 = 6;
    pub const MAX_LENGTH: u16 = 7;
    pub const POLICY_IDX: u16 = 8;
    pub const POLICY_MAXTYPE: u16 = 9;
    pub const BITFIELD32_MASK: u16 = 10;
    pub const PAD: u16 = 11;
    pub const MASK: u16 = 12;
}

/// Round up to the 4-byte netlink alignment.
pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A decoding failure: the bytes do not follow the netlink layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

fn derr<T>(what: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(what.into()))
}

// ------------------------------------------------------------------------------------------
// Attribute sets: names for attribute ids, used to label requests and decode extack.

/// Names of the attributes of one netlink attribute set, and the sets of its nests.
#[derive(Debug)]
pub struct AttrSet {
    /// Set name, e.g. `"dmabuf"`.
    pub name: &'static str,
    /// `(id, name)` pairs.
    pub attrs: &'static [(u16, &'static str)],
    /// `(id, set)` for attributes that are nests of another set.
    pub nests: &'static [(u16, &'static AttrSet)],
}

impl AttrSet {
    /// Name of attribute `ty`.
    pub fn name_of(&self, ty: u16) -> Option<&'static str> {
        self.attrs.iter().find(|(id, _)| *id == ty).map(|(_, n)| *n)
    }

    /// Set of the nest attribute `ty`.
    pub fn nest_of(&self, ty: u16) -> Option<&'static AttrSet> {
        self.nests.iter().find(|(id, _)| *id == ty).map(|(_, s)| *s)
    }
}

/// An attribute set with no known names.
pub static UNNAMED: AttrSet = AttrSet { name: "?", attrs: &[], nests: &[] };

// ------------------------------------------------------------------------------------------
// Encoding.

/// Where one attribute of an encoded request sits, for naming extack offsets.
#[derive(Debug, Clone)]
pub struct AttrLabel {
    /// Offset from the start of the netlink message (what `NLMSGERR_ATTR_OFFS` reports).
    pub offset: u32,
    /// Dotted path, e.g. `"queues.type"`.
    pub path: String,
    /// For a nest: the set of the attributes inside it.
    pub inner: Option<&'static AttrSet>,
}

/// Builder for one netlink request (with a generic-netlink header).
#[derive(Debug)]
pub struct RequestBuilder {
    buf: Vec<u8>,
    labels: Vec<AttrLabel>,
    /// Open nests: (offset of the nla header, path, set inside).
    stack: Vec<(usize, String, &'static AttrSet)>,
    top: &'static AttrSet,
    op: &'static str,
    seq: u32,
}

impl RequestBuilder {
    /// Start a generic-netlink request: `nlmsghdr` (type `family`, flags `NLM_F_REQUEST |
    /// flags`, sequence `seq`, port id 0) then `genlmsghdr` (`cmd`, `version`).
    pub fn genl(
        family: u16,
        flags: u16,
        seq: u32,
        cmd: u8,
        version: u8,
        op: &'static str,
        top: &'static AttrSet,
    ) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        RequestBuilder { buf, labels: Vec::new(), stack: Vec::new(), top, op, seq }
    }

    /// Start a raw netlink request with a fixed family header (e.g. `struct rtmsg`).
    pub fn raw(
        msg_type: u16,
        flags: u16,
        seq: u32,
        fixed_header: &[u8],
        op: &'static str,
        top: &'static AttrSet,
    ) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(fixed_header);
        while !buf.len().is_multiple_of(4) {
            buf.push(0);
        }
        RequestBuilder { buf, labels: Vec::new(), stack: Vec::new(), top, op, seq }
    }

    fn current_set(&self) -> &'static AttrSet {
        self.stack.last().map(|(_, _, s)| *s).unwrap_or(self.top)
    }

    fn path_for(&self, ty: u16) -> String {
        let name = self.current_set().name_of(ty).map(str::to_owned).unwrap_or_else(|| format!("attr#{ty}"));
        match self.stack.last() {
            Some((_, prefix, _)) => format!("{prefix}.{name}"),
            None => name,
        }
    }

    /// Append one attribute with an arbitrary payload (padded to 4 bytes).
    pub fn put(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let off = self.buf.len();
        let path = self.path_for(ty & NLA_TYPE_MASK);
        self.labels.push(AttrLabel { offset: off as u32, path, inner: None });
        let len = (NLA_HDRLEN + payload.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
        self
    }

    /// Append a `u8` attribute.
    pub fn put_u8(&mut self, ty: u16, v: u8) -> &mut Self {
        self.put(ty, &[v])
    }

    /// Append a `u16` attribute.
    pub fn put_u16(&mut self, ty: u16, v: u16) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }

    /// Append a `u32` attribute.
    pub fn put_u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }

    /// Append a NUL-terminated string attribute.
    pub fn put_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.put(ty, &v)
    }

    /// Open a nest. `flag_nested` sets `NLA_F_NESTED` (the kernel's strict policies demand it;
    /// `false` exists to reproduce that error).
    pub fn begin_nest(&mut self, ty: u16, flag_nested: bool) -> &mut Self {
        let inner = self.current_set().nest_of(ty).unwrap_or(&UNNAMED);
        let off = self.buf.len();
        let path = self.path_for(ty);
        self.labels.push(AttrLabel { offset: off as u32, path: path.clone(), inner: Some(inner) });
        let t = if flag_nested { ty | NLA_F_NESTED } else { ty };
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&t.to_ne_bytes());
        self.stack.push((off, path, inner));
        self
    }

    /// Close the innermost nest.
    pub fn end_nest(&mut self) -> &mut Self {
        if let Some((off, _, _)) = self.stack.pop() {
            let len = (self.buf.len() - off) as u16;
            self.buf[off..off + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// Finish: close open nests, patch the length.
    pub fn finish(mut self) -> Request {
        while !self.stack.is_empty() {
            self.end_nest();
        }
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        Request { bytes: self.buf, labels: self.labels, top: self.top, op: self.op, seq: self.seq }
    }
}

/// An encoded request plus what is needed to name the kernel's extack offsets.
#[derive(Debug, Clone)]
pub struct Request {
    /// The wire bytes.
    pub bytes: Vec<u8>,
    /// Every attribute's offset and path.
    pub labels: Vec<AttrLabel>,
    /// The set of the top-level attributes.
    pub top: &'static AttrSet,
    /// Operation name for errors, e.g. `"bind-rx"`.
    pub op: &'static str,
    /// Sequence number.
    pub seq: u32,
}

impl Request {
    /// Path of the attribute at message offset `offset`.
    pub fn label_at(&self, offset: u32) -> Option<&str> {
        self.labels.iter().find(|l| l.offset == offset).map(|l| l.path.as_str())
    }

    /// Name of missing attribute `ty`, inside the nest at `nest_offset` if given.
    pub fn missing_name(&self, ty: u16, nest_offset: Option<u32>) -> Option<&'static str> {
        let set = match nest_offset {
            None => self.top,
            Some(off) => self.labels.iter().find(|l| l.offset == off)?.inner?,
        };
        set.name_of(ty)
    }

    /// Replace the sequence number (the socket assigns them).
    pub fn set_seq(&mut self, seq: u32) {
        self.seq = seq;
        self.bytes[8..12].copy_from_slice(&seq.to_ne_bytes());
    }

    /// Fill in the names of an extack that came back for this request.
    pub fn annotate(&self, extack: &mut Extack) {
        if let Some(off) = extack.bad_attr_offset {
            extack.bad_attr = self.label_at(off).map(str::to_owned);
        }
        if let Some(ty) = extack.missing_type {
            extack.missing_name = self.missing_name(ty, extack.missing_nest).map(str::to_owned);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Parsing.

/// One netlink message inside a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NlMsg<'a> {
    /// `nlmsg_type`.
    pub ty: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// `nlmsg_pid`.
    pub pid: u32,
    /// Everything after the 16-byte header, up to `nlmsg_len`.
    pub payload: &'a [u8],
}

/// The generic-netlink messages of a recorded datagram (control messages such as
/// `NLMSG_DONE` left out); for tests that decode kernel replies.
#[cfg(test)]
pub(crate) fn genl_messages(datagram: &[u8]) -> Vec<GenlMsg> {
    parse_messages(datagram)
        .unwrap()
        .into_iter()
        .filter(|m| m.ty >= 0x10)
        .map(|m| GenlMsg::from_payload(m.payload).unwrap())
        .collect()
}

/// Split a received datagram into netlink messages.
pub fn parse_messages(buf: &[u8]) -> Result<Vec<NlMsg<'_>>, DecodeError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < buf.len() {
        if buf.len() - off < NLMSG_HDRLEN {
            return derr(format!("{} trailing bytes, shorter than a netlink header", buf.len() - off));
        }
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return derr(format!(
                "netlink message length {len} at offset {off} does not fit the {} byte datagram",
                buf.len()
            ));
        }
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
        let flags = u16::from_ne_bytes(buf[off + 6..off + 8].try_into().unwrap());
        let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap());
        let pid = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap());
        out.push(NlMsg { ty, flags, seq, pid, payload: &buf[off + NLMSG_HDRLEN..off + len] });
        off += align4(len);
    }
    Ok(out)
}

/// One attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    /// Type with the flag bits masked off.
    pub ty: u16,
    /// `NLA_F_NESTED` was set.
    pub nested: bool,
    /// Payload without padding.
    pub payload: &'a [u8],
}

/// Parse a run of attributes.
pub fn parse_attrs(buf: &[u8]) -> Result<Vec<Attr<'_>>, DecodeError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLA_HDRLEN <= buf.len() {
        let len = u16::from_ne_bytes(buf[off..off + 2].try_into().unwrap()) as usize;
        let raw_ty = u16::from_ne_bytes(buf[off + 2..off + 4].try_into().unwrap());
        if len < NLA_HDRLEN || off + len > buf.len() {
            return derr(format!(
                "attribute type {} length {len} at offset {off} overruns {} bytes",
                raw_ty & NLA_TYPE_MASK,
                buf.len()
            ));
        }
        out.push(Attr {
            ty: raw_ty & NLA_TYPE_MASK,
            nested: raw_ty & NLA_F_NESTED != 0,
            payload: &buf[off + NLA_HDRLEN..off + len],
        });
        off += align4(len);
    }
    if off < buf.len() && buf.len() - off >= NLA_HDRLEN {
        return derr("attribute padding overruns the buffer");
    }
    Ok(out)
}

impl<'a> Attr<'a> {
    fn exact<const N: usize>(&self) -> Result<[u8; N], DecodeError> {
        self.payload
            .try_into()
            .map_err(|_| DecodeError(format!("attribute {} has {} bytes, expected {N}", self.ty, self.payload.len())))
    }

    /// `u8` payload.
    pub fn u8(&self) -> Result<u8, DecodeError> {
        Ok(self.exact::<1>()?[0])
    }

    /// `u16` payload.
    pub fn u16(&self) -> Result<u16, DecodeError> {
        Ok(u16::from_ne_bytes(self.exact::<2>()?))
    }

    /// `u32` payload.
    pub fn u32(&self) -> Result<u32, DecodeError> {
        Ok(u32::from_ne_bytes(self.exact::<4>()?))
    }

    /// `u64` payload.
    pub fn u64(&self) -> Result<u64, DecodeError> {
        Ok(u64::from_ne_bytes(self.exact::<8>()?))
    }

    /// Variable-width unsigned (`NLA_UINT`: 4 or 8 bytes; also accepts 1 and 2).
    pub fn uint(&self) -> Result<u64, DecodeError> {
        match self.payload.len() {
            1 => Ok(self.payload[0] as u64),
            2 => Ok(self.u16()? as u64),
            4 => Ok(self.u32()? as u64),
            8 => self.u64(),
            n => derr(format!("attribute {} is a {n}-byte integer", self.ty)),
        }
    }

    /// Variable-width signed (`NLA_SINT`).
    pub fn sint(&self) -> Result<i64, DecodeError> {
        match self.payload.len() {
            4 => Ok(i32::from_ne_bytes(self.exact::<4>()?) as i64),
            8 => Ok(i64::from_ne_bytes(self.exact::<8>()?)),
            n => derr(format!("attribute {} is a {n}-byte signed integer", self.ty)),
        }
    }

    /// String payload, trailing NULs removed.
    pub fn string(&self) -> String {
        let end = self.payload.iter().position(|&b| b == 0).unwrap_or(self.payload.len());
        String::from_utf8_lossy(&self.payload[..end]).into_owned()
    }

    /// The attributes inside a nest.
    pub fn nested_attrs(&self) -> Result<Vec<Attr<'a>>, DecodeError> {
        parse_attrs(self.payload)
    }
}

/// A generic-netlink data message: header fields plus the attribute bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenlMsg {
    /// `genlmsghdr.cmd`.
    pub cmd: u8,
    /// `genlmsghdr.version`.
    pub version: u8,
    /// Attribute bytes.
    pub attrs: Vec<u8>,
}

impl GenlMsg {
    /// Decode from a netlink message payload.
    pub fn from_payload(payload: &[u8]) -> Result<Self, DecodeError> {
        if payload.len() < GENL_HDRLEN {
            return derr("generic netlink message shorter than its header");
        }
        Ok(GenlMsg { cmd: payload[0], version: payload[1], attrs: payload[GENL_HDRLEN..].to_vec() })
    }

    /// Parse the attributes.
    pub fn attrs(&self) -> Result<Vec<Attr<'_>>, DecodeError> {
        parse_attrs(&self.attrs)
    }
}

// ------------------------------------------------------------------------------------------
// Extended ack.

/// `NLA_*` policy types as reported by the kernel (`enum netlink_attribute_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NlaType {
    Invalid,
    Flag,
    U8,
    U16,
    U32,
    U64,
    S8,
    S16,
    S32,
    S64,
    Binary,
    String,
    NulString,
    Nested,
    NestedArray,
    Bitfield32,
    Sint,
    Uint,
    Other(u32),
}

impl NlaType {
    /// From `NL_ATTR_TYPE_*`.
    pub fn from_raw(v: u32) -> Self {
        use NlaType::*;
        match v {
            0 => Invalid,
            1 => Flag,
            2 => U8,
            3 => U16,
            4 => U32,
            5 => U64,
            6 => S8,
            7 => S16,
            8 => S32,
            9 => S64,
            10 => Binary,
            11 => String,
            12 => NulString,
            13 => Nested,
            14 => NestedArray,
            15 => Bitfield32,
            16 => Sint,
            17 => Uint,
            n => Other(n),
        }
    }

    /// Lower-case name as the kernel docs spell it.
    pub fn name(&self) -> String {
        match self {
            NlaType::Invalid => "invalid".into(),
            NlaType::Flag => "flag".into(),
            NlaType::U8 => "u8".into(),
            NlaType::U16 => "u16".into(),
            NlaType::U32 => "u32".into(),
            NlaType::U64 => "u64".into(),
            NlaType::S8 => "s8".into(),
            NlaType::S16 => "s16".into(),
            NlaType::S32 => "s32".into(),
            NlaType::S64 => "s64".into(),
            NlaType::Binary => "binary".into(),
            NlaType::String => "string".into(),
            NlaType::NulString => "nul-string".into(),
            NlaType::Nested => "nested".into(),
            NlaType::NestedArray => "nested-array".into(),
            NlaType::Bitfield32 => "bitfield32".into(),
            NlaType::Sint => "sint".into(),
            NlaType::Uint => "uint".into(),
            NlaType::Other(n) => format!("type#{n}"),
        }
    }
}

/// One attribute's policy (`NL_POLICY_TYPE_ATTR_*`): from an extack policy nest or a
/// `CTRL_CMD_GETPOLICY` dump.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PolicyDesc {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ty: Option<NlaType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_s: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_s: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_u: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_u: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_len: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_len: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_idx: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_maxtype: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitfield32_mask: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<u64>,
}

impl PolicyDesc {
    /// Decode from the attributes of a policy nest.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut p = PolicyDesc::default();
        for a in parse_attrs(buf)? {
            match a.ty {
                policy_attr::TYPE => p.ty = Some(NlaType::from_raw(a.uint()? as u32)),
                policy_attr::MIN_VALUE_S => p.min_s = Some(a.sint()?),
                policy_attr::MAX_VALUE_S => p.max_s = Some(a.sint()?),
                policy_attr::MIN_VALUE_U => p.min_u = Some(a.uint()?),
                policy_attr::MAX_VALUE_U => p.max_u = Some(a.uint()?),
                policy_attr::MIN_LENGTH => p.min_len = Some(a.uint()? as u32),
                policy_attr::MAX_LENGTH => p.max_len = Some(a.uint()? as u32),
                policy_attr::POLICY_IDX => p.policy_idx = Some(a.uint()? as u32),
                policy_attr::POLICY_MAXTYPE => p.policy_maxtype = Some(a.uint()? as u32),
                policy_attr::BITFIELD32_MASK => p.bitfield32_mask = Some(a.uint()? as u32),
                policy_attr::MASK => p.mask = Some(a.uint()?),
                _ => {}
            }
        }
        Ok(p)
    }
}

impl fmt::Display for PolicyDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if let Some(t) = &self.ty {
            parts.push(format!("type {}", t.name()));
        }
        if let Some(v) = self.min_u {
            parts.push(format!("min {v}"));
        }
        if let Some(v) = self.max_u {
            parts.push(format!("max {v}"));
        }
        if let Some(v) = self.min_s {
            parts.push(format!("min {v}"));
        }
        if let Some(v) = self.max_s {
            parts.push(format!("max {v}"));
        }
        if let Some(v) = self.min_len {
            parts.push(format!("min length {v}"));
        }
        if let Some(v) = self.max_len {
            parts.push(format!("max length {v}"));
        }
        if let Some(v) = self.policy_idx {
            parts.push(format!("nested policy {v}"));
        }
        if let Some(v) = self.policy_maxtype {
            parts.push(format!("max attribute {v}"));
        }
        if let Some(v) = self.mask {
            parts.push(format!("mask {v:#x}"));
        }
        f.write_str(&parts.join(", "))
    }
}

/// The kernel's extended acknowledgement (`NLMSGERR_ATTR_*`), with names filled in from the
/// request that provoked it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Extack {
    /// Human-readable message (`NL_SET_ERR_MSG`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Offset of the offending attribute from the start of the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bad_attr_offset: Option<u32>,
    /// Path of the offending attribute, e.g. `"ifindex"`, `"queues.type"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bad_attr: Option<String>,
    /// Policy the offending attribute violated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyDesc>,
    /// Id of a required attribute that was missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing_type: Option<u16>,
    /// Offset of the nest it was missing from (absent: top level).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing_nest: Option<u32>,
    /// Name of the missing attribute, e.g. `"fd"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing_name: Option<String>,
    /// Cookie bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookie: Option<Vec<u8>>,
}

impl Extack {
    /// True when the kernel said nothing beyond the errno.
    pub fn is_empty(&self) -> bool {
        self.message.is_none()
            && self.bad_attr_offset.is_none()
            && self.policy.is_none()
            && self.missing_type.is_none()
            && self.cookie.is_none()
    }

    /// Decode extack TLVs.
    pub fn decode(tlvs: &[u8]) -> Result<Self, DecodeError> {
        let mut e = Extack::default();
        for a in parse_attrs(tlvs)? {
            match a.ty {
                nlmsgerr::MSG => e.message = Some(a.string()),
                nlmsgerr::OFFS => e.bad_attr_offset = Some(a.u32()?),
                nlmsgerr::COOKIE => e.cookie = Some(a.payload.to_vec()),
                nlmsgerr::POLICY => e.policy = Some(PolicyDesc::decode(a.payload)?),
                nlmsgerr::MISS_TYPE => e.missing_type = Some(a.u32()? as u16),
                nlmsgerr::MISS_NEST => e.missing_nest = Some(a.u32()?),
                _ => {}
            }
        }
        Ok(e)
    }
}

impl fmt::Display for Extack {
    /// Renders as a suffix: `; kernel says "..."; bad attribute ifindex; ...` (empty when the
    /// kernel said nothing more).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(m) = &self.message {
            write!(f, "; kernel says \"{m}\"")?;
        }
        if let Some(off) = self.bad_attr_offset {
            match &self.bad_attr {
                Some(p) => write!(f, "; bad attribute {p}")?,
                None => write!(f, "; bad attribute at offset {off}")?,
            }
        }
        if let Some(p) = &self.policy {
            write!(f, "; policy: {p}")?;
        }
        if let Some(t) = self.missing_type {
            match &self.missing_name {
                Some(n) => write!(f, "; missing attribute {t} ({n})")?,
                None => write!(f, "; missing attribute {t}")?,
            }
        }
        Ok(())
    }
}

/// The outcome carried by an `NLMSG_ERROR` (ack or error) or `NLMSG_DONE` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckInfo {
    /// Positive errno; 0 for success.
    pub errno: i32,
    /// Extended ack.
    pub extack: Extack,
}

/// Decode an `NLMSG_ERROR` message (`struct nlmsgerr` + optional echoed request + TLVs).
pub fn decode_error(msg: &NlMsg<'_>) -> Result<AckInfo, DecodeError> {
    let p = msg.payload;
    if p.len() < 4 + NLMSG_HDRLEN {
        return derr(format!("NLMSG_ERROR payload of {} bytes", p.len()));
    }
    let err = i32::from_ne_bytes(p[0..4].try_into().unwrap());
    let tlv_off = if msg.flags & NLM_F_CAPPED != 0 {
        4 + NLMSG_HDRLEN
    } else {
        let olen = u32::from_ne_bytes(p[4..8].try_into().unwrap()) as usize;
        4 + align4(olen)
    };
    let extack = if msg.flags & NLM_F_ACK_TLVS != 0 && tlv_off <= p.len() {
        Extack::decode(&p[tlv_off..])?
    } else {
        Extack::default()
    };
    Ok(AckInfo { errno: -err, extack })
}

/// Decode an `NLMSG_DONE` message (`int` error + optional TLVs).
pub fn decode_done(msg: &NlMsg<'_>) -> Result<AckInfo, DecodeError> {
    let p = msg.payload;
    let err = if p.len() >= 4 { i32::from_ne_bytes(p[0..4].try_into().unwrap()) } else { 0 };
    let extack =
        if msg.flags & NLM_F_ACK_TLVS != 0 && p.len() > 4 { Extack::decode(&p[4..])? } else { Extack::default() };
    Ok(AckInfo { errno: -err, extack })
}

/// Policies of one operation (`CTRL_CMD_GETPOLICY`): policy index -> attribute -> description.
pub type PolicyTable = BTreeMap<u32, BTreeMap<u16, PolicyDesc>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::recorded::*;

    static INNER: AttrSet = AttrSet { name: "inner", attrs: &[(1, "id"), (3, "type")], nests: &[] };
    static TOP: AttrSet =
        AttrSet { name: "top", attrs: &[(1, "ifindex"), (2, "queues"), (3, "fd")], nests: &[(2, &INNER)] };

    #[test]
    fn builder_encodes_nested_and_labels() {
        let mut b = RequestBuilder::genl(0x14, NLM_F_ACK, 7, 13, 1, "t", &TOP);
        b.put_u32(1, 4).begin_nest(2, true);
        b.put_u32(1, 0).put_u32(3, 0).end_nest();
        let r = b.finish();
        #[rustfmt::skip]
        let want: &[u8] = &[
            0x30, 0, 0, 0, 0x14, 0, 0x05, 0, 7, 0, 0, 0, 0, 0, 0, 0,
            13, 1, 0, 0,
            8, 0, 1, 0, 4, 0, 0, 0,
            20, 0, 0x02, 0x80,
            8, 0, 1, 0, 0, 0, 0, 0,
            8, 0, 3, 0, 0, 0, 0, 0,
        ];
        assert_eq!(r.bytes, want);
        assert_eq!(r.label_at(20), Some("ifindex"));
        assert_eq!(r.label_at(28), Some("queues"));
        assert_eq!(r.label_at(40), Some("queues.type"));
        assert_eq!(r.missing_name(3, None), Some("fd"));
        assert_eq!(r.missing_name(3, Some(28)), Some("type"));
    }

    #[test]
    fn string_attr_is_nul_terminated_and_padded() {
        let mut b = RequestBuilder::genl(0x10, NLM_F_ACK, 1, 3, 2, "t", &UNNAMED);
        b.put_str(2, "netdev");
        let r = b.finish();
        assert_eq!(&r.bytes[20..], &[11, 0, 2, 0, b'n', b'e', b't', b'd', b'e', b'v', 0, 0]);
        assert_eq!(r.bytes.len(), 32);
    }

    #[test]
    fn parse_attrs_rejects_overrun() {
        assert!(parse_attrs(&[8, 0, 1, 0, 0, 0]).is_err());
        assert!(parse_attrs(&[2, 0, 1, 0]).is_err());
        assert_eq!(parse_attrs(&[]).unwrap(), vec![]);
    }

    #[test]
    fn parse_messages_rejects_bad_length() {
        assert!(parse_messages(&[0xff, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(parse_messages(&[16, 0, 0]).is_err());
    }

    #[test]
    fn decode_recorded_erange_extack() {
        // bind-rx with ifindex 0 on this machine's 6.18 kernel.
        let msgs = parse_messages(REPLY_BIND_RX_IFINDEX0_0).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].ty, NLMSG_ERROR);
        let ack = decode_error(&msgs[0]).unwrap();
        assert_eq!(ack.errno, 34);
        let e = ack.extack;
        assert_eq!(e.message.as_deref(), Some("integer out of range"));
        assert_eq!(e.bad_attr_offset, Some(20));
        let p = e.policy.unwrap();
        assert_eq!(p.ty, Some(NlaType::U32));
        assert_eq!(p.min_u, Some(1));
        assert_eq!(p.max_u, Some(u32::MAX as u64));
    }

    #[test]
    fn decode_recorded_capped_error_without_tlvs() {
        // ethtool rings-get on lo: EOPNOTSUPP, capped, no extack.
        let msgs = parse_messages(REPLY_RINGS_GET_LO_0).unwrap();
        let ack = decode_error(&msgs[0]).unwrap();
        assert_eq!(ack.errno, 95);
        assert!(ack.extack.is_empty());
    }

    #[test]
    fn decode_recorded_success_ack() {
        let msgs = parse_messages(REPLY_GETFAMILY_NETDEV_1).unwrap();
        assert_eq!(msgs[0].ty, NLMSG_ERROR);
        let ack = decode_error(&msgs[0]).unwrap();
        assert_eq!(ack.errno, 0);
        assert!(ack.extack.is_empty());
    }

    #[test]
    fn extack_display_names_everything() {
        let e = Extack {
            message: Some("integer out of range".into()),
            bad_attr_offset: Some(20),
            bad_attr: Some("ifindex".into()),
            policy: Some(PolicyDesc {
                ty: Some(NlaType::U32),
                min_u: Some(1),
                max_u: Some(4294967295),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            e.to_string(),
            "; kernel says \"integer out of range\"; bad attribute ifindex; policy: type u32, min 1, max 4294967295"
        );
    }
}
