//! The admin API, served next to `/metrics` by [`super::http`]: `GET
//! /members` (the group as `phalanxctl members` prints it), `GET
//! /checkpoints` (`phalanxctl checkpoints`), `GET /policy` and `POST
//! /policy` (propose a quorum policy through Raft). And the client side
//! `phalanxctl` uses.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use phalanx_protocol::stragglers::{QuorumPolicy, StragglerRecord};
use tokio::sync::{mpsc, oneshot, watch};

use crate::bus::{ControlInput, GroupView};

/// What the admin API reads and where a policy change goes.
#[derive(Clone, Debug)]
pub struct Admin {
    /// The group.
    pub group: watch::Receiver<GroupView>,
    /// The step coordinator's attribution, as last announced.
    pub stragglers: watch::Receiver<Vec<StragglerRecord>>,
    /// The control task.
    pub control: mpsc::UnboundedSender<ControlInput>,
}

impl Admin {
    /// The answer to `method path` with `body`, if the path is the admin
    /// API's: an HTTP status and a body.
    pub async fn handle(
        &self,
        method: &str,
        path: &str,
        body: &str,
    ) -> Option<(&'static str, String)> {
        Some(match (method, path) {
            ("GET", "/members") => {
                let table =
                    render(&self.group.borrow()) + &render_stragglers(&self.stragglers.borrow());
                ("200 OK", table)
            }
            ("GET", "/checkpoints") => ("200 OK", render_checkpoints(&self.group.borrow())),
            ("GET", "/policy") => {
                let g = self.group.borrow();
                (
                    "200 OK",
                    format!("{} (epoch {})\n", g.group.policy, g.group.epoch),
                )
            }
            ("POST", "/policy") => self.set_policy(body.trim()).await,
            _ => return None,
        })
    }

    /// Parses and proposes a policy; the HTTP status and body.
    async fn set_policy(&self, text: &str) -> (&'static str, String) {
        let policy: QuorumPolicy = match text.parse() {
            Ok(p) => p,
            Err(e) => return ("400 Bad Request", format!("bad policy `{text}`: {e}\n")),
        };
        let (reply, rx) = oneshot::channel();
        if self
            .control
            .send(ControlInput::SetPolicy { policy, reply })
            .is_err()
        {
            return ("503 Service Unavailable", "the daemon is stopping\n".into());
        }
        match rx.await {
            Ok(Ok(())) => ("200 OK", format!("proposed {policy}\n")),
            Ok(Err(e)) => ("503 Service Unavailable", format!("{e}\n")),
            Err(_) => ("503 Service Unavailable", "the daemon is stopping\n".into()),
        }
    }
}

/// The group as a table for operators.
pub fn render(view: &GroupView) -> String {
    let mut out = format!(
        "epoch {}  term {}  leader {}  policy {}\n{:<8} {:<22} {:<8} {:<8} {:<6} {:<7} reason\n",
        view.group.epoch,
        view.term,
        view.leader.map_or("none".to_string(), |l| l.to_string()),
        view.group.policy,
        "member",
        "address",
        "status",
        "role",
        "life",
        "since"
    );
    for (id, r) in &view.group.members {
        let role = if view.voters.contains(id) {
            "voter"
        } else if view.learners.contains(id) {
            "learner"
        } else {
            "-"
        };
        out += &format!(
            "{:<8} {:<22} {:<8} {:<8} {:<6} {:<7} {}\n",
            id.to_string(),
            r.addr,
            r.status.to_string(),
            role,
            r.incarnation.0,
            r.since.to_string(),
            r.reason
        );
    }
    out
}

/// The group's checkpoints as a table for operators: committed ones per
/// stream (oldest first), then those waiting for holders.
pub fn render_checkpoints(view: &GroupView) -> String {
    let c = &view.group.checkpoints;
    let ring = view.group.ring();
    let holders = |hs: &[phalanx_protocol::MemberId]| {
        hs.iter()
            .map(|h| {
                if ring.contains(h) {
                    h.to_string()
                } else {
                    format!("{h} (out of the ring)")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = format!(
        "{:<7} {:>10} {:<7} {:>14} {:>7} holders
",
        "stream", "step", "epoch", "bytes", "chunks"
    );
    for manifests in c.committed.values() {
        for m in manifests {
            let chunks: u64 = m.parts.iter().map(|p| p.chunks()).sum();
            out += &format!(
                "{:<7} {:>10} {:<7} {:>14} {:>7} {}\n",
                m.id.stream,
                m.id.step.0,
                m.epoch.to_string(),
                m.size(),
                chunks,
                holders(&m.holders)
            );
        }
    }
    if c.committed.is_empty() {
        out += "(no committed checkpoint)\n";
    }
    if !c.pending.is_empty() {
        out += "\nwaiting for holders\n";
        for m in c.pending.values() {
            out += &format!(
                "{:<7} {:>10} {:<7} {:>14} reported by {}\n",
                m.id.stream,
                m.id.step.0,
                m.epoch.to_string(),
                m.size(),
                holders(&m.holders)
            );
        }
    }
    out
}

/// The straggler table under `phalanxctl members`.
fn render_stragglers(records: &[StragglerRecord]) -> String {
    if records.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\nstragglers (as the step coordinator counts)\n{:<8} {:>9} {:>7} {:>10} standing\n",
        "member", "left out", "missed", "missed by"
    );
    for r in records {
        out += &format!(
            "{:<8} {:>9} {:>7} {:>8} ms {}\n",
            r.member.to_string(),
            r.left_out,
            r.missed,
            r.missed_by_ms,
            if r.observer {
                "observer"
            } else {
                "contributor"
            }
        );
    }
    out
}

/// `GET path` from a daemon's HTTP endpoint; the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    http_request(addr, "GET", path, "")
}

/// `POST path` with `body` to a daemon's HTTP endpoint; the answer's body.
pub fn http_post(addr: SocketAddr, path: &str, body: &str) -> Result<String> {
    http_request(addr, "POST", path, body)
}

/// Proposes `policy` through the daemon at `addr` and waits (up to 10 s,
/// retrying while the group has no leader) until that daemon applied it.
pub fn set_policy(addr: SocketAddr, policy: QuorumPolicy) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let want = format!("{policy} (");
    loop {
        let proposed = http_post(addr, "/policy", &policy.to_string());
        for _ in 0..20 {
            if http_get(addr, "/policy")?.starts_with(&want) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if Instant::now() > deadline {
            proposed?;
            bail!("the policy {policy} was proposed but not applied within 10 s");
        }
    }
}

fn http_request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)
        .with_context(|| format!("connecting to {addr} (is phalanxd running with metrics on?)"))?;
    // One write: the server reads the request in one go and answers.
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        Some((head, body)) => bail!(
            "{addr}{path}: {}: {}",
            head.lines().next().unwrap_or(""),
            body.trim()
        ),
        None => bail!("{addr}{path}: malformed response"),
    }
}
