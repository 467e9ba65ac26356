//! The control-plane task: drives the sans-IO [`ControlPlane`] (raft-rs's
//! node, the suspicions to propose, the standing policy) with a clock, Raft
//! messages from peers and the node's requests; makes its state durable in
//! raft-engine ([`raftlog`]); sends what it says to send; publishes every
//! new epoch to the runner and the operators' view.

pub mod raftlog;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use metrics::{counter, gauge, histogram};
use phalanx_protocol::checkpoint::CatalogChange;
use phalanx_protocol::membership::control::{
    decode_message, destination, encode_message, initial_roles, ControlConfig, ControlNode, Event,
};
use phalanx_protocol::membership::{Applied, Command, ControlPlane, GroupState, Status};
use phalanx_protocol::node::GroupChange;
use phalanx_protocol::wire::ControlMessage;
use phalanx_protocol::{Incarnation, MemberId, Time};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::bus::{ControlInput, GroupView, Links};
use crate::metrics as m;
use raftlog::RaftLog;

/// How often a suspicion, or this daemon's readmission, is proposed again
/// while it has not taken effect (a proposal is lost when there is no leader).
const RETRY: Duration = Duration::from_millis(300);

/// The control task.
#[derive(Debug)]
pub struct ControlTask {
    me: MemberId,
    plane: ControlPlane,
    log: RaftLog,
    origin: Instant,
    links: Arc<dyn Links>,
    group: mpsc::UnboundedSender<GroupChange>,
    view: watch::Sender<GroupView>,
}

/// Where the control task's inputs come from.
#[derive(Debug)]
pub struct ControlInputs {
    /// From the transport: Raft messages and join requests (bounded).
    pub peers: mpsc::Receiver<ControlInput>,
    /// From the runner and the admin API (unbounded: nothing is lost to a
    /// full queue).
    pub local: mpsc::UnboundedReceiver<ControlInput>,
}

/// How a daemon with an empty data directory comes to a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Every member listed in the configuration bootstraps one group
    /// together (all must list the same members).
    Roster,
    /// `--bootstrap`: a new group of this daemon alone.
    Bootstrap,
    /// `--join ADDR`: this daemon asks a member of a running group to
    /// enrol it, then learns the group from the leader's snapshot.
    Join,
}

/// Left in the data directory by a first start with `--join` until a later
/// start finds the group in the Raft log.
const JOINING_MARKER: &str = "JOINING";

/// A first start with `--join` leaves a marker; a restart that finds the
/// marker but no group in the log (the snapshot never came) must join
/// again: started with a roster or `--bootstrap` it would form a group of
/// its own beside the one it asked to join. Once the log holds the group,
/// the start flag no longer matters and the marker goes.
fn check_start(dir: &std::path::Path, start: Start, restored: bool) -> Result<()> {
    let marker = dir.join(JOINING_MARKER);
    if restored {
        if marker.exists() {
            std::fs::remove_file(&marker)
                .with_context(|| format!("removing {}", marker.display()))?;
        }
        return Ok(());
    }
    match start {
        Start::Join => std::fs::write(
            &marker,
            "this node was started with --join and has not received its group yet\n",
        )
        .with_context(|| format!("writing {}", marker.display())),
        _ if marker.exists() => anyhow::bail!(
            "this node was first started with --join and never received the group it asked to join \
             (no group in {}): start it with --join ADDR again, or remove that directory to start \
             afresh; starting it {} would form a second group beside that one",
            dir.display(),
            if start == Start::Bootstrap {
                "with --bootstrap"
            } else {
                "from the configured roster"
            }
        ),
        _ => Ok(()),
    }
}

