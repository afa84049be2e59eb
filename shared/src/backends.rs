//! Connects the bus and the store that the configured mode asks for.

use std::sync::Arc;

use crate::bus::{memory::MemoryBus, redis::RedisBus, Bus};
use crate::config::{Mode, Settings};
use crate::presence::{memory::MemoryPresence, redis::RedisPresence, Presence};
use crate::store::Store;

/// The backends of a process.
#[derive(Clone)]
pub struct Backends {
    pub bus: Arc<dyn Bus>,
    pub presence: Arc<dyn Presence>,
    pub store: Store,
    pub embedded: bool,
}

impl Backends {
    /// Connects Redis and PostgreSQL, or opens the in-memory bus and the
    /// SQLite file. Embedded mode also applies the migrations, since there is
    /// no separate `migrate` step for a newcomer to forget.
    pub async fn connect(settings: &Settings) -> anyhow::Result<Self> {
        match settings.mode()? {
            Mode::Cluster {
                redis_url,
                database_url,
            } => {
                let bus =
                    RedisBus::connect(&redis_url, &settings.redis_prefix, settings.stream_max_len)
                        .await
                        .map_err(|e| {
                            anyhow::anyhow!("cannot connect to Redis at {redis_url}: {e}")
                        })?;
                let store = Store::connect(&database_url, settings.db_pool_size)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot connect to the database: {e}"))?;
                let presence = RedisPresence::new(bus.command_client(), &settings.redis_prefix);
                if let Err(e) = presence.preload().await {
                    tracing::warn!(error = %e, "could not preload the presence scripts");
                }
                Ok(Self {
                    bus: Arc::new(bus),
                    presence: Arc::new(presence),
                    store,
                    embedded: false,
                })
            }
            Mode::Embedded { data_dir } => {
                let store = Store::open_embedded(&data_dir).await?;
                store.migrate().await?;
                Ok(Self {
                    bus: Arc::new(MemoryBus::new(settings.stream_max_len)),
                    presence: Arc::new(MemoryPresence::new()),
                    store,
                    embedded: true,
                })
            }
        }
    }
}
