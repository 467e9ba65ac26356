//! Deterministic simulation of steps closed by a quorum policy (stragglers),
//! on the daemon's data path as it ships: every member runs the daemon's
//! [`Node`] — readiness to the step's coordinator (the lowest member), the
//! cut announced before the reduction, the reduction over the whole ring
//! with a neutral input from every member left out, the daemon standing in
//! for a trainer that has not submitted the step, the result kept until
//! that trainer asks — with a trainer that computes for a seeded time per
//! step (some members 3x slower; in half the seeds one of them recovers
//! midway) and skips the gradients of steps it is behind on. The tensors
//! are f32, bf16 or f16 (from the seed), and in half the seeds the group
//! changes its policy while it trains (a new epoch at every member, a few
//! hundred microseconds apart, as commits arrive): cut steps in flight are
//! decided again in the new epoch. The simulator only moves bytes between
//! the nodes, runs their timers and feeds them the epochs.
//!
//! Checked on every result: it is exactly the sum over the contributors it
//! names, a trainer that skipped a step is never named, and every member
//! sees the same contributors for a step. At the end: every trainer finished
//! (nothing deadlocks), all replicas are bit-identical, the healthy members
//! kept their pace (at most 2x the healthy step time where plain sync would
//! be 3x), a member slow throughout contributed to few steps and was
//! demoted, and a member that recovered contributes again.
//! Member deaths are not simulated here: the process tests cover a slow
//! member that dies, and `cluster_sim` the epoch changes that follow.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;
use std::time::Duration;

use crate::tensor::to_f64;
use phalanx_compute::{bf16, f16, EngineArithmetic, ScalarEngine};
use phalanx_protocol::collective::Config;
use phalanx_protocol::local::LocalKind;
use phalanx_protocol::membership::RecoveryReport;
use phalanx_protocol::node::{
    Action, AttributionConfig, ControlRequest, Event as NodeEvent, GroupChange, Node, NodeConfig,
    OpDone, OpError, Request, RequestId,
};
use phalanx_protocol::rng::SplitMix64;
use phalanx_protocol::stragglers::{DeadlinePolicy, LatePolicy, QuorumPolicy};
use phalanx_protocol::wire::{DType, FrameHeader, NodeMessage, ReduceOp};
use phalanx_protocol::{Epoch, Incarnation, MemberId, OpId, Time};

const DIM: usize = 40;
const LR: f32 = 1.0 / 1024.0;

/// One seeded run.
#[derive(Clone, Debug)]
pub struct StepsScenario {
    /// The seed.
    pub seed: u64,
    /// Members (member 1 coordinates).
    pub members: usize,
    /// How steps close at first.
    pub policy: QuorumPolicy,
    /// Slow members (indices), and the step from which each is healthy
    /// again (`None`: slow throughout).
    pub slow: Vec<(usize, Option<u64>)>,
    /// A healthy member's compute time per step (each step varies by up to
    /// a tenth either way).
    pub compute: Duration,
    /// Steps every trainer runs.
    pub steps: u64,
    /// Extra delay on a message, up to this.
    pub jitter: Duration,
    /// The tensors' element type.
    pub dtype: DType,
    /// Policy changes while the group trains: each a new epoch.
    pub changes: Vec<(Duration, QuorumPolicy)>,
}

/// How much slower a slow member computes.
const SLOW: u64 = 3;

/// One of the policies a seed draws: backup workers, a deadline, or both.
fn draw_policy(rng: &mut SplitMix64, backup: u32, deadline: DeadlinePolicy) -> QuorumPolicy {
    match rng.below(3) {
        0 => QuorumPolicy {
            backup,
            deadline: None,
            late: LatePolicy::Drop,
        },
        1 => QuorumPolicy {
            backup: 0,
            deadline: Some(deadline),
            late: LatePolicy::Drop,
        },
        _ => QuorumPolicy {
            backup,
            deadline: Some(deadline),
            late: LatePolicy::Drop,
        },
    }
}

