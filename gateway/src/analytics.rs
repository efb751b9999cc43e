//! Widget analytics and the live team dashboard.
//!
//! `track_activity` and `page_view` events are handed to an [`AnalyticsSink`]: a bounded queue
//! (frames and, through the size bound of each event, bytes) drained by a writer thread of its
//! own into daily JSON Lines files (`<analytics-dir>/analytics-YYYY-MM-DD.jsonl`). Each tenant
//! has a rate (so one tenant cannot fill the queue for the others), each day a byte cap, and
//! files older than the retention are deleted. An event past any bound is dropped and counted;
//! nothing on the chat path waits for analytics.
//!
//! [`Dashboards`] keeps each tenant's live counters (conversations open and waiting, agents
//! online, page views and activities of the last minute) and pushes a `dashboard_response` to
//! the tenant's `subscribe_dashboard` connections whenever they change, at most once a second
//! ([`run_dashboards`]).

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::IntCounter;
use serde::Serialize;
use storage::records::{Conversation, ListQuery};
use storage::{RecordKind, Store, Timestamp};
use tokio::sync::mpsc;

use crate::codec::FrameBuilder;
use crate::limits::TenantBudgets;
use crate::metrics::OutCode;
use crate::outbox::FrameClass;
use crate::server::Shared;
use crate::shard::{ConnId, ConnRef, Route};

/// Events the sink holds before it drops new ones. Each event is at most
/// [`MAX_EVENT_BYTES`], so the queue holds at most 4 MiB.
pub const SINK_CAPACITY: usize = 512;
/// Largest serialized analytics event.
pub const MAX_EVENT_BYTES: usize = 8 * 1024;

/// An analytics event as it is written out.
#[derive(Serialize)]
pub struct AnalyticsEvent<'a> {
    /// `activity` or `page_view`.
    pub kind: &'a str,
    pub tenant_id: &'a str,
    pub user_id: &'a str,
    pub role: &'a str,
    /// The room it was sent about, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room_id: Option<&'a str>,
    pub at: Timestamp,
    /// The event's own fields (`activity`/`data`, or `page`/`referrer`/`title`).
    #[serde(flatten)]
    pub fields: serde_json::Value,
}

/// Where the sink writes, and its bounds.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub dir: PathBuf,
    /// Events a tenant may send a second.
    pub tenant_rate: u32,
    /// Bytes written a day at most.
    pub max_day_bytes: u64,
    /// Days of files kept.
    pub retention_days: u32,
}

/// Where analytics events go: a bounded queue to the writer thread.
pub struct AnalyticsSink {
    tx: mpsc::Sender<Vec<u8>>,
    tenants: TenantBudgets,
    /// Events dropped: past a bound (queue, tenant rate, day's bytes) or too large.
    dropped: IntCounter,
}

impl AnalyticsSink {
    /// Starts the writer thread on the configured directory (created if missing); it counts
    /// what it wrote in `written`.
    pub fn start(
        config: SinkConfig,
        written: IntCounter,
        dropped: IntCounter,
    ) -> std::io::Result<AnalyticsSink> {
        std::fs::create_dir_all(&config.dir)?;
        let (tx, rx) = mpsc::channel(SINK_CAPACITY);
        let tenants = TenantBudgets::new(
            f64::from(config.tenant_rate),
            config.tenant_rate.saturating_mul(2),
        );
        let writer = Writer {
            config,
            written,
            dropped: dropped.clone(),
            open: None,
        };
        std::thread::Builder::new()
            .name("analytics".into())
            .spawn(move || writer.run(rx))?;
        Ok(AnalyticsSink {
            tx,
            tenants,
            dropped,
        })
    }

    /// Queues an event without waiting; false when it was dropped (queue full, or larger than
    /// [`MAX_EVENT_BYTES`]).
    pub fn offer(&self, event: &AnalyticsEvent<'_>) -> bool {
        if !self.tenants.allow(event.tenant_id) {
            self.dropped.inc();
            return false;
        }
        let Ok(mut line) = serde_json::to_vec(event) else {
            return false;
        };
        line.push(b'\n');
        if line.len() > MAX_EVENT_BYTES || self.tx.try_send(line).is_err() {
            self.dropped.inc();
            return false;
        }
        true
    }
}

/// The writer thread's state: the day's open file and how much it holds.
struct Writer {
    config: SinkConfig,
    written: IntCounter,
    dropped: IntCounter,
    /// The day (`YYYY-MM-DD`), its file, and the bytes in it.
    open: Option<(String, BufWriter<File>, u64)>,
}

