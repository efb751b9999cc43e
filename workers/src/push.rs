//! The push worker: it reads `notifications.push` and sends each of the user's devices a
//! notification through Firebase Cloud Messaging (HTTP v1).
//!
//! # Layout
//!
//! - [`PushConfig`]: the flags (`--fcm-credentials`, `--fcm-base-url`, `--push-listen`).
//! - [`ServiceAccount`]: the Google service-account JSON the worker signs in with.
//! - `AccessTokens`: OAuth2 for a service account. A JWT signed RS256 with the account's key is
//!   traded at the account's `token_uri` for an access token, kept until shortly before it
//!   expires.
//! - `Fcm`: one `messages:send` call, its answer read as [`Sent`] (FCM's `errorCode`s).
//! - `Pusher`: a notification's effect, one send per device token, each recorded in the
//!   ledger so that a notification read again (a redelivery, a retry after a 429) sends
//!   nothing twice.
//! - [`run`]: `/healthz` and `/metrics`, and the consuming loop until the stop.
//!
//! What FCM says of a token decides what comes next: `UNREGISTERED` publishes a
//! [`DeviceTokenGone`] on `device.tokens` (the gateway forgets the token) and goes on with the
//! next token; `QUOTA_EXCEEDED`, `UNAVAILABLE` and `INTERNAL` try the notification again later,
//! honouring `Retry-After`; `INVALID_ARGUMENT` sends the notification to the dead letters.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use integrations::events::{self, DeviceTokenGone, PushNotification, PushReason};
use integrations::{Outcome, Record};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prometheus::Registry;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::runtime::{self, NoWebhooks, Sent, Worker};

/// The OAuth2 scope of FCM's HTTP v1 API.
const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// How long the signed assertion is valid (Google accepts at most an hour).
const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

/// An access token is replaced this long before it expires, so that one taken from the cache
/// does not expire on its way to FCM.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(60);

/// The longest `Retry-After` honoured: a longer one is most likely a mistake, and the wait
/// holds back every user's notifications behind it.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(300);

/// The worker's HTTP server has no webhooks: no request body is worth more than this.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// The push worker's flags. Their names are unique among the workers' so that the gateway can
/// flatten them beside the others' (the workers run inside it on the in-process bus).
#[derive(Debug, Clone, clap::Args)]
pub struct PushConfig {
    /// The Google service-account JSON (Firebase console → Project settings → Service
    /// accounts) the worker signs in to FCM with. The push worker runs only when it is set.
    #[arg(long, env = "FCM_CREDENTIALS", value_name = "FILE")]
    pub fcm_credentials: Option<PathBuf>,

    /// FCM's base URL: sends go to `{base}/v1/projects/{project_id}/messages:send`.
    #[arg(
        long,
        env = "FCM_BASE_URL",
        value_name = "URL",
        default_value = "https://fcm.googleapis.com"
    )]
    pub fcm_base_url: String,

    /// Where the push worker serves `/healthz` and `/metrics`.
    #[arg(
        long,
        env = "PUSH_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:8083"
    )]
    pub push_listen: SocketAddr,
}

/// A Google service account, as its JSON key file has it (the fields the worker uses; the
/// file has more).
#[derive(Clone, Deserialize)]
pub struct ServiceAccount {
    /// `service_account` (the file format also holds other kinds of credentials).
    #[serde(rename = "type")]
    pub kind: String,
    /// The Firebase project notifications are sent in.
    pub project_id: String,
    /// The id of `private_key`: the `kid` of the signed assertion.
    pub private_key_id: String,
    /// The account's RSA private key, PEM.
    pub private_key: String,
    /// The account: the issuer and subject of the signed assertion.
    pub client_email: String,
    /// Where the assertion is traded for an access token.
    #[serde(default = "google_token_uri")]
    pub token_uri: String,
}

fn google_token_uri() -> String {
    "https://oauth2.googleapis.com/token".to_owned()
}

