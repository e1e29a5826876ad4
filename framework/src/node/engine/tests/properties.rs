//! Property tests: several engines share a model of etcd (its compare-and-swaps as the etcd
//! module writes them, leases that end and take their keys along, a watch that reaches each
//! node late). Random interleavings of watch deliveries, crashes, partitions, lease expiries,
//! restarts, epoch moves, replication and failed claims; after every step the invariants hold.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;

use super::*;
use crate::etcd::keys::{JobKey, KeyRange, NodeRecord};
use crate::etcd::lease::LeaseId;
use crate::node::engine::{Agenda, Claim, ClaimOutcome, Command, Input, Next, TaskCall};
use crate::roles::MySlot;

const TASKS: u32 = 2;
const REPLICAS: u32 = 2;
const NODES: usize = 5;

/// etcd as far as slots go.
struct Model {
    keys: JobKeys,
    rev: i64,
    kvs: BTreeMap<Vec<u8>, Kv>,
    next_lease: i64,
    epoch: u64,
    done: bool,
}

impl Model {
    fn new() -> Model {
        let keys = JobKeys::new(JOB);
        let mut m = Model {
            keys,
            rev: 1,
            kvs: BTreeMap::new(),
            next_lease: 100,
            epoch: 0,
            done: false,
        };
        let spec_key = m.keys.spec();
        m.put(spec_key, spec(TASKS, REPLICAS), 0);
        let epoch_key = m.keys.epoch();
        m.put(epoch_key, b"0".to_vec(), 0);
        m
    }

    fn put(&mut self, key: String, value: Vec<u8>, lease: impl Into<LeaseId>) -> JobEvent {
        let lease = lease.into().0;
        self.rev += 1;
        let key = key.into_bytes();
        let create_revision = self.kvs.get(&key).map_or(self.rev, |kv| kv.create_revision);
        let kv = Kv {
            key: key.clone(),
            value,
            create_revision,
            mod_revision: self.rev,
            lease,
        };
        self.kvs.insert(key, kv.clone());
        JobEvent::Put(kv)
    }

    fn delete(&mut self, key: &[u8]) -> Option<JobEvent> {
        self.kvs.remove(key)?;
        self.rev += 1;
        Some(JobEvent::Delete {
            key: key.to_vec(),
            revision: self.rev,
        })
    }

    fn expire(&mut self, lease: LeaseId) -> Vec<JobEvent> {
        let gone: Vec<Vec<u8>> = self
            .kvs
            .values()
            .filter(|kv| kv.lease == lease.0)
            .map(|kv| kv.key.clone())
            .collect();
        gone.iter().filter_map(|k| self.delete(k)).collect()
    }

    fn has(&self, key: &str) -> Option<&Kv> {
        self.kvs.get(key.as_bytes())
    }

    /// The etcd module's transactions (`claim_primary`, `claim_backup`, `promote`).
    fn claim(&mut self, claim: Claim, me: &str) -> (Option<i64>, Vec<JobEvent>) {
        let value = serde_json::to_vec(&holder(me)).unwrap();
        if self.done {
            return (None, vec![]);
        }
        match claim {
            Claim::Primary { task, lease } => {
                let free = self.has(&self.keys.primary(task)).is_none()
                    && (1..REPLICAS).all(|k| self.has(&self.keys.backup(task, k)).is_none());
                if !free {
                    return (None, vec![]);
                }
                let ev = self.put(self.keys.primary(task), value, lease);
                (Some(self.rev), vec![ev])
            }
            Claim::Backup { task, k, lease } => {
                if self.has(&self.keys.backup(task, k)).is_some() {
                    return (None, vec![]);
                }
                let ev = self.put(self.keys.backup(task, k), value, lease);
                (Some(self.rev), vec![ev])
            }
            Claim::Promote {
                task,
                k,
                create_revision,
                lease,
            } => {
                let ours = self
                    .has(&self.keys.backup(task, k))
                    .is_some_and(|kv| kv.create_revision == create_revision);
                if !ours || self.has(&self.keys.primary(task)).is_some() {
                    return (None, vec![]);
                }
                let mut evs = self
                    .delete(self.keys.backup(task, k).as_bytes())
                    .into_iter()
                    .collect::<Vec<_>>();
                evs.push(self.put(self.keys.primary(task), value, lease));
                (Some(self.rev), evs)
            }
        }
    }

