//! The frames of one streamed reply, shared by the task generating it and
//! every connection following it. A follower starts after any frame id
//! (`Last-Event-ID`) and sees each later frame exactly once, live; during
//! silence it gets `keepalive` frames that repeat the last id, so resuming
//! from a keepalive's id loses nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::relay::{MirrorSender, Mirrored};

/// One SSE frame: `id:`, `event:` and one line of JSON `data:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    pub id: u64,
    pub event: String,
    /// One line of JSON.
    pub data: String,
}

impl Frame {
    pub fn render(&self) -> Bytes {
        render(self.id, &self.event, &self.data)
    }
}

pub(crate) fn render(id: u64, event: &str, data: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(data.len() + event.len() + 32);
    b.put_slice(b"id: ");
    b.put_slice(id.to_string().as_bytes());
    b.put_slice(b"\nevent: ");
    b.put_slice(event.as_bytes());
    b.put_slice(b"\ndata: ");
    b.put_slice(data.as_bytes());
    b.put_slice(b"\n\n");
    b.freeze()
}

/// Every frame of a stream, rendered back to back (what a client that saw
/// the whole stream without a pause received).
pub fn render_all(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&f.render());
    }
    out
}

/// The live frames of one reply.
pub struct Transcript {
    frames: Mutex<Vec<Arc<Frame>>>,
    /// (frames published, ended).
    state: watch::Sender<(usize, bool)>,
    /// Where each frame is copied for followers on other instances.
    mirror: Option<MirrorSender>,
}

impl Default for Transcript {
    fn default() -> Self {
        Self {
            frames: Mutex::new(Vec::new()),
            state: watch::Sender::new((0, false)),
            mirror: None,
        }
    }
}

impl Transcript {
    /// A transcript whose frames, and end, are also sent to `mirror`.
    pub(crate) fn mirrored(mirror: MirrorSender) -> Self {
        Self {
            mirror: Some(mirror),
            ..Self::default()
        }
    }

    /// Appends a frame with the next id; returns it.
    pub fn push(&self, event: &str, data: String) -> Arc<Frame> {
        let mut frames = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        let frame = Arc::new(Frame {
            id: frames.last().map_or(1, |f| f.id + 1),
            event: event.to_owned(),
            data,
        });
        frames.push(frame.clone());
        let n = frames.len();
        if let Some(m) = &self.mirror {
            // Under the lock, so the mirror gets the frames in id order.
            let _ = m.send(Mirrored::Frame(frame.clone()));
        }
        drop(frames);
        self.state.send_modify(|s| s.0 = n);
        frame
    }

    /// Marks the stream ended: followers stop after the last frame.
    pub fn end(&self) {
        if let Some(m) = &self.mirror {
            let _ = m.send(Mirrored::End);
        }
        self.state.send_modify(|s| s.1 = true);
    }

    /// Appends frames read elsewhere (ids kept) without ending the stream.
    pub(crate) fn extend(&self, more: Vec<Frame>) {
        if more.is_empty() {
            return;
        }
        let mut frames = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        frames.extend(more.into_iter().map(Arc::new));
        let n = frames.len();
        drop(frames);
        self.state.send_modify(|s| s.0 = n);
    }

    /// Whether the stream has ended.
    pub fn is_ended(&self) -> bool {
        self.state.borrow().1
    }

    /// The id the next frame will get.
    pub fn next_id(&self) -> u64 {
        self.frames
            .lock()
            .map_or(1, |f| f.last().map_or(1, |l| l.id + 1))
    }

    /// A copy of every frame so far.
    pub fn snapshot(&self) -> Vec<Frame> {
        self.frames
            .lock()
            .map(|f| f.iter().map(|f| (**f).clone()).collect())
            .unwrap_or_default()
    }

    /// Fills a transcript with stored frames (ids kept) and ends it.
    pub fn replay(&self, stored: Vec<Frame>) {
        let mut frames = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        frames.extend(stored.into_iter().map(Arc::new));
        let n = frames.len();
        drop(frames);
        self.state.send_modify(|s| *s = (n, true));
    }

    /// The frames with an id above `id`.
    fn after(&self, id: u64) -> Vec<Arc<Frame>> {
        self.frames
            .lock()
            .map(|f| {
                let start = f.partition_point(|fr| fr.id <= id);
                f[start..].to_vec()
            })
            .unwrap_or_default()
    }

