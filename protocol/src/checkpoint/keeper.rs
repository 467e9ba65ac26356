//! One daemon's checkpoint decisions: when to copy its trainer's state out,
//! whether to persist it, what to report through Raft and when to report it
//! again, what to delete, which copy to restore from and what to try next
//! when a copy is bad. It takes the committed [`Catalog`] as the group
//! state publishes it and returns [`KeeperAction`]s; the shell copies,
//! writes, reads and proposes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use tracing::{info, warn};

use super::{holders, Catalog, CheckpointId, Manifest, Part, Report};
use crate::wire::Held;
use crate::{Epoch, MemberId, Time};

/// How a daemon's checkpoints are kept (`[checkpoint]` in its config; every
/// daemon of a group is given the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeeperConfig {
    /// Durable copies a checkpoint needs before it commits.
    pub replicas: u32,
    /// Committed checkpoints kept per stream.
    pub keep: u32,
    /// How long a report may go unseen in the group state before it is
    /// proposed again (a leader that failed loses what it had not
    /// committed).
    pub retry: Duration,
}

impl Default for KeeperConfig {
    fn default() -> Self {
        KeeperConfig {
            replicas: 2,
            keep: 3,
            retry: Duration::from_secs(1),
        }
    }
}

/// Where a copy is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// This daemon's store.
    Local,
    /// Another holder, over the data plane.
    Holder(MemberId),
}

/// How a trainer's save ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Its manifest is committed: it survives the loss of any one holder.
    Committed,
    /// A later checkpoint of the stream was committed first; this one never
    /// will be.
    Superseded(CheckpointId),
    /// It could not be saved here, and why.
    Failed(String),
}

/// What the shell does for the keeper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeeperAction {
    /// Copy the trainer's state for `id` out of its buffer now, answer the
    /// trainer, and call [`Keeper::snapped`].
    Snapshot {
        /// Which checkpoint.
        id: CheckpointId,
    },
    /// Write the snapshot of `id` to the store, chunked and summed, durably
    /// (the store's promise), then call [`Keeper::persisted`].
    Persist {
        /// Which checkpoint.
        id: CheckpointId,
    },
    /// Fetch committed checkpoint `manifest` from holder `from`, verifying
    /// every chunk, and write it to the store as [`KeeperAction::Persist`]
    /// does (a copy replacing a holder that left); then call
    /// [`Keeper::persisted`].
    Copy {
        /// What to copy.
        manifest: Manifest,
        /// From whom.
        from: MemberId,
    },
    /// The in-memory snapshot of `id` is no longer needed.
    Release {
        /// Which checkpoint.
        id: CheckpointId,
    },
    /// Propose the report through Raft.
    Propose(Report),
    /// Delete the copy of `id` from the store.
    Delete {
        /// Which checkpoint.
        id: CheckpointId,
        /// Why, for the log.
        why: String,
    },
    /// Read `manifest`'s state from `source` into the trainer's buffer,
    /// verifying every chunk against the manifest; then call
    /// [`Keeper::loaded`].
    Load {
        /// The restore this read serves.
        restore: u64,
        /// What to read.
        manifest: Manifest,
        /// From where.
        source: Source,
    },
    /// A trainer's save ended.
    Saved {
        /// Which checkpoint.
        id: CheckpointId,
        /// How.
        outcome: SaveOutcome,
    },
    /// A restore ended: the checkpoint now in the trainer's buffer, or why
    /// none is.
    Restored {
        /// Which restore.
        restore: u64,
        /// The checkpoint restored.
        result: Result<CheckpointId, String>,
    },
}

#[derive(Debug)]
enum Stage {
    /// Asked for while the stream's previous save was still being written.
    Queued,
    /// The state is in memory; this member is not (yet) a holder.
    Snapped,
    /// Neither in memory nor held here (a newer snapshot took its memory):
    /// it waits for the group's verdict.
    Waiting,
    /// Being written here.
    Persisting,
    /// Durable here and reported at `at`; `seen` once the group state
    /// counts this member among its holders.
    Reported {
        report: Report,
        at: Time,
        seen: bool,
    },
}

