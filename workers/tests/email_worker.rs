//! The email worker against a real SMTP server: aiosmtpd (Python, from PyPI; `scripts/smtp
//! install` puts it in `.tools/aiosmtpd`) runs a small handler that saves every mail it accepts,
//! refuses `bounce…@` recipients for good (550), answers `later…@` recipients "not now" (451)
//! once, and requires AUTH when started with credentials (`support/smtp.rs`). The tests read the
//! saved mails back and check their envelope, headers, body and threading. The worker reads an
//! in-process bus; inbound mail is posted to its webhook as SendGrid's Inbound Parse posts it.

#[path = "support/smtp.rs"]
mod smtp;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use integrations::bus::Consumer;
use integrations::events::{
    DeadLetter, DeliveryState, DeliveryStatus, InboundAttachment, InboundChannel, InboundMessage,
    OutboundEmail,
};
use integrations::{Bus, InProcessBus, Topics};
use prometheus::Registry;
use serde::de::DeserializeOwned;
use serde_json::Value;
use smtp::SmtpServer;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use workers::email::{self, EmailConfig};
use workers::runtime::{self, Ledger, Worker, WorkerMetrics};

/// The worker's consumer group (`Worker::group`).
const GROUP: &str = "email-worker";
const DOMAIN: &str = "acme.example";

/// An email worker on an in-process bus, with readers of what it publishes.
struct Harness {
    bus: Arc<InProcessBus>,
    topics: Topics,
    worker: Arc<Worker>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    url: String,
    statuses: Box<dyn Consumer>,
    inbound: Box<dyn Consumer>,
    dead: Box<dyn Consumer>,
    _state: TempDir,
}

impl Harness {
    async fn start(smtp_url: &str, inbound_token: Option<&str>) -> Harness {
        Harness::with_config(EmailConfig {
            smtp_url: Some(smtp_url.to_owned()),
            email_domain: DOMAIN.to_owned(),
            email_listen: "127.0.0.1:0".parse().unwrap(),
            email_max_inbound_mib: 1,
            email_inbound_token: inbound_token.map(str::to_owned),
            email_smtp_timeout_secs: 5,
            email_smtp_ca_file: None,
        })
        .await
    }

    async fn with_config(config: EmailConfig) -> Harness {
        let bus = InProcessBus::new(16 << 20);
        let topics = Topics::default();
        // Subscribed before anything is published: the in-process bus keeps records only for
        // groups that read them.
        let statuses = bus.subscribe(&topics.delivery_status, "test");
        let inbound = bus.subscribe(&topics.inbound_messages, "test");
        let dead = bus.subscribe(&topics.dead_letters, "test");
        drop(bus.subscribe(&topics.outbound_email, GROUP));
        let registry = Registry::new();
        let state = tempfile::tempdir().unwrap();
        let (stop, stopped) = watch::channel(false);
        let worker = Arc::new(Worker {
            name: "email",
            bus: bus.clone(),
            topics: topics.clone(),
            metrics: WorkerMetrics::new("email", &registry).unwrap(),
            ledger: Ledger::open(&state.path().join("email.sqlite")).unwrap(),
            stop: stopped,
        });
        assert_eq!(worker.group(), GROUP);
        config.check().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let task = tokio::spawn(email::run(worker.clone(), config, listener, registry));
        Harness {
            bus,
            topics,
            worker,
            stop,
            task: Some(task),
            url: format!("http://{addr}"),
            statuses,
            inbound,
            dead,
            _state: state,
        }
    }

    async fn send(&self, email: &OutboundEmail) {
        self.send_raw(integrations::encode(email).to_vec(), &email.room_id)
            .await;
    }

    async fn send_raw(&self, payload: Vec<u8>, key: &str) {
        self.bus
            .publish(&self.topics.outbound_email, key, payload.into())
            .await
            .unwrap();
    }

    fn calls(&self, outcome: &str) -> u64 {
        self.worker
            .metrics
            .provider_calls
            .with_label_values(&[outcome])
            .get()
    }

    /// Stops the worker: `run` returns soon after.
    async fn stop(&mut self) {
        self.stop.send(true).unwrap();
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the email worker did not stop within 10 s")
            .unwrap();
    }
}

