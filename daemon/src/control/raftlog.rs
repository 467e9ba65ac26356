//! The Raft log, hard state and snapshot on disk, in raft-engine (TiKV's log
//! store for raft-rs). Every batch is written with `sync = true`: fsync, not
//! sled's `sync_file_range`, so a vote or an entry acknowledged to a peer
//! survives power loss.
//!
//! The data directory also holds this daemon's life counter
//! (`incarnation`), raised and fsynced at every start.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use phalanx_protocol::membership::control::{Durable, PersistBatch, Persisted};
use phalanx_protocol::Incarnation;
use raft::eraftpb::{Entry, HardState, Snapshot};
use raft_engine::{Config, Engine, LogBatch, MessageExt, ReadableSize};

/// The one Raft group this daemon takes part in.
const GROUP: u64 = 1;
const HARD_STATE: &[u8] = b"hard_state";
const SNAPSHOT: &[u8] = b"snapshot";

#[derive(Clone, Copy)]
struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// raft-engine as the control node's durable store.
pub struct RaftLog {
    engine: Engine,
}

impl std::fmt::Debug for RaftLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLog")
            .field("dir", &self.engine.path())
            .finish()
    }
}

impl RaftLog {
    /// Opens (or creates) the log under `dir`, returning what it holds
    /// (`None` when it is new).
    pub fn open(dir: &Path) -> Result<(RaftLog, Option<Persisted>)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the raft directory {}", dir.display()))?;
        let cfg = Config {
            dir: dir.to_string_lossy().into_owned(),
            target_file_size: ReadableSize::mb(8),
            purge_threshold: ReadableSize::mb(64),
            ..Config::default()
        };
        let engine = Engine::open(cfg)
            .with_context(|| format!("opening the raft log in {}", dir.display()))?;
        let hard_state: Option<HardState> = engine
            .get_message(GROUP, HARD_STATE)
            .context("reading the raft hard state")?;
        let snapshot: Option<Snapshot> = engine
            .get_message(GROUP, SNAPSHOT)
            .context("reading the raft snapshot")?;
        let mut entries = Vec::new();
        if let (Some(first), Some(last)) = (engine.first_index(GROUP), engine.last_index(GROUP)) {
            engine
                .fetch_entries_to::<EntryExt>(GROUP, first, last + 1, None, &mut entries)
                .context("reading the raft log")?;
        }
        let snap_index = snapshot.as_ref().map_or(0, |s| s.get_metadata().index);
        entries.retain(|e| e.index > snap_index);
        let persisted =
            (hard_state.is_some() || snapshot.is_some() || !entries.is_empty()).then(|| {
                Persisted {
                    hard_state: hard_state.unwrap_or_default(),
                    snapshot: snapshot.unwrap_or_default(),
                    entries,
                }
            });
        Ok((RaftLog { engine }, persisted))
    }
}

impl Durable for RaftLog {
    fn persist(&mut self, batch: &PersistBatch) -> Result<(), String> {
        let mut lb = LogBatch::default();
        let err = |e: raft_engine::Error| format!("raft log write: {e}");
        if let Some(snap) = &batch.snapshot {
            lb.put_message(GROUP, SNAPSHOT.to_vec(), snap)
                .map_err(err)?;
            lb.add_command(
                GROUP,
                raft_engine::Command::Compact {
                    index: snap.get_metadata().index + 1,
                },
            );
        }
        if !batch.entries.is_empty() {
            lb.add_entries::<EntryExt>(GROUP, &batch.entries)
                .map_err(err)?;
        }
        if let Some(hs) = &batch.hard_state {
            lb.put_message(GROUP, HARD_STATE.to_vec(), hs)
                .map_err(err)?;
        }
        if let Some(idx) = batch.compact_to {
            lb.add_command(GROUP, raft_engine::Command::Compact { index: idx });
        }
        self.engine.write(&mut lb, true).map_err(err)?;
        if batch.compact_to.is_some() {
            // Whole files below the compaction point can go now.
            self.engine
                .purge_expired_files()
                .map_err(|e| format!("raft log purge: {e}"))?;
        }
        Ok(())
    }
}

/// Raises this daemon's life counter in `dir` and returns the new value.
/// A restarted daemon must not be mistaken for its previous life: its old
/// frames and ops are fenced by it.
pub fn next_incarnation(dir: &Path) -> Result<Incarnation> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("incarnation");
    let prev = match std::fs::read_to_string(&path) {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .with_context(|| format!("{} is not a number", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let next = prev + 1;
    let tmp = dir.join("incarnation.tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    writeln!(f, "{next}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(Incarnation(next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use phalanx_protocol::membership::control::MemoryDisk;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8].into(),
            ..Default::default()
        }
    }

    #[test]
    fn what_was_persisted_is_what_reopening_reads_like_the_memory_disk() {
        let dir = std::env::temp_dir().join(format!("phalanx-raftlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut mem = MemoryDisk::default();
        {
            let (mut log, before) = RaftLog::open(&dir).unwrap();
            assert!(before.is_none());
            let hs = HardState {
                term: 3,
                vote: 2,
                commit: 4,
                ..Default::default()
            };
            let batches = [
                PersistBatch {
                    entries: (1..=5).map(|i| entry(i, 1)).collect(),
                    hard_state: Some(hs),
                    ..Default::default()
                },
                // A new leader overwrites the tail.
                PersistBatch {
                    entries: vec![entry(4, 2), entry(5, 2), entry(6, 2)],
                    ..Default::default()
                },
                PersistBatch {
                    snapshot: Some({
                        let mut s = Snapshot::default();
                        s.mut_metadata().index = 2;
                        s.mut_metadata().term = 1;
                        s.set_data(vec![9, 9].into());
                        s
                    }),
                    compact_to: Some(3),
                    ..Default::default()
                },
            ];
            for b in &batches {
                log.persist(b).unwrap();
                mem.persist(b).unwrap();
            }
        }
        let (_log, after) = RaftLog::open(&dir).unwrap();
        let after = after.expect("state survives reopening");
        assert_eq!(after.hard_state, mem.state.hard_state);
        assert_eq!(after.snapshot, mem.state.snapshot);
        assert_eq!(after.entries, mem.state.entries);
        assert_eq!(
            after
                .entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            vec![(3, 1), (4, 2), (5, 2), (6, 2)]
        );
        assert_eq!(next_incarnation(&dir).unwrap(), Incarnation(1));
        assert_eq!(next_incarnation(&dir).unwrap(), Incarnation(2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
