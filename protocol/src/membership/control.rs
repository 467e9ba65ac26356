//! The Raft control plane as a sans-IO state machine: raft-rs's `RawNode`
//! over an in-memory log, driven by the ready loop as raft-rs documents it.
//!
//! The caller feeds it `now`, Raft messages from peers and proposals, then
//! calls [`ControlNode::process`], which hands everything that must survive a
//! crash (entries, hard state, snapshots) to a [`Durable`] store *before* it
//! returns the messages that depend on it, applies committed entries to the
//! [`GroupState`] and reports what changed. The daemon's store writes
//! raft-engine with fsync; the simulator's keeps a copy it restarts from.

use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, Snapshot,
};
use raft::{GetEntriesContext, RaftState, RawNode, StateRole, Storage, StorageError};

use super::group::{Applied, Command, GroupState};
use crate::{MemberId, Time};

/// Raft timing and sizes.
#[derive(Clone, Copy, Debug)]
pub struct ControlConfig {
    /// One Raft tick.
    pub tick: Duration,
    /// Ticks without a leader's heartbeat before a follower campaigns
    /// (raft-rs randomises in [election, 2·election)).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats; below `election_ticks`.
    pub heartbeat_ticks: usize,
    /// Largest append message, bytes.
    pub max_size_per_msg: u64,
    /// Appends in flight to one follower.
    pub max_inflight_msgs: usize,
    /// Applied entries kept in the log after a snapshot is taken.
    pub snapshot_every: u64,
    /// When set, election timeouts are drawn from a generator seeded with
    /// this instead of raft-rs's draw from the thread's RNG, so that a
    /// simulator seed replays exactly. Daemons leave it unset.
    pub election_seed: Option<u64>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            tick: Duration::from_millis(50),
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            snapshot_every: 1024,
            election_seed: None,
        }
    }
}

/// What a durable store holds: enough to restart the node where it was.
#[derive(Clone, Debug, Default)]
pub struct Persisted {
    /// Term, vote and commit index.
    pub hard_state: HardState,
    /// The latest snapshot (group state and configuration at its index).
    pub snapshot: Snapshot,
    /// Log entries after the snapshot.
    pub entries: Vec<Entry>,
}

/// One batch that must be durable before the node's messages go out.
#[derive(Debug, Default)]
pub struct PersistBatch {
    /// A snapshot to install (entries up to its index are gone).
    pub snapshot: Option<Snapshot>,
    /// Entries to append; they replace any stored entries at their indexes
    /// and after.
    pub entries: Vec<Entry>,
    /// A new hard state.
    pub hard_state: Option<HardState>,
    /// Entries below this index may be deleted.
    pub compact_to: Option<u64>,
}

impl PersistBatch {
    fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.compact_to.is_none()
    }
}

/// A store the node's state is made durable in.
pub trait Durable {
    /// Makes `batch` durable (fsync) before returning.
    fn persist(&mut self, batch: &PersistBatch) -> Result<(), String>;
}

/// A store that keeps the persisted state in memory (for tests and the
/// simulator: a "disk" that survives a simulated crash).
#[derive(Clone, Debug, Default)]
pub struct MemoryDisk {
    /// What survived.
    pub state: Persisted,
}

impl Durable for MemoryDisk {
    fn persist(&mut self, batch: &PersistBatch) -> Result<(), String> {
        let st = &mut self.state;
        if let Some(snap) = &batch.snapshot {
            let idx = snap.get_metadata().index;
            st.entries.retain(|e| e.index > idx);
            st.snapshot = snap.clone();
        }
        if let Some(first) = batch.entries.first() {
            st.entries.retain(|e| e.index < first.index);
            st.entries.extend(batch.entries.iter().cloned());
        }
        if let Some(hs) = &batch.hard_state {
            st.hard_state = hs.clone();
        }
        if let Some(idx) = batch.compact_to {
            st.entries.retain(|e| e.index >= idx);
        }
        Ok(())
    }
}

