//! The SMS worker: Twilio's Messages API for SMS and WhatsApp (WhatsApp numbers are the same
//! API with `whatsapp:` addresses).
//!
//! Out: `outbound.sms` → a form POST to `{base}/2010-04-01/Accounts/{sid}/Messages.json`
//! (basic auth, a `StatusCallback` to this worker), once per message id (the ledger), then
//! `delivery.status` `sent`; 429 and 5xx are tried again honouring `Retry-After`; a refusal
//! becomes `failed` with Twilio's error code.
//!
//! In: Twilio's webhooks, each checked against `X-Twilio-Signature` (HMAC-SHA1 over the URL
//! Twilio called and the sorted POST parameters) and refused with 403 otherwise. `/twilio/inbound`
//! (a contact wrote) → `inbound.messages`, once per `MessageSid`, answered with empty TwiML;
//! `/twilio/status` (a status callback) → `delivery.status`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use hyper::{Method, StatusCode};
use integrations::events::{
    self, DeliveryState, InboundAttachment, InboundChannel, InboundMessage, OutboundSms, SmsChannel,
};
use integrations::{Outcome, Record};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::runtime::{
    self, error_response, respond, retry_after, MessageRef, Sent, WebFuture, WebRequest,
    WebResponse, Webhooks, Worker,
};

/// The SMS worker's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct SmsConfig {
    /// Twilio Account SID (`AC…`); the SMS worker runs only when it is set.
    #[arg(long, env = "TWILIO_ACCOUNT_SID")]
    pub twilio_account_sid: Option<String>,

    /// Twilio auth token: the password of the API calls and the key of webhook signatures.
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    pub twilio_auth_token: Option<String>,

    /// Where Twilio's API is (a test points it at a local server).
    #[arg(
        long,
        env = "TWILIO_BASE_URL",
        default_value = "https://api.twilio.com"
    )]
    pub twilio_base_url: String,

    /// The address the webhooks (and `/healthz`, `/metrics`) listen on.
    #[arg(long, env = "SMS_LISTEN", default_value = "127.0.0.1:8081")]
    pub sms_listen: SocketAddr,

    /// The URL Twilio reaches the webhooks at (`https://sms.example.com`): signatures are over
    /// the URL Twilio called, and the status callback is sent there. Default: `http://` and
    /// the listen address.
    #[arg(long, env = "SMS_PUBLIC_URL")]
    pub sms_public_url: Option<String>,
}

impl SmsConfig {
    /// The account and token, when the worker is configured.
    fn credentials(&self) -> Option<(String, String)> {
        Some((
            self.twilio_account_sid.clone()?,
            self.twilio_auth_token.clone()?,
        ))
    }

    fn public_url(&self) -> String {
        self.sms_public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.sms_listen))
            .trim_end_matches('/')
            .to_owned()
    }
}

/// Runs the worker until `worker.stop`: the webhooks on `listener` and the `outbound.sms`
/// consumer. Returns at once (with an error logged) when the Twilio account is not set.
pub async fn run(
    worker: Arc<Worker>,
    config: SmsConfig,
    listener: TcpListener,
    registry: prometheus::Registry,
) {
    let Some((account_sid, auth_token)) = config.credentials() else {
        tracing::error!("the SMS worker needs --twilio-account-sid and --twilio-auth-token");
        return;
    };
    let twilio = Arc::new(Twilio {
        client: runtime::http_client(),
        messages_url: format!(
            "{}/2010-04-01/Accounts/{account_sid}/Messages.json",
            config.twilio_base_url.trim_end_matches('/')
        ),
        account_sid,
        auth_token,
        public_url: config.public_url(),
        worker: worker.clone(),
    });
    let server = tokio::spawn(runtime::serve(
        listener,
        twilio.clone(),
        registry,
        worker.metrics.clone(),
        MAX_WEBHOOK_BYTES,
        worker.stop.clone(),
    ));
    worker
        .consume(&worker.topics.outbound_sms, |record| {
            let twilio = twilio.clone();
            async move { twilio.send(record).await }
        })
        .await;
    let _ = server.await;
}

/// Twilio's webhook bodies are small forms.
const MAX_WEBHOOK_BYTES: usize = 64 * 1024;
/// Longest wait a `Retry-After` may ask for before the record is tried again.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// The answer to an inbound message: nothing to send back.
const EMPTY_TWIML: &str = r#"<?xml version="1.0" encoding="UTF-8"?><Response></Response>"#;

/// What the ledger keeps for a sent message, so a status callback (which names only the
/// `MessageSid`) finds its message.
#[derive(Debug, Serialize, Deserialize)]
struct SentMessage {
    tenant_id: String,
    room_id: String,
    message_id: String,
    sid: String,
}