impl StepsScenario {
    /// The scenario of `seed`.
    pub fn from_seed(seed: u64) -> StepsScenario {
        let mut rng = SplitMix64::new(seed ^ 0x57E9_5A11_u64);
        let members = rng.range_inclusive(3, 6) as usize;
        let slow_count = rng.range_inclusive(1, (members as u64 - 2).min(2)) as usize;
        let mut slow: Vec<(usize, Option<u64>)> = Vec::new();
        while slow.len() < slow_count {
            let m = rng.below(members as u64) as usize;
            if !slow.iter().any(|(s, _)| *s == m) {
                slow.push((m, None));
            }
        }
        let steps = 150;
        if rng.below(2) == 0 {
            slow[0].1 = Some(rng.range_inclusive(40, 70));
        }
        // The quantile must lie among the healthy members' arrivals (of the
        // n-1 offsets a step records, n-1-slow are healthy): a p90 deadline
        // with a third of the members slow waits for them, as configured.
        let healthy_share = 1000 * (members - 1 - slow_count) as u64 / (members as u64 - 1);
        let deadline = DeadlinePolicy {
            quantile_permille: rng.range_inclusive(healthy_share / 2, healthy_share.min(900))
                as u16,
            floor_ms: 1,
            ceiling_ms: 2_000,
        };
        let backup = slow_count as u32;
        let policy = draw_policy(&mut rng, backup, deadline);
        let compute = Duration::from_millis(rng.range_inclusive(8, 20));
        let jitter = Duration::from_micros(rng.range_inclusive(0, 500));
        let dtype = DType::ALL[rng.below(3) as usize];
        let mut changes = Vec::new();
        if rng.below(2) == 0 {
            let run = compute.as_micros() as u64 * steps;
            for _ in 0..rng.range_inclusive(1, 3) {
                let at = Duration::from_micros(rng.range_inclusive(run / 5, run * 4 / 5));
                changes.push((at, draw_policy(&mut rng, backup, deadline)));
            }
            changes.sort_by_key(|(at, _)| *at);
        }
        StepsScenario {
            seed,
            members,
            policy,
            slow,
            compute,
            steps,
            jitter,
            dtype,
            changes,
        }
    }

    /// The command that replays it.
    pub fn replay(&self) -> String {
        format!(
            "cargo run --release --locked -p phalanx-tests --bin phalanx-sim -- steps --seed {}",
            self.seed
        )
    }

    fn slow_at(&self, m: usize, step: u64) -> bool {
        self.slow
            .iter()
            .any(|&(s, healthy_from)| s == m && healthy_from.is_none_or(|h| step < h))
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct StepsReport {
    /// Results handed to trainers.
    pub results: u64,
    /// Steps closed without some member.
    pub partial_steps: u64,
    /// Results of steps a trainer was left out of (its daemon stood in,
    /// or it arrived late).
    pub stand_ins: u64,
    /// Gradients trainers skipped (they were behind).
    pub skipped: u64,
    /// Demotions, as the coordinator announced them.
    pub demotions: u64,
    /// Readmissions.
    pub readmissions: u64,
    /// Epochs the policy changes started.
    pub epochs: u64,
    /// When the last healthy trainer finished, and what plain sync among
    /// healthy members would take (steps x the slowest healthy compute).
    pub healthy_finish: Duration,
    /// The healthy reference.
    pub healthy_reference: Duration,
}

/// Why a run failed, with how to replay it.
#[derive(Debug)]
pub struct StepsFailure {
    /// The scenario.
    pub scenario: Box<StepsScenario>,
    /// When (virtual time).
    pub at: Time,
    /// What.
    pub what: String,
}

impl fmt::Display for StepsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} failed at {:?}: {}\n  scenario: {:?}\n  replay: {}",
            self.scenario.seed,
            Duration::from_micros(self.at.0),
            self.what,
            self.scenario,
            self.scenario.replay()
        )
    }
}

#[derive(Debug)]
enum Packet {
    Frame(FrameHeader, Vec<u8>),
    Node(NodeMessage),
    Heartbeat,
}

#[derive(Debug)]
enum Event {
    /// A trainer finished computing its step.
    Computed(usize),
    Deliver {
        from: usize,
        to: usize,
        packet: Packet,
    },
    /// A node's deadline.
    Wake(usize),
    /// Everyone's heartbeats go out.
    Heartbeats,
    /// The control plane's epoch reaches a member.
    Epoch(usize, GroupChange),
}

struct Trainer {
    w: Vec<f32>,
    /// The step it computes or waits for.
    step: u64,
    skip: u64,
    /// This step's gradient was skipped.
    skipped: bool,
    finished_at: Option<Time>,
    /// The gradient it submitted for its current step.
    grad: Vec<f32>,
}

