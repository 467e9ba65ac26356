//! Collectives as sans-IO state machines.
//!
//! [`Collectives`] runs any number of ops at once for one member. The caller
//! owns the working buffers (so a trainer's shared memory can be reduced in
//! place); the core only says which elements to send, reduce or copy:
//!
//! * inputs: [`Collectives::start`], [`Collectives::handle_frame`],
//!   [`Collectives::handle_member_down`], [`Collectives::set_epoch`],
//!   [`Collectives::handle_timeout`], each with `now`;
//! * outputs: [`Collectives::poll_action`] until `None`, and
//!   [`Collectives::poll_timeout`] for the next deadline.
//!
//! Actions must be executed in the order they are polled: a `Send` of a range
//! that an earlier `Reduce` touched must carry the reduced values.
//!
//! Algorithms: ring all-reduce (reduce-scatter then all-gather, see
//! [`ring`]), recursive doubling for small tensors ([`doubling`]), chain
//! broadcast ([`chain`]), ring all-gather and reduce-scatter, and a barrier
//! (recursive doubling of an empty tensor). Every range is cut into pieces of
//! at most [`Config::chunk_bytes`] which stream independently, at most
//! [`Config::max_chunks_in_flight`] at a time.

pub mod chain;
pub mod doubling;
mod op;
pub mod ring;
pub mod schedule;

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::time::Duration;

use thiserror::Error;

use crate::wire::{AbortReason, DType, FrameHeader, ReduceOp};
use crate::{Epoch, Incarnation, MemberId, OpId, Step, Time};
use op::OpState;
use schedule::{segment, Plan};

/// What collective an op performs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Every member ends with the reduction of every member's buffer.
    AllReduce(ReduceOp),
    /// Every member ends with the root's buffer.
    Broadcast {
        /// The member whose buffer is sent.
        root: MemberId,
    },
    /// The buffer holds one block of `len` elements per member; each member
    /// fills its own block and ends with all of them.
    AllGather,
    /// Each member ends with the reduction of its own segment of the buffer
    /// (see [`OpSpec::output_range`]).
    ReduceScatter(ReduceOp),
    /// Completes at a member only after every member has started it.
    Barrier,
}

impl Kind {
    /// The reduction, for kinds that reduce.
    pub fn reduce_op(&self) -> Option<ReduceOp> {
        match self {
            Kind::AllReduce(op) | Kind::ReduceScatter(op) => Some(*op),
            _ => None,
        }
    }
}

/// Which all-reduce algorithm to run. Every member of an op must resolve to
/// the same one, so `Auto` depends only on the spec and the group-wide config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Recursive doubling up to [`Config::small_tensor_bytes`], ring above.
    Auto,
    /// Ring (reduce-scatter + all-gather): bandwidth-optimal.
    Ring,
    /// Recursive doubling: latency-optimal.
    RecursiveDoubling,
}

/// Everything every member must agree on to run one op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpSpec {
    /// The op's id, unique within its epoch.
    pub op: OpId,
    /// The epoch it runs in.
    pub epoch: Epoch,
    /// The training step it belongs to.
    pub step: Step,
    /// What it computes.
    pub kind: Kind,
    /// How (all-reduce only; other kinds have one algorithm each).
    pub algorithm: Algorithm,
    /// Element type.
    pub dtype: DType,
    /// Elements per member (for all-gather: per block).
    pub len: usize,
    /// The participants, in ring order. Must be identical at every member.
    pub members: Vec<MemberId>,
}

impl OpSpec {
    /// Length of the working buffer, in elements.
    pub fn buffer_len(&self) -> usize {
        match self.kind {
            Kind::AllGather => self.len * self.members.len(),
            Kind::Barrier => 0,
            _ => self.len,
        }
    }

    /// The part of the working buffer that holds `member`'s input.
    pub fn input_range(&self, member: MemberId) -> Option<Range<usize>> {
        let i = self.members.iter().position(|&m| m == member)?;
        Some(match self.kind {
            Kind::AllGather => i * self.len..(i + 1) * self.len,
            _ => 0..self.buffer_len(),
        })
    }

    /// The part of the working buffer that holds `member`'s result.
    pub fn output_range(&self, member: MemberId) -> Option<Range<usize>> {
        let i = self.members.iter().position(|&m| m == member)?;
        Some(match self.kind {
            Kind::ReduceScatter(_) => segment(self.len, self.members.len(), i),
            _ => 0..self.buffer_len(),
        })
    }