/// How a daemon's control plane starts.
#[derive(Debug)]
pub struct ControlSetup {
    /// This daemon.
    pub me: MemberId,
    /// Its life.
    pub incarnation: Incarnation,
    /// Its address, as peers reach it.
    pub addr: String,
    /// The roster every daemon bootstraps from (id, certificate name,
    /// address).
    pub roster: Vec<(MemberId, String, String)>,
    /// How a first start (an empty data directory) forms or finds the
    /// group; ignored once the Raft log holds anything.
    pub start: Start,
    /// How many of the roster vote.
    pub voters: usize,
    /// Raft timing.
    pub config: ControlConfig,
    /// Where the Raft log lives.
    pub dir: std::path::PathBuf,
}

impl ControlTask {
    /// Opens the log and builds the node (replaying what the log holds).
    /// Every group change goes to `group`, in commit order.
    pub fn open(
        setup: ControlSetup,
        links: Arc<dyn Links>,
        group: mpsc::UnboundedSender<GroupChange>,
    ) -> Result<(ControlTask, watch::Receiver<GroupView>)> {
        let (log, persisted) = RaftLog::open(&setup.dir)?;
        check_start(&setup.dir, setup.start, persisted.is_some())?;
        let roster: Vec<(MemberId, String, String)> = match setup.start {
            Start::Roster => setup.roster.clone(),
            Start::Bootstrap => setup
                .roster
                .iter()
                .filter(|(m, _, _)| *m == setup.me)
                .cloned()
                .collect(),
            Start::Join => Vec::new(),
        };
        let ids: Vec<MemberId> = roster.iter().map(|(m, _, _)| *m).collect();
        let roles = initial_roles(&ids, setup.voters);
        let restored = persisted.is_some();
        if restored && setup.start != Start::Roster {
            info!(start = ?setup.start, "the raft log already holds a group: the start flag is ignored");
        }
        let node = ControlNode::new(
            setup.me,
            setup.config,
            (setup.start != Start::Join).then(|| (GroupState::bootstrap(roster), &roles)),
            persisted,
            Time::ZERO,
        )
        .map_err(anyhow::Error::msg)
        .context("starting the raft node")?;
        info!(
            member = %setup.me,
            life = setup.incarnation.0,
            restored,
            voters = ?roles.voters,
            "control plane starting"
        );
        let (view_tx, view_rx) = watch::channel(view_of(&node));
        let plane = ControlPlane::new(node, setup.incarnation, setup.addr, RETRY, setup.voters);
        Ok((
            ControlTask {
                me: setup.me,
                plane,
                log,
                origin: Instant::now(),
                links,
                group,
                view: view_tx,
            },
            view_rx,
        ))
    }

    fn now(&self) -> Time {
        Time(self.origin.elapsed().as_micros() as u64)
    }

    /// Runs until `shutdown`; a leader then hands leadership to another
    /// voter. Fails when the Raft log cannot be written: going on would
    /// acknowledge what is not durable.
    pub async fn run(
        mut self,
        mut inputs: ControlInputs,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        self.step_all()?;
        loop {
            let due = self.origin + Duration::from_micros(self.plane.node().poll_timeout().0);
            tokio::select! {
                _ = shutdown.changed() => break,
                msg = inputs.local.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                msg = inputs.peers.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                _ = tokio::time::sleep_until(due) => {
                    let now = self.now();
                    self.plane.node_mut().handle_timeout(now);
                }
            }
            self.step_all()?;
        }
        self.hand_over(&mut inputs).await
    }

