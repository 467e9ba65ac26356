//! The checkpoint task: the IO around the sans-IO [`Keeper`]. It keeps the
//! snapshots the trainers hand over, writes and deletes copies in the
//! [`Store`] on blocking threads, proposes the keeper's reports through the
//! control task, reads copies for restores, and tells the group's
//! checkpoints to the keeper as the control task publishes them.
//!
//! Not built yet: reading or copying another holder's copy over the data
//! plane. A restore reads this daemon's own copy (with
//! `checkpoint.replicas` set to the number of members, every member holds
//! one), and a holder that leaves is not replaced.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use phalanx_protocol::checkpoint::{
    CheckpointId, Keeper, KeeperAction, KeeperConfig, Manifest, Part, SaveOutcome, Source,
    CHUNK_BYTES,
};
use phalanx_protocol::{MemberId, Time};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::bus::{CheckpointCall, ControlInput, GroupView, RestoreResult};
use crate::metrics as m;
use crate::store::Store;

/// What a blocking store call reports back.
enum Done {
    Persisted(CheckpointId, Result<Vec<Part>, String>, Duration, u64),
    Loaded(u64, Manifest, Source, Result<Vec<u8>, String>),
}

/// The checkpoint task of one daemon.
pub struct CheckpointTask {
    keeper: Keeper,
    store: Arc<Store>,
    control: mpsc::UnboundedSender<ControlInput>,
    start: Instant,
    snapshots: HashMap<CheckpointId, Arc<Vec<u8>>>,
    /// Trainers waiting to copy their state out.
    go: HashMap<CheckpointId, oneshot::Sender<Result<(), String>>>,
    /// Trainers waiting for a save's verdict.
    waiting: HashMap<CheckpointId, Vec<oneshot::Sender<SaveOutcome>>>,
    restores: HashMap<u64, oneshot::Sender<RestoreResult>>,
    /// What a restore read, until the keeper says which read ends it.
    read: HashMap<u64, (Manifest, Vec<u8>)>,
    next_restore: u64,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
}

impl std::fmt::Debug for CheckpointTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointTask")
            .field("keeper", &self.keeper)
            .finish()
    }
}

impl CheckpointTask {
    /// The task of member `me`, over `store`.
    pub fn new(
        me: MemberId,
        config: KeeperConfig,
        store: Store,
        control: mpsc::UnboundedSender<ControlInput>,
    ) -> anyhow::Result<CheckpointTask> {
        let held = store.list()?;
        store.log_contents()?;
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Ok(CheckpointTask {
            keeper: Keeper::new(me, config, held),
            store: Arc::new(store),
            control,
            start: Instant::now(),
            snapshots: HashMap::new(),
            go: HashMap::new(),
            waiting: HashMap::new(),
            restores: HashMap::new(),
            read: HashMap::new(),
            next_restore: 1,
            done_tx,
            done_rx,
        })
    }

