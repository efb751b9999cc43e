//! What every worker is made of: its place on the bus, its metrics, the ledger of effects
//! already done (so that a record read twice is sent once), a small HTTP server (`/healthz`,
//! `/metrics` and the worker's webhooks) and a graceful stop.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use integrations::events::{DeliveryState, DeliveryStatus};
use integrations::{Bus, ConsumeContext, KafkaBus, KafkaSettings, Outcome, Record, Topics};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How a worker process reaches Kafka (the standalone binaries).
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Apache Kafka brokers, `host:port,…`.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: String,

    /// Most bytes, in MiB, of records the producer holds for the brokers.
    #[arg(long, env = "WORKER_KAFKA_BUFFER_MIB", default_value_t = 16)]
    pub kafka_buffer_mib: usize,

    /// A prefix of every topic name (as the gateway's `--bus-topic-prefix`).
    #[arg(long, env = "BUS_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// Where the worker keeps its ledger of sends (a SQLite file in it).
    #[arg(long, env = "WORKER_STATE_DIR", default_value = "worker-state")]
    pub state_dir: std::path::PathBuf,
}

impl KafkaArgs {
    /// Connects the Kafka bus as `client_id`.
    pub fn connect(&self, client_id: &str) -> Result<Arc<dyn Bus>, String> {
        let bus = KafkaBus::connect(KafkaSettings {
            brokers: self.kafka_brokers.clone(),
            max_buffer_bytes: self.kafka_buffer_mib.saturating_mul(1 << 20),
            client_id: client_id.to_owned(),
            // A worker awaits each record it produces (a delivery state) before it commits
            // what caused it: no waiting for a batch to fill.
            linger_ms: 0,
        })
        .map_err(|e| format!("--kafka-brokers: {e}"))?;
        Ok(bus)
    }
}

/// What a worker shares with its tasks.
pub struct Worker {
    /// `sms`, `email`, `push`: the `worker` label of its metrics, and its consumer group's
    /// suffix.
    pub name: &'static str,
    pub bus: Arc<dyn Bus>,
    pub topics: Topics,
    pub metrics: WorkerMetrics,
    pub ledger: Ledger,
    pub stop: watch::Receiver<bool>,
}

impl Worker {
    /// The consumer group a worker of this kind reads in.
    pub fn group(&self) -> String {
        self.topics.group(&format!("{}-worker", self.name))
    }

    /// Reads `topic` in the worker's group until the stop, handling each record with `handle`
    /// and committing it after the effect.
    pub async fn consume<H, F>(&self, topic: &str, handle: H)
    where
        H: FnMut(Record) -> F,
        F: Future<Output = Outcome>,
    {
        let consumer = self.bus.subscribe(topic, &self.group());
        // Every outcome's series exists from the start: an alert on the first dead letter sees
        // it rise from 0.
        for outcome in ["handled", "dead_letter", "retried"] {
            self.metrics.records.with_label_values(&[topic, outcome]);
        }
        let context = ConsumeContext {
            bus: self.bus.clone(),
            dead_letters: self.topics.dead_letters.clone(),
            consumed: self.metrics.records.clone(),
            lag: self.metrics.consumer_lag.with_label_values(&[topic]),
            max_backoff: Duration::from_secs(30),
        };
        integrations::consume::run(context, consumer, self.stop.clone(), handle).await;
    }

    /// Tells `delivery.status` what became of an outbound message (keyed by its room).
    pub async fn tell_delivery(
        &self,
        message: MessageRef<'_>,
        status: DeliveryState,
        provider_id: Option<String>,
        error: Option<(String, String)>,
    ) {
        let (error_code, error_message) = error.unzip();
        let update = DeliveryStatus {
            v: integrations::events::VERSION,
            tenant_id: message.tenant_id.to_owned(),
            room_id: message.room_id.to_owned(),
            message_id: message.message_id.to_owned(),
            status,
            provider_id,
            error_code,
            error_message,
        };
        let topic = &self.topics.delivery_status;
        self.publish(topic, message.room_id, integrations::encode(&update))
            .await;
    }

    /// Publishes a record, waiting while the bus cannot take it.
    pub async fn publish(&self, topic: &str, key: &str, payload: Bytes) {
        integrations::consume::publish_until_taken(self.bus.as_ref(), topic, key, payload).await;
    }
}

/// Which stored message an outbound record is.
#[derive(Debug, Clone, Copy)]
pub struct MessageRef<'a> {
    pub tenant_id: &'a str,
    pub room_id: &'a str,
    pub message_id: &'a str,
}

