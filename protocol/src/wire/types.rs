//! Value types carried on the wire.

use std::fmt;

use bincode::{Decode, Encode};

use crate::{Epoch, Incarnation, MemberId, OpId};

/// Which op's result a trainer's state includes last: the op's seq and the
/// epoch it completed in. Ordered by seq, then epoch: a fenced member may
/// have completed an op that the group re-ran without it in a later epoch,
/// and the re-run's result is the group's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct Held {
    /// The op's seq in its stream.
    pub seq: u64,
    /// The epoch it completed in.
    pub epoch: Epoch,
}

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
    /// IEEE 754 binary16.
    F16,
}

impl DType {
    /// Every dtype, for sweeps.
    pub const ALL: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The code used in frame headers.
    pub const fn code(self) -> u8 {
        match self {
            DType::F32 => 1,
            DType::BF16 => 2,
            DType::F16 => 3,
        }
    }

    /// The bytes that hold elements `range` of a buffer of this dtype.
    pub fn byte_range(self, range: &std::ops::Range<usize>) -> std::ops::Range<usize> {
        let size = self.size_bytes();
        range.start * size..range.end * size
    }

    /// The dtype for a frame-header code.
    pub const fn from_code(code: u8) -> Option<DType> {
        match code {
            1 => Some(DType::F32),
            2 => Some(DType::BF16),
            3 => Some(DType::F16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        })
    }
}

/// How contributions are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise sum divided once, at the end, by the number of contributors.
    Mean,
    /// Element-wise minimum.
    Min,
    /// Element-wise maximum.
    Max,
}

impl ReduceOp {
    /// Every op, for sweeps.
    pub const ALL: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Min, ReduceOp::Max];

    /// The element-wise combination applied as contributions arrive: `Mean`
    /// accumulates as `Sum` and divides once when the op completes.
    pub const fn accumulate(self) -> ReduceOp {
        match self {
            ReduceOp::Mean => ReduceOp::Sum,
            other => other,
        }
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
        })
    }
}

/// Why a peer refused a connection or a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum RejectCode {
    /// The peer speaks a protocol version outside our supported range.
    UnsupportedVersion,
    /// The peer is not a member of this group (or of this cluster).
    UnknownMember,
    /// The peer's incarnation is older than one already seen.
    StaleIncarnation,
    /// A message could not be decoded.
    Malformed,
    /// A tensor or message exceeded a configured limit.
    TooLarge,
    /// The request was valid but cannot be served now.
    Unavailable,
}

/// Why a collective was aborted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum AbortReason {
    /// A member of the op's ring was declared down.
    MemberDown(MemberId),
    /// A newer epoch was installed while the op was in flight.
    EpochChanged(Epoch),
    /// The op did not complete before its deadline.
    Timeout,
    /// A peer sent a frame that contradicts the op's schedule.
    ProtocolViolation(MemberId),
    /// The local trainer or daemon cancelled it.
    Cancelled,
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AbortReason::MemberDown(m) => write!(f, "member {m} is down"),
            AbortReason::EpochChanged(e) => write!(f, "epoch changed to {e}"),
            AbortReason::Timeout => f.write_str("timed out"),
            AbortReason::ProtocolViolation(m) => write!(f, "protocol violation by {m}"),
            AbortReason::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// The hello `link` of a connection that only carries a `JoinRequest`.
pub const JOIN_LINK: u16 = u16::MAX;

/// Control messages between daemons. Tensor data never travels in these.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ControlMessage {
    /// First message on a connection: who is speaking.
    Hello {
        /// The sender's protocol version.
        protocol_version: u16,
        /// The cluster name both ends must agree on.
        cluster: String,
        /// The sender.
        member: MemberId,
        /// The sender's current life.
        incarnation: Incarnation,
        /// Which of the sender's parallel connections to this peer this is.
        link: u16,
    },
    /// The answer to an accepted `Hello`.
    Welcome {
        /// The answering member.
        member: MemberId,
        /// Its current life.
        incarnation: Incarnation,
        /// The epoch it has installed.
        epoch: Epoch,
    },
    /// A refusal, with a reason the other side can log.
    Reject {
        /// Machine-readable reason.
        code: RejectCode,
        /// Human-readable detail.
        detail: String,
    },
    /// Liveness signal.
    Heartbeat {
        /// The sender.
        member: MemberId,
        /// Its current life.
        incarnation: Incarnation,
        /// The epoch it has installed.
        epoch: Epoch,
        /// The sender's clock when it sent this, in microseconds (for RTT).
        sent_at_us: u64,
    },
    /// The sender aborted an op; the receiver should abort it too.
    AbortOp {
        /// The op.
        op: OpId,
        /// Its epoch.
        epoch: Epoch,
        /// Why.
        reason: AbortReason,
    },
    /// The sender is leaving on purpose.
    Goodbye {
        /// The sender.
        member: MemberId,
        /// Why it leaves.
        reason: String,
    },
    /// A Raft message (raft-rs protobuf encoding) for the control plane.
    Raft {
        /// The encoded `eraftpb::Message`.
        message: Vec<u8>,
    },
    /// A new node (`phalanxd --join ADDR`) asks the member at ADDR to enrol
    /// it, on a connection opened for that alone (its hello names link
    /// [`JOIN_LINK`]); its certificate must name `name`.
    JoinRequest {
        /// The node's certificate name.
        name: String,
        /// Where it listens.
        addr: String,
    },
    /// The answer to a `JoinRequest`: every member the answering daemon
    /// knows (id, certificate name, address), itself included, so the new
    /// node can connect to them while its enrolment commits.
    JoinRoster {
        /// The members.
        members: Vec<(MemberId, String, String)>,
    },
    /// A message between the data-path cores ([`crate::node::Node`]) of two
    /// daemons: the shell hands it to its node as it is.
    Node(NodeMessage),
}

