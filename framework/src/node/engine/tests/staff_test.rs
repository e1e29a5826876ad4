//! Staffing by drafts: a spare watches only its own keys and task 0's, and takes the slot the
//! staffer (task 0's primary) gives it under `drafts/<node>`; the staffer gives free slots to
//! waiting spares by the spares' own rule (tasks without a node first, then the fewest
//! backups), many per transaction, never one spare twice nor one slot twice.

use std::collections::BTreeSet;

use super::*;
use crate::etcd::keys::{Draft, NodeRecord};
use crate::etcd::{DraftOrder, DraftOutcome};
use crate::node::engine::staff::STALE_DRAFTS_BEFORE_RELOAD as STALE_ROUNDS;
use crate::node::engine::{ClaimOutcome, Command, Input, TaskCall};
use crate::roles::{MySlot, Watched};

fn watch_of(out: &[Command]) -> Option<(u64, Vec<crate::etcd::keys::KeyRange>)> {
    out.iter().rev().find_map(|c| match c {
        Command::Watch { generation, ranges } => Some((*generation, ranges.clone())),
        _ => None,
    })
}

fn drafts_in(out: &[Command]) -> Option<(u64, Vec<DraftOrder>)> {
    out.iter().rev().find_map(|c| match c {
        Command::Draft { term, orders } => Some((*term, orders.clone())),
        _ => None,
    })
}

/// Node `name`'s record under `lease` (`drafted`: it waits to be drafted).
fn record(h: &mut H, name: &str, drafted: bool, lease: i64) -> Kv {
    let key = h.keys.node(name);
    let value = serde_json::to_vec(&NodeRecord {
        addr: holder(name).addr,
        stall: None,
        drafted,
    })
    .unwrap();
    h.kv(key, value, lease)
}

/// `drafts/<node>` naming `draft`, under `lease`.
fn draft_kv(h: &mut H, node: &str, draft: Draft, lease: LeaseId) -> Kv {
    let key = h.keys.draft(node);
    h.kv(key, serde_json::to_vec(&draft).unwrap(), lease)
}

/// Engine `me`, drafted, as task 0's primary with the staffer's view: the job's spec, epoch
/// 1, its own record and primary key, and `more`. Returns the harness, its term, and what the
/// staffer's snapshot made it do.
fn staffer(
    tasks: u32,
    replicas: u32,
    more: impl FnOnce(&mut H) -> Vec<Kv>,
) -> (H, u64, Vec<Command>) {
    let mut h = H::drafted("boss", tasks, replicas);
    let out = h.snapshot(1, vec![]);
    let claim = last_claim(&out).expect("task 0 has no node: the spare claims it");
    assert_eq!(claim.task(), 0);
    let term = h.next_rev();
    let out = h.input(Input::Claimed(claim, ClaimOutcome::Won(term)));
    let (generation, ranges) = watch_of(&out).expect("the staffer's watch");
    assert_eq!(ranges, h.keys.staff_watch());
    let mine = h.primary_kv(0, "boss", LEASE);
    let mine = Kv {
        create_revision: term,
        mod_revision: term,
        ..mine
    };
    let mut kvs = vec![h.spec_kv(), h.epoch_kv("1"), h.record_kv(), mine];
    kvs.extend(more(&mut h));
    let revision = h.next_rev();
    let out = h.input(Input::Watch(vec![JobEvent::Snapshot {
        kvs,
        revision,
        generation,
    }]));
    (h, term as u64, out)
}