struct Twilio {
    client: reqwest::Client,
    messages_url: String,
    account_sid: String,
    auth_token: String,
    public_url: String,
    worker: Arc<Worker>,
}

/// Twilio's error body.
#[derive(Deserialize)]
struct TwilioError {
    code: Option<u32>,
    message: Option<String>,
}

impl Twilio {
    /// Sends one `outbound.sms` record, once per message id.
    async fn send(&self, record: Record) -> Outcome {
        let sms: OutboundSms = match events::decode(&record.payload) {
            Ok(sms) => sms,
            Err(e) => return Outcome::Dead(e.to_string()),
        };
        let metrics = &self.worker.metrics;
        let ledger = &self.worker.ledger;
        let sent_key = format!("sms:sent:{}:{}", sms.tenant_id, sms.message_id);
        match ledger.get(&sent_key) {
            Ok(Some(sid)) => {
                metrics
                    .provider_calls
                    .with_label_values(&["duplicate"])
                    .inc();
                // Told again: the first telling may be what was cut short.
                self.tell(&sms, DeliveryState::Sent, Some(sid), None).await;
                return Outcome::Handled;
            }
            Ok(None) => {}
            Err(e) => return Outcome::Retry(format!("the ledger: {e}")),
        }
        let sent = self.post(&sms).await;
        match sent {
            Sent::Accepted(sid) => {
                metrics.provider_calls.with_label_values(&["sent"]).inc();
                let entry = SentMessage {
                    tenant_id: sms.tenant_id.clone(),
                    room_id: sms.room_id.clone(),
                    message_id: sms.message_id.clone(),
                    sid: sid.clone(),
                };
                let entry = serde_json::to_string(&entry).unwrap_or_default();
                let written =
                    ledger.put_all(&[(&sent_key, &sid), (&format!("sms:sid:{sid}"), &entry)]);
                if let Err(e) = written {
                    // Sent but not remembered: a redelivery would send it again. Say so loudly.
                    tracing::error!(error = %e, sid, "a sent message could not be written to the ledger");
                }
                self.tell(&sms, DeliveryState::Sent, Some(sid), None).await;
                Outcome::Handled
            }
            Sent::Later { after, reason } => {
                metrics.provider_calls.with_label_values(&["retried"]).inc();
                runtime::later(after, reason)
            }
            Sent::Refused { code, message } => {
                metrics.provider_calls.with_label_values(&["failed"]).inc();
                tracing::warn!(code, message, "Twilio refused a message");
                self.tell(&sms, DeliveryState::Failed, None, Some((code, message)))
                    .await;
                Outcome::Handled
            }
        }
    }

    /// The Messages API call.
    async fn post(&self, sms: &OutboundSms) -> Sent {
        let address = |number: &str| match sms.channel {
            SmsChannel::Whatsapp if !number.starts_with("whatsapp:") => {
                format!("whatsapp:{number}")
            }
            _ => number.to_owned(),
        };
        let mut form = vec![
            ("To", address(&sms.to)),
            ("From", address(&sms.from)),
            ("Body", sms.body.clone()),
            (
                "StatusCallback",
                format!("{}/twilio/status", self.public_url),
            ),
        ];
        form.extend(sms.media_urls.iter().map(|url| ("MediaUrl", url.clone())));
        let started = Instant::now();
        let response = self
            .client
            .post(&self.messages_url)
            .basic_auth(&self.account_sid, Some(&self.auth_token))
            // The message's own id: a provider (or proxy) that honours it drops a resend made
            // after a crash between its acceptance and the ledger's write.
            .header(
                "Idempotency-Key",
                format!("{}:{}", sms.tenant_id, sms.message_id),
            )
            .form(&form)
            .send()
            .await;
        self.worker
            .metrics
            .provider_seconds
            .observe(started.elapsed().as_secs_f64());
        let response = match response {
            Ok(response) => response,
            Err(e) => {
                return Sent::Later {
                    after: None,
                    reason: format!("Twilio unreachable: {e}"),
                }
            }
        };
        let status = response.status();
        let after = retry_after(response.headers(), MAX_RETRY_AFTER);
        let body = response.bytes().await.unwrap_or_default();
        if status.is_success() {
            #[derive(Deserialize)]
            struct Created {
                sid: String,
            }
            return match serde_json::from_slice::<Created>(&body) {
                Ok(created) => Sent::Accepted(created.sid),
                Err(e) => Sent::Later {
                    after: None,
                    reason: format!("Twilio's answer had no sid: {e}"),
                },
            };
        }
        let error: Option<TwilioError> = serde_json::from_slice(&body).ok();
        let code = error
            .as_ref()
            .and_then(|e| e.code)
            .map_or_else(|| status.as_u16().to_string(), |c| c.to_string());
        let message = error
            .and_then(|e| e.message)
            .unwrap_or_else(|| status.to_string());
        match status.as_u16() {
            // Too many requests, Twilio's own trouble, or our credentials (an operator fixes
            // those; the message waits rather than being lost).
            429 | 500..=599 | 401 | 403 => Sent::Later {
                after,
                reason: format!("Twilio answered {status}: {code} {message}"),
            },
            _ => Sent::Refused { code, message },
        }
    }