// By hand: the private key stays out of logs.
impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("kind", &self.kind)
            .field("project_id", &self.project_id)
            .field("private_key_id", &self.private_key_id)
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

/// Why the service-account file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a service-account JSON: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} holds credentials of type {kind:?}, not a service account")]
    NotServiceAccount { path: PathBuf, kind: String },
    #[error("the private key of {path} is not an RSA key in PEM: {source}")]
    Key {
        path: PathBuf,
        source: jsonwebtoken::errors::Error,
    },
}

impl ServiceAccount {
    /// Reads a service-account JSON file and checks that its key can sign.
    pub fn load(path: &Path) -> Result<ServiceAccount, CredentialsError> {
        ServiceAccount::load_with_key(path).map(|(account, _)| account)
    }

    /// Reads a service-account JSON file: the account and its signing key.
    fn load_with_key(path: &Path) -> Result<(ServiceAccount, EncodingKey), CredentialsError> {
        let text = std::fs::read(path).map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let account: ServiceAccount =
            serde_json::from_slice(&text).map_err(|source| CredentialsError::Parse {
                path: path.to_owned(),
                source,
            })?;
        if account.kind != "service_account" {
            return Err(CredentialsError::NotServiceAccount {
                path: path.to_owned(),
                kind: account.kind,
            });
        }
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes()).map_err(|source| {
            CredentialsError::Key {
                path: path.to_owned(),
                source,
            }
        })?;
        Ok((account, key))
    }
}

/// The claims of the assertion traded for an access token (Google's "OAuth 2.0 for server to
/// server applications").
#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// The token endpoint's answer.
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
    #[serde(default)]
    token_type: Option<String>,
}

/// A "not now" from FCM or from the token endpoint.
struct Later {
    after: Option<Duration>,
    reason: String,
}

impl From<Later> for Sent {
    fn from(later: Later) -> Sent {
        Sent::Later {
            after: later.after,
            reason: later.reason,
        }
    }
}

/// The service account's access tokens: one at a time, cached until shortly before it
/// expires.
struct AccessTokens {
    http: reqwest::Client,
    account: ServiceAccount,
    key: EncodingKey,
    /// The token and when to stop using it. A tokio mutex, held while a new token is fetched,
    /// so that concurrent sends wait for one fetch rather than each making their own.
    cached: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl AccessTokens {
    /// The cached token, or a new one.
    async fn get(&self) -> Result<String, Later> {
        let mut cached = self.cached.lock().await;
        if let Some((token, until)) = cached.as_ref() {
            if Instant::now() < *until {
                return Ok(token.clone());
            }
        }
        let (token, lifetime) = self.fetch().await?;
        let until = Instant::now() + lifetime.saturating_sub(TOKEN_EXPIRY_MARGIN);
        *cached = Some((token.clone(), until));
        Ok(token)
    }

    /// Drops `token` from the cache (FCM no longer takes it), unless it was replaced already.
    async fn forget(&self, token: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|(held, _)| held == token) {
            *cached = None;
        }
    }

    fn assertion(&self) -> Result<String, jsonwebtoken::errors::Error> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let account = &self.account;
        let claims = AssertionClaims {
            iss: &account.client_email,
            sub: &account.client_email,
            scope: FCM_SCOPE,
            aud: &account.token_uri,
            iat: now,
            exp: now + ASSERTION_LIFETIME.as_secs(),
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(account.private_key_id.clone());
        jsonwebtoken::encode(&header, &claims, &self.key)
    }

