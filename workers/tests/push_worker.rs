//! The push worker against a stand-in for Google (`support/fcm.rs`): an OAuth2 token endpoint
//! that verifies the service account's signed assertion with its public key, and an FCM HTTP v1
//! `messages:send` that checks the access token and the message's shape and answers, per device
//! token, as FCM does (200, 404 UNREGISTERED, 429 QUOTA_EXCEEDED with Retry-After, 503
//! UNAVAILABLE, 400 INVALID_ARGUMENT). The worker reads an in-process bus.

#[path = "support/fcm.rs"]
mod fcm;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fcm::StandIn;
use integrations::bus::Consumer;
use integrations::events::{DeadLetter, DeviceTokenGone, PushNotification, PushReason};
use integrations::{Bus, InProcessBus, Topics};
use serde_json::json;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use workers::push::{self, PushConfig};
use workers::runtime::{Ledger, Worker, WorkerMetrics};

const GROUP: &str = "push-worker";

/// A push worker running on a task, as the gateway runs it.
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    metrics: WorkerMetrics,
    http: SocketAddr,
}

/// The bus, the stand-in, the credentials and the ledger's folder; the test's own readers of
/// `device.tokens` and `dead.letters`, subscribed before anything is published (the in-process
/// bus keeps nothing for a topic no group reads).
struct Harness {
    bus: Arc<InProcessBus>,
    fcm: Arc<StandIn>,
    dir: TempDir,
    credentials: std::path::PathBuf,
    device_tokens: Box<dyn Consumer>,
    dead_letters: Box<dyn Consumer>,
    running: Option<Running>,
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (fcm, credentials) = fcm::start_with_account(dir.path()).await;
        let bus = InProcessBus::new(1 << 20);
        let topics = Topics::default();
        // The worker's group exists before anything is published, as it would on Kafka.
        drop(bus.subscribe(&topics.notifications_push, GROUP));
        let device_tokens = bus.subscribe(&topics.device_tokens, "test");
        let dead_letters = bus.subscribe(&topics.dead_letters, "test");
        let mut harness = Harness {
            bus,
            fcm,
            dir,
            credentials,
            device_tokens,
            dead_letters,
            running: None,
        };
        harness.start_worker().await;
        harness
    }

    /// Starts a worker on the harness's ledger (one that stopped left its sends there).
    async fn start_worker(&mut self) {
        let registry = prometheus::Registry::new();
        let metrics = WorkerMetrics::new("push", &registry).unwrap();
        let (stop, stopped) = watch::channel(false);
        let worker = Arc::new(Worker {
            name: "push",
            bus: self.bus.clone(),
            topics: Topics::default(),
            metrics: metrics.clone(),
            ledger: Ledger::open(&self.dir.path().join("push.sqlite")).unwrap(),
            stop: stopped,
        });
        let config = PushConfig {
            fcm_credentials: Some(self.credentials.clone()),
            fcm_base_url: self.fcm.base_url(),
            push_listen: "127.0.0.1:0".parse().unwrap(),
        };
        let listener = TcpListener::bind(config.push_listen).await.unwrap();
        let http = listener.local_addr().unwrap();
        let task = tokio::spawn(push::run(worker, config, listener, registry));
        self.running = Some(Running {
            stop,
            task,
            metrics,
            http,
        });
    }

    /// Stops the worker and waits for it to end.
    async fn stop_worker(&mut self) {
        let running = self.running.take().expect("a worker is running");
        running.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), running.task)
            .await
            .expect("the worker stops")
            .unwrap();
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("a worker is running")
    }

    /// The worker's provider calls with `outcome`.
    fn calls(&self, outcome: &str) -> u64 {
        self.running()
            .metrics
            .provider_calls
            .with_label_values(&[outcome])
            .get()
    }

    async fn publish(&self, notification: &PushNotification) {
        self.publish_raw(&notification.user_id, integrations::encode(notification))
            .await;
    }

    async fn publish_raw(&self, key: &str, payload: impl Into<Bytes>) {
        let topic = Topics::default().notifications_push;
        self.bus.publish(&topic, key, payload.into()).await.unwrap();
    }

    /// Waits until the worker has committed every notification published so far.
    async fn drained(&self) {
        let topic = Topics::default().notifications_push;
        eventually("the worker commits every notification", || {
            self.bus.lag(&topic, GROUP) == 0
        })
        .await;
    }
}

