//! The keeper's decisions, as exact action lists.

use super::*;
use crate::checkpoint::{CatalogChange, REPLICA_PART};
use crate::wire::Held;
use crate::Step;

const RING: [MemberId; 3] = [MemberId(1), MemberId(2), MemberId(3)];

/// The op the trainers' state includes when they checkpoint.
const HELD: Option<Held> = Some(Held {
    seq: 7,
    epoch: Epoch(2),
});

fn id(step: u64) -> CheckpointId {
    CheckpointId {
        stream: 0,
        step: Step(step),
    }
}

/// A step whose checkpoint `me` is (or is not) a first holder of.
fn step_where(me: MemberId, holder: bool) -> u64 {
    (1..)
        .map(|k| 10 * k)
        .find(|s| holders(id(*s), &RING, 2).contains(&me) == holder)
        .unwrap()
}

fn parts() -> Vec<Part> {
    vec![Part::of(REPLICA_PART, None, b"0123456789", 4)]
}

fn drain(k: &mut Keeper) -> Vec<KeeperAction> {
    std::iter::from_fn(|| k.poll_action()).collect()
}

fn keeper(me: u32, held: &[u64]) -> Keeper {
    let mut k = Keeper::new(
        MemberId(me),
        KeeperConfig::default(),
        held.iter().map(|s| id(*s)),
    );
    k.group(Epoch(2), &RING, &Catalog::default());
    drain(&mut k);
    k
}

fn report(step: u64, holder: MemberId) -> Report {
    Report {
        id: id(step),
        epoch: Epoch(2),
        parts: parts(),
        held: HELD,
        holder,
        replicas: 2,
        keep: 3,
    }
}

/// The catalog after these holders reported `step`.
fn reported(catalog: &mut Catalog, step: u64, by: &[MemberId]) {
    for h in by {
        catalog.apply(&report(step, *h), |_| true, 3).unwrap();
    }
}

#[test]
fn a_holder_snapshots_persists_reports_and_hears_the_commit() {
    let me = MemberId(1);
    let step = step_where(me, true);
    let mut k = keeper(1, &[]);
    k.request(id(step), Epoch(2), HELD).unwrap();
    assert_eq!(drain(&mut k), vec![KeeperAction::Snapshot { id: id(step) }]);
    k.snapped(id(step));
    assert_eq!(drain(&mut k), vec![KeeperAction::Persist { id: id(step) }]);
    k.persisted(Time(5), id(step), Ok(parts()));
    assert_eq!(
        drain(&mut k),
        vec![
            KeeperAction::Propose(report(step, me)),
            KeeperAction::Release { id: id(step) }
        ]
    );
    assert!(k.held().contains(&id(step)));
    let mut c = Catalog::default();
    let other = *holders(id(step), &RING, 2)
        .iter()
        .find(|h| **h != me)
        .unwrap();
    reported(&mut c, step, &[me, other]);
    k.group(Epoch(2), &RING, &c);
    assert_eq!(
        drain(&mut k),
        vec![KeeperAction::Saved {
            id: id(step),
            outcome: SaveOutcome::Committed
        }]
    );
    assert_eq!(k.poll_timeout(), None);
}

#[test]
fn a_verdict_waits_while_the_save_is_under_way_and_is_given_for_a_step_never_saved() {
    let me = MemberId(1);
    let step = step_where(me, true);
    let mut k = keeper(1, &[]);
    k.request(id(step), Epoch(2), HELD).unwrap();
    assert_eq!(k.verdict(id(step)), None);
    k.snapped(id(step));
    k.persisted(Time(5), id(step), Ok(parts()));
    assert_eq!(k.verdict(id(step)), None, "reported, not committed");
    let mut c = Catalog::default();
    let other = *holders(id(step), &RING, 2)
        .iter()
        .find(|h| **h != me)
        .unwrap();
    reported(&mut c, step, &[me, other]);
    k.group(Epoch(2), &RING, &c);
    assert_eq!(k.verdict(id(step)), Some(SaveOutcome::Committed));
    assert_eq!(
        k.verdict(id(step + 5)),
        Some(SaveOutcome::Failed(format!(
            "no checkpoint of step {} was asked for on this daemon since it started",
            step + 5
        )))
    );
    // A daemon restarted after the commit: the group state says so.
    let mut fresh = keeper(2, &[]);
    fresh.group(Epoch(3), &RING, &c);
    assert_eq!(fresh.verdict(id(step)), Some(SaveOutcome::Committed));
}

