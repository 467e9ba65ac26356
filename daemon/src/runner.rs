//! The runner: the one loop around the daemon's [`Node`]. Inputs (frames and
//! messages from peers, trainers' calls, the group's changes, the node's
//! deadlines) go into the node with the current time; its actions are
//! executed here, in order — frames and messages to the transport, answers
//! to the trainers, suspicions to the control plane — and its events become
//! metrics. Every decision is the node's. The daemon runs it on a thread of
//! its own, off the runtime's workers (see `run.rs`): the node's work
//! is synchronous, and a long stretch of it must not hold up the transport
//! and its heartbeats.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use metrics::{counter, gauge, histogram};
use phalanx_protocol::node::{Action, Buffer, Event, GroupChange, Node, Outcome, RequestId};
use phalanx_protocol::stragglers::StragglerRecord;
use phalanx_protocol::wire::{encode_frame_header, ControlMessage};
use phalanx_protocol::{MemberId, Time};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::bus::{ControlInput, Links, NetInput, OutFrame, Reply, TrainerCall};
use crate::metrics as m;

/// Where the runner's inputs come from.
#[derive(Debug)]
pub struct RunnerInputs<B> {
    /// Frames, connection changes and node messages.
    pub net: mpsc::Receiver<NetInput>,
    /// The peers whose heartbeats arrived, each time one did: apart from
    /// `net`, so that no backlog of frames delays them.
    pub heard: mpsc::UnboundedReceiver<MemberId>,
    /// Trainers' collectives and joins.
    pub trainers: mpsc::Receiver<TrainerCall<B>>,
    /// The group's changes, in commit order.
    pub group: mpsc::UnboundedReceiver<GroupChange>,
}

/// Where the runner's outputs go.
#[derive(Debug)]
pub struct RunnerOutputs {
    /// The transport.
    pub links: Arc<dyn Links>,
    /// Suspicions and readmission requests.
    pub control: mpsc::UnboundedSender<ControlInput>,
    /// The step coordinator's attribution (`phalanxctl members`).
    pub stragglers: watch::Sender<Vec<StragglerRecord>>,
}

/// The loop around one node.
#[derive(Debug)]
pub struct Runner<B> {
    node: Node<B>,
    out: RunnerOutputs,
    /// The node's time zero.
    origin: Instant,
    replies: HashMap<RequestId, oneshot::Sender<Reply<B>>>,
    next_request: u64,
}

