mod common;
use common::*;
use gateway::auth::Role;
use serde_json::json;

#[tokio::test]
async fn chat_round_trip() {
    let server = TestServer::start().await;
    let mut a = server.connect("alice", "acme", Role::Agent).await;
    let mut b = server.connect("bob", "acme", Role::Admin).await;
    let j = a.join("room-1").await;
    println!("{j}");
    let j = b.request("join", Some("room-1"), json!({})).await;
    println!("{j}");
    let r = a.chat("room-1", "hello").await;
    println!("{r}");
    assert_eq!(r["data"]["seq"], 1);
    let ev = b.recv_code("chat_response").await;
    println!("{ev}");
    assert_eq!(ev["data"]["message"], "hello");
    server.stop().await;
}
