//! `taskgraph graph`: the job's topology at its current epoch as Graphviz DOT.

use std::path::Path;

use taskgraph::JobClient;

/// Prints the DOT text; with `svg`, also renders it with Graphviz `dot`.
pub async fn graph(client: &JobClient, svg: Option<&Path>) -> Result<(), String> {
    let _ = (client, svg);
    Err("graph: not built yet".into())
}