fn notification(message_id: &str, device_tokens: &[&str]) -> PushNotification {
    PushNotification {
        v: 1,
        tenant_id: "tenant-1".into(),
        user_id: "user-1".into(),
        room_id: "room-1".into(),
        message_id: message_id.into(),
        reason: PushReason::Message,
        title: "Grace Hopper".into(),
        body: "Is the invoice sent?".into(),
        device_tokens: device_tokens.iter().map(|t| t.to_string()).collect(),
    }
}

async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn next_payload<T: serde::de::DeserializeOwned>(
    consumer: &mut Box<dyn Consumer>,
    what: &str,
) -> T {
    let record = tokio::time::timeout(Duration::from_secs(15), consumer.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("the bus is open");
    consumer.commit(&record);
    serde_json::from_slice(&record.payload).unwrap()
}

#[tokio::test]
async fn a_notification_is_sent_with_one_access_token_for_many_sends() {
    let mut harness = Harness::start().await;
    let fcm = harness.fcm.clone();
    harness.publish(&notification("m-1", &["tok-ok"])).await;
    harness.publish(&notification("m-none", &[])).await;
    harness.publish(&notification("m-2", &["tok-ok"])).await;
    harness.drained().await;

    let attempts = fcm.attempts("tok-ok");
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(
        attempts[0].body,
        json!({"message": {
            "token": "tok-ok",
            "notification": {"title": "Grace Hopper", "body": "Is the invoice sent?"},
            "data": {
                "room_id": "room-1",
                "message_id": "m-1",
                "tenant_id": "tenant-1",
                "reason": "message",
            },
        }})
    );
    assert_eq!(attempts[1].message_id, "m-2");
    {
        let seen = fcm.seen();
        assert_eq!(seen.token_requests, 1, "the access token is cached");
        assert!(seen.refused.is_empty(), "{:?}", seen.refused);
        assert_eq!(
            seen.attempts.len(),
            2,
            "a notification without tokens makes no call"
        );
    }
    assert_eq!(harness.calls("sent"), 2);
    harness.stop_worker().await;
}

#[tokio::test]
async fn healthz_and_metrics_are_served() {
    let mut harness = Harness::start().await;
    harness.publish(&notification("m-1", &["tok-ok"])).await;
    harness.publish(&notification("m-2", &["tok-ok"])).await;
    harness.drained().await;

    let http = workers::runtime::http_client();
    let base = format!("http://{}", harness.running().http);
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"worker_provider_calls_total{outcome="sent",worker="push"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("worker_provider_seconds_count"),
        "{metrics}"
    );
    harness.stop_worker().await;
}

#[tokio::test]
async fn an_unregistered_token_is_reported_gone_and_the_other_devices_still_get_it() {
    let mut harness = Harness::start().await;
    harness
        .publish(&notification("m-1", &["tok-gone", "tok-ok"]))
        .await;
    let gone: DeviceTokenGone =
        next_payload(&mut harness.device_tokens, "a device.tokens record").await;
    assert_eq!(
        gone,
        DeviceTokenGone {
            v: 1,
            tenant_id: "tenant-1".into(),
            user_id: "user-1".into(),
            token: "tok-gone".into(),
            reason: "UNREGISTERED".into(),
        }
    );
    harness.drained().await;
    assert_eq!(harness.fcm.sent("tok-ok", "m-1"), 1);
    assert_eq!(harness.calls("failed"), 1);
    assert_eq!(harness.calls("sent"), 1);
    harness.stop_worker().await;
}

#[tokio::test]
async fn quota_exceeded_is_retried_after_retry_after_without_resending_the_others() {
    let mut harness = Harness::start().await;
    harness
        .publish(&notification("m-1", &["tok-ok", "tok-busy"]))
        .await;
    harness.drained().await;

    let busy = harness.fcm.attempts("tok-busy");
    assert_eq!(
        busy.iter().map(|a| a.status).collect::<Vec<_>>(),
        [429, 200],
        "{busy:?}"
    );
    let waited = busy[1].at - busy[0].at;
    assert!(waited >= Duration::from_secs(1), "resent after {waited:?}");
    assert_eq!(
        harness.fcm.attempts("tok-ok").len(),
        1,
        "the ledger kept tok-ok's send"
    );
    assert_eq!(harness.calls("retried"), 1);
    assert_eq!(harness.calls("duplicate"), 1);
    assert_eq!(harness.calls("sent"), 2);
    harness.stop_worker().await;
}