/// The in-memory log raft-rs reads (the durable store is written alongside).
#[derive(Debug, Default)]
struct LogStore {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    entries: Vec<Entry>,
    /// The leader asked for a snapshot the stored one cannot serve (it
    /// predates the follower's membership): take a fresh one.
    wanted: std::sync::atomic::AtomicBool,
}

impl LogStore {
    fn snap_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn append(&mut self, ents: &[Entry]) {
        if let Some(first) = ents.first() {
            let keep = first.index.saturating_sub(self.snap_index() + 1) as usize;
            self.entries.truncate(keep.min(self.entries.len()));
            self.entries.extend_from_slice(ents);
        }
    }

    fn apply_snapshot(&mut self, snap: Snapshot) {
        let meta = snap.get_metadata();
        self.entries.retain(|e| e.index > meta.index);
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.conf_state = meta.get_conf_state().clone();
        self.snapshot = snap;
    }

    fn term_of(&self, idx: u64) -> raft::Result<u64> {
        let si = self.snap_index();
        if idx == si {
            return Ok(self.snapshot.get_metadata().term);
        }
        if idx < si {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.entries
            .get((idx - si - 1) as usize)
            .map(|e| e.term)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }
}

/// `RawNode` owns its storage; the node keeps the same store reachable for
/// appends through `mut_store`.
impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let si = self.snap_index();
        if low <= si {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let (lo, hi) = ((low - si - 1) as usize, (high - si - 1) as usize);
        if hi > self.entries.len() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.term_of(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.snap_index() + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.snap_index() + self.entries.len() as u64)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let cs = self.snapshot.get_metadata().get_conf_state();
        let knows_to = cs
            .voters
            .iter()
            .chain(&cs.learners)
            .chain(&cs.voters_outgoing)
            .any(|&id| id == to);
        if self.snap_index() < request_index || !knows_to {
            // A follower rejects a snapshot whose configuration leaves it
            // out (a node that joined after it was taken); raft-rs asks
            // again, and `process` takes a fresh one meanwhile.
            self.wanted
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

/// Which daemons vote and which only follow the log.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Roles {
    /// Voters (including outgoing ones during a joint change).
    pub voters: Vec<MemberId>,
    /// Learners.
    pub learners: Vec<MemberId>,
}

/// What the node reports after [`ControlNode::process`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A committed command was applied at `index`.
    Applied {
        /// Its log index.
        index: u64,
        /// What it changed.
        applied: Applied,
    },
    /// The group state was replaced by a snapshot (this node was far behind).
    Restored {
        /// The snapshot's index.
        index: u64,
    },
    /// A voter/learner change was applied.
    Roles(Roles),
    /// The leader changed (None: no leader known).
    Leader {
        /// The leader.
        leader: Option<MemberId>,
        /// Its term.
        term: u64,
    },
}

/// Output of one [`ControlNode::process`] call.
#[derive(Debug, Default)]
pub struct Output {
    /// Raft messages to send, each to `msg.to`.
    pub messages: Vec<Message>,
    /// What changed, in order.
    pub events: Vec<Event>,
    /// Reads the leader confirmed: each asker's context and the log index
    /// the group must be applied to before it is read (raft-rs
    /// `ReadState`).
    pub reads: Vec<(Vec<u8>, u64)>,
}

/// Why a proposal was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// No leader is known (election in progress, or no quorum).
    #[error("no leader is known: the group has no quorum reachable from here")]
    NoLeader,
    /// raft-rs refused it.
    #[error("raft refused the proposal: {0}")]
    Refused(String),
}

/// One daemon's Raft node and the group state it applies.
pub struct ControlNode {
    me: MemberId,
    raw: RawNode<LogStore>,
    group: GroupState,
    /// The bootstrap snapshot, until the first `process` persists it.
    unsaved_bootstrap: Option<Snapshot>,
    /// See `ControlConfig::election_seed`.
    election_rng: Option<crate::rng::SplitMix64>,
    /// Followers whose snapshot this `process` call reported sent.
    reported_snapshots: Vec<u64>,
    applied: u64,
    config: ControlConfig,
    next_tick: Time,
    leader: Option<MemberId>,
    term: u64,
    roles: Roles,
}

