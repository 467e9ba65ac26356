//! What goes into a [`super::Node`] and what comes out of it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use thiserror::Error;

use crate::collective::Config as CoreConfig;
use crate::local::{LocalKind, StepMeta};
use crate::membership::{DetectorConfig, GroupState, Status};
use crate::stragglers::{QuorumPolicy, StragglerRecord};
use crate::wire::{AbortReason, DType, FrameHeader, Held, NodeMessage, ReduceOp};
use crate::{Epoch, Incarnation, MemberId, OpId};

/// Memory an op runs in: a trainer's shared buffer in the daemon, a plain
/// vector in the simulators and tests. The node reads and writes it only
/// while it holds the request it came with.
pub trait Buffer {
    /// The bytes.
    fn as_bytes(&self) -> &[u8];
    /// The bytes, to write.
    fn as_bytes_mut(&mut self) -> &mut [u8];
}

impl Buffer for Vec<u8> {
    fn as_bytes(&self) -> &[u8] {
        self
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// The element-wise arithmetic the node applies to buffers of raw
/// little-endian elements: the daemon plugs in its compute engine, the
/// simulators the scalar reference. Deterministic: the same inputs give
/// the same bits.
pub trait Arithmetic: fmt::Debug + Send {
    /// `acc[i] = acc[i] op src[i]` (`Mean` accumulates as `Sum`).
    fn reduce(&self, dtype: DType, op: ReduceOp, acc: &mut [u8], src: &[u8]) -> Result<(), String>;
    /// `x[i] *= factor`.
    fn scale(&self, dtype: DType, x: &mut [u8], factor: f32) -> Result<(), String>;
}

/// The shell's name for a trainer request, handed back with its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// A trainer's collective.
#[derive(Debug)]
pub struct Request<B> {
    /// How the shell finds the caller again.
    pub id: RequestId,
    /// The op's id, from the trainer's stream and call count.
    pub op: OpId,
    /// What to compute.
    pub kind: LocalKind,
    /// Element type.
    pub dtype: DType,
    /// Elements per member.
    pub len: usize,
    /// All-reduce: the samples the input was computed from, if given.
    pub samples: Option<u64>,
    /// The working buffer (input, then output).
    pub buffer: B,
}

/// A trainer joining the group on `stream`: the live trainers' state goes
/// into `buffer`.
#[derive(Debug)]
pub struct JoinRequest<B> {
    /// How the shell finds the caller again.
    pub id: RequestId,
    /// The stream.
    pub stream: u32,
    /// Element type of the state.
    pub dtype: DType,
    /// Elements of state.
    pub len: usize,
    /// The last op of the stream whose result the trainer's state includes
    /// (the buffer holds that state), if any: offered when no live trainer
    /// is left to hand the group's state over.
    pub holds: Option<Held>,
    /// Where the state goes (and, with `holds`, the state the trainer has).
    pub buffer: B,
}

/// The group as the control plane applied it, as one node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupChange {
    /// The epoch.
    pub epoch: Epoch,
    /// Its ring.
    pub ring: Vec<MemberId>,
    /// Whether this daemon, in its current life, is in the ring.
    pub admitted: bool,
    /// What the trainer is told while this daemon is out of the ring
    /// (removed, or enrolled by `--join` and not admitted yet).
    pub removed: Option<String>,
    /// The epoch each ring member was (last) admitted in.
    pub joined_at: BTreeMap<MemberId, Epoch>,
    /// How the epoch's steps close.
    pub policy: QuorumPolicy,
    /// Set when this publication answers the node's
    /// [`ControlRequest::Confirm`] of that number: the group was read at a
    /// point of the Raft log later than the ask (a read index the leader
    /// confirmed with a quorum), and this is what it was then.
    pub confirmed: Option<u64>,
}

impl GroupChange {
    /// What member `me` in life `incarnation` makes of `group`.
    pub fn of(group: &GroupState, me: MemberId, incarnation: Incarnation) -> GroupChange {
        let record = group.members.get(&me);
        let admitted =
            record.is_some_and(|r| r.status == Status::Active && r.incarnation == incarnation);
        let removed = record.filter(|r| r.status == Status::Removed).map(|r| {
            if r.incarnation.0 == 0 {
                // Enrolled by `--join`, never in the ring yet.
                "this node is enrolled in the group but not in its ring yet; \
                 the trainer must call join() to enter it with the group's state"
                    .to_string()
            } else {
                format!(
                    "this member was removed from the group (removed in {}: {}) and \
                     the group went on without it; the trainer must call join() to come \
                     back with the group's state",
                    r.since, r.reason
                )
            }
        });
        GroupChange {
            epoch: group.epoch,
            ring: group.ring(),
            admitted,
            removed,
            joined_at: group
                .members
                .iter()
                .filter(|(_, r)| r.status == Status::Active)
                .map(|(&m, r)| (m, r.since))
                .collect(),
            policy: group.policy,
            confirmed: None,
        }
    }
}

/// A completed collective, as its trainer is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpDone {
    /// The group's id for it.
    pub op: OpId,
    /// Its epoch.
    pub epoch: Epoch,
    /// Whose inputs the result combines.
    pub contributors: Vec<MemberId>,
    /// Members waiting for the trainers' state on this stream.
    pub waiting: Vec<MemberId>,
    /// The step's quorum (cut-path all-reduce only).
    pub meta: StepMeta,
}

