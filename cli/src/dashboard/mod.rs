//! `taskgraph dashboard`: a live picture of jobs in the browser.
//!
//! One HTTP server (axum) serves a page per job at `/job/<job>` and the jobs list at `/jobs`
//! and at `/` (or, with a job on the command line, `/` leads to that job's page). Each page gets its updates
//! over Server-Sent Events from `/api/job/<job>/events`, fed by one hub per job that follows
//! the job's etcd watch ([`hub`]). The topology picture is laid out here ([`layout`]). The
//! page and its script are compiled into the binary: nothing is fetched from elsewhere.
//! Read-only: nothing the server offers changes a job.

mod hub;
pub mod layout;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::security::EtcdConn;

const JOB_PAGE: &str = include_str!("../../assets/job.html");
const JOBS_PAGE: &str = include_str!("../../assets/jobs.html");
const SCRIPT: &str = include_str!("../../assets/dashboard.js");
const STYLE: &str = include_str!("../../assets/dashboard.css");

/// Jobs followed at once by one server (each has a watch on etcd).
const MAX_HUBS: usize = 64;
/// Connections kept for the jobs list.
const MAX_LISTED: usize = 256;
/// A page gets at most one update per this interval (a busy job changes keys far faster
/// than a person reads).
const MIN_UPDATE_GAP: Duration = Duration::from_millis(100);

#[derive(Debug)]
struct Shared {
    etcd: EtcdConn,
    job: Option<String>,
    hubs: Mutex<HashMap<String, watch::Receiver<hub::View>>>,
    /// Connections for the jobs list, by job (so that a list refreshed every few seconds
    /// does not connect anew each time).
    clients: Mutex<HashMap<String, taskgraph::JobClient>>,
}

type AppState = Arc<Shared>;

