//! Files in an S3-compatible object store: the gateway with `--files-url s3://…` against a real
//! S3 server (SeaweedFS, started by `scripts/s3`; `S3_TEST_URL` names the bucket, the `AWS_*`
//! variables its endpoint and credentials). Without `S3_TEST_URL` the test fails in CI and is
//! skipped elsewhere, saying so.

mod common;

use common::*;
use gateway::auth::Role;
use serde_json::{json, Value};

fn bucket_url() -> Option<String> {
    match std::env::var("S3_TEST_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ if std::env::var("CI").as_deref() == Ok("true") => panic!(
            "S3_TEST_URL is not set: CI runs this test against a real S3 server (scripts/s3)"
        ),
        _ => {
            eprintln!(
                "SKIPPED: S3_TEST_URL is not set. Start a server (scripts/s3 start /tmp/s3 8333) \
                 and export what it prints"
            );
            None
        }
    }
}

#[tokio::test]
async fn files_round_trip_through_an_s3_bucket_with_ranges_and_access_checks() {
    let Some(url) = bucket_url() else {
        return;
    };
    // A prefix of its own, so reruns never meet an earlier run's objects.
    let prefix = format!("{url}/run-{}", ulid::Ulid::new());
    let server = TestServer::start_with(|config| config.files_url = Some(prefix.clone())).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}/api/v1", server.addr);
    let admin = token("root", "acme", Role::Admin);
    let body = json!({"room_id": "s3-1", "kind": "support", "participants": ["cust-1"]});
    let response = http
        .post(format!("{base}/conversations"))
        .bearer_auth(&admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let part = reqwest::multipart::Part::bytes(data.clone())
        .file_name("report.pdf")
        .mime_str("application/pdf")
        .unwrap();
    let form = reqwest::multipart::Form::new()
        .part("file", part)
        .text("room_id", "s3-1");
    let response = http
        .post(format!("{base}/files"))
        .bearer_auth(token("cust-1", "acme", Role::Customer))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let file: Value = response.json().await.unwrap();
    let url = format!("{base}/files/{}", file["file_id"].as_str().unwrap());

    let whole = http.get(&url).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.headers()["content-type"], "application/pdf");
    assert_eq!(whole.bytes().await.unwrap().as_ref(), data.as_slice());
    let tail = http
        .get(&url)
        .bearer_auth(token("cust-1", "acme", Role::Customer))
        .header("range", "bytes=-1000")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(
        tail.headers()["content-range"],
        format!("bytes 199000-199999/{}", data.len())
    );
    assert_eq!(tail.bytes().await.unwrap().as_ref(), &data[199_000..]);
    let other = http
        .get(&url)
        .bearer_auth(token("cust-2", "acme", Role::Customer))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    server.stop().await;
}
