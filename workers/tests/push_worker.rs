//! The push worker against a stand-in for Google: an OAuth2 token endpoint that verifies the
//! service account's signed assertion with its public key, and an FCM HTTP v1 `messages:send`
//! that checks the access token and the message's shape and answers, per device token, as
//! FCM does (200, 404 UNREGISTERED, 429 QUOTA_EXCEEDED with Retry-After, 503 UNAVAILABLE,
//! 400 INVALID_ARGUMENT). The worker reads an in-process bus.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use integrations::bus::Consumer;
use integrations::events::{DeadLetter, DeviceTokenGone, PushNotification, PushReason};
use integrations::{Bus, InProcessBus, Topics};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use workers::push::{self, PushConfig};
use workers::runtime::{Ledger, Worker, WorkerMetrics};

const PROJECT: &str = "chat-test";
const CLIENT_EMAIL: &str = "push@chat-test.iam.gserviceaccount.com";
const KEY_ID: &str = "3f1c0ffee";
const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GROUP: &str = "push-worker";

/// An RSA key pair made by `openssl`, PEM: the service account's private key and the public
/// key the stand-in verifies its assertions with.
fn generate_keys(dir: &Path) -> (String, Vec<u8>) {
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    let run = |command: &mut Command| {
        let output = command
            .output()
            .expect("running openssl (is it installed?)");
        assert!(
            output.status.success(),
            "openssl failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private));
    run(Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public));
    (
        std::fs::read_to_string(private).unwrap(),
        std::fs::read(public).unwrap(),
    )
}

/// One `messages:send` the stand-in answered, past its auth and shape checks.
#[derive(Debug, Clone)]
struct Attempt {
    token: String,
    message_id: String,
    body: Value,
    status: u16,
    at: Instant,
}

#[derive(Default)]
struct Seen {
    token_requests: usize,
    /// Access tokens issued, and those no longer taken.
    issued: Vec<String>,
    revoked: HashSet<String>,
    attempts: Vec<Attempt>,
    /// Requests refused before a device token's script: bad auth, bad shape.
    refused: Vec<(u16, String)>,
}

/// The stand-in for Google's token endpoint and FCM.
struct StandIn {
    addr: SocketAddr,
    public_key: Vec<u8>,
    seen: Mutex<Seen>,
}

impl StandIn {
    async fn start(public_key: Vec<u8>) -> Arc<StandIn> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stand_in = Arc::new(StandIn {
            addr: listener.local_addr().unwrap(),
            public_key,
            seen: Mutex::new(Seen::default()),
        });
        let serving = stand_in.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let stand_in = serving.clone();
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let stand_in = stand_in.clone();
                    async move { Ok::<_, Infallible>(stand_in.answer(request).await) }
                });
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        stand_in
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn token_uri(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }

    /// The attempts to send to `token`.
    fn attempts(&self, token: &str) -> Vec<Attempt> {
        let seen = self.seen();
        seen.attempts
            .iter()
            .filter(|a| a.token == token)
            .cloned()
            .collect()
    }

    /// The sends FCM took for `token` in the notification `message_id`.
    fn sent(&self, token: &str, message_id: &str) -> usize {
        self.attempts(token)
            .iter()
            .filter(|a| a.message_id == message_id && a.status == 200)
            .count()
    }

    /// Access tokens issued so far stop working (as when Google revokes or expires them).
    fn revoke_all(&self) {
        let mut seen = self.seen();
        let issued = seen.issued.clone();
        seen.revoked.extend(issued);
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let content_type = parts
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let path = parts.uri.path();
        if parts.method != hyper::Method::POST {
            return json_response(StatusCode::METHOD_NOT_ALLOWED, json!({}), None);
        }
        if path == "/token" {
            return self.token(&content_type, &body);
        }
        if path == format!("/v1/projects/{PROJECT}/messages:send") {
            let authorization = parts
                .headers
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            return self.send(authorization, &content_type, &body);
        }
        json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "no such route"}),
            None,
        )
    }

    /// Google's token endpoint for the JWT bearer grant (RFC 7523).
    fn token(&self, content_type: &str, body: &[u8]) -> Response<Full<Bytes>> {
        self.seen().token_requests += 1;
        let refuse = |description: String| {
            json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_grant", "error_description": description}),
                None,
            )
        };
        if !content_type.starts_with("application/x-www-form-urlencoded") {
            return refuse(format!("content type {content_type:?}"));
        }
        let form = reqwest::Url::parse(&format!("http://form/?{}", String::from_utf8_lossy(body)))
            .unwrap();
        let field = |name: &str| {
            form.query_pairs()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.into_owned())
                .unwrap_or_default()
        };
        if field("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
            return refuse(format!("grant_type {:?}", field("grant_type")));
        }
        match self.verify_assertion(&field("assertion")) {
            Ok(()) => {}
            Err(why) => return refuse(why),
        }
        let mut seen = self.seen();
        let access_token = format!("ya29.stand-in-{}", seen.issued.len() + 1);
        seen.issued.push(access_token.clone());
        json_response(
            StatusCode::OK,
            json!({"access_token": access_token, "expires_in": 3599, "token_type": "Bearer"}),
            None,
        )
    }

    fn verify_assertion(&self, assertion: &str) -> Result<(), String> {
        #[derive(Deserialize)]
        struct Claims {
            iss: String,
            sub: String,
            scope: String,
            aud: String,
            iat: u64,
            exp: u64,
        }
        let header = jsonwebtoken::decode_header(assertion).map_err(|e| e.to_string())?;
        if header.alg != Algorithm::RS256 || header.kid.as_deref() != Some(KEY_ID) {
            return Err(format!("header {header:?}"));
        }
        let key = DecodingKey::from_rsa_pem(&self.public_key).unwrap();
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[self.token_uri()]);
        validation.set_issuer(&[CLIENT_EMAIL]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "sub", "aud"]);
        let claims = jsonwebtoken::decode::<Claims>(assertion, &key, &validation)
            .map_err(|e| format!("the assertion: {e}"))?
            .claims;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let well_formed = claims.iss == CLIENT_EMAIL
            && claims.sub == CLIENT_EMAIL
            && claims.scope == FCM_SCOPE
            && claims.aud == self.token_uri()
            && claims.iat.abs_diff(now) <= 60
            && claims.exp == claims.iat + 3600;
        if !well_formed {
            return Err("the assertion's claims".into());
        }
        Ok(())
    }

    /// FCM HTTP v1 `messages:send`.
    fn send(&self, authorization: &str, content_type: &str, body: &[u8]) -> Response<Full<Bytes>> {
        let mut seen = self.seen();
        let access_token = authorization.strip_prefix("Bearer ").unwrap_or("");
        if !seen.issued.iter().any(|t| t == access_token) || seen.revoked.contains(access_token) {
            seen.refused.push((401, authorization.to_owned()));
            return json_response(
                StatusCode::UNAUTHORIZED,
                json!({"error": {
                    "code": 401,
                    "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
                    "status": "UNAUTHENTICATED",
                }}),
                None,
            );
        }
        let message = serde_json::from_slice::<Value>(body)
            .ok()
            .filter(|_| content_type.starts_with("application/json"))
            .and_then(|body| well_formed(&body).then_some(body));
        let Some(body) = message else {
            seen.refused
                .push((400, String::from_utf8_lossy(body).into_owned()));
            return fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", None);
        };
        let token = body["message"]["token"].as_str().unwrap().to_owned();
        let earlier = seen.attempts.iter().filter(|a| a.token == token).count();
        let response = match (token.as_str(), earlier) {
            ("tok-gone", _) => fcm_error(404, "NOT_FOUND", "UNREGISTERED", None),
            ("tok-busy", 0) => fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", Some("1")),
            ("tok-500", 0) => fcm_error(503, "UNAVAILABLE", "UNAVAILABLE", None),
            ("tok-invalid", _) => fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", None),
            _ => json_response(
                StatusCode::OK,
                json!({"name": format!("projects/{PROJECT}/messages/{}", seen.attempts.len() + 1)}),
                None,
            ),
        };
        seen.attempts.push(Attempt {
            token,
            message_id: body["message"]["data"]["message_id"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            body,
            status: response.status().as_u16(),
            at: Instant::now(),
        });
        response
    }
}