/// A worker's metrics. In the gateway (in-process workers) they share its registry, told apart
/// by the `worker` label.
#[derive(Clone)]
pub struct WorkerMetrics {
    /// Records read, by topic and outcome (`handled`, `dead_letter`, `retried`).
    pub records: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    /// Calls to the provider (Twilio, SMTP, FCM), by outcome: `sent`, `duplicate` (found in the
    /// ledger: not sent again), `retried` (429, 5xx, unreachable), `failed` (refused for good).
    pub provider_calls: IntCounterVec,
    pub provider_seconds: Histogram,
    /// Webhook requests, by route and status.
    pub webhooks: IntCounterVec,
}

impl WorkerMetrics {
    pub fn new(worker: &str, registry: &Registry) -> Result<WorkerMetrics, prometheus::Error> {
        let labelled =
            |name: &str, help: &str| Opts::new(name, help).const_label("worker", worker.to_owned());
        let metrics = WorkerMetrics {
            records: IntCounterVec::new(
                labelled(
                    "worker_records_total",
                    "records a worker read, by topic and outcome (handled, dead_letter, retried)",
                ),
                &["topic", "outcome"],
            )?,
            consumer_lag: IntGaugeVec::new(
                labelled(
                    "worker_consumer_lag",
                    "records of a topic the worker's group has not committed",
                ),
                &["topic"],
            )?,
            provider_calls: IntCounterVec::new(
                labelled(
                    "worker_provider_calls_total",
                    "calls to the provider, by outcome (sent, duplicate, retried, failed)",
                ),
                &["outcome"],
            )?,
            provider_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "worker_provider_seconds",
                    "how long the provider took to answer a send",
                )
                .const_label("worker", worker.to_owned())
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )?,
            webhooks: IntCounterVec::new(
                labelled(
                    "worker_webhook_requests_total",
                    "webhook requests the worker answered, by route and status",
                ),
                &["route", "status"],
            )?,
        };
        registry.register(Box::new(metrics.records.clone()))?;
        registry.register(Box::new(metrics.consumer_lag.clone()))?;
        registry.register(Box::new(metrics.provider_calls.clone()))?;
        registry.register(Box::new(metrics.provider_seconds.clone()))?;
        registry.register(Box::new(metrics.webhooks.clone()))?;
        for outcome in ["sent", "duplicate", "retried", "failed"] {
            metrics.provider_calls.with_label_values(&[outcome]);
        }
        Ok(metrics)
    }
}

/// The ledger: what the worker has done, keyed by idempotency key (a message id, a provider's
/// id), in a SQLite file. A send is looked up before it is made and written right after the
/// provider took it, so a record read again is not sent again.
pub struct Ledger {
    connection: Mutex<rusqlite::Connection>,
}

impl Ledger {
    pub fn open(path: &Path) -> Result<Ledger, rusqlite::Error> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let connection = rusqlite::Connection::open(path)?;
        connection.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS ledger (
                 key TEXT PRIMARY KEY,
                 value TEXT NOT NULL,
                 at INTEGER NOT NULL
             );",
        )?;
        Ok(Ledger {
            connection: Mutex::new(connection),
        })
    }

    fn connection(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What was written under `key`, if anything.
    pub fn get(&self, key: &str) -> Result<Option<String>, rusqlite::Error> {
        use rusqlite::OptionalExtension;
        self.connection()
            .query_row("SELECT value FROM ledger WHERE key = ?1", [key], |row| {
                row.get(0)
            })
            .optional()
    }

    /// Writes `value` under `key`, replacing what was there.
    pub fn put(&self, key: &str, value: &str) -> Result<(), rusqlite::Error> {
        self.put_all(&[(key, value)])
    }

    /// Writes each `(key, value)` (replacing what was there) in one transaction: one sync to
    /// disk for all of them.
    pub fn put_all(&self, entries: &[(&str, &str)]) -> Result<(), rusqlite::Error> {
        let mut connection = self.connection();
        let transaction = connection.transaction()?;
        for (key, value) in entries {
            transaction.execute(
                "INSERT INTO ledger (key, value, at) VALUES (?1, ?2, unixepoch())
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, at = excluded.at",
                [key, value],
            )?;
        }
        transaction.commit()
    }

    /// Writes `value` under `key` unless something is there: whether it was new.
    pub fn put_new(&self, key: &str, value: &str) -> Result<bool, rusqlite::Error> {
        let inserted = self.connection().execute(
            "INSERT INTO ledger (key, value, at) VALUES (?1, ?2, unixepoch())
             ON CONFLICT (key) DO NOTHING",
            [key, value],
        )?;
        Ok(inserted == 1)
    }
}

