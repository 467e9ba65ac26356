//! The one loop that drives the collective core: inputs (frames from peers,
//! ops from trainers, peers going down, timers) go into `Collectives`, and its
//! actions are executed here, in order. The loop never blocks on a peer:
//! outgoing frames go to unbounded per-channel queues (their total is bounded
//! by the core's window), so two daemons sending to each other cannot
//! deadlock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use metrics::{counter, gauge, histogram};
use phalanx_compute::{apply_action, element_range, ComputeEngine};
use phalanx_protocol::collective::{Action, Algorithm, Collectives, Kind, OpSpec};
use phalanx_protocol::local::LocalKind;
use phalanx_protocol::membership::{Decision, DetectorConfig, FailureDetector};
use phalanx_protocol::wire::{
    encode_frame_header, AbortReason, DType, FrameHeader, ENVELOPE_LEN, FRAME_HEADER_LEN,
};
use phalanx_protocol::{Epoch, MemberId, OpId, Step, Time};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

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

struct OpCtx {
    req: OpRequest,
    reply: oneshot::Sender<Result<OpDone, OpError>>,
    started: Instant,
    kind: &'static str,
}

/// The driver's state.
pub struct Driver {
    core: Collectives,
    engine: Box<dyn ComputeEngine>,
    ring: Vec<MemberId>,
    epoch: Epoch,
    origin: Instant,
    ops: HashMap<OpId, OpCtx>,
    outboxes: HashMap<MemberId, Outbox>,
    /// Peers whose connection is down; an op that needs one fails at once
    /// instead of waiting for its timeout.
    down: std::collections::BTreeSet<MemberId>,
    /// Heartbeat-based suspicion: a peer that is connected but silent (hung,
    /// SIGSTOPped, partitioned) is suspected long before QUIC's idle timeout.
    detector: FailureDetector,
    heartbeat_interval: std::time::Duration,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("me", &self.core.me())
            .field("in_flight", &self.ops.len())
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
    }
}

impl Driver {
    /// A driver for the static group `ring` at epoch 1.
    pub fn new(
        core: Collectives,
        engine: Box<dyn ComputeEngine>,
        ring: Vec<MemberId>,
        outboxes: HashMap<MemberId, Outbox>,
        detector: DetectorConfig,
    ) -> Driver {
        Driver {
            // Peers are watched from their first connection on (PeerUp).
            detector: FailureDetector::new(detector, [], Time::ZERO),
            heartbeat_interval: detector.heartbeat_interval,
            core,
            engine,
            ring,
            epoch: Epoch(1),
            origin: Instant::now(),
            ops: HashMap::new(),
            outboxes,
            down: std::collections::BTreeSet::new(),
        }
    }

    fn now(&self) -> Time {
        Time(self.origin.elapsed().as_micros() as u64)
    }

