//! `switchboard-worker`: a worker process of a cluster, or `migrate` to apply
//! the database migrations and exit.

use clap::{Parser, Subcommand};
use switchboard_shared::backends::Backends;
use switchboard_shared::config::{Mode, Settings};
use switchboard_shared::store::Store;
use switchboard_worker::Worker;
use tokio_util::sync::CancellationToken;

mod probes;

/// mimalloc instead of glibc's malloc: a batch allocates and frees many
/// short-lived buffers (entries, rows, payloads, Redis frames), and glibc's
/// allocator was a fifth of the worker's instructions. With mimalloc the
/// worker runs ~20 % fewer instructions per message (`loadtest/instructions.sh`,
/// BENCHMARKS.md "Issue 9, fifth pass"). The gateway keeps glibc: there
/// mimalloc saves ~12 % of the instructions but holds ~9 % more memory per
/// idle connection, and a gateway is sized by its connections' memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process, unless
/// `MIMALLOC_ALLOW_THP` is set (then mimalloc's own option decides).
///
/// mimalloc maps its arenas 2 MiB-aligned, so on a host whose THP setting is
/// `always` (RHEL's default, and this project's test machines) every arena
/// page the worker touches brings a whole 2 MiB huge page in: an idle worker
/// held 36 MB instead of 20, one after a saturating run 57–70 MB instead of
/// 33–43, at the same throughput (BENCHMARKS.md, "Issue 9, ninth pass").
/// `MIMALLOC_ALLOW_THP=0` does the same, but mimalloc reads it when it
/// initialises, before `main`: the process sets the flag itself instead. The
/// few pages faulted before that keep their size; every later fault gets
/// normal pages.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
            eprintln!("switchboard-worker: could not turn transparent huge pages off: {e}");
        }
    }
}

#[derive(Parser)]
#[command(
    name = "switchboard-worker",
    version,
    about = "Switchboard worker: persists, dedupes and fans out the writes of the gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Process the command streams (the default).
    Run,
    /// Apply the database migrations and exit (safe to run from several nodes at once).
    Migrate,
}

/// One thread: a worker is one loop of awaits (read, claim, insert,
/// publish), so a multi-threaded runtime only adds cross-thread wake-ups
/// (context switches were the top of its profile) without parallelism to gain.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    no_transparent_huge_pages();
    switchboard_shared::telemetry::init_tracing("switchboard-worker");
    let cli = Cli::parse();
    let settings = Settings::from_env()?;
    match cli.command.unwrap_or(Cmd::Run) {
        Cmd::Migrate => {
            let url = match settings.mode()? {
                Mode::Cluster { database_url, .. } => database_url,
                Mode::Embedded { data_dir } => {
                    Store::open_embedded(&data_dir).await?.migrate().await?;
                    tracing::info!(dir = %data_dir.display(), "embedded database migrated");
                    return Ok(());
                }
            };
            let store = Store::connect(&url, 2).await?;
            store.migrate().await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Cmd::Run => {
            anyhow::ensure!(
                matches!(settings.mode()?, Mode::Cluster { .. }),
                "switchboard-worker needs REDIS_URL and DATABASE_URL; without them run switchboard-gateway, which embeds the worker"
            );
            let metrics = match settings.metrics_port {
                Some(port) => {
                    let handle = switchboard_shared::telemetry::init_metrics()?;
                    // Exported from the start: dashboards and alerts see 0, not "no data".
                    for name in [
                        "worker_dead_letters_total",
                        "worker_batch_failures_total",
                        "worker_messages_persisted_total",
                        "worker_leases_lost_total",
                    ] {
                        metrics::counter!(name).increment(0);
                    }
                    Some((port, handle))
                }
                None => None,
            };
            let backends = Backends::connect(&settings).await?;
            let worker = Worker::new(&backends, &settings);
            let cancel = CancellationToken::new();
            if let Some((port, handle)) = metrics {
                let listener = tokio::net::TcpListener::bind((settings.host.as_str(), port))
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on METRICS_PORT {port}: {e}"))?;
                tracing::info!(port, "/metrics, /healthz and /readyz");
                probes::spawn_readiness_gauge(backends.clone(), cancel.clone());
                let app = probes::router(handle, backends.clone(), cancel.clone());
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!(error = %e, "metrics listener stopped");
                    }
                });
            }
            let stop = cancel.clone();
            tokio::spawn(async move {
                switchboard_shared::shutdown::signal().await;
                tracing::info!("shutting down: finishing the current batch");
                stop.cancel();
            });
            worker.run(cancel).await;
            switchboard_shared::telemetry::shutdown_tracing();
            Ok(())
        }
    }
}
