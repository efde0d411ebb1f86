//! Integration tests of the engine's services, without HTTP in front of
//! them. One test binary; modules by area.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod jwt;
