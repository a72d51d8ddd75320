//! PostgreSQL as both ends of Ferry see it: the agent's source reads from it, the
//! exchange delivers into it. What both need lives here, so that neither daemon
//! depends on the other's crates.
//!
//! * [`dsn`]: the DSN, its TLS settings and the password (file or environment),
//!   with messages that name the configuration key.
//! * [`tls`]: libpq's `sslmode` meanings over rustls, and tokio-postgres's TLS hook.
//! * [`sql`]: identifiers and literals quoted for SQL text.
//! * [`mirror`]: applies row events (`ferry_protocol::rows`) into mirror tables of
//!   a PostgreSQL database, exactly once per `(agent, stream, seq)`.
//!
//! **Architecture Invariant:** nothing here knows replication (slots, WAL,
//! pgoutput) or the agent's buffer; that stays in `ferry-adapters`.

pub mod dsn;
pub mod mirror;
pub mod sql;
pub mod tls;

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

/// Opens a tokio-postgres connection, over TLS when `tls` is given (see
/// [`dsn::prepare`]), and drives it on a task. The connection ends when the
/// client is dropped or the task aborted.
pub async fn connect(
    config: &tokio_postgres::Config,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error> {
    let ended = |e: tokio_postgres::Error| {
        tracing::debug!(error = %e, "PostgreSQL connection ended");
    };
    Ok(match tls {
        Some(tls) => {
            let (client, connection) = config.connect(tls::MakeRustls(tls.clone())).await?;
            (
                client,
                tokio::spawn(async move { connection.await.unwrap_or_else(ended) }),
            )
        }
        None => {
            let (client, connection) = config.connect(NoTls).await?;
            (
                client,
                tokio::spawn(async move { connection.await.unwrap_or_else(ended) }),
            )
        }
    })
}
