//! The `harmonylite` binary: parse flags, load config, start logging, run, map the outcome to an
//! exit code. Exit codes: 0 normal stop, 1 runtime failure, 2 bad usage or configuration.

use std::process::ExitCode;

use harmonylite::{app, cli, config, logging};
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
    let settings = match config::load(args.config.as_deref()).and_then(|parsed| {
        let overrides = config::Overrides {
            node_id: args.node_id,
            cluster_addr: args.cluster_addr.clone(),
            cluster_peers: args.cluster_peers.clone(),
            leaf_servers: args.leaf_servers.clone(),
            pprof: args.pprof.clone(),
        };
        let unknown = parsed.unknown_keys.clone();
        parsed.config.validate(&overrides).map(|s| (s, unknown))
    }) {
        Ok((settings, unknown)) => {
            logging::init(settings.log_format, settings.log_verbose, settings.node_id);
            for key in unknown {
                tracing::warn!(key = %key, "Unknown config key ignored");
            }
            settings
        }
        Err(e) => {
            eprintln!("harmonylite: {e}");
            return ExitCode::from(2);
        }
    };

    if args.cleanup {
        return match app::cleanup(&settings) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("Unable to clean up...: {e:#}");
                exit_code(&e)
            }
        };
    }

    if args.schema_status {
        return match app::schema_status(&settings) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("harmonylite: {e:#}");
                ExitCode::FAILURE
            }
        };
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
    let shutdown = CancellationToken::new();
    if args.schema_status_cluster {
        let result = runtime.block_on(app::schema_status_cluster(&settings));
        runtime.shutdown_timeout(std::time::Duration::from_secs(2));
        return match result {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.save_snapshot {
        let result = runtime.block_on(app::save_snapshot(settings, shutdown));
        runtime.shutdown_timeout(std::time::Duration::from_secs(2));
        return match result {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                exit_code(&e)
            }
        };
    }
    let result = runtime.block_on(async {
        let token = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("Shutdown requested; finishing in-flight work");
            token.cancel();
        });
        app::run(settings, shutdown).await
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            exit_code(&e)
        }
    }
}

/// 2 for conflicts an operator must resolve before a restart can help (another daemon holds the
/// database), 1 for everything else.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    let conflict = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<harmonylite::db::Error>(),
            Some(harmonylite::db::Error::Locked(..))
        ) || matches!(
            c.downcast_ref::<harmonylite::app::StartError>(),
            Some(harmonylite::app::StartError::Conflict(_))
        )
    });
    if conflict {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
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
