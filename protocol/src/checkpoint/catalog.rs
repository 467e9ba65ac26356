//! The checkpoints in the replicated group state: which are committed,
//! which wait for holders. Applied in Raft log order by every daemon, so all
//! agree on what "the latest committed checkpoint" is.

use std::collections::BTreeMap;

use bincode::{Decode, Encode};

use super::{CheckpointId, Manifest, Report};
use crate::{MemberId, Step};

/// Checkpoints reported by too few holders yet, at most this many per stream
/// (the oldest goes first): a stream whose saves never gather their holders
/// (diverged trainers) must not grow the group state.
const PENDING_PER_STREAM: usize = 4;

/// The group's checkpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct Catalog {
    /// Committed manifests per stream, oldest first, at most `keep` each.
    pub committed: BTreeMap<u32, Vec<Manifest>>,
    /// Reported but not committed yet: each newer than its stream's latest
    /// committed checkpoint.
    pub pending: BTreeMap<CheckpointId, Manifest>,
}

/// What a report changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CatalogChange {
    /// The holder's copy counts; the checkpoint waits for more holders.
    Reported {
        /// Which checkpoint.
        id: CheckpointId,
        /// Who reported.
        holder: MemberId,
        /// Holders in the ring so far.
        holders: usize,
        /// Holders it needs.
        needed: usize,
    },
    /// The checkpoint is committed; older ones past retention are dropped
    /// (their chunks may be collected by their holders).
    Committed {
        /// What was committed.
        manifest: Manifest,
        /// Committed checkpoints no longer kept, and reported ones superseded.
        dropped: Vec<CheckpointId>,
    },
    /// A committed checkpoint gained a holder (a copy replacing one that
    /// left).
    HolderAdded {
        /// Which checkpoint.
        id: CheckpointId,
        /// The new holder.
        holder: MemberId,
    },
}

impl Catalog {
    /// The stream's latest committed checkpoint.
    pub fn latest(&self, stream: u32) -> Option<&Manifest> {
        self.committed.get(&stream).and_then(|v| v.last())
    }

    /// A committed checkpoint.
    pub fn get(&self, id: CheckpointId) -> Option<&Manifest> {
        self.committed
            .get(&id.stream)
            .and_then(|v| v.iter().find(|m| m.id == id))
    }

    /// The stream's committed checkpoints, newest first.
    pub fn newest_first(&self, stream: u32) -> impl Iterator<Item = &Manifest> {
        self.committed.get(&stream).into_iter().flatten().rev()
    }

    /// Whether a copy of `id` is still wanted: committed and kept, or
    /// reported and not superseded. A copy that is neither and older than
    /// the stream's latest committed checkpoint is garbage.
    pub fn wants(&self, id: CheckpointId) -> bool {
        self.get(id).is_some() || self.pending.contains_key(&id)
    }

