//! The stall reports of the job's nodes (in their records), as the launcher follows them: the
//! lines it prints, and when it gives up.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use taskgraph::StallNote;

use crate::error::ErrorKind;

#[derive(Debug, Default)]
pub(crate) struct Stalls {
    notes: BTreeMap<String, StallNote>,
    /// Since when some node reports a stall.
    since: Option<Instant>,
    /// Reasons already printed during this stall.
    printed: Vec<String>,
    /// Lines to print.
    news: Vec<String>,
}

impl Stalls {
    /// Node `node`'s report (`None`: not stalled or gone).
    pub(crate) fn note(&mut self, node: String, note: Option<StallNote>) {
        match note {
            Some(note) => {
                if self.since.is_none() {
                    self.since = Some(Instant::now());
                    self.news.push(format!(
                        "warning: the job is stalled: epoch {} has not moved for {:.1} s",
                        note.epoch,
                        note.for_ms as f64 / 1000.0
                    ));
                }
                for r in &note.reasons {
                    if !self.printed.contains(&r.text) {
                        self.printed.push(r.text.clone());
                        self.news.push(format!("warning: stalled: {}", r.text));
                    }
                }
                self.notes.insert(node, note);
            }
            None => {
                if self.notes.remove(&node).is_some() && self.notes.is_empty() {
                    self.since = None;
                    self.printed.clear();
                    self.news.push("the job moves again".into());
                }
            }
        }
    }

    /// The lines to print since the last call.
    pub(crate) fn news(&mut self) -> Vec<String> {
        std::mem::take(&mut self.news)
    }

    /// When the launcher gives up on the current stall, if there is one: `limit` (default:
    /// five times the nodes' stall time, at least a minute) after the first report.
    pub(crate) fn deadline(&self, limit: Option<Duration>) -> Option<Instant> {
        let since = self.since?;
        let after = self.notes.values().map(|n| n.after_ms).max()?;
        let limit = limit
            .unwrap_or_else(|| (Duration::from_millis(after) * 5).max(Duration::from_secs(60)));
        Some(since + limit)
    }

    /// The error once the job has stayed stalled past its [`deadline`](Stalls::deadline): it
    /// does not heal.
    pub(crate) fn given_up(&self, job: &str, limit: Option<Duration>) -> Option<ErrorKind> {
        let since = self.since?;
        if Instant::now() < self.deadline(limit)? {
            return None;
        }
        let epoch = self.notes.values().map(|n| n.epoch).max().unwrap_or(0);
        let stalled_for =
            Duration::from_millis(self.notes.values().map(|n| n.for_ms).max().unwrap_or(0))
                + since.elapsed();
        let cause = self
            .notes
            .values()
            .flat_map(|n| &n.reasons)
            .next()
            .map_or_else(
                || {
                    "no node sees a cause (an epoch longer than the stall time? see --stall-after)"
                        .to_owned()
                },
                |r| match (&r.key, r.task) {
                    (Some(key), _) => format!("{} [key {key}]", r.text),
                    (None, Some(t)) => format!("{} [task {t}]", r.text),
                    (None, None) => r.text.clone(),
                },
            );
        Some(ErrorKind::Stalled {
            job: job.to_owned(),
            epoch,
            stalled_for,
            cause,
        })
    }
}
