//! The data path of one daemon as a sans-IO state machine: [`Node`].
//!
//! A node owns every decision a daemon makes about its trainers' ops: the
//! op lifecycle (in the collective core), recovery across epochs (park,
//! report, ask, finish as the plans say, give up), joins and state
//! hand-over, retained results, the cut path of steps closed by a quorum
//! policy (readiness, the coordinator, stand-ins, late and folded inputs),
//! and the judging of peers (heartbeats, progress, start-up grace, this
//! daemon's own pauses). It reads no clock and does no IO: the shell calls
//! `handle_*` with `now`, then executes [`Node::poll_action`] until `None`
//! (sending frames and messages, answering trainers, telling the control
//! plane), observes [`Node::poll_event`] (metrics), and calls
//! [`Node::handle_timeout`] at [`Node::poll_timeout`].
//!
//! ```
//! use phalanx_protocol::local::LocalKind;
//! use phalanx_protocol::membership::GroupState;
//! use phalanx_protocol::node::{
//!     Action, Arithmetic, GroupChange, Node, NodeConfig, Request, RequestId,
//! };
//! use phalanx_protocol::wire::{DType, ReduceOp};
//! use phalanx_protocol::{Incarnation, MemberId, OpId, Time};
//!
//! #[derive(Debug)]
//! struct NoArithmetic; // a group of one never combines anything
//! impl Arithmetic for NoArithmetic {
//!     fn reduce(&self, _: DType, _: ReduceOp, _: &mut [u8], _: &[u8]) -> Result<(), String> {
//!         unreachable!()
//!     }
//!     fn scale(&self, _: DType, _: &mut [u8], _: f32) -> Result<(), String> {
//!         unreachable!()
//!     }
//! }
//!
//! let me = MemberId(1);
//! let mut node: Node<Vec<u8>> =
//!     Node::new(me, Incarnation(1), NodeConfig::default(), Box::new(NoArithmetic), Time::ZERO);
//! // The control plane committed a group of one, with this daemon in it.
//! let mut group = GroupState::bootstrap([(me, "node1".into(), "127.0.0.1:1".into())]);
//! group.members.get_mut(&me).unwrap().incarnation = Incarnation(1);
//! node.handle_group(Time(1), GroupChange::of(&group, me, Incarnation(1)));
//! node.handle_submit(Time(2), Request {
//!     id: RequestId(7),
//!     op: OpId::new(0, 1),
//!     kind: LocalKind::AllReduce(ReduceOp::Sum),
//!     dtype: DType::F32,
//!     len: 2,
//!     samples: None,
//!     buffer: [1.5f32, 2.5].iter().flat_map(|x| x.to_le_bytes()).collect(),
//! });
//! let mut answered = false;
//! while let Some(action) = node.poll_action() {
//!     if let Action::Reply { id, outcome, .. } = action {
//!         assert_eq!(id, RequestId(7));
//!         assert_eq!(outcome.unwrap().contributors, vec![me]);
//!         answered = true;
//!     }
//! }
//! assert!(answered);
//! ```

mod doubt;
mod epoch;
mod expiry;
mod joins;
mod liveness;
mod mode;
mod op;
mod retained;
mod returns;
mod steps;
mod submit;
#[cfg(test)]
mod tests;
mod types;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use tracing::warn;

pub use mode::{Judging, Mode};
pub use steps::neutral;
pub use types::{
    Action, Arithmetic, AttributionConfig, Buffer, ControlRequest, Event, GroupChange, JoinRequest,
    NodeConfig, OpDone, OpError, Outcome, Request, RequestId,
};

use crate::collective::Collectives;
use crate::membership::{FailureDetector, Plan, RecoveryReport};
use crate::stragglers::QuorumPolicy;
use crate::wire::{FrameHeader, NodeMessage};
use crate::{Epoch, Incarnation, MemberId, OpId, Time};
use doubt::Doubt;
use epoch::Overdue;
use joins::{JoinPoint, Joiner, Offer};
use op::{Parked, Queued, Running};
use retained::Retained;
use returns::Returning;
use steps::Steps;

/// One daemon's data path. `B` is the memory trainers hand their tensors
/// in (shared memory in the daemon, vectors in the simulators).
#[derive(Debug)]
pub struct Node<B> {
    me: MemberId,
    config: NodeConfig,
    core: Collectives,
    arith: Box<dyn Arithmetic>,
    /// The latest `now` handed in.
    now: Time,
    /// The deadline the last [`Node::poll_timeout`] gave: waking far past
    /// it means this daemon was not running.
    wake_at: Option<Time>,

