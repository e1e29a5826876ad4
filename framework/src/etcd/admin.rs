//! What operators do to a job from outside its nodes (the `taskgraph` CLI, through
//! [`JobClient`](crate::JobClient)): list jobs, read every slot, replay history, hand a task
//! over to its backup, end a job, delete a finished job's keys.

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use super::keys::{EpochValue, JobKey, ROOT};
use super::{err, Kv, Store};
use crate::error::EtcdError;
use crate::TaskId;

/// A change under a job's prefix, from [`Store::history`].
#[derive(Debug, Clone)]
pub(crate) enum Change {
    /// A key was created or changed (its `mod_revision` is the change's revision).
    Put(Kv),
    /// A key was deleted (or its lease ended) at `revision`.
    Delete {
        /// The key.
        key: Vec<u8>,
        /// The revision of the deletion.
        revision: i64,
    },
}

impl Store {
    /// The names of every job under the root prefix.
    pub async fn job_names(&self) -> Result<Vec<String>, EtcdError> {
        let resp = self
            .read(
                "get keys",
                ROOT,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        let mut names: Vec<String> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = std::str::from_utf8(kv.key()).ok()?;
                let rest = key.strip_prefix(ROOT)?;
                let (job, tail) = rest.split_once('/')?;
                (tail == "spec").then(|| job.to_owned())
            })
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Every key of the job except the checkpoints' values (which may be large): the slot
    /// keys, node records, spec, epoch and result with their values, checkpoints as keys only.
    /// Returns the keys and the revision they were read at.
    pub async fn load_light(&self) -> Result<(Vec<Kv>, i64), EtcdError> {
        let prefix = self.keys.prefix().to_owned();
        let listing = self
            .read(
                "get keys",
                &prefix,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        let revision = listing.header().map_or(0, |h| h.revision());
        let mut out = Vec::new();
        let mut wanted = Vec::new();
        for kv in listing.kvs() {
            let kv = Kv::from(kv);
            match self.keys.parse(&kv.key) {
                Some(JobKey::Checkpoint(_)) | None => out.push(kv),
                Some(_) => wanted.push(kv.key),
            }
        }
        // Read the values at the listing's revision, in transactions of at most 100 reads
        // (etcd allows 128 operations per transaction by default).
        for chunk in wanted.chunks(100) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|k| TxnOp::get(k.clone(), Some(GetOptions::new().with_revision(revision))))
                .collect();
            let mut c = self.client.clone();
            let resp = self
                .timed("txn get values", &prefix, c.txn(Txn::new().and_then(ops)))
                .await?;
            for r in resp.op_responses() {
                if let TxnOpResponse::Get(g) = r {
                    out.extend(g.kvs().iter().map(Kv::from));
                }
            }
        }
        Ok((out, revision))
    }

    /// Replays the job's changes from revision `from` (if etcd still has them) and follows
    /// new ones; the receiver gets `Err` once, when the history is gone or etcd is lost, and
    /// the stream ends. Dropping the receiver ends the watch.
    pub async fn history(
        &self,
        from: i64,
    ) -> Result<mpsc::Receiver<Result<Change, EtcdError>>, EtcdError> {
        let prefix = self.keys.prefix().to_owned();
        let mut c = self.client.clone();
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = self
            .timed("watch", &prefix, c.watch(prefix.as_str(), Some(options)))
            .await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let failure = match stream.message().await {
                    Ok(Some(resp)) if resp.compact_revision() > 0 => format!(
                        "etcd compacted its history up to revision {}; replay from there or later",
                        resp.compact_revision()
                    ),
                    Ok(Some(resp)) if resp.canceled() => {
                        format!("etcd cancelled the watch: {}", resp.cancel_reason())
                    }
                    Ok(Some(resp)) => {
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let change = match ev.event_type() {
                                EventType::Put => Change::Put(Kv::from(kv)),
                                EventType::Delete => Change::Delete {
                                    key: kv.key().to_vec(),
                                    revision: kv.mod_revision(),
                                },
                            };
                            if tx.send(Ok(change)).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    Ok(None) => "etcd closed the watch".to_owned(),
                    Err(e) => e.to_string(),
                };
                let _ = tx
                    .send(Err(err(
                        "watch",
                        prefix.clone(),
                        etcd_client::Error::WatchError(failure),
                    )))
                    .await;
                return;
            }
        });
        Ok(rx)
    }

    /// Hands task `t` over to a backup: deletes the primary key if it is still the one
    /// created at `term` and backup `backup` (created at `backup_revision`) still exists. The
    /// backup promotes itself as after a clean stop; the old primary sees its key gone, stops
    /// acting (its messages and etcd writes are fenced by its term from then on) and rejoins
    /// as a spare.
    pub async fn hand_over(
        &self,
        t: TaskId,
        term: i64,
        backup: u32,
        backup_revision: i64,
    ) -> Result<bool, EtcdError> {
        let primary = self.keys.primary(t);
        let txn = Txn::new()
            .when([
                Compare::create_revision(primary.clone(), CompareOp::Equal, term),
                Compare::create_revision(
                    self.keys.backup(t, backup),
                    CompareOp::Equal,
                    backup_revision,
                ),
            ])
            .and_then([TxnOp::delete(primary.clone(), None)]);
        let mut c = self.client.clone();
        Ok(self
            .timed("txn hand over", &primary, c.txn(txn))
            .await?
            .succeeded())
    }

    /// Ends the job as an operator: `epoch` goes from `<n>` to `done <n>` (compare-and-swap on
    /// the value read). Returns the final epoch, or `None` if the job does not exist.
    pub async fn finish_by_operator(&self) -> Result<Option<u64>, EtcdError> {
        let key = self.keys.epoch();
        loop {
            let Some(kv) = self.get(&key).await? else {
                return Ok(None);
            };
            let n = match EpochValue::parse(&kv.value) {
                Ok(EpochValue::Done(n)) => return Ok(Some(n)),
                Ok(EpochValue::Running(n)) => n,
                Err(reason) => {
                    // The value before the garbage (etcd keeps recent history), if any.
                    let before = self
                        .read(
                            "get",
                            &key,
                            Some(GetOptions::new().with_revision(kv.mod_revision - 1)),
                        )
                        .await
                        .ok()
                        .and_then(|r| r.kvs().first().map(|kv| kv.value().to_vec()))
                        .and_then(|v| EpochValue::parse(&v).ok());
                    let n = before.map_or(0, EpochValue::epoch);
                    tracing::warn!(
                        key,
                        reason,
                        epoch = n,
                        "garbage epoch value; finishing at the epoch before it"
                    );
                    n
                }
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    kv.mod_revision,
                )])
                .and_then([TxnOp::put(key.clone(), EpochValue::Done(n).encode(), None)]);
            let mut c = self.client.clone();
            if self
                .timed("txn shutdown", &key, c.txn(txn))
                .await?
                .succeeded()
            {
                return Ok(Some(n));
            }
            // The epoch moved meanwhile: read it again.
        }
    }

    /// Deletes every key of the job. Returns how many were deleted.
    pub async fn delete_job(&self) -> Result<i64, EtcdError> {
        let prefix = self.keys.prefix().to_owned();
        let mut c = self.client.clone();
        let resp = self
            .timed(
                "delete prefix",
                &prefix,
                c.delete(
                    prefix.as_str(),
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                ),
            )
            .await?;
        Ok(resp.deleted())
    }
}
