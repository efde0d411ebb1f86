//! Revocations across instances: the instance that revokes a key publishes
//! its id on a Redis channel, and every instance drops it from its
//! credential cache on receipt, so a revoked key stops working everywhere
//! within the time a message takes (without Redis, within the cache's 60 s).
//! Cache invalidations (`POST /v1/admin/auth-cache/invalidate`) travel the
//! same way, so that an operator behind a load balancer reaches every
//! instance. The listener reconnects on its own and, on each reconnection,
//! drops its whole cache (a message may have been published while it was
//! away); while Redis is away, the cache's TTL is the bound.

use std::time::Duration;

use futures::StreamExt;
use redis::aio::ConnectionManager;
use tokio::task::JoinHandle;

use super::Identity;

pub const CHANNEL: &str = "sy:revocations";

/// What an instance asks the others to drop from their caches. On the wire,
/// a key id as it is (what every version has published), `*` for all, or
/// `cred:<hex digest>[:<tenant>]` for one credential (of that tenant only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    Key(String),
    All,
    Credential {
        digest: [u8; 32],
        tenant: Option<String>,
    },
}

impl Message {
    fn encode(&self) -> String {
        match self {
            Message::Key(id) => id.clone(),
            Message::All => "*".to_owned(),
            Message::Credential { digest, tenant } => match tenant {
                Some(t) => format!("cred:{}:{t}", hex::encode(digest)),
                None => format!("cred:{}", hex::encode(digest)),
            },
        }
    }

    fn decode(payload: &str) -> Option<Self> {
        if payload == "*" {
            return Some(Message::All);
        }
        let Some(rest) = payload.strip_prefix("cred:") else {
            return (!payload.is_empty()).then(|| Message::Key(payload.to_owned()));
        };
        let (hex_digest, tenant) = match rest.split_once(':') {
            Some((d, t)) => (d, Some(t.to_owned())),
            None => (rest, None),
        };
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex_digest, &mut digest).ok()?;
        Some(Message::Credential { digest, tenant })
    }

    fn apply(&self, identity: &Identity) -> usize {
        let cache = &identity.inner.cache;
        match self {
            Message::Key(id) => cache.invalidate_key(id),
            Message::All => cache.clear(),
            Message::Credential { digest, tenant } => {
                usize::from(cache.invalidate_digest_in(digest, tenant.as_deref()))
            }
        }
    }
}

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

    /// Publishes a revocation of `key_id`.
    pub(crate) async fn publish(&self, key_id: &str) {
        self.send(&Message::Key(key_id.to_owned())).await;
    }

    /// Publishes `message`; a message sent twice (its connection dropped
    /// after sending it) drops the same entries twice, which is harmless.
    pub(crate) async fn send(&self, message: &Message) {
        let payload = message.encode();
        let sent = tokio::time::timeout(
            Duration::from_secs(2),
            crate::redis_retry::once_more_if_dropped(|| {
                let mut conn = self.conn.clone();
                let payload = &payload;
                async move {
                    redis::cmd("PUBLISH")
                        .arg(CHANNEL)
                        .arg(payload)
                        .query_async::<i64>(&mut conn)
                        .await
                }
            }),
        )
        .await;
        let failure = match sent {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        tracing::warn!(error = %failure, message = ?message, "could not broadcast a revocation or cache invalidation; other instances drop the entry within their cache TTL");
    }
}

/// How often the listener asks Redis whether its connection still answers:
/// a connection that vanished without a close (a failover behind a virtual
/// address, a NAT entry dropped) would otherwise deliver nothing, nor fail.
const PING_EVERY: Duration = Duration::from_secs(15);
/// A ping unanswered this long is missed; two missed in a row end the
/// connection (and the listener connects again), so that one slow answer
/// (a Redis busy with a long command or a fork) does not drop every
/// instance's cache.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Drops keys revoked (and credentials invalidated) by other instances from
/// this one's cache.
pub fn spawn_listener(identity: Identity, url: String) -> JoinHandle<()> {
    spawn_listener_pinging(
        identity,
        url,
        Pings {
            every: PING_EVERY,
            timeout: PING_TIMEOUT,
        },
    )
}

/// When the listener pings, and how long it waits for the answer.
#[derive(Clone, Copy)]
struct Pings {
    every: Duration,
    timeout: Duration,
}

