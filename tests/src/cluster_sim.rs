//! Deterministic simulation of the whole failure path at once: every member
//! runs the raft-rs control node ([`ControlNode`]) with its failure
//! detector and standing policy, *and* the collective core with a trainer
//! that all-reduces one gradient per step. Epochs come from what Raft
//! commits; an op interrupted by a suspicion or an epoch change is parked
//! with its kept input; the new ring exchanges [`RecoveryReport`]s (asking
//! again for missing ones) and finishes it as [`Recovery::plans`] decides,
//! as the daemon's driver does. Members crash, pause and are partitioned
//! off; a trainer whose member is removed or cannot reach a majority stops
//! (a real one would rejoin with `join()`, which the process tests cover).
//!
//! Safety, checked on every completion: the result is exactly the sum over
//! the contributors it names. At the end: the members still training agree
//! on every step's contributors and hold bit-identical parameters.
//! Liveness, after the heal: one leader, one epoch, and the ring (everyone
//! neither crashed nor stopped) trains on to a common step.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;
use std::time::Duration;

use crate::tensor::{f32_bytes, f32s, step_gradient};
use phalanx_compute::{apply_action, element_range, ScalarEngine};
use phalanx_protocol::collective::{Action, Algorithm, Collectives, Config, Kind, OpSpec};
use phalanx_protocol::membership::control::{
    decode_message, destination, encode_message, initial_roles, propose, ControlConfig,
    ControlNode, Housekeeper, MemoryDisk,
};
use phalanx_protocol::membership::{
    Command, Decision, DetectorConfig, FailureDetector, GroupState, KeptResult, Plan, Recovery,
    RecoveryReport,
};
use phalanx_protocol::rng::SplitMix64;
use phalanx_protocol::wire::{DType, FrameHeader, ReduceOp};
use phalanx_protocol::{Epoch, Incarnation, MemberId, OpId, Step, Time};

const STEP: Duration = Duration::from_millis(1);
/// Parameters per replica.
const DIM: usize = 48;
/// A parked op with no new epoch in this long fails (`recovery_timeout`).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(2);

/// One seeded run.
#[derive(Clone, Debug)]
pub struct ClusterScenario {
    /// The seed.
    pub seed: u64,
    /// Members (3 voters).
    pub members: usize,
    /// Faults, then the heal.
    pub fault_phase: Duration,
    /// Time after the heal to converge.
    pub heal_phase: Duration,
    /// Extra delay on a message, up to this.
    pub jitter: Duration,
    /// Faults at times.
    pub faults: Vec<(Duration, ClusterFault)>,
}

/// A fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterFault {
    /// The member's process dies for good.
    Crash(usize),
    /// These members are cut off from the rest until the heal.
    Partition(Vec<usize>),
    /// The member stops running for a while (SIGSTOP).
    Pause(usize, Duration),
    /// Connectivity returns.
    Heal,
}

impl ClusterScenario {
    /// The scenario of `seed`.
    pub fn from_seed(seed: u64) -> ClusterScenario {
        let mut rng = SplitMix64::new(seed ^ 0x005E_EDC1_u64);
        let members = rng.range_inclusive(3, 6) as usize;
        let fault_phase = Duration::from_millis(rng.range_inclusive(1_500, 4_000));
        let mut faults = Vec::new();
        let mut crashed = false;
        for _ in 0..rng.range_inclusive(1, 3) {
            let at =
                Duration::from_millis(rng.range_inclusive(300, fault_phase.as_millis() as u64));
            let m = rng.below(members as u64) as usize;
            let fault = match rng.below(4) {
                0 if !crashed => {
                    crashed = true;
                    ClusterFault::Crash(m)
                }
                0 | 1 => {
                    // A minority: the majority side keeps a Raft quorum.
                    let size = rng.range_inclusive(1, ((members - 1) / 2).max(1) as u64) as usize;
                    let side: Vec<usize> = (0..size).map(|k| (m + k) % members).collect();
                    ClusterFault::Partition(side)
                }
                2 => ClusterFault::Pause(m, Duration::from_millis(rng.range_inclusive(50, 1_500))),
                _ => ClusterFault::Heal,
            };
            faults.push((at, fault));
        }
        faults.sort_by_key(|(at, _)| *at);
        ClusterScenario {
            seed,
            members,
            fault_phase,
            heal_phase: Duration::from_secs(8),
            jitter: Duration::from_micros(rng.range_inclusive(0, 2_000)),
            faults,
        }
    }

