//! Tables and one-shot commands.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{Cell, Color, Table};
use serde::Serialize;

use crate::security::EtcdConn;
use taskgraph::{ChangeEvent, Health, JobChange, JobClient, JobStatus, TaskId, TaskStatus};

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

fn age(created_ms: Option<u64>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    match created_ms {
        Some(c) if now >= c => {
            humantime::format_duration(Duration::from_secs((now - c) / 1000)).to_string()
        }
        _ => "-".into(),
    }
}

#[derive(Debug, Serialize)]
struct JobRow {
    job: String,
    state: String,
    epoch: Option<u64>,
    tasks: Option<u32>,
    replicas: Option<u32>,
    age_secs: Option<u64>,
}

/// `taskgraph jobs`.
pub async fn jobs(etcd: &EtcdConn, json: bool) -> Result<(), String> {
    let names = etcd.job_names().await.map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for name in names {
        let row = match etcd.connect(&name).await {
            // Names that are not valid job names are not taskgraph jobs.
            Err(_) => continue,
            Ok(c) => {
                let spec = c.spec().await.ok().flatten();
                let state = c.state().await.ok().flatten();
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                JobRow {
                    job: name,
                    state: match state {
                        Some(s) if s.finished => "finished".into(),
                        Some(_) => "running".into(),
                        None => "unknown".into(),
                    },
                    epoch: state.map(|s| s.epoch),
                    tasks: spec.as_ref().map(|s| s.tasks),
                    replicas: spec.as_ref().map(|s| s.replicas),
                    age_secs: spec
                        .as_ref()
                        .and_then(|s| s.created_ms)
                        .map(|c| now.saturating_sub(c) / 1000),
                }
            }
        };
        rows.push(row);
    }
    if json {
        let out = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
        out!("{out}");
        return Ok(());
    }
    if rows.is_empty() {
        out!("no jobs");
        return Ok(());
    }
    let mut t = table(&["JOB", "STATE", "EPOCH", "TASKS", "REPLICAS", "AGE"]);
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for r in rows {
        t.add_row(vec![
            r.job,
            r.state,
            opt(r.epoch.map(|e| e.to_string())),
            opt(r.tasks.map(|e| e.to_string())),
            opt(r.replicas.map(|e| e.to_string())),
            match r.age_secs {
                Some(s) => humantime::format_duration(Duration::from_secs(s)).to_string(),
                None => "-".into(),
            },
        ]);
    }
    out!("{t}");
    Ok(())
}

fn health_cell(h: Health) -> Cell {
    let (text, colour) = match h {
        Health::Healthy => ("healthy", Color::Green),
        Health::Degraded => ("degraded", Color::Yellow),
        Health::Down => ("down", Color::Red),
        Health::Stalled => ("stalled", Color::Magenta),
        Health::Finished => ("finished", Color::Blue),
    };
    Cell::new(text).fg(colour)
}

/// Task rows `taskgraph status` prints by default (see [`pick_rows`]).
pub const DEFAULT_ROWS: usize = 40;

/// Spare nodes named by the summary at most; the rest are counted.
const SPARES_NAMED: usize = 10;

/// Which tasks get a row when at most `rows` may: every task if they fit; otherwise the ones
/// that need attention first (down, stalled, degraded; by task id within each), then healthy
/// (or finished) ones by task id, up to `rows`. Returned in task order.
pub fn pick_rows(tasks: &[TaskStatus], rows: usize) -> Vec<&TaskStatus> {
    if tasks.len() <= rows {
        return tasks.iter().collect();
    }
    let urgency = |h: Health| match h {
        Health::Down => 0,
        Health::Stalled => 1,
        Health::Degraded => 2,
        Health::Healthy | Health::Finished => 3,
    };
    let mut picked: Vec<&TaskStatus> = tasks.iter().collect();
    picked.sort_by_key(|t| (urgency(t.health), t.task));
    picked.truncate(rows);
    picked.sort_by_key(|t| t.task);
    picked
}

