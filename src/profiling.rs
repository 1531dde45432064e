//! `-pprof ADDR`: on-demand CPU profiles, as Go HarmonyLite's pprof endpoint offered. `GET
//! /debug/pprof/profile?seconds=N` returns a protobuf profile that `go tool pprof` reads; `GET
//! /debug/pprof/flamegraph?seconds=N` returns the same samples as an SVG flame graph. Invariants:
//! one profile at a time (409 while one runs); `seconds` is bounded (default 30, at most 300);
//! sampling (99 Hz, on a blocking thread) runs only during a request: no cost otherwise.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Query;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::Mutex;

/// Sampling frequency (Hz); odd to avoid lock-step with periodic work.
const FREQUENCY: i32 = 99;
const DEFAULT_SECONDS: u64 = 30;
const MAX_SECONDS: u64 = 300;
const NO_SAMPLES_SVG: &str = "<?xml version=\"1.0\" standalone=\"no\"?>\n\
<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"40\">\
<text x=\"10\" y=\"25\">No CPU samples: the process was idle while profiled.</text></svg>\n";

#[derive(Debug, serde::Deserialize)]
pub struct Params {
    pub seconds: Option<u64>,
}

enum Output {
    Protobuf,
    Flamegraph,
}

/// Why a profile could not be taken; the request gets 500 with the whole cause chain.
#[derive(Debug, thiserror::Error)]
enum CaptureError {
    /// The sampling timer could not be set up (for example, no permission for the signal).
    #[error("cannot start profiler")]
    Start(#[source] pprof::Error),
    #[error("cannot build report")]
    Report(#[source] pprof::Error),
    #[error("cannot encode profile")]
    Encode(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot draw flame graph")]
    Flamegraph(#[source] pprof::Error),
}

fn capture(seconds: u64, output: Output) -> Result<Vec<u8>, CaptureError> {
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(FREQUENCY)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .map_err(CaptureError::Start)?;
    std::thread::sleep(Duration::from_secs(seconds));
    let report = guard.report().build().map_err(CaptureError::Report)?;
    let mut body = Vec::new();
    match output {
        Output::Protobuf => {
            use pprof::protos::Message;
            let profile = report.pprof().map_err(|e| CaptureError::Encode(e.into()))?;
            // protobuf's error type is not re-exported by pprof, hence the box.
            profile
                .write_to_vec(&mut body)
                .map_err(|e| CaptureError::Encode(e.into()))?;
        }
        Output::Flamegraph => {
            if report.data.is_empty() {
                // inferno draws nothing without samples; say why instead of an empty answer.
                body.extend_from_slice(NO_SAMPLES_SVG.as_bytes());
            } else {
                report
                    .flamegraph(&mut body)
                    .map_err(CaptureError::Flamegraph)?;
            }
        }
    }
    Ok(body)
}

async fn handle(busy: Arc<Mutex<()>>, params: Params, output: Output) -> Response {
    let Ok(_running) = busy.try_lock() else {
        return (StatusCode::CONFLICT, "a profile is already being taken\n").into_response();
    };
    let seconds = params
        .seconds
        .unwrap_or(DEFAULT_SECONDS)
        .clamp(1, MAX_SECONDS);
    let content_type = match output {
        Output::Protobuf => "application/octet-stream",
        Output::Flamegraph => "image/svg+xml",
    };
    let failure = match tokio::task::spawn_blocking(move || capture(seconds, output)).await {
        Ok(Ok(body)) => return ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Ok(Err(e)) => crate::error_chain(&e),
        Err(e) => format!("profiler failed: {e}"),
    };
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{failure}\n")).into_response()
}

pub fn router() -> axum::Router {
    let busy = Arc::new(Mutex::new(()));
    let b2 = Arc::clone(&busy);
    axum::Router::new()
        .route(
            "/debug/pprof/profile",
            axum::routing::get(move |Query(p): Query<Params>| {
                handle(Arc::clone(&busy), p, Output::Protobuf)
            }),
        )
        .route(
            "/debug/pprof/flamegraph",
            axum::routing::get(move |Query(p): Query<Params>| {
                handle(Arc::clone(&b2), p, Output::Flamegraph)
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_body_reads_as_before() {
        let e = CaptureError::Start(pprof::Error::CreatingError);
        assert_eq!(
            crate::error_chain(&e),
            "cannot start profiler: create profiler error"
        );
    }
}