    fn now(&self) -> Time {
        Time(u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX))
    }

    /// Runs until `stop`.
    pub async fn run(
        mut self,
        mut calls: mpsc::Receiver<CheckpointCall>,
        mut view: watch::Receiver<GroupView>,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        self.group(&view.borrow_and_update());
        loop {
            let wake = self
                .keeper
                .poll_timeout()
                .map(|t| self.start + Duration::from_micros(t.0));
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                changed = view.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let v = view.borrow_and_update().clone();
                    self.group(&v);
                }
                Some(call) = calls.recv() => self.call(call, &view),
                Some(done) = self.done_rx.recv() => self.done(done),
                _ = sleep_until(wake) => {
                    let now = self.now();
                    self.keeper.tick(now);
                }
            }
            self.drive();
        }
    }

    fn group(&mut self, v: &GroupView) {
        self.keeper
            .group(v.group.epoch, &v.group.ring(), &v.group.checkpoints);
        for (stream, kept) in &v.group.checkpoints.committed {
            if let Some(latest) = kept.last() {
                gauge!(m::CHECKPOINT_LAST_STEP, "stream" => stream.to_string())
                    .set(latest.id.step.0 as f64);
            }
        }
    }

    fn call(&mut self, call: CheckpointCall, view: &watch::Receiver<GroupView>) {
        match call {
            CheckpointCall::Save { id, holds, reply } => {
                let epoch = view.borrow().group.epoch;
                match self.keeper.request(id, epoch, holds) {
                    Ok(()) => {
                        self.go.insert(id, reply);
                    }
                    Err(why) => {
                        let _ = reply.send(Err(why));
                    }
                }
            }
            CheckpointCall::Snapped { id, bytes } => {
                self.snapshots.insert(id, Arc::new(bytes));
                self.keeper.snapped(id);
            }
            CheckpointCall::Await { id, reply } => match self.keeper.verdict(id) {
                Some(outcome) => {
                    let _ = reply.send(outcome);
                }
                None => self.waiting.entry(id).or_default().push(reply),
            },
            CheckpointCall::Restore { stream, reply } => {
                let r = self.next_restore;
                self.next_restore += 1;
                self.restores.insert(r, reply);
                self.keeper.restore(r, stream);
            }
        }
    }

    fn done(&mut self, done: Done) {
        let now = self.now();
        match done {
            Done::Persisted(id, result, took, bytes) => {
                match &result {
                    Ok(_) => {
                        histogram!(m::CHECKPOINT_PERSIST_SECONDS).record(took.as_secs_f64());
                        counter!(m::CHECKPOINT_BYTES).increment(bytes);
                        info!(%id, bytes, ms = took.as_millis() as u64, "checkpoint copy durable");
                    }
                    Err(why) => {
                        counter!(m::CHECKPOINT_FAILURES).increment(1);
                        warn!(%id, %why, "checkpoint copy not written");
                    }
                }
                self.keeper.persisted(now, id, result);
            }
            Done::Loaded(restore, manifest, source, result) => {
                let id = manifest.id;
                let result = result.map(|bytes| {
                    self.read.insert(restore, (manifest, bytes));
                });
                self.keeper.loaded(restore, id, source, result);
            }
        }
    }

    fn drive(&mut self) {
        while let Some(action) = self.keeper.poll_action() {
            match action {
                KeeperAction::Snapshot { id } => {
                    if let Some(go) = self.go.remove(&id) {
                        let _ = go.send(Ok(()));
                    }
                }
                KeeperAction::Persist { id } => {
                    let Some(bytes) = self.snapshots.get(&id).cloned() else {
                        self.keeper
                            .persisted(self.now(), id, Err("the snapshot is gone".into()));
                        continue;
                    };
                    let (store, tx) = (self.store.clone(), self.done_tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let t = std::time::Instant::now();
                        let result = store
                            .put(id, &bytes, CHUNK_BYTES)
                            .map_err(|e| format!("{e:#}"));
                        let _ =
                            tx.send(Done::Persisted(id, result, t.elapsed(), bytes.len() as u64));
                    });
                }
                KeeperAction::Copy { manifest, from } => {
                    // Not built yet (see the module's doc).
                    let now = self.now();
                    self.keeper.persisted(
                        now,
                        manifest.id,
                        Err(format!(
                            "copying a checkpoint from another holder ({from}) is not built yet"
                        )),
                    );
                }
                KeeperAction::Release { id } => {
                    self.snapshots.remove(&id);
                }
                KeeperAction::Propose(report) => {
                    let _ = self.control.send(ControlInput::Checkpointed(report));
                }
                KeeperAction::Delete { id, why } => {
                    info!(%id, %why, "deleting a checkpoint copy");
                    let store = self.store.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = store.delete(id) {
                            warn!(%id, error = %format!("{e:#}"), "checkpoint copy not deleted");
                        }
                    });
                }
                KeeperAction::Load {
                    restore,
                    manifest,
                    source,
                } => {
                    let id = manifest.id;
                    if let Source::Holder(h) = source {
                        self.keeper.loaded(
                            restore,
                            id,
                            source,
                            Err(format!("reading {h}'s copy is not built yet")),
                        );
                        continue;
                    }
                    let (store, tx) = (self.store.clone(), self.done_tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let mut out = vec![0u8; manifest.size() as usize];
                        let result = store.read_into(&manifest, &mut out).map(|()| out);
                        let _ = tx.send(Done::Loaded(restore, manifest, source, result));
                    });
                }
                KeeperAction::Saved { id, outcome } => {
                    match &outcome {
                        SaveOutcome::Committed => info!(%id, "checkpoint committed"),
                        other => info!(%id, outcome = ?other, "checkpoint not committed"),
                    }
                    for w in self.waiting.remove(&id).into_iter().flatten() {
                        let _ = w.send(outcome.clone());
                    }
                }
                KeeperAction::Restored { restore, result } => {
                    let read = self.read.remove(&restore);
                    if let Some(reply) = self.restores.remove(&restore) {
                        let _ = reply.send(match (result, read) {
                            (Ok(id), Some((manifest, bytes))) if manifest.id == id => {
                                info!(%id, bytes = bytes.len(), "checkpoint restored");
                                Ok((manifest, bytes))
                            }
                            (Ok(id), _) => Err(format!("{id} was read, but its bytes are gone")),
                            (Err(why), _) => Err(why),
                        });
                    }
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
