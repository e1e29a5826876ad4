//! [`LocalArgs`]: the flags of a local run, for an application's `main` to
//! `#[command(flatten)]`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::job::{Chaos, LocalJob};

/// Flags of a local run (none has an environment variable: they steer the launcher, not the
/// nodes). Apply them with [`apply`](LocalArgs::apply).
///
/// ```
/// use clap::Parser;
///
/// #[derive(Parser)]
/// struct Cli {
///     #[command(flatten)]
///     local: taskgraph_launch::LocalArgs,
/// }
///
/// let cli = Cli::parse_from(["app", "--spares", "2", "--chaos-kill-every", "700ms"]);
/// assert_eq!(cli.local.spares, 2);
/// let chaos = cli.local.chaos().map(|c| c.interval());
/// assert_eq!(chaos, Some((std::time::Duration::from_millis(700), std::time::Duration::from_millis(700))));
/// ```
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// Nodes beyond tasks × replicas, waiting to take over a task whose nodes all died.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub spares: u32,
    /// Kill a random node with SIGKILL at this interval (e.g. `700ms`) and start a new one,
    /// until the job ends.
    #[arg(long, value_parser = chaos_interval)]
    pub chaos_kill_every: Option<Duration>,
    /// Seed of the chaos mode's choice of victims.
    #[arg(long, default_value_t = 1)]
    pub chaos_seed: u64,
    /// Write the nodes' logs (`node-<i>.log`) into this folder and keep them; by default they
    /// go to a temporary folder, kept only when the job fails.
    #[arg(long)]
    pub node_logs: Option<PathBuf>,
    /// Give up (exit 3) when the job has stayed stalled this long after the nodes first
    /// reported it (e.g. `2m`). Default: five times the nodes' stall time, at least a minute —
    /// a stall under chaos or on a loaded machine often heals by itself.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub stall_limit: Option<Duration>,
    /// Give up (and exit non-zero) if the job has not finished after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// No progress bar, only the summary.
    #[arg(long, short)]
    pub quiet: bool,
}

impl LocalArgs {
    /// The chaos mode these flags ask for.
    pub fn chaos(&self) -> Option<Chaos> {
        self.chaos_kill_every
            .map(|every| Chaos::every(every).seed(self.chaos_seed))
    }

    /// Applies every flag to `job`: spares, chaos, node logs, stall limit, time limit, and
    /// `--quiet` (no progress bar).
    pub fn apply(&self, job: LocalJob) -> LocalJob {
        job.spares(self.spares)
            .chaos(self.chaos())
            .node_logs(self.node_logs.clone())
            .stall_limit(self.stall_limit)
            .timeout(Some(self.timeout))
            .progress_bar(!self.quiet)
    }
}

fn chaos_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d < Duration::from_millis(10) {
        return Err(format!("{s:?}: at least 10ms"));
    }
    Ok(d)
}
