//! The workers inside the gateway (no Kafka: the default): configured with the workers' own
//! flags, each runs as tasks on the in-process bus, serves its webhooks on its own address and
//! reports in the gateway's `/metrics`.

mod common;
#[path = "../../workers/tests/support/fcm.rs"]
mod fcm;
#[path = "common/twilio.rs"]
mod twilio;

use std::time::Duration;

use common::inbox::{admin, post, TENANT};
use common::*;
use gateway::auth::Role;
use serde_json::json;
use twilio::{post_webhook, Twilio, ACCOUNT_SID, AUTH_TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sms_worker_runs_inside_the_gateway_when_there_is_no_kafka() {
    let twilio = Twilio::start().await;
    let sms_listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let base_url = twilio.base_url();
    let server = TestServer::start_with(move |config| {
        config.sms.twilio_account_sid = Some(ACCOUNT_SID.into());
        config.sms.twilio_auth_token = Some(AUTH_TOKEN.into());
        config.sms.twilio_base_url = base_url;
        config.sms.sms_listen = sms_listen;
    })
    .await;
    let inbox = json!({"inbox_id": "sms", "name": "SMS",
                       "channel": {"type": "sms", "phone_number": "+15550100"}});
    let (status, reply) = post(&server, "/api/v1/inboxes", &admin(), inbox).await;
    assert_eq!(status, 201, "{reply}");
    let mut watcher = common::inbox::subscribed(&server, "agent-1").await;

    let url = format!("http://{sms_listen}/twilio/inbound");
    let params = [
        ("MessageSid", "SMip1"),
        ("From", "+15550177"),
        ("To", "+15550100"),
        ("Body", "Do you deliver?"),
    ];
    let (status, body) = post_webhook(&url, &params, None).await;
    assert_eq!(status, 200, "{body}");
    let created = watcher.recv_code("conversation_response").await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    let unsigned = post_webhook(&url, &params, Some(None)).await;
    assert_eq!(unsigned.0, 403);

    let agent = token("agent-1", TENANT, Role::Agent);
    let path = format!("/api/v1/conversations/{room}/messages");
    let (status, sent) = post(
        &server,
        &path,
        &agent,
        json!({"message": "We do", "message_id": "ip-1"}),
    )
    .await;
    assert_eq!(status, 201, "{sent}");
    let sent = twilio.wait_sent(1, Duration::from_secs(10)).await;
    assert_eq!(
        (sent[0].to.as_str(), sent[0].body.as_str()),
        ("+15550177", "We do")
    );
    // The worker's series are in the gateway's metrics, told apart by `worker`.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = server.metrics().await;
        if metrics.contains(r#"worker_provider_calls_total{outcome="sent",worker="sms"} 1"#) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_email_and_push_workers_run_inside_the_gateway_too() {
    let email_listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let push_listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The push worker reads its service account at start; nothing is sent in this test.
    let (_fcm, credentials) = fcm::start_with_account(dir.path()).await;
    let server = TestServer::start_with(move |config| {
        // No relay answers here: the worker starts, and mail it would send waits.
        config.email.smtp_url = Some("smtp://127.0.0.1:9".into());
        config.email.email_listen = email_listen;
        config.push.fcm_credentials = Some(credentials);
        config.push.push_listen = push_listen;
    })
    .await;
    let inbox = json!({"inbox_id": "mail", "name": "Mail",
                       "channel": {"type": "email", "address": "help@acme.example"}});
    let (status, reply) = post(&server, "/api/v1/inboxes", &admin(), inbox).await;
    assert_eq!(status, 201, "{reply}");
    let mut watcher = common::inbox::subscribed(&server, "agent-1").await;
    let form = reqwest::multipart::Form::new()
        .text(
            "headers",
            "Message-ID: <in-1@example.com>\r\nSubject: Hello\r\n",
        )
        .text("from", "Kim Lee <kim@example.com>")
        .text("to", "help@acme.example")
        .text("subject", "Hello")
        .text("text", "Is my order on its way?")
        .text(
            "envelope",
            r#"{"to":["help@acme.example"],"from":"kim@example.com"}"#,
        );
    let response = reqwest::Client::new()
        .post(format!("http://{email_listen}/inbound"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let created = watcher.recv_code("conversation_response").await;
    assert_eq!(
        created["data"]["conversation"]["title"], "Hello",
        "{created}"
    );
    for addr in [email_listen, push_listen] {
        let (status, _) = http_get(addr, "/healthz").await;
        assert_eq!(status, 200, "{addr}");
    }
    let metrics = server.metrics().await;
    for worker in ["email", "push"] {
        assert!(
            metrics.contains(&format!(
                r#"worker_provider_calls_total{{outcome="sent",worker="{worker}"}} 0"#
            )),
            "{worker}: {metrics}"
        );
    }
    server.stop().await;
}
