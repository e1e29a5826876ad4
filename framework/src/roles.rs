//! Which slot a node should hold: a pure decision over the job's current state in etcd.
//!
//! The event loop feeds [`JobView`] from the etcd watch and asks [`decide`] what to do; the
//! etcd module carries the decision out with a transaction that re-checks its premise, so a
//! decision made on a stale view is harmless (the transaction fails and the node decides
//! again on a fresher view).

use std::collections::{btree_map, BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::etcd::keys::{EpochValue, Holder};
use crate::{TaskId, Term};

/// One occupied slot as etcd shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotKey {
    /// Who holds it.
    pub holder: Holder,
    /// The key's create revision (for a primary key: the term).
    pub create_revision: i64,
    /// The lease the key is attached to.
    pub lease: crate::etcd::lease::LeaseId,
}

impl SlotKey {
    /// The term of a primary slot: its key's create revision.
    pub fn term(&self) -> Term {
        crate::etcd::keys::term_of(self.create_revision)
    }
}

/// Tasks per chunk of a [`SlotMap`].
const CHUNK: TaskId = 32;

/// A slot's index in a [`SlotMap`]: which task it belongs to decides its chunk.
pub trait SlotIndex: Ord + Clone {
    /// The task of the slot.
    fn task(&self) -> TaskId;
}

impl SlotIndex for TaskId {
    fn task(&self) -> TaskId {
        *self
    }
}

impl SlotIndex for (TaskId, u32) {
    fn task(&self) -> TaskId {
        self.0
    }
}

type Chunk<K> = Arc<BTreeMap<K, Arc<SlotKey>>>;

/// Slot keys by slot, shared between the engine's view and the snapshots it publishes to the
/// slot's background work: cloning is O(1), and a change while a snapshot shares the map copies
/// only the chunk of 32 tasks it falls in (plus the list of chunks), never the whole job; the
/// keys themselves are shared, never copied. A reader can tell "no slot changed" by
/// [`SlotMap::same`]. Iteration is in slot order.
#[derive(Clone)]
pub struct SlotMap<K: Ord>(Arc<Vec<Chunk<K>>>);

impl<K: Ord> Default for SlotMap<K> {
    fn default() -> Self {
        SlotMap(Arc::new(Vec::new()))
    }
}

impl<K: SlotIndex + std::fmt::Debug> std::fmt::Debug for SlotMap<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: SlotIndex> PartialEq for SlotMap<K> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl<K: SlotIndex> Eq for SlotMap<K> {}

fn chunk_of<K: SlotIndex>(k: &K) -> usize {
    (k.task() / CHUNK) as usize
}

impl<K: SlotIndex> SlotMap<K> {
    /// Sets slot `k`; returns the key it replaced.
    pub fn insert(&mut self, k: K, v: SlotKey) -> Option<SlotKey> {
        let c = chunk_of(&k);
        let chunks = Arc::make_mut(&mut self.0);
        if chunks.len() <= c {
            chunks.resize_with(c + 1, Default::default);
        }
        Arc::make_mut(&mut chunks[c])
            .insert(k, Arc::new(v))
            .map(Arc::unwrap_or_clone)
    }

    /// Clears slot `k`; returns the key it held (no copy when it held none).
    pub fn remove(&mut self, k: &K) -> Option<SlotKey> {
        if !self.contains_key(k) {
            return None;
        }
        let chunks = Arc::make_mut(&mut self.0);
        Arc::make_mut(&mut chunks[chunk_of(k)])
            .remove(k)
            .map(Arc::unwrap_or_clone)
    }

    /// The key of slot `k`.
    pub fn get(&self, k: &K) -> Option<&SlotKey> {
        self.0.get(chunk_of(k))?.get(k).map(|v| &**v)
    }

    /// Whether slot `k` is taken.
    pub fn contains_key(&self, k: &K) -> bool {
        self.get(k).is_some()
    }