#[derive(Debug)]
struct Save {
    id: CheckpointId,
    epoch: Epoch,
    held: Option<Held>,
    stage: Stage,
    /// The trainer asked for it (not a copy replacing a holder), and is
    /// told how it ends.
    asked: bool,
}

/// Saves kept per stream waiting for their verdict: the oldest beyond it is
/// given up (its trainer told so).
const SAVES_PER_STREAM: usize = 4;

#[derive(Debug)]
struct Restoring {
    stream: u32,
    /// Copies asked for so far.
    tried: Vec<(CheckpointId, Source)>,
    failures: Vec<String>,
}

/// One daemon's checkpoints.
#[derive(Debug)]
pub struct Keeper {
    me: MemberId,
    config: KeeperConfig,
    epoch: Epoch,
    ring: Vec<MemberId>,
    catalog: Catalog,
    /// The stream's saves: the one being written or waiting for its commit,
    /// and at most one asked for behind it.
    saves: BTreeMap<u32, VecDeque<Save>>,
    /// Copies durable in this daemon's store.
    held: BTreeSet<CheckpointId>,
    /// Copies being fetched from another holder: from whom, and what.
    copying: BTreeMap<CheckpointId, (MemberId, Manifest)>,
    restores: BTreeMap<u64, Restoring>,
    /// How the trainer's last saves ended, for a trainer that asks after.
    ended: BTreeMap<CheckpointId, SaveOutcome>,
    actions: VecDeque<KeeperAction>,
}

/// Verdicts remembered for trainers that ask after the fact.
const ENDED_KEPT: usize = 64;

/// Tells the trainer how its save ended, and remembers it.
fn saved(
    actions: &mut VecDeque<KeeperAction>,
    ended: &mut BTreeMap<CheckpointId, SaveOutcome>,
    id: CheckpointId,
    outcome: SaveOutcome,
) {
    ended.insert(id, outcome.clone());
    while ended.len() > ENDED_KEPT {
        ended.pop_first();
    }
    actions.push_back(KeeperAction::Saved { id, outcome });
}