/// The simulation.
#[allow(missing_debug_implementations)] // holds the nodes and the queue; nothing to print
pub struct StepsSim {
    sc: StepsScenario,
    rng: SplitMix64,
    now: Time,
    queue: BinaryHeap<Reverse<(Time, u64, usize)>>,
    events: BTreeMap<usize, Event>,
    next_event: usize,
    seq: u64,
    nodes: Vec<Node<Vec<u8>>>,
    trainers: Vec<Trainer>,
    /// Per node, the earliest wake-up queued.
    wake_at: Vec<Option<Time>>,
    /// Per link, the last delivery time (links deliver in order, as QUIC
    /// streams do).
    links: BTreeMap<(usize, usize), Time>,
    /// (member, step) → the gradient its trainer submitted.
    grads: BTreeMap<(u32, u64), Vec<f32>>,
    /// Per step, the contributors the first result named.
    history: BTreeMap<u64, Vec<MemberId>>,
    partial: BTreeSet<u64>,
    demoted: BTreeSet<MemberId>,
    observers: BTreeSet<MemberId>,
    epoch: u64,
    report: StepsReport,
}

fn id(m: usize) -> MemberId {
    MemberId(m as u32 + 1)
}

/// A simulated trainer's gradient: multiples of 1/16 within ±2, so the sum
/// over six members is exact in every dtype (bf16 keeps 8 significant
/// bits) and in any order, and a result can be checked bit for bit.
fn gradient(member: u32, step: u64, w: &[f32]) -> Vec<f32> {
    w.iter()
        .enumerate()
        .map(|(j, &wj)| {
            let x = ((member as u64 * 7 + step * 13 + j as u64 * 3) % 11) as f32 - 5.0;
            (((wj * x - 1.0) * x * 2.0).round() / 16.0).clamp(-2.0, 2.0)
        })
        .collect()
}

/// `v` as raw elements of `dtype`.
fn encode(dtype: DType, v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| match dtype {
            DType::F32 => x.to_le_bytes().to_vec(),
            DType::BF16 => bf16::from_f32(x).to_le_bytes().to_vec(),
            DType::F16 => f16::from_f32(x).to_le_bytes().to_vec(),
        })
        .collect()
}

impl StepsSim {
    /// A simulation of `sc`.
    pub fn new(sc: StepsScenario) -> StepsSim {
        let config = NodeConfig {
            collectives: Config {
                chunk_bytes: 64,
                small_tensor_bytes: 96,
                op_timeout: Duration::from_secs(3600),
                ..Config::default()
            },
            attribution: AttributionConfig {
                tolerance: sc.compute / 4,
                ..NodeConfig::default().attribution
            },
            ..NodeConfig::default()
        };
        let nodes = (0..sc.members)
            .map(|m| {
                let arith = Box::new(EngineArithmetic(
                    Box::new(ScalarEngine) as Box<dyn phalanx_compute::ComputeEngine>
                ));
                Node::new(id(m), Incarnation(1), config.clone(), arith, Time::ZERO)
            })
            .collect();
        let trainers = (0..sc.members)
            .map(|_| Trainer {
                w: vec![0.0; DIM],
                step: 0,
                skip: 0,
                skipped: false,
                finished_at: None,
                grad: Vec::new(),
            })
            .collect();
        StepsSim {
            rng: SplitMix64::new(sc.seed),
            wake_at: vec![None; sc.members],
            sc,
            now: Time::ZERO,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            seq: 0,
            nodes,
            trainers,
            links: BTreeMap::new(),
            grads: BTreeMap::new(),
            history: BTreeMap::new(),
            partial: BTreeSet::new(),
            demoted: BTreeSet::new(),
            observers: BTreeSet::new(),
            epoch: 1,
            report: StepsReport::default(),
        }
    }

    fn ring(&self) -> Vec<MemberId> {
        (0..self.sc.members).map(id).collect()
    }

    fn fail(&self, what: String) -> StepsFailure {
        StepsFailure {
            scenario: Box::new(self.sc.clone()),
            at: self.now,
            what,
        }
    }

    fn schedule(&mut self, at: Time, event: Event) {
        let k = self.next_event;
        self.next_event += 1;
        self.seq += 1;
        self.events.insert(k, event);
        self.queue.push(Reverse((at, self.seq, k)));
    }

