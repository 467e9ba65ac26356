//! Shared helpers of the process tests.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use phalanx_daemon::cluster::{ClusterOptions, LocalCluster};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh cluster of `members` real `phalanxd` processes.
pub fn cluster(members: usize, data_plane: &str) -> LocalCluster {
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "phalanx-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    LocalCluster::start(ClusterOptions {
        members,
        phalanxd: PathBuf::from(env!("CARGO_BIN_EXE_phalanxd")),
        dir,
        // Generous suspicion bound on the shared, noisy test machine, unless
        // the test is about suspicion itself.
        data_plane: if data_plane.contains("suspect_after_ms") {
            data_plane.to_string()
        } else {
            format!("{data_plane}\nsuspect_after_ms = 3000")
        },
        control: String::new(),
        keep: std::env::var_os("PHALANX_KEEP_TEST_DIRS").is_some(),
    })
    .expect("starting the local cluster")
}

/// Waits until member index `i` reports an op in flight (an event, polled
/// with a generous bound for the shared test machine).
#[allow(dead_code)] // not every test file that includes this module needs it
pub fn wait_for_op_in_flight(cluster: &LocalCluster, i: usize) {
    let start = std::time::Instant::now();
    while !cluster
        .metrics(i)
        .unwrap()
        .contains("phalanx_ops_in_flight 1")
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "no op in flight at member {} after 30 s",
            i + 1
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