impl Writer {
    /// Appends each event to the day's file, flushing whenever the queue is empty. A failed
    /// write is logged and the event lost (analytics never stop the gateway).
    fn run(mut self, mut rx: mpsc::Receiver<Vec<u8>>) {
        while let Some(line) = rx.blocking_recv() {
            let mut batch = vec![line];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            self.write(&batch);
        }
    }

    fn write(&mut self, batch: &[Vec<u8>]) {
        let day = Timestamp::now().to_rfc3339()[..10].to_owned();
        if self.open.as_ref().is_none_or(|(d, _, _)| *d != day) {
            self.open = None;
            self.forget_old_days();
            let path = self.config.dir.join(format!("analytics-{day}.jsonl"));
            match OpenOptions::new().create(true).append(true).open(&path) {
                Ok(file) => {
                    let size = file.metadata().map_or(0, |m| m.len());
                    self.open = Some((day, BufWriter::new(file), size));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "opening the analytics file failed");
                    self.dropped.inc_by(batch.len() as u64);
                    return;
                }
            }
        }
        let Some((_, file, size)) = self.open.as_mut() else {
            return;
        };
        let (mut written, mut over) = (0, 0);
        let mut result = Ok(());
        for line in batch {
            if *size + line.len() as u64 > self.config.max_day_bytes {
                over += 1;
                continue;
            }
            result = file.write_all(line);
            if result.is_err() {
                break;
            }
            *size += line.len() as u64;
            written += 1;
        }
        self.dropped.inc_by(over);
        match result.and_then(|()| file.flush()) {
            Ok(()) => self.written.inc_by(written),
            Err(e) => {
                tracing::warn!(error = %e, "writing analytics events failed");
                self.open = None;
            }
        }
    }

    /// Deletes the files of days past the retention.
    fn forget_old_days(&self) {
        let keep_ms = i64::from(self.config.retention_days) * 86_400_000;
        let cutoff = Timestamp(Timestamp::now().0 - keep_ms).to_rfc3339()[..10].to_owned();
        let Ok(entries) = std::fs::read_dir(&self.config.dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(day) = name
                .to_str()
                .and_then(|n| n.strip_prefix("analytics-"))
                .and_then(|n| n.strip_suffix(".jsonl"))
            else {
                continue;
            };
            // ISO dates compare as text.
            if day < cutoff.as_str() {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(file = ?name, error = %e, "deleting an old analytics file failed");
                }
            }
        }
    }
}

/// A tenant's live counters, as `dashboard_response` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Open conversations, from the latest count of the tenant's conversations (taken when a
    /// dashboard is subscribed, then every 30 s); `null` until the first count.
    pub conversations_open: Option<u64>,
    /// Conversations waiting in the support queue.
    pub conversations_queued: u64,
    /// Agents and admins with at least one open connection (read from the presence registry
    /// when the counters are made: nothing is kept per connection for it).
    pub agents_online: u64,
    /// `page_view` and `track_activity` events of the last 60 seconds.
    pub page_views_1m: u64,
    pub activities_1m: u64,
}

/// Per-second counts of one kind of event over the last minute.
#[derive(Default)]
struct LastMinute {
    /// (second, events in it), oldest first.
    seconds: VecDeque<(i64, u64)>,
}

impl LastMinute {
    fn add(&mut self, now_s: i64) {
        match self.seconds.back_mut() {
            Some((s, n)) if *s == now_s => *n += 1,
            _ => self.seconds.push_back((now_s, 1)),
        }
        self.trim(now_s);
    }

    fn trim(&mut self, now_s: i64) {
        while self.seconds.front().is_some_and(|(s, _)| now_s - s >= 60) {
            self.seconds.pop_front();
        }
    }

    fn total(&mut self, now_s: i64) -> u64 {
        self.trim(now_s);
        self.seconds.iter().map(|(_, n)| n).sum()
    }
}

#[derive(Default)]
struct TenantBoard {
    subscribers: Vec<ConnRef>,
    page_views: LastMinute,
    activities: LastMinute,
    open: Option<u64>,
    /// When the open conversations were last counted (ms); 0: never.
    counted_at: i64,
    /// What the subscribers were last told.
    told: Option<Counters>,
}

/// Every tenant's dashboard state.
#[derive(Default)]
pub struct Dashboards {
    tenants: Mutex<HashMap<String, TenantBoard>>,
}

/// How often a subscribed tenant's open conversations are counted again.
const RECOUNT_MS: i64 = 30_000;
/// Most conversations one count reads (a larger tenant shows at least this many).
const COUNT_LIMIT: u64 = 100_000;