impl Keeper {
    /// The keeper of member `me`, whose store holds `held` (its listing at
    /// start: only copies whose every chunk was written).
    pub fn new(
        me: MemberId,
        config: KeeperConfig,
        held: impl IntoIterator<Item = CheckpointId>,
    ) -> Keeper {
        Keeper {
            me,
            config,
            epoch: Epoch(0),
            ring: Vec::new(),
            catalog: Catalog::default(),
            saves: BTreeMap::new(),
            held: held.into_iter().collect(),
            copying: BTreeMap::new(),
            restores: BTreeMap::new(),
            ended: BTreeMap::new(),
            actions: VecDeque::new(),
        }
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<KeeperAction> {
        self.actions.pop_front()
    }

    /// The copies in this daemon's store.
    pub fn held(&self) -> &BTreeSet<CheckpointId> {
        &self.held
    }

    /// How the trainer's save of `id` ended, or `None` while it is under
    /// way here: its verdict (the last few are remembered), committed when
    /// the group state shows it so, else failed — this daemon never saved
    /// it (a trainer asking about a step it did not checkpoint is told at
    /// once, not left waiting).
    pub fn verdict(&self, id: CheckpointId) -> Option<SaveOutcome> {
        if let Some(outcome) = self.ended.get(&id) {
            return Some(outcome.clone());
        }
        let saving = self
            .saves
            .get(&id.stream)
            .is_some_and(|v| v.iter().any(|s| s.id == id && s.asked));
        if saving {
            return None;
        }
        if self.catalog.get(id).is_some() {
            return Some(SaveOutcome::Committed);
        }
        Some(SaveOutcome::Failed(format!(
            "no checkpoint of step {} was asked for on this daemon since it started",
            id.step.0
        )))
    }

    /// The group's checkpoints as last published.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The trainer asks to checkpoint its state as `id` in `epoch`, a state
    /// that includes the stream's ops up to `held`. The
    /// snapshot is taken at once ([`KeeperAction::Snapshot`]) unless the
    /// stream's previous save is still being written here: then once it
    /// is, so at most one copy of the state is in memory per stream. The
    /// error says why the request is refused.
    pub fn request(
        &mut self,
        id: CheckpointId,
        epoch: Epoch,
        held: Option<Held>,
    ) -> Result<(), String> {
        if let Some(latest) = self.catalog.latest(id.stream) {
            if latest.id.step >= id.step {
                return Err(format!(
                    "step {} of stream {} is already checkpointed; a checkpoint's step must be later",
                    latest.id.step.0, id.stream
                ));
            }
        }
        let saves = self.saves.entry(id.stream).or_default();
        if let Some(last) = saves.back() {
            if last.id.step >= id.step {
                return Err(format!(
                    "a checkpoint of step {} of stream {} was asked for already; a checkpoint's step must be later",
                    last.id.step.0, id.stream
                ));
            }
            if matches!(last.stage, Stage::Queued) {
                return Err(format!(
                    "the checkpoint of step {} of stream {} is still waiting for the one before it to be written; checkpoint less often",
                    last.id.step.0, id.stream
                ));
            }
        }
        let busy = saves.iter().any(|s| matches!(s.stage, Stage::Persisting));
        while saves.len() >= SAVES_PER_STREAM {
            let i = saves
                .iter()
                .position(|s| !matches!(s.stage, Stage::Persisting))
                .expect("one save at most is being written");
            let old = saves.remove(i).expect("present");
            if matches!(old.stage, Stage::Snapped) {
                self.actions.push_back(KeeperAction::Release { id: old.id });
            }
            if old.asked {
                saved(
                    &mut self.actions,
                    &mut self.ended,
                    old.id,
                    SaveOutcome::Failed(format!(
                        "not committed before {SAVES_PER_STREAM} later checkpoints were asked for"
                    )),
                );
            }
        }
        saves.push_back(Save {
            id,
            epoch,
            held,
            stage: Stage::Queued,
            asked: true,
        });
        if !busy {
            self.take_snapshot(id.stream);
        }
        Ok(())
    }

    /// Starts the queued save of `stream`: what it supersedes here goes.
    fn take_snapshot(&mut self, stream: u32) {
        let Some(saves) = self.saves.get_mut(&stream) else {
            return;
        };
        let Some(new) = saves.back() else { return };
        if !matches!(new.stage, Stage::Queued) {
            return;
        }
        let id = new.id;
        // A snapshot kept only in case a holder left gives its memory to the
        // newer one (one copy in memory per stream); it may still commit
        // from its holders' copies.
        for old in saves.iter_mut() {
            if old.id != id && matches!(old.stage, Stage::Snapped) {
                old.stage = Stage::Waiting;
                self.actions.push_back(KeeperAction::Release { id: old.id });
            }
        }
        self.actions.push_back(KeeperAction::Snapshot { id });
    }

    /// The state of `id` was copied out of the trainer's buffer.
    pub fn snapped(&mut self, id: CheckpointId) {
        let Some(save) = self.save_mut(id) else {
            return;
        };
        if !matches!(save.stage, Stage::Queued) {
            return;
        }
        save.stage = Stage::Snapped;
        self.settle_saves(id.stream);
        self.persist_if_holder(id);
    }

    fn persist_if_holder(&mut self, id: CheckpointId) {
        let mine = holders(id, &self.ring, self.config.replicas).contains(&self.me);
        let Some(save) = self.save_mut(id) else {
            return;
        };
        if mine && matches!(save.stage, Stage::Snapped) {
            save.stage = Stage::Persisting;
            self.actions.push_back(KeeperAction::Persist { id });
        }
    }

    /// The store finished writing `id` (a snapshot or a copy): the parts as
    /// written, or why it could not.
    pub fn persisted(&mut self, now: Time, id: CheckpointId, result: Result<Vec<Part>, String>) {
        let copied = self.copying.remove(&id);
        let (epoch, held) = match self.save_mut(id) {
            Some(s) => (s.epoch, s.held),
            None => (self.epoch, copied.as_ref().and_then(|(_, m)| m.held)),
        };
        let copied = copied.is_some();
        match result {
            Ok(parts) => {
                self.held.insert(id);
                let report = Report {
                    id,
                    epoch,
                    parts,
                    held,
                    holder: self.me,
                    replicas: self.config.replicas,
                    keep: self.config.keep,
                };
                self.actions
                    .push_back(KeeperAction::Propose(report.clone()));
                if let Some(save) = self.save_mut(id) {
                    if matches!(save.stage, Stage::Persisting) {
                        save.stage = Stage::Reported {
                            report,
                            at: now,
                            seen: false,
                        };
                        self.actions.push_back(KeeperAction::Release { id });
                    }
                } else if copied {
                    // A copy's report is retried like a save's.
                    self.saves.entry(id.stream).or_default().push_front(Save {
                        id,
                        epoch,
                        held,
                        stage: Stage::Reported {
                            report,
                            at: now,
                            seen: false,
                        },
                        asked: false,
                    });
                }
            }
            Err(why) => {
                warn!(%id, %why, "checkpoint not persisted here");
                self.actions.push_back(KeeperAction::Delete {
                    id,
                    why: format!("its write failed: {why}"),
                });
                if let Some(saves) = self.saves.get_mut(&id.stream) {
                    if let Some(i) = saves.iter().position(|s| s.id == id) {
                        let old = saves.remove(i).expect("present");
                        self.actions.push_back(KeeperAction::Release { id });
                        if old.asked {
                            saved(
                                &mut self.actions,
                                &mut self.ended,
                                id,
                                SaveOutcome::Failed(format!(
                                    "this daemon could not write it: {why}"
                                )),
                            );
                        }
                    }
                }
            }
        }
        // The group may have decided while it was written.
        self.settle_saves(id.stream);
        self.collect_garbage();
        self.take_snapshot(id.stream);
    }

    fn save_mut(&mut self, id: CheckpointId) -> Option<&mut Save> {
        self.saves
            .get_mut(&id.stream)
            .and_then(|v| v.iter_mut().find(|s| s.id == id))
    }

    /// The group state changed: epoch, ring and committed checkpoints.
    pub fn group(&mut self, epoch: Epoch, ring: &[MemberId], catalog: &Catalog) {
        self.epoch = epoch;
        self.ring = ring.to_vec();
        self.catalog = catalog.clone();
        let streams: Vec<u32> = self.saves.keys().copied().collect();
        for stream in streams {
            self.settle_saves(stream);
        }
        self.collect_garbage();
        self.replace_holders();
    }

    fn settle_saves(&mut self, stream: u32) {
        let latest = self.catalog.latest(stream).map(|m| m.id);
        let Some(mut saves) = self.saves.remove(&stream) else {
            return;
        };
        let me = self.me;
        saves.retain_mut(|s| {
            if matches!(s.stage, Stage::Queued) {
                return true; // its trainer waits for the snapshot first
            }
            let outcome = if let Some(m) = self.catalog.get(s.id) {
                // A copy is done once the group counts it.
                if !s.asked && !m.holders.contains(&me) {
                    if let Stage::Reported { seen, .. } = &mut s.stage {
                        *seen = false;
                    }
                    return true;
                }
                Some(SaveOutcome::Committed)
            } else {
                latest
                    .filter(|l| l.step >= s.id.step)
                    .map(SaveOutcome::Superseded)
            };
            if let Some(outcome) = outcome {
                if matches!(s.stage, Stage::Persisting) {
                    // Its write ends with `persisted`, which finds no save
                    // and keeps the copy only if still wanted.
                    return true;
                }
                if matches!(s.stage, Stage::Snapped) {
                    self.actions.push_back(KeeperAction::Release { id: s.id });
                }
                if s.asked {
                    saved(&mut self.actions, &mut self.ended, s.id, outcome);
                }
                return false;
            }
            if let Stage::Reported { seen, .. } = &mut s.stage {
                *seen = self
                    .catalog
                    .pending
                    .get(&s.id)
                    .is_some_and(|m| m.holders.contains(&me));
            }
            true
        });
        self.saves.insert(stream, saves);
        let ids: Vec<CheckpointId> = self.saves[&stream].iter().map(|s| s.id).collect();
        for id in ids {
            self.persist_if_holder(id);
        }
    }

    /// Deletes copies nobody will ask for: older than the stream's latest
    /// committed checkpoint and not kept. Only those: a daemon back from a
    /// restart reads the group state from an older point of the log
    /// first, and a copy newer than what it has seen committed may be
    /// committed already.
    fn collect_garbage(&mut self) {
        let garbage: Vec<CheckpointId> = self
            .held
            .iter()
            .filter(|id| {
                !self.catalog.wants(**id)
                    && self
                        .catalog
                        .latest(id.stream)
                        .is_some_and(|l| l.id.step > id.step)
                    && !self.copying.contains_key(id)
                    && !self
                        .saves
                        .get(&id.stream)
                        .is_some_and(|v| v.iter().any(|s| s.id == **id))
            })
            .copied()
            .collect();
        for id in garbage {
            self.held.remove(&id);
            let why = match self.catalog.latest(id.stream) {
                Some(l) => format!(
                    "step {} of the stream is committed and it is not kept",
                    l.id.step.0
                ),
                None => "not kept".into(),
            };
            self.actions.push_back(KeeperAction::Delete { id, why });
        }
    }

    /// For each kept checkpoint held by fewer ring members than it needs,
    /// the ring members next in its placement order copy it from a holder.
    fn replace_holders(&mut self) {
        let mut copies = Vec::new();
        for manifests in self.catalog.committed.values() {
            for m in manifests {
                if self.held.contains(&m.id) || self.copying.contains_key(&m.id) {
                    continue;
                }
                let active: Vec<MemberId> = m
                    .holders
                    .iter()
                    .copied()
                    .filter(|h| self.ring.contains(h))
                    .collect();
                let needed = (self.config.replicas.max(1) as usize).min(self.ring.len());
                let Some(&from) = active.first() else {
                    continue; // no holder in the ring to copy from
                };
                if active.len() >= needed {
                    continue;
                }
                let order = holders(m.id, &self.ring, self.ring.len() as u32);
                let next: Vec<MemberId> = order
                    .into_iter()
                    .filter(|c| !m.holders.contains(c))
                    .take(needed - active.len())
                    .collect();
                if next.contains(&self.me) {
                    copies.push((m.clone(), from));
                }
            }
        }
        for (manifest, from) in copies {
            info!(id = %manifest.id, %from, "copying a checkpoint whose holder left the ring");
            self.copying.insert(manifest.id, (from, manifest.clone()));
            self.actions
                .push_back(KeeperAction::Copy { manifest, from });
        }
    }

    /// Proposes again the reports the group state does not show yet.
    pub fn tick(&mut self, now: Time) {
        let retry = self.config.retry;
        for saves in self.saves.values_mut() {
            for s in saves.iter_mut() {
                if let Stage::Reported { report, at, seen } = &mut s.stage {
                    if !*seen && now.since(*at) >= retry {
                        *at = now;
                        self.actions
                            .push_back(KeeperAction::Propose(report.clone()));
                    }
                }
            }
        }
    }

    /// When [`Keeper::tick`] has something to do.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.saves
            .values()
            .flatten()
            .filter_map(|s| match &s.stage {
                Stage::Reported {
                    at, seen: false, ..
                } => Some(at.after(self.config.retry)),
                _ => None,
            })
            .min()
    }

