//! The wire protocol: an envelope around either a control message (bincode 2)
//! or a tensor frame (fixed little-endian header, then the raw payload).
//!
//! Layout of every message on a stream:
//!
//! ```text
//! envelope (12 bytes): magic "PHLX" | version u16 | kind u8 | flags u8 | body length u32
//! body, kind 1 (control): bincode 2 (standard config, size-limited)
//! body, kind 2 (frame):   FrameHeader (52 bytes) | payload (element count x dtype size bytes)
//! ```
//!
//! All integers are little-endian. Tensor payloads never go through serde: the
//! sender writes the header and then the bytes of its buffer, and the receiver
//! reads the payload as the raw little-endian elements. Decoding never panics;
//! every failure is a [`DecodeError`].

mod codec;
mod envelope;
mod error;
mod frame;
mod types;

pub use codec::{decode, encode_control, encode_frame_header, Decoded};
pub use envelope::{EnvelopeHeader, MessageKind, ENVELOPE_LEN, MAGIC};
pub use error::DecodeError;
pub use frame::{FrameHeader, FRAME_HEADER_LEN};
pub use types::{
    AbortReason, ControlMessage, DType, Held, NodeMessage, ReduceOp, RejectCode, JOIN_LINK,
};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// The ALPN token daemons negotiate.
pub const ALPN: &[u8] = b"phalanx/1";

/// Bounds on what a decoder accepts. Lower them in tests to exercise the limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest control-message body, in bytes.
    pub max_control_len: u32,
    /// Largest tensor-frame payload, in bytes.
    pub max_frame_payload_len: u32,
}

/// The hard ceiling on a control body; the bincode decoder is configured with it
/// too, so no allocation inside a control message can exceed it.
pub const MAX_CONTROL_LEN: u32 = 1 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_control_len: MAX_CONTROL_LEN,
            max_frame_payload_len: 64 << 20,
        }
    }
}
