//! Deterministic simulation of the control plane: raft-rs nodes
//! ([`ControlNode`]) with the failure detector and the standing policy
//! ([`Housekeeper`]) of every daemon, over a seeded network that delays,
//! drops and partitions, with members crashing (losing everything not yet
//! persisted) and restarting in a new life.
//!
//! A run has a *safety* phase with faults, then a *liveness* phase after the
//! heal. Safety is checked throughout: one leader per term, every applied
//! index gives the same result on every member, one ring per epoch, epochs
//! never go back on a member. Liveness is checked at the end: every member
//! runs, agrees on the epoch, and is back in the ring.
//!
//! In about half the seeds only the first members bootstrap the group (one
//! of them alone, as `phalanxd --bootstrap` does) and the others join it as
//! `phalanxd --join` does: they start with no configuration, ask a random
//! member to enrol them, and are brought up to date by a snapshot. Half the
//! seeds compact the log every few entries, so members that fall behind
//! (crashed, cut off) are restored from snapshots too.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt;
use std::time::Duration;

use phalanx_protocol::membership::control::{
    decode_message, destination, encode_message, initial_roles, propose, ControlConfig,
    ControlNode, Event, Housekeeper, MemoryDisk, Persisted,
};
use phalanx_protocol::membership::{
    Applied, Command, Decision, DetectorConfig, FailureDetector, GroupState,
};
use phalanx_protocol::rng::SplitMix64;
use phalanx_protocol::{Epoch, Incarnation, MemberId, Time};

mod checkpoints;
pub use checkpoints::{CheckpointLoad, CheckpointReport, Stage, Trigger, Victim};

/// Simulation step.
const STEP: Duration = Duration::from_millis(5);

/// A fault schedule drawn from a seed.
#[derive(Clone, Debug)]
pub struct ControlScenario {
    /// The seed.
    pub seed: u64,
    /// Members.
    pub members: usize,
    /// Voters.
    pub voters: usize,
    /// How many members (the lowest ids) bootstrap the group; the others
    /// join it.
    pub bootstrapped: usize,
    /// Applied entries between snapshots.
    pub snapshot_every: u64,
    /// Length of the fault phase.
    pub fault_phase: Duration,
    /// Length of the liveness phase.
    pub heal_phase: Duration,
    /// Per-message drop probability during the fault phase.
    pub drop: f64,
    /// Largest extra delay during the fault phase.
    pub jitter: Duration,
    /// Faults, in time order.
    pub faults: Vec<(Duration, Fault)>,
    /// A checkpoint workload beside the control plane (the checkpoint
    /// sweep), with its own crashes at the stages of a save.
    pub checkpoints: Option<CheckpointLoad>,
}

/// One fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The member's process dies: unpersisted state is lost.
    Crash(usize),
    /// The member starts again, in a new life.
    Restart(usize),
    /// The members are split into two sides.
    Partition(Vec<usize>),
    /// The network is whole again.
    Heal,
    /// The member stops (SIGSTOP) for a while, then goes on.
    Pause(usize, Duration),
}

impl ControlScenario {
    /// The scenario of `seed`.
    pub fn from_seed(seed: u64) -> ControlScenario {
        let mut rng = SplitMix64::new(seed ^ 0xC0A7_2011);
        let members = rng.range_inclusive(3, 7) as usize;
        let voters = if members >= 5 && rng.chance(0.5) {
            5
        } else {
            3
        };
        let fault_phase = Duration::from_millis(rng.range_inclusive(3_000, 8_000));
        let mut faults = Vec::new();
        let n_faults = rng.range_inclusive(1, 5);
        let mut crashed = vec![false; members];
        for _ in 0..n_faults {
            let at =
                Duration::from_millis(rng.range_inclusive(300, fault_phase.as_millis() as u64));
            let m = rng.below(members as u64) as usize;
            let fault = match rng.below(5) {
                0 | 1 => {
                    if crashed[m] {
                        Fault::Restart(m)
                    } else {
                        crashed[m] = true;
                        Fault::Crash(m)
                    }
                }
                2 => {
                    let side: Vec<usize> = (0..members).filter(|_| rng.chance(0.35)).collect();
                    if side.is_empty() || side.len() == members {
                        Fault::Partition(vec![m])
                    } else {
                        Fault::Partition(side)
                    }
                }
                3 => Fault::Pause(m, Duration::from_millis(rng.range_inclusive(100, 2_000))),
                _ => Fault::Heal,
            };
            faults.push((at, fault));
        }
        faults.sort_by_key(|(at, _)| *at);
        let bootstrapped = if rng.chance(0.5) {
            members
        } else {
            rng.range_inclusive(1, members as u64 - 1) as usize
        };
        let snapshot_every = if rng.chance(0.5) {
            rng.range_inclusive(4, 64)
        } else {
            ControlConfig::default().snapshot_every
        };
        ControlScenario {
            seed,
            members,
            voters,
            bootstrapped,
            snapshot_every,
            fault_phase,
            heal_phase: Duration::from_secs(30),
            drop: if rng.chance(0.5) {
                rng.unit() * 0.1
            } else {
                0.0
            },
            jitter: Duration::from_millis(rng.range_inclusive(0, 40)),
            faults,
            checkpoints: None,
        }
    }