    /// The taken slots in order.
    pub fn iter(&self) -> SlotIter<'_, K> {
        SlotIter {
            chunks: self.0.iter(),
            current: None,
        }
    }

    /// The taken slots' indexes in order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    /// The taken slots of task `t` within `range`, in order.
    pub fn range_of_task<R: std::ops::RangeBounds<K>>(
        &self,
        t: TaskId,
        range: R,
    ) -> impl Iterator<Item = (&K, &SlotKey)> {
        self.0
            .get((t / CHUNK) as usize)
            .into_iter()
            .flat_map(move |c| c.range((range.start_bound().cloned(), range.end_bound().cloned())))
            .map(|(k, v)| (k, &**v))
    }

    /// Number of taken slots.
    pub fn len(&self) -> usize {
        self.0.iter().map(|c| c.len()).sum()
    }

    /// Whether no slot is taken.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|c| c.is_empty())
    }

    /// Whether `other` is this very map (no slot changed between them): O(1).
    pub fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<K: SlotIndex> std::ops::Index<&K> for SlotMap<K> {
    type Output = SlotKey;
    /// Panics if slot `k` is free (as `BTreeMap`'s index does).
    fn index(&self, k: &K) -> &SlotKey {
        self.get(k).unwrap_or_else(|| panic!("slot not taken"))
    }
}

/// The taken slots of a [`SlotMap`] in order.
#[derive(Debug)]
pub struct SlotIter<'a, K> {
    chunks: std::slice::Iter<'a, Chunk<K>>,
    current: Option<btree_map::Iter<'a, K, Arc<SlotKey>>>,
}

impl<'a, K> Iterator for SlotIter<'a, K> {
    type Item = (&'a K, &'a SlotKey);
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((k, v)) = self.current.as_mut().and_then(Iterator::next) {
                return Some((k, &**v));
            }
            self.current = Some(self.chunks.next()?.iter());
        }
    }
}

impl<'a, K: SlotIndex> IntoIterator for &'a SlotMap<K> {
    type Item = (&'a K, &'a SlotKey);
    type IntoIter = SlotIter<'a, K>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// The job's slots and epoch as last seen in etcd.
#[derive(Debug, Clone, Default)]
pub struct JobView {
    /// Number of tasks.
    pub tasks: u32,
    /// Nodes per task.
    pub replicas: u32,
    /// Primary key of each task that has one.
    pub primaries: SlotMap<TaskId>,
    /// Backup slots `(task, k)` that are taken.
    pub backups: SlotMap<(TaskId, u32)>,
    /// The epoch key's last good value (see [`judge_epoch`]); `None` before one was seen.
    pub epoch: Option<EpochValue>,
    /// What is wrong with the epoch key right now, if anything: the framework keeps working
    /// on [`epoch`](Self::epoch) and heals the key (see `node.rs`).
    pub epoch_fault: Option<EpochFault>,
    /// The highest etcd revision applied to this view.
    pub revision: i64,
    /// Whose slot keys the view shows: a task outside it may have slots the view does not
    /// know of.
    pub scope: Scope,
}

/// Which tasks' slot keys a view shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every task's: the staffer's view (task 0's primary, which drafts spares into free slots
    /// anywhere), or a tool's.
    #[default]
    All,
    /// These tasks' only: a slot holder's view (its own task, its neighbours' over the
    /// topology's period, task 0's, and those its work talks to outside the topology), or a
    /// spare's (task 0's only: it waits to be drafted, and claims task 0 if it has no node).
    Tasks(Arc<BTreeSet<TaskId>>),
}

impl Scope {
    /// Whether task `t`'s slot keys are in the scope.
    pub fn shows(&self, t: TaskId) -> bool {
        match self {
            Scope::All => true,
            Scope::Tasks(set) => set.contains(&t),
        }
    }
}

