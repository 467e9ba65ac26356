//! Checkpoints: a trainer's state saved to the daemons' disks, with its
//! commit record in the Raft log.
//!
//! A save has two phases, as in CheckFreq: the snapshot (the daemon copies
//! the state out of the trainer's buffer, and the trainer goes on) and the
//! persist (the daemons chosen by [`holders`] write it to their stores in
//! checksummed chunks while training continues). Each holder, once its copy
//! is durable, reports it through Raft ([`Report`], committed as
//! `Command::Checkpointed`); the [`Catalog`] in the replicated group state
//! commits the checkpoint's [`Manifest`] when enough holders have reported
//! the same bytes. Persist, then announce, as Raft does with its own log: a
//! committed manifest names copies that exist.
//!
//! Every member of a data-parallel stream holds the same state, so every
//! member snapshots it and any of them can persist it: the holders are a
//! pure function of the checkpoint and the ring, and when one leaves before
//! reporting, the rule over the next ring names another, which persists its
//! own snapshot. The state is one [`Part`] with no owner; sharded state
//! (parameter shards) will save one part per owner into the same manifest.
//!
//! [`Keeper`] is one daemon's side: what to persist, report, keep, delete,
//! and where to restore from.

mod catalog;
mod keeper;

pub use catalog::{Catalog, CatalogChange};
pub use keeper::{Keeper, KeeperAction, KeeperConfig, SaveOutcome, Source};

use bincode::{Decode, Encode};
use std::fmt;

use crate::membership::state_checksum;
use crate::wire::Held;
use crate::{Epoch, MemberId, Step};

/// The bytes of one checksummed chunk of a part (the last may be shorter).
pub const CHUNK_BYTES: u32 = 1 << 20;

/// The name of the one part of a data-parallel stream's state.
pub const REPLICA_PART: &str = "replica";

/// A checkpoint: one stream's state after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct CheckpointId {
    /// The trainer's collective stream.
    pub stream: u32,
    /// The step the state is from, as the trainer numbers them.
    pub step: Step,
}

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream {} step {}", self.stream, self.step.0)
    }
}

/// A byte range of a checkpoint's state, with its chunks' checksums.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Part {
    /// What it is: [`REPLICA_PART`] for data-parallel state (a shard's key
    /// range once parameter shards checkpoint).
    pub name: String,
    /// Who saves it: `None` when every member holds the same bytes.
    pub owner: Option<MemberId>,
    /// Its length in bytes.
    pub size: u64,
    /// The length of every chunk but the last.
    pub chunk_bytes: u32,
    /// [`chunk_sum`] of each chunk, in order.
    pub sums: Vec<u64>,
}

impl Part {
    /// The part for `bytes`, cut into chunks of `chunk_bytes` and summed.
    ///
    /// # Panics
    /// When `chunk_bytes` is 0.
    pub fn of(name: &str, owner: Option<MemberId>, bytes: &[u8], chunk_bytes: u32) -> Part {
        assert!(chunk_bytes > 0, "a chunk holds at least one byte");
        Part {
            name: name.to_string(),
            owner,
            size: bytes.len() as u64,
            chunk_bytes,
            sums: bytes.chunks(chunk_bytes as usize).map(chunk_sum).collect(),
        }
    }

    /// How many chunks it has.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_bytes))
    }

    /// The byte range of chunk `index`.
    pub fn chunk_range(&self, index: u64) -> std::ops::Range<u64> {
        let start = index * u64::from(self.chunk_bytes);
        start..(start + u64::from(self.chunk_bytes)).min(self.size)
    }

    /// Whether the part's shape is sound: a sum for every chunk.
    pub fn is_well_formed(&self) -> bool {
        self.chunk_bytes > 0 && self.sums.len() as u64 == self.chunks()
    }
}

/// The checksum of one chunk (the state hand-over's FNV-1a, so a corrupt
/// word always changes it).
pub fn chunk_sum(bytes: &[u8]) -> u64 {
    state_checksum(bytes)
}

/// A committed checkpoint: what it is and who holds a durable copy.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Manifest {
    /// Which checkpoint.
    pub id: CheckpointId,
    /// The epoch its first holder reported it in.
    pub epoch: Epoch,
    /// Its parts.
    pub parts: Vec<Part>,
    /// The members that reported a durable copy, in report order.
    pub holders: Vec<MemberId>,
    /// The last op of the stream whose result the state includes, as the
    /// trainers said when they checkpointed: a trainer that restores it
    /// joins with it, so the group can resume from the restored state.
    pub held: Option<Held>,
}