/// The status as a table and a summary line: at most `rows` task rows (see [`pick_rows`]);
/// the summary counts every task.
pub fn status_text(s: &JobStatus, rows: usize) -> String {
    let mut t = table(&[
        "TASK", "PRIMARY", "ADDRESS", "TERM", "BACKUPS", "HEALTH", "EPOCH",
    ]);
    let epoch = s
        .state
        .map_or_else(|| "-".to_owned(), |st| st.epoch.to_string());
    let shown = pick_rows(&s.tasks, rows);
    for task in &shown {
        t.add_row(vec![
            Cell::new(task.task),
            Cell::new(task.primary.clone().unwrap_or_else(|| "-".into())),
            Cell::new(task.addr.clone().unwrap_or_else(|| "-".into())),
            Cell::new(task.term.map_or_else(|| "-".into(), |t| t.to_string())),
            Cell::new(if task.backups.is_empty() {
                "-".to_owned()
            } else {
                task.backups.join(", ")
            }),
            health_cell(task.health),
            Cell::new(&epoch),
        ]);
    }
    let count = |h: Health| s.tasks.iter().filter(|t| t.health == h).count();
    let state = match s.state {
        Some(st) if st.finished => format!("finished at epoch {}", st.epoch),
        Some(st) if s.stalled() => {
            let secs = s.stalls.iter().map(|n| n.note.for_ms).max().unwrap_or(0) as f64 / 1000.0;
            format!("stalled at epoch {} (unmoved for {secs:.1} s)", st.epoch)
        }
        Some(st) => format!("running, epoch {}", st.epoch),
        None => "no epoch key".into(),
    };
    let mut out = format!("{t}\n");
    if shown.len() < s.tasks.len() {
        let left = s.tasks.len() - shown.len();
        out += &format!(
            "{left} of {} tasks not listed (those needing attention come first; --all lists every task, --json gives every field)\n",
            s.tasks.len()
        );
    }
    if !s.spares.is_empty() {
        let names: Vec<&str> = s
            .spares
            .iter()
            .take(SPARES_NAMED)
            .map(|n| n.node.as_str())
            .collect();
        let more = s.spares.len().saturating_sub(SPARES_NAMED);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        out += &format!("spares waiting: {}{more}\n", names.join(", "));
    }
    out += &format!(
        "job {}: {state}; {} tasks × {} replicas; {} healthy, {} degraded, {} down; {} nodes ({} spare); age {}; etcd revision {}",
        s.job,
        s.tasks_total,
        s.replicas,
        count(Health::Healthy),
        count(Health::Degraded),
        count(Health::Down),
        s.nodes,
        s.spares.len(),
        age(s.created_ms),
        s.revision
    );
    for g in &s.garbage {
        out += &format!("\nwarning: garbage in etcd: {g}");
    }
    if s.stalled() {
        let reasons = s.stall_reasons();
        if reasons.is_empty() {
            out += "\nstalled: no cause seen by the reporting nodes (an epoch longer than the stall time?)";
        }
        for r in reasons {
            out += &format!("\nstalled: {}", r.text);
        }
    }
    out
}

/// `taskgraph status`.
pub async fn status(client: &JobClient, json: bool, rows: usize) -> Result<(), String> {
    let s = client.status().await.map_err(|e| e.to_string())?;
    if json {
        let out = serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?;
        out!("{out}");
    } else {
        out!("{}", status_text(&s, rows));
    }
    Ok(())
}

