//! `phalanx-local-cluster`: a throw-away cluster of real `phalanxd`
//! processes on 127.0.0.x, to try Phalanx on one machine.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use phalanx_testkit::{ClusterOptions, LocalCluster};

/// Starts a throw-away cluster of real phalanxd processes on 127.0.0.11..
/// (certificates, configs and logs in DIR) and keeps it up until Ctrl-C.
/// Trainers connect to the printed sockets.
#[derive(Parser, Debug)]
#[command(name = "phalanx-local-cluster", version)]
struct Cli {
    /// Members.
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Scratch directory (must not exist; kept after exit with --keep).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep DIR (logs, configs) after exit.
    #[arg(long)]
    keep: bool,
    /// The phalanxd binary (default: next to this one).
    #[arg(long)]
    phalanxd: Option<PathBuf>,
    /// Form the group as on real nodes: member 1 runs `phalanxd
    /// --bootstrap`, the others `--join` it with configs that list only
    /// themselves (their trainers enter the ring with join()). Default:
    /// every config lists every member and they bootstrap together.
    #[arg(long)]
    bootstrap: bool,
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("phalanx-local-cluster: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let dir = cli.dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("phalanx-local-{}", std::process::id()))
    });
    if dir.exists() {
        anyhow::bail!("{} exists; choose a new --dir", dir.display());
    }
    let phalanxd = match cli.phalanxd {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("phalanxd"),
    };
    eprintln!("starting {} members in {} ...", cli.members, dir.display());
    let cluster = LocalCluster::start(ClusterOptions {
        members: cli.members,
        phalanxd,
        dir,
        data_plane: String::new(),
        control: String::new(),
        keep: cli.keep,
        flags: Vec::new(),
        bootstrap: cli.bootstrap,
    })?;
    for m in &cluster.members {
        println!(
            "member {}: quic {} socket {} metrics http://{}/metrics log {}",
            m.id,
            m.addr,
            m.socket.display(),
            m.metrics,
            m.log.display()
        );
    }
    println!("ready; Ctrl-C stops the cluster");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    drop(cluster);
    Ok(())
}
