//! Deterministic simulation of the whole failure path at once, on the code
//! the daemon ships: every member runs the control plane the daemon's
//! control task runs ([`ControlPlane`]: raft-rs, the suspicions it proposes,
//! the standing policy) *and* the daemon's data path ([`Node`]: the
//! collective core, recovery, joins, liveness), with a trainer that
//! all-reduces one gradient per step — the README's trainer loop: it hands
//! its state over (`admit`) when a result says members are waiting, and
//! when a call fails it joins again (`join`) and goes on from the state it
//! receives. The simulator only moves bytes: it delivers what the nodes
//! send over a seeded network, runs their timers on a virtual clock, and
//! feeds each node the group its control plane applied. Members crash,
//! pause and are partitioned off (links hold what is in flight, as QUIC
//! does, unless a node resets them), then everything heals.
//!
//! Safety, checked on every completion: the result is exactly the sum over
//! the contributors it names. At the end: the trainers agree on every step's
//! contributors and hold bit-identical parameters. Liveness, after the
//! heal: one leader, one epoch, and every member that did not crash trains
//! on to a common step (a trainer that failed has joined again).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;
use std::time::Duration;

use crate::tensor::{f32_bytes, f32s, step_gradient};
use phalanx_compute::{EngineArithmetic, ScalarEngine};
use phalanx_protocol::local::LocalKind;
use phalanx_protocol::membership::control::{
    decode_message, destination, encode_message, initial_roles, ControlConfig, ControlNode, Event,
    MemoryDisk,
};
use phalanx_protocol::membership::{Applied, ControlPlane, GroupState};
use phalanx_protocol::node::{
    Action, Event as NodeEvent, JoinRequest, Mode, Node, NodeConfig, OpDone, OpError, Request,
    RequestId,
};
use phalanx_protocol::rng::SplitMix64;
use phalanx_protocol::stragglers::QuorumPolicy;
use phalanx_protocol::wire::{DType, FrameHeader, Held, NodeMessage, ReduceOp};
use phalanx_protocol::{Incarnation, MemberId, OpId, Time};

const STEP: Duration = Duration::from_millis(1);
/// Parameters per replica; the state a trainer hands over is these and its
/// step counter.
const DIM: usize = 48;
/// A parked op with no new epoch in this long fails (`recovery_timeout`).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(2);
/// The link generation of a message already in its receiver's socket: a
/// reset no longer takes it back.
const IN_SOCKET: u64 = u64::MAX;
/// How much later than its data path a stopped daemon's control plane
/// applies what came while it was stopped.
const CONTROL_LAG: Duration = Duration::from_millis(5);
/// How often a proposal is retried (the daemon's control task uses the same).
const RETRY: Duration = Duration::from_millis(300);

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
    /// The policy steps close by (the cut path, its stand-ins and
    /// observers, when not sync).
    pub policy: QuorumPolicy,
    /// A member whose trainer computes this long before each step it does
    /// not skip (it skips the steps that closed without it, as the README's
    /// loop does).
    pub slow: Option<(usize, Duration)>,
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
    /// The next member to start handing its state to a joiner from here on
    /// while another member also holds it dies as it starts (before any of
    /// it arrives), unless a member has crashed already.
    CrashHandOverRoot,
    /// The network splits the members three ways (member m on side m mod
    /// 3, so no two of the three Raft voters share a side) until the heal,
    /// longer than the recovery bound: no side commits an epoch, every
    /// member is fenced, and every trainer rejoins. (Not one side each: a
    /// member that hears nobody at all blames itself and suspects no one.)
    Split,
    /// The connection between the two members is lost with what is in
    /// flight on it (a middlebox or NIC reset; neither daemon asked for
    /// it): both ends see it closed, and it is redialled at once.
    CutLink(usize, usize),
    /// The member runs in bursts until the heal, as a process starved of
    /// CPU does: stopped for 100 ms, then for 25 ms longer each time up to
    /// 350 ms, running 150 ms between. Its heartbeats come up to 450 ms
    /// apart, yet it is alive. (Built by hand, not drawn.)
    Starve(usize),
}