    /// Publishes a message's delivery state to `delivery.status`.
    async fn tell(
        &self,
        sms: &OutboundSms,
        status: DeliveryState,
        provider_id: Option<String>,
        error: Option<(String, String)>,
    ) {
        let message = MessageRef {
            tenant_id: &sms.tenant_id,
            room_id: &sms.room_id,
            message_id: &sms.message_id,
        };
        self.worker
            .tell_delivery(message, status, provider_id, error)
            .await;
    }

    /// Whether a webhook request carries Twilio's signature of what it holds.
    fn signed(&self, request: &WebRequest, params: &[(String, String)]) -> bool {
        let Some(signature) = request
            .headers
            .get("x-twilio-signature")
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
        let url = format!("{}{path}", self.public_url);
        signature_valid(&self.auth_token, &url, params, signature)
    }

    /// A contact wrote: to `inbound.messages`, once per `MessageSid`.
    async fn inbound(self: Arc<Self>, params: Vec<(String, String)>) -> WebResponse {
        let param = |name: &str| param(&params, name);
        let (Some(sid), Some(from), Some(to)) = (param("MessageSid"), param("From"), param("To"))
        else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "MessageSid, From and To are required",
            );
        };
        let seen_key = format!("sms:inbound:{sid}");
        match self.worker.ledger.get(&seen_key) {
            Ok(Some(_)) => return twiml(),
            Ok(None) => {}
            Err(e) => {
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    &e.to_string(),
                )
            }
        }
        let channel = if from.starts_with("whatsapp:") {
            InboundChannel::Whatsapp
        } else {
            InboundChannel::Sms
        };
        let media_count: usize = param("NumMedia").and_then(|n| n.parse().ok()).unwrap_or(0);
        let attachments = (0..media_count.min(10))
            .filter_map(|i| {
                Some(InboundAttachment {
                    url: Some(param(&format!("MediaUrl{i}"))?),
                    content_type: param(&format!("MediaContentType{i}"))
                        .unwrap_or_else(|| "application/octet-stream".into()),
                    name: None,
                    size: None,
                })
            })
            .collect();
        let strip = |address: String| {
            address
                .strip_prefix("whatsapp:")
                .map(str::to_owned)
                .unwrap_or(address)
        };
        let contact = strip(from);
        let message = InboundMessage {
            v: events::VERSION,
            channel,
            from: contact.clone(),
            to: strip(to),
            provider_id: sid,
            text: param("Body").unwrap_or_default(),
            subject: None,
            attachments,
            from_name: param("ProfileName"),
            in_reply_to: Vec::new(),
        };
        let topic = &self.worker.topics.inbound_messages;
        self.worker
            .publish(topic, &contact, events::encode(&message))
            .await;
        // After the publish: a crash in between has Twilio retry, and the gateway stores a
        // message once per MessageSid.
        if let Err(e) = self.worker.ledger.put_new(&seen_key, "") {
            tracing::warn!(error = %e, "an inbound MessageSid could not be written to the ledger");
        }
        twiml()
    }

    /// A status callback: to `delivery.status`.
    async fn status(self: Arc<Self>, params: Vec<(String, String)>) -> WebResponse {
        let param = |name: &str| param(&params, name);
        let (Some(sid), Some(state)) = (param("MessageSid"), param("MessageStatus")) else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "MessageSid and MessageStatus are required",
            );
        };
        let Some(state) = delivery_state(&state) else {
            // `accepted`, `scheduled`, `receiving`, …: nothing to tell.
            return twiml();
        };
        let sent = match self.worker.ledger.get(&format!("sms:sid:{sid}")) {
            Ok(Some(entry)) => serde_json::from_str::<SentMessage>(&entry).ok(),
            Ok(None) => None,
            Err(e) => {
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    &e.to_string(),
                )
            }
        };
        let Some(sent) = sent else {
            tracing::info!(
                sid,
                "a status callback for a message this worker did not send"
            );
            return twiml();
        };
        let error = param("ErrorCode")
            .filter(|code| !code.is_empty())
            .map(|code| (code, param("ErrorMessage").unwrap_or_default()));
        let message = MessageRef {
            tenant_id: &sent.tenant_id,
            room_id: &sent.room_id,
            message_id: &sent.message_id,
        };
        self.worker
            .tell_delivery(message, state, Some(sid), error)
            .await;
        twiml()
    }
}

