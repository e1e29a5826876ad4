//! A node's lease and its end: a lost lease gives the slot up and asks for a new one; a stop
//! and the job's end run the task's exit, revoke the lease and end the node.

use super::*;
use crate::etcd::lease::{LeaseId, LeaseState};
use crate::node::engine::{ClaimOutcome, Command, Input};
use crate::role::{ExitReason, NodeExit, Role};
use crate::roles::MySlot;

#[test]
fn an_expired_lease_gives_the_slot_up_and_asks_for_a_new_lease_then_claims_again() {
    let (mut h, _) = H::primary_of("n1", 0, 1, 0);
    let out = h.input(Input::Lease(LeaseState::Expired { id: LEASE }));
    assert_eq!(
        acts(&out),
        vec![Command::DropSlot(ExitReason::SlotLost), Command::NewLease]
    );
    assert_eq!(published(&out).unwrap().role, Role::Spare);
    // etcd ended the lease: its key is gone.
    let key = h.keys.primary(0);
    h.delete(key);
    let lease = LeaseState::Alive {
        id: LeaseId(8),
        deadline: h.now + TTL,
    };
    let out = h.input(Input::LeaseGranted {
        lease,
        registered_at: 50,
    });
    assert_eq!(
        last_claim(&out),
        Some(crate::node::engine::Claim::Primary {
            task: 0,
            lease: LeaseId(8)
        })
    );
}

#[test]
fn a_stop_runs_the_tasks_exit_revokes_the_lease_and_ends_the_node_once() {
    let (mut h, _) = H::primary_of("n1", 0, 1, 0);
    let out = h.input(Input::Stop);
    assert_eq!(
        acts(&out),
        vec![
            Command::DropSlot(ExitReason::Stopped),
            Command::RevokeLease(LEASE),
            Command::Exit(NodeExit::Stopped),
        ]
    );
    assert!(out.contains(&Command::Monitor(vec![])));
    assert_eq!(h.e.mine(), MySlot::Spare);
    // Nothing after the end.
    let e = h.epoch_kv("1");
    assert!(h.put(e).is_empty());
    assert!(h.input(Input::Stop).is_empty());
}

#[test]
fn the_jobs_end_runs_exit_with_the_final_epoch_on_every_node() {
    for role in ["primary", "spare"] {
        let mut h = if role == "primary" {
            H::primary_of("n1", 0, 1, 0).0
        } else {
            let mut h = H::new("n5", 1, 1);
            let p = h.primary_kv(0, "n1", 100);
            h.snapshot(0, vec![p]);
            h
        };
        let done = h.epoch_kv("done 4");
        let out = h.put(done);
        let mut expected = vec![];
        if role == "primary" {
            expected.push(Command::DropSlot(ExitReason::JobFinished { epoch: 4 }));
        }
        expected.extend([
            Command::RevokeLease(LEASE),
            Command::Exit(NodeExit::JobFinished { epoch: 4 }),
        ]);
        assert_eq!(acts(&out), expected, "{role}");
        assert!(published(&out).unwrap().finished);
    }
}

#[test]
fn a_won_claim_resolves_even_if_the_job_ended_meanwhile() {
    let mut h = H::new("n1", 1, 1);
    let claim = last_claim(&h.snapshot(0, vec![])).unwrap();
    let done = h.epoch_kv("done 0");
    h.put(done);
    let out = h.input(Input::Claimed(claim, ClaimOutcome::Won(20)));
    // The slot is taken and ended at once: exit(JobFinished), never an epoch.
    assert_eq!(entered(&out), Vec::<u64>::new());
    assert!(out.contains(&Command::Exit(NodeExit::JobFinished { epoch: 0 })));
}