    fn send(&mut self, from: usize, to: usize, packet: Packet) {
        let delay = 50 + self.rng.below(self.sc.jitter.as_micros() as u64 + 1);
        let at = self.now.after(Duration::from_micros(delay));
        let last = self.links.get(&(from, to)).copied().unwrap_or(Time::ZERO);
        let at = at.max(last);
        self.links.insert((from, to), at);
        self.schedule(at, Event::Deliver { from, to, packet });
    }

    fn compute_time(&mut self, m: usize) -> Duration {
        let step = self.trainers[m].step;
        let base = self.sc.compute.as_micros() as u64;
        let base = if self.sc.slow_at(m, step) {
            base * SLOW
        } else {
            base
        };
        let spread = base / 10;
        Duration::from_micros(base - spread + self.rng.below(2 * spread + 1))
    }

    /// The group of epoch `epoch`, as every member sees it: all in the
    /// ring since the start, steps closing by `policy`.
    fn change(&self, epoch: u64, policy: QuorumPolicy) -> GroupChange {
        let ring = self.ring();
        GroupChange {
            epoch: Epoch(epoch),
            admitted: true,
            removed: None,
            joined_at: ring.iter().map(|&r| (r, Epoch(1))).collect(),
            ring,
            policy,
            confirmed: None,
        }
    }

    /// Runs to the end; the report, or the first violation.
    pub fn run(mut self) -> Result<StepsReport, StepsFailure> {
        // Epoch 1 as every member's control plane would apply it, its
        // recovery exchange already done (nothing ran before it).
        for m in 0..self.sc.members {
            let change = self.change(1, self.sc.policy);
            self.nodes[m].handle_group(Time::ZERO, change);
            for p in (0..self.sc.members).filter(|&p| p != m) {
                let report = RecoveryReport {
                    epoch: Epoch(1),
                    member: id(p),
                    parked: vec![],
                    completed: vec![],
                    synced: vec![],
                    returned: vec![],
                    returning: vec![],
                };
                self.nodes[m].handle_message(Time::ZERO, id(p), NodeMessage::Recovery(report));
            }
            self.execute(m)?;
            let t = self.compute_time(m);
            self.schedule(Time::ZERO.after(t), Event::Computed(m));
        }
        self.schedule(Time::ZERO, Event::Heartbeats);
        for (at, policy) in self.sc.changes.clone() {
            self.epoch += 1;
            for m in 0..self.sc.members {
                // Commits reach the members a little apart.
                let lag = Duration::from_micros(self.rng.below(800));
                let change = self.change(self.epoch, policy);
                self.schedule(Time::ZERO.after(at + lag), Event::Epoch(m, change));
            }
        }
        self.report.epochs = self.epoch - 1;
        let limit = Time::ZERO.after(self.sc.compute * (self.sc.steps as u32) * 4 * SLOW as u32);
        while let Some(Reverse((at, _, k))) = self.queue.pop() {
            if at > limit || self.trainers.iter().all(|t| t.finished_at.is_some()) {
                break;
            }
            self.now = at;
            let event = self.events.remove(&k).expect("scheduled");
            let member = match &event {
                Event::Computed(m) | Event::Wake(m) | Event::Epoch(m, _) => *m,
                Event::Deliver { to, .. } => *to,
                Event::Heartbeats => 0,
            };
            let _span = tracing::info_span!("", m = member + 1, t = %self.now).entered();
            match event {
                Event::Computed(m) => self.computed(m)?,
                Event::Deliver { from, to, packet } => {
                    let (now, from) = (self.now, id(from));
                    let node = &mut self.nodes[to];
                    match packet {
                        Packet::Frame(header, payload) => node.handle_frame(now, header, payload),
                        Packet::Node(msg) => node.handle_message(now, from, msg),
                        Packet::Heartbeat => node.handle_heartbeat(now, from),
                    }
                    self.execute(to)?;
                }
                Event::Wake(m) => {
                    self.wake_at[m] = None;
                    self.nodes[m].handle_timeout(self.now);
                    self.execute(m)?;
                }
                Event::Heartbeats => {
                    for a in 0..self.sc.members {
                        for b in (0..self.sc.members).filter(|&b| b != a) {
                            self.send(a, b, Packet::Heartbeat);
                        }
                    }
                    let next = self.now.after(Duration::from_millis(100));
                    self.schedule(next, Event::Heartbeats);
                }
                Event::Epoch(m, change) => {
                    self.nodes[m].handle_group(self.now, change);
                    self.execute(m)?;
                }
            }
        }
        self.check_end()
    }

