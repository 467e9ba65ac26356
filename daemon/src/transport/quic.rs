//! The QUIC mesh: one connection per pair of members (the lower id dials),
//! mutual TLS against the cluster CA, a hello on the first bidirectional
//! stream, then `channels` unidirectional streams per direction that carry
//! tensor frames. Every frame is validated before it reaches the core; a peer
//! that breaks the protocol is disconnected with the reason, and everyone else
//! is served on.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use metrics::{counter, gauge};
use phalanx_protocol::wire::{
    decode, encode_control, ControlMessage, DecodeError, Decoded, EnvelopeHeader, FrameHeader,
    Limits, MessageKind, RejectCode, ENVELOPE_LEN, FRAME_HEADER_LEN, JOIN_LINK, PROTOCOL_VERSION,
};
use phalanx_protocol::{Epoch, Incarnation, MemberId};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::fault::FaultGate;
use super::newest::Newest;
use crate::bus::{ControlInput, Links, NetInput, OutFrame};
use crate::config::{Config, MemberConfig};
use crate::metrics as m;
use crate::tls::{cert_names, Identity};

/// Application close codes.
pub mod close {
    /// Orderly shutdown.
    pub const SHUTDOWN: u32 = 0;
    /// The peer broke the wire protocol.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// The hello was refused.
    pub const REFUSED: u32 = 2;
    /// The peer was suspected (silent): the link is dropped and redialled,
    /// so a peer that restarted is reached in its new life at once.
    pub const SUSPECTED: u32 = 3;
    /// The group recorded a newer life of the peer: the link to the old
    /// one is dropped and the new one dialled.
    pub const RESTARTED: u32 = 4;
    /// Dropped by the test-only fault gate, as a network drops a
    /// connection: nothing about either daemon asked for it.
    pub const FAULT: u32 = 5;
    /// A newer connection for the same link came first: this one, abandoned
    /// by its dialer, finished its hello late (see [`super::newest`]).
    pub const SUPERSEDED: u32 = 6;
}

const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The control streams' send priority, above the data streams' (0): their
/// heartbeats and Raft messages go first when the congestion window is full.
const CONTROL_PRIORITY: i32 = 1;

/// Builds the endpoint on the bound `socket`: a server for the mesh, and a
/// client with this node's certificate for dialing peers.
pub fn endpoint(
    config: &Config,
    identity: &Identity,
    socket: std::net::UdpSocket,
) -> Result<Endpoint> {
    let dp = &config.data_plane;
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(VarInt::try_from(dp.stream_window_bytes).context("stream window")?)
        .receive_window(VarInt::try_from(dp.connection_window_bytes).context("connection window")?)
        .send_window(dp.connection_window_bytes)
        .max_concurrent_uni_streams(VarInt::from_u32(dp.channels as u32 * 2 + 8))
        .max_concurrent_bidi_streams(VarInt::from_u32(4))
        .keep_alive_interval(Some(Duration::from_millis(dp.keep_alive_ms)))
        .max_idle_timeout(Some(
            VarInt::from_u64(dp.idle_timeout_ms)
                .context("idle timeout")?
                .into(),
        ))
        .initial_mtu(dp.initial_mtu.max(1200));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(dp.max_mtu.max(dp.initial_mtu).max(1200));
    transport.mtu_discovery_config(Some(mtu));
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(dp.initial_window_bytes);
    transport.congestion_controller_factory(Arc::new(cubic));
    let transport = Arc::new(transport);
    let server_crypto =
        QuicServerConfig::try_from(identity.server.clone()).context("QUIC server TLS")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport.clone());
    // The largest datagram we accept is advertised to peers; quinn's default
    // (1472) would cap path MTU discovery below `max_mtu`.
    let mut endpoint_config = quinn::EndpointConfig::default();
    endpoint_config
        .max_udp_payload_size(dp.max_mtu.max(1200))
        .context("data_plane.max_mtu")?;
    let addr = socket.local_addr().context("the QUIC socket's address")?;
    // Bursts of a collective overflow the default socket buffers (~200 KiB)
    // and every drop costs a loss-recovery delay; the kernel caps the request
    // at net.core.{r,w}mem_max.
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&socket, dp.socket_buffer_bytes);
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&socket, dp.socket_buffer_bytes);
    let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
    let mut ep = Endpoint::new(endpoint_config, Some(server), socket, runtime)
        .with_context(|| format!("starting the QUIC endpoint on {addr}"))?;
    let client_crypto =
        QuicClientConfig::try_from(identity.client.clone()).context("QUIC client TLS")?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport);
    ep.set_default_client_config(client);
    Ok(ep)
}

