//! The local plane: messages between a trainer and its node's daemon over the
//! daemon's Unix socket. Tensor bytes never travel in these: the trainer
//! shares a memory file descriptor once (`RegisterBuffer`, with the fd in the
//! same `sendmsg` as `SCM_RIGHTS`) and then names byte ranges of it.
//!
//! Framing is the wire envelope with kind `Control` around a bincode body, so
//! the one decoder (and its limits) serves both planes.

use bincode::{Decode, Encode};

use crate::wire::{
    DType, DecodeError, EnvelopeHeader, Held, Limits, MessageKind, ReduceOp, ENVELOPE_LEN,
    PROTOCOL_VERSION,
};
use crate::{Epoch, MemberId, OpId};

/// A collective as the trainer asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum LocalKind {
    /// All-reduce in place.
    AllReduce(ReduceOp),
    /// Broadcast from the member with this id.
    Broadcast(MemberId),
    /// All-gather: the buffer holds one block per member.
    AllGather,
    /// Reduce-scatter: the caller's segment of the buffer holds the result.
    ReduceScatter(ReduceOp),
    /// Barrier (no data).
    Barrier,
    /// Hands the trainers' state to members joining the group: a broadcast
    /// from the lowest member that is not joining to every member, the
    /// joiners included (their trainers call `Join`). Live trainers issue it
    /// when a result says members are waiting.
    StateSync,
}

/// Trainer to daemon.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum LocalRequest {
    /// First message: who is asking.
    Hello {
        /// Protocol version of the client library.
        protocol_version: u16,
        /// The trainer's process id, for logs.
        pid: u32,
        /// The collective stream this connection issues (like a NCCL
        /// communicator): ops are numbered per stream, so each stream must be
        /// issued in the same order on every member, and streams are
        /// independent of each other.
        stream: u32,
    },
    /// Shares a memory file of `len_bytes`; its fd rides along as `SCM_RIGHTS`.
    RegisterBuffer {
        /// The trainer's name for it.
        buffer: u32,
        /// Its size.
        len_bytes: u64,
    },
    /// Joins the group on this connection's stream: the daemon asks to be
    /// (re)admitted, waits for the live trainers' `StateSync`, receives
    /// their state into bytes `offset_bytes..` of `buffer` (`len` elements
    /// of `dtype`) and continues the stream's numbering from there.
    Join {
        /// The registered buffer.
        buffer: u32,
        /// Where the state goes.
        offset_bytes: u64,
        /// Element type.
        dtype: DType,
        /// Elements of state.
        len: u64,
        /// The last op of this stream whose result the state in the buffer
        /// includes (the client's last completed call on this connection),
        /// if any. When every member of the ring is joining, the most
        /// advanced such state is handed to the others.
        holds: Option<Held>,
    },
    /// Runs one collective over bytes `offset_bytes..` of a registered buffer.
    Collective {
        /// The registered buffer.
        buffer: u32,
        /// Where the working buffer starts.
        offset_bytes: u64,
        /// What to compute.
        kind: LocalKind,
        /// Element type.
        dtype: DType,
        /// Elements per member (all-gather: per block).
        len: u64,
        /// All-reduce only: the samples this member's input was computed
        /// from. Given by every member of a stream (or by none), a `Mean`
        /// is weighted by them; steps closed by the quorum policy report
        /// them in [`StepMeta::samples`].
        samples: Option<u64>,
    },
    /// Checkpoints the state in bytes `offset_bytes..offset_bytes +
    /// len_bytes` of `buffer` as step `step` of this connection's stream.
    /// Answered with `Snapshotted` once the daemon has copied it out (the
    /// trainer may change its buffer then); the daemon persists it after.
    Checkpoint {
        /// The registered buffer.
        buffer: u32,
        /// Where the state starts.
        offset_bytes: u64,
        /// Its length.
        len_bytes: u64,
        /// The step it is the state after.
        step: u64,
        /// The last op of this stream whose result the state includes (the
        /// client's last completed call), kept in the manifest: a trainer
        /// that restores the checkpoint joins with it.
        holds: Option<Held>,
    },
    /// Waits until the checkpoint of `step` is committed, or will never be:
    /// `CheckpointEnded`.
    AwaitCheckpoint {
        /// The step.
        step: u64,
    },
    /// Restores the stream's latest committed checkpoint into bytes
    /// `offset_bytes..offset_bytes + len_bytes` of `buffer` (its size):
    /// `Restored`.
    Restore {
        /// The registered buffer.
        buffer: u32,
        /// Where the state goes.
        offset_bytes: u64,
        /// The state's length.
        len_bytes: u64,
    },
    /// Lists the stream's committed checkpoints: `Checkpoints`.
    ListCheckpoints,
}

