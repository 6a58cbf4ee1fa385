//! The networked sync engine of quiverdb: QUIC (quinn) with TLS 1.3
//! (rustls) — or, where UDP is blocked, TLS 1.3 over TCP carrying HTTP/2 —,
//! a handshake with token auth, one bidirectional stream per
//! shard carrying both directions, a store actor so async code never blocks
//! on SQLite, a client with retries, and a server.

mod actor;
pub mod auth;
mod client;
mod coordinator;
mod error;
pub mod framed;
pub mod limits;
mod protocol;
mod readers;
pub mod schema;
mod server;
mod streams;
mod tcp;
pub mod tls;
pub mod transport;

pub use actor::{Request, ShardState, StoreHandle, REQUEST_QUEUE};
pub use client::{
    Client, ClientOptions, CloneResult, PingResult, RoundFn, SyncResult, SyncSpec, FALLBACK_DELAY,
};
pub use coordinator::{CoordinatorOptions, CoordinatorStats, Event, ShardCoordinator};
pub use error::{Result, SyncError};
pub use protocol::{Progress, ProgressFn, ShardResult};
pub use server::{ConnectionInfo, Server, ServerOptions, TcpListen};
pub use streams::{Transport, TransportChoice};
pub use tls::{Identity, Trust};
pub use tokio_util::sync::CancellationToken;
