//! The control-plane task: drives the sans-IO [`ControlNode`] (raft-rs) with
//! a clock, Raft messages from peers and suspicions from the driver; makes
//! its state durable in raft-engine; proposes removals of suspected members
//! and this daemon's own readmission; hands every new epoch to the driver.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use metrics::{counter, gauge, histogram};
use phalanx_protocol::membership::control::{
    decode_message, destination, encode_message, initial_roles, propose, ControlConfig,
    ControlNode, Event, Housekeeper,
};
use phalanx_protocol::membership::{Applied, Change, Command, GroupState, Status};
use phalanx_protocol::wire::ControlMessage;
use phalanx_protocol::{Incarnation, MemberId, Time};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::driver::Input;
use crate::metrics as m;
use crate::raftlog::RaftLog;

/// How often a suspicion, or this daemon's readmission, is proposed again
/// while it has not taken effect (a proposal is lost when there is no leader).
const RETRY: Duration = Duration::from_millis(300);

/// Inputs to the control task.
#[derive(Debug)]
pub enum ControlInput {
    /// A Raft message from an authenticated peer.
    Raft {
        /// The peer.
        from: MemberId,
        /// The encoded message.
        message: Vec<u8>,
    },
    /// The driver suspects `member`.
    Suspect {
        /// The member.
        member: MemberId,
        /// Why.
        reason: String,
    },
    /// The driver hears from `member` again.
    Cleared {
        /// The member.
        member: MemberId,
    },
    /// A local trainer wants this daemon in the ring (it is joining).
    WantIn,
    /// A new node (`phalanxd --join`) asks to be enrolled; its certificate
    /// was checked to name `name`.
    JoinRequest {
        /// The node.
        member: MemberId,
        /// Its certificate's name.
        name: String,
        /// Where it listens.
        addr: String,
    },
    /// `phalanxctl policy`: propose closing steps by `policy`; the answer
    /// says whether Raft took the proposal (it applies once committed).
    SetPolicy {
        /// The rule.
        policy: phalanx_protocol::stragglers::QuorumPolicy,
        /// Whether it was proposed, or why not.
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
}

/// Sends control messages to peers over their control streams. A message to
/// a peer that is not connected is dropped: Raft retransmits, and recovery
/// reports matter only to connected members.
#[derive(Clone, Debug, Default)]
pub struct ControlSender {
    peers: Arc<Mutex<HashMap<MemberId, mpsc::UnboundedSender<ControlMessage>>>>,
}

impl ControlSender {
    /// Routes `peer`'s control messages to `tx` (its current connection).
    pub fn attach(&self, peer: MemberId, tx: mpsc::UnboundedSender<ControlMessage>) {
        self.peers.lock().expect("poisoned").insert(peer, tx);
    }