    /// Runs until `shutdown` turns true or every input sender is gone; then
    /// fails the ops in flight with [`OpError::ShuttingDown`].
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Input>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let next = [self.core.poll_timeout(), self.detector.next_deadline()]
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
            self.execute();
        }
        for (_, ctx) in self.ops.drain() {
            let _ = ctx.reply.send(Err(OpError::ShuttingDown));
        }
        gauge!(m::OPS_IN_FLIGHT).set(0.0);
    }

    /// Acts on the failure detector's new decisions.
    fn judge_peers(&mut self) {
        let now = self.now();
        for decision in self.detector.poll(now) {
            match decision {
                Decision::Suspect { member, reason } => {
                    warn!(peer = %member, %reason, "peer suspected: failing its ops");
                    counter!(m::SUSPICIONS, "reason" => "silent").increment(1);
                    self.core.handle_member_down(now, member);
                }
                Decision::Cleared { member } => {
                    info!(peer = %member, "suspected peer heard from again")
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
            Input::Submit { req, reply } => self.submit(now, req, reply),
            Input::Heard { member } => self.detector.heard(member, now),
            Input::PeerUp { member } => {
                self.down.remove(&member);
                self.detector.watch(member, now);
            }
            Input::PeerDown { member, reason } => {
                warn!(peer = %member, %reason, "peer down: aborting its ops");
                self.down.insert(member);
                self.detector.unwatch(member);
                self.core.handle_member_down(now, member);
            }
        }
    }

    fn submit(
        &mut self,
        now: Time,
        req: OpRequest,
        reply: oneshot::Sender<Result<OpDone, OpError>>,
    ) {
        let op = req.op;
        let (kind, kind_name) = kind_of(req.kind);
        let spec = OpSpec {
            op,
            epoch: self.epoch,
            step: Step(op.0 & ((1 << 40) - 1)),
            kind,
            algorithm: Algorithm::Auto,
            dtype: req.dtype,
            len: req.len,
            members: self.ring.clone(),
        };
        let need = spec.buffer_len() * spec.dtype.size_bytes();
        if req.region.len != need {
            let _ = reply.send(Err(OpError::Rejected(format!(
                "buffer holds {} bytes, the op needs {need}",
                req.region.len
            ))));
            return;
        }
        let unavailable = self
            .down
            .iter()
            .copied()
            .chain(
                self.ring
                    .iter()
                    .copied()
                    .filter(|&m| self.detector.is_suspected(m)),
            )
            .next();
        if let Some(down) = unavailable {
            let _ = reply.send(Err(OpError::Aborted(AbortReason::MemberDown(down))));
            return;
        }
        if let Err(e) = self.core.start(now, spec) {
            let _ = reply.send(Err(OpError::Rejected(e.to_string())));
            return;
        }
        debug!(%op, kind = kind_name, bytes = need, "op started");
        self.ops.insert(
            op,
            OpCtx {
                req,
                reply,
                started: Instant::now(),
                kind: kind_name,
            },
        );
        gauge!(m::OPS_IN_FLIGHT).set(self.ops.len() as f64);
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
                    let Some(ctx) = self.ops.get(&op) else {
                        continue;
                    };
                    // SAFETY: one op per region; this op owns it until it ends.
                    let bytes = unsafe { ctx.req.region.bytes_mut() };
                    let payload =
                        Bytes::copy_from_slice(&bytes[element_range(ctx.req.dtype, &range)]);
                    counter!(m::BYTES_SENT, "peer" => to.to_string())
                        .increment(payload.len() as u64);
                    match self.outboxes.get(&to) {
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
                    if let Some(ctx) = self.ops.remove(&op) {
                        histogram!(m::OP_SECONDS, "kind" => ctx.kind)
                            .record(ctx.started.elapsed().as_secs_f64());
                        counter!(m::OPS, "outcome" => "completed").increment(1);
                        let _ = ctx.reply.send(Ok(OpDone {
                            op,
                            epoch,
                            contributors,
                        }));
                    }
                }
                Action::Aborted { op, reason, .. } => {
                    if let Some(ctx) = self.ops.remove(&op) {
                        warn!(%op, %reason, "op aborted");
                        counter!(m::OPS, "outcome" => "aborted").increment(1);
                        let _ = ctx.reply.send(Err(OpError::Aborted(reason)));
                    }
                }
                Action::Reduce { op, .. } | Action::Copy { op, .. } | Action::Divide { op, .. } => {
                    let Some(ctx) = self.ops.get(&op) else {
                        continue;
                    };
                    // SAFETY: as above.
                    let bytes = unsafe { ctx.req.region.bytes_mut() };
                    if let Err(e) =
                        apply_action(self.engine.as_ref(), ctx.req.dtype, bytes, &action)
                    {
                        warn!(%op, error = %e, "applying a received piece failed");
                    }
                }
            }
        }
        gauge!(m::OPS_IN_FLIGHT).set(self.ops.len() as f64);
    }
}
