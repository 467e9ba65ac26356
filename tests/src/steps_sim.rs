//! Deterministic simulation of steps closed by a quorum policy (stragglers):
//! every member runs the collective core and a trainer that computes for a
//! seeded time per step (some members 3x slower; in half the seeds one of
//! them recovers midway), member 1 runs the step [`Coordinator`], and the
//! members follow the daemon's cut path (`daemon/src/driver/steps.rs`):
//! readiness to the coordinator, the cut announced before the reduction,
//! the reduction over the whole ring with a neutral input from every member
//! left out, the daemon standing in for a trainer that has not submitted the
//! step, results kept until that trainer asks, and trainers that skip the
//! gradients of steps they are behind on.
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

use crate::tensor::{f32_bytes, f32s, step_gradient};
use phalanx_compute::{apply_action, element_range, ScalarEngine};
use phalanx_protocol::collective::{Action, Algorithm, Collectives, Config, Kind, OpSpec};
use phalanx_protocol::rng::SplitMix64;
use phalanx_protocol::stragglers::{
    Attribution, Coordinator, DeadlinePolicy, LatePolicy, QuorumPolicy, Standing,
};
use phalanx_protocol::wire::{DType, FrameHeader, ReduceOp};
use phalanx_protocol::{Epoch, MemberId, OpId, Step, Time};

const DIM: usize = 40;
const LR: f32 = 1.0 / 1024.0;

/// One seeded run.
#[derive(Clone, Debug)]
pub struct StepsScenario {
    /// The seed.
    pub seed: u64,
    /// Members (member 1 coordinates).
    pub members: usize,
    /// How steps close.
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
}

