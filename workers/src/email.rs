//! The email worker: agents' replies go out over SMTP, contacts' mail comes in through an
//! inbound-parse webhook.
//!
//! **Out.** It reads `outbound.email` and sends each message through the relay of
//! `--smtp-url` with lettre (`smtp://` turns to TLS with STARTTLS when the relay offers it,
//! `smtps://` is TLS from the first byte). A mail's `Message-ID` is
//! `<{message_id}@{--email-domain}>`, so every send of one stored message makes the same mail.
//! `In-Reply-To` and `References` come from the record or, when it has none, from the worker's
//! thread store: the Message-IDs of the thread between an inbox and a contact, kept in the ledger
//! under `email:thread:{inbox}:{contact}` (oldest first, the last [`THREAD_LENGTH`]). A contact's
//! mail makes the thread its own chain (its `References`, its `In-Reply-To`, then its
//! Message-ID: a fresh mail starts a fresh thread); each mail sent goes at its end. So the
//! contact's mail client threads the reply, and the contact's answer (whose `In-Reply-To` is our
//! Message-ID) threads back into its conversation. The ledger holds each sent `message_id`
//! (`email:sent:{message_id}`, written as soon as the relay took the mail): a record read again
//! is not sent again, only its `sent` state is told again. A relay's 4xx (or no answer) is tried
//! again, and so is a refused login (530, 534, 535, 538: the relay's settings, not the mail); any
//! other 5xx fails the message (`delivery.status` `failed` with the reply code).
//!
//! **In.** `POST /inbound` takes a mail as SendGrid's Inbound Parse posts it: a
//! `multipart/form-data` form with `from`, `to`, `subject`, `text`, `html`, `headers` (the raw
//! header block), `envelope`, `charsets`, `attachment-info` and the files `attachment1`…. It keeps
//! what the contact wrote (quoted replies and the signature stripped) and the attachments'
//! metadata, and publishes an [`InboundMessage`] to `inbound.messages` keyed by the contact's
//! address. Its `provider_id` is the mail's `Message-ID` as the header shows it, angle brackets
//! included (`<…@…>`), the form the worker uses for every Message-ID it stores or compares; a
//! mail without one gets `<sha1.{hex}@{--email-domain}>`, the SHA-1 of its header block. A mail
//! seen before (`email:inbound:{id}` in the ledger) is answered 200 and published no more.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{HeaderMap, Method, StatusCode};
use integrations::events::{
    DeliveryState, InboundAttachment, InboundChannel, InboundMessage, OutboundEmail, VERSION,
};
use integrations::{Outcome, Record};
use lettre::message::header::{ContentType, MIME_VERSION_1_0};
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{Address, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use prometheus::Registry;
use serde::Deserialize;
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::runtime::{
    self, error_response, respond, Ledger, MessageRef, WebFuture, WebRequest, WebResponse,
    Webhooks, Worker,
};

/// Most Message-IDs a thread keeps (the newest): plenty for any mail client to thread a reply.
pub const THREAD_LENGTH: usize = 20;

/// The email worker's settings. Every flag has a name of its own (`--smtp-url`, `--email-…`)
/// so that the gateway can flatten them next to the other workers' settings.
#[derive(Clone, clap::Args)]
pub struct EmailConfig {
    /// The SMTP relay mail is sent through: `smtp://[USER:PASSWORD@]HOST[:PORT]` (port 25 unless
    /// given; STARTTLS when the relay offers it, `?tls=required` to insist on it) or
    /// `smtps://…` (TLS from the start, port 465 unless given). USER and PASSWORD are
    /// percent-decoded. The email worker runs only when this is set.
    #[arg(long, env = "EMAIL_SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,

    /// The right-hand side of the Message-IDs the worker makes (`<MESSAGE_ID@DOMAIN>`): a domain
    /// of yours, which makes them unique in the world.
    #[arg(long, env = "EMAIL_DOMAIN", default_value = "localhost")]
    pub email_domain: String,

    /// Where the inbound-parse webhook (`POST /inbound`), `/healthz` and `/metrics` listen.
    #[arg(long, env = "EMAIL_LISTEN", default_value = "127.0.0.1:8082")]
    pub email_listen: SocketAddr,

    /// Largest inbound-parse request (a mail with its attachments), in MiB: past it, 413.
    #[arg(long, env = "EMAIL_MAX_INBOUND_MIB", default_value_t = 30)]
    pub email_max_inbound_mib: usize,

    /// A secret the inbound-parse webhook requires, as `Authorization: Bearer TOKEN` or as the
    /// password of basic auth (`https://inbound:TOKEN@host/inbound` as SendGrid's URL): else
    /// 401. Without it the webhook takes any request.
    #[arg(long, env = "EMAIL_INBOUND_TOKEN", hide_env_values = true)]
    pub email_inbound_token: Option<String>,

    /// How long, in seconds, the relay may take to accept a connection or answer a command.
    #[arg(long, env = "EMAIL_SMTP_TIMEOUT_SECS", default_value_t = 30)]
    pub email_smtp_timeout_secs: u64,

    /// A PEM file of CA certificates the relay's certificate may chain to, besides the public
    /// roots: for a relay whose certificate a private CA signed.
    #[arg(long, env = "EMAIL_SMTP_CA_FILE")]
    pub email_smtp_ca_file: Option<PathBuf>,
}

// By hand: the relay's password and the webhook's secret stay out of logs.
impl fmt::Debug for EmailConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |set: bool| if set { "<redacted>" } else { "<unset>" };
        f.debug_struct("EmailConfig")
            .field("smtp_url", &self.smtp_url.as_deref().map(redact_url))
            .field("email_domain", &self.email_domain)
            .field("email_listen", &self.email_listen)
            .field("email_max_inbound_mib", &self.email_max_inbound_mib)
            .field(
                "email_inbound_token",
                &redacted(self.email_inbound_token.is_some()),
            )
            .field("email_smtp_timeout_secs", &self.email_smtp_timeout_secs)
            .field("email_smtp_ca_file", &self.email_smtp_ca_file)
            .finish()
    }
}

/// A relay URL without its password, for logs.
fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("redacted"));
            }
            parsed.to_string()
        }
        Err(_) => "<not a URL>".to_owned(),
    }
}

/// The SMTP relay mail goes through.
struct Relay {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// `host:port`, for logs and retry reasons.
    address: String,
}

impl EmailConfig {
    /// Checks `--smtp-url` (set, and a relay URL this worker can use): a process calls it before
    /// [`run`] to refuse a bad setting at start.
    pub fn check(&self) -> Result<(), String> {
        self.relay().map(|_| ())
    }

