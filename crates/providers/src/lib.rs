//! Provider clients: the traits the engine calls and the adapters that speak
//! each upstream's wire format. Every adapter takes and returns
//! OpenAI-shaped JSON, so the engine and the HTTP layer see one shape — but
//! for an Anthropic client served by Anthropic, which gets Anthropic's own
//! answer ([`ChatReply::AnthropicComplete`], [`ChatReply::AnthropicStream`]).

pub mod anthropic;
pub mod breaker;
mod connect;
pub mod error;
mod h1;
pub mod health;
pub mod openai;
pub mod retry;
pub mod router;
pub mod scan;
pub mod sse;
mod upstream;

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use serde_json::{Map, Value};
use switchyard_core::anthropic::NativeMessages;
use switchyard_core::openai::{EncodingFormat, Usage};

pub use connect::check_route;
pub use error::ProviderError;

/// One chat call, already routed: the body is the client's, `model` is the
/// name the provider knows.
#[derive(Debug, Clone, Copy)]
pub struct ChatCall<'a> {
    pub upstream_model: &'a str,
    pub body: &'a Map<String, Value>,
    /// The Anthropic Messages body `body` was translated from, when the
    /// client spoke Anthropic's API (an `anthropic` provider sends it instead,
    /// and answers with [`ChatReply::AnthropicComplete`] or
    /// [`ChatReply::AnthropicStream`]).
    pub anthropic_body: Option<&'a NativeMessages>,
    pub stream: bool,
    /// Total time for the call, a whole stream included.
    pub timeout: Duration,
}

/// A complete (non-streamed) answer: the provider's JSON, relayed as is.
#[derive(Debug, Clone)]
pub struct Completion {
    pub body: Bytes,
    pub usage: Option<Usage>,
}

/// A streamed answer: each item is the JSON of one `chat.completion.chunk`.
/// The stream ends after the provider's `[DONE]`; a stream that stops before
/// it yields [`ProviderError::Truncated`] or the transport error instead.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Bytes, ProviderError>> + Send>>;

pub enum ChatReply {
    Complete(Completion),
    Stream(ChunkStream),
    /// Anthropic's own answer to a client that spoke its Messages API
    /// ([`ChatCall::anthropic_body`]), relayed as is: the message's JSON.
    AnthropicComplete(Completion),
    /// The same streamed: each item is the JSON of one Anthropic event (its
    /// `type` names it), `ping`s included; the stream ends after
    /// `message_stop`. An `error` event becomes the item's error instead.
    AnthropicStream(ChunkStream),
}

#[derive(Debug, Clone, Copy)]
pub struct EmbedCall<'a> {
    pub upstream_model: &'a str,
    pub body: &'a Map<String, Value>,
    /// The encoding the client wants back.
    pub encoding_format: EncodingFormat,
    pub timeout: Duration,
}

#[async_trait]
pub trait ChatProvider: Send + Sync {
    /// The configured provider name (for logs, metrics and usage rows).
    fn name(&self) -> &str;
    async fn chat(&self, call: ChatCall<'_>) -> Result<ChatReply, ProviderError>;
    /// A cheap call that costs no tokens (listing models), for active
    /// health probes.
    async fn probe(&self, timeout: Duration) -> Result<(), ProviderError>;
    /// Whether the provider takes an Anthropic Messages body as it is
    /// ([`ChatCall::anthropic_body`]), so that what has no OpenAI form
    /// (Anthropic's own tools, `document` blocks) can reach it.
    fn speaks_messages(&self) -> bool {
        false
    }
    /// Whether it runs Anthropic's own tools for clients (configured:
    /// `server_tools`).
    fn runs_server_tools(&self) -> bool {
        false
    }
    /// The exact input tokens of an Anthropic Messages body, for
    /// `POST /v1/messages/count_tokens`, from a provider that can count
    /// them; `None` (the default) when it cannot, and the caller estimates.
    async fn count_tokens(
        &self,
        _anthropic: &NativeMessages,
        _upstream_model: &str,
        _timeout: Duration,
    ) -> Option<Result<u64, ProviderError>> {
        None
    }
}

#[async_trait]
pub trait EmbeddingProvider: Send + Sync {
    fn name(&self) -> &str;
    /// Returns the provider's JSON in the requested encoding.
    async fn embed(&self, call: EmbedCall<'_>) -> Result<Completion, ProviderError>;
}