    /// Restore `stream`'s latest committed checkpoint into the trainer's
    /// buffer: from this store when it holds a copy, else from a holder;
    /// a copy that fails its checks is passed over for the next holder's,
    /// then for the previous checkpoint. Ends with
    /// [`KeeperAction::Restored`].
    pub fn restore(&mut self, restore: u64, stream: u32) {
        self.restores.insert(
            restore,
            Restoring {
                stream,
                tried: Vec::new(),
                failures: Vec::new(),
            },
        );
        self.next_attempt(restore);
    }

    /// The copies to try for `stream`, best first: newest checkpoint first;
    /// for each, this store's copy, then ring members' (a holder out of the
    /// ring may be down), then the others'.
    fn candidates(&self, stream: u32) -> Vec<(&Manifest, Source)> {
        let mut out = Vec::new();
        for m in self.catalog.newest_first(stream) {
            if self.held.contains(&m.id) {
                out.push((m, Source::Local));
            }
            let mut others: Vec<MemberId> = m
                .holders
                .iter()
                .copied()
                .filter(|h| *h != self.me)
                .collect();
            others.sort_by_key(|h| !self.ring.contains(h));
            out.extend(others.into_iter().map(|h| (m, Source::Holder(h))));
        }
        out
    }

    /// Asks for the best copy not tried yet, chosen from the catalog as it
    /// is now: a checkpoint committed while the restore ran is tried too.
    fn next_attempt(&mut self, restore: u64) {
        let Some(r) = self.restores.get(&restore) else {
            return;
        };
        let next = self
            .candidates(r.stream)
            .into_iter()
            .find(|(m, s)| !r.tried.contains(&(m.id, *s)))
            .map(|(m, s)| (m.clone(), s));
        let r = self.restores.get_mut(&restore).expect("present");
        if let Some((manifest, source)) = next {
            r.tried.push((manifest.id, source));
            self.actions.push_back(KeeperAction::Load {
                restore,
                manifest,
                source,
            });
            return;
        }
        let r = self.restores.remove(&restore).expect("present");
        let why = if r.failures.is_empty() {
            format!("stream {} has no committed checkpoint", r.stream)
        } else {
            format!(
                "no committed checkpoint of stream {} could be read: {}",
                r.stream,
                r.failures.join("; ")
            )
        };
        self.actions.push_back(KeeperAction::Restored {
            restore,
            result: Err(why),
        });
    }