    fn relay(&self) -> Result<Relay, String> {
        let raw = self
            .smtp_url
            .as_deref()
            .ok_or("--smtp-url is not set: the email worker needs a relay to send through")?;
        let url = reqwest::Url::parse(raw).map_err(|e| format!("--smtp-url: {e}"))?;
        let host = url
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or("--smtp-url: no host")?;
        // An IPv6 literal comes bracketed; the socket wants the bare address.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let mut tls_parameters = TlsParameters::builder(host.clone());
        if let Some(path) = &self.email_smtp_ca_file {
            let shown = path.display();
            let pem =
                std::fs::read(path).map_err(|e| format!("--email-smtp-ca-file {shown}: {e}"))?;
            let certificates = Certificate::from_pem(&pem)
                .ok()
                .filter(|_| pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----"))
                .ok_or_else(|| format!("--email-smtp-ca-file {shown}: no PEM certificates"))?;
            tls_parameters = tls_parameters.add_root_certificate(certificates);
        }
        let tls_parameters = tls_parameters
            .build()
            .map_err(|e| format!("--smtp-url: TLS: {e}"))?;
        let tls_mode = url
            .query_pairs()
            .find(|(key, _)| key == "tls")
            .map(|(_, value)| value.into_owned());
        let (port, tls) = match url.scheme() {
            "smtp" => {
                let tls = match tls_mode.as_deref() {
                    None | Some("opportunistic") => Tls::Opportunistic(tls_parameters),
                    Some("required") => Tls::Required(tls_parameters),
                    Some(other) => {
                        return Err(format!(
                            "--smtp-url: tls={other}: expected `opportunistic` or `required`"
                        ))
                    }
                };
                (url.port().unwrap_or(25), tls)
            }
            "smtps" => (url.port().unwrap_or(465), Tls::Wrapper(tls_parameters)),
            other => {
                return Err(format!(
                    "--smtp-url: the scheme `{other}` is not `smtp` or `smtps`"
                ))
            }
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.clone())
            .port(port)
            .tls(tls)
            .timeout(Some(Duration::from_secs(
                self.email_smtp_timeout_secs.max(1),
            )));
        if !url.username().is_empty() {
            builder = builder.credentials(Credentials::new(
                percent_decode(url.username()),
                percent_decode(url.password().unwrap_or_default()),
            ));
        }
        Ok(Relay {
            transport: builder.build(),
            address: format!("{host}:{port}"),
        })
    }
}

/// Runs the email worker until `worker.stop` turns true: serves the inbound-parse webhook,
/// `/healthz` and `/metrics` on `listener`, and sends what `outbound.email` holds. With no usable
/// relay (see [`EmailConfig::check`]) it logs why and only serves the webhook: outbound records
/// wait, uncommitted, for a worker that can send them.
pub async fn run(
    worker: Arc<Worker>,
    config: EmailConfig,
    listener: TcpListener,
    registry: Registry,
) {
    let relay = match config.relay() {
        Ok(relay) => {
            tracing::info!(relay = %relay.address, "the email worker sends through its relay");
            Some(relay)
        }
        Err(e) => {
            tracing::error!(error = %e, "the email worker sends nothing");
            None
        }
    };
    let email = Arc::new(EmailWorker {
        worker: worker.clone(),
        relay,
        domain: config.email_domain.clone(),
        inbound_token: config.email_inbound_token.clone(),
        threads: Arc::new(Mutex::new(())),
    });
    let serving = runtime::serve(
        listener,
        Arc::new(InboundParse(email.clone())),
        registry,
        worker.metrics.clone(),
        config.email_max_inbound_mib.saturating_mul(1 << 20),
        worker.stop.clone(),
    );
    let sending = async {
        if email.relay.is_some() {
            let topic = worker.topics.outbound_email.clone();
            worker
                .consume(&topic, |record| {
                    let email = email.clone();
                    async move { email.send(record).await }
                })
                .await;
        } else {
            let mut stop = worker.stop.clone();
            while !*stop.borrow_and_update() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
        }
    };
    tokio::join!(serving, sending);
}

/// What the sender and the webhook share.
struct EmailWorker {
    worker: Arc<Worker>,
    relay: Option<Relay>,
    /// `--email-domain`.
    domain: String,
    inbound_token: Option<String>,
    /// Held from a thread's read to its write in the ledger: the sender and the webhook both
    /// add to threads, at the same time.
    threads: Arc<Mutex<()>>,
}

/// The threading headers of a mail going out.
#[derive(Debug, Default, PartialEq)]
struct Threading {
    in_reply_to: Option<String>,
    /// Oldest first.
    references: Vec<String>,
}

impl EmailWorker {
    /// Runs `work` on the ledger, on a blocking thread (SQLite waits for the disk), with the lock
    /// of the thread store at hand.
    async fn ledger<T, F>(&self, work: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(&Ledger, &Mutex<()>) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let (worker, threads) = (self.worker.clone(), self.threads.clone());
        tokio::task::spawn_blocking(move || work(&worker.ledger, &threads))
            .await
            .map_err(|e| format!("the ledger task: {e}"))?
            .map_err(|e| format!("the ledger: {e}"))
    }

    /// Sends one `outbound.email` record, once, threaded, and tells the gateway what became of it.
    async fn send(&self, record: Record) -> Outcome {
        let email: OutboundEmail = match integrations::decode(&record.payload) {
            Ok(email) => email,
            Err(e) => return Outcome::Dead(e.to_string()),
        };
        if email.message_id.trim().is_empty() {
            return Outcome::Dead("the message_id is empty".to_owned());
        }
        let Some(relay) = &self.relay else {
            return Outcome::Retry("no SMTP relay is configured".to_owned());
        };
        let calls = &self.worker.metrics.provider_calls;
        let sent_key = format!("email:sent:{}", email.message_id);
        let known = {
            let key = sent_key.clone();
            self.ledger(move |ledger, _| ledger.get(&key)).await
        };
        match known {
            Err(e) => return Outcome::Retry(e),
            Ok(Some(message_id)) => {
                // Sent before (the record is read again): the gateway hears `sent` again, which
                // changes nothing there.
                calls.with_label_values(&["duplicate"]).inc();
                self.tell(&email, DeliveryState::Sent, Some(message_id), None)
                    .await;
                return Outcome::Handled;
            }
            Ok(None) => {}
        }
        let (from, to) = match (mailbox(&email.from), mailbox(&email.to)) {
            (Ok(from), Ok(to)) => (with_name(from, email.from_name.as_deref()), to),
            (Err(e), _) | (_, Err(e)) => {
                calls.with_label_values(&["failed"]).inc();
                let error = ("INVALID_ADDRESS".to_owned(), e);
                self.tell(&email, DeliveryState::Failed, None, Some(error))
                    .await;
                return Outcome::Handled;
            }
        };
        let inbox = from.email.to_string().to_lowercase();
        let contact = to.email.to_string().to_lowercase();
        let message_id = message_id_for(&email.message_id, &self.domain);
        let threading = match self.threading(&email, &inbox, &contact, &message_id).await {
            Ok(threading) => threading,
            Err(e) => return Outcome::Retry(e),
        };
        let message = match compose(&email, from, to, &message_id, &threading) {
            Ok(message) => message,
            Err(e) => {
                calls.with_label_values(&["failed"]).inc();
                let error = ("INVALID_MESSAGE".to_owned(), e.to_string());
                self.tell(&email, DeliveryState::Failed, None, Some(error))
                    .await;
                return Outcome::Handled;
            }
        };
        let started = Instant::now();
        let sent = relay.transport.send(message).await;
        self.worker
            .metrics
            .provider_seconds
            .observe(started.elapsed().as_secs_f64());
        match sent {
            Ok(_) => {
                let (key, id) = (sent_key, message_id.clone());
                let thread = thread_key(&inbox, &contact);
                let recorded = self
                    .ledger(move |ledger, threads| {
                        ledger.put(&key, &id)?;
                        let _held = threads.lock().unwrap_or_else(|p| p.into_inner());
                        let mut ids = read_thread(ledger, &thread)?;
                        extend_thread(&mut ids, [id]);
                        write_thread(ledger, &thread, &ids)
                    })
                    .await;
                if let Err(e) = recorded {
                    tracing::error!(
                        error = %e,
                        message_id = %email.message_id,
                        "the relay took a mail the ledger did not record: a redelivery sends it again"
                    );
                }
                calls.with_label_values(&["sent"]).inc();
                tracing::debug!(message_id = %email.message_id, mail = %message_id, "mail sent");
                self.tell(&email, DeliveryState::Sent, Some(message_id), None)
                    .await;
                Outcome::Handled
            }
            Err(e) if e.is_permanent() && !e.status().is_some_and(refuses_the_sender) => {
                let code = e
                    .status()
                    .map(|code| code.to_string())
                    .unwrap_or_else(|| "5xx".to_owned());
                calls.with_label_values(&["failed"]).inc();
                tracing::warn!(error = %e, message_id = %email.message_id, "the relay refused a mail");
                self.tell(
                    &email,
                    DeliveryState::Failed,
                    None,
                    Some((code, e.to_string())),
                )
                .await;
                Outcome::Handled
            }
            Err(e) => {
                calls.with_label_values(&["retried"]).inc();
                Outcome::Retry(format!("the relay {}: {e}", relay.address))
            }
        }
    }

