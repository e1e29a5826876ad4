//! Which epochs a primary enters: each once, in order; none while its lease is unconfirmed.

use super::*;
use crate::etcd::lease::LeaseState;
use crate::node::engine::view::MAX_RELOAD_GAP;
use crate::node::engine::{ClaimOutcome, Command, Input};

#[test]
fn a_primary_enters_every_epoch_it_observed_once_and_in_order() {
    let (mut h, _) = H::primary_of("n1", 0, 1, 3);
    // Two epochs in one batch of watch events: both, in order.
    let (e4, e5) = (h.epoch_kv("4"), h.epoch_kv("5"));
    let out = h.input(Input::Watch(vec![JobEvent::Put(e4), JobEvent::Put(e5)]));
    assert_eq!(entered(&out), vec![4, 5]);
    assert!(out.contains(&Command::EnterEpoch {
        epoch: 5,
        prev: Some(4)
    }));
    // The same epoch again (a re-read, a heal): nothing.
    let again = h.epoch_kv("5");
    assert_eq!(entered(&h.put(again)), Vec::<u64>::new());
    // A renewal: nothing.
    let out = h.input(Input::Lease(h.alive()));
    assert_eq!(entered(&out), Vec::<u64>::new());
}

#[test]
fn no_epoch_is_entered_while_the_lease_is_unconfirmed_and_the_current_one_after() {
    let (mut h, _) = H::primary_of("n1", 0, 1, 3);
    let out = h.input(Input::Lease(LeaseState::Suspended { id: LEASE }));
    assert!(!published(&out).unwrap().acting);
    let (e4, e5) = (h.epoch_kv("4"), h.epoch_kv("5"));
    let out = h.input(Input::Watch(vec![JobEvent::Put(e4), JobEvent::Put(e5)]));
    assert_eq!(entered(&out), Vec::<u64>::new(), "{out:?}");
    assert_eq!(claims(&out), 0);
    let out = h.input(Input::Lease(h.alive()));
    assert_eq!(entered(&out), vec![4, 5]);
}

#[test]
fn a_lease_past_its_local_deadline_acts_like_a_suspended_one() {
    let (mut h, _) = H::primary_of("n1", 0, 1, 3);
    h.now += TTL; // the deadline is now + TTL at grant: passed
    let e4 = h.epoch_kv("4");
    let out = h.put(e4);
    assert_eq!(entered(&out), Vec::<u64>::new());
    assert!(!published(&out).unwrap().acting);
}

#[test]
fn an_epoch_whose_guard_failed_is_entered_when_the_lease_is_back() {
    let (mut h, _) = H::primary_of("n1", 0, 1, 3);
    let e4 = h.epoch_kv("4");
    let out = h.put(e4);
    let cmd = out
        .iter()
        .find(|c| matches!(c, Command::EnterEpoch { .. }))
        .cloned()
        .unwrap();
    // The runtime found the lease past its deadline right before entering.
    h.input(Input::GuardFailed(cmd));
    assert_eq!(h.e.slot().unwrap().entered, Some(3));
    let out = h.input(Input::Lease(h.alive()));
    assert_eq!(
        acts(&out)
            .into_iter()
            .filter(|c| matches!(c, Command::EnterEpoch { .. }))
            .collect::<Vec<_>>(),
        vec![Command::EnterEpoch {
            epoch: 4,
            prev: Some(3)
        }]
    );
}