    /// Trades a new assertion for an access token: the token and how long it lives.
    async fn fetch(&self) -> Result<(String, Duration), Later> {
        // Every failure here is "not now": the notification waits (and the consumer's lag
        // grows) until the credentials work again, rather than being dropped.
        let assertion = self.assertion().map_err(|e| Later {
            after: None,
            reason: format!("signing the token assertion: {e}"),
        })?;
        let response = self
            .http
            .post(&self.account.token_uri)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(|e| Later {
                after: None,
                reason: format!("the token endpoint is unreachable: {e}"),
            })?;
        let status = response.status();
        let after = runtime::retry_after(response.headers(), RETRY_AFTER_CAP);
        let body = response.bytes().await.map_err(|e| Later {
            after: None,
            reason: format!("reading the token endpoint's answer: {e}"),
        })?;
        if !status.is_success() {
            let reason = format!(
                "the token endpoint answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(512)])
            );
            if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS {
                tracing::error!(reason, "the service account cannot sign in to fcm");
            }
            return Err(Later { after, reason });
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| Later {
            after: None,
            reason: format!("the token endpoint's answer is not a token: {e}"),
        })?;
        if let Some(kind) = answer.token_type.as_deref() {
            if !kind.eq_ignore_ascii_case("bearer") {
                return Err(Later {
                    after: None,
                    reason: format!("the token endpoint gave a {kind:?} token, not a bearer one"),
                });
            }
        }
        Ok((answer.access_token, Duration::from_secs(answer.expires_in)))
    }
}

/// FCM's answer to one send, before a 401 is acted upon.
enum Answer {
    /// The access token was refused: a new one may do.
    Unauthenticated(String),
    Sent(Sent),
}

/// An FCM HTTP v1 client for one project.
struct Fcm {
    http: reqwest::Client,
    /// `{base}/v1/projects/{project_id}/messages:send`.
    send_url: String,
    tokens: AccessTokens,
    metrics: runtime::WorkerMetrics,
}

impl Fcm {
    fn new(
        account: ServiceAccount,
        key: EncodingKey,
        base_url: &str,
        metrics: runtime::WorkerMetrics,
    ) -> Fcm {
        let http = runtime::http_client();
        let send_url = format!(
            "{}/v1/projects/{}/messages:send",
            base_url.trim_end_matches('/'),
            account.project_id
        );
        Fcm {
            send_url,
            tokens: AccessTokens {
                http: http.clone(),
                account,
                key,
                cached: tokio::sync::Mutex::new(None),
            },
            http,
            metrics,
        }
    }

    /// Sends `message` (the body of `messages:send`). A 401 drops the cached access token and
    /// the send is made once more with a new one.
    async fn send(&self, message: &serde_json::Value) -> Sent {
        let mut refreshed = false;
        loop {
            let access_token = match self.tokens.get().await {
                Ok(token) => token,
                Err(later) => return later.into(),
            };
            match self.post(&access_token, message).await {
                Answer::Sent(sent) => return sent,
                Answer::Unauthenticated(reason) if !refreshed => {
                    tracing::info!(reason, "fcm refused the access token; fetching a new one");
                    self.tokens.forget(&access_token).await;
                    refreshed = true;
                }
                Answer::Unauthenticated(reason) => {
                    return Sent::Later {
                        after: None,
                        reason: format!("fcm refused a new access token too: {reason}"),
                    }
                }
            }
        }
    }

    async fn post(&self, access_token: &str, message: &serde_json::Value) -> Answer {
        let started = std::time::Instant::now();
        let answer = async {
            let response = self
                .http
                .post(&self.send_url)
                .bearer_auth(access_token)
                .json(message)
                .send()
                .await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body))
        }
        .await;
        self.metrics
            .provider_seconds
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Ok((status, headers, body)) => classify(status, &headers, &body),
            Err(e) => Answer::Sent(Sent::Later {
                after: None,
                reason: format!("fcm is unreachable: {e}"),
            }),
        }
    }
}

/// FCM v1's error body: `{"error": {"code", "message", "status", "details": [...]}}`.
#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorDetail,
}

#[derive(Deserialize, Default)]
struct ErrorDetail {
    #[serde(default)]
    message: String,
    /// The gRPC status (`NOT_FOUND`, `INVALID_ARGUMENT`, …).
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<serde_json::Value>,
}

