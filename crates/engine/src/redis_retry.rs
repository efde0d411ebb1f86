//! One rule for every Redis client of the engine (limits, replay guard,
//! revocations): a call that fails because its connection had dropped is
//! made once more.
//!
//! `redis`'s `ConnectionManager` notices a lost connection only when a call
//! on it fails, and reconnects then. After Redis restarts (an upgrade, a
//! failover), every instance's first call would fail although Redis is back:
//! a limit check failing open, a signed request refused as unavailable, a
//! revocation that never reaches the other instances. The second call waits
//! for the new connection and answers.
//!
//! The first call may have run if the connection dropped after sending it;
//! each caller says why running it twice is harmless (a limit counted
//! twice refuses early, a revocation published twice is dropped twice) or
//! makes it so (the replay guard's value names the call that stored it).

use std::future::Future;

/// `call()`, and once more when it failed with a dropped connection.
pub(crate) async fn once_more_if_dropped<T, F, Fut>(mut call: F) -> redis::RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    match call().await {
        Err(e) if e.is_connection_dropped() => {
            tracing::debug!(error = %e, "the Redis connection had dropped; calling again on a new one");
            call().await
        }
        other => other,
    }
}

/// A `redis-server` of a test's own, which it may stop and start again on
/// the same port (the shared one must never be restarted).
#[cfg(test)]
pub(crate) struct PrivateRedis {
    pub(crate) url: String,
    port: u16,
    child: Option<tokio::process::Child>,
}

#[cfg(test)]
impl PrivateRedis {
    /// `None` when `redis-server` is not on PATH and the suite does not
    /// require Redis.
    pub(crate) async fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut server = Self {
            url: format!("redis://127.0.0.1:{port}/"),
            port,
            child: None,
        };
        if !server.run().await {
            assert_ne!(
                std::env::var("SWITCHYARD_REQUIRE_REDIS").as_deref(),
                Ok("1"),
                "redis-server could not be started"
            );
            eprintln!("skipped: redis-server is not on PATH");
            return None;
        }
        Some(server)
    }

    async fn run(&mut self) -> bool {
        let Ok(child) = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
        else {
            return false;
        };
        self.child = Some(child);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        false
    }

    pub(crate) async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stops the server and starts it again, empty, on the same port.
    pub(crate) async fn restart(&mut self) {
        self.stop().await;
        assert!(self.run().await, "redis-server did not come back");
    }
}
