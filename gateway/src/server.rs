//! The HTTP front: one port for `GET /ws` (upgrade), `/healthz`, `/readyz`, `/metrics`, the
//! room API and the optional conformance echo route; the accept loop that spreads connections
//! over the shards; start-up and graceful shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use storage::{AnyStore, MeteredStore, Store, TimeoutStore};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Notify};

use crate::auth::{token_from_request, Claims, Verifier};
use crate::config::Config;
use crate::connection::{self, Mode};
use crate::limits::TenantBudgets;
use crate::liveness::{self, LiveConn};
use crate::metrics::Metrics;
use crate::outbox::OutboxMetrics;
use crate::presence::PresenceRegistry;
use crate::shard::{self, ConnId, ShardCommand, ShardHandle};

/// State shared by the accept loop, the shards and every connection.
/// Most presence broadcasts in flight across the process.
const PRESENCE_TASKS: usize = 4096;

pub struct Shared {
    pub config: Config,
    /// Every call has a deadline (`--store-timeout-ms`): a wedged disk fails requests instead
    /// of parking them, and the shards' queues, forever.
    pub store: TimeoutStore<MeteredStore<AnyStore>>,
    pub metrics: Arc<Metrics>,
    /// The counters every connection's outbox shares.
    pub outbox_metrics: Arc<OutboxMetrics>,
    pub presence: PresenceRegistry,
    /// Connections following their tenant's inbox.
    pub inbox: crate::inbox::InboxSubscribers,
    /// Each tenant's conversations waiting for an agent.
    pub queue: crate::queue::SupportQueues,
    /// Where `track_activity` and `page_view` events go.
    pub analytics: crate::analytics::AnalyticsSink,
    /// Each tenant's live counters and their subscribers.
    pub dashboards: crate::analytics::Dashboards,
    /// How fast each tenant's joins may create rooms.
    pub room_creations: TenantBudgets,
    /// How fast each client address may open widget sessions.
    pub widget_sessions: TenantBudgets,
    /// The integration bus and the events waiting for it.
    pub integration: crate::integration::Integration,
    /// Uploads in flight, in KiB: every upload holds its size (its declared length, or the
    /// largest a file may be) while it arrives.
    pub upload_budget: crate::http::files::UploadBudget,
    /// Where uploaded files' bytes are kept.
    pub files: Box<dyn crate::http::files::FileStore>,
    /// Permits for presence broadcasts (each a task collecting members from the shards): at
    /// most `PRESENCE_TASKS` run at once.
    pub presence_tasks: Arc<tokio::sync::Semaphore>,
    pub shards: Vec<ShardHandle>,
    pub verifier: Verifier,
    next_conn: AtomicU64,
    ready: AtomicBool,
    /// Set when shutdown begins: connections hand no new request to a shard from then on.
    requests_stopped: AtomicBool,
    shutdown: watch::Sender<bool>,
    active: AtomicUsize,
    idle: Notify,
}

/// Decrements the live-connection count when a connection ends.
pub struct ConnectionGuard {
    shared: Arc<Shared>,
    shard: usize,
    id: ConnId,
}

impl ConnectionGuard {
    /// The shard whose thread runs the connection.
    pub fn shard(&self) -> usize {
        self.shard
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.shared.shards[self.shard].live.remove(self.id);
        if self.shared.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}

impl Shared {
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a connection running on `shard`'s thread with that shard's sweep (heartbeat,
    /// expiry, shutdown) and the count graceful shutdown waits on, until the guard drops.
    pub fn track_connection(
        self: &Arc<Self>,
        shard: usize,
        id: ConnId,
        conn: LiveConn,
    ) -> ConnectionGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        let outbox = conn.outbox.clone();
        self.shards[shard].live.insert(id, conn);
        // The sweep closes what is registered when shutdown starts; this closes what
        // registers after.
        if *self.shutdown.borrow() {
            liveness::close(&self.metrics, &outbox, 1001, "server shutting down");
        }
        ConnectionGuard {
            shared: self.clone(),
            shard,
            id,
        }
    }

    /// Whether shutdown has begun: a connection then handles no further request it read (see
    /// [`Gateway::shutdown`]).
    pub fn requests_stopped(&self) -> bool {
        self.requests_stopped.load(Ordering::SeqCst)
    }

