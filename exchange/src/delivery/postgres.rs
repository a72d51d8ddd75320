//! `kind = "postgres"`: row changes and snapshot rows of database streams
//! applied into mirror tables `SCHEMA.TABLE` of a PostgreSQL database, the
//! checkpoint written in the same transaction (`ferry_pg::mirror`).

use ferry_pg::mirror::{Mirror, MirrorConfig, MirrorError};
use ferry_protocol::messages::Record;

use super::DeliveryError;
use crate::config::DeliverySection;

pub struct PgSink {
    mirror: Mirror,
}

fn from_mirror(e: MirrorError) -> DeliveryError {
    match e {
        MirrorError::Retry(m) => DeliveryError::Retry(m),
        MirrorError::Fatal(m) => DeliveryError::Fatal(m),
    }
}

impl PgSink {
    pub async fn open(d: &DeliverySection) -> Result<PgSink, DeliveryError> {
        let at = format!("[[delivery]] {:?}", d.name);
        let fatal = |m: String| DeliveryError::Fatal(format!("{at}: {m}"));
        let dsn = d.dsn.as_deref().unwrap_or_default();
        let (mut config, tls) = ferry_pg::dsn::parse("dsn", dsn).map_err(fatal)?;
        let password = ferry_pg::dsn::read_password("delivery", d.password_file.as_deref(), None)
            .map_err(fatal)?;
        let rustls = ferry_pg::dsn::prepare("dsn", &mut config, &tls, password).map_err(fatal)?;
        let cfg = MirrorConfig {
            delivery: d.name.clone(),
            schema: d.schema.clone().unwrap_or_default(),
            bookkeeping: d.bookkeeping.clone(),
        };
        let mirror = Mirror::connect(config, rustls, cfg)
            .await
            .map_err(from_mirror)?;
        Ok(PgSink { mirror })
    }

    pub async fn checkpoint(&self, agent: &str, stream: &str) -> Result<u64, DeliveryError> {
        self.mirror
            .checkpoint(agent, stream)
            .await
            .map_err(from_mirror)
    }

    pub async fn apply(
        &mut self,
        agent: &str,
        stream: &str,
        mut records: Vec<(u64, Record)>,
        last: u64,
    ) -> Result<(), DeliveryError> {
        // Records this delivery does not take end the chunk as an empty record,
        // which only moves the checkpoint.
        if records.last().is_none_or(|(seq, _)| *seq < last) {
            records.push((last, Record::default()));
        }
        self.mirror
            .apply(agent, stream, &records)
            .await
            .map(|_| ())
            .map_err(from_mirror)
    }
}
