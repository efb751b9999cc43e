//! A local stand-in for Twilio's Messages API that holds the SMS worker to the real request
//! format: the account's path, basic auth, a form body with `To`/`From`/`Body`, E.164 (or
//! `whatsapp:`) addresses on one channel; Twilio's JSON errors (401 20003, 400 21211/21604,
//! 429 with `Retry-After`, 503) when a test scripts them; and an `Idempotency-Key` honoured, so
//! a resend after a crash creates nothing twice.
#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use serde_json::json;

pub const ACCOUNT_SID: &str = "AC00000000000000000000000000000001";
pub const AUTH_TOKEN: &str = "twilio-test-auth-token";

/// A message the stand-in created.
#[derive(Debug, Clone, PartialEq)]
pub struct SentSms {
    pub sid: String,
    pub to: String,
    pub from: String,
    pub body: String,
    pub status_callback: Option<String>,
}

/// An answer a test scripts for the next request.
#[derive(Debug, Clone)]
pub enum Scripted {
    /// 429, Twilio's 20429, with `Retry-After`.
    TooManyRequests { retry_after_s: u64 },
    /// 503.
    Unavailable,
}

#[derive(Default)]
struct State {
    sent: Vec<SentSms>,
    /// `Idempotency-Key` → the sid it created.
    keys: HashMap<String, String>,
    /// Requests answered with an earlier key's message.
    duplicates: usize,
    /// Every request that reached the Messages API, refused ones included.
    requests: usize,
    script: VecDeque<Scripted>,
    delay: Duration,
}

pub struct Twilio {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Twilio {
    pub async fn start() -> Twilio {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(&state, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Twilio { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn sent(&self) -> Vec<SentSms> {
        self.state.lock().unwrap().sent.clone()
    }

    pub fn duplicates(&self) -> usize {
        self.state.lock().unwrap().duplicates
    }

    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }

    /// The next requests get these answers, in order.
    pub fn script(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.state.lock().unwrap().script.extend(answers);
    }

    /// Each request is answered after this long (a slow provider).
    pub fn delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    /// Waits until `n` messages were created, for up to `within`.
    pub async fn wait_sent(&self, n: usize, within: Duration) -> Vec<SentSms> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let sent = self.sent();
            if sent.len() >= n {
                return sent;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} messages sent to Twilio within {within:?}: {sent:?}",
                sent.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn twilio_error(status: StatusCode, code: u32, message: &str) -> Response<Full<Bytes>> {
    let body = json!({"code": code, "message": message,
                      "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
                      "status": status.as_u16()});
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    response
}

/// `+` and 7 to 15 digits, optionally behind `whatsapp:`.
fn address(value: &str) -> Option<(bool, &str)> {
    let (whatsapp, number) = match value.strip_prefix("whatsapp:") {
        Some(number) => (true, number),
        None => (false, value),
    };
    let digits = number.strip_prefix('+')?;
    let e164 = (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    e164.then_some((whatsapp, number))
}

async fn answer(
    state: &Mutex<State>,
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let expected_path = format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json");
    if request.method() != hyper::Method::POST || request.uri().path() != expected_path {
        return twilio_error(
            StatusCode::NOT_FOUND,
            20404,
            "The requested resource was not found",
        );
    }
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}"));
    let authorized = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Basic {credentials}"));
    let form = request
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let key = request
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let (delay, scripted) = {
        let mut state = state.lock().unwrap();
        state.requests += 1;
        (state.delay, state.script.pop_front())
    };
    tokio::time::sleep(delay).await;
    if !authorized {
        return twilio_error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    if !form {
        return twilio_error(StatusCode::BAD_REQUEST, 20001, "Invalid content type");
    }
    let params: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let (Some(to), Some(from)) = (params.get("To"), params.get("From")) else {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            21604,
            "A 'To' phone number is required.",
        );
    };
    if params.get("Body").is_none_or(|b| b.is_empty()) && !params.contains_key("MediaUrl") {
        return twilio_error(StatusCode::BAD_REQUEST, 21602, "Message body is required.");
    }
    let (Some((to_whatsapp, _)), Some((from_whatsapp, _))) = (address(to), address(from)) else {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            21211,
            &format!("The 'To' number {to} is not a valid phone number."),
        );
    };
    if to_whatsapp != from_whatsapp {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            63007,
            "Twilio could not find a Channel with the specified From address",
        );
    }
    match scripted {
        Some(Scripted::TooManyRequests { retry_after_s }) => {
            let mut response =
                twilio_error(StatusCode::TOO_MANY_REQUESTS, 20429, "Too Many Requests");
            response.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                retry_after_s.to_string().parse().unwrap(),
            );
            return response;
        }
        Some(Scripted::Unavailable) => {
            return twilio_error(
                StatusCode::SERVICE_UNAVAILABLE,
                20500,
                "Service Unavailable",
            )
        }
        None => {}
    }
    let mut state = state.lock().unwrap();
    let sid = match key.as_ref().and_then(|k| state.keys.get(k)).cloned() {
        Some(sid) => {
            state.duplicates += 1;
            sid
        }
        None => {
            let sid = format!("SM{:032x}", state.sent.len() + 1);
            if let Some(key) = key {
                state.keys.insert(key, sid.clone());
            }
            state.sent.push(SentSms {
                sid: sid.clone(),
                to: to.clone(),
                from: from.clone(),
                body: params.get("Body").cloned().unwrap_or_default(),
                status_callback: params.get("StatusCallback").cloned(),
            });
            sid
        }
    };
    let body = json!({"sid": sid, "account_sid": ACCOUNT_SID, "to": to, "from": from,
                      "body": params.get("Body"), "status": "queued", "num_segments": "1",
                      "api_version": "2010-04-01",
                      "uri": format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}.json")});
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = StatusCode::CREATED;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    response
}

/// Posts a webhook to the SMS worker as Twilio does: a form, signed with the auth token over
/// `url` (what Twilio called) and the parameters. `signature` overrides the header (`None`
/// leaves it out).
pub async fn post_webhook(
    url: &str,
    params: &[(&str, &str)],
    signature: Option<Option<String>>,
) -> (u16, String) {
    let owned: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let signature =
        signature.unwrap_or_else(|| Some(workers::sms::signature(AUTH_TOKEN, url, &owned)));
    let mut request = reqwest::Client::new().post(url).form(&owned);
    if let Some(signature) = signature {
        request = request.header("X-Twilio-Signature", signature);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}
