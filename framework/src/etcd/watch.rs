//! The job watch: watches over some key ranges of a job, on one etcd stream, that survive etcd
//! restarts and compaction.
//!
//! It first reads every key in its ranges at one revision ([`JobEvent::Snapshot`]; a joining
//! node's registration makes that read for it, in its own transaction: [`FirstRead`]), then
//! watches each range from the revision after that read, all on one gRPC stream (etcd
//! multiplexes watchers on it). Each range resumes on its own: on a stream error every watch
//! is opened again from the last revision *it* has seen plus one, so no event is delivered
//! twice or lost; if etcd compacted a watch's revision away, everything is read again and a new
//! snapshot sent.
//!
//! The ranges can change while the watch runs ([`WatchRanges`], numbered by generation): the
//! watch then reads the new ranges and sends a snapshot of that generation, and every event
//! after it belongs to the new ranges. When the new ranges are the old plus more, the stream
//! stays and only the added ranges get new watches; otherwise it is dropped and every range
//! watched anew. A spare waiting to be drafted watches
//! [`JobKeys::spare_watch`](super::keys::JobKeys::spare_watch), the holders of task 0's slots
//! (the staffer and its backups) [`JobKeys::staff_watch`](super::keys::JobKeys::staff_watch),
//! every other slot holder [`JobKeys::holder_watch`](super::keys::JobKeys::holder_watch) (what
//! their decisions read).
//! Events of one range arrive in revision order; events of different ranges are not ordered
//! with each other, and no decision depends on that order.

use etcd_client::{EventType, WatchOptions, WatchResponse, WatchStream};
use tokio::sync::{mpsc, oneshot, watch};

use super::keys::KeyRange;
use super::{Kv, Store};
use crate::metrics::Outcome;

/// What the watch reports to the event loop.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// Every key of the watched ranges at `revision`; replaces whatever the loop knew.
    Snapshot {
        /// The keys.
        kvs: Vec<Kv>,
        /// The revision of the read.
        revision: i64,
        /// The generation of the ranges read ([`WatchRanges::generation`]).
        generation: u64,
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

/// How a stream of watches ended.
enum Ended {
    /// The receiver is gone: stop.
    Closed,
    /// The stream broke (or etcd cancelled a watch): open it again where each watch stopped.
    Resume,
    /// A watch's history was compacted away, or the ranges changed other than by growing:
    /// read everything again on a new stream.
    Reload,
}

/// The key ranges a watch follows, and their generation (raised with every change).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchRanges {
    /// Raised with every change of the ranges; snapshots carry it.
    pub generation: u64,
    /// The ranges.
    pub ranges: Vec<KeyRange>,
}

/// A read of every key in some ranges at one revision, made by someone else (a joining node's
/// registration, [`Store::register_node_reading`]) for the watch to start from.
#[derive(Debug)]
pub struct FirstRead {
    /// The ranges read, with their generation.
    pub ranges: WatchRanges,
    /// Every key in them at `revision`.
    pub kvs: Vec<Kv>,
    /// The revision of the read.
    pub revision: i64,
}

