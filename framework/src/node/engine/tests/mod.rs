//! Engine tests: each area's decisions as command lists (openraft's `engine/tests` style), and
//! property tests that drive several engines against a model of etcd with random
//! interleavings and check the invariants. No etcd, no network, no clock: they run in
//! milliseconds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admission_test;
mod epochs_test;
mod lifecycle_test;
mod neighbours_test;
mod properties;
mod slots_test;
mod staff_test;
mod view_test;
mod watch_test;

use std::collections::BTreeMap;
use std::time::Duration;

use taskgraph_topology::Ring;
use tokio::time::Instant;

use super::{Command, Engine, Input, Staffing};
use crate::config::JobSpec;
use crate::etcd::keys::{Holder, JobKeys};
use crate::etcd::lease::{LeaseId, LeaseState};
use crate::etcd::watch::JobEvent;
use crate::etcd::Kv;

pub(super) const JOB: &str = "j";
/// The lease every harness engine starts with.
pub(super) const LEASE: LeaseId = LeaseId(7);
/// The lease TTL the harness's leases are alive for.
pub(super) const TTL: Duration = Duration::from_secs(10);

/// The link every harness job has: a ring in both directions.
pub(super) fn ring_link() -> String {
    Ring::NEIGHBOURS.to_owned()
}

pub(super) fn holder(node: &str) -> Holder {
    Holder {
        node: node.into(),
        addr: format!("{node}:1"),
    }
}

pub(super) fn spec(tasks: u32, replicas: u32) -> Vec<u8> {
    let ring = Ring::new(tasks).unwrap().bidirectional_links();
    JobSpec {
        version: JobSpec::VERSION,
        tasks,
        replicas,
        links: ring.describe(),
        params: BTreeMap::new(),
        created_ms: None,
    }
    .encode()
    .into_bytes()
}

pub(super) fn new_engine(me: &str, tasks: u32, replicas: u32) -> Engine {
    Engine::new(
        holder(me),
        JOB,
        tasks,
        replicas,
        Ring::new(tasks).unwrap().bidirectional_links(),
        spec(tasks, replicas),
        Staffing::SelfClaimed,
        1,
    )
}

/// One engine, its clock, and a job's keys in etcd as the test writes them.
pub(super) struct H {
    pub(super) e: Engine,
    pub(super) now: Instant,
    pub(super) keys: JobKeys,
    pub(super) rev: i64,
    pub(super) tasks: u32,
    pub(super) replicas: u32,
    pub(super) me: String,
}

impl H {
    /// Engine `me` of a job of `tasks` × `replicas`, with a live lease, no view yet.
    pub(super) fn new(me: &str, tasks: u32, replicas: u32) -> H {
        H::with_engine(me, tasks, replicas, new_engine(me, tasks, replicas))
    }

    /// As [`H::new`], for a node that waits to be drafted (or drafts, as task 0's primary).
    pub(super) fn drafted(me: &str, tasks: u32, replicas: u32) -> H {
        let e = Engine::new(
            holder(me),
            JOB,
            tasks,
            replicas,
            Ring::new(tasks).unwrap().bidirectional_links(),
            spec(tasks, replicas),
            Staffing::Drafted,
            1,
        );
        H::with_engine(me, tasks, replicas, e)
    }

    /// As [`H::new`], for a job whose tasks are joined by `links`.
    pub(super) fn with_links(
        me: &str,
        tasks: u32,
        replicas: u32,
        links: taskgraph_topology::Links,
    ) -> H {
        let e = Engine::new(
            holder(me),
            JOB,
            tasks,
            replicas,
            links,
            spec(tasks, replicas),
            Staffing::SelfClaimed,
            1,
        );
        H::with_engine(me, tasks, replicas, e)
    }

    fn with_engine(me: &str, tasks: u32, replicas: u32, e: Engine) -> H {
        let mut h = H {
            e,
            now: Instant::now(),
            keys: JobKeys::new(JOB),
            rev: 10,
            tasks,
            replicas,
            me: me.to_owned(),
        };
        let lease = h.alive();
        let out = h.e.handle(
            Input::LeaseGranted {
                lease,
                registered_at: 2,
            },
            h.now,
        );
        assert!(
            acts(&out).is_empty(),
            "nothing to do without a view: {out:?}"
        );
        h
    }

    pub(super) fn alive(&self) -> LeaseState {
        LeaseState::Alive {
            id: LEASE,
            deadline: self.now + TTL,
        }
    }

    pub(super) fn next_rev(&mut self) -> i64 {
        self.rev += 1;
        self.rev
    }

    /// A key as etcd would show it after a put now.
    pub(super) fn kv(
        &mut self,
        key: String,
        value: impl Into<Vec<u8>>,
        lease: impl Into<LeaseId>,
    ) -> Kv {
        let lease: LeaseId = lease.into();
        let rev = self.next_rev();
        Kv {
            key: key.into_bytes(),
            value: value.into(),
            create_revision: rev,
            mod_revision: rev,
            lease: lease.0,
        }
    }