/// Why the value under the `epoch` key is not one the framework could have written next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EpochFaultKind {
    /// The value does not parse.
    Garbage(String),
    /// The key was deleted.
    Missing,
    /// A running epoch lower than the last good one.
    Backwards(u64),
    /// A running epoch more than one above the last good one (every move is `+1`).
    Ahead(u64),
    /// A running epoch after the job finished.
    AfterDone(u64),
}

/// A bad value under the `epoch` key, with the key's mod revision (0: the key is missing):
/// the guard of the transaction that heals it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochFault {
    /// What is wrong.
    pub kind: EpochFaultKind,
    /// The key's mod revision when the bad value was seen (0 when deleted).
    pub mod_revision: i64,
}

impl std::fmt::Display for EpochFaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EpochFaultKind::Garbage(reason) => write!(f, "garbage ({reason})"),
            EpochFaultKind::Missing => write!(f, "deleted"),
            EpochFaultKind::Backwards(n) => write!(f, "epoch {n}, lower than the job's"),
            EpochFaultKind::Ahead(n) => write!(f, "epoch {n}, beyond the job's next"),
            EpochFaultKind::AfterDone(n) => write!(f, "epoch {n} after the job finished"),
        }
    }
}

/// Judges a value written to the `epoch` key, given the last good value `last`. Every epoch
/// the framework writes is the next one (`inc_epoch`: `n` → `n + 1`), the same one (a heal,
/// `done n` by `shutdown_job`), or `done` (an operator's shutdown): anything else was written
/// by someone else (an operator's typo, a restored backup, a buggy tool) and is refused, so
/// that no primary enters an epoch the job never reached.
///
/// `snapshot`: the value comes from a full read (the node's first, or after its watch lost
/// etcd), so epochs may have moved several times unseen; only going backwards is refused then.
pub fn judge_epoch(
    last: Option<EpochValue>,
    value: &[u8],
    snapshot: bool,
) -> Result<EpochValue, EpochFaultKind> {
    let v = EpochValue::parse(value).map_err(EpochFaultKind::Garbage)?;
    match (last, v) {
        (None, v) | (Some(_), v @ EpochValue::Done(_)) => Ok(v),
        (Some(EpochValue::Done(_)), EpochValue::Running(n)) => Err(EpochFaultKind::AfterDone(n)),
        (Some(EpochValue::Running(m)), EpochValue::Running(n)) => {
            if n < m {
                Err(EpochFaultKind::Backwards(n))
            } else if n > m.saturating_add(1) && !snapshot {
                Err(EpochFaultKind::Ahead(n))
            } else {
                Ok(v)
            }
        }
    }
}

impl JobView {
    /// An empty view of a job.
    pub fn new(tasks: u32, replicas: u32) -> Self {
        Self {
            tasks,
            replicas,
            ..Self::default()
        }
    }

    /// Backups of task `t`, by slot.
    pub fn backups_of(&self, t: TaskId) -> impl Iterator<Item = (u32, &SlotKey)> {
        self.backups
            .range_of_task(t, (t, 0)..(t, u32::MAX))
            .map(|((_, k), s)| (*k, s))
    }

    /// Whether the job has finished.
    pub fn finished(&self) -> bool {
        matches!(self.epoch, Some(EpochValue::Done(_)))
    }

    /// Whether the view shows task `t`'s slot keys (see [`Scope`]).
    pub fn shows(&self, t: TaskId) -> bool {
        self.scope.shows(t)
    }

    /// Whether the view shows task `t` and it has no node at all (no primary, no backup).
    pub fn has_no_node(&self, t: TaskId) -> bool {
        self.shows(t) && !self.primaries.contains_key(&t) && self.backups_of(t).next().is_none()
    }
}

/// The slot a node believes it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MySlot {
    /// None: the node is a spare.
    Spare,
    /// Primary of `task` since revision `term`.
    Primary {
        /// The task.
        task: TaskId,
        /// The term: the create revision of the primary key.
        term: Term,
    },
    /// Backup slot `k` of `task`, whose key was created at `create_revision`.
    Backup {
        /// The task.
        task: TaskId,
        /// The slot.
        k: u32,
        /// Create revision of the backup key.
        create_revision: i64,
    },
}