/// Two epochs planned at once whose entries both fail their guard (the runtime fails every
/// entry after a failed one): both are entered on renewal, in order, none skipped.
#[test]
fn epochs_whose_guards_failed_together_are_all_entered_in_order_later() {
    let (mut h, _) = H::primary_of("n1", 0, 1, 3);
    let (e4, e5) = (h.epoch_kv("4"), h.epoch_kv("5"));
    let out = h.input(Input::Watch(vec![JobEvent::Put(e4), JobEvent::Put(e5)]));
    let planned: Vec<Command> = out
        .iter()
        .filter(|c| matches!(c, Command::EnterEpoch { .. }))
        .cloned()
        .collect();
    assert_eq!(entered(&out), vec![4, 5]);
    for cmd in planned {
        h.input(Input::GuardFailed(cmd));
    }
    assert_eq!(h.e.slot().unwrap().entered, Some(3));
    let out = h.input(Input::Lease(h.alive()));
    assert_eq!(entered(&out), vec![4, 5], "{out:?}");
    // And the same when a newer epoch arrives before the renewal.
    let e6 = h.epoch_kv("6");
    let out = h.put(e6);
    let planned: Vec<Command> = out
        .iter()
        .filter(|c| matches!(c, Command::EnterEpoch { .. }))
        .cloned()
        .collect();
    assert_eq!(entered(&out), vec![6]);
    for cmd in planned {
        h.input(Input::GuardFailed(cmd));
    }
    h.input(Input::Lease(LeaseState::Suspended { id: LEASE }));
    let e7 = h.epoch_kv("7");
    h.put(e7);
    let out = h.input(Input::Lease(h.alive()));
    assert_eq!(entered(&out), vec![6, 7], "{out:?}");
}

#[test]
fn a_backup_shows_the_jobs_epoch_and_enters_none() {
    let mut h = H::new("n2", 1, 2);
    let p = h.primary_kv(0, "n1", 100);
    let claim = last_claim(&h.snapshot(2, vec![p])).unwrap();
    h.input(Input::Claimed(claim, ClaimOutcome::Won(30)));
    let e3 = h.epoch_kv("3");
    let out = h.put(e3);
    assert_eq!(entered(&out), Vec::<u64>::new());
    assert!(out.contains(&Command::BackupEpoch(3)), "{out:?}");
    assert_eq!(h.e.slot().unwrap().epoch, 3);
}

#[test]
fn a_new_primary_starts_at_the_current_epoch_not_at_the_ones_before() {
    let mut h = H::new("n1", 1, 1);
    let out = h.snapshot(7, vec![]);
    let claim = last_claim(&out).unwrap();
    let (e8, e9) = (h.epoch_kv("8"), h.epoch_kv("9"));
    // Epochs move while the claim is out.
    h.input(Input::Watch(vec![JobEvent::Put(e8), JobEvent::Put(e9)]));
    let out = h.input(Input::Claimed(claim, ClaimOutcome::Won(20)));
    assert_eq!(entered(&out), vec![9]);
}

/// A backup that missed an update while the lease was unconfirmed gets a snapshot before the
/// task acts again: on renewal the backups are synced first, then the epochs are entered and
/// the held answers delivered.
#[test]
fn on_renewal_the_backups_are_brought_in_step_before_the_task_acts() {
    let mut h = H::new("n1", 1, 2);
    let claim = last_claim(&h.snapshot(3, vec![])).unwrap();
    h.input(Input::Claimed(claim, ClaimOutcome::Won(40)));
    let b = h.backup_kv(0, 1, "n2", 102);
    h.put(b);
    h.input(Input::Lease(LeaseState::Suspended { id: LEASE }));
    let e4 = h.epoch_kv("4");
    h.put(e4);
    let out = acts(&h.input(Input::Lease(h.alive())));
    let at = |want: fn(&Command) -> bool| out.iter().position(want);
    let sync = at(|c| matches!(c, Command::SyncBackups { members, .. } if members.len() == 1));
    let enter = at(|c| matches!(c, Command::EnterEpoch { epoch: 4, .. }));
    let deliver = at(|c| matches!(c, Command::DeliverDeferred));
    assert!(sync.is_some() && sync < enter && enter < deliver, "{out:?}");
}

