//! Obtaining code from a URL. The lifecycle only knows this trait; the
//! SSRF-safe HTTP implementation plugs in here.
use async_trait::async_trait;

use crate::error::{CoreError, Result};
use crate::model::RawCredential;

/// What to fetch.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub url: String,
    pub content_sha256: Option<String>,
    pub credential_name: Option<String>,
    pub raw_credential: Option<RawCredential>,
}

#[async_trait]
pub trait CodeFetcher: Send + Sync {
    /// Returns the body, already checked against size limits and the hash.
    async fn fetch(&self, req: &FetchRequest) -> Result<Vec<u8>>;
}

/// The fetcher of a build without URL code sources: refuses honestly.
pub struct DisabledFetcher;

#[async_trait]
impl CodeFetcher for DisabledFetcher {
    async fn fetch(&self, _req: &FetchRequest) -> Result<Vec<u8>> {
        Err(CoreError::InvalidArgument(
            "URL code sources are not enabled in this build; send the code as content instead"
                .into(),
        ))
    }
}