/// A committed checkpoint, as a trainer sees it.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct CheckpointInfo {
    /// The step it holds the state after.
    pub step: u64,
    /// The epoch it was taken in.
    pub epoch: Epoch,
    /// Its size in bytes.
    pub bytes: u64,
    /// The members holding a durable copy.
    pub holders: Vec<MemberId>,
}

/// What a result says about the step's quorum (all-reduce under the
/// group's quorum policy; empty for every other op).
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct StepMeta {
    /// Members of the step's ring whose input is not in the result, and
    /// why (late for backup workers or the deadline, or demoted).
    pub left_out: Vec<(MemberId, String)>,
    /// The contributors' sample counts, where their trainers gave them.
    pub samples: Vec<(MemberId, u64)>,
    /// Later steps of this stream that already closed without this member
    /// (it is that far behind): its trainer may skip computing their
    /// gradients and only collect their results.
    pub behind: u64,
    /// This member is a demoted observer: its inputs are not used until it
    /// keeps up again.
    pub observer: bool,
}

/// Why the daemon refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum LocalErrorCode {
    /// The request was malformed or inconsistent (bad sizes, unknown buffer).
    BadRequest,
    /// The collective was aborted (member down, timeout, shutdown).
    Aborted,
    /// The daemon is shutting down.
    ShuttingDown,
    /// The client speaks another protocol version.
    UnsupportedVersion,
    /// The group cannot go on with this member: it is cut off from a
    /// majority, or the group finished the op without it (it must rejoin).
    NoQuorum,
}

/// The op id of the `seq`-th collective (from 1) of `stream`: identical on
/// every member that issues the stream in the same order.
pub fn stream_op_id(stream: u32, seq: u64) -> OpId {
    OpId::new(stream, seq)
}

/// Daemon to trainer.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum LocalResponse {
    /// Answer to `Hello`.
    Welcome {
        /// This node's member id.
        member: MemberId,
        /// The group's members, in ring order.
        members: Vec<MemberId>,
        /// The installed epoch.
        epoch: Epoch,
    },
    /// Answer to `RegisterBuffer`.
    Registered {
        /// The buffer.
        buffer: u32,
    },
    /// A collective finished; the buffer holds the result.
    Done {
        /// The op id the group gave it.
        op: OpId,
        /// The epoch it ran in.
        epoch: Epoch,
        /// The members whose inputs the result combines.
        contributors: Vec<MemberId>,
        /// Members admitted to the group that wait for the trainers' state
        /// on this stream (issue `StateSync` at the next step boundary).
        waiting: Vec<MemberId>,
        /// The step's quorum.
        meta: StepMeta,
    },
    /// Answer to `Checkpoint`: the state is copied out.
    Snapshotted {
        /// The step.
        step: u64,
    },
    /// Answer to `AwaitCheckpoint`.
    CheckpointEnded {
        /// The step.
        step: u64,
        /// Whether it is committed.
        committed: bool,
        /// Why not, or where it is held.
        detail: String,
    },
    /// Answer to `Restore`: the buffer holds the state of `step`.
    Restored {
        /// The step.
        step: u64,
        /// The last op of the stream the state includes, as the trainers
        /// said when they checkpointed.
        holds: Option<Held>,
    },
    /// Answer to `ListCheckpoints`, oldest first.
    Checkpoints {
        /// The stream's committed checkpoints.
        list: Vec<CheckpointInfo>,
    },
    /// A request failed; the connection stays usable unless the code says otherwise.
    Error {
        /// Machine-readable reason.
        code: LocalErrorCode,
        /// What went wrong, for the trainer's logs.
        message: String,
    },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ crate::wire::MAX_CONTROL_LEN as usize }>()
}