#[tokio::test]
async fn unavailable_is_retried_with_backoff() {
    let mut harness = Harness::start().await;
    harness.publish(&notification("m-1", &["tok-500"])).await;
    harness.drained().await;
    let attempts = harness.fcm.attempts("tok-500");
    assert_eq!(
        attempts.iter().map(|a| a.status).collect::<Vec<_>>(),
        [503, 200]
    );
    assert_eq!(harness.calls("retried"), 1);
    harness.stop_worker().await;
}

#[tokio::test]
async fn invalid_argument_is_dead_lettered_and_consumption_goes_on() {
    let mut harness = Harness::start().await;
    let invalid = notification("m-1", &["tok-invalid", "tok-ok"]);
    harness.publish(&invalid).await;
    harness.publish(&notification("m-2", &["tok-ok"])).await;
    let letter: DeadLetter = next_payload(&mut harness.dead_letters, "a dead letter").await;
    assert_eq!(letter.topic, "notifications.push");
    assert!(
        letter.reason.contains("INVALID_ARGUMENT"),
        "{}",
        letter.reason
    );
    assert_eq!(
        serde_json::from_str::<PushNotification>(&letter.payload).unwrap(),
        invalid
    );
    harness.drained().await;
    assert_eq!(
        harness.fcm.sent("tok-ok", "m-1"),
        1,
        "the other device still got it"
    );
    assert_eq!(harness.fcm.sent("tok-ok", "m-2"), 1);
    harness.stop_worker().await;
}

#[tokio::test]
async fn a_poison_payload_is_dead_lettered_and_the_next_is_sent() {
    let mut harness = Harness::start().await;
    harness.publish_raw("user-1", "not json {").await;
    harness.publish(&notification("m-1", &["tok-ok"])).await;
    let letter: DeadLetter = next_payload(&mut harness.dead_letters, "a dead letter").await;
    assert_eq!(letter.payload, "not json {");
    assert!(letter.reason.contains("not JSON"), "{}", letter.reason);
    harness.drained().await;
    assert_eq!(harness.fcm.sent("tok-ok", "m-1"), 1);
    assert!(harness.fcm.seen().refused.is_empty());
    harness.stop_worker().await;
}

#[tokio::test]
async fn a_redelivered_notification_is_not_sent_again() {
    let mut harness = Harness::start().await;
    let once = notification("m-1", &["tok-ok", "tok-gone"]);
    harness.publish(&once).await;
    harness.drained().await;
    let _: DeviceTokenGone =
        next_payload(&mut harness.device_tokens, "a device.tokens record").await;

    // Read again by the same worker, and by a new worker on the same ledger (as after a crash
    // before the commit).
    harness.publish(&once).await;
    harness.drained().await;
    assert_eq!(harness.calls("duplicate"), 2);
    harness.stop_worker().await;
    harness.start_worker().await;
    harness.publish(&once).await;
    harness.drained().await;

    assert_eq!(harness.fcm.attempts("tok-ok").len(), 1);
    assert_eq!(harness.fcm.attempts("tok-gone").len(), 1);
    assert_eq!(harness.calls("duplicate"), 2);
    assert_eq!(harness.calls("sent"), 0);
    harness.stop_worker().await;
}

#[tokio::test]
async fn a_refused_access_token_is_replaced_and_the_send_made_once_more() {
    let mut harness = Harness::start().await;
    harness.publish(&notification("m-1", &["tok-ok"])).await;
    harness.drained().await;
    harness.fcm.revoke_all();
    harness.publish(&notification("m-2", &["tok-ok"])).await;
    harness.drained().await;

    assert_eq!(harness.fcm.sent("tok-ok", "m-2"), 1);
    {
        let seen = harness.fcm.seen();
        assert_eq!(seen.token_requests, 2, "one new access token after the 401");
        assert_eq!(seen.refused.len(), 1, "{:?}", seen.refused);
        assert_eq!(seen.refused[0].0, 401);
    }
    assert_eq!(harness.calls("retried"), 0);
    harness.stop_worker().await;
}
