//! Neighbour incidents: which neighbours lost their primary, and which got a new one, from the
//! primaries the view shows. Pure state, driven by the engine.

use std::collections::{BTreeMap, BTreeSet};

use crate::TaskId;

/// An incident of one neighbour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Incident {
    /// Its primary is gone.
    Failed(TaskId),
    /// A new primary serves it (always after a `Failed` of the same neighbour).
    Restarted(TaskId),
}

#[derive(Debug, Clone, Copy)]
struct Known {
    /// The primary's term last seen; `None` while it has none.
    term: Option<i64>,
    /// A `Failed` was reported and its `Restarted` is still due.
    failed: bool,
}

/// Tracks the neighbours of one task as seen by one primary of it.
#[derive(Debug, Default)]
pub(crate) struct NeighbourTracker {
    known: BTreeMap<TaskId, Known>,
}

impl NeighbourTracker {
    /// Compares `neighbours`' primaries (`primary(n)` = current term, if any) with what was
    /// seen before and returns the incidents, in order: for each neighbour a `Failed` when its
    /// primary went away, a `Restarted` when a new one came (preceded by a `Failed` if the gap
    /// was never seen). A neighbour seen for the first time raises nothing; a neighbour that has
    /// never had a primary raises nothing when it gets its first.
    pub(crate) fn update(
        &mut self,
        neighbours: &BTreeSet<TaskId>,
        primary: impl Fn(TaskId) -> Option<i64>,
    ) -> Vec<Incident> {
        self.known.retain(|n, _| neighbours.contains(n));
        let mut out = Vec::new();
        for &n in neighbours {
            let current = primary(n);
            let Some(k) = self.known.get_mut(&n) else {
                self.known.insert(
                    n,
                    Known {
                        term: current,
                        failed: false,
                    },
                );
                continue;
            };
            match (k.term, current) {
                (a, b) if a == b => {}
                (Some(_), None) => {
                    out.push(Incident::Failed(n));
                    *k = Known {
                        term: None,
                        failed: true,
                    };
                }
                (None, Some(t)) if !k.failed => {
                    // Its first primary: no incident.
                    k.term = Some(t);
                }
                (_, Some(t)) => {
                    if !k.failed {
                        out.push(Incident::Failed(n));
                    }
                    out.push(Incident::Restarted(n));
                    *k = Known {
                        term: Some(t),
                        failed: false,
                    };
                }
                (None, None) => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(
        tracker: &mut NeighbourTracker,
        set: &[TaskId],
        prim: &[(TaskId, i64)],
    ) -> Vec<Incident> {
        let set: BTreeSet<TaskId> = set.iter().copied().collect();
        let map: HashMap<TaskId, i64> = prim.iter().copied().collect();
        tracker.update(&set, |n| map.get(&n).copied())
    }

    #[test]
    fn failure_then_restart_once_each() {
        let mut t = NeighbourTracker::default();
        assert_eq!(run(&mut t, &[1, 2], &[(1, 10), (2, 20)]), vec![]);
        assert_eq!(run(&mut t, &[1, 2], &[(2, 20)]), vec![Incident::Failed(1)]);
        assert_eq!(run(&mut t, &[1, 2], &[(2, 20)]), vec![]);
        assert_eq!(
            run(&mut t, &[1, 2], &[(1, 30), (2, 20)]),
            vec![Incident::Restarted(1)]
        );
        assert_eq!(run(&mut t, &[1, 2], &[(1, 30), (2, 20)]), vec![]);
    }

    #[test]
    fn a_replacement_seen_without_the_gap_still_reports_both_in_order() {
        let mut t = NeighbourTracker::default();
        run(&mut t, &[1], &[(1, 10)]);
        assert_eq!(
            run(&mut t, &[1], &[(1, 11)]),
            vec![Incident::Failed(1), Incident::Restarted(1)]
        );
    }

    #[test]
    fn first_sight_and_first_primary_are_not_incidents() {
        let mut t = NeighbourTracker::default();
        assert_eq!(run(&mut t, &[1], &[]), vec![]);
        assert_eq!(run(&mut t, &[1], &[(1, 5)]), vec![]);
        assert_eq!(run(&mut t, &[1], &[]), vec![Incident::Failed(1)]);
    }

    #[test]
    fn neighbours_that_leave_the_set_are_forgotten() {
        let mut t = NeighbourTracker::default();
        run(&mut t, &[1], &[(1, 5)]);
        assert_eq!(run(&mut t, &[], &[]), vec![]);
        // Back as a neighbour with another primary: first sight again.
        assert_eq!(run(&mut t, &[1], &[(1, 9)]), vec![]);
    }
}