/// Encodes a local message with its envelope.
pub fn encode_local<T: Encode>(msg: &T) -> Vec<u8> {
    let mut out = vec![0u8; ENVELOPE_LEN];
    bincode::encode_into_std_write(msg, &mut out, config())
        .expect("encoding into a Vec cannot fail");
    let env = EnvelopeHeader {
        version: PROTOCOL_VERSION,
        kind: MessageKind::Control,
        body_len: u32::try_from(out.len() - ENVELOPE_LEN).expect("local message fits u32"),
    };
    out[..ENVELOPE_LEN].copy_from_slice(&env.encode());
    out
}

/// Decodes the body of a local message whose envelope was `env`.
pub fn decode_local<T: Decode<()>>(env: &EnvelopeHeader, body: &[u8]) -> Result<T, DecodeError> {
    if env.kind != MessageKind::Control {
        return Err(DecodeError::UnknownKind(2));
    }
    let (msg, used): (T, usize) = bincode::decode_from_slice(body, config())
        .map_err(|e| DecodeError::Control(e.to_string()))?;
    if used != body.len() {
        return Err(DecodeError::TrailingBytes(body.len() - used));
    }
    Ok(msg)
}

/// Limits for the local socket: control bodies only, small.
pub fn local_limits() -> Limits {
    Limits {
        max_control_len: 64 << 10,
        max_frame_payload_len: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_messages_round_trip() {
        let reqs = [
            LocalRequest::Hello {
                protocol_version: 1,
                pid: 7,
                stream: 2,
            },
            LocalRequest::RegisterBuffer {
                buffer: 1,
                len_bytes: 1 << 30,
            },
            LocalRequest::Collective {
                buffer: 1,
                offset_bytes: 64,
                kind: LocalKind::Broadcast(MemberId(3)),
                dtype: DType::BF16,
                len: 99,
                samples: Some(32),
            },
            LocalRequest::Checkpoint {
                buffer: 1,
                offset_bytes: 8,
                len_bytes: 1 << 20,
                step: 40,
                holds: Some(Held {
                    seq: 9,
                    epoch: Epoch(2),
                }),
            },
            LocalRequest::AwaitCheckpoint { step: 40 },
            LocalRequest::Restore {
                buffer: 1,
                offset_bytes: 0,
                len_bytes: 12,
            },
            LocalRequest::ListCheckpoints,
        ];
        for r in reqs {
            let bytes = encode_local(&r);
            let env = EnvelopeHeader::decode(&bytes, &local_limits()).unwrap();
            let back: LocalRequest = decode_local(&env, &bytes[ENVELOPE_LEN..]).unwrap();
            assert_eq!(back, r);
        }
        let done = LocalResponse::Done {
            op: OpId(5),
            epoch: Epoch(3),
            contributors: vec![MemberId(1), MemberId(2)],
            waiting: vec![],
            meta: StepMeta {
                left_out: vec![(MemberId(3), "missed the deadline".into())],
                samples: vec![(MemberId(1), 64), (MemberId(2), 32)],
                behind: 2,
                observer: true,
            },
        };
        let bytes = encode_local(&done);
        let env = EnvelopeHeader::decode(&bytes, &local_limits()).unwrap();
        assert_eq!(
            decode_local::<LocalResponse>(&env, &bytes[ENVELOPE_LEN..]).unwrap(),
            done
        );
        let resp = LocalResponse::Error {
            code: LocalErrorCode::BadRequest,
            message: "x".into(),
        };
        let bytes = encode_local(&resp);
        let env = EnvelopeHeader::decode(&bytes, &local_limits()).unwrap();
        assert_eq!(
            decode_local::<LocalResponse>(&env, &bytes[ENVELOPE_LEN..]).unwrap(),
            resp
        );
        assert!(
            decode_local::<LocalResponse>(&env, &bytes[ENVELOPE_LEN..bytes.len() - 1]).is_err()
        );
    }
}