/// The next record a test reader gets (within 15 s), decoded.
async fn next<T: DeserializeOwned>(consumer: &mut Box<dyn Consumer>) -> T {
    let record = tokio::time::timeout(Duration::from_secs(15), consumer.next())
        .await
        .expect("no record came within 15 s")
        .expect("the bus closed");
    consumer.commit(&record);
    serde_json::from_slice(&record.payload).unwrap()
}

/// Nothing more comes for a while.
async fn nothing_more(consumer: &mut Box<dyn Consumer>) {
    if let Ok(record) = tokio::time::timeout(Duration::from_millis(400), consumer.next()).await {
        panic!("unexpected record: {record:?}");
    }
}

fn outbound(message_id: &str, to: &str) -> OutboundEmail {
    OutboundEmail {
        v: 1,
        tenant_id: "acme".into(),
        room_id: "conv-1".into(),
        message_id: message_id.into(),
        // As the gateway sends it: the inbox's address, and its name beside it.
        from: "help@acme.example".into(),
        from_name: Some("Acme Help".into()),
        to: to.into(),
        subject: "Your order".into(),
        text: "Your order shipped.\nTracking: 42".into(),
        in_reply_to: None,
        references: Vec::new(),
    }
}

fn own_id(message_id: &str) -> String {
    format!("<{message_id}@{DOMAIN}>")
}

