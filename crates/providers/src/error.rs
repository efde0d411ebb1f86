//! What can go wrong talking to a provider. Messages never include the
//! request URL's credentials or headers, so they are safe to log.

use std::time::Duration;

use bytes::Bytes;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("could not connect to the provider: {0}")]
    Connect(String),
    #[error("the provider did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the provider answered with status {status}")]
    Status {
        status: u16,
        /// The provider's error body (bounded), already scrubbed of the key.
        body: Bytes,
        retry_after: Option<Duration>,
    },
    #[error("the provider's response was not understood: {0}")]
    Protocol(String),
    #[error("the connection to the provider broke: {0}")]
    Broken(String),
    #[error("the provider's stream ended before it was complete")]
    Truncated,
    /// The deployment refused the call for want of capacity (an in-process
    /// model whose queue is full): not a fault, so no breaker counts it, and
    /// the route moves to its next deployment at once instead of waiting.
    #[error("the provider is at capacity")]
    Overloaded { retry_after: Duration },
    /// The gateway stopped the call itself: the server is shutting down and
    /// the grace period for requests in flight has passed.
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl ProviderError {
    /// A stable code for usage rows, metrics and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            ProviderError::Connect(_) => "upstream_connect_error",
            ProviderError::Timeout(_) => "upstream_timeout",
            ProviderError::Status { .. } => "upstream_status",
            ProviderError::Protocol(_) => "upstream_protocol_error",
            ProviderError::Broken(_) => "upstream_broken",
            ProviderError::Truncated => "upstream_truncated",
            ProviderError::Overloaded { .. } => "upstream_overloaded",
            ProviderError::ShuttingDown => "server_shutdown",
        }
    }
}
