//! `phalanxd` configuration: a TOML file, then command-line overrides.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::tls::TlsFiles;
use phalanx_protocol::MemberId;

/// One member of the static group.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// The member's id.
    pub id: u32,
    /// The DNS name in its certificate.
    pub name: String,
    /// Its QUIC address.
    pub addr: SocketAddr,
}

/// Data-plane tuning. The group-wide fields must agree on every member.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlaneConfig {
    /// Group-wide: largest frame payload, in bytes.
    pub chunk_bytes: usize,
    /// Group-wide: all-reduce uses recursive doubling up to this size.
    pub small_tensor_bytes: usize,
    /// Pieces of one op in flight.
    pub max_chunks_in_flight: u32,
    /// Parallel QUIC streams ("channels") per peer, spread over `connections`.
    pub channels: usize,
    /// Parallel QUIC connections per peer: each has its own packet processing,
    /// so several use more than one core, as NCCL's several sockets do.
    pub connections: usize,
    /// Per-stream receive window, bytes.
    pub stream_window_bytes: u64,
    /// Per-connection receive and send windows, bytes.
    pub connection_window_bytes: u64,
    /// A peer silent this long is considered gone (QUIC idle timeout).
    pub idle_timeout_ms: u64,
    /// Keep-alive interval; must be well below the idle timeout.
    pub keep_alive_ms: u64,
    /// An op not complete this long after it started is aborted.
    pub op_timeout_ms: u64,
    /// Heartbeat period to every peer.
    pub heartbeat_interval_ms: u64,
    /// A peer silent this long is suspected and its ops fail with the reason;
    /// at least 3 heartbeat intervals, and below `idle_timeout_ms`.
    pub suspect_after_ms: u64,
    /// A peer whose heartbeats have lately come far apart (a starved
    /// machine) is given twice its largest gap of the last 50 before it is
    /// suspected, up to this; at or below `suspect_after_ms` the bound
    /// never stretches. Below `idle_timeout_ms`.
    pub suspect_ceiling_ms: u64,
    /// After this daemon's first admission, a peer it has not heard a
    /// heartbeat from yet (still starting up) is given this long before it
    /// is judged; a peer heard from is judged from its first heartbeat.
    pub startup_grace_ms: u64,
    /// The progress signal: a member whose daemon answers heartbeats but
    /// whose trainer has not issued an op the others have waited on this
    /// long is suspected as stuck; below `op_timeout_ms`.
    pub stuck_after_ms: u64,
    /// Largest tensor a trainer may submit, in bytes.
    pub max_tensor_bytes: u64,
    /// First QUIC packet size tried; path MTU discovery raises it up to
    /// `max_mtu`. Loopback and jumbo-frame networks carry far more than 1200.
    pub initial_mtu: u16,
    /// Upper bound for path MTU discovery.
    pub max_mtu: u16,
    /// Congestion window a connection starts (and restarts after idle) with.
    pub initial_window_bytes: u64,
    /// UDP socket send and receive buffer sizes requested from the kernel
    /// (capped by net.core.rmem_max / wmem_max).
    pub socket_buffer_bytes: usize,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        DataPlaneConfig {
            chunk_bytes: 1 << 20,
            small_tensor_bytes: 64 << 10,
            max_chunks_in_flight: 16,
            channels: 4,
            connections: 2,
            stream_window_bytes: 16 << 20,
            connection_window_bytes: 64 << 20,
            idle_timeout_ms: 10_000,
            keep_alive_ms: 1_000,
            op_timeout_ms: 60_000,
            heartbeat_interval_ms: 100,
            suspect_after_ms: 400,
            suspect_ceiling_ms: 1_000,
            startup_grace_ms: 2_000,
            stuck_after_ms: 30_000,
            max_tensor_bytes: 1 << 30,
            initial_mtu: 1200,
            max_mtu: 1452,
            initial_window_bytes: 14720,
            socket_buffer_bytes: 4 << 20,
        }
    }
}

