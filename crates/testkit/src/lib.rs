//! Test support: the mock upstream and [`spawn_app`], which starts the real
//! `switchyard` binary on a free port with a fresh database.
//!
//! Test helpers may panic: a failed setup should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod app;
pub mod mock;
pub mod proxy;

pub use app::{spawn_app, AppBuilder, TestApp};
pub use mock::{Behavior, FailPattern, Fault, MockUpstream, MOCK_SIGNATURE, MOCK_THOUGHT};
