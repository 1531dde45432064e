//! Logging with `tracing`: console or JSON lines on stdout (as Go), `debug` with `logging.verbose`,
//! else `info`, unless `RUST_LOG` says otherwise. Every line carries `node_id`, as Go's zerolog
//! logger did: console lines end with `node_id=<id>`, JSON objects have a top-level `"node_id"`.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Wraps a formatter and adds the node id to each line it produces.
struct WithNodeId<F> {
    inner: F,
    node_id: u64,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithNodeId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let line = line.trim_end_matches('\n');
        if self.json {
            match line.strip_prefix('{') {
                Some(rest) => writeln!(writer, "{{\"node_id\":{},{rest}", self.node_id),
                None => writeln!(writer, "{line}"),
            }
        } else {
            writeln!(writer, "{line} node_id={}", self.node_id)
        }
    }
}

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(format: LogFormat, verbose: bool, node_id: u64) {
    let default_level = if verbose { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // Our own debug logs only; dependencies stay at info.
        EnvFilter::new(format!("info,harmonylite={default_level}"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    // Already initialised (tests start several nodes in one process): keep the first.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .event_format(WithNodeId {
                inner: format::format()
                    .json()
                    .flatten_event(true)
                    .with_target(false),
                node_id,
                json: true,
            })
            .try_init(),
        LogFormat::Console => builder
            .event_format(WithNodeId {
                inner: format::format().with_target(false).with_ansi(false),
                node_id,
                json: false,
            })
            .try_init(),
    };
}