#[test]
fn a_non_holder_keeps_its_snapshot_and_persists_it_when_a_holder_leaves_first() {
    let me = MemberId(2);
    let step = step_where(me, false);
    let mut k = keeper(2, &[]);
    k.request(id(step), Epoch(2), HELD).unwrap();
    k.snapped(id(step));
    assert_eq!(drain(&mut k), vec![KeeperAction::Snapshot { id: id(step) }]);
    // The holders are m1 and m3: one of them leaves before reporting.
    let gone = holders(id(step), &RING, 2)[0];
    let ring: Vec<MemberId> = RING.into_iter().filter(|m| *m != gone).collect();
    k.group(Epoch(3), &ring, &Catalog::default());
    assert_eq!(drain(&mut k), vec![KeeperAction::Persist { id: id(step) }]);
}

#[test]
fn a_committed_save_ends_a_non_holders_wait_and_frees_its_snapshot() {
    let me = MemberId(2);
    let step = step_where(me, false);
    let mut k = keeper(2, &[]);
    k.request(id(step), Epoch(2), HELD).unwrap();
    k.snapped(id(step));
    drain(&mut k);
    let mut c = Catalog::default();
    reported(&mut c, step, &holders(id(step), &RING, 2));
    k.group(Epoch(2), &RING, &c);
    assert_eq!(
        drain(&mut k),
        vec![
            KeeperAction::Release { id: id(step) },
            KeeperAction::Saved {
                id: id(step),
                outcome: SaveOutcome::Committed
            }
        ]
    );
}

#[test]
fn a_request_while_the_previous_save_is_written_waits_for_it() {
    let me = MemberId(1);
    let first = step_where(me, true);
    let mut k = keeper(1, &[]);
    k.request(id(first), Epoch(2), HELD).unwrap();
    k.snapped(id(first));
    drain(&mut k);
    let next = first + 1;
    k.request(id(next), Epoch(2), HELD).unwrap();
    assert_eq!(drain(&mut k), vec![], "one copy in memory per stream");
    let err = k.request(id(next + 1), Epoch(2), HELD).unwrap_err();
    assert!(err.contains("checkpoint less often"), "{err}");
    let err = k.request(id(first), Epoch(2), HELD).unwrap_err();
    assert!(err.contains("must be later"), "{err}");
    k.persisted(Time(5), id(first), Ok(parts()));
    assert_eq!(
        drain(&mut k),
        vec![
            KeeperAction::Propose(report(first, me)),
            KeeperAction::Release { id: id(first) },
            KeeperAction::Snapshot { id: id(next) }
        ]
    );
}

#[test]
fn a_report_the_group_does_not_show_is_proposed_again() {
    let me = MemberId(1);
    let step = step_where(me, true);
    let mut k = keeper(1, &[]);
    k.request(id(step), Epoch(2), HELD).unwrap();
    k.snapped(id(step));
    k.persisted(Time(1_000), id(step), Ok(parts()));
    drain(&mut k);
    assert_eq!(k.poll_timeout(), Some(Time(1_001_000)));
    k.tick(Time(1_000_999));
    assert_eq!(drain(&mut k), vec![]);
    k.tick(Time(1_001_000));
    assert_eq!(drain(&mut k), vec![KeeperAction::Propose(report(step, me))]);
    let mut c = Catalog::default();
    reported(&mut c, step, &[me]);
    k.group(Epoch(2), &RING, &c);
    assert_eq!(drain(&mut k), vec![]);
    assert_eq!(k.poll_timeout(), None, "seen in the group state");
}

#[test]
fn only_copies_older_than_the_latest_commit_and_not_kept_are_deleted() {
    // Held: 10 (dropped by retention), 30 (kept), 50 (newer than anything
    // this daemon has seen committed: maybe committed further on in the log).
    let mut k = keeper(1, &[]);
    let mut k2 = Keeper::new(
        MemberId(1),
        KeeperConfig {
            keep: 1,
            ..KeeperConfig::default()
        },
        [id(10), id(30), id(50)],
    );
    let mut c = Catalog::default();
    let mut r = report(30, MemberId(1));
    r.keep = 1;
    c.apply(&r, |_| true, 1).unwrap();
    k2.group(Epoch(2), &RING[..1], &c);
    assert_eq!(
        drain(&mut k2),
        vec![KeeperAction::Delete {
            id: id(10),
            why: "step 30 of the stream is committed and it is not kept".into()
        }]
    );
    assert_eq!(
        k2.held().iter().map(|i| i.step.0).collect::<Vec<_>>(),
        vec![30, 50]
    );
    k.group(Epoch(2), &RING, &Catalog::default());
    assert_eq!(
        drain(&mut k),
        vec![],
        "nothing committed: nothing is garbage"
    );
}