    /// Sends `msg` to `peer`; false when it is not connected.
    pub fn send(&self, peer: MemberId, msg: ControlMessage) -> bool {
        let mut peers = self.peers.lock().expect("poisoned");
        match peers.get(&peer) {
            Some(tx) if tx.send(msg).is_ok() => true,
            Some(_) => {
                peers.remove(&peer);
                false
            }
            None => false,
        }
    }
}

/// What `phalanxctl members` and the metrics show.
#[derive(Clone, Debug)]
pub struct GroupView {
    /// The replicated state.
    pub group: GroupState,
    /// The leader, if known.
    pub leader: Option<MemberId>,
    /// Raft term.
    pub term: u64,
    /// Voters.
    pub voters: Vec<MemberId>,
    /// Learners.
    pub learners: Vec<MemberId>,
}

impl GroupView {
    /// A table for operators.
    pub fn render(&self) -> String {
        let mut out = format!(
            "epoch {}  term {}  leader {}  policy {}\n{:<8} {:<22} {:<8} {:<8} {:<6} {:<7} reason\n",
            self.group.epoch,
            self.term,
            self.leader.map_or("none".to_string(), |l| l.to_string()),
            self.group.policy,
            "member",
            "address",
            "status",
            "role",
            "life",
            "since"
        );
        for (id, r) in &self.group.members {
            let role = if self.voters.contains(id) {
                "voter"
            } else if self.learners.contains(id) {
                "learner"
            } else {
                "-"
            };
            out += &format!(
                "{:<8} {:<22} {:<8} {:<8} {:<6} {:<7} {}\n",
                id.to_string(),
                r.addr,
                r.status.to_string(),
                role,
                r.incarnation.0,
                r.since.to_string(),
                r.reason
            );
        }
        out
    }
}

#[derive(Debug)]
struct Suspicion {
    reason: String,
    /// The last proposal (retried every `RETRY` while it has not taken effect).
    last: Option<Instant>,
    /// The first proposal that raft accepted (for the commit latency).
    first: Option<Instant>,
}

/// The control task.
pub struct ControlTask {
    me: MemberId,
    node: ControlNode,
    log: RaftLog,
    keeper: Housekeeper,
    incarnation: Incarnation,
    addr: String,
    origin: Instant,
    /// Suspected members, with when their removal was proposed.
    suspects: BTreeMap<MemberId, Suspicion>,
    peers: ControlSender,
    driver: mpsc::Sender<Input>,
    view: watch::Sender<GroupView>,
    last_sent: Option<(phalanx_protocol::Epoch, bool)>,
    /// A trainer asked to join; cleared once in the ring.
    want_in: bool,
}

impl std::fmt::Debug for ControlTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlTask")
            .field("node", &self.node)
            .finish()
    }
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
    pub fn open(
        setup: ControlSetup,
        peers: ControlSender,
        driver: mpsc::Sender<Input>,
    ) -> Result<(ControlTask, watch::Receiver<GroupView>)> {
        let (log, persisted) = RaftLog::open(&setup.dir)?;
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
        let view = GroupView {
            group: node.group().clone(),
            leader: None,
            term: node.term(),
            voters: node.roles().voters.clone(),
            learners: node.roles().learners.clone(),
        };
        let (view_tx, view_rx) = watch::channel(view);
        Ok((
            ControlTask {
                me: setup.me,
                node,
                log,
                keeper: Housekeeper::new(RETRY, setup.voters),
                incarnation: setup.incarnation,
                addr: setup.addr,
                origin: Instant::now(),
                suspects: BTreeMap::new(),
                peers,
                driver,
                view: view_tx,
                last_sent: None,
                want_in: false,
            },
            view_rx,
        ))
    }

    fn now(&self) -> Time {
        Time(self.origin.elapsed().as_micros() as u64)
    }

    /// Runs until `shutdown`; a leader then hands leadership to another voter.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<ControlInput>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        self.step_all().await;
        loop {
            let due = tokio::time::Instant::from_std(
                self.origin + Duration::from_micros(self.node.poll_timeout().0),
            );
            tokio::select! {
                msg = input.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => return,
                },
                _ = tokio::time::sleep_until(due) => {
                    let now = self.now();
                    self.node.handle_timeout(now);
                }
                _ = shutdown.changed() => break,
            }
            self.step_all().await;
        }
        self.hand_over(&mut input).await;
    }

    /// Graceful shutdown of the leader: transfer leadership to an active
    /// voter so the group does not wait an election timeout.
    async fn hand_over(&mut self, input: &mut mpsc::Receiver<ControlInput>) {
        // Leave the ring first, so the others go on without waiting for a
        // suspicion (bounded: without a quorum nothing commits).
        let until = tokio::time::Instant::now() + Duration::from_millis(1000);
        let mut last_try: Option<tokio::time::Instant> = None;
        while self.node.group().is_active(self.me) && self.node.group().ring().len() > 1 {
            if last_try.is_none_or(|t| t.elapsed() >= RETRY) {
                last_try = Some(tokio::time::Instant::now());
                let cmd = Command::Remove {
                    member: self.me,
                    by: self.me,
                    epoch: self.node.group().epoch,
                    reason: "left: shutting down".into(),
                };
                match self.node.propose(&cmd) {
                    Ok(()) => info!("shutting down: leaving the ring"),
                    Err(e) => debug!(error = %e, "leave not proposed yet"),
                }
            }
            if !self.wait_step(input, until).await {
                break;
            }
        }
        if !self.node.is_leader() {
            return;
        }
        let target = self
            .node
            .roles()
            .voters
            .iter()
            .copied()
            .find(|&v| v != self.me() && self.node.group().is_active(v));
        let Some(target) = target else { return };
        info!(to = %target, "shutting down: handing Raft leadership over");
        self.node.transfer_leader(target);
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while self.node.is_leader() {
            if !self.wait_step(input, until).await {
                break;
            }
        }
        self.step_all().await;
    }

    /// One round of the loop during shutdown; false once `until` passed.
    async fn wait_step(
        &mut self,
        input: &mut mpsc::Receiver<ControlInput>,
        until: tokio::time::Instant,
    ) -> bool {
        self.step_all().await;
        tokio::select! {
            msg = input.recv() => match msg {
                Some(msg) => self.handle(msg),
                None => return false,
            },
            _ = tokio::time::sleep_until(until) => return false,
            _ = tokio::time::sleep(Duration::from_millis(10)) => {
                let now = self.now();
                self.node.handle_timeout(now);
            }
        }
        true
    }

    fn me(&self) -> MemberId {
        self.me
    }

    fn handle(&mut self, msg: ControlInput) {
        match msg {
            ControlInput::Raft { from, message } => {
                match decode_message(&message, from, self.me()) {
                    Ok(msg) => {
                        if let Err(e) = self.node.step(msg) {
                            debug!(peer = %from, error = %e, "raft message not stepped");
                        }
                    }
                    Err(e) => warn!(peer = %from, error = %e, "bad raft message"),
                }
            }
            ControlInput::Suspect { member, reason } => {
                self.suspects.entry(member).or_insert(Suspicion {
                    reason,
                    last: None,
                    first: None,
                });
            }
            ControlInput::Cleared { member } => {
                self.suspects.remove(&member);
            }
            ControlInput::WantIn => self.want_in = true,
            ControlInput::SetPolicy { policy, reply } => {
                let result = if let Err(why) = policy.validate() {
                    Err(why)
                } else {
                    match self.node.propose(&Command::SetPolicy { policy }) {
                        Ok(()) => {
                            info!(%policy, "proposed a new quorum policy");
                            Ok(())
                        }
                        Err(e) => Err(format!("not proposed: {e} (try again shortly)")),
                    }
                };
                let _ = reply.send(result);
            }
            ControlInput::JoinRequest { member, name, addr } => {
                match self.node.propose_enroll(member, &name, &addr) {
                    Ok(()) => {
                        info!(%member, %name, %addr, "a new node asks to join: proposed enrolling it")
                    }
                    Err(e) => debug!(%member, error = %e, "enrolment not proposed"),
                }
            }
        }
    }

    /// Proposes what is due, runs the ready loop, sends, publishes.
    async fn step_all(&mut self) {
        let now = self.now();
        let group = self.node.group().clone();
        let in_ring = group.is_active(self.me);
        for (member, sus) in self.suspects.iter_mut() {
            if !in_ring
                || !group.is_active(*member)
                || sus.last.is_some_and(|t| t.elapsed() < RETRY)
            {
                continue;
            }
            sus.last = Some(Instant::now());
            let cmd = Command::Remove {
                member: *member,
                by: self.me,
                epoch: group.epoch,
                reason: sus.reason.clone(),
            };
            match self.node.propose(&cmd) {
                Ok(()) => {
                    sus.first.get_or_insert_with(Instant::now);
                    info!(%member, reason = %sus.reason, epoch = %group.epoch, "proposed removing a suspected member")
                }
                Err(e) => debug!(%member, error = %e, "removal not proposed yet"),
            }
        }
        for p in self
            .keeper
            .poll(&self.node, self.incarnation, &self.addr, self.want_in, now)
        {
            match propose(&mut self.node, &p) {
                Ok(()) => info!(proposal = ?p, "proposed"),
                Err(e) => debug!(proposal = ?p, error = %e, "not proposed yet"),
            }
        }
        let out = match tokio::task::block_in_place(|| self.node.process(&mut self.log)) {
            Ok(out) => out,
            Err(e) => {
                // The log could not be written: going on would acknowledge
                // what is not durable. Stop the daemon loudly.
                tracing::error!(error = %e, "raft log failure: exiting");
                std::process::exit(70);
            }
        };
        for msg in out.messages {
            let Some(to) = destination(&msg) else {
                continue;
            };
            let bytes = encode_message(&msg);
            if !self.peers.send(to, ControlMessage::Raft { message: bytes }) {
                self.node.report_unreachable(to);
            }
        }
        for ev in out.events {
            match ev {
                Event::Applied { index, applied } => match applied {
                    Applied::NewEpoch {
                        epoch,
                        ring,
                        change,
                    } => match &change {
                        Change::Removed(member, reason) => {
                            warn!(%epoch, %member, %reason, ?ring, index, "member removed: new epoch");
                            counter!(m::FAILOVERS).increment(1);
                            // The suspicion took effect: a later life of the
                            // member starts with a clean slate.
                            if let Some(first) = self.suspects.remove(member).and_then(|s| s.first)
                            {
                                histogram!(m::EPOCH_COMMIT_SECONDS)
                                    .record(first.elapsed().as_secs_f64());
                            }
                        }
                        Change::Policy(policy) => {
                            info!(%epoch, %policy, index, "quorum policy changed: new epoch");
                        }
                        Change::Admitted(member, life) => {
                            info!(%epoch, %member, life = life.0, ?ring, index, "member admitted: new epoch");
                            if *member == self.me && *life == self.incarnation {
                                self.want_in = false;
                                // What this daemon suspected while it was out
                                // of the ring is stale: the ring it rejoins
                                // is the majority's.
                                self.suspects.clear();
                            }
                            self.suspects.remove(member);
                        }
                    },
                    Applied::LifeRecorded {
                        member,
                        incarnation,
                    } => info!(%member, life = incarnation.0, "member's life recorded"),
                    Applied::Enrolled { member } => {
                        let rec = &self.node.group().members[&member];
                        info!(%member, name = %rec.name, addr = %rec.addr, index, "new node enrolled: a learner, in the ring once its trainer joins")
                    }
                    Applied::Ignored(why) => debug!(index, %why, "command ignored"),
                },
                Event::Leader { leader, term } => {
                    info!(leader = ?leader, term, "raft leader changed")
                }
                Event::Roles(roles) => {
                    info!(voters = ?roles.voters, learners = ?roles.learners, "raft roles changed")
                }
                Event::Restored { index } => info!(index, "group state restored from a snapshot"),
            }
        }
        self.publish().await;
    }

    /// Publishes the state: metrics and the operators' view first, then the
    /// driver, so whatever a trainer sees of a new epoch, `phalanxctl` and
    /// `/metrics` already show.
    async fn publish(&mut self) {
        let group = self.node.group().clone();
        gauge!(m::EPOCH).set(group.epoch.0 as f64);
        gauge!(m::RAFT_TERM).set(self.node.term() as f64);
        gauge!(m::RAFT_LEADER).set(self.node.leader().map_or(-1.0, |l| f64::from(l.0)));
        for status in [Status::Active, Status::Removed] {
            let n = group
                .members
                .values()
                .filter(|r| r.status == status)
                .count();
            gauge!(m::MEMBERS, "status" => status.to_string()).set(n as f64);
        }
        self.view.send_replace(GroupView {
            group: group.clone(),
            leader: self.node.leader(),
            term: self.node.term(),
            voters: self.node.roles().voters.clone(),
            learners: self.node.roles().learners.clone(),
        });
        let me = self.me();
        let record = group.members.get(&me);
        let admitted =
            record.is_some_and(|r| r.status == Status::Active && r.incarnation == self.incarnation);
        let state = (group.epoch, admitted);
        if self.last_sent != Some(state) {
            self.last_sent = Some(state);
            let removed = record.filter(|r| r.status == Status::Removed).map(|r| {
                if r.incarnation.0 == 0 {
                    // Enrolled by `--join`, never in the ring yet.
                    "this node is enrolled in the group but not in its ring yet; \
                         the trainer must call join() to enter it with the group's state"
                        .to_string()
                } else {
                    format!(
                        "this member was removed from the group (removed in {}: {}) and \
                             the group went on without it; the trainer must call join() to come \
                             back with the group's state",
                        r.since, r.reason
                    )
                }
            });
            let input = Input::Group {
                epoch: group.epoch,
                ring: group.ring(),
                admitted,
                removed,
                joined_at: group
                    .members
                    .iter()
                    .filter(|(_, r)| r.status == Status::Active)
                    .map(|(&m, r)| (m, r.since))
                    .collect(),
                policy: group.policy,
            };
            let _ = self.driver.send(input).await;
        }
    }
}