    /// The mail's threading: the record's when it has any, else the thread store's.
    async fn threading(
        &self,
        email: &OutboundEmail,
        inbox: &str,
        contact: &str,
        own: &str,
    ) -> Result<Threading, String> {
        let parent = email.in_reply_to.as_deref().and_then(normalize_message_id);
        let mut references: Vec<String> = email
            .references
            .iter()
            .filter_map(|id| normalize_message_id(id))
            .collect();
        if parent.is_none() && references.is_empty() {
            let key = thread_key(inbox, contact);
            references = self
                .ledger(move |ledger, threads| {
                    let _held = threads.lock().unwrap_or_else(|p| p.into_inner());
                    read_thread(ledger, &key)
                })
                .await?;
        } else if let Some(parent) = &parent {
            if !references.contains(parent) {
                references.push(parent.clone());
            }
        }
        // A mail never answers itself (a thread store written before a crash may hold it).
        references.retain(|id| id != own);
        let mut deduplicated = Vec::with_capacity(references.len());
        extend_thread(&mut deduplicated, references);
        let in_reply_to = parent
            .filter(|parent| parent != own)
            .or_else(|| deduplicated.last().cloned());
        Ok(Threading {
            in_reply_to,
            references: deduplicated,
        })
    }

    /// Publishes the state of an outbound message to `delivery.status`, keyed by its room.
    async fn tell(
        &self,
        email: &OutboundEmail,
        status: DeliveryState,
        provider_id: Option<String>,
        error: Option<(String, String)>,
    ) {
        let message = MessageRef {
            tenant_id: &email.tenant_id,
            room_id: &email.room_id,
            message_id: &email.message_id,
        };
        self.worker
            .tell_delivery(message, status, provider_id, error)
            .await;
    }

    /// Answers `POST /inbound`.
    async fn inbound(&self, request: WebRequest) -> WebResponse {
        match self.take_inbound(request).await {
            Ok(response) | Err(response) => response,
        }
    }

    async fn take_inbound(&self, request: WebRequest) -> Result<WebResponse, WebResponse> {
        if request.method != Method::POST {
            let mut response = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                "the inbound-parse webhook takes POST",
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            return Err(response);
        }
        if !authorized(&request.headers, self.inbound_token.as_deref()) {
            let mut response = error_response(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "the inbound-parse webhook needs its token (Authorization: Bearer, or basic auth's password)",
            );
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="email-inbound""#),
            );
            return Err(response);
        }
        let boundary = request
            .headers
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(form::boundary)
            .ok_or_else(|| {
                error_response(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UNSUPPORTED_MEDIA_TYPE",
                    "the inbound-parse webhook takes multipart/form-data with a boundary, as SendGrid's Inbound Parse posts",
                )
            })?;
        let parts = form::parse(request.body.clone(), &boundary)
            .await
            .map_err(|e| {
                error_response(
                    StatusCode::BAD_REQUEST,
                    "BAD_REQUEST",
                    &format!("the multipart body: {e}"),
                )
            })?;
        let mail = read_inbound(parts, &self.domain)
            .map_err(|e| error_response(StatusCode::BAD_REQUEST, "BAD_REQUEST", &e))?;
        let provider_id = mail.message.provider_id.clone();
        let seen_key = format!("email:inbound:{provider_id}");
        let seen = {
            let key = seen_key.clone();
            self.ledger(move |ledger, _| ledger.get(&key)).await
        };
        let accepted = |status: &str| {
            let body = serde_json::json!({"status": status, "provider_id": provider_id});
            respond(StatusCode::OK, "application/json", body.to_string())
        };
        match seen {
            Err(e) => {
                tracing::warn!(error = %e, "an inbound mail waits for the ledger");
                return Err(error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    "the worker's ledger is unavailable: try again",
                ));
            }
            Ok(Some(_)) => return Ok(accepted("duplicate")),
            Ok(None) => {}
        }
        let message = &mail.message;
        let topic = &self.worker.topics.inbound_messages;
        self.worker
            .publish(topic, &message.from, integrations::encode(message))
            .await;
        // After the publish: a crash before this leaves the post unanswered, the provider posts
        // the mail again, and the gateway stores nothing twice (`provider_id`).
        let thread = thread_key(&message.to, &message.from);
        let chain = mail.chain;
        let recorded = self
            .ledger(move |ledger, threads| {
                {
                    let _held = threads.lock().unwrap_or_else(|p| p.into_inner());
                    // The contact's chain, this mail last: the next reply answers it.
                    let mut ids = Vec::new();
                    extend_thread(&mut ids, chain);
                    write_thread(ledger, &thread, &ids)?;
                }
                ledger.put_new(&seen_key, "published")
            })
            .await;
        if let Err(e) = recorded {
            tracing::warn!(error = %e, "an inbound mail was published but not recorded");
        }
        tracing::debug!(provider_id = %message.provider_id, "inbound mail published");
        Ok(accepted("accepted"))
    }
}

/// The webhooks the email worker serves.
struct InboundParse(Arc<EmailWorker>);

impl Webhooks for InboundParse {
    fn route(&self, request: WebRequest) -> Option<(&'static str, WebFuture)> {
        if request.uri.path() != "/inbound" {
            return None;
        }
        let email = self.0.clone();
        Some((
            "inbound",
            Box::pin(async move { email.inbound(request).await }),
        ))
    }
}

/// Whether a request carries the webhook's token (any request does when there is none).
fn authorized(headers: &HeaderMap, token: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let Some(value) = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let (scheme, credentials) = value.trim().split_once(' ').unwrap_or((value, ""));
    let presented = if scheme.eq_ignore_ascii_case("bearer") {
        credentials.trim().as_bytes().to_vec()
    } else if scheme.eq_ignore_ascii_case("basic") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials.trim())
        else {
            return false;
        };
        match decoded.iter().position(|&b| b == b':') {
            Some(colon) => decoded[colon + 1..].to_vec(),
            None => return false,
        }
    } else {
        return false;
    };
    bool::from(presented.as_slice().ct_eq(token.as_bytes()))
}

/// Reply codes with which a relay refuses us (authentication), not the mail: trying again
/// once the relay's settings are fixed sends it.
fn refuses_the_sender(code: lettre::transport::smtp::response::Code) -> bool {
    matches!(code.to_string().as_str(), "530" | "534" | "535" | "538")
}

/// The mail's Message-ID for a stored message: `<{message_id}@{domain}>`, the same at every
/// send of it. A character a Message-ID cannot hold (and `=`) is written `=XX`.
fn message_id_for(message_id: &str, domain: &str) -> String {
    fn atext(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for byte in text.bytes() {
            if byte.is_ascii_alphanumeric() || b"!#$%&'*+-/?^_`{|}~.".contains(&byte) {
                out.push(byte as char);
            } else {
                out.push_str(&format!("={byte:02X}"));
            }
        }
        out
    }
    format!("<{}@{}>", atext(message_id), atext(domain))
}

/// A lettre mailbox of an address as the contract holds it (`help@acme.example`, or with a
/// name: `Acme Help <help@acme.example>`).
fn mailbox(text: &str) -> Result<Mailbox, String> {
    let (name, address) =
        parse_mailbox(text).ok_or_else(|| format!("`{text}` is not an email address"))?;
    let address: Address = address
        .parse()
        .map_err(|e| format!("`{text}` is not an email address: {e}"))?;
    Ok(Mailbox::new(name, address))
}

/// The mail of an outbound message: plain text, threaded.
/// `mailbox` shown with `name` (the inbox's), unless it has a name of its own already.
fn with_name(mailbox: Mailbox, name: Option<&str>) -> Mailbox {
    match name {
        Some(name) if mailbox.name.is_none() && !name.trim().is_empty() => {
            // A header line never holds a line break.
            let name = name.replace(['\r', '\n'], " ");
            Mailbox::new(Some(name), mailbox.email)
        }
        _ => mailbox,
    }
}