impl Dashboards {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, TenantBoard>> {
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection closed: off its tenant's dashboard.
    pub fn disconnected(&self, conn: &ConnRef) {
        let mut tenants = self.lock();
        let Some(board) = tenants.get_mut(&conn.claims.tenant) else {
            return;
        };
        board.subscribers.retain(|c| c.id != conn.id);
        if board.subscribers.is_empty() {
            tenants.remove(&conn.claims.tenant);
        }
    }

    /// Follows (or stops following) the tenant's dashboard; returns its counters now.
    pub fn subscribe(&self, shared: &Shared, conn: &ConnRef, on: bool) -> Counters {
        let mut tenants = self.lock();
        let board = tenants.entry(conn.claims.tenant.clone()).or_default();
        board.subscribers.retain(|c| c.id != conn.id);
        if on {
            board.subscribers.push(conn.clone());
        } else if board.subscribers.is_empty() {
            let counters = counters(board, shared, &conn.claims.tenant);
            tenants.remove(&conn.claims.tenant);
            return counters;
        }
        // `told` stays what the others were told: they hear of any change at the next tick.
        counters(board, shared, &conn.claims.tenant)
    }

    /// Counts a page view or activity of the tenant.
    pub fn count(&self, tenant: &str, page_view: bool) {
        let now_s = Timestamp::now().0.div_euclid(1000);
        let mut tenants = self.lock();
        // Only tenants someone looks at keep counts (a tenant's widgets alone never make one).
        if let Some(board) = tenants.get_mut(tenant) {
            if page_view {
                board.page_views.add(now_s);
            } else {
                board.activities.add(now_s);
            }
        }
    }

    pub fn is_subscribed(&self, tenant: &str, conn: ConnId) -> bool {
        self.lock()
            .get(tenant)
            .is_some_and(|b| b.subscribers.iter().any(|c| c.id == conn))
    }
}

fn counters(board: &mut TenantBoard, shared: &Shared, tenant: &str) -> Counters {
    let now_s = Timestamp::now().0.div_euclid(1000);
    Counters {
        conversations_open: board.open,
        conversations_queued: shared.queue.waiting_in(tenant) as u64,
        agents_online: shared.presence.team_online(tenant) as u64,
        page_views_1m: board.page_views.total(now_s),
        activities_1m: board.activities.total(now_s),
    }
}

/// The `dashboard_response` push.
#[derive(Serialize)]
struct DashboardEvent<'a> {
    dashboard_id: &'a str,
    counters: &'a Counters,
}

/// The dashboard every subscription follows (the only one so far).
pub const OVERVIEW: &str = "overview";
pub const DASHBOARD_RESPONSE: &str = "dashboard_response";

/// Once a second, for as long as the server runs: counts the open conversations of subscribed
/// tenants when due, and tells each tenant's subscribers its counters when they changed.
pub async fn run_dashboards(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown_signal();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let now = Timestamp::now().0;
        let mut due = Vec::new();
        for (tenant, board) in shared.dashboards.lock().iter_mut() {
            if !board.subscribers.is_empty() && now - board.counted_at >= RECOUNT_MS {
                // Due again 30 s after this count started, whatever it takes.
                board.counted_at = now;
                due.push(tenant.clone());
            }
        }
        // Each count is a task of its own: a large tenant never delays the others' pushes.
        for tenant in due {
            let shared = shared.clone();
            tokio::spawn(async move {
                match count_open(&shared.store, &tenant).await {
                    Ok(open) => {
                        if let Some(board) = shared.dashboards.lock().get_mut(&tenant) {
                            board.open = Some(open);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%tenant, error = %e, "counting open conversations failed")
                    }
                }
            });
        }
        push_changes(&shared);
    }
}

fn push_changes(shared: &Shared) {
    let mut pushes = Vec::new();
    {
        let mut tenants = shared.dashboards.lock();
        for (tenant, board) in tenants.iter_mut() {
            if board.subscribers.is_empty() {
                continue;
            }
            let now = counters(board, shared, tenant);
            if board.told.as_ref() != Some(&now) {
                board.told = Some(now.clone());
                pushes.push((board.subscribers.clone(), now));
            }
        }
    }
    // Not a shard: every frame goes through its connection's shard mailbox.
    let route = Route::new(&shared.shards, usize::MAX);
    for (subscribers, counters) in pushes {
        let event = DashboardEvent {
            dashboard_id: OVERVIEW,
            counters: &counters,
        };
        for conn in &subscribers {
            let frame =
                FrameBuilder::success(DASHBOARD_RESPONSE, &conn.claims.sub, None, None, &event);
            route.send(conn, frame, FrameClass::Durable);
        }
        shared
            .metrics
            .frames_out(OutCode::Dashboard, subscribers.len() as u64);
    }
}