/// How much slower a slow member computes.
const SLOW: u64 = 3;

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
        let policy = match rng.below(3) {
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
        };
        StepsScenario {
            seed,
            members,
            policy,
            slow,
            compute: Duration::from_millis(rng.range_inclusive(8, 20)),
            steps,
            jitter: Duration::from_micros(rng.range_inclusive(0, 500)),
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
    /// Results a daemon computed standing in for its late trainer.
    pub stand_ins: u64,
    /// Gradients trainers skipped (they were behind).
    pub skipped: u64,
    /// Demotions and readmissions.
    pub demotions: u64,
    /// Readmissions.
    pub readmissions: u64,
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

#[derive(Clone, Debug)]
enum Packet {
    Frame(FrameHeader, Vec<u8>),
    /// Readiness for a step, from a member.
    Ready(OpId, usize),
    Cut {
        op: OpId,
        participants: Vec<MemberId>,
        left: Vec<MemberId>,
    },
}

#[derive(Debug)]
enum Event {
    /// A trainer finished computing its step.
    Computed(usize),
    Deliver {
        to: usize,
        packet: Packet,
    },
    /// The coordinator's deadline.
    Wake,
}

struct Run {
    buf: Vec<u8>,
    standin: bool,
    participants: Vec<MemberId>,
}

struct Node {
    core: Collectives,
    w: Vec<f32>,
    /// The step the trainer computes or waits for.
    step: u64,
    skip: u64,
    /// This step's gradient was skipped.
    skipped: bool,
    finished_at: Option<Time>,
    cutting: BTreeMap<OpId, Vec<f32>>,
    runs: BTreeMap<OpId, Run>,
    delivered: BTreeMap<OpId, (Vec<u8>, Vec<MemberId>)>,
    late: BTreeSet<OpId>,
    closed_upto: u64,
}

/// The simulation.
#[allow(missing_debug_implementations)] // holds the cores and the queue; nothing to print
pub struct StepsSim {
    sc: StepsScenario,
    rng: SplitMix64,
    now: Time,
    queue: BinaryHeap<Reverse<(Time, u64, usize)>>,
    events: BTreeMap<usize, Event>,
    next_event: usize,
    seq: u64,
    nodes: Vec<Node>,
    coordinator: Coordinator,
    wake_at: Option<Time>,
    /// Per link, the last delivery time (links deliver in order, as QUIC
    /// streams do).
    links: BTreeMap<(usize, usize), Time>,
    /// Per step, the contributors the first result named.
    history: BTreeMap<u64, Vec<MemberId>>,
    demoted: BTreeSet<MemberId>,
    report: StepsReport,
    engine: ScalarEngine,
}

fn id(m: usize) -> MemberId {
    MemberId(m as u32 + 1)
}

impl StepsSim {
    /// A simulation of `sc`.
    pub fn new(sc: StepsScenario) -> StepsSim {
        let config = Config {
            chunk_bytes: 64,
            small_tensor_bytes: 96,
            op_timeout: Duration::from_secs(3600),
            ..Config::default()
        };
        let nodes = (0..sc.members)
            .map(|m| Node {
                core: Collectives::new(id(m), config.clone()),
                w: vec![0.0; DIM],
                step: 0,
                skip: 0,
                skipped: false,
                finished_at: None,
                cutting: BTreeMap::new(),
                runs: BTreeMap::new(),
                delivered: BTreeMap::new(),
                late: BTreeSet::new(),
                closed_upto: 0,
            })
            .collect();
        let tolerance = sc.compute / 4;
        StepsSim {
            rng: SplitMix64::new(sc.seed),
            coordinator: Coordinator::new(sc.policy, Attribution::new(10, 3, 3, tolerance)),
            sc,
            now: Time::ZERO,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            seq: 0,
            nodes,
            wake_at: None,
            links: BTreeMap::new(),
            history: BTreeMap::new(),
            demoted: BTreeSet::new(),
            report: StepsReport::default(),
            engine: ScalarEngine,
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
        self.schedule(at, Event::Deliver { to, packet });
    }

    fn compute_time(&mut self, m: usize) -> Duration {
        let step = self.nodes[m].step;
        let base = self.sc.compute.as_micros() as u64;
        let base = if self.sc.slow_at(m, step) {
            base * SLOW
        } else {
            base
        };
        let spread = base / 10;
        Duration::from_micros(base - spread + self.rng.below(2 * spread + 1))
    }

    /// Runs to the end; the report, or the first violation.
    pub fn run(mut self) -> Result<StepsReport, StepsFailure> {
        for m in 0..self.sc.members {
            let t = self.compute_time(m);
            self.schedule(Time::ZERO.after(t), Event::Computed(m));
        }
        let limit = Time::ZERO.after(self.sc.compute * (self.sc.steps as u32) * 4 * SLOW as u32);
        while let Some(Reverse((at, _, k))) = self.queue.pop() {
            if at > limit {
                break;
            }
            self.now = at;
            let event = self.events.remove(&k).expect("scheduled");
            match event {
                Event::Computed(m) => self.computed(m)?,
                Event::Deliver { to, packet } => self.deliver(to, packet)?,
                Event::Wake => {
                    self.wake_at = None;
                    let ring = self.ring();
                    for ann in self.coordinator.poll(self.now, &ring) {
                        self.announce(ann)?;
                    }
                }
            }
            if let Some(due) = self.coordinator.next_deadline() {
                if self.wake_at.is_none_or(|w| due < w) && due >= self.now {
                    self.wake_at = Some(due);
                    self.schedule(due, Event::Wake);
                }
            }
        }
        self.check_end()
    }

    fn computed(&mut self, m: usize) -> Result<(), StepsFailure> {
        let n = &mut self.nodes[m];
        let step = n.step;
        let op = OpId(step + 1);
        let grad = if n.skipped {
            self.report.skipped += 1;
            vec![0.0; DIM]
        } else {
            step_gradient(id(m).0, step, &n.w)
        };
        if let Some((buf, participants)) = n.delivered.remove(&op) {
            self.ready(m, op)?;
            return self.result(m, op, buf, participants);
        }
        if n.runs.get(&op).is_some_and(|r| r.standin) {
            n.late.insert(op);
            return self.ready(m, op);
        }
        n.cutting.insert(op, grad);
        self.ready(m, op)
    }

    fn ready(&mut self, m: usize, op: OpId) -> Result<(), StepsFailure> {
        if m == 0 {
            self.on_ready(0, op)
        } else {
            self.send(m, 0, Packet::Ready(op, m));
            Ok(())
        }
    }

    fn on_ready(&mut self, from: usize, op: OpId) -> Result<(), StepsFailure> {
        let ring = self.ring();
        match self.coordinator.ready(op.0, id(from), self.now, &ring) {
            Some(ann) => self.announce(ann),
            None => Ok(()),
        }
    }

    fn announce(
        &mut self,
        ann: phalanx_protocol::stragglers::Announcement,
    ) -> Result<(), StepsFailure> {
        for s in &ann.standings {
            match s {
                Standing::Demoted { member, .. } => {
                    self.report.demotions += 1;
                    self.demoted.insert(*member);
                }
                Standing::Readmitted { .. } => self.report.readmissions += 1,
            }
        }
        if !ann.left_out.is_empty() {
            self.report.partial_steps += 1;
        }
        let packet = Packet::Cut {
            op: OpId(ann.step),
            participants: ann.participants.clone(),
            left: ann.left_out.iter().map(|(m, _)| *m).collect(),
        };
        for to in 1..self.sc.members {
            self.send(0, to, packet.clone());
        }
        self.deliver(0, packet)
    }

    fn deliver(&mut self, to: usize, packet: Packet) -> Result<(), StepsFailure> {
        match packet {
            Packet::Frame(header, payload) => {
                let now = self.now;
                if let Err(e) = self.nodes[to].core.handle_frame(now, header, payload) {
                    return Err(self.fail(format!("m{} refused a frame: {e}", to + 1)));
                }
                self.execute(to)
            }
            Packet::Ready(op, from) => self.on_ready(from, op),
            Packet::Cut {
                op,
                participants,
                left,
            } => self.on_cut(to, op, participants, left),
        }
    }

    fn on_cut(
        &mut self,
        m: usize,
        op: OpId,
        participants: Vec<MemberId>,
        left: Vec<MemberId>,
    ) -> Result<(), StepsFailure> {
        let me = id(m);
        let n = &mut self.nodes[m];
        n.closed_upto = n.closed_upto.max(op.0);
        let contributes = participants.contains(&me);
        let (buf, standin) = match n.cutting.remove(&op) {
            Some(grad) if contributes => (f32_bytes(&grad), false),
            Some(_) => (f32_bytes(&[-0.0; DIM]), false),
            None if contributes => {
                return Err(self.fail(format!(
                    "m{} is named a contributor of {op} but never was ready",
                    m + 1
                )))
            }
            None => {
                self.report.stand_ins += 1;
                (f32_bytes(&[-0.0; DIM]), true)
            }
        };
        if left.iter().chain(&participants).count() != self.sc.members {
            return Err(self.fail(format!("the cut of {op} does not cover the ring")));
        }
        let spec = OpSpec {
            op,
            epoch: Epoch(1),
            step: Step(op.0),
            kind: Kind::AllReduce(ReduceOp::Sum),
            algorithm: Algorithm::Auto,
            dtype: DType::F32,
            len: DIM,
            members: self.ring(),
        };
        let now = self.now;
        let n = &mut self.nodes[m];
        n.runs.insert(
            op,
            Run {
                buf,
                standin,
                participants,
            },
        );
        if let Err(e) = n.core.start(now, spec) {
            return Err(self.fail(format!("m{} starting {op}: {e}", m + 1)));
        }
        self.execute(m)
    }

    fn execute(&mut self, m: usize) -> Result<(), StepsFailure> {
        while let Some(action) = self.nodes[m].core.poll_action() {
            match action {
                Action::Send {
                    op,
                    to,
                    header,
                    range,
                } => {
                    let payload =
                        self.nodes[m].runs[&op].buf[element_range(DType::F32, &range)].to_vec();
                    self.send(m, to.0 as usize - 1, Packet::Frame(header, payload));
                }
                Action::Reduce { op, .. } | Action::Copy { op, .. } | Action::Divide { op, .. } => {
                    let run = self.nodes[m].runs.get_mut(&op).expect("a known run");
                    if let Err(e) = apply_action(&self.engine, DType::F32, &mut run.buf, &action) {
                        return Err(self.fail(format!("m{} applying {op}: {e}", m + 1)));
                    }
                }
                Action::Complete { op, .. } => {
                    let run = self.nodes[m].runs.remove(&op).expect("a known run");
                    // A stand-in's result waits for its trainer, unless the
                    // trainer asked for it meanwhile.
                    if !run.standin || self.nodes[m].late.remove(&op) {
                        self.result(m, op, run.buf, run.participants)?;
                    } else {
                        self.nodes[m]
                            .delivered
                            .insert(op, (run.buf, run.participants));
                    }
                }
                Action::Aborted { op, reason, .. } => {
                    return Err(self.fail(format!("m{} {op} aborted: {reason}", m + 1)));
                }
            }
        }
        Ok(())
    }

    /// The trainer of `m` gets the result of `op`.
    fn result(
        &mut self,
        m: usize,
        op: OpId,
        buf: Vec<u8>,
        participants: Vec<MemberId>,
    ) -> Result<(), StepsFailure> {
        self.report.results += 1;
        let n = &self.nodes[m];
        let step = op.0 - 1;
        if step != n.step {
            return Err(self.fail(format!("m{} got {op} while at step {}", m + 1, n.step)));
        }
        let got = f32s(&buf);
        let mut want: Option<Vec<f32>> = None;
        for c in &participants {
            let g = step_gradient(c.0, step, &n.w);
            match want.as_mut() {
                None => want = Some(g),
                Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b),
            }
        }
        let Some(want) = want else {
            return Err(self.fail(format!("{op} has no contributors")));
        };
        if !want
            .iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits())
        {
            return Err(self.fail(format!(
                "m{} {op}: not the sum over its contributors {participants:?}",
                m + 1
            )));
        }
        if n.skipped && participants.contains(&id(m)) {
            return Err(self.fail(format!(
                "m{} skipped {op}, yet is named a contributor",
                m + 1
            )));
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
        let steps = self.sc.steps;
        let now = self.now;
        let n = &mut self.nodes[m];
        for (w, s) in n.w.iter_mut().zip(&got) {
            *w -= LR * s / k;
        }
        n.skip = n.skip.max(n.closed_upto.saturating_sub(op.0));
        n.step += 1;
        if n.step == steps {
            n.finished_at = Some(now);
            return Ok(());
        }
        n.skipped = n.skip > 0;
        if n.skipped {
            n.skip -= 1;
            self.schedule(now, Event::Computed(m));
        } else {
            let t = self.compute_time(m);
            self.schedule(now.after(t), Event::Computed(m));
        }
        Ok(())
    }

    fn check_end(mut self) -> Result<StepsReport, StepsFailure> {
        for (m, n) in self.nodes.iter().enumerate() {
            if n.finished_at.is_none() {
                return Err(self.fail(format!(
                    "deadlock: m{} stopped at step {} of {} (cutting {:?}, running {:?}, kept {:?})",
                    m + 1,
                    n.step,
                    self.sc.steps,
                    n.cutting.keys().collect::<Vec<_>>(),
                    n.runs.keys().collect::<Vec<_>>(),
                    n.delivered.keys().collect::<Vec<_>>()
                )));
            }
        }
        let first = &self.nodes[0].w;
        for (m, n) in self.nodes.iter().enumerate().skip(1) {
            if !n
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
            .filter_map(|&m| self.nodes[m].finished_at)
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