/// Runs the watch over the ranges `wanted` shows (following its changes) until `tx` is closed.
/// With `first`, it waits for that read instead of reading its first ranges itself, and takes
/// it as its first snapshot if it is of the ranges it follows (else, or if the read never
/// comes, it reads them itself).
pub(crate) async fn run(
    store: Store,
    mut wanted: watch::Receiver<WatchRanges>,
    first: Option<oneshot::Receiver<FirstRead>>,
    tx: mpsc::Sender<JobEvent>,
) {
    let mut current = wanted.borrow_and_update().clone();
    // Whether the ranges can still change (their sender is there).
    let mut following = true;
    // Per range: the revision its watch starts (or resumes) from; `None` until a snapshot.
    let mut next: Option<Vec<i64>> = None;
    let mut delays = crate::retry::WATCH.delays();
    let mut announced_down = false;
    if let Some(first) = first {
        let read = tokio::select! {
            read = first => read.ok(),
            _ = tx.closed() => return,
        };
        if let Some(read) = read.filter(|r| r.ranges == current) {
            let snapshot = JobEvent::Snapshot {
                kvs: read.kvs,
                revision: read.revision,
                generation: current.generation,
            };
            if tx.send(snapshot).await.is_err() {
                return;
            }
            next = Some(vec![read.revision + 1; current.ranges.len()]);
        }
    }
    loop {
        if tx.is_closed() {
            return;
        }
        if following && wanted.has_changed().unwrap_or(false) {
            current = wanted.borrow_and_update().clone();
            next = None;
        }
        let ranges = &current.ranges;
        let mut starts = match next.take() {
            Some(starts) => starts,
            None => match store.load_ranges(ranges).await {
                Ok((kvs, revision)) => {
                    let generation = current.generation;
                    let snapshot = JobEvent::Snapshot {
                        kvs,
                        revision,
                        generation,
                    };
                    if tx.send(snapshot).await.is_err() {
                        return;
                    }
                    vec![revision + 1; ranges.len()]
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
        let opened = tokio::time::Instant::now();
        let stream = open(&store, ranges, &starts).await;
        store.record(
            "watch",
            if stream.is_ok() {
                Outcome::Ok
            } else {
                Outcome::Error
            },
            opened,
        );
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                if !announced_down {
                    announced_down = true;
                    let _ = tx.send(JobEvent::Disconnected).await;
                }
                tracing::debug!(error = %e, "job watch: cannot open the watch, retrying");
                tokio::time::sleep(delays.next().unwrap_or(crate::retry::WATCH.max)).await;
                next = Some(starts);
                continue;
            }
        };
        // The watch id of each range, in the order etcd confirmed them.
        let mut ids: Vec<i64> = Vec::with_capacity(ranges.len());
        // Events below this revision are already in a snapshot sent (of ranges kept when the
        // ranges grew, see `extend`; the added ones start above it).
        let mut floor: i64 = 0;
        let ended = loop {
            let message = tokio::select! {
                changed = wanted.changed(), if following => {
                    match changed {
                        // New ranges: read them and watch them instead (on this stream if
                        // they only add ranges).
                        Ok(()) => {
                            let to = wanted.borrow_and_update().clone();
                            let grown = extend(
                                &store,
                                &mut stream,
                                &current.ranges,
                                &to,
                                &mut starts,
                                &mut floor,
                                &tx,
                            )
                            .await;
                            current = to;
                            match grown {
                                Grown::Watching => continue,
                                Grown::Closed => break Ended::Closed,
                                Grown::Broken => break Ended::Resume,
                                Grown::No => break Ended::Reload,
                            }
                        }
                        Err(_) => following = false,
                    }
                    continue;
                }
                message = stream.message() => message,
            };
            match message {
                Ok(Some(resp)) => {
                    if resp.compact_revision() > 0 {
                        tracing::info!(
                            compacted = resp.compact_revision(),
                            "job watch: history compacted, reading the job again"
                        );
                        break Ended::Reload;
                    }
                    if resp.canceled() {
                        tracing::info!(
                            reason = resp.cancel_reason(),
                            "job watch cancelled by etcd, resuming"
                        );
                        break Ended::Resume;
                    }
                    delays = crate::retry::WATCH.delays();
                    announced_down = false;
                    if resp.created() {
                        // etcd confirms creations in the order they were asked for: the n-th
                        // confirmed watch is range n, whatever id etcd gave it.
                        ids.push(resp.watch_id());
                    }
                    store.count_watch_events(resp.events().len());
                    let range = ids.iter().position(|id| *id == resp.watch_id());
                    if !forward(&resp, range.and_then(|i| starts.get_mut(i)), floor, &tx).await {
                        break Ended::Closed;
                    }
                }
                Ok(None) | Err(_) => {
                    if !announced_down {
                        announced_down = true;
                        let _ = tx.send(JobEvent::Disconnected).await;
                    }
                    tracing::debug!(resume_from = ?starts, "job watch stream ended, resuming");
                    tokio::time::sleep(delays.next().unwrap_or(crate::retry::WATCH.max)).await;
                    break Ended::Resume;
                }
            }
        };
        match ended {
            Ended::Closed => return,
            Ended::Resume => next = Some(starts),
            Ended::Reload => next = None,
        }
    }
}

/// Opens one stream with a watch per range, each from its own start revision. Range `i` asks
/// for watch id `i + 1` (0 asks etcd to choose), but responses are matched to ranges by the
/// order etcd confirms the creations in, which holds whether or not it honours the ids.
async fn open(
    store: &Store,
    ranges: &[KeyRange],
    starts: &[i64],
) -> Result<WatchStream, etcd_client::Error> {
    let options = |i: usize| watch_options(ranges, i, starts[i]);
    let mut client = store.client();
    let Some(first) = ranges.first() else {
        return Err(etcd_client::Error::WatchError(
            "no key range to watch".into(),
        ));
    };
    let mut stream = client.watch(first.key.as_str(), Some(options(0))).await?;
    for (i, r) in ranges.iter().enumerate().skip(1) {
        stream.watch(r.key.as_str(), Some(options(i))).await?;
    }
    Ok(stream)
}

/// The watch of range `i` of `ranges` from revision `start`, asking for watch id `i + 1`.
fn watch_options(ranges: &[KeyRange], i: usize, start: i64) -> WatchOptions {
    let mut o = WatchOptions::new()
        .with_start_revision(start)
        .with_watch_id(i as i64 + 1);
    if let Some(end) = &ranges[i].end {
        o = o.with_range(end.as_str());
    }
    o
}

/// What came of ranges that changed while a stream was open ([`extend`]).
enum Grown {
    /// The new ranges only add to the old: read, snapshot sent, and the added ranges watched
    /// on the open stream.
    Watching,
    /// The new ranges are not the old plus more, or the read failed: read them again on a new
    /// stream.
    No,
    /// Snapshot sent, but the stream broke while the added ranges were asked for: resume
    /// every range where it stands.
    Broken,
    /// The receiver is gone.
    Closed,
}

/// Follows ranges `to` instead of `from` on the open `stream`, if `to` is `from` plus more
/// ranges (a spare drafted into a slot: its ranges are the first of a holder's, see
/// [`JobKeys::holder_watch`](super::keys::JobKeys::holder_watch)): reads every range of `to`
/// at one revision and sends that snapshot, as a reload would, then asks the stream for
/// watches of the added ranges from the revision after the read. The ranges already watched
/// keep their watches, whose events at or below the read are then dropped (the snapshot holds
/// them; `floor`), so the loop sees what a reload would show: the snapshot, then every later
/// event once. etcd spends as much on each watch it creates as on a request, and a drafted
/// spare keeps its four.
async fn extend(
    store: &Store,
    stream: &mut WatchStream,
    from: &[KeyRange],
    to: &WatchRanges,
    starts: &mut Vec<i64>,
    floor: &mut i64,
    tx: &mpsc::Sender<JobEvent>,
) -> Grown {
    if to.ranges.len() <= from.len() || !to.ranges.starts_with(from) {
        return Grown::No;
    }
    let (kvs, revision) = match store.load_ranges(&to.ranges).await {
        Ok(read) => read,
        Err(e) => {
            tracing::debug!(error = %e, "job watch: cannot read the added ranges; reading all again");
            return Grown::No;
        }
    };
    let snapshot = JobEvent::Snapshot {
        kvs,
        revision,
        generation: to.generation,
    };
    if tx.send(snapshot).await.is_err() {
        return Grown::Closed;
    }
    for start in starts.iter_mut() {
        *start = (*start).max(revision + 1);
    }
    *floor = revision + 1;
    let added = from.len()..to.ranges.len();
    starts.resize(to.ranges.len(), revision + 1);
    for i in added {
        let o = watch_options(&to.ranges, i, revision + 1);
        if let Err(e) = stream.watch(to.ranges[i].key.as_str(), Some(o)).await {
            tracing::debug!(error = %e, "job watch: cannot add a range; resuming");
            return Grown::Broken;
        }
    }
    Grown::Watching
}

/// Sends the events of one response on, and moves its range's resume revision (`start`)
/// past them; events below `floor` (already in a snapshot sent) are dropped. Returns `false`
/// once the receiver is gone.
async fn forward(
    resp: &WatchResponse,
    start: Option<&mut i64>,
    floor: i64,
    tx: &mpsc::Sender<JobEvent>,
) -> bool {
    let Some(start) = start else {
        // Not a watch this stream created (cannot happen): ignore it.
        return true;
    };
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        let rev = kv.mod_revision();
        if rev < floor {
            continue;
        }
        let msg = match ev.event_type() {
            EventType::Put => JobEvent::Put(Kv::from(kv)),
            EventType::Delete => JobEvent::Delete {
                key: kv.key().to_vec(),
                revision: rev,
            },
        };
        *start = (*start).max(rev + 1);
        if tx.send(msg).await.is_err() {
            return false;
        }
    }
    true
}