fn compose(
    email: &OutboundEmail,
    from: Mailbox,
    to: Mailbox,
    message_id: &str,
    threading: &Threading,
) -> Result<Message, lettre::error::Error> {
    let subject: String = email
        .subject
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    let mut builder = Message::builder()
        .from(from)
        .to(to)
        .subject(subject)
        .message_id(Some(message_id.to_owned()));
    if let Some(parent) = &threading.in_reply_to {
        builder = builder.in_reply_to(parent.clone());
    }
    if !threading.references.is_empty() {
        builder = builder.references(threading.references.join(" "));
    }
    builder
        .header(MIME_VERSION_1_0)
        .header(ContentType::TEXT_PLAIN)
        .body(email.text.clone())
}

fn thread_key(inbox: &str, contact: &str) -> String {
    format!("email:thread:{inbox}:{contact}")
}

/// A thread's Message-IDs, oldest first (none when it is unknown or unreadable).
fn read_thread(ledger: &Ledger, key: &str) -> Result<Vec<String>, rusqlite::Error> {
    Ok(ledger
        .get(key)?
        .and_then(|value| serde_json::from_str(&value).ok())
        .unwrap_or_default())
}

fn write_thread(ledger: &Ledger, key: &str, ids: &[String]) -> Result<(), rusqlite::Error> {
    ledger.put(key, &serde_json::Value::from(ids.to_vec()).to_string())
}

/// Makes `ids` the thread's newest, in order (an id already there moves), keeping the last
/// [`THREAD_LENGTH`].
fn extend_thread(thread: &mut Vec<String>, ids: impl IntoIterator<Item = String>) {
    for id in ids {
        thread.retain(|known| *known != id);
        thread.push(id);
    }
    if thread.len() > THREAD_LENGTH {
        thread.drain(..thread.len() - THREAD_LENGTH);
    }
}

/// An inbound mail, read from the form.
#[derive(Debug)]
struct InboundMail {
    message: InboundMessage,
    /// The thread as the contact's client sees it: `References`, then `In-Reply-To`, then this
    /// mail's own Message-ID.
    chain: Vec<String>,
}

/// What `attachment-info` says of one attachment.
#[derive(Debug, Default, Deserialize)]
struct AttachmentInfo {
    filename: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    content_type: Option<String>,
}

/// Reads the Inbound Parse form: the contact, the inbox, the text it wrote, the attachments'
/// metadata and the threading; `Err` says what is wrong with the form.
fn read_inbound(parts: Vec<form::Part>, domain: &str) -> Result<InboundMail, String> {
    let charsets: BTreeMap<String, String> = parts
        .iter()
        .find(|part| part.name == "charsets" && part.filename.is_none())
        .and_then(|part| serde_json::from_slice(&part.body).ok())
        .unwrap_or_default();
    let mut fields: BTreeMap<&str, String> = BTreeMap::new();
    let mut files: BTreeMap<u32, &form::Part> = BTreeMap::new();
    for part in &parts {
        if let Some(n) = attachment_number(&part.name) {
            files.entry(n).or_insert(part);
            continue;
        }
        if !fields.contains_key(part.name.as_str()) {
            let charset = charsets.get(&part.name).map(String::as_str).unwrap_or("");
            fields.insert(&part.name, decode_charset(&part.body, charset));
        }
    }
    let field = |name: &str| fields.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());

    let from_field = field("from").ok_or("the form has no `from` field (the sender)")?;
    let (from_name, from) = parse_mailbox(from_field)
        .ok_or_else(|| format!("the `from` field holds no address: `{from_field}`"))?;
    let envelope_to = field("envelope")
        .and_then(|envelope| serde_json::from_str::<serde_json::Value>(envelope).ok())
        .and_then(|envelope| match &envelope["to"] {
            serde_json::Value::Array(to) => to.first().and_then(|v| v.as_str()).map(str::to_owned),
            serde_json::Value::String(to) => Some(to.clone()),
            _ => None,
        })
        .and_then(|to| parse_mailbox(&to).map(|(_, address)| address));
    let to = envelope_to
        .or_else(|| {
            field("to").and_then(|to| {
                split_addresses(to)
                    .into_iter()
                    .find_map(|one| parse_mailbox(one).map(|(_, address)| address))
            })
        })
        .ok_or("the form names no recipient (`envelope` or `to`)")?;
    if field("text").is_none() && field("html").is_none() && field("email").is_some() {
        return Err("a raw MIME mail (`email`) is not read: turn off \"POST the raw, full MIME message\" in the Inbound Parse settings".to_owned());
    }

    let headers = field("headers").unwrap_or("");
    let provider_id = header_values(headers, "message-id")
        .iter()
        .find_map(|value| message_ids(value).into_iter().next())
        .unwrap_or_else(|| {
            // No Message-ID: one from the mail itself, the same at every post of it.
            let mut hasher = Sha1::new();
            if headers.is_empty() {
                for name in ["from", "to", "subject", "text", "html"] {
                    hasher.update(field(name).unwrap_or("").as_bytes());
                    hasher.update([0]);
                }
            } else {
                hasher.update(headers.as_bytes());
            }
            let hex: String = hasher
                .finalize()
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect();
            message_id_for(&format!("sha1.{hex}"), domain)
        });
    let parents: Vec<String> = header_values(headers, "in-reply-to")
        .iter()
        .flat_map(|value| message_ids(value))
        .collect();
    let references: Vec<String> = header_values(headers, "references")
        .iter()
        .flat_map(|value| message_ids(value))
        .collect();
    let mut in_reply_to = Vec::new();
    for id in parents.iter().chain(&references) {
        if !in_reply_to.contains(id) && *id != provider_id {
            in_reply_to.push(id.clone());
        }
    }
    let mut chain = Vec::new();
    extend_thread(
        &mut chain,
        references
            .iter()
            .chain(&parents)
            .filter(|id| **id != provider_id)
            .cloned(),
    );
    extend_thread(&mut chain, [provider_id.clone()]);

    let written = match field("text") {
        Some(text) => text.to_owned(),
        None => field("html").map(html_to_text).unwrap_or_default(),
    };
    let subject = field("subject").map(decode_words);

    let infos: BTreeMap<u32, AttachmentInfo> = field("attachment-info")
        .and_then(|info| serde_json::from_str::<BTreeMap<String, AttachmentInfo>>(info).ok())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(key, info)| Some((attachment_number(&key)?, info)))
        .collect();
    let numbers: std::collections::BTreeSet<u32> =
        files.keys().chain(infos.keys()).copied().collect();
    let attachments = numbers
        .into_iter()
        .map(|n| {
            let (file, info) = (files.get(&n), infos.get(&n));
            let name = info
                .and_then(|info| info.filename.clone().or_else(|| info.name.clone()))
                .or_else(|| file.and_then(|file| file.filename.clone()));
            let content_type = info
                .and_then(|info| info.content_type.clone())
                .or_else(|| file.and_then(|file| file.content_type.clone()))
                .unwrap_or_else(|| "application/octet-stream".to_owned());
            InboundAttachment {
                url: None,
                content_type,
                name,
                size: file.map(|file| file.body.len() as u64),
            }
        })
        .collect();

    Ok(InboundMail {
        message: InboundMessage {
            v: VERSION,
            channel: InboundChannel::Email,
            from: from.to_lowercase(),
            to: to.to_lowercase(),
            provider_id,
            text: strip_reply(&written),
            subject,
            attachments,
            from_name,
            in_reply_to,
        },
        chain,
    })
}

/// `attachment12` → 12.
fn attachment_number(name: &str) -> Option<u32> {
    name.strip_prefix("attachment")?.parse().ok()
}

