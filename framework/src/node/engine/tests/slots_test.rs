//! Which slot a node claims, what a claim's outcome means, and when it tries again.

use super::*;
use crate::node::engine::{Claim, ClaimOutcome, Command, Input, TaskCall};
use crate::retry;
use crate::roles::MySlot;

#[test]
fn a_spare_claims_an_orphan_task_and_its_primary_enters_the_current_epoch() {
    let mut h = H::new("n1", 1, 2);
    let out = h.snapshot(3, vec![]);
    assert_eq!(
        acts(&out),
        vec![Command::Claim(Claim::Primary {
            task: 0,
            lease: LEASE
        })]
    );
    let out = h.input(Input::Claimed(
        Claim::Primary {
            task: 0,
            lease: LEASE,
        },
        ClaimOutcome::Won(40),
    ));
    assert_eq!(
        acts(&out),
        vec![
            Command::BuildSlot {
                task: 0,
                primary: true,
                slot: 1,
                epoch: 3
            },
            Command::PrimaryTerm(40),
            Command::Call(TaskCall::BecamePrimary(40)),
            Command::EnterEpoch {
                epoch: 3,
                prev: None
            },
            // Then it stays: backups in step (none yet), answers held for the lease.
            Command::SyncBackups {
                task: 0,
                term: 40,
                epoch: 3,
                members: vec![]
            },
            Command::DeliverDeferred,
        ]
    );
    assert_eq!(h.e.mine(), MySlot::Primary { task: 0, term: 40 });
    let p = published(&out).unwrap();
    assert!(p.acting && p.ready.is_ok(), "{p:?}");
    assert_eq!(p.epoch, Some(3));
}