#[test]
fn a_holder_that_left_is_replaced_by_the_next_member_copying_from_another() {
    let step = 40;
    let mut c = Catalog::default();
    reported(&mut c, step, &[MemberId(1), MemberId(2)]);
    let ring = [MemberId(2), MemberId(3)];
    let mut k = keeper(3, &[]);
    k.group(Epoch(3), &ring, &c);
    let manifest = c.latest(0).unwrap().clone();
    assert_eq!(
        drain(&mut k),
        vec![KeeperAction::Copy {
            manifest,
            from: MemberId(2)
        }]
    );
    k.group(Epoch(3), &ring, &c);
    assert_eq!(drain(&mut k), vec![], "one copy at a time");
    k.persisted(Time(7), id(step), Ok(parts()));
    let copy = Report {
        epoch: Epoch(3),
        ..report(step, MemberId(3))
    };
    assert_eq!(drain(&mut k), vec![KeeperAction::Propose(copy)]);
    assert_eq!(
        c.apply(&report(step, MemberId(3)), |m| m != MemberId(1), 2),
        Ok(CatalogChange::HolderAdded {
            id: id(step),
            holder: MemberId(3)
        })
    );
    k.group(Epoch(3), &ring, &c);
    assert_eq!(
        drain(&mut k),
        vec![],
        "no verdict for a copy nobody asked for"
    );
    assert_eq!(k.poll_timeout(), None);
}

#[test]
fn a_restore_passes_a_bad_copy_over_for_another_holder_then_the_previous_checkpoint() {
    let mut c = Catalog::default();
    reported(&mut c, 10, &[MemberId(1), MemberId(3)]);
    reported(&mut c, 20, &[MemberId(1), MemberId(2)]);
    let m10 = c.get(id(10)).unwrap().clone();
    let m20 = c.get(id(20)).unwrap().clone();
    let mut k = keeper(1, &[10, 20]);
    k.group(Epoch(2), &RING, &c);
    drain(&mut k);
    k.restore(7, 0);
    assert_eq!(
        drain(&mut k),
        vec![KeeperAction::Load {
            restore: 7,
            manifest: m20.clone(),
            source: Source::Local
        }]
    );
    k.loaded(
        7,
        id(20),
        Source::Local,
        Err("chunk 2: checksum mismatch".into()),
    );
    assert_eq!(
        drain(&mut k),
        vec![
            KeeperAction::Delete {
                id: id(20),
                why: "it failed its checks: chunk 2: checksum mismatch".into()
            },
            KeeperAction::Load {
                restore: 7,
                manifest: m20,
                source: Source::Holder(MemberId(2))
            }
        ]
    );
    k.loaded(
        7,
        id(20),
        Source::Holder(MemberId(2)),
        Err("unreachable".into()),
    );
    assert_eq!(
        drain(&mut k),
        vec![KeeperAction::Load {
            restore: 7,
            manifest: m10,
            source: Source::Local
        }]
    );
    k.loaded(7, id(10), Source::Local, Ok(()));
    assert_eq!(
        drain(&mut k),
        vec![KeeperAction::Restored {
            restore: 7,
            result: Ok(id(10))
        }]
    );
}

#[test]
fn a_restore_without_a_readable_checkpoint_says_why() {
    let mut k = keeper(1, &[]);
    k.restore(1, 0);
    assert_eq!(
        drain(&mut k),
        vec![KeeperAction::Restored {
            restore: 1,
            result: Err("stream 0 has no committed checkpoint".into())
        }]
    );
    let mut c = Catalog::default();
    reported(&mut c, 10, &[MemberId(2), MemberId(3)]);
    k.group(Epoch(2), &RING, &c);
    drain(&mut k);
    k.restore(2, 0);
    drain(&mut k);
    k.loaded(
        2,
        id(10),
        Source::Holder(MemberId(2)),
        Err("chunk 0 missing".into()),
    );
    drain(&mut k);
    k.loaded(
        2,
        id(10),
        Source::Holder(MemberId(3)),
        Err("unreachable".into()),
    );
    assert_eq!(
        drain(&mut k),
        vec![KeeperAction::Restored {
            restore: 2,
            result: Err("no committed checkpoint of stream 0 could be read: \
                         m2's copy of step 10: chunk 0 missing; m3's copy of step 10: unreachable"
                .into())
        }]
    );
}