/// How a provider answered a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// Taken, under the provider's id.
    Accepted(String),
    /// Not now (429, 5xx, unreachable): try again, after `after` when the provider said.
    Later {
        after: Option<Duration>,
        reason: String,
    },
    /// Refused for good, with the provider's error code.
    Refused { code: String, message: String },
}

/// `Retry-After`, in seconds or as an HTTP date, capped at `cap`.
pub fn retry_after(headers: &reqwest::header::HeaderMap, cap: Duration) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let wait = match value.trim().parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = time::OffsetDateTime::parse(
                value.trim(),
                &time::format_description::well_known::Rfc2822,
            )
            .ok()?;
            let now = time::OffsetDateTime::now_utc();
            Duration::try_from(at - now).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(cap))
}

/// The outcome of a provider's "not now": wait as it asked (or back off) and try again.
pub fn later(after: Option<Duration>, reason: String) -> Outcome {
    match after {
        Some(after) => Outcome::RetryAfter(after, reason),
        None => Outcome::Retry(reason),
    }
}

/// An HTTP client for providers: rustls with the ring provider, bounded timeouts.
pub fn http_client() -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// Makes ring the process's TLS provider (once; a provider already installed stays).
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A request a webhook handles: its body is read whole (bounded) first.
pub struct WebRequest {
    pub method: Method,
    /// The path and query, as received.
    pub uri: hyper::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub peer: SocketAddr,
}

/// The answer to a webhook request.
pub type WebResponse = Response<Full<Bytes>>;

/// A future of a webhook handler.
pub type WebFuture = Pin<Box<dyn Future<Output = WebResponse> + Send>>;

/// A worker's webhooks: `route` names the request's route (for the metrics) and answers it,
/// or says it has no such route (404).
pub trait Webhooks: Send + Sync + 'static {
    fn route(&self, request: WebRequest) -> Option<(&'static str, WebFuture)>;
}

/// A worker with no webhooks.
pub struct NoWebhooks;

impl Webhooks for NoWebhooks {
    fn route(&self, _: WebRequest) -> Option<(&'static str, WebFuture)> {
        None
    }
}

/// A response with a body and its content type.
pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> WebResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A JSON error body, `{"error": {"code", "message"}}`, as the gateway's API answers.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> WebResponse {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    respond(status, "application/json", body.to_string())
}

/// Connections a worker's HTTP server holds at once; one more is closed as it is accepted.
pub const MAX_CONNECTIONS: usize = 512;

/// Serves `/healthz`, `/metrics` and `webhooks` on `listener` until `stop` turns true.
/// Bounded: a request body past `max_body_bytes` is refused with 413; the bodies being read or
/// handled hold at most 8 × `max_body_bytes` together (each reserves its declared length, or
/// the limit when it declares none), past which a request is answered 503 with `Retry-After`;
/// and at most [`MAX_CONNECTIONS`] connections are open.
pub async fn serve(
    listener: TcpListener,
    webhooks: Arc<dyn Webhooks>,
    registry: Registry,
    metrics: WorkerMetrics,
    max_body_bytes: usize,
    mut stop: watch::Receiver<bool>,
) {
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let body_budget = Arc::new(tokio::sync::Semaphore::new(
        (max_body_bytes.saturating_mul(8)).div_ceil(1024).max(1),
    ));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a webhook connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(connection_permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many webhook connections: one closed");
            continue;
        };
        let (webhooks, registry, metrics) = (webhooks.clone(), registry.clone(), metrics.clone());
        let budget = body_budget.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let (webhooks, registry, metrics) =
                (webhooks.clone(), registry.clone(), metrics.clone());
            let budget = budget.clone();
            async move {
                let limits = (max_body_bytes, budget);
                Ok::<_, Infallible>(
                    answer(request, peer, webhooks, registry, metrics, limits).await,
                )
            }
        });
        tokio::spawn(async move {
            let _held = connection_permit;
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, service);
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a webhook connection ended");
            }
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    peer: SocketAddr,
    webhooks: Arc<dyn Webhooks>,
    registry: Registry,
    metrics: WorkerMetrics,
    (max_body_bytes, body_budget): (usize, Arc<tokio::sync::Semaphore>),
) -> WebResponse {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => {
            return respond(StatusCode::OK, "application/json", r#"{"status":"ok"}"#)
        }
        (&Method::GET, "/metrics") => {
            let mut out = Vec::new();
            let encoded = prometheus::Encoder::encode(
                &prometheus::TextEncoder::new(),
                &registry.gather(),
                &mut out,
            );
            return match encoded {
                Ok(()) => respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    out,
                ),
                Err(e) => error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "INTERNAL",
                    &e.to_string(),
                ),
            };
        }
        _ => {}
    }
    let declared = request
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let reserve = declared.unwrap_or(max_body_bytes).min(max_body_bytes);
    let kib = u32::try_from(reserve.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    // Held until the request is answered.
    let Ok(_reserved) = body_budget.try_acquire_many_owned(kib) else {
        let mut response = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "too many request bodies at once: try again",
        );
        response
            .headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, max_body_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return if too_large {
                error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "TOO_LARGE",
                    &format!("the body is over {max_body_bytes} bytes"),
                )
            } else {
                error_response(
                    StatusCode::BAD_REQUEST,
                    "BAD_REQUEST",
                    "the body could not be read",
                )
            };
        }
    };
    let request = WebRequest {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
        peer,
    };
    match webhooks.route(request) {
        Some((route, handler)) => {
            let response = handler.await;
            metrics
                .webhooks
                .with_label_values(&[route, response.status().as_str()])
                .inc();
            response
        }
        None => error_response(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route"),
    }
}