#[test]
fn a_spare_with_a_primary_in_place_claims_a_backup_slot_and_becomes_backup() {
    let mut h = H::new("n2", 1, 2);
    let p = h.primary_kv(0, "n1", 100);
    let out = h.snapshot(0, vec![p]);
    let claim = Claim::Backup {
        task: 0,
        k: 1,
        lease: LEASE,
    };
    assert_eq!(acts(&out), vec![Command::Claim(claim)]);
    let out = h.input(Input::Claimed(claim, ClaimOutcome::Won(41)));
    assert_eq!(
        acts(&out),
        vec![
            Command::BuildSlot {
                task: 0,
                primary: false,
                slot: 1,
                epoch: 0
            },
            Command::Call(TaskCall::BecameBackup),
        ]
    );
    // It watches its primary, for evidence of its death.
    let monitors: Vec<_> = out
        .iter()
        .filter_map(|c| match c {
            Command::Monitor(w) => Some(w.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(monitors.last().map(|w| w.len()), Some(1), "{out:?}");
}

#[test]
fn only_one_claim_is_out_at_a_time() {
    let mut h = H::new("n1", 2, 1);
    let out = h.snapshot(0, vec![]);
    assert_eq!(claims(&out), 1);
    // More changes while the claim is out: no second claim.
    let other = h.primary_kv(1, "n9", 109);
    assert_eq!(claims(&h.put(other)), 0);
    let e = h.epoch_kv("1");
    assert_eq!(claims(&h.put(e)), 0);
}

#[test]
fn a_lost_race_waits_for_the_next_change_and_a_pause_that_grows_with_the_losses() {
    let mut h = H::new("n1", 1, 1);
    let claim = last_claim(&h.snapshot(0, vec![])).unwrap();
    let mut limits = Vec::new();
    for losses in 1..=8u32 {
        let out = h.input(Input::Claimed(claim, ClaimOutcome::Lost));
        assert_eq!(claims(&out), 0, "{out:?}");
        assert_eq!(h.e.retry_at(), None, "no timer before the view changes");
        // The timer alone brings no claim: the view has not shown the winner yet.
        h.now += Duration::from_secs(1);
        assert_eq!(claims(&h.input(Input::Retry)), 0);
        h.now -= Duration::from_secs(1);
        // The winner's key arrives: the task has a primary, nothing to claim.
        let winner = h.primary_kv(0, "n2", 102);
        assert_eq!(claims(&h.put(winner)), 0);
        // It goes away again: a claim, but only after the pause.
        let key = h.keys.primary(0);
        assert_eq!(claims(&h.delete(key)), 0, "loss {losses}: not at once");
        let at = h.e.retry_at().expect("a time to claim at");
        let limit = retry::CLAIM_CONTENTION.spread(losses, 1.0);
        assert!(at - h.now < limit, "loss {losses}: {:?}", at - h.now);
        limits.push(limit.as_millis());
        h.now = at;
        assert_eq!(last_claim(&h.input(Input::Retry)), Some(claim));
    }
    assert_eq!(limits, vec![5, 10, 20, 40, 80, 160, 320, 320]);
    // A won claim ends the losing streak.
    let rev = h.next_rev();
    h.input(Input::Claimed(claim, ClaimOutcome::Won(rev)));
    assert_eq!(h.e.retry_at(), None);
}

#[test]
fn a_claim_etcd_did_not_answer_is_tried_again_after_a_jittered_pause_that_doubles_up_to_a_second() {
    let mut h = H::new("n1", 1, 1);
    let claim = last_claim(&h.snapshot(0, vec![])).unwrap();
    let mut pauses = Vec::new();
    for _ in 0..7 {
        let out = h.input(Input::Claimed(
            claim,
            ClaimOutcome::Failed("timeout".into()),
        ));
        assert_eq!(claims(&out), 0);
        let at = h.e.retry_at().expect("a retry time");
        pauses.push(at - h.now);
        // Nothing changes in a quiet job; the timer brings the claim back.
        assert_eq!(last_claim(&h.input(Input::Retry)), Some(claim));
    }
    // Doubling from 50 ms to a second, each jittered by up to half.
    for (pause, base) in pauses.iter().zip([50, 100, 200, 400, 800, 1000, 1000]) {
        let ms = pause.as_millis();
        assert!(
            ms >= base && ms < base * 3 / 2,
            "{ms} ms for {base} ms: {pauses:?}"
        );
    }
    // A won claim resets the pause.
    h.input(Input::Claimed(claim, ClaimOutcome::Won(50)));
    let key = h.keys.primary(0);
    let again = last_claim(&h.delete(key)).expect("the slot is free again: a claim");
    h.input(Input::Claimed(
        again,
        ClaimOutcome::Failed("timeout".into()),
    ));
    let pause = h.e.retry_at().map(|at| (at - h.now).as_millis());
    assert!(pause.is_some_and(|ms| (50..75).contains(&ms)), "{pause:?}");
}

#[test]
fn an_outcome_of_a_claim_that_is_not_out_is_ignored() {
    let mut h = H::new("n1", 1, 1);
    h.snapshot(0, vec![]);
    let stray = Claim::Primary {
        task: 0,
        lease: 99.into(),
    };
    let out = h.input(Input::Claimed(stray, ClaimOutcome::Won(5)));
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(h.e.mine(), MySlot::Spare);
}

/// A backup takes over when its primary's key goes. Without its primary's state it starts from
/// the task's checkpoint, like a spare; with it, it does not.
#[test]
fn a_backup_promotes_when_its_primary_goes_and_restores_the_checkpoint_only_without_state() {
    for synced in [false, true] {
        let mut h = H::new("n2", 1, 2);
        let p = h.primary_kv(0, "n1", 100);
        let claim = last_claim(&h.snapshot(4, vec![p])).unwrap();
        h.input(Input::Claimed(claim, ClaimOutcome::Won(30)));
        let mine = h.backup_kv(0, 1, "n2", LEASE);
        h.put(Kv {
            create_revision: 30,
            ..mine
        });
        if synced {
            let out = h.input(Input::Replicated { term: 12, index: 0 });
            assert!(published(&out).unwrap().ready.is_ok(), "{out:?}");
        }
        let key = h.keys.primary(0);
        let out = h.delete(key);
        let promote = Claim::Promote {
            task: 0,
            k: 1,
            create_revision: 30,
            lease: LEASE,
        };
        assert_eq!(acts(&out), vec![Command::Claim(promote)]);
        let out = h.input(Input::Claimed(promote, ClaimOutcome::Won(60)));
        let mut expected = vec![];
        if !synced {
            expected.push(Command::RestoreCheckpoint(0));
        }
        expected.extend([
            Command::PrimaryTerm(60),
            Command::Call(TaskCall::BecamePrimary(60)),
            Command::EnterEpoch {
                epoch: 4,
                prev: None,
            },
            Command::SyncBackups {
                task: 0,
                term: 60,
                epoch: 4,
                members: vec![],
            },
            Command::DeliverDeferred,
        ]);
        assert_eq!(acts(&out), expected, "synced: {synced}");
        // Its own backup key is gone from its view: it does not sync itself.
        assert!(h.e.view().unwrap().backups.is_empty());
        assert_eq!(h.e.fence_seen(0), 60, "the fence rose to its own term");
    }
}

#[test]
fn a_primary_whose_key_is_replaced_loses_the_slot_and_rejoins_as_a_spare() {
    let (mut h, _term) = H::primary_of("n1", 0, 2, 0);
    let usurper = h.primary_kv(0, "n9", 109);
    let out = h.put(usurper);
    assert_eq!(
        acts(&out)[0],
        Command::DropSlot(crate::role::ExitReason::SlotLost)
    );
    assert_eq!(h.e.mine(), MySlot::Spare);
    assert!(h.e.slot().is_none());
}
