//! End-to-end tests of the real `switchyard` binary against testkit's mock
//! upstream. One test binary; modules by area.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod helpers;
mod limits;
mod local;
mod matrix;

mod anthropic;
mod audit;
mod auth;
mod bad_input;
mod breaker;
mod chat;
mod cli;
mod cors;
mod embeddings;
mod errors;
mod ops;
mod python_sdk;
mod resilience;
mod routes;
mod session_streams;
mod sessions;
mod streaming;
mod timeouts;
mod tls;
mod usage;
