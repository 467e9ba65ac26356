//! The messages the daemon's tasks exchange, and nothing else: every task
//! depends on these types, none on another task, so dependencies point one
//! way (`run` → tasks → `bus` → `phalanx-protocol`).
//!
//! Channels (see `run.rs`): the transport feeds the runner [`NetInput`]s
//! (bounded, so a busy runner pushes back through QUIC flow control), the
//! peers' heartbeats on a queue of their own (never behind a backlog of
//! data frames, which a 128 MiB hand-over makes) and the control task
//! [`ControlInput`]s; the local plane hands the runner
//! [`TrainerCall`]s; the runner and the admin API reach the control task
//! through an unbounded queue (a suspicion is never lost to a full queue);
//! the control task publishes every [`GroupChange`] on a queue of its own
//! (never behind data frames) and the latest [`GroupView`] on a watch.

use bytes::Bytes;
use phalanx_protocol::checkpoint::{CheckpointId, Manifest, Report, SaveOutcome};
use phalanx_protocol::membership::GroupState;
use phalanx_protocol::node::{ControlRequest, JoinRequest, OpDone, OpError, Request};
use phalanx_protocol::stragglers::QuorumPolicy;
use phalanx_protocol::wire::{ControlMessage, FrameHeader, NodeMessage};
use phalanx_protocol::MemberId;
use tokio::sync::oneshot;

/// What the transport hands the runner.
#[derive(Debug)]
pub enum NetInput {
    /// A tensor frame from an authenticated peer.
    Frame {
        /// The frame header.
        header: FrameHeader,
        /// The payload.
        payload: Vec<u8>,
    },
    /// Every link to a peer is up (again).
    PeerUp {
        /// The peer.
        member: MemberId,
    },
    /// A peer's primary connection is gone.
    PeerDown {
        /// The peer.
        member: MemberId,
        /// Why.
        reason: String,
    },
    /// A message from a peer's node.
    Message {
        /// The peer.
        from: MemberId,
        /// The message.
        msg: NodeMessage,
    },
}

/// A trainer's answer: the outcome, and the buffer it lent.
#[derive(Debug)]
pub struct Reply<B> {
    /// The outcome.
    pub outcome: Result<OpDone, OpError>,
    /// The buffer (the result is in it when the outcome is `Ok`).
    pub buffer: B,
}

/// What the local plane hands the runner for a trainer: the request (the
/// runner gives it its id) and where the answer goes.
#[derive(Debug)]
pub enum TrainerCall<B> {
    /// A collective.
    Submit(Request<B>, oneshot::Sender<Reply<B>>),
    /// A join: the live trainers' state goes into its buffer; the answer
    /// names the hand-over's op (the stream goes on after it).
    Join(JoinRequest<B>, oneshot::Sender<Reply<B>>),
}

/// A restore's answer: the manifest of the checkpoint read and its bytes,
/// or why none.
pub type RestoreResult = Result<(Manifest, Vec<u8>), String>;

/// What the local plane asks the checkpoint task for a trainer.
#[derive(Debug)]
pub enum CheckpointCall {
    /// May the state of `id` be copied out? Answered once it may (the
    /// stream's previous copy may still be being written), or with why not.
    Save {
        /// The checkpoint.
        id: CheckpointId,
        /// The last op of the stream the state includes.
        holds: Option<phalanx_protocol::wire::Held>,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The state of `id`, copied out of the trainer's buffer.
    Snapped {
        /// The checkpoint.
        id: CheckpointId,
        /// The state.
        bytes: Vec<u8>,
    },
    /// Answered once the save of `id` has ended.
    Await {
        /// The checkpoint.
        id: CheckpointId,
        /// Where the verdict goes.
        reply: oneshot::Sender<SaveOutcome>,
    },
    /// The stream's latest committed checkpoint that reads back intact.
    Restore {
        /// The stream.
        stream: u32,
        /// Its id and bytes, or why none.
        reply: oneshot::Sender<RestoreResult>,
    },
}

/// What the control task is told.
#[derive(Debug)]
pub enum ControlInput {
    /// A Raft message from an authenticated peer.
    Raft {
        /// The peer.
        from: MemberId,
        /// The encoded message.
        message: Vec<u8>,
    },
    /// A new node (`phalanxd --join`) asks to be enrolled; its certificate
    /// was checked to name `name`.
    JoinRequest {
        /// The node.
        member: MemberId,
        /// Its certificate's name.
        name: String,
        /// Where it listens.
        addr: String,
    },
    /// What the runner's node asks (suspicions, readmission).
    Node(ControlRequest),
    /// `phalanxctl policy`: propose closing steps by `policy`; the answer
    /// says whether Raft took the proposal (it applies once committed).
    SetPolicy {
        /// The rule.
        policy: QuorumPolicy,
        /// Whether it was proposed, or why not.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The checkpoint task's report of a durable copy, to propose.
    Checkpointed(Report),
}

/// What `phalanxctl members` and the metrics show of the group.
#[derive(Clone, Debug)]
pub struct GroupView {
    /// The replicated state.
    pub group: GroupState,
    /// The leader, if known.
    pub leader: Option<MemberId>,
    /// Raft term.
    pub term: u64,
    /// Voters.
    pub voters: Vec<MemberId>,
    /// Learners.
    pub learners: Vec<MemberId>,
}

/// A frame on its way to a peer: envelope and header, then the payload.
#[derive(Debug)]
pub struct OutFrame {
    /// The frame's chunk (which channel it goes on).
    pub chunk: u32,
    /// Envelope and frame header.
    pub head: [u8; phalanx_protocol::wire::ENVELOPE_LEN + phalanx_protocol::wire::FRAME_HEADER_LEN],
    /// Raw elements.
    pub payload: Bytes,
}

/// The transport as the runner and the control task use it.
pub trait Links: Send + Sync + std::fmt::Debug {
    /// Queues a frame for `to` on the channel its chunk maps to. Never
    /// blocks: the queues are unbounded and the collective core's window
    /// bounds what is in them, so two daemons sending to each other cannot
    /// deadlock.
    fn send_frame(&self, to: MemberId, frame: OutFrame);
    /// Sends a control message to `to`; false when it is not connected (the
    /// message is dropped: Raft retransmits, node messages are repeated or
    /// asked for again).
    fn send(&self, to: MemberId, msg: ControlMessage) -> bool;
    /// Drops the links to `peer` and dials again.
    fn reset(&self, peer: MemberId);
    /// How long the runner is to keep itself busy, once: test-only fault
    /// injection (a `busy` line of the transport's fault gate), as a large
    /// op's synchronous copies and checksums keep it on a loaded machine.
    /// Never, by default and in builds without the `fault-injection`
    /// feature.
    fn take_busy(&self) -> Option<std::time::Duration> {
        None
    }
}
