//! The `harmonylite` binary: parse flags, load config, start logging, run, map the outcome to an
//! exit code. Exit codes: 0 normal stop, 1 runtime failure, 2 bad usage or configuration.

use std::process::ExitCode;

use anyhow::Context as _;
use std::time::Duration;

use harmonylite::{app, cli, config, logging};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = match cli::parse(std::env::args_os()) {
        Ok(a) => a,
        Err(e) => {
            let code = e.exit_code();
            let _ = e.print();
            return ExitCode::from(code.clamp(0, 255) as u8);
        }
    };
    if args.version {
        println!("{}", cli::version_line());
        return ExitCode::SUCCESS;
    }
    let settings = match load_settings(&args) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    if args.cleanup {
        return finish(app::cleanup(&settings).context("Unable to clean up..."));
    }
    if args.schema_status {
        return print_report(app::schema_status(&settings), false);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("harmonylite: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.schema_status_cluster {
        let report = block_on_then_stop(runtime, app::schema_status_cluster(&settings));
        print_report(report, true)
    } else if args.save_snapshot {
        let shutdown = CancellationToken::new();
        finish(block_on_then_stop(
            runtime,
            app::save_snapshot(settings, shutdown),
        ))
    } else {
        run_daemon(runtime, settings)
    }
}

/// Loads and validates the config with the flag overrides, then starts logging and warns about
/// unknown keys. A config error is printed as one line and becomes exit code 2.
fn load_settings(args: &cli::Args) -> Result<config::Settings, ExitCode> {
    let loaded = config::load(args.config.as_deref()).and_then(|parsed| {
        let overrides = config::Overrides {
            node_id: args.node_id,
            cluster_addr: args.cluster_addr.clone(),
            cluster_peers: args.cluster_peers.clone(),
            leaf_servers: args.leaf_servers.clone(),
            pprof: args.pprof.clone(),
        };
        let unknown = parsed.unknown_keys.clone();
        let settings = parsed.config.validate(&overrides)?;
        settings.check_paths().map(|()| (settings, unknown))
    });
    match loaded {
        Ok((settings, unknown)) => {
            logging::init(settings.log_format, settings.log_verbose, settings.node_id);
            for key in unknown {
                tracing::warn!(key = %key, "Unknown config key ignored");
            }
            Ok(settings)
        }
        Err(e) => {
            eprintln!("harmonylite: {e}");
            Err(ExitCode::from(2))
        }
    }
}

/// `-schema-status[-cluster]`: the report on stdout; an error on stderr (cluster: stdout too).
fn print_report(report: anyhow::Result<String>, error_to_stdout: bool) -> ExitCode {
    match report {
        Ok(report) => {
            print!("{report}");
            return ExitCode::SUCCESS;
        }
        Err(e) if error_to_stdout => println!("{e:#}"),
        Err(e) => eprintln!("harmonylite: {e:#}"),
    }
    ExitCode::FAILURE
}

/// Logs a mode's failure; its exit code (see [`exit_code`]).
fn finish<T>(result: anyhow::Result<T>) -> ExitCode {
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            exit_code(&e)
        }
    }
}

/// The daemon: runs until SIGINT or SIGTERM, then finishes in-flight work.
fn run_daemon(runtime: Runtime, settings: config::Settings) -> ExitCode {
    let shutdown = CancellationToken::new();
    let result = block_on_then_stop(runtime, async {
        let token = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("Shutdown requested; finishing in-flight work");
            token.cancel();
        });
        app::run(settings, shutdown).await
    });
    finish(result)
}

/// Runs `work` to completion, then gives leftover tasks [`RUNTIME_STOP_TIMEOUT`] to finish.
fn block_on_then_stop<F: Future>(runtime: Runtime, work: F) -> F::Output {
    let output = runtime.block_on(work);
    runtime.shutdown_timeout(RUNTIME_STOP_TIMEOUT);
    output
}

/// How long leftover tasks get once the mode's work is done.
const RUNTIME_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// 2 for what an operator must resolve first (another daemon holds the database, a snapshot
/// store configuration that cannot work), else 1.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    let conflict = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<harmonylite::snapshot::Error>(),
            Some(harmonylite::snapshot::Error::Store(e)) if e.is_config()
        ) || matches!(
            c.downcast_ref::<harmonylite::db::Error>(),
            Some(harmonylite::db::Error::Locked(..))
        ) || matches!(
            c.downcast_ref::<harmonylite::app::StartError>(),
            Some(harmonylite::app::StartError::Conflict(_))
        )
    });
    ExitCode::from(if conflict { 2 } else { 1 })
}

/// Resolves on SIGINT or SIGTERM.
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            // Without handlers we can still stop on Ctrl-C through tokio's portable path.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
