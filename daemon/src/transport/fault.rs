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
//! for it; the dialler redials). A line `stall ID MS TAG` holds the next
//! primary connection accepted from member ID for MS milliseconds between
//! its welcome and its start, once per new TAG, as a starved runtime does
//! (the race of an abandoned connection's late start with its
//! replacement's, see `transport::newest`). The file is read every 50 ms,
//! so a test cuts, heals and resets by rewriting it.

use phalanx_protocol::MemberId;

/// Which peers' traffic is held on arrival.
#[derive(Clone, Debug, Default)]
pub struct FaultGate {
    #[cfg(feature = "fault-injection")]
    cut: std::sync::Arc<std::sync::RwLock<std::collections::BTreeSet<MemberId>>>,
    /// Peers whose connections are to be dropped, not taken yet.
    #[cfg(feature = "fault-injection")]
    resets: std::sync::Arc<std::sync::Mutex<Vec<MemberId>>>,
    /// Per peer, the hold for its next accepted connection, not taken yet.
    #[cfg(feature = "fault-injection")]
    stalls:
        std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<MemberId, std::time::Duration>>>,
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

    /// How long to hold the next connection accepted from `peer`, if a
    /// `stall` line asks for it (taken: once per line).
    #[cfg(feature = "fault-injection")]
    pub fn take_stall(&self, peer: MemberId) -> Option<std::time::Duration> {
        self.stalls.lock().expect("poisoned").remove(&peer)
    }

    /// No stalls in this build.
    #[cfg(not(feature = "fault-injection"))]
    pub fn take_stall(&self, _peer: MemberId) -> Option<std::time::Duration> {
        None
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
        let (cut, resets, stalls) = (gate.cut.clone(), gate.resets.clone(), gate.stalls.clone());
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            let mut seen_stalls = std::collections::BTreeSet::new();
            loop {
                // Off the runtime's threads: a file read blocks.
                let p = path.clone();
                let text = tokio::task::spawn_blocking(move || std::fs::read_to_string(p))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                let Faults {
                    cut: ids,
                    resets: tagged,
                    stalls: held,
                } = parse(&text);
                for &(peer, ref tag) in tagged.difference(&seen) {
                    warn!(%peer, tag, "fault injection: dropping the connections to the peer");
                    resets.lock().expect("poisoned").push(peer);
                }
                seen = tagged;
                for &(peer, ms, ref tag) in held.difference(&seen_stalls) {
                    warn!(%peer, ms, tag, "fault injection: the next connection from the peer will be held");
                    let hold = std::time::Duration::from_millis(ms);
                    stalls.lock().expect("poisoned").insert(peer, hold);
                }
                seen_stalls = held;
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

/// What the fault file says.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Default, PartialEq, Eq)]
struct Faults {
    /// The peers cut off.
    cut: std::collections::BTreeSet<MemberId>,
    /// Its `reset ID TAG` lines.
    resets: std::collections::BTreeSet<(MemberId, String)>,
    /// Its `stall ID MS TAG` lines.
    stalls: std::collections::BTreeSet<(MemberId, u64, String)>,
}

#[cfg(feature = "fault-injection")]
fn parse(text: &str) -> Faults {
    let mut faults = Faults::default();
    for line in text.lines() {
        let mut words = line.split_whitespace().peekable();
        match words.peek() {
            Some(&"reset") => {
                words.next();
                if let Some(peer) = words.next().and_then(|w| w.parse().ok()) {
                    let tag = words.collect::<Vec<_>>().join(" ");
                    faults.resets.insert((MemberId(peer), tag));
                }
            }
            Some(&"stall") => {
                words.next();
                let peer = words.next().and_then(|w| w.parse().ok());
                let ms = words.next().and_then(|w| w.parse().ok());
                if let (Some(peer), Some(ms)) = (peer, ms) {
                    let tag = words.collect::<Vec<_>>().join(" ");
                    faults.stalls.insert((MemberId(peer), ms, tag));
                }
            }
            _ => faults
                .cut
                .extend(words.filter_map(|w| w.parse().ok().map(MemberId))),
        }
    }
    faults
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;

    #[test]
    fn the_fault_file_lists_cut_peers_tagged_resets_and_stalls() {
        let faults = parse("2 3\nreset 4 first\n5\nreset x\nstall 1 3000 a\nstall 1 x b\n");
        assert_eq!(faults.cut, [2, 3, 5].map(MemberId).into_iter().collect());
        assert_eq!(
            faults.resets,
            [(MemberId(4), "first".to_string())].into_iter().collect()
        );
        assert_eq!(
            faults.stalls,
            [(MemberId(1), 3000, "a".to_string())].into_iter().collect()
        );
    }
}