/// Whether a `messages:send` body has the shape FCM requires of a notification to a device.
fn well_formed(body: &Value) -> bool {
    let Some(request) = body.as_object() else {
        return false;
    };
    let message = &body["message"];
    let strings = |value: &Value| {
        value
            .as_object()
            .is_some_and(|fields| fields.values().all(Value::is_string))
    };
    request
        .keys()
        .all(|key| key == "message" || key == "validate_only")
        && message["token"].as_str().is_some_and(|t| !t.is_empty())
        && message["notification"]["title"].is_string()
        && message["notification"]["body"].is_string()
        && (message.get("data").is_none() || strings(&message["data"]))
}

fn json_response(
    status: StatusCode,
    body: Value,
    retry_after: Option<&str>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        "application/json; charset=UTF-8".parse().unwrap(),
    );
    if let Some(seconds) = retry_after {
        headers.insert(hyper::header::RETRY_AFTER, seconds.parse().unwrap());
    }
    response
}

/// An error as FCM HTTP v1 answers it.
fn fcm_error(
    code: u16,
    status: &str,
    fcm_code: &str,
    retry_after: Option<&str>,
) -> Response<Full<Bytes>> {
    let message = match fcm_code {
        "UNREGISTERED" => "Requested entity was not found.",
        "QUOTA_EXCEEDED" => "Quota exceeded for quota metric 'Send requests'.",
        "UNAVAILABLE" => "The service is currently unavailable.",
        _ => "The registration token is not a valid FCM registration token",
    };
    json_response(
        StatusCode::from_u16(code).unwrap(),
        json!({"error": {
            "code": code,
            "message": message,
            "status": status,
            "details": [{
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": fcm_code,
            }],
        }}),
        retry_after,
    )
}

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
        let (private_key, public_key) = generate_keys(dir.path());
        let fcm = StandIn::start(public_key).await;
        let credentials = dir.path().join("service-account.json");
        let account = json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": KEY_ID,
            "private_key": private_key,
            "client_email": CLIENT_EMAIL,
            "client_id": "1234567890",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": fcm.token_uri(),
        });
        std::fs::write(&credentials, account.to_string()).unwrap();
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
