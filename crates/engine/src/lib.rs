//! Application services, free of HTTP types: the gateway that routes model
//! calls to providers and accounts for them, the batched usage writer, and
//! the rate limiters, identity and JWT verification.
//! `server` calls these; they call `providers` and `store`.

pub mod budget;
pub mod gateway;
pub mod health;
pub mod identity;
pub mod jwt;
pub mod limits;
pub mod metered;
pub mod signing;
pub mod usage_writer;

pub use gateway::{ChatOutcome, EngineError, Gateway, ModelInfo, RequestMeta, TokenMeter};
pub use health::HealthTask;
pub use metered::StreamEvent;
pub use switchyard_core::health::ProviderHealthRow;
pub use switchyard_providers::ProviderError;
pub use usage_writer::{UsageWriter, UsageWriterTask};
