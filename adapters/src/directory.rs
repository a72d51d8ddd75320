//! Placeholder: being written.
use serde::Deserialize;
use crate::{Source, SourceContext, SourceFuture};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    pub path: std::path::PathBuf,
}

impl DirectoryConfig {
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

pub struct DirectorySource {
    _config: DirectoryConfig,
}

impl DirectorySource {
    pub fn new(config: DirectoryConfig) -> Self {
        Self { _config: config }
    }
}

impl Source for DirectorySource {
    fn run(self: Box<Self>, _ctx: SourceContext) -> SourceFuture {
        Box::pin(async { Err(crate::SourceError::Other("not built yet".into())) })
    }
}

pub fn describe_position(position: &[u8]) -> String {
    String::from_utf8_lossy(position).into_owned()
}