    /// Graceful shutdown: leave the ring first, so the others go on without
    /// waiting for a suspicion (bounded: without a quorum nothing commits),
    /// then, as leader, transfer leadership to an active voter so the group
    /// does not wait an election timeout.
    async fn hand_over(&mut self, inputs: &mut ControlInputs) -> Result<()> {
        let until = Instant::now() + Duration::from_millis(1000);
        let mut last_try: Option<Instant> = None;
        while self.plane.node().group().is_active(self.me)
            && self.plane.node().group().ring().len() > 1
        {
            if last_try.is_none_or(|t| t.elapsed() >= RETRY) {
                last_try = Some(Instant::now());
                let cmd = Command::Remove {
                    member: self.me,
                    by: self.me,
                    epoch: self.plane.node().group().epoch,
                    reason: "left: shutting down".into(),
                };
                match self.plane.node_mut().propose(&cmd) {
                    Ok(()) => info!("shutting down: leaving the ring"),
                    Err(e) => debug!(error = %e, "leave not proposed yet"),
                }
            }
            if !self.wait_step(inputs, until).await? {
                break;
            }
        }
        if !self.plane.node().is_leader() {
            return Ok(());
        }
        let target = self
            .plane
            .node()
            .roles()
            .voters
            .iter()
            .copied()
            .find(|&v| v != self.me && self.plane.node().group().is_active(v));
        let Some(target) = target else {
            return Ok(());
        };
        info!(to = %target, "shutting down: handing Raft leadership over");
        self.plane.node_mut().transfer_leader(target);
        let until = Instant::now() + Duration::from_millis(500);
        while self.plane.node().is_leader() {
            if !self.wait_step(inputs, until).await? {
                break;
            }
        }
        self.step_all()
    }

    /// One round of the loop during shutdown; false once `until` passed.
    async fn wait_step(&mut self, inputs: &mut ControlInputs, until: Instant) -> Result<bool> {
        self.step_all()?;
        tokio::select! {
            msg = inputs.peers.recv() => match msg {
                Some(msg) => self.handle(msg),
                None => return Ok(false),
            },
            _ = tokio::time::sleep_until(until) => return Ok(false),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {
                let now = self.now();
                self.plane.node_mut().handle_timeout(now);
            }
        }
        Ok(true)
    }

    fn handle(&mut self, msg: ControlInput) {
        match msg {
            ControlInput::Raft { from, message } => match decode_message(&message, from, self.me) {
                Ok(msg) => {
                    if let Err(e) = self.plane.node_mut().step(msg) {
                        debug!(peer = %from, error = %e, "raft message not stepped");
                    }
                }
                Err(e) => warn!(peer = %from, error = %e, "bad raft message"),
            },
            ControlInput::Node(req) => self.plane.handle(req),
            ControlInput::SetPolicy { policy, reply } => {
                let result = if let Err(why) = policy.validate() {
                    Err(why)
                } else {
                    match self
                        .plane
                        .node_mut()
                        .propose(&Command::SetPolicy { policy })
                    {
                        Ok(()) => {
                            info!(%policy, "proposed a new quorum policy");
                            Ok(())
                        }
                        Err(e) => Err(format!("not proposed: {e} (try again shortly)")),
                    }
                };
                let _ = reply.send(result);
            }
            ControlInput::Checkpointed(report) => {
                let id = report.id;
                if let Err(e) = self
                    .plane
                    .node_mut()
                    .propose(&Command::Checkpointed(report))
                {
                    // The keeper proposes again until the group shows it.
                    debug!(%id, error = %e, "checkpoint report not proposed yet");
                }
            }
            ControlInput::JoinRequest { member, name, addr } => {
                match self.plane.node_mut().propose_enroll(member, &name, &addr) {
                    Ok(()) => {
                        info!(%member, %name, %addr, "a new node asks to join: proposed enrolling it")
                    }
                    Err(e) => debug!(%member, error = %e, "enrolment not proposed"),
                }
            }
        }
    }

    /// Proposes what is due, runs the ready loop, sends, publishes.
    fn step_all(&mut self) -> Result<()> {
        let now = self.now();
        let out = tokio::task::block_in_place(|| self.plane.step(now, &mut self.log))
            .map_err(anyhow::Error::msg)
            .context("the raft log could not be written; stopping")?;
        for msg in out.messages {
            let Some(to) = destination(&msg) else {
                continue;
            };
            let message = encode_message(&msg);
            if !self.links.send(to, ControlMessage::Raft { message }) {
                self.plane.node_mut().report_unreachable(to);
            }
        }
        for ev in out.events {
            log_event(&ev, self.plane.node().group());
        }
        for (_, took) in out.removals {
            histogram!(m::EPOCH_COMMIT_SECONDS).record(took.as_secs_f64());
        }
        self.publish(out.change);
        Ok(())
    }