    /// The command that replays it.
    pub fn replay(&self) -> String {
        format!(
            "cargo run --release --locked -p phalanx-tests --bin phalanx-sim -- cluster --seed {}",
            self.seed
        )
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct ClusterReport {
    /// Steps completed, summed over trainers.
    pub completions: u64,
    /// Epochs committed.
    pub epochs: u64,
    /// Interrupted ops finished by each kind of plan.
    pub reruns: u64,
    /// ... by broadcasting a kept result.
    pub from_results: u64,
    /// Trainers that stopped (removed, no quorum, superseded).
    pub stopped: u64,
    /// The step the survivors reached together.
    pub final_step: u64,
    /// Frames a core refused (late frames of ops aborted here).
    pub refused_frames: u64,
    /// Every trainer stopped (the group lost its quorum for too long).
    pub no_survivors: bool,
}

/// A failed run.
#[derive(Debug)]
pub struct ClusterFailure {
    /// The scenario.
    pub scenario: Box<ClusterScenario>,
    /// What went wrong.
    pub what: String,
    /// When.
    pub at: Duration,
}

impl fmt::Display for ClusterFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cluster seed {} failed at {:?}: {}",
            self.scenario.seed, self.at, self.what
        )?;
        writeln!(f, "scenario: {:?}", self.scenario)?;
        write!(f, "replay: {}", self.scenario.replay())
    }
}

enum Packet {
    Raft(Vec<u8>),
    Heartbeat,
    Frame(FrameHeader, Vec<u8>),
    Report(RecoveryReport),
    Ask(Epoch),
}

/// An op this member runs: the trainer's step, or a kept result it forwards.
struct Run {
    buf: Vec<u8>,
    input: Vec<u8>,
    members: Vec<MemberId>,
    /// The trainer's op (false: forwarding a kept result).
    trainer: bool,
    /// A broadcast of a kept result names the original contributors.
    contributors: Option<Vec<MemberId>>,
}

struct Kept {
    op: OpId,
    contributors: Vec<MemberId>,
    output: Vec<u8>,
}

struct Node {
    id: MemberId,
    alive: bool,
    paused_until: Option<Time>,
    control: ControlNode,
    disk: MemoryDisk,
    detector: FailureDetector,
    keeper: Housekeeper,
    core: Collectives,
    // The trainer.
    params: Vec<f32>,
    step: u64,
    stopped: Option<String>,
    // The driver's bookkeeping.
    epoch: Epoch,
    ring: Vec<MemberId>,
    admitted: bool,
    runs: BTreeMap<OpId, Run>,
    parked: Option<(OpId, Run, Time)>,
    plans: BTreeMap<OpId, Plan>,
    kept: Option<Kept>,
    recovery: Option<Recovery>,
    report: Option<RecoveryReport>,
    early: Vec<RecoveryReport>,
    asked_at: Time,
    /// Suspicions not yet taken effect: proposed again every 300 ms (a
    /// proposal is lost while there is no leader), as the daemon does.
    suspects: BTreeMap<MemberId, (String, Option<Time>)>,
}

/// The simulator.
pub struct ClusterSim {
    sc: ClusterScenario,
    rng: SplitMix64,
    now: Time,
    nodes: Vec<Node>,
    side: Vec<u8>,
    net: BinaryHeap<Reverse<(Time, u64, usize, usize)>>,
    /// Each message with the generation of its link when it was sent.
    payloads: BTreeMap<u64, (Packet, u64)>,
    /// Per link (lower index, higher index): bumped when a suspicion
    /// resets the connection, which loses what was in flight.
    links: BTreeMap<(usize, usize), u64>,
    seq: u64,
    /// (member id, step) → its gradient.
    grads: BTreeMap<(u32, u64), Vec<f32>>,
    /// Per node: step → contributors of its completion.
    history: Vec<BTreeMap<u64, Vec<MemberId>>>,
    stop_at: u64,
    report: ClusterReport,
    engine: ScalarEngine,
}

