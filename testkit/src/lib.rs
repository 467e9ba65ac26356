//! # phalanx-testkit
//!
//! A local cluster of real `phalanxd` processes on loopback addresses, with
//! certificates in a scratch directory: what the process tests, the
//! benchmarks, the demo and `phalanx-local-cluster` start. Member `i`
//! (1-based) listens on `127.0.0.{10+i}`, so every member has an address of
//! its own. Kept out of the daemon's library: nothing here ships in
//! `phalanxd`.
#![deny(missing_docs)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use phalanx_daemon::tls;

pub use phalanx_daemon::local::admin::{http_get, http_post, set_policy};

/// How to start the cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Number of members.
    pub members: usize,
    /// The `phalanxd` binary.
    pub phalanxd: PathBuf,
    /// Scratch directory (created; removed on drop unless `keep`, or while
    /// a test panics: its daemons' logs say why).
    pub dir: PathBuf,
    /// Extra `[data_plane]` lines for every member's config.
    pub data_plane: String,
    /// Extra `[control]` lines for every member's config.
    pub control: String,
    /// Keep the directory (logs, configs) after drop.
    pub keep: bool,
    /// Extra `phalanxd` flags for every member (`--worker-threads 1`, say).
    pub flags: Vec<String>,
    /// Form the group as on real nodes: member 1 `--bootstrap`, the others
    /// `--join` member 1, each config listing only its own member. The
    /// joined members enter the ring when their trainers call join().
    /// Otherwise every config lists every member and they bootstrap
    /// together.
    pub bootstrap: bool,
}

/// One member process.
#[derive(Debug)]
pub struct Member {
    /// 1-based member id.
    pub id: u32,
    /// The trainer socket.
    pub socket: PathBuf,
    /// The metrics endpoint.
    pub metrics: SocketAddr,
    /// The QUIC address.
    pub addr: SocketAddr,
    /// The config file.
    pub config: PathBuf,
    /// The daemon's log.
    pub log: PathBuf,
    /// The process, while it runs.
    pub child: Option<Child>,
    /// Start flags (`--bootstrap`, `--join ADDR`; a restart ignores them).
    pub args: Vec<String>,
}

impl Member {
    /// Its `[[members]]` entry.
    fn entry(&self) -> String {
        format!(
            "[[members]]\nid = {i}\nname = \"node{i}\"\naddr = \"{addr}\"\n",
            i = self.id,
            addr = self.addr
        )
    }

    fn write_config(&self, options: &ClusterOptions, entries: &str) -> Result<()> {
        let text = format!(
            "cluster = \"local\"\nmember_id = {id}\nsocket = \"{sock}\"\nmetrics = \"{metrics}\"\n\
             data_dir = \"node{id}.data\"\n\
             [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/node{id}.pem\"\nkey = \"certs/node{id}.key\"\n\
             [control]\n{control}\n\
             [data_plane]\n{dp}\n{entries}",
            id = self.id,
            sock = self.socket.display(),
            metrics = self.metrics,
            dp = options.data_plane,
            control = options.control,
        );
        std::fs::write(&self.config, text)
            .with_context(|| format!("writing {}", self.config.display()))
    }
}

/// The running cluster; dropping it kills every member.
#[derive(Debug)]
pub struct LocalCluster {
    /// The options it was started with.
    pub options: ClusterOptions,
    /// Members, index `i` is member id `i + 1`.
    pub members: Vec<Member>,
}

/// The next candidate port: clusters started by one process (parallel
/// tests, benchmark trials) never get the same port twice, which asking the
/// kernel for an ephemeral port and releasing it cannot promise (a parallel
/// test could be handed the same one before the daemon binds it). The range
/// starts at a place derived from the process id so concurrent processes are
/// unlikely to meet; a port something else holds is skipped.
fn next_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 400) * 100;
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    (base + n % 40_000) as u16
}

