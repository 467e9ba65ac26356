//! `phalanxctl`: administration of a Phalanx cluster.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
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

fn main() -> Result<()> {
    match Cli::parse().command {
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