#[test]
fn a_waiting_spare_watches_only_its_own_keys_and_task_0s_and_claims_task_0_when_it_has_no_node() {
    let mut h = H::drafted("n1", 8, 2);
    assert_eq!(h.e.ranges(), h.keys.spare_watch("n1"));
    for key in [
        h.keys.epoch(),
        h.keys.spec(),
        h.keys.node("n1"),
        h.keys.draft("n1"),
        h.keys.primary(0),
        h.keys.backup(0, 1),
    ] {
        assert!(
            h.e.ranges().iter().any(|r| r.contains(key.as_bytes())),
            "{key}"
        );
    }
    for key in [h.keys.primary(3), h.keys.node("n2"), h.keys.draft("n2")] {
        assert!(
            !h.e.ranges().iter().any(|r| r.contains(key.as_bytes())),
            "{key}"
        );
    }
    // Task 0 has a primary: the spare waits (the other tasks are not its business).
    let boss = h.primary_kv(0, "boss", 99);
    let out = h.snapshot(1, vec![boss]);
    assert_eq!(claims(&out), 0, "{out:?}");
    // Task 0 loses its primary but keeps a backup: the backup takes over, not a spare.
    let backup = h.backup_kv(0, 1, "b", 98);
    h.put(backup);
    let out = h.delete(h.keys.primary(0));
    assert_eq!(claims(&out), 0, "{out:?}");
    // Task 0 without any node: the spare claims its primary (and becomes the staffer).
    let out = h.delete(h.keys.backup(0, 1));
    assert_eq!(last_claim(&out).map(|c| c.task()), Some(0), "{out:?}");
}

#[test]
fn a_drafted_spare_takes_its_slot_once_and_only_under_its_own_lease() {
    let mut h = H::drafted("n1", 8, 2);
    let boss = h.primary_kv(0, "boss", 99);
    h.snapshot(3, vec![boss]);
    // A draft under another lease (an earlier life of the node): not taken.
    let stale = draft_kv(&mut h, "n1", Draft { task: 4, slot: 1 }, LeaseId(1234));
    let out = h.put(stale);
    assert!(acts(&out).is_empty(), "{out:?}");
    assert_eq!(h.e.mine(), MySlot::Spare);
    // Its draft: backup slot 1 of task 4, created in the draft's transaction.
    let draft = draft_kv(&mut h, "n1", Draft { task: 4, slot: 1 }, LEASE);
    let rev = draft.mod_revision;
    let out = h.put(draft.clone());
    assert!(
        out.contains(&Command::BuildSlot {
            task: 4,
            primary: false,
            slot: 1,
            epoch: 3
        }),
        "{out:?}"
    );
    assert_eq!(calls(&out), vec![TaskCall::BecameBackup]);
    assert_eq!(
        h.e.mine(),
        MySlot::Backup {
            task: 4,
            k: 1,
            create_revision: rev
        }
    );
    let (_, ranges) = watch_of(&out).expect("a holder's watch");
    assert!(ranges
        .iter()
        .any(|r| r.contains(h.keys.backup(4, 1).as_bytes())));
    // The spare's ranges come first, in order: the watch keeps their watches and adds the
    // holder's others on the same stream.
    let spare = h.keys.spare_watch("n1");
    assert!(
        ranges.len() > spare.len() && ranges.starts_with(&spare),
        "{ranges:?}"
    );
    // The same draft again (a new read of the watch): nothing more.
    let out = h.put(draft);
    assert!(
        acts(&out)
            .iter()
            .all(|c| !matches!(c, Command::BuildSlot { .. })),
        "{out:?}"
    );
}

#[test]
fn a_primary_draft_makes_the_spare_primary_with_the_drafts_revision_as_term() {
    let mut h = H::drafted("n1", 8, 2);
    let boss = h.primary_kv(0, "boss", 99);
    h.snapshot(5, vec![boss]);
    let draft = draft_kv(&mut h, "n1", Draft { task: 6, slot: 0 }, LEASE);
    let term = draft.mod_revision as u64;
    let out = h.put(draft);
    assert!(
        calls(&out).contains(&TaskCall::BecamePrimary(term)),
        "{out:?}"
    );
    assert_eq!(entered(&out), vec![5]);
    assert_eq!(h.e.fence_seen(6), term);
    // A draft of a slot the job does not have is ignored.
    let mut h = H::drafted("n2", 8, 2);
    let boss = h.primary_kv(0, "boss", 99);
    h.snapshot(5, vec![boss]);
    let bad = draft_kv(&mut h, "n2", Draft { task: 8, slot: 0 }, LEASE);
    let out = h.put(bad);
    assert!(acts(&out).is_empty(), "{out:?}");
    assert_eq!(h.e.mine(), MySlot::Spare);
}

