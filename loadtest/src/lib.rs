//! The Switchboard load generator's library: a Socket.IO client and token
//! minting, shared with the integration tests.

pub mod client;
pub mod tokens;
