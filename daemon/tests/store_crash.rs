//! The checkpoint store under SIGKILL: a child process writes and deletes
//! copies in a loop, saying which writes and deletes began and returned; it is killed
//! at a random moment, 20 times over the same directory. After each kill
//! the store, reopened, lists every copy whose write returned and no copy
//! whose delete returned, and every copy it lists reads back exactly (the
//! checksums of the bytes written, the bytes themselves) — a write cut
//! short is never listed.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use phalanx_daemon::store::Store;
use phalanx_protocol::checkpoint::{CheckpointId, Manifest, Part, REPLICA_PART};
use phalanx_protocol::rng::SplitMix64;
use phalanx_protocol::{Epoch, Step};

const CHILD: &str = "PHALANX_STORE_CHILD";
const TEST: &str = "copies_survive_sigkill_at_any_moment_and_torn_ones_are_never_listed";
const CHUNK: u32 = 256 << 10;

fn id(step: u64) -> CheckpointId {
    CheckpointId {
        stream: 0,
        step: Step(step),
    }
}

/// The bytes of the copy of `step`: its length and content follow from it.
fn bytes(step: u64) -> Vec<u8> {
    let mut rng = SplitMix64::new(step ^ 0x5703_E000);
    let len = rng.range_inclusive(1, 3 << 20) as usize;
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// The child: from step `first` on, writes copies and deletes all but the
/// last two, printing each write and delete once it returned.
fn child(dir: &Path, first: u64) {
    let store = Store::open(dir).expect("store opens");
    let mut out = std::io::stdout().lock();
    writeln!(out, "@open").unwrap();
    out.flush().unwrap();
    for step in first.. {
        store.put(id(step), &bytes(step), CHUNK).expect("put");
        writeln!(out, "@put {step}").unwrap();
        out.flush().unwrap();
        for old in store.list().unwrap() {
            if old.step.0 + 2 <= step {
                writeln!(out, "@deleting {}", old.step.0).unwrap();
                out.flush().unwrap();
                store.delete(old).expect("delete");
                writeln!(out, "@deleted {}", old.step.0).unwrap();
                out.flush().unwrap();
            }
        }
    }
}

#[test]
fn copies_survive_sigkill_at_any_moment_and_torn_ones_are_never_listed() {
    if let Some(dir) = std::env::var_os(CHILD) {
        let first = std::env::var("PHALANX_STORE_FIRST")
            .unwrap()
            .parse()
            .unwrap();
        child(Path::new(&dir), first);
        return;
    }
    let dir = tempdir();
    let seed = std::env::var("PHALANX_STORE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut rng = SplitMix64::new(seed);
    let mut durable = BTreeSet::new();
    let mut started = BTreeSet::new();
    for round in 0..20u64 {
        let first = round * 1_000;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, &dir)
            .env("PHALANX_STORE_FIRST", first.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            // The child's words follow an `@` (the test harness prints
            // its own, and `test NAME ... ` before the first of them).
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Some(at) = line.find('@') else {
                    continue;
                };
                if tx.send(line[at + 1..].to_string()).is_err() {
                    break;
                }
            }
        });
        // The kill lands anywhere: during the open (now and then), or up
        // to 400 ms into the writes.
        if rng.chance(0.85) {
            let line = rx
                .recv_timeout(Duration::from_secs(120))
                .expect("the child opened the store");
            assert_eq!(line, "open");
        }
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        let mut deleted = BTreeSet::new();
        for line in rx.try_iter() {
            if let Some(s) = line.strip_prefix("put ") {
                durable.insert(s.parse::<u64>().unwrap());
            } else if let Some(s) = line.strip_prefix("deleting ") {
                // Listed or not, until the delete returns.
                durable.remove(&s.parse::<u64>().unwrap());
            } else if let Some(s) = line.strip_prefix("deleted ") {
                deleted.insert(s.parse::<u64>().unwrap());
            }
        }
        // Anything from `first` up to the step after the last one that
        // returned may have been started.
        let last = durable.iter().copied().filter(|s| *s >= first).max();
        started.extend(first..=last.map_or(first, |l| l + 1));

        let store = Store::open(&dir).expect("the store reopens after a SIGKILL");
        let listed: BTreeSet<u64> = store.list().unwrap().iter().map(|i| i.step.0).collect();
        for s in &durable {
            assert!(
                listed.contains(s),
                "round {round}: step {s}'s write returned, but it is not listed ({listed:?})"
            );
        }
        for s in &deleted {
            assert!(
                !listed.contains(s),
                "round {round}: step {s}'s delete returned, but it is listed"
            );
        }
        for s in &listed {
            assert!(
                started.contains(s),
                "round {round}: step {s} is listed but was never written"
            );
            let want = bytes(*s);
            let parts = store.parts(id(*s)).unwrap().unwrap();
            assert_eq!(
                parts,
                vec![Part::of(REPLICA_PART, None, &want, CHUNK)],
                "round {round}: step {s}'s checksums"
            );
            let manifest = Manifest {
                id: id(*s),
                epoch: Epoch(1),
                parts,
                holders: vec![],
                held: None,
            };
            let mut got = vec![0; want.len()];
            store
                .read_into(&manifest, &mut got)
                .unwrap_or_else(|e| panic!("round {round}: step {s}: {e}"));
            assert!(
                got == want,
                "round {round}: step {s} reads back other bytes"
            );
        }
        // What the child's successor starts from: the listed copies.
        durable = listed;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("phalanx-store-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}
