//! The real runner, in-process: three runners (each the daemon's runner
//! around its `Node`) over the in-memory transport on tokio's paused
//! clock, with the test playing the control plane — it commits a removal
//! when a runner asks for one. Member 3 dies mid-training; the survivors'
//! heartbeats detect it, the test commits the new epoch, and the op it
//! interrupted finishes without it, every result exactly the sum over the
//! members it names.

use std::collections::BTreeMap;
use std::time::Duration;

use phalanx_compute::{ComputeEngine, EngineArithmetic, ScalarEngine};
use phalanx_daemon::bus::{ControlInput, Reply, TrainerCall};
use phalanx_daemon::runner::{Runner, RunnerInputs, RunnerOutputs};
use phalanx_daemon::transport::mem::MemNet;
use phalanx_protocol::local::LocalKind;
use phalanx_protocol::membership::{Command, GroupState};
use phalanx_protocol::node::{ControlRequest, GroupChange, Node, NodeConfig, Request, RequestId};
use phalanx_protocol::wire::{DType, ReduceOp};
use phalanx_protocol::{Incarnation, MemberId, OpId, Time};
use tokio::sync::{mpsc, oneshot, watch};

const DIM: usize = 64;
const STEPS: u64 = 12;

fn gradient(member: u32, step: u64) -> Vec<f32> {
    (0..DIM)
        .map(|j| ((member as u64 * 31 + step * 7 + j as u64) % 17) as f32 - 8.0)
        .collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

struct Member {
    trainer: mpsc::Sender<TrainerCall<Vec<u8>>>,
    group: mpsc::UnboundedSender<GroupChange>,
    runner: tokio::task::JoinHandle<()>,
}

/// One trainer: all-reduces its gradient per step and checks each result
/// against the sum over the contributors it names; returns them per step.
async fn train(
    me: u32,
    calls: mpsc::Sender<TrainerCall<Vec<u8>>>,
    steps: u64,
) -> Vec<Vec<MemberId>> {
    let mut seen = Vec::new();
    for step in 0..steps {
        let (reply, rx) = oneshot::channel();
        let req = Request {
            id: RequestId(0),
            op: OpId::new(0, step + 1),
            kind: LocalKind::AllReduce(ReduceOp::Sum),
            dtype: DType::F32,
            len: DIM,
            samples: None,
            buffer: bytes(&gradient(me, step)),
        };
        let call = TrainerCall::Submit(req, reply);
        calls.send(call).await.expect("runner up");
        let Reply { outcome, buffer } = rx.await.expect("answered");
        let done = outcome.unwrap_or_else(|e| panic!("m{me} step {step}: {e}"));
        let mut want = vec![0.0f32; DIM];
        for c in &done.contributors {
            for (w, g) in want.iter_mut().zip(gradient(c.0, step)) {
                *w += g;
            }
        }
        assert_eq!(
            floats(&buffer),
            want,
            "m{me} step {step}: {:?}",
            done.contributors
        );
        seen.push(done.contributors);
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn runners_over_the_in_memory_transport_finish_without_a_member_that_dies() {
    let ids = [MemberId(1), MemberId(2), MemberId(3)];
    let mut group = GroupState::bootstrap(
        ids.iter()
            .map(|&m| (m, format!("node{}", m.0), String::new())),
    );
    for r in group.members.values_mut() {
        r.incarnation = Incarnation(1);
    }
    let net = MemNet::new();
    net.heartbeats(Duration::from_millis(100));
    let (control_tx, mut control_rx) = mpsc::unbounded_channel();
    let (_stop_tx, stop_rx) = watch::channel(false);
    let mut members = BTreeMap::new();
    for &id in &ids {
        let (net_tx, net_rx) = mpsc::channel(1024);
        let (heard_tx, heard_rx) = mpsc::unbounded_channel();
        let links = net.attach(id, net_tx, heard_tx);
        let (trainer_tx, trainer_rx) = mpsc::channel(8);
        let (group_tx, group_rx) = mpsc::unbounded_channel();
        let engine: Box<dyn ComputeEngine> = Box::new(ScalarEngine);
        let node = Node::new(
            id,
            Incarnation(1),
            NodeConfig::default(),
            Box::new(EngineArithmetic(engine)),
            Time::ZERO,
        );
        let runner = Runner::new(
            node,
            tokio::time::Instant::now(),
            RunnerOutputs {
                links: std::sync::Arc::new(links),
                control: control_tx.clone(),
                stragglers: watch::channel(Vec::new()).0,
            },
        );
        let inputs = RunnerInputs {
            net: net_rx,
            heard: heard_rx,
            trainers: trainer_rx,
            group: group_rx,
        };
        group_tx
            .send(GroupChange::of(&group, id, Incarnation(1)))
            .unwrap();
        members.insert(
            id,
            Member {
                trainer: trainer_tx,
                group: group_tx,
                runner: tokio::spawn(runner.run(inputs, stop_rx.clone())),
            },
        );
    }
    // The control plane: commit the first removal asked for.
    let publish: Vec<(MemberId, mpsc::UnboundedSender<GroupChange>)> = members
        .iter()
        .map(|(&id, m)| (id, m.group.clone()))
        .collect();
    let control = tokio::spawn(async move {
        while let Some(input) = control_rx.recv().await {
            let ControlInput::Node(ControlRequest::Suspect { member, reason }) = input else {
                continue;
            };
            if !group.is_active(member) {
                continue;
            }
            let by = *group.ring().iter().find(|&&m| m != member).unwrap();
            let epoch = group.epoch;
            group.apply(&Command::Remove {
                member,
                by,
                epoch,
                reason,
            });
            for (id, tx) in &publish {
                let _ = tx.send(GroupChange::of(&group, *id, Incarnation(1)));
            }
            return (member, group.epoch);
        }
        panic!("no removal was asked for");
    });
    let m1 = tokio::spawn(train(1, members[&ids[0]].trainer.clone(), STEPS));
    let m2 = tokio::spawn(train(2, members[&ids[1]].trainer.clone(), STEPS));
    // Member 3 trains half the steps, then its daemon dies.
    let m3 = train(3, members[&ids[2]].trainer.clone(), STEPS / 2).await;
    members[&ids[2]].runner.abort();
    net.detach(ids[2]);
    let (removed, epoch) = control.await.unwrap();
    assert_eq!((removed, epoch.0), (ids[2], 2));
    let (m1, m2) = (m1.await.unwrap(), m2.await.unwrap());
    assert_eq!(m1, m2, "one history");
    assert_eq!(
        &m1[..STEPS as usize / 2],
        &m3[..],
        "m3's steps had everyone"
    );
    assert!(m1[..STEPS as usize / 2].iter().all(|c| c == &ids.to_vec()));
    assert!(
        m1[STEPS as usize / 2..]
            .iter()
            .all(|c| c == &ids[..2].to_vec()),
        "the rest finished without m3: {m1:?}"
    );
}
