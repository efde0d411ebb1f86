//! Revocations across instances: the instance that revokes a key publishes
//! its id on a Redis channel, and every instance drops it from its
//! credential cache on receipt, so a revoked key stops working everywhere
//! within the time a message takes (without Redis, within the cache's 60 s).
//! The listener reconnects on its own; while Redis is away, the cache's TTL
//! is the bound.

use std::time::Duration;

use futures::StreamExt;
use redis::aio::ConnectionManager;
use tokio::task::JoinHandle;

use super::Identity;

pub const CHANNEL: &str = "sy:revocations";

pub struct Broadcast {
    conn: ConnectionManager,
}

impl Broadcast {
    pub async fn connect(url: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        Ok(Self {
            conn: ConnectionManager::new(client).await?,
        })
    }

    pub(crate) async fn publish(&self, key_id: &str) {
        let mut conn = self.conn.clone();
        let sent = tokio::time::timeout(
            Duration::from_secs(2),
            redis::cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(key_id)
                .query_async::<i64>(&mut conn),
        )
        .await;
        let failure = match sent {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        tracing::warn!(error = %failure, key_id, "could not broadcast a revocation; other instances drop the key within their cache TTL");
    }
}

/// Drops keys revoked by other instances from this one's cache.
pub fn spawn_listener(identity: Identity, url: String) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = listen(&identity, &url).await {
                tracing::warn!(error = %e, "revocation listener lost Redis; reconnecting");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

async fn listen(identity: &Identity, url: &str) -> Result<(), redis::RedisError> {
    let client = redis::Client::open(url)?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(CHANNEL).await?;
    let mut messages = pubsub.on_message();
    while let Some(msg) = messages.next().await {
        let key_id: String = msg.get_payload()?;
        let dropped = identity.inner.cache.invalidate_key(&key_id);
        tracing::debug!(key_id, dropped, "revocation received");
    }
    Ok(())
}