    /// The frames after `after_id`, live, with keepalives during silence;
    /// ends after the last frame of an ended stream.
    pub fn follow(
        self: Arc<Self>,
        after_id: u64,
        keepalive: Duration,
    ) -> impl Stream<Item = Bytes> {
        struct Follow {
            t: Arc<Transcript>,
            rx: watch::Receiver<(usize, bool)>,
            /// Frames of the transcript already looked at.
            seen: usize,
            last_id: u64,
            pending: std::collections::VecDeque<Arc<Frame>>,
        }
        let rx = self.state.subscribe();
        let start = Follow {
            seen: 0,
            last_id: after_id,
            t: self,
            rx,
            pending: Default::default(),
        };
        futures::stream::unfold(start, move |mut f| async move {
            loop {
                if let Some(frame) = f.pending.pop_front() {
                    f.last_id = frame.id;
                    return Some((frame.render(), f));
                }
                let (published, ended) = *f.rx.borrow_and_update();
                if f.seen < published {
                    f.seen = published;
                    let more = f.t.after(f.last_id);
                    if !more.is_empty() {
                        f.pending.extend(more);
                        continue;
                    }
                }
                if ended {
                    return None;
                }
                match tokio::time::timeout(keepalive, f.rx.changed()).await {
                    Ok(Ok(())) => {}
                    // The generating side is gone without ending: stop.
                    Ok(Err(_)) => return None,
                    Err(_) => return Some((render(f.last_id, "keepalive", "{}"), f)),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn text(b: &[Bytes]) -> String {
        b.iter().map(|b| String::from_utf8_lossy(b)).collect()
    }

    #[tokio::test]
    async fn a_follower_sees_each_frame_after_its_id_once() {
        let t = Arc::new(Transcript::default());
        t.push("ready", "{}".into());
        t.push("chat.delta", r#"{"delta":"a"}"#.into());
        let follower = tokio::spawn(
            t.clone()
                .follow(1, Duration::from_secs(60))
                .collect::<Vec<_>>(),
        );
        tokio::task::yield_now().await;
        t.push("chat.delta", r#"{"delta":"b"}"#.into());
        t.push("chat.done", "{}".into());
        t.end();
        let got = follower.await.unwrap();
        assert_eq!(
            text(&got),
            "id: 2\nevent: chat.delta\ndata: {\"delta\":\"a\"}\n\n\
             id: 3\nevent: chat.delta\ndata: {\"delta\":\"b\"}\n\n\
             id: 4\nevent: chat.done\ndata: {}\n\n"
        );
        let whole = String::from_utf8(render_all(&t.snapshot())).unwrap();
        assert_eq!(
            whole,
            format!("id: 1\nevent: ready\ndata: {{}}\n\n{}", text(&got))
        );
    }

    #[tokio::test]
    async fn a_mirrored_transcript_copies_its_frames_in_order_then_its_end() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let t = Transcript::mirrored(tx);
        t.push("ready", "{}".into());
        t.push("chat.delta", r#"{"delta":"a"}"#.into());
        t.end();
        let mut got = Vec::new();
        while let Ok(m) = rx.try_recv() {
            got.push(match m {
                Mirrored::Frame(f) => format!("{} {}", f.id, f.event),
                Mirrored::End => "end".to_owned(),
            });
        }
        assert_eq!(got, ["1 ready", "2 chat.delta", "end"]);
    }

    #[tokio::test]
    async fn extended_frames_keep_their_ids_and_reach_followers_live() {
        let t = Arc::new(Transcript::default());
        let follower = tokio::spawn(
            t.clone()
                .follow(2, Duration::from_secs(60))
                .collect::<Vec<_>>(),
        );
        tokio::task::yield_now().await;
        t.extend(vec![Frame {
            id: 3,
            event: "chat.delta".into(),
            data: "{}".into(),
        }]);
        assert!(!t.is_ended());
        assert_eq!(t.next_id(), 4);
        t.replay(vec![Frame {
            id: 4,
            event: "chat.done".into(),
            data: "{}".into(),
        }]);
        let got = follower.await.unwrap();
        assert_eq!(
            text(&got),
            "id: 3\nevent: chat.delta\ndata: {}\n\nid: 4\nevent: chat.done\ndata: {}\n\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silence_sends_keepalives_with_the_last_id() {
        let t = Arc::new(Transcript::default());
        t.push("ready", "{}".into());
        let mut s = Box::pin(t.clone().follow(0, Duration::from_secs(15)));
        assert_eq!(s.next().await.unwrap(), render(1, "ready", "{}"));
        assert_eq!(s.next().await.unwrap(), render(1, "keepalive", "{}"));
        t.push("chat.done", "{}".into());
        t.end();
        assert_eq!(s.next().await.unwrap(), render(2, "chat.done", "{}"));
        assert!(s.next().await.is_none());
    }
}