/// A watch that turns true at SIGTERM or Ctrl-C: the worker stops taking records, finishes
/// the one under way, commits it and exits.
pub fn stop_on_signal() -> watch::Receiver<bool> {
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate => {}
        }
        tracing::info!("stopping");
        let _ = stop_tx.send(true);
    });
    stop
}

/// Runs a worker as its own process over Kafka: logging, the bus, the ledger
/// (`{state_dir}/{name}.sqlite`), the stop on SIGTERM, the HTTP listener on `listen`; `body`
/// runs the worker (serving the listener) until the stop; then the producer is flushed.
pub async fn run_standalone<F, Fut>(
    name: &'static str,
    kafka: &KafkaArgs,
    listen: SocketAddr,
    body: F,
) -> Result<(), String>
where
    F: FnOnce(Arc<Worker>, TcpListener, Registry) -> Fut,
    Fut: Future<Output = ()>,
{
    init_logging();
    install_crypto();
    let bus = kafka.connect(&format!("{name}-worker"))?;
    let registry = Registry::new();
    let metrics = WorkerMetrics::new(name, &registry).map_err(|e| e.to_string())?;
    let ledger_path = kafka.state_dir.join(format!("{name}.sqlite"));
    let ledger = Ledger::open(&ledger_path)
        .map_err(|e| format!("the ledger {}: {e}", ledger_path.display()))?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("listening on {listen}: {e}"))?;
    tracing::info!(addr = %listen, brokers = kafka.kafka_brokers, "{name}-worker started");
    let worker = Arc::new(Worker {
        name,
        bus: bus.clone(),
        topics: Topics::with_prefix(&kafka.topic_prefix),
        metrics,
        ledger,
        stop: stop_on_signal(),
    });
    body(worker, listener, registry).await;
    bus.flush(Duration::from_secs(10));
    tracing::info!("{name}-worker stopped");
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn server(max_body_bytes: usize) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let registry = Registry::new();
        let metrics = WorkerMetrics::new("test", &registry).unwrap();
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(serve(
            listener,
            Arc::new(NoWebhooks),
            registry,
            metrics,
            max_body_bytes,
            stop,
        ));
        (addr, stop_tx)
    }

    /// Opens a request that declares a body and never sends it.
    async fn stalled(addr: SocketAddr, length: usize) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!("POST /hook HTTP/1.1\r\nHost: w\r\nContent-Length: {length}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        stream
    }

    #[tokio::test]
    async fn bodies_in_flight_are_bounded_together_and_the_next_one_waits_its_turn() {
        let (addr, _stop) = server(1024).await;
        // 8 × 1 KiB: the whole budget, held by requests whose bodies never come.
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(stalled(addr, 1024).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut next = stalled(addr, 10).await;
        let mut answer = vec![0; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), next.read(&mut answer))
            .await
            .unwrap()
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1"),
            "{answer}"
        );
        assert!(answer.contains(r#""code":"UNAVAILABLE""#), "{answer}");
        // One gives up: there is room again (the next request reads its body, then is a 404).
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /hook HTTP/1.1\r\nHost: w\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    }

    #[tokio::test]
    async fn connections_past_the_bound_are_closed_as_they_are_accepted() {
        let (addr, _stop) = server(1024).await;
        let mut open = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            open.push(TcpStream::connect(addr).await.unwrap());
        }
        // The server has taken them all before the next one.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut byte = [0; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut byte))
            .await
            .expect("closed at once, not left waiting");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // One of the first is still served.
        let mut first = open.pop().unwrap();
        first
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        first.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