impl fmt::Debug for ClusterSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterSim")
            .field("seed", &self.sc.seed)
            .field("now", &self.now)
            .finish()
    }
}

impl ClusterSim {
    /// A cluster for `sc`.
    pub fn new(sc: ClusterScenario) -> ClusterSim {
        let ids: Vec<MemberId> = (0..sc.members).map(|i| MemberId(i as u32)).collect();
        let bootstrap = GroupState::bootstrap(
            ids.iter()
                .map(|&m| (m, format!("node{}", m.0), format!("127.0.0.{}:1", 10 + m.0))),
        );
        let roles = initial_roles(&ids, 3);
        let mut rng = SplitMix64::new(sc.seed);
        let detector = DetectorConfig::default();
        let nodes = ids
            .iter()
            .map(|&id| {
                let config = ControlConfig {
                    election_seed: Some(rng.next_u64()),
                    ..ControlConfig::default()
                };
                Node {
                    id,
                    alive: true,
                    paused_until: None,
                    control: ControlNode::new(
                        id,
                        config,
                        Some((bootstrap.clone(), &roles)),
                        None,
                        Time::ZERO,
                    )
                    .expect("node starts"),
                    disk: MemoryDisk::default(),
                    detector: FailureDetector::new(
                        detector,
                        ids.iter().copied().filter(|&m| m != id),
                        Time::ZERO,
                    ),
                    keeper: Housekeeper::new(Duration::from_millis(500), 3),
                    core: Collectives::with_incarnation(id, Incarnation(1), Config::default()),
                    params: vec![0.0; DIM],
                    step: 0,
                    stopped: None,
                    epoch: Epoch(1),
                    ring: ids.clone(),
                    admitted: true,
                    runs: BTreeMap::new(),
                    parked: None,
                    plans: BTreeMap::new(),
                    kept: None,
                    recovery: None,
                    report: None,
                    early: Vec::new(),
                    asked_at: Time::ZERO,
                    suspects: BTreeMap::new(),
                }
            })
            .collect();
        ClusterSim {
            rng,
            now: Time::ZERO,
            nodes,
            side: vec![0; sc.members],
            net: BinaryHeap::new(),
            payloads: BTreeMap::new(),
            links: BTreeMap::new(),
            seq: 0,
            grads: BTreeMap::new(),
            history: vec![BTreeMap::new(); sc.members],
            stop_at: u64::MAX,
            report: ClusterReport::default(),
            engine: ScalarEngine,
            sc,
        }
    }

    fn fail(&self, what: String) -> ClusterFailure {
        self_fail(&self.sc, self.now, what)
    }

    fn send(&mut self, from: usize, to: usize, p: Packet) {
        let jitter = self.rng.below(self.sc.jitter.as_micros() as u64 + 1);
        // One connection per pair delivers in order: never before the
        // previous message on the link.
        let at = self.now.after(Duration::from_micros(200 + jitter));
        let generation = self.link(from, to);
        self.seq += 1;
        self.payloads.insert(self.seq, (p, generation));
        self.net.push(Reverse((at, self.seq, from, to)));
    }

    fn link(&self, a: usize, b: usize) -> u64 {
        self.links.get(&(a.min(b), a.max(b))).copied().unwrap_or(0)
    }

    fn running(&self, i: usize) -> bool {
        self.nodes[i].alive && self.nodes[i].paused_until.is_none_or(|u| self.now >= u)
    }