    /// The algorithm this op runs under `config`.
    pub fn resolved_algorithm(&self, config: &Config) -> Algorithm {
        match (self.kind, self.algorithm) {
            (Kind::AllReduce(_), Algorithm::Auto) => {
                if self.len * self.dtype.size_bytes() <= config.small_tensor_bytes {
                    Algorithm::RecursiveDoubling
                } else {
                    Algorithm::Ring
                }
            }
            (Kind::AllReduce(_), chosen) => chosen,
            (Kind::Barrier, _) => Algorithm::RecursiveDoubling,
            _ => Algorithm::Ring,
        }
    }

    fn plan(&self, me: usize, config: &Config) -> Result<Plan, StartError> {
        let n = self.members.len();
        Ok(match self.kind {
            Kind::AllReduce(_) => match self.resolved_algorithm(config) {
                Algorithm::RecursiveDoubling => doubling::all_reduce(self.len, n, me),
                _ => ring::all_reduce(self.len, n, me),
            },
            Kind::Barrier => doubling::all_reduce(0, n, me),
            Kind::ReduceScatter(_) => ring::reduce_scatter(self.len, n, me),
            Kind::AllGather => ring::all_gather(self.len, n, me),
            Kind::Broadcast { root } => {
                let r = self
                    .members
                    .iter()
                    .position(|&m| m == root)
                    .ok_or(StartError::UnknownRoot(root))?;
                chain::broadcast(self.len, n, me, r)
            }
        })
    }
}

/// Bounds and tuning. Fields marked "group-wide" must be equal at every
/// member (the control plane distributes them); the rest are local.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Group-wide: largest piece a range is cut into, in bytes.
    pub chunk_bytes: usize,
    /// Group-wide: all-reduce switches from recursive doubling to ring above this size.
    pub small_tensor_bytes: usize,
    /// Local: pieces of one op in flight at once.
    pub max_chunks_in_flight: u32,
    /// Local: an op not complete this long after its start is aborted.
    pub op_timeout: Duration,
    /// Local: bytes of frames held for ops this member has not started yet.
    pub max_orphan_bytes: usize,
    /// Local: ops in flight at once.
    pub max_ops_in_flight: usize,
    /// Local: largest working buffer of one op, in bytes.
    pub max_tensor_bytes: u64,
    /// Local: members in one op.
    pub max_members: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            chunk_bytes: 512 << 10,
            small_tensor_bytes: 64 << 10,
            max_chunks_in_flight: 16,
            op_timeout: Duration::from_secs(30),
            max_orphan_bytes: 256 << 20,
            max_ops_in_flight: 1024,
            max_tensor_bytes: 4 << 30,
            max_members: 4096,
        }
    }
}

/// An instruction for the shell. Ranges are element indices of the op's
/// working buffer; payloads are raw little-endian elements of the op's dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `header` followed by the elements `range` of the buffer to `to`.
    Send {
        /// The op.
        op: OpId,
        /// The receiving member.
        to: MemberId,
        /// The frame header to send.
        header: FrameHeader,
        /// Elements of the buffer that form the payload.
        range: Range<usize>,
    },
    /// `buffer[range] = reduce(buffer[range], payload)`.
    Reduce {
        /// The op.
        op: OpId,
        /// Elements of the buffer.
        range: Range<usize>,
        /// The element-wise combination (`Mean` arrives here as `Sum`).
        reduce: ReduceOp,
        /// The incoming elements.
        payload: Vec<u8>,
        /// The frame they came in.
        from: FrameHeader,
    },
    /// `buffer[range] = payload`.
    Copy {
        /// The op.
        op: OpId,
        /// Elements of the buffer.
        range: Range<usize>,
        /// The incoming elements.
        payload: Vec<u8>,
        /// The frame they came in.
        from: FrameHeader,
    },
    /// `buffer[range] /= divisor` (the end of a `Mean`).
    Divide {
        /// The op.
        op: OpId,
        /// Elements of the buffer.
        range: Range<usize>,
        /// The number of contributors.
        divisor: u32,
    },
    /// The op finished; the buffer's output range holds the result.
    Complete {
        /// The op.
        op: OpId,
        /// Its epoch.
        epoch: Epoch,
        /// The members whose inputs the result combines.
        contributors: Vec<MemberId>,
    },
    /// The op was abandoned; the buffer's contents are unspecified and the
    /// caller re-runs it from the inputs it kept.
    Aborted {
        /// The op.
        op: OpId,
        /// Its epoch.
        epoch: Epoch,
        /// Why.
        reason: AbortReason,
    },
}