/// Why a trainer's request failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OpError {
    /// The request was invalid, or does not fit the group any more; nothing
    /// was run (the trainer may issue it again, corrected).
    #[error("rejected: {0}")]
    Rejected(String),
    /// The op was aborted for a reason no new epoch can repair (a peer broke
    /// the protocol, a timeout).
    #[error("aborted: {0}")]
    Aborted(AbortReason),
    /// The daemon is shutting down.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The group could not go on with this member: no new epoch came in time
    /// (this member cannot reach a majority), or the group finished the op
    /// without it. The trainer must join again.
    #[error("no quorum: {0}")]
    NoQuorum(String),
}

/// What the shell must do, in the order polled.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<B> {
    /// Send a tensor frame to a peer: `header`, then `payload`.
    Frame {
        /// The peer.
        to: MemberId,
        /// The frame header.
        header: FrameHeader,
        /// Raw little-endian elements.
        payload: Vec<u8>,
    },
    /// Send a message to a peer's node (dropped if it is not connected:
    /// every such message is repeated or asked for again).
    Message {
        /// The peer.
        to: MemberId,
        /// The message.
        msg: NodeMessage,
    },
    /// Answer a trainer's request; its buffer comes back with the answer.
    Reply {
        /// The request.
        id: RequestId,
        /// Its buffer (holding the result when the outcome is `Ok`).
        buffer: B,
        /// The outcome.
        outcome: Result<OpDone, OpError>,
    },
    /// Tell this daemon's control plane.
    Control(ControlRequest),
    /// Drop the connections to `member` and dial again (a suspected peer
    /// that restarted is reached in its new life at once).
    ResetLinks {
        /// The member.
        member: MemberId,
    },
}

/// What a node asks of its daemon's control plane
/// ([`crate::membership::ControlPlane::handle`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlRequest {
    /// Take `member` out of the ring in a new epoch (it may be this daemon
    /// itself, leaving to be readmitted). Raised once per suspicion: the
    /// control plane keeps proposing it until it takes effect or is
    /// cleared.
    Suspect {
        /// The member.
        member: MemberId,
        /// Why, for logs and `phalanxctl members`.
        reason: String,
    },
    /// A member suspected before was heard from again (or reconnected).
    Cleared {
        /// The member.
        member: MemberId,
    },
    /// A trainer is joining: (re)admit this daemon.
    WantIn,
    /// Start a new epoch with the same ring: frames of ops in flight were
    /// lost with a connection to a live peer, and those ops are finished
    /// again only by an epoch change. Kept proposing until one commits.
    Renew {
        /// Why, for logs.
        reason: String,
    },
    /// This daemon did not run, or heard nobody, for about as long as its
    /// peers wait before they suspect it: the group may have gone on
    /// without it. Read the group at a point of the Raft log after this ask
    /// (retried until it succeeds or the node asks again) and publish it
    /// with [`GroupChange::confirmed`] set to `asked`.
    Confirm {
        /// The ask's number (they grow).
        asked: u64,
    },
}

/// How a trainer's op ended, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The trainer got its result.
    Completed,
    /// An epoch change or a member's failure interrupted it; it is parked.
    Interrupted,
    /// It failed for good.
    Aborted,
    /// The group could not go on with this member.
    NoQuorum,
}

impl Outcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Interrupted => "interrupted",
            Outcome::Aborted => "aborted",
            Outcome::NoQuorum => "no_quorum",
        }
    }
}

