//! The whole daemon: [`run`] takes the bound sockets and the configuration,
//! starts every task, and owns them — an essential task that ends before
//! the shutdown (the runner, the control plane) ends the daemon with its
//! error, and at the shutdown each is awaited and its result surfaced.

use std::future::Future;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use phalanx_compute::{ComputeEngine, EngineArithmetic, ScalarEngine, SimdEngine};
use phalanx_protocol::node::Node;
use phalanx_protocol::{Incarnation, MemberId, Time};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::bus::{GroupView, Links};
use crate::config::{self, Config};
use crate::control::{self, ControlInputs, ControlTask};
use crate::local::{self, admin::Admin};
use crate::metrics;
use crate::runner::{Runner, RunnerInputs, RunnerOutputs};
use crate::tls;
use crate::transport::quic::{self, Mesh};

/// Queue depth from the network into the runner; readers wait when it is
/// full, which pushes back through QUIC flow control.
const NET_QUEUE: usize = 1024;

/// The sockets a daemon serves on, bound before [`run`] (by `phalanxd`'s
/// main, or a test that picks its own).
#[derive(Debug)]
pub struct Sockets {
    /// The QUIC endpoint's UDP socket.
    pub quic: UdpSocket,
    /// The trainer socket (mode 0660).
    pub trainers: UnixListener,
    /// The HTTP endpoint (metrics and the admin API), when enabled.
    pub http: Option<TcpListener>,
}

impl Sockets {
    /// Binds what `config` names: the QUIC listen address, the trainer
    /// socket (replacing a stale socket file) and the metrics address.
    pub fn bind(config: &Config) -> Result<Sockets> {
        let addr = config.listen_addr();
        let quic = UdpSocket::bind(addr).with_context(|| format!("binding QUIC on {addr}"))?;
        let trainers = local::bind(&config.socket)?;
        let http = match config.metrics {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .with_context(|| format!("binding the metrics endpoint on {addr}"))?,
            ),
            None => None,
        };
        Ok(Sockets {
            quic,
            trainers,
            http,
        })
    }
}

fn engine(name: &str) -> Box<dyn ComputeEngine> {
    match name {
        "scalar" => Box::new(ScalarEngine),
        _ => Box::new(SimdEngine::detect()),
    }
}

/// Keeps the mesh in step with the group: every member the group records
/// (a node that joined, or — on a joining node — the whole group once its
/// snapshot arrives) becomes a peer, and a new life or address it records
/// is dialled at once.
async fn learn_peers(mesh: Arc<Mesh>, mut view: watch::Receiver<GroupView>) {
    loop {
        let members: Vec<(MemberId, String, String, Incarnation)> = view
            .borrow_and_update()
            .group
            .members
            .iter()
            .map(|(&id, r)| (id, r.name.clone(), r.addr.clone(), r.incarnation))
            .collect();
        for (id, name, addr, life) in members {
            match addr.parse() {
                // A restarted (or moved) peer is redialled at once.
                Ok(addr) if mesh.knows(id) => mesh.record_life(id, life, addr),
                Ok(addr) => {
                    mesh.add_peer(config::MemberConfig {
                        id: id.0,
                        name,
                        addr,
                    });
                    mesh.record_life(id, life, addr);
                }
                Err(e) => {
                    warn!(member = %id, %addr, error = %e, "the group records an address that does not parse")
                }
            }
        }
        if view.changed().await.is_err() {
            return;
        }
    }
}