#[test]
fn the_staffer_drafts_waiting_spares_orphans_first_then_the_fewest_backups() {
    // 4 tasks × 2; task 1 has a primary (x); five spares wait, one node is not drafted, one
    // record is garbage, one has no lease.
    let (mut h, term, out) = staffer(4, 2, |h| {
        let mut kvs = vec![h.primary_kv(1, "x", 300)];
        for (i, name) in ["s1", "s2", "s3", "s4", "s5"].iter().enumerate() {
            kvs.push(record(h, name, true, 200 + i as i64));
        }
        kvs.push(record(h, "claims-itself", false, 250));
        kvs.push(record(h, "no-lease", true, 0));
        let key = h.keys.node("garbage");
        kvs.push(h.kv(key, "{", 251));
        kvs
    });
    let (t, orders) = drafts_in(&out).expect("drafts");
    assert_eq!(t, term);
    // The orphans (2, 3) get primaries first, in a round of their own: a round's
    // transactions may apply in any order, so no task gets its primary and a backup in one.
    let nodes: Vec<&str> = orders.iter().map(|o| o.holder.node.as_str()).collect();
    assert_eq!(nodes, vec!["s1", "s2"], "longest registered first");
    let primaries: BTreeSet<u32> = orders
        .iter()
        .map(|o| {
            assert_eq!(o.draft.slot, 0, "{orders:?}");
            o.draft.task
        })
        .collect();
    assert_eq!(primaries, BTreeSet::from([2, 3]));
    for (i, o) in orders.iter().enumerate() {
        assert_eq!(o.lease, LeaseId(200 + i as i64), "the spare's own lease");
        assert_eq!(o.draft_revision, 0);
        assert!(o.record_revision > 0);
    }
    // Nothing more while the drafts are out, even when the view changes.
    let s6 = record(&mut h, "s6", true, 206);
    let out = h.put(s6);
    assert_eq!(drafts_in(&out), None, "{out:?}");
    // Then every task one backup: s3, s4, s5 and s6, who registered meanwhile (longest
    // registered first), one to each of the four tasks.
    let out = apply_drafts(&mut h, &orders);
    let (_, orders) = drafts_in(&out).expect("the backups' round");
    let nodes: Vec<&str> = orders.iter().map(|o| o.holder.node.as_str()).collect();
    assert_eq!(
        nodes,
        vec!["s3", "s4", "s5", "s6"],
        "longest registered first"
    );
    let backups: BTreeSet<(u32, u32)> = orders
        .iter()
        .map(|o| (o.draft.task, o.draft.slot))
        .collect();
    assert_eq!(backups, (0..4).map(|t| (t, 1)).collect::<BTreeSet<_>>());
    // Every slot filled: nothing more to draft.
    let out = apply_drafts(&mut h, &orders);
    assert_eq!(drafts_in(&out), None, "{out:?}");
}

/// Reports `orders` applied at the next revision: no new drafts until the view shows them,
/// then shows them (their slot and draft keys); returns what the staffer did then.
fn apply_drafts(h: &mut H, orders: &[DraftOrder]) -> Vec<Command> {
    let applied_at = h.rev + 1;
    let out = h.input(Input::Drafted(DraftOutcome {
        applied: orders.len(),
        revision: applied_at,
        stopped: None,
    }));
    assert_eq!(drafts_in(&out), None, "{out:?}");
    h.rev = applied_at - 1;
    let mut evs = Vec::new();
    for o in orders {
        let key = if o.draft.slot == 0 {
            h.keys.primary(o.draft.task)
        } else {
            h.keys.backup(o.draft.task, o.draft.slot)
        };
        let value = serde_json::to_vec(&o.holder).unwrap();
        let kv = Kv {
            key: key.into_bytes(),
            value,
            create_revision: applied_at,
            mod_revision: applied_at,
            lease: o.lease.0,
        };
        evs.push(JobEvent::Put(kv));
        let d = h.keys.draft(&o.holder.node);
        evs.push(JobEvent::Put(Kv {
            key: d.into_bytes(),
            value: serde_json::to_vec(&o.draft).unwrap(),
            create_revision: applied_at,
            mod_revision: applied_at,
            lease: o.lease.0,
        }));
    }
    h.rev = applied_at;
    h.input(Input::Watch(evs))
}