/// Control plane (Raft) settings. Relations, checked at start:
/// `heartbeat_ticks < election_ticks`, and `recovery_timeout_ms` covers a suspicion, an election and a commit
/// (`suspect_after_ms + 2 × election timeout` at least), so a member fails
/// its ops with `NoQuorum` only when the group really cannot go on with it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// How many members vote in Raft (the lowest ids at bootstrap; a removed
    /// voter is replaced by an active learner). 1, 3, 5 or 7.
    pub voters: usize,
    /// One Raft tick.
    pub tick_ms: u64,
    /// Ticks without a leader before a follower campaigns (randomised up to
    /// twice this).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// How long an interrupted op waits for the group's next epoch before it
    /// fails with `NoQuorum`.
    pub recovery_timeout_ms: u64,
}

/// `[checkpoint]`: how trainers' checkpoints are kept. Every daemon of a
/// group must be given the same.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Durable copies a checkpoint needs before it commits (capped by the
    /// ring's size): 2, so losing any one node loses no checkpoint.
    pub replicas: u32,
    /// Committed checkpoints kept per stream; older copies are deleted
    /// everywhere.
    pub keep: u32,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            replicas: 2,
            keep: 3,
        }
    }
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig {
            voters: 3,
            tick_ms: 50,
            election_ticks: 10,
            heartbeat_ticks: 2,
            recovery_timeout_ms: 5_000,
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Cluster name; peers must agree.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// This node's member id.
    pub member_id: u32,
    /// QUIC listen address (default: this member's `addr`).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// The trainer socket.
    pub socket: PathBuf,
    /// Where the Raft log and this daemon's life counter live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Prometheus `/metrics` address; `None` disables it.
    #[serde(default = "default_metrics")]
    pub metrics: Option<SocketAddr>,
    /// Compute engine: `scalar` or `simd`.
    #[serde(default = "default_engine")]
    pub engine: String,
    /// TLS files.
    pub tls: TlsConfig,
    /// The members this daemon knows at start, itself included: with the
    /// default start, every member of the group (all daemons list the same
    /// ones and bootstrap together); with `--bootstrap` or `--join`, at
    /// least this daemon (the others are learnt from the group).
    pub members: Vec<MemberConfig>,
    /// Data-plane tuning.
    #[serde(default)]
    pub data_plane: DataPlaneConfig,
    /// Control-plane (Raft) settings.
    #[serde(default)]
    pub control: ControlPlaneConfig,
    /// Checkpoints (copies live in `data_dir/checkpoints`).
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// How a first start finds its group (command-line flags only).
    #[serde(skip)]
    pub start: StartFlag,
}

/// `phalanxd`'s group-forming flags; they matter only while the data
/// directory holds no Raft log (a restart rejoins the group it knows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartFlag {
    /// No flag: every member in `members` bootstraps the group.
    #[default]
    Roster,
    /// `--bootstrap`: a new group of this daemon alone.
    Bootstrap,
    /// `--join ADDR`: ask the member at ADDR to enrol this daemon.
    Join(SocketAddr),
}

/// TLS file paths, relative to the config file's directory when relative.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Cluster CA certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's key.
    pub key: PathBuf,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/phalanx")
}
fn default_cluster() -> String {
    "phalanx".into()
}
fn default_metrics() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
}
fn default_engine() -> String {
    "simd".into()
}