    /// Runs the scenario.
    pub fn run(mut self) -> Result<ClusterReport, ClusterFailure> {
        let faults = self.sc.faults.clone();
        let mut next_fault = 0;
        let heal = Time::ZERO.after(self.sc.fault_phase);
        let stop_phase = heal.after(self.sc.heal_phase);
        let end = stop_phase.after(Duration::from_secs(5));
        let mut healed = false;
        let mut next_heartbeat = Time::ZERO;
        while self.now < end {
            while next_fault < faults.len() && Time::ZERO.after(faults[next_fault].0) <= self.now {
                match &faults[next_fault].1 {
                    ClusterFault::Crash(m) => self.nodes[*m].alive = false,
                    ClusterFault::Partition(side) => {
                        self.side = vec![0; self.sc.members];
                        for &m in side {
                            self.side[m] = 1;
                        }
                    }
                    ClusterFault::Pause(m, d) => {
                        self.nodes[*m].paused_until = Some(self.now.after(*d))
                    }
                    ClusterFault::Heal => self.side = vec![0; self.sc.members],
                }
                next_fault += 1;
            }
            if !healed && self.now >= heal {
                healed = true;
                self.side = vec![0; self.sc.members];
                for n in &mut self.nodes {
                    n.paused_until = None;
                }
            }
            if self.stop_at == u64::MAX && self.now >= stop_phase {
                let top = self.nodes.iter().map(|n| n.step).max().unwrap_or(0);
                self.stop_at = top + 3;
            }
            self.deliver()?;
            if self.now >= next_heartbeat {
                for a in 0..self.nodes.len() {
                    if self.running(a) {
                        for b in 0..self.nodes.len() {
                            if a != b {
                                self.send(a, b, Packet::Heartbeat);
                            }
                        }
                    }
                }
                next_heartbeat = self.now.after(Duration::from_millis(100));
            }
            for i in 0..self.nodes.len() {
                if self.running(i) {
                    self.step_node(i)?;
                }
            }
            self.now = self.now.after(STEP);
        }
        self.check_end()?;
        Ok(self.report)
    }

    fn deliver(&mut self) -> Result<(), ClusterFailure> {
        while let Some(Reverse((at, seq, from, to))) = self.net.peek().copied() {
            if at > self.now {
                break;
            }
            self.net.pop();
            let (p, generation) = self.payloads.remove(&seq).expect("payload");
            if !self.nodes[to].alive || !self.nodes[from].alive || generation != self.link(from, to)
            {
                continue;
            }
            // A partition holds messages back as QUIC does (it retransmits
            // after the heal); a stopped process's socket buffer holds them.
            let hold = if self.side[from] != self.side[to] {
                Some(self.now.after(Duration::from_millis(10)))
            } else {
                self.nodes[to].paused_until.filter(|&u| self.now < u)
            };
            if let Some(until) = hold {
                self.seq += 1;
                self.payloads.insert(self.seq, (p, generation));
                self.net.push(Reverse((until, self.seq, from, to)));
                continue;
            }
            let now = self.now;
            let from_id = self.nodes[from].id;
            self.nodes[to].detector.heard(from_id, now);
            match p {
                Packet::Raft(bytes) => {
                    let n = &mut self.nodes[to];
                    let msg = decode_message(&bytes, from_id, n.id).expect("well-formed");
                    let _ = n.control.step(msg);
                }
                Packet::Heartbeat => {}
                Packet::Frame(header, payload) => {
                    // Refused frames are logged and dropped by the daemon too:
                    // a late frame for an op this member aborted on a
                    // suspicion the sender never saw.
                    if self.nodes[to]
                        .core
                        .handle_frame(now, header, payload)
                        .is_err()
                    {
                        self.report.refused_frames += 1;
                    }
                    self.execute(to)?;
                }
                Packet::Report(report) => {
                    let n = &mut self.nodes[to];
                    let added = match n.recovery.as_mut() {
                        Some(rec) if rec.epoch() == report.epoch => {
                            let _ = rec.add(report);
                            true
                        }
                        _ if report.epoch > n.epoch => {
                            n.early.push(report);
                            false
                        }
                        _ => false,
                    };
                    if added {
                        self.finish_recovery(to)?;
                    }
                }
                Packet::Ask(epoch) => {
                    if let Some(r) = self.nodes[to].report.clone().filter(|r| r.epoch == epoch) {
                        self.send(to, from, Packet::Report(r));
                    }
                }
            }
        }
        Ok(())
    }

