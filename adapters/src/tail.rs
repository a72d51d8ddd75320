//! Placeholder: being written.
use serde::Deserialize;
use crate::{Source, SourceContext, SourceFuture};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TailConfig {
    pub path: std::path::PathBuf,
}

impl TailConfig {
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

pub struct TailSource {
    _config: TailConfig,
}

impl TailSource {
    pub fn new(config: TailConfig) -> Self {
        Self { _config: config }
    }
}

impl Source for TailSource {
    fn run(self: Box<Self>, _ctx: SourceContext) -> SourceFuture {
        Box::pin(async { Err(crate::SourceError::Other("not built yet".into())) })
    }
}

pub fn describe_position(position: &[u8]) -> String {
    String::from_utf8_lossy(position).into_owned()
}
