//! What the job watch follows: every slot key as a spare; as a slot holder only its own
//! task's, its neighbours' over the topology's period, task 0's, and those of the tasks its
//! work talks to outside the topology (asked for on first contact). Snapshots of ranges the
//! watch no longer follows are ignored.

use taskgraph_topology::{Butterfly, Links, Ring, Tree};

use super::*;
use crate::etcd::keys::KeyRange;
use crate::node::engine::TaskCall;
use crate::node::engine::{ClaimOutcome, Command, Input};
use crate::roles::Scope;
use crate::wire::{Header, Rejection};

/// A primary key, held by node `other<t>`, for every task of `h`'s job but `skip`.
fn other_primaries(h: &mut H, skip: &[u32]) -> Vec<Kv> {
    (0..h.tasks)
        .filter(|t| !skip.contains(t))
        .map(|t| h.primary_kv(t, &format!("other{t}"), 100 + i64::from(t)))
        .collect()
}

/// The ranges of the last `Command::Watch` in `out`, with its generation.
fn watch_of(out: &[Command]) -> Option<(u64, Vec<KeyRange>)> {
    out.iter().rev().find_map(|c| match c {
        Command::Watch { generation, ranges } => Some((*generation, ranges.clone())),
        _ => None,
    })
}

/// The tasks whose slot keys `ranges` follow (checked on both kinds of slot key).
fn tasks_in(h: &H, ranges: &[KeyRange]) -> Vec<u32> {
    (0..h.tasks)
        .filter(|t| {
            let p = h.keys.primary(*t);
            let b = h.keys.backup(*t, 1);
            let shows = |k: &str| ranges.iter().any(|r| r.contains(k.as_bytes()));
            assert_eq!(shows(&p), shows(&b), "task {t}: both slot keys or neither");
            shows(&p)
        })
        .collect()
}

#[test]
fn a_slot_holder_watches_its_task_its_ring_neighbours_and_task_0_and_a_spare_everything() {
    // 8 tasks on a bidirectional ring; n1 takes task 5.
    let mut h = H::new("n1", 8, 2);
    let others = other_primaries(&mut h, &[5]);
    let out = h.snapshot(2, others);
    assert_eq!(watch_of(&out), None, "a spare keeps watching every slot");
    let claim = last_claim(&out).expect("a claim of the orphan task 5");
    assert_eq!(claim.task(), 5);
    let term = h.next_rev();
    let out = h.input(Input::Claimed(claim, ClaimOutcome::Won(term)));
    let (generation, ranges) = watch_of(&out).expect("a holder's watch");
    assert_eq!(generation, 1);
    assert_eq!(tasks_in(&h, &ranges), vec![0, 4, 5, 6]);
    for key in [h.keys.epoch(), h.keys.spec(), h.keys.node("n1")] {
        assert!(ranges.iter().any(|r| r.contains(key.as_bytes())), "{key}");
    }
    assert!(!ranges
        .iter()
        .any(|r| r.contains(h.keys.node("n2").as_bytes())));

    // A snapshot of the spare's ranges, read before the change, changes nothing; the one of
    // the holder's ranges replaces the view and shows its scope.
    let stale = JobEvent::Snapshot {
        kvs: vec![h.spec_kv()],
        revision: h.next_rev(),
        generation: 0,
    };
    h.input(Input::Watch(vec![stale]));
    assert_eq!(
        h.e.view().unwrap().primaries.len(),
        8,
        "stale snapshot ignored"
    );
    let mut kvs = vec![h.spec_kv(), h.epoch_kv("2"), h.record_kv()];
    for t in [0, 4, 6] {
        kvs.push(h.primary_kv(t, &format!("other{t}"), 100 + i64::from(t)));
    }
    let mine = h.keys.primary(5);
    kvs.push(Kv {
        key: mine.into_bytes(),
        value: serde_json::to_vec(&holder("n1")).unwrap(),
        create_revision: term,
        mod_revision: term,
        lease: LEASE.0,
    });
    let revision = h.next_rev();
    let out = h.input(Input::Watch(vec![JobEvent::Snapshot {
        kvs,
        revision,
        generation: 1,
    }]));
    assert!(
        !out.iter().any(|c| matches!(c, Command::DropSlot(_))),
        "still primary: {out:?}"
    );
    let view = h.e.view().unwrap();
    assert_eq!(view.primaries.len(), 4);
    assert!(view.shows(4) && view.shows(0) && !view.shows(2));
    assert!(matches!(&view.scope, Scope::Tasks(set) if set.len() == 4));

    // Losing the slot: a spare again, watching every slot (the lazy tasks forgotten).
    let key = h.keys.primary(5);
    let out = h.delete(key);
    let (generation, ranges) = watch_of(&out).expect("a spare's watch");
    assert_eq!(generation, 2);
    assert_eq!(ranges, h.keys.node_watch("n1"));
}

