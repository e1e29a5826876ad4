//! `taskgraph graph`: the job's topology at its current epoch as Graphviz DOT, each task
//! coloured by its health and labelled with its primary.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use taskgraph::topology::dot_quote;
use taskgraph::{Health, JobClient, Links};

/// Drawing more tasks than this is refused (a full mesh of them is already 10^8 edges).
const MAX_DRAWN_TASKS: u32 = 10_000;

/// Prints the DOT text; with `svg`, also renders it with Graphviz `dot`.
pub async fn graph(client: &JobClient, svg: Option<&Path>) -> Result<(), String> {
    let Some(spec) = client.spec().await.map_err(|e| e.to_string())? else {
        return Err(format!("job {:?} does not exist", client.job()));
    };
    if spec.tasks > MAX_DRAWN_TASKS {
        return Err(format!(
            "job {:?} has {} tasks; graph draws at most {MAX_DRAWN_TASKS}",
            client.job(),
            spec.tasks
        ));
    }
    let status = client.status().await.map_err(|e| e.to_string())?;
    let rebuilt = Links::from_description_lenient(&spec.links);
    for skipped in &rebuilt.skipped {
        eprintln!("warning: not drawn: {skipped}");
    }
    let links = rebuilt.links;
    links
        .validate(spec.tasks)
        .map_err(|e| format!("the job's stored topology does not fit its tasks: {e}"))?;
    let epoch = status.state.map_or(0, |s| s.epoch);
    let dot = links.to_dot_with(spec.tasks, epoch, |t| {
        let task = status.tasks.iter().find(|s| s.task == t)?;
        let colour = match task.health {
            Health::Healthy => "palegreen",
            Health::Degraded => "gold",
            Health::Down => "tomato",
            Health::Stalled => "orchid",
            Health::Finished => "lightblue",
        };
        let primary = task.primary.as_deref().unwrap_or("no primary");
        let label = format!("{t}\n{primary}\n{} backup(s)", task.backups.len());
        Some(format!(
            "style=filled, fillcolor={colour}, label={}",
            dot_quote(&label)
        ))
    });
    out!("{dot}");
    if let Some(path) = svg {
        render_svg(&dot, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn render_svg(dot: &str, path: &Path) -> Result<(), String> {
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .arg("-o")
        .arg(path)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("cannot run Graphviz `dot` ({e}); install it (Debian: apt-get install graphviz) or pipe the DOT text yourself")
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(dot.as_bytes())
            .map_err(|e| format!("cannot feed `dot`: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("`dot` failed: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`dot` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
