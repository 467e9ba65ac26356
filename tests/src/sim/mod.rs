//! The deterministic cluster simulator.
//!
//! N members, each a [`Collectives`] core with its own compute engine, on a
//! virtual clock, over a network whose per-message delays come from one seeded
//! generator (so messages on a link reorder). Members can be slow, paused and
//! killed. A membership oracle stands in for the control plane: when a kill is
//! detected it installs a new epoch without the dead member and has the
//! survivors re-run every unfinished op from the inputs they kept.
//!
//! Nothing here reads a clock or an unseeded RNG, and every collection is
//! ordered, so a seed replays exactly.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::time::Duration;

use phalanx_compute::{apply_action, element_range, ComputeEngine, ScalarEngine, SimdEngine};
use phalanx_protocol::collective::{Action, Collectives, Config, Kind, OpSpec};
use phalanx_protocol::rng::SplitMix64;
use phalanx_protocol::wire::{AbortReason, FrameHeader};
use phalanx_protocol::{Epoch, MemberId, OpId, Step, Time};

use crate::invariants::{self, Violation};
use crate::scenario::{Fault, Scenario};
use crate::tensor::random_bytes;

/// Hard cap on processed events: a run that needs more is livelocked.
const MAX_EVENTS: u64 = 20_000_000;
/// Modelled processing rate: 1 µs per KiB handled, times the slowdown.
const BYTES_PER_MICRO: u64 = 1024;

#[derive(Debug)]
enum Event {
    Start {
        member: usize,
        op: usize,
        epoch: Epoch,
    },
    Deliver {
        to: usize,
        header: FrameHeader,
        payload: Vec<u8>,
    },
    Kill {
        member: usize,
    },
    Detect {
        member: usize,
    },
    Timer {
        member: usize,
    },
    /// A busy or paused member becomes free to handle its inbox.
    Wake {
        member: usize,
    },
}