impl Config {
    /// Parses a config file; relative paths are resolved against its directory.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let mut config: Config =
            toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.tls.ca,
            &mut config.tls.cert,
            &mut config.tls.key,
            &mut config.socket,
            &mut config.data_dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    /// Checks the relations between fields; every message says how to fix it.
    pub fn validate(&self) -> Result<()> {
        if self.members.is_empty() {
            bail!("`members` is empty: list every member of the group, this one included");
        }
        if self.checkpoint.replicas == 0 || self.checkpoint.keep == 0 {
            bail!(
                "checkpoint.replicas and checkpoint.keep must be at least 1, got {} and {}",
                self.checkpoint.replicas,
                self.checkpoint.keep
            );
        }
        let mut ids: Vec<u32> = self.members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            bail!("member ids in `members` must be unique");
        }
        if !ids.contains(&self.member_id) {
            bail!("member_id {} is not listed in `members`", self.member_id);
        }
        let dp = &self.data_plane;
        if dp.keep_alive_ms * 2 > dp.idle_timeout_ms {
            bail!(
                "data_plane.keep_alive_ms ({}) must be at most half of idle_timeout_ms ({}), or idle peers time out",
                dp.keep_alive_ms,
                dp.idle_timeout_ms
            );
        }
        self.detector()
            .validate()
            .map_err(|e| anyhow::anyhow!("data_plane: {e}"))?;
        if dp.suspect_after_ms >= dp.idle_timeout_ms || dp.suspect_ceiling_ms >= dp.idle_timeout_ms
        {
            bail!(
                "data_plane.suspect_after_ms ({}) and suspect_ceiling_ms ({}) must be below \
                 idle_timeout_ms ({}), so a silent peer is suspected (with a reason) before its \
                 connection times out",
                dp.suspect_after_ms,
                dp.suspect_ceiling_ms,
                dp.idle_timeout_ms
            );
        }
        if dp.stuck_after_ms == 0 || dp.stuck_after_ms >= dp.op_timeout_ms {
            bail!(
                "data_plane.stuck_after_ms ({}) must be positive and below op_timeout_ms ({}), \
                 so a stuck member is removed before the others' ops time out",
                dp.stuck_after_ms,
                dp.op_timeout_ms
            );
        }
        if dp.channels == 0 || dp.channels > 64 {
            bail!("data_plane.channels must be 1..=64, got {}", dp.channels);
        }
        if dp.connections == 0 || dp.connections > dp.channels {
            bail!(
                "data_plane.connections must be 1..=channels ({}), got {}",
                dp.channels,
                dp.connections
            );
        }
        if dp.chunk_bytes < 1024 || dp.chunk_bytes > (64 << 20) {
            bail!(
                "data_plane.chunk_bytes must be 1 KiB..=64 MiB, got {}",
                dp.chunk_bytes
            );
        }
        if dp.stream_window_bytes < dp.chunk_bytes as u64 {
            bail!("data_plane.stream_window_bytes must be at least chunk_bytes");
        }
        let c = &self.control;
        if !matches!(c.voters, 1 | 3 | 5 | 7) {
            bail!("control.voters must be 1, 3, 5 or 7, got {}", c.voters);
        }
        if c.tick_ms == 0 || c.heartbeat_ticks == 0 || c.heartbeat_ticks >= c.election_ticks {
            bail!(
                "control: tick_ms and heartbeat_ticks must be positive and heartbeat_ticks ({}) \
                 below election_ticks ({})",
                c.heartbeat_ticks,
                c.election_ticks
            );
        }
        let election = c.tick_ms * c.election_ticks as u64;
        let longest = self.detector().suspect_ceiling.as_millis() as u64;
        if c.recovery_timeout_ms < longest + 2 * election {
            bail!(
                "control.recovery_timeout_ms ({}) must cover a suspicion, an election and a commit: \
                 at least the longest suspicion bound (suspect_after_ms, or suspect_ceiling_ms if \
                 larger) + 2 × election timeout = {} ms",
                c.recovery_timeout_ms,
                longest + 2 * election
            );
        }
        if !matches!(self.engine.as_str(), "scalar" | "simd") {
            bail!("engine must be `scalar` or `simd`, got {:?}", self.engine);
        }
        Ok(())
    }

    /// This member's entry.
    pub fn me(&self) -> &MemberConfig {
        self.members
            .iter()
            .find(|m| m.id == self.member_id)
            .expect("validated")
    }

    /// The member ids in ring order.
    pub fn ring(&self) -> Vec<MemberId> {
        let mut ids: Vec<MemberId> = self.members.iter().map(|m| MemberId(m.id)).collect();
        ids.sort_unstable();
        ids
    }

    /// The QUIC listen address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.unwrap_or(self.me().addr)
    }

    /// TLS file paths.
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.tls.ca.clone(),
            cert: self.tls.cert.clone(),
            key: self.tls.key.clone(),
        }
    }

    /// The failure detector's bounds.
    pub fn detector(&self) -> phalanx_protocol::membership::DetectorConfig {
        phalanx_protocol::membership::DetectorConfig {
            heartbeat_interval: Duration::from_millis(self.data_plane.heartbeat_interval_ms),
            suspect_after: Duration::from_millis(self.data_plane.suspect_after_ms),
            // A ceiling at or below the floor keeps the bound fixed.
            suspect_ceiling: Duration::from_millis(
                self.data_plane
                    .suspect_ceiling_ms
                    .max(self.data_plane.suspect_after_ms),
            ),
        }
    }

    /// Raft timing.
    pub fn control_config(&self) -> phalanx_protocol::membership::control::ControlConfig {
        phalanx_protocol::membership::control::ControlConfig {
            election_seed: None,
            tick: Duration::from_millis(self.control.tick_ms),
            election_ticks: self.control.election_ticks,
            heartbeat_ticks: self.control.heartbeat_ticks,
            max_size_per_msg: 256 << 10,
            ..Default::default()
        }
    }

    /// The checkpoint keeper's settings.
    pub fn keeper_config(&self) -> phalanx_protocol::checkpoint::KeeperConfig {
        phalanx_protocol::checkpoint::KeeperConfig {
            replicas: self.checkpoint.replicas,
            keep: self.checkpoint.keep,
            ..Default::default()
        }
    }

    /// The op timeout.
    pub fn op_timeout(&self) -> Duration {
        Duration::from_millis(self.data_plane.op_timeout_ms)
    }

    /// The data-path core's bounds and timing.
    pub fn node_config(&self) -> phalanx_protocol::node::NodeConfig {
        let dp = &self.data_plane;
        phalanx_protocol::node::NodeConfig {
            collectives: phalanx_protocol::collective::Config {
                chunk_bytes: dp.chunk_bytes,
                small_tensor_bytes: dp.small_tensor_bytes,
                max_chunks_in_flight: dp.max_chunks_in_flight,
                op_timeout: self.op_timeout(),
                max_tensor_bytes: dp.max_tensor_bytes,
                ..Default::default()
            },
            detector: self.detector(),
            recovery_timeout: Duration::from_millis(self.control.recovery_timeout_ms),
            stuck_after: Duration::from_millis(dp.stuck_after_ms),
            startup_grace: Duration::from_millis(dp.startup_grace_ms),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
cluster = "test"
member_id = 2
socket = "p2.sock"
[tls]
ca = "certs/ca.pem"
cert = "certs/node2.pem"
key = "certs/node2.key"
[[members]]
id = 1
name = "node1"
addr = "127.0.0.1:7001"
[[members]]
id = 2
name = "node2"
addr = "127.0.0.2:7001"
[data_plane]
channels = 2
"#;

    #[test]
    fn the_shipped_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/phalanxd.example.toml");
        let c = Config::load(&path).unwrap();
        c.validate().unwrap();
        assert_eq!(c.members.len(), 3);
        assert_eq!(
            c.data_plane,
            DataPlaneConfig::default(),
            "the example documents the defaults"
        );
        assert_eq!(
            c.control,
            ControlPlaneConfig::default(),
            "the example documents the defaults"
        );
        assert_eq!(
            c.checkpoint,
            CheckpointConfig::default(),
            "the example documents the defaults"
        );
    }

    #[test]
    fn parses_resolves_and_validates() {
        let dir = std::env::temp_dir().join(format!("phalanx-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("phalanxd.toml");
        std::fs::write(&path, SAMPLE).unwrap();
        let c = Config::load(&path).unwrap();
        c.validate().unwrap();
        assert_eq!(c.tls.ca, dir.join("certs/ca.pem"));
        assert_eq!(c.listen_addr(), "127.0.0.2:7001".parse().unwrap());
        assert_eq!(c.data_plane.channels, 2);
        assert_eq!(
            c.data_plane.chunk_bytes,
            DataPlaneConfig::default().chunk_bytes
        );
        assert_eq!(c.ring(), vec![MemberId(1), MemberId(2)]);

        let mut bad = c.clone();
        bad.member_id = 9;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not listed"));
        let mut bad = c.clone();
        bad.data_plane.keep_alive_ms = bad.data_plane.idle_timeout_ms;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("keep_alive_ms"));
        let mut bad = c.clone();
        bad.checkpoint.replicas = 0;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("checkpoint.replicas"));
        std::fs::write(&path, SAMPLE.replace("channels = 2", "chanels = 2")).unwrap();
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("chanels"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