    fn step_node(&mut self, i: usize) -> Result<(), ClusterFailure> {
        let now = self.now;
        let mut resets = Vec::new();
        let n = &mut self.nodes[i];
        if n.control.poll_timeout() <= now {
            n.control.handle_timeout(now);
        }
        if n.core.poll_timeout().is_some_and(|t| t <= now) {
            n.core.handle_timeout(now);
        }
        for d in n.detector.poll(now) {
            match d {
                Decision::Suspect { member, reason } => {
                    n.suspects.insert(member, (reason.to_string(), None));
                    // The driver parks the ops that wait for a suspect, and
                    // drops its connection (what was in flight is lost).
                    n.core.handle_member_down(now, member);
                    resets.push(member.0 as usize);
                }
                Decision::Cleared { member } => {
                    n.suspects.remove(&member);
                }
            }
        }
        let group = n.control.group().clone();
        n.suspects.retain(|m, _| group.is_active(*m));
        for (&member, (reason, last)) in n.suspects.iter_mut() {
            if !n.admitted || last.is_some_and(|t| now.since(t) < Duration::from_millis(300)) {
                continue;
            }
            *last = Some(now);
            let _ = n.control.propose(&Command::Remove {
                member,
                by: n.id,
                epoch: group.epoch,
                reason: reason.clone(),
            });
        }
        // A trainer that stopped while its member is in the ring takes the
        // member out (the daemon does so when such a trainer joins again).
        if n.stopped.is_some() && n.control.group().is_active(n.id) {
            let _ = n.control.propose(&Command::Remove {
                member: n.id,
                by: n.id,
                epoch: n.control.group().epoch,
                reason: "its trainer stopped".into(),
            });
        }
        for p in n.keeper.poll(&n.control, Incarnation(1), "", false, now) {
            let _ = propose(&mut n.control, &p);
        }
        for j in resets {
            *self.links.entry((i.min(j), i.max(j))).or_insert(0) += 1;
        }
        let n = &mut self.nodes[i];
        let out = n
            .control
            .process(&mut n.disk)
            .map_err(|e| format!("m{i}: {e}"));
        let out = match out {
            Ok(o) => o,
            Err(e) => return Err(self.fail(e)),
        };
        for msg in out.messages {
            let to = destination(&msg).expect("raft id maps to a member").0 as usize;
            self.send(i, to, Packet::Raft(encode_message(&msg)));
        }
        let group = self.nodes[i].control.group().clone();
        if group.epoch > self.nodes[i].epoch {
            self.install(i, &group)?;
        }
        self.execute(i)?;
        self.expire_parked(i);
        self.ask_reports(i);
        self.train(i)?;
        self.execute(i)
    }

    fn install(&mut self, i: usize, group: &GroupState) -> Result<(), ClusterFailure> {
        let now = self.now;
        self.report.epochs = self.report.epochs.max(group.epoch.0 - 1);
        let n = &mut self.nodes[i];
        n.epoch = group.epoch;
        n.ring = group.ring();
        n.admitted = n.ring.contains(&n.id);
        n.core.set_epoch(now, group.epoch);
        n.plans.clear();
        n.recovery = None;
        n.report = None;
        self.execute(i)?;
        let n = &mut self.nodes[i];
        if !n.admitted {
            stop(n, &mut self.report, "removed from the group");
            return Ok(());
        }
        let report = RecoveryReport {
            epoch: n.epoch,
            member: n.id,
            parked: n
                .parked
                .iter()
                .map(|(op, run, _)| (*op, run.members.clone()))
                .collect(),
            completed: n
                .kept
                .iter()
                .map(|k| KeptResult {
                    op: k.op,
                    contributors: k.contributors.clone(),
                    waiting: Vec::new(),
                })
                .collect(),
        };
        let mut rec = Recovery::new(n.epoch, n.ring.clone());
        rec.add(report.clone()).expect("own report");
        for r in std::mem::take(&mut n.early) {
            if r.epoch == n.epoch {
                let _ = rec.add(r);
            } else if r.epoch > n.epoch {
                n.early.push(r);
            }
        }
        n.recovery = Some(rec);
        n.report = Some(report.clone());
        n.asked_at = now;
        let peers: Vec<usize> = n
            .ring
            .iter()
            .filter(|&&m| m != n.id)
            .map(|m| m.0 as usize)
            .collect();
        for p in peers {
            self.send(i, p, Packet::Report(report.clone()));
        }
        self.finish_recovery(i)
    }