#[derive(Debug)]
struct Queued {
    at: Time,
    seq: u64,
    event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The state of one op run at one member.
#[derive(Clone, Debug, PartialEq)]
pub enum RunState {
    /// In flight.
    Running,
    /// Completed with these contributors.
    Done(Vec<MemberId>),
    /// Aborted.
    Aborted(AbortReason),
}

/// One run of one op at one member.
#[derive(Debug)]
pub struct Run {
    /// The spec it ran under.
    pub spec: OpSpec,
    /// The working buffer (raw LE elements).
    pub buf: Vec<u8>,
    /// Where it stands.
    pub state: RunState,
    /// Epochs of every frame applied to `buf`.
    pub applied_epochs: BTreeSet<Epoch>,
}

#[derive(Debug)]
struct Member {
    id: MemberId,
    core: Collectives,
    engine: Box<dyn ComputeEngine>,
    alive: bool,
    slow: u64,
    pauses: Vec<(Time, Time)>,
    busy_until: Time,
    timer_at: Option<Time>,
    runs: BTreeMap<OpId, Run>,
    /// Events waiting while the member is busy or paused, in arrival order.
    inbox: VecDeque<Event>,
    wake_pending: bool,
}

/// The oracle's record of one op across epochs.
#[derive(Debug)]
pub struct OpRecord {
    /// The op's id.
    pub id: OpId,
    /// Its kind, with the broadcast root resolved.
    pub kind: Kind,
    /// The epoch of its latest run.
    pub epoch: Epoch,
    /// The members of its latest run.
    pub members: Vec<usize>,
    /// Each member's input, kept for re-runs (indexed by member).
    pub inputs: Vec<Vec<u8>>,
    /// Why the op cannot complete (a broadcast whose root died), if so.
    pub lost: Option<String>,
    /// How many times it was started.
    pub runs: u32,
}

/// What a finished run produced, for the invariant checks.
#[derive(Debug, Default)]
pub struct Report {
    /// Events processed.
    pub events: u64,
    /// Frames sent.
    pub frames: u64,
    /// Virtual time at the end.
    pub end: Time,
    /// Epoch changes.
    pub epochs: u64,
    /// Op re-runs after an epoch change.
    pub reruns: u64,
    /// Stale frames the cores dropped.
    pub stale_frames: u64,
}

/// A simulation in progress.
#[derive(Debug)]
pub struct Sim {
    /// The scenario.
    pub scenario: Scenario,
    now: Time,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    rng: SplitMix64,
    members: Vec<Member>,
    epoch: Epoch,
    detected: BTreeSet<usize>,
    /// The ops, with their latest runs.
    pub ops: Vec<OpRecord>,
    /// Counters.
    pub report: Report,
    violations: Vec<Violation>,
    trace: bool,
}

fn at(d: Duration) -> Time {
    Time::ZERO.after(d)
}

impl Sim {
    /// Sets up members, inputs and faults. `trace` prints every event.
    pub fn new(scenario: Scenario, trace: bool) -> Sim {
        let mut rng = SplitMix64::new(scenario.seed ^ 0x005E_ED0F_5133);
        let ids = scenario.member_ids();
        let config = Config {
            chunk_bytes: scenario.chunk_bytes,
            max_chunks_in_flight: scenario.window,
            op_timeout: Duration::from_secs(60),
            ..Config::default()
        };
        let members: Vec<Member> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let engine: Box<dyn ComputeEngine> = if scenario.scalar_members.contains(&i) {
                    Box::new(ScalarEngine)
                } else {
                    Box::new(SimdEngine::detect())
                };
                Member {
                    id,
                    core: Collectives::new(id, config.clone()),
                    engine,
                    alive: true,
                    slow: 1,
                    pauses: Vec::new(),
                    busy_until: Time::ZERO,
                    timer_at: None,
                    runs: BTreeMap::new(),
                    inbox: VecDeque::new(),
                    wake_pending: false,
                }
            })
            .collect();
        let epoch = Epoch(1);
        let all: Vec<usize> = (0..members.len()).collect();
        let ops = scenario
            .ops
            .iter()
            .enumerate()
            .map(|(k, plan)| OpRecord {
                id: OpId(1 + k as u64),
                kind: plan.kind.kind(&ids),
                epoch,
                members: all.clone(),
                inputs: (0..members.len())
                    .map(|_| random_bytes(&mut rng, plan.dtype, plan.len, plan.values))
                    .collect(),
                lost: None,
                runs: 0,
            })
            .collect();
        let mut sim = Sim {
            scenario,
            now: Time::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            rng,
            members,
            epoch,
            detected: BTreeSet::new(),
            ops,
            report: Report::default(),
            violations: Vec::new(),
            trace,
        };
        for fault in sim.scenario.faults.clone() {
            match fault {
                Fault::Slow { member, factor } => sim.members[member].slow = u64::from(factor),
                Fault::Pause {
                    member,
                    from,
                    length,
                } => sim.members[member]
                    .pauses
                    .push((at(from), at(from + length))),
                Fault::Kill {
                    member, at: when, ..
                } => sim.push(at(when), Event::Kill { member }),
            }
        }
        for op in 0..sim.ops.len() {
            sim.start_everywhere(op);
        }
        sim
    }

    fn push(&mut self, at: Time, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at,
            seq: self.seq,
            event,
        }));
    }

    fn start_everywhere(&mut self, op: usize) {
        let spread = self.scenario.start_spread.as_micros() as u64;
        let epoch = self.ops[op].epoch;
        self.ops[op].runs += 1;
        for m in self.ops[op].members.clone() {
            let delay = Duration::from_micros(if spread == 0 {
                0
            } else {
                self.rng.below(spread)
            });
            self.push(
                self.now.after(delay),
                Event::Start {
                    member: m,
                    op,
                    epoch,
                },
            );
        }
    }

    fn spec(&self, op: usize) -> OpSpec {
        let rec = &self.ops[op];
        let plan = &self.scenario.ops[op];
        OpSpec {
            op: rec.id,
            epoch: rec.epoch,
            step: Step(0),
            kind: rec.kind,
            algorithm: plan.algorithm,
            dtype: plan.dtype,
            len: plan.len,
            members: rec.members.iter().map(|&i| self.members[i].id).collect(),
        }
    }

    /// Runs to quiescence, then checks every invariant.
    pub fn run(mut self) -> Result<(Report, Sim), Vec<Violation>> {
        while let Some(Reverse(q)) = self.queue.pop() {
            self.now = q.at;
            self.report.events += 1;
            if self.report.events > MAX_EVENTS {
                self.violations.push(Violation::liveness(format!(
                    "more than {MAX_EVENTS} events: livelock"
                )));
                break;
            }
            if !matches!(q.event, Event::Timer { .. } | Event::Wake { .. }) {
                // Leftover op-timeout timers fire long after the work ends.
                self.report.end = self.now;
            }
            self.step(q.event);
        }
        self.report.stale_frames = self
            .members
            .iter()
            .map(|m| m.core.stats().stale_frames)
            .sum();
        let mut violations = std::mem::take(&mut self.violations);
        violations.extend(invariants::check_all(&self));
        if violations.is_empty() {
            let report = std::mem::take(&mut self.report);
            Ok((report, self))
        } else {
            Err(violations)
        }
    }

    fn step(&mut self, event: Event) {
        match event {
            Event::Start { member, .. }
            | Event::Deliver { to: member, .. }
            | Event::Timer { member } => {
                if self.members[member].alive {
                    self.members[member].inbox.push_back(event);
                    self.pump_member(member);
                }
            }
            Event::Wake { member } => {
                self.members[member].wake_pending = false;
                self.pump_member(member);
            }
            Event::Kill { .. } | Event::Detect { .. } => self.handle(event),
        }
    }

    /// Handles the member's inbox in order while it is free; a busy or paused
    /// member gets one wake-up at the time it is free again (one event per
    /// wait, not one per queued message).
    fn pump_member(&mut self, m: usize) {
        loop {
            let mem = &mut self.members[m];
            if !mem.alive {
                mem.inbox.clear();
                return;
            }
            if mem.inbox.is_empty() {
                return;
            }
            let now = self.now;
            let resume = mem
                .pauses
                .iter()
                .find(|(from, to)| *from <= now && now < *to)
                .map(|&(_, to)| to)
                .or((mem.busy_until > now).then_some(mem.busy_until));
            if let Some(t) = resume {
                if !mem.wake_pending {
                    mem.wake_pending = true;
                    self.push(t, Event::Wake { member: m });
                }
                return;
            }
            let event = mem.inbox.pop_front().expect("non-empty");
            self.handle(event);
        }
    }

    fn handle(&mut self, event: Event) {
        if self.trace {
            println!("{} {}", self.now, describe(&event));
        }
        match event {
            Event::Start { member, op, epoch } => {
                if epoch != self.ops[op].epoch || self.ops[op].lost.is_some() {
                    return; // superseded by a later epoch before it began
                }
                let spec = self.spec(op);
                let mut buf = vec![0u8; spec.buffer_len() * spec.dtype.size_bytes()];
                let me = self.members[member].id;
                let input = spec.input_range(me).expect("member of its op");
                let size = spec.dtype.size_bytes();
                if !input.is_empty() {
                    buf[input.start * size..input.end * size]
                        .copy_from_slice(&self.ops[op].inputs[member]);
                }
                let id = spec.op;
                let mem = &mut self.members[member];
                mem.runs.insert(
                    id,
                    Run {
                        spec: spec.clone(),
                        buf,
                        state: RunState::Running,
                        applied_epochs: BTreeSet::new(),
                    },
                );
                if let Err(e) = mem.core.start(self.now, spec) {
                    self.violations
                        .push(Violation::safety(format!("{me} could not start {id}: {e}")));
                }
                self.drain(member, 0);
            }
            Event::Deliver {
                to,
                header,
                payload,
            } => {
                let bytes = payload.len() as u64;
                let me = self.members[to].id;
                if let Err(e) = self.members[to]
                    .core
                    .handle_frame(self.now, header, payload)
                {
                    self.violations.push(Violation::safety(format!(
                        "{me} refused a frame from {}: {e}",
                        header.sender
                    )));
                }
                self.drain(to, bytes);
            }
            Event::Timer { member } => {
                self.members[member].timer_at = None;
                self.members[member].core.handle_timeout(self.now);
                self.drain(member, 0);
            }
            Event::Kill { member } => {
                self.members[member].alive = false;
                let detect_after = self
                    .scenario
                    .faults
                    .iter()
                    .find_map(|f| match f {
                        Fault::Kill {
                            member: m,
                            detect_after,
                            ..
                        } if *m == member => Some(*detect_after),
                        _ => None,
                    })
                    .expect("kill event comes from a fault");
                self.push(self.now.after(detect_after), Event::Detect { member });
            }
            Event::Detect { member } => self.detect(member),
            Event::Wake { .. } => unreachable!("wake-ups are handled by step"),
        }
    }

    /// The oracle: a new epoch without the dead member; unfinished ops re-run.
    fn detect(&mut self, dead: usize) {
        self.detected.insert(dead);
        self.epoch = Epoch(self.epoch.0 + 1);
        self.report.epochs += 1;
        let dead_id = self.members[dead].id;
        let epoch = self.epoch;
        let survivors: Vec<usize> = (0..self.members.len())
            .filter(|m| !self.detected.contains(m))
            .collect();
        for &m in &survivors {
            if self.members[m].alive {
                let now = self.now;
                self.members[m].core.handle_member_down(now, dead_id);
                self.members[m].core.set_epoch(now, epoch);
                self.drain(m, 0);
            }
        }
        for op in 0..self.ops.len() {
            let rec = &self.ops[op];
            if rec.lost.is_some() {
                continue;
            }
            let finished_everywhere = rec.members.iter().all(|&m| {
                self.detected.contains(&m)
                    || matches!(
                        self.members[m].runs.get(&rec.id),
                        Some(Run { state: RunState::Done(_), spec, .. }) if spec.epoch == rec.epoch
                    )
            });
            if finished_everywhere {
                // Every survivor completed it (perhaps with the dead member's
                // contribution): they agree, and there is nothing to re-run.
                continue;
            }
            if let Kind::Broadcast { root } = rec.kind {
                if root == dead_id {
                    self.ops[op].lost = Some(format!("broadcast root {root} died"));
                    continue;
                }
            }
            self.ops[op].epoch = epoch;
            self.ops[op].members = survivors.clone();
            self.report.reruns += 1;
            self.start_everywhere(op);
        }
    }

    /// Executes the member's pending actions; `handled` bytes set its busy time.
    fn drain(&mut self, member: usize, handled: u64) {
        let m = &mut self.members[member];
        let mut bytes = handled;
        let mut sends = Vec::new();
        while let Some(action) = m.core.poll_action() {
            match action {
                Action::Send {
                    op,
                    to,
                    header,
                    range,
                } => {
                    let run = m.runs.get(&op).expect("send for a known run");
                    let payload = run.buf[element_range(run.spec.dtype, &range)].to_vec();
                    bytes += payload.len() as u64;
                    sends.push((to, header, payload));
                }
                Action::Complete {
                    op,
                    epoch,
                    contributors,
                } => {
                    let run = m.runs.get_mut(&op).expect("complete for a known run");
                    assert_eq!(run.spec.epoch, epoch);
                    run.state = RunState::Done(contributors);
                }
                Action::Aborted { op, reason, .. } => {
                    if let Some(run) = m.runs.get_mut(&op) {
                        run.state = RunState::Aborted(reason);
                    }
                    if !matches!(
                        reason,
                        AbortReason::MemberDown(_) | AbortReason::EpochChanged(_)
                    ) {
                        self.violations.push(Violation::liveness(format!(
                            "{} aborted {op}: {reason}",
                            m.id
                        )));
                    }
                }
                Action::Reduce {
                    op,
                    ref payload,
                    from,
                    ..
                }
                | Action::Copy {
                    op,
                    ref payload,
                    from,
                    ..
                } => {
                    let run = m.runs.get_mut(&op).expect("apply for a known run");
                    run.applied_epochs.insert(from.epoch);
                    bytes += payload.len() as u64;
                    if let Err(e) =
                        apply_action(m.engine.as_ref(), run.spec.dtype, &mut run.buf, &action)
                    {
                        self.violations
                            .push(Violation::safety(format!("applying a piece failed: {e}")));
                    }
                }
                Action::Divide { op, .. } => {
                    let run = m.runs.get_mut(&op).expect("divide for a known run");
                    if let Err(e) =
                        apply_action(m.engine.as_ref(), run.spec.dtype, &mut run.buf, &action)
                    {
                        self.violations
                            .push(Violation::safety(format!("divide failed: {e}")));
                    }
                }
            }
        }
        let cost = Duration::from_micros(1 + bytes / BYTES_PER_MICRO).saturating_mul(m.slow as u32);
        let done = self.now.after(cost);
        m.busy_until = done;
        let timer = m.core.poll_timeout();
        if let Some(t) = timer {
            if m.timer_at.is_none_or(|cur| t < cur) {
                m.timer_at = Some(t);
                self.push(t, Event::Timer { member });
            }
        }
        let ids: Vec<MemberId> = self.members.iter().map(|m| m.id).collect();
        for (to, header, payload) in sends {
            let dest = ids
                .iter()
                .position(|&id| id == to)
                .expect("send to a known member");
            let jitter = self.scenario.jitter.as_micros() as u64;
            let delay = self.scenario.latency
                + Duration::from_micros(if jitter == 0 {
                    0
                } else {
                    self.rng.below(jitter)
                });
            let bytes_delay = Duration::from_micros(payload.len() as u64 / BYTES_PER_MICRO);
            self.report.frames += 1;
            self.push(
                done.after(delay + bytes_delay),
                Event::Deliver {
                    to: dest,
                    header,
                    payload,
                },
            );
        }
    }

    /// The run of `op` at member index `m`, if it started one.
    pub fn run_of(&self, m: usize, op: OpId) -> Option<&Run> {
        self.members[m].runs.get(&op)
    }

    /// The id of member index `m`.
    pub fn member_id(&self, m: usize) -> MemberId {
        self.members[m].id
    }

    /// Whether member index `m` is alive at the end.
    pub fn is_alive(&self, m: usize) -> bool {
        self.members[m].alive
    }
}