impl ErrorDetail {
    /// FCM's own error code (`UNREGISTERED`, `QUOTA_EXCEEDED`, …), from the `FcmError` detail.
    fn fcm_error_code(&self) -> Option<&str> {
        self.details.iter().find_map(|detail| {
            let kind = detail.get("@type")?.as_str()?;
            if kind != "type.googleapis.com/google.firebase.fcm.v1.FcmError" {
                return None;
            }
            detail.get("errorCode")?.as_str()
        })
    }
}

/// Reads FCM's answer to a send.
fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Answer {
    if status.is_success() {
        #[derive(Deserialize)]
        struct Accepted {
            name: String,
        }
        // FCM took it: a body that does not name the message changes nothing.
        let name = serde_json::from_slice::<Accepted>(body)
            .map(|accepted| accepted.name)
            .unwrap_or_else(|_| "sent".to_owned());
        return Answer::Sent(Sent::Accepted(name));
    }
    let error = serde_json::from_slice::<ErrorBody>(body)
        .unwrap_or_default()
        .error;
    // The FcmError code says most; the gRPC status and then the HTTP status stand in when it
    // is missing (a proxy's answer, an error before FCM proper).
    let code = match (error.fcm_error_code(), error.status.as_str()) {
        (Some(code), _) => code.to_owned(),
        (None, status) if !status.is_empty() => status.to_owned(),
        (None, _) => match status {
            StatusCode::BAD_REQUEST => "INVALID_ARGUMENT",
            StatusCode::UNAUTHORIZED => "UNAUTHENTICATED",
            StatusCode::FORBIDDEN => "SENDER_ID_MISMATCH",
            StatusCode::NOT_FOUND => "UNREGISTERED",
            StatusCode::TOO_MANY_REQUESTS => "QUOTA_EXCEEDED",
            StatusCode::SERVICE_UNAVAILABLE => "UNAVAILABLE",
            _ => "INTERNAL",
        }
        .to_owned(),
    };
    let message = if error.message.is_empty() {
        format!("fcm answered {status}")
    } else {
        error.message
    };
    let retryable = matches!(code.as_str(), "QUOTA_EXCEEDED" | "UNAVAILABLE" | "INTERNAL")
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error();
    if retryable {
        return Answer::Sent(Sent::Later {
            after: runtime::retry_after(headers, RETRY_AFTER_CAP),
            reason: format!("fcm {code} ({status}): {message}"),
        });
    }
    // A 401 of FCM's own THIRD_PARTY_AUTH_ERROR is about the app's APNs or web-push
    // credentials, which no new access token fixes.
    if status == StatusCode::UNAUTHORIZED && code != "THIRD_PARTY_AUTH_ERROR" {
        return Answer::Unauthenticated(format!("{code}: {message}"));
    }
    Answer::Sent(Sent::Refused { code, message })
}

/// The body of `messages:send` for one device.
fn fcm_message(notification: &PushNotification, device_token: &str) -> serde_json::Value {
    let reason = match notification.reason {
        PushReason::Mention => "mention",
        PushReason::Message => "message",
    };
    serde_json::json!({
        "message": {
            "token": device_token,
            "notification": {
                "title": notification.title,
                "body": notification.body,
            },
            // FCM's data values are strings only.
            "data": {
                "room_id": notification.room_id,
                "message_id": notification.message_id,
                "tenant_id": notification.tenant_id,
                "reason": reason,
            },
        }
    })
}

/// The ledger key of a notification's send to one device.
fn ledger_key(notification: &PushNotification, device_token: &str) -> String {
    format!(
        "push:sent:{}:{}:{}",
        notification.message_id, notification.user_id, device_token
    )
}

/// Applies `notifications.push` records.
struct Pusher {
    worker: Arc<Worker>,
    fcm: Fcm,
}

