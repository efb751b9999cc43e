//! `busload`: events per second through the integration bus, and the latency each hop adds:
//! an agent's reply posted to the gateway's HTTP API → stored and produced to `outbound.sms`
//! on Kafka → read by the `sms-worker` → sent to the provider. The provider is a stand-in
//! served here (Twilio's Messages API shape: a form POST answered `201` with a `sid`).
//!
//! The hops are cut at the broker: `outbound.sms` is created with
//! `message.timestamp.type=LogAppendTime`, so each record's timestamp is when the broker
//! appended it, read here by a consumer of its own.
//!
//! ```text
//! post (t0) ──gateway: HTTP, store, produce──▶ broker append (t1) ──worker: consume,
//!   POST──▶ provider receives (t2)
//! ```
//!
//! Start the gateway with `--kafka-brokers` and `--bus-topic-prefix P`, and an `sms-worker`
//! with the same prefix and `TWILIO_BASE_URL=http://<--provider-listen>`; see
//! `load-tests/README.md`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use gateway::auth::Role;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use loadgen::client::Protocol;
use loadgen::scenario::Target;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;

#[derive(Parser)]
#[command(
    name = "busload",
    about = "Events/s and per-hop latency through the integration bus"
)]
struct Args {
    /// The gateway (host:port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    server: SocketAddr,
    /// The gateway's HS256 secret.
    #[arg(long, env = "GATEWAY_JWT_SECRET")]
    secret: String,
    #[arg(long, default_value = "busload")]
    tenant: String,
    /// Kafka brokers.
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: String,
    /// The topic prefix the gateway and the worker run with.
    #[arg(long, default_value = "")]
    topic_prefix: String,
    /// Where the provider stand-in listens (the worker's `TWILIO_BASE_URL`).
    #[arg(long, default_value = "127.0.0.1:18400")]
    provider_listen: SocketAddr,
    /// Replies posted per second (open loop).
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Conversations the replies spread over.
    #[arg(long, default_value_t = 100)]
    conversations: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of load before measuring (consumers joining their groups, topics' metadata
    /// reaching every client); the measurement starts once all of it reached the provider.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Connections posting at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// When each message passed each point, by message id.
#[derive(Default)]
struct Times {
    posted: HashMap<String, u64>,
    appended: HashMap<String, u64>,
    provided: HashMap<String, u64>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let target = Target::new(args.server, &args.secret, &args.tenant, Protocol::Ws);
    let times = Arc::new(Mutex::new(Times::default()));
    serve_provider(args.provider_listen, times.clone()).await;
    create_topic(&args).await;
    let reader = tokio::spawn(read_appends(
        args.kafka_brokers.clone(),
        args.topic_prefix.clone(),
        times.clone(),
    ));

    let admin = target.token("busload-admin", Role::Admin);
    let agent = target.token("busload-agent", Role::Agent);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .unwrap();
    let api = format!("http://{}/api/v1", args.server);
    let run = format!("{:x}", now_us());
    let post = |path: String, bearer: &str, body: serde_json::Value| {
        client
            .post(format!("{api}{path}"))
            .bearer_auth(bearer)
            .json(&body)
            .send()
    };
    let number = |i: usize| format!("+1555{:07}", i);
    let inbox = serde_json::json!({"inbox_id": format!("bench-{run}"), "name": "bench",
        "channel": {"type": "sms", "phone_number": format!("+1444{}", &run[run.len() - 7..])}});
    let status = post("/inboxes".into(), &admin, inbox)
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "creating the inbox: {status}");
    let mut rooms = Vec::new();
    for i in 0..args.conversations {
        let contact = format!("c-{run}-{i}");
        let body = serde_json::json!({"contact_id": contact, "name": contact, "phone": number(i)});
        post("/contacts".into(), &admin, body).await.unwrap();
        let room = format!("r-{run}-{i}");
        let body = serde_json::json!({"room_id": room, "kind": "prospect", "contact_id": contact,
            "inbox_id": format!("bench-{run}"), "participants": [contact]});
        let status = post("/conversations".into(), &admin, body)
            .await
            .unwrap()
            .status();
        assert!(status.is_success(), "opening a conversation: {status}");
        rooms.push(room);
    }
    eprintln!(
        "busload: {} conversations ready; posting {}/s for {} s",
        rooms.len(),
        args.rate,
        args.duration
    );

    let load = Load {
        client: &client,
        api: &api,
        agent: &agent,
        run: &run,
        rooms: &rooms,
        times: &times,
    };
    let warmup = load
        .post_for(args.rate, args.warmup, args.concurrency, "w")
        .await;
    load.wait_provided(warmup.0).await;
    *times.lock().unwrap() = Times::default();
    let total = args.rate * args.duration;
    let (posted, errors, posting) = load
        .post_for(args.rate, args.duration, args.concurrency, "m")
        .await;
    let errors = errors + (total - posted);
    load.wait_provided(total - errors).await;
    reader.abort();
    report(&times.lock().unwrap(), total, errors, posting);
}

/// What posting replies needs.
struct Load<'a> {
    client: &'a reqwest::Client,
    api: &'a str,
    agent: &'a str,
    run: &'a str,
    rooms: &'a [String],
    times: &'a Arc<Mutex<Times>>,
}

