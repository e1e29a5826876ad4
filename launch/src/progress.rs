//! The progress bar (hidden when stderr is not a terminal, or when the run has none).

use std::time::Duration;

use taskgraph::JobState;

#[derive(Debug)]
pub(crate) struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    /// A bar up to epoch `epochs` (when known), or a hidden one when not `on`.
    pub(crate) fn new(on: bool, epochs: Option<u64>) -> Progress {
        let bar = match (on, epochs) {
            (false, _) => indicatif::ProgressBar::hidden(),
            (true, Some(epochs)) => indicatif::ProgressBar::new(epochs),
            (true, None) => indicatif::ProgressBar::no_length(),
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} epoch {pos}/{len} [{bar:30}] {elapsed} {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar }
    }

    pub(crate) fn update(&self, state: JobState, kills: u64, failovers: u64) {
        self.bar
            .set_position(state.epoch.min(self.bar.length().unwrap_or(u64::MAX)));
        self.bar
            .set_message(format!("kills {kills}, failovers {failovers}"));
    }

    /// Prints `line` on stderr without tearing the bar.
    pub(crate) fn println(&self, line: &str) {
        self.bar.suspend(|| eprintln!("{line}"));
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