impl Pusher {
    async fn handle(&self, record: Record) -> Outcome {
        let notification: PushNotification = match events::decode(&record.payload) {
            Ok(notification) => notification,
            Err(rejected) => return Outcome::Dead(rejected.to_string()),
        };
        let calls = &self.worker.metrics.provider_calls;
        let mut invalid = Vec::new();
        for device_token in &notification.device_tokens {
            let key = ledger_key(&notification, device_token);
            match self.worker.ledger.get(&key) {
                Ok(Some(_)) => {
                    calls.with_label_values(&["duplicate"]).inc();
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Outcome::Retry(format!("reading the ledger: {e}")),
            }
            match self
                .fcm
                .send(&fcm_message(&notification, device_token))
                .await
            {
                Sent::Accepted(name) => {
                    calls.with_label_values(&["sent"]).inc();
                    tracing::debug!(
                        user_id = notification.user_id,
                        message_id = notification.message_id,
                        name,
                        "push sent"
                    );
                    self.record(&key, &name);
                }
                Sent::Later { after, reason } => {
                    // The devices done so far are in the ledger: the retry skips them.
                    calls.with_label_values(&["retried"]).inc();
                    return runtime::later(after, reason);
                }
                Sent::Refused { code, message } => {
                    calls.with_label_values(&["failed"]).inc();
                    tracing::warn!(
                        user_id = notification.user_id,
                        message_id = notification.message_id,
                        code,
                        message,
                        "fcm refused a push"
                    );
                    match code.as_str() {
                        "UNREGISTERED" => self.forget(&notification, device_token, &code).await,
                        // The request is wrong, not the device: the notification is dead-lettered,
                        // after its other devices had theirs.
                        "INVALID_ARGUMENT" => {
                            invalid.push(message);
                            continue;
                        }
                        _ => {}
                    }
                    // Refused for good: a retry of the notification does not ask again.
                    self.record(&key, &format!("refused:{code}"));
                }
            }
        }
        if invalid.is_empty() {
            Outcome::Handled
        } else {
            Outcome::Dead(format!(
                "fcm refused the push as INVALID_ARGUMENT: {}",
                invalid.join("; ")
            ))
        }
    }

    /// Writes the ledger after a send: a failure here is logged, not retried, since retrying
    /// the notification would send it again.
    fn record(&self, key: &str, value: &str) {
        if let Err(e) = self.worker.ledger.put(key, value) {
            tracing::error!(key, error = %e, "writing the ledger after a push");
        }
    }

    /// Tells the gateway that FCM no longer knows a device token.
    async fn forget(&self, notification: &PushNotification, device_token: &str, reason: &str) {
        let gone = DeviceTokenGone {
            v: events::VERSION,
            tenant_id: notification.tenant_id.clone(),
            user_id: notification.user_id.clone(),
            token: device_token.to_owned(),
            reason: reason.to_owned(),
        };
        self.worker
            .publish(
                &self.worker.topics.device_tokens,
                &notification.user_id,
                events::encode(&gone),
            )
            .await;
    }
}

/// Runs the push worker until `worker.stop`: `/healthz` and `/metrics` on `listener`, and
/// `notifications.push` read in the worker's group. Credentials that cannot be read are logged
/// and the worker does not start.
pub async fn run(
    worker: Arc<Worker>,
    config: PushConfig,
    listener: TcpListener,
    registry: Registry,
) {
    let Some(path) = config.fcm_credentials.as_deref() else {
        tracing::error!("the push worker has no --fcm-credentials; not starting");
        return;
    };
    let (account, key) = match ServiceAccount::load_with_key(path) {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::error!(error = %e, "the push worker cannot start");
            return;
        }
    };
    tracing::info!(
        project_id = account.project_id,
        client_email = account.client_email,
        base_url = config.fcm_base_url,
        "push worker running"
    );
    let pusher = Pusher {
        fcm: Fcm::new(account, key, &config.fcm_base_url, worker.metrics.clone()),
        worker: worker.clone(),
    };
    let server = runtime::serve(
        listener,
        Arc::new(NoWebhooks),
        registry,
        worker.metrics.clone(),
        MAX_BODY_BYTES,
        worker.stop.clone(),
    );
    let topic = worker.topics.notifications_push.clone();
    let consume = worker.consume(&topic, |record| pusher.handle(record));
    tokio::join!(server, consume);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_body(code: u16, status: &str, fcm_code: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"error": {
            "code": code,
            "message": "scripted",
            "status": status,
            "details": [{
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": fcm_code,
            }],
        }}))
        .unwrap()
    }

    fn sent(answer: Answer) -> Sent {
        match answer {
            Answer::Sent(sent) => sent,
            Answer::Unauthenticated(reason) => panic!("unauthenticated: {reason}"),
        }
    }

    #[test]
    fn fcm_errors_are_read_from_the_fcm_error_detail() {
        let none = HeaderMap::new();
        let ok = classify(
            StatusCode::OK,
            &none,
            br#"{"name":"projects/p/messages/1"}"#,
        );
        assert_eq!(sent(ok), Sent::Accepted("projects/p/messages/1".into()));

        let gone = classify(
            StatusCode::NOT_FOUND,
            &none,
            &error_body(404, "NOT_FOUND", "UNREGISTERED"),
        );
        assert!(matches!(sent(gone), Sent::Refused { code, .. } if code == "UNREGISTERED"));

        let mut headers = HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        let busy = classify(
            StatusCode::TOO_MANY_REQUESTS,
            &headers,
            &error_body(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
        );
        assert!(matches!(
            sent(busy),
            Sent::Later { after: Some(after), .. } if after == Duration::from_secs(7)
        ));

        let down = classify(StatusCode::BAD_GATEWAY, &none, b"<html>bad gateway</html>");
        assert!(matches!(sent(down), Sent::Later { after: None, .. }));

        let invalid = classify(
            StatusCode::BAD_REQUEST,
            &none,
            &error_body(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        );
        assert!(matches!(sent(invalid), Sent::Refused { code, .. } if code == "INVALID_ARGUMENT"));

        let mismatch = classify(
            StatusCode::FORBIDDEN,
            &none,
            &error_body(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"),
        );
        assert!(
            matches!(sent(mismatch), Sent::Refused { code, .. } if code == "SENDER_ID_MISMATCH")
        );
    }

    #[test]
    fn only_a_refused_access_token_asks_for_a_new_one() {
        let none = HeaderMap::new();
        let body = br#"{"error":{"code":401,"message":"bad token","status":"UNAUTHENTICATED"}}"#;
        assert!(matches!(
            classify(StatusCode::UNAUTHORIZED, &none, body),
            Answer::Unauthenticated(_)
        ));
        let apns = error_body(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR");
        assert!(matches!(
            sent(classify(StatusCode::UNAUTHORIZED, &none, &apns)),
            Sent::Refused { code, .. } if code == "THIRD_PARTY_AUTH_ERROR"
        ));
    }

    #[test]
    fn the_message_carries_the_notification_and_string_data() {
        let notification = PushNotification {
            v: 1,
            tenant_id: "t1".into(),
            user_id: "u1".into(),
            room_id: "r1".into(),
            message_id: "m1".into(),
            reason: PushReason::Mention,
            title: "Ada mentioned you".into(),
            body: "in #billing".into(),
            device_tokens: vec!["d1".into()],
        };
        let message = fcm_message(&notification, "d1");
        assert_eq!(
            message,
            serde_json::json!({"message": {
                "token": "d1",
                "notification": {"title": "Ada mentioned you", "body": "in #billing"},
                "data": {"room_id": "r1", "message_id": "m1", "tenant_id": "t1", "reason": "mention"},
            }})
        );
        assert_eq!(ledger_key(&notification, "d1"), "push:sent:m1:u1:d1");
    }
}
