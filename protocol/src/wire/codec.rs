//! The one place that turns messages into bytes and back.

use super::{
    ControlMessage, DecodeError, EnvelopeHeader, FrameHeader, Limits, MessageKind, ENVELOPE_LEN,
    FRAME_HEADER_LEN, MAX_CONTROL_LEN, PROTOCOL_VERSION,
};

/// bincode's own allocation limit, so a length prefix inside a control body
/// cannot make the decoder allocate more than a whole body may hold.
const BINCODE_LIMIT: usize = MAX_CONTROL_LEN as usize;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<BINCODE_LIMIT>()
}

/// A decoded message, borrowing the payload from the input buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded<'a> {
    /// A control message.
    Control(ControlMessage),
    /// A tensor frame; `payload` is `header.elem_count` raw LE elements.
    Frame {
        /// The frame header.
        header: FrameHeader,
        /// The raw payload bytes.
        payload: &'a [u8],
    },
}

/// Encodes a control message with its envelope.
///
/// # Panics
/// Only if the message is larger than [`MAX_CONTROL_LEN`], which no message
/// built from bounded fields reaches; a caller that puts unbounded text into a
/// `Reject` or `Goodbye` must truncate it first.
pub fn encode_control(msg: &ControlMessage) -> Vec<u8> {
    let mut out = vec![0u8; ENVELOPE_LEN];
    bincode::encode_into_std_write(msg, &mut out, config())
        .expect("encoding into a Vec cannot fail below the size limit");
    let body_len = u32::try_from(out.len() - ENVELOPE_LEN).expect("control body fits u32");
    assert!(body_len <= MAX_CONTROL_LEN, "control message too large");
    let env = EnvelopeHeader {
        version: PROTOCOL_VERSION,
        kind: MessageKind::Control,
        body_len,
    };
    out[..ENVELOPE_LEN].copy_from_slice(&env.encode());
    out
}

/// Encodes the envelope and header of a tensor frame. The caller writes these
/// bytes and then the payload straight from its buffer, so tensor data is
/// never copied through an encoder.
pub fn encode_frame_header(header: &FrameHeader) -> [u8; ENVELOPE_LEN + FRAME_HEADER_LEN] {
    let payload = u32::try_from(header.payload_len()).expect("frame payload fits u32");
    let env = EnvelopeHeader {
        version: PROTOCOL_VERSION,
        kind: MessageKind::Frame,
        body_len: payload + FRAME_HEADER_LEN as u32,
    };
    let mut out = [0u8; ENVELOPE_LEN + FRAME_HEADER_LEN];
    out[..ENVELOPE_LEN].copy_from_slice(&env.encode());
    out[ENVELOPE_LEN..].copy_from_slice(&header.encode());
    out
}

/// Decodes one message from the start of `buf`. Returns the message and the
/// number of bytes it used; bytes after it are left for the next call.
pub fn decode<'a>(buf: &'a [u8], limits: &Limits) -> Result<(Decoded<'a>, usize), DecodeError> {
    let env = EnvelopeHeader::decode(buf, limits)?;
    let total = env.message_len();
    let Some(body) = buf.get(ENVELOPE_LEN..total) else {
        return Err(DecodeError::Truncated {
            needed: total,
            available: buf.len(),
        });
    };
    let msg = match env.kind {
        MessageKind::Control => {
            let (msg, used): (ControlMessage, usize) =
                bincode::decode_from_slice(body, config())
                    .map_err(|e| DecodeError::Control(e.to_string()))?;
            if used != body.len() {
                return Err(DecodeError::TrailingBytes(body.len() - used));
            }
            Decoded::Control(msg)
        }
        MessageKind::Frame => {
            let header = FrameHeader::decode(body, limits)?;
            let payload = &body[FRAME_HEADER_LEN.min(body.len())..];
            if payload.len() as u64 != header.payload_len() {
                return Err(DecodeError::PayloadLength {
                    expected: header.payload_len(),
                    actual: payload.len() as u64,
                });
            }
            Decoded::Frame { header, payload }
        }
    };
    Ok((msg, total))
}
