//! The node's HTTP endpoints: `/metrics` (the registry of [`crate::metrics`]), `/healthz` and
//! `/readyz` (the verdicts of [`crate::health`]). See [`crate::metrics`] for what each answers.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::health::Health;
use crate::metrics::{Metrics, CONTENT_TYPE};

#[derive(Clone)]
struct Endpoints {
    metrics: Metrics,
    health: Arc<Health>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until aborted.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    health: Arc<Health>,
) {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Endpoints { metrics, health });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "the metrics server failed");
    }
}

async fn scrape(State(s): State<Endpoints>) -> Response {
    match s.metrics.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n",
        )
            .into_response(),
    }
}

fn verdict(outcome: Result<String, String>) -> Response {
    let (code, line) = match outcome {
        Ok(line) => (StatusCode::OK, line),
        Err(line) => (StatusCode::SERVICE_UNAVAILABLE, line),
    };
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{line}\n"),
    )
        .into_response()
}

async fn healthz(State(s): State<Endpoints>) -> Response {
    verdict(s.health.live())
}

async fn readyz(State(s): State<Endpoints>) -> Response {
    verdict(s.health.ready())
}
