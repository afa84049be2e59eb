//! Common code of the Switchboard gateway and worker.
//!
//! - [`config`]: settings from the environment.
//! - [`protocol`]: Socket.IO payloads and bus entries.
//! - [`bus`]: the gateway ↔ worker seam (Redis or in-memory).
//! - [`presence`]: who is connected, cluster-wide (connection caps, online state).
//! - [`store`]: the database (PostgreSQL or SQLite through sea-orm).
//! - [`telemetry`]: logs, traces, metrics.
//! - [`shutdown`]: SIGTERM / Ctrl-C.
//! - [`backends`]: picks and connects the bus and store for a [`config::Mode`].

pub mod backends;
pub mod bus;
pub mod config;
pub mod presence;
pub mod protocol;
pub mod shutdown;
pub mod store;
pub mod telemetry;
