//! The checkpoint plane in the control-plane simulation: every member runs
//! the real [`Keeper`] beside its raft-rs node, a trainer that asks for a
//! checkpoint at a fixed interval, and a store that keeps what a crash
//! leaves (complete copies; a write cut short by a crash leaves nothing
//! listed, as the daemon's store promises). On top of the scenario's
//! crashes, partitions, pauses and lossy links, holders and the leader are
//! crashed at each stage of chosen saves (right after the snapshot, in the
//! middle of the write, right after the report, when the first report is
//! applied), and stored chunks are corrupted.
//!
//! Checked throughout: a manifest commits only when every holder it names
//! has the copy on its store (persist, then announce); every kept manifest's
//! holders keep their copies (nothing is collected too early); a restore
//! returns the bytes of a committed checkpoint, never a torn or mixed
//! state, and fails only when no intact copy is reachable. Checked after
//! the heal: the trainers' saves commit again, and every member restores
//! exactly the latest committed checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use phalanx_protocol::checkpoint::{
    chunk_sum, holders, Catalog, CatalogChange, CheckpointId, Keeper, KeeperAction, KeeperConfig,
    Manifest, Part, SaveOutcome, Source, REPLICA_PART,
};
use phalanx_protocol::membership::{Applied, Command};
use phalanx_protocol::rng::SplitMix64;
use phalanx_protocol::wire::Held;
use phalanx_protocol::{Epoch, MemberId, Step, Time};

use super::{ControlFailure, ControlSim, Fault};

/// Steps a trainer takes per checkpoint interval (so checkpoint steps are
/// multiples of it, as with `checkpoint every 10 steps`).
const STEPS_PER_INTERVAL: u64 = 10;

/// The checkpoint workload of a seed.
#[derive(Clone, Debug)]
pub struct CheckpointLoad {
    /// How often each trainer asks for a checkpoint.
    pub every: Duration,
    /// The state's length in bytes.
    pub state_len: usize,
    /// Bytes per chunk.
    pub chunk_bytes: u32,
    /// How long a store takes to write a copy.
    pub persist: Duration,
    /// `checkpoint.replicas`.
    pub replicas: u32,
    /// `checkpoint.keep`.
    pub keep: u32,
    /// Crashes at a stage of a save.
    pub triggers: Vec<Trigger>,
    /// At these times, a chunk of the newest copy on this member's store is
    /// corrupted.
    pub corruptions: Vec<(Duration, usize)>,
}

/// A stage of a save.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// A holder copied the state out.
    Snapshot,
    /// A holder is half-way through writing it.
    Persist,
    /// A holder proposed its report.
    Report,
    /// The first report was applied.
    Reported,
}

/// Who is crashed at the stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Victim {
    /// The holder that reached it.
    Holder,
    /// The Raft leader of the moment.
    Leader,
}

/// A crash at a stage of a save.
#[derive(Clone, Copy, Debug)]
pub struct Trigger {
    /// The save (its interval number).
    pub save: u64,
    /// The stage.
    pub stage: Stage,
    /// Who.
    pub victim: Victim,
    /// How long it stays down (the heal restarts it anyway).
    pub down_for: Duration,
}

