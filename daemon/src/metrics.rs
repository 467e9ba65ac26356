//! Prometheus metrics: recorded through the `metrics` facade, rendered by
//! `metrics-exporter-prometheus`, served by a small HTTP/1.1 endpoint so no
//! HTTP stack (and no second TLS provider) is pulled in.

use std::net::SocketAddr;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

/// Bytes of tensor frames sent, labelled by peer.
pub const BYTES_SENT: &str = "phalanx_bytes_sent_total";
/// Bytes of tensor frames received, labelled by peer.
pub const BYTES_RECEIVED: &str = "phalanx_bytes_received_total";
/// Collective latency, seconds, labelled by kind.
pub const OP_SECONDS: &str = "phalanx_op_duration_seconds";
/// Collectives in flight.
pub const OPS_IN_FLIGHT: &str = "phalanx_ops_in_flight";
/// Collectives completed / failed, labelled by outcome.
pub const OPS: &str = "phalanx_ops_total";
/// Established peer connections.
pub const CONNECTIONS: &str = "phalanx_peer_connections";
/// Peers refused during the TLS handshake or the hello, labelled by reason.
pub const REFUSED: &str = "phalanx_peers_refused_total";
/// Peers suspected by the failure detector, labelled by reason.
pub const SUSPICIONS: &str = "phalanx_suspicions_total";
/// Connections closed for a protocol error, labelled by reason.
pub const PROTOCOL_ERRORS: &str = "phalanx_protocol_errors_total";
/// Ops parked until the next epoch (interrupted by a member's failure).
pub const OPS_PARKED: &str = "phalanx_ops_parked";
/// Interrupted ops finished in a new epoch, labelled by plan
/// (`rerun`, `kept_result`, `superseded`).
pub const RERUNS: &str = "phalanx_ops_recovered_total";
/// Members removed from the ring (each is a failover).
pub const FAILOVERS: &str = "phalanx_failovers_total";
/// From this daemon's first proposal of a removal to its commit, seconds.
pub const EPOCH_COMMIT_SECONDS: &str = "phalanx_epoch_commit_seconds";
/// The current epoch.
pub const EPOCH: &str = "phalanx_epoch";
/// The Raft term.
pub const RAFT_TERM: &str = "phalanx_raft_term";
/// The Raft leader's member id (-1: none known).
pub const RAFT_LEADER: &str = "phalanx_raft_leader";
/// Members of the group, labelled by status.
pub const MEMBERS: &str = "phalanx_members";
/// Counter: steps closed by the quorum policy, by `reason` (`all_ready`,
/// `backup`, `deadline`).
pub const STEPS_CLOSED: &str = "phalanx_steps_closed_total";
/// Gauge per `member`: steps it was left out of (as the step coordinator
/// counts; labels are the group's members, so bounded).
pub const STRAGGLER_LEFT_OUT: &str = "phalanx_straggler_left_out_steps";
/// Gauge per `member`: of those, steps it missed by more than the tolerance.
pub const STRAGGLER_MISSED: &str = "phalanx_straggler_missed_steps";
/// Gauge per `member`: how late it was in total for the steps it missed, s.
pub const STRAGGLER_MISSED_SECONDS: &str = "phalanx_straggler_missed_seconds";
/// Gauge per `member`: 1 while it is a demoted observer.
pub const STRAGGLER_OBSERVER: &str = "phalanx_straggler_observer";

/// Explicit latency buckets: 50 µs to 60 s.
const OP_BUCKETS: [f64; 16] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0,
    5.0, 15.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once (several daemons in one test
/// process share it) and returns its handle.
pub fn handle() -> Result<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(OP_SECONDS.into()), &OP_BUCKETS)
        .context("histogram buckets")?
        .set_buckets_for_metric(Matcher::Full(EPOCH_COMMIT_SECONDS.into()), &OP_BUCKETS)
        .context("histogram buckets")?
        .build_recorder();
    let h = recorder.handle();
    if metrics::set_global_recorder(recorder).is_ok() {
        let _ = HANDLE.set(h);
    }
    Ok(HANDLE
        .get()
        .context("another metrics recorder is installed in this process")?
        .clone())
}

/// What the endpoint shows and where a policy change goes.
#[derive(Debug)]
pub struct Views {
    /// The group.
    pub group: tokio::sync::watch::Receiver<crate::control::GroupView>,
    /// The step coordinator's attribution, as last announced.
    pub stragglers:
        tokio::sync::watch::Receiver<Vec<phalanx_protocol::stragglers::StragglerRecord>>,
    /// The control task (`POST /policy`).
    pub control: tokio::sync::mpsc::Sender<crate::control::ControlInput>,
}

/// The straggler table under `phalanxctl members`.
fn render_stragglers(records: &[phalanx_protocol::stragglers::StragglerRecord]) -> String {
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

/// Serves `GET /metrics` (Prometheus text), `GET /members` (the group as
/// `phalanxctl members` prints it), `GET /policy` (the quorum policy) and
/// `POST /policy` (body: a policy, as `phalanxctl policy` sends it) on
/// `listener` until the task is dropped. Bind it to a trusted address: it
/// changes how the group closes steps.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, views: Views) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics endpoint listening");
    }
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        let (members, policy) = {
            let g = views.group.borrow();
            (
                g.render() + &render_stragglers(&views.stragglers.borrow()),
                format!("{} (epoch {})\n", g.group.policy, g.group.epoch),
            )
        };
        let control = views.control.clone();
        tokio::spawn(async move {
            let mut req = [0u8; 1024];
            let n = match stream.read(&mut req).await {
                Ok(n) => n,
                Err(_) => return,
            };
            let line = String::from_utf8_lossy(&req[..n]);
            let (status, body) = if line.starts_with("GET /metrics") {
                ("200 OK", handle.render())
            } else if line.starts_with("GET /members") {
                ("200 OK", members)
            } else if line.starts_with("GET /policy") {
                ("200 OK", policy)
            } else if line.starts_with("POST /policy") {
                let text = line.split_once("\r\n\r\n").map_or("", |(_, b)| b.trim());
                set_policy(&control, text).await
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics, GET /members, GET /policy and POST /policy are served\n"
                        .to_string(),
                )
            };
            debug!(%peer, status, "metrics request");
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

/// Parses and proposes a policy; the HTTP status and body.
async fn set_policy(
    control: &tokio::sync::mpsc::Sender<crate::control::ControlInput>,
    text: &str,
) -> (&'static str, String) {
    let policy: phalanx_protocol::stragglers::QuorumPolicy = match text.parse() {
        Ok(p) => p,
        Err(e) => return ("400 Bad Request", format!("bad policy `{text}`: {e}\n")),
    };
    let (reply, rx) = tokio::sync::oneshot::channel();
    if control
        .send(crate::control::ControlInput::SetPolicy { policy, reply })
        .await
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

/// Binds the metrics endpoint.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))
}