/// Everything the connection tasks share.
#[derive(Debug)]
pub struct Mesh {
    me: MemberId,
    cluster: String,
    incarnation: Incarnation,
    /// Every member this daemon knows: the configured ones, and those
    /// learnt from the group (nodes that joined) — see [`Mesh::add_peer`].
    members: RwLock<BTreeMap<MemberId, MemberConfig>>,
    /// Per peer, one slot per parallel connection ("link").
    primaries: RwLock<HashMap<MemberId, Vec<watch::Sender<Option<Connection>>>>>,
    links: usize,
    /// Data channels per peer.
    channels: usize,
    /// Per peer, the queues of its data channels.
    outboxes: RwLock<HashMap<MemberId, Outbox>>,
    /// Per peer, the queue of its newest primary control stream.
    controls: Mutex<Newest<MemberId, mpsc::UnboundedSender<ControlMessage>>>,
    /// Per peer and link, the newest connection served in its slot.
    slot_order: Mutex<Newest<(MemberId, usize), ()>>,
    /// Numbers connections as they begin (see [`super::newest`]).
    next_conn: std::sync::atomic::AtomicU64,
    /// The endpoint, to dial peers learnt at run time.
    endpoint: std::sync::OnceLock<Endpoint>,
    heartbeat: Duration,
    net: mpsc::Sender<NetInput>,
    /// Peers' heartbeats, apart from `net` (see [`crate::bus`]).
    heard: mpsc::UnboundedSender<MemberId>,
    control: mpsc::Sender<ControlInput>,
    limits: Limits,
    /// Peers cut off by fault injection (tests only; see [`FaultGate`]).
    fault: FaultGate,
    /// Connections closed by [`Mesh::reset`]: their dial loop redials.
    resets: std::sync::Mutex<std::collections::HashSet<usize>>,
    /// Per peer, the life the group records for it (see
    /// [`Mesh::record_life`]): its dial loops watch it.
    lives: Mutex<HashMap<MemberId, watch::Sender<Incarnation>>>,
    /// Held from a primary link's change to the `PeerUp`/`PeerDown` it
    /// causes being queued: the tasks of an old connection and of its
    /// replacement race, and a `PeerDown` queued after the replacement's
    /// `PeerUp` left the node believing a connected peer down — its ops
    /// then failed with `NoQuorum` 5 s later although every link was up.
    link_events: tokio::sync::Mutex<()>,
}

/// The queues of one peer's data channels.
#[derive(Clone, Debug)]
struct Outbox {
    /// One queue per channel (QUIC stream).
    channels: Vec<mpsc::UnboundedSender<OutFrame>>,
}