    /// A [`KeeperAction::Load`] ended: the checkpoint is in the trainer's
    /// buffer, or why not (a chunk missing or failing its checksum, a holder
    /// unreachable). A bad local copy is deleted.
    pub fn loaded(
        &mut self,
        restore: u64,
        id: CheckpointId,
        source: Source,
        result: Result<(), String>,
    ) {
        if !self.restores.contains_key(&restore) {
            return;
        }
        match result {
            Ok(()) => {
                self.restores.remove(&restore);
                self.actions.push_back(KeeperAction::Restored {
                    restore,
                    result: Ok(id),
                });
            }
            Err(why) => {
                let from = match source {
                    Source::Local => "this daemon's copy".to_string(),
                    Source::Holder(h) => format!("{h}'s copy"),
                };
                warn!(%id, %why, "{from} cannot be restored; trying the next");
                if source == Source::Local {
                    self.held.remove(&id);
                    self.actions.push_back(KeeperAction::Delete {
                        id,
                        why: format!("it failed its checks: {why}"),
                    });
                }
                let r = self.restores.get_mut(&restore).expect("present");
                r.failures
                    .push(format!("{from} of step {}: {why}", id.step.0));
                self.next_attempt(restore);
            }
        }
    }
}

#[cfg(test)]
#[path = "keeper_tests.rs"]
mod tests;
