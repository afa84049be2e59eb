//! `switchboard-gateway`: a gateway node of a cluster, or — with neither
//! `REDIS_URL` nor `DATABASE_URL` — the whole product in one process.

mod auth;
mod client_addr;
mod demo;
mod embedded;
mod engine_request;
mod fanout;
mod pending;
mod presence;
mod recovery;
mod rest;
mod server;
mod socket;
mod state;
mod subscriptions;
#[cfg(test)]
mod testing;
mod typing;
mod users;

use std::time::Duration;

use clap::{Parser, Subcommand};
use switchboard_shared::config::Settings;

#[derive(Parser)]
#[command(
    name = "switchboard-gateway",
    version,
    about = "Switchboard Socket.IO chat gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve Socket.IO and REST (the default).
    Serve,
    /// Print an HS256 development token (needs AUTH_DEV_SECRET).
    DevToken {
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Display name (defaults to the user id).
        #[arg(long)]
        name: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::from_env()?;
    runtime(settings.gateway_threads)?.block_on(run(cli, settings))
}

/// The async runtime of `GATEWAY_THREADS` threads (see `Settings::gateway_threads`).
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b
    };
    builder.enable_all().build()
}

async fn run(cli: Cli, settings: Settings) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Cmd::Serve) {
        Cmd::DevToken { user, name, ttl } => {
            let secret = settings
                .auth_dev_secret
                .ok_or_else(|| anyhow::anyhow!("AUTH_DEV_SECRET is not set"))?;
            println!(
                "{}",
                auth::dev_token(&secret, &user, name.as_deref(), Duration::from_secs(ttl))?
            );
            Ok(())
        }
        Cmd::Serve => {
            switchboard_shared::telemetry::init_tracing("switchboard-gateway");
            let served = server::serve(settings).await;
            switchboard_shared::telemetry::shutdown_tracing();
            served
        }
    }
}
