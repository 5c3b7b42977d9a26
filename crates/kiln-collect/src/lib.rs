//! kiln report-back. Device side (always built, no dependency beyond sha2 and anyhow):
//! `client` (minimal HTTP/1.1 POST) and `spool` (write first, send with retries and an
//! idempotency key). Host side (feature `server`): `validate` (what a report must hold),
//! `store` (SQLite), `server` (the HTTP collector) and `html` (the report page).

pub mod client;
pub mod spool;

#[cfg(feature = "server")]
pub mod html;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod validate;

#[cfg(feature = "server")]
pub use server::{start, start_ephemeral, Collector, ServerOptions};
#[cfg(feature = "server")]
pub use store::Store;