#[test]
fn a_sender_from_a_task_the_holder_does_not_watch_is_told_to_retry_and_its_task_is_watched() {
    let (mut h, term) = watched_holder();
    let now = h.now;
    // Task 2 is not a neighbour of task 5 on the ring: its keys are not watched.
    assert!(h.e.unwatched(2));
    let header = Header {
        job: JOB.into(),
        epoch: 2,
        from_task: 2,
        to_task: 5,
        term: 0,
    };
    // Its term as the fence saw it while n1 was a spare, or a higher one: not believed, and
    // not refused as stale either, while its keys are not watched.
    let seen = h.e.fence_seen(2);
    assert!(seen > 0);
    for claimed in [seen, seen + 1000] {
        let header = Header {
            term: claimed,
            ..header.clone()
        };
        assert_eq!(
            h.e.admit(&header, now),
            Err(Rejection::NotPrimary { task: 2 })
        );
    }
    // A term below one etcd showed is stale whatever the watch.
    let low = Header {
        term: seen - 1,
        ..header.clone()
    };
    assert!(matches!(
        h.e.admit(&low, now),
        Err(Rejection::StaleTerm { task: 2, .. })
    ));
    let before = h.e.ranges().to_vec();
    let out = h.input(Input::WatchTask(2));
    let (generation, ranges) = watch_of(&out).expect("task 2 added");
    assert_eq!(generation, 2);
    assert_eq!(tasks_in(&h, &ranges), vec![0, 2, 4, 5, 6]);
    // Appended, not sorted in: the watch grows in place (see `watch::extend`).
    assert_eq!(ranges[..before.len()], before[..], "the old ranges first");
    assert_eq!(ranges[before.len()..], [h.keys.task_slots(2)]);
    assert!(!h.e.unwatched(2));
    assert_eq!(watch_of(&h.input(Input::WatchTask(2))), None, "once");
    // A second one, lower than the first, comes after it.
    let out = h.input(Input::WatchTask(1));
    let (_, with_1) = watch_of(&out).expect("task 1 added");
    assert_eq!(with_1[..ranges.len()], ranges[..]);
    assert_eq!(with_1[ranges.len()..], [h.keys.task_slots(1)]);
    assert_eq!(
        watch_of(&h.input(Input::WatchTask(99))),
        None,
        "no such task"
    );
    let _ = term;
}

#[test]
fn a_spare_does_not_decide_on_a_holders_partial_view() {
    let (mut h, _) = watched_holder();
    // The slot is lost (the key deleted): the view still shows only the holder's tasks until
    // the spare's snapshot comes, so no task looks like an orphan meanwhile.
    let key = h.keys.primary(5);
    let out = h.delete(key);
    assert!(watch_of(&out).is_some());
    assert_eq!(
        last_claim(&out),
        None,
        "no claim on a partial view: {out:?}"
    );
    // The spare's snapshot (every task) shows task 5 free: it claims it.
    let others = other_primaries(&mut h, &[5]);
    let out = h.snapshot(2, others);
    assert_eq!(last_claim(&out).map(|c| c.task()), Some(5));
}

/// n1, primary of task 5 (term returned) of an 8-task ring in epoch 2, its view replaced by
/// the snapshot of the holder's ranges.
fn watched_holder() -> (H, i64) {
    let mut h = H::new("n1", 8, 2);
    let others = other_primaries(&mut h, &[5]);
    let out = h.snapshot(2, others);
    let claim = last_claim(&out).unwrap();
    let term = h.next_rev();
    h.input(Input::Claimed(claim, ClaimOutcome::Won(term)));
    let mut kvs = Vec::new();
    for t in [0, 4, 6] {
        kvs.push(h.primary_kv(t, &format!("other{t}"), 100 + i64::from(t)));
    }
    kvs.push(Kv {
        key: h.keys.primary(5).into_bytes(),
        value: serde_json::to_vec(&holder("n1")).unwrap(),
        create_revision: term,
        mod_revision: term,
        lease: LEASE.0,
    });
    h.snapshot(2, kvs);
    assert!(!h.e.view().unwrap().shows(2));
    (h, term)
}

