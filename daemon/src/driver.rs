//! The one loop that drives the collective core: inputs (frames from peers,
//! ops from trainers, peers going down, epochs committed by the control
//! plane, timers) go into `Collectives`, and its actions are executed here, in
//! order. The loop never blocks on a peer: outgoing frames go to unbounded
//! per-channel queues (their total is bounded by the core's window), so two
//! daemons sending to each other cannot deadlock.
//!
//! Recovery: an op interrupted by a member's failure is *parked* with the
//! input it was given, not failed. When the control plane commits the next
//! epoch, the members of its ring exchange [`RecoveryReport`]s and finish
//! every parked op as [`Recovery::plans`] decides (re-run among the
//! survivors, or the result one of them already has); the trainer's call
//! then returns normally, naming the members whose inputs the result holds.
//! A parked op with no new epoch within `recovery_timeout` fails with
//! [`OpError::NoQuorum`].

mod steps;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use metrics::{counter, gauge, histogram};
use phalanx_compute::{apply_action, element_range, ComputeEngine};
use phalanx_protocol::collective::{Action, Algorithm, Collectives, Kind, OpSpec};
use phalanx_protocol::local::{LocalKind, StepMeta};
use phalanx_protocol::membership::{
    judge_progress, state_checksum, Decision, DetectorConfig, FailureDetector, KeptResult, Plan,
    Recovery, RecoveryReport,
};
use phalanx_protocol::stragglers::{Coordinator, QuorumPolicy, StragglerRecord};
use phalanx_protocol::wire::ControlMessage;
use phalanx_protocol::wire::{
    encode_frame_header, AbortReason, DType, FrameHeader, ENVELOPE_LEN, FRAME_HEADER_LEN,
};
use phalanx_protocol::{Epoch, MemberId, OpId, Step, Time};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::control::{ControlInput, ControlSender};
use crate::metrics as m;
use crate::shm::Mapping;

/// A byte range of a trainer's shared buffer.
#[derive(Clone, Debug)]
pub struct Region {
    /// The mapping.
    pub map: Arc<Mapping>,
    /// First byte.
    pub offset: usize,
    /// Bytes.
    pub len: usize,
}

impl Region {
    /// # Safety
    /// See [`Mapping::bytes_mut`]: one op per region at a time.
    #[allow(clippy::mut_from_ref)]
    unsafe fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: forwarded; the local plane checked the range is mapped.
        unsafe { &mut self.map.bytes_mut()[self.offset..self.offset + self.len] }
    }
}

/// A collective a trainer asked for.
#[derive(Debug)]
pub struct OpRequest {
    /// The op's id, from the trainer's stream and call count.
    pub op: OpId,
    /// What to compute.
    pub kind: LocalKind,
    /// Element type.
    pub dtype: DType,
    /// Elements per member.
    pub len: usize,
    /// The working buffer.
    pub region: Region,
    /// All-reduce: the samples the input was computed from, if given.
    pub samples: Option<u64>,
}

/// A completed collective.
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

/// Why a collective failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OpError {
    /// The request was invalid.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The op was aborted.
    #[error("aborted: {0}")]
    Aborted(AbortReason),
    /// The daemon is shutting down.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The group could not go on with this member: no new epoch came in time
    /// (this member cannot reach a majority), or the group finished the op
    /// without it.
    #[error("no quorum: {0}")]
    NoQuorum(String),
}

/// Inputs to the driver.
#[derive(Debug)]
pub enum Input {
    /// A frame from an authenticated peer.
    Frame {
        /// The frame header.
        header: FrameHeader,
        /// The payload.
        payload: Vec<u8>,
    },
    /// A trainer's collective.
    Submit {
        /// The request.
        req: OpRequest,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<OpDone, OpError>>,
    },
    /// A heartbeat from a peer.
    Heard {
        /// The peer.
        member: MemberId,
    },
    /// A peer's primary connection is up (again).
    PeerUp {
        /// The peer.
        member: MemberId,
    },
    /// A peer's connection is gone.
    PeerDown {
        /// The peer.
        member: MemberId,
        /// Why.
        reason: String,
    },
    /// The control plane applied a new epoch.
    Group {
        /// The epoch.
        epoch: Epoch,
        /// Its ring.
        ring: Vec<MemberId>,
        /// Whether this daemon, in its current life, is in the ring.
        admitted: bool,
        /// What the trainer is told while this daemon is out of the ring
        /// (removed, or enrolled by `--join` and not admitted yet).
        removed: Option<String>,
        /// The epoch each ring member was (last) admitted in.
        joined_at: BTreeMap<MemberId, Epoch>,
        /// How the epoch's steps close.
        policy: QuorumPolicy,
    },
    /// `StepReady` or `StepCut` from a peer.
    Step {
        /// The peer.
        from: MemberId,
        /// The message.
        msg: ControlMessage,
    },
    /// A trainer joins on `stream`: state goes into `region`.
    Join {
        /// The stream.
        stream: u32,
        /// Element type of the state.
        dtype: DType,
        /// Elements of state.
        len: usize,
        /// Where the state goes.
        region: Region,
        /// Answered when the state has arrived (its op: the stream goes on
        /// after it).
        reply: oneshot::Sender<Result<OpDone, OpError>>,
    },
    /// A live member started handing state to this joining daemon.
    JoinPoint {
        /// The peer it came from (must be `root`).
        from: MemberId,
        /// The stream.
        stream: u32,
        /// The state-sync op.
        op: OpId,
        /// Its epoch.
        epoch: Epoch,
        /// Its root.
        root: MemberId,
        /// Element type.
        dtype: DType,
        /// Elements.
        len: u64,
        /// The state's checksum as the root sends it.
        checksum: u64,
    },
    /// A peer's progress report: per stream, the last op its trainers issued.
    Progress {
        /// The peer.
        from: MemberId,
        /// (stream, last issued seq).
        streams: Vec<(u32, u64)>,
    },
    /// A peer's recovery report.
    Recovery {
        /// The peer it came from.
        from: MemberId,
        /// The report.
        report: RecoveryReport,
    },
    /// A peer learnt at run time: its data queues.
    Peer {
        /// The peer.
        member: MemberId,
        /// Its queues.
        outbox: Outbox,
    },
    /// A peer misses this daemon's recovery report for `epoch`.
    RecoveryAsk {
        /// The peer.
        from: MemberId,
        /// The epoch.
        epoch: Epoch,
    },
}

/// A frame on its way to a peer: envelope and header, then the payload.
#[derive(Debug)]
pub struct OutFrame {
    /// Envelope and frame header.
    pub head: [u8; ENVELOPE_LEN + FRAME_HEADER_LEN],
    /// Raw elements.
    pub payload: Bytes,
}

/// The queues of one peer's channels.
#[derive(Clone, Debug)]
pub struct Outbox {
    /// One queue per channel (QUIC stream).
    pub channels: Vec<mpsc::UnboundedSender<OutFrame>>,
}

/// Where an op's elements live.
#[derive(Debug)]
enum Buf {
    /// The trainer's shared buffer.
    Shared(Region),
    /// The daemon's own (a kept result forwarded to others).
    Owned(Vec<u8>),
}