/// Stretches of a [`ClusterFault::Starve`]: the first stop, its growth, the
/// longest, and the run between stops.
const STARVE: [Duration; 4] = [
    Duration::from_millis(100),
    Duration::from_millis(25),
    Duration::from_millis(350),
    Duration::from_millis(150),
];

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
        let jitter = Duration::from_micros(rng.range_inclusive(0, 2_000));
        // Drawn last, so the schedules above stay those of earlier versions.
        if !crashed && rng.below(3) == 0 {
            let at =
                Duration::from_millis(rng.range_inclusive(300, fault_phase.as_millis() as u64));
            faults.push((at, ClusterFault::CrashHandOverRoot));
        }
        // Drawn after the faults, for the same reason: half the seeds close
        // steps by `backup=1` with one trainer a few times slower than the
        // group's step.
        let (policy, slow) = if rng.below(2) == 0 {
            let policy = QuorumPolicy {
                backup: 1,
                ..QuorumPolicy::SYNC
            };
            let m = rng.below(members as u64) as usize;
            let compute = Duration::from_micros(rng.range_inclusive(2_000, 12_000));
            (policy, Some((m, compute)))
        } else {
            (QuorumPolicy::SYNC, None)
        };
        // Drawn last, for the same reason: one seed in eight with four
        // members or more also loses its quorum once training runs (the
        // group forms in about a second), over its other faults and policy,
        // until the heal, which comes when the split has outlived the
        // recovery bound twice.
        let mut fault_phase = fault_phase;
        if rng.below(8) == 0 && members >= 4 {
            let at = Duration::from_millis(rng.range_inclusive(1_500, 2_500));
            fault_phase = fault_phase.max(at + RECOVERY_TIMEOUT * 2);
            faults.push((at, ClusterFault::Split));
        }
        // Drawn last, for the same reason: one seed in four loses a
        // connection mid-training, as networks do.
        if rng.below(4) == 0 && !faults.iter().any(|(_, f)| *f == ClusterFault::Split) {
            let at =
                Duration::from_millis(rng.range_inclusive(300, fault_phase.as_millis() as u64));
            let a = rng.below(members as u64) as usize;
            let b = (a + 1 + rng.below(members as u64 - 1) as usize) % members;
            faults.push((at, ClusterFault::CutLink(a, b)));
        }
        faults.sort_by_key(|(at, _)| *at);
        ClusterScenario {
            seed,
            members,
            fault_phase,
            heal_phase: Duration::from_secs(8),
            jitter,
            faults,
            policy,
            slow,
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
    /// Interrupted ops finished by re-running them.
    pub reruns: u64,
    /// ... by broadcasting a kept result.
    pub from_results: u64,
    /// Trainer calls that failed (the trainer then joined again).
    pub stopped: u64,
    /// Joins answered with the group's state.
    pub rejoined: u64,
    /// Members removed while their trainers were in lockstep that came back
    /// without an error, served the results they missed.
    pub returned: u64,
    /// Results so served.
    pub caught_up: u64,
    /// Such members whose return was refused (their trainers joined again).
    pub returns_refused: u64,
    /// Doubts after a pause, by how they ended (`confirmed`, `removed`,
    /// `failed`).
    pub doubts: BTreeMap<&'static str, u64>,
    /// State hand-overs by live trainers.
    pub hand_overs: u64,
    /// Hand-over roots crashed as they started.
    pub roots_crashed: u64,
    /// Steps completed without some member (a quorum policy cut them).
    pub cut_steps: u64,
    /// The step the survivors reached together.
    pub final_step: u64,
    /// A majority of the trainers had their calls fail with `NoQuorum` at
    /// once because no epoch came in time (the group lost its quorum for
    /// too long): every trainer rejoined, and the group resumed from the
    /// most advanced of their states (checked like every other run).
    pub stalled: bool,
    /// A [`ClusterFault::Split`] left no side with a majority.
    pub split: bool,
    /// For each [`ClusterFault::Crash`], how long after it a live member
    /// first applied an epoch without the crashed one.
    pub removed_after: Vec<Duration>,
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
    Node(NodeMessage),
    /// The sender reset the link: the connection is gone at this end too.
    Closed,
}

/// What a trainer is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Task {
    /// Waiting for its node to run ops for the first time.
    Starting,
    /// About to issue its next step.
    Idle,
    /// Waiting for a step's result.
    Step(RequestId),
    /// Handing its state over to joiners.
    Admit(RequestId),
    /// Waiting in `join()` for the group's state.
    Join(RequestId),
    /// Its `join()` failed: it tries again then (a trainer that retried at
    /// once, its daemon answering at once, would stop the virtual clock:
    /// 3000 seeds, seed 2336, every state lost).
    JoinAgainAt(Time),
    /// Reached the last step.
    Done,
}

