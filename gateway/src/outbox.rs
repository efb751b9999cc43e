//! A connection's bounded outbound queue and the slow-consumer policy (PROTOCOL.md §1).
//!
//! Producers (shards, the connection's own reader, its shard's heartbeat sweep) push complete
//! frame bytes; the connection takes everything queued in one go and writes it with as few
//! syscalls as it can.
//!
//! The bound is in frames **and** bytes, and it covers everything queued for the connection
//! wherever it sits: frames still in the queue and frames the connection has taken but not yet
//! written (it reports each write back with [`Outbox::written`]). A reader that takes frames
//! slowly therefore fills the bound like one that takes none.
//! When the bound would be exceeded, ephemeral frames (typing, presence) still in the queue are
//! dropped first; when a durable frame cannot be queued the connection is closed with 1013 and
//! the client recovers the gap with `join` + `since_seq`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
    /// Bytes of `frames`.
    bytes: usize,
    /// Frames and bytes taken by the connection and not yet reported written.
    taken_frames: usize,
    taken_bytes: usize,
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
    /// The most bytes ever queued for one connection.
    pub high_water_bytes: IntGauge,
}

/// Frames (and their bytes) the connection wrote since it last reported, handed back with its
/// next [`Outbox::take`] so that releasing them costs no lock of its own.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub frames: usize,
    pub bytes: usize,
}

impl OutboxMetrics {
    /// Counters registered nowhere, for tests.
    #[cfg(test)]
    pub(crate) fn unregistered() -> Arc<OutboxMetrics> {
        Arc::new(OutboxMetrics {
            drops: IntCounter::new("d", "d").expect("valid counter"),
            slow_consumer_closes: IntCounter::new("s", "s").expect("valid counter"),
            closes_1013: IntCounter::new("c", "c").expect("valid counter"),
            high_water: IntGauge::new("h", "h").expect("valid gauge"),
            high_water_bytes: IntGauge::new("hb", "hb").expect("valid gauge"),
        })
    }
}

/// How much may be queued for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub frames: usize,
    pub bytes: usize,
}

impl Bound {
    /// Whether one more frame of `extra` bytes, on top of `frames` frames of `bytes` bytes
    /// already queued, would exceed the bound. A frame bigger than the byte bound on its own
    /// still goes into an empty queue.
    pub fn exceeded_by(&self, frames: usize, bytes: usize, extra: usize) -> bool {
        frames >= self.frames || (frames > 0 && bytes + extra > self.bytes)
    }
}

/// The bounded queue between producers and a connection, and what its shard's heartbeat sweep
/// reads of it.
pub struct Outbox {
    state: Mutex<State>,
    bound: Bound,
    metrics: Arc<OutboxMetrics>,
    /// When the peer last sent bytes ([`clock_ms`]).
    last_seen_ms: AtomicU64,
    /// Rooms this connection's joins have created (the per-connection creation limit).
    rooms_created: AtomicU32,
}