    /// The scenario of `seed` with a checkpoint workload drawn from the
    /// same seed: the control plane's faults, plus crashes at the stages of
    /// chosen saves and corrupted chunks.
    pub fn with_checkpoints(seed: u64) -> ControlScenario {
        let mut sc = ControlScenario::from_seed(seed);
        sc.checkpoints = Some(CheckpointLoad::from_seed(seed, sc.fault_phase));
        sc
    }

    /// The command that replays this scenario.
    pub fn replay(&self) -> String {
        format!(
            "cargo run --release --locked -p phalanx-tests --bin phalanx-sim -- {} --seed {}",
            if self.checkpoints.is_some() {
                "checkpoint"
            } else {
                "control"
            },
            self.seed
        )
    }
}

/// What a run saw.
#[derive(Clone, Debug, Default)]
pub struct ControlReport {
    /// Epochs committed.
    pub epochs: u64,
    /// Leader changes observed.
    pub leader_changes: u64,
    /// Voter swaps applied.
    pub role_changes: u64,
    /// Restarts.
    pub restarts: u64,
    /// Snapshots installed from a leader.
    pub restores: u64,
    /// Members enrolled by joining.
    pub enrolled: u64,
    /// Messages dropped by the network.
    pub dropped: u64,
    /// The checkpoint workload's figures, when there was one.
    pub checkpoints: Option<CheckpointReport>,
}

/// A failed run.
#[derive(Debug)]
pub struct ControlFailure {
    /// The scenario.
    pub scenario: Box<ControlScenario>,
    /// What broke.
    pub what: String,
    /// Virtual time.
    pub at: Duration,
}

impl fmt::Display for ControlFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "control seed {} failed at {:?}: {}",
            self.scenario.seed, self.at, self.what
        )?;
        writeln!(f, "scenario: {:?}", self.scenario)?;
        write!(f, "replay: {}", self.scenario.replay())
    }
}

enum Packet {
    Raft(Vec<u8>),
    Heartbeat,
    /// A joining member asks to be enrolled.
    Join(MemberId),
}

struct Member {
    id: MemberId,
    node: Option<ControlNode>,
    disk: MemoryDisk,
    detector: FailureDetector,
    keeper: Housekeeper,
    incarnation: Incarnation,
    paused_until: Option<Time>,
    last_epoch: Epoch,
    ck: Option<checkpoints::Ck>,
}

/// The simulated cluster.
#[allow(missing_debug_implementations)] // raft-rs nodes are not `Debug`-friendly
pub struct ControlSim {
    sc: ControlScenario,
    rng: SplitMix64,
    now: Time,
    members: Vec<Member>,
    side: Vec<u8>,
    net: BinaryHeap<Reverse<(Time, u64, usize, usize)>>,
    payloads: HashMap<u64, Packet>,
    seq: u64,
    healed: bool,
    config: ControlConfig,
    detector: DetectorConfig,
    bootstrap: GroupState,
    leaders: BTreeMap<u64, MemberId>,
    applied: BTreeMap<u64, Applied>,
    rings: BTreeMap<Epoch, Vec<MemberId>>,
    /// Faults decided during the run (crashes at a stage of a save), in no
    /// order.
    later: Vec<(Time, Fault)>,
    ckpt: Option<checkpoints::Plane>,
    /// What happened.
    pub report: ControlReport,
}

fn addr(i: usize) -> String {
    format!("127.0.0.{}:7000", 10 + i)
}