/// Where the dashboard listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Serves the dashboard on `listen` until Ctrl-C. `explicit`: the address was given with
/// `--listen` (a non-loopback address is refused otherwise).
pub async fn serve(
    etcd: EtcdConn,
    job: Option<String>,
    listen: SocketAddr,
    explicit: bool,
) -> Result<(), String> {
    if !listen.ip().is_loopback() && !explicit {
        return Err(format!(
            "refusing to serve the dashboard on {listen}, which is not a loopback address, \
             from the environment; the dashboard has no authentication: pass --listen {listen} \
             explicitly to serve it there"
        ));
    }
    if let Some(j) = &job {
        taskgraph::validate_job_name(j).map_err(|e| e.to_string())?;
        // Like the other commands: fail early when etcd is not there at all.
        let client = etcd.connect(j).await.map_err(|e| e.to_string())?;
        if client.spec().await.map_err(|e| e.to_string())?.is_none() {
            eprintln!(
                "warning: job {j:?} does not exist (yet); the page will say so and show it once it does"
            );
        }
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    let path = job.as_ref().map_or(String::new(), |j| format!("job/{j}"));
    out!("dashboard: http://{addr}/{path}");
    if addr.ip().is_loopback() {
        out!("listening on loopback only (--listen ADDR to serve elsewhere); read-only");
    } else {
        out!("listening on {addr}, reachable from other hosts, without authentication; read-only");
    }
    let state = Arc::new(Shared {
        etcd,
        job,
        hubs: Mutex::new(HashMap::new()),
        clients: Mutex::new(HashMap::new()),
    });
    // Pages keep their event streams open: on Ctrl-C the server just stops (it holds
    // nothing to save).
    tokio::select! {
        r = axum::serve(listener, router(state)) => {
            r.map_err(|e| format!("the dashboard server failed: {e}"))
        }
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/jobs", get(jobs_page))
        .route("/job/{job}", get(job_page))
        .route("/api/jobs", get(jobs))
        .route("/api/job/{job}/events", get(events))
        .route("/assets/dashboard.js", get(script))
        .route("/assets/dashboard.css", get(style))
        .with_state(state)
}

async fn index(State(s): State<AppState>) -> Response {
    match &s.job {
        Some(j) => Redirect::to(&format!("/job/{j}")).into_response(),
        None => page(JOBS_PAGE),
    }
}

async fn jobs_page() -> Response {
    page(JOBS_PAGE)
}

async fn job_page() -> Response {
    page(JOB_PAGE)
}

fn page(html: &'static str) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
        .into_response()
}

async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

/// One row of the jobs list.
#[derive(Debug, Serialize)]
struct JobRow {
    job: String,
    state: &'static str,
    epoch: Option<u64>,
    tasks: Option<u32>,
    replicas: Option<u32>,
}

#[derive(Debug, Serialize)]
struct JobsAnswer {
    jobs: Vec<JobRow>,
    error: Option<String>,
}

async fn jobs(State(s): State<AppState>) -> Json<JobsAnswer> {
    let names = match s.etcd.job_names().await {
        Ok(n) => n,
        Err(e) => {
            return Json(JobsAnswer {
                jobs: Vec::new(),
                error: Some(format!("etcd: {e}")),
            })
        }
    };
    let mut rows = Vec::new();
    for name in names {
        let cached = s.clients.lock().ok().and_then(|m| m.get(&name).cloned());
        let c = match cached {
            Some(c) => c,
            // Names that are not valid job names are not taskgraph jobs.
            None => match s.etcd.connect(&name).await {
                Ok(c) => {
                    if let Ok(mut m) = s.clients.lock() {
                        if m.len() >= MAX_LISTED {
                            m.clear();
                        }
                        m.insert(name.clone(), c.clone());
                    }
                    c
                }
                Err(_) => continue,
            },
        };
        let spec = c.spec().await.ok().flatten();
        let state = c.state().await.ok().flatten();
        rows.push(JobRow {
            job: name,
            state: match state {
                Some(st) if st.finished => "finished",
                Some(_) => "running",
                None => "unknown",
            },
            epoch: state.map(|st| st.epoch),
            tasks: spec.as_ref().map(|sp| sp.tasks),
            replicas: spec.as_ref().map(|sp| sp.replicas),
        });
    }
    Json(JobsAnswer {
        jobs: rows,
        error: None,
    })
}

/// The hub of `job`, started on first use.
fn hub_of(s: &AppState, job: &str) -> Result<watch::Receiver<hub::View>, String> {
    taskgraph::validate_job_name(job).map_err(|e| e.to_string())?;
    let mut hubs = s
        .hubs
        .lock()
        .map_err(|_| "the dashboard's job table is broken (a thread panicked)".to_owned())?;
    if let Some(rx) = hubs.get(job) {
        return Ok(rx.clone());
    }
    if hubs.len() >= MAX_HUBS {
        return Err(format!(
            "this dashboard already follows {MAX_HUBS} jobs; start another one for more"
        ));
    }
    let (tx, rx) = watch::channel(hub::View {
        job: job.to_owned(),
        ..hub::View::default()
    });
    tokio::spawn(hub::run(s.etcd.clone(), job.to_owned(), tx));
    hubs.insert(job.to_owned(), rx.clone());
    Ok(rx)
}

#[derive(Debug, Serialize)]
struct Refused {
    error: String,
}

async fn events(State(s): State<AppState>, Path(job): Path<String>) -> impl IntoResponse {
    let (out, stream) = mpsc::channel::<Result<Event, Infallible>>(4);
    match hub_of(&s, &job) {
        Ok(rx) => {
            tokio::spawn(feed(rx, out));
        }
        Err(error) => {
            let data = serde_json::to_string(&Refused { error })
                .unwrap_or_else(|_| r#"{"error":"refused"}"#.into());
            // The stream stays open (without updates) so the page does not retry.
            tokio::spawn(async move {
                if out
                    .send(Ok(Event::default().event("refused").data(data)))
                    .await
                    .is_ok()
                {
                    out.closed().await;
                }
            });
        }
    }
    Sse::new(ReceiverStream::new(stream)).keep_alive(KeepAlive::default())
}

/// Sends a page the view, then every change of it (tasks, picture and timeline only as
/// far as the page has not seen them), until the page goes.
async fn feed(mut rx: watch::Receiver<hub::View>, out: mpsc::Sender<Result<Event, Infallible>>) {
    let mut sent = hub::Sent::default();
    loop {
        let data = {
            let view = rx.borrow_and_update();
            serde_json::to_string(&sent.update(&view))
        };
        let data = data.unwrap_or_else(|e| {
            serde_json::json!({ "error": format!("cannot encode the view: {e}") }).to_string()
        });
        if out
            .send(Ok(Event::default().event("update").data(data)))
            .await
            .is_err()
        {
            return;
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = out.closed() => return,
        }
        // Coalesce a burst of changes into one update.
        tokio::time::sleep(MIN_UPDATE_GAP).await;
    }
}