/// Messages between the data-path cores of two daemons (recovery, progress,
/// the steps' cut, state hand-over), carried on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum NodeMessage {
    /// What the sender holds of interrupted ops as it enters a new epoch.
    Recovery(crate::membership::RecoveryReport),
    /// The sender misses the receiver's recovery report for `epoch`: a
    /// member that has installed that epoch answers with its report (the
    /// first one may have been lost with a connection, or dropped while the
    /// receiver still fenced the sender off).
    RecoveryAsk {
        /// The epoch whose report is missing.
        epoch: Epoch,
    },
    /// The progress signal: per stream, the last op the sender's trainers
    /// issued (sent every few heartbeats).
    Progress {
        /// (stream, last issued op seq).
        streams: Vec<(u32, u64)>,
    },
    /// To the step's coordinator (the lowest member of the step's ring):
    /// the sender's trainer submitted all-reduce `op` (a step that closes by
    /// the group's quorum policy). Every member of the step sends one.
    StepReady {
        /// The op (its seq is the step).
        op: OpId,
        /// The epoch it was submitted in.
        epoch: Epoch,
        /// The reduction.
        reduce: ReduceOp,
        /// Element type.
        dtype: DType,
        /// Elements.
        len: u64,
        /// The samples the sender's gradient was computed from, if its
        /// trainer said (the mean is then weighted by them).
        samples: Option<u64>,
    },
    /// To the step's coordinator: the sender's trainer submitted `op` after
    /// the step closed without it (its daemon stood in). For attribution
    /// only: it never opens or closes a step — after an epoch change the
    /// coordinator has forgotten the step, and a readiness would cut it
    /// a second time.
    StepLate {
        /// The op (its seq is the step).
        op: OpId,
        /// The epoch the sender is in.
        epoch: Epoch,
    },
    /// From the step's coordinator to every member of the step's ring,
    /// before the reduction runs: who contributes to `op`, who is left out
    /// and why. Every member then runs the reduction over the whole ring,
    /// the members left out with a neutral input, so every replica gets the
    /// same result.
    StepCut {
        /// The op.
        op: OpId,
        /// Its epoch.
        epoch: Epoch,
        /// The reduction (as the members submitted it).
        reduce: ReduceOp,
        /// Element type.
        dtype: DType,
        /// Elements.
        len: u64,
        /// The contributors, ascending, with their sample counts.
        participants: Vec<(MemberId, Option<u64>)>,
        /// The members left out, and why.
        left_out: Vec<(MemberId, crate::stragglers::LeftOut)>,
        /// Why the step closed when it did.
        reason: String,
        /// Demotions (`true`) and readmissions this step caused, with why.
        changes: Vec<(MemberId, bool, String)>,
        /// The coordinator's attribution, per member.
        records: Vec<crate::stragglers::StragglerRecord>,
    },
    /// To a joining member: the live trainers started handing over their
    /// state on `stream` as op `op` (a broadcast from `root` of `len`
    /// elements of `dtype` in `epoch`); the joiner runs it too.
    JoinPoint {
        /// The stream's id.
        stream: u32,
        /// The state-sync op.
        op: OpId,
        /// Its epoch.
        epoch: Epoch,
        /// The member whose trainer's state it carries.
        root: MemberId,
        /// Element type.
        dtype: DType,
        /// Elements.
        len: u64,
        /// [`crate::membership::state_checksum`] of the state as the root
        /// sends it; the joiner checks what it received against it.
        checksum: u64,
        /// The members that run it, ascending: the ring it started in, or
        /// a re-run's (which leaves out members admitted since). The joiner
        /// runs the same schedule and counts the same members as holding
        /// the state after it.
        members: Vec<MemberId>,
    },
    /// To every member of the ring, from a member whose trainer waits in
    /// `join()` while no member of the ring holds `stream`'s state by the
    /// group's books (a lost quorum made every trainer rejoin): what its
    /// trainer holds. Once every member's offer of `epoch` is in, the most
    /// advanced state is handed to the others by its holder.
    StateOffer {
        /// The stream's id.
        stream: u32,
        /// The epoch the offer is for.
        epoch: Epoch,
        /// The last op of the stream whose result the trainer's state
        /// includes; `None`: it holds nothing the group ran (a new trainer
        /// process).
        holds: Option<Held>,
        /// The highest seq of the stream this member has seen (the
        /// hand-over takes the next one past every member's).
        seen: u64,
        /// [`crate::membership::state_checksum`] of the state.
        checksum: u64,
        /// Element type.
        dtype: DType,
        /// Elements.
        len: u64,
    },
}