impl std::fmt::Debug for ControlNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlNode")
            .field("me", &self.me)
            .field("applied", &self.applied)
            .field("epoch", &self.group.epoch)
            .field("leader", &self.leader)
            .finish()
    }
}

fn raft_id(m: MemberId) -> u64 {
    // Raft reserves id 0 for "none"; member ids start at 0.
    u64::from(m.0) + 1
}

fn member_of(id: u64) -> Option<MemberId> {
    id.checked_sub(1)
        .and_then(|v| u32::try_from(v).ok())
        .map(MemberId)
}

/// The Raft message's destination member.
pub fn destination(msg: &Message) -> Option<MemberId> {
    member_of(msg.to)
}

/// Encodes a Raft message for the wire.
pub fn encode_message(msg: &Message) -> Vec<u8> {
    msg.write_to_bytes().expect("in-memory protobuf encode")
}

/// Decodes a Raft message from the wire, checking it claims to come from
/// `from` (the authenticated peer) and to go to `me`.
pub fn decode_message(bytes: &[u8], from: MemberId, me: MemberId) -> Result<Message, String> {
    let msg = Message::parse_from_bytes(bytes).map_err(|e| format!("bad raft message: {e}"))?;
    // A proposal or a read index request keeps its author's id when a
    // follower forwards it to the leader (the leader answers a read to its
    // author directly); every other message must come from the peer that
    // sent it.
    use raft::eraftpb::MessageType::{MsgPropose, MsgReadIndex};
    let forwarded = matches!(msg.get_msg_type(), MsgPropose | MsgReadIndex);
    if (msg.from != raft_id(from) && !forwarded) || msg.to != raft_id(me) {
        return Err(format!(
            "raft message from {} to {} arrived on the link {from} -> {me}",
            msg.from, msg.to
        ));
    }
    Ok(msg)
}

