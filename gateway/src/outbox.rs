//! A connection's bounded outbound queue and the slow-consumer policy (PROTOCOL.md §1).
//!
//! Producers (shards, the connection's own reader, its shard's heartbeat sweep) push complete
//! frame bytes; the connection takes everything queued in one go and writes it with as few
//! syscalls as it can.
//! When the queue is full, ephemeral frames (typing, presence) are dropped first; when a durable
//! frame cannot be queued the connection is closed with 1013 and the client recovers the gap
//! with `join` + `since_seq`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use prometheus::{IntCounter, IntGauge};

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

/// Queued frames in order, with how each may be treated under pressure.
pub type Frames = VecDeque<(Bytes, FrameClass)>;

/// What [`Outbox::take`] handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Nothing is queued.
    Nothing,
    /// Frames were moved out.
    Frames,
    /// Everything queued before the close request has been handed over: send this close next.
    /// Reported once.
    Close(CloseRequest),
}

struct State {
    frames: Frames,
    ephemeral: usize,
    /// Boxed: it is rare, and the space would otherwise sit in every connection's outbox.
    close: Option<Box<CloseRequest>>,
    /// Set once the close request has been handed over.
    finished: bool,
    /// The connection waiting for frames; woken by the push that makes the queue non-empty.
    waker: Option<Waker>,
}

/// Milliseconds on a process-wide monotonic clock.
pub fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Counters shared by every outbox.
#[derive(Clone)]
pub struct OutboxMetrics {
    pub drops: IntCounter,
    pub slow_consumer_closes: IntCounter,
    /// `gateway_closes_total{code="1013"}`: this close bypasses the usual close path, yet is
    /// counted with the others.
    pub closes_1013: IntCounter,
    pub high_water: IntGauge,
}

/// The bounded queue between producers and a connection, and what its shard's heartbeat sweep
/// reads of it.
pub struct Outbox {
    state: Mutex<State>,
    bound: usize,
    metrics: Arc<OutboxMetrics>,
    /// When the peer last sent bytes ([`clock_ms`]).
    last_seen_ms: AtomicU64,
}

impl Outbox {
    pub fn new(bound: usize, metrics: Arc<OutboxMetrics>) -> Outbox {
        Outbox {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                ephemeral: 0,
                close: None,
                finished: false,
                waker: None,
            }),
            bound: bound.max(1),
            metrics,
            last_seen_ms: AtomicU64::new(clock_ms()),
        }
    }

    /// Records that the peer sent something (heartbeat bookkeeping).
    pub fn seen(&self, now_ms: u64) {
        self.last_seen_ms.store(now_ms, Ordering::Relaxed);
    }

    /// When the peer last sent something ([`clock_ms`]).
    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.load(Ordering::Relaxed)
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
                    state.close = Some(Box::new(CloseRequest {
                        code: 1013,
                        reason: "slow consumer: outbound queue full, rejoin with since_seq".into(),
                        frame: None,
                    }));
                    let waker = state.waker.take();
                    drop(state);
                    self.metrics.slow_consumer_closes.inc();
                    self.metrics.closes_1013.inc();
                    wake(waker);
                    return Pushed::Overflowed;
                }
            }
        }
        if class == FrameClass::Ephemeral {
            state.ephemeral += 1;
        }
        state.frames.push_back((frame, class));
        let len = state.frames.len() as i64;
        // Only the push that makes the queue non-empty finds a waker: the connection takes
        // everything at once, so later pushes have nobody to wake.
        let waker = state.waker.take();
        drop(state);
        if len > self.metrics.high_water.get() {
            self.metrics.high_water.set(len);
        }
        wake(waker);
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
            state.close = Some(Box::new(request));
        }
        let waker = state.waker.take();
        drop(state);
        wake(waker);
    }

    /// The pending close request, if any.
    pub fn closing(&self) -> Option<CloseRequest> {
        self.state
            .lock()
            .expect("outbox lock poisoned")
            .close
            .as_deref()
            .cloned()
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

    /// Moves every queued frame to the back of `into` (swapping buffers when `into` is empty,
    /// so nothing is copied). Once a close is requested and everything before it has been
    /// handed over, reports the close, once.
    pub fn take(&self, into: &mut Frames) -> Taken {
        let mut state = self.state.lock().expect("outbox lock poisoned");
        Self::take_locked(&mut state, into)
    }

    /// Like [`Outbox::take`], but when there is nothing to hand over, arranges for the
    /// connection's task to be woken by the next push or close request.
    pub fn poll_take(&self, cx: &mut Context<'_>, into: &mut Frames) -> Poll<Taken> {
        let mut state = self.state.lock().expect("outbox lock poisoned");
        match Self::take_locked(&mut state, into) {
            Taken::Nothing => {
                match &mut state.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    slot => *slot = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            taken => Poll::Ready(taken),
        }
    }

    fn take_locked(state: &mut State, into: &mut Frames) -> Taken {
        if !state.frames.is_empty() {
            if into.is_empty() {
                std::mem::swap(&mut state.frames, into);
            } else {
                into.append(&mut state.frames);
            }
            state.ephemeral = 0;
            return Taken::Frames;
        }
        match &state.close {
            Some(close) if !state.finished => {
                state.finished = true;
                Taken::Close(CloseRequest::clone(close))
            }
            _ => Taken::Nothing,
        }
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(bound: usize) -> Outbox {
        Outbox::new(
            bound,
            Arc::new(OutboxMetrics {
                drops: IntCounter::new("d", "d").unwrap(),
                slow_consumer_closes: IntCounter::new("s", "s").unwrap(),
                closes_1013: IntCounter::new("c", "c").unwrap(),
                high_water: IntGauge::new("h", "h").unwrap(),
            }),
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

    #[test]
    fn hands_over_everything_then_reports_close_once() {
        let o = outbox(8);
        o.push(Bytes::from_static(b"a"), FrameClass::Durable);
        o.push(Bytes::from_static(b"b"), FrameClass::Durable);
        o.close(1001, "bye");
        let mut batch = Frames::new();
        assert_eq!(o.take(&mut batch), Taken::Frames);
        assert_eq!(batch.len(), 2);
        let Taken::Close(close) = o.take(&mut batch) else {
            panic!("the close follows the frames");
        };
        assert_eq!(close.code, 1001);
        assert_eq!(o.take(&mut batch), Taken::Nothing);
        assert_eq!(batch.len(), 2, "nothing more after the close");
    }

    #[test]
    fn a_waiting_connection_is_woken_by_the_first_push_only() {
        use std::sync::atomic::AtomicUsize;
        use std::task::Wake;

        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let o = outbox(8);
        let mut batch = Frames::new();
        assert_eq!(o.poll_take(&mut cx, &mut batch), Poll::Pending);
        o.push(Bytes::from_static(b"a"), FrameClass::Durable);
        o.push(Bytes::from_static(b"b"), FrameClass::Durable);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(o.poll_take(&mut cx, &mut batch), Poll::Ready(Taken::Frames));
        assert_eq!(o.poll_take(&mut cx, &mut batch), Poll::Pending);
        o.close(1000, "");
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }
}
