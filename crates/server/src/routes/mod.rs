//! Route handlers, grouped by API family.

pub mod openai;
pub mod ops;