    /// Applies a holder's report. `active` says who is in the current ring
    /// (of `ring_len` members): only their copies count, and the checkpoint
    /// commits once `min(replicas, ring_len)` ring members reported the same
    /// bytes. The error says why the report changed nothing.
    pub fn apply(
        &mut self,
        report: &Report,
        active: impl Fn(MemberId) -> bool,
        ring_len: usize,
    ) -> Result<CatalogChange, String> {
        let id = report.id;
        let holder = report.holder;
        if !active(holder) {
            return Err(format!(
                "{holder}, out of the ring, reported {id}: not counted"
            ));
        }
        if report.parts.is_empty() || !report.parts.iter().all(|p| p.is_well_formed()) {
            return Err(format!(
                "{holder}'s report of {id} has no parts or a part whose checksums do not cover it"
            ));
        }
        if let Some(m) = self
            .committed
            .get_mut(&id.stream)
            .and_then(|v| v.iter_mut().find(|m| m.id == id))
        {
            if m.parts != report.parts || m.held != report.held {
                return Err(format!(
                    "{holder}'s copy of {id} differs from the committed one; not counted"
                ));
            }
            if m.holders.contains(&holder) {
                return Err(format!("{holder} already holds {id}"));
            }
            m.holders.push(holder);
            return Ok(CatalogChange::HolderAdded { id, holder });
        }
        if let Some(latest) = self.latest(id.stream) {
            if latest.id.step >= id.step {
                return Err(format!(
                    "{id} is superseded: step {} of the stream is committed",
                    latest.id.step.0
                ));
            }
        }
        let entry = self.pending.entry(id).or_insert_with(|| Manifest {
            id,
            epoch: report.epoch,
            parts: report.parts.clone(),
            holders: Vec::new(),
            held: report.held,
        });
        if entry.parts != report.parts || entry.held != report.held {
            return Err(format!(
                "{holder}'s copy of {id} differs from {}'s: the trainers' states diverged; not counted",
                entry.holders.first().map_or("another holder".into(), |m| m.to_string())
            ));
        }
        if entry.holders.contains(&holder) {
            return Err(format!("{holder} already reported {id}"));
        }
        entry.holders.push(holder);
        let in_ring = entry.holders.iter().filter(|m| active(**m)).count();
        let needed = (report.replicas.max(1) as usize).min(ring_len.max(1));
        if in_ring < needed {
            self.bound_pending(id.stream);
            return Ok(CatalogChange::Reported {
                id,
                holder,
                holders: in_ring,
                needed,
            });
        }
        let manifest = self.pending.remove(&id).expect("inserted above");
        let mut dropped: Vec<CheckpointId> = self
            .pending
            .range(
                CheckpointId {
                    stream: id.stream,
                    step: Step(0),
                }..id,
            )
            .map(|(k, _)| *k)
            .collect();
        for k in &dropped {
            self.pending.remove(k);
        }
        let kept = self.committed.entry(id.stream).or_default();
        kept.push(manifest.clone());
        let keep = report.keep.max(1) as usize;
        if kept.len() > keep {
            dropped.extend(kept.drain(..kept.len() - keep).map(|m| m.id));
        }
        Ok(CatalogChange::Committed { manifest, dropped })
    }