    /// Publishes the state: metrics and the operators' view first, then the
    /// runner, so whatever a trainer sees of a new epoch, `phalanxctl` and
    /// `/metrics` already show.
    fn publish(&mut self, change: Option<GroupChange>) {
        let node = self.plane.node();
        let group = node.group();
        gauge!(m::EPOCH).set(group.epoch.0 as f64);
        gauge!(m::RAFT_TERM).set(node.term() as f64);
        gauge!(m::RAFT_LEADER).set(node.leader().map_or(-1.0, |l| f64::from(l.0)));
        for status in [Status::Active, Status::Removed] {
            let n = group
                .members
                .values()
                .filter(|r| r.status == status)
                .count();
            gauge!(m::MEMBERS, "status" => status.to_string()).set(n as f64);
        }
        self.view.send_replace(view_of(node));
        if let Some(change) = change {
            // The runner is gone only when the daemon is stopping.
            let _ = self.group.send(change);
        }
    }
}

fn log_checkpoint(change: &CatalogChange) {
    match change {
        CatalogChange::Reported {
            id,
            holder,
            holders,
            needed,
        } => debug!(%id, %holder, holders, needed, "checkpoint copy reported"),
        CatalogChange::Committed { manifest, dropped } => info!(
            id = %manifest.id,
            bytes = manifest.size(),
            holders = ?manifest.holders,
            dropped = dropped.len(),
            "checkpoint committed"
        ),
        CatalogChange::HolderAdded { id, holder } => {
            info!(%id, %holder, "checkpoint copied to a new holder")
        }
    }
}

/// Logs what the plane did not (leaders, roles, snapshots, ignored
/// commands) and counts failovers.
fn log_event(ev: &Event, group: &GroupState) {
    match ev {
        Event::Applied { index, applied } => match applied {
            Applied::NewEpoch {
                change: phalanx_protocol::membership::Change::Removed(..),
                ..
            } => counter!(m::FAILOVERS).increment(1),
            Applied::NewEpoch { .. } => {}
            Applied::LifeRecorded {
                member,
                incarnation,
            } => info!(%member, life = incarnation.0, "member's life recorded"),
            Applied::Enrolled { member } => {
                if let Some(rec) = group.members.get(member) {
                    info!(%member, name = %rec.name, addr = %rec.addr, index, "new node enrolled: a learner, in the ring once its trainer joins")
                }
            }
            Applied::Checkpoint(change) => log_checkpoint(change),
            Applied::Ignored(why) => debug!(index, %why, "command ignored"),
        },
        Event::Leader { leader, term } => info!(leader = ?leader, term, "raft leader changed"),
        Event::Roles(roles) => {
            info!(voters = ?roles.voters, learners = ?roles.learners, "raft roles changed")
        }
        Event::Restored { index } => info!(index, "group state restored from a snapshot"),
    }
}

fn view_of(node: &ControlNode) -> GroupView {
    GroupView {
        group: node.group().clone(),
        leader: node.leader(),
        term: node.term(),
        voters: node.roles().voters.clone(),
        learners: node.roles().learners.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Issue 13, item 7: a node first started with --join and restarted
    // without it before the group's snapshot arrived bootstrapped a group
    // of its own.
    #[test]
    fn a_join_that_never_got_its_group_must_be_started_with_join_again() {
        let dir = std::env::temp_dir().join(format!("phalanx-start-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        check_start(&dir, Start::Join, false).unwrap();
        let err = check_start(&dir, Start::Roster, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("start it with --join ADDR again"), "{err}");
        assert!(check_start(&dir, Start::Bootstrap, false).is_err());
        check_start(&dir, Start::Join, false).expect("joining again is fine");
        // The group arrived: any flag goes, and the marker is gone.
        check_start(&dir, Start::Roster, true).unwrap();
        assert!(!dir.join(JOINING_MARKER).exists());
        check_start(&dir, Start::Roster, false).expect("no marker left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
