//! The `relay` binary: load the config, start the shards, drain on SIGTERM/SIGINT (SIGHUP,
//! which asks for a reload relay does not offer, is logged and ignored).

use std::process::ExitCode;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

fn main() -> ExitCode {
    let loaded = match relay::config::load_from_process() {
        Ok(loaded) => loaded,
        Err(relay::config::ConfigError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("relay: {e}");
            return ExitCode::from(2);
        }
    };
    if loaded.print_config {
        print!("{}", loaded.config.to_toml());
        return ExitCode::SUCCESS;
    }
    let config = loaded.config;
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();

    // Register before starting so a signal during start-up is not lost.
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("relay: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    match relay::server::raise_open_file_limit() {
        Ok(limit) => {
            let wanted = config.limits.max_connections as u64
                + relay::server::OPEN_FILES_BESIDES_CONNECTIONS;
            if limit.soft < wanted {
                tracing::warn!(
                    "this process may open {} files (RLIMIT_NOFILE, hard limit {}), fewer than \
                     limits.max_connections = {} needs (about {wanted}); connections past it are \
                     refused when accepted. Raise the hard limit (systemd LimitNOFILE=, \
                     ulimit -Hn) or lower limits.max_connections",
                    limit.soft,
                    limit.hard,
                    config.limits.max_connections
                );
            }
        }
        Err(e) => tracing::warn!("cannot read or raise RLIMIT_NOFILE: {e}"),
    }
    let source = loaded
        .config_path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "embedded defaults".into());
    let running = match relay::server::start(config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("relay: {e}");
            return ExitCode::from(1);
        }
    };
    let auth = &running.shared.config.auth;
    if auth.jwt_secret.is_none() && auth.api_keys.is_none() {
        tracing::warn!(
            "AUTH IS OFF: anyone who reaches this port may publish, subscribe and read admin \
             endpoints; set auth.jwt_secret (clients) and auth.api_keys (publishers, admin)"
        );
    } else if auth.api_keys.is_none() {
        tracing::warn!("auth.api_keys is not set: publish and admin endpoints are open");
    } else if auth.jwt_secret.is_none() {
        tracing::warn!(
            "auth.jwt_secret is not set: WebSocket and SSE clients are not authenticated"
        );
    }
    tracing::info!(
        "relay listening on {} ({} shards, {} driver, config: {})",
        running.local_addr,
        running.shared.shards,
        running.driver,
        source
    );
    for signal in signals.forever() {
        let name = match signal {
            SIGTERM => "SIGTERM",
            SIGINT => "SIGINT",
            _ => {
                // A terminal hang-up or `systemctl reload` must not end the process unannounced
                // (SIGHUP's default) and relay has no live reload: say so and keep serving.
                tracing::warn!(
                    "SIGHUP: relay does not reload its config; ignored (a restart applies a new \
                     config, and SIGTERM drains first)"
                );
                continue;
            }
        };
        tracing::info!(
            "{name}: draining (deadline {}s)",
            running.shared.config.shutdown.deadline_s
        );
        break;
    }
    running.drain();
    running.join();
    tracing::info!("relay stopped");
    ExitCode::SUCCESS
}