    fn ask_reports(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let Some(rec) = &n.recovery else {
            return;
        };
        if self.now.since(n.asked_at) < Duration::from_millis(200) {
            return;
        }
        n.asked_at = self.now;
        let (epoch, missing) = (rec.epoch(), rec.missing());
        for m in missing {
            self.send(i, m.0 as usize, Packet::Ask(epoch));
        }
    }

    fn finish_recovery(&mut self, i: usize) -> Result<(), ClusterFailure> {
        let n = &mut self.nodes[i];
        let Some(rec) = n.recovery.as_ref().filter(|r| r.is_complete()) else {
            return Ok(());
        };
        let plans = rec.plans();
        n.recovery = None;
        let me = n.id;
        for (op, plan) in plans {
            let parked = n.parked.take_if(|(p, _, _)| *p == op);
            match (parked, plan) {
                (Some((op, mut run, _)), Plan::Rerun { members }) if members.contains(&me) => {
                    self.report.reruns += 1;
                    run.buf.clone_from(&run.input);
                    run.members = members;
                    start(n, op, run, None, self.now).map_err(|e| {
                        self_fail(&self.sc, self.now, format!("m{i} re-running {op}: {e}"))
                    })?;
                }
                (
                    Some((op, mut run, _)),
                    Plan::FromResult {
                        holder,
                        members,
                        contributors,
                        ..
                    },
                ) if members.contains(&me) => {
                    self.report.from_results += 1;
                    run.members = members;
                    run.contributors = Some(contributors);
                    start(n, op, run, Some(holder), self.now)
                        .map_err(|e| self_fail(&self.sc, self.now, format!("m{i}: {e}")))?;
                }
                (Some(_), plan) => stop(n, &mut self.report, &format!("{op}: {plan:?}")),
                (
                    None,
                    Plan::FromResult {
                        holder, members, ..
                    },
                ) if members.contains(&me) => {
                    let Some(k) = n.kept.as_ref().filter(|k| k.op == op) else {
                        return Err(self_fail(
                            &self.sc,
                            self.now,
                            format!("m{i} is to forward {op} but does not hold it"),
                        ));
                    };
                    let run = Run {
                        buf: k.output.clone(),
                        input: Vec::new(),
                        members,
                        trainer: false,
                        contributors: None,
                    };
                    start(n, op, run, Some(holder), self.now)
                        .map_err(|e| self_fail(&self.sc, self.now, format!("m{i}: {e}")))?;
                }
                (None, plan @ Plan::Rerun { .. }) => {
                    n.plans.insert(op, plan);
                }
                (None, _) => {}
            }
        }
        Ok(())
    }

    fn expire_parked(&mut self, i: usize) {
        let now = self.now;
        let n = &mut self.nodes[i];
        if n.parked
            .as_ref()
            .is_some_and(|(_, _, since)| now.since(*since) >= RECOVERY_TIMEOUT)
        {
            n.parked = None;
            stop(n, &mut self.report, "no new epoch in time (no quorum)");
        }
    }