struct Trainer {
    params: Vec<f32>,
    step: u64,
    next_seq: u64,
    task: Task,
    /// Steps that closed without it: it does not compute them.
    skip: u64,
    /// A slow trainer computing its next step: when it is done.
    computed_at: Option<Time>,
    /// The last op whose result its state includes (what a client
    /// remembers of its last completed call).
    held: Option<Held>,
}

struct Member {
    id: MemberId,
    alive: bool,
    paused_until: Option<Time>,
    plane: ControlPlane,
    disk: MemoryDisk,
    node: Node<Vec<u8>>,
    trainer: Trainer,
}

/// The simulator.
pub struct ClusterSim {
    sc: ClusterScenario,
    rng: SplitMix64,
    now: Time,
    members: Vec<Member>,
    side: Vec<u8>,
    net: BinaryHeap<Reverse<(Time, u64, usize, usize)>>,
    /// Each message with the generation of its link when it was sent.
    payloads: BTreeMap<u64, (Packet, u64)>,
    /// Per link (lower index, higher index): bumped when a node resets the
    /// connection, which loses what was in flight.
    links: BTreeMap<(usize, usize), u64>,
    /// Links reset and not reconnected yet.
    broken: BTreeSet<(usize, usize)>,
    seq: u64,
    next_request: u64,
    /// (member id, step) → its gradient.
    grads: BTreeMap<(u32, u64), Vec<f32>>,
    /// Per member: step → contributors of its completion.
    history: Vec<BTreeMap<u64, Vec<MemberId>>>,
    /// When each trainer's call failed for want of an epoch (`NoQuorum`).
    no_quorum: Vec<(Time, usize)>,
    stop_at: u64,
    /// A [`ClusterFault::CrashHandOverRoot`] is armed.
    crash_root: bool,
    /// Members crashed by [`ClusterFault::Crash`] and not seen removed yet,
    /// with when.
    crashed: Vec<(MemberId, Time)>,
    /// A [`ClusterFault::Starve`]: the member, its next stop's length, and
    /// when that stop comes.
    starved: Option<(usize, Duration, Time)>,
    report: ClusterReport,
}

impl fmt::Debug for ClusterSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterSim")
            .field("seed", &self.sc.seed)
            .field("now", &self.now)
            .finish()
    }
}

