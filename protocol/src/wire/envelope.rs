//! The fixed envelope in front of every message.

use super::{DecodeError, Limits, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// The four bytes every message starts with.
pub const MAGIC: [u8; 4] = *b"PHLX";
/// Envelope size in bytes.
pub const ENVELOPE_LEN: usize = 12;

/// What the body of a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// A bincode-encoded [`super::ControlMessage`].
    Control,
    /// A [`super::FrameHeader`] and a raw tensor payload.
    Frame,
}

impl MessageKind {
    fn code(self) -> u8 {
        match self {
            MessageKind::Control => 1,
            MessageKind::Frame => 2,
        }
    }
}

/// A decoded envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnvelopeHeader {
    /// Protocol version of the sender.
    pub version: u16,
    /// Body kind.
    pub kind: MessageKind,
    /// Body length in bytes.
    pub body_len: u32,
}

impl EnvelopeHeader {
    /// Encodes the envelope.
    pub fn encode(&self) -> [u8; ENVELOPE_LEN] {
        let mut out = [0u8; ENVELOPE_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6] = self.kind.code();
        out[7] = 0; // flags, reserved
        out[8..12].copy_from_slice(&self.body_len.to_le_bytes());
        out
    }

    /// Decodes and validates the envelope at the start of `buf`. On a stream,
    /// call this with the first [`ENVELOPE_LEN`] bytes to learn how many more
    /// to read; the body length is checked against `limits` before anyone
    /// allocates for it.
    pub fn decode(buf: &[u8], limits: &Limits) -> Result<EnvelopeHeader, DecodeError> {
        let Some(head) = buf.get(..ENVELOPE_LEN) else {
            return Err(DecodeError::Truncated {
                needed: ENVELOPE_LEN,
                available: buf.len(),
            });
        };
        let magic = [head[0], head[1], head[2], head[3]];
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([head[4], head[5]]);
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Err(DecodeError::UnsupportedVersion {
                found: version,
                min: MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION,
            });
        }
        let kind = match head[6] {
            1 => MessageKind::Control,
            2 => MessageKind::Frame,
            other => return Err(DecodeError::UnknownKind(other)),
        };
        if head[7] != 0 {
            return Err(DecodeError::ReservedNotZero(u32::from(head[7])));
        }
        let body_len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        let max = match kind {
            MessageKind::Control => limits.max_control_len,
            MessageKind::Frame => limits
                .max_frame_payload_len
                .saturating_add(super::FRAME_HEADER_LEN as u32),
        };
        if body_len > max {
            return Err(DecodeError::TooLarge {
                what: "message body",
                len: u64::from(body_len),
                max: u64::from(max),
            });
        }
        Ok(EnvelopeHeader {
            version,
            kind,
            body_len,
        })
    }

    /// Total bytes of the message: envelope plus body.
    pub fn message_len(&self) -> usize {
        ENVELOPE_LEN + self.body_len as usize
    }
}