    /// Issues the trainer's next step when it may.
    fn train(&mut self, i: usize) -> Result<(), ClusterFailure> {
        let n = &mut self.nodes[i];
        let busy = n.runs.values().any(|r| r.trainer) || n.parked.is_some();
        if busy
            || n.stopped.is_some()
            || !n.admitted
            || n.recovery.is_some()
            || n.step >= self.stop_at
        {
            return Ok(());
        }
        let g = step_gradient(n.id.0, n.step, &n.params);
        self.grads.insert((n.id.0, n.step), g.clone());
        let op = OpId(n.step + 1);
        let members = match n.plans.remove(&op) {
            Some(Plan::Rerun { members }) => members,
            _ => n.ring.clone(),
        };
        let input = f32_bytes(&g);
        let run = Run {
            buf: input.clone(),
            input,
            members,
            trainer: true,
            contributors: None,
        };
        start(n, op, run, None, self.now)
            .map_err(|e| self_fail(&self.sc, self.now, format!("m{i} starting {op}: {e}")))
    }

    /// Carries out the core's actions at node `i`.
    fn execute(&mut self, i: usize) -> Result<(), ClusterFailure> {
        let now = self.now;
        while let Some(action) = self.nodes[i].core.poll_action() {
            match action {
                Action::Send {
                    op,
                    to,
                    header,
                    range,
                } => {
                    let Some(run) = self.nodes[i].runs.get(&op) else {
                        continue;
                    };
                    let payload = run.buf[element_range(DType::F32, &range)].to_vec();
                    self.send(i, to.0 as usize, Packet::Frame(header, payload));
                }
                Action::Reduce { op, .. } | Action::Copy { op, .. } | Action::Divide { op, .. } => {
                    let n = &mut self.nodes[i];
                    let run = n.runs.get_mut(&op).expect("a piece for a known run");
                    if let Err(e) = apply_action(&self.engine, DType::F32, &mut run.buf, &action) {
                        return Err(self_fail(
                            &self.sc,
                            now,
                            format!("m{i} applying a piece of {op}: {e}"),
                        ));
                    }
                }
                Action::Complete {
                    op, contributors, ..
                } => {
                    let run = self.nodes[i].runs.remove(&op).expect("a known run");
                    if run.trainer {
                        self.completed(i, op, run, contributors)?;
                    }
                }
                Action::Aborted { op, reason, .. } => {
                    let n = &mut self.nodes[i];
                    if let Some(run) = n.runs.remove(&op) {
                        if run.trainer {
                            n.parked = Some((op, run, now));
                        }
                    }
                    let _ = reason;
                }
            }
        }
        Ok(())
    }