/// A mailbox as a header shows it, `Jane Doe <jane@example.com>`, `"Doe, Jane" <…>`,
/// `jane@example.com` or `jane@example.com (Jane Doe)`: its display name (RFC 2047 words
/// decoded) and its address as written.
fn parse_mailbox(text: &str) -> Option<(Option<String>, String)> {
    let text = text.trim();
    let (name, address) = match (text.rfind('<'), text.rfind('>')) {
        (Some(open), Some(close)) if open < close => {
            let name = text[..open].trim();
            (unquote(name), text[open + 1..close].trim())
        }
        _ => match (text.find('('), text.rfind(')')) {
            (Some(open), Some(close)) if open < close => {
                let comment = text[open + 1..close].trim();
                (unquote(comment), text[..open].trim())
            }
            _ => (None, text),
        },
    };
    let address = address.strip_prefix("mailto:").unwrap_or(address);
    let (local, domain) = address.rsplit_once('@')?;
    let plain = |s: &str| {
        !s.is_empty()
            && !s
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || "<>,;()\"".contains(c))
    };
    if !plain(domain) || local.is_empty() || !plain(local.trim_matches('"')) {
        return None;
    }
    Some((name, address.to_owned()))
}

/// A display name without its quotes and escapes, its RFC 2047 words decoded; none when empty.
fn unquote(name: &str) -> Option<String> {
    let name = name.trim();
    let name = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => {
            let mut out = String::with_capacity(quoted.len());
            let mut chars = quoted.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => out.extend(chars.next()),
                    c => out.push(c),
                }
            }
            out
        }
        None => name.to_owned(),
    };
    let name = decode_words(&name).trim().to_owned();
    (!name.is_empty()).then_some(name)
}

/// The mailboxes of an address list (`a@x, "B, b" <b@x>`), split on the commas outside quotes
/// and angle brackets.
fn split_addresses(list: &str) -> Vec<&str> {
    let (mut parts, mut start, mut quoted, mut angle) = (Vec::new(), 0, false, false);
    let mut escaped = false;
    for (i, c) in list.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                parts.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(list[start..].trim());
    parts.retain(|part| !part.is_empty());
    parts
}

/// The values of header `name` in a raw header block, continuation lines unfolded, in order.
fn header_values(block: &str, name: &str) -> Vec<String> {
    let (mut values, mut current): (Vec<String>, Option<String>) = (Vec::new(), None);
    for line in block.lines() {
        if line.trim().is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(value) = current.as_mut() {
                if !value.is_empty() {
                    value.push(' ');
                }
                value.push_str(line.trim());
            }
            continue;
        }
        values.extend(current.take());
        if let Some((header, value)) = line.split_once(':') {
            if header.trim().eq_ignore_ascii_case(name) {
                current = Some(value.trim().to_owned());
            }
        }
    }
    values.extend(current);
    values
}

/// The Message-IDs in a header value (`<a@x> <b@x>`), each `<…>`. A bare `a@x` (some mailers
/// drop the brackets) counts when it is the whole value.
fn message_ids(value: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut rest = value;
    while let Some(open) = rest.find('<') {
        let Some(close) = rest[open..].find('>') else {
            break;
        };
        ids.extend(normalize_message_id(&rest[open..open + close + 1]));
        rest = &rest[open + close + 1..];
    }
    if ids.is_empty() && value.trim().contains('@') {
        ids.extend(normalize_message_id(value));
    }
    ids
}

/// A Message-ID in the worker's form, `<…>`: with or without its brackets on the way in; none
/// when it is empty or holds spaces or characters outside printable ASCII.
fn normalize_message_id(id: &str) -> Option<String> {
    let id = id.trim();
    let bare = id
        .strip_prefix('<')
        .and_then(|id| id.strip_suffix('>'))
        .unwrap_or(id);
    let valid = !bare.is_empty()
        && bare
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>');
    valid.then(|| format!("<{bare}>"))
}

/// What a contact wrote, without the mail it quotes or its signature: cut at the first line
/// that opens a quoted mail (`On … wrote:`, `-----Original Message-----`, an Outlook
/// `From:`/`Sent:` block), at a signature delimiter (`-- `), then without trailing `>` lines
/// and a closing `Sent from my …`. Quotes between the contact's own lines (an answer inline)
/// stay. When that leaves nothing, the text is kept whole: a contact's message is never empty
/// because of this.
fn strip_reply(text: &str) -> String {
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let lines: Vec<&str> = text.lines().collect();
    let mut kept: &[&str] = &lines;
    if let Some(start) = (0..lines.len()).find_map(|i| quote_opens_at(&lines, i)) {
        kept = &kept[..start];
    }
    if let Some(signature) = kept.iter().position(|line| line.trim_end() == "--") {
        kept = &kept[..signature];
    }
    let trailing = |kept: &mut &[&str]| {
        while let Some(last) = kept.last() {
            let last = last.trim();
            if last.is_empty() || last.starts_with('>') {
                *kept = &kept[..kept.len() - 1];
            } else {
                break;
            }
        }
    };
    trailing(&mut kept);
    if kept
        .last()
        .is_some_and(|last| last.trim().starts_with("Sent from my "))
    {
        kept = &kept[..kept.len() - 1];
        trailing(&mut kept);
    }
    while kept.first().is_some_and(|first| first.trim().is_empty()) {
        kept = &kept[1..];
    }
    let stripped = kept
        .iter()
        .map(|line| line.trim_end())
        .collect::<Vec<_>>()
        .join("\n");
    if stripped.is_empty() {
        text.trim().to_owned()
    } else {
        stripped
    }
}

/// Where a quoted mail begins, if line `i` opens one.
fn quote_opens_at(lines: &[&str], i: usize) -> Option<usize> {
    const WROTE: [&str; 6] = [
        "wrote:",
        "a écrit :",
        "a écrit:",
        "schrieb:",
        "escribió:",
        "scrisse:",
    ];
    const ON: [&str; 5] = ["On ", "Le ", "Am ", "El ", "Il "];
    let line = lines[i].trim();
    let next = |from: usize| {
        lines[from..]
            .iter()
            .map(|line| line.trim())
            .find(|line| !line.is_empty())
    };
    let wrote = |line: &str| WROTE.iter().any(|w| line.ends_with(w));
    let lower = line.to_lowercase();
    if line.starts_with("-----") && lower.contains("original message") {
        return Some(i);
    }
    if line.len() >= 10 && line.chars().all(|c| c == '_') {
        return next(i + 1)
            .is_some_and(|line| line.starts_with("From:"))
            .then_some(i);
    }
    if wrote(line) {
        let opens = ON.iter().any(|on| line.starts_with(on))
            || next(i + 1).is_some_and(|line| line.starts_with('>'));
        if opens {
            return Some(i);
        }
    }
    // `On Tue, 3 Dec 2026 at 08:00, Acme Help <help@acme.example>` / `wrote:`, wrapped.
    if ON.iter().any(|on| line.starts_with(on)) && !wrote(line) {
        if let Some(following) = lines.get(i + 1) {
            let following = following.trim();
            if wrote(following) && following.len() < line.len() {
                return Some(i);
            }
        }
    }
    // Outlook: `From: …` then `Sent: …` / `Date: …` and `To: …` / `Subject: …`.
    if line.starts_with("From:") {
        let block: Vec<&str> = lines[i + 1..]
            .iter()
            .take(5)
            .map(|line| line.trim())
            .collect();
        let has = |prefixes: &[&str]| {
            block
                .iter()
                .any(|line| prefixes.iter().any(|p| line.starts_with(p)))
        };
        if has(&["Sent:", "Date:"]) && has(&["To:", "Subject:"]) {
            return Some(i);
        }
    }
    None
}