impl CheckpointLoad {
    /// The workload of `seed`, for a fault phase of `fault_phase`.
    pub fn from_seed(seed: u64, fault_phase: Duration) -> CheckpointLoad {
        let mut rng = SplitMix64::new(seed ^ 0xC4EC_4B01);
        let every = Duration::from_millis(rng.range_inclusive(150, 600));
        let saves = (fault_phase.as_millis() / every.as_millis()).max(2) as u64;
        let stages = [
            Stage::Snapshot,
            Stage::Persist,
            Stage::Report,
            Stage::Reported,
        ];
        let triggers = (0..rng.range_inclusive(1, 4))
            .map(|_| Trigger {
                save: rng.range_inclusive(1, saves),
                stage: *rng.pick(&stages),
                victim: if rng.chance(0.5) {
                    Victim::Holder
                } else {
                    Victim::Leader
                },
                down_for: Duration::from_millis(rng.range_inclusive(300, 3_000)),
            })
            .collect();
        let corruptions = (0..rng.below(3))
            .map(|_| {
                (
                    Duration::from_millis(rng.range_inclusive(500, fault_phase.as_millis() as u64)),
                    rng.below(8) as usize,
                )
            })
            .collect();
        CheckpointLoad {
            every,
            state_len: if rng.chance(0.05) {
                0
            } else {
                rng.range_inclusive(1, 5_000) as usize
            },
            chunk_bytes: rng.range_inclusive(64, 1_024) as u32,
            // Slower than the interval, every save is refused or superseded
            // somewhere (the trainer is told to checkpoint less often).
            persist: Duration::from_millis(
                rng.range_inclusive(10, (every.as_millis() as u64 * 6 / 10).min(300)),
            ),
            replicas: *rng.pick(&[1, 2, 2, 2, 3]),
            keep: rng.range_inclusive(1, 3) as u32,
            triggers,
            corruptions,
        }
    }

    fn config(&self) -> KeeperConfig {
        KeeperConfig {
            replicas: self.replicas,
            keep: self.keep,
            retry: Duration::from_millis(500),
        }
    }
}