/// The mesh of the configured members and its channel writers (to spawn);
/// frames and node messages from peers go to `net`, their heartbeats to
/// `heard`, Raft messages and join requests to `control`.
pub fn mesh(
    config: &Config,
    incarnation: Incarnation,
    net: mpsc::Sender<NetInput>,
    heard: mpsc::UnboundedSender<MemberId>,
    control: mpsc::Sender<ControlInput>,
) -> (Arc<Mesh>, Vec<WriterTask>) {
    let me = MemberId(config.member_id);
    let mut primaries = HashMap::new();
    let mut outboxes = HashMap::new();
    let mut writers = Vec::new();
    for peer in config.members.iter().filter(|p| p.id != config.member_id) {
        let id = MemberId(peer.id);
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..config.data_plane.connections)
            .map(|_| watch::channel(None))
            .unzip();
        primaries.insert(id, txs);
        let mut channels = Vec::new();
        for k in 0..config.data_plane.channels {
            let (tx, rx) = mpsc::unbounded_channel();
            channels.push(tx);
            writers.push(WriterTask {
                peer: id,
                conn: rxs[k % rxs.len()].clone(),
                frames: rx,
            });
        }
        outboxes.insert(id, Outbox { channels });
    }
    let limits = Limits {
        max_frame_payload_len: u32::try_from(config.data_plane.chunk_bytes).unwrap_or(u32::MAX),
        ..Limits::default()
    };
    let mesh = Mesh {
        me,
        cluster: config.cluster.clone(),
        incarnation,
        members: RwLock::new(
            config
                .members
                .iter()
                .map(|m| (MemberId(m.id), m.clone()))
                .collect(),
        ),
        primaries: RwLock::new(primaries),
        links: config.data_plane.connections,
        channels: config.data_plane.channels,
        outboxes: RwLock::new(outboxes),
        controls: Mutex::new(Newest::default()),
        slot_order: Mutex::new(Newest::default()),
        next_conn: std::sync::atomic::AtomicU64::new(0),
        endpoint: std::sync::OnceLock::new(),
        heartbeat: Duration::from_millis(config.data_plane.heartbeat_interval_ms),
        net,
        heard,
        control,
        limits,
        fault: FaultGate::from_env(),
        resets: Default::default(),
        lives: Default::default(),
        link_events: Default::default(),
    };
    let mesh = Arc::new(mesh);
    // Only where the gate reads a file (it spawns its reader likewise).
    if cfg!(feature = "fault-injection") && std::env::var_os("PHALANX_FAULT_FILE").is_some() {
        let weak = Arc::downgrade(&mesh);
        tokio::spawn(async move {
            while let Some(mesh) = weak.upgrade() {
                for peer in mesh.fault.take_resets() {
                    mesh.drop_links(peer, close::FAULT, b"fault injection: connection dropped");
                }
                drop(mesh);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    (mesh, writers)
}

/// One channel's writer: waits for the peer's connection, opens a stream and
/// writes frames from its queue; reopens after a reconnect.
#[derive(Debug)]
pub struct WriterTask {
    peer: MemberId,
    conn: watch::Receiver<Option<Connection>>,
    frames: mpsc::UnboundedReceiver<OutFrame>,
}

impl WriterTask {
    /// Runs until the mesh drops the queue. A frame whose write fails is
    /// kept and written on the peer's next connection (a restarted peer's
    /// new life replaces the old connection before QUIC notices the old one
    /// is dead); a frame of a superseded epoch is dropped by the receiver.
    pub async fn run(mut self) {
        let mut carry: Option<OutFrame> = None;
        'connection: loop {
            let conn = loop {
                if let Some(c) = self.conn.borrow_and_update().clone() {
                    break c;
                }
                if self.conn.changed().await.is_err() {
                    return;
                }
            };
            let mut stream = match conn.open_uni().await {
                Ok(s) => s,
                Err(e) => {
                    debug!(peer = %self.peer, error = %e, "opening a channel failed; waiting for a new connection");
                    if self.conn.changed().await.is_err() {
                        return;
                    }
                    continue 'connection;
                }
            };
            loop {
                let frame = match carry.take() {
                    Some(f) => f,
                    None => match self.frames.recv().await {
                        Some(f) => f,
                        None => {
                            let _ = stream.finish();
                            return;
                        }
                    },
                };
                if self.conn.has_changed().unwrap_or(false) {
                    // A newer connection replaced this one: write there.
                    carry = Some(frame);
                    continue 'connection;
                }
                let mut chunks = [Bytes::copy_from_slice(&frame.head), frame.payload.clone()];
                if let Err(e) = stream.write_all_chunks(&mut chunks).await {
                    debug!(peer = %self.peer, error = %e, "channel write failed; the frame waits for the next connection");
                    carry = Some(frame);
                    if self.conn.changed().await.is_err() {
                        return;
                    }
                    continue 'connection;
                }
            }
        }
    }
}

impl Mesh {
    /// Drops the links to a suspected `peer`: a peer killed and restarted
    /// is otherwise reached only after QUIC's idle timeout notices its old
    /// life is gone. The dialing side redials (with backoff), the accepting
    /// side waits for it.
    pub fn reset(&self, peer: MemberId) {
        self.drop_links(peer, close::SUSPECTED, b"suspected: reconnecting");
    }

    /// Closes every link to `peer` with `code`; the dial loop redials.
    fn drop_links(&self, peer: MemberId, code: u32, why: &[u8]) {
        let primaries = self.primaries.read().expect("poisoned");
        let Some(slots) = primaries.get(&peer) else {
            return;
        };
        for slot in slots {
            if let Some(conn) = slot.borrow().clone() {
                self.resets
                    .lock()
                    .expect("poisoned")
                    .insert(conn.stable_id());
                conn.close(VarInt::from_u32(code), why);
            }
        }
    }

    /// The next connection's number.
    fn next_seq(&self) -> u64 {
        self.next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// How many parallel connections each pair keeps.
    pub fn links(&self) -> usize {
        self.links
    }

    /// The endpoint peers learnt at run time are dialled from.
    pub fn set_endpoint(&self, endpoint: Endpoint) {
        let _ = self.endpoint.set(endpoint);
    }

    /// This daemon.
    pub fn me(&self) -> MemberId {
        self.me
    }

    /// Whether `member` is known (configured or learnt).
    pub fn knows(&self, member: MemberId) -> bool {
        self.members.read().expect("poisoned").contains_key(&member)
    }

    /// Learns a member the configuration did not list (a node that joined
    /// the group, or the group a joining node found): registers its links
    /// and data queues, and dials it when this daemon has the lower id. A
    /// known member is left as it is.
    pub fn add_peer(self: &Arc<Self>, peer: MemberConfig) {
        let id = MemberId(peer.id);
        if id == self.me {
            return;
        }
        {
            let mut members = self.members.write().expect("poisoned");
            if members.contains_key(&id) {
                return;
            }
            members.insert(id, peer.clone());
        }
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..self.links).map(|_| watch::channel(None)).unzip();
        self.primaries.write().expect("poisoned").insert(id, txs);
        let mut channels = Vec::new();
        for k in 0..self.channels {
            let (tx, rx) = mpsc::unbounded_channel();
            channels.push(tx);
            tokio::spawn(
                WriterTask {
                    peer: id,
                    conn: rxs[k % rxs.len()].clone(),
                    frames: rx,
                }
                .run(),
            );
        }
        self.outboxes
            .write()
            .expect("poisoned")
            .insert(id, Outbox { channels });
        info!(peer = %id, name = %peer.name, addr = %peer.addr, "new peer learnt from the group");
        if let Some(endpoint) = self.endpoint.get() {
            if self.me < id {
                for link in 0..self.links {
                    tokio::spawn(self.clone().dial(endpoint.clone(), peer.clone(), link));
                }
            } else {
                tokio::spawn(self.clone().knock(endpoint.clone(), peer.clone()));
            }
        }
    }

    /// `phalanxd --join ADDR`, one try: asks the member at `addr` (whose
    /// name is not known yet: `client` accepts any node certificate of the
    /// cluster CA) to enrol this daemon, and returns the members it knows.
    pub async fn ask_to_join(
        &self,
        endpoint: &Endpoint,
        client: quinn::ClientConfig,
        addr: std::net::SocketAddr,
    ) -> Result<Vec<(MemberId, String, String)>> {
        let me = self
            .members
            .read()
            .expect("poisoned")
            .get(&self.me)
            .cloned()
            .context("this daemon is not in its own configuration")?;
        let connecting = endpoint
            .connect_with(client, addr, "phalanx-join")
            .context("starting the connection")?;
        let (conn, mut send, mut recv) = self.hello(connecting, JOIN_LINK).await?;
        let answer = |msg: Result<Result<ControlMessage>, _>| -> Result<ControlMessage> {
            match msg.context("no answer within 5 s")?? {
                ControlMessage::Reject { code, detail } => {
                    bail!("refused by {addr}: {code:?}: {detail}")
                }
                other => Ok(other),
            }
        };
        match answer(
            tokio::time::timeout(HELLO_TIMEOUT, read_control(&mut recv, &self.limits)).await,
        )? {
            ControlMessage::Welcome { .. } => {}
            other => bail!("unexpected answer to hello: {other:?}"),
        }
        let request = ControlMessage::JoinRequest {
            name: me.name.clone(),
            addr: me.addr.to_string(),
        };
        send.write_all(&encode_control(&request))
            .await
            .context("sending the join request")?;
        let roster = match answer(
            tokio::time::timeout(HELLO_TIMEOUT, read_control(&mut recv, &self.limits)).await,
        )? {
            ControlMessage::JoinRoster { members } => members,
            other => bail!("unexpected answer to the join request: {other:?}"),
        };
        conn.close(VarInt::from_u32(close::SHUTDOWN), b"join request answered");
        Ok(roster)
    }

    /// The life the group records for `peer` (a watch its dial loops hold).
    fn life(&self, peer: MemberId) -> watch::Receiver<Incarnation> {
        let mut lives = self.lives.lock().expect("poisoned");
        lives
            .entry(peer)
            .or_insert_with(|| watch::channel(Incarnation(0)).0)
            .subscribe()
    }

    /// The group recorded `peer` in life `incarnation` at `addr`. A new life
    /// (the peer restarted) is redialled at once, at its recorded address:
    /// a dial loop backing off after the old life died, or still waiting
    /// on a handshake with it, would leave the restarted peer unconnected —
    /// without a leader to ask to be admitted — for up to a second or
    /// longer. A connection to an older life is closed first.
    pub fn record_life(
        &self,
        peer: MemberId,
        incarnation: Incarnation,
        addr: std::net::SocketAddr,
    ) {
        if peer == self.me {
            return;
        }
        if let Some(entry) = self.members.write().expect("poisoned").get_mut(&peer) {
            if entry.addr != addr {
                info!(%peer, from = %entry.addr, to = %addr, "peer recorded at a new address: redialling it there");
                entry.addr = addr;
            }
        }
        self.saw_life(peer, incarnation);
    }

    /// `peer` is alive in life `incarnation` (the group recorded it, or it
    /// said hello from there): dial loops still on an older life redial.
    fn saw_life(&self, peer: MemberId, incarnation: Incarnation) {
        let mut lives = self.lives.lock().expect("poisoned");
        let life = lives
            .entry(peer)
            .or_insert_with(|| watch::channel(Incarnation(0)).0);
        life.send_if_modified(|known| {
            let newer = incarnation > *known;
            if newer {
                *known = incarnation;
            }
            newer
        });
    }

    /// Says hello once to `peer`, a member with a lower id (which dials this
    /// daemon, not the other way round), and hangs up: a peer whose dial
    /// loop is still backing off from this daemon's previous life, or
    /// waiting on a handshake with it, redials at once. Without it a
    /// restarted daemon can wait seconds for its dialler — the Raft leader,
    /// say — and cannot ask to be admitted meanwhile.
    pub async fn knock(self: Arc<Self>, endpoint: Endpoint, peer: MemberConfig) {
        let attempt = async {
            let connecting = endpoint
                .connect(peer.addr, &peer.name)
                .context("starting the connection")?;
            let (conn, _send, mut recv) = self.hello(connecting, 0).await?;
            let reply = read_control(&mut recv, &self.limits).await?;
            conn.close(VarInt::from_u32(close::SHUTDOWN), b"knock answered");
            anyhow::Ok(reply)
        };
        match tokio::time::timeout(HELLO_TIMEOUT, attempt).await {
            Ok(Ok(_)) => debug!(peer = %peer.id, "knocked: the peer dials this life now"),
            Ok(Err(e)) => debug!(peer = %peer.id, error = %format!("{e:#}"), "knock unanswered"),
            Err(_) => debug!(peer = %peer.id, "knock unanswered in time"),
        }
    }

    /// Dials link `link` to `peer` until connected, keeps it, redials when it
    /// drops or when the group records a newer life of the peer. Only the
    /// lower id dials, so each link of a pair is one connection.
    pub async fn dial(self: Arc<Self>, endpoint: Endpoint, peer: MemberConfig, link: usize) {
        let id = MemberId(peer.id);
        let mut life = self.life(id);
        let mut backoff = Duration::from_millis(50);
        loop {
            // The address the group records now (a readmitted peer may have
            // moved).
            let peer = self
                .members
                .read()
                .expect("poisoned")
                .get(&id)
                .cloned()
                .unwrap_or_else(|| peer.clone());
            life.mark_unchanged();
            let seq = self.next_seq();
            let attempt = tokio::select! {
                // A finished handshake wins over a life change seen at the
                // same time: dropping it would orphan its control tasks.
                biased;
                r = self.connect_once(&endpoint, &peer, link, seq) => Some(r),
                // A new life while a handshake with the old one hangs.
                _ = life.changed() => None,
            };
            match attempt {
                Some(Ok((conn, theirs))) => {
                    backoff = Duration::from_millis(50);
                    info!(peer = %id, addr = %peer.addr, link, life = theirs.0, mtu = conn.stats().path.current_mtu, "connected");
                    self.serve(conn.clone(), id, Some(link), seq).await;
                    let newer = async {
                        if life.wait_for(|&rec| rec > theirs).await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    };
                    tokio::select! {
                        reason = conn.closed() => {
                            let was_reset = self
                                .resets
                                .lock()
                                .expect("poisoned")
                                .remove(&conn.stable_id());
                            if let (quinn::ConnectionError::LocallyClosed, false) = (reason, was_reset) {
                                return; // shutting down
                            }
                        }
                        _ = newer => {
                            info!(peer = %id, link, "the group records a newer life of the peer: redialling now");
                            self.resets.lock().expect("poisoned").insert(conn.stable_id());
                            conn.close(VarInt::from_u32(close::RESTARTED), b"the peer restarted");
                            continue;
                        }
                    }
                }
                Some(Err(e)) => {
                    debug!(peer = %id, addr = %peer.addr, error = %format!("{e:#}"), "dial failed; retrying")
                }
                None => {
                    info!(peer = %id, link, "the group records a new life of the peer: redialling now");
                    backoff = Duration::from_millis(50);
                    continue;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = life.changed() => backoff = Duration::from_millis(50),
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Completes the handshake, opens the control stream and says hello.
    async fn hello(
        &self,
        connecting: quinn::Connecting,
        link: u16,
    ) -> Result<(Connection, SendStream, RecvStream)> {
        let conn = connecting.await.context("TLS handshake")?;
        let (mut send, recv) = conn.open_bi().await.context("opening the control stream")?;
        let hello = ControlMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            cluster: self.cluster.clone(),
            member: self.me,
            incarnation: self.incarnation,
            link,
        };
        send.write_all(&encode_control(&hello))
            .await
            .context("sending hello")?;
        Ok((conn, send, recv))
    }

    async fn connect_once(
        &self,
        endpoint: &Endpoint,
        peer: &MemberConfig,
        link: usize,
        seq: u64,
    ) -> Result<(Connection, Incarnation)> {
        let connecting = endpoint
            .connect(peer.addr, &peer.name)
            .context("starting the connection")?;
        let link = u16::try_from(link).expect("links are few");
        let (conn, send, mut recv) = self.hello(connecting, link).await?;
        let reply = tokio::time::timeout(HELLO_TIMEOUT, read_control(&mut recv, &self.limits))
            .await
            .context("no answer to hello")??;
        match reply {
            ControlMessage::Welcome {
                member,
                incarnation,
                ..
            } if member == MemberId(peer.id) => {
                self.spawn_control(conn.clone(), send, recv, MemberId(peer.id), link == 0, seq);
                Ok((conn, incarnation))
            }
            ControlMessage::Reject { code, detail } => {
                bail!("refused by {}: {code:?}: {detail}", peer.name)
            }
            other => bail!("unexpected answer to hello: {other:?}"),
        }
    }

    /// Accepts connections until the endpoint closes.
    pub async fn accept(self: Arc<Self>, endpoint: Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let mesh = self.clone();
            // Numbered here, in the order the dialers made them: the
            // hellos below finish in any order.
            let seq = mesh.next_seq();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        // Wrong CA, no certificate, wrong ALPN: refused before any message.
                        warn!(%remote, error = %e, "peer refused during the TLS handshake");
                        counter!(m::REFUSED, "reason" => "tls").increment(1);
                        return;
                    }
                };
                match mesh.accept_hello(&conn, seq).await {
                    Ok((member, link, _)) if link == usize::from(JOIN_LINK) => {
                        debug!(peer = %member, %remote, "join request answered");
                    }
                    Ok((member, link, life)) => {
                        // The expected direction (the lower id dials us) makes
                        // this a primary link; any other is served read-only.
                        let primary = member < mesh.me;
                        if !primary {
                            // A knock (see `Mesh::knock`): our dial loops to
                            // it go to this life now.
                            mesh.saw_life(member, life);
                        }
                        info!(peer = %member, %remote, link, primary, "peer accepted");
                        mesh.serve(conn, member, primary.then_some(link), seq).await;
                    }
                    Err(reason) => {
                        warn!(%remote, %reason, "peer refused at hello");
                        counter!(m::REFUSED, "reason" => "hello").increment(1);
                        conn.close(VarInt::from_u32(close::REFUSED), reason.as_bytes());
                    }
                }
            });
        }
    }

    async fn accept_hello(
        &self,
        conn: &Connection,
        seq: u64,
    ) -> Result<(MemberId, usize, Incarnation), String> {
        let (mut send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
            .await
            .map_err(|_| "no hello within 5 s".to_string())?
            .map_err(|e| format!("no control stream: {e}"))?;
        let (member, link, life) = match self.check_hello(conn, &mut recv).await {
            Ok(checked) => checked,
            Err((code, detail)) => return Err(reject(send, code, detail).await),
        };
        let welcome = ControlMessage::Welcome {
            member: self.me,
            incarnation: self.incarnation,
            epoch: Epoch(1),
        };
        send.write_all(&encode_control(&welcome))
            .await
            .map_err(|e| format!("sending welcome: {e}"))?;
        if link == usize::from(JOIN_LINK) {
            let roster = match self.answer_join(conn, &mut recv, member).await {
                Ok(roster) => roster,
                Err((code, detail)) => return Err(reject(send, code, detail).await),
            };
            send.write_all(&encode_control(&roster))
                .await
                .map_err(|e| format!("sending the roster: {e}"))?;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
            return Ok((member, link, life));
        }
        // Only the expected direction's link 0 carries Raft: a second
        // connection claiming the same member must not take it over.
        let carries = link == 0 && member < self.me;
        if carries {
            if let Some(hold) = self.fault.take_stall(member) {
                warn!(peer = %member, ms = hold.as_millis() as u64, "fault injection: holding an accepted connection between its welcome and its start");
                tokio::time::sleep(hold).await;
                info!(peer = %member, "fault injection: the held connection starts now");
            }
        }
        self.spawn_control(conn.clone(), send, recv, member, carries, seq);
        Ok((member, link, life))
    }

    /// A new node's `JoinRequest`: its certificate must name the name it
    /// gives, and a known member id must keep its name. The request goes to
    /// the control plane; the answer lists the members this daemon knows.
    async fn answer_join(
        &self,
        conn: &Connection,
        recv: &mut RecvStream,
        member: MemberId,
    ) -> Result<ControlMessage, (RejectCode, String)> {
        let msg = tokio::time::timeout(HELLO_TIMEOUT, read_control(recv, &self.limits))
            .await
            .map_err(|_| {
                (
                    RejectCode::Malformed,
                    "no join request within 5 s".to_string(),
                )
            })?
            .map_err(|e| (RejectCode::Malformed, format!("bad join request: {e:#}")))?;
        let ControlMessage::JoinRequest { name, addr } = msg else {
            return Err((
                RejectCode::Malformed,
                "a join connection must carry a join request".into(),
            ));
        };
        let certified = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().map(|c| cert_names(c, &name)))
            .unwrap_or(false);
        if !certified {
            return Err((
                RejectCode::UnknownMember,
                format!("the certificate is not for {name:?}"),
            ));
        }
        if let Some(known) = self.members.read().expect("poisoned").get(&member) {
            if known.name != name {
                return Err((
                    RejectCode::UnknownMember,
                    format!("{member} is {:?} in this group, not {name:?}", known.name),
                ));
            }
        }
        if addr.parse::<std::net::SocketAddr>().is_err() {
            return Err((
                RejectCode::Malformed,
                format!("join address {addr:?} is not IP:PORT"),
            ));
        }
        info!(%member, %name, %addr, "a new node asks to join");
        let _ = self
            .control
            .send(ControlInput::JoinRequest { member, name, addr })
            .await;
        let members = self
            .members
            .read()
            .expect("poisoned")
            .values()
            .map(|m| (MemberId(m.id), m.name.clone(), m.addr.to_string()))
            .collect();
        Ok(ControlMessage::JoinRoster { members })
    }

    async fn check_hello(
        &self,
        conn: &Connection,
        recv: &mut RecvStream,
    ) -> Result<(MemberId, usize, Incarnation), (RejectCode, String)> {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_control(recv, &self.limits))
            .await
        {
            Err(_) => return Err((RejectCode::Malformed, "no hello within 5 s".into())),
            Ok(Err(e)) => {
                counter!(m::PROTOCOL_ERRORS, "reason" => "hello").increment(1);
                let code = match e.downcast_ref::<DecodeError>() {
                    Some(DecodeError::UnsupportedVersion { .. }) => RejectCode::UnsupportedVersion,
                    Some(DecodeError::TooLarge { .. }) => RejectCode::TooLarge,
                    _ => RejectCode::Malformed,
                };
                return Err((code, format!("bad hello: {e:#}")));
            }
            Ok(Ok(msg)) => msg,
        };
        let ControlMessage::Hello {
            protocol_version,
            cluster,
            member,
            link,
            incarnation,
        } = hello
        else {
            return Err((
                RejectCode::Malformed,
                "the first message must be a hello".into(),
            ));
        };
        if protocol_version != PROTOCOL_VERSION {
            return Err((
                RejectCode::UnsupportedVersion,
                format!(
                    "protocol version {protocol_version}, this daemon speaks {PROTOCOL_VERSION}"
                ),
            ));
        }
        if cluster != self.cluster {
            return Err((
                RejectCode::UnknownMember,
                format!("cluster {cluster:?} is not {:?}", self.cluster),
            ));
        }
        if link == JOIN_LINK {
            // Checked with its request (see `answer_join`).
            return Ok((member, usize::from(link), incarnation));
        }
        let Some(entry) = self.members.read().expect("poisoned").get(&member).cloned() else {
            return Err((
                RejectCode::UnknownMember,
                format!("{member} is not a member of this group (a new node starts with --join)"),
            ));
        };
        let certified = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().map(|c| cert_names(c, &entry.name)))
            .unwrap_or(false);
        if !certified {
            return Err((
                RejectCode::UnknownMember,
                format!("the certificate is not for {member} ({})", entry.name),
            ));
        }
        if usize::from(link) >= self.links {
            return Err((
                RejectCode::Malformed,
                format!(
                    "link {link} is beyond the {} connections per peer this daemon uses",
                    self.links
                ),
            ));
        }
        Ok((member, usize::from(link), incarnation))
    }

    /// Reads frames from `conn`'s streams; a primary link also carries our
    /// frames to the peer and its loss takes the peer down.
    async fn serve(
        self: &Arc<Self>,
        conn: Connection,
        peer: MemberId,
        link: Option<usize>,
        seq: u64,
    ) {
        let order = self.link_events.lock().await;
        if let Some(link) = link {
            let mut slots = self.slot_order.lock().expect("poisoned");
            if slots.install((peer, link), seq, ()).is_err() {
                info!(%peer, link, "a connection abandoned by its dialer finished its hello after its replacement's: closed");
                conn.close(
                    VarInt::from_u32(close::SUPERSEDED),
                    b"superseded by a newer connection",
                );
                return;
            }
        }
        let up = link.is_some_and(|link| {
            let primaries = self.primaries.read().expect("poisoned");
            primaries.get(&peer).is_some_and(|slots| {
                slots[link].send_replace(Some(conn.clone()));
                // The peer is up once every link is.
                slots.iter().all(|s| s.borrow().is_some())
            })
        });
        if up {
            let _ = self.net.send(NetInput::PeerUp { member: peer }).await;
        }
        drop(order);
        gauge!(m::CONNECTIONS).increment(1.0);
        let mesh = self.clone();
        tokio::spawn(async move {
            loop {
                let stream = match conn.accept_uni().await {
                    Ok(s) => s,
                    Err(e) => {
                        gauge!(m::CONNECTIONS).decrement(1.0);
                        let _order = mesh.link_events.lock().await;
                        let lost = link.is_some_and(|link| {
                            let primaries = mesh.primaries.read().expect("poisoned");
                            primaries.get(&peer).is_some_and(|slots| {
                                let tx = &slots[link];
                                let is_this = tx
                                    .borrow()
                                    .as_ref()
                                    .is_some_and(|c| c.stable_id() == conn.stable_id());
                                if is_this {
                                    tx.send_replace(None);
                                }
                                is_this
                            })
                        });
                        if lost {
                            let _ = mesh
                                .net
                                .send(NetInput::PeerDown {
                                    member: peer,
                                    reason: e.to_string(),
                                })
                                .await;
                        }
                        return;
                    }
                };
                let mesh = mesh.clone();
                let conn = conn.clone();
                tokio::spawn(async move {
                    if let Err(reason) = mesh.read_frames(stream, peer).await {
                        warn!(%peer, remote = %conn.remote_address(), %reason, "protocol error: disconnecting the peer");
                        counter!(m::PROTOCOL_ERRORS, "reason" => "frame").increment(1);
                        conn.close(VarInt::from_u32(close::PROTOCOL_ERROR), reason.as_bytes());
                    }
                });
            }
        });
    }

    /// Reads frames until the stream ends; `Err` is a protocol violation.
    async fn read_frames(&self, mut stream: RecvStream, peer: MemberId) -> Result<(), String> {
        let net = self.net.clone();
        let mut inbound = self.fault.inbound(peer, move |input: NetInput| {
            let net = net.clone();
            async move { net.send(input).await.is_ok() }
        });
        let mut env = [0u8; ENVELOPE_LEN];
        loop {
            match stream.read_exact(&mut env).await {
                Ok(()) => {}
                Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(()),
                Err(quinn::ReadExactError::FinishedEarly(n)) => {
                    return Err(format!("stream ended inside an envelope ({n} bytes)"))
                }
                Err(quinn::ReadExactError::ReadError(_)) => return Ok(()), // the connection is going away
            }
            let header = EnvelopeHeader::decode(&env, &self.limits).map_err(|e| e.to_string())?;
            if header.kind != MessageKind::Frame {
                return Err("a control message on a data channel".into());
            }
            let mut fh = [0u8; FRAME_HEADER_LEN];
            if (header.body_len as usize) < FRAME_HEADER_LEN {
                return Err(format!(
                    "frame body of {} bytes is shorter than its header",
                    header.body_len
                ));
            }
            stream
                .read_exact(&mut fh)
                .await
                .map_err(|e| format!("reading a frame header: {e}"))?;
            let frame = FrameHeader::decode(&fh, &self.limits).map_err(|e| e.to_string())?;
            let payload_len = header.body_len as u64 - FRAME_HEADER_LEN as u64;
            if payload_len != frame.payload_len() {
                return Err(DecodeError::PayloadLength {
                    expected: frame.payload_len(),
                    actual: payload_len,
                }
                .to_string());
            }
            if frame.sender != peer {
                return Err(format!(
                    "frame claims sender {} on {peer}'s connection",
                    frame.sender
                ));
            }
            let mut payload = vec![0u8; payload_len as usize];
            stream
                .read_exact(&mut payload)
                .await
                .map_err(|e| format!("reading a frame payload: {e}"))?;
            let frame = NetInput::Frame {
                header: frame,
                payload,
            };
            if !inbound.send(frame).await {
                return Ok(()); // shutting down
            }
        }
    }
}

