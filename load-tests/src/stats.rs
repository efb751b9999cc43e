//! Counters and latency histograms of one run (single-threaded: shared through `Rc`).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::Instant;

use hdrhistogram::Histogram;

/// Everything one run counts. Only events after the warm-up are recorded.
pub struct Stats {
    pub epoch: Instant,
    pub recording: Cell<bool>,
    pub sent: Cell<u64>,
    pub acked: Cell<u64>,
    pub delivered: Cell<u64>,
    pub errors: Cell<u64>,
    pub requests: Cell<u64>,
    /// Server-pushed inbox frames (`conversation_response`, `notification_response`).
    pub pushed: Cell<u64>,
    pub connect_failures: Cell<u64>,
    pub connected: Cell<u64>,
    pub closes: RefCell<BTreeMap<u16, u64>>,
    /// Delivery latency (intended send → receipt by another member), microseconds.
    pub delivery_latency: RefCell<Histogram<u64>>,
    /// Request latency (intended send → direct reply), microseconds.
    pub reply_latency: RefCell<Histogram<u64>>,
}

impl Stats {
    pub fn new() -> Stats {
        let histogram = || Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
        Stats {
            epoch: Instant::now(),
            recording: Cell::new(false),
            sent: Cell::new(0),
            acked: Cell::new(0),
            delivered: Cell::new(0),
            errors: Cell::new(0),
            requests: Cell::new(0),
            pushed: Cell::new(0),
            connect_failures: Cell::new(0),
            connected: Cell::new(0),
            closes: RefCell::new(BTreeMap::new()),
            delivery_latency: RefCell::new(histogram()),
            reply_latency: RefCell::new(histogram()),
        }
    }

    /// Nanoseconds since the run's epoch.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn bump(&self, counter: &Cell<u64>) {
        if self.recording.get() {
            counter.set(counter.get() + 1);
        }
    }

    pub fn sent(&self) {
        self.bump(&self.sent);
    }

    pub fn error(&self) {
        self.bump(&self.errors);
    }

    pub fn request(&self) {
        self.bump(&self.requests);
    }

    pub fn pushed(&self) {
        self.bump(&self.pushed);
    }

    /// A direct reply to a request sent at `intended_ns`.
    pub fn acked(&self, intended_ns: Option<u64>) {
        if !self.recording.get() {
            return;
        }
        self.acked.set(self.acked.get() + 1);
        if let Some(t) = intended_ns {
            let micros = self.now_ns().saturating_sub(t) / 1000;
            let _ = self.reply_latency.borrow_mut().record(micros.max(1));
        }
    }

    /// A chat event received by another member; `intended_ns` from the message text.
    pub fn delivered(&self, intended_ns: Option<u64>) {
        if !self.recording.get() {
            return;
        }
        self.delivered.set(self.delivered.get() + 1);
        if let Some(t) = intended_ns {
            let micros = self.now_ns().saturating_sub(t) / 1000;
            let _ = self.delivery_latency.borrow_mut().record(micros.max(1));
        }
    }

    pub fn closed(&self, code: u16) {
        *self.closes.borrow_mut().entry(code).or_insert(0) += 1;
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}