#[test]
fn the_caser_enters_on_etcds_answer_and_the_watchs_echo_changes_nothing() {
    let (mut h, _) = H::primary_of("n1", 0, 1, 3);
    // etcd answered this node's compare-and-swap 3 → 4, written at `rev`.
    let rev = h.next_rev();
    let out = h.input(Input::EpochCommitted {
        epoch: 4,
        revision: rev,
    });
    assert_eq!(entered(&out), vec![4], "{out:?}");
    assert_eq!(
        published_epoch(&h),
        Some(crate::etcd::keys::EpochValue::Running(4))
    );
    // The watch's echo of the same put: nothing more.
    let key = h.keys.epoch();
    let echo = crate::etcd::Kv {
        key: key.into_bytes(),
        value: b"4".to_vec(),
        create_revision: 1,
        mod_revision: rev,
        lease: 0,
    };
    let out = h.put(echo);
    assert_eq!(entered(&out), Vec::<u64>::new(), "{out:?}");
    // The next epoch comes by the watch as usual.
    let e5 = h.epoch_kv("5");
    assert_eq!(entered(&h.put(e5)), vec![5]);
    // News the view has already passed (an older revision, or not the next epoch) is ignored.
    let out = h.input(Input::EpochCommitted {
        epoch: 5,
        revision: rev + 1,
    });
    assert_eq!(entered(&out), Vec::<u64>::new());
    let rev = h.next_rev();
    let out = h.input(Input::EpochCommitted {
        epoch: 7,
        revision: rev,
    });
    assert_eq!(entered(&out), Vec::<u64>::new());
    assert_eq!(
        published_epoch(&h),
        Some(crate::etcd::keys::EpochValue::Running(5))
    );
}

fn published_epoch(h: &H) -> Option<crate::etcd::keys::EpochValue> {
    h.e.view().and_then(|v| v.epoch)
}

/// The watch re-reads its ranges after they change (and sends none of the events its read
/// holds): the epochs that moved meanwhile were never sent, yet a primary connected throughout enters every one,
/// in order. A later read of the same ranges follows a lost history (etcd compacted it): the
/// current epoch only, as for a node that was away.
#[test]
fn epochs_moved_while_the_watch_read_its_ranges_again_are_all_entered_in_order() {
    let (mut h, _) = H::primary_of("n1", 0, 2, 3);
    // The slot keys as the view shows them, for the new reads.
    let slots = |h: &mut H| -> Vec<Kv> {
        let view = h.e.view().unwrap().clone();
        [(0, "n1", LEASE), (1, "other1", LeaseId(101))]
            .into_iter()
            .map(|(t, node, lease)| Kv {
                create_revision: view.primaries[&t].create_revision,
                ..h.primary_kv(t, node, lease)
            })
            .collect()
    };
    let mut out = Vec::new();
    h.e.reload_watch(&mut out);
    assert!(matches!(out.as_slice(), [Command::Watch { .. }]), "{out:?}");
    // The job moved from 3 to 6 while the watch read.
    let kvs = slots(&mut h);
    let out = h.snapshot(6, kvs);
    assert_eq!(entered(&out), vec![4, 5, 6]);
    assert!(matches!(
        h.e.mine(),
        crate::roles::MySlot::Primary { task: 0, .. }
    ));
    // Read again under the same generation (its history compacted away): only the current.
    let kvs = slots(&mut h);
    let out = h.snapshot(9, kvs);
    assert_eq!(entered(&out), vec![9]);
    // A reload that reads a jump no reload makes (a value someone else wrote, accepted from a
    // read): the value read only, nothing between (and no endless fill); at the last epoch
    // there is, the same again: nothing.
    for (to, expected) in [
        (9 + MAX_RELOAD_GAP + 1, vec![9 + MAX_RELOAD_GAP + 1]),
        (u64::MAX, vec![u64::MAX]),
        (u64::MAX, vec![]),
    ] {
        h.e.reload_watch(&mut Vec::new());
        let kvs = slots(&mut h);
        let out = h.snapshot(to, kvs);
        assert_eq!(entered(&out), expected);
    }
}
