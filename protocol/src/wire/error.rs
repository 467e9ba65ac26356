//! Decoding errors.

use thiserror::Error;

/// Why bytes could not be decoded. Every variant is fatal for the message; the
/// caller decides whether the connection survives (see each variant).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Fewer bytes than the message needs; on a stream, read more and retry.
    #[error("truncated: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes the message needs in total.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The envelope does not start with the magic bytes: not a Phalanx peer,
    /// or the stream lost framing. The connection cannot continue.
    #[error("bad magic {found:02x?}, expected \"PHLX\"")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The peer speaks a protocol version this build does not.
    #[error("unsupported protocol version {found} (this build accepts {min}..={max})")]
    UnsupportedVersion {
        /// The version found.
        found: u16,
        /// Oldest accepted.
        min: u16,
        /// Newest accepted.
        max: u16,
    },
    /// The envelope names a message kind this build does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// Reserved bits that must be zero were not.
    #[error("reserved field is {0:#x}, must be zero")]
    ReservedNotZero(u32),
    /// A length field exceeds the configured limit.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Which length.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A frame names an unknown dtype.
    #[error("unknown dtype code {0}")]
    UnknownDType(u8),
    /// A frame's payload length disagrees with its element count and dtype.
    #[error("frame payload is {actual} bytes but header says {expected}")]
    PayloadLength {
        /// Bytes implied by the header.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The control body is not a valid bincode message.
    #[error("malformed control message: {0}")]
    Control(String),
    /// The control body decoded but left bytes over.
    #[error("control message has {0} trailing bytes")]
    TrailingBytes(usize),
}