impl Buf {
    /// # Safety
    /// One op per region at a time (see [`Region::bytes_mut`]).
    unsafe fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            // SAFETY: forwarded.
            Buf::Shared(r) => unsafe { r.bytes_mut() },
            Buf::Owned(v) => v,
        }
    }
}

struct OpCtx {
    op: OpId,
    kind: LocalKind,
    dtype: DType,
    len: usize,
    buf: Buf,
    /// `None` for an op the daemon runs on its own (forwarding a kept result).
    reply: Option<oneshot::Sender<Result<OpDone, OpError>>>,
    started: Instant,
    kind_name: &'static str,
    /// The input, kept for a re-run (empty for the daemon's own ops).
    input: Vec<u8>,
    /// The result names these members instead of the op's ring, and these
    /// as waiting (a kept result forwarded after a failure).
    contributors: Option<Vec<MemberId>>,
    waiting: Option<Vec<MemberId>>,
    /// The ring it runs (or ran) in.
    members: Vec<MemberId>,
    /// A state hand-over to joining members (its root tells them).
    sync: bool,
    /// A joiner's hand-over: the checksum the received state must have.
    expect_checksum: Option<u64>,
    /// All-reduce: the trainer's sample count.
    samples: Option<u64>,
    /// The step's cut, once announced.
    cut: Option<steps::CutMeta>,
    /// Run by the daemon for a trainer that has not submitted the step.
    standin: bool,
    /// What the core runs, when not `kind` (a cut mean runs as a sum of
    /// scaled inputs).
    core_kind: Option<Kind>,
}

struct Parked {
    ctx: OpCtx,
    since: Instant,
    reason: String,
}

struct Waiting {
    req: OpRequest,
    reply: oneshot::Sender<Result<OpDone, OpError>>,
    since: Instant,
}

struct JoinReq {
    dtype: DType,
    len: usize,
    region: Region,
    reply: oneshot::Sender<Result<OpDone, OpError>>,
    since: Instant,
}

#[derive(Clone, Debug)]
struct JoinPointMsg {
    op: OpId,
    epoch: Epoch,
    root: MemberId,
    dtype: DType,
    len: u64,
    checksum: u64,
}

/// The last completed op of a stream: its result may still be needed by a
/// member that did not see it complete.
struct Retained {
    op: OpId,
    contributors: Vec<MemberId>,
    waiting: Vec<MemberId>,
    dtype: DType,
    len: usize,
    output: Vec<u8>,
}

fn stream_of(op: OpId) -> u64 {
    op.0 >> 40
}

fn seq_of(op: OpId) -> u64 {
    op.0 & ((1 << 40) - 1)
}

/// The driver's wiring to the rest of the daemon.
#[derive(Debug)]
pub struct Wiring {
    /// Queues to each peer's data channels.
    pub outboxes: HashMap<MemberId, Outbox>,
    /// Suspicions go to the control plane.
    pub control: mpsc::Sender<ControlInput>,
    /// Control messages (recovery reports) to peers.
    pub peers: ControlSender,
    /// The mesh, to drop the links to a suspected peer.
    pub mesh: Option<Arc<crate::transport::quic::Mesh>>,
    /// Where the step coordinator's attribution goes (`phalanxctl members`).
    pub stragglers: Option<watch::Sender<Vec<StragglerRecord>>>,
}

/// The driver's state.
pub struct Driver {
    core: Collectives,
    engine: Box<dyn ComputeEngine>,
    ring: Vec<MemberId>,
    epoch: Epoch,
    /// This daemon is in the ring in its current life.
    admitted: bool,
    origin: Instant,
    ops: HashMap<OpId, OpCtx>,
    parked: BTreeMap<OpId, Parked>,
    waiting: Vec<Waiting>,
    recovery: Option<Recovery>,
    /// The last epoch whose recovery exchange finished here.
    recovered: Epoch,
    /// This daemon's report for the current epoch, sent again to a peer
    /// that connects (late, or again): a report sent while it was not
    /// connected was dropped.
    report: Option<RecoveryReport>,
    /// When this daemon last asked the members whose reports it misses
    /// (a report can be lost with a connection or to a partition that is
    /// healing on one side first).
    asked_reports: Instant,
    early_reports: BTreeMap<MemberId, RecoveryReport>,
    /// Plans for ops this daemon's trainer has not submitted yet.
    plans: HashMap<OpId, Plan>,
    /// Per stream, the last completed ops' results, oldest first: the
    /// newest always, older ones while a ring member's trainer may still be
    /// waiting for them (a member left out of steps can lag several behind).
    retained: HashMap<u64, std::collections::VecDeque<Retained>>,
    /// The epoch each ring member was last admitted in.
    joined_at: BTreeMap<MemberId, Epoch>,
    /// Why this daemon is out of the ring (None: in it, or starting).
    removed: Option<String>,
    /// Per stream, the epoch of its last state hand-over (absent: the
    /// bootstrap, epoch 1): members admitted later wait for the next
    /// hand-over and take no part before.
    synced: HashMap<u64, Epoch>,
    /// This daemon's trainers joining, per stream.
    joins: HashMap<u64, JoinReq>,
    /// Hand-overs announced before this daemon could take part.
    join_points: HashMap<u64, JoinPointMsg>,
    recovery_timeout: std::time::Duration,
    wiring: Wiring,
    /// Peers whose connection is down or who are suspected, since when: an
    /// op that needs one fails with `NoQuorum` if no epoch without it comes
    /// within `recovery_timeout` (this member is cut off from a majority).
    down: BTreeMap<MemberId, Instant>,
    /// Heartbeat-based suspicion: a peer that is connected but silent (hung,
    /// SIGSTOPped, partitioned) is suspected long before QUIC's idle timeout.
    detector: FailureDetector,
    heartbeat_interval: std::time::Duration,
    /// The progress signal: per stream, the last op this daemon's trainers
    /// issued; what each peer reported of theirs; peers already reported
    /// stuck (until they move).
    issued: BTreeMap<u32, u64>,
    peer_progress: BTreeMap<MemberId, BTreeMap<u32, u64>>,
    stuck: std::collections::BTreeSet<MemberId>,
    stuck_after: std::time::Duration,
    next_progress: Instant,
    /// Until when peers are not judged (see `judge_peers`); set at the
    /// first admission of this daemon's life.
    grace_until: Option<Instant>,
    ever_admitted: bool,
    /// The epoch's quorum policy.
    policy: QuorumPolicy,
    /// Cut-path ops submitted here that wait for their step's cut.
    cutting: HashMap<OpId, OpCtx>,
    /// Per stream, the step coordinator (used while this member is the
    /// lowest of the stream's step ring).
    coordinators: HashMap<u64, Coordinator>,
    /// Open steps this member coordinates.
    step_info: HashMap<OpId, steps::StepInfo>,
    /// Step messages for an epoch this daemon has not entered yet.
    early_steps: Vec<(MemberId, ControlMessage)>,
    /// Results of steps run for the trainer before it asked (stood in for).
    delivered: BTreeMap<OpId, (Vec<u8>, OpDone)>,
    /// Trainer calls waiting for a stand-in's result.
    late: HashMap<OpId, Waiting>,
    /// Per stream, the last step whose cut was announced.
    closed_upto: HashMap<u64, u64>,
    /// The coordinator's attribution as last announced.
    records: Vec<StragglerRecord>,
    /// Per stream, this trainer's last late input and its step
    /// (`late=fold`: added to its input of the next step, if it contributes
    /// to that one).
    folded: HashMap<u64, (u64, Vec<u8>)>,
}