/// The text of an HTML body: tags out, blocks as lines, entities decoded; what sits in a
/// `<blockquote>` (the quoted mail), `<style>`, `<script>` or `<head>` left out.
fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let (mut rest, mut skipping, mut quoted): (&str, Option<String>, usize) = (html, None, 0);
    while !rest.is_empty() {
        let Some(open) = rest.find('<') else {
            if skipping.is_none() && quoted == 0 {
                push_html_text(&mut out, rest);
            }
            break;
        };
        if skipping.is_none() && quoted == 0 {
            push_html_text(&mut out, &rest[..open]);
        }
        rest = &rest[open..];
        if let Some(comment) = rest.strip_prefix("<!--") {
            rest = comment.find("-->").map_or("", |end| &comment[end + 3..]);
            continue;
        }
        let Some(close) = rest.find('>') else {
            break;
        };
        let tag = &rest[1..close];
        rest = &rest[close + 1..];
        let closing = tag.starts_with('/');
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        if let Some(skipped) = &skipping {
            if closing && *skipped == name {
                skipping = None;
            }
            continue;
        }
        match name.as_str() {
            "style" | "script" | "head" | "title" if !closing && !tag.ends_with('/') => {
                skipping = Some(name)
            }
            "blockquote" if closing => quoted = quoted.saturating_sub(1),
            "blockquote" => quoted += 1,
            "br" if quoted == 0 => {
                out.truncate(out.trim_end_matches(' ').len());
                out.push('\n');
            }
            // A block starts and ends on a line of its own.
            "p" | "div" | "tr" | "li" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "table"
            | "ul" | "ol" | "pre"
                if quoted == 0 =>
            {
                out.truncate(out.trim_end_matches(' ').len());
                if !out.is_empty() && !out.ends_with('\n') {
                    out.push('\n');
                }
            }
            _ => {}
        }
    }
    let mut text = String::with_capacity(out.len());
    let mut blank = 0;
    for line in out.lines().map(str::trim) {
        if line.is_empty() {
            blank += 1;
            continue;
        }
        if !text.is_empty() {
            text.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        text.push_str(line);
        blank = 0;
    }
    text
}

/// Appends HTML text: its whitespace runs as one space, its entities decoded.
fn push_html_text(out: &mut String, text: &str) {
    let mut last_space = out.ends_with([' ', '\n']) || out.is_empty();
    let decoded = decode_entities(text);
    for c in decoded.chars() {
        if c.is_whitespace() && c != '\u{a0}' {
            if !last_space {
                out.push(' ');
                last_space = true;
            }
        } else {
            out.push(if c == '\u{a0}' { ' ' } else { c });
            last_space = false;
        }
    }
}