/// What the node should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: keep the current slot (or stay a spare).
    Stay,
    /// Become primary of a task that has neither primary nor backup.
    ClaimPrimary(TaskId),
    /// Take a free backup slot of a task that has a primary.
    ClaimBackup(TaskId, u32),
    /// The backup's primary is gone: take over.
    Promote,
    /// The node's slot is no longer its own in etcd: stop acting in it.
    Lost,
}

/// Decides what node `me` should do. `pick(n)` chooses an index below `n` among equally good
/// candidates (random in production, so that nodes starting together spread over tasks).
pub fn decide(
    view: &JobView,
    me: &str,
    mine: MySlot,
    pick: &mut dyn FnMut(usize) -> usize,
) -> Decision {
    match mine {
        MySlot::Primary { task, term } => match view.primaries.get(&task) {
            Some(s) if s.holder.node == me && s.term() == term => Decision::Stay,
            _ => Decision::Lost,
        },
        MySlot::Backup {
            task,
            k,
            create_revision,
        } => match view.backups.get(&(task, k)) {
            Some(s) if s.holder.node == me && s.create_revision == create_revision => {
                if view.primaries.contains_key(&task) || view.finished() {
                    Decision::Stay
                } else {
                    Decision::Promote
                }
            }
            _ => Decision::Lost,
        },
        MySlot::Spare => {
            if view.finished() {
                return Decision::Stay;
            }
            let orphans: Vec<TaskId> = (0..view.tasks)
                .filter(|t| !view.primaries.contains_key(t) && view.backups_of(*t).next().is_none())
                .collect();
            if !orphans.is_empty() {
                return Decision::ClaimPrimary(orphans[pick(orphans.len()) % orphans.len()]);
            }
            // Fill the task with the fewest backups first, so replicas spread evenly.
            let mut best: Option<(usize, Vec<(TaskId, u32)>)> = None;
            for t in view.primaries.keys().copied() {
                let taken: Vec<u32> = view.backups_of(t).map(|(k, _)| k).collect();
                let Some(free) = (1..view.replicas).find(|k| !taken.contains(k)) else {
                    continue;
                };
                match &mut best {
                    Some((n, c)) if *n == taken.len() => c.push((t, free)),
                    Some((n, _)) if *n < taken.len() => {}
                    _ => best = Some((taken.len(), vec![(t, free)])),
                }
            }
            match best {
                Some((_, c)) if !c.is_empty() => {
                    let (t, k) = c[pick(c.len()) % c.len()];
                    Decision::ClaimBackup(t, k)
                }
                _ => Decision::Stay,
            }
        }
    }
}

/// A slot holder whose process a node checks for evidence of death (see
/// `exchange::liveness`), identified by its node and lease.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Watched {
    /// The task of the slot.
    pub task: TaskId,
    /// Whether the slot is the task's primary (else one of its backups).
    pub primary: bool,
    /// The holder's node id.
    pub node: String,
    /// Where it serves.
    pub addr: String,
    /// The lease its key is attached to (ended on evidence of death).
    pub lease: crate::etcd::lease::LeaseId,
}

impl Watched {
    fn of(task: TaskId, primary: bool, s: &SlotKey) -> Self {
        Watched {
            task,
            primary,
            node: s.holder.node.clone(),
            addr: s.holder.addr.clone(),
            lease: s.lease,
        }
    }
}