impl ControlNode {
    /// A node for `me`. `persisted` is what its store recovered. On a first
    /// start (nothing persisted) the node starts from `bootstrap`: a group
    /// state with its roles, which every daemon that bootstraps together
    /// must be given identically; it becomes the snapshot at index 1 and is
    /// persisted by the first [`ControlNode::process`], so a restart never
    /// depends on being given it again. Without `bootstrap` the node is
    /// joining (`phalanxd --join`): it knows no configuration and waits for
    /// the leader's snapshot.
    pub fn new(
        me: MemberId,
        config: ControlConfig,
        bootstrap: Option<(GroupState, &Roles)>,
        persisted: Option<Persisted>,
        now: Time,
    ) -> Result<ControlNode, String> {
        let mut store = LogStore::default();
        let (mut snap, hard_state, entries) = match persisted {
            Some(p) => (p.snapshot, Some(p.hard_state), p.entries),
            None => (Snapshot::default(), None, Vec::new()),
        };
        let mut unsaved_bootstrap = None;
        let group = match (snap.get_data().is_empty(), bootstrap) {
            (false, _) => {
                GroupState::decode(snap.get_data()).map_err(|e| format!("stored snapshot: {e}"))?
            }
            (true, Some((state, roles))) => {
                // Index 1, term 1 (as raft-rs bootstraps): the first entry a
                // node could lack is index 1, which is in no log, so the
                // leader brings a node that joins later up to date with a
                // snapshot rather than a log it cannot interpret.
                let meta = snap.mut_metadata();
                meta.index = 1;
                meta.term = 1;
                meta.set_conf_state(conf_state(roles));
                snap.set_data(state.encode().into());
                unsaved_bootstrap = Some(snap.clone());
                state
            }
            (true, None) => GroupState {
                members: Default::default(),
                epoch: crate::Epoch(0),
                policy: crate::stragglers::QuorumPolicy::SYNC,
                checkpoints: Default::default(),
            },
        };
        store.apply_snapshot(snap);
        if let Some(mut hs) = hard_state {
            // The snapshot is taken at the applied index, which a commit
            // index learnt after the last hard-state write (raft-rs reports
            // it in a light ready, not as a hard state) can exceed; what is
            // in the snapshot is committed.
            hs.commit = hs.commit.max(store.snap_index());
            hs.term = hs.term.max(store.snapshot.get_metadata().term);
            store.hard_state = hs;
        }
        store.append(&entries);
        let applied = store.snap_index();
        let cfg = raft::Config {
            id: raft_id(me),
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied,
            max_size_per_msg: config.max_size_per_msg,
            max_inflight_msgs: config.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        };
        cfg.validate().map_err(|e| format!("raft config: {e}"))?;
        let roles = roles_of(&store.conf_state);
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&cfg, store, &logger).map_err(|e| format!("raft: {e}"))?;
        let mut node = ControlNode {
            me,
            raw,
            group,
            unsaved_bootstrap,
            election_rng: config.election_seed.map(crate::rng::SplitMix64::new),
            reported_snapshots: Vec::new(),
            applied,
            config,
            next_tick: now.after(config.tick),
            leader: None,
            term: 0,
            roles,
        };
        node.redraw_election_timeout();
        Ok(node)
    }

    /// This daemon.
    pub fn me(&self) -> MemberId {
        self.me
    }

    /// The group state as of the last applied entry.
    pub fn group(&self) -> &GroupState {
        &self.group
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<MemberId> {
        self.leader
    }

    /// Whether this node leads.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Current Raft term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// Last applied log index.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Current voters and learners.
    pub fn roles(&self) -> &Roles {
        &self.roles
    }

    /// When [`ControlNode::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Time {
        self.next_tick
    }

    /// Ticks Raft for every tick period up to `now` (at most a few, so a
    /// daemon that was paused does not fire a burst of elections).
    pub fn handle_timeout(&mut self, now: Time) {
        let mut n = 0;
        while self.next_tick <= now && n < 3 {
            self.raw.tick();
            self.redraw_election_timeout();
            self.next_tick = self.next_tick.after(self.config.tick);
            n += 1;
        }
        if self.next_tick <= now {
            self.next_tick = now.after(self.config.tick);
        }
    }

    /// Campaigns at once, as the target of a leadership transfer does: no
    /// pre-vote, and voters that still count the silent leader's lease grant
    /// their vote (Raft's safety is untouched: one vote per term, for an
    /// up-to-date log only). For when the data plane has found the leader
    /// silent: waiting for the election timeout (0.5–1 s, longer after a
    /// split vote) is most of a failover that kills the leader. Returns
    /// whether the campaign started.
    pub fn take_over(&mut self) -> bool {
        let Some(leader) = self.leader else {
            return false;
        };
        if self.is_leader() || !self.roles.voters.contains(&self.me) {
            return false;
        }
        let mut m = Message::default();
        m.set_msg_type(raft::eraftpb::MessageType::MsgTimeoutNow);
        m.from = raft_id(leader);
        m.to = raft_id(self.me);
        m.term = self.raw.raft.term;
        let started = self.raw.step(m).is_ok() && self.raw.raft.state == StateRole::Candidate;
        self.redraw_election_timeout();
        started
    }

    /// A Raft message from a peer.
    pub fn step(&mut self, msg: Message) -> Result<(), String> {
        let r = self.raw.step(msg).map_err(|e| e.to_string());
        self.redraw_election_timeout();
        r
    }

    /// With `election_seed`: replaces raft-rs's draw after every reset of
    /// the election clock (a tick or a message may reset it), before the
    /// next tick reads it.
    fn redraw_election_timeout(&mut self) {
        let Some(rng) = self.election_rng.as_mut() else {
            return;
        };
        if self.raw.raft.election_elapsed == 0 {
            let base = self.config.election_ticks;
            let t = base + rng.below(base as u64) as usize;
            self.raw.raft.set_randomized_election_timeout(t);
        }
    }

    /// Proposes a group change; followers forward it to the leader.
    pub fn propose(&mut self, cmd: &Command) -> Result<(), ProposeError> {
        if self.raw.raft.leader_id == raft::INVALID_ID {
            return Err(ProposeError::NoLeader);
        }
        self.raw
            .propose(vec![], cmd.encode())
            .map_err(|e| ProposeError::Refused(e.to_string()))
    }

    /// Leader only: proposes swapping voter `out` for learner `in_` in one
    /// joint change (ConfChangeV2; raft-rs leaves the joint configuration
    /// automatically). `out` stays a learner so it can come back.
    pub fn propose_voter_swap(&mut self, out: MemberId, in_: MemberId) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NoLeader);
        }
        self.propose_changes(
            &[
                (ConfChangeType::AddNode, in_),
                (ConfChangeType::AddLearnerNode, out),
            ],
            Vec::new(),
        )
    }

    /// One ConfChangeV2 of `changes`, with `context` on its entry.
    fn propose_changes(
        &mut self,
        changes: &[(ConfChangeType, MemberId)],
        context: Vec<u8>,
    ) -> Result<(), ProposeError> {
        let mut cc = ConfChangeV2::default();
        let singles: Vec<raft::eraftpb::ConfChangeSingle> = changes
            .iter()
            .map(|&(kind, member)| {
                let mut single = raft::eraftpb::ConfChangeSingle::default();
                single.set_change_type(kind);
                single.node_id = raft_id(member);
                single
            })
            .collect();
        cc.set_changes(singles.into());
        self.raw
            .propose_conf_change(context, cc)
            .map_err(|e| ProposeError::Refused(e.to_string()))
    }

    /// Proposes adding a new node as a learner, with its group record
    /// (`Command::Enroll`) as the entry's context so both apply at one
    /// index. Followers forward it to the leader; raft-rs drops it while
    /// another configuration change is pending (the joiner asks again).
    pub fn propose_enroll(
        &mut self,
        member: MemberId,
        name: &str,
        addr: &str,
    ) -> Result<(), ProposeError> {
        if self.raw.raft.leader_id == raft::INVALID_ID {
            return Err(ProposeError::NoLeader);
        }
        if self.group.members.contains_key(&member)
            || self.roles.voters.contains(&member)
            || self.roles.learners.contains(&member)
        {
            return Err(ProposeError::Refused(format!("{member} is already known")));
        }
        let cmd = Command::Enroll {
            member,
            name: name.to_string(),
            addr: addr.to_string(),
        };
        self.propose_changes(&[(ConfChangeType::AddLearnerNode, member)], cmd.encode())
    }

    /// Leader only: makes learner `member` a voter.
    pub fn propose_promote(&mut self, member: MemberId) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NoLeader);
        }
        self.propose_changes(&[(ConfChangeType::AddNode, member)], Vec::new())
    }

    /// Hands leadership to `to` (graceful shutdown of the leader).
    pub fn transfer_leader(&mut self, to: MemberId) {
        self.raw.transfer_leader(raft_id(to));
    }

    /// Asks the leader for a read index (raft-rs `read_index`, in its safe
    /// mode: the leader confirms it still leads with a quorum's heartbeat
    /// answers first). The answer comes out of [`ControlNode::process`] in
    /// [`Output::reads`] with `ctx`; a request without a leader, or to one
    /// that has not committed in its term yet, is dropped, so callers ask
    /// again.
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.raw.read_index(ctx);
    }

    /// Tells Raft a peer could not be reached (it backs off appends).
    pub fn report_unreachable(&mut self, peer: MemberId) {
        self.raw.report_unreachable(raft_id(peer));
    }

    /// Runs the ready loop: persists through `disk` (before any dependent
    /// message is returned), applies committed entries, takes snapshots.
    pub fn process(&mut self, disk: &mut dyn Durable) -> Result<Output, String> {
        let mut out = Output::default();
        if let Some(snap) = self.unsaved_bootstrap.take() {
            disk.persist(&PersistBatch {
                snapshot: Some(snap),
                ..PersistBatch::default()
            })?;
        }
        while self.raw.has_ready() {
            let mut rd = self.raw.ready();
            if let Some(ss) = rd.ss() {
                let leader = member_of(ss.leader_id);
                if leader != self.leader || self.raw.raft.term != self.term {
                    self.leader = leader;
                    self.term = self.raw.raft.term;
                    out.events.push(Event::Leader {
                        leader,
                        term: self.term,
                    });
                }
            }
            // Messages of this ready do not depend on this ready's writes
            // (raft-rs: a leader may send them while it persists); we return
            // them after the writes anyway, which is always safe.
            out.messages.extend(rd.take_messages());
            out.reads.extend(
                rd.take_read_states()
                    .into_iter()
                    .map(|rs| (rs.request_ctx, rs.index)),
            );
            let mut batch = PersistBatch::default();
            if !rd.snapshot().is_empty() {
                let snap = rd.snapshot().clone();
                let index = snap.get_metadata().index;
                self.group = GroupState::decode(snap.get_data())
                    .map_err(|e| format!("snapshot from the leader: {e}"))?;
                self.applied = index;
                self.raw.mut_store().apply_snapshot(snap.clone());
                self.roles = roles_of(&self.raw.store().conf_state);
                out.events.push(Event::Restored { index });
                out.events.push(Event::Roles(self.roles.clone()));
                batch.snapshot = Some(snap);
            }
            let committed = rd.take_committed_entries();
            if !rd.entries().is_empty() {
                self.raw.mut_store().append(rd.entries());
                batch.entries = rd.take_entries();
            }
            if let Some(hs) = rd.hs() {
                self.raw.mut_store().hard_state = hs.clone();
                batch.hard_state = Some(hs.clone());
            }
            if !batch.is_empty() {
                disk.persist(&batch)?;
            }
            out.messages.extend(rd.take_persisted_messages());
            self.apply_entries(committed, &mut out)?;
            let mut light = self.raw.advance(rd);
            if let Some(commit) = light.commit_index() {
                self.raw.mut_store().hard_state.commit = commit;
                // Persisted too (a single voter commits only here): a
                // restart then re-applies what this node had applied, and
                // its epoch never goes back.
                disk.persist(&PersistBatch {
                    hard_state: Some(self.raw.store().hard_state.clone()),
                    ..PersistBatch::default()
                })?;
            }
            out.messages.extend(light.take_messages());
            self.apply_entries(light.take_committed_entries(), &mut out)?;
            self.raw.advance_apply();
            // raft-rs waits for the application to say how a snapshot's
            // sending went, and sends nothing else to that follower until
            // then. The transport cannot know whether it arrived: report it
            // sent; a lost one is sent again when the follower's next answer
            // shows it still lacks it.
            let snapshots: Vec<u64> = out
                .messages
                .iter()
                .filter(|m| m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot)
                .map(|m| m.to)
                .filter(|to| !self.reported_snapshots.contains(to))
                .collect();
            for to in snapshots {
                self.reported_snapshots.push(to);
                self.raw.report_snapshot(to, raft::SnapshotStatus::Finish);
            }
        }
        self.reported_snapshots.clear();
        let wanted = self
            .raw
            .store()
            .wanted
            .swap(false, std::sync::atomic::Ordering::Relaxed);
        self.maybe_snapshot(disk, wanted)?;
        Ok(out)
    }

    fn apply_entries(&mut self, entries: Vec<Entry>, out: &mut Output) -> Result<(), String> {
        for entry in entries {
            // Check the type before the data: the entry that leaves a joint
            // configuration is an *empty* ConfChangeV2 and must be applied.
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    if !entry.data.is_empty() {
                        let applied = match Command::decode(&entry.data) {
                            Ok(cmd) => self.group.apply(&cmd),
                            Err(e) => Applied::Ignored(format!("undecodable command: {e}")),
                        };
                        out.events.push(Event::Applied {
                            index: entry.index,
                            applied,
                        });
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&entry.data)
                        .map_err(|e| format!("committed conf change: {e}"))?;
                    self.apply_conf_change(&cc, out)?;
                    // An enrolment's group record rides in the context.
                    if !entry.context.is_empty() {
                        let applied = match Command::decode(&entry.context) {
                            Ok(cmd @ Command::Enroll { .. }) => self.group.apply(&cmd),
                            Ok(other) => {
                                Applied::Ignored(format!("{other:?} as a conf change's context"))
                            }
                            Err(e) => Applied::Ignored(format!("undecodable context: {e}")),
                        };
                        out.events.push(Event::Applied {
                            index: entry.index,
                            applied,
                        });
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = raft::eraftpb::ConfChange::parse_from_bytes(&entry.data)
                        .map_err(|e| format!("committed conf change: {e}"))?;
                    self.apply_conf_change(&cc, out)?;
                }
            }
            self.applied = entry.index;
        }
        Ok(())
    }

    fn apply_conf_change(
        &mut self,
        cc: &impl raft_proto::ConfChangeI,
        out: &mut Output,
    ) -> Result<(), String> {
        let cs = self
            .raw
            .apply_conf_change(cc)
            .map_err(|e| format!("applying a conf change: {e}"))?;
        self.roles = roles_of(&cs);
        self.raw.mut_store().conf_state = cs;
        out.events.push(Event::Roles(self.roles.clone()));
        Ok(())
    }

    /// Compacts the log once `snapshot_every` entries were applied past the
    /// last snapshot, or when the leader needs a newer snapshot than the
    /// stored one (`wanted`): it carries the group state and configuration.
    fn maybe_snapshot(&mut self, disk: &mut dyn Durable, wanted: bool) -> Result<(), String> {
        let store = self.raw.store();
        let due = self.applied >= store.snap_index() + self.config.snapshot_every
            || (wanted && self.applied > store.snap_index());
        if !due {
            return Ok(());
        }
        let term = store
            .term_of(self.applied)
            .map_err(|e| format!("term of the applied index: {e}"))?;
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = self.applied;
        meta.term = term;
        meta.set_conf_state(store.conf_state.clone());
        snap.set_data(self.group.encode().into());
        let batch = PersistBatch {
            snapshot: Some(snap.clone()),
            compact_to: Some(self.applied + 1),
            ..PersistBatch::default()
        };
        disk.persist(&batch)?;
        let store = self.raw.mut_store();
        let keep_from = self.applied;
        store.entries.retain(|e| e.index > keep_from);
        store.snapshot = snap;
        Ok(())
    }
}

