//! A connection's bounded outbound queue and the slow-consumer policy (PROTOCOL.md §1).
//!
//! Producers (shards, the connection's own reader) push complete frame bytes; the connection's
//! writer takes everything queued in one go and writes it with as few syscalls as it can.
//! When the queue is full, ephemeral frames (typing, presence) are dropped first; when a durable
//! frame cannot be queued the connection is closed with 1013 and the client recovers the gap
//! with `join` + `since_seq`.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::Notify;

/// How a frame may be treated under pressure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameClass {
    /// Must be delivered or the connection closed (chat events, direct replies).
    Durable,
    /// May be dropped when the queue is full (typing, presence, pongs).
    Ephemeral,
}

/// Why and how the connection is closing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: String,
    /// A ready close frame to send instead of one built from `code` and `reason` (the echo of
    /// the peer's close).
    pub frame: Option<Bytes>,
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// An ephemeral frame was dropped (this one or an older one to make room).
    DroppedEphemeral,
    /// The queue overflowed with durable frames: the connection is now closing with 1013.
    Overflowed,
    /// The connection is closing; the frame was discarded.
    Closed,
}

struct State {
    frames: VecDeque<(Bytes, FrameClass)>,
    ephemeral: usize,
    close: Option<CloseRequest>,
    /// Set once the close request has been handed to the writer.
    finished: bool,
}

/// Counters shared by every outbox.
#[derive(Clone)]
pub struct OutboxMetrics {
    pub drops: IntCounter,
    pub slow_consumer_closes: IntCounter,
    pub high_water: IntGauge,
}

/// The bounded queue between producers and a connection's writer.
pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    bound: usize,
    metrics: OutboxMetrics,
}

impl Outbox {
    pub fn new(bound: usize, metrics: OutboxMetrics) -> Outbox {
        Outbox {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                ephemeral: 0,
                close: None,
                finished: false,
            }),
            notify: Notify::new(),
            bound: bound.max(1),
            metrics,
        }
    }

    /// The configured bound, in frames.
    pub fn bound(&self) -> usize {
        self.bound
    }

    /// Queues a frame, applying the slow-consumer policy when the queue is full.
    pub fn push(&self, frame: Bytes, class: FrameClass) -> Pushed {
        let mut state = self.state.lock().expect("outbox lock poisoned");
        if state.close.is_some() {
            return Pushed::Closed;
        }
        let mut outcome = Pushed::Queued;
        if state.frames.len() >= self.bound {
            match class {
                FrameClass::Ephemeral => {
                    self.metrics.drops.inc();
                    return Pushed::DroppedEphemeral;
                }
                FrameClass::Durable if state.ephemeral > 0 => {
                    let oldest = state
                        .frames
                        .iter()
                        .position(|(_, c)| *c == FrameClass::Ephemeral)
                        .expect("ephemeral count matches the queue");
                    state.frames.remove(oldest);
                    state.ephemeral -= 1;
                    self.metrics.drops.inc();
                    outcome = Pushed::DroppedEphemeral;
                }
                FrameClass::Durable => {
                    // Durable frames would be lost: discard the backlog and close. The client
                    // recovers from storage with join + since_seq.
                    state.frames.clear();
                    state.ephemeral = 0;
                    state.close = Some(CloseRequest {
                        code: 1013,
                        reason: "slow consumer: outbound queue full, rejoin with since_seq".into(),
                        frame: None,
                    });
                    drop(state);
                    self.metrics.slow_consumer_closes.inc();
                    self.notify.notify_one();
                    return Pushed::Overflowed;
                }
            }
        }
        if class == FrameClass::Ephemeral {
            state.ephemeral += 1;
        }
        state.frames.push_back((frame, class));
        let len = state.frames.len() as i64;
        let was_empty = len == 1;
        drop(state);
        if len > self.metrics.high_water.get() {
            self.metrics.high_water.set(len);
        }
        if was_empty {
            self.notify.notify_one();
        }
        outcome
    }

    /// Asks the writer to send what is queued, then a close frame, then stop. The first close
    /// request wins.
    pub fn close(&self, code: u16, reason: &str) {
        self.request_close(CloseRequest {
            code,
            reason: reason.to_owned(),
            frame: None,
        });
    }

    /// Like [`Outbox::close`], with a ready close frame (the echo of the peer's close).
    pub fn close_with_frame(&self, frame: Bytes) {
        self.request_close(CloseRequest {
            code: 1000,
            reason: String::new(),
            frame: Some(frame),
        });
    }

    fn request_close(&self, request: CloseRequest) {
        let mut state = self.state.lock().expect("outbox lock poisoned");
        if state.close.is_none() {
            state.close = Some(request);
        }
        drop(state);
        self.notify.notify_one();
    }

    /// The pending close request, if any.
    pub fn closing(&self) -> Option<CloseRequest> {
        self.state
            .lock()
            .expect("outbox lock poisoned")
            .close
            .clone()
    }

    /// Frames waiting to be written.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .expect("outbox lock poisoned")
            .frames
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until frames are queued or a close is requested; moves every queued frame into
    /// `batch`. Returns the close request once everything before it has been handed over.
    pub async fn next_batch(&self, batch: &mut Vec<Bytes>) -> Option<CloseRequest> {
        loop {
            {
                let mut state = self.state.lock().expect("outbox lock poisoned");
                if !state.frames.is_empty() {
                    batch.extend(state.frames.drain(..).map(|(f, _)| f));
                    state.ephemeral = 0;
                    return None;
                }
                if let Some(close) = state.close.clone() {
                    if !state.finished {
                        state.finished = true;
                        return Some(close);
                    }
                }
            }
            self.notify.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(bound: usize) -> Outbox {
        Outbox::new(
            bound,
            OutboxMetrics {
                drops: IntCounter::new("d", "d").unwrap(),
                slow_consumer_closes: IntCounter::new("s", "s").unwrap(),
                high_water: IntGauge::new("h", "h").unwrap(),
            },
        )
    }

    #[test]
    fn ephemeral_frames_are_dropped_first() {
        let o = outbox(2);
        assert_eq!(
            o.push(Bytes::from_static(b"t"), FrameClass::Ephemeral),
            Pushed::Queued
        );
        assert_eq!(
            o.push(Bytes::from_static(b"c1"), FrameClass::Durable),
            Pushed::Queued
        );
        assert_eq!(
            o.push(Bytes::from_static(b"t2"), FrameClass::Ephemeral),
            Pushed::DroppedEphemeral
        );
        assert_eq!(
            o.push(Bytes::from_static(b"c2"), FrameClass::Durable),
            Pushed::DroppedEphemeral
        );
        assert_eq!(o.len(), 2);
        assert_eq!(
            o.push(Bytes::from_static(b"c3"), FrameClass::Durable),
            Pushed::Overflowed
        );
        assert_eq!(o.closing().unwrap().code, 1013);
        assert_eq!(o.len(), 0);
        assert_eq!(
            o.push(Bytes::from_static(b"c4"), FrameClass::Durable),
            Pushed::Closed
        );
    }

    #[tokio::test]
    async fn batches_everything_then_reports_close_once() {
        let o = outbox(8);
        o.push(Bytes::from_static(b"a"), FrameClass::Durable);
        o.push(Bytes::from_static(b"b"), FrameClass::Durable);
        o.close(1001, "bye");
        let mut batch = Vec::new();
        assert_eq!(o.next_batch(&mut batch).await, None);
        assert_eq!(batch.len(), 2);
        assert_eq!(o.next_batch(&mut batch).await.unwrap().code, 1001);
    }
}