    pub(super) fn epoch_kv(&mut self, value: &str) -> Kv {
        let key = self.keys.epoch();
        self.kv(key, value, 0)
    }

    pub(super) fn primary_kv(&mut self, task: u32, node: &str, lease: impl Into<LeaseId>) -> Kv {
        let key = self.keys.primary(task);
        self.kv(key, serde_json::to_vec(&holder(node)).unwrap(), lease)
    }

    pub(super) fn backup_kv(
        &mut self,
        task: u32,
        k: u32,
        node: &str,
        lease: impl Into<LeaseId>,
    ) -> Kv {
        let key = self.keys.backup(task, k);
        self.kv(key, serde_json::to_vec(&holder(node)).unwrap(), lease)
    }

    pub(super) fn spec_kv(&mut self) -> Kv {
        let key = self.keys.spec();
        let value = spec(self.tasks, self.replicas);
        self.kv(key, value, 0)
    }

    /// This node's record, as it registered it under its lease.
    pub(super) fn record_kv(&mut self) -> Kv {
        let key = self.keys.node(&self.me);
        let record = crate::etcd::keys::NodeRecord {
            addr: holder(&self.me).addr,
            stall: None,
            drafted: false,
        };
        self.kv(key, serde_json::to_vec(&record).unwrap(), LEASE)
    }

    /// The first read of the job: its spec, epoch `epoch`, this node's record, and `more`.
    pub(super) fn snapshot(&mut self, epoch: u64, more: Vec<Kv>) -> Vec<Command> {
        let mut kvs = vec![
            self.spec_kv(),
            self.epoch_kv(&epoch.to_string()),
            self.record_kv(),
        ];
        kvs.extend(more);
        let revision = self.next_rev();
        let generation = self.e.generation;
        self.input(Input::Watch(vec![JobEvent::Snapshot {
            kvs,
            revision,
            generation,
        }]))
    }

    pub(super) fn put(&mut self, kv: Kv) -> Vec<Command> {
        self.input(Input::Watch(vec![JobEvent::Put(kv)]))
    }

    pub(super) fn delete(&mut self, key: String) -> Vec<Command> {
        let revision = self.next_rev();
        self.input(Input::Watch(vec![JobEvent::Delete {
            key: key.into_bytes(),
            revision,
        }]))
    }

    pub(super) fn input(&mut self, input: Input) -> Vec<Command> {
        self.e.handle(input, self.now)
    }

    /// Takes the primary slot of `task` with term `term` (a claim won on an empty job at
    /// `epoch`).
    pub(super) fn primary_of(me: &str, task: u32, tasks: u32, epoch: u64) -> (H, i64) {
        let mut h = H::new(me, tasks, 1);
        let others: Vec<Kv> = (0..tasks)
            .filter(|t| *t != task)
            .map(|t| h.primary_kv(t, &format!("other{t}"), 100 + i64::from(t)))
            .collect();
        let out = h.snapshot(epoch, others);
        let claim = last_claim(&out).expect("a claim");
        let term = h.next_rev();
        h.input(Input::Claimed(claim, super::ClaimOutcome::Won(term)));
        (h, term)
    }
}

/// The commands that act, without the bookkeeping ones (notes, status, view and monitor
/// updates, the watch's ranges: the watch tests check those).
pub(super) fn acts(out: &[Command]) -> Vec<Command> {
    out.iter()
        .filter(|c| {
            !matches!(
                c,
                Command::Note(_)
                    | Command::Publish(_)
                    | Command::ViewChanged
                    | Command::Monitor(_)
                    | Command::Watch { .. }
            )
        })
        .cloned()
        .collect()
}

/// The calls into the task in `out`.
pub(super) fn calls(out: &[Command]) -> Vec<super::TaskCall> {
    out.iter()
        .filter_map(|c| match c {
            Command::Call(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

pub(super) fn last_claim(out: &[Command]) -> Option<super::Claim> {
    out.iter().rev().find_map(|c| match c {
        Command::Claim(c) => Some(*c),
        _ => None,
    })
}

pub(super) fn claims(out: &[Command]) -> usize {
    out.iter()
        .filter(|c| matches!(c, Command::Claim(_)))
        .count()
}

pub(super) fn entered(out: &[Command]) -> Vec<u64> {
    out.iter()
        .filter_map(|c| match c {
            Command::EnterEpoch { epoch, .. } => Some(*epoch),
            _ => None,
        })
        .collect()
}

pub(super) fn published(out: &[Command]) -> Option<&super::Published> {
    out.iter().rev().find_map(|c| match c {
        Command::Publish(p) => Some(p),
        _ => None,
    })
}
