//! Replies followed live from another instance, through Redis.
//!
//! The instance generating a reply mirrors each of its frames into a Redis
//! stream (`sy:reply:{message_id}`, `XADD` from a background task, so the
//! reply never waits on Redis); an instance asked for the reply's events
//! that is not generating it reads that stream from the start and then
//! blocks on it (`XREAD BLOCK`), so a client that reconnects to any instance
//! follows the reply live. Frames carry consecutive ids: a follower that
//! finds a gap (a mirror write failed) or loses Redis stops trusting the
//! stream and finishes from the stored frames once the reply has ended, as
//! it does without Redis. A stream lives for [`LIVE_TTL`] while frames keep
//! coming and [`ENDED_TTL`] after its end.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamReadReply;
use redis::{AsyncConnectionConfig, Client};
use tokio::sync::mpsc;

use super::transcript::Frame;

/// How long a stream outlives its latest frame while the reply runs.
pub const LIVE_TTL: Duration = Duration::from_secs(300);
/// How long a stream is kept after its end, for followers that started
/// reading before the end (later ones read the stored frames).
pub const ENDED_TTL: Duration = Duration::from_secs(30);
/// How long a follower blocks on the stream before it looks at the store.
const BLOCK: Duration = Duration::from_secs(1);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a transcript sends to its mirror.
pub(crate) enum Mirrored {
    Frame(Arc<Frame>),
    End,
}

pub(crate) type MirrorSender = mpsc::UnboundedSender<Mirrored>;

#[derive(Clone)]
pub struct Relay {
    client: Client,
    conn: ConnectionManager,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Relay")
    }
}

fn key(message_id: &str) -> String {
    format!("sy:reply:{message_id}")
}

impl Relay {
    /// Connects to `url` (`redis://…`), failing if Redis cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, redis::RedisError> {
        let client = Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(WRITE_TIMEOUT))
            .set_connection_timeout(Some(WRITE_TIMEOUT))
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        Ok(Self { client, conn })
    }

    /// Starts mirroring the frames of `message_id`: the returned sender
    /// queues them, a task writes them in order, batching what has queued.
    pub(crate) fn mirror(&self, message_id: &str) -> MirrorSender {
        let (tx, mut rx) = mpsc::unbounded_channel::<Mirrored>();
        let mut conn = self.conn.clone();
        let key = key(message_id);
        tokio::spawn(async move {
            let mut batch = Vec::new();
            let mut warned = false;
            loop {
                if rx.recv_many(&mut batch, 256).await == 0 {
                    return; // the reply went away without an end
                }
                let mut pipe = redis::pipe();
                let mut ended = false;
                for m in batch.drain(..) {
                    let (field, value) = match m {
                        Mirrored::Frame(f) => ("f", serde_json::to_string(&*f).unwrap_or_default()),
                        Mirrored::End => {
                            ended = true;
                            ("end", "1".to_owned())
                        }
                    };
                    pipe.cmd("XADD")
                        .arg(&key)
                        .arg("*")
                        .arg(field)
                        .arg(value)
                        .ignore();
                }
                let ttl = if ended { ENDED_TTL } else { LIVE_TTL };
                pipe.cmd("EXPIRE").arg(&key).arg(ttl.as_secs()).ignore();
                if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                    if !warned {
                        warned = true;
                        tracing::warn!(error = %e, stream = %key, "mirroring a reply to Redis failed; followers on other instances get it once it is stored");
                    }
                }
                if ended {
                    return;
                }
            }
        });
        tx
    }

    /// A reader of the stream of `message_id`, on a connection of its own
    /// (a blocking read would hold up a shared one).
    pub(crate) async fn reader(&self, message_id: &str) -> Result<Reader, redis::RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(BLOCK + WRITE_TIMEOUT))
            .set_connection_timeout(Some(WRITE_TIMEOUT));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(Reader {
            conn,
            key: key(message_id),
            position: "0-0".to_owned(),
        })
    }
}

pub(crate) struct Reader {
    conn: redis::aio::MultiplexedConnection,
    key: String,
    position: String,
}

/// What one read of the stream found.
#[derive(Debug, Default)]
pub(crate) struct Read {
    pub frames: Vec<Frame>,
    /// The generator wrote the end marker.
    pub ended: bool,
}

impl Reader {
    /// The entries after the last one read, waiting up to [`BLOCK`] for the
    /// first; empty when nothing came.
    pub(crate) async fn next(&mut self) -> Result<Read, redis::RedisError> {
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(512)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(&self.position)
            .query_async(&mut self.conn)
            .await?;
        let mut read = Read::default();
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            self.position = entry.id.clone();
            if entry.map.contains_key("end") {
                read.ended = true;
            }
            if let Some(json) = entry.get::<String>("f") {
                let frame = serde_json::from_str::<Frame>(&json).map_err(|e| {
                    redis::RedisError::from((
                        redis::ErrorKind::Parse,
                        "a mirrored frame is not valid",
                        e.to_string(),
                    ))
                })?;
                read.frames.push(frame);
            }
        }
        Ok(read)
    }
}