fn describe(event: &Event) -> String {
    match event {
        Event::Start { member, op, epoch } => {
            format!("start op#{op} at member#{member} in {epoch}")
        }
        Event::Deliver { to, header, .. } => format!(
            "deliver {} {} round {} chunk {} ({} elems) {} -> member#{to}",
            header.op, header.epoch, header.round, header.chunk, header.elem_count, header.sender
        ),
        Event::Kill { member } => format!("KILL member#{member}"),
        Event::Detect { member } => format!("DETECT member#{member} down: new epoch"),
        Event::Timer { member } => format!("timer at member#{member}"),
        Event::Wake { member } => format!("member#{member} free"),
    }
}

/// A failed run: the scenario, what broke, and how to replay it.
#[derive(Debug)]
pub struct Failure {
    /// The scenario.
    pub scenario: Box<Scenario>,
    /// What broke.
    pub violations: Vec<Violation>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "simulation failed: {}", self.scenario)?;
        for v in self.violations.iter().take(10) {
            writeln!(f, "  {v}")?;
        }
        if self.violations.len() > 10 {
            writeln!(f, "  ... and {} more", self.violations.len() - 10)?;
        }
        write!(f, "replay: {}", self.scenario.replay_command())
    }
}

/// Runs `scenario` and checks every invariant.
pub fn run(scenario: Scenario) -> Result<(Report, Sim), Failure> {
    let s = scenario.clone();
    Sim::new(scenario, false)
        .run()
        .map_err(|violations| Failure {
            scenario: Box::new(s),
            violations,
        })
}

/// Runs the scenario of `seed`.
pub fn run_seed(seed: u64) -> Result<Report, Failure> {
    run(Scenario::from_seed(seed)).map(|(r, _)| r)
}