fn conf_state(roles: &Roles) -> ConfState {
    ConfState {
        voters: roles.voters.iter().map(|&m| raft_id(m)).collect(),
        learners: roles.learners.iter().map(|&m| raft_id(m)).collect(),
        ..Default::default()
    }
}

fn roles_of(cs: &ConfState) -> Roles {
    let ids = |v: &[u64]| -> Vec<MemberId> {
        let mut m: Vec<MemberId> = v.iter().filter_map(|&id| member_of(id)).collect();
        m.sort();
        m.dedup();
        m
    };
    let mut voters = cs.voters.clone();
    voters.extend_from_slice(&cs.voters_outgoing);
    Roles {
        voters: ids(&voters),
        learners: ids(&cs.learners),
    }
}

/// The roles a roster starts with: the `voters` lowest ids vote, the rest
/// learn.
pub fn initial_roles(roster: &[MemberId], voters: usize) -> Roles {
    let mut ids = roster.to_vec();
    ids.sort();
    ids.dedup();
    let learners = ids.split_off(voters.min(ids.len()));
    Roles {
        voters: ids,
        learners,
    }
}

/// A change the daemon's policy wants proposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proposal {
    /// A group command.
    Command(Command),
    /// Make an active learner a voter while there are fewer voters than
    /// configured (leader only; a group grown from `--bootstrap`).
    Promote {
        /// The learner.
        member: MemberId,
    },
    /// Swap a removed voter for an active learner (leader only).
    VoterSwap {
        /// The voter to demote.
        out: MemberId,
        /// The learner to promote.
        promote: MemberId,
    },
}