    /// Executes node `m`'s actions and queues its next wake-up.
    fn execute(&mut self, m: usize) -> Result<(), StepsFailure> {
        while let Some(action) = self.nodes[m].poll_action() {
            match action {
                Action::Frame {
                    to,
                    header,
                    payload,
                } => self.send(m, to.0 as usize - 1, Packet::Frame(header, payload)),
                Action::Message { to, msg } => self.send(m, to.0 as usize - 1, Packet::Node(msg)),
                Action::Reply {
                    id,
                    buffer,
                    outcome,
                } => self.result(m, id, buffer, outcome)?,
                Action::Control(ControlRequest::Suspect { member, reason }) => {
                    return Err(self.fail(format!(
                        "m{} suspects {member} ({reason}): nobody dies here",
                        m + 1
                    )))
                }
                // Heartbeats every 100 ms reach every member: none may
                // think it was paused.
                Action::Control(ControlRequest::Confirm { .. }) => {
                    return Err(self.fail(format!(
                        "m{} doubts its epoch as after a pause: nobody pauses here",
                        m + 1
                    )))
                }
                Action::Control(_) | Action::ResetLinks { .. } => {}
            }
        }
        while let Some(event) = self.nodes[m].poll_event() {
            // The coordinator's attribution, as member 1 announces it.
            if let (0, NodeEvent::Stragglers(records)) = (m, event) {
                for r in records {
                    match (r.observer, self.observers.contains(&r.member)) {
                        (true, false) => {
                            self.report.demotions += 1;
                            self.demoted.insert(r.member);
                            self.observers.insert(r.member);
                        }
                        (false, true) => {
                            self.report.readmissions += 1;
                            self.observers.remove(&r.member);
                        }
                        _ => {}
                    }
                }
            }
        }
        if let Some(due) = self.nodes[m].poll_timeout() {
            if self.wake_at[m].is_none_or(|w| due < w) {
                self.wake_at[m] = Some(due);
                self.schedule(due.max(self.now), Event::Wake(m));
            }
        }
        Ok(())
    }

    fn computed(&mut self, m: usize) -> Result<(), StepsFailure> {
        let t = &mut self.trainers[m];
        let step = t.step;
        let grad = if t.skipped {
            self.report.skipped += 1;
            vec![0.0; DIM]
        } else {
            gradient(id(m).0, step, &t.w)
        };
        t.grad = grad.clone();
        self.grads.insert((id(m).0, step), grad.clone());
        let req = Request {
            id: RequestId(step),
            op: OpId::new(0, step + 1),
            kind: LocalKind::AllReduce(ReduceOp::Sum),
            dtype: self.sc.dtype,
            len: DIM,
            samples: None,
            buffer: encode(self.sc.dtype, &grad),
        };
        self.nodes[m].handle_submit(self.now, req);
        self.execute(m)
    }

