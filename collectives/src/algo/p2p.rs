//! Point-to-point send and receive: the sender's Input goes to the receiver's Output, cut
//! into messages of at most `chunk_bytes` (capped at [`MAX_MESSAGE_BYTES`]) so large
//! transfers stream and stay below the frame header's 32-bit length. Both sides must use
//! the same `chunk_bytes`. A zero-byte transfer emits no message on either side.
//!
//! Sends read only Input and receives write only Output; a caller combining both in one
//! schedule on overlapping memory must order them itself.

use super::dag::{Dag, Io};
use super::{MAX_MESSAGE_BYTES, pieces};
use crate::schedule::{Buf, Builder};

fn message_bytes(chunk_bytes: usize) -> usize {
    chunk_bytes.clamp(1, MAX_MESSAGE_BYTES)
}

/// Send the first `bytes` bytes of Input to `peer`.
pub fn send(b: &mut Builder, peer: usize, bytes: usize, chunk_bytes: usize) {
    let mut d = Dag::new(b, 1, Io::Separate, bytes, 0);
    for c in pieces(0..bytes, message_bytes(chunk_bytes)) {
        d.send(peer, (Buf::Input, c.start), c.len());
    }
}

/// Receive `bytes` bytes from `peer` into the start of Output.
pub fn recv(b: &mut Builder, peer: usize, bytes: usize, chunk_bytes: usize) {
    let mut d = Dag::new(b, 1, Io::Separate, 0, bytes);
    for c in pieces(0..bytes, message_bytes(chunk_bytes)) {
        d.recv(peer, (Buf::Output, c.start), c.len());
    }
}