/// Why an op could not start. None of these touch any other op.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StartError {
    /// The op has no members.
    #[error("an op needs at least one member")]
    NoMembers,
    /// This member is not among the op's members.
    #[error("{0} is not a member of this op")]
    NotAMember(MemberId),
    /// A member is listed twice.
    #[error("{0} is listed twice")]
    DuplicateMember(MemberId),
    /// More members than [`Config::max_members`].
    #[error("{count} members exceed the limit of {max}")]
    TooManyMembers {
        /// Members listed.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The broadcast root is not a member.
    #[error("broadcast root {0} is not a member")]
    UnknownRoot(MemberId),
    /// The op's epoch is older than the installed one.
    #[error("epoch {epoch} is older than the installed {installed}")]
    StaleEpoch {
        /// The op's epoch.
        epoch: Epoch,
        /// The installed epoch.
        installed: Epoch,
    },
    /// An op with this id is already in flight.
    #[error("{0} is already in flight")]
    AlreadyRunning(OpId),
    /// The buffer exceeds [`Config::max_tensor_bytes`].
    #[error("buffer of {bytes} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The buffer size.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// [`Config::max_ops_in_flight`] ops are already running.
    #[error("{max} ops already in flight")]
    TooManyOps {
        /// The limit.
        max: usize,
    },
}

/// Why a frame was refused. The shell should answer the sender and, for a
/// violation, close its connection; other members' ops are unaffected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The payload length disagrees with the header.
    #[error("payload is {actual} bytes, header says {expected}")]
    PayloadLength {
        /// Implied by the header.
        expected: u64,
        /// Given.
        actual: u64,
    },
    /// The frame contradicts the op's schedule; the op was aborted.
    #[error("{sender} broke the schedule of {op}: {detail}")]
    Violation {
        /// The sender.
        sender: MemberId,
        /// The op.
        op: OpId,
        /// What was wrong.
        detail: String,
    },
    /// Too many bytes are held for ops not started here yet.
    #[error("{bytes} bytes held for unstarted ops would exceed the limit of {max}")]
    OrphanLimit {
        /// Bytes that would be held.
        bytes: usize,
        /// The limit.
        max: usize,
    },
}

/// Counters for metrics and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Ops completed.
    pub completed: u64,
    /// Ops aborted.
    pub aborted: u64,
    /// Frames dropped because their epoch was superseded.
    pub stale_frames: u64,
    /// Frames held because their op had not started here yet.
    pub orphaned_frames: u64,
}

#[derive(Debug)]
struct Orphan {
    header: FrameHeader,
    payload: Vec<u8>,
    arrived: Time,
}

/// How many finished ops are remembered, to refuse late duplicates.
const FINISHED_MEMORY: usize = 4096;

/// All collectives in flight at one member.
#[derive(Debug)]
pub struct Collectives {
    me: MemberId,
    incarnation: Incarnation,
    config: Config,
    installed: Epoch,
    ops: BTreeMap<OpId, OpState>,
    orphans: BTreeMap<OpId, Vec<Orphan>>,
    orphan_bytes: usize,
    finished: VecDeque<(OpId, Epoch)>,
    actions: VecDeque<Action>,
    stats: Stats,
}

impl Collectives {
    /// A core for member `me` at incarnation 0.
    pub fn new(me: MemberId, config: Config) -> Self {
        Self::with_incarnation(me, Incarnation(0), config)
    }

