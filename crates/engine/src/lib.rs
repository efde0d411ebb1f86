//! Application services, free of HTTP types: the gateway that routes model
//! calls to providers and accounts for them, the batched usage writer, and
//! the rate limiters, identity and JWT verification.
//! `server` calls these; they call `providers` and `store`.

pub mod batch_writer;
pub mod budget;
pub mod events;
pub mod gateway;
pub mod handles;
pub mod health;
pub mod idempotency;
pub mod identity;
pub mod jwt;
pub mod limits;
pub mod metered;
mod redis_retry;
pub mod retention;
pub mod sessions;
pub mod signing;
mod stop;

pub use batch_writer::{BatchWriterTask, EventWriter, UsageWriter, UsageWriterTask};
pub use gateway::{ChatOutcome, EngineError, Gateway, ModelInfo, RequestMeta, TokenMeter};
pub use health::HealthTask;
pub use metered::StreamEvent;
pub use switchyard_core::health::ProviderHealthRow;
pub use switchyard_providers::ProviderError;