/// The slot holders node `me` checks for evidence of death, so that a dead one's lease ends
/// at once instead of after its TTL:
///
/// - a backup checks its task's primary (it takes over when the primary is gone);
/// - a primary checks no one here: it finds a dead backup when it replicates to it (a refused
///   port, or a "shutting down" confirmed by a ping), which ends that backup's lease at once,
///   without adding a periodic ping per backup to every primary;
/// - a spare checks the backups of every task without a primary: it never takes a task that
///   still has a backup, so a backup that died with its primary would otherwise keep the task
///   from being restored until the backup's lease expires.
///
/// Nothing is checked once the job has finished, nor holders without a lease or an address.
pub fn watched(view: &JobView, me: &str, mine: MySlot) -> Vec<Watched> {
    if view.finished() {
        return Vec::new();
    }
    let keep = |s: &SlotKey| s.holder.node != me && !s.lease.is_none() && !s.holder.addr.is_empty();
    let mut out: Vec<Watched> = match mine {
        MySlot::Backup { task, .. } => view
            .primaries
            .get(&task)
            .filter(|s| keep(s))
            .map(|s| Watched::of(task, true, s))
            .into_iter()
            .collect(),
        MySlot::Primary { .. } => Vec::new(),
        MySlot::Spare => view
            .backups
            .iter()
            .filter(|((t, _), s)| !view.primaries.contains_key(t) && keep(s))
            .map(|((t, _), s)| Watched::of(*t, false, s))
            .collect(),
    };
    out.sort();
    out.dedup();
    out
}

/// A backup slot as the primary keeps it in step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) k: u32,
    pub(crate) create_revision: i64,
    pub(crate) node: String,
    pub(crate) addr: String,
    pub(crate) lease: crate::etcd::lease::LeaseId,
}

impl Member {
    /// The backups of `task` in the view, except `me`.
    pub(crate) fn all_in(view: &JobView, task: crate::TaskId, me: &str) -> Vec<Member> {
        view.backups_of(task)
            .filter(|(_, s)| s.holder.node != me && !s.lease.is_none())
            .map(|(k, s)| Member {
                k,
                create_revision: s.create_revision,
                node: s.holder.node.clone(),
                addr: s.holder.addr.clone(),
                lease: s.lease,
            })
            .collect()
    }