/// Tells the peer why it is refused before closing, so its logs say it
/// too; returns the reason.
async fn reject(mut send: SendStream, code: RejectCode, detail: String) -> String {
    let msg = ControlMessage::Reject {
        code,
        detail: detail.clone(),
    };
    let _ = send.write_all(&encode_control(&msg)).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    detail
}

/// Reads one control message from a stream.
pub async fn read_control(recv: &mut RecvStream, limits: &Limits) -> Result<ControlMessage> {
    let mut env = [0u8; ENVELOPE_LEN];
    recv.read_exact(&mut env)
        .await
        .context("reading an envelope")?;
    let header = EnvelopeHeader::decode(&env, limits)?;
    let mut buf = env.to_vec();
    buf.resize(header.message_len(), 0);
    recv.read_exact(&mut buf[ENVELOPE_LEN..])
        .await
        .context("reading a control body")?;
    match decode(&buf, limits)? {
        (Decoded::Control(msg), _) => Ok(msg),
        (Decoded::Frame { .. }, _) => bail!("a tensor frame on the control stream"),
    }
}

impl Mesh {
    /// After the hello, the control stream carries heartbeats both ways: a
    /// task sends ours every interval, another reads the peer's (and its other
    /// control messages) and reports each heartbeat to the runner (its node's detector).
    fn spawn_control(
        &self,
        conn: Connection,
        mut send: SendStream,
        mut recv: RecvStream,
        peer: MemberId,
        carries_control: bool,
        seq: u64,
    ) {
        // Ahead of the data streams when the congestion window is full: a
        // heartbeat that waits behind a 128 MiB hand-over's frames arrives
        // late, and its peer suspects this daemon.
        let _ = send.set_priority(CONTROL_PRIORITY);
        // The primary link 0's control stream also carries Raft and recovery
        // messages. An older connection's stream never takes that over; it
        // still sends heartbeats until `serve` closes it.
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<ControlMessage>();
        if carries_control {
            let installed = self
                .controls
                .lock()
                .expect("poisoned")
                .install(peer, seq, out_tx);
            if installed.is_err() {
                debug!(%peer, "control stream of a superseded connection: heartbeats only");
            }
        } else {
            drop(out_tx);
        }
        let (me, incarnation, interval, origin) = (
            self.me,
            self.incarnation,
            self.heartbeat,
            std::time::Instant::now(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut queue_open = true;
            loop {
                let msg = tokio::select! {
                    _ = tick.tick() => ControlMessage::Heartbeat {
                        member: me,
                        incarnation,
                        epoch: Epoch(1),
                        sent_at_us: origin.elapsed().as_micros() as u64,
                    },
                    m = out_rx.recv(), if queue_open => match m {
                        Some(m) => m,
                        None => {
                            queue_open = false;
                            continue;
                        }
                    },
                };
                if send.write_all(&encode_control(&msg)).await.is_err() {
                    return; // the connection is gone; its loss is reported elsewhere
                }
            }
        });
        let (net, heard, control, limits) = (
            self.net.clone(),
            self.heard.clone(),
            self.control.clone(),
            self.limits,
        );
        let mut inbound = self.fault.inbound(peer, move |msg: ControlMessage| {
            let (net, heard, control) = (net.clone(), heard.clone(), control.clone());
            async move {
                match msg {
                    ControlMessage::Heartbeat { member, .. } if member == peer => {
                        // The runner stops before the Raft task at shutdown:
                        // keep reading, the Raft task still needs the stream.
                        let _ = heard.send(member);
                    }
                    ControlMessage::Goodbye { reason, .. } => {
                        info!(%peer, %reason, "peer says goodbye");
                    }
                    ControlMessage::Raft { message } => {
                        let raft = ControlInput::Raft {
                            from: peer,
                            message,
                        };
                        return control.send(raft).await.is_ok();
                    }
                    ControlMessage::Node(msg) => {
                        let _ = net.send(NetInput::Message { from: peer, msg }).await;
                    }
                    msg => debug!(%peer, ?msg, "control message"),
                }
                true
            }
        });
        let late = self.heartbeat * 2;
        tokio::spawn(async move {
            // (sent_at_us, read at) of the peer's last heartbeat: a debug
            // log tells a peer that sent late (starved) from a path or a
            // reader that was slow (heartbeats sent on time, read late).
            let mut last_beat: Option<(u64, std::time::Instant)> = None;
            loop {
                match read_control(&mut recv, &limits).await {
                    Ok(msg) => {
                        if let ControlMessage::Heartbeat { sent_at_us, .. } = &msg {
                            let now = std::time::Instant::now();
                            if let Some((sent, at)) = last_beat {
                                if now - at > late {
                                    debug!(
                                        %peer,
                                        read_apart_ms = (now - at).as_millis() as u64,
                                        sent_apart_ms = sent_at_us.saturating_sub(sent) / 1000,
                                        "heartbeats from the peer came far apart"
                                    );
                                }
                            }
                            last_beat = Some((*sent_at_us, now));
                        }
                        if !inbound.send(msg).await {
                            return;
                        }
                    }
                    Err(e) => {
                        let closed = e.downcast_ref::<quinn::ReadExactError>().is_some();
                        if !closed {
                            warn!(%peer, error = %format!("{e:#}"), "protocol error on the control stream: disconnecting");
                            counter!(m::PROTOCOL_ERRORS, "reason" => "control").increment(1);
                            conn.close(
                                VarInt::from_u32(close::PROTOCOL_ERROR),
                                e.to_string().as_bytes(),
                            );
                        }
                        return;
                    }
                }
            }
        });
    }
}

impl Links for Mesh {
    fn take_busy(&self) -> Option<Duration> {
        self.fault.take_busy()
    }

    fn send_frame(&self, to: MemberId, frame: OutFrame) {
        let outboxes = self.outboxes.read().expect("poisoned");
        let Some(out) = outboxes.get(&to) else {
            warn!(peer = %to, "no outbox for peer; frame dropped");
            return;
        };
        // By chunk: the pieces of one op spread over the channels while
        // each piece's rounds stay in order on one.
        let ch = frame.chunk as usize % out.channels.len();
        if out.channels[ch].send(frame).is_err() {
            warn!(peer = %to, "channel closed; frame dropped");
        }
    }

    fn send(&self, to: MemberId, msg: ControlMessage) -> bool {
        let mut controls = self.controls.lock().expect("poisoned");
        match controls.get(&to) {
            Some(tx) if tx.send(msg).is_ok() => true,
            Some(_) => {
                controls.clear(&to);
                false
            }
            None => false,
        }
    }

    fn reset(&self, peer: MemberId) {
        Mesh::reset(self, peer);
    }
}