/// A view that stays stale however long the staffer waits (the watch never showed a change
/// that makes every draft fail) is read again: after a few stale rounds in a row the staffer
/// asks for its ranges again under a new generation, and drafts on the fresh snapshot.
#[test]
fn drafts_that_keep_finding_the_view_stale_make_the_staffer_read_the_job_again() {
    let (mut h, _, out) = staffer(2, 1, |h| vec![record(h, "s1", true, 201)]);
    let (generation, ranges) = (h.e.generation, h.e.ranges.clone());
    let (_, first) = drafts_in(&out).expect("a draft");
    let stale = DraftOutcome {
        applied: 0,
        revision: 0,
        stopped: Some(None),
    };
    let mut reload = None;
    for round in 1..=STALE_ROUNDS {
        let out = h.input(Input::Drafted(stale.clone()));
        if let Some(w) = watch_of(&out) {
            reload = Some((round, w));
            break;
        }
        h.now = h.e.retry_at().expect("a time to try again");
        let out = h.input(Input::Retry);
        assert_eq!(drafts_in(&out).map(|(_, o)| o), Some(first.clone()));
    }
    let (round, (new_generation, new_ranges)) = reload.expect("the staffer reads the job again");
    assert_eq!(
        round, STALE_ROUNDS,
        "not before {STALE_ROUNDS} stale rounds in a row"
    );
    assert_eq!(new_generation, generation + 1);
    assert_eq!(new_ranges, ranges, "the same ranges, read again");
    // The fresh snapshot shows what the view lacked: s1 was drafted already (the draft and
    // its slot key, under s1's lease). Nothing is left to draft.
    let mut kvs = vec![h.spec_kv(), h.epoch_kv("1"), h.record_kv()];
    kvs.push(h.primary_kv(0, "boss", LEASE));
    kvs.push(record(&mut h, "s1", true, 201));
    kvs.push(h.primary_kv(1, "s1", LeaseId(201)));
    kvs.push(draft_kv(
        &mut h,
        "s1",
        Draft { task: 1, slot: 0 },
        LeaseId(201),
    ));
    let revision = h.next_rev();
    let out = h.input(Input::Watch(vec![JobEvent::Snapshot {
        kvs,
        revision,
        generation: new_generation,
    }]));
    assert_eq!(drafts_in(&out), None, "{out:?}");
}

#[test]
fn a_draft_that_finds_the_view_stale_is_tried_again_after_a_pause() {
    let (mut h, _, out) = staffer(2, 1, |h| vec![record(h, "s1", true, 201)]);
    let (_, first) = drafts_in(&out).expect("a draft");
    let out = h.input(Input::Drafted(DraftOutcome {
        applied: 0,
        revision: 0,
        stopped: Some(None),
    }));
    assert_eq!(drafts_in(&out), None, "not at once: {out:?}");
    let at = h.e.retry_at().expect("a time to try again");
    h.now = at;
    let out = h.input(Input::Retry);
    let (_, again) = drafts_in(&out).expect("drafted again");
    assert_eq!(again, first);
    // The spare left meanwhile: nothing to draft.
    let out = h.input(Input::Drafted(DraftOutcome {
        applied: 0,
        revision: 0,
        stopped: Some(Some("etcd is gone".into())),
    }));
    assert_eq!(drafts_in(&out), None);
    h.delete(h.keys.node("s1"));
    h.now = h.e.retry_at().expect("a time to try again");
    let out = h.input(Input::Retry);
    assert_eq!(drafts_in(&out), None, "{out:?}");
}