/// `taskgraph status --watch`: redraws on every change of the job's keys.
pub async fn status_watch(client: &JobClient, rows: usize) -> Result<(), String> {
    let mut events = client.changes();
    loop {
        let s = client.status().await.map_err(|e| e.to_string())?;
        // Clear the screen and draw from the top.
        out!("\x1b[2J\x1b[H{}", status_text(&s, rows));
        if s.state.is_some_and(|st| st.finished) {
            return Ok(());
        }
        tokio::select! {
            e = events.recv() => match e {
                Some(Ok(ChangeEvent { change: JobChange::Disconnected, .. })) => {
                    eprintln!("(etcd unreachable; retrying)")
                }
                Some(_) => {
                    // Let a burst of changes settle into one redraw.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    while events.try_recv().is_some() {}
                }
                None => return Err("the watch of the job ended".into()),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `taskgraph failover`: hands over, then waits for the new primary.
pub async fn failover(client: &JobClient, task: TaskId, wait: Duration) -> Result<(), String> {
    let mut events = client.changes();
    let handover = client.hand_over(task).await.map_err(|e| e.to_string())?;
    out!(
        "task {task}: primary {} (term {}) hands over to backup {}",
        handover.from.node,
        handover.from.revision,
        handover.to.node
    );
    let old_term = handover.from.revision as u64;
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            e = events.recv() => {
                let Some(e) = e else {
                    return Err("the watch of the job ended".into());
                };
                let change = e.map_err(|e| e.to_string())?.change;
                // The stream's snapshot may already show the new primary.
                let new = match change {
                    JobChange::PrimaryUp { task: t, node, term, .. } if t == task => Some((node, term)),
                    JobChange::Snapshot(s) => s
                        .tasks
                        .iter()
                        .find(|t| t.task == task)
                        .and_then(|t| t.primary.clone().zip(t.term)),
                    _ => None,
                };
                if let Some((node, term)) = new.filter(|(_, term)| *term > old_term) {
                    out!("task {task}: new primary {node} (term {term})");
                    return Ok(());
                }
            }
            () = &mut deadline => {
                return Err(format!(
                    "task {task} has no new primary after {}",
                    humantime::format_duration(wait)
                ));
            }
        }
    }
}

/// `taskgraph result`.
pub async fn result(client: &JobClient, wait: bool) -> Result<(), String> {
    let mut events = wait.then(|| client.changes());
    loop {
        let state = client.state().await.map_err(|e| e.to_string())?;
        if state.is_some_and(|s| s.finished) {
            return match client.result().await.map_err(|e| e.to_string())? {
                Some(bytes) => {
                    out!("{}", String::from_utf8_lossy(&bytes));
                    Ok(())
                }
                None => Err(format!("job {:?} finished without a result", client.job())),
            };
        }
        let Some(ev) = events.as_mut() else {
            return Err(format!(
                "job {:?} is still running (epoch {}); add --wait to wait for it",
                client.job(),
                state.map_or(0, |s| s.epoch)
            ));
        };
        if ev.recv().await.is_none() {
            return Err("the watch of the job ended".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskgraph::{JobState, SpareNode};

    fn task(id: TaskId, health: Health) -> TaskStatus {
        TaskStatus {
            task: id,
            primary: (health != Health::Down).then(|| format!("n{id}")),
            addr: None,
            term: None,
            backups: Vec::new(),
            health,
            holders: Vec::new(),
        }
    }

    fn job(tasks: Vec<TaskStatus>, spares: usize) -> JobStatus {
        JobStatus {
            job: "j".into(),
            revision: 1,
            tasks_total: u32::try_from(tasks.len()).unwrap_or(u32::MAX),
            replicas: 2,
            state: Some(JobState {
                epoch: 3,
                finished: false,
            }),
            created_ms: None,
            tasks,
            spares: (0..spares)
                .map(|i| SpareNode {
                    node: format!("spare{i}"),
                    addr: String::new(),
                })
                .collect(),
            nodes: 0,
            has_result: false,
            garbage: Vec::new(),
            stalls: Vec::new(),
        }
    }

    #[test]
    fn a_large_job_lists_the_tasks_needing_attention_and_counts_the_rest() {
        let mut tasks: Vec<TaskStatus> = (0..1000).map(|t| task(t, Health::Healthy)).collect();
        tasks[999] = task(999, Health::Down);
        tasks[500] = task(500, Health::Degraded);
        tasks[7] = task(7, Health::Stalled);
        let rows: Vec<TaskId> = pick_rows(&tasks, 5).iter().map(|t| t.task).collect();
        assert_eq!(
            rows,
            vec![0, 1, 7, 500, 999],
            "attention first, shown in task order"
        );
        let s = job(tasks, 25);
        let text = status_text(&s, 5);
        assert!(text.contains("995 of 1000 tasks not listed"), "{text}");
        assert!(text.contains("spare9 and 15 more"), "{text}");
        assert!(!text.contains("spare10"), "{text}");
        assert!(
            text.contains("1 down"),
            "the summary counts every task: {text}"
        );
    }

    #[test]
    fn a_job_that_fits_lists_every_task_and_no_note() {
        let tasks: Vec<TaskStatus> = (0..3).map(|t| task(t, Health::Healthy)).collect();
        assert_eq!(pick_rows(&tasks, 3).len(), 3);
        let text = status_text(&job(tasks, 2), DEFAULT_ROWS);
        assert!(!text.contains("not listed"), "{text}");
        assert!(text.contains("spares waiting: spare0, spare1\n"), "{text}");
    }
}