    // The group, as the control plane last applied it.
    epoch: Epoch,
    ring: Vec<MemberId>,
    joined_at: BTreeMap<MemberId, Epoch>,
    policy: QuorumPolicy,
    mode: Mode,
    judging: Judging,

    // Recovery.
    /// The last epoch whose recovery exchange finished here.
    recovered: Epoch,
    /// This daemon's report for the current epoch, sent again to a peer
    /// that connects (late, or again): one sent while it was not connected
    /// was dropped.
    report: Option<RecoveryReport>,
    /// When this daemon last asked for the reports it misses.
    asked_reports: Time,
    /// When this daemon sent its own report for the current epoch.
    reported_at: Time,
    /// Peers whose report for the current epoch is overdue, and what was
    /// done about it so far (see [`NodeConfig::report_overdue`]).
    overdue: BTreeMap<MemberId, Overdue>,
    early_reports: BTreeMap<MemberId, RecoveryReport>,
    /// Plans for ops this daemon's trainer has not submitted yet.
    plans: BTreeMap<OpId, Plan>,

    // Ops.
    ops: BTreeMap<OpId, Running<B>>,
    parked: BTreeMap<OpId, Parked<B>>,
    /// Trainer requests waiting for this daemon to be in a running ring.
    waiting: Vec<Queued<B>>,
    /// Per stream, the last completed ops' results, oldest first: the
    /// newest always, older ones while a ring member's trainer may still be
    /// waiting for them (a member left out of steps can lag several behind).
    retained: BTreeMap<u32, VecDeque<Retained>>,
    /// Members that left the ring lately, since when: results are kept for
    /// them a while, in case they come back in lockstep.
    away: BTreeMap<MemberId, Time>,
    /// Removed while its trainer was in lockstep: on its way back with the
    /// trainer's history (see [`Node::start_return`]).
    returning: Option<Returning>,
    /// Per stream, the members that came back with their trainers' history
    /// and the admission it holds for: they hold the stream's state.
    returned: BTreeMap<u32, BTreeMap<MemberId, Epoch>>,
    /// Ops whose results come to this daemon from a member that holds
    /// them, for a trainer that returned (served as it asks).
    catch_up: BTreeSet<OpId>,
    /// Per stream, the last op answered to the trainer, and when.
    answered: BTreeMap<u32, (u64, Time)>,
    /// After a pause as long as the peers' suspicion bound: results are
    /// withheld from the trainer until the epoch is confirmed (see
    /// [`Node::doubt_after`]).
    doubt: Option<Doubt<B>>,
    /// Confirmations asked for so far.
    confirms: u64,

    // Joins.
    /// Per stream, the epoch of its last state hand-over (absent: the
    /// bootstrap, epoch 1): members admitted later wait for the next
    /// hand-over and take no part before.
    synced: BTreeMap<u32, Epoch>,
    /// This daemon's trainers joining, per stream.
    joins: BTreeMap<u32, Joiner<B>>,
    /// Hand-overs announced before this daemon could take part.
    join_points: BTreeMap<u32, JoinPoint>,
    /// Per stream, a hand-over announced to this daemon for an epoch it had
    /// left by the time it came (see [`Node::check_missed_hand_overs`]).
    missed: BTreeMap<u32, OpId>,
    /// Per stream, the states the ring's joining trainers offer while no
    /// member holds the stream's state (see [`Node::offer_states`]).
    offers: BTreeMap<u32, BTreeMap<MemberId, Offer>>,
    /// Per stream, the epoch this daemon's trainer's state was offered in.
    offered: BTreeMap<u32, Epoch>,

    // Liveness.
    detector: FailureDetector,
    /// Peers whose connection is down or who are suspected, since when: an
    /// op that needs one fails with `NoQuorum` if no epoch without it comes
    /// within the recovery timeout (this member is cut off from a majority).
    down: BTreeMap<MemberId, Time>,
    /// Peers heard from (a heartbeat, or every link up) and not lost since.
    connected: BTreeSet<MemberId>,
    /// Peers that sent a heartbeat in this life: during the start-up grace
    /// only they are judged (see [`Judging::Grace`]).
    heard_from: BTreeSet<MemberId>,
    /// A trainer waits to be let in: asked for once this daemon is
    /// connected to every member of the ring (see [`Node::ask_in`]).
    want_in: bool,
    /// Per stream, the last op this daemon's trainers issued.
    issued: BTreeMap<u32, u64>,
    /// What each peer reported of its trainers'.
    peer_progress: BTreeMap<MemberId, BTreeMap<u32, u64>>,
    /// Peers already reported stuck (until they move).
    stuck: BTreeSet<MemberId>,
    next_progress: Time,