#[test]
fn the_staffer_checks_the_backups_of_tasks_without_a_primary_and_its_backups_watch_as_it_does() {
    let (mut h, _, _) = staffer(4, 2, |h| vec![h.backup_kv(2, 1, "lonely", 300)]);
    let epoch = h.epoch_kv("2");
    let out = h.put(epoch);
    let monitor = out
        .iter()
        .rev()
        .find_map(|c| match c {
            Command::Monitor(w) => Some(w.clone()),
            _ => None,
        })
        .expect("a monitor list");
    assert!(
        monitor
            .iter()
            .any(|w: &Watched| w.task == 2 && w.node == "lonely"),
        "{monitor:?}"
    );
    // A backup of task 0 watches what the staffer watches: its promotion changes nothing.
    let mut b = H::drafted("b", 4, 2);
    let boss = b.primary_kv(0, "boss", 99);
    b.snapshot(1, vec![boss]);
    let d = draft_kv(&mut b, "b", Draft { task: 0, slot: 1 }, LEASE);
    let out = b.put(d);
    let (_, ranges) = watch_of(&out).expect("a holder's watch");
    assert_eq!(ranges, b.keys.staff_watch());
}

#[test]
fn a_drafted_slot_seen_before_its_draft_is_not_a_stray_and_a_new_backup_waits_for_its_view() {
    // n1 watches task 0's keys: its drafted backup slot of task 0 and the draft come in one
    // batch, in either order (two ranges of the watch): the slot key is kept, the draft taken.
    for draft_first in [false, true] {
        let mut h = H::drafted("n1", 4, 2);
        let boss = h.primary_kv(0, "boss", 99);
        h.snapshot(1, vec![boss]);
        let slot = h.backup_kv(0, 1, "n1", LEASE);
        let draft = Kv {
            key: h.keys.draft("n1").into_bytes(),
            value: serde_json::to_vec(&Draft { task: 0, slot: 1 }).unwrap(),
            ..slot.clone()
        };
        let evs = if draft_first {
            vec![JobEvent::Put(draft), JobEvent::Put(slot)]
        } else {
            vec![JobEvent::Put(slot), JobEvent::Put(draft)]
        };
        let out = h.input(Input::Watch(evs));
        assert!(
            !out.iter().any(|c| matches!(c, Command::DeleteKey { .. })),
            "draft first: {draft_first}: {out:?}"
        );
        assert!(matches!(h.e.mine(), MySlot::Backup { task: 0, k: 1, .. }));
    }
    // A backup of task 3 (outside the spare's view): no promotion before its view shows the
    // task's primary.
    let mut h = H::drafted("n2", 4, 2);
    let boss = h.primary_kv(0, "boss", 99);
    h.snapshot(1, vec![boss]);
    let d = draft_kv(&mut h, "n2", Draft { task: 3, slot: 1 }, LEASE);
    let out = h.put(d);
    assert_eq!(claims(&out), 0, "{out:?}");
    let out = h.input(Input::Deadline);
    assert_eq!(claims(&out), 0, "{out:?}");
}

#[test]
fn a_spare_registered_later_waits_its_turn_before_claiming_task_0() {
    let mut h = H::drafted("late", 4, 2);
    let lease = h.alive();
    // Registered 300 revisions after the job was created (the spec, next, is at about 11).
    h.input(Input::LeaseGranted {
        lease,
        registered_at: 311,
    });
    let start = h.now;
    let out = h.snapshot(0, vec![]);
    assert_eq!(claims(&out), 0, "not at once: {out:?}");
    let at = h.e.retry_at().expect("a turn");
    let wait = at - start;
    assert!(
        wait >= std::time::Duration::from_millis(295)
            && wait <= std::time::Duration::from_millis(300),
        "{wait:?}"
    );
    // Someone else's claim shows up before the turn: nothing to claim.
    let boss = h.primary_kv(0, "early", 99);
    h.put(boss);
    h.now = at;
    let out = h.input(Input::Retry);
    assert_eq!(claims(&out), 0, "{out:?}");
    // Task 0 loses its node later: no bootstrap any more, the spare claims it at once.
    let out = h.delete(h.keys.primary(0));
    assert_eq!(last_claim(&out).map(|c| c.task()), Some(0), "{out:?}");
}

