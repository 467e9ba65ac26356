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
//! replacement's, see `transport::newest`). A line `delay ID MS` holds
//! what member ID sends for MS milliseconds from its arrival, in order, as a
//! link's latency does (what follows is not held longer for it while at
//! most 16 items are on their way, beyond which the reader waits, as flow
//! control makes it; a lower delay takes effect without reordering: nothing
//! overtakes what came before it), for as long as the line is there. A
//! line `busy MS TAG` keeps this daemon's runner busy for MS milliseconds,
//! once per new TAG, as a large op's copies and checksums do on a loaded
//! machine (the runner's work is synchronous). The file is read every
//! 50 ms, so a test cuts, heals, delays and resets by rewriting it.

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
    /// How long the runner is to be kept busy (ms; 0: not), not taken yet.
    #[cfg(feature = "fault-injection")]
    busy: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Whether a fault file is read: without one, nothing is delayed, and
    /// readers deliver themselves.
    #[cfg(feature = "fault-injection")]
    enabled: bool,
    /// Per peer, how long what it sends is held from its arrival.
    #[cfg(feature = "fault-injection")]
    delays: std::sync::Arc<
        std::sync::RwLock<std::collections::BTreeMap<MemberId, std::time::Duration>>,
    >,
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

    /// How long to keep the runner busy, if a `busy` line asks for it
    /// (taken: once per line).
    #[cfg(feature = "fault-injection")]
    pub fn take_busy(&self) -> Option<std::time::Duration> {
        use std::sync::atomic::Ordering::Relaxed;
        // Read first: the runner asks after every input, and a write each
        // time would bounce the cache line for nothing.
        if self.busy.load(Relaxed) == 0 {
            return None;
        }
        match self.busy.swap(0, Relaxed) {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }

    /// Never busy in this build.
    #[cfg(not(feature = "fault-injection"))]
    pub fn take_busy(&self) -> Option<std::time::Duration> {
        None
    }

    /// How long what `peer` sends is held from its arrival (a `delay`
    /// line; zero without one).
    #[cfg(feature = "fault-injection")]
    pub fn delay(&self, peer: MemberId) -> std::time::Duration {
        let delays = self.delays.read().expect("poisoned");
        delays.get(&peer).copied().unwrap_or_default()
    }

    /// Returns once traffic from `peer` may pass (at once unless it is cut
    /// off; in a build without the feature, always at once).
    pub async fn pass(&self, peer: MemberId) {
        while self.is_cut(peer) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// The way on for what one reader takes off a connection from `peer`:
    /// [`Inbound::send`] hands each item to `deliver` (which says whether
    /// to go on) once the gate lets it pass. When a fault file is read, a
    /// task of its own delivers, so that the reader goes on reading (up to
    /// 16 items ahead) while an item waits out its delay, as a link's
    /// latency does not slow its throughput; otherwise the reader delivers
    /// itself.
    pub fn inbound<T, D, F>(&self, peer: MemberId, deliver: D) -> Inbound<T, D>
    where
        T: Send + 'static,
        D: FnMut(T) -> F + Send + 'static,
        F: std::future::Future<Output = bool> + Send,
    {
        #[cfg(feature = "fault-injection")]
        if self.enabled {
            // Bounded, so the reader still feels the node's backpressure
            // (a 128 MiB hand-over read ahead unbounded starves the daemon).
            let (line, mut due) = tokio::sync::mpsc::channel::<(tokio::time::Instant, T)>(16);
            let mut deliver = deliver;
            tokio::spawn(async move {
                // In arrival order: a later item never passes an earlier
                // one, whatever the delays were when each arrived.
                while let Some((at, item)) = due.recv().await {
                    tokio::time::sleep_until(at).await;
                    if !deliver(item).await {
                        return;
                    }
                }
            });
            return Inbound {
                gate: self.clone(),
                peer,
                deliver: None,
                line: Some(line),
                _item: std::marker::PhantomData,
            };
        }
        Inbound {
            gate: self.clone(),
            peer,
            deliver: Some(deliver),
            #[cfg(feature = "fault-injection")]
            line: None,
            _item: std::marker::PhantomData,
        }
    }

    /// Starts reading the file `PHALANX_FAULT_FILE` names, if it is set.
    #[cfg(feature = "fault-injection")]
    pub fn from_env() -> FaultGate {
        use tracing::warn;
        let Some(path) = std::env::var_os("PHALANX_FAULT_FILE") else {
            return FaultGate::default();
        };
        let gate = FaultGate {
            enabled: true,
            ..FaultGate::default()
        };
        warn!(path = %std::path::Path::new(&path).display(), "fault injection enabled (PHALANX_FAULT_FILE)");
        let (cut, resets, stalls, delays, busy) = (
            gate.cut.clone(),
            gate.resets.clone(),
            gate.stalls.clone(),
            gate.delays.clone(),
            gate.busy.clone(),
        );
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            let mut seen_stalls = std::collections::BTreeSet::new();
            let mut seen_busy = std::collections::BTreeSet::new();
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
                    delays: slow,
                    busy: busy_lines,
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
                for &(ms, ref tag) in busy_lines.difference(&seen_busy) {
                    warn!(ms, tag, "fault injection: the runner will be kept busy");
                    busy.store(ms, std::sync::atomic::Ordering::Relaxed);
                }
                seen_busy = busy_lines;
                {
                    let mut delays = delays.write().expect("poisoned");
                    if *delays != slow {
                        let ms: std::collections::BTreeMap<_, _> = slow
                            .iter()
                            .map(|(p, d)| (*p, d.as_millis() as u64))
                            .collect();
                        warn!(delays_ms = ?ms, "fault injection: delays of traffic from peers set");
                        *delays = slow;
                    }
                }
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

/// Hands what a reader takes off a connection on, through the gate (see
/// [`FaultGate::inbound`]).
pub struct Inbound<T, D> {
    gate: FaultGate,
    peer: MemberId,
    /// The delivery, when the reader calls it itself.
    deliver: Option<D>,
    /// Else, to the delivering task, with the instant each item is due.
    #[cfg(feature = "fault-injection")]
    line: Option<tokio::sync::mpsc::Sender<(tokio::time::Instant, T)>>,
    _item: std::marker::PhantomData<fn(T)>,
}

impl<T, D, F> Inbound<T, D>
where
    T: Send + 'static,
    D: FnMut(T) -> F + Send + 'static,
    F: std::future::Future<Output = bool> + Send,
{
    /// Hands `item` on once the gate lets it pass; false once whatever it
    /// goes to is gone (the reader stops).
    pub async fn send(&mut self, item: T) -> bool {
        self.gate.pass(self.peer).await;
        #[cfg(feature = "fault-injection")]
        if let Some(line) = &self.line {
            let at = tokio::time::Instant::now() + self.gate.delay(self.peer);
            return line.send((at, item)).await.is_ok();
        }
        match &mut self.deliver {
            Some(deliver) => deliver(item).await,
            None => false,
        }
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
    /// Its `delay ID MS` lines (the last for a peer holds).
    delays: std::collections::BTreeMap<MemberId, std::time::Duration>,
    /// Its `busy MS TAG` lines.
    busy: std::collections::BTreeSet<(u64, String)>,
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
            Some(&"busy") => {
                words.next();
                if let Some(ms) = words.next().and_then(|w| w.parse().ok()) {
                    let tag = words.collect::<Vec<_>>().join(" ");
                    faults.busy.insert((ms, tag));
                }
            }
            Some(&"delay") => {
                words.next();
                let peer = words.next().and_then(|w| w.parse().ok());
                let ms = words.next().and_then(|w| w.parse().ok());
                if let (Some(peer), Some(ms)) = (peer, ms) {
                    let hold = std::time::Duration::from_millis(ms);
                    faults.delays.insert(MemberId(peer), hold);
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
    fn the_fault_file_lists_cut_peers_tagged_resets_stalls_delays_and_busy_runners() {
        let faults = parse(
            "2 3\nreset 4 first\n5\nreset x\nstall 1 3000 a\nstall 1 x b\n\
             delay 2 150\ndelay 3 x\ndelay 4 10\ndelay 4 20\nbusy 800 t1\nbusy x t2\n",
        );
        assert_eq!(faults.busy, [(800, "t1".to_string())].into_iter().collect());
        assert_eq!(faults.cut, [2, 3, 5].map(MemberId).into_iter().collect());
        assert_eq!(
            faults.resets,
            [(MemberId(4), "first".to_string())].into_iter().collect()
        );
        assert_eq!(
            faults.stalls,
            [(MemberId(1), 3000, "a".to_string())].into_iter().collect()
        );
        let ms = std::time::Duration::from_millis;
        assert_eq!(
            faults.delays,
            [(MemberId(2), ms(150)), (MemberId(4), ms(20))]
                .into_iter()
                .collect()
        );
    }

    /// Items from a delayed peer arrive after the delay, in order, and a
    /// delay lowered meanwhile lets nothing overtake what came before it.
    #[cfg(feature = "test-support")]
    #[tokio::test(start_paused = true)]
    async fn a_delayed_peers_traffic_comes_late_in_order() {
        let gate = FaultGate {
            enabled: true,
            ..FaultGate::default()
        };
        let peer = MemberId(2);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut inbound = gate.inbound(peer, move |item: u32| {
            let tx = tx.clone();
            async move { tx.send((item, tokio::time::Instant::now())).is_ok() }
        });
        let start = tokio::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        gate.delays.write().unwrap().insert(peer, ms(150));
        assert!(inbound.send(1).await);
        tokio::time::sleep(ms(10)).await;
        assert!(inbound.send(2).await);
        gate.delays.write().unwrap().insert(peer, ms(0));
        assert!(inbound.send(3).await);
        let mut got = Vec::new();
        for _ in 0..3 {
            let (item, at) = rx.recv().await.unwrap();
            got.push((item, (at - start).as_millis()));
        }
        assert_eq!(got, [(1, 150), (2, 160), (3, 160)]);
    }
}
