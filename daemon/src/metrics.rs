//! Prometheus metrics: the names every task records through the `metrics`
//! facade, and the recorder `metrics-exporter-prometheus` renders them from
//! (served at `GET /metrics` by `local::http`).

use std::sync::OnceLock;

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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
/// Removed members whose trainer was in lockstep, readmitted: labelled
/// `outcome` `caught_up` (served the results it missed, no error) or
/// `refused` (its trainer was told to join again).
pub const RETURNS: &str = "phalanx_returns_total";
/// Doubts after this daemon did not run (or heard nobody) for about its
/// peers' suspicion bound, by how they ended: `confirmed` (the epoch went
/// on with it), `removed` (results withheld from the trainer were taken
/// back; the group's came by catch-up) or `failed`.
pub const DOUBTS: &str = "phalanx_pause_doubts_total";
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

/// Bytes of checkpoint copies written to this daemon's store.
pub const CHECKPOINT_BYTES: &str = "phalanx_checkpoint_bytes_written_total";
/// Checkpoint copies this daemon failed to write.
pub const CHECKPOINT_FAILURES: &str = "phalanx_checkpoint_failures_total";
/// Copying a trainer's state out of its buffer (the snapshot), seconds.
pub const CHECKPOINT_SNAPSHOT_SECONDS: &str = "phalanx_checkpoint_snapshot_seconds";
/// Writing a copy durably to the store, seconds.
pub const CHECKPOINT_PERSIST_SECONDS: &str = "phalanx_checkpoint_persist_seconds";
/// Gauge per `stream`: the step of its latest committed checkpoint.
pub const CHECKPOINT_LAST_STEP: &str = "phalanx_checkpoint_last_committed_step";

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
        .set_buckets_for_metric(
            Matcher::Full(CHECKPOINT_SNAPSHOT_SECONDS.into()),
            &OP_BUCKETS,
        )
        .context("histogram buckets")?
        .set_buckets_for_metric(
            Matcher::Full(CHECKPOINT_PERSIST_SECONDS.into()),
            &OP_BUCKETS,
        )
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
