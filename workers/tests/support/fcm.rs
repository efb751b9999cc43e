//! A stand-in for Google, for the push worker's tests: an OAuth2 token endpoint that verifies
//! the service account's signed assertion with its public key, and an FCM HTTP v1
//! `messages:send` that checks the access token and the message's shape and answers, per device
//! token, as FCM does (200; `tok-gone`: 404 UNREGISTERED; `tok-busy`: 429 QUOTA_EXCEEDED with
//! Retry-After once; `tok-500`: 503 UNAVAILABLE once; `tok-invalid`: 400 INVALID_ARGUMENT).
//! The service account's RSA keys are made by `openssl`.
//!
//! Shared by `workers/tests/push_worker.rs` and `gateway/tests/kafka_workers.rs` (included with
//! `#[path]`): it uses only crates both packages have.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;

pub const PROJECT: &str = "chat-test";
pub const CLIENT_EMAIL: &str = "push@chat-test.iam.gserviceaccount.com";
pub const KEY_ID: &str = "3f1c0ffee";
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// An RSA key pair made by `openssl`, PEM: the service account's private key and the public
/// key the stand-in verifies its assertions with.
pub fn generate_keys(dir: &Path) -> (String, Vec<u8>) {
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
pub struct Attempt {
    pub token: String,
    pub message_id: String,
    pub body: Value,
    pub status: u16,
    pub at: Instant,
}

#[derive(Default)]
pub struct Seen {
    pub token_requests: usize,
    /// Access tokens issued, and those no longer taken.
    pub issued: Vec<String>,
    pub revoked: HashSet<String>,
    pub attempts: Vec<Attempt>,
    /// Requests refused before a device token's script: bad auth, bad shape.
    pub refused: Vec<(u16, String)>,
}

/// The stand-in for Google's token endpoint and FCM.
pub struct StandIn {
    pub addr: SocketAddr,
    public_key: Vec<u8>,
    seen: Mutex<Seen>,
}

impl StandIn {
    pub async fn start(public_key: Vec<u8>) -> Arc<StandIn> {
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

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn token_uri(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }

    /// The attempts to send to `token`.
    pub fn attempts(&self, token: &str) -> Vec<Attempt> {
        let seen = self.seen();
        seen.attempts
            .iter()
            .filter(|a| a.token == token)
            .cloned()
            .collect()
    }

    /// The sends FCM took for `token` in the notification `message_id`.
    pub fn sent(&self, token: &str, message_id: &str) -> usize {
        self.attempts(token)
            .iter()
            .filter(|a| a.message_id == message_id && a.status == 200)
            .count()
    }

    /// Access tokens issued so far stop working (as when Google revokes or expires them).
    pub fn revoke_all(&self) {
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
pub fn well_formed(body: &Value) -> bool {
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

pub fn json_response(
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
pub fn fcm_error(
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

/// A service account whose key the stand-in knows: the RSA keys (made in `dir`), the stand-in
/// started with the public one, and the account's JSON file (`dir/service-account.json`,
/// `token_uri` at the stand-in) to give the worker.
pub async fn start_with_account(dir: &Path) -> (Arc<StandIn>, PathBuf) {
    let (private_key, public_key) = generate_keys(dir);
    let fcm = StandIn::start(public_key).await;
    let credentials = dir.join("service-account.json");
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
    (fcm, credentials)
}

impl StandIn {
    /// Every attempt so far, in order.
    pub fn all_attempts(&self) -> Vec<Attempt> {
        self.seen().attempts.clone()
    }

    /// Waits until `n` attempts were answered, for up to `within`.
    pub async fn wait_attempts(&self, n: usize, within: Duration) -> Vec<Attempt> {
        let deadline = Instant::now() + within;
        loop {
            let attempts = self.all_attempts();
            if attempts.len() >= n {
                return attempts;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} sends reached FCM within {within:?}: {attempts:#?}",
                attempts.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