impl ControlSim {
    /// A cluster for `sc`.
    pub fn new(sc: ControlScenario) -> ControlSim {
        let ids: Vec<MemberId> = (0..sc.members).map(|i| MemberId(i as u32)).collect();
        let bootstrap = GroupState::bootstrap(
            ids[..sc.bootstrapped]
                .iter()
                .map(|&m| (m, format!("node{}", m.0), addr(m.0 as usize))),
        );
        let config = ControlConfig {
            snapshot_every: sc.snapshot_every,
            ..ControlConfig::default()
        };
        let detector = DetectorConfig::default();
        let mut sim = ControlSim {
            rng: SplitMix64::new(sc.seed),
            now: Time::ZERO,
            members: Vec::new(),
            side: vec![0; sc.members],
            net: BinaryHeap::new(),
            payloads: HashMap::new(),
            seq: 0,
            healed: false,
            config,
            detector,
            bootstrap,
            leaders: BTreeMap::new(),
            applied: BTreeMap::new(),
            rings: BTreeMap::new(),
            later: Vec::new(),
            ckpt: sc.checkpoints.clone().map(checkpoints::Plane::new),
            report: ControlReport::default(),
            sc,
        };
        for &id in &ids {
            let node = sim.start_node(id, None);
            sim.members.push(Member {
                id,
                node: Some(node),
                disk: MemoryDisk::default(),
                detector: FailureDetector::new(detector, others(&ids, id), Time::ZERO),
                keeper: Housekeeper::new(Duration::from_millis(500), sim.sc.voters),
                incarnation: Incarnation(1),
                paused_until: None,
                last_epoch: if (id.0 as usize) < sim.sc.bootstrapped {
                    Epoch(1)
                } else {
                    Epoch(0)
                },
                ck: sim
                    .sc
                    .checkpoints
                    .as_ref()
                    .map(|load| checkpoints::Ck::new(id, load)),
            });
        }
        sim
    }

    fn start_node(&mut self, id: MemberId, persisted: Option<Persisted>) -> ControlNode {
        let ids: Vec<MemberId> = (0..self.sc.bootstrapped)
            .map(|i| MemberId(i as u32))
            .collect();
        let roles = initial_roles(&ids, self.sc.voters);
        let joiner = id.0 as usize >= self.sc.bootstrapped;
        // Each life draws its election timeouts from the seed (see
        // `ControlConfig::election_seed`).
        let config = ControlConfig {
            election_seed: Some(self.rng.next_u64()),
            ..self.config
        };
        ControlNode::new(
            id,
            config,
            (!joiner).then(|| (self.bootstrap.clone(), &roles)),
            persisted,
            self.now,
        )
        .expect("node starts")
    }

    fn fail(&self, what: String) -> ControlFailure {
        ControlFailure {
            scenario: Box::new(self.sc.clone()),
            what,
            at: Duration::from_micros(self.now.0),
        }
    }

    fn send(&mut self, from: usize, to: usize, p: Packet) {
        if !self.healed && self.rng.chance(self.sc.drop) {
            self.report.dropped += 1;
            return;
        }
        let jitter = if self.healed {
            0
        } else {
            self.rng.below(self.sc.jitter.as_micros() as u64 + 1)
        };
        let at = self
            .now
            .after(Duration::from_micros(200 + jitter + self.rng.below(300)));
        self.seq += 1;
        self.payloads.insert(self.seq, p);
        self.net.push(Reverse((at, self.seq, from, to)));
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.side[a] == self.side[b]
    }

    fn running(&self, i: usize) -> bool {
        self.members[i].node.is_some()
            && self.members[i]
                .paused_until
                .is_none_or(|until| self.now >= until)
    }

    fn apply_fault(&mut self, fault: &Fault) {
        match fault {
            Fault::Crash(m) => {
                self.members[*m].node = None;
                if let Some(ck) = self.members[*m].ck.as_mut() {
                    ck.crash();
                }
            }
            Fault::Restart(m) => self.restart(*m),
            Fault::Partition(side) => {
                self.side = vec![0; self.sc.members];
                for &m in side {
                    self.side[m] = 1;
                }
            }
            Fault::Heal => self.side = vec![0; self.sc.members],
            Fault::Pause(m, d) => self.members[*m].paused_until = Some(self.now.after(*d)),
        }
    }

    fn restart(&mut self, m: usize) {
        if self.members[m].node.is_some() {
            return;
        }
        let id = self.members[m].id;
        let persisted = self.members[m].disk.state.clone();
        let node = self.start_node(id, Some(persisted));
        let ids: Vec<MemberId> = (0..self.sc.members).map(|i| MemberId(i as u32)).collect();
        let voters = self.sc.voters;
        let mem = &mut self.members[m];
        mem.node = Some(node);
        mem.incarnation = Incarnation(mem.incarnation.0 + 1);
        mem.detector = FailureDetector::new(self.detector, others(&ids, id), self.now);
        mem.keeper = Housekeeper::new(Duration::from_millis(500), voters);
        if let (Some(ck), Some(load)) = (mem.ck.as_mut(), self.sc.checkpoints.as_ref()) {
            ck.restart(id, load);
        }
        self.report.restarts += 1;
    }