    /// Stops connections from handing new requests to the shards, and waits until those being
    /// handed over now are queued. A connection counts a request in its shard's `dispatching`
    /// before it checks the flag and until the request is queued, so once the flag is set and
    /// the counts are zero, every request a connection took is in a shard's queue.
    async fn stop_requests(&self) {
        self.requests_stopped.store(true, Ordering::SeqCst);
        while self
            .shards
            .iter()
            .any(|shard| shard.dispatching.load(Ordering::SeqCst) > 0)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Fires when the server starts shutting down (at once for a receiver taken after that,
    /// so a connection that starts late does not miss it).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        let mut receiver = self.shutdown.subscribe();
        if *receiver.borrow() {
            receiver.mark_changed();
        }
        receiver
    }

    /// Live WebSocket connections.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    stop_accept: oneshot::Sender<()>,
    accept_task: tokio::task::JoinHandle<()>,
    shard_threads: Vec<std::thread::JoinHandle<()>>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store: {0}")]
    Store(#[from] storage::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Gateway {
    /// Opens the store, starts the shards and serves on `listener`.
    pub async fn start(
        config: Config,
        verifier: Verifier,
        listener: TcpListener,
    ) -> Result<Gateway, StartError> {
        let shard_count = config.shard_count();
        let metrics = Arc::new(Metrics::new(shard_count));
        let options = storage::Options {
            scan_rows: config.search_scan_rows,
            scan_time: Duration::from_millis(config.search_time_ms),
            ..config.store_credentials.options()
        };
        let url = config.store_url();
        let store = tokio::task::spawn_blocking(move || storage::open_with(&url, &options))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        let store_metrics = storage::metered::StoreMetrics::new();
        for collector in store
            .collectors()
            .into_iter()
            .chain(store_metrics.collectors())
        {
            metrics.register(collector);
        }
        let store = TimeoutStore::new(
            MeteredStore::new(store, store_metrics),
            Duration::from_millis(config.store_timeout_ms),
        );

        let mut shards = Vec::with_capacity(shard_count);
        let mut shard_threads = Vec::with_capacity(shard_count);
        let mut shared_senders = Vec::with_capacity(shard_count);
        for index in 0..shard_count {
            let (tx, rx) = oneshot::channel();
            let (handle, thread) = shard::spawn(index, config.shard_queue, rx)?;
            shards.push(handle);
            shard_threads.push(thread);
            shared_senders.push(tx);
        }
        let (shutdown, _) = watch::channel(false);
        let outbox_metrics = Arc::new(OutboxMetrics {
            drops: metrics.outbound_drops.clone(),
            slow_consumer_closes: metrics.slow_consumer_closes.clone(),
            closes_1013: metrics.close_counter(1013),
            high_water: metrics.outbound_queue_high_water.clone(),
            high_water_bytes: metrics.outbound_queue_high_water_bytes.clone(),
        });
        let room_creations = TenantBudgets::per_minute(config.rooms_per_tenant_minute);
        let analytics = crate::analytics::AnalyticsSink::start(
            crate::analytics::SinkConfig {
                dir: config.analytics_dir(),
                tenant_rate: config.analytics_rate,
                max_day_bytes: config.analytics_max_day_mib.saturating_mul(1 << 20),
                retention_days: config.analytics_retention_days,
            },
            metrics.analytics_written.clone(),
            metrics.analytics_dropped.clone(),
        )?;
        let widget_sessions = TenantBudgets::per_minute(config.widget_sessions_per_ip_minute);
        let upload_budget =
            crate::http::files::UploadBudget::new(config.uploads_in_flight_mib as usize * 1024);
        let files =
            crate::http::files::file_store(config.files_url.as_deref(), config.files_dir())?;
        let bus: Arc<dyn integrations::Bus> = match &config.kafka_brokers {
            Some(brokers) => integrations::KafkaBus::connect(integrations::KafkaSettings {
                brokers: brokers.clone(),
                max_buffer_bytes: config.kafka_buffer_mib.saturating_mul(1 << 20),
                client_id: "gateway".into(),
                linger_ms: 5,
            })
            .map_err(|e| std::io::Error::other(format!("--kafka-brokers: {e}")))?,
            // It holds what its readers have not committed, up to this per topic.
            None => integrations::InProcessBus::new(64 << 20),
        };
        let integration = crate::integration::Integration::new(
            bus,
            integrations::Topics::with_prefix(&config.bus_topic_prefix),
            config.bus_buffer_mib.saturating_mul(1 << 20),
            shard_count,
            &metrics,
        );
        let shared = Arc::new(Shared {
            config,
            store,
            metrics,
            outbox_metrics,
            presence: PresenceRegistry::default(),
            inbox: Default::default(),
            queue: Default::default(),
            analytics,
            dashboards: Default::default(),
            room_creations,
            widget_sessions,
            upload_budget,
            files,
            integration,
            presence_tasks: Arc::new(tokio::sync::Semaphore::new(PRESENCE_TASKS)),
            shards,
            verifier,
            next_conn: AtomicU64::new(1),
            ready: AtomicBool::new(false),
            requests_stopped: AtomicBool::new(false),
            shutdown,
            active: AtomicUsize::new(0),
            idle: Notify::new(),
        });
        for tx in shared_senders {
            let _ = tx.send(shared.clone());
        }
        let local_addr = listener.local_addr()?;
        let (stop_accept, stop_rx) = oneshot::channel();
        shared.ready.store(true, Ordering::Release);
        let accept_task = tokio::spawn(accept_loop(shared.clone(), listener, stop_rx));
        tokio::spawn(crate::inbox::run_wake_ups(shared.clone()));
        crate::integration::start(&shared);
        crate::worker_tasks::start(&shared).await?;
        tokio::spawn(crate::queue::run_restore(shared.clone()));
        tokio::spawn(crate::queue::run_ticker(shared.clone()));
        tokio::spawn(crate::analytics::run_dashboards(shared.clone()));
        tracing::info!(
            addr = %local_addr,
            shards = shard_count,
            store = %shared.config.store_url(),
            "gateway listening"
        );
        Ok(Gateway {
            shared,
            local_addr,
            stop_accept,
            accept_task,
            shard_threads,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Graceful shutdown: stop accepting, stop handling what connections send, let the shards
    /// finish the chat commits of every request already handled (so their replies are queued),
    /// close every connection with 1001 after what is queued to it, stop the shards, flush the
    /// store.
    pub async fn shutdown(self) -> Result<(), storage::Error> {
        let shared = self.shared;
        shared.ready.store(false, Ordering::Release);
        let _ = self.stop_accept.send(());
        let _ = self.accept_task.await;
        let commits = async {
            shared.stop_requests().await;
            let mut waits = Vec::with_capacity(shared.shards.len());
            for shard in &shared.shards {
                let (tx, rx) = oneshot::channel();
                if shard.commands.send(ShardCommand::Drain(tx)).await.is_ok() {
                    waits.push(rx);
                }
            }
            futures_util::future::join_all(waits).await;
        };
        if tokio::time::timeout(Duration::from_secs(10), commits)
            .await
            .is_err()
        {
            tracing::warn!("chat commits still under way after 10s, closing connections anyway");
        }
        let _ = shared.shutdown.send(true);
        let drained = async {
            loop {
                let idle = shared.idle.notified();
                if shared.active_connections() == 0 {
                    break;
                }
                idle.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), drained)
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = shared.active_connections(),
                "connections still open after 10s, closing them hard"
            );
        }
        for shard in &shared.shards {
            let _ = shard.commands.send(ShardCommand::Shutdown).await;
        }
        let threads = self.shard_threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
        shared.store.close().await?;
        tracing::info!("gateway stopped");
        Ok(())
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, mut stop: oneshot::Receiver<()>) {
    let mut next_shard = 0usize;
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shard_index = next_shard % shared.shards.len();
        next_shard = next_shard.wrapping_add(1);
        // Move the socket to the shard's own reactor: left registered with this runtime's, every
        // readiness event of the connection would pass through this thread and then wake the
        // shard's thread.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "could not detach an accepted socket");
                continue;
            }
        };
        let runtime = shared.shards[shard_index].runtime.clone();
        let shared = shared.clone();
        runtime.spawn(async move {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => serve_http(shared, stream, shard_index).await,
                Err(e) => tracing::warn!(error = %e, "could not register an accepted socket"),
            }
        });
    }
}

async fn serve_http(shared: Arc<Shared>, stream: tokio::net::TcpStream, shard_index: usize) {
    // Unknown only for a socket that already went away; the API's per-address limits then
    // count it under the unspecified address.
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let handshake_timeout = Duration::from_millis(shared.config.handshake_timeout_ms);
    let service_shared = shared.clone();
    let service = service_fn(move |req| {
        let shared = service_shared.clone();
        async move { Ok::<_, std::convert::Infallible>(route(shared, req, shard_index, peer).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let mut shutdown = shared.shutdown_signal();
    tokio::select! {
        result = &mut connection => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        }
        _ = shutdown.changed() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
        }
    }
}

pub(crate) type Body = Full<Bytes>;

pub(crate) fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("serializing a response cannot fail");
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// An error answer in the API's shape (`{"error": {"code", "message"}}`).
pub(crate) fn api_error(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
) -> Response<Body> {
    crate::http::ApiError::new(status, code, message).response()
}

async fn route(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    shard_index: usize,
    peer: SocketAddr,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ws") => websocket(shared, req, shard_index),
        (&Method::GET, "/conformance/echo") if shared.config.conformance_echo => {
            upgrade(shared, req, Mode::Echo, shard_index)
        }
        (&Method::GET, "/healthz") => {
            json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
        }
        (&Method::GET, "/readyz") => {
            if shared.ready.load(Ordering::Acquire) {
                // The bus being down does not stop chat: it is detail, not unreadiness.
                let integration = &shared.integration;
                let bus = serde_json::json!({
                    "kind": if shared.config.kafka_brokers.is_some() { "kafka" } else { "in-process" },
                    "status": if integration.healthy() { "ok" } else { "unavailable" },
                    "buffered_bytes": integration.buffered_bytes(),
                });
                json_response(
                    StatusCode::OK,
                    &serde_json::json!({"status": "ready", "bus": bus}),
                )
            } else {
                api_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    "starting or shutting down",
                )
            }
        }
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(Full::new(Bytes::from(shared.metrics.render())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (_, "/ws" | "/healthz" | "/readyz" | "/metrics") => api_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "method not allowed",
        ),
        _ => match crate::http::route(shared, req, peer).await {
            Some(response) => response,
            None => api_error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route"),
        },
    }
}

/// Verifies the request's token; on failure the `401` response to send.
pub(crate) fn authenticate(
    shared: &Shared,
    req: &Request<Incoming>,
) -> Result<Claims, Box<Response<Body>>> {
    let reject = |message: String| {
        shared
            .metrics
            .handshake_rejects
            .with_label_values(&["unauthorized"])
            .inc();
        Box::new(api_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message))
    };
    let token = token_from_request(req).ok_or_else(|| reject("missing bearer token".into()))?;
    shared
        .verifier
        .verify(&token)
        .map_err(|e| reject(e.to_string()))
}

fn websocket(shared: Arc<Shared>, req: Request<Incoming>, shard_index: usize) -> Response<Body> {
    let allowed = &shared.config.allowed_origin;
    if !allowed.is_empty() {
        let origin = req
            .headers()
            .get(hyper::header::ORIGIN)
            .and_then(|o| o.to_str().ok());
        if !origin.is_some_and(|o| allowed.iter().any(|a| a == o)) {
            shared
                .metrics
                .handshake_rejects
                .with_label_values(&["forbidden_origin"])
                .inc();
            return api_error(StatusCode::FORBIDDEN, "FORBIDDEN", "origin not allowed");
        }
    }
    let claims = match authenticate(&shared, &req) {
        Ok(claims) => claims,
        Err(response) => return *response,
    };
    upgrade(shared, req, Mode::Protocol(Arc::new(claims)), shard_index)
}

fn upgrade(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    mode: Mode,
    shard_index: usize,
) -> Response<Body> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        shared
            .metrics
            .handshake_rejects
            .with_label_values(&["BAD_REQUEST"])
            .inc();
        return api_error(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "expected a websocket upgrade",
        );
    }
    // While shutdown drains the commits under way (not ready, connections not yet told to
    // close) no new socket is admitted either, so /readyz and the upgrade agree.
    if *shared.shutdown.borrow() || !shared.ready.load(Ordering::Acquire) {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "server is shutting down",
        );
    }
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            shared
                .metrics
                .handshake_rejects
                .with_label_values(&["BAD_REQUEST"])
                .inc();
            return api_error(StatusCode::BAD_REQUEST, "BAD_REQUEST", e.to_string());
        }
    };
    let handshake_timeout = Duration::from_millis(shared.config.handshake_timeout_ms);
    tokio::spawn(async move {
        let upgraded = match tokio::time::timeout(handshake_timeout, upgrade).await {
            Ok(Ok(ws)) => ws.into_inner().into_inner(),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "websocket upgrade failed");
                return;
            }
            Err(_) => {
                shared
                    .metrics
                    .handshake_rejects
                    .with_label_values(&["timeout"])
                    .inc();
                return;
            }
        };
        // A task of its own, sized for the connection alone: continuing in this one would keep
        // room for the handshake's futures for the life of the connection.
        if let Some(connection) = connection::run(shared, upgraded, mode, shard_index) {
            tokio::spawn(connection);
        }
    });
    response.map(|_| Full::new(Bytes::new()))
}