/// What the shell may observe (metrics, the operators' view); nothing it
/// must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A trainer's op ended.
    Op {
        /// How.
        outcome: Outcome,
        /// Its kind (`all_reduce`, `broadcast`, ..., `state_sync`).
        kind: &'static str,
        /// For a completed op: how long since the trainer asked.
        elapsed: Option<Duration>,
    },
    /// An interrupted op was finished by a recovery plan
    /// (`rerun`, `kept_result`, `superseded`).
    Recovered {
        /// The plan's label.
        plan: &'static str,
    },
    /// This member, removed while its trainer was in lockstep, was
    /// readmitted: back in lockstep with `missed` results to serve its
    /// trainer (`caught_up`), or not (its held calls failed).
    Returned {
        /// Whether it came back in lockstep.
        caught_up: bool,
        /// Results the trainer missed and receives.
        missed: usize,
    },
    /// A doubt after a pause (this daemon did not run, or heard nobody, for
    /// about its peers' suspicion bound; results were withheld) ended:
    /// `confirmed` (the epoch went on with this member, the results were
    /// handed over), `removed` (taken back, the return claims the ops
    /// before them) or `failed` (the calls failed).
    Doubt {
        /// How it ended.
        outcome: &'static str,
    },
    /// A peer is suspected (`silent` or `stuck`).
    Suspected {
        /// The reason's label.
        reason: &'static str,
    },
    /// This member coordinated a step that closed (`all_ready`, `backup`,
    /// `deadline`).
    StepClosed {
        /// The reason's label.
        reason: &'static str,
    },
    /// The step coordinator's attribution, as last announced.
    Stragglers(Vec<StragglerRecord>),
}

/// Bounds and timing of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// The collective core's bounds.
    pub collectives: CoreConfig,
    /// Heartbeats and the suspicion bound.
    pub detector: DetectorConfig,
    /// A parked or waiting op with no new epoch this long fails with
    /// [`OpError::NoQuorum`].
    pub recovery_timeout: Duration,
    /// A peer whose trainer is behind an op the others waited on this long
    /// is suspected as stuck.
    pub stuck_after: Duration,
    /// After its first admission, how long a daemon waits before it judges
    /// peers by their heartbeats (while a new group forms, every daemon
    /// creates and syncs its log at once and a busy machine misses some).
    pub startup_grace: Duration,
    /// Results kept per stream at most (older ones are dropped even if a
    /// member still lags that far: it then rejoins with the group's state).
    pub kept_results: usize,
    /// Results of steps a daemon ran for its late trainer that it keeps
    /// before concluding the trainer cannot keep up at all (it then leaves
    /// the ring and rejoins with the state).
    pub max_kept_ahead: usize,
    /// Results per stream kept at most for members removed lately, which
    /// may come back with their trainers' history (for the recovery bound):
    /// a member that missed more rejoins with the group's state instead.
    /// Each is one op in flight when it is sent (below the core's
    /// `max_ops_in_flight`) and one line in the recovery report.
    pub return_kept_results: usize,
    /// ... and bytes of them at most.
    pub return_kept_bytes: usize,
    /// Step attribution: a member is demoted when it missed `demote_after`
    /// of the last `window` steps by more than `tolerance` each, and
    /// readmitted after `readmit_after` steps in time.
    pub attribution: AttributionConfig,
}

/// The demotion rule of the step coordinators (see [`NodeConfig`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttributionConfig {
    /// Steps remembered per member.
    pub window: usize,
    /// Misses in the window that demote.
    pub demote_after: usize,
    /// Steps in time that readmit.
    pub readmit_after: usize,
    /// How late after a step's close a member left out may be and still
    /// count as keeping up (backup workers always leave out the last
    /// arrival).
    pub tolerance: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            collectives: CoreConfig::default(),
            detector: DetectorConfig::default(),
            recovery_timeout: Duration::from_secs(5),
            stuck_after: Duration::from_secs(30),
            startup_grace: Duration::from_secs(2),
            kept_results: 16,
            max_kept_ahead: 256,
            return_kept_results: 512,
            return_kept_bytes: 256 << 20,
            attribution: AttributionConfig {
                window: 10,
                demote_after: 3,
                readmit_after: 3,
                tolerance: Duration::from_millis(20),
            },
        }
    }
}

impl NodeConfig {
    /// How often the node tells the ring its trainers' progress.
    pub fn progress_interval(&self) -> Duration {
        self.detector.heartbeat_interval * 5
    }

    /// How often a missing recovery report is asked for again.
    pub fn ask_interval(&self) -> Duration {
        self.detector.heartbeat_interval * 2
    }

    /// A report missing this long from a peer that is heard is not lost to
    /// chance (asks go every [`Self::ask_interval`]): the connections to it
    /// are dropped and dialled again. Missing twice this long, the peer is
    /// suspected, so the group goes on without it before the ops waiting
    /// on the exchange fail ([`Self::recovery_timeout`]).
    pub fn report_overdue(&self) -> Duration {
        self.recovery_timeout * 3 / 10
    }
}