impl Outbox {
    pub fn new(bound: Bound, metrics: Arc<OutboxMetrics>) -> Outbox {
        Outbox {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                bytes: 0,
                taken_frames: 0,
                taken_bytes: 0,
                ephemeral: 0,
                close: None,
                finished: false,
                waker: None,
            }),
            bound: Bound {
                frames: bound.frames.max(1),
                bytes: bound.bytes.max(1),
            },
            metrics,
            last_seen_ms: AtomicU64::new(clock_ms()),
            rooms_created: AtomicU32::new(0),
        }
    }

    /// Counts one more room created by this connection's joins, unless `limit` rooms were
    /// created already; `false` when over the limit.
    pub fn try_count_room_created(&self, limit: u32) -> bool {
        self.rooms_created
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Records that the peer sent something (heartbeat bookkeeping).
    pub fn seen(&self, now_ms: u64) {
        self.last_seen_ms.store(now_ms, Ordering::Relaxed);
    }

    /// When the peer last sent something ([`clock_ms`]).
    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }

    /// The configured bound.
    pub fn bound(&self) -> Bound {
        self.bound
    }

    /// Queues a frame, applying the slow-consumer policy when the bound would be exceeded.
    pub fn push(&self, frame: Bytes, class: FrameClass) -> Pushed {
        let mut state = self.state.lock().expect("outbox lock poisoned");
        if state.close.is_some() {
            return Pushed::Closed;
        }
        let mut outcome = Pushed::Queued;
        while state.over_bound(&self.bound, frame.len()) {
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
                    if let Some((dropped, _)) = state.frames.remove(oldest) {
                        state.bytes -= dropped.len();
                    }
                    state.ephemeral -= 1;
                    self.metrics.drops.inc();
                    outcome = Pushed::DroppedEphemeral;
                }
                FrameClass::Durable => {
                    drop(state);
                    self.overflow();
                    return Pushed::Overflowed;
                }
            }
        }
        if class == FrameClass::Ephemeral {
            state.ephemeral += 1;
        }
        state.bytes += frame.len();
        state.frames.push_back((frame, class));
        let frames = (state.frames.len() + state.taken_frames) as i64;
        let bytes = (state.bytes + state.taken_bytes) as i64;
        // Only the push that makes the queue non-empty finds a waker: the connection takes
        // everything at once, so later pushes have nobody to wake.
        let waker = state.waker.take();
        drop(state);
        if frames > self.metrics.high_water.get() {
            self.metrics.high_water.set(frames);
        }
        if bytes > self.metrics.high_water_bytes.get() {
            self.metrics.high_water_bytes.set(bytes);
        }
        wake(waker);
        outcome
    }

    /// Applies the slow-consumer close: durable frames would be lost, so the backlog is
    /// discarded and the connection closes with 1013. The client recovers from storage with
    /// `join` + `since_seq`. Also used by a shard whose frames for this connection wait
    /// elsewhere and outgrew the same bound.
    pub fn overflow(&self) {
        let mut state = self.state.lock().expect("outbox lock poisoned");
        if state.close.is_some() {
            return;
        }
        state.frames.clear();
        state.bytes = 0;
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
    }

    /// Counts an ephemeral frame for this connection dropped before it reached the queue.
    pub fn count_dropped(&self) {
        self.metrics.drops.inc();
    }

    /// Reports frames taken with [`Outbox::take`] as written to the socket, releasing their
    /// share of the bound (the connection itself reports through its next take instead).
    pub fn written(&self, written: Written) {
        self.state
            .lock()
            .expect("outbox lock poisoned")
            .release(written);
    }

    /// Frames and bytes queued for the connection, taken but unwritten ones included.
    pub fn queued(&self) -> (usize, usize) {
        let state = self.state.lock().expect("outbox lock poisoned");
        (
            state.frames.len() + state.taken_frames,
            state.bytes + state.taken_bytes,
        )
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

    /// Frames waiting in the queue (not yet taken by the connection).
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
    ///
    /// `written` reports what the connection wrote since its last take, releasing its share of
    /// the bound first.
    pub fn take(&self, into: &mut Frames, written: Written) -> Taken {
        let mut state = self.state.lock().expect("outbox lock poisoned");
        state.release(written);
        Self::take_locked(&mut state, into)
    }

    /// Like [`Outbox::take`], but when there is nothing to hand over, arranges for the
    /// connection's task to be woken by the next push or close request.
    pub fn poll_take(
        &self,
        cx: &mut Context<'_>,
        into: &mut Frames,
        written: Written,
    ) -> Poll<Taken> {
        let mut state = self.state.lock().expect("outbox lock poisoned");
        state.release(written);
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
            state.taken_frames += state.frames.len();
            state.taken_bytes += state.bytes;
            state.bytes = 0;
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

impl State {
    fn release(&mut self, written: Written) {
        self.taken_frames = self.taken_frames.saturating_sub(written.frames);
        self.taken_bytes = self.taken_bytes.saturating_sub(written.bytes);
    }

    /// Whether queuing `extra` more bytes (one more frame) would exceed the bound. A frame
    /// bigger than the byte bound on its own still goes into an empty queue.
    fn over_bound(&self, bound: &Bound, extra: usize) -> bool {
        bound.exceeded_by(
            self.frames.len() + self.taken_frames,
            self.bytes + self.taken_bytes,
            extra,
        )
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

    fn metrics() -> Arc<OutboxMetrics> {
        OutboxMetrics::unregistered()
    }

    fn outbox(frames: usize) -> Outbox {
        Outbox::new(
            Bound {
                frames,
                bytes: usize::MAX,
            },
            metrics(),
        )
    }

    #[test]
    fn frames_taken_but_unwritten_count_against_the_bound() {
        let o = outbox(3);
        let mut batch = Frames::new();
        for _ in 0..3 {
            o.push(Bytes::from_static(b"abc"), FrameClass::Durable);
        }
        // The connection takes everything but writes only one frame.
        assert_eq!(o.take(&mut batch, Written::default()), Taken::Frames);
        o.written(Written {
            frames: 1,
            bytes: 3,
        });
        assert_eq!(o.queued(), (2, 6));
        assert_eq!(
            o.push(Bytes::from_static(b"d"), FrameClass::Durable),
            Pushed::Queued
        );
        assert_eq!(
            o.push(Bytes::from_static(b"e"), FrameClass::Durable),
            Pushed::Overflowed,
            "two unwritten frames plus one queued fill a bound of three"
        );
        assert_eq!(o.closing().unwrap().code, 1013);
    }

    #[test]
    fn the_byte_bound_closes_a_connection_below_the_frame_bound() {
        let o = Outbox::new(
            Bound {
                frames: 1000,
                bytes: 10,
            },
            metrics(),
        );
        // One frame bigger than the byte bound alone still goes into an empty queue.
        assert_eq!(
            o.push(Bytes::from(vec![b'x'; 20]), FrameClass::Durable),
            Pushed::Queued
        );
        let mut batch = Frames::new();
        o.take(&mut batch, Written::default());
        o.written(Written {
            frames: 1,
            bytes: 20,
        });
        assert_eq!(
            o.push(Bytes::from(vec![b'x'; 6]), FrameClass::Durable),
            Pushed::Queued
        );
        assert_eq!(
            o.push(Bytes::from(vec![b'y'; 2]), FrameClass::Ephemeral),
            Pushed::Queued
        );
        // 6 + 2 + 6 > 10: the ephemeral frame makes room, then the durable one overflows.
        assert_eq!(
            o.push(Bytes::from(vec![b'z'; 3]), FrameClass::Durable),
            Pushed::DroppedEphemeral
        );
        assert_eq!(o.queued(), (2, 9));
        assert_eq!(
            o.push(Bytes::from(vec![b'w'; 6]), FrameClass::Durable),
            Pushed::Overflowed
        );
        assert_eq!(o.queued().1, 0);
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
        assert_eq!(o.take(&mut batch, Written::default()), Taken::Frames);
        assert_eq!(batch.len(), 2);
        let Taken::Close(close) = o.take(&mut batch, Written::default()) else {
            panic!("the close follows the frames");
        };
        assert_eq!(close.code, 1001);
        assert_eq!(o.take(&mut batch, Written::default()), Taken::Nothing);
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
        assert_eq!(
            o.poll_take(&mut cx, &mut batch, Written::default()),
            Poll::Pending
        );
        o.push(Bytes::from_static(b"a"), FrameClass::Durable);
        o.push(Bytes::from_static(b"b"), FrameClass::Durable);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            o.poll_take(&mut cx, &mut batch, Written::default()),
            Poll::Ready(Taken::Frames)
        );
        assert_eq!(
            o.poll_take(&mut cx, &mut batch, Written::default()),
            Poll::Pending
        );
        o.close(1000, "");
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }
}