    /// The trainer of `m` gets the answer to its step.
    fn result(
        &mut self,
        m: usize,
        request: RequestId,
        buf: Vec<u8>,
        outcome: Result<OpDone, OpError>,
    ) -> Result<(), StepsFailure> {
        let step = self.trainers[m].step;
        let done = match outcome {
            Ok(done) if request.0 == step => done,
            other => {
                return Err(self.fail(format!(
                    "m{} at step {step} got for request {} {other:?}",
                    m + 1,
                    request.0
                )))
            }
        };
        self.report.results += 1;
        let participants = done.contributors.clone();
        let got: Vec<f32> = to_f64(self.sc.dtype, &buf)
            .into_iter()
            .map(|x| x as f32)
            .collect();
        let mut want: Option<Vec<f32>> = None;
        for c in &participants {
            let Some(g) = self.grads.get(&(c.0, step)) else {
                return Err(self.fail(format!("{c} is named for step {step} it never submitted")));
            };
            match want.as_mut() {
                None => want = Some(g.clone()),
                Some(acc) => acc.iter_mut().zip(g).for_each(|(a, b)| *a += b),
            }
        }
        let Some(want) = want else {
            return Err(self.fail(format!("{} has no contributors", done.op)));
        };
        if !want
            .iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits())
        {
            let (j, (w, g)) = want
                .iter()
                .zip(&got)
                .enumerate()
                .find(|(_, (a, b))| a.to_bits() != b.to_bits())
                .expect("a difference");
            return Err(self.fail(format!(
                "m{} {}: not the sum over its contributors {participants:?} \
                 (element {j}: {g} where the sum is {w})",
                m + 1,
                done.op
            )));
        }
        let t = &self.trainers[m];
        if t.skipped && participants.contains(&id(m)) {
            return Err(self.fail(format!(
                "m{} skipped {}, yet is named a contributor",
                m + 1,
                done.op
            )));
        }
        if !done.meta.left_out.is_empty() {
            self.partial.insert(step);
        }
        if done.meta.left_out.iter().any(|(lm, _)| *lm == id(m)) {
            self.report.stand_ins += 1;
        }
        let agreed = self
            .history
            .entry(step)
            .or_insert(participants.clone())
            .clone();
        if agreed != participants {
            return Err(self.fail(format!(
                "step {step}: m{} saw contributors {participants:?}, another member {agreed:?}",
                m + 1
            )));
        }
        let k = participants.len() as f32;
        let (steps, now) = (self.sc.steps, self.now);
        let t = &mut self.trainers[m];
        for (w, s) in t.w.iter_mut().zip(&got) {
            *w -= LR * s / k;
        }
        t.skip = t.skip.max(done.meta.behind);
        t.step += 1;
        if t.step == steps {
            t.finished_at = Some(now);
            return Ok(());
        }
        t.skipped = t.skip > 0;
        if t.skipped {
            t.skip -= 1;
            self.schedule(now, Event::Computed(m));
        } else {
            let d = self.compute_time(m);
            self.schedule(now.after(d), Event::Computed(m));
        }
        Ok(())
    }

    fn check_end(mut self) -> Result<StepsReport, StepsFailure> {
        self.report.partial_steps = self.partial.len() as u64;
        for (m, t) in self.trainers.iter().enumerate() {
            if t.finished_at.is_none() {
                return Err(self.fail(format!(
                    "deadlock: m{} stopped at step {} of {} (its node {} in e{}, {} ops running, {} parked)",
                    m + 1,
                    t.step,
                    self.sc.steps,
                    self.nodes[m].mode().name(),
                    self.nodes[m].epoch().0,
                    self.nodes[m].in_flight(),
                    self.nodes[m].parked(),
                )));
            }
        }
        let first = &self.trainers[0].w;
        for (m, t) in self.trainers.iter().enumerate().skip(1) {
            if !t
                .w
                .iter()
                .zip(first)
                .all(|(a, b)| a.to_bits() == b.to_bits())
            {
                return Err(self.fail(format!("m{} and m1 hold different parameters", m + 1)));
            }
        }
        let healthy: Vec<usize> = (0..self.sc.members)
            .filter(|m| !self.sc.slow.iter().any(|(s, _)| s == m))
            .collect();
        let finish = healthy
            .iter()
            .filter_map(|&m| self.trainers[m].finished_at)
            .max()
            .unwrap_or(Time::ZERO);
        self.report.healthy_finish = Duration::from_micros(finish.0);
        self.report.healthy_reference = self.sc.compute * 11 / 10 * self.sc.steps as u32;
        if self.report.healthy_finish > self.report.healthy_reference * 2 {
            return Err(self.fail(format!(
                "the healthy members took {:?}, over twice the healthy {:?}",
                self.report.healthy_finish, self.report.healthy_reference
            )));
        }
        for &(s, healthy_from) in &self.sc.slow {
            let contributed: Vec<u64> = self
                .history
                .iter()
                .filter(|(_, c)| c.contains(&id(s)))
                .map(|(&step, _)| step)
                .collect();
            match healthy_from {
                None => {
                    if contributed.len() as u64 > self.sc.steps / 2 {
                        return Err(self.fail(format!(
                            "slow m{} contributed to {} of {} steps",
                            s + 1,
                            contributed.len(),
                            self.sc.steps
                        )));
                    }
                    if !self.demoted.contains(&id(s)) {
                        return Err(self.fail(format!("slow m{} was never demoted", s + 1)));
                    }
                }
                Some(from) => {
                    let after = contributed.iter().filter(|&&st| st > from + 30).count();
                    if after < 5 {
                        return Err(self.fail(format!(
                            "m{} recovered at step {from} but contributed to only {after} steps after {}",
                            s + 1,
                            from + 30
                        )));
                    }
                }
            }
        }
        Ok(std::mem::take(&mut self.report))
    }
}

/// Runs the scenario of `seed`.
pub fn run_seed(seed: u64) -> Result<StepsReport, StepsFailure> {
    StepsSim::new(StepsScenario::from_seed(seed)).run()
}