/// The stall after every lease ended at once, through the agenda the runtime runs. A drafted
/// backup whose lease ends drops its slot, plans a spare's watch ranges and asks for a new
/// lease; with the new lease, task 0 shows no node, so it claims task 0 at once, and the won
/// claim plans the staffer's ranges. The watch must end up following the staffer's ranges:
/// run in any other order than decided, the spare's ranges replaced them and the staffer's
/// view was never read again.
#[test]
fn a_node_that_loses_its_slot_and_claims_task_0_in_one_turn_ends_up_watching_as_the_staffer() {
    use crate::node::engine::{Agenda, Next};
    let mut h = H::drafted("n1", 8, 2);
    let boss = h.primary_kv(0, "boss", 99);
    h.snapshot(3, vec![boss]);
    let draft = draft_kv(&mut h, "n1", Draft { task: 4, slot: 1 }, LEASE);
    let out = h.put(draft.clone());
    let (generation, ranges) = watch_of(&out).expect("a holder's watch");
    // The holder's first read: the slot key the draft's transaction created, with it.
    let mut kvs = vec![h.spec_kv(), h.epoch_kv("3"), h.record_kv()];
    kvs.push(h.primary_kv(0, "boss", 99));
    kvs.push(h.primary_kv(4, "p4", 98));
    let slot = h.backup_kv(4, 1, "n1", LEASE);
    kvs.push(Kv {
        create_revision: draft.mod_revision,
        mod_revision: draft.mod_revision,
        ..slot
    });
    kvs.push(draft);
    let revision = h.next_rev();
    h.input(Input::Watch(vec![JobEvent::Snapshot {
        kvs,
        revision,
        generation,
    }]));
    assert!(matches!(h.e.mine(), MySlot::Backup { task: 4, .. }));
    assert_eq!(h.e.ranges(), ranges);
    // Every lease ends: task 0's key goes first, then this node's lease.
    let out = h.delete(h.keys.primary(0));
    assert_eq!(
        claims(&out),
        0,
        "a backup of task 4 does not claim task 0: {out:?}"
    );
    let out = h.input(Input::Lease(LeaseState::Expired { id: LEASE }));
    let mut agenda = Agenda::new(out);
    let mut watched = Vec::new();
    let mut claimed = None;
    while let Some(next) = agenda.next(|| true) {
        let Next::Run(command) = next else {
            panic!("nothing here is guarded")
        };
        let answer = match command {
            Command::NewLease => {
                let lease = LeaseState::Alive {
                    id: LeaseId(8),
                    deadline: h.now + TTL,
                };
                h.input(Input::LeaseGranted {
                    lease,
                    registered_at: 50,
                })
            }
            Command::Claim(claim) => {
                claimed = Some(claim);
                let term = h.next_rev();
                h.input(Input::Claimed(claim, ClaimOutcome::Won(term)))
            }
            Command::Watch { generation, ranges } => {
                watched.push((generation, ranges));
                Vec::new()
            }
            _ => Vec::new(),
        };
        agenda.answer(answer);
    }
    assert_eq!(
        claimed.map(|c| c.task()),
        Some(0),
        "it claims task 0 in the same turn"
    );
    assert!(matches!(h.e.mine(), MySlot::Primary { task: 0, .. }));
    let generations: Vec<u64> = watched.iter().map(|(g, _)| *g).collect();
    assert!(
        generations.len() >= 2 && generations.windows(2).all(|w| w[0] < w[1]),
        "the watch's ranges are sent in the order decided: {generations:?}"
    );
    let (last_generation, last_ranges) = watched.last().expect("ranges sent").clone();
    assert_eq!(last_generation, h.e.generation);
    assert_eq!(
        last_ranges,
        h.keys.staff_watch(),
        "the watch follows the staffer's ranges"
    );
}