#[test]
fn after_a_claim_without_an_answer_a_new_holder_lists_its_lease_keys_and_deletes_strays() {
    let mut h = H::new("n1", 8, 2);
    let others = other_primaries(&mut h, &[5, 6]);
    let out = h.snapshot(2, others);
    let first = last_claim(&out).unwrap();
    // etcd applied the claim but its answer was lost.
    let out = h.input(Input::Claimed(
        first,
        ClaimOutcome::Failed("timeout".into()),
    ));
    assert!(!out.contains(&Command::FindStrays));
    let out = h.input(Input::Retry);
    let second = last_claim(&out).unwrap();
    let term = h.next_rev();
    let out = h.input(Input::Claimed(second, ClaimOutcome::Won(term)));
    assert!(out.contains(&Command::FindStrays), "{out:?}");
    // The lease's slot keys: the won slot (kept) and the stray of the first claim (deleted).
    let mine = Kv {
        key: h.keys.primary(second.task()).into_bytes(),
        value: serde_json::to_vec(&holder("n1")).unwrap(),
        create_revision: term,
        mod_revision: term,
        lease: LEASE.0,
    };
    let stray = h.primary_kv(first.task(), "n1", LEASE);
    let stray_key = stray.key.clone();
    let out = h.input(Input::LeaseKeys(vec![mine, stray.clone()]));
    let deleted: Vec<&Vec<u8>> = out
        .iter()
        .filter_map(|c| match c {
            Command::DeleteKey { key, .. } => Some(key),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, vec![&stray_key]);
}

/// Node n1 takes over `task` (the only orphan) of a job of `tasks` joined by `links` in
/// `epoch`; its view is then replaced by the snapshot of the holder's ranges, with the other
/// primaries as they were. Returns the harness and the tasks it watches.
fn narrow_primary(links: Links, tasks: u32, task: u32, epoch: u64) -> (H, Vec<u32>) {
    let mut h = H::with_links("n1", tasks, 1, links);
    let others = other_primaries(&mut h, &[task]);
    let out = h.snapshot(epoch, others.clone());
    let claim = last_claim(&out).unwrap();
    assert_eq!(claim.task(), task);
    let term = h.next_rev();
    let out = h.input(Input::Claimed(claim, ClaimOutcome::Won(term)));
    let (_, ranges) = watch_of(&out).expect("a holder's watch");
    let watched = tasks_in(&h, &ranges);
    let mut kvs: Vec<Kv> = others
        .into_iter()
        .filter(|kv| ranges.iter().any(|r| r.contains(&kv.key)))
        .collect();
    kvs.push(Kv {
        key: h.keys.primary(task).into_bytes(),
        value: serde_json::to_vec(&holder("n1")).unwrap(),
        create_revision: term,
        mod_revision: term,
        lease: LEASE.0,
    });
    let out = h.snapshot(epoch, kvs);
    assert_eq!(calls(&out), vec![], "the narrow snapshot raises nothing");
    (h, watched)
}

/// `neighbour`'s primary goes, then a new one comes: one call each, on `link`.
fn fail_and_restart(h: &mut H, link: &str, neighbour: u32) {
    let key = h.keys.primary(neighbour);
    assert_eq!(
        calls(&h.delete(key)),
        vec![TaskCall::NeighbourFailed(link.into(), neighbour)]
    );
    let p = h.primary_kv(neighbour, "new", 200);
    assert_eq!(
        calls(&h.put(p)),
        vec![TaskCall::NeighbourRestarted(link.into(), neighbour)]
    );
}

#[test]
fn with_a_partial_view_each_neighbour_incident_is_reported_once_on_a_ring_a_tree_and_a_butterfly() {
    // A ring of 8, both ways: task 5 watches 4 and 6 (and task 0).
    let ring = Ring::new(8).unwrap().bidirectional_links();
    let (mut h, watched) = narrow_primary(ring, 8, 5, 0);
    assert_eq!(watched, vec![0, 4, 5, 6]);
    fail_and_restart(&mut h, Ring::NEIGHBOURS, 4);
    fail_and_restart(&mut h, Ring::NEIGHBOURS, 6);
    let e1 = h.epoch_kv("1");
    assert_eq!(calls(&h.put(e1)), vec![], "nothing more");

    // A tree of 7: task 1's parent is 0, its children 3 and 4.
    let tree = Tree::new(7, 2).unwrap().links();
    let (mut h, watched) = narrow_primary(tree, 7, 1, 0);
    assert_eq!(watched, vec![0, 1, 3, 4]);
    fail_and_restart(&mut h, "children", 3);
    fail_and_restart(&mut h, "parents", 0);

    // A butterfly of 8: task 0's partner is 1, 2 and 4 in epochs 0, 1 and 2 (mod 3); its
    // watch holds every partner of the period, so each is followed in its own epoch.
    let butterfly = Butterfly::new(8).unwrap().links();
    let (mut h, watched) = narrow_primary(butterfly, 8, 0, 0);
    assert_eq!(watched, vec![0, 1, 2, 4]);
    fail_and_restart(&mut h, "partner", 1);
    for (epoch, partner) in [(1u64, 2u32), (2, 4), (3, 1)] {
        let e = h.epoch_kv(&epoch.to_string());
        assert_eq!(
            calls(&h.put(e)),
            vec![],
            "epoch {epoch}: a partner first seen"
        );
        fail_and_restart(&mut h, "partner", partner);
    }
}
