//! Neighbour incidents reach the task once per incident, on every link that joins the two
//! tasks, only while the node acts as primary in an epoch.

use super::*;
use crate::node::engine::{Input, TaskCall};

#[test]
fn a_neighbour_that_fails_and_restarts_is_reported_once_each() {
    // Task 1 of a ring of 4: neighbours 0 and 2.
    let (mut h, _) = H::primary_of("n1", 1, 4, 0);
    let link = ring_link();
    let key = h.keys.primary(0);
    let out = h.delete(key);
    assert_eq!(
        calls(&out),
        vec![TaskCall::NeighbourFailed(link.clone(), 0)]
    );
    // Other changes, renewals: nothing new.
    let e1 = h.epoch_kv("1");
    assert_eq!(calls(&h.put(e1)), vec![]);
    assert_eq!(calls(&h.input(Input::Lease(h.alive()))), vec![]);
    // Task 3 is not a neighbour of 1.
    let key = h.keys.primary(3);
    assert_eq!(calls(&h.delete(key)), vec![]);
    // A new primary of task 0.
    let p = h.primary_kv(0, "n7", 107);
    assert_eq!(
        calls(&h.put(p)),
        vec![TaskCall::NeighbourRestarted(link.clone(), 0)]
    );
    // A primary replaced between two looks: failed, then restarted.
    let p = h.primary_kv(2, "n8", 108);
    assert_eq!(
        calls(&h.put(p)),
        vec![
            TaskCall::NeighbourFailed(link.clone(), 2),
            TaskCall::NeighbourRestarted(link, 2)
        ]
    );
}

#[test]
fn incidents_seen_while_the_lease_is_unconfirmed_are_reported_after_the_renewal() {
    let (mut h, _) = H::primary_of("n1", 1, 4, 0);
    h.input(Input::Lease(crate::etcd::lease::LeaseState::Suspended {
        id: LEASE,
    }));
    let key = h.keys.primary(2);
    assert_eq!(calls(&h.delete(key)), vec![]);
    assert_eq!(
        calls(&h.input(Input::Lease(h.alive()))),
        vec![TaskCall::NeighbourFailed(ring_link(), 2)]
    );
}