fn link(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

/// A trainer's state as it hands it over: its parameters, then its step.
fn state_bytes(t: &Trainer) -> Vec<u8> {
    let mut state = t.params.clone();
    state.push(t.step as f32);
    f32_bytes(&state)
}

impl ClusterSim {
    /// A cluster for `sc`.
    pub fn new(sc: ClusterScenario) -> ClusterSim {
        let ids: Vec<MemberId> = (0..sc.members).map(|i| MemberId(i as u32)).collect();
        let mut bootstrap = GroupState::bootstrap(
            ids.iter()
                .map(|&m| (m, format!("node{}", m.0), format!("127.0.0.{}:1", 10 + m.0))),
        );
        bootstrap.policy = sc.policy;
        let roles = initial_roles(&ids, 3);
        let mut rng = SplitMix64::new(sc.seed);
        let members = ids
            .iter()
            .map(|&id| {
                let config = ControlConfig {
                    election_seed: Some(rng.next_u64()),
                    ..ControlConfig::default()
                };
                let control = ControlNode::new(
                    id,
                    config,
                    Some((bootstrap.clone(), &roles)),
                    None,
                    Time::ZERO,
                )
                .expect("node starts");
                let node_config = NodeConfig {
                    recovery_timeout: RECOVERY_TIMEOUT,
                    ..NodeConfig::default()
                };
                let arith = Box::new(EngineArithmetic(
                    Box::new(ScalarEngine) as Box<dyn phalanx_compute::ComputeEngine>
                ));
                Member {
                    id,
                    alive: true,
                    paused_until: None,
                    plane: ControlPlane::new(control, Incarnation(1), String::new(), RETRY, 3),
                    disk: MemoryDisk::default(),
                    node: Node::new(id, Incarnation(1), node_config, arith, Time::ZERO),
                    trainer: Trainer {
                        params: vec![0.0; DIM],
                        step: 0,
                        next_seq: 1,
                        task: Task::Starting,
                        skip: 0,
                        computed_at: None,
                        held: None,
                    },
                }
            })
            .collect();
        ClusterSim {
            rng,
            now: Time::ZERO,
            members,
            side: vec![0; sc.members],
            net: BinaryHeap::new(),
            payloads: BTreeMap::new(),
            links: BTreeMap::new(),
            broken: BTreeSet::new(),
            seq: 0,
            next_request: 0,
            grads: BTreeMap::new(),
            history: vec![BTreeMap::new(); sc.members],
            no_quorum: Vec::new(),
            stop_at: u64::MAX,
            crash_root: false,
            crashed: Vec::new(),
            starved: None,
            report: ClusterReport::default(),
            sc,
        }
    }

    fn fail(&self, what: String) -> ClusterFailure {
        ClusterFailure {
            scenario: Box::new(self.sc.clone()),
            what,
            at: Duration::from_micros(self.now.0),
        }
    }

    fn send(&mut self, from: usize, to: usize, p: Packet) {
        let jitter = self.rng.below(self.sc.jitter.as_micros() as u64 + 1);
        let at = self.now.after(Duration::from_micros(200 + jitter));
        let generation = self.links.get(&link(from, to)).copied().unwrap_or(0);
        self.seq += 1;
        self.payloads.insert(self.seq, (p, generation));
        self.net.push(Reverse((at, self.seq, from, to)));
    }

    fn running(&self, i: usize) -> bool {
        let m = &self.members[i];
        m.alive && m.paused_until.is_none_or(|u| self.now >= u)
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
                self.inject(&faults[next_fault].1);
                next_fault += 1;
            }
            if !healed && self.now >= heal {
                healed = true;
                self.side = vec![0; self.sc.members];
                for m in &mut self.members {
                    m.paused_until = None;
                }
                self.starved = None;
            }
            if let Some((m, stop, at)) = self.starved {
                if self.now >= at {
                    let [_, growth, longest, run] = STARVE;
                    self.members[m].paused_until = Some(self.now.after(stop));
                    let next = (stop + growth).min(longest);
                    self.starved = Some((m, next, self.now.after(stop + run)));
                }
            }
            if self.stop_at == u64::MAX && self.now >= stop_phase && !self.anyone_joining() {
                let top = self
                    .members
                    .iter()
                    .map(|m| m.trainer.step)
                    .max()
                    .unwrap_or(0);
                self.stop_at = top + 3;
            }
            self.deliver()?;
            if self.now >= next_heartbeat {
                self.heartbeats();
                next_heartbeat = self.now.after(Duration::from_millis(100));
            } else {
                // A daemon's heartbeat timer that missed its ticks while
                // the process was stopped fires once at once (tokio's
                // `MissedTickBehavior::Delay`).
                for a in 0..self.members.len() {
                    if self.members[a].alive && self.members[a].paused_until == Some(self.now) {
                        self.heartbeats_from(a);
                    }
                }
            }
            for i in 0..self.members.len() {
                if self.running(i) {
                    self.step_member(i)?;
                }
            }
            self.now = self.now.after(STEP);
        }
        self.check_end()?;
        Ok(self.report)
    }

    fn inject(&mut self, fault: &ClusterFault) {
        match fault {
            ClusterFault::Crash(m) => {
                self.members[*m].alive = false;
                self.crashed.push((self.members[*m].id, self.now));
            }
            ClusterFault::Partition(side) => {
                self.side = vec![0; self.sc.members];
                for &m in side {
                    self.side[m] = 1;
                }
            }
            ClusterFault::Pause(m, d) => self.members[*m].paused_until = Some(self.now.after(*d)),
            ClusterFault::Starve(m) => self.starved = Some((*m, STARVE[0], self.now)),
            ClusterFault::Heal => self.side = vec![0; self.sc.members],
            ClusterFault::Split => {
                self.report.split = true;
                self.side = (0..self.sc.members).map(|m| (m % 3) as u8).collect();
            }
            ClusterFault::CrashHandOverRoot => {
                self.crash_root = self.members.iter().all(|m| m.alive);
            }
            &ClusterFault::CutLink(a, b) => {
                *self.links.entry(link(a, b)).or_insert(0) += 1;
                self.broken.insert(link(a, b));
                let now = self.now;
                for (i, j) in [(a, b), (b, a)] {
                    let peer = self.members[j].id;
                    self.members[i]
                        .node
                        .handle_peer_down(now, peer, "the connection was lost");
                }
            }
        }
    }

    fn anyone_joining(&self) -> bool {
        self.members
            .iter()
            .any(|m| m.alive && matches!(m.trainer.task, Task::Join(_) | Task::JoinAgainAt(_)))
    }

    /// Heartbeats from every running member, and reconnects: a link reset
    /// comes back once both ends run and can reach each other.
    fn heartbeats(&mut self) {
        let n = self.members.len();
        for a in 0..n {
            if self.running(a) {
                self.heartbeats_from(a);
            }
        }
        let back: Vec<(usize, usize)> = self
            .broken
            .iter()
            .copied()
            .filter(|&(a, b)| self.running(a) && self.running(b) && self.side[a] == self.side[b])
            .collect();
        let now = self.now;
        for (a, b) in back {
            self.broken.remove(&(a, b));
            let (ida, idb) = (self.members[a].id, self.members[b].id);
            self.members[a].node.handle_peer_up(now, idb);
            self.members[b].node.handle_peer_up(now, ida);
        }
    }

    fn heartbeats_from(&mut self, a: usize) {
        for b in (0..self.members.len()).filter(|&b| b != a) {
            self.send(a, b, Packet::Heartbeat);
        }
    }

    fn deliver(&mut self) -> Result<(), ClusterFailure> {
        while let Some(Reverse((at, seq, from, to))) = self.net.peek().copied() {
            if at > self.now {
                break;
            }
            self.net.pop();
            let (p, generation) = self.payloads.remove(&seq).expect("payload");
            let current = self.links.get(&link(from, to)).copied().unwrap_or(0);
            let lost = generation != current && generation != IN_SOCKET;
            if !self.members[to].alive || !self.members[from].alive || lost {
                continue;
            }
            // A partition holds messages back as QUIC does (it retransmits
            // after the heal, unless the link is reset first); a stopped
            // process's socket buffer holds them (looked at again every
            // 10 ms: the heal may resume it early), and it reads them when
            // it runs again even if the sender has reset the link since:
            // they arrived before the reset did.
            let partitioned = self.side[from] != self.side[to];
            let stopped = self.members[to].paused_until.is_some_and(|u| self.now < u);
            if partitioned || stopped {
                let generation = if partitioned { generation } else { IN_SOCKET };
                let until = self.now.after(Duration::from_millis(10));
                self.seq += 1;
                self.payloads.insert(self.seq, (p, generation));
                self.net.push(Reverse((until, self.seq, from, to)));
                continue;
            }
            let now = self.now;
            let _span = tracing::info_span!("", m = to, t = %now).entered();
            let from_id = self.members[from].id;
            let m = &mut self.members[to];
            match p {
                Packet::Raft(bytes) => {
                    let msg = decode_message(&bytes, from_id, m.id).expect("well-formed");
                    let _ = m.plane.node_mut().step(msg);
                }
                Packet::Heartbeat => m.node.handle_heartbeat(now, from_id),
                Packet::Frame(header, payload) => m.node.handle_frame(now, header, payload),
                Packet::Node(msg) => m.node.handle_message(now, from_id, msg),
                // As the transport does, only the loss of the current
                // connection is reported: a link already redialled is up.
                Packet::Closed if !self.broken.contains(&link(from, to)) => {}
                Packet::Closed => m
                    .node
                    .handle_peer_down(now, from_id, "the peer reset the link"),
            }
            self.execute(to)?;
        }
        Ok(())
    }

    fn step_member(&mut self, i: usize) -> Result<(), ClusterFailure> {
        let now = self.now;
        let _span = tracing::info_span!("", m = i, t = %now).entered();
        let m = &mut self.members[i];
        if m.plane.node().poll_timeout() <= now {
            m.plane.node_mut().handle_timeout(now);
        }
        // Stopped and running again, a daemon's data path goes on with what
        // came meanwhile before its control task has applied what Raft
        // brought (separate tasks; the log is written first): its trainer
        // may issue an op, and frames waiting for it complete it, before
        // the daemon learns it was removed (seen on real daemons, issue 13).
        let catching_up = m.paused_until.is_some_and(|u| now < u.after(CONTROL_LAG));
        let out = if catching_up {
            Default::default()
        } else {
            match m.plane.step(now, &mut m.disk) {
                Ok(out) => out,
                Err(e) => return Err(self.fail(format!("m{i}: {e}"))),
            }
        };
        for ev in &out.events {
            if let Event::Applied {
                applied: Applied::NewEpoch { epoch, .. },
                ..
            } = ev
            {
                self.report.epochs = self.report.epochs.max(epoch.0 - 1);
            }
        }
        if let Some(change) = out.change {
            let report = &mut self.report;
            self.crashed.retain(|&(gone, at)| {
                let kept = change.ring.contains(&gone);
                if !kept {
                    report.removed_after.push(now.since(at));
                }
                kept
            });
            self.members[i].node.handle_group(now, change);
        }
        for msg in out.messages {
            let to = destination(&msg).expect("raft id maps to a member").0 as usize;
            self.send(i, to, Packet::Raft(encode_message(&msg)));
        }
        let node = &mut self.members[i].node;
        if node.poll_timeout().is_some_and(|t| t <= now) {
            node.handle_timeout(now);
        }
        self.execute(i)?;
        self.train(i);
        self.execute(i)
    }

    /// Carries out node `i`'s actions.
    fn execute(&mut self, i: usize) -> Result<(), ClusterFailure> {
        while let Some(action) = self.members[i].node.poll_action() {
            match action {
                Action::Frame {
                    to,
                    header,
                    payload,
                } => self.send(i, to.0 as usize, Packet::Frame(header, payload)),
                Action::Message {
                    to,
                    msg: NodeMessage::JoinPoint { stream, .. },
                } if self.crash_root && self.other_holder(i, stream) => {
                    tracing::info!(m = i, joiner = %to, "the hand-over's root dies as it starts");
                    self.crash_root = false;
                    self.report.roots_crashed += 1;
                    self.members[i].alive = false;
                }
                Action::Message { to, msg } => self.send(i, to.0 as usize, Packet::Node(msg)),
                Action::Reply {
                    id,
                    buffer,
                    outcome,
                } => self.answered(i, id, buffer, outcome)?,
                Action::Control(req) => self.members[i].plane.handle(req),
                Action::ResetLinks { member } => self.reset(i, member.0 as usize),
            }
        }
        while let Some(event) = self.members[i].node.poll_event() {
            match event {
                NodeEvent::Recovered { plan: "rerun" } => self.report.reruns += 1,
                NodeEvent::Recovered {
                    plan: "kept_result",
                } => self.report.from_results += 1,
                NodeEvent::Returned {
                    caught_up: true,
                    missed,
                } => {
                    self.report.returned += 1;
                    self.report.caught_up += missed as u64;
                }
                NodeEvent::Returned { .. } => self.report.returns_refused += 1,
                NodeEvent::Doubt { outcome } => {
                    *self.report.doubts.entry(outcome).or_default() += 1
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Node `i` dropped its connection to `j`: what was in flight is lost,
    /// both ends see it closed, and it reconnects once it can.
    fn reset(&mut self, i: usize, j: usize) {
        *self.links.entry(link(i, j)).or_insert(0) += 1;
        self.broken.insert(link(i, j));
        let (now, peer) = (self.now, self.members[j].id);
        self.members[i]
            .node
            .handle_peer_down(now, peer, "reset: reconnecting");
        self.send(i, j, Packet::Closed);
    }

    fn request(&mut self) -> RequestId {
        self.next_request += 1;
        RequestId(self.next_request)
    }

    /// Issues the trainer's next call when it may.
    fn train(&mut self, i: usize) {
        let (task, step) = (self.members[i].trainer.task, self.members[i].trainer.step);
        match task {
            // A trainer starts once its daemon runs ops, or is told it is
            // out of the ring (its first call fails and it joins).
            Task::Starting
                if matches!(
                    self.members[i].node.mode(),
                    Mode::Active | Mode::Removed { .. }
                ) =>
            {
                self.members[i].trainer.task = Task::Idle;
            }
            Task::JoinAgainAt(at) if self.now >= at => self.rejoin(i),
            Task::Idle if step >= self.stop_at => self.members[i].trainer.task = Task::Done,
            Task::Idle if self.computing(i) => {}
            Task::Idle => {
                let id = self.request();
                let m = &mut self.members[i];
                let g = step_gradient(m.id.0, m.trainer.step, &m.trainer.params);
                self.grads.insert((m.id.0, m.trainer.step), g.clone());
                let req = Request {
                    id,
                    op: OpId::new(0, m.trainer.next_seq),
                    kind: LocalKind::AllReduce(ReduceOp::Sum),
                    dtype: DType::F32,
                    len: DIM,
                    samples: None,
                    buffer: f32_bytes(&g),
                };
                m.trainer.next_seq += 1;
                m.trainer.task = Task::Step(id);
                m.node.handle_submit(self.now, req);
            }
            _ => {}
        }
    }

    /// Whether trainer `i` (the slow one) is still computing its next step.
    fn computing(&mut self, i: usize) -> bool {
        let Some((slow, compute)) = self.sc.slow else {
            return false;
        };
        let now = self.now;
        let t = &mut self.members[i].trainer;
        if slow != i {
            return false;
        }
        if t.skip > 0 {
            t.skip -= 1;
            return false;
        }
        match t.computed_at {
            None => {
                t.computed_at = Some(now.after(compute));
                true
            }
            Some(at) if now < at => true,
            Some(_) => {
                t.computed_at = None;
                false
            }
        }
    }

    /// The trainer's call failed: it joins again with the state it holds
    /// (as the README's loop does).
    fn rejoin(&mut self, i: usize) {
        let id = self.request();
        let m = &mut self.members[i];
        m.trainer.task = Task::Join(id);
        let join = JoinRequest {
            id,
            stream: 0,
            dtype: DType::F32,
            len: DIM + 1,
            holds: m.trainer.held,
            buffer: state_bytes(&m.trainer),
        };
        m.node.handle_join(self.now, join);
    }

    fn answered(
        &mut self,
        i: usize,
        id: RequestId,
        buffer: Vec<u8>,
        outcome: Result<OpDone, OpError>,
    ) -> Result<(), ClusterFailure> {
        let task = self.members[i].trainer.task;
        tracing::debug!(m = i, ?task, answer = ?outcome.as_ref().map(|d| (d.op, &d.waiting, d.meta.behind)), "trainer answered");
        if let Ok(done) = &outcome {
            if matches!(task, Task::Step(want) | Task::Admit(want) | Task::Join(want) if want == id)
            {
                self.members[i].trainer.held = Some(Held {
                    seq: done.op.seq(),
                    epoch: done.epoch,
                });
            }
        }
        match (task, outcome) {
            (Task::Step(want), Ok(done)) if want == id => self.completed(i, done, &buffer),
            (Task::Admit(want), Ok(_)) if want == id => {
                self.report.hand_overs += 1;
                self.members[i].trainer.task = Task::Idle;
                Ok(())
            }
            (Task::Join(want), Ok(done)) if want == id => {
                let state = f32s(&buffer);
                let t = &mut self.members[i].trainer;
                t.params = state[..DIM].to_vec();
                t.step = state[DIM] as u64;
                t.next_seq = done.op.seq() + 1;
                t.task = Task::Idle;
                t.skip = 0;
                // Its history is the group's from here on: what it saw before
                // may differ (cut off just as a step completed, it kept a
                // result the others re-ran without it — fenced, never
                // combined with anything, and now replaced).
                self.history[i].clear();
                self.report.rejoined += 1;
                Ok(())
            }
            (Task::Join(want), Err(_)) if want == id => {
                self.report.stopped += 1;
                self.members[i].trainer.task = Task::JoinAgainAt(self.now.after(RETRY));
                Ok(())
            }
            (Task::Step(want) | Task::Admit(want), Err(e)) if want == id => {
                if matches!(&e, OpError::NoQuorum(why) if why.contains("no new epoch")) {
                    self.no_quorum.push((self.now, i));
                }
                self.report.stopped += 1;
                self.rejoin(i);
                Ok(())
            }
            (task, outcome) => Err(self.fail(format!(
                "m{i} got an answer to {id:?} while {task:?}: {outcome:?}"
            ))),
        }
    }

    fn completed(&mut self, i: usize, done: OpDone, buf: &[u8]) -> Result<(), ClusterFailure> {
        let step = self.members[i].trainer.step;
        let mut want: Option<Vec<f32>> = None;
        for c in &done.contributors {
            let Some(g) = self.grads.get(&(c.0, step)) else {
                return Err(self.fail(format!(
                    "m{i} {}: contributor {c} never issued step {step}",
                    done.op
                )));
            };
            match want.as_mut() {
                None => want = Some(g.clone()),
                Some(w) => w.iter_mut().zip(g).for_each(|(w, g)| *w += g),
            }
        }
        let got = f32s(buf);
        let want = want.unwrap_or_default();
        if got.len() != want.len()
            || got
                .iter()
                .zip(&want)
                .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(self.fail(format!(
                "m{i} {}: the result is not the sum over its contributors {:?}",
                done.op, done.contributors
            )));
        }
        let k = done.contributors.len() as f32;
        let t = &mut self.members[i].trainer;
        for (w, s) in t.params.iter_mut().zip(&got) {
            *w -= 1e-3 * s / k;
        }
        t.step += 1;
        t.skip = t.skip.max(done.meta.behind);
        if !done.meta.left_out.is_empty() {
            self.report.cut_steps += 1;
        }
        self.history[i].insert(step, done.contributors);
        self.report.completions += 1;
        if done.waiting.is_empty() {
            t.task = Task::Idle;
            return Ok(());
        }
        // Members wait for the state: hand it over at this step boundary.
        let buffer = state_bytes(t);
        let id = self.request();
        let m = &mut self.members[i];
        let req = Request {
            id,
            op: OpId::new(0, m.trainer.next_seq),
            kind: LocalKind::StateSync,
            dtype: DType::F32,
            len: DIM + 1,
            samples: None,
            buffer,
        };
        m.trainer.next_seq += 1;
        m.trainer.task = Task::Admit(id);
        m.node.handle_submit(self.now, req);
        Ok(())
    }

    fn check_end(&mut self) -> Result<(), ClusterFailure> {
        let alive: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].alive)
            .collect();
        let leaders = alive
            .iter()
            .filter(|&&i| self.members[i].plane.node().is_leader())
            .count();
        if leaders != 1 {
            return Err(self.fail(format!("{leaders} leaders after the heal")));
        }
        let epoch = self.members[alive[0]].plane.node().group().epoch;
        if let Some(&i) = alive
            .iter()
            .find(|&&i| self.members[i].plane.node().group().epoch != epoch)
        {
            return Err(self.fail(format!(
                "m{i} is at {} after the heal, m{} at {epoch}",
                self.members[i].plane.node().group().epoch,
                alive[0]
            )));
        }
        let training: Vec<usize> = alive
            .iter()
            .copied()
            .filter(|&i| self.members[i].trainer.task == Task::Done)
            .collect();
        // Counted, and the sweep bounds how often.
        self.report.stalled = self.stalled(alive.len());
        if training != alive {
            let what: Vec<String> = alive
                .iter()
                .map(|&i| {
                    let m = &self.members[i];
                    format!(
                        "m{i}: {:?} at step {} ({} in {}, ring {:?})",
                        m.trainer.task,
                        m.trainer.step,
                        m.node.mode().name(),
                        m.node.epoch(),
                        m.node.ring()
                    )
                })
                .collect();
            return Err(self.fail(format!(
                "after the heal not every member trains to step {}: {what:?}",
                self.stop_at
            )));
        }
        let first = training[0];
        for &i in &training {
            let t = &self.members[i].trainer;
            if t.step != self.stop_at {
                return Err(self.fail(format!("m{i} reached step {} of {}", t.step, self.stop_at)));
            }
            let same = t
                .params
                .iter()
                .zip(&self.members[first].trainer.params)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            if !same {
                return Err(self.fail(format!("m{i} and m{first} hold different parameters")));
            }
            for (step, contributors) in &self.history[i] {
                if let Some(theirs) = self.history[first].get(step) {
                    if theirs != contributors {
                        return Err(self.fail(format!(
                            "step {step}: m{i} saw contributors {contributors:?}, m{first} {theirs:?}"
                        )));
                    }
                }
            }
        }
        self.report.final_step = self.stop_at;
        Ok(())
    }
}