    pub(crate) fn in_view(&self, view: &JobView, task: crate::TaskId) -> bool {
        view.backups
            .get(&(task, self.k))
            .is_some_and(|b| b.create_revision == self.create_revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(node: &str, rev: i64) -> SlotKey {
        SlotKey {
            holder: Holder {
                node: node.into(),
                addr: format!("{node}:1"),
            },
            create_revision: rev,
            lease: crate::etcd::lease::LeaseId(1),
        }
    }

    #[test]
    fn a_slot_map_shared_with_a_snapshot_is_copied_on_change_so_same_means_unchanged() {
        let mut m: SlotMap<TaskId> = SlotMap::default();
        m.insert(0, slot("a", 5));
        let published = m.clone();
        assert!(m.same(&published), "a clone is the same map");
        assert_eq!(m.remove(&7), None);
        assert!(
            m.same(&published),
            "removing an absent slot changes nothing"
        );
        m.insert(1, slot("b", 6));
        assert!(!m.same(&published), "a change copies the shared map");
        assert_eq!(published.len(), 1, "the snapshot keeps what it saw");
        let again = m.clone();
        m.remove(&0);
        assert!(!m.same(&again));
        assert_eq!((m.len(), again.len()), (1, 2));
    }
    #[test]
    fn a_slot_map_iterates_in_order_across_chunks_and_a_change_copies_one_chunk() {
        let mut m: SlotMap<(TaskId, u32)> = SlotMap::default();
        for t in [70, 3, 31, 32, 0, 100] {
            m.insert((t, 1), slot("n", i64::from(t)));
            m.insert((t, 2), slot("n", i64::from(t) + 1000));
        }
        let order: Vec<(TaskId, u32)> = m.keys().copied().collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted);
        assert_eq!(m.len(), 12);
        let published = m.clone();
        m.insert((33, 1), slot("x", 1));
        // The chunk of tasks 32..64 was copied; the others are still shared with the snapshot.
        for c in 0..published.0.len() {
            assert_eq!(Arc::ptr_eq(&m.0[c], &published.0[c]), c != 1, "chunk {c}");
        }
        let mut v = JobView::new(101, 3);
        v.backups = m.clone();
        let of_32: Vec<u32> = v.backups_of(32).map(|(k, _)| k).collect();
        assert_eq!(of_32, vec![1, 2]);
        assert_eq!(v.backups_of(33).count(), 1);
        assert_eq!(v.backups_of(34).count(), 0);
        assert_eq!(v.backups_of(1000).count(), 0);
        // Equal contents are equal, whatever chunks emptied on the way.
        m.remove(&(33, 1));
        assert_eq!(m, published);
        for t in [70, 100] {
            m.remove(&(t, 1));
            m.remove(&(t, 2));
        }
        let mut fresh: SlotMap<(TaskId, u32)> = SlotMap::default();
        for t in [3, 31, 32, 0] {
            fresh.insert((t, 1), slot("n", i64::from(t)));
            fresh.insert((t, 2), slot("n", i64::from(t) + 1000));
        }
        assert_eq!(m, fresh);
        assert!(!m.is_empty());
        assert_eq!(m[&(0, 2)].create_revision, 1000);
    }

    fn first(_: usize) -> usize {
        0
    }

    #[test]
    fn spare_claims_orphan_primary_first() {
        let mut v = JobView::new(3, 2);
        v.primaries.insert(0, slot("a", 5));
        assert_eq!(
            decide(&v, "me", MySlot::Spare, &mut first),
            Decision::ClaimPrimary(1)
        );
    }

    #[test]
    fn spare_never_claims_primary_of_a_task_with_a_backup() {
        let mut v = JobView::new(2, 2);
        v.primaries.insert(0, slot("a", 5));
        v.backups.insert((1, 1), slot("b", 6));
        // Task 1 has no primary but a backup that will take over; the spare takes task 0's backup slot.
        assert_eq!(
            decide(&v, "me", MySlot::Spare, &mut first),
            Decision::ClaimBackup(0, 1)
        );
    }

    #[test]
    fn spare_fills_task_with_fewest_backups_and_waits_when_full() {
        let mut v = JobView::new(2, 3);
        v.primaries.insert(0, slot("a", 5));
        v.primaries.insert(1, slot("b", 6));
        v.backups.insert((0, 1), slot("c", 7));
        assert_eq!(
            decide(&v, "me", MySlot::Spare, &mut first),
            Decision::ClaimBackup(1, 1)
        );
        v.backups.insert((1, 1), slot("d", 8));
        assert_eq!(
            decide(&v, "me", MySlot::Spare, &mut first),
            Decision::ClaimBackup(0, 2)
        );
        v.backups.insert((0, 2), slot("e", 9));
        v.backups.insert((1, 2), slot("f", 9));
        assert_eq!(decide(&v, "me", MySlot::Spare, &mut first), Decision::Stay);
    }

    #[test]
    fn backup_promotes_when_primary_gone() {
        let mut v = JobView::new(1, 2);
        let me = MySlot::Backup {
            task: 0,
            k: 1,
            create_revision: 7,
        };
        v.primaries.insert(0, slot("a", 5));
        v.backups.insert((0, 1), slot("me", 7));
        assert_eq!(decide(&v, "me", me, &mut first), Decision::Stay);
        v.primaries.remove(&0);
        assert_eq!(decide(&v, "me", me, &mut first), Decision::Promote);
        v.backups.remove(&(0, 1));
        assert_eq!(decide(&v, "me", me, &mut first), Decision::Lost);
    }

    #[test]
    fn primary_loses_when_key_gone_or_replaced() {
        let mut v = JobView::new(1, 1);
        let me = MySlot::Primary { task: 0, term: 5 };
        v.primaries.insert(0, slot("me", 5));
        assert_eq!(decide(&v, "me", me, &mut first), Decision::Stay);
        v.primaries.insert(0, slot("me", 9)); // an older incarnation's key, or a new term
        assert_eq!(decide(&v, "me", me, &mut first), Decision::Lost);
        v.primaries.remove(&0);
        assert_eq!(decide(&v, "me", me, &mut first), Decision::Lost);
    }

    #[test]
    fn epoch_values_are_judged_against_the_last_good_one() {
        use EpochValue::{Done, Running};
        let j = |last, v: &str, snap| judge_epoch(last, v.as_bytes(), snap);
        // The first value seen is believed (nothing to compare with).
        assert_eq!(j(None, "7", false), Ok(Running(7)));
        assert_eq!(j(None, "done 3", false), Ok(Done(3)));
        // inc_epoch moves by one; a heal rewrites the same value.
        assert_eq!(j(Some(Running(4)), "5", false), Ok(Running(5)));
        assert_eq!(j(Some(Running(4)), "4", false), Ok(Running(4)));
        // A shutdown, by the job or an operator.
        assert_eq!(j(Some(Running(4)), "done 4", false), Ok(Done(4)));
        // Third parties.
        assert!(matches!(
            j(Some(Running(4)), "garbage", false),
            Err(EpochFaultKind::Garbage(_))
        ));
        assert_eq!(
            j(Some(Running(4)), "2", false),
            Err(EpochFaultKind::Backwards(2))
        );
        assert_eq!(
            j(Some(Running(4)), "1000", false),
            Err(EpochFaultKind::Ahead(1000))
        );
        assert_eq!(
            j(Some(Done(4)), "5", false),
            Err(EpochFaultKind::AfterDone(5))
        );
        // After a full read epochs may have moved unseen, but never backwards.
        assert_eq!(j(Some(Running(4)), "9", true), Ok(Running(9)));
        assert_eq!(
            j(Some(Running(4)), "3", true),
            Err(EpochFaultKind::Backwards(3))
        );
    }

    #[test]
    fn nobody_claims_after_finish() {
        let mut v = JobView::new(2, 2);
        v.epoch = Some(EpochValue::Done(4));
        assert_eq!(decide(&v, "me", MySlot::Spare, &mut first), Decision::Stay);
        v.backups.insert((0, 1), slot("me", 3));
        let me = MySlot::Backup {
            task: 0,
            k: 1,
            create_revision: 3,
        };
        assert_eq!(decide(&v, "me", me, &mut first), Decision::Stay);
    }

    #[test]
    fn who_watches_whom() {
        let mut v = JobView::new(3, 2);
        v.primaries.insert(0, slot("p0", 5));
        v.backups.insert((0, 1), slot("b0", 6));
        // Task 1 lost its primary; its backup b1 should take over (if it is alive).
        v.backups.insert((1, 1), slot("b1", 7));
        let names = |w: Vec<Watched>| -> Vec<(TaskId, bool, String)> {
            w.into_iter().map(|w| (w.task, w.primary, w.node)).collect()
        };
        let backup = MySlot::Backup {
            task: 0,
            k: 1,
            create_revision: 6,
        };
        assert_eq!(
            names(watched(&v, "b0", backup)),
            vec![(0, true, "p0".into())]
        );
        let primary = MySlot::Primary { task: 0, term: 5 };
        assert!(watched(&v, "p0", primary).is_empty());
        // A spare checks only the backups of tasks without a primary: the ones it would
        // otherwise wait for.
        assert_eq!(
            names(watched(&v, "me", MySlot::Spare)),
            vec![(1, false, "b1".into())]
        );
        // Holders without a lease are not checked, nor anything after the job finished.
        v.backups.insert(
            (1, 1),
            SlotKey {
                lease: crate::etcd::lease::LeaseId::NONE,
                ..slot("b1", 7)
            },
        );
        assert!(watched(&v, "me", MySlot::Spare).is_empty());
        v.epoch = Some(EpochValue::Done(3));
        assert!(watched(&v, "b0", backup).is_empty());
        assert!(watched(&v, "p0", primary).is_empty());
    }
}