fn spawn_listener_pinging(identity: Identity, url: String, pings: Pings) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut lost = false;
        loop {
            if let Err(e) = listen(&identity, &url, lost, pings).await {
                tracing::warn!(error = %e, "revocation listener lost Redis; reconnecting");
            }
            lost = true;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// Listens until the connection ends or stops answering pings.
/// `after_loss`: an earlier connection ended, so what was published
/// meanwhile is unknown and the whole cache is dropped once subscribed
/// again.
async fn listen(
    identity: &Identity,
    url: &str,
    after_loss: bool,
    pings: Pings,
) -> Result<(), redis::RedisError> {
    let client = redis::Client::open(url)?;
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(CHANNEL).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    let pubsub = tokio::time::timeout(pings.timeout, connect)
        .await
        .map_err(|_| silent("subscribing", pings.timeout))??;
    if after_loss {
        let dropped = identity.inner.cache.clear();
        tracing::info!(dropped, "revocation listener subscribed again; dropped the credential cache, which may hold what was revoked meanwhile");
    }
    let (mut sink, mut messages) = pubsub.split();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + pings.every, pings.every);
    let mut missed = 0u8;
    loop {
        tokio::select! {
            msg = messages.next() => {
                let Some(msg) = msg else { return Ok(()) };
                let payload: String = msg.get_payload()?;
                match Message::decode(&payload) {
                    Some(message) => {
                        let dropped = message.apply(identity);
                        tracing::debug!(message = ?message, dropped, "revocation received");
                    }
                    None => tracing::warn!(payload, "ignoring an unreadable revocation message"),
                }
            }
            _ = ping.tick() => {
                match tokio::time::timeout(pings.timeout, sink.ping::<redis::Value>()).await {
                    Ok(answer) => {
                        answer?;
                        missed = 0;
                    }
                    Err(_) if missed == 0 => missed = 1,
                    Err(_) => return Err(silent("two pings", pings.timeout)),
                }
            }
        }
    }
}

fn silent(what: &str, within: Duration) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Io,
        "the revocation channel's connection went silent",
        format!("no answer to {what} within {within:?}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_as_written_and_bare_key_ids_stay_key_ids() {
        let digest = [0xab; 32];
        for m in [
            Message::Key("key_01hzy".into()),
            Message::All,
            Message::Credential {
                digest,
                tenant: None,
            },
            Message::Credential {
                digest,
                tenant: Some("acme:eu".into()),
            },
        ] {
            assert_eq!(Message::decode(&m.encode()), Some(m));
        }
        assert_eq!(Message::decode("cred:nothex"), None);
        assert_eq!(Message::decode(""), None);
    }

    /// A TCP relay to `target` whose connections can be made silent: bytes
    /// are no longer passed, and nothing is closed (a peer vanished behind
    /// a virtual address). Connections made after are passed again.
    struct Relay {
        url: String,
        silence: std::sync::Arc<tokio::sync::Notify>,
    }

    async fn relay(target: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/", listener.local_addr().unwrap());
        let silence = std::sync::Arc::new(tokio::sync::Notify::new());
        let notify = silence.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let silenced = notify.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = silenced.notified() => {
                            // Hold both ends open, passing nothing.
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                    }
                });
            }
        });
        Relay { url, silence }
    }

    /// A listener keeps a connection that answers its pings (its cache
    /// with it); one that goes silent it notices by its pings, connects
    /// again and drops its cache (which may hold a key revoked meanwhile),
    /// and from then on it receives revocations again.
    #[tokio::test]
    async fn a_listener_whose_connection_goes_silent_connects_again() {
        let Some(server) = crate::redis_retry::PrivateRedis::start().await else {
            return;
        };
        let target = server
            .url
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .parse()
            .unwrap();
        let relay = relay(target).await;
        let (_dir, store) = crate::identity::tests::store().await;
        let identity = Identity::start(store, false, None, None).await.unwrap();
        let pings = Pings {
            every: Duration::from_millis(200),
            timeout: Duration::from_millis(300),
        };
        let listener = spawn_listener_pinging(identity.clone(), relay.url.clone(), pings);
        let publisher = Broadcast::connect(&server.url).await.unwrap();
        let principal = switchyard_core::identity::Principal::open_dev();
        let digest = crate::identity::keys::digest;
        let cache = &identity.inner.cache;
        let cached =
            |key: &str| cache.put(digest(key), principal.clone(), crate::identity::now_ms());
        let held = |key: &str| cache.contains(&digest(key));
        // Until `key`'s entry is gone (published for it when `publish`),
        // for up to 10 s.
        let until_dropped = |key: &'static str, publish: bool| {
            let publisher = &publisher;
            async move {
                for _ in 0..500 {
                    if publish {
                        publisher
                            .send(&Message::Credential {
                                digest: digest(key),
                                tenant: None,
                            })
                            .await;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if !held(key) {
                        return true;
                    }
                }
                false
            }
        };
        cached("probe");
        assert!(until_dropped("probe", true).await, "never subscribed");

        cached("healthy");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            held("healthy"),
            "a connection that answers its pings was dropped"
        );

        relay.silence.notify_waiters();
        assert!(
            until_dropped("healthy", false).await,
            "the listener never noticed its connection went silent"
        );
        cached("after");
        assert!(
            until_dropped("after", true).await,
            "no revocation reached the listener after it connected again"
        );
        listener.abort();
    }

    /// After Redis restarts, a revocation published on a connection that
    /// has not noticed yet still reaches a subscriber.
    #[tokio::test]
    async fn a_revocation_published_after_a_restart_is_delivered() {
        let Some(mut server) = crate::redis_retry::PrivateRedis::start().await else {
            return;
        };
        let broadcast = Broadcast::connect(&server.url).await.unwrap();
        broadcast.publish("before").await;

        server.restart().await;
        let client = redis::Client::open(server.url.as_str()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.subscribe(CHANNEL).await.unwrap();
        broadcast.publish("key_after").await;

        let msg = tokio::time::timeout(Duration::from_secs(5), pubsub.on_message().next())
            .await
            .expect("the revocation was never delivered")
            .unwrap();
        assert_eq!(msg.get_payload::<String>().unwrap(), "key_after");
        server.stop().await;
    }
}