impl ClusterSim {
    /// Whether a member of node `i`'s ring other than itself holds
    /// `stream`'s state (with none, nobody can take a hand-over over: the
    /// joiners' own states are all that is left, a case for checkpoints).
    fn other_holder(&self, i: usize, stream: u32) -> bool {
        // (The node's own view has moved on by now: a broadcast's root is
        // done as it sends. A trainer outside join() holds the state.)
        debug_assert_eq!(stream, 0, "the trainers use one stream");
        let ring = self.members[i].node.ring();
        self.members.iter().enumerate().any(|(j, m)| {
            j != i
                && m.alive
                && ring.contains(&m.id)
                && !matches!(m.trainer.task, Task::Join(_) | Task::JoinAgainAt(_))
        })
    }

    /// Whether a majority of the `alive` members' trainers failed for want
    /// of an epoch within one recovery timeout of each other.
    fn stalled(&self, alive: usize) -> bool {
        self.no_quorum.iter().any(|&(from, _)| {
            let within: BTreeSet<usize> = self
                .no_quorum
                .iter()
                .filter(|&&(t, _)| t >= from && t.since(from) <= RECOVERY_TIMEOUT)
                .map(|&(_, m)| m)
                .collect();
            within.len() > alive / 2
        })
    }
}

/// Runs the scenario of `seed`.
pub fn run_seed(seed: u64) -> Result<ClusterReport, ClusterFailure> {
    ClusterSim::new(ClusterScenario::from_seed(seed)).run()
}