impl Load<'_> {
    /// Posts `rate` replies a second for `seconds` (open loop, `concurrency` at once): how
    /// many were posted and failed, and how long it took.
    async fn post_for(
        &self,
        rate: u64,
        seconds: u64,
        concurrency: usize,
        phase: &str,
    ) -> (u64, u64, Duration) {
        let total = rate * seconds;
        let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let started = tokio::time::Instant::now();
        let mut errors = 0u64;
        let mut tasks = Vec::with_capacity(total as usize);
        let (client, api, agent, run, rooms, times) = (
            self.client,
            self.api,
            self.agent,
            self.run,
            self.rooms,
            self.times,
        );
        for n in 0..total {
            tokio::time::sleep_until(started + interval * n as u32).await;
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let room = &rooms[n as usize % rooms.len()];
            let id = format!("b{run}-{phase}{n}");
            let request = client
                .post(format!("{api}/conversations/{room}/messages"))
                .bearer_auth(agent)
                .json(&serde_json::json!({"message": format!("bench {id}"), "message_id": id}));
            times.lock().unwrap().posted.insert(id, now_us());
            tasks.push(tokio::spawn(async move {
                let ok = matches!(request.send().await, Ok(r) if r.status().is_success());
                drop(permit);
                ok
            }));
        }
        for task in tasks {
            if !task.await.unwrap_or(false) {
                errors += 1;
            }
        }
        (total, errors, started.elapsed())
    }

    /// Waits (up to 60 s) until `n` replies reached the provider.
    async fn wait_provided(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while (self.times.lock().unwrap().provided.len() as u64) < n
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn report(times: &Times, total: u64, errors: u64, posting: Duration) {
    let mut to_broker = Histogram::<u64>::new(3).unwrap();
    let mut to_provider = Histogram::<u64>::new(3).unwrap();
    let mut end_to_end = Histogram::<u64>::new(3).unwrap();
    let (mut first, mut last) = (u64::MAX, 0);
    for (id, &t0) in &times.posted {
        let Some(&t2) = times.provided.get(id) else {
            continue;
        };
        first = first.min(t2);
        last = last.max(t2);
        let _ = end_to_end.record(t2.saturating_sub(t0));
        if let Some(&t1) = times.appended.get(id) {
            let _ = to_broker.record(t1.saturating_sub(t0));
            let _ = to_provider.record(t2.saturating_sub(t1));
        }
    }
    let delivered = times.provided.len() as u64;
    let span = (last.saturating_sub(first)).max(1) as f64 / 1e6;
    let line = |name: &str, h: &Histogram<u64>| {
        println!(
            "  {name:<34} p50 {:>7.1} ms   p99 {:>7.1} ms   max {:>7.1} ms",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0
        );
    };
    println!(
        "busload: {total} replies posted in {:.1} s ({errors} failed); {delivered} reached the provider, \
         {:.0} events/s at the provider",
        posting.as_secs_f64(),
        delivered as f64 / span
    );
    line("post → broker append (gateway)", &to_broker);
    line("broker append → provider (worker)", &to_provider);
    line("post → provider (end to end)", &end_to_end);
}

/// `outbound.sms` with broker-set timestamps (the hop boundary).
async fn create_topic(args: &Args) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.kafka_brokers)
        .create()
        .expect("a Kafka admin client");
    let name = format!("{}outbound.sms", args.topic_prefix);
    let topic = NewTopic::new(&name, 4, TopicReplication::Fixed(1))
        .set("message.timestamp.type", "LogAppendTime");
    let results = admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .expect("creating the topic");
    for result in results {
        if let Err((topic, e)) = result {
            eprintln!("busload: {topic}: {e} (it must have LogAppendTime timestamps)");
        }
    }
}

/// Reads `outbound.sms` and notes when the broker appended each message.
async fn read_appends(brokers: String, prefix: String, times: Arc<Mutex<Times>>) {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("busload-{}", now_us()))
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "true")
        .create()
        .expect("a Kafka consumer");
    consumer
        .subscribe(&[&format!("{prefix}outbound.sms")])
        .expect("subscribing");
    loop {
        let Ok(message) = consumer.recv().await else {
            continue;
        };
        let Some(at_ms) = message.timestamp().to_millis() else {
            continue;
        };
        let Some(payload) = message.payload() else {
            continue;
        };
        #[derive(serde::Deserialize)]
        struct Sms {
            message_id: String,
        }
        if let Ok(sms) = serde_json::from_slice::<Sms>(payload) {
            times
                .lock()
                .unwrap()
                .appended
                .insert(sms.message_id, at_ms as u64 * 1000);
        }
    }
}

/// The provider stand-in: answers each Messages API call `201` and notes when it arrived.
async fn serve_provider(listen: SocketAddr, times: Arc<Mutex<Times>>) {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .expect("the provider's address");
    tokio::spawn(async move {
        let mut sid = 0u64;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            sid += 1;
            let times = times.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let times = times.clone();
                        async move {
                            let arrived = now_us();
                            let body = request
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let text = form_urlencoded::parse(&body)
                                .find(|(k, _)| k == "Body")
                                .map(|(_, v)| v.into_owned())
                                .unwrap_or_default();
                            if let Some(id) = text.strip_prefix("bench ") {
                                times
                                    .lock()
                                    .unwrap()
                                    .provided
                                    .entry(id.to_owned())
                                    .or_insert(arrived);
                            }
                            let answer =
                                format!(r#"{{"sid":"SM{arrived:x}{sid:x}","status":"queued"}}"#);
                            let mut response = hyper::Response::new(Full::new(Bytes::from(answer)));
                            *response.status_mut() = hyper::StatusCode::CREATED;
                            Ok::<_, Infallible>(response)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