/// The first value of form parameter `name`.
fn param(params: &[(String, String)], name: &str) -> Option<String> {
    params
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.clone())
}

fn twiml() -> WebResponse {
    respond(StatusCode::OK, "text/xml", EMPTY_TWIML)
}

/// Twilio's `MessageStatus` as a delivery state; `None` for the states before sending.
fn delivery_state(status: &str) -> Option<DeliveryState> {
    Some(match status {
        "sent" | "sending" => DeliveryState::Sent,
        "delivered" => DeliveryState::Delivered,
        "read" => DeliveryState::Read,
        "failed" | "canceled" => DeliveryState::Failed,
        "undelivered" => DeliveryState::Undelivered,
        _ => return None,
    })
}

impl Webhooks for Twilio {
    fn route(&self, request: WebRequest) -> Option<(&'static str, WebFuture)> {
        let route = match (&request.method, request.uri.path()) {
            (&Method::POST, "/twilio/inbound") => "/twilio/inbound",
            (&Method::POST, "/twilio/status") => "/twilio/status",
            _ => return None,
        };
        let form = request
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if !form {
            let response = error_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                "Twilio posts application/x-www-form-urlencoded",
            );
            return Some((route, Box::pin(std::future::ready(response))));
        }
        let params: Vec<(String, String)> =
            form_urlencoded::parse(&request.body).into_owned().collect();
        if !self.signed(&request, &params) {
            let response = error_response(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                "the X-Twilio-Signature header is missing or does not match",
            );
            return Some((route, Box::pin(std::future::ready(response))));
        }
        let twilio = Arc::new(self.clone_handle());
        Some(match route {
            "/twilio/inbound" => (route, Box::pin(twilio.inbound(params))),
            _ => (route, Box::pin(twilio.status(params))),
        })
    }
}

impl Twilio {
    /// A handle for one request's future (the webhook trait hands out `&self`).
    fn clone_handle(&self) -> Twilio {
        Twilio {
            client: self.client.clone(),
            messages_url: self.messages_url.clone(),
            account_sid: self.account_sid.clone(),
            auth_token: self.auth_token.clone(),
            public_url: self.public_url.clone(),
            worker: self.worker.clone(),
        }
    }
}

/// Twilio's request signature: base64(HMAC-SHA1(auth token, URL + each parameter's name and
/// value, sorted by name)), compared in constant time.
pub fn signature_valid(
    auth_token: &str,
    url: &str,
    params: &[(String, String)],
    signature: &str,
) -> bool {
    let Ok(expected) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return false;
    };
    sign(auth_token, url, params).is_some_and(|mac| mac.verify_slice(&expected).is_ok())
}

/// The signature Twilio computes for a request (the test stand-ins sign with it too).
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mac = sign(auth_token, url, params).map(|mac| mac.finalize().into_bytes());
    mac.map_or_else(String::new, |bytes| {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    })
}

/// The HMAC of a request (`None` never happens: HMAC takes a key of any length).
fn sign(auth_token: &str, url: &str, params: &[(String, String)]) -> Option<Hmac<sha1::Sha1>> {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(auth_token.as_bytes()).ok()?;
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    Some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Twilio's published example (its "Webhooks security" page).
    #[test]
    fn twilios_published_example_is_signed_as_published() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let example = params(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]);
        assert_eq!(
            signature("12345", url, &example),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        assert!(signature_valid(
            "12345",
            url,
            &example,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        let mut tampered = example.clone();
        tampered[2].1 = "1235".into();
        assert!(!signature_valid(
            "12345",
            url,
            &tampered,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(!signature_valid(
            "12345",
            "https://mycompany.com/myapp.php?foo=1&bar=3",
            &example,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(!signature_valid("12345", url, &example, "not base64!"));
    }

    #[test]
    fn twilio_statuses_map_to_delivery_states() {
        assert_eq!(delivery_state("delivered"), Some(DeliveryState::Delivered));
        assert_eq!(
            delivery_state("undelivered"),
            Some(DeliveryState::Undelivered)
        );
        assert_eq!(delivery_state("queued"), None);
        assert_eq!(delivery_state("read"), Some(DeliveryState::Read));
    }
}
