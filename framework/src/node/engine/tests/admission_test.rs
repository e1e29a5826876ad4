//! Who may reach the task, and when: a table of (role, lease, sender's term, epoch) →
//! admitted now, later, or refused with the rejection the sender acts on.

use super::*;
use crate::etcd::lease::LeaseState;
use crate::node::engine::{ClaimOutcome, Input, Replica, Route, When};
use crate::wire::{Header, Rejection};

fn header(from: u32, to: u32, term: u64, epoch: u64) -> Header {
    Header {
        job: JOB.into(),
        epoch,
        from_task: from,
        to_task: to,
        term,
    }
}

/// Node n1, primary of task 0 (term returned) in epoch 5 of a 3-task job whose task 1's
/// primary has term `t1`.
fn primary() -> (H, u64, u64) {
    let (h, term) = H::primary_of("n1", 0, 3, 5);
    let t1 = h.e.view().unwrap().primaries[&1].create_revision as u64;
    (h, term as u64, t1)
}

#[test]
fn pulls_and_metas_are_admitted_by_the_acting_primary_in_its_epoch_only() {
    let (mut h, _, t1) = primary();
    let now = h.now;
    let cases: Vec<(Header, Result<When, Rejection>)> = vec![
        (header(1, 0, t1, 5), Ok(When::Now)),
        (header(1, 0, t1, 6), Ok(When::Later)),
        (
            header(1, 0, t1, 4),
            Err(Rejection::EpochMoved {
                request_epoch: 4,
                current_epoch: 5,
            }),
        ),
        // Not this node's task.
        (header(1, 2, t1, 5), Err(Rejection::NotPrimary { task: 2 })),
        // A term etcd never showed for the sender: not believed (yet).
        (
            header(1, 0, t1 + 100, 5),
            Err(Rejection::NotPrimary { task: 1 }),
        ),
        // A term older than the one etcd shows: stale.
        (
            header(1, 0, t1 - 1, 5),
            Err(Rejection::StaleTerm {
                task: 1,
                term: t1 - 1,
                seen: t1,
            }),
        ),
        // A sender that does not act as primary.
        (
            header(1, 0, 0, 5),
            Err(Rejection::StaleTerm {
                task: 1,
                term: 0,
                seen: t1,
            }),
        ),
    ];
    for (hd, want) in &cases {
        assert_eq!(&h.e.admit(hd, now), want, "{hd:?}");
    }
    // Past the local deadline: nothing is admitted.
    h.e.observe_lease(LeaseState::Suspended { id: LEASE });
    assert_eq!(
        h.e.admit(&header(1, 0, t1, 5), now),
        Err(Rejection::NotPrimary { task: 0 })
    );
    h.e.observe_lease(h.alive());
    assert_eq!(
        h.e.admit(&header(1, 0, t1, 5), now + TTL),
        Err(Rejection::NotPrimary { task: 0 })
    );
    // The sender's primary key goes: its term is refused as stale from then on.
    let key = h.keys.primary(1);
    h.delete(key);
    assert_eq!(
        h.e.admit(&header(1, 0, t1, 5), now),
        Err(Rejection::StaleTerm {
            task: 1,
            term: t1,
            seen: t1
        })
    );
}

#[test]
fn a_new_primary_admits_nothing_until_it_has_entered_an_epoch() {
    let mut h = H::new("n1", 2, 1);
    let p1 = h.primary_kv(1, "n2", 101);
    let t1 = p1.create_revision as u64;
    let claim = last_claim(&h.snapshot(5, vec![p1])).unwrap();
    h.input(Input::Claimed(claim, ClaimOutcome::Won(40)));
    // Entered 5 at once. Before that (simulated by a failed guard), NotReady.
    let enter = crate::node::engine::Command::EnterEpoch {
        epoch: 5,
        prev: None,
    };
    h.input(Input::GuardFailed(enter));
    assert_eq!(
        h.e.admit(&header(1, 0, t1, 5), h.now),
        Err(Rejection::NotReady { task: 0, epoch: 5 })
    );
}

#[test]
fn replication_entries_reach_a_backup_in_order_and_once() {
    let mut h = H::new("n2", 1, 2);
    let p = h.primary_kv(0, "n1", 100);
    let term = p.create_revision as u64;
    let claim = last_claim(&h.snapshot(0, vec![p])).unwrap();
    h.input(Input::Claimed(claim, ClaimOutcome::Won(30)));
    let now = h.now;
    let hd = header(0, 0, term, 0);
    // Updates before a snapshot: not ready.
    assert_eq!(
        h.e.admit_replica(&hd, false, 1, now),
        Err(Rejection::NotReady { task: 0, epoch: 0 })
    );
    assert_eq!(h.e.admit_replica(&hd, true, 0, now), Ok(Replica::Apply));
    h.input(Input::Replicated { term, index: 0 });
    assert_eq!(h.e.admit_replica(&hd, false, 1, now), Ok(Replica::Apply));
    h.input(Input::Replicated { term, index: 1 });
    // A repeat, a gap.
    assert_eq!(h.e.admit_replica(&hd, false, 1, now), Ok(Replica::Repeat));
    assert_eq!(
        h.e.admit_replica(&hd, false, 3, now),
        Err(Rejection::NotReady { task: 0, epoch: 0 })
    );
    // Another term than the primary etcd shows.
    assert!(matches!(
        h.e.admit_replica(&header(0, 0, term + 1, 0), false, 2, now),
        Err(Rejection::NotPrimary { .. })
    ));
    // Not a backup of that task; not acting.
    assert!(h
        .e
        .admit_replica(&header(0, 1, term, 0), true, 0, now)
        .is_err());
    assert!(h.e.admit_replica(&hd, true, 0, now + TTL).is_err());
    // A snapshot a primary numbered at the last index there is: no update follows it (and the
    // count does not wrap round to 0).
    h.input(Input::Replicated {
        term,
        index: u64::MAX,
    });
    assert_eq!(h.e.admit_replica(&hd, false, 0, now), Ok(Replica::Repeat));
    assert_eq!(
        h.e.admit_replica(&hd, false, u64::MAX, now),
        Ok(Replica::Repeat)
    );
}

#[test]
fn answers_coming_back_are_delivered_held_refetched_or_dropped() {
    let (mut h, _, t1) = primary();
    let now = h.now;
    let slot = h.e.slot().unwrap().id;
    assert_eq!(h.e.route(slot, 5, None, now), Route::Deliver);
    assert_eq!(h.e.route(slot, 5, Some((1, t1)), now), Route::Deliver);
    // Another epoch, another slot: dropped.
    assert_eq!(h.e.route(slot, 4, None, now), Route::Drop);
    assert_eq!(h.e.route(slot + 1, 5, None, now), Route::Drop);
    // An answer from a primary older than the one etcd shows now: asked again.
    let newer = h.primary_kv(1, "n3", 103);
    h.put(newer);
    assert_eq!(h.e.route(slot, 5, Some((1, t1)), now), Route::Refetch);
    // Past the deadline, still elected: held until the renewal.
    assert_eq!(h.e.route(slot, 5, None, now + TTL), Route::Defer);
    // After losing the slot: dropped.
    h.input(Input::Lease(LeaseState::Expired { id: LEASE }));
    assert_eq!(h.e.route(slot, 5, None, now), Route::Drop);
}