/// `phalanxd --join ADDR`: asks the member at `addr` to enrol this daemon,
/// again every second until the group (learnt from the leader's snapshot)
/// lists it; meanwhile connects to the members the answers list.
async fn ask_to_join(
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    addr: std::net::SocketAddr,
    view: watch::Receiver<GroupView>,
) {
    let me = mesh.me();
    let mut tries = 0u32;
    while !view.borrow().group.members.contains_key(&me) {
        tries += 1;
        match mesh.ask_to_join(&endpoint, client.clone(), addr).await {
            Ok(roster) => {
                info!(%addr, members = roster.len(), tries, "asked to join the group; waiting to be enrolled");
                for (id, name, peer_addr) in roster {
                    if let (false, Ok(peer_addr)) = (mesh.knows(id), peer_addr.parse()) {
                        mesh.add_peer(config::MemberConfig {
                            id: id.0,
                            name,
                            addr: peer_addr,
                        });
                    }
                }
            }
            Err(e) => {
                warn!(%addr, error = %format!("{e:#}"), tries, "could not ask to join; retrying")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    info!(%me, "enrolled in the group: a learner until this node's trainer joins");
}

/// The mesh's tasks: accepting peers, dialling the configured ones with a
/// higher id (knocking once at those with a lower one, so they dial this
/// life at once), learning the ones the group records, and (`--join`) asking
/// to be enrolled.
fn connect(
    mesh: &Arc<Mesh>,
    endpoint: &quinn::Endpoint,
    config: &Config,
    identity: &tls::Identity,
    view: &watch::Receiver<GroupView>,
    background: &mut JoinSet<()>,
) -> Result<()> {
    mesh.set_endpoint(endpoint.clone());
    background.spawn(mesh.clone().accept(endpoint.clone()));
    background.spawn(learn_peers(mesh.clone(), view.clone()));
    if let config::StartFlag::Join(addr) = config.start {
        let client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(identity.join_client.clone())
                .context("QUIC client TLS for --join")?,
        ));
        let asking = ask_to_join(mesh.clone(), endpoint.clone(), client, addr, view.clone());
        background.spawn(asking);
    }
    for peer in config.members.iter().filter(|p| p.id != config.member_id) {
        if peer.id > config.member_id {
            for link in 0..mesh.links() {
                background.spawn(mesh.clone().dial(endpoint.clone(), peer.clone(), link));
            }
        } else {
            background.spawn(mesh.clone().knock(endpoint.clone(), peer.clone()));
        }
    }
    Ok(())
}

/// An essential task's end, named.
type Ended = (&'static str, Result<()>);

/// Runs the daemon on `sockets` until `shutdown` resolves: in-flight ops
/// then fail with a clear error, the daemon leaves the ring, peers are told,
/// the socket file is removed. Returns the first failure of a task it owns.
pub async fn run(
    sockets: Sockets,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    config.validate()?;
    let me = MemberId(config.member_id);
    let identity = tls::load(&config.tls_files())?;
    let endpoint = quic::endpoint(&config, &identity, sockets.quic)?;
    let engine = engine(&config.engine);
    info!(
        member = %me,
        listen = %endpoint.local_addr().context("endpoint address")?,
        socket = %config.socket.display(),
        engine = %engine.name(),
        members = config.members.len(),
        "phalanxd starting"
    );
    let incarnation = control::raftlog::next_incarnation(&config.data_dir)?;

    let (net_tx, net_rx) = mpsc::channel(NET_QUEUE);
    // Unbounded: a heartbeat is never held up by a full queue, and they
    // come one per link per interval (20 a second from a peer, by default),
    // so a stalled runner's backlog stays small.
    let (heard_tx, heard_rx) = mpsc::unbounded_channel();
    let (peers_tx, peers_rx) = mpsc::channel(NET_QUEUE);
    let (local_tx, local_rx) = mpsc::unbounded_channel();
    let (group_tx, group_rx) = mpsc::unbounded_channel();
    let (trainers_tx, trainers_rx) = mpsc::channel(64);
    let (stragglers_tx, stragglers_rx) = watch::channel(Vec::new());
    let (stop_tx, stop_rx) = watch::channel(false);

    let (mesh, writers) = quic::mesh(&config, incarnation, net_tx, heard_tx, peers_tx);
    let links: Arc<dyn Links> = mesh.clone();
    let (control_task, view) = ControlTask::open(
        control::ControlSetup {
            me,
            incarnation,
            addr: config.me().addr.to_string(),
            roster: config
                .members
                .iter()
                .map(|m| (MemberId(m.id), m.name.clone(), m.addr.to_string()))
                .collect(),
            start: match config.start {
                config::StartFlag::Roster => control::Start::Roster,
                config::StartFlag::Bootstrap => control::Start::Bootstrap,
                config::StartFlag::Join(_) => control::Start::Join,
            },
            voters: config.control.voters,
            config: config.control_config(),
            dir: config.data_dir.join("raft"),
        },
        links.clone(),
        group_tx,
    )?;

    let store = crate::store::Store::open(&config.data_dir.join("checkpoints"))?;
    let (checkpoints_tx, checkpoints_rx) = mpsc::channel(64);
    let checkpoints = crate::checkpoints::CheckpointTask::new(
        me,
        config.keeper_config(),
        store,
        local_tx.clone(),
    )?;
    let checkpoints_stop = stop_rx.clone();

    let origin = tokio::time::Instant::now();
    let node = Node::new(
        me,
        incarnation,
        config.node_config(),
        Box::new(EngineArithmetic(engine)),
        Time::ZERO,
    );
    let runner = Runner::new(
        node,
        origin,
        RunnerOutputs {
            links,
            control: local_tx.clone(),
            stragglers: stragglers_tx,
        },
    );

    let mut essential: JoinSet<Ended> = JoinSet::new();
    let inputs = RunnerInputs {
        net: net_rx,
        heard: heard_rx,
        trainers: trainers_rx,
        group: group_rx,
    };
    let stop = stop_rx.clone();
    // The runner on a thread of its own, not on a worker: its node's work is
    // synchronous and can take most of a second (a 128 MiB hand-over's
    // copies and checksums on a loaded machine), and on a worker it held up
    // the tasks queued behind it, heartbeats included, until the peers
    // suspected this daemon (issue 13). Its timers, sockets and channels
    // still belong to the runtime, driven by the workers.
    let runtime = tokio::runtime::Handle::current();
    essential.spawn_blocking(move || {
        runtime.block_on(runner.run(inputs, stop));
        ("runner", Ok(()))
    });
    let inputs = ControlInputs {
        peers: peers_rx,
        local: local_rx,
    };
    essential.spawn(async move { ("control plane", control_task.run(inputs, stop_rx).await) });

    let mut background = JoinSet::new();
    {
        let view = view.clone();
        background.spawn(async move {
            if let Err(e) = checkpoints
                .run(checkpoints_rx, view, checkpoints_stop)
                .await
            {
                warn!(error = %format!("{e:#}"), "the checkpoint task ended");
            }
        });
    }
    if let Some(listener) = sockets.http {
        listener
            .set_nonblocking(true)
            .context("the metrics socket")?;
        let listener = tokio::net::TcpListener::from_std(listener).context("the metrics socket")?;
        let admin = Admin {
            group: view.clone(),
            stragglers: stragglers_rx,
            control: local_tx,
        };
        background.spawn(local::http::serve(listener, metrics::handle()?, admin));
    }
    for w in writers {
        background.spawn(w.run());
    }
    connect(&mesh, &endpoint, &config, &identity, &view, &mut background)?;

    let local = local::LocalServer::start(
        sockets.trainers,
        config.socket.clone(),
        local::LocalContext {
            me,
            view: view.clone(),
            runner: trainers_tx,
            max_tensor_bytes: config.data_plane.max_tensor_bytes,
            streams: Default::default(),
            checkpoints: checkpoints_tx,
        },
    );
    info!(member = %me, "phalanxd ready");
    let running = Running {
        me,
        essential,
        background,
        stop: stop_tx,
        local,
        endpoint,
    };
    running.until(shutdown).await
}

/// A started daemon: what it owns, until it stops.
struct Running {
    me: MemberId,
    /// The runner and the control plane: one ending on its own ends the
    /// daemon.
    essential: JoinSet<Ended>,
    /// Connections, dialers, writers, the HTTP endpoint.
    background: JoinSet<()>,
    stop: watch::Sender<bool>,
    local: local::LocalServer,
    endpoint: quinn::Endpoint,
}

impl Running {
    /// Serves until `shutdown`, or until an essential task ends on its own;
    /// then stops everything, in order, and returns the first failure.
    async fn until(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let me = self.me;
        let early = tokio::select! {
            () = shutdown => None,
            ended = self.essential.join_next() => Some(ended),
        };
        let mut failure = match early {
            None => {
                info!(member = %me, "shutting down: failing in-flight ops, closing connections");
                None
            }
            Some(ended) => {
                let why = describe(ended);
                error!(member = %me, reason = %why, "a task ended before the shutdown: stopping");
                Some(anyhow!(why))
            }
        };
        let _ = self.stop.send(true);
        while let Some(ended) = self.essential.join_next().await {
            if matches!(ended, Ok((_, Err(_))) | Err(_)) {
                let why = describe(Some(ended));
                error!(member = %me, reason = %why, "a task failed while stopping");
                failure.get_or_insert(anyhow!(why));
            }
        }
        let local = self.local;
        tokio::task::spawn_blocking(move || local.stop())
            .await
            .context("stopping the trainer socket")?;
        self.endpoint.close(
            quinn::VarInt::from_u32(quic::close::SHUTDOWN),
            b"shutting down",
        );
        self.endpoint.wait_idle().await;
        self.background.shutdown().await;
        match failure {
            Some(e) => Err(e),
            None => {
                info!(member = %me, "phalanxd stopped");
                Ok(())
            }
        }
    }
}

/// Why an essential task ended: its error, its panic, or that it stopped.
fn describe(ended: Option<Result<Ended, tokio::task::JoinError>>) -> String {
    match ended {
        None => "no task left".into(),
        Some(Ok((name, Ok(())))) => format!("the {name} stopped"),
        Some(Ok((name, Err(e)))) => format!("the {name} failed: {e:#}"),
        Some(Err(e)) if e.is_panic() => format!("a task panicked: {e}"),
        Some(Err(e)) => format!("a task was cancelled: {e}"),
    }
}
