//! Bad input, authentication, limits and close codes (PROTOCOL.md §1-2), against a real gateway
//! on port 0. A well-behaved client uses tokio-tungstenite; what it will not send (invalid
//! UTF-8 fragments, huge frames, a peer that never reads) goes through a raw TCP client.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gateway::auth::{now_secs, Claims, Role};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{HeaderValue, AUTHORIZATION, ORIGIN};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

const TENANT: &str = "acme";
const QUIET: Duration = Duration::from_millis(300);

fn assert_error(v: &Value, code: &str, error_code: &str) {
    assert_eq!(v["status"], "error", "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["data"]["error_code"], error_code, "{v}");
    assert!(v["data"]["message"].is_string(), "{v}");
}

/// An admin may join any room of its tenant, so tests need not care who created a room.
async fn member(server: &TestServer, user: &str) -> Client {
    server.connect(user, TENANT, Role::Admin).await
}

/// Sends a frame that is not a usable envelope; expects `"code":"error"` BAD_REQUEST and a
/// connection that still serves requests.
async fn expect_code_error(text: &str) {
    let server = TestServer::start().await;
    let mut a = member(&server, "alice").await;
    a.send_text(text).await;
    let v = a.recv().await;
    assert_error(&v, "error", "BAD_REQUEST");
    assert!(v.get("ref").is_none(), "{v}");
    a.expect_silence(Duration::from_millis(100)).await;
    a.ping().await;
    server.stop().await;
}

/// Sends a raw frame carrying `ref: "bad-1"`; expects `chat_response` BAD_REQUEST echoing it.
async fn expect_chat_bad_request(frame: Value, echo_ref: bool) {
    let server = TestServer::start().await;
    let mut a = member(&server, "alice").await;
    a.join("r").await;
    a.send(frame).await;
    let v = a.recv().await;
    assert_error(&v, "chat_response", "BAD_REQUEST");
    if echo_ref {
        assert_eq!(v["ref"], "bad-1", "{v}");
    }
    a.ping().await;
    server.stop().await;
}

/// Two clients connected before the misbehaving one, both joined to one room.
async fn bystanders(server: &TestServer) -> (Client, Client) {
    let mut a = server.connect("witness-a", TENANT, Role::Admin).await;
    let mut b = server.connect("witness-b", TENANT, Role::Admin).await;
    a.join("calm").await;
    b.join("calm").await;
    a.drain(Duration::from_millis(100)).await;
    (a, b)
}

/// The bystanders keep chatting and a new client can connect.
async fn assert_unaffected(server: &TestServer, a: &mut Client, b: &mut Client) {
    let r = a.chat("calm", "still here").await;
    assert_eq!(r["status"], "success", "{r}");
    let e = b.recv_code("chat_response").await;
    assert_eq!(e["data"]["message"], "still here");
    let r = b.chat("calm", "me too").await;
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(
        a.recv_code("chat_response").await["data"]["message"],
        "me too"
    );
    let mut c = member(server, "newcomer").await;
    c.ping().await;
    c.join("calm").await;
}

fn ws_request(
    server: &TestServer,
    token: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let url = match token {
        Some(t) => server.url(t),
        None => format!("ws://{}/ws", server.addr),
    };
    url.into_client_request().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Frames that are not usable envelopes

#[tokio::test]
async fn malformed_json_is_bad_request_with_code_error() {
    expect_code_error(r#"{"code":"ping","user_id":"alice","data":{}"#).await;
}

#[tokio::test]
async fn json_array_is_bad_request_with_code_error() {
    expect_code_error(r#"[{"code":"ping","user_id":"alice","data":{}}]"#).await;
}

#[tokio::test]
async fn json_number_is_bad_request_with_code_error() {
    expect_code_error("42").await;
}

#[tokio::test]
async fn missing_code_is_bad_request_with_code_error() {
    expect_code_error(r#"{"user_id":"alice","data":{},"ref":"x"}"#).await;
}

#[tokio::test]
async fn code_that_is_not_a_string_is_bad_request_with_code_error() {
    expect_code_error(r#"{"code":5,"user_id":"alice","data":{}}"#).await;
    expect_code_error(r#"{"code":null,"user_id":"alice","data":{}}"#).await;
    expect_code_error(r#"{"code":"","user_id":"alice","data":{}}"#).await;
}

#[tokio::test]
async fn other_non_object_frames_are_bad_request_with_code_error() {
    for text in ["", "null", "true", "\"chat\"", "   "] {
        expect_code_error(text).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Wrong types and missing fields, reported against the request's code

#[tokio::test]
async fn user_id_of_wrong_type_is_bad_request_for_the_code() {
    expect_chat_bad_request(
        json!({"code": "chat", "user_id": 7, "room_id": "r", "ref": "bad-1",
               "data": {"message": "hi", "sender": "alice"}}),
        true,
    )
    .await;
}

#[tokio::test]
async fn data_array_is_bad_request_for_the_code() {
    expect_chat_bad_request(
        json!({"code": "chat", "user_id": "alice", "room_id": "r", "ref": "bad-1", "data": []}),
        true,
    )
    .await;
}

#[tokio::test]
async fn missing_data_is_bad_request_for_the_code() {
    expect_chat_bad_request(
        json!({"code": "chat", "user_id": "alice", "room_id": "r", "ref": "bad-1"}),
        true,
    )
    .await;
}

#[tokio::test]
async fn chat_without_room_id_is_bad_request() {
    expect_chat_bad_request(
        json!({"code": "chat", "user_id": "alice", "ref": "bad-1",
               "data": {"message": "hi", "sender": "alice"}}),
        true,
    )
    .await;
}

#[tokio::test]
async fn wrong_types_without_ref_are_still_answered() {
    expect_chat_bad_request(
        json!({"code": "chat", "user_id": "alice", "room_id": "r", "data": "text"}),
        false,
    )
    .await;
}

#[tokio::test]
async fn wrong_types_inside_data_are_bad_request() {
    let server = TestServer::start().await;
    let mut a = member(&server, "alice").await;
    a.join("r").await;
    let cases = [
        ("chat", json!({"message": 5, "sender": "alice"})),
        ("chat", json!({"sender": "alice"})),
        ("chat", json!({"message": "", "sender": "alice"})),
        (
            "chat",
            json!({"message": "hi", "sender": "alice", "type": "gif"}),
        ),
        (
            "chat",
            json!({"message": "hi", "sender": "alice", "attached_files": "a.png"}),
        ),
        (
            "chat",
            json!({"message": "hi", "sender": "alice", "metadata": [1]}),
        ),
        (
            "chat",
            json!({"message": "hi", "sender": "alice", "message_id": "x".repeat(65)}),
        ),
        ("typing", json!({"status": "thinking", "sender": "alice"})),
        ("presence", json!({"status": "asleep", "sender": "alice"})),
        ("join", json!({"since_seq": "3"})),
        ("historic", json!({"limit": -1})),
        ("read_receipt", json!({"sender": "alice"})),
    ];
    for (code, data) in cases {
        let v = a.request(code, Some("r"), data.clone()).await;
        assert_error(&v, &format!("{code}_response"), "BAD_REQUEST");
        assert_eq!(v["room_id"], "r", "{code} {data}: {v}");
    }
    // Nothing was stored by any of them.
    assert_eq!(a.chat("r", "ok").await["data"]["seq"], 1);
    server.stop().await;
}

#[tokio::test]
async fn overlong_ref_or_room_id_is_bad_request() {
    let server = TestServer::start().await;
    let mut a = member(&server, "alice").await;
    a.send(json!({"code": "ping", "user_id": "alice", "data": {}, "ref": "r".repeat(65)}))
        .await;
    let v = a.recv().await;
    assert_error(&v, "ping_response", "BAD_REQUEST");
    a.send(
        json!({"code": "join", "user_id": "alice", "data": {}, "ref": "j",
                  "room_id": "x".repeat(129)}),
    )
    .await;
    let v = a.recv().await;
    assert_error(&v, "join_response", "BAD_REQUEST");
    assert_eq!(v["ref"], "j");
    server.stop().await;
}

#[tokio::test]
async fn unknown_code_is_unknown_code_under_its_response_code() {
    let server = TestServer::start().await;
    let mut a = member(&server, "alice").await;
    a.send(json!({"code": "dance", "user_id": "alice", "room_id": "r", "data": {}, "ref": "u-1"}))
        .await;
    let v = a.recv().await;
    assert_error(&v, "dance_response", "UNKNOWN_CODE");
    assert_eq!(v["ref"], "u-1");
    assert_eq!(v["room_id"], "r");
    a.ping().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Identity and membership

#[tokio::test]
async fn user_id_other_than_the_token_subject_is_forbidden() {
    let server = TestServer::start().await;
    let mut a = member(&server, "alice").await;
    let mut b = member(&server, "bob").await;
    a.join("r").await;
    b.join("r").await;
    a.drain(QUIET).await;
    for (code, data) in [
        ("chat", json!({"message": "hi", "sender": "bob"})),
        ("join", json!({})),
        ("ping", json!({})),
    ] {
        a.send(json!({"code": code, "user_id": "bob", "room_id": "r", "data": data, "ref": "s-1"}))
            .await;
        let v = a.recv().await;
        assert_error(&v, &format!("{code}_response"), "FORBIDDEN");
        assert_eq!(v["ref"], "s-1");
        assert_eq!(v["user_id"], "alice", "{v}");
    }
    // bob saw nothing in his name.
    b.drain(QUIET).await.iter().for_each(|v| {
        assert_ne!(v["code"], "chat_response", "{v}");
    });
    server.stop().await;
}

#[tokio::test]
async fn sender_other_than_the_user_is_forbidden() {
    let server = TestServer::start().await;
    let mut a = member(&server, "alice").await;
    let mut b = member(&server, "bob").await;
    a.join("r").await;
    b.join("r").await;
    let m = b.chat("r", "from bob").await["data"]["message_id"].clone();
    a.drain(QUIET).await;
    for (code, data) in [
        ("chat", json!({"message": "hi", "sender": "bob"})),
        ("typing", json!({"status": "started", "sender": "bob"})),
        ("read_receipt", json!({"message_id": m, "sender": "bob"})),
        ("presence", json!({"status": "away", "sender": "bob"})),
    ] {
        let v = a.request(code, Some("r"), data).await;
        assert_error(&v, &format!("{code}_response"), "FORBIDDEN");
    }
    b.expect_silence(QUIET).await;
    server.stop().await;
}

#[tokio::test]
async fn chat_before_join_is_not_joined() {
    let server = TestServer::start().await;
    let mut a = member(&server, "alice").await;
    // A room nobody has loaded, and one that is loaded because someone else is in it.
    let v = a.chat("nowhere", "hi").await;
    assert_error(&v, "chat_response", "NOT_JOINED");
    assert_eq!(v["room_id"], "nowhere");
    let mut admin = server.connect("root", TENANT, Role::Admin).await;
    admin.join("busy").await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    let v = b.chat("busy", "hi").await;
    assert_error(&v, "chat_response", "NOT_JOINED");
    for (code, data) in [
        ("typing", json!({"status": "started", "sender": "bob"})),
        ("read_receipt", json!({"message_id": "m", "sender": "bob"})),
    ] {
        let v = b.request(code, Some("busy"), data).await;
        assert_error(&v, &format!("{code}_response"), "NOT_JOINED");
    }
    admin.expect_silence(QUIET).await;
    // Nothing was stored.
    assert_eq!(admin.chat("busy", "first").await["data"]["seq"], 1);
    server.stop().await;
}

#[tokio::test]
async fn message_over_16_kib_is_too_large() {
    let server = TestServer::start().await;
    let mut a = member(&server, "alice").await;
    a.join("r").await;
    let v = a.chat("r", &"a".repeat(16 * 1024 + 1)).await;
    assert_error(&v, "chat_response", "TOO_LARGE");
    assert!(v["ref"].is_string());
    let v = a.chat("r", &"a".repeat(16 * 1024)).await;
    assert_eq!(v["status"], "success", "{}", v["data"]);
    assert_eq!(v["data"]["seq"], 1);
    server.stop().await;
}

#[tokio::test]
async fn json_nested_10000_deep_is_bad_request_and_the_connection_still_works() {
    let server = TestServer::start().await;
    let mut a = member(&server, "alice").await;
    a.join("r").await;
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    a.send_text(&deep).await;
    assert_error(&a.recv().await, "error", "BAD_REQUEST");

    let frame = format!(
        r#"{{"code":"chat","user_id":"alice","room_id":"r","ref":"deep","data":{{"message":"hi","sender":"alice","metadata":{{"a":{deep}}}}}}}"#
    );
    a.send_text(&frame).await;
    let v = a.recv().await;
    assert_error(&v, "chat_response", "BAD_REQUEST");
    assert_eq!(v["ref"], "deep");

    let frame =
        format!(r#"{{"code":"chat","user_id":"alice","room_id":"r","ref":"deep2","data":{deep}}}"#);
    a.send_text(&frame).await;
    let v = a.recv().await;
    assert_error(&v, "chat_response", "BAD_REQUEST");

    let objects = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
    a.send_text(&objects).await;
    assert_error(&a.recv().await, "error", "BAD_REQUEST");

    // Deep but ignorable (an unknown field) must not hurt either.
    let frame =
        format!(r#"{{"code":"ping","user_id":"alice","ref":"deep3","data":{{}},"x":{deep}}}"#);
    a.send_text(&frame).await;
    let v = a.recv().await;
    assert_eq!(v["code"], "ping_response", "{v}");
    assert_eq!(v["ref"], "deep3");

    a.ping().await;
    assert_eq!(a.chat("r", "alive").await["data"]["seq"], 1);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Rate limits

#[tokio::test]
async fn requests_over_the_rate_limit_are_rate_limited() {
    let server = TestServer::start_with(|c| {
        c.rate_limit = 1;
        c.rate_burst = 3;
    })
    .await;
    let mut a = member(&server, "alice").await;
    for i in 0..10 {
        a.send(json!({"code": "ping", "user_id": "alice", "data": {}, "ref": format!("p{i}")}))
            .await;
    }
    let mut ok = 0;
    let mut limited = 0;
    for i in 0..10 {
        let v = a.recv().await;
        assert_eq!(v["code"], "ping_response", "{v}");
        assert_eq!(v["ref"], format!("p{i}"), "replies come in order");
        if v["status"] == "success" {
            ok += 1;
        } else {
            assert_error(&v, "ping_response", "RATE_LIMITED");
            limited += 1;
        }
    }
    assert!((3..=4).contains(&ok), "ok {ok}");
    assert_eq!(ok + limited, 10);
    // The bucket refills.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    a.ping().await;
    server.stop().await;
}

#[tokio::test]
async fn typing_over_its_rate_limit_is_rate_limited() {
    let server = TestServer::start_with(|c| c.typing_rate = 2).await;
    let mut a = member(&server, "alice").await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    a.join("r").await;
    b.join("r").await;
    a.drain(QUIET).await;
    for i in 0..12 {
        a.send(
            json!({"code": "typing", "user_id": "alice", "room_id": "r", "ref": format!("t{i}"),
                      "data": {"status": "started", "sender": "alice"}}),
        )
        .await;
    }
    let errors = a.drain(QUIET).await;
    for v in &errors {
        assert_error(v, "typing_response", "RATE_LIMITED");
        assert!(v["ref"].as_str().unwrap().starts_with('t'));
    }
    // Burst of twice the rate; maybe one more refilled meanwhile.
    assert!((7..=8).contains(&errors.len()), "{}", errors.len());
    let relayed = b.drain(QUIET).await;
    assert_eq!(relayed.len() + errors.len(), 12, "{relayed:?}");
    assert!(relayed
        .iter()
        .all(|v| v["code"] == "typing_response" && v["status"] == "success"));
    // Other requests are not affected by the typing bucket.
    a.ping().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Close codes (§1)

#[tokio::test]
async fn ten_megabyte_frame_closes_1009() {
    let server = TestServer::start().await;
    let (mut a, mut b) = bystanders(&server).await;
    let mut raw = RawClient::connect(server.addr, &token("big", TENANT, Role::Agent)).await;
    let mut writer = raw.writer.take().unwrap();
    let len = 10 * 1024 * 1024;
    let sender = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = writer.write_all(&raw_header(true, 0x1, len as u64)).await;
        let chunk = vec![b' '; 1024 * 1024];
        for _ in 0..10 {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    assert_eq!(raw.close_code(Duration::from_secs(10)).await, Some(1009));
    sender.abort();
    assert_unaffected(&server, &mut a, &mut b).await;
    server.stop().await;
}

#[tokio::test]
async fn ten_megabyte_message_from_tungstenite_closes_1009() {
    let server = TestServer::start().await;
    let (mut a, mut b) = bystanders(&server).await;
    let c = member(&server, "big").await;
    let text = format!(
        r#"{{"code":"ping","user_id":"big","data":{{}},"pad":"{}"}}"#,
        "x".repeat(10 * 1024 * 1024)
    );
    use futures_util::{SinkExt, StreamExt};
    let (mut sink, mut stream) = c.ws.split();
    let sender = tokio::spawn(async move {
        let _ = sink.send(Message::text(text)).await;
        sink
    });
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Err(_) => panic!("not closed within 10s"),
            Ok(Some(Ok(Message::Close(Some(frame))))) => break Some(u16::from(frame.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => break None,
        }
    };
    sender.abort();
    assert_eq!(code, Some(1009));
    assert_unaffected(&server, &mut a, &mut b).await;
    server.stop().await;
}

/// A ping envelope padded with spaces to exactly `len` bytes.
fn padded_ping(user: &str, len: usize) -> String {
    let mut text = format!(r#"{{"code":"ping","user_id":"{user}","data":{{}},"ref":"pad"}}"#);
    text.push_str(&" ".repeat(len - text.len()));
    text
}

#[tokio::test]
async fn frame_over_the_64_kib_default_closes_1009() {
    let server = TestServer::start().await;
    let (mut a, mut b) = bystanders(&server).await;
    let mut c = member(&server, "big").await;
    // Exactly at the limit is fine.
    c.send_text(&padded_ping("big", 64 * 1024)).await;
    let v = c.recv().await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["ref"], "pad");
    c.send_text(&padded_ping("big", 64 * 1024 + 1)).await;
    assert_eq!(c.closed().await, Closed::Code(1009));
    assert_unaffected(&server, &mut a, &mut b).await;
    server.stop().await;
}

#[tokio::test]
async fn fragmented_message_over_the_limit_closes_1009() {
    let server = TestServer::start().await;
    let (mut a, mut b) = bystanders(&server).await;
    let mut raw = RawClient::connect(server.addr, &token("frag", TENANT, Role::Agent)).await;
    // Fragments under the limit that add up to a message over it.
    let part = vec![b' '; 40 * 1024];
    raw.send_frame(false, 0x1, &part).await;
    raw.send_frame(true, 0x0, &part).await;
    assert_eq!(raw.close_code(Duration::from_secs(5)).await, Some(1009));
    assert_unaffected(&server, &mut a, &mut b).await;
    server.stop().await;
}

#[tokio::test]
async fn configured_message_limit_closes_1009() {
    let server = TestServer::start_with(|c| c.max_message_bytes = 1024).await;
    let mut c = member(&server, "small").await;
    c.send_text(&padded_ping("small", 1024)).await;
    assert_eq!(c.recv().await["status"], "success");
    c.send_text(&padded_ping("small", 1025)).await;
    assert_eq!(c.closed().await, Closed::Code(1009));
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_text_frame_closes_1007() {
    let server = TestServer::start().await;
    let (mut a, mut b) = bystanders(&server).await;
    let mut c = member(&server, "bad-utf8").await;
    let payload = b"{\"code\":\"ping\",\"user_id\":\"\xff\xfe\",\"data\":{}}".to_vec();
    c.send_raw(Message::Frame(Frame::message(
        payload,
        OpCode::Data(Data::Text),
        true,
    )))
    .await;
    assert_eq!(c.closed().await, Closed::Code(1007));
    assert_unaffected(&server, &mut a, &mut b).await;
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_in_a_fragment_closes_1007_before_the_message_ends() {
    let server = TestServer::start().await;
    let (mut a, mut b) = bystanders(&server).await;
    let mut raw = RawClient::connect(server.addr, &token("frag8", TENANT, Role::Agent)).await;
    raw.send_frame(false, 0x1, b"{\"code\":\"ping\",\xff").await;
    assert_eq!(raw.close_code(Duration::from_secs(5)).await, Some(1007));
    assert_unaffected(&server, &mut a, &mut b).await;
    server.stop().await;
}

#[tokio::test]
async fn binary_frame_closes_1003() {
    let server = TestServer::start().await;
    let (mut a, mut b) = bystanders(&server).await;
    let mut c = member(&server, "binary").await;
    c.send_raw(Message::binary(
        br#"{"code":"ping","user_id":"binary","data":{}}"#.to_vec(),
    ))
    .await;
    assert_eq!(c.closed().await, Closed::Code(1003));
    assert_unaffected(&server, &mut a, &mut b).await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// Writes a raw upgrade request and returns the status of the response head.
async fn raw_handshake_status(addr: std::net::SocketAddr, request: &str) -> u16 {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let (head, _) = read_response_head(&mut stream, Duration::from_secs(5)).await;
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn handshake_with_expired_token_is_401() {
    let server = TestServer::start().await;
    let expired = token_with(
        &claims("alice", TENANT, Role::Agent, now_secs() - 10),
        SECRET,
    );
    assert_eq!(
        handshake_status(ws_request(&server, Some(&expired))).await,
        401
    );
    server.stop().await;
}

#[tokio::test]
async fn handshake_with_alg_none_token_is_401() {
    let server = TestServer::start().await;
    let unsigned = alg_none_token(&claims("alice", TENANT, Role::Admin, now_secs() + 600));
    assert_eq!(
        handshake_status(ws_request(&server, Some(&unsigned))).await,
        401
    );
    server.stop().await;
}

#[tokio::test]
async fn handshake_with_token_signed_by_another_key_is_401() {
    let server = TestServer::start().await;
    let forged = token_with(
        &claims("alice", TENANT, Role::Admin, now_secs() + 600),
        "some-other-secret",
    );
    assert_eq!(
        handshake_status(ws_request(&server, Some(&forged))).await,
        401
    );
    server.stop().await;
}

#[tokio::test]
async fn handshake_without_token_is_401() {
    let server = TestServer::start().await;
    assert_eq!(handshake_status(ws_request(&server, None)).await, 401);
    let mut request = ws_request(&server, None);
    request.headers_mut().insert(
        AUTHORIZATION,
        HeaderValue::from_static("Basic YWxpY2U6cHc="),
    );
    assert_eq!(handshake_status(request).await, 401);
    server.stop().await;
}

#[tokio::test]
async fn handshake_with_garbage_token_is_401() {
    let server = TestServer::start().await;
    for garbage in ["garbage", "a.b.c", "", "eyJhbGciOiJIUzI1NiJ9.e30.x"] {
        assert_eq!(
            handshake_status(ws_request(&server, Some(garbage))).await,
            401,
            "{garbage:?}"
        );
    }
    let mut request = ws_request(&server, None);
    request
        .headers_mut()
        .insert(AUTHORIZATION, HeaderValue::from_static("Bearer garbage"));
    assert_eq!(handshake_status(request).await, 401);
    // The raw answer is a plain HTTP 401, not a switch of protocols.
    let status = raw_handshake_status(server.addr, &upgrade_request("garbage")).await;
    assert_eq!(status, 401);
    server.stop().await;
}

#[tokio::test]
async fn handshake_with_bearer_header_is_accepted() {
    let server = TestServer::start().await;
    let mut request = ws_request(&server, None);
    let bearer = format!("Bearer {}", token("alice", TENANT, Role::Agent));
    request
        .headers_mut()
        .insert(AUTHORIZATION, HeaderValue::from_str(&bearer).unwrap());
    let (ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status().as_u16(), 101);
    let mut client = Client {
        ws,
        user: "alice".into(),
        connected: Value::Null,
    };
    assert_eq!(client.recv().await["code"], "connected");
    client.ping().await;
    server.stop().await;
}

/// A token signed with jsonwebtoken directly, whatever the gateway expects.
fn signed(algorithm: Algorithm, key: &EncodingKey, claims: &Claims) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), claims, key).unwrap()
}

/// Connects with `token` and expects a working session.
async fn assert_accepted(server: &TestServer, token: &str, user: &str) {
    let mut client = Client::connect(&server.url(token), user).await;
    client.ping().await;
}

#[tokio::test]
async fn handshake_with_a_wrong_or_missing_audience_is_401_when_one_is_required() {
    let server = TestServer::start_with(|c| c.jwt_audience = vec!["chat".to_owned()]).await;
    let mut c = claims("alice", TENANT, Role::Agent, now_secs() + 600);
    for audience in [Some("billing"), Some(""), None] {
        c.aud = audience.map(Into::into);
        let t = token_with(&c, SECRET);
        assert_eq!(
            handshake_status(ws_request(&server, Some(&t))).await,
            401,
            "aud {audience:?}"
        );
    }
    c.aud = Some("chat".into());
    assert_accepted(&server, &token_with(&c, SECRET), "alice").await;
    server.stop().await;
}

/// An HS256 token of the test secret with exactly these claims, as an identity provider that
/// is not the gateway would sign it.
fn raw_token(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn handshake_with_an_audience_array_is_accepted_when_any_entry_matches() {
    let server = TestServer::start_with(|c| c.jwt_audience = vec!["chat".to_owned()]).await;
    let with_audience = |aud: Value| {
        raw_token(&json!({
            "sub": "alice", "tenant": TENANT, "role": "agent", "exp": now_secs() + 600,
            "aud": aud,
        }))
    };
    assert_accepted(&server, &with_audience(json!(["billing", "chat"])), "alice").await;
    assert_accepted(&server, &with_audience(json!(["chat"])), "alice").await;
    for aud in [json!(["billing", "crm"]), json!([])] {
        assert_eq!(
            handshake_status(ws_request(&server, Some(&with_audience(aud.clone())))).await,
            401,
            "aud {aud}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn handshake_with_a_token_not_yet_valid_is_401_beyond_the_leeway() {
    let server = TestServer::start_with(|c| c.jwt_leeway_secs = 30).await;
    let not_before = |nbf: u64| {
        raw_token(&json!({
            "sub": "alice", "tenant": TENANT, "role": "agent", "exp": now_secs() + 600,
            "nbf": nbf,
        }))
    };
    let future = not_before(now_secs() + 300);
    assert_eq!(
        handshake_status(ws_request(&server, Some(&future))).await,
        401
    );
    // Within the tolerated clock skew, and in the past, it is valid.
    assert_accepted(&server, &not_before(now_secs() + 10), "alice").await;
    assert_accepted(&server, &not_before(now_secs() - 60), "alice").await;
    server.stop().await;
}

#[tokio::test]
async fn handshake_with_a_wrong_or_missing_issuer_is_401_when_one_is_required() {
    let server =
        TestServer::start_with(|c| c.jwt_issuer = vec!["https://idp.example".to_owned()]).await;
    let mut c = claims("alice", TENANT, Role::Agent, now_secs() + 600);
    for issuer in [Some("https://evil.example"), Some("idp.example"), None] {
        c.iss = issuer.map(str::to_owned);
        let t = token_with(&c, SECRET);
        assert_eq!(
            handshake_status(ws_request(&server, Some(&t))).await,
            401,
            "iss {issuer:?}"
        );
    }
    c.iss = Some("https://idp.example".to_owned());
    assert_accepted(&server, &token_with(&c, SECRET), "alice").await;
    server.stop().await;
}

#[tokio::test]
async fn hs256_gateway_refuses_an_rs256_token() {
    let server = TestServer::start().await;
    let private = std::fs::read(key_file("rsa-private.pem")).unwrap();
    let rs256 = signed(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&private).unwrap(),
        &claims("alice", TENANT, Role::Admin, now_secs() + 600),
    );
    assert_eq!(
        handshake_status(ws_request(&server, Some(&rs256))).await,
        401
    );
    server.stop().await;
}

#[tokio::test]
async fn rs256_gateway_refuses_an_hs256_token_keyed_with_its_public_key_pem() {
    let server = TestServer::start_with(|c| {
        c.jwt_secret = None;
        c.jwt_public_key = Some(key_file("rsa-public.pem"));
    })
    .await;
    let c = claims("alice", TENANT, Role::Admin, now_secs() + 600);
    // The classic confusion: the public key, which anyone may have, used as an HMAC secret.
    let public = std::fs::read(key_file("rsa-public.pem")).unwrap();
    let forged = signed(Algorithm::HS256, &EncodingKey::from_secret(&public), &c);
    assert_eq!(
        handshake_status(ws_request(&server, Some(&forged))).await,
        401
    );
    // The shared test secret means nothing to this gateway either.
    let hs256 = token_with(&c, SECRET);
    assert_eq!(
        handshake_status(ws_request(&server, Some(&hs256))).await,
        401
    );
    // What the key pair's owner signs gets in.
    let private = std::fs::read(key_file("rsa-private.pem")).unwrap();
    let genuine = signed(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&private).unwrap(),
        &c,
    );
    assert_accepted(&server, &genuine, "alice").await;
    server.stop().await;
}

#[tokio::test]
async fn disallowed_origin_is_403_and_allowed_origin_upgrades() {
    let server =
        TestServer::start_with(|c| c.allowed_origin = vec!["https://app.example".to_owned()]).await;
    let t = token("alice", TENANT, Role::Agent);
    let mut request = ws_request(&server, Some(&t));
    request
        .headers_mut()
        .insert(ORIGIN, HeaderValue::from_static("https://evil.example"));
    assert_eq!(handshake_status(request).await, 403);
    // No Origin at all is not in the list either.
    assert_eq!(handshake_status(ws_request(&server, Some(&t))).await, 403);

    let mut request = ws_request(&server, Some(&t));
    request
        .headers_mut()
        .insert(ORIGIN, HeaderValue::from_static("https://app.example"));
    let (ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status().as_u16(), 101);
    let mut client = Client {
        ws,
        user: "alice".into(),
        connected: Value::Null,
    };
    assert_eq!(client.recv().await["code"], "connected");
    client.ping().await;
    server.stop().await;
}

#[tokio::test]
async fn token_expiring_during_the_session_gets_auth_error_then_1008() {
    let server = TestServer::start().await;
    let (mut a, mut b) = bystanders(&server).await;
    let short = token_with(
        &claims("brief", TENANT, Role::Admin, now_secs() + 2),
        SECRET,
    );
    let mut c = Client::connect(&server.url(&short), "brief").await;
    c.join("calm").await;
    c.ping().await;
    let v = c
        .recv_within(Duration::from_secs(5))
        .await
        .expect("an error frame when the token expires");
    assert_eq!(v["status"], "error", "{v}");
    assert_eq!(v["data"]["error_code"], "AUTH_ERROR", "{v}");
    assert_eq!(c.closed().await, Closed::Code(1008));
    // The others see brief go offline and carry on.
    let e = a.recv_code("presence_response").await;
    assert_eq!(e["data"]["sender"], "brief");
    b.drain(Duration::from_millis(100)).await;
    assert_unaffected(&server, &mut a, &mut b).await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Heartbeat

#[tokio::test]
async fn peer_that_never_answers_pings_is_closed_1001() {
    let server = TestServer::start_with(|c| c.heartbeat_ms = 200).await;
    let started = Instant::now();
    let mut raw = RawClient::connect(server.addr, &token("mute", TENANT, Role::Agent)).await;
    // Read what is there without answering anything: before three intervals, no close yet.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut pings = 0;
    while let Some(frame) = raw.read_frame(Duration::from_millis(50)).await {
        assert_ne!(frame.opcode, 0x8, "closed too early");
        pings += u32::from(frame.opcode == 0x9);
    }
    assert!(pings >= 1, "the server pings every heartbeat");
    assert_eq!(raw.close_code(Duration::from_secs(5)).await, Some(1001));
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(550), "{elapsed:?}");
    // And the connection is gone.
    assert!(raw.read_frame(Duration::from_secs(3)).await.is_none());
    server.stop().await;
}

#[tokio::test]
async fn peer_that_answers_pings_stays_connected_past_three_intervals() {
    let server = TestServer::start_with(|c| c.heartbeat_ms = 200).await;
    let mut c = member(&server, "lively").await;
    // recv_within lets tungstenite answer the pings while nothing else arrives.
    c.expect_silence(Duration::from_millis(1200)).await;
    c.ping().await;
    c.expect_silence(Duration::from_millis(800)).await;
    c.ping().await;
    server.stop().await;
}
