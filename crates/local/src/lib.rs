//! The built-in local provider: two small open models that run on the CPU so
//! that chat, streaming and embeddings work with no network and no keys.
//!
//! - [`chat`]: SmolLM2-135M-Instruct through llama.cpp (ChatML, streaming,
//!   sampling, stop sequences, template pieces tokenised apart from content);
//! - [`embed`]: all-MiniLM-L6-v2 through candle (batched, mean pooling, L2);
//! - [`convert`]: the copy of the chat weights, attention in f16, that keeps
//!   answers as correct as the f32 reference;
//! - [`provider`]: both behind the provider traits, in OpenAI's shapes, on
//!   worker pools with bounded queues ([`pool`]).

pub mod chat;
pub mod convert;
pub mod embed;
mod error;
pub mod grammar;
mod pool;
pub mod provider;
mod request;
pub mod tools;

pub use error::LocalError;
pub use provider::{LocalModels, LocalProvider};