impl Manifest {
    /// The state's size in bytes, all parts together.
    pub fn size(&self) -> u64 {
        self.parts.iter().map(|p| p.size).sum()
    }
}

/// A holder's report that its copy of checkpoint `id` is durable, proposed
/// through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Report {
    /// Which checkpoint.
    pub id: CheckpointId,
    /// The epoch the report was made in.
    pub epoch: Epoch,
    /// The parts it holds, with their checksums.
    pub parts: Vec<Part>,
    /// The last op of the stream the state includes (see
    /// [`Manifest::held`]).
    pub held: Option<Held>,
    /// The reporting member.
    pub holder: MemberId,
    /// How many holders the checkpoint needs before it commits
    /// (`checkpoint.replicas`; every daemon is given the same).
    pub replicas: u32,
    /// How many committed checkpoints of the stream are kept
    /// (`checkpoint.keep`).
    pub keep: u32,
}

/// The members that persist checkpoint `id` when `ring` is current:
/// `replicas` of them (all, when the ring is smaller), consecutive in ring
/// order from a start drawn from the checkpoint's id, so that successive
/// checkpoints spread over the members' disks. A pure function: every
/// member computes the same list, and over a ring without a holder that
/// left it names a replacement.
pub fn holders(id: CheckpointId, ring: &[MemberId], replicas: u32) -> Vec<MemberId> {
    if ring.is_empty() {
        return Vec::new();
    }
    let n = ring.len();
    // SplitMix64's finaliser: steps are often multiples of the ring size
    // (a checkpoint every 10 steps on 5 members), so `step % n` would pick
    // the same member every time.
    let mut z = (u64::from(id.stream) << 40) ^ id.step.0;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let start = (z % n as u64) as usize;
    let count = (replicas.max(1) as usize).min(n);
    (0..count).map(|i| ring[(start + i) % n]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: u32) -> Vec<MemberId> {
        (1..=n).map(MemberId).collect()
    }

    #[test]
    fn holders_are_consecutive_distinct_and_capped_by_the_ring() {
        let id = CheckpointId {
            stream: 0,
            step: Step(40),
        };
        let h = holders(id, &ring(5), 2);
        assert_eq!(h.len(), 2);
        assert_ne!(h[0], h[1]);
        let at = ring(5).iter().position(|m| *m == h[0]).unwrap();
        assert_eq!(h[1], ring(5)[(at + 1) % 5]);
        assert_eq!(holders(id, &ring(1), 2), vec![MemberId(1)]);
        assert_eq!(holders(id, &[], 2), vec![]);
        assert_eq!(
            holders(id, &ring(3), 0).len(),
            1,
            "a checkpoint has a holder"
        );
    }

    #[test]
    fn checkpoints_every_ring_size_steps_spread_over_every_member() {
        let mut first = std::collections::BTreeSet::new();
        for k in 1..=50 {
            let id = CheckpointId {
                stream: 0,
                step: Step(5 * k),
            };
            first.insert(holders(id, &ring(5), 2)[0]);
        }
        assert_eq!(first.len(), 5, "every member is a first holder: {first:?}");
    }

    #[test]
    fn a_replacement_is_named_when_a_holder_leaves_the_ring() {
        let id = CheckpointId {
            stream: 3,
            step: Step(120),
        };
        let before = holders(id, &ring(5), 2);
        let after_ring: Vec<_> = ring(5).into_iter().filter(|m| *m != before[0]).collect();
        let after = holders(id, &after_ring, 2);
        assert_eq!(after.len(), 2);
        assert!(!after.contains(&before[0]));
    }

    #[test]
    fn a_part_is_cut_into_summed_chunks_and_a_changed_word_changes_its_sum() {
        let bytes: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        let p = Part::of(REPLICA_PART, None, &bytes, 1000);
        assert_eq!(p.chunks(), 3);
        assert_eq!(p.sums.len(), 3);
        assert_eq!(p.chunk_range(2), 2000..2500);
        assert!(p.is_well_formed());
        let mut bad = bytes.clone();
        bad[2400] ^= 1;
        let q = Part::of(REPLICA_PART, None, &bad, 1000);
        assert_eq!(p.sums[..2], q.sums[..2]);
        assert_ne!(p.sums[2], q.sums[2]);
        let empty = Part::of(REPLICA_PART, None, &[], 1000);
        assert_eq!((empty.chunks(), empty.sums.len()), (0, 0));
    }
}