/// The standing policy every daemon runs against its control node: a member
/// that finds itself out of the ring asks to be readmitted, and the leader
/// keeps the voters alive by swapping removed voters for active learners.
/// Proposals can be lost (no leader, leader change), so each is retried after
/// `retry` until the state shows it took effect.
#[derive(Clone, Debug)]
pub struct Housekeeper {
    retry: Duration,
    voters: usize,
    last_admit: Option<Time>,
    last_swap: Option<Time>,
}

impl Housekeeper {
    /// A policy that retries every `retry` and keeps `voters` voters
    /// where enough members are active.
    pub fn new(retry: Duration, voters: usize) -> Housekeeper {
        Housekeeper {
            retry,
            voters,
            last_admit: None,
            last_swap: None,
        }
    }

    fn due(last: Option<Time>, now: Time, retry: Duration) -> bool {
        last.is_none_or(|t| now.since(t) >= retry)
    }

    /// What to propose now. `incarnation` and `addr` are this daemon's;
    /// `want_in` says whether it asks to be in the ring (a trainer wants to
    /// join): a removed daemon stays out until then, so the group is never
    /// made to wait for a member whose trainer is not ready.
    ///
    /// - A bootstrap member records its first life (no new epoch).
    /// - A daemon that restarted while still in the ring under its previous
    ///   life takes itself out at once: that life's ops are gone, and the
    ///   others must not wait for them.
    /// - A removed daemon asks to be readmitted when `want_in`.
    pub fn poll(
        &mut self,
        node: &ControlNode,
        incarnation: crate::Incarnation,
        addr: &str,
        want_in: bool,
        now: Time,
    ) -> Vec<Proposal> {
        let mut out = Vec::new();
        let me = node.me;
        let group = node.group();
        let record = group.members.get(&me);
        let active = group.is_active(me);
        let first_life = record.is_some_and(|r| r.incarnation.0 == 0);
        let older_life =
            record.is_some_and(|r| r.incarnation.0 != 0 && r.incarnation < incarnation);
        let cmd = if active && first_life {
            Some(Command::Admit {
                member: me,
                incarnation,
                addr: addr.to_string(),
            })
        } else if active && older_life {
            Some(Command::Remove {
                member: me,
                by: me,
                epoch: group.epoch,
                reason: format!("restarted in life {}", incarnation.0),
            })
        } else if !active && want_in && record.is_some() {
            // (A node that joined is admitted once it is enrolled and knows
            // it: before that its state says nothing about the group.)
            Some(Command::Admit {
                member: me,
                incarnation,
                addr: addr.to_string(),
            })
        } else {
            None
        };
        if let Some(cmd) = cmd {
            if Self::due(self.last_admit, now, self.retry) {
                self.last_admit = Some(now);
                out.push(Proposal::Command(cmd));
            }
        }
        if node.is_leader() && Self::due(self.last_swap, now, self.retry) {
            let roles = node.roles();
            let dead_voter = roles.voters.iter().find(|&&v| !group.is_active(v));
            let spare = roles
                .learners
                .iter()
                .find(|&&l| group.is_active(l) && !roles.voters.contains(&l));
            match (dead_voter, spare) {
                (Some(&out_v), Some(&promote)) => {
                    self.last_swap = Some(now);
                    out.push(Proposal::VoterSwap {
                        out: out_v,
                        promote,
                    });
                }
                (None, Some(&member)) if roles.voters.len() < self.voters => {
                    self.last_swap = Some(now);
                    out.push(Proposal::Promote { member });
                }
                _ => {}
            }
        }
        out
    }
}

/// Sends a proposal through `node`.
pub fn propose(node: &mut ControlNode, p: &Proposal) -> Result<(), ProposeError> {
    match p {
        Proposal::Command(cmd) => node.propose(cmd),
        Proposal::VoterSwap { out, promote } => node.propose_voter_swap(*out, *promote),
        Proposal::Promote { member } => node.propose_promote(*member),
    }
}
