//! Prometheus metrics. Every handle is resolved once at start; labels are bounded (codes,
//! error codes, shard numbers), never room or user ids.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::cmd::Code;
use crate::codec::ErrorCode;

/// Label index for frames that are not a known request code.
pub const INVALID_CODE: usize = Code::ALL.len();

/// The close codes the server sends, each with a `gateway_closes_total` series from the start.
const CLOSE_CODES: [u16; 8] = [1001, 1002, 1003, 1007, 1008, 1009, 1011, 1013];

/// Outbound frame kinds, by code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutCode {
    Response(Code),
    Connected,
    Error,
    /// `notification_response`: pushed to a user, not a reply to a request.
    Notification,
    /// `conversation_response`: a conversation changed (to its members and the inbox).
    Conversation,
    /// `queue_response`: a waiting conversation's place in the support queue.
    Queue,
    /// `dashboard_response`: a tenant's live counters.
    Dashboard,
}

impl OutCode {
    fn index(self) -> usize {
        match self {
            OutCode::Response(code) => code.index(),
            OutCode::Connected => Code::ALL.len(),
            OutCode::Error => Code::ALL.len() + 1,
            OutCode::Notification => Code::ALL.len() + 2,
            OutCode::Conversation => Code::ALL.len() + 3,
            OutCode::Queue => Code::ALL.len() + 4,
            OutCode::Dashboard => Code::ALL.len() + 5,
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub connections: Vec<IntGauge>,
    pub rooms: Vec<IntGauge>,
    frames_in: Vec<IntCounter>,
    frames_out: Vec<IntCounter>,
    errors: Vec<IntCounter>,
    pub deliveries: IntCounter,
    pub fanout_latency: Histogram,
    /// Chats sent to the store again under a new seq after a seq conflict (see the shard).
    pub renumbered_appends: IntCounter,
    pub outbound_drops: IntCounter,
    pub slow_consumer_closes: IntCounter,
    pub handshake_rejects: IntCounterVec,
    pub closes: IntCounterVec,
    /// `closes` resolved for each of [`CLOSE_CODES`].
    closes_by_code: Vec<(u16, IntCounter)>,
    pub outbound_queue_high_water: IntGauge,
    pub outbound_queue_high_water_bytes: IntGauge,
    /// Conversations waiting in a support queue, all tenants together.
    pub support_queue_waiting: IntGauge,
    /// Time a conversation waited in the queue before an agent took it.
    pub queue_seconds: Histogram,
    /// From a contact's first unanswered message to the team's first answer.
    pub first_reply_seconds: Histogram,
    /// From an agent taking a conversation to its end.
    pub handle_seconds: Histogram,
    /// Analytics events written to the sink's files, and dropped (its queue was full).
    pub analytics_written: IntCounter,
    pub analytics_dropped: IntCounter,
    /// HTTP API requests, by route (its pattern), method and status.
    pub http_requests: IntCounterVec,
    /// How long HTTP API requests took, by route.
    pub http_seconds: HistogramVec,
}

impl Metrics {
    /// Adds metrics kept elsewhere (the store's) to what `/metrics` shows.
    /// The registry, for metrics registered outside this module (the in-process workers').
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        self.registry
            .register(collector)
            .expect("metric names are unique");
    }

    pub fn new(shards: usize) -> Metrics {
        let registry = Registry::new();
        let connections_vec = IntGaugeVec::new(
            Opts::new(
                "gateway_connections",
                "open WebSocket connections, by shard",
            ),
            &["shard"],
        )
        .unwrap();
        let rooms_vec = IntGaugeVec::new(
            Opts::new("gateway_rooms", "rooms loaded in memory, by shard"),
            &["shard"],
        )
        .unwrap();
        let frames_in_vec = IntCounterVec::new(
            Opts::new("gateway_frames_in_total", "client frames received, by code"),
            &["code"],
        )
        .unwrap();
        let frames_out_vec = IntCounterVec::new(
            Opts::new(
                "gateway_frames_out_total",
                "server frames queued to clients, by code",
            ),
            &["code"],
        )
        .unwrap();
        let errors_vec = IntCounterVec::new(
            Opts::new("gateway_errors_total", "error replies, by error code"),
            &["error_code"],
        )
        .unwrap();
        let deliveries = IntCounter::new(
            "gateway_deliveries_total",
            "chat events queued to room members other than the sender",
        )
        .unwrap();
        let fanout_latency = Histogram::with_opts(
            HistogramOpts::new(
                "gateway_fanout_latency_seconds",
                "from reading a chat frame to queueing it to every room member (store commit included)",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ]),
        )
        .unwrap();
        let renumbered_appends = IntCounter::new(
            "gateway_renumbered_appends_total",
            "chats renumbered and sent to the store again because their seq was taken (after an earlier chat of the room failed or was a duplicate)",
        )
        .unwrap();
        let outbound_drops = IntCounter::new(
            "gateway_outbound_queue_drops_total",
            "ephemeral frames dropped because a connection's outbound queue was full",
        )
        .unwrap();
        let slow_consumer_closes = IntCounter::new(
            "gateway_slow_consumer_closes_total",
            "connections closed with 1013 because their outbound queue overflowed",
        )
        .unwrap();
        let handshake_rejects = IntCounterVec::new(
            Opts::new(
                "gateway_handshake_rejects_total",
                "refused WebSocket handshakes, by reason",
            ),
            &["reason"],
        )
        .unwrap();
        let closes = IntCounterVec::new(
            Opts::new(
                "gateway_closes_total",
                "connections closed by the server, by close code",
            ),
            &["code"],
        )
        .unwrap();
        let outbound_queue_high_water = IntGauge::new(
            "gateway_outbound_queue_high_water",
            "the most frames ever queued to one connection, written or not (never above the configured bound)",
        )
        .unwrap();
        let support_queue_waiting = IntGauge::new(
            "gateway_support_queue_waiting",
            "conversations waiting for an agent in the support queues, all tenants together",
        )
        .unwrap();
        // Human time scales: seconds to hours.
        let life_cycle_buckets = vec![
            1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0, 86400.0,
        ];
        let life_cycle = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(life_cycle_buckets.clone()))
                .unwrap()
        };
        let queue_seconds = life_cycle(
            "gateway_conversation_queue_seconds",
            "time a conversation waited in the support queue before an agent took it",
        );
        let first_reply_seconds = life_cycle(
            "gateway_conversation_first_reply_seconds",
            "from a contact's first unanswered message to the team's first answer",
        );
        let handle_seconds = life_cycle(
            "gateway_conversation_handle_seconds",
            "from an agent taking a conversation to its end",
        );
        let analytics_events = IntCounterVec::new(
            Opts::new(
                "gateway_analytics_events_total",
                "track_activity and page_view events, by outcome (written to the analytics files, or dropped because the sink's queue was full)",
            ),
            &["outcome"],
        )
        .unwrap();
        let analytics_written = analytics_events.with_label_values(&["written"]);
        let analytics_dropped = analytics_events.with_label_values(&["dropped"]);
        let outbound_queue_high_water_bytes = IntGauge::new(
            "gateway_outbound_queue_high_water_bytes",
            "the most bytes ever queued to one connection, written or not",
        )
        .unwrap();

        let http_requests = IntCounterVec::new(
            Opts::new(
                "gateway_http_requests_total",
                "HTTP API requests, by route pattern, method and status",
            ),
            &["route", "method", "status"],
        )
        .unwrap();
        let http_seconds = HistogramVec::new(
            HistogramOpts::new(
                "gateway_http_request_seconds",
                "time to answer an HTTP API request, by route pattern",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["route"],
        )
        .unwrap();
        for collector in [
            Box::new(connections_vec.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_requests.clone()),
            Box::new(http_seconds.clone()),
            Box::new(rooms_vec.clone()),
            Box::new(frames_in_vec.clone()),
            Box::new(frames_out_vec.clone()),
            Box::new(errors_vec.clone()),
            Box::new(deliveries.clone()),
            Box::new(fanout_latency.clone()),
            Box::new(renumbered_appends.clone()),
            Box::new(outbound_drops.clone()),
            Box::new(slow_consumer_closes.clone()),
            Box::new(handshake_rejects.clone()),
            Box::new(closes.clone()),
            Box::new(outbound_queue_high_water.clone()),
            Box::new(outbound_queue_high_water_bytes.clone()),
            Box::new(support_queue_waiting.clone()),
            Box::new(queue_seconds.clone()),
            Box::new(first_reply_seconds.clone()),
            Box::new(handle_seconds.clone()),
            Box::new(analytics_events.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }

        let shard_labels: Vec<String> = (0..shards).map(|s| s.to_string()).collect();
        let mut frames_in: Vec<IntCounter> = Code::ALL
            .iter()
            .map(|c| frames_in_vec.with_label_values(&[c.as_str()]))
            .collect();
        frames_in.push(frames_in_vec.with_label_values(&["invalid"]));
        let mut frames_out: Vec<IntCounter> = Code::ALL
            .iter()
            .map(|c| frames_out_vec.with_label_values(&[c.response()]))
            .collect();
        frames_out.push(frames_out_vec.with_label_values(&["connected"]));
        frames_out.push(frames_out_vec.with_label_values(&["error"]));
        for pushed in [
            crate::cmd::note::NOTIFICATION_RESPONSE,
            crate::inbox::CONVERSATION_RESPONSE,
            crate::queue::QUEUE_RESPONSE,
            crate::analytics::DASHBOARD_RESPONSE,
        ] {
            frames_out.push(frames_out_vec.with_label_values(&[pushed]));
        }
        for reason in ["unauthorized", "forbidden_origin", "bad_request", "timeout"] {
            handshake_rejects.with_label_values(&[reason]);
        }
        let closes_by_code = CLOSE_CODES
            .iter()
            .map(|&code| (code, closes.with_label_values(&[&code.to_string()])))
            .collect();
        Metrics {
            connections: shard_labels
                .iter()
                .map(|s| connections_vec.with_label_values(&[s.as_str()]))
                .collect(),
            rooms: shard_labels
                .iter()
                .map(|s| rooms_vec.with_label_values(&[s.as_str()]))
                .collect(),
            frames_in,
            frames_out,
            errors: ErrorCode::ALL
                .iter()
                .map(|e| errors_vec.with_label_values(&[e.as_str()]))
                .collect(),
            registry,
            deliveries,
            fanout_latency,
            renumbered_appends,
            outbound_drops,
            slow_consumer_closes,
            handshake_rejects,
            closes,
            closes_by_code,
            outbound_queue_high_water,
            outbound_queue_high_water_bytes,
            support_queue_waiting,
            queue_seconds,
            first_reply_seconds,
            handle_seconds,
            analytics_written,
            analytics_dropped,
            http_requests,
            http_seconds,
        }
    }

    /// Counts one received frame (`None`: not a known code).
    pub fn frame_in(&self, code: Option<Code>) {
        self.frames_in[code.map_or(INVALID_CODE, Code::index)].inc();
    }

    /// Counts `n` queued server frames of one kind.
    pub fn frames_out(&self, code: OutCode, n: u64) {
        self.frames_out[code.index()].inc_by(n);
    }

    /// Counts one error reply.
    pub fn error(&self, code: ErrorCode) {
        self.errors[code.index()].inc();
    }

    /// The `gateway_closes_total` counter of one close code.
    pub fn close_counter(&self, code: u16) -> IntCounter {
        match self.closes_by_code.iter().find(|(c, _)| *c == code) {
            Some((_, counter)) => counter.clone(),
            // A code outside the known set: rare, so the registry look-up is affordable.
            None => self.closes.with_label_values(&[&code.to_string()]),
        }
    }

    /// Counts a server-initiated close.
    pub fn close(&self, code: u16) {
        self.close_counter(code).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding metrics into memory cannot fail");
        out
    }
}
