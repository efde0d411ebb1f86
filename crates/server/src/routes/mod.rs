//! Route handlers, grouped by API family.

pub mod admin;
pub mod anthropic;
pub mod keys;
pub mod openai;
pub mod ops;
pub mod sessions;