    /// Runs the scenario.
    pub fn run(mut self) -> Result<ControlReport, ControlFailure> {
        let faults = self.sc.faults.clone();
        let mut next_fault = 0;
        let fault_end = Time::ZERO.after(self.sc.fault_phase);
        let end = fault_end.after(self.sc.heal_phase);
        let mut next_heartbeat = Time::ZERO;
        if let Some(plane) = self.ckpt.as_mut() {
            plane.quiet_from = Time(end.0.saturating_sub(5_000_000));
        }
        while self.now < end {
            while next_fault < faults.len() && Time::ZERO.after(faults[next_fault].0) <= self.now {
                let f = faults[next_fault].1.clone();
                self.apply_fault(&f);
                next_fault += 1;
            }
            if !self.healed {
                let now = self.now;
                let due: Vec<Fault> = self
                    .later
                    .iter()
                    .filter(|(at, _)| *at <= now)
                    .map(|(_, f)| f.clone())
                    .collect();
                self.later.retain(|(at, _)| *at > now);
                for f in &due {
                    self.apply_fault(f);
                }
            }
            if !self.healed && self.now >= fault_end {
                self.healed = true;
                self.side = vec![0; self.sc.members];
                for m in 0..self.sc.members {
                    self.members[m].paused_until = None;
                    self.restart(m);
                }
            }
            self.deliver();
            if self.now >= next_heartbeat {
                for a in 0..self.sc.members {
                    if !self.running(a) {
                        continue;
                    }
                    for b in 0..self.sc.members {
                        if a != b {
                            self.send(a, b, Packet::Heartbeat);
                        }
                    }
                }
                next_heartbeat = next_heartbeat.after(self.detector.heartbeat_interval);
                // Joiners not yet known ask a random member, as often as
                // `phalanxd --join` does (every 500 ms).
                if self.now.0 % 500_000 < self.detector.heartbeat_interval.as_micros() as u64 {
                    for j in self.sc.bootstrapped..self.sc.members {
                        let known = self.members[j]
                            .node
                            .as_ref()
                            .is_some_and(|n| n.group().members.contains_key(&MemberId(j as u32)));
                        if self.running(j) && !known {
                            let to = self.rng.below(self.sc.bootstrapped as u64) as usize;
                            self.send(j, to, Packet::Join(MemberId(j as u32)));
                        }
                    }
                }
            }
            for m in 0..self.sc.members {
                if self.running(m) {
                    self.step_member(m)?;
                }
            }
            self.now = self.now.after(STEP);
        }
        self.check_converged()?;
        self.checkpoint_converged()?;
        self.report.checkpoints = self.ckpt.take().map(|p| p.report);
        Ok(self.report)
    }

    fn deliver(&mut self) {
        while let Some(Reverse((at, seq, from, to))) = self.net.peek().copied() {
            if at > self.now {
                break;
            }
            self.net.pop();
            let p = self.payloads.remove(&seq).expect("payload");
            if !self.reachable(from, to) || !self.running(to) {
                // A paused member's socket buffer would hold these; a
                // partition or a dead process loses them.
                if self.members[to].node.is_some()
                    && self.members[to].paused_until.is_some()
                    && self.reachable(from, to)
                {
                    let until = self.members[to].paused_until.expect("paused");
                    self.seq += 1;
                    self.payloads.insert(self.seq, p);
                    self.net.push(Reverse((until, self.seq, from, to)));
                }
                continue;
            }
            let now = self.now;
            let mem = &mut self.members[to];
            let from_id = MemberId(from as u32);
            mem.detector.heard(from_id, now);
            let node = mem.node.as_mut().expect("running");
            match p {
                Packet::Raft(bytes) => {
                    let msg = decode_message(&bytes, from_id, mem.id).expect("well-formed");
                    let _ = node.step(msg);
                }
                Packet::Join(joiner) => {
                    let _ = node.propose_enroll(
                        joiner,
                        &format!("node{}", joiner.0),
                        &addr(joiner.0 as usize),
                    );
                }
                Packet::Heartbeat => {}
            }
        }
    }