/// The state every trainer holds after `step`: the same bytes on every
/// member, different bytes at every step.
fn state(step: Step, len: usize) -> Vec<u8> {
    let mut rng = SplitMix64::new(step.0.wrapping_mul(0x9E37_79B9));
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

fn ckpt(k: u64) -> CheckpointId {
    CheckpointId {
        stream: 0,
        step: Step(k * STEPS_PER_INTERVAL),
    }
}

/// A copy on a store: the parts as written and the chunks' bytes (which a
/// corruption may change).
#[derive(Clone, Debug)]
struct Stored {
    parts: Vec<Part>,
    chunks: Vec<Vec<u8>>,
}

impl Stored {
    fn of(bytes: &[u8], chunk_bytes: u32) -> Stored {
        Stored {
            parts: vec![Part::of(REPLICA_PART, None, bytes, chunk_bytes)],
            chunks: bytes
                .chunks(chunk_bytes as usize)
                .map(<[u8]>::to_vec)
                .collect(),
        }
    }

    /// The state, verified chunk by chunk against `manifest`, as a restore
    /// reads it.
    fn read(&self, manifest: &Manifest) -> Result<Vec<u8>, String> {
        let part = &manifest.parts[0];
        if self.chunks.len() as u64 != part.chunks() {
            return Err(format!(
                "{} chunks stored, the manifest has {}",
                self.chunks.len(),
                part.chunks()
            ));
        }
        let mut out = Vec::with_capacity(part.size as usize);
        for (i, (c, sum)) in self.chunks.iter().zip(&part.sums).enumerate() {
            if chunk_sum(c) != *sum {
                return Err(format!("chunk {i}: checksum mismatch"));
            }
            out.extend_from_slice(c);
        }
        Ok(out)
    }

    fn intact(&self, manifest: &Manifest) -> bool {
        self.parts == manifest.parts && self.read(manifest).is_ok()
    }
}

struct Write {
    done: Time,
    id: CheckpointId,
    bytes: Vec<u8>,
}

/// One member's checkpoint side.
pub(super) struct Ck {
    keeper: Option<Keeper>,
    /// Survives crashes.
    store: BTreeMap<CheckpointId, Stored>,
    snapshots: BTreeMap<CheckpointId, Vec<u8>>,
    writes: Vec<Write>,
    /// The next interval the trainer checkpoints at.
    next: u64,
    /// What the keeper was last told.
    seen: Option<(Epoch, Vec<MemberId>, Catalog)>,
    /// A restore to run once the node has a group (after a restart).
    wants_restore: bool,
    restores: u64,
    /// The trainer's saves and how they ended.
    outcomes: BTreeMap<CheckpointId, Option<SaveOutcome>>,
    last_restored: Option<Result<CheckpointId, String>>,
}

impl Ck {
    pub(super) fn new(me: MemberId, load: &CheckpointLoad) -> Ck {
        Ck {
            keeper: Some(Keeper::new(me, load.config(), [])),
            store: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            writes: Vec::new(),
            next: 1,
            seen: None,
            wants_restore: false,
            restores: 0,
            outcomes: BTreeMap::new(),
            last_restored: None,
        }
    }

    /// The process died: memory and writes in flight are gone.
    pub(super) fn crash(&mut self) {
        self.keeper = None;
        self.snapshots.clear();
        self.writes.clear();
        self.seen = None;
    }

    /// The process starts again with what its store lists.
    pub(super) fn restart(&mut self, me: MemberId, load: &CheckpointLoad) {
        self.keeper = Some(Keeper::new(me, load.config(), self.store.keys().copied()));
        self.wants_restore = true;
        // Saves asked for in the old life end with it.
        self.outcomes.retain(|_, o| o.is_some());
    }
}

/// What the checkpoint plane saw in a run.
#[derive(Clone, Debug, Default)]
pub struct CheckpointReport {
    /// Checkpoints committed.
    pub committed: u64,
    /// Trainers' saves that ended committed.
    pub saves_committed: u64,
    /// Trainers' saves superseded before they committed.
    pub superseded: u64,
    /// Checkpoint requests refused (the previous one still written).
    pub refused: u64,
    /// Crashes triggered at a stage of a save.
    pub stage_crashes: u64,
    /// Copies made to replace a holder that left.
    pub copies: u64,
    /// Restores that returned a checkpoint.
    pub restored: u64,
    /// ... of which not the latest committed one (a bad or unreachable copy
    /// passed over).
    pub restored_older: u64,
    /// Restores that found nothing readable.
    pub restore_failures: u64,
    /// Copies a restore read and found bad (a checksum mismatch), then
    /// passed over.
    pub bad_copies_passed: u64,
    /// Chunks corrupted.
    pub corrupted: u64,
    /// The stages crashes were triggered at, and whom they hit.
    pub crashed_at: BTreeSet<String>,
}

/// The sim's side: the workload and what it saw.
pub(super) struct Plane {
    pub(super) load: CheckpointLoad,
    fired: Vec<bool>,
    next_corruption: usize,
    /// Copies corrupted by the scenario: deleting them is legitimate.
    corrupted: BTreeSet<(usize, CheckpointId)>,
    /// Every checkpoint ever committed.
    committed: BTreeMap<CheckpointId, Manifest>,
    pub(super) report: CheckpointReport,
    last_check: Time,
    /// The group's checkpoints at the furthest index any member applied
    /// (crashed members' included), and who applied it.
    truth: (MemberId, u64, Catalog),
    /// From here on the trainers ask for no more checkpoints, so that every
    /// member's group state settles before the last checks.
    pub(super) quiet_from: Time,
}

impl Plane {
    pub(super) fn new(load: CheckpointLoad) -> Plane {
        Plane {
            fired: vec![false; load.triggers.len()],
            load,
            next_corruption: 0,
            corrupted: BTreeSet::new(),
            committed: BTreeMap::new(),
            report: CheckpointReport::default(),
            last_check: Time::ZERO,
            quiet_from: Time(u64::MAX),
            truth: (MemberId(0), 0, Catalog::default()),
        }
    }
}

impl ControlSim {
    fn plane(&mut self) -> &mut Plane {
        self.ckpt.as_mut().expect("a checkpoint workload")
    }

    fn ck(&mut self, m: usize) -> &mut Ck {
        self.members[m].ck.as_mut().expect("a checkpoint workload")
    }

    /// Fires the trigger for `stage` of `id` at member `m` (the holder that
    /// reached it), if one is armed.
    fn trigger(&mut self, stage: Stage, id: CheckpointId, m: usize) {
        let Some(plane) = self.ckpt.as_mut() else {
            return;
        };
        let Some(i) = plane
            .load
            .triggers
            .iter()
            .enumerate()
            .position(|(i, t)| !plane.fired[i] && t.stage == stage && ckpt(t.save) == id)
        else {
            return;
        };
        if self.healed {
            return;
        }
        plane.fired[i] = true;
        let t = plane.load.triggers[i];
        let victim = match t.victim {
            Victim::Holder => Some(m),
            Victim::Leader => (0..self.sc.members)
                .find(|&v| self.members[v].node.as_ref().is_some_and(|n| n.is_leader())),
        };
        let Some(v) = victim else { return };
        let at = if stage == Stage::Persist {
            self.now.after(plane.load.persist / 2)
        } else {
            self.now
        };
        plane.report.stage_crashes += 1;
        plane
            .report
            .crashed_at
            .insert(format!("{:?}/{:?}", t.stage, t.victim));
        self.later.push((at, Fault::Crash(v)));
        self.later.push((at.after(t.down_for), Fault::Restart(v)));
    }

    /// Called for each index's application the first time any member
    /// applies it.
    pub(super) fn checkpoint_applied(&mut self, applied: &Applied) -> Result<(), ControlFailure> {
        let Applied::Checkpoint(change) = applied else {
            return Ok(());
        };
        match change {
            CatalogChange::Committed { manifest, .. } => {
                // Persist, then announce: every holder it names has it.
                for h in &manifest.holders {
                    let m = h.0 as usize;
                    if self.plane().corrupted.contains(&(m, manifest.id)) {
                        continue;
                    }
                    let ok = self
                        .stored(m, manifest.id)
                        .is_some_and(|s| s.intact(manifest));
                    if !ok {
                        return Err(self.fail(format!(
                            "{} committed naming holder {h}, whose store has no intact copy",
                            manifest.id
                        )));
                    }
                }
                let plane = self.plane();
                plane.report.committed += 1;
                plane.committed.insert(manifest.id, manifest.clone());
            }
            CatalogChange::Reported { id, holder, .. } => {
                let id = *id;
                let m = holder.0 as usize;
                self.trigger(Stage::Reported, id, m);
            }
            CatalogChange::HolderAdded { .. } => self.plane().report.copies += 1,
        }
        Ok(())
    }

    /// One member's checkpoint side for this tick: the trainer, the
    /// keeper's timers and group, its actions, writes that finished.
    pub(super) fn checkpoint_step(&mut self, m: usize) -> Result<(), ControlFailure> {
        if self.ckpt.is_none() || self.ck(m).keeper.is_none() {
            return Ok(());
        }
        let now = self.now;
        let me = self.members[m].id;
        let incarnation = self.members[m].incarnation;
        let (epoch, ring, catalog, admitted) = {
            let g = self.members[m].node.as_ref().expect("running").group();
            let admitted = g
                .members
                .get(&me)
                .is_some_and(|r| g.is_active(me) && r.incarnation == incarnation);
            (g.epoch, g.ring(), &g.checkpoints, admitted)
        };
        let applied = self.members[m].node.as_ref().expect("running").applied();
        if applied > self.ckpt.as_ref().expect("workload").truth.1 {
            let c = catalog.clone();
            self.ckpt.as_mut().expect("workload").truth = (me, applied, c);
        }
        let catalog = &self.members[m]
            .node
            .as_ref()
            .expect("running")
            .group()
            .checkpoints;
        let changed = self.members[m]
            .ck
            .as_ref()
            .expect("workload")
            .seen
            .as_ref()
            .is_none_or(|(e, r, c)| *e != epoch || *r != ring || c != catalog);
        if changed {
            let catalog = catalog.clone();
            let ck = self.ck(m);
            ck.keeper
                .as_mut()
                .expect("running")
                .group(epoch, &ring, &catalog);
            ck.seen = Some((epoch, ring.clone(), catalog));
        }
        // Writes that finished.
        let done: Vec<Write> = {
            let ck = self.ck(m);
            let (done, pending) = std::mem::take(&mut ck.writes)
                .into_iter()
                .partition(|w| w.done <= now);
            ck.writes = pending;
            done
        };
        let chunk_bytes = self.plane().load.chunk_bytes;
        for w in done {
            let stored = Stored::of(&w.bytes, chunk_bytes);
            let parts = stored.parts.clone();
            let ck = self.ck(m);
            ck.store.insert(w.id, stored);
            ck.keeper
                .as_mut()
                .expect("running")
                .persisted(now, w.id, Ok(parts));
        }
        // The trainer.
        let every = self.plane().load.every;
        let interval = now.0 / every.as_micros() as u64;
        if admitted && interval >= self.ck(m).next && now < self.plane().quiet_from {
            let id = ckpt(interval);
            let ck = self.ck(m);
            ck.next = interval + 1;
            // Every trainer's state includes the same ops at a step.
            let held = Some(Held {
                seq: id.step.0,
                epoch: Epoch(1),
            });
            match ck
                .keeper
                .as_mut()
                .expect("running")
                .request(id, epoch, held)
            {
                Ok(()) => {
                    ck.outcomes.insert(id, None);
                }
                Err(_) => self.plane().report.refused += 1,
            }
        }
        if admitted && self.ck(m).wants_restore && changed {
            self.ck(m).wants_restore = false;
            self.start_restore(m);
        }
        {
            let keeper = self.ck(m).keeper.as_mut().expect("running");
            if keeper.poll_timeout().is_some_and(|t| t <= now) {
                keeper.tick(now);
            }
        }
        self.drive(m)?;
        self.corrupt();
        if now.since(self.plane().last_check) >= Duration::from_millis(50) {
            self.plane().last_check = now;
            self.check_kept()?;
        }
        Ok(())
    }

    fn start_restore(&mut self, m: usize) {
        let ck = self.ck(m);
        if ck.seen.is_none() {
            // Not told the group yet (just restarted): as the daemon, which
            // serves its trainer only then.
            ck.wants_restore = true;
            return;
        }
        if let Some(keeper) = ck.keeper.as_mut() {
            ck.restores += 1;
            keeper.restore(ck.restores, 0);
        }
    }

    fn drive(&mut self, m: usize) -> Result<(), ControlFailure> {
        let now = self.now;
        let len = self.plane().load.state_len;
        let persist = self.plane().load.persist;
        loop {
            let Some(action) = self.ck(m).keeper.as_mut().and_then(|k| k.poll_action()) else {
                return Ok(());
            };
            match action {
                KeeperAction::Snapshot { id } => {
                    let ck = self.ck(m);
                    ck.snapshots.insert(id, state(id.step, len));
                    ck.keeper.as_mut().expect("running").snapped(id);
                    let ring = self.members[m]
                        .node
                        .as_ref()
                        .expect("running")
                        .group()
                        .ring();
                    let replicas = self.plane().load.replicas;
                    if holders(id, &ring, replicas).contains(&MemberId(m as u32)) {
                        self.trigger(Stage::Snapshot, id, m);
                    }
                }
                KeeperAction::Persist { id } => {
                    let Some(bytes) = self.ck(m).snapshots.get(&id).cloned() else {
                        return Err(self.fail(format!("m{m} persists {id} without a snapshot")));
                    };
                    self.ck(m).writes.push(Write {
                        done: now.after(persist),
                        id,
                        bytes,
                    });
                    self.trigger(Stage::Persist, id, m);
                }
                KeeperAction::Copy { manifest, from } => {
                    let read = self.read_from(m, from, &manifest);
                    match read {
                        Ok(bytes) => self.ck(m).writes.push(Write {
                            done: now.after(persist),
                            id: manifest.id,
                            bytes,
                        }),
                        Err(why) => self.ck(m).keeper.as_mut().expect("running").persisted(
                            now,
                            manifest.id,
                            Err(why),
                        ),
                    }
                }
                KeeperAction::Release { id } => {
                    self.ck(m).snapshots.remove(&id);
                }
                KeeperAction::Propose(report) => {
                    let id = report.id;
                    let node = self.members[m].node.as_mut().expect("running");
                    let _ = node.propose(&Command::Checkpointed(report));
                    self.trigger(Stage::Report, id, m);
                }
                KeeperAction::Delete { id, why } => {
                    if why.starts_with("it failed its checks")
                        && !self.plane().corrupted.contains(&(m, id))
                    {
                        return Err(self.fail(format!(
                            "m{m} deleted its copy of {id} as bad ({why}), but it is intact"
                        )));
                    }
                    tracing::info!(at = %self.now, member = m, %id, %why, "copy deleted");
                    self.ck(m).store.remove(&id);
                }
                KeeperAction::Load {
                    restore,
                    manifest,
                    source,
                } => {
                    let read = match source {
                        Source::Local => match self.stored(m, manifest.id) {
                            Some(s) => s.read(&manifest),
                            None => Err("this store has no copy".into()),
                        },
                        Source::Holder(h) => self.read_from(m, h, &manifest),
                    };
                    let result = match read {
                        Ok(bytes) => {
                            // Never torn, never mixed: the bytes of that
                            // step, of a checkpoint that was committed.
                            if bytes != state(manifest.id.step, len) {
                                return Err(self.fail(format!(
                                    "m{m} restored {} with bytes that are not that step's state",
                                    manifest.id
                                )));
                            }
                            Ok(())
                        }
                        Err(why) => {
                            if why.contains("checksum mismatch") {
                                self.plane().report.bad_copies_passed += 1;
                            }
                            Err(why)
                        }
                    };
                    self.ck(m).keeper.as_mut().expect("running").loaded(
                        restore,
                        manifest.id,
                        source,
                        result,
                    );
                }
                KeeperAction::Saved { id, outcome } => {
                    if outcome == SaveOutcome::Committed
                        && !self.plane().committed.contains_key(&id)
                    {
                        return Err(self.fail(format!(
                            "m{m}'s trainer was told {id} committed; it never was"
                        )));
                    }
                    match outcome {
                        SaveOutcome::Committed => self.plane().report.saves_committed += 1,
                        SaveOutcome::Superseded(_) => self.plane().report.superseded += 1,
                        SaveOutcome::Failed(_) => {}
                    }
                    self.ck(m).outcomes.insert(id, Some(outcome));
                }
                KeeperAction::Restored { result, .. } => {
                    self.ck(m).last_restored = Some(result.clone());
                    self.check_restored(m, result)?;
                }
            }
        }
    }

    /// Member `m`'s copy of `id` on its store (which survives its crashes).
    fn stored(&self, m: usize, id: CheckpointId) -> Option<&Stored> {
        self.members[m].ck.as_ref().and_then(|c| c.store.get(&id))
    }

    /// What member `m` reads of `manifest` from holder `h`'s store, over
    /// the network as it is now.
    fn read_from(&self, m: usize, h: MemberId, manifest: &Manifest) -> Result<Vec<u8>, String> {
        let hm = h.0 as usize;
        if hm >= self.sc.members || !self.running(hm) || !self.reachable(m, hm) {
            return Err(format!("{h} is unreachable"));
        }
        match self.stored(hm, manifest.id) {
            Some(s) => s.read(manifest),
            None => Err(format!("{h} has no copy")),
        }
    }

    fn check_restored(
        &mut self,
        m: usize,
        result: Result<CheckpointId, String>,
    ) -> Result<(), ControlFailure> {
        // The group as the keeper saw it when it chose what to read.
        let catalog = self
            .ck(m)
            .keeper
            .as_ref()
            .expect("running")
            .catalog()
            .clone();
        match result {
            Ok(id) => {
                if !self.plane().committed.contains_key(&id) {
                    return Err(self.fail(format!("m{m} restored {id}, which never committed")));
                }
                self.plane().report.restored += 1;
                if catalog.latest(0).map(|l| l.id) != Some(id) {
                    self.plane().report.restored_older += 1;
                }
                Ok(())
            }
            Err(why) => {
                // Only when no intact copy of a kept checkpoint is reachable.
                for manifest in catalog.newest_first(0) {
                    for h in &manifest.holders {
                        let hm = h.0 as usize;
                        let reachable = hm == m || (self.running(hm) && self.reachable(m, hm));
                        let intact = self
                            .stored(hm, manifest.id)
                            .is_some_and(|s| s.intact(manifest));
                        if reachable && intact {
                            return Err(self.fail(format!(
                                "m{m}'s restore failed ({why}) although {h} holds an intact copy of {}",
                                manifest.id
                            )));
                        }
                    }
                }
                self.plane().report.restore_failures += 1;
                Ok(())
            }
        }
    }

    /// Corrupts a chunk of the newest copy on a member's store, when the
    /// scenario says so.
    fn corrupt(&mut self) {
        let now = self.now;
        let plane = self.plane();
        let Some(&(at, m)) = plane.load.corruptions.get(plane.next_corruption) else {
            return;
        };
        if Time::ZERO.after(at) > now {
            return;
        }
        plane.next_corruption += 1;
        let m = m % self.sc.members;
        let Some((id, copy)) = self.ck(m).store.iter_mut().next_back() else {
            return;
        };
        let id = *id;
        let Some(chunk) = copy.chunks.iter_mut().find(|c| !c.is_empty()) else {
            return;
        };
        chunk[0] ^= 0x5a;
        let plane = self.plane();
        plane.corrupted.insert((m, id));
        plane.report.corrupted += 1;
        // Its trainer restores at once: the bad chunk must be passed over.
        self.start_restore(m);
    }

    /// Every checkpoint the most advanced group state keeps is on the store
    /// of every holder it names (unless the scenario corrupted that copy).
    fn check_kept(&mut self) -> Result<(), ControlFailure> {
        let (who, index, truth) = self.plane().truth.clone();
        for manifests in truth.committed.values() {
            for manifest in manifests {
                for h in &manifest.holders {
                    let hm = h.0 as usize;
                    if self.plane().corrupted.contains(&(hm, manifest.id)) {
                        continue;
                    }
                    let held = self.stored(hm, manifest.id).is_some();
                    if !held {
                        let kept: Vec<u64> = truth.newest_first(0).map(|m| m.id.step.0).collect();
                        return Err(self.fail(format!(
                            "{} is kept and names {h} a holder, but {h}'s store no longer has it \
                             (the group state of {who} at index {index} keeps steps {kept:?})",
                            manifest.id
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// After the heal: every trainer's last save commits, and every member
    /// restores exactly the latest committed checkpoint.
    pub(super) fn checkpoint_converged(&mut self) -> Result<(), ControlFailure> {
        if self.ckpt.is_none() {
            return Ok(());
        }
        let every = self.plane().load.every;
        let end = self.now;
        for m in 0..self.sc.members {
            // A save asked for at least 3 s before the trainers stopped
            // (the heal was 25 s before) has had time to commit.
            let last = self
                .ck(m)
                .outcomes
                .iter()
                .rev()
                .find(|(id, _)| {
                    let asked = Time(id.step.0 / STEPS_PER_INTERVAL * every.as_micros() as u64);
                    end.since(asked) >= Duration::from_secs(8)
                })
                .map(|(id, o)| (*id, o.clone()));
            match last {
                Some((_, Some(SaveOutcome::Committed | SaveOutcome::Superseded(_)))) => {}
                other => {
                    return Err(self.fail(format!(
                        "after the heal, m{m}'s last save did not commit: {other:?}"
                    )))
                }
            }
        }
        // Every member restores the latest committed checkpoint.
        let latest = self.members[0]
            .node
            .as_ref()
            .expect("running")
            .group()
            .checkpoints
            .latest(0)
            .map(|l| l.id);
        let Some(latest) = latest else {
            return Err(self.fail("after the heal, nothing is committed".into()));
        };
        for m in 0..self.sc.members {
            self.ck(m).last_restored = None;
            self.start_restore(m);
            self.drive(m)?;
            let got = self.ck(m).last_restored.clone();
            if got != Some(Ok(latest)) {
                return Err(self.fail(format!(
                    "after the heal, m{m} restored {got:?}, not the latest committed {latest}"
                )));
            }
        }
        Ok(())
    }
}