/// Counts the tenant's open conversations (at most [`COUNT_LIMIT`] read).
async fn count_open<S: Store>(store: &S, tenant: &str) -> storage::Result<u64> {
    let mut open = 0;
    let mut read = 0;
    let mut after = None;
    let mut as_of = None;
    while read < COUNT_LIMIT {
        let query = ListQuery {
            as_of,
            descending: true,
            after: after.clone(),
            limit: 500,
        };
        let page = store
            .list_records(tenant, RecordKind::Conversation, query)
            .await?;
        as_of = Some(page.as_of);
        let full = page.entries.len() == 500;
        for listed in &page.entries {
            read += 1;
            after = Some((listed.list_key, listed.record.key.id.clone()));
            if serde_json::from_str::<Conversation>(&listed.record.body).is_ok_and(|c| c.is_open) {
                open += 1;
            }
        }
        if !full {
            break;
        }
    }
    Ok(open)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_minute_forgets_older_seconds() {
        let mut minute = LastMinute::default();
        minute.add(100);
        minute.add(100);
        minute.add(130);
        assert_eq!(minute.total(130), 3);
        assert_eq!(minute.total(160), 1, "second 100 is a minute old");
        assert_eq!(minute.total(190), 0);
    }

    fn event(tenant_id: &str, fields: serde_json::Value) -> AnalyticsEvent<'_> {
        AnalyticsEvent {
            kind: "page_view",
            tenant_id,
            user_id: "cust",
            role: "customer",
            room_id: None,
            at: Timestamp(1_700_000_000_000),
            fields,
        }
    }

    fn counters() -> (IntCounter, IntCounter) {
        (
            IntCounter::new("w", "w").unwrap(),
            IntCounter::new("d", "d").unwrap(),
        )
    }

    fn wait_for(counter: &IntCounter, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while counter.get() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} < {n}",
                counter.get()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The lines of the analytics files in `dir`.
    fn lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .iter()
            .flat_map(|f| {
                let text = std::fs::read_to_string(f).unwrap();
                text.lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn the_sink_writes_json_lines_within_each_tenants_rate_and_forgets_old_days() {
        let dir = tempfile::tempdir().unwrap();
        let (written, dropped) = counters();
        std::fs::write(dir.path().join("analytics-2020-01-01.jsonl"), "{}\n").unwrap();
        let config = SinkConfig {
            dir: dir.path().to_owned(),
            tenant_rate: 2,
            max_day_bytes: 1 << 20,
            retention_days: 30,
        };
        let sink = AnalyticsSink::start(config, written.clone(), dropped.clone()).unwrap();
        assert!(sink.offer(&event("acme", serde_json::json!({"page": "/pricing"}))));
        let huge = "x".repeat(MAX_EVENT_BYTES);
        assert!(!sink.offer(&event("acme", serde_json::json!({ "page": huge }))));
        // A burst of twice the rate: two more fit, then acme's budget is spent...
        assert!(sink.offer(&event("acme", serde_json::json!({"page": "/a"}))));
        assert!(sink.offer(&event("acme", serde_json::json!({"page": "/b"}))));
        assert!(!sink.offer(&event("acme", serde_json::json!({"page": "/c"}))));
        // ...not globex's.
        assert!(sink.offer(&event("globex", serde_json::json!({"page": "/"}))));
        assert_eq!(dropped.get(), 2);
        wait_for(&written, 4);
        let lines = lines(dir.path());
        let pages: Vec<&str> = lines.iter().map(|l| l["page"].as_str().unwrap()).collect();
        assert_eq!(
            pages,
            ["/pricing", "/a", "/b", "/"],
            "the 2020 file is gone"
        );
        assert_eq!(lines[0]["tenant_id"], "acme");
        assert_eq!(lines[0]["kind"], "page_view");
    }

    #[test]
    fn a_day_past_its_byte_cap_drops_its_events() {
        let dir = tempfile::tempdir().unwrap();
        let (written, dropped) = counters();
        let config = SinkConfig {
            dir: dir.path().to_owned(),
            tenant_rate: 100,
            max_day_bytes: 300,
            retention_days: 30,
        };
        let sink = AnalyticsSink::start(config, written.clone(), dropped.clone()).unwrap();
        for page in ["/1", "/2", "/3"] {
            assert!(sink.offer(&event("acme", serde_json::json!({ "page": page }))));
        }
        // About 140 bytes an event: two fit in 300.
        wait_for(&written, 2);
        wait_for(&dropped, 1);
        assert_eq!(lines(dir.path()).len(), 2);
    }
}
