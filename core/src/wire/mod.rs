//! The wire codec: every byte devccl puts on a data connection is encoded here.
//!
//! Explicit little-endian layouts with a magic, a version byte and (for frame headers) a
//! checksum, never a `#[repr(C)]` struct cast. Golden byte tests pin each layout.
//!
//! Data frames: a 56-byte [`FrameHeader`] followed by `len` payload bytes. Every header names
//! the collective, dtype, op, root, element count and sequence number of the call that sent
//! it, so a receiver whose own call differs reports a mismatch naming both sides instead of
//! reading garbage.
//!
//! Connection handshake (TCP and other stream transports): the acceptor sends a
//! [`Challenge`] with a fresh nonce, the connector answers with a [`Hello`] naming the
//! communicator, both ranks and the lane, authenticated with an HMAC over the nonce when a
//! secret is configured; the acceptor replies with a [`Verdict`].

mod frame;
mod handshake;

pub use frame::{CollKind, FrameHeader, FrameType, HEADER_LEN, MAX_ABORT_REASON};
pub use handshake::{CHALLENGE_LEN, Challenge, HELLO_LEN, Hello, VERDICT_LEN, Verdict, VerdictStatus};

/// Magic of data frames.
pub const FRAME_MAGIC: [u8; 4] = *b"DVCF";
/// Magic of handshake messages.
pub const HANDSHAKE_MAGIC: [u8; 4] = *b"DVCH";
/// Version of both layouts.
pub const WIRE_VERSION: u8 = 1;

/// FNV-1a, 32 bit: cheap corruption/desync check for headers (not a security measure;
/// authentication is the handshake's job).
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

pub(crate) fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
