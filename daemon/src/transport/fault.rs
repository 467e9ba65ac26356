//! Fault injection for the process tests, compiled only with the
//! `fault-injection` feature (the daemon's own integration tests turn it
//! on; release builds of `phalanxd` leave it off): when `PHALANX_FAULT_FILE`
//! names a file, the member ids listed in it (whitespace-separated) are cut
//! off: what they send is held on arrival until the cut heals, as a network
//! partition holds a QUIC connection's traffic (it is retransmitted after
//! the heal, never lost while the connection lives; the connection's own
//! keep-alives go on, so a cut does not end it). The file is read every
//! 50 ms, so a test cuts and heals by rewriting it.

use phalanx_protocol::MemberId;

/// Which peers' traffic is held on arrival.
#[derive(Clone, Debug, Default)]
pub struct FaultGate {
    #[cfg(feature = "fault-injection")]
    cut: std::sync::Arc<std::sync::RwLock<std::collections::BTreeSet<MemberId>>>,
}

impl FaultGate {
    /// Whether traffic from `peer` is held.
    #[cfg(feature = "fault-injection")]
    pub fn is_cut(&self, peer: MemberId) -> bool {
        self.cut.read().expect("poisoned").contains(&peer)
    }

    /// Whether traffic from `peer` is held: never, in this build.
    #[cfg(not(feature = "fault-injection"))]
    pub fn is_cut(&self, _peer: MemberId) -> bool {
        false
    }

    /// Returns once traffic from `peer` may pass (at once unless it is cut
    /// off; in a build without the feature, always at once).
    pub async fn pass(&self, peer: MemberId) {
        while self.is_cut(peer) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Starts reading the file `PHALANX_FAULT_FILE` names, if it is set.
    #[cfg(feature = "fault-injection")]
    pub fn from_env() -> FaultGate {
        use tracing::warn;
        let gate = FaultGate::default();
        let Some(path) = std::env::var_os("PHALANX_FAULT_FILE") else {
            return gate;
        };
        warn!(path = %std::path::Path::new(&path).display(), "fault injection enabled (PHALANX_FAULT_FILE)");
        let cut = gate.cut.clone();
        tokio::spawn(async move {
            loop {
                // Off the runtime's threads: a file read blocks.
                let p = path.clone();
                let text = tokio::task::spawn_blocking(move || std::fs::read_to_string(p))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                let ids: std::collections::BTreeSet<MemberId> = text
                    .split_whitespace()
                    .filter_map(|w| w.parse().ok().map(MemberId))
                    .collect();
                {
                    let mut cut = cut.write().expect("poisoned");
                    if *cut != ids {
                        warn!(cut = ?ids, "fault injection: peers cut off");
                        *cut = ids;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        });
        gate
    }

    /// No fault injection in this build.
    #[cfg(not(feature = "fault-injection"))]
    pub fn from_env() -> FaultGate {
        FaultGate::default()
    }
}
