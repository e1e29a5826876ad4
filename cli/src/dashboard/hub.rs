//! One job's live view for the dashboard: fed by the job's etcd watch, published on a
//! `watch` channel that every open page subscribes to.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use taskgraph::topology::Links;
use taskgraph::{
    ChangeEvent, Health, JobChange, JobClient, JobSpec, JobStatus, TaskId, TaskStatus,
};
use tokio::sync::watch;

use super::layout;
use crate::events::{describe, Memory};
use crate::security::EtcdConn;

/// Timeline entries kept (older ones drop off).
const TIMELINE: usize = 500;
/// Checkpoint entries kept among them (a job checkpoints often; failovers must not drop off).
const CHECKPOINTS: usize = 50;
/// Epoch durations kept for the sparkline.
const DURATIONS: usize = 60;
/// The window of the epochs-per-second figure.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// A result longer than this is cut.
const MAX_RESULT: usize = 64 * 1024;
/// Jobs larger than this are not drawn (the table still lists them).
pub const MAX_DRAWN: u32 = 10_000;

/// How the dashboard reaches etcd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EtcdLink {
    /// Not connected yet.
    #[default]
    Connecting,
    /// The watch runs.
    Ok,
    /// etcd was lost; the watch retries.
    Reconnecting,
}

/// One line of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Increases by one per entry.
    pub seq: u64,
    /// The etcd revision of the change.
    pub rev: i64,
    /// When the dashboard saw it (ms since the UNIX epoch).
    pub ms: u64,
    /// `failover`, `lost`, `election`, `backup`, `backup-left`, `joined`, `left`,
    /// `checkpoint`, `stall`, `stall-over`, `result`, `shutdown`, `job`, `garbage`.
    pub kind: &'static str,
    /// The tasks it concerns.
    pub tasks: Vec<TaskId>,
    /// What happened, in words (as `taskgraph events` prints it).
    pub text: String,
}

/// A stall report, flattened for the page.
#[derive(Debug, Clone, Serialize)]
pub struct StallRow {
    /// The reporting node.
    pub node: String,
    /// The epoch it sees stuck.
    pub epoch: u64,
    /// For how long (ms).
    pub for_ms: u64,
}

/// Tasks per health.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    healthy: usize,
    degraded: usize,
    down: usize,
    stalled: usize,
    finished: usize,
}

/// Everything a page shows of one job.
#[derive(Debug, Clone, Default, Serialize)]
pub struct View {
    /// The job.
    pub job: String,
    /// The link to etcd.
    pub etcd: EtcdLink,
    /// The last etcd error, while not [`EtcdLink::Ok`].
    pub etcd_error: Option<String>,
    /// Whether the job exists (`None` until known).
    pub exists: Option<bool>,
    /// The current epoch.
    pub epoch: Option<u64>,
    /// Whether the job finished.
    pub finished: bool,
    /// Tasks of the job.
    pub tasks_total: u32,
    /// Nodes per task.
    pub replicas: u32,
    /// Registered nodes.
    pub nodes: usize,
    /// Nodes waiting without a slot.
    pub spares: Vec<String>,
    /// Tasks per health.
    pub counts: Counts,
    /// Stall reports (empty while the job moves).
    pub stalls: Vec<StallRow>,
    /// Every cause the stall reports name, once each.
    pub stall_reasons: Vec<String>,
    /// Keys whose values could not be understood.
    pub garbage: Vec<String>,
    /// Epochs per second over the last few seconds.
    pub rate: f64,
    /// The last epochs' durations (ms), oldest first.
    pub durations_ms: Vec<u64>,
    /// The job's result, once finished with one.
    pub result: Option<String>,
    /// What the picture leaves out, if anything.
    pub picture_note: Option<String>,
    /// The tasks (sent only when they change).
    #[serde(skip)]
    pub tasks: Arc<Vec<TaskStatus>>,
    /// Increases whenever `tasks` changes.
    #[serde(skip)]
    pub tasks_version: u64,
    /// The topology picture (sent only when it changes).
    #[serde(skip)]
    pub svg: Arc<String>,
    /// Increases whenever `svg` changes.
    #[serde(skip)]
    pub svg_version: u64,
    /// The last timeline entries, oldest first.
    #[serde(skip)]
    pub timeline: Arc<VecDeque<Entry>>,
}