/// How long after its first admission a daemon waits before it judges
/// peers by their heartbeats.
const STARTUP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("me", &self.core.me())
            .field("epoch", &self.epoch)
            .field("in_flight", &self.ops.len())
            .field("parked", &self.parked.len())
            .finish()
    }
}

fn kind_of(kind: LocalKind) -> (Kind, &'static str) {
    match kind {
        LocalKind::AllReduce(op) => (Kind::AllReduce(op), "all_reduce"),
        LocalKind::Broadcast(root) => (Kind::Broadcast { root }, "broadcast"),
        LocalKind::AllGather => (Kind::AllGather, "all_gather"),
        LocalKind::ReduceScatter(op) => (Kind::ReduceScatter(op), "reduce_scatter"),
        LocalKind::Barrier => (Kind::Barrier, "barrier"),
        // Resolved to a broadcast from its root before it runs.
        LocalKind::StateSync => (Kind::Barrier, "state_sync"),
    }
}

impl Driver {
    /// A driver that waits for its first epoch from the control plane.
    pub fn new(
        core: Collectives,
        engine: Box<dyn ComputeEngine>,
        wiring: Wiring,
        detector: DetectorConfig,
        recovery_timeout: std::time::Duration,
        stuck_after: std::time::Duration,
    ) -> Driver {
        Driver {
            // Peers are watched from their first connection on (PeerUp).
            detector: FailureDetector::new(detector, [], Time::ZERO),
            heartbeat_interval: detector.heartbeat_interval,
            core,
            engine,
            ring: Vec::new(),
            epoch: Epoch(0),
            admitted: false,
            origin: Instant::now(),
            ops: HashMap::new(),
            parked: BTreeMap::new(),
            waiting: Vec::new(),
            recovery: None,
            recovered: Epoch(0),
            report: None,
            asked_reports: Instant::now(),
            early_reports: BTreeMap::new(),
            plans: HashMap::new(),
            retained: HashMap::new(),
            joined_at: BTreeMap::new(),
            removed: None,
            synced: HashMap::new(),
            joins: HashMap::new(),
            join_points: HashMap::new(),
            recovery_timeout,
            wiring,
            down: BTreeMap::new(),
            issued: BTreeMap::new(),
            peer_progress: BTreeMap::new(),
            stuck: Default::default(),
            stuck_after,
            next_progress: Instant::now(),
            grace_until: None,
            ever_admitted: false,
            policy: QuorumPolicy::SYNC,
            cutting: HashMap::new(),
            coordinators: HashMap::new(),
            step_info: HashMap::new(),
            early_steps: Vec::new(),
            delivered: BTreeMap::new(),
            late: HashMap::new(),
            closed_upto: HashMap::new(),
            records: Vec::new(),
            folded: HashMap::new(),
        }
    }

    fn now(&self) -> Time {
        Time(self.origin.elapsed().as_micros() as u64)
    }

    fn me(&self) -> MemberId {
        self.core.me()
    }

    /// `at` on the core's clock.
    fn time_at(&self, at: Instant) -> Time {
        Time(at.saturating_duration_since(self.origin).as_micros() as u64)
    }

    /// The earliest time a parked or waiting op gives up.
    fn recovery_deadline(&self) -> Option<Time> {
        let oldest = self
            .parked
            .values()
            .map(|p| p.since)
            .chain(self.waiting.iter().map(|w| w.since))
            .min()?;
        let at = oldest + self.recovery_timeout;
        Some(self.time_at(at))
    }

    /// When the longest-gone member has been gone `recovery_timeout`.
    fn gone_deadline(&self) -> Option<Time> {
        // Past deadlines were acted on (later ops are checked on the next
        // wake-up, and heartbeats wake the loop every interval).
        let at = self
            .down
            .values()
            .map(|&since| since + self.recovery_timeout)
            .filter(|&at| at > Instant::now())
            .min()?;
        Some(self.time_at(at))
    }

    /// The earliest time a join gives up.
    fn join_deadline(&self) -> Option<Time> {
        let oldest = self.joins.values().map(|j| j.since).min()?;
        let at = oldest + self.core.config().op_timeout;
        Some(self.time_at(at))
    }

