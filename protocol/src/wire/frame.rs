//! The tensor frame header: fixed layout, little-endian, no serde.

use super::{DType, DecodeError, Limits};
use crate::{Epoch, Incarnation, MemberId, OpId, Step};

/// Size of an encoded [`FrameHeader`].
pub const FRAME_HEADER_LEN: usize = 52;

/// Identifies one piece of one round of one collective. The payload that
/// follows is `elem_count` little-endian elements of `dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// The collective.
    pub op: OpId,
    /// The epoch the op belongs to; frames of another epoch are never mixed in.
    pub epoch: Epoch,
    /// The training step.
    pub step: Step,
    /// The sender's incarnation, to fence frames from an earlier life.
    pub incarnation: Incarnation,
    /// The sender.
    pub sender: MemberId,
    /// The round of the op's schedule this piece belongs to.
    pub round: u32,
    /// The piece (chunk) index within the round.
    pub chunk: u32,
    /// Element type of the payload.
    pub dtype: DType,
    /// Number of elements in the payload.
    pub elem_count: u32,
}

impl FrameHeader {
    /// Payload size in bytes implied by the header.
    pub fn payload_len(&self) -> u64 {
        u64::from(self.elem_count) * self.dtype.size_bytes() as u64
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[0..8].copy_from_slice(&self.op.0.to_le_bytes());
        out[8..16].copy_from_slice(&self.epoch.0.to_le_bytes());
        out[16..24].copy_from_slice(&self.step.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.incarnation.0.to_le_bytes());
        out[32..36].copy_from_slice(&self.sender.0.to_le_bytes());
        out[36..40].copy_from_slice(&self.round.to_le_bytes());
        out[40..44].copy_from_slice(&self.chunk.to_le_bytes());
        out[44] = self.dtype.code();
        // 45..48 reserved, zero
        out[48..52].copy_from_slice(&self.elem_count.to_le_bytes());
        out
    }

    /// Decodes a header from the first [`FRAME_HEADER_LEN`] bytes of `buf`.
    pub fn decode(buf: &[u8], limits: &Limits) -> Result<FrameHeader, DecodeError> {
        let Some(b) = buf.get(..FRAME_HEADER_LEN) else {
            return Err(DecodeError::Truncated {
                needed: FRAME_HEADER_LEN,
                available: buf.len(),
            });
        };
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |i: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[i..i + 4]);
            u32::from_le_bytes(a)
        };
        let dtype = DType::from_code(b[44]).ok_or(DecodeError::UnknownDType(b[44]))?;
        let reserved = u32::from(b[45]) | u32::from(b[46]) << 8 | u32::from(b[47]) << 16;
        if reserved != 0 {
            return Err(DecodeError::ReservedNotZero(reserved));
        }
        let header = FrameHeader {
            op: OpId(u64_at(0)),
            epoch: Epoch(u64_at(8)),
            step: Step(u64_at(16)),
            incarnation: Incarnation(u64_at(24)),
            sender: MemberId(u32_at(32)),
            round: u32_at(36),
            chunk: u32_at(40),
            dtype,
            elem_count: u32_at(48),
        };
        if header.payload_len() > u64::from(limits.max_frame_payload_len) {
            return Err(DecodeError::TooLarge {
                what: "frame payload",
                len: header.payload_len(),
                max: u64::from(limits.max_frame_payload_len),
            });
        }
        Ok(header)
    }
}
