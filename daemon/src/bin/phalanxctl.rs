//! `phalanxctl`: administration of a Phalanx cluster.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use phalanx_daemon::local::admin;
use phalanx_daemon::tls;

/// Administers a Phalanx cluster.
#[derive(Parser, Debug)]
#[command(name = "phalanxctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Prints the group as the daemon at ADDR knows it: epoch, Raft term and
    /// leader, and per member its address, status (active / removed), Raft
    /// role, life (incarnation), the epoch of its last change and why.
    Members {
        /// The daemon's metrics endpoint (`metrics` in its config).
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics: std::net::SocketAddr,
    },
    /// Lists the group's checkpoints as the daemon at ADDR knows them: per
    /// stream the committed ones (step, epoch, size, chunks, the members
    /// holding a durable copy), then those still waiting for holders.
    Checkpoints {
        /// The daemon's metrics endpoint (`metrics` in its config).
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics: std::net::SocketAddr,
    },
    /// Shows or sets how the group closes each all-reduce step (the quorum
    /// policy, replicated through Raft; a change starts a new epoch at
    /// every member). Without a policy: prints the current one.
    ///
    /// POLICY: `sync` (wait for every member), or any of `backup=B` (close
    /// with the first n-B ready members), `deadline=pQ` (close when a
    /// deadline passes: 1.5x the Q-th percentile of recent arrival offsets,
    /// clamped to `floor_ms=F` and `ceiling_ms=C`, default 5 and 10000),
    /// `late=drop|fold` (late gradients are dropped, or folded into that
    /// member's next step). Example: `phalanxctl policy backup=1
    /// deadline=p95 ceiling_ms=500`.
    Policy {
        /// The daemon's metrics endpoint (any member's).
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics: std::net::SocketAddr,
        /// The new policy (words as above).
        policy: Vec<String>,
    },
    /// Cluster identity: the CA and node certificates for mutual TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Creates the cluster CA (DIR/ca.pem, DIR/ca.key with mode 0600).
    /// Refuses to overwrite an existing one.
    Init {
        /// Where the certificates live.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
    /// Issues a certificate for NODE (DIR/NODE.pem, DIR/NODE.key), valid for
    /// both server and client authentication under the DNS name NODE. Put
    /// the same name in the `members` entry of that node.
    Issue {
        /// The node's name (a DNS name: letters, digits, '-', '.').
        node: String,
        /// Where the certificates live.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line; no backtrace for an operator error.
            eprintln!("phalanxctl: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    match Cli::parse().command {
        Command::Members { metrics } => {
            print!("{}", admin::http_get(metrics, "/members")?);
        }
        Command::Checkpoints { metrics } => {
            print!("{}", admin::http_get(metrics, "/checkpoints")?);
        }
        Command::Policy { metrics, policy } => {
            if policy.is_empty() {
                print!("{}", admin::http_get(metrics, "/policy")?);
            } else {
                let text = policy.join(" ");
                let wanted: phalanx_protocol::stragglers::QuorumPolicy = text
                    .parse()
                    .map_err(|e| anyhow::anyhow!("bad policy: {e}"))?;
                admin::set_policy(metrics, wanted)?;
                print!("{}", admin::http_get(metrics, "/policy")?);
            }
        }
        Command::Certs {
            command: CertsCommand::Init { dir },
        } => {
            let (cert, key) = tls::init_ca(&dir)?;
            println!("created {} and {}", cert.display(), key.display());
            println!("keep {} secret: it can issue members", key.display());
        }
        Command::Certs {
            command: CertsCommand::Issue { node, dir },
        } => {
            let (cert, key) = tls::issue_node(&dir, &node)?;
            println!("issued {} and {}", cert.display(), key.display());
        }
    }
    Ok(())
}
