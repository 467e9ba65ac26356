//! `phalanxd`: the Phalanx daemon. A thin main: parse, log, run.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use phalanx_daemon::config::Config;
use tracing_subscriber::EnvFilter;

/// The Phalanx daemon: one per node. It forms or joins a group (all members
/// listed in its config bootstrap together; or `--bootstrap` on the first
/// node and `--join ADDR` on the others), connects to every other member
/// over QUIC with mutual TLS, and serves the
/// trainers on this node through a Unix socket, running their collectives
/// (all-reduce, broadcast, all-gather, reduce-scatter, barrier) with the
/// group. Membership is coordinated with Raft (log in `data_dir`): a member
/// that dies, hangs or is cut off is removed within about half a second and
/// the others' collectives finish without it; a restarted member rejoins
/// when its trainer calls join(). Flags override the config file. Logs go to stderr; set RUST_LOG
/// (e.g. `RUST_LOG=phalanx_daemon=debug`) for more. SIGTERM or SIGINT stop it
/// cleanly: in-flight collectives fail with a clear error, connections close,
/// the socket file is removed.
#[derive(Parser, Debug)]
#[command(name = "phalanxd", version)]
struct Cli {
    /// The TOML config file (see deploy/phalanxd.example.toml).
    #[arg(long, short)]
    config: PathBuf,
    /// This node's member id (overrides `member_id`).
    #[arg(long)]
    member_id: Option<u32>,
    /// QUIC listen address (overrides `listen`; default: this member's `addr`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The trainer socket path (overrides `socket`).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Where the Raft log and the life counter live (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Prometheus `/metrics` address (overrides `metrics`).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Disable the metrics endpoint.
    #[arg(long, conflicts_with = "metrics")]
    no_metrics: bool,
    /// Compute engine: `scalar` or `simd` (overrides `engine`).
    #[arg(long)]
    engine: Option<String>,
    /// Tokio worker threads (the QUIC connections, heartbeats, the control
    /// plane and the metrics endpoint share them; the runner, which runs
    /// the collectives, has a thread of its own).
    #[arg(long, default_value_t = 2)]
    worker_threads: usize,
    /// Log filter when RUST_LOG is unset.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Start a new group of this daemon alone (it matters on a first start
    /// only: once the data directory holds a Raft log the flag is ignored).
    /// Other daemons then `--join` it.
    /// Without this flag or `--join`, every member listed in the config
    /// bootstraps one group together.
    #[arg(long, conflicts_with = "join")]
    bootstrap: bool,
    /// Join the running group that the daemon at ADDR (its QUIC address)
    /// belongs to: it enrols this daemon as a learner and the group's
    /// state arrives from the Raft leader; this daemon's trainer then calls
    /// join() to enter the ring with the live trainers' state. The config
    /// needs to list only this daemon. It matters on a first start only (a
    /// restart finds its group in the data directory).
    #[arg(long, value_name = "ADDR")]
    join: Option<SocketAddr>,
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line; no backtrace for an operator error.
            eprintln!("phalanxd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cli.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut config = Config::load(&cli.config)?;
    if let Some(id) = cli.member_id {
        config.member_id = id;
    }
    if let Some(l) = cli.listen {
        config.listen = Some(l);
    }
    if let Some(s) = cli.socket {
        config.socket = s;
    }
    if let Some(d) = cli.data_dir {
        config.data_dir = d;
    }
    if let Some(m) = cli.metrics {
        config.metrics = Some(m);
    }
    if cli.no_metrics {
        config.metrics = None;
    }
    if let Some(e) = cli.engine {
        config.engine = e;
    }
    if cli.bootstrap {
        config.start = phalanx_daemon::config::StartFlag::Bootstrap;
    }
    if let Some(addr) = cli.join {
        config.start = phalanx_daemon::config::StartFlag::Join(addr);
    }
    config.validate()?;
    let sockets = phalanx_daemon::Sockets::bind(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.worker_threads.max(1))
        .enable_all()
        .thread_name("phalanxd")
        .build()?;
    runtime.block_on(phalanx_daemon::run(sockets, config, shutdown_signal()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