impl<B: Buffer + Send + 'static> Runner<B> {
    /// A runner for `node`, whose clock started at `origin`.
    pub fn new(node: Node<B>, origin: Instant, out: RunnerOutputs) -> Runner<B> {
        Runner {
            node,
            out,
            origin,
            replies: HashMap::new(),
            next_request: 0,
        }
    }

    fn now(&self) -> Time {
        Time(self.origin.elapsed().as_micros() as u64)
    }

    /// Runs until `shutdown` turns true or the network input is gone; then
    /// every trainer still waiting is told the daemon is shutting down.
    pub async fn run(mut self, mut inputs: RunnerInputs<B>, mut shutdown: watch::Receiver<bool>) {
        let mut group_open = true;
        let mut trainers_open = true;
        loop {
            let deadline = self
                .node
                .poll_timeout()
                .map(|t| self.origin + Duration::from_micros(t.0));
            tokio::select! {
                // Biased: group changes before anything else (they are rare
                // and decide what the rest means), then heartbeats (before
                // the deadlines that judge by them: a peer heard is not
                // suspected for the runner's own delay), trainers and due
                // deadlines, so a steady stream of frames starves none.
                biased;
                _ = shutdown.changed() => break,
                change = inputs.group.recv(), if group_open => match change {
                    Some(change) => {
                        let now = self.now();
                        self.node.handle_group(now, change);
                    }
                    None => group_open = false,
                },
                Some(member) = inputs.heard.recv() => {
                    let now = self.now();
                    self.node.handle_heartbeat(now, member);
                }
                call = inputs.trainers.recv(), if trainers_open => match call {
                    Some(call) => self.trainer(call),
                    None => trainers_open = false,
                },
                _ = sleep_until(deadline) => {
                    let now = self.now();
                    self.node.handle_timeout(now);
                }
                input = inputs.net.recv() => match input {
                    Some(input) => self.net(input),
                    None => break,
                },
            }
            if let Some(busy) = self.out.links.take_busy() {
                warn!(
                    ms = busy.as_millis() as u64,
                    "fault injection: the runner is busy"
                );
                std::thread::sleep(busy);
                info!("fault injection: the runner is no longer busy");
            }
            self.execute();
        }
        self.node.shutdown();
        self.execute();
        gauge!(m::OPS_IN_FLIGHT).set(0.0);
    }

    fn net(&mut self, input: NetInput) {
        let now = self.now();
        match input {
            NetInput::Frame { header, payload } => {
                counter!(m::BYTES_RECEIVED, "peer" => header.sender.to_string())
                    .increment(payload.len() as u64);
                self.node.handle_frame(now, header, payload);
            }
            NetInput::PeerUp { member } => self.node.handle_peer_up(now, member),
            NetInput::PeerDown { member, reason } => {
                self.node.handle_peer_down(now, member, &reason)
            }
            NetInput::Message { from, msg } => self.node.handle_message(now, from, msg),
        }
    }

    fn trainer(&mut self, call: TrainerCall<B>) {
        let now = self.now();
        let id = RequestId(self.next_request);
        self.next_request += 1;
        match call {
            TrainerCall::Submit(mut req, reply) => {
                self.replies.insert(id, reply);
                req.id = id;
                self.node.handle_submit(now, req);
            }
            TrainerCall::Join(mut join, reply) => {
                self.replies.insert(id, reply);
                join.id = id;
                self.node.handle_join(now, join);
            }
        }
    }

    /// Executes the node's actions and records its events.
    fn execute(&mut self) {
        while let Some(action) = self.node.poll_action() {
            match action {
                Action::Frame {
                    to,
                    header,
                    payload,
                } => {
                    counter!(m::BYTES_SENT, "peer" => to.to_string())
                        .increment(payload.len() as u64);
                    let frame = OutFrame {
                        chunk: header.chunk,
                        head: encode_frame_header(&header),
                        payload: Bytes::from(payload),
                    };
                    self.out.links.send_frame(to, frame);
                }
                Action::Message { to, msg } => {
                    if !self.out.links.send(to, ControlMessage::Node(msg)) {
                        debug!(peer = %to, "peer not connected: node message dropped");
                    }
                }
                Action::Reply {
                    id,
                    buffer,
                    outcome,
                } => match self.replies.remove(&id) {
                    // A trainer that hung up no longer listens.
                    Some(tx) => {
                        let _ = tx.send(Reply { outcome, buffer });
                    }
                    None => warn!(request = id.0, "an answer for a request nobody asked"),
                },
                // Unbounded: a suspicion is never lost to a full queue (the
                // control task is gone only while the daemon stops).
                Action::Control(req) => {
                    let _ = self.out.control.send(ControlInput::Node(req));
                }
                Action::ResetLinks { member } => self.out.links.reset(member),
            }
        }
        while let Some(event) = self.node.poll_event() {
            record(event, &self.out.stragglers);
        }
        gauge!(m::OPS_IN_FLIGHT).set(self.node.in_flight() as f64);
        gauge!(m::OPS_PARKED).set(self.node.parked() as f64);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What an event means for the metrics.
fn record(event: Event, stragglers: &watch::Sender<Vec<StragglerRecord>>) {
    match event {
        Event::Op {
            outcome,
            kind,
            elapsed,
        } => {
            if let (Outcome::Completed, Some(elapsed)) = (outcome, elapsed) {
                histogram!(m::OP_SECONDS, "kind" => kind).record(elapsed.as_secs_f64());
            }
            counter!(m::OPS, "outcome" => outcome.label()).increment(1);
        }
        Event::Recovered { plan } => counter!(m::RERUNS, "plan" => plan).increment(1),
        Event::Suspected { reason } => counter!(m::SUSPICIONS, "reason" => reason).increment(1),
        Event::Returned { caught_up, .. } => {
            let outcome = if caught_up { "caught_up" } else { "refused" };
            counter!(m::RETURNS, "outcome" => outcome).increment(1);
        }
        Event::Doubt { outcome } => counter!(m::DOUBTS, "outcome" => outcome).increment(1),
        Event::StepClosed { reason } => counter!(m::STEPS_CLOSED, "reason" => reason).increment(1),
        Event::Stragglers(records) => {
            for r in &records {
                let member = r.member.to_string();
                gauge!(m::STRAGGLER_LEFT_OUT, "member" => member.clone()).set(r.left_out as f64);
                gauge!(m::STRAGGLER_MISSED, "member" => member.clone()).set(r.missed as f64);
                gauge!(m::STRAGGLER_MISSED_SECONDS, "member" => member.clone())
                    .set(r.missed_by_ms as f64 / 1000.0);
                gauge!(m::STRAGGLER_OBSERVER, "member" => member)
                    .set(f64::from(u8::from(r.observer)));
            }
            stragglers.send_replace(records);
        }
    }
}