    /// Runs until `shutdown` turns true or every input sender is gone; then
    /// fails the ops in flight with [`OpError::ShuttingDown`].
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Input>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let next = [
                self.core.poll_timeout(),
                self.detector.next_deadline(),
                self.recovery_deadline(),
                self.join_deadline(),
                self.gone_deadline().filter(|_| !self.ops.is_empty()),
                Some(self.time_at(self.next_progress)),
                self.recovery
                    .as_ref()
                    .map(|_| self.time_at(self.asked_reports + self.heartbeat_interval * 2)),
                self.coordinator_deadline(),
            ]
            .into_iter()
            .flatten()
            .min();
            let deadline = next.map(|t| {
                tokio::time::Instant::from_std(self.origin + std::time::Duration::from_micros(t.0))
            });
            tokio::select! {
                msg = input.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    let now = self.now();
                    self.core.handle_timeout(now);
                }
                _ = shutdown.changed() => break,
            }
            if let Some(due) = next {
                let late = self.now().since(due);
                if late > self.heartbeat_interval {
                    // Whatever woke us, we are this far past a deadline: this
                    // daemon was not running (starved or stopped), so the
                    // silence it saw is its own, not its peers'.
                    debug!(
                        late_ms = late.as_millis() as u64,
                        "daemon was paused; giving peers a fresh window"
                    );
                    self.detector.excuse(self.now());
                }
            }
            self.judge_peers();
            self.report_progress();
            self.ask_reports();
            self.poll_coordinators();
            self.execute();
            self.expire_parked();
        }
        for (_, ctx) in self.ops.drain().chain(self.cutting.drain()) {
            if let Some(reply) = ctx.reply {
                let _ = reply.send(Err(OpError::ShuttingDown));
            }
        }
        for (_, w) in self.late.drain() {
            let _ = w.reply.send(Err(OpError::ShuttingDown));
        }
        for (_, p) in std::mem::take(&mut self.parked) {
            if let Some(reply) = p.ctx.reply {
                let _ = reply.send(Err(OpError::ShuttingDown));
            }
        }
        for w in self.waiting.drain(..) {
            let _ = w.reply.send(Err(OpError::ShuttingDown));
        }
        for (_, j) in self.joins.drain() {
            let _ = j.reply.send(Err(OpError::ShuttingDown));
        }
        gauge!(m::OPS_IN_FLIGHT).set(0.0);
    }

    fn suspect(&self, member: MemberId, reason: String) {
        if self.ring.contains(&member) {
            let _ = self
                .wiring
                .control
                .try_send(ControlInput::Suspect { member, reason });
        }
    }

    /// While the recovery exchange waits, asks the members whose reports are
    /// missing again every two heartbeat intervals (they answer from
    /// `Input::RecoveryAsk`); a member that stays silent is suspected by the
    /// detector and the next epoch drops it.
    fn ask_reports(&mut self) {
        let Some(rec) = &self.recovery else {
            return;
        };
        if self.asked_reports.elapsed() < self.heartbeat_interval * 2 {
            return;
        }
        self.asked_reports = Instant::now();
        let epoch = rec.epoch();
        for peer in rec.missing() {
            info!(%peer, %epoch, "recovery report missing: asking for it again");
            self.wiring
                .peers
                .send(peer, ControlMessage::RecoveryAsk { epoch });
        }
    }

    /// Sends this daemon's progress to the ring every few heartbeats, and
    /// suspects members whose trainers are behind an op waited on too long.
    fn report_progress(&mut self) {
        if Instant::now() >= self.next_progress {
            self.next_progress = Instant::now() + self.heartbeat_interval * 5;
            let streams: Vec<(u32, u64)> = self.issued.iter().map(|(&s, &q)| (s, q)).collect();
            for &peer in &self.ring {
                if peer != self.me() {
                    self.wiring.peers.send(
                        peer,
                        ControlMessage::Progress {
                            streams: streams.clone(),
                        },
                    );
                }
            }
        }
        if !self.admitted {
            return;
        }
        let now = self.now();
        let waiting: Vec<(OpId, Vec<MemberId>, Time)> = self
            .ops
            .values()
            .chain(self.cutting.values())
            .filter(|ctx| ctx.reply.is_some())
            .map(|ctx| (ctx.op, ctx.members.clone(), self.time_at(ctx.started)))
            .collect();
        for stuck in judge_progress(&waiting, &self.peer_progress, self.stuck_after, now) {
            if stuck.member == self.me() || !self.stuck.insert(stuck.member) {
                continue;
            }
            warn!(peer = %stuck.member, reason = %stuck, "peer suspected: alive but stuck");
            counter!(m::SUSPICIONS, "reason" => "stuck").increment(1);
            self.suspect(stuck.member, stuck.to_string());
            self.core.handle_member_down(now, stuck.member);
        }
    }

    /// Acts on the failure detector's new decisions. Not before this daemon
    /// is in the ring: while the group forms (daemons starting, logs being
    /// created and synced) silence says little, and a daemon out of the ring
    /// may not remove anyone anyway; admission gives every peer a fresh
    /// window.
    fn judge_peers(&mut self) {
        if !self.admitted {
            return;
        }
        let now = self.now();
        // Start-up grace: while a new group forms, every daemon creates and
        // syncs its log at once and a busy machine misses heartbeats; the
        // first judgement comes STARTUP_GRACE after this daemon's first
        // admission, with a fresh window for everyone.
        match self.grace_until {
            Some(until) if Instant::now() < until => return,
            Some(_) => {
                self.grace_until = None;
                self.detector.excuse(now);
            }
            None => {}
        }
        for decision in self.detector.poll(now) {
            match decision {
                Decision::Suspect { member, reason } => {
                    self.down.entry(member).or_insert_with(Instant::now);
                    warn!(peer = %member, %reason, "peer suspected: parking its ops until the next epoch");
                    counter!(m::SUSPICIONS, "reason" => "silent").increment(1);
                    self.suspect(member, reason.to_string());
                    self.core.handle_member_down(now, member);
                    if let Some(mesh) = &self.wiring.mesh {
                        mesh.reset(member);
                    }
                }
                Decision::Cleared { member } => {
                    info!(peer = %member, "suspected peer heard from again");
                    self.down.remove(&member);
                    let _ = self
                        .wiring
                        .control
                        .try_send(ControlInput::Cleared { member });
                }
            }
        }
    }

    fn handle(&mut self, msg: Input) {
        let now = self.now();
        match msg {
            Input::Frame { header, payload } => {
                let bytes = payload.len() as u64;
                counter!(m::BYTES_RECEIVED, "peer" => header.sender.to_string()).increment(bytes);
                if let Err(e) = self.core.handle_frame(now, header, payload) {
                    warn!(peer = %header.sender, op = %header.op, error = %e, "frame refused");
                }
            }
            Input::Submit { req, reply } => {
                let (stream, seq) = (stream_of(req.op) as u32, seq_of(req.op));
                let e = self.issued.entry(stream).or_insert(0);
                *e = (*e).max(seq);
                self.submit(req, reply, Instant::now())
            }
            Input::Progress { from, streams } => {
                let moved =
                    self.peer_progress.get(&from) != Some(&streams.iter().copied().collect());
                if moved {
                    self.stuck.remove(&from);
                }
                self.peer_progress
                    .insert(from, streams.into_iter().collect());
            }
            Input::Heard { member } => {
                // A peer is judged from its first heartbeat on: a daemon
                // still starting up (or a link still forming) is not silent.
                if self.detector.watches(member) {
                    self.detector.heard(member, now);
                } else {
                    self.detector.watch(member, now);
                }
            }
            Input::PeerUp { member } => {
                self.down.remove(&member);
                if self.detector.watches(member) {
                    // Reconnected: a fresh window, as after any sign of life.
                    self.detector.watch(member, now);
                }
                let _ = self
                    .wiring
                    .control
                    .try_send(ControlInput::Cleared { member });
                if let Some(report) = &self.report {
                    if self.ring.contains(&member) {
                        self.wiring
                            .peers
                            .send(member, ControlMessage::Recovery(report.clone()));
                    }
                }
            }
            Input::PeerDown { member, reason } => {
                // Not a suspicion by itself: the link may be redialled (after
                // a reset, or a heal) and frames not yet written wait for the
                // next connection. The detector keeps watching: a peer that
                // stays silent is suspected with the reason, as any other.
                warn!(peer = %member, %reason, "peer connection lost; reconnecting");
                self.down.entry(member).or_insert_with(Instant::now);
            }
            Input::Group {
                epoch,
                ring,
                admitted,
                removed,
                joined_at,
                policy,
            } => {
                self.joined_at = joined_at;
                if policy != self.policy && epoch > self.epoch {
                    info!(%epoch, from = %self.policy, to = %policy, "quorum policy changed");
                    self.policy = policy;
                }
                self.install(epoch, ring, admitted, removed);
            }
            Input::Step { from, msg } => self.on_step(from, msg),
            Input::Join {
                stream,
                dtype,
                len,
                region,
                reply,
            } => {
                info!(
                    stream,
                    "trainer joining: asking to be in the ring and for the state"
                );
                let _ = self.wiring.control.try_send(ControlInput::WantIn);
                let stream = u64::from(stream);
                if self.admitted && !self.pending(stream).contains(&self.me()) {
                    // The group counts this member's trainer as holding the
                    // stream's state, but it asks for it (its call failed
                    // after the group went on, say): no live trainer hands
                    // state to a member that is not waiting for it, so this
                    // daemon leaves the ring and is readmitted as a joiner.
                    warn!(
                        stream,
                        "trainer joining while this member is in the ring: leaving it to be readmitted with the group's state"
                    );
                    self.suspect(
                        self.me(),
                        "its trainer asked to join again (it lost the group's state)".into(),
                    );
                }
                if let Some(old) = self.joins.insert(
                    stream,
                    JoinReq {
                        dtype,
                        len,
                        region,
                        reply,
                        since: Instant::now(),
                    },
                ) {
                    let _ = old.reply.send(Err(OpError::Rejected(
                        "superseded by a newer join on the same stream".into(),
                    )));
                }
                self.try_joins();
            }
            Input::JoinPoint {
                from,
                stream,
                op,
                epoch,
                root,
                dtype,
                len,
                checksum,
            } => {
                if from != root {
                    warn!(peer = %from, %root, "join point from a member that is not its root: ignored");
                    return;
                }
                self.join_points.insert(
                    u64::from(stream),
                    JoinPointMsg {
                        op,
                        epoch,
                        root,
                        dtype,
                        len,
                        checksum,
                    },
                );
                self.try_joins();
            }
            Input::Peer { member, outbox } => {
                self.wiring.outboxes.entry(member).or_insert(outbox);
            }
            Input::RecoveryAsk { from, epoch } => match &self.report {
                Some(report) if report.epoch == epoch => {
                    debug!(peer = %from, %epoch, "recovery report asked for: sending it again");
                    self.wiring
                        .peers
                        .send(from, ControlMessage::Recovery(report.clone()));
                }
                // Not there yet: this daemon sends its report when it
                // installs that epoch. Past it: the asker catches up.
                _ => debug!(peer = %from, %epoch, "recovery report asked for another epoch"),
            },
            Input::Recovery { from, report } => {
                if report.member != from {
                    warn!(peer = %from, claimed = %report.member, "recovery report for another member: ignored");
                    return;
                }
                match self.recovery.as_mut() {
                    Some(rec) if rec.epoch() == report.epoch => {
                        if let Err(e) = rec.add(report) {
                            debug!(peer = %from, error = %e, "recovery report ignored");
                        }
                        self.finish_recovery();
                    }
                    // For an epoch this daemon has not entered yet (not
                    // installed, or installed before it was admitted).
                    _ if report.epoch > self.recovered => {
                        self.early_reports.insert(from, report);
                    }
                    _ => debug!(peer = %from, epoch = %report.epoch, "stale recovery report"),
                }
            }
        }
    }

    /// Installs a newer epoch: ops of older ones are aborted (and parked by
    /// `execute`), then the recovery exchange starts.
    fn install(
        &mut self,
        epoch: Epoch,
        ring: Vec<MemberId>,
        admitted: bool,
        removed: Option<String>,
    ) {
        if epoch <= self.epoch && admitted == self.admitted && removed == self.removed {
            return;
        }
        let now = self.now();
        info!(%epoch, ?ring, admitted, parked = self.parked.len(), in_flight = self.ops.len(), "epoch installed");
        if admitted && !self.admitted {
            // Back in the ring (or first in it): what this daemon heard of
            // its peers while it was out says nothing about them now.
            self.detector.excuse(now);
            if !self.ever_admitted {
                self.ever_admitted = true;
                self.grace_until = Some(Instant::now() + STARTUP_GRACE);
            }
        }
        for &m in ring.iter().filter(|m| !self.ring.contains(m)) {
            // Newly (re)admitted: judge it from now on, not by the silence
            // it had while it was out.
            if m != self.me() {
                self.detector.watch(m, now);
            }
        }
        self.epoch = epoch;
        self.down.retain(|m, _| ring.contains(m));
        self.ring = ring;
        self.admitted = admitted;
        self.removed = removed;
        self.core.set_epoch(now, epoch);
        self.execute();
        self.new_epoch_steps();
        if let Some(why) = self.removed.clone() {
            warn!(%epoch, reason = %why, "out of the ring: failing this member's ops");
            for (_, p) in std::mem::take(&mut self.parked) {
                fail(p.ctx, OpError::NoQuorum(why.clone()));
            }
            for w in self
                .waiting
                .drain(..)
                .chain(self.late.drain().map(|(_, w)| w))
            {
                let _ = w.reply.send(Err(OpError::NoQuorum(why.clone())));
            }
            self.delivered.clear();
            // Results kept from before do not belong to the group's history
            // any more: a rejoin starts from the live trainers' state.
            self.retained.clear();
            self.synced.clear();
        }
        self.plans.clear();
        self.recovery = None;
        self.report = None;
        if !admitted && !self.joins.is_empty() {
            // Out of the ring again (removed just after its admission, say,
            // while it was still starting up) with a trainer waiting in
            // join(): ask to be readmitted again.
            let _ = self.wiring.control.try_send(ControlInput::WantIn);
        }
        if !admitted {
            // Out of the ring (removed, or restarted and not yet readmitted):
            // parked ops wait for the epoch that readmits this daemon.
            return;
        }
        let report = RecoveryReport {
            epoch,
            member: self.me(),
            parked: self
                .parked
                .iter()
                .map(|(&op, p)| (op, p.ctx.members.clone()))
                .collect(),
            completed: self
                .retained
                .values()
                .flatten()
                .map(|r| KeptResult {
                    op: r.op,
                    contributors: r.contributors.clone(),
                    waiting: r.waiting.clone(),
                })
                .collect(),
        };
        self.asked_reports = Instant::now();
        let mut rec = Recovery::new(epoch, self.ring.clone());
        rec.add(report.clone()).expect("own report");
        self.report = Some(report.clone());
        for &peer in &self.ring {
            if peer != self.me() {
                self.wiring
                    .peers
                    .send(peer, ControlMessage::Recovery(report.clone()));
            }
        }
        let early = std::mem::take(&mut self.early_reports);
        for (from, r) in early {
            if r.epoch == epoch {
                let _ = rec.add(r);
            } else if r.epoch > epoch {
                self.early_reports.insert(from, r);
            }
        }
        self.recovery = Some(rec);
        self.finish_recovery();
    }

    /// Once every member of the ring has reported: finishes parked ops,
    /// forwards kept results, then lets waiting submissions run.
    fn finish_recovery(&mut self) {
        let Some(rec) = self.recovery.as_ref() else {
            return;
        };
        if !rec.is_complete() {
            debug!(epoch = %rec.epoch(), missing = ?rec.missing(), "waiting for recovery reports");
            return;
        }
        let plans = rec.plans();
        self.recovered = rec.epoch();
        self.recovery = None;
        let me = self.me();
        for (op, plan) in plans {
            if let Some(p) = self.parked.remove(&op) {
                counter!(m::RERUNS, "plan" => plan_name(&plan)).increment(1);
                info!(%op, ?plan, "finishing an interrupted op in the new epoch");
                self.resume(p.ctx, &plan);
            } else if let Plan::FromResult {
                holder, members, ..
            } = &plan
            {
                if members.contains(&me) {
                    self.forward_result(op, *holder, members.clone());
                }
            } else if let Plan::Rerun { members } = &plan {
                if members.contains(&me) {
                    self.plans.insert(op, plan);
                }
            }
        }
        for w in std::mem::take(&mut self.waiting) {
            self.submit(w.req, w.reply, w.since);
        }
        self.try_joins();
        self.replay_early_steps();
    }

    /// Members admitted after `stream` last agreed on its state: they take
    /// part only from the next hand-over (`StateSync`) on. Every live member
    /// computes the same set: it depends on the epoch's records and on the
    /// stream's agreed history only. Until a first hand-over, the group's
    /// bootstrap (epoch 1) is that agreement: every member admitted later
    /// came in through a trainer's `join()`, however early the stream's
    /// first op ran (the epoch of that op says nothing about who holds
    /// state: a joiner admitted before it is still waiting for state).
    fn pending(&self, stream: u64) -> Vec<MemberId> {
        let synced = self.synced.get(&stream).copied().unwrap_or(Epoch(1));
        self.ring
            .iter()
            .copied()
            .filter(|m| self.joined_at.get(m).is_some_and(|&at| at > synced))
            .collect()
    }

    /// Starts the hand-over op of every join whose announcement is here and
    /// current; drops announcements of older epochs (a re-run announces again).
    fn try_joins(&mut self) {
        if !self.admitted || self.recovery.is_some() {
            return;
        }
        let streams: Vec<u64> = self.join_points.keys().copied().collect();
        for stream in streams {
            let jp = self.join_points[&stream].clone();
            if jp.epoch < self.epoch {
                self.join_points.remove(&stream);
                continue;
            }
            if jp.epoch > self.epoch {
                continue;
            }
            let Some(req) = self.joins.remove(&stream) else {
                continue;
            };
            self.join_points.remove(&stream);
            if req.dtype != jp.dtype || req.len as u64 != jp.len {
                let _ = req.reply.send(Err(OpError::Rejected(format!(
                    "the live trainers hand over {} elements of {:?}, this trainer expects {} of {:?}",
                    jp.len, jp.dtype, req.len, req.dtype
                ))));
                continue;
            }
            info!(op = %jp.op, root = %jp.root, "receiving the trainers' state");
            let ctx = OpCtx {
                op: jp.op,
                kind: LocalKind::Broadcast(jp.root),
                dtype: req.dtype,
                len: req.len,
                buf: Buf::Shared(req.region),
                reply: Some(req.reply),
                started: req.since,
                kind_name: "state_sync",
                input: Vec::new(),
                contributors: None,
                waiting: None,
                members: self.ring.clone(),
                sync: true,
                expect_checksum: Some(jp.checksum),
                samples: None,
                cut: None,
                standin: false,
                core_kind: None,
            };
            self.start(ctx);
        }
    }

    /// Restarts a parked op as `plan` says.
    fn resume(&mut self, mut ctx: OpCtx, plan: &Plan) {
        let me = self.me();
        match plan {
            Plan::Rerun { .. } if ctx.standin => self.recut(ctx),
            Plan::Rerun { members }
                if members.contains(&me) && self.cut_applies(ctx.kind, ctx.samples) =>
            {
                self.recut(ctx)
            }
            Plan::Rerun { members } if members.contains(&me) => {
                // Run directly, as every member does under this epoch's
                // policy (a cut step of a `sync` epoch runs plain again).
                ctx.cut = None;
                ctx.core_kind = None;
                if let Kind::Broadcast { root } = kind_of(ctx.kind).0 {
                    if !members.contains(&root) {
                        return fail(ctx, OpError::Aborted(AbortReason::MemberDown(root)));
                    }
                }
                // SAFETY: this op owns its buffer until it ends.
                let bytes = unsafe { ctx.buf.bytes_mut() };
                // (A joiner's hand-over keeps no input: it only receives.)
                if ctx.input.len() == bytes.len() {
                    bytes.copy_from_slice(&ctx.input);
                }
                ctx.members = members.clone();
                self.start(ctx);
            }
            Plan::FromResult {
                holder,
                members,
                contributors,
                waiting,
            } if members.contains(&me) => {
                ctx.kind = LocalKind::Broadcast(*holder);
                // (A cut step's reduction is over: the kept result stands.)
                ctx.core_kind = None;
                ctx.members = members.clone();
                ctx.contributors = Some(contributors.clone());
                ctx.waiting = Some(waiting.clone());
                self.start(ctx);
            }
            _ if ctx.standin => {
                // A step this daemon ran for its lagging trainer, whose
                // result nobody holds any more: the trainer cannot catch
                // up, so this member leaves the ring and its trainer,
                // told so, rejoins with the group's state.
                warn!(op = %ctx.op, "the result of a step this member's trainer still needs is gone: leaving the ring to rejoin");
                if let Some(w) = self.late.remove(&ctx.op) {
                    self.waiting.push(w);
                }
                self.suspect(
                    self.me(),
                    format!(
                        "its trainer is behind step {}, whose result the group no longer holds",
                        ctx.op
                    ),
                );
            }
            Plan::Superseded { later } => fail(
                ctx,
                OpError::NoQuorum(format!(
                    "the group went on without this member (it finished {later}); \
                     the trainer must join again to get the current state"
                )),
            ),
            _ => fail(
                ctx,
                OpError::NoQuorum("the new epoch's ring runs this op without this member".into()),
            ),
        }
    }

    /// Takes part in broadcasting a result this daemon kept.
    fn forward_result(&mut self, op: OpId, holder: MemberId, members: Vec<MemberId>) {
        let Some(kept) = self
            .retained
            .get(&stream_of(op))
            .and_then(|k| k.iter().find(|r| r.op == op))
        else {
            warn!(%op, "asked to forward a result this daemon no longer holds");
            return;
        };
        let ctx = OpCtx {
            op,
            kind: LocalKind::Broadcast(holder),
            dtype: kept.dtype,
            len: kept.len,
            buf: Buf::Owned(kept.output.clone()),
            reply: None,
            started: Instant::now(),
            kind_name: "broadcast",
            input: Vec::new(),
            contributors: None,
            waiting: None,
            members,
            sync: false,
            expect_checksum: None,
            samples: None,
            cut: None,
            standin: false,
            core_kind: None,
        };
        self.start(ctx);
    }

    fn submit(
        &mut self,
        req: OpRequest,
        reply: oneshot::Sender<Result<OpDone, OpError>>,
        since: Instant,
    ) {
        if let Some(why) = &self.removed {
            let _ = reply.send(Err(OpError::NoQuorum(why.clone())));
            return;
        }
        if !self.admitted || self.recovery.is_some() {
            self.waiting.push(Waiting { req, reply, since });
            return;
        }
        // A step this daemon stood in for is served from that, whatever the
        // epoch's policy is now.
        if self.takes_cut_path(&req) || self.stood_in(req.op) {
            return self.submit_cut(Waiting { req, reply, since });
        }
        let stream = stream_of(req.op);
        let pending = self.pending(stream);
        let sync = req.kind == LocalKind::StateSync;
        let mut local_kind = req.kind;
        if sync {
            let Some(&root) = self.ring.iter().find(|m| !pending.contains(m)) else {
                let _ = reply.send(Err(OpError::Rejected("no member holds the state".into())));
                return;
            };
            local_kind = LocalKind::Broadcast(root);
        }
        let (kind, kind_name) = kind_of(local_kind);
        let plan = self.plans.remove(&req.op);
        let members = match &plan {
            Some(Plan::Rerun { members }) => members.clone(),
            // A hand-over includes the members waiting for it; every other
            // op runs without them until then.
            _ if sync => self.ring.clone(),
            _ => self
                .ring
                .iter()
                .copied()
                .filter(|m| !pending.contains(m))
                .collect(),
        };
        let probe = OpSpec {
            op: req.op,
            epoch: self.epoch,
            step: Step(seq_of(req.op)),
            kind,
            algorithm: Algorithm::Auto,
            dtype: req.dtype,
            len: req.len,
            members: members.clone(),
        };
        let need = probe.buffer_len() * probe.dtype.size_bytes();
        if req.region.len != need {
            let _ = reply.send(Err(OpError::Rejected(format!(
                "buffer holds {} bytes, the op needs {need} (the group has {} members)",
                req.region.len,
                members.len()
            ))));
            return;
        }
        let mut buf = Buf::Shared(req.region);
        // SAFETY: this op owns the region from now until it ends.
        let input = unsafe { buf.bytes_mut() }.to_vec();
        let ctx = OpCtx {
            op: req.op,
            kind: local_kind,
            dtype: req.dtype,
            len: req.len,
            buf,
            reply: Some(reply),
            started: since,
            kind_name,
            input,
            contributors: None,
            waiting: None,
            members,
            sync,
            expect_checksum: None,
            samples: None,
            cut: None,
            standin: false,
            core_kind: None,
        };
        // A member that is down or suspected is not waited for here: it
        // may be reconnecting (its frames wait in its queue), and if it is
        // gone the control plane removes it and the op is finished in that
        // epoch.
        self.start(ctx);
    }

    fn start(&mut self, mut ctx: OpCtx) {
        let now = self.now();
        let spec = OpSpec {
            op: ctx.op,
            epoch: self.epoch,
            step: Step(seq_of(ctx.op)),
            kind: ctx.core_kind.unwrap_or(kind_of(ctx.kind).0),
            algorithm: Algorithm::Auto,
            dtype: ctx.dtype,
            len: ctx.len,
            members: ctx.members.clone(),
        };
        let need = spec.buffer_len() * spec.dtype.size_bytes();
        let have = match &ctx.buf {
            Buf::Shared(r) => r.len,
            Buf::Owned(v) => v.len(),
        };
        if have != need {
            return fail(
                ctx,
                OpError::Rejected(format!(
                    "the group changed to {} members while this op ran and its output size \
                     changed ({have} bytes given, {need} needed); issue it again",
                    spec.members.len()
                )),
            );
        }
        if let Err(e) = self.core.start(now, spec) {
            return fail(ctx, OpError::Rejected(e.to_string()));
        }
        debug!(op = %ctx.op, kind = ctx.kind_name, bytes = need, epoch = %self.epoch, "op started");
        if let (true, LocalKind::Broadcast(root)) = (ctx.sync, ctx.kind) {
            if root == self.me() {
                // SAFETY: the op owns its buffer; the broadcast has not
                // touched the root's copy yet.
                let checksum = state_checksum(unsafe { ctx.buf.bytes_mut() });
                let pending = self.pending(stream_of(ctx.op));
                for &j in ctx.members.iter().filter(|m| pending.contains(m)) {
                    info!(joiner = %j, op = %ctx.op, "handing the trainers' state to a joining member");
                    self.wiring.peers.send(
                        j,
                        ControlMessage::JoinPoint {
                            stream: stream_of(ctx.op) as u32,
                            op: ctx.op,
                            epoch: self.epoch,
                            root,
                            dtype: ctx.dtype,
                            len: ctx.len as u64,
                            checksum,
                        },
                    );
                }
            }
        }
        self.ops.insert(ctx.op, ctx);
        gauge!(m::OPS_IN_FLIGHT).set(self.ops.len() as f64);
    }

    fn park(&mut self, ctx: OpCtx, reason: String) {
        if ctx.reply.is_none() && !ctx.standin {
            return; // the daemon's own forwarding op: the next recovery redoes it
        }
        debug!(op = %ctx.op, %reason, "op parked until the next epoch");
        self.parked.insert(
            ctx.op,
            Parked {
                // The wait for the next epoch starts now, not when the op
                // was submitted.
                since: Instant::now(),
                ctx,
                reason,
            },
        );
    }

    /// Fails parked and waiting ops that saw no new epoch in time, and
    /// running ops that wait for a member gone that long.
    fn expire_parked(&mut self) {
        let limit = self.recovery_timeout;
        let gone: Vec<MemberId> = self
            .down
            .iter()
            .filter(|(_, since)| since.elapsed() >= limit)
            .map(|(&m, _)| m)
            .collect();
        if !gone.is_empty() {
            let stuck: Vec<OpId> = self
                .ops
                .iter()
                .filter(|(_, ctx)| ctx.members.iter().any(|m| gone.contains(m)))
                .map(|(&op, _)| op)
                .collect();
            for op in stuck {
                let ctx = self.ops.remove(&op).expect("listed");
                self.core.cancel(op);
                warn!(%op, ?gone, "members gone and no new epoch in time: failing the op");
                counter!(m::OPS, "outcome" => "no_quorum").increment(1);
                fail(
                    ctx,
                    OpError::NoQuorum(format!(
                        "members {gone:?} are unreachable and no epoch without them was committed \
                         within {limit:?} (epoch {}): this member cannot reach a majority of the group",
                        self.epoch
                    )),
                );
            }
        }
        let expired: Vec<OpId> = self
            .parked
            .iter()
            .filter(|(_, p)| p.since.elapsed() >= limit)
            .map(|(&op, _)| op)
            .collect();
        for op in expired {
            let p = self.parked.remove(&op).expect("listed");
            warn!(%op, reason = %p.reason, "no new epoch in time: failing the op");
            counter!(m::OPS, "outcome" => "no_quorum").increment(1);
            let msg = format!(
                "{} and no new epoch was committed within {:?} (epoch {}, this member {}): \
                 this member cannot reach a majority of the group",
                p.reason,
                limit,
                self.epoch,
                if self.admitted {
                    "in the ring"
                } else {
                    "out of the ring"
                }
            );
            fail(p.ctx, OpError::NoQuorum(msg));
        }
        let join_limit = self.core.config().op_timeout;
        let stale: Vec<u64> = self
            .joins
            .iter()
            .filter(|(_, j)| j.since.elapsed() >= join_limit)
            .map(|(&s, _)| s)
            .collect();
        for stream in stale {
            let j = self.joins.remove(&stream).expect("listed");
            let _ = j.reply.send(Err(OpError::NoQuorum(format!(
                "no live trainer handed over its state within {join_limit:?} (epoch {}, this member {}): \
                 the live trainers must call admit() when a result says members are waiting",
                self.epoch,
                if self.admitted { "in the ring" } else { "not readmitted" }
            ))));
        }
        let (old, keep): (Vec<Waiting>, Vec<Waiting>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| w.since.elapsed() >= limit);
        self.waiting = keep;
        for w in old {
            counter!(m::OPS, "outcome" => "no_quorum").increment(1);
            let _ = w.reply.send(Err(OpError::NoQuorum(format!(
                "this member has not been in the group's ring for {limit:?} (epoch {}): \
                 it cannot reach a majority, or is waiting to be readmitted",
                self.epoch
            ))));
        }
    }

    fn execute(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Send {
                    op,
                    to,
                    header,
                    range,
                } => {
                    let Some(ctx) = self.ops.get_mut(&op) else {
                        continue;
                    };
                    // SAFETY: one op per region; this op owns it until it ends.
                    let bytes = unsafe { ctx.buf.bytes_mut() };
                    let payload = Bytes::copy_from_slice(&bytes[element_range(ctx.dtype, &range)]);
                    counter!(m::BYTES_SENT, "peer" => to.to_string())
                        .increment(payload.len() as u64);
                    match self.wiring.outboxes.get(&to) {
                        Some(out) => {
                            let ch = header.chunk as usize % out.channels.len();
                            let frame = OutFrame {
                                head: encode_frame_header(&header),
                                payload,
                            };
                            if out.channels[ch].send(frame).is_err() {
                                warn!(peer = %to, "channel closed; frame dropped");
                            }
                        }
                        None => warn!(peer = %to, "no outbox for peer"),
                    }
                }
                Action::Complete {
                    op,
                    epoch,
                    contributors,
                } => {
                    if let Some(mut ctx) = self.ops.remove(&op) {
                        if ctx.reply.is_none() && !ctx.standin {
                            debug!(%op, "kept result forwarded");
                            continue;
                        }
                        if ctx.reply.is_some() {
                            histogram!(m::OP_SECONDS, "kind" => ctx.kind_name)
                                .record(ctx.started.elapsed().as_secs_f64());
                            counter!(m::OPS, "outcome" => "completed").increment(1);
                        }
                        let contributors = ctx
                            .contributors
                            .take()
                            .or_else(|| steps_contributors(&ctx.cut))
                            .unwrap_or(contributors);
                        let stream = stream_of(op);
                        if ctx.sync {
                            self.synced.insert(stream, epoch);
                            self.joins.remove(&stream);
                        }
                        let waiting = ctx.waiting.take().unwrap_or_else(|| self.pending(stream));
                        // SAFETY: the op still owns its buffer here.
                        let output = unsafe { ctx.buf.bytes_mut() }.to_vec();
                        if let Some(want) = ctx.expect_checksum {
                            let got = state_checksum(&output);
                            if got != want {
                                warn!(%op, want, got, "received state fails its checksum");
                                if let Some(reply) = ctx.reply.take() {
                                    let _ = reply.send(Err(OpError::Rejected(format!(
                                        "the state received fails its checksum ({got:#x}, the root sent {want:#x}); join again"
                                    ))));
                                }
                                continue;
                            }
                            info!(%op, bytes = output.len(), "received state verified");
                        }
                        // A stand-in's result also waits for its trainer.
                        let for_trainer = ctx.standin.then(|| output.clone());
                        self.keep_result(
                            stream,
                            Retained {
                                op,
                                contributors: contributors.clone(),
                                waiting: waiting.clone(),
                                dtype: ctx.dtype,
                                len: ctx.len,
                                output,
                            },
                        );
                        let done = OpDone {
                            op,
                            epoch,
                            contributors,
                            waiting,
                            meta: self.step_meta(op, &ctx.cut),
                        };
                        match (ctx.reply.take(), for_trainer) {
                            (Some(reply), _) => {
                                let _ = reply.send(Ok(done));
                            }
                            (None, Some(output)) => self.keep_for_trainer(output, done),
                            (None, None) => {}
                        }
                    }
                }
                Action::Aborted { op, reason, .. } => {
                    if let Some(ctx) = self.ops.remove(&op) {
                        match reason {
                            AbortReason::MemberDown(_) | AbortReason::EpochChanged(_) => {
                                counter!(m::OPS, "outcome" => "interrupted").increment(1);
                                self.park(ctx, format!("interrupted: {reason}"));
                            }
                            _ => {
                                warn!(%op, %reason, "op aborted");
                                counter!(m::OPS, "outcome" => "aborted").increment(1);
                                fail(ctx, OpError::Aborted(reason));
                            }
                        }
                    }
                }
                Action::Reduce { op, .. } | Action::Copy { op, .. } | Action::Divide { op, .. } => {
                    let Some(ctx) = self.ops.get_mut(&op) else {
                        continue;
                    };
                    // SAFETY: as above.
                    let bytes = unsafe { ctx.buf.bytes_mut() };
                    if let Err(e) = apply_action(self.engine.as_ref(), ctx.dtype, bytes, &action) {
                        warn!(%op, error = %e, "applying a received piece failed");
                    }
                }
            }
        }
        gauge!(m::OPS_IN_FLIGHT).set(self.ops.len() as f64);
        gauge!(m::OPS_PARKED).set(self.parked.len() as f64);
    }
}