/// A contact's reply, as SendGrid's Inbound Parse posts it.
fn inbound_form(message_id: &str, in_reply_to: &str) -> reqwest::multipart::Form {
    let headers = format!(
        "Received: by mx.sendgrid.net\r\nFrom: Kim Lee <Kim@Example.com>\r\nTo: help@acme.example\r\n\
         Subject: Re: Your order\r\nMessage-ID: {message_id}\r\nIn-Reply-To: {in_reply_to}\r\n\
         References: {in_reply_to}\r\n"
    );
    let text = "Thanks, got it!\r\nOne more question: can I pick it up?\r\n\r\n-- \r\nKim Lee\r\n\
                +1 555 0100\r\n\r\nOn Tue, 3 Dec 2026 at 08:00, Acme Help <help@acme.example> wrote:\r\n\
                > Your order shipped.\r\n> Tracking: 42\r\n";
    reqwest::multipart::Form::new()
        .text("headers", headers)
        .text("dkim", "{@example.com : pass}")
        .text("to", "help@acme.example")
        .text("from", "Kim Lee <Kim@Example.com>")
        .text("text", text)
        .text("html", "<p>Thanks, got it!</p>")
        .text("sender_ip", "192.0.2.1")
        .text("envelope", r#"{"to":["help@acme.example"],"from":"kim@example.com"}"#)
        .text("attachments", "1")
        .text("subject", "Re: Your order")
        .text(
            "attachment-info",
            r#"{"attachment1":{"filename":"receipt.jpg","name":"receipt.jpg","type":"image/jpeg"}}"#,
        )
        .text("charsets", r#"{"to":"UTF-8","html":"UTF-8","subject":"UTF-8","from":"UTF-8","text":"UTF-8"}"#)
        .text("SPF", "pass")
        .part(
            "attachment1",
            reqwest::multipart::Part::bytes(vec![0xff; 1234])
                .file_name("receipt.jpg")
                .mime_str("image/jpeg")
                .unwrap(),
        )
}

#[tokio::test]
async fn a_mail_goes_out_once_with_its_headers_and_the_contacts_reply_threads_back() {
    let smtp = SmtpServer::start(&[("SMTP_USER", "relay-user"), ("SMTP_PASSWORD", "p@ss word")]);
    let relay = format!("smtp://relay-user:p%40ss%20word@127.0.0.1:{}", smtp.port);
    let mut harness = Harness::start(&relay, Some("inbound-secret")).await;

    // The first mail of a conversation: no threading headers.
    let first = outbound("01JMSG0001", "kim@example.com");
    harness.send(&first).await;
    let status: DeliveryStatus = next(&mut harness.statuses).await;
    let mails = smtp.wait_for(1).await;
    let mail = &mails[0];
    assert!(mail.authenticated, "the relay's credentials were not used");
    assert!(!mail.tls, "a relay without STARTTLS is used in the clear");
    assert_eq!(mail.mail_from, "help@acme.example");
    assert_eq!(mail.rcpt_tos, ["kim@example.com"]);
    assert_eq!(
        mail.header("From").as_deref(),
        Some("Acme Help <help@acme.example>")
    );
    assert_eq!(mail.header("To").as_deref(), Some("kim@example.com"));
    assert_eq!(mail.header("Subject").as_deref(), Some("Your order"));
    assert_eq!(
        mail.header("Message-ID"),
        Some(own_id("01JMSG0001")),
        "{mail:#?}"
    );
    assert_eq!(mail.header("In-Reply-To"), None);
    assert_eq!(mail.header("References"), None);
    assert!(mail.header("Date").is_some());
    assert_eq!(mail.header("MIME-Version").as_deref(), Some("1.0"));
    assert!(mail
        .header("Content-Type")
        .is_some_and(|t| t.starts_with("text/plain")));
    assert_eq!(mail.body.replace("\r\n", "\n").trim_end(), first.text);
    assert_eq!(
        status,
        DeliveryStatus {
            v: 1,
            tenant_id: "acme".into(),
            room_id: "conv-1".into(),
            message_id: "01JMSG0001".into(),
            status: DeliveryState::Sent,
            provider_id: Some(own_id("01JMSG0001")),
            error_code: None,
            error_message: None,
        }
    );

    // Read again (a redelivery): told `sent` again, not sent again.
    harness.send(&first).await;
    let again: DeliveryStatus = next(&mut harness.statuses).await;
    assert_eq!(again, status);
    assert_eq!(smtp.mails().len(), 1);
    assert_eq!((harness.calls("sent"), harness.calls("duplicate")), (1, 1));

    // The contact answers (quoting us, signed, with a photo): posted by the inbound parse.
    let client = runtime::http_client();
    let answered = client
        .post(format!("{}/inbound", harness.url))
        .basic_auth("sendgrid", Some("inbound-secret"))
        .multipart(inbound_form(
            "<kim-1@mail.example.com>",
            &own_id("01JMSG0001"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    let body: Value = answered.json().await.unwrap();
    assert_eq!(body["status"], "accepted");
    let message: InboundMessage = next(&mut harness.inbound).await;
    assert_eq!(
        message,
        InboundMessage {
            v: 1,
            channel: InboundChannel::Email,
            from: "kim@example.com".into(),
            to: "help@acme.example".into(),
            provider_id: "<kim-1@mail.example.com>".into(),
            text: "Thanks, got it!\nOne more question: can I pick it up?".into(),
            subject: Some("Re: Your order".into()),
            attachments: vec![InboundAttachment {
                url: None,
                content_type: "image/jpeg".into(),
                name: Some("receipt.jpg".into()),
                size: Some(1234),
            }],
            from_name: Some("Kim Lee".into()),
            in_reply_to: vec![own_id("01JMSG0001")],
        }
    );

    // Posted again (the provider retried): answered 200, published no more.
    let repeated = client
        .post(format!("{}/inbound", harness.url))
        .bearer_auth("inbound-secret")
        .multipart(inbound_form(
            "<kim-1@mail.example.com>",
            &own_id("01JMSG0001"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(repeated.status(), 200);
    assert_eq!(
        repeated.json::<Value>().await.unwrap()["status"],
        "duplicate"
    );
    nothing_more(&mut harness.inbound).await;

    // The agent's next message answers the contact's mail, under the whole thread.
    harness
        .send(&outbound("01JMSG0002", "kim@example.com"))
        .await;
    let status: DeliveryStatus = next(&mut harness.statuses).await;
    assert_eq!(status.provider_id, Some(own_id("01JMSG0002")));
    let mails = smtp.wait_for(2).await;
    let reply = &mails[1];
    assert_eq!(reply.header("Message-ID"), Some(own_id("01JMSG0002")));
    assert_eq!(
        reply.header("In-Reply-To").as_deref(),
        Some("<kim-1@mail.example.com>")
    );
    assert_eq!(
        reply.header("References"),
        Some(format!("{} <kim-1@mail.example.com>", own_id("01JMSG0001")))
    );

    // And the next one after that answers our own last mail.
    harness
        .send(&outbound("01JMSG0003", "Kim@Example.com"))
        .await;
    next::<DeliveryStatus>(&mut harness.statuses).await;
    let mails = smtp.wait_for(3).await;
    assert_eq!(mails[2].header("In-Reply-To"), Some(own_id("01JMSG0002")));
    assert_eq!(
        mails[2].header("References"),
        Some(format!(
            "{} <kim-1@mail.example.com> {}",
            own_id("01JMSG0001"),
            own_id("01JMSG0002")
        ))
    );

    // Threading the record carries wins over the worker's own.
    let mut explicit = outbound("01JMSG0004", "kim@example.com");
    explicit.in_reply_to = Some("<parent@mail.example.com>".into());
    explicit.references = vec!["root@mail.example.com".into()];
    harness.send(&explicit).await;
    next::<DeliveryStatus>(&mut harness.statuses).await;
    let mails = smtp.wait_for(4).await;
    assert_eq!(
        mails[3].header("In-Reply-To").as_deref(),
        Some("<parent@mail.example.com>")
    );
    assert_eq!(
        mails[3].header("References").as_deref(),
        Some("<root@mail.example.com> <parent@mail.example.com>")
    );
    assert_eq!(smtp.mails().len(), 4);
    assert_eq!(harness.calls("sent"), 4);

    // `/healthz` and `/metrics` next to the webhook.
    let health = client
        .get(format!("{}/healthz", harness.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = client
        .get(format!("{}/metrics", harness.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("worker_provider_calls_total")
            && metrics.contains("worker_webhook_requests_total"),
        "{metrics}"
    );
    harness.stop().await;
    assert_eq!(harness.bus.lag(&harness.topics.outbound_email, GROUP), 0);
}

/// A CA and a certificate it signed for 127.0.0.1, made by `openssl`: `(ca.pem, cert, key)`.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &str| {
        let output = Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(dir)
            .output()
            .expect("running openssl (is it installed?)");
        assert!(
            output.status.success(),
            "openssl {args}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    run(&format!(
        "req -x509 {key} -keyout ca.key -out ca.pem -days 2 -subj /CN=test-ca \
         -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
    ));
    run(&format!(
        "req {key} -keyout relay.key -out relay.csr -subj /CN=127.0.0.1"
    ));
    std::fs::write(
        dir.join("relay.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(
        "x509 -req -in relay.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out relay.pem \
         -days 2 -extfile relay.ext",
    );
    (
        dir.join("ca.pem"),
        dir.join("relay.pem"),
        dir.join("relay.key"),
    )
}

#[tokio::test]
async fn starttls_is_used_when_the_relay_offers_it_and_its_certificate_is_checked() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(pki.path());
    let smtp = SmtpServer::start(&[
        ("SMTP_CERT", cert.to_str().unwrap()),
        ("SMTP_KEY", key.to_str().unwrap()),
    ]);
    let relay = format!("smtp://127.0.0.1:{}", smtp.port);
    let config = |ca_file: Option<PathBuf>| EmailConfig {
        smtp_url: Some(relay.clone()),
        email_domain: DOMAIN.to_owned(),
        email_listen: "127.0.0.1:0".parse().unwrap(),
        email_max_inbound_mib: 1,
        email_inbound_token: None,
        email_smtp_timeout_secs: 5,
        email_smtp_ca_file: ca_file,
    };

    // The relay's CA is not a public one: without it the worker does not send, and tries again.
    let mut untrusting = Harness::with_config(config(None)).await;
    untrusting
        .send(&outbound("01JTLS0", "kim@example.com"))
        .await;
    for _ in 0..200 {
        if untrusting.calls("retried") >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(untrusting.calls("retried") >= 1);
    nothing_more(&mut untrusting.statuses).await;
    untrusting.stop().await;
    assert!(smtp.mails().is_empty());

    let mut harness = Harness::with_config(config(Some(ca))).await;
    harness.send(&outbound("01JTLS1", "kim@example.com")).await;
    let sent: DeliveryStatus = next(&mut harness.statuses).await;
    assert_eq!(sent.status, DeliveryState::Sent);
    let mails = smtp.wait_for(1).await;
    assert!(mails[0].tls, "the mail did not go over STARTTLS");
    assert_eq!(mails[0].header("Message-ID"), Some(own_id("01JTLS1")));
    harness.stop().await;
}

#[tokio::test]
async fn a_refused_recipient_fails_the_message_and_a_busy_relay_is_tried_again() {
    let smtp = SmtpServer::start(&[]);
    let mut harness = Harness::start(&format!("smtp://127.0.0.1:{}", smtp.port), None).await;

    harness
        .send(&outbound("01JBOUNCE", "bounce@example.com"))
        .await;
    let failed: DeliveryStatus = next(&mut harness.statuses).await;
    assert_eq!(failed.message_id, "01JBOUNCE");
    assert_eq!(failed.status, DeliveryState::Failed);
    assert_eq!(failed.error_code.as_deref(), Some("550"));
    assert!(
        failed
            .error_message
            .as_deref()
            .is_some_and(|m| m.contains("no such mailbox")),
        "{failed:?}"
    );

    // 451 first: tried again (the record holds), then taken.
    harness
        .send(&outbound("01JLATER", "later@example.com"))
        .await;
    let sent: DeliveryStatus = next(&mut harness.statuses).await;
    assert_eq!(
        (sent.message_id.as_str(), sent.status),
        ("01JLATER", DeliveryState::Sent)
    );
    let mails = smtp.wait_for(1).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].rcpt_tos, ["later@example.com"]);
    assert_eq!(
        (
            harness.calls("failed"),
            harness.calls("retried"),
            harness.calls("sent")
        ),
        (1, 1, 1)
    );

    // An address no relay could take fails without a call.
    harness.send(&outbound("01JNOADDR", "not an address")).await;
    let invalid: DeliveryStatus = next(&mut harness.statuses).await;
    assert_eq!(invalid.status, DeliveryState::Failed);
    assert_eq!(invalid.error_code.as_deref(), Some("INVALID_ADDRESS"));
    nothing_more(&mut harness.statuses).await;
    harness.stop().await;
}

#[tokio::test]
async fn a_poison_record_is_dead_lettered_and_the_next_one_is_sent() {
    let smtp = SmtpServer::start(&[]);
    let mut harness = Harness::start(&format!("smtp://127.0.0.1:{}", smtp.port), None).await;

    harness.send_raw(b"not json".to_vec(), "conv-9").await;
    let mut future = serde_json::to_value(outbound("01JV2", "kim@example.com")).unwrap();
    future["v"] = 2.into();
    harness
        .send_raw(serde_json::to_vec(&future).unwrap(), "conv-9")
        .await;
    harness.send(&outbound("01JGOOD", "kim@example.com")).await;

    let letter: DeadLetter = next(&mut harness.dead).await;
    assert_eq!(
        (
            letter.topic.as_str(),
            letter.key.as_str(),
            letter.payload.as_str()
        ),
        ("outbound.email", "conv-9", "not json")
    );
    assert!(letter.reason.contains("not JSON"), "{}", letter.reason);
    let letter: DeadLetter = next(&mut harness.dead).await;
    assert!(letter.reason.contains("version 2"), "{}", letter.reason);

    let sent: DeliveryStatus = next(&mut harness.statuses).await;
    assert_eq!(
        (sent.message_id.as_str(), sent.status),
        ("01JGOOD", DeliveryState::Sent)
    );
    let mails = smtp.wait_for(1).await;
    assert_eq!(mails[0].header("Message-ID"), Some(own_id("01JGOOD")));
    nothing_more(&mut harness.statuses).await;
    harness.stop().await;
}

#[tokio::test]
async fn an_unreachable_relay_is_tried_again_until_the_worker_stops() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut harness = Harness::start(&format!("smtp://127.0.0.1:{port}"), None).await;
    harness.send(&outbound("01JWAIT", "kim@example.com")).await;
    for _ in 0..200 {
        if harness.calls("retried") >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        harness.calls("retried") >= 2,
        "the send was not tried again"
    );
    nothing_more(&mut harness.statuses).await;
    harness.stop().await;
    // Not committed: the next worker reads it again.
    assert_eq!(harness.bus.lag(&harness.topics.outbound_email, GROUP), 1);
}

#[tokio::test]
async fn the_inbound_webhook_answers_bad_requests_with_json_errors() {
    // Nothing goes out in this test: the relay is never called.
    let mut harness = Harness::start("smtp://127.0.0.1:1", Some("s3cret")).await;
    let client = runtime::http_client();
    let inbound = format!("{}/inbound", harness.url);
    let form = || {
        reqwest::multipart::Form::new()
            .text("to", "help@acme.example")
            .text("text", "hello")
    };
    let error = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let content_type = response.headers()[reqwest::header::CONTENT_TYPE].clone();
        assert_eq!(content_type, "application/json");
        let body: Value = response.json().await.unwrap();
        let code = body["error"]["code"].as_str().unwrap().to_owned();
        let message = body["error"]["message"].as_str().unwrap().to_owned();
        (status, code, message)
    };

    let unauthenticated = client
        .post(&inbound)
        .multipart(form())
        .send()
        .await
        .unwrap();
    assert!(unauthenticated
        .headers()
        .contains_key(reqwest::header::WWW_AUTHENTICATE));
    assert_eq!(error(unauthenticated).await.1, "UNAUTHORIZED");
    let wrong = client
        .post(&inbound)
        .bearer_auth("s3cre")
        .multipart(form().text("from", "kim@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(error(wrong).await.0, 401);
    let wrong_password = client
        .post(&inbound)
        .basic_auth("s3cret", Some("nope"))
        .multipart(form().text("from", "kim@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(error(wrong_password).await.0, 401);

    let json = client
        .post(&inbound)
        .bearer_auth("s3cret")
        .json(&serde_json::json!({"from": "kim@example.com"}))
        .send()
        .await
        .unwrap();
    let (status, code, _) = error(json).await;
    assert_eq!((status, code.as_str()), (415, "UNSUPPORTED_MEDIA_TYPE"));

    let no_from = client
        .post(&inbound)
        .bearer_auth("s3cret")
        .multipart(form())
        .send()
        .await
        .unwrap();
    let (status, code, message) = error(no_from).await;
    assert_eq!((status, code.as_str()), (400, "BAD_REQUEST"));
    assert!(message.contains("`from`"), "{message}");

    let malformed = client
        .post(&inbound)
        .bearer_auth("s3cret")
        .header("content-type", "multipart/form-data; boundary=xyz")
        .body("this is no multipart body")
        .send()
        .await
        .unwrap();
    let (status, _, message) = error(malformed).await;
    assert_eq!(status, 400);
    assert!(message.contains("multipart"), "{message}");

    let too_large = client
        .post(&inbound)
        .bearer_auth("s3cret")
        .multipart(form().text("from", "kim@example.com").part(
            "attachment1",
            reqwest::multipart::Part::bytes(vec![0; 3 << 19]).file_name("big.bin"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(error(too_large).await.0, 413);

    let get = client
        .get(&inbound)
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(get.headers()[reqwest::header::ALLOW], "POST");
    assert_eq!(error(get).await.0, 405);

    let elsewhere = client
        .post(format!("{}/nowhere", harness.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error(elsewhere).await.0, 404);

    nothing_more(&mut harness.inbound).await;

    // The same webhook takes a good mail (without a Message-ID: one is made, stably).
    let accepted = client
        .post(&inbound)
        .bearer_auth("s3cret")
        .multipart(form().text("from", "kim@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 200);
    let message: InboundMessage = next(&mut harness.inbound).await;
    assert!(message.provider_id.starts_with("<sha1."), "{message:?}");
    assert_eq!((message.text.as_str(), message.from_name), ("hello", None));
    harness.stop().await;
}

#[test]
fn the_binary_explains_itself_and_refuses_to_start_without_a_relay() {
    let binary = env!("CARGO_BIN_EXE_email-worker");
    let help = Command::new(binary).arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--smtp-url",
        "EMAIL_SMTP_URL",
        "--email-domain",
        "--email-listen",
        "--email-max-inbound-mib",
        "--email-inbound-token",
        "--kafka-brokers",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }

    let run = |args: &[&str]| {
        Command::new(binary)
            .args(args)
            .env_remove("EMAIL_SMTP_URL")
            .env("KAFKA_BROKERS", "127.0.0.1:1")
            .output()
            .unwrap()
    };
    let missing = run(&[]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--smtp-url"));
    let wrong = run(&["--smtp-url", "ftp://relay.example"]);
    assert_eq!(wrong.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("scheme"));
}
