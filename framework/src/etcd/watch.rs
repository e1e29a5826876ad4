//! The job watch: one watch over the job's prefix that survives etcd restarts and compaction.
//!
//! It first reads every key of the job ([`JobEvent::Snapshot`]), then watches from the
//! revision after that read. On a stream error it resumes from the last revision seen plus
//! one; if etcd compacted that revision away, it reads everything again and sends a new
//! snapshot.

use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc;

use super::{Kv, Store};
use crate::metrics::Outcome;

/// What the watch reports to the event loop.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// Every key of the job at `revision`; replaces whatever the loop knew.
    Snapshot {
        /// The keys.
        kvs: Vec<Kv>,
        /// The revision of the read.
        revision: i64,
    },
    /// A key was created or changed.
    Put(Kv),
    /// A key was deleted (or its lease expired) at `revision`.
    Delete {
        /// The key.
        key: Vec<u8>,
        /// The revision of the deletion.
        revision: i64,
    },
    /// The watch lost etcd and is retrying.
    Disconnected,
}

/// Runs the watch until `tx` is closed.
pub(crate) async fn run(store: Store, tx: mpsc::Sender<JobEvent>) {
    let prefix = store.keys().prefix().to_owned();
    let mut next: Option<i64> = None;
    let mut delays = crate::retry::WATCH.delays();
    let mut announced_down = false;
    loop {
        if tx.is_closed() {
            return;
        }
        let start = match next {
            Some(rev) => rev,
            None => match store.load().await {
                Ok((kvs, revision)) => {
                    if tx.send(JobEvent::Snapshot { kvs, revision }).await.is_err() {
                        return;
                    }
                    revision + 1
                }
                Err(e) => {
                    if !announced_down {
                        announced_down = true;
                        let _ = tx.send(JobEvent::Disconnected).await;
                    }
                    tracing::debug!(error = %e, "job watch: cannot read the job's keys, retrying");
                    tokio::time::sleep(delays.next().unwrap_or(crate::retry::WATCH.max)).await;
                    continue;
                }
            },
        };
        next = Some(start);
        let mut client = store.client();
        let options = WatchOptions::new().with_prefix().with_start_revision(start);
        let opened = tokio::time::Instant::now();
        let stream = client.watch(prefix.clone(), Some(options)).await;
        let outcome = match stream {
            Ok(_) => Outcome::Ok,
            Err(_) => Outcome::Error,
        };
        store.record("watch", outcome, opened);
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                if !announced_down {
                    announced_down = true;
                    let _ = tx.send(JobEvent::Disconnected).await;
                }
                tracing::debug!(error = %e, "job watch: cannot open the watch, retrying");
                tokio::time::sleep(delays.next().unwrap_or(crate::retry::WATCH.max)).await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.compact_revision() > 0 {
                        tracing::info!(
                            compacted = resp.compact_revision(),
                            wanted = start,
                            "job watch: history compacted, reading the job again"
                        );
                        next = None;
                        break;
                    }
                    if resp.canceled() {
                        tracing::info!(
                            reason = resp.cancel_reason(),
                            "job watch cancelled by etcd, resuming"
                        );
                        break;
                    }
                    delays = crate::retry::WATCH.delays();
                    announced_down = false;
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let rev = kv.mod_revision();
                        let msg = match ev.event_type() {
                            EventType::Put => JobEvent::Put(Kv::from(kv)),
                            EventType::Delete => JobEvent::Delete {
                                key: kv.key().to_vec(),
                                revision: rev,
                            },
                        };
                        next = Some(rev + 1);
                        if tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) | Err(_) => {
                    if !announced_down {
                        announced_down = true;
                        let _ = tx.send(JobEvent::Disconnected).await;
                    }
                    tracing::debug!(resume_from = ?next, "job watch stream ended, resuming");
                    tokio::time::sleep(delays.next().unwrap_or(crate::retry::WATCH.max)).await;
                    break;
                }
            }
        }
    }
}