    fn step_member(&mut self, m: usize) -> Result<(), ControlFailure> {
        let now = self.now;
        let mem = &mut self.members[m];
        let node = mem.node.as_mut().expect("running");
        if node.poll_timeout() <= now {
            node.handle_timeout(now);
        }
        let mut proposals = Vec::new();
        for d in mem.detector.poll(now) {
            if let Decision::Suspect { member, reason } = d {
                if node.group().is_active(member) {
                    proposals.push(Command::Remove {
                        member,
                        by: mem.id,
                        epoch: node.group().epoch,
                        reason: reason.to_string(),
                    });
                }
            }
        }
        for cmd in &proposals {
            let _ = node.propose(cmd);
        }
        // Every simulated trainer wants back in as soon as it can.
        for p in mem.keeper.poll(node, mem.incarnation, &addr(m), true, now) {
            let _ = propose(node, &p);
        }
        let out = match node.process(&mut mem.disk) {
            Ok(o) => o,
            Err(e) => return Err(self.fail(format!("member {m}: {e}"))),
        };
        let (is_leader, term) = (node.is_leader(), node.term());
        let epoch = node.group().epoch;
        let ring = node.group().ring();
        if epoch < mem.last_epoch {
            let was = mem.last_epoch;
            return Err(self.fail(format!("member {m} went back from {was} to {epoch}")));
        }
        mem.last_epoch = epoch;
        for msg in out.messages {
            let to = destination(&msg).expect("raft id maps to a member").0 as usize;
            if to < self.sc.members {
                self.send(m, to, Packet::Raft(encode_message(&msg)));
            }
        }
        if is_leader {
            match self.leaders.get(&term) {
                Some(&l) if l != MemberId(m as u32) => {
                    return Err(self.fail(format!("two leaders in term {term}: {l} and m{m}")))
                }
                _ => {
                    self.leaders.insert(term, MemberId(m as u32));
                }
            }
        }
        let mut first_applied = Vec::new();
        for ev in out.events {
            match ev {
                Event::Applied { index, applied } => {
                    if let Some(prev) = self.applied.get(&index) {
                        if *prev != applied {
                            return Err(self.fail(format!(
                                "index {index}: member {m} applied {applied:?}, another {prev:?}"
                            )));
                        }
                    } else {
                        match applied {
                            Applied::NewEpoch { .. } => self.report.epochs += 1,
                            Applied::Enrolled { .. } => self.report.enrolled += 1,
                            _ => {}
                        }
                        first_applied.push(applied.clone());
                        self.applied.insert(index, applied);
                    }
                }
                Event::Leader { .. } => self.report.leader_changes += 1,
                Event::Roles(_) => self.report.role_changes += 1,
                Event::Restored { .. } => self.report.restores += 1,
            }
        }
        match self.rings.get(&epoch) {
            Some(r) if *r != ring => {
                return Err(self.fail(format!(
                    "split brain: epoch {epoch} has ring {r:?} and {ring:?} (member {m})"
                )))
            }
            _ => {
                self.rings.insert(epoch, ring);
            }
        }
        for applied in &first_applied {
            self.checkpoint_applied(applied)?;
        }
        self.checkpoint_step(m)
    }

    fn check_converged(&self) -> Result<(), ControlFailure> {
        let states: Vec<&GroupState> = self
            .members
            .iter()
            .map(|m| m.node.as_ref().expect("all restarted").group())
            .collect();
        let first = states[0];
        for (i, s) in states.iter().enumerate() {
            if s.epoch != first.epoch || s.ring() != first.ring() {
                return Err(self.fail(format!(
                    "after the heal, member {i} is at {} ring {:?}, member 0 at {} ring {:?}",
                    s.epoch,
                    s.ring(),
                    first.epoch,
                    first.ring()
                )));
            }
        }
        if first.ring().len() != self.sc.members {
            return Err(self.fail(format!(
                "after the heal, the ring is {:?}: not every member was readmitted",
                first.ring()
            )));
        }
        for (i, m) in self.members.iter().enumerate() {
            let rec = &first.members[&m.id];
            if rec.incarnation != m.incarnation {
                return Err(self.fail(format!(
                    "member {i} runs life {} but the group records {}",
                    m.incarnation, rec.incarnation
                )));
            }
        }
        let leaders = self
            .members
            .iter()
            .filter(|m| m.node.as_ref().is_some_and(|n| n.is_leader()))
            .count();
        if leaders != 1 {
            return Err(self.fail(format!("{leaders} leaders after the heal")));
        }
        let voters = &self.members[0]
            .node
            .as_ref()
            .expect("running")
            .roles()
            .voters;
        if voters.len() != self.sc.voters.min(self.sc.members) {
            return Err(self.fail(format!("voters after the heal: {voters:?}")));
        }
        Ok(())
    }
}

fn others(ids: &[MemberId], me: MemberId) -> Vec<MemberId> {
    ids.iter().copied().filter(|&m| m != me).collect()
}

/// Runs the scenario of `seed`.
pub fn run_seed(seed: u64) -> Result<ControlReport, ControlFailure> {
    ControlSim::new(ControlScenario::from_seed(seed)).run()
}
