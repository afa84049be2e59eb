//! `switchboard-gateway`: a gateway node of a cluster, or — with neither
//! `REDIS_URL` nor `DATABASE_URL` — the whole product in one process.

mod auth;
mod client_addr;
mod demo;
mod embedded;
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Cmd::Serve) {
        Cmd::DevToken { user, name, ttl } => {
            let settings = Settings::from_env()?;
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
            let settings = Settings::from_env()?;
            let served = server::serve(settings).await;
            switchboard_shared::telemetry::shutdown_tracing();
            served
        }
    }
}