    fn bound_pending(&mut self, stream: u32) {
        let mine: Vec<CheckpointId> = self
            .pending
            .keys()
            .filter(|k| k.stream == stream)
            .copied()
            .collect();
        for k in mine
            .iter()
            .take(mine.len().saturating_sub(PENDING_PER_STREAM))
        {
            self.pending.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Part, REPLICA_PART};
    use super::*;
    use crate::Epoch;

    fn report(step: u64, holder: u32, bytes: &[u8]) -> Report {
        Report {
            id: CheckpointId {
                stream: 0,
                step: Step(step),
            },
            epoch: Epoch(3),
            parts: vec![Part::of(REPLICA_PART, None, bytes, 4)],
            held: None,
            holder: MemberId(holder),
            replicas: 2,
            keep: 2,
        }
    }

    fn all(_: MemberId) -> bool {
        true
    }

    #[test]
    fn a_checkpoint_commits_when_its_second_holder_reports_the_same_bytes() {
        let mut c = Catalog::default();
        let first = c.apply(&report(10, 1, b"abcdefgh"), all, 3).unwrap();
        assert_eq!(
            first,
            CatalogChange::Reported {
                id: report(10, 1, b"").id,
                holder: MemberId(1),
                holders: 1,
                needed: 2
            }
        );
        assert!(c.latest(0).is_none());
        match c.apply(&report(10, 2, b"abcdefgh"), all, 3).unwrap() {
            CatalogChange::Committed { manifest, dropped } => {
                assert_eq!(manifest.holders, vec![MemberId(1), MemberId(2)]);
                assert_eq!(manifest.size(), 8);
                assert!(dropped.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.latest(0).unwrap().id.step, Step(10));
        assert!(c.pending.is_empty());
    }

    #[test]
    fn a_holder_whose_bytes_differ_is_not_counted() {
        let mut c = Catalog::default();
        c.apply(&report(10, 1, b"abcdefgh"), all, 3).unwrap();
        let err = c.apply(&report(10, 2, b"abcdefgX"), all, 3).unwrap_err();
        assert!(err.contains("diverged"), "{err}");
        assert!(c.latest(0).is_none());
        let err = c.apply(&report(10, 1, b"abcdefgh"), all, 3).unwrap_err();
        assert!(err.contains("already reported"), "{err}");
    }

    #[test]
    fn only_ring_members_count_and_a_ring_of_one_commits_alone() {
        let mut c = Catalog::default();
        let not_m2 = |m: MemberId| m != MemberId(2);
        let err = c.apply(&report(10, 2, b"abcd"), not_m2, 2).unwrap_err();
        assert!(err.contains("out of the ring"), "{err}");
        assert!(matches!(
            c.apply(&report(10, 1, b"abcd"), all, 1).unwrap(),
            CatalogChange::Committed { .. }
        ));
    }

    #[test]
    fn retention_keeps_the_last_k_and_drops_superseded_reports() {
        let mut c = Catalog::default();
        for step in [10, 20, 30] {
            c.apply(&report(step, 1, b"abcd"), all, 3).unwrap();
        }
        // Step 20 commits: the report of 10 is superseded.
        match c.apply(&report(20, 2, b"abcd"), all, 3).unwrap() {
            CatalogChange::Committed { dropped, .. } => {
                assert_eq!(dropped, vec![report(10, 1, b"").id]);
            }
            other => panic!("{other:?}"),
        }
        let err = c.apply(&report(10, 2, b"abcd"), all, 3).unwrap_err();
        assert!(err.contains("superseded"), "{err}");
        c.apply(&report(30, 2, b"abcd"), all, 3).unwrap();
        c.apply(&report(40, 1, b"abcd"), all, 3).unwrap();
        match c.apply(&report(40, 3, b"abcd"), all, 3).unwrap() {
            CatalogChange::Committed { dropped, .. } => {
                assert_eq!(dropped, vec![report(20, 1, b"").id], "keep = 2");
            }
            other => panic!("{other:?}"),
        }
        let steps: Vec<u64> = c.newest_first(0).map(|m| m.id.step.0).collect();
        assert_eq!(steps, vec![40, 30]);
        assert!(c.wants(report(30, 1, b"").id));
        assert!(!c.wants(report(20, 1, b"").id));
    }

    #[test]
    fn a_committed_checkpoint_gains_a_replacement_holder() {
        let mut c = Catalog::default();
        c.apply(&report(10, 1, b"abcd"), all, 3).unwrap();
        c.apply(&report(10, 2, b"abcd"), all, 3).unwrap();
        assert_eq!(
            c.apply(&report(10, 3, b"abcd"), all, 3).unwrap(),
            CatalogChange::HolderAdded {
                id: report(10, 3, b"").id,
                holder: MemberId(3)
            }
        );
        assert_eq!(c.latest(0).unwrap().holders.len(), 3);
        assert!(c.apply(&report(10, 3, b"abcd"), all, 3).is_err());
    }

    #[test]
    fn reports_that_never_gather_their_holders_stay_bounded() {
        let mut c = Catalog::default();
        for step in 1..=20 {
            c.apply(&report(step, 1, b"abcd"), all, 3).unwrap();
        }
        assert_eq!(c.pending.len(), PENDING_PER_STREAM);
        assert_eq!(c.pending.keys().next().unwrap().step, Step(17));
    }

    #[test]
    fn a_malformed_report_is_refused() {
        let mut c = Catalog::default();
        let mut r = report(10, 1, b"abcdefgh");
        r.parts[0].sums.pop();
        assert!(c.apply(&r, all, 3).unwrap_err().contains("do not cover"));
        r.parts.clear();
        assert!(c.apply(&r, all, 3).is_err());
    }
}