    /// A read of `ranges`, as the watch of `generation` sends it.
    fn snapshot(&self, ranges: &[KeyRange], generation: u64) -> JobEvent {
        JobEvent::Snapshot {
            kvs: self
                .kvs
                .values()
                .filter(|kv| ranges.iter().any(|r| r.contains(&kv.key)))
                .cloned()
                .collect(),
            revision: self.rev,
            generation,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseMode {
    Alive,
    Suspended,
}

struct SimNode {
    name: String,
    engine: Engine,
    inbox: VecDeque<JobEvent>,
    /// What its watch follows (the engine's last `Command::Watch`): only these keys reach it.
    ranges: Vec<KeyRange>,
    lease: LeaseId,
    mode: LeaseMode,
    up: bool,
    holds_slot: bool,
    /// The term entered under and the last epoch entered under it.
    entering: Option<(u64, Option<u64>)>,
    fail_next_claim: bool,
}

struct Sim {
    model: Model,
    nodes: Vec<SimNode>,
    now: tokio::time::Instant,
}

#[derive(Debug, Clone)]
enum Action {
    Deliver(usize, usize),
    Crash(usize),
    Restart(usize),
    Partition(usize),
    Heal(usize),
    Expire(usize),
    MoveEpoch,
    Replicate(usize),
    FailNextClaim(usize),
    Retry(usize),
}

fn action() -> impl Strategy<Value = Action> {
    let n = 0..NODES;
    prop_oneof![
        6 => (n.clone(), 1..4usize).prop_map(|(i, k)| Action::Deliver(i, k)),
        1 => n.clone().prop_map(Action::Crash),
        2 => n.clone().prop_map(Action::Restart),
        1 => n.clone().prop_map(Action::Partition),
        1 => n.clone().prop_map(Action::Heal),
        1 => n.clone().prop_map(Action::Expire),
        2 => Just(Action::MoveEpoch),
        2 => n.clone().prop_map(Action::Replicate),
        1 => n.clone().prop_map(Action::FailNextClaim),
        2 => n.prop_map(Action::Retry),
    ]
}

impl Sim {
    fn new() -> Sim {
        let mut sim = Sim {
            model: Model::new(),
            nodes: Vec::new(),
            now: tokio::time::Instant::now(),
        };
        for i in 0..NODES {
            let engine = super::new_engine(&format!("n{i}"), TASKS, REPLICAS);
            sim.nodes.push(SimNode {
                name: format!("n{i}"),
                engine,
                inbox: VecDeque::new(),
                ranges: Vec::new(),
                lease: LeaseId::NONE,
                mode: LeaseMode::Alive,
                up: false,
                holds_slot: false,
                entering: None,
                fail_next_claim: false,
            });
            sim.start(i);
        }
        sim
    }

    fn broadcast(&mut self, evs: Vec<JobEvent>) {
        for n in self.nodes.iter_mut().filter(|n| n.up) {
            let ranges = &n.ranges;
            n.inbox.extend(
                evs.iter()
                    .filter(|ev| match ev {
                        JobEvent::Put(kv) => ranges.iter().any(|r| r.contains(&kv.key)),
                        JobEvent::Delete { key, .. } => ranges.iter().any(|r| r.contains(key)),
                        _ => true,
                    })
                    .cloned(),
            );
        }
    }

    fn lease_state(&self, i: usize) -> LeaseState {
        let n = &self.nodes[i];
        match n.mode {
            LeaseMode::Alive => LeaseState::Alive {
                id: n.lease,
                deadline: self.now + TTL,
            },
            LeaseMode::Suspended => LeaseState::Suspended { id: n.lease },
        }
    }

    /// A fresh lease and registration for node `i`; the engine learns it.
    fn grant(&mut self, i: usize) -> Vec<Command> {
        self.model.next_lease += 1;
        let lease = LeaseId(self.model.next_lease);
        self.nodes[i].lease = lease;
        self.nodes[i].mode = LeaseMode::Alive;
        let record = NodeRecord {
            addr: holder(&self.nodes[i].name).addr,
            stall: None,
            drafted: false,
        };
        let key = self.model.keys.node(&self.nodes[i].name);
        let ev = self
            .model
            .put(key, serde_json::to_vec(&record).unwrap(), lease);
        let registered_at = self.model.rev;
        self.broadcast(vec![ev]);
        let state = self.lease_state(i);
        self.nodes[i].engine.handle(
            Input::LeaseGranted {
                lease: state,
                registered_at,
            },
            self.now,
        )
    }

    fn start(&mut self, i: usize) {
        self.nodes[i].engine = super::new_engine(&self.nodes[i].name, TASKS, REPLICAS);
        self.nodes[i].up = true;
        self.nodes[i].inbox.clear();
        self.nodes[i].holds_slot = false;
        self.nodes[i].entering = None;
        self.nodes[i].ranges = self.model.keys.node_watch(&self.nodes[i].name);
        let out = self.grant(i);
        self.run(i, out);
        // The watch starts with a read of a spare's ranges.
        let snap = self.model.snapshot(&self.nodes[i].ranges, 0);
        self.nodes[i].inbox.clear();
        self.nodes[i].inbox.push_back(snap);
    }

    fn input(&mut self, i: usize, input: Input) {
        let out = self.nodes[i].engine.handle(input, self.now);
        self.run(i, out);
    }

    /// Executes node `i`'s commands as the runtime does, checking each against the invariants.
    fn run(&mut self, i: usize, out: Vec<Command>) {
        assert!(
            out.iter()
                .filter(|c| matches!(c, Command::Claim(_)))
                .count()
                <= 1,
            "two claims in one batch: {out:?}"
        );
        let mut agenda = Agenda::new(out);
        let mut promoted_without_state = false;
        loop {
            let alive = self.nodes[i].mode == LeaseMode::Alive;
            let cmd = match agenda.next(|| alive) {
                None => break,
                Some(Next::Run(cmd)) => cmd,
                Some(Next::Refuse(cmd)) => {
                    // The runtime's guard.
                    let more = self.nodes[i]
                        .engine
                        .handle(Input::GuardFailed(cmd), self.now);
                    agenda.answer(more);
                    continue;
                }
            };
            let node = &mut self.nodes[i];
            let more = match cmd {
                Command::Claim(claim) => {
                    let synced = node.engine.slot().is_some_and(|s| s.replica.is_some());
                    let (outcome, evs) = if std::mem::take(&mut node.fail_next_claim) {
                        (ClaimOutcome::Failed("injected".into()), vec![])
                    } else {
                        let name = node.name.clone();
                        match self.model.claim(claim, &name) {
                            (Some(rev), evs) => (ClaimOutcome::Won(rev), evs),
                            (None, evs) => (ClaimOutcome::Lost, evs),
                        }
                    };
                    if matches!(claim, Claim::Promote { .. })
                        && matches!(outcome, ClaimOutcome::Won(_))
                    {
                        promoted_without_state = !synced;
                    }
                    self.broadcast(evs);
                    self.nodes[i]
                        .engine
                        .handle(Input::Claimed(claim, outcome), self.now)
                }
                Command::DeleteKey {
                    key, mod_revision, ..
                } => {
                    let current = self.model.kvs.get(&key).map(|kv| kv.mod_revision);
                    if current == Some(mod_revision) {
                        let evs = self.model.delete(&key).into_iter().collect();
                        self.broadcast(evs);
                    }
                    vec![]
                }
                Command::BuildSlot { .. } => {
                    assert!(!node.holds_slot, "{}: a second slot", node.name);
                    node.holds_slot = true;
                    node.entering = None;
                    vec![]
                }
                Command::DropSlot(_) => {
                    assert!(node.holds_slot, "{}: dropped no slot", node.name);
                    node.holds_slot = false;
                    node.entering = None;
                    vec![]
                }
                Command::RestoreCheckpoint(_) => {
                    assert!(
                        promoted_without_state,
                        "{}: restored a checkpoint over state",
                        node.name
                    );
                    promoted_without_state = false;
                    vec![]
                }
                Command::PrimaryTerm(term) => {
                    assert!(node.holds_slot);
                    node.entering = Some((term, None));
                    vec![]
                }
                Command::Call(call) => {
                    assert!(node.holds_slot, "{}: {call:?} without a slot", node.name);
                    if let TaskCall::BecamePrimary(_) = call {
                        assert!(
                            !promoted_without_state,
                            "{}: promoted without state and without the checkpoint",
                            node.name
                        );
                    }
                    vec![]
                }
                Command::EnterEpoch { epoch, .. } => {
                    assert!(node.holds_slot);
                    let Some((term, last)) = node.entering else {
                        panic!("{}: an epoch entered before a term", node.name);
                    };
                    assert!(
                        last.is_none_or(|last| epoch > last),
                        "{}: epoch {epoch} after {last:?} under term {term}",
                        node.name
                    );
                    assert!(
                        epoch <= self.model.epoch,
                        "{}: entered {epoch}, etcd has {}",
                        node.name,
                        self.model.epoch
                    );
                    assert!(
                        matches!(node.engine.mine(), MySlot::Primary { term: t, .. } if t == term),
                        "{}: entered as non-primary",
                        node.name
                    );
                    node.entering = Some((term, Some(epoch)));
                    vec![]
                }
                Command::NewLease => self.grant(i),
                Command::Watch { generation, ranges } => {
                    // The watch drops its stream and reads the new ranges: what was queued
                    // still arrives first, then the new snapshot, then only their events.
                    let snap = self.model.snapshot(&ranges, generation);
                    node.ranges = ranges;
                    node.inbox.push_back(snap);
                    vec![]
                }
                Command::Exit(_) => {
                    self.nodes[i].up = false;
                    vec![]
                }
                _ => vec![],
            };
            agenda.answer(more);
        }
        // The watch follows the ranges the engine last asked for: a command decided earlier
        // never ran after a later one and replaced them.
        let node = &self.nodes[i];
        if node.up {
            assert_eq!(
                node.ranges,
                node.engine.ranges(),
                "{}: the watch does not follow the engine's ranges",
                node.name
            );
        }
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::Deliver(i, k) => {
                if !self.nodes[i].up || self.nodes[i].inbox.is_empty() {
                    return;
                }
                let k = k.min(self.nodes[i].inbox.len());
                let batch: Vec<JobEvent> = self.nodes[i].inbox.drain(..k).collect();
                self.input(i, Input::Watch(batch));
            }
            Action::Crash(i) => {
                if !self.nodes[i].up {
                    return;
                }
                self.nodes[i].up = false;
                // Peers' evidence or the TTL: etcd ends its lease.
                let evs = self.model.expire(self.nodes[i].lease);
                self.broadcast(evs);
            }
            Action::Restart(i) => {
                if !self.nodes[i].up {
                    self.start(i);
                }
            }
            Action::Partition(i) => {
                if self.nodes[i].up && self.nodes[i].mode == LeaseMode::Alive {
                    self.nodes[i].mode = LeaseMode::Suspended;
                    let state = self.lease_state(i);
                    self.input(i, Input::Lease(state));
                }
            }
            Action::Heal(i) => {
                if self.nodes[i].up && self.nodes[i].mode == LeaseMode::Suspended {
                    self.nodes[i].mode = LeaseMode::Alive;
                    let state = self.lease_state(i);
                    self.input(i, Input::Lease(state));
                }
            }
            Action::Expire(i) => {
                if self.nodes[i].up && self.nodes[i].mode == LeaseMode::Suspended {
                    let lease = self.nodes[i].lease;
                    let evs = self.model.expire(lease);
                    self.broadcast(evs);
                    self.input(i, Input::Lease(LeaseState::Expired { id: lease }));
                }
            }
            Action::MoveEpoch => {
                if !self.model.done {
                    self.model.epoch += 1;
                    let key = self.model.keys.epoch();
                    let value = self.model.epoch.to_string().into_bytes();
                    let ev = self.model.put(key, value, 0);
                    self.broadcast(vec![ev]);
                }
            }
            Action::Replicate(i) => {
                let n = &self.nodes[i];
                if !n.up || n.mode != LeaseMode::Alive {
                    return;
                }
                let MySlot::Backup { task, .. } = n.engine.mine() else {
                    return;
                };
                let Some(p) = self.model.has(&self.model.keys.primary(task)) else {
                    return;
                };
                let term = p.create_revision as u64;
                if n.engine
                    .view()
                    .and_then(|v| v.primaries.get(&task))
                    .map(|p| p.create_revision as u64)
                    != Some(term)
                {
                    return;
                }
                self.input(i, Input::Replicated { term, index: 0 });
            }
            Action::FailNextClaim(i) => self.nodes[i].fail_next_claim = true,
            Action::Retry(i) => {
                // The timer fires at its time (for this input only: the leases' deadlines
                // stay where the sim's clock put them).
                if let Some(at) = self.nodes[i].engine.retry_at().filter(|_| self.nodes[i].up) {
                    let out = self.nodes[i].engine.handle(Input::Retry, at.max(self.now));
                    self.run(i, out);
                }
            }
        }
    }

    /// Every node that acts as primary holds the key etcd shows for its task, with its term.
    fn check(&self) {
        for n in self
            .nodes
            .iter()
            .filter(|n| n.up && n.mode == LeaseMode::Alive)
        {
            if let MySlot::Primary { task, term } = n.engine.mine() {
                let key = self.model.keys.primary(task);
                let kv = self.model.has(&key);
                let holder: Option<Holder> =
                    kv.and_then(|kv| serde_json::from_slice(&kv.value).ok());
                assert!(
                    kv.is_some_and(|kv| crate::etcd::keys::term_of(kv.create_revision) == term)
                        && holder.is_some_and(|h| h.node == n.name),
                    "{} acts as primary of {task} (term {term}) but etcd shows {kv:?}",
                    n.name
                );
            }
        }
    }

    /// No partitions, every event delivered, every retry taken: nothing left to do.
    fn settle(&mut self) {
        for i in 0..NODES {
            self.act(Action::Heal(i));
            self.nodes[i].fail_next_claim = false;
        }
        for _ in 0..50 {
            let mut busy = false;
            for i in 0..NODES {
                if self.nodes[i].up && !self.nodes[i].inbox.is_empty() {
                    busy = true;
                    self.act(Action::Deliver(i, usize::MAX));
                }
                if self.nodes[i].up && self.nodes[i].engine.retry_at().is_some() {
                    busy = true;
                    self.act(Action::Retry(i));
                }
            }
            self.check();
            if !busy {
                return;
            }
        }
        panic!("the engines never settled");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    #[test]
    fn engines_sharing_etcd_keep_the_invariants_under_any_interleaving(
        actions in proptest::collection::vec(action(), 1..120)
    ) {
        let mut sim = Sim::new();
        for a in actions {
            sim.act(a);
            sim.check();
        }
        sim.settle();
        // Liveness, once every event is seen: a task with a backup has a primary (the backup
        // promotes), and no slot is free while a spare waits.
        let taken = |key: String| sim.model.has(&key).is_some();
        for t in 0..TASKS {
            let backed = (1..REPLICAS).any(|k| taken(sim.model.keys.backup(t, k)));
            prop_assert!(!backed || taken(sim.model.keys.primary(t)), "task {} has a backup but no primary", t);
        }
        let spares = sim.nodes.iter().filter(|n| n.up && n.engine.mine() == MySlot::Spare).count();
        let slots = sim.model.kvs.keys().filter(|k| {
            matches!(sim.model.keys.parse(k), Some(JobKey::Primary(_) | JobKey::Backup(..)))
        }).count() as u32;
        prop_assert!(spares == 0 || slots == TASKS * REPLICAS, "{} spares wait while {} of {} slots are taken", spares, slots, TASKS * REPLICAS);
        for n in sim.nodes.iter().filter(|n| n.up) {
            // Each up node that holds a slot in etcd knows it (and holds it).
            let holds = !matches!(n.engine.mine(), MySlot::Spare);
            prop_assert_eq!(holds, n.holds_slot, "{}", n.name);
        }
    }
}