    /// A core for member `me` in its `incarnation`-th life.
    pub fn with_incarnation(me: MemberId, incarnation: Incarnation, config: Config) -> Self {
        Collectives {
            me,
            incarnation,
            config,
            installed: Epoch(0),
            ops: BTreeMap::new(),
            orphans: BTreeMap::new(),
            orphan_bytes: 0,
            finished: VecDeque::new(),
            actions: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// The member this core runs for.
    pub fn me(&self) -> MemberId {
        self.me
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The installed epoch: frames and ops of older epochs are refused.
    pub fn epoch(&self) -> Epoch {
        self.installed
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Ops in flight.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Whether `op` is in flight.
    pub fn is_running(&self, op: OpId) -> bool {
        self.ops.contains_key(&op)
    }

    /// Starts an op. Frames for it that arrived early are applied now.
    pub fn start(&mut self, now: Time, spec: OpSpec) -> Result<(), StartError> {
        let me = self.validate(&spec)?;
        let plan = spec.plan(me, &self.config)?;
        if spec.epoch > self.installed {
            self.set_epoch(now, spec.epoch);
        }
        let piece_elems = (self.config.chunk_bytes / spec.dtype.size_bytes()).max(1);
        let op_id = spec.op;
        let state = OpState::new(
            spec,
            me,
            plan,
            piece_elems,
            self.config.max_chunks_in_flight,
            now.after(self.config.op_timeout),
            self.incarnation,
        );
        self.ops.insert(op_id, state);
        let op = self.ops.get_mut(&op_id).expect("just inserted");
        op.pump(&mut self.actions);
        let epoch = op.spec.epoch;
        if let Some(early) = self.orphans.remove(&op_id) {
            for o in early {
                self.orphan_bytes -= o.payload.len();
                if o.header.epoch == epoch {
                    if self.ops.contains_key(&op_id) {
                        // A bad early frame aborts the op; the sender is named
                        // in the abort reason, and later early frames are moot.
                        let _ = self.deliver(o.header, o.payload);
                    }
                } else if o.header.epoch > epoch {
                    self.keep_orphan(o);
                } else {
                    self.stats.stale_frames += 1;
                }
            }
        }
        self.finish_if_done(op_id);
        self.check_invariants();
        Ok(())
    }

    fn validate(&self, spec: &OpSpec) -> Result<usize, StartError> {
        if spec.members.is_empty() {
            return Err(StartError::NoMembers);
        }
        if spec.members.len() > self.config.max_members {
            return Err(StartError::TooManyMembers {
                count: spec.members.len(),
                max: self.config.max_members,
            });
        }
        let mut sorted = spec.members.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(StartError::DuplicateMember(w[0]));
        }
        let me = spec
            .members
            .iter()
            .position(|&m| m == self.me)
            .ok_or(StartError::NotAMember(self.me))?;
        if spec.epoch < self.installed {
            return Err(StartError::StaleEpoch {
                epoch: spec.epoch,
                installed: self.installed,
            });
        }
        if self.ops.contains_key(&spec.op) {
            return Err(StartError::AlreadyRunning(spec.op));
        }
        if self.ops.len() >= self.config.max_ops_in_flight {
            return Err(StartError::TooManyOps {
                max: self.config.max_ops_in_flight,
            });
        }
        let bytes = (spec.buffer_len() as u64).saturating_mul(spec.dtype.size_bytes() as u64);
        if bytes > self.config.max_tensor_bytes {
            return Err(StartError::TooLarge {
                bytes,
                max: self.config.max_tensor_bytes,
            });
        }
        Ok(me)
    }

    /// A frame arrived. `payload` is its raw elements.
    pub fn handle_frame(
        &mut self,
        now: Time,
        header: FrameHeader,
        payload: Vec<u8>,
    ) -> Result<(), FrameError> {
        if payload.len() as u64 != header.payload_len() {
            return Err(FrameError::PayloadLength {
                expected: header.payload_len(),
                actual: payload.len() as u64,
            });
        }
        let result = self.route(now, header, payload);
        self.check_invariants();
        result
    }

    fn route(
        &mut self,
        now: Time,
        header: FrameHeader,
        payload: Vec<u8>,
    ) -> Result<(), FrameError> {
        if header.epoch < self.installed {
            self.stats.stale_frames += 1;
            return Ok(());
        }
        match self.ops.get(&header.op).map(|op| op.spec.epoch) {
            Some(epoch) if epoch == header.epoch => self.deliver(header, payload),
            Some(epoch) if header.epoch < epoch => {
                self.stats.stale_frames += 1;
                Ok(())
            }
            _ => {
                if self.finished.contains(&(header.op, header.epoch)) {
                    return Err(FrameError::Violation {
                        sender: header.sender,
                        op: header.op,
                        detail: "frame for an op that already finished".into(),
                    });
                }
                let bytes = self.orphan_bytes + payload.len();
                if bytes > self.config.max_orphan_bytes {
                    return Err(FrameError::OrphanLimit {
                        bytes,
                        max: self.config.max_orphan_bytes,
                    });
                }
                self.stats.orphaned_frames += 1;
                self.keep_orphan(Orphan {
                    header,
                    payload,
                    arrived: now,
                });
                Ok(())
            }
        }
    }

    fn keep_orphan(&mut self, o: Orphan) {
        self.orphan_bytes += o.payload.len();
        self.orphans.entry(o.header.op).or_default().push(o);
    }

    fn deliver(&mut self, header: FrameHeader, payload: Vec<u8>) -> Result<(), FrameError> {
        let op_id = header.op;
        let op = self.ops.get_mut(&op_id).expect("caller checked");
        match op.on_frame(header, payload, &mut self.actions) {
            Ok(()) => {
                self.finish_if_done(op_id);
                Ok(())
            }
            Err(detail) => {
                self.abort(op_id, AbortReason::ProtocolViolation(header.sender));
                Err(FrameError::Violation {
                    sender: header.sender,
                    op: op_id,
                    detail,
                })
            }
        }
    }

    fn finish_if_done(&mut self, op_id: OpId) {
        let Some(op) = self.ops.get(&op_id) else {
            return;
        };
        if !op.is_done() {
            return;
        }
        let op = self.ops.remove(&op_id).expect("present");
        let spec = op.spec;
        if let Some(ReduceOp::Mean) = spec.kind.reduce_op() {
            let range = spec.output_range(self.me).expect("member of its own op");
            self.actions.push_back(Action::Divide {
                op: op_id,
                range,
                divisor: u32::try_from(spec.members.len()).expect("member count fits u32"),
            });
        }
        self.actions.push_back(Action::Complete {
            op: op_id,
            epoch: spec.epoch,
            contributors: spec.members,
        });
        self.stats.completed += 1;
        self.remember_finished(op_id, spec.epoch);
    }

    fn remember_finished(&mut self, op: OpId, epoch: Epoch) {
        if self.finished.len() == FINISHED_MEMORY {
            self.finished.pop_front();
        }
        self.finished.push_back((op, epoch));
    }

    fn abort(&mut self, op_id: OpId, reason: AbortReason) {
        if let Some(op) = self.ops.remove(&op_id) {
            self.actions.push_back(Action::Aborted {
                op: op_id,
                epoch: op.spec.epoch,
                reason,
            });
            self.stats.aborted += 1;
            self.remember_finished(op_id, op.spec.epoch);
        }
    }

    /// `member` was declared down: every op it takes part in is aborted.
    pub fn handle_member_down(&mut self, _now: Time, member: MemberId) {
        let hit: Vec<OpId> = self
            .ops
            .values()
            .filter(|op| op.spec.members.contains(&member))
            .map(|op| op.spec.op)
            .collect();
        for op in hit {
            self.abort(op, AbortReason::MemberDown(member));
        }
        self.check_invariants();
    }

    /// Installs a newer epoch: ops of older epochs are aborted, and their
    /// frames, held or still to come, are dropped. Older epochs are ignored.
    pub fn set_epoch(&mut self, _now: Time, epoch: Epoch) {
        if epoch <= self.installed {
            return;
        }
        self.installed = epoch;
        let old: Vec<OpId> = self
            .ops
            .values()
            .filter(|op| op.spec.epoch < epoch)
            .map(|op| op.spec.op)
            .collect();
        for op in old {
            self.abort(op, AbortReason::EpochChanged(epoch));
        }
        let installed = self.installed;
        self.drop_orphans(|o| o.header.epoch < installed);
        self.check_invariants();
    }

    /// Aborts an op at the caller's request.
    pub fn cancel(&mut self, op: OpId) {
        self.abort(op, AbortReason::Cancelled);
    }

    /// Fires deadlines: ops past their timeout are aborted, and frames held
    /// longer than the op timeout for ops never started here are dropped.
    pub fn handle_timeout(&mut self, now: Time) {
        let late: Vec<OpId> = self
            .ops
            .values()
            .filter(|op| op.deadline <= now)
            .map(|op| op.spec.op)
            .collect();
        for op in late {
            self.abort(op, AbortReason::Timeout);
        }
        let timeout = self.config.op_timeout;
        self.drop_orphans(|o| o.arrived.after(timeout) <= now);
        self.check_invariants();
    }

    fn drop_orphans(&mut self, drop: impl Fn(&Orphan) -> bool) {
        let mut freed = 0;
        self.orphans.retain(|_, list| {
            list.retain(|o| {
                let d = drop(o);
                if d {
                    freed += o.payload.len();
                }
                !d
            });
            !list.is_empty()
        });
        self.orphan_bytes -= freed;
    }

    /// The next time [`Collectives::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Time> {
        let ops = self.ops.values().map(|op| op.deadline);
        let timeout = self.config.op_timeout;
        let orphans = self
            .orphans
            .values()
            .flatten()
            .map(|o| o.arrived.after(timeout));
        ops.chain(orphans).min()
    }

    /// The next action to execute, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn check_invariants(&self) {
        let held: usize = self
            .orphans
            .values()
            .flatten()
            .map(|o| o.payload.len())
            .sum();
        assert_eq!(held, self.orphan_bytes, "orphan byte count drifted");
        for op in self.ops.values() {
            assert!(
                op.spec.epoch >= self.installed,
                "op of a superseded epoch still runs"
            );
            op.check_invariants();
        }
    }
}