/// Results kept per stream at most (older ones are dropped even if a
/// member still lags that far: it then rejoins with the group's state).
const KEPT_RESULTS: usize = 16;

impl Driver {
    /// Keeps a completed op's result for the recovery exchange; drops the
    /// ones every ring member's trainer has moved past (by their progress
    /// reports: a trainer that issued op `s` has the results before it).
    fn keep_result(&mut self, stream: u64, r: Retained) {
        let members: Vec<MemberId> = self.ring.clone();
        let me = self.me();
        let issued = |m: &MemberId| -> u64 {
            if *m == me {
                return self.issued.get(&(stream as u32)).copied().unwrap_or(0);
            }
            self.peer_progress
                .get(m)
                .and_then(|p| p.get(&(stream as u32)))
                .copied()
                .unwrap_or(0)
        };
        let oldest_needed = members.iter().map(issued).min().unwrap_or(0);
        let kept = self.retained.entry(stream).or_default();
        kept.retain(|k| k.op != r.op);
        kept.push_back(r);
        while kept.len() > 1 && (kept.len() > KEPT_RESULTS || seq_of(kept[0].op) < oldest_needed) {
            kept.pop_front();
        }
    }
}

fn fail(ctx: OpCtx, err: OpError) {
    if let Some(reply) = ctx.reply {
        let _ = reply.send(Err(err));
    }
}

/// A cut step's contributors.
fn steps_contributors(cut: &Option<steps::CutMeta>) -> Option<Vec<MemberId>> {
    cut.as_ref()
        .map(|c| c.participants.iter().map(|(m, _)| *m).collect())
}

fn plan_name(plan: &Plan) -> &'static str {
    match plan {
        Plan::Rerun { .. } => "rerun",
        Plan::FromResult { .. } => "kept_result",
        Plan::Superseded { .. } => "superseded",
    }
}