/// What the hub keeps beside the view.
#[derive(Debug, Default)]
struct Hub {
    memory: Memory,
    seq: u64,
    /// Recent epoch moves: when, and to which epoch.
    moves: VecDeque<(Instant, u64)>,
    last_epoch: Option<(Instant, u64)>,
    spec: Option<JobSpec>,
    links: Option<Links>,
    period: u64,
    drawn_epoch: Option<u64>,
    status_dirty: bool,
    spec_dirty: bool,
    /// The tasks and keys each stalled node last named (a report naming the same again,
    /// once per stall time, is not a new timeline entry).
    stalled: std::collections::HashMap<String, Vec<String>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs the hub of `job` until every subscriber and the server are gone.
pub async fn run(conn: EtcdConn, job: String, tx: watch::Sender<View>) {
    let mut delay = Duration::from_millis(200);
    let client = loop {
        match conn.connect(&job).await {
            Ok(c) => break c,
            Err(e) => {
                tx.send_modify(|v| {
                    v.etcd = EtcdLink::Reconnecting;
                    v.etcd_error = Some(e.to_string());
                });
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = tx.closed() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    };
    let mut events = client.changes();
    let mut hub = Hub {
        status_dirty: true,
        spec_dirty: true,
        ..Hub::default()
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            ev = events.recv() => {
                // The live stream yields only `Ok`.
                let Some(Ok(ev)) = ev else { return };
                hub.handle(ev, &tx);
                // Take a burst of changes in one go.
                while let Some(Ok(ev)) = events.try_recv() {
                    hub.handle(ev, &tx);
                }
            }
            _ = tick.tick() => {
                // A successful read while the watch retries: etcd is back.
                let retrying = tx.borrow().etcd != EtcdLink::Ok;
                if retrying && client.state().await.is_ok() {
                    tx.send_modify(|v| { v.etcd = EtcdLink::Ok; v.etcd_error = None; });
                    hub.status_dirty = true;
                }
            }
            () = tx.closed() => return,
        }
        hub.refresh(&client, &tx).await;
    }
}

impl Hub {
    /// Takes one change of the job into the view.
    fn handle(&mut self, ev: ChangeEvent, tx: &watch::Sender<View>) {
        let mut tasks = Vec::new();
        let mut repeated = false;
        let kind = match &ev.change {
            JobChange::Disconnected => {
                tx.send_modify(|v| {
                    v.etcd = EtcdLink::Reconnecting;
                    v.etcd_error = Some("the watch of the job lost etcd".into());
                });
                return;
            }
            JobChange::Snapshot(status) => {
                self.status_dirty = true;
                self.spec_dirty = true;
                self.memory = Memory::default();
                if let Some(state) = status.state {
                    self.epoch_seen(state.epoch);
                }
                tx.send_modify(|v| {
                    v.etcd = EtcdLink::Ok;
                    v.etcd_error = None;
                });
                return;
            }
            JobChange::EpochMoved { epoch } => {
                let n = *epoch;
                self.epoch_seen(n);
                tx.send_modify(|v| {
                    v.etcd = EtcdLink::Ok;
                    v.epoch = Some(n);
                });
                // Epochs are shown as progress, not in the timeline.
                return;
            }
            JobChange::Finished { .. } => {
                self.status_dirty = true;
                "shutdown"
            }
            JobChange::Garbage { .. } => {
                self.status_dirty = true;
                "garbage"
            }
            JobChange::PrimaryUp { task, .. } => {
                tasks.push(*task);
                self.status_dirty = true;
                "election"
            }
            JobChange::PrimaryGone { task, .. } => {
                tasks.push(*task);
                self.status_dirty = true;
                "lost"
            }
            JobChange::BackupUp { task, .. } => {
                tasks.push(*task);
                self.status_dirty = true;
                "backup"
            }
            JobChange::BackupGone { task, .. } => {
                tasks.push(*task);
                self.status_dirty = true;
                "backup-left"
            }
            JobChange::NodeJoined { .. } => {
                self.status_dirty = true;
                "joined"
            }
            JobChange::NodeLeft { node } => {
                self.status_dirty = true;
                self.stalled.remove(node);
                "left"
            }
            JobChange::StallReported { node, note } => {
                self.status_dirty = true;
                tasks.extend(note.reasons.iter().filter_map(|r| r.task));
                // What is named, not the wording (which counts the seconds).
                let reasons: Vec<String> = note
                    .reasons
                    .iter()
                    .map(|r| format!("{:?} {:?}", r.task, r.key))
                    .collect();
                repeated = self.stalled.get(node) == Some(&reasons);
                self.stalled.insert(node.clone(), reasons);
                "stall"
            }
            JobChange::StallOver { node } => {
                self.status_dirty = true;
                self.stalled.remove(node);
                "stall-over"
            }
            JobChange::CheckpointWritten { task, .. } => {
                tasks.push(*task);
                "checkpoint"
            }
            JobChange::ResultWritten { .. } => {
                self.status_dirty = true;
                "result"
            }
            JobChange::JobCreated { .. } | JobChange::JobDeleted => {
                self.status_dirty = true;
                self.spec_dirty = true;
                "job"
            }
            _ => return,
        };
        let (rev, text, _) = describe(&ev, &mut self.memory);
        let Some(text) = text else { return };
        if repeated {
            return;
        }
        let kind = if kind == "election" && text.starts_with("failover") {
            "failover"
        } else {
            kind
        };
        self.seq += 1;
        let entry = Entry {
            seq: self.seq,
            rev,
            ms: now_ms(),
            kind,
            tasks,
            text,
        };
        tx.send_modify(|v| {
            v.etcd = EtcdLink::Ok;
            v.etcd_error = None;
            let t = Arc::make_mut(&mut v.timeline);
            t.push_back(entry);
            // Drop the oldest checkpoint beyond the checkpoints kept, then the oldest entry.
            if t.iter().filter(|e| e.kind == "checkpoint").count() > CHECKPOINTS {
                if let Some(i) = t.iter().position(|e| e.kind == "checkpoint") {
                    t.remove(i);
                }
            }
            while t.len() > TIMELINE {
                t.pop_front();
            }
        });
    }

    /// Notes that the job is at epoch `n` now.
    fn epoch_seen(&mut self, n: u64) {
        let now = Instant::now();
        if let Some((_, last)) = self.last_epoch {
            if n <= last {
                return;
            }
            self.moves.push_back((now, n));
        }
        if self.last_epoch.is_none() {
            self.moves.push_back((now, n));
        }
        self.last_epoch = Some((now, n));
        while self.moves.len() > DURATIONS + 1 {
            self.moves.pop_front();
        }
    }

    /// Epochs per second over the window, and the last durations (ms per epoch).
    fn progress(&self) -> (f64, Vec<u64>) {
        let now = Instant::now();
        let durations = self
            .moves
            .iter()
            .zip(self.moves.iter().skip(1))
            .map(|((t0, e0), (t1, e1))| {
                (t1.duration_since(*t0).as_millis() as u64) / (e1 - e0).max(1)
            })
            .collect();
        let recent: Vec<&(Instant, u64)> = self
            .moves
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
            .collect();
        let rate = match (self.moves.front(), recent.first(), recent.last()) {
            (Some((first, _)), Some((_, e0)), Some((_, e1))) if e1 > e0 => {
                let span = now.duration_since(*first).min(RATE_WINDOW).as_secs_f64();
                if span > 0.0 {
                    (e1 - e0) as f64 / span
                } else {
                    0.0
                }
            }
            _ => 0.0,
        };
        (rate, durations)
    }

    /// Reads what the events marked stale, and redraws the picture when needed.
    async fn refresh(&mut self, client: &JobClient, tx: &watch::Sender<View>) {
        let (rate, durations) = self.progress();
        tx.send_if_modified(|v| {
            let changed = v.rate != rate || v.durations_ms != durations;
            v.rate = rate;
            v.durations_ms = durations;
            changed
        });
        if self.spec_dirty {
            match client.spec().await {
                Ok(spec) => {
                    self.spec_dirty = false;
                    let exists = spec.is_some();
                    self.links = spec.as_ref().map(|s| {
                        let rebuilt = Links::from_description_lenient(&s.links);
                        rebuilt.links
                    });
                    self.period = self
                        .links
                        .as_ref()
                        .map_or(1, |l| l.iter().map(|(_, t)| t.period()).max().unwrap_or(1));
                    self.spec = spec;
                    self.drawn_epoch = None;
                    tx.send_modify(|v| v.exists = Some(exists));
                }
                Err(e) => {
                    tx.send_modify(|v| v.etcd_error = Some(e.to_string()));
                    return;
                }
            }
        }
        if self.status_dirty {
            match client.status().await {
                Ok(s) => {
                    self.status_dirty = false;
                    if let Some(st) = s.state {
                        self.epoch_seen(st.epoch);
                    }
                    let result = if s.has_result && s.state.is_some_and(|st| st.finished) {
                        match client.result().await {
                            Ok(Some(bytes)) => {
                                let mut text = String::from_utf8_lossy(&bytes).into_owned();
                                if text.len() > MAX_RESULT {
                                    let mut cut = MAX_RESULT;
                                    while !text.is_char_boundary(cut) {
                                        cut -= 1;
                                    }
                                    text.truncate(cut);
                                    text.push_str("\n… (cut; `taskgraph result` prints it all)");
                                }
                                Some(text)
                            }
                            Ok(None) => None,
                            Err(e) => Some(format!("(the stored result cannot be read: {e})")),
                        }
                    } else {
                        None
                    };
                    tx.send_modify(|v| apply_status(v, s, result));
                }
                Err(e) => {
                    tx.send_modify(|v| v.etcd_error = Some(e.to_string()));
                    return;
                }
            }
        }
        self.redraw(tx);
    }

    /// Lays the topology out again when the spec changed, or the epoch did for a topology
    /// that changes with it.
    fn redraw(&mut self, tx: &watch::Sender<View>) {
        let (Some(spec), Some(links)) = (&self.spec, &self.links) else {
            return;
        };
        let epoch = self.last_epoch.map_or(0, |(_, e)| e);
        let key = epoch % self.period.max(1);
        if self.drawn_epoch == Some(key) {
            return;
        }
        self.drawn_epoch = Some(key);
        let (svg, note) = if spec.tasks > MAX_DRAWN {
            (
                String::new(),
                Some(format!(
                    "{} tasks: not drawn (at most {MAX_DRAWN}); see the table",
                    spec.tasks
                )),
            )
        } else if let Err(e) = links.validate(spec.tasks) {
            (
                String::new(),
                Some(format!(
                    "the stored topology does not fit the job's tasks: {e}"
                )),
            )
        } else {
            let p = layout::layout(&spec.links, links, spec.tasks, epoch);
            let mut notes = Vec::new();
            let skipped = Links::from_description_lenient(&spec.links).skipped;
            if !skipped.is_empty() {
                notes.push(format!(
                    "links not drawn: {}",
                    skipped
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
            if p.edges_left_out > 0 {
                notes.push(format!(
                    "{} edges not drawn (at most {})",
                    p.edges_left_out,
                    layout::MAX_EDGES
                ));
            }
            (
                layout::svg(&p),
                (!notes.is_empty()).then(|| notes.join("; ")),
            )
        };
        tx.send_modify(|v| {
            v.svg = Arc::new(svg);
            v.svg_version += 1;
            v.picture_note = note;
        });
    }
}

/// Puts a freshly read status into the view.
fn apply_status(v: &mut View, s: JobStatus, result: Option<String>) {
    v.etcd = EtcdLink::Ok;
    v.etcd_error = None;
    v.epoch = s.state.map(|st| st.epoch);
    v.finished = s.state.is_some_and(|st| st.finished);
    v.tasks_total = s.tasks_total;
    v.replicas = s.replicas;
    v.nodes = s.nodes;
    v.spares = s.spares.iter().map(|n| n.node.clone()).collect();
    let mut c = Counts::default();
    for t in &s.tasks {
        match t.health {
            Health::Healthy => c.healthy += 1,
            Health::Degraded => c.degraded += 1,
            Health::Down => c.down += 1,
            Health::Stalled => c.stalled += 1,
            Health::Finished => c.finished += 1,
        }
    }
    v.counts = c;
    v.stall_reasons = s.stall_reasons().iter().map(|r| r.text.clone()).collect();
    v.stalls = s
        .stalls
        .iter()
        .map(|n| StallRow {
            node: n.node.clone(),
            epoch: n.note.epoch,
            for_ms: n.note.for_ms,
        })
        .collect();
    v.garbage = s.garbage.clone();
    if result.is_some() {
        v.result = result;
    }
    if *v.tasks != s.tasks {
        v.tasks = Arc::new(s.tasks);
        v.tasks_version += 1;
    }
}

/// What a page needs to know beyond the view's own fields.
#[derive(Debug, Serialize)]
pub struct Update<'a> {
    /// The view (without tasks, picture and timeline).
    #[serde(flatten)]
    pub view: &'a View,
    /// The tasks, when they changed since the last update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks: Option<&'a [TaskStatus]>,
    /// The picture, when it changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svg: Option<&'a str>,
    /// Timeline entries not sent yet.
    pub timeline: Vec<&'a Entry>,
}

/// What one page has been sent so far.
#[derive(Debug, Default)]
pub struct Sent {
    tasks_version: Option<u64>,
    svg_version: Option<u64>,
    seq: u64,
}

impl Sent {
    /// The update for a page that has seen what `self` records.
    pub fn update<'a>(&mut self, v: &'a View) -> Update<'a> {
        let tasks = (self.tasks_version != Some(v.tasks_version)).then(|| v.tasks.as_slice());
        self.tasks_version = Some(v.tasks_version);
        let svg = (self.svg_version != Some(v.svg_version)).then(|| v.svg.as_str());
        self.svg_version = Some(v.svg_version);
        let timeline: Vec<&Entry> = v.timeline.iter().filter(|e| e.seq > self.seq).collect();
        if let Some(e) = timeline.last() {
            self.seq = e.seq;
        }
        Update {
            view: v,
            tasks,
            svg,
            timeline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            rev: seq as i64,
            ms: 0,
            kind: "failover",
            tasks: vec![3],
            text: format!("entry {seq}"),
        }
    }

    #[test]
    fn a_page_gets_tasks_picture_and_timeline_only_once() {
        let mut v = View {
            tasks_version: 1,
            svg: Arc::new("<svg/>".into()),
            svg_version: 1,
            timeline: Arc::new(VecDeque::from([entry(1), entry(2)])),
            ..View::default()
        };
        let mut sent = Sent::default();
        let u = sent.update(&v);
        assert!(u.tasks.is_some() && u.svg == Some("<svg/>"));
        assert_eq!(u.timeline.len(), 2);
        let u = sent.update(&v);
        assert!(u.tasks.is_none() && u.svg.is_none() && u.timeline.is_empty());
        let json = serde_json::to_value(&u).unwrap_or_default();
        assert!(
            json.get("tasks").is_none() && json.get("svg").is_none(),
            "{json}"
        );
        Arc::make_mut(&mut v.timeline).push_back(entry(3));
        v.tasks_version += 1;
        let u = sent.update(&v);
        assert!(u.tasks.is_some() && u.svg.is_none());
        assert_eq!(u.timeline.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
        // A new page gets everything kept.
        let u = Sent::default().update(&v);
        assert_eq!(u.timeline.len(), 3);
    }

    #[test]
    fn epochs_going_back_or_repeating_are_not_progress() {
        let mut hub = Hub::default();
        hub.epoch_seen(5);
        hub.epoch_seen(6);
        hub.epoch_seen(6);
        hub.epoch_seen(4);
        hub.epoch_seen(8);
        let (_, durations) = hub.progress();
        assert_eq!(durations.len(), 2, "5→6 and 6→8: {durations:?}");
        assert_eq!(hub.last_epoch.map(|(_, e)| e), Some(8));
        for e in 9..200 {
            hub.epoch_seen(e);
        }
        assert_eq!(hub.progress().1.len(), DURATIONS);
    }
}
