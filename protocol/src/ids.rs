//! Identifiers and the core's notion of time.

use std::fmt;
use std::time::Duration;

use bincode::{Decode, Encode};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Encode, Decode)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_type!(
    /// A cluster member (one `phalanxd`), stable across restarts.
    MemberId(u32),
    "m"
);
id_type!(
    /// A membership epoch. Epochs only increase; an op belongs to exactly one.
    Epoch(u64),
    "e"
);
id_type!(
    /// A training step, as numbered by the trainers.
    Step(u64),
    "s"
);
id_type!(
    /// A collective operation, unique within the group for the life of an epoch.
    OpId(u64),
    "op"
);
id_type!(
    /// How many times a member has (re)started; fences messages from an old life.
    Incarnation(u64),
    "i"
);

/// Bits of an [`OpId`] that hold its sequence number within its stream.
const SEQ_BITS: u32 = 40;

impl OpId {
    /// The largest stream id: 24 bits are left above the sequence number.
    pub const MAX_STREAM: u32 = (1 << (64 - SEQ_BITS)) - 1;

    /// The op numbered `seq` (from 1) in collective stream `stream`: every
    /// member that issues the stream in the same order gives it the same id.
    ///
    /// # Panics
    /// When `stream` exceeds [`OpId::MAX_STREAM`] or `seq` does not fit the
    /// 40 bits a stream numbers its ops with (two streams must never share
    /// ids).
    pub fn new(stream: u32, seq: u64) -> OpId {
        assert!(stream <= Self::MAX_STREAM, "stream ids have 24 bits");
        assert!(seq < 1 << SEQ_BITS, "a stream has at most 2^40 ops");
        OpId((u64::from(stream) << SEQ_BITS) | seq)
    }

    /// The collective stream (trainer connection) the op belongs to.
    pub fn stream(self) -> u32 {
        (self.0 >> SEQ_BITS) as u32
    }

    /// Its number within the stream (from 1; 0 for a join request).
    pub fn seq(self) -> u64 {
        self.0 & ((1 << SEQ_BITS) - 1)
    }
}

impl Epoch {
    /// The epoch after this one.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

/// A point in time, in microseconds since an origin the caller chooses.
///
/// The core never reads a clock: the daemon converts `Instant`s relative to its
/// start, the simulator passes virtual time. Arithmetic saturates so a
/// far-future deadline cannot wrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    /// The origin.
    pub const ZERO: Time = Time(0);

    /// `self + d`, saturating.
    pub fn after(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        )
    }

    /// The time elapsed since `earlier`, zero if `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:06}s", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_ids_carry_their_stream_and_sequence() {
        let op = OpId::new(7, 12345);
        assert_eq!((op.stream(), op.seq()), (7, 12345));
        assert_eq!(OpId::new(0, 1), OpId(1));
        assert_eq!(
            OpId::new(OpId::MAX_STREAM, (1 << 40) - 1).stream(),
            OpId::MAX_STREAM
        );
        assert!(std::panic::catch_unwind(|| OpId::new(OpId::MAX_STREAM + 1, 1)).is_err());
        assert!(
            OpId::new(1, 1) > OpId::new(0, (1 << 40) - 1),
            "streams order first"
        );
    }

    #[test]
    fn time_saturates() {
        assert_eq!(
            Time(u64::MAX - 1).after(Duration::from_secs(5)),
            Time(u64::MAX)
        );
        assert_eq!(Time(5).since(Time(10)), Duration::ZERO);
        assert_eq!(Time(10).since(Time(4)), Duration::from_micros(6));
        assert_eq!(Time(1_500_000).to_string(), "1.500000s");
    }
}