    steps: Steps<B>,

    actions: VecDeque<Action<B>>,
    events: VecDeque<Event>,
}

impl<B: Buffer> Node<B> {
    /// A node for member `me` in its `incarnation`-th life, waiting for its
    /// first epoch from the control plane.
    pub fn new(
        me: MemberId,
        incarnation: Incarnation,
        config: NodeConfig,
        arith: Box<dyn Arithmetic>,
        now: Time,
    ) -> Node<B> {
        Node {
            me,
            core: Collectives::with_incarnation(me, incarnation, config.collectives.clone()),
            // Peers are watched from their first heartbeat on.
            detector: FailureDetector::new(config.detector, [], now),
            config,
            arith,
            now,
            wake_at: None,
            epoch: Epoch(0),
            ring: Vec::new(),
            joined_at: BTreeMap::new(),
            policy: QuorumPolicy::SYNC,
            mode: Mode::Outside,
            judging: Judging::NotYet,
            connected: BTreeSet::new(),
            heard_from: BTreeSet::new(),
            want_in: false,
            recovered: Epoch(0),
            report: None,
            asked_reports: now,
            reported_at: now,
            overdue: BTreeMap::new(),
            early_reports: BTreeMap::new(),
            plans: BTreeMap::new(),
            ops: BTreeMap::new(),
            parked: BTreeMap::new(),
            waiting: Vec::new(),
            retained: BTreeMap::new(),
            away: BTreeMap::new(),
            returning: None,
            returned: BTreeMap::new(),
            catch_up: BTreeSet::new(),
            answered: BTreeMap::new(),
            doubt: None,
            confirms: 0,
            synced: BTreeMap::new(),
            joins: BTreeMap::new(),
            join_points: BTreeMap::new(),
            missed: BTreeMap::new(),
            offers: BTreeMap::new(),
            offered: BTreeMap::new(),
            down: BTreeMap::new(),
            issued: BTreeMap::new(),
            peer_progress: BTreeMap::new(),
            stuck: BTreeSet::new(),
            next_progress: now,
            steps: Steps::default(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// This member.
    pub fn me(&self) -> MemberId {
        self.me
    }

    /// The installed epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The installed epoch's ring.
    pub fn ring(&self) -> &[MemberId] {
        &self.ring
    }

    /// Where this daemon stands with the ring.
    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Ops running in the collective core.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Ops parked until the next epoch.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// The bounds it runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// A tensor frame from an authenticated peer.
    pub fn handle_frame(&mut self, now: Time, header: FrameHeader, payload: Vec<u8>) {
        self.enter(now);
        if let Err(e) = self.core.handle_frame(now, header, payload) {
            warn!(peer = %header.sender, op = %header.op, error = %e, "frame refused");
        }
        self.after_input();
    }

    /// A message from a peer's node.
    pub fn handle_message(&mut self, now: Time, from: MemberId, msg: NodeMessage) {
        self.enter(now);
        match msg {
            NodeMessage::Recovery(report) => self.on_recovery(from, report),
            NodeMessage::RecoveryAsk { epoch } => self.on_recovery_ask(from, epoch),
            NodeMessage::Progress { streams } => self.on_progress(from, streams),
            msg @ (NodeMessage::StepReady { .. }
            | NodeMessage::StepCut { .. }
            | NodeMessage::StepLate { .. }) => self.on_step(from, msg),
            NodeMessage::JoinPoint {
                stream,
                op,
                epoch,
                root,
                dtype,
                len,
                checksum,
                members,
            } => {
                let jp = JoinPoint {
                    op,
                    epoch,
                    root,
                    dtype,
                    len,
                    checksum,
                    members,
                };
                self.on_join_point(from, stream, jp)
            }
            NodeMessage::StateOffer {
                stream,
                epoch,
                holds,
                seen,
                checksum,
                dtype,
                len,
            } => {
                let offer = Offer {
                    epoch,
                    holds,
                    seen,
                    checksum,
                    dtype,
                    len,
                };
                self.on_state_offer(from, stream, offer)
            }
        }
        self.after_input();
    }

    /// The deadline [`Node::poll_timeout`] gave has come (or any time).
    pub fn handle_timeout(&mut self, now: Time) {
        self.enter(now);
        self.core.handle_timeout(now);
        self.after_input();
    }

    /// Fails everything the trainers wait for with
    /// [`OpError::ShuttingDown`]; the node takes no more input.
    pub fn shutdown(&mut self) {
        let ops = std::mem::take(&mut self.ops);
        let cutting = std::mem::take(&mut self.steps.cutting);
        let parked = std::mem::take(&mut self.parked)
            .into_values()
            .map(|p| p.run);
        for run in ops.into_values().chain(cutting.into_values()).chain(parked) {
            self.fail(run, OpError::ShuttingDown);
        }
        let late = std::mem::take(&mut self.steps.late).into_values();
        let waiting = std::mem::take(&mut self.waiting);
        for q in late.chain(waiting) {
            self.reply(q.req.id, q.req.buffer, Err(OpError::ShuttingDown));
        }
        for (_, j) in std::mem::take(&mut self.joins) {
            self.reply(j.caller.id, j.caller.buffer, Err(OpError::ShuttingDown));
        }
        for w in self.doubt.take().map(|d| d.held).unwrap_or_default() {
            let (id, buffer) = match w {
                doubt::Withheld::Completed { run, .. } => match run.into_caller() {
                    Some(c) => (c.id, c.buffer),
                    None => continue,
                },
                doubt::Withheld::Served { q, .. } => (q.req.id, q.req.buffer),
            };
            self.reply(id, buffer, Err(OpError::ShuttingDown));
        }
    }

    /// The next thing the shell must do, in order.
    pub fn poll_action(&mut self) -> Option<Action<B>> {
        self.actions.pop_front()
    }

    /// The next thing the shell may observe.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Node::handle_timeout`] has work next.
    pub fn poll_timeout(&mut self) -> Option<Time> {
        let judging = match self.judging {
            _ if !self.mode.admitted() => None,
            Judging::Grace { until } => self.detector.next_deadline().map(|d| d.min(until)),
            Judging::NotYet | Judging::On => self.detector.next_deadline(),
        };
        let asking = match self.mode {
            Mode::Recovering(_) => Some(self.asked_reports.after(self.config.ask_interval())),
            _ => None,
        };
        let next = [
            self.core.poll_timeout(),
            judging,
            self.expiry_deadline(),
            Some(self.next_progress),
            asking,
            self.coordinator_deadline(),
            self.confirm_deadline(),
        ]
        .into_iter()
        .flatten()
        .min();
        self.wake_at = next;
        next
    }

    fn enter(&mut self, now: Time) {
        // The shell's clock never goes back; a late-delivered input must
        // not move the node's.
        let gap = now.since(self.now);
        self.now = self.now.max(now);
        self.check_paused();
        self.doubt_after(gap);
    }

    /// What every input is followed by: judging peers, progress, asks,
    /// deadlines, the core's actions, giving up.
    fn after_input(&mut self) {
        self.judge_peers();
        self.ask_confirm();
        self.ask_in_when_connected();
        self.report_progress();
        self.ask_reports();
        self.poll_coordinators();
        self.drain_core();
        if std::mem::take(&mut self.steps.replay) {
            self.replay_early_steps();
            self.drain_core();
        }
        self.expire();
        self.check_invariants();
    }

    /// Safety checks after every transition, kept in release builds: the
    /// states this node can be in, and the ones it must never be in.
    fn check_invariants(&self) {
        assert_eq!(
            self.ops.len(),
            self.core.in_flight(),
            "the node's ops and the core's disagree"
        );
        for (op, run) in &self.ops {
            assert!(self.core.is_running(*op), "{op} is not running in the core");
            assert!(
                run.members.contains(&self.me),
                "{op} runs without this member"
            );
            assert!(!self.parked.contains_key(op) && !self.steps.cutting.contains_key(op));
        }
        if self.epoch > Epoch(0) {
            assert_eq!(self.core.epoch(), self.epoch, "the core runs another epoch");
        }
        if self.mode.admitted() {
            assert!(self.ring.contains(&self.me), "admitted but not in the ring");
        }
        if let Mode::Recovering(rec) = &self.mode {
            assert_eq!(rec.epoch(), self.epoch, "recovering another epoch");
        }
        if !self.mode.is_active() {
            assert!(
                self.steps.cutting.is_empty(),
                "a step waits to be cut while not running"
            );
        }
        if let Mode::Removed { .. } = self.mode {
            assert!(
                self.parked.is_empty()
                    && (self.waiting.is_empty() || self.returning.is_some())
                    && self.steps.late.is_empty(),
                "a removed member holds trainer ops"
            );
            assert!(self.retained.is_empty(), "a removed member keeps results");
            assert!(self.doubt.is_none(), "a removed member withholds results");
        }
        assert!(self.stood_in_ahead() <= self.config.max_kept_ahead);
        for kept in self.retained.values() {
            let bound = self
                .config
                .kept_results
                .max(self.config.return_kept_results);
            assert!(!kept.is_empty() && kept.len() <= bound.max(1));
        }
    }
}