fn decode_entities(text: &str) -> String {
    if !text.contains('&') {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let entity = rest[1..]
            .find(';')
            .filter(|end| *end <= 10)
            .map(|end| &rest[1..1 + end]);
        let decoded = entity.and_then(|entity| match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            _ => {
                let number = entity.strip_prefix('#')?;
                let code = match number.strip_prefix(['x', 'X']) {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => number.parse().ok()?,
                };
                char::from_u32(code)
            }
        });
        match (entity, decoded) {
            (Some(entity), Some(c)) => {
                out.push(c);
                rest = &rest[entity.len() + 2..];
            }
            _ => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A header's RFC 2047 encoded words (`=?UTF-8?B?…?=`, `=?ISO-8859-1?Q?…?=`) decoded; the
/// space between two encoded words goes, as the RFC says.
fn decode_words(value: &str) -> String {
    if !value.contains("=?") {
        return value.to_owned();
    }
    let (mut out, mut rest, mut after_word) = (String::new(), value, false);
    while let Some(start) = rest.find("=?") {
        let (before, candidate) = rest.split_at(start);
        match encoded_word(candidate) {
            Some((decoded, length)) => {
                if !(after_word && before.trim().is_empty()) {
                    out.push_str(before);
                }
                out.push_str(&decoded);
                rest = &candidate[length..];
                after_word = true;
            }
            None => {
                out.push_str(before);
                out.push_str("=?");
                rest = &candidate[2..];
                after_word = false;
            }
        }
    }
    out.push_str(rest);
    out
}

/// One encoded word at the start of `text` (which starts with `=?`): its text and its length.
fn encoded_word(text: &str) -> Option<(String, usize)> {
    let inner = &text[2..];
    let (charset, inner) = inner.split_once('?')?;
    let (encoding, inner) = inner.split_once('?')?;
    let end = inner.find("?=")?;
    let encoded = &inner[..end];
    if encoded.contains(char::is_whitespace) || charset.contains(char::is_whitespace) {
        return None;
    }
    let bytes = match encoding {
        "B" | "b" => {
            let engine = base64::engine::GeneralPurpose::new(
                &base64::alphabet::STANDARD,
                base64::engine::GeneralPurposeConfig::new()
                    .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
            );
            engine.decode(encoded).ok()?
        }
        "Q" | "q" => {
            let mut bytes = Vec::with_capacity(encoded.len());
            let raw = encoded.as_bytes();
            let mut i = 0;
            while i < raw.len() {
                match raw[i] {
                    b'_' => bytes.push(b' '),
                    b'=' if i + 2 < raw.len() => {
                        let hex = std::str::from_utf8(&raw[i + 1..i + 3]).ok()?;
                        bytes.push(u8::from_str_radix(hex, 16).ok()?);
                        i += 2;
                    }
                    b'=' => return None,
                    byte => bytes.push(byte),
                }
                i += 1;
            }
            bytes
        }
        _ => return None,
    };
    let length = 2 + charset.len() + 1 + encoding.len() + 1 + end + 2;
    // `UTF-8*en`: the language (RFC 2231) says nothing of the bytes.
    let charset = charset.split('*').next().unwrap_or(charset);
    Some((decode_charset(&bytes, charset), length))
}

/// Text in a mail's charset: UTF-8 (and ASCII) as is, Latin-1 (and Windows-1252, near enough)
/// byte for character, anything else as UTF-8 with replacement characters.
fn decode_charset(bytes: &[u8], charset: &str) -> String {
    match charset.trim().to_ascii_lowercase().as_str() {
        "iso-8859-1" | "iso8859-1" | "latin1" | "latin-1" | "l1" | "windows-1252" | "cp1252" => {
            bytes.iter().map(|&b| b as char).collect()
        }
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// `%XX` escapes decoded (a URL's user and password, an RFC 5987 filename).
fn percent_decode(text: &str) -> String {
    let raw = text.as_bytes();
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = raw
            .get(i + 1..i + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (raw[i], hex) {
            (b'%', Some(byte)) => {
                bytes.push(byte);
                i += 3;
            }
            (byte, _) => {
                bytes.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `multipart/form-data` (RFC 7578) read with multer from a body already in memory (the
/// webhook server reads bodies whole, bounded): each part's name, file name, type and bytes.
mod form {
    use bytes::Bytes;

    /// One part of a form.
    #[derive(Debug, Clone, PartialEq)]
    pub(super) struct Part {
        pub(super) name: String,
        pub(super) filename: Option<String>,
        pub(super) content_type: Option<String>,
        pub(super) body: Bytes,
    }

    /// The boundary of a `multipart/form-data` content type; none for any other type.
    pub(super) fn boundary(content_type: &str) -> Option<String> {
        let media_type = content_type.split(';').next()?.trim();
        if !media_type.eq_ignore_ascii_case("multipart/form-data") {
            return None;
        }
        multer::parse_boundary(content_type)
            .ok()
            .filter(|boundary| !boundary.is_empty() && boundary.len() <= 200)
    }

    /// The parts of `body`, delimited by `boundary`; `Err` says what is malformed.
    pub(super) async fn parse(body: Bytes, boundary: &str) -> Result<Vec<Part>, String> {
        let whole = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
        let mut multipart = multer::Multipart::new(whole, boundary);
        let mut parts = Vec::new();
        while let Some(field) = multipart.next_field().await.map_err(|e| e.to_string())? {
            let Some(name) = field.name().map(str::to_owned) else {
                continue;
            };
            let filename = field
                .file_name()
                .map(str::to_owned)
                .or_else(|| extended_filename(field.headers()));
            let content_type = field.content_type().map(|t| t.to_string());
            let body = field.bytes().await.map_err(|e| e.to_string())?;
            parts.push(Part {
                name,
                filename,
                content_type,
                body,
            });
        }
        Ok(parts)
    }

    /// RFC 5987's `filename*=UTF-8''na%C3%AFve.txt`, which multer leaves aside.
    fn extended_filename(headers: &hyper::HeaderMap) -> Option<String> {
        let disposition = headers
            .get(hyper::header::CONTENT_DISPOSITION)?
            .to_str()
            .ok()?;
        let value = disposition
            .split(';')
            .filter_map(|param| param.split_once('='))
            .find(|(key, _)| key.trim().eq_ignore_ascii_case("filename*"))?
            .1
            .trim()
            .trim_matches('"');
        let encoded = value.rsplit("''").next().unwrap_or(value);
        Some(super::percent_decode(encoded))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn a_reply_loses_the_mail_it_quotes_and_its_signature() {
        let gmail = "Thanks, that works!\r\n\r\nOn Tue, 3 Dec 2026 at 08:00, Acme Help <help@acme.example> wrote:\r\n> Your order shipped\r\n> \r\n";
        assert_eq!(strip_reply(gmail), "Thanks, that works!");

        let wrapped = "Great.\n\nOn Tue, 3 Dec 2026 at 08:00, Acme Help Desk <help@acme.example>\nwrote:\n\n> old\n";
        assert_eq!(strip_reply(wrapped), "Great.");

        let outlook =
            "See below.\n\n-----Original Message-----\nFrom: Acme\nSent: Tuesday\nYour order";
        assert_eq!(strip_reply(outlook), "See below.");

        let outlook_block = "Fine\n\n________________________________\nFrom: Acme Help\nSent: 3 December\nTo: Kim\nSubject: Order";
        assert_eq!(strip_reply(outlook_block), "Fine");

        let from_block = "Fine\nFrom: Acme Help <help@acme.example>\nDate: 3 December\nTo: Kim\n";
        assert_eq!(strip_reply(from_block), "Fine");

        let signed = "Kind regards\nJane\n-- \nJane Doe\nACME Corp\n+1 555 0100";
        assert_eq!(strip_reply(signed), "Kind regards\nJane");

        let trailing = "Yes please\n> Shall we ship?\n>\n";
        assert_eq!(strip_reply(trailing), "Yes please");

        let phone = "On my way\n\nSent from my iPhone\n\n> earlier\n";
        assert_eq!(strip_reply(phone), "On my way");

        let french =
            "Merci\n\nLe mar. 3 déc. 2026 à 08:00, Acme <help@acme.example> a écrit :\n> bonjour";
        assert_eq!(strip_reply(french), "Merci");
    }

    #[test]
    fn inline_answers_and_ordinary_lines_stay() {
        let inline = "> Which size?\nLarge\n> Which colour?\nBlue\n\nThanks";
        assert_eq!(strip_reply(inline), inline);
        let mentions = "My colleague wrote: please call me.\nOn Monday I am out.";
        assert_eq!(strip_reply(mentions), mentions);
        // All quote: kept whole rather than emptied.
        assert_eq!(strip_reply("> only a quote\n"), "> only a quote");
        assert_eq!(strip_reply(""), "");
    }

    #[test]
    fn mailboxes_give_their_name_and_address() {
        let parsed = |text| parse_mailbox(text);
        assert_eq!(
            parsed("Jane Doe <Jane@Example.com>"),
            Some((Some("Jane Doe".into()), "Jane@Example.com".into()))
        );
        assert_eq!(
            parsed(r#""Doe, \"JD\" Jane" <jane@example.com>"#),
            Some((Some(r#"Doe, "JD" Jane"#.into()), "jane@example.com".into()))
        );
        assert_eq!(
            parsed("jane@example.com"),
            Some((None, "jane@example.com".into()))
        );
        assert_eq!(
            parsed("<jane@example.com>"),
            Some((None, "jane@example.com".into()))
        );
        assert_eq!(
            parsed("jane@example.com (Jane Doe)"),
            Some((Some("Jane Doe".into()), "jane@example.com".into()))
        );
        assert_eq!(
            parsed("=?UTF-8?B?SsO2cmcgTcO8bGxlcg==?= <jorg@example.de>"),
            Some((Some("Jörg Müller".into()), "jorg@example.de".into()))
        );
        assert_eq!(
            parsed("=?ISO-8859-1?Q?Andr=E9?= =?ISO-8859-1?Q?_Pirard?= <a@b.example>"),
            Some((Some("André Pirard".into()), "a@b.example".into()))
        );
        assert_eq!(parsed("Jane Doe"), None);
        assert_eq!(parsed("<>"), None);
        assert_eq!(parsed("jane@"), None);
        assert_eq!(parsed("two words@example.com"), None);
        assert_eq!(
            split_addresses(r#"help@acme.example, "Doe, Jane" <jane@x.example>,, <b@x>"#),
            vec![
                "help@acme.example",
                r#""Doe, Jane" <jane@x.example>"#,
                "<b@x>"
            ]
        );
    }

    #[test]
    fn message_ids_keep_their_brackets_and_threads_keep_the_newest() {
        let block = "Received: from x\r\nMessage-ID:\r\n <abc@mail.example>\r\nIn-Reply-To: <p@acme.example>\r\nReferences: <a@acme.example>\r\n\t<p@acme.example>\r\nSubject: hi\r\n\r\nMessage-ID: <body@x>";
        assert_eq!(
            header_values(block, "message-id"),
            vec!["<abc@mail.example>"]
        );
        assert_eq!(
            message_ids(&header_values(block, "references")[0]),
            vec!["<a@acme.example>", "<p@acme.example>"]
        );
        assert_eq!(message_ids("bare@id.example"), vec!["<bare@id.example>"]);
        assert_eq!(message_ids("<> <ok@x> <bad id@x>"), vec!["<ok@x>"]);
        assert_eq!(normalize_message_id(" x@y "), Some("<x@y>".into()));
        assert_eq!(normalize_message_id("<é@y>"), None);

        assert_eq!(
            message_id_for("01JABC", "acme.example"),
            "<01JABC@acme.example>"
        );
        assert_eq!(message_id_for("a b=c@d<", "x"), "<a=20b=3Dc=40d=3C@x>");

        let mut thread: Vec<String> = (0..THREAD_LENGTH).map(|i| format!("<{i}@x>")).collect();
        extend_thread(&mut thread, ["<3@x>".to_owned(), "<new@x>".to_owned()]);
        assert_eq!(thread.len(), THREAD_LENGTH);
        assert_eq!(thread[THREAD_LENGTH - 2..], ["<3@x>", "<new@x>"]);
        assert_eq!(thread[0], "<1@x>");
    }

    #[test]
    fn html_bodies_read_as_text_without_their_quotes() {
        let html = "<html><head><style>p{}</style></head><body><div>Hello &amp; thanks,</div>\n<div>Jane<br>Doe</div><blockquote>old <b>stuff</b><blockquote>older</blockquote></blockquote><p>after&nbsp;quote &#233;&#x41;</p><!-- <p>x</p> --></body></html>";
        assert_eq!(
            html_to_text(html),
            "Hello & thanks,\nJane\nDoe\nafter quote éA"
        );
    }

    #[test]
    fn encoded_words_and_charsets_decode() {
        assert_eq!(
            decode_words("=?utf-8?q?caf=C3=A9_au_lait?="),
            "café au lait"
        );
        assert_eq!(decode_words("Re: =?UTF-8?B?w6k=?= ok"), "Re: é ok");
        assert_eq!(decode_words("=?bogus"), "=?bogus");
        assert_eq!(decode_words("=?utf-8?q?bad=Z?="), "=?utf-8?q?bad=Z?=");
        assert_eq!(decode_charset(b"caf\xe9", "ISO-8859-1"), "café");
        assert_eq!(percent_decode("p%40ss%20word%zz"), "p@ss word%zz");
    }

    #[tokio::test]
    async fn a_sendgrid_form_parses_into_its_parts() {
        let body = Bytes::from_static(
            b"preamble\r\n--xYzZY\r\nContent-Disposition: form-data; name=\"from\"\r\n\r\nJane <jane@example.com>\r\n--xYzZY\r\nContent-Disposition: form-data; name=\"attachment1\"; filename=\"a;b \\\"c\\\".pdf\"\r\nContent-Type: application/pdf\r\n\r\n%PDF\r\n--x\r\n--xYzZY\r\ncontent-disposition: form-data; name=\"attachment2\"; filename*=UTF-8''na%C3%AFve.txt\r\n\r\n\r\n--xYzZY--\r\n",
        );
        let boundary =
            form::boundary("multipart/form-data; charset=utf-8; boundary=\"xYzZY\"").unwrap();
        let parts = form::parse(body, &boundary).await.unwrap();
        assert_eq!(parts.len(), 3);
        assert_eq!(
            (parts[0].name.as_str(), parts[0].body.as_ref()),
            ("from", &b"Jane <jane@example.com>"[..])
        );
        assert_eq!(parts[1].filename.as_deref(), Some("a;b \"c\".pdf"));
        assert_eq!(parts[1].content_type.as_deref(), Some("application/pdf"));
        assert_eq!(parts[1].body.as_ref(), b"%PDF\r\n--x");
        assert_eq!(parts[2].filename.as_deref(), Some("naïve.txt"));
        assert!(parts[2].body.is_empty());

        assert_eq!(form::boundary("application/json"), None);
        assert_eq!(form::boundary("multipart/form-data"), None);
        let unended = form::parse(Bytes::from_static(b"--b\r\n\r\nno end"), "b").await;
        assert!(unended.is_err(), "{unended:?}");
    }

    fn field(name: &str, value: &str) -> form::Part {
        form::Part {
            name: name.to_owned(),
            filename: None,
            content_type: None,
            body: Bytes::copy_from_slice(value.as_bytes()),
        }
    }

    #[test]
    fn an_inbound_form_becomes_an_inbound_message() {
        let parts = vec![
            field("from", "=?UTF-8?Q?Jane_D=C3=B6e?= <Jane@Example.COM>"),
            field("to", "Acme Help <help@acme.example>, other@acme.example"),
            field("envelope", r#"{"to":["Help@Acme.example"],"from":"bounce@example.com"}"#),
            field("subject", "Re: Your order"),
            field("text", "Yes!\n\nOn Mon, Acme wrote:\n> shipped?"),
            field(
                "headers",
                "Message-ID: <reply-1@mail.example.com>\nIn-Reply-To: <01J@acme.example>\nReferences: <00@acme.example> <01J@acme.example>\n",
            ),
            field(
                "attachment-info",
                r#"{"attachment1":{"filename":"invoice.pdf","type":"application/pdf"},"attachment2":{"filename":"gone.txt","type":"text/plain"}}"#,
            ),
            form::Part {
                name: "attachment1".into(),
                filename: Some("invoice.pdf".into()),
                content_type: Some("application/pdf".into()),
                body: Bytes::from_static(b"%PDF-1.4"),
            },
        ];
        let mail = read_inbound(parts, "acme.example").unwrap();
        let message = mail.message;
        assert_eq!(message.from, "jane@example.com");
        assert_eq!(message.from_name.as_deref(), Some("Jane Döe"));
        assert_eq!(message.to, "help@acme.example");
        assert_eq!(message.provider_id, "<reply-1@mail.example.com>");
        assert_eq!(message.text, "Yes!");
        assert_eq!(message.subject.as_deref(), Some("Re: Your order"));
        assert_eq!(
            message.in_reply_to,
            ["<01J@acme.example>", "<00@acme.example>"]
        );
        assert_eq!(
            mail.chain,
            [
                "<00@acme.example>",
                "<01J@acme.example>",
                "<reply-1@mail.example.com>"
            ]
        );
        assert_eq!(message.attachments.len(), 2);
        assert_eq!(message.attachments[0].name.as_deref(), Some("invoice.pdf"));
        assert_eq!(message.attachments[0].size, Some(8));
        assert_eq!(message.attachments[1].size, None);
        assert_eq!(message.channel, InboundChannel::Email);
    }

    #[test]
    fn an_inbound_form_without_a_message_id_gets_a_stable_one() {
        let form = || {
            vec![
                field("from", "kim@example.com"),
                field("to", "help@acme.example"),
                field("html", "<p>Hello</p>"),
                field("charsets", r#"{"html":"iso-8859-1"}"#),
            ]
        };
        let first = read_inbound(form(), "acme.example").unwrap().message;
        let again = read_inbound(form(), "acme.example").unwrap().message;
        assert_eq!(first.provider_id, again.provider_id);
        assert!(
            first.provider_id.starts_with("<sha1."),
            "{}",
            first.provider_id
        );
        assert!(first.provider_id.ends_with("@acme.example>"));
        assert_eq!(first.text, "Hello");

        let missing_from = read_inbound(vec![field("to", "help@acme.example")], "x");
        assert!(missing_from.unwrap_err().contains("`from`"));
        let no_recipient = read_inbound(vec![field("from", "kim@example.com")], "x");
        assert!(no_recipient.unwrap_err().contains("recipient"));
    }

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        email: EmailConfig,
    }

    fn config(args: &[&str]) -> EmailConfig {
        use clap::Parser;
        Flags::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
            .unwrap()
            .email
    }

    #[test]
    fn relay_urls_are_checked_and_secrets_stay_out_of_debug() {
        let relay = config(&["--smtp-url", "smtp://user:p%40ss@127.0.0.1:2525"]);
        let built = relay.relay().unwrap();
        assert_eq!(built.address, "127.0.0.1:2525");
        let shown = format!("{relay:?}");
        assert!(!shown.contains("p%40ss"), "{shown}");
        assert_eq!(
            config(&["--smtp-url", "smtps://relay.example"])
                .relay()
                .unwrap()
                .address,
            "relay.example:465"
        );
        assert_eq!(
            config(&["--smtp-url", "smtp://[::1]"])
                .relay()
                .unwrap()
                .address,
            "::1:25"
        );
        assert!(config(&[]).check().unwrap_err().contains("--smtp-url"));
        assert!(config(&["--smtp-url", "http://x"])
            .check()
            .unwrap_err()
            .contains("scheme"));
        assert!(config(&["--smtp-url", "smtp://x?tls=sometimes"])
            .check()
            .is_err());
        assert!(config(&["--smtp-url", "not a url"]).check().is_err());
        let defaults = config(&[]);
        assert_eq!(defaults.email_domain, "localhost");
        assert_eq!(defaults.email_listen.to_string(), "127.0.0.1:8082");
        assert_eq!(defaults.email_max_inbound_mib, 30);
    }

    #[test]
    fn the_webhook_token_is_a_bearer_or_a_basic_password() {
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            headers
        };
        let basic = |credentials: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(credentials)
            )
        };
        assert!(authorized(&HeaderMap::new(), None));
        assert!(!authorized(&HeaderMap::new(), Some("s3cret")));
        assert!(authorized(&headers("Bearer s3cret"), Some("s3cret")));
        assert!(!authorized(&headers("Bearer s3cre"), Some("s3cret")));
        assert!(authorized(
            &headers(&basic("sendgrid:s3cret")),
            Some("s3cret")
        ));
        assert!(!authorized(&headers(&basic("s3cret:x")), Some("s3cret")));
        assert!(!authorized(&headers("Token s3cret"), Some("s3cret")));
    }
}
