//! Fault injection for the process tests, compiled only with the
//! `fault-injection` feature (the daemon's own integration tests turn it
//! on; release builds of `phalanxd` leave it off): when `PHALANX_FAULT_FILE`
//! names a file, the member ids listed in it (whitespace-separated) are cut
//! off: what they send is held on arrival until the cut heals, as a network
//! partition holds a QUIC connection's traffic (it is retransmitted after
//! the heal, never lost while the connection lives; the connection's own
//! keep-alives go on, so a cut does not end it). A line `reset ID TAG`
//! drops the connections to member ID once per new TAG, with what is in
//! flight on them, as a middlebox or a NIC reset does (neither daemon asked
//! for it; the dialler redials). The file is read every 50 ms, so a test
//! cuts, heals and resets by rewriting it.

use phalanx_protocol::MemberId;

/// Which peers' traffic is held on arrival.
#[derive(Clone, Debug, Default)]
pub struct FaultGate {
    #[cfg(feature = "fault-injection")]
    cut: std::sync::Arc<std::sync::RwLock<std::collections::BTreeSet<MemberId>>>,
    /// Peers whose connections are to be dropped, not taken yet.
    #[cfg(feature = "fault-injection")]
    resets: std::sync::Arc<std::sync::Mutex<Vec<MemberId>>>,
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

    /// The peers whose connections a `reset` line asked to drop since the
    /// last call.
    #[cfg(feature = "fault-injection")]
    pub fn take_resets(&self) -> Vec<MemberId> {
        std::mem::take(&mut *self.resets.lock().expect("poisoned"))
    }

    /// No resets in this build.
    #[cfg(not(feature = "fault-injection"))]
    pub fn take_resets(&self) -> Vec<MemberId> {
        Vec::new()
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
        let (cut, resets) = (gate.cut.clone(), gate.resets.clone());
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            loop {
                // Off the runtime's threads: a file read blocks.
                let p = path.clone();
                let text = tokio::task::spawn_blocking(move || std::fs::read_to_string(p))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                let (ids, tagged) = parse(&text);
                for &(peer, ref tag) in tagged.difference(&seen) {
                    warn!(%peer, tag, "fault injection: dropping the connections to the peer");
                    resets.lock().expect("poisoned").push(peer);
                }
                seen = tagged;
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

/// The fault file's peers cut off, and its `reset ID TAG` lines.
#[cfg(feature = "fault-injection")]
type Faults = (
    std::collections::BTreeSet<MemberId>,
    std::collections::BTreeSet<(MemberId, String)>,
);

#[cfg(feature = "fault-injection")]
fn parse(text: &str) -> Faults {
    let (mut cut, mut resets) = (Faults::default().0, Faults::default().1);
    for line in text.lines() {
        let mut words = line.split_whitespace().peekable();
        if words.peek() == Some(&"reset") {
            words.next();
            if let Some(peer) = words.next().and_then(|w| w.parse().ok()) {
                resets.insert((MemberId(peer), words.collect::<Vec<_>>().join(" ")));
            }
        } else {
            cut.extend(words.filter_map(|w| w.parse().ok().map(MemberId)));
        }
    }
    (cut, resets)
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;

    #[test]
    fn the_fault_file_lists_cut_peers_and_tagged_resets() {
        let (cut, resets) = parse("2 3\nreset 4 first\n5\nreset x\n");
        assert_eq!(cut, [2, 3, 5].map(MemberId).into_iter().collect());
        assert_eq!(
            resets,
            [(MemberId(4), "first".to_string())].into_iter().collect()
        );
    }
}
