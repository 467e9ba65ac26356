//! # phalanx-daemon
//!
//! `phalanxd`, the IO shell around the sans-IO core: a QUIC mesh with mutual
//! TLS between daemons, the trainer socket with shared memory, the driver loop
//! that feeds both into the collective core, and a Prometheus endpoint.
//! [`run`] is the whole daemon, so tests can start several in one process.
//!
//! Membership is Raft-replicated ([`control`]): every daemon of the
//! configured roster bootstraps the same group; members that fail are
//! removed in a new epoch, members that come back are readmitted.
#![deny(missing_docs)]

pub mod cluster;
pub mod config;
pub mod control;
pub mod driver;
pub mod local;
pub mod metrics;
pub mod raftlog;
pub mod shm;
pub mod tls;
pub mod transport;

use std::future::Future;
use std::sync::Arc;

use anyhow::{Context, Result};
use phalanx_compute::{ComputeEngine, ScalarEngine, SimdEngine};
use phalanx_protocol::collective::{Collectives, Config as CoreConfig};
use phalanx_protocol::MemberId;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::config::Config;

/// Queue depth from the network and trainers into the driver; readers wait
/// when it is full, which pushes back through QUIC flow control.
const DRIVER_QUEUE: usize = 1024;

/// Keeps the mesh in step with the group: every member the group records
/// (a node that joined, or — on a joining node — the whole group once its
/// snapshot arrives) becomes a peer.
async fn learn_peers(
    mesh: Arc<transport::quic::Mesh>,
    mut view: watch::Receiver<control::GroupView>,
) {
    loop {
        let members: Vec<(MemberId, String, String)> = view
            .borrow_and_update()
            .group
            .members
            .iter()
            .map(|(&id, r)| (id, r.name.clone(), r.addr.clone()))
            .collect();
        for (id, name, addr) in members {
            if mesh.knows(id) {
                continue;
            }
            match addr.parse() {
                Ok(addr) => mesh.add_peer(config::MemberConfig {
                    id: id.0,
                    name,
                    addr,
                }),
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
    mesh: Arc<transport::quic::Mesh>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    addr: std::net::SocketAddr,
    view: watch::Receiver<control::GroupView>,
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
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    info!(%me, "enrolled in the group: a learner until this node's trainer joins");
}

fn engine(name: &str) -> Box<dyn ComputeEngine> {
    match name {
        "scalar" => Box::new(ScalarEngine),
        _ => Box::new(SimdEngine::detect()),
    }
}

/// Runs the daemon until `shutdown` resolves: in-flight ops then fail with a
/// clear error, peers are told, the socket file is removed.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    config.validate()?;
    let me = MemberId(config.member_id);
    let identity = tls::load(&config.tls_files())?;
    let endpoint = transport::quic::endpoint(&config, &identity)?;
    let engine = engine(&config.engine);
    info!(
        member = %me,
        listen = %endpoint.local_addr().context("endpoint address")?,
        socket = %config.socket.display(),
        engine = %engine.name(),
        members = config.members.len(),
        "phalanxd starting"
    );

    let metrics_listener = match config.metrics {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };

    let incarnation = raftlog::next_incarnation(&config.data_dir)?;
    let (driver_tx, driver_rx) = mpsc::channel(DRIVER_QUEUE);
    let (control_tx, control_rx) = mpsc::channel(DRIVER_QUEUE);
    let peers = control::ControlSender::default();
    let (mesh, outboxes, writers) = transport::quic::mesh(
        &config,
        incarnation,
        driver_tx.clone(),
        control_tx.clone(),
        peers.clone(),
    );
    let (control_task, view) = control::ControlTask::open(
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
        peers.clone(),
        driver_tx.clone(),
    )?;
    let (stragglers_tx, stragglers_rx) = watch::channel(Vec::new());
    let metrics_task = match metrics_listener {
        Some(listener) => Some(tokio::spawn(metrics::serve(
            listener,
            metrics::handle()?,
            metrics::Views {
                group: view.clone(),
                stragglers: stragglers_rx,
                control: control_tx.clone(),
            },
        ))),
        None => None,
    };
    let dp = &config.data_plane;
    let core = Collectives::with_incarnation(
        me,
        incarnation,
        CoreConfig {
            chunk_bytes: dp.chunk_bytes,
            small_tensor_bytes: dp.small_tensor_bytes,
            max_chunks_in_flight: dp.max_chunks_in_flight,
            op_timeout: config.op_timeout(),
            max_tensor_bytes: dp.max_tensor_bytes,
            ..CoreConfig::default()
        },
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let driver = driver::Driver::new(
        core,
        engine,
        driver::Wiring {
            outboxes,
            control: control_tx,
            peers,
            mesh: Some(mesh.clone()),
            stragglers: Some(stragglers_tx),
        },
        config.detector(),
        std::time::Duration::from_millis(config.control.recovery_timeout_ms),
        std::time::Duration::from_millis(config.data_plane.stuck_after_ms),
    );
    let driver_task = tokio::spawn(driver.run(driver_rx, stop_rx.clone()));
    let control_task = tokio::spawn(control_task.run(control_rx, stop_rx));
    for w in writers {
        tokio::spawn(w.run());
    }
    mesh.set_endpoint(endpoint.clone());
    tokio::spawn(mesh.clone().accept(endpoint.clone()));
    tokio::spawn(learn_peers(mesh.clone(), view.clone()));
    if let config::StartFlag::Join(addr) = config.start {
        tokio::spawn(ask_to_join(
            mesh.clone(),
            endpoint.clone(),
            quinn::ClientConfig::new(Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(identity.join_client.clone())
                    .context("QUIC client TLS for --join")?,
            )),
            addr,
            view.clone(),
        ));
    }
    for peer in config.members.iter().filter(|p| p.id > config.member_id) {
        for link in 0..mesh.links() {
            tokio::spawn(mesh.clone().dial(endpoint.clone(), peer.clone(), link));
        }
    }

    let listener = local::bind(&config.socket)?;
    let local = local::LocalServer::start(
        listener,
        config.socket.clone(),
        local::LocalContext {
            me,
            view: view.clone(),
            driver: driver_tx,
            max_tensor_bytes: dp.max_tensor_bytes,
            streams: Default::default(),
        },
    );
    info!(member = %me, "phalanxd ready");

    shutdown.await;
    info!(member = %me, "shutting down: failing in-flight ops, closing connections");
    let _ = stop_tx.send(true);
    let _ = driver_task.await;
    let _ = control_task.await;
    tokio::task::spawn_blocking(move || local.stop())
        .await
        .context("stopping the trainer socket")?;
    endpoint.close(
        quinn::VarInt::from_u32(transport::quic::close::SHUTDOWN),
        b"shutting down",
    );
    endpoint.wait_idle().await;
    if let Some(t) = metrics_task {
        t.abort();
    }
    info!(member = %me, "phalanxd stopped");
    Ok(())
}