/// A free UDP port on `ip`.
fn free_udp(ip: [u8; 4]) -> Result<SocketAddr> {
    for _ in 0..1000 {
        let addr = SocketAddr::from((ip, next_port()));
        if UdpSocket::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no free UDP port on {ip:?}")
}

/// A free TCP port on `ip`.
fn free_tcp(ip: [u8; 4]) -> Result<SocketAddr> {
    for _ in 0..1000 {
        let addr = SocketAddr::from((ip, next_port()));
        if TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no free TCP port on {ip:?}")
}

impl LocalCluster {
    /// Issues certificates, writes configs and starts every member; returns
    /// once every trainer socket accepts connections.
    pub fn start(options: ClusterOptions) -> Result<LocalCluster> {
        if options.members == 0 || options.members > 200 {
            bail!(
                "a local cluster has 1..=200 members, not {}",
                options.members
            );
        }
        let certs = options.dir.join("certs");
        std::fs::create_dir_all(&options.dir)
            .with_context(|| format!("creating {}", options.dir.display()))?;
        tls::init_ca(&certs)?;
        let mut members = Vec::new();
        for i in 1..=options.members as u32 {
            members.push(Self::new_member(&options, i)?);
        }
        let entries: String = members.iter().map(Member::entry).collect();
        for m in &mut members {
            if options.bootstrap {
                m.args = if m.id == 1 {
                    vec!["--bootstrap".into()]
                } else {
                    vec![]
                };
                m.write_config(&options, &m.entry())?;
            } else {
                m.write_config(&options, &entries)?;
            }
        }
        let first = members[0].addr;
        let mut cluster = LocalCluster { options, members };
        cluster.spawn(0)?;
        if cluster.options.bootstrap {
            // The others join once the first one runs.
            cluster.wait_ready(Duration::from_secs(60))?;
            for i in 1..cluster.members.len() {
                cluster.members[i].args = vec!["--join".into(), first.to_string()];
            }
        }
        for i in 1..cluster.members.len() {
            cluster.spawn(i)?;
        }
        cluster.wait_ready(Duration::from_secs(60))?;
        cluster.wait_settled(Duration::from_secs(60))?;
        Ok(cluster)
    }

    fn new_member(options: &ClusterOptions, i: u32) -> Result<Member> {
        if i > 200 {
            bail!("a local cluster has at most 200 members");
        }
        let ip = [127, 0, 0, 10 + i as u8];
        tls::issue_node(&options.dir.join("certs"), &format!("node{i}"))?;
        Ok(Member {
            id: i,
            socket: options.dir.join(format!("node{i}.sock")),
            metrics: free_tcp(ip)?,
            addr: free_udp(ip)?,
            config: options.dir.join(format!("node{i}.toml")),
            log: options.dir.join(format!("node{i}.log")),
            child: None,
            args: Vec::new(),
        })
    }

    /// Starts a new node that joins the running group (`phalanxd --join`
    /// the first running member; its config lists only itself) and waits
    /// until its trainer socket accepts and it is connected to every
    /// running member. It is a learner, out of the ring, until its trainer
    /// calls join(). Returns its index.
    pub fn add_member(&mut self) -> Result<usize> {
        let seed = self
            .members
            .iter()
            .find(|m| m.child.is_some())
            .map(|m| m.addr)
            .context("no running member to join")?;
        let mut m = Self::new_member(&self.options, self.members.len() as u32 + 1)?;
        m.write_config(&self.options, &m.entry())?;
        m.args = vec!["--join".into(), seed.to_string()];
        self.members.push(m);
        let i = self.members.len() - 1;
        self.spawn(i)?;
        self.wait_ready(Duration::from_secs(60))?;
        Ok(i)
    }

    /// Starts member index `i`'s process.
    pub fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        // Appended: a restarted member's log follows its previous life's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .with_context(|| format!("opening {}", m.log.display()))?;
        let child = Command::new(&self.options.phalanxd)
            .arg("--config")
            .arg(&m.config)
            .args(&self.options.flags)
            .args(&m.args)
            .env(
                "PHALANX_FAULT_FILE",
                self.options.dir.join(format!("node{}.cut", m.id)),
            )
            .env(
                "RUST_LOG",
                std::env::var("PHALANX_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.options.phalanxd.display()))?;
        m.child = Some(child);
        Ok(())
    }

    /// Waits until every running member's trainer socket accepts a connection
    /// and every member reports a connection to each of the others.
    pub fn wait_ready(&mut self, bound: Duration) -> Result<()> {
        let start = Instant::now();
        // Every member holds every link to every other member.
        let links = phalanx_daemon::config::Config::load(&self.members[0].config)?
            .data_plane
            .connections;
        let peers = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .count()
            .saturating_sub(1)
            * links;
        for m in self.members.iter_mut().filter(|m| m.child.is_some()) {
            loop {
                if std::os::unix::net::UnixStream::connect(&m.socket).is_ok() {
                    break;
                }
                if let Some(child) = &mut m.child {
                    if let Some(status) = child.try_wait()? {
                        bail!(
                            "member {} exited with {status} during start-up; log:\n{}",
                            m.id,
                            tail(&m.log)
                        );
                    }
                }
                if start.elapsed() > bound {
                    bail!(
                        "member {} not ready after {bound:?}; log:\n{}",
                        m.id,
                        tail(&m.log)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            loop {
                let connected = self
                    .metrics(i)
                    .ok()
                    .and_then(|text| {
                        text.lines()
                            .find(|l| l.starts_with("phalanx_peer_connections "))
                            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    })
                    .unwrap_or(0.0);
                if connected >= peers as f64 {
                    break;
                }
                if start.elapsed() > bound {
                    let m = &self.members[i];
                    bail!("member {} has {connected} of {peers} peer connections after {bound:?}; log:\n{}", m.id, tail(&m.log));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Sends SIGTERM to member index `i` and waits for it to exit.
    pub fn terminate(&mut self, i: usize, bound: Duration) -> Result<std::process::ExitStatus> {
        let m = &mut self.members[i];
        let Some(mut child) = m.child.take() else {
            bail!("member {} is not running", m.id)
        };
        let pid = rustix::process::Pid::from_raw(child.id() as i32).context("pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .context("sending SIGTERM")?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > bound {
                let _ = child.kill();
                bail!(
                    "member {} ignored SIGTERM for {bound:?}; log:\n{}",
                    m.id,
                    tail(&m.log)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Member index `i`'s metrics page.
    pub fn metrics(&self, i: usize) -> Result<String> {
        http_get(self.members[i].metrics, "/metrics")
    }

    /// One unlabelled gauge or counter of member index `i`.
    pub fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let text = self.metrics(i).ok()?;
        let prefix = format!("{name} ");
        text.lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// Cuts member index `i` off from `peers` (member ids) in both
    /// directions, through the daemons' test-only fault gate (a `phalanxd`
    /// built with the `fault-injection` feature, as the daemon's own tests
    /// build it); an empty list heals it. Takes effect within ~50 ms.
    pub fn cut(&self, i: usize, peers: &[u32]) -> Result<()> {
        let me = self.members[i].id;
        // The delays set stay; once-only lines not taken yet are dropped.
        let write = |id: u32, ids: Vec<u32>| -> Result<()> {
            self.rewrite_faults(id, |text| {
                let list: Vec<String> = ids.iter().map(u32::to_string).collect();
                let delays = text.lines().filter(|l| l.starts_with("delay "));
                std::iter::once(list.join(" "))
                    .chain(delays.map(str::to_string))
                    .map(|l| l + "\n")
                    .collect()
            })
        };
        write(me, peers.to_vec())?;
        for m in &self.members {
            if m.id != me {
                let ids = if peers.contains(&m.id) {
                    vec![me]
                } else {
                    vec![]
                };
                write(m.id, ids)?;
            }
        }
        Ok(())
    }

    /// Drops member index `i`'s connections to member id `peer` once, with
    /// what is in flight on them, as a network drops a connection (through
    /// the test-only fault gate; the dialler redials). Takes effect within
    /// ~100 ms.
    pub fn drop_connections(&self, i: usize, peer: u32) -> Result<()> {
        self.add_fault(i, &format!("reset {peer}"))
    }

    /// Member index `i` holds the next primary connection it accepts from
    /// member id `peer` for `hold` between its welcome and its start, as a
    /// starved runtime does (through the test-only fault gate).
    pub fn stall_next_connection(&self, i: usize, peer: u32, hold: Duration) -> Result<()> {
        self.add_fault(i, &format!("stall {peer} {}", hold.as_millis()))
    }

    /// Member index `i`'s runner is kept busy for `busy` once, as a large
    /// op's copies and checksums keep it on a loaded machine (through the
    /// test-only fault gate; its log says "the runner is no longer busy"
    /// after). Takes effect within ~50 ms of the next input.
    pub fn keep_runner_busy(&self, i: usize, busy: Duration) -> Result<()> {
        self.add_fault(i, &format!("busy {}", busy.as_millis()))
    }

    /// Member index `i` holds what member id `peer` sends it for `delay`
    /// from its arrival, in order, as a link's latency does (through the
    /// test-only fault gate), until it is set again; zero lifts it. One
    /// direction: set it at both ends for a slow link. Takes effect within
    /// ~50 ms.
    pub fn delay(&self, i: usize, peer: u32, delay: Duration) -> Result<()> {
        let me = self.members[i].id;
        let prefix = format!("delay {peer} ");
        self.rewrite_faults(me, |text| {
            let mut kept: String = text
                .lines()
                .filter(|l| !l.starts_with(&prefix))
                .map(|l| format!("{l}\n"))
                .collect();
            if !delay.is_zero() {
                kept.push_str(&format!("{prefix}{}\n", delay.as_millis()));
            }
            kept
        })
    }

    /// Appends a once-only `line` (tagged anew) to member index `i`'s
    /// fault file.
    fn add_fault(&self, i: usize, line: &str) -> Result<()> {
        static TAG: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tag = TAG.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let me = self.members[i].id;
        self.rewrite_faults(me, |text| format!("{text}{line} {tag}\n"))
    }

    /// Rewrites member id `me`'s fault file through `edit`.
    fn rewrite_faults(&self, me: u32, edit: impl FnOnce(&str) -> String) -> Result<()> {
        let path = self.options.dir.join(format!("node{me}.cut"));
        let text = edit(&std::fs::read_to_string(&path).unwrap_or_default());
        // Renamed into place: the gate never reads half a line.
        let tmp = path.with_extension("cut.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
    }

    /// Sends `signal` to member index `i` (SIGKILL takes the process away).
    pub fn signal(&mut self, i: usize, signal: rustix::process::Signal) -> Result<()> {
        let m = &mut self.members[i];
        let Some(child) = m.child.as_mut() else {
            bail!("member {} is not running", m.id)
        };
        let pid = rustix::process::Pid::from_raw(child.id() as i32).context("pid")?;
        rustix::process::kill_process(pid, signal).context("sending a signal")?;
        if signal == rustix::process::Signal::KILL {
            child.wait()?;
            m.child = None;
        }
        Ok(())
    }

    /// Waits until every running member has installed the same epoch and
    /// knows a Raft leader; returns the epoch.
    pub fn wait_settled(&self, bound: Duration) -> Result<u64> {
        self.wait_settled_with(bound, false)
    }

    /// As [`LocalCluster::wait_settled`], and with every running member
    /// active (none removed on a suspicion while the group formed) when
    /// `all_active`.
    pub fn wait_settled_with(&self, bound: Duration, all_active: bool) -> Result<u64> {
        let start = Instant::now();
        loop {
            let running: Vec<usize> = (0..self.members.len())
                .filter(|&i| self.members[i].child.is_some())
                .collect();
            let epochs: Vec<Option<f64>> = running
                .iter()
                .map(|&i| self.metric(i, "phalanx_epoch"))
                .collect();
            let leaders: Vec<Option<f64>> = running
                .iter()
                .map(|&i| self.metric(i, "phalanx_raft_leader"))
                .collect();
            let first = epochs.first().copied().flatten();
            let active: Vec<Option<f64>> = running
                .iter()
                .map(|&i| self.metric(i, "phalanx_members{status=\"active\"}"))
                .collect();
            if let Some(epoch) = first {
                if epochs.iter().all(|e| *e == first)
                    && leaders.iter().all(|l| l.is_some_and(|l| l >= 0.0))
                    && (!all_active || active.iter().all(|a| *a == Some(running.len() as f64)))
                {
                    return Ok(epoch as u64);
                }
            }
            if start.elapsed() > bound {
                bail!("members did not settle on one epoch, a leader and all running members active within {bound:?}: epochs {epochs:?}, leaders {leaders:?}, active {active:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        &self.options.dir
    }
}

/// SIGKILL, for [`LocalCluster::signal`].
pub const KILL: rustix::process::Signal = rustix::process::Signal::KILL;

/// The last lines of a log, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // SIGTERM first, so daemons close their peers and remove their sockets;
        // SIGKILL whatever is still there after a grace period.
        for m in &self.members {
            if let Some(c) = &m.child {
                if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            // A failed test's daemons' logs are what explains it.
            eprintln!(
                "the cluster's directory (daemon logs) is kept: {}",
                self.options.dir.display()
            );
        } else if !self.options.keep {
            let _ = std::fs::remove_dir_all(&self.options.dir);
        }
    }
}
