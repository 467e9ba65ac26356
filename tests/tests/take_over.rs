//! Issue 13, item 4: under a quorum policy a failover that killed the Raft
//! leader took 0.66–1.6 s (the bench's `epoch commit` 310–1215 ms): the
//! removal could not commit before an election, which raft-rs starts only
//! after its randomised election timeout (0.5–1 s, more after a split
//! vote). When a member's data plane finds the leader silent, the lowest
//! unsuspected voter campaigns at once. Three control planes on a virtual
//! clock, messages delivered at once: after the leader goes silent and a
//! survivor suspects it, a new leader must be elected without the clock
//! moving.

use std::collections::BTreeMap;
use std::time::Duration;

use phalanx_protocol::membership::control::{
    destination, initial_roles, ControlConfig, ControlNode, MemoryDisk,
};
use phalanx_protocol::membership::{ControlPlane, GroupState};
use phalanx_protocol::node::ControlRequest;
use phalanx_protocol::{Incarnation, MemberId, Time};

struct Member {
    plane: ControlPlane,
    disk: MemoryDisk,
}

fn planes() -> BTreeMap<MemberId, Member> {
    let ids: Vec<MemberId> = (1..=3).map(MemberId).collect();
    let bootstrap = GroupState::bootstrap(
        ids.iter()
            .map(|&m| (m, format!("node{}", m.0), format!("127.0.0.{}:1", 10 + m.0))),
    );
    let roles = initial_roles(&ids, 3);
    ids.iter()
        .enumerate()
        .map(|(k, &id)| {
            let config = ControlConfig {
                election_seed: Some(k as u64 + 7),
                ..ControlConfig::default()
            };
            let node = ControlNode::new(
                id,
                config,
                Some((bootstrap.clone(), &roles)),
                None,
                Time::ZERO,
            )
            .expect("starts");
            let plane = ControlPlane::new(
                node,
                Incarnation(1),
                String::new(),
                Duration::from_millis(300),
                3,
            );
            (
                id,
                Member {
                    plane,
                    disk: MemoryDisk::default(),
                },
            )
        })
        .collect()
}

/// Steps every live plane and delivers their messages among the live ones
/// until quiet; ticks when `tick`.
fn settle(members: &mut BTreeMap<MemberId, Member>, live: &[MemberId], now: Time, tick: bool) {
    for _ in 0..50 {
        let mut sent = Vec::new();
        for id in live {
            let m = members.get_mut(id).unwrap();
            if tick && m.plane.node().poll_timeout() <= now {
                m.plane.node_mut().handle_timeout(now);
            }
            let out = m.plane.step(now, &mut m.disk).expect("steps");
            sent.extend(out.messages);
        }
        if sent.is_empty() {
            return;
        }
        for msg in sent {
            let to = destination(&msg).expect("a member");
            if live.contains(&to) {
                let _ = members.get_mut(&to).unwrap().plane.node_mut().step(msg);
            }
        }
    }
}

fn leader(members: &BTreeMap<MemberId, Member>, among: &[MemberId]) -> Option<MemberId> {
    among
        .iter()
        .copied()
        .find(|id| members[id].plane.node().is_leader())
}

#[test]
fn a_survivor_that_finds_the_leader_silent_campaigns_at_once() {
    let mut members = planes();
    let all: Vec<MemberId> = members.keys().copied().collect();
    let mut now = Time::ZERO;
    while leader(&members, &all).is_none() {
        now = now.after(Duration::from_millis(10));
        assert!(
            now < Time::ZERO.after(Duration::from_secs(10)),
            "no first leader"
        );
        settle(&mut members, &all, now, true);
    }
    let old = leader(&members, &all).unwrap();
    let survivors: Vec<MemberId> = all.iter().copied().filter(|&m| m != old).collect();
    // Every survivor's data plane suspects the silent leader; the clock
    // does not move (no election timeout can fire).
    for id in &survivors {
        let reason = "no heartbeat for 400 ms".to_string();
        members
            .get_mut(id)
            .unwrap()
            .plane
            .handle(ControlRequest::Suspect {
                member: old,
                reason,
            });
    }
    settle(&mut members, &survivors, now, false);
    let new = leader(&members, &survivors);
    assert_eq!(
        new,
        survivors.iter().copied().min(),
        "the lowest surviving voter leads before any election timeout"
    );
}