    fn completed(
        &mut self,
        i: usize,
        op: OpId,
        run: Run,
        contributors: Vec<MemberId>,
    ) -> Result<(), ClusterFailure> {
        let contributors = run.contributors.clone().unwrap_or(contributors);
        let step = op.0 - 1;
        let mut want: Option<Vec<f32>> = None;
        for m in &contributors {
            let Some(g) = self.grads.get(&(m.0, step)) else {
                return Err(self.fail(format!(
                    "m{i} {op}: contributor {m} never issued step {step}"
                )));
            };
            match want.as_mut() {
                None => want = Some(g.clone()),
                Some(w) => w.iter_mut().zip(g).for_each(|(w, g)| *w += g),
            }
        }
        let got = f32s(&run.buf);
        let want = want.unwrap_or_default();
        if got.len() != want.len()
            || got
                .iter()
                .zip(&want)
                .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(self.fail(format!(
                "m{i} {op}: the result is not the sum over its contributors {contributors:?}"
            )));
        }
        let n = &mut self.nodes[i];
        let k = contributors.len() as f32;
        for (w, s) in n.params.iter_mut().zip(&got) {
            *w -= 1e-3 * s / k;
        }
        n.step += 1;
        n.kept = Some(Kept {
            op,
            contributors: contributors.clone(),
            output: run.buf,
        });
        self.history[i].insert(step, contributors);
        self.report.completions += 1;
        Ok(())
    }

    fn check_end(&mut self) -> Result<(), ClusterFailure> {
        let alive: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive)
            .collect();
        let leaders = alive
            .iter()
            .filter(|&&i| self.nodes[i].control.is_leader())
            .count();
        if leaders != 1 {
            return Err(self.fail(format!("{leaders} leaders after the heal")));
        }
        let epoch = self.nodes[alive[0]].control.group().epoch;
        if let Some(&i) = alive
            .iter()
            .find(|&&i| self.nodes[i].control.group().epoch != epoch)
        {
            return Err(self.fail(format!(
                "m{i} is at {} after the heal, m{} at {epoch}",
                self.nodes[i].control.group().epoch,
                alive[0]
            )));
        }
        let ring = self.nodes[alive[0]].control.group().ring();
        let training: Vec<usize> = alive
            .iter()
            .copied()
            .filter(|&i| self.nodes[i].stopped.is_none())
            .collect();
        let in_ring: Vec<usize> = ring.iter().map(|m| m.0 as usize).collect();
        if training.is_empty() {
            // The faults cost the group its Raft quorum for longer than
            // `RECOVERY_TIMEOUT`: every trainer was told `NoQuorum`. Real
            // trainers would join() again; this model has no hand-over, so
            // the run ends here (the sweep bounds how often).
            self.report.no_survivors = true;
            return Ok(());
        }
        if training != in_ring {
            let why: Vec<String> = self
                .nodes
                .iter()
                .map(|n| format!("{}: {:?}", n.id, n.stopped))
                .collect();
            return Err(self.fail(format!(
                "after the heal the ring is {ring:?} but the trainers still training are \
                 {training:?} (stopped: {why:?})"
            )));
        }
        let first = training[0];
        for &i in &training {
            let n = &self.nodes[i];
            if n.step != self.stop_at {
                let runs: Vec<(OpId, &Vec<MemberId>, bool)> = n
                    .runs
                    .iter()
                    .map(|(op, r)| (*op, &r.members, r.trainer))
                    .collect();
                return Err(self.fail(format!(
                    "m{i} reached step {} of {} (stopped: {:?}; in {} ring {:?}; runs {runs:?}; \
                     parked {:?}; waiting for reports from {:?})",
                    n.step,
                    self.stop_at,
                    n.stopped,
                    n.epoch,
                    n.ring,
                    n.parked.as_ref().map(|p| (p.0, &p.1.members)),
                    n.recovery.as_ref().map(|r| r.missing()),
                )));
            }
            let same = n
                .params
                .iter()
                .zip(&self.nodes[first].params)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            if !same {
                return Err(self.fail(format!("m{i} and m{first} hold different parameters")));
            }
            if self.history[i] != self.history[first] {
                return Err(self.fail(format!(
                    "m{i} and m{first} completed steps with different contributors"
                )));
            }
        }
        self.report.final_step = self.stop_at;
        Ok(())
    }
}

fn self_fail(sc: &ClusterScenario, now: Time, what: String) -> ClusterFailure {
    ClusterFailure {
        scenario: Box::new(sc.clone()),
        what,
        at: Duration::from_micros(now.0),
    }
}

fn stop(n: &mut Node, report: &mut ClusterReport, why: &str) {
    if n.stopped.is_none() {
        n.stopped = Some(why.to_string());
        report.stopped += 1;
    }
    n.parked = None;
    n.runs.retain(|_, r| !r.trainer);
}

/// Starts `op` (a broadcast from `root` when given, else the all-reduce).
fn start(
    n: &mut Node,
    op: OpId,
    run: Run,
    root: Option<MemberId>,
    now: Time,
) -> Result<(), String> {
    let spec = OpSpec {
        op,
        epoch: n.epoch,
        step: Step(op.0),
        kind: match root {
            Some(root) => Kind::Broadcast { root },
            None => Kind::AllReduce(ReduceOp::Sum),
        },
        algorithm: Algorithm::Auto,
        dtype: DType::F32,
        len: DIM,
        members: run.members.clone(),
    };
    n.runs.insert(op, run);
    n.core.start(now, spec).map_err(|e| {
        n.runs.remove(&op);
        e.to_string()
    })
}

/// Runs the scenario of `seed`.
pub fn run_seed(seed: u64) -> Result<ClusterReport, ClusterFailure> {
    ClusterSim::new(ClusterScenario::from_seed(seed)).run()
}
