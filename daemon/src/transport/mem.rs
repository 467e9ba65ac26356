//! An in-memory transport: runners in one process connected through
//! queues, for tests of the real runner on tokio's paused clock. Links
//! deliver in order (as a QUIC stream does) and never drop, except where a
//! test cuts a member off or takes it down; heartbeats are sent every
//! interval between members that can reach each other.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phalanx_protocol::wire::{ControlMessage, FrameHeader, Limits, ENVELOPE_LEN};
use phalanx_protocol::MemberId;
use tokio::sync::mpsc;

use crate::bus::{Links, NetInput, OutFrame};

#[derive(Debug, Default)]
struct State {
    /// Each attached member's runner input.
    inboxes: BTreeMap<MemberId, mpsc::Sender<NetInput>>,
    /// Each attached member's heartbeat input.
    heard: BTreeMap<MemberId, mpsc::UnboundedSender<MemberId>>,
    /// Per (from, to), the queue its forwarder drains in order.
    links: BTreeMap<(MemberId, MemberId), mpsc::UnboundedSender<NetInput>>,
    /// Members whose traffic, both ways, is dropped.
    cut: BTreeSet<MemberId>,
}

/// The network.
#[derive(Debug, Default)]
pub struct MemNet {
    state: Mutex<State>,
}

/// One member's side of the network.
#[derive(Debug)]
pub struct MemLinks {
    me: MemberId,
    net: Arc<MemNet>,
}

impl State {
    /// Whether what `from` sends can reach `to`: both attached, neither cut.
    fn reaches(&self, from: MemberId, to: MemberId) -> bool {
        self.inboxes.contains_key(&from)
            && self.inboxes.contains_key(&to)
            && !self.cut.contains(&from)
            && !self.cut.contains(&to)
    }
}

impl MemNet {
    /// An empty network.
    pub fn new() -> Arc<MemNet> {
        Arc::new(MemNet::default())
    }

    /// Connects `member`, whose runner reads `inbox`, and its peers'
    /// heartbeats from `heard`.
    pub fn attach(
        self: &Arc<Self>,
        member: MemberId,
        inbox: mpsc::Sender<NetInput>,
        heard: mpsc::UnboundedSender<MemberId>,
    ) -> MemLinks {
        let mut st = self.state.lock().expect("poisoned");
        st.inboxes.insert(member, inbox);
        st.heard.insert(member, heard);
        st.links.retain(|(a, b), _| *a != member && *b != member);
        MemLinks {
            me: member,
            net: self.clone(),
        }
    }

    /// Takes `member` down: what is in flight to it is lost, and it sends
    /// nothing more (as a killed process).
    pub fn detach(&self, member: MemberId) {
        let mut st = self.state.lock().expect("poisoned");
        st.inboxes.remove(&member);
        st.heard.remove(&member);
        st.links.retain(|(a, b), _| *a != member && *b != member);
    }

    /// Cuts `member` off (`true`) or heals it (`false`).
    pub fn cut(&self, member: MemberId, cut: bool) {
        let mut st = self.state.lock().expect("poisoned");
        if cut {
            st.cut.insert(member);
        } else {
            st.cut.remove(&member);
        }
    }

    /// Sends every attached member's heartbeat to every other it can
    /// reach, every `interval`, for as long as the network exists.
    pub fn heartbeats(self: &Arc<Self>, interval: Duration) {
        let net = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let Some(net) = net.upgrade() else { return };
                let st = net.state.lock().expect("poisoned");
                for &from in st.heard.keys() {
                    for (_, heard) in st
                        .heard
                        .iter()
                        .filter(|&(&to, _)| to != from && st.reaches(from, to))
                    {
                        let _ = heard.send(from);
                    }
                }
            }
        });
    }

    /// Queues `input` from `from` to `to`; false when it cannot arrive.
    fn deliver(&self, from: MemberId, to: MemberId, input: NetInput) -> bool {
        let mut st = self.state.lock().expect("poisoned");
        if !st.reaches(from, to) {
            return false;
        }
        let Some(inbox) = st.inboxes.get(&to).cloned() else {
            return false;
        };
        let link = st.links.entry((from, to)).or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel();
            // One forwarder per link keeps its order; a full inbox makes it
            // wait, as QUIC flow control would.
            tokio::spawn(async move {
                while let Some(input) = rx.recv().await {
                    if inbox.send(input).await.is_err() {
                        return;
                    }
                }
            });
            tx
        });
        link.send(input).is_ok()
    }
}

impl Links for MemLinks {
    fn send_frame(&self, to: MemberId, frame: OutFrame) {
        let limits = Limits::default();
        let header = FrameHeader::decode(&frame.head[ENVELOPE_LEN..], &limits)
            .expect("the runner encodes valid headers");
        let payload = frame.payload.to_vec();
        self.net
            .deliver(self.me, to, NetInput::Frame { header, payload });
    }

    fn send(&self, to: MemberId, msg: ControlMessage) -> bool {
        match msg {
            ControlMessage::Node(msg) => {
                self.net
                    .deliver(self.me, to, NetInput::Message { from: self.me, msg })
            }
            // No control plane runs over this transport.
            _ => false,
        }
    }

    fn reset(&self, _peer: MemberId) {}
}
