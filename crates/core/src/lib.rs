//! Domain types shared by every layer: the configuration schema, the
//! OpenAI-compatible request shapes and their validation, trace ids and the
//! usage record. Nothing here does I/O.

pub mod anthropic;
pub mod config;
pub mod health;
pub mod identity;
pub mod jwt;
pub mod limits;
pub mod local;
pub mod net;
pub mod openai;
pub mod sessions;
pub mod trace;
pub mod usage;

pub use config::Config;
