//! The service over loopback with a tiny random model (the real tokenizer, prompt, grammar and
//! decoder; random weights, so it is fast): authentication, limits, error bodies, the
//! saturation 503, deadlines, graceful shutdown, the OpenAPI document and a bounded load test.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{client, tiny_structurer, Server};
use reqwest::StatusCode;
use serde_json::{json, Value};
use triage_serve::{ServeConfig, ROUTES};
use triage_taxonomy::Validator;

const VPN: &str = "My VPN drops every 10 minutes since the update, payroll is due today!";

fn config() -> ServeConfig {
    ServeConfig {
        data_dir: std::env::temp_dir().join(format!("triage-serve-test-{}", std::process::id())),
        ..ServeConfig::default()
    }
}

async fn code(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_limits_and_error_bodies() {
    let cfg = ServeConfig {
        token: Some("s3cret".into()),
        max_body_bytes: 4096,
        max_input_chars: 500,
        max_batch: 3,
        ..config()
    };
    let mut server = Server::start(cfg, tiny_structurer(), None).await;
    let c = client();
    let post = |path: &str, body: Value| c.post(server.url(path)).bearer_auth("s3cret").json(&body);

    // Health endpoints are open; everything else needs the token.
    assert_eq!(c.get(server.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(server.url("/readyz")).send().await.unwrap().status(), 200);
    let r = c
        .post(server.url("/v1/tickets"))
        .json(&json!({"text": VPN}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let r = c
        .post(server.url("/v1/tickets"))
        .bearer_auth("wrong")
        .json(&json!({"text": VPN}))
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await.1["error"]["code"], "unauthorized");
    assert_eq!(c.get(server.url("/metrics")).send().await.unwrap().status(), 401);
    // The scheme is case-insensitive.
    let r = c
        .get(server.url("/metrics"))
        .header("authorization", "bearer s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A ticket: valid against the taxonomy's schema, with per-field confidence.
    let (s, body) = code(post("/v1/tickets", json!({"text": VPN})).send().await.unwrap()).await;
    assert_eq!(s, 200, "{body}");
    let validator = Validator::new(&common::taxonomy());
    assert!(validator.schema_accepts(&body["ticket"]), "{body}");
    for f in &common::taxonomy().fields {
        assert!(body["meta"]["confidence"][&f.name].as_f64().is_some(), "{body}");
    }
    assert!(body["meta"]["needs_review"].is_boolean());

    // Limits and bad input: each a JSON error with a code.
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (post("/v1/tickets", json!({"text": "x".repeat(5000)})), 413, ""),
        (
            post("/v1/tickets", json!({"text": "é".repeat(501)})),
            422,
            "text_too_long",
        ),
        (post("/v1/tickets", json!({"text": "  \n "})), 422, "empty_text"),
        (
            post("/v1/tickets", json!({"text": VPN, "colour": 1})),
            422,
            "invalid_request",
        ),
        (
            post("/v1/tickets", json!({"text": VPN, "taxonomy": "nope"})),
            422,
            "unknown_taxonomy",
        ),
        (post("/v1/tickets", json!({"txt": VPN})), 422, "invalid_request"),
        (
            c.post(server.url("/v1/tickets"))
                .bearer_auth("s3cret")
                .body(vec![0xff, 0x00, 0x9c, b'{']),
            400,
            "malformed_json",
        ),
        (post("/v1/tickets:batch", json!({"items": []})), 422, "batch_size"),
        (
            post(
                "/v1/tickets:batch",
                json!({"items": [{"text": "a"}, {"text": "b"}, {"text": "c"}, {"text": "d"}]}),
            ),
            422,
            "batch_size",
        ),
        (
            post("/api/v1/classify", json!({"text": VPN})),
            422,
            "invalid_request",
        ),
        (
            post("/api/v1/train", json!({"dataset_id": "ds-00"})),
            503,
            "training_disabled",
        ),
        (
            c.get(server.url("/api/v1/train/job-x")).bearer_auth("s3cret"),
            404,
            "not_found",
        ),
        (
            c.get(server.url("/no/such/thing")).bearer_auth("s3cret"),
            404,
            "not_found",
        ),
    ];
    for (i, (req, status, want)) in cases.into_iter().enumerate() {
        let (s, body) = code(req.send().await.unwrap()).await;
        assert_eq!(s.as_u16(), status, "case {i}: {body}");
        if !want.is_empty() {
            assert_eq!(body["error"]["code"], want, "case {i}: {body}");
            assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    // A batch: one bad item fails alone.
    let (s, body) = code(
        post(
            "/v1/tickets:batch",
            json!({"items": [{"id": "a", "text": VPN}, {"id": "b", "text": ""}]}),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(validator.schema_accepts(&body["results"][0]["ticket"]));
    assert_eq!(body["results"][1]["error"]["code"], "empty_text");
    assert_eq!(body["results"][1]["id"], "b");

    // Classify: the category and its probability.
    let (s, body) = code(
        post("/api/v1/classify", json!({"ticket_data": VPN}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(body["predicted_label"], body["ticket"]["category"]);
    assert!(body["confidence"]
        .as_f64()
        .is_some_and(|p| (0.0..=1.0).contains(&p)));

    // Training data upload: imported rows and rejects with their line.
    let csv = "body,cat,sub,prio,grp,kind\n\
        VPN drops every few minutes,Network,VPN,High,Network Operations,Incident\n\
        Need a new laptop,Hardware,Laptop / Desktop,Low,Desktop Support,Service Request\n\
        printer on fire,Nonsense,X,Low,Y,Incident\n";
    let map = "map=text=body&map=category=cat&map=subcategory=sub&map=priority=prio&map=assignment_group=grp&map=request_type=kind";
    let r = c
        .post(server.url(&format!("/api/v1/train-data?{map}")))
        .bearer_auth("s3cret")
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    let (s, body) = code(r).await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(
        (
            body["rows"].as_u64(),
            body["imported"].as_u64(),
            body["rejected"].as_u64()
        ),
        (Some(3), Some(2), Some(1)),
        "{body}"
    );
    assert_eq!(body["rejects"][0]["line"], 4, "{body}");
    let r = c
        .post(server.url("/api/v1/train-data?map=text=body"))
        .bearer_auth("s3cret")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await.1["error"]["code"], "bad_mapping");

    // OpenAPI lists exactly the routes the router answers.
    let (s, doc) = code(
        c.get(server.url("/openapi.json"))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.clone(), p.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, routed);
    for (m, p) in ROUTES {
        let p = p.replace("{id}", "job-x");
        let req = match m {
            "get" => c.get(server.url(&p)),
            _ => c.post(server.url(&p)),
        };
        let (s, body) = code(req.bearer_auth("s3cret").send().await.unwrap()).await;
        assert!(
            s != 404 || body["error"]["message"].as_str().unwrap_or("").contains("job"),
            "{m} {p}: {s}"
        );
        assert_ne!(s, 405, "{m} {p}");
    }
    // A route with another method: 405, a JSON error and the Allow header.
    let r = c
        .delete(server.url("/v1/tickets"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    let allow = r.headers().get("allow").map(|v| v.to_str().unwrap().to_owned());
    let (s, body) = code(r).await;
    assert_eq!(
        (s.as_u16(), body["error"]["code"].as_str(), allow.as_deref()),
        (405, Some("method_not_allowed"), Some("POST")),
        "{body}"
    );
    assert_eq!(doc["components"]["schemas"]["Ticket"], *validator.schema());

    // Metrics count what happened.
    let text = c
        .get(server.url("/metrics"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("triage_http_requests_total{route=\"/v1/tickets\",status=\"401\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("triage_http_requests_total{route=\"/v1/tickets\",status=\"413\"} 1"),
        "{text}"
    );
    assert!(text.contains("triage_tickets_total "), "{text}");
    assert!(text.contains("triage_ready 1"), "{text}");

    server.shutdown();
    server.done.await.unwrap().unwrap();
}

/// A web page the user visits cannot drive the service on the user's machine: a request from
/// another origin is refused, and so is (without a token) a Host that is not a loopback name,
/// as a DNS-rebinding page would send; programs (no Origin) and the service's own origin are
/// served, and with a token any Host is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_other_web_origins_and_rebound_hosts_are_refused() {
    let mut server = Server::start(config(), tiny_structurer(), None).await;
    let c = client();
    let ticket = |origin: Option<&str>, host: Option<&str>| {
        let mut r = c.post(server.url("/v1/tickets")).json(&json!({"text": VPN}));
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        if let Some(h) = host {
            r = r.header("host", h);
        }
        r.send()
    };
    let own = format!("http://{}", server.addr);
    assert_eq!(ticket(None, None).await.unwrap().status(), 200);
    assert_eq!(ticket(Some(&own), None).await.unwrap().status(), 200);
    let (s, body) = code(ticket(Some("https://evil.example"), None).await.unwrap()).await;
    assert_eq!(
        (s.as_u16(), body["error"]["code"].as_str()),
        (403, Some("cross_origin")),
        "{body}"
    );
    let (s, body) = code(ticket(Some("null"), None).await.unwrap()).await;
    assert_eq!(s, 403, "{body}");
    let rebound = format!("evil.example:{}", server.addr.port());
    let (s, body) = code(ticket(None, Some(&rebound)).await.unwrap()).await;
    assert_eq!(
        (s.as_u16(), body["error"]["code"].as_str()),
        (403, Some("host_not_allowed")),
        "{body}"
    );
    let localhost = format!("localhost:{}", server.addr.port());
    assert_eq!(ticket(None, Some(&localhost)).await.unwrap().status(), 200);
    let v6 = format!("[::1]:{}", server.addr.port());
    assert_eq!(ticket(None, Some(&v6)).await.unwrap().status(), 200);
    // An unclosed IPv6 bracket is refused like any other name (it once cut the header past
    // its end: a panic and a dropped connection).
    for host in ["[", "[::1", "[::1:8080"] {
        let (s, body) = code(ticket(None, Some(host)).await.unwrap()).await;
        assert_eq!(
            (s.as_u16(), body["error"]["code"].as_str()),
            (403, Some("host_not_allowed")),
            "{host}: {body}"
        );
    }
    server.shutdown();
    server.done.await.unwrap().unwrap();

    let cfg = ServeConfig {
        token: Some("s3cret".into()),
        ..config()
    };
    let mut server = Server::start(cfg, tiny_structurer(), None).await;
    let r = c
        .post(server.url("/v1/tickets"))
        .bearer_auth("s3cret")
        .header("host", format!("triage.internal:{}", server.addr.port()))
        .json(&json!({"text": VPN}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    server.shutdown();
    server.done.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let cfg = ServeConfig {
        workers: 1,
        queue: 1,
        retry_after_s: 7,
        ..config()
    };
    let mut server = Server::start(cfg, tiny_structurer(), None).await;
    let c = client();
    let long = format!("{VPN} {}", "The tunnel reconnects and drops again. ".repeat(40));
    let reqs = (0..12).map(|_| {
        c.post(server.url("/v1/tickets"))
            .json(&json!({"text": long}))
            .send()
    });
    let answers = futures_join_all(reqs.collect()).await;
    let (mut ok, mut busy) = (0, 0);
    for r in answers {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(r.headers()["retry-after"], "7");
                assert_eq!(code(r).await.1["error"]["code"], "overloaded");
                busy += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(ok >= 2 && busy >= 1, "ok {ok}, busy {busy}");
    server.shutdown();
    server.done.await.unwrap().unwrap();
}

/// A request past its deadline answers 504. A library caller may set any timeout: one longer
/// than an `Instant` can hold is a deadline that never comes (the handler panicked on the
/// overflow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_answers_504_and_any_timeout_is_accepted() {
    for (request_timeout, status) in [(Duration::from_millis(1), 504), (Duration::MAX, 200)] {
        let cfg = ServeConfig {
            request_timeout,
            ..config()
        };
        let mut server = Server::start(cfg, tiny_structurer(), None).await;
        let (s, body) = code(
            client()
                .post(server.url("/v1/tickets"))
                .json(&json!({"text": VPN}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, status, "{request_timeout:?}: {body}");
        if status == 504 {
            assert_eq!(body["error"]["code"], "timeout");
        }
        server.shutdown();
        server.done.await.unwrap().unwrap();
    }
}

/// A batch decodes its items on the idle workers at once (their forward passes shared), and
/// its results keep the request's order; with one worker the items go one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_decodes_its_items_together_on_idle_workers() {
    for (workers, together) in [(4, true), (1, false)] {
        let cfg = ServeConfig { workers, ..config() };
        let mut server = Server::start(cfg, tiny_structurer(), None).await;
        let items: Vec<Value> = (0..4)
            .map(|i| json!({"id": format!("item-{i}"), "text": format!("{VPN} ({i})")}))
            .collect();
        let (s, body) = code(
            client()
                .post(server.url("/v1/tickets:batch"))
                .json(&json!({ "items": items }))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let results = body["results"].as_array().unwrap();
        let ids: Vec<&str> = results.iter().map(|r| r["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["item-0", "item-1", "item-2", "item-3"]);
        let shared: u64 = results
            .iter()
            .map(|r| r["meta"]["shared_passes"].as_u64().unwrap())
            .sum();
        assert_eq!(shared > 0, together, "workers {workers}: {body}");
        server.shutdown();
        server.done.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_request_in_flight() {
    let mut server = Server::start(config(), tiny_structurer(), None).await;
    let c = client();
    let items: Vec<Value> = (0..6)
        .map(|i| json!({"id": i.to_string(), "text": VPN}))
        .collect();
    let req = c
        .post(server.url("/v1/tickets:batch"))
        .json(&json!({ "items": items }))
        .send();
    let pending = tokio::spawn(req);
    tokio::time::sleep(Duration::from_millis(30)).await;
    server.shutdown();
    let r = pending.await.unwrap().unwrap();
    let (s, body) = code(r).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["results"].as_array().unwrap().len(), 6);
    assert!(body["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["ticket"].is_object()));
    let health = server.url("/healthz");
    server.done.await.unwrap().unwrap();
    assert!(c.get(health).send().await.is_err(), "the server still answers");
}

/// 200 requests, 8 clients at a time, against 2 workers and a queue of 4: clients that get
/// 503 wait for `Retry-After` and try again (as real clients do, up to a deadline of 10
/// minutes: the queue is not fair to retries, so under CPU contention one client can lose
/// many races in a row; fairness is the throughput issue's). Every request ends as a
/// ticket; the only other answers are the intended 503s. Throughput and p95 are printed
/// (`--no-capture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_load_test_has_no_errors_but_the_intended_503s() {
    let cfg = ServeConfig {
        workers: 2,
        queue: 4,
        retry_after_s: 1,
        ..config()
    };
    let mut server = Server::start(cfg, tiny_structurer(), None).await;
    let c = client();
    let url = server.url("/v1/tickets");
    let t0 = Instant::now();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (c, url, sem) = (c.clone(), url.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.unwrap();
            let t = Instant::now();
            let mut busy = 0;
            loop {
                let r = c
                    .post(&url)
                    .json(&json!({"text": format!("{VPN} (#{i})")}))
                    .send()
                    .await
                    .unwrap();
                match r.status().as_u16() {
                    503 if t.elapsed() < Duration::from_secs(600) => {
                        busy += 1;
                        let wait: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                        tokio::time::sleep(Duration::from_secs(wait)).await;
                    }
                    s => return (s, t.elapsed().as_secs_f64(), busy),
                }
            }
        }));
    }
    let (mut latency, mut busy) = (Vec::new(), 0);
    for t in tasks {
        let (status, secs, b) = t.await.unwrap();
        assert_eq!(status, 200, "a request ended with {status}");
        latency.push(secs);
        busy += b;
    }
    let wall = t0.elapsed().as_secs_f64();
    latency.sort_by(f64::total_cmp);
    let p95 = latency[((latency.len() - 1) as f64 * 0.95).round() as usize];
    println!(
        "load: 200 requests, 8 clients, 2 workers, queue 4: 200 tickets in {wall:.1} s ({:.2} tickets/s), \
         {busy} × 503 retried, latency p50 {:.0} ms p95 {:.0} ms (tiny random model)",
        200.0 / wall,
        latency[latency.len() / 2] * 1000.0,
        p95 * 1000.0
    );
    assert_eq!(latency.len(), 200);
    server.shutdown();
    server.done.await.unwrap().unwrap();
}

/// `join_all` without the futures crate.
async fn futures_join_all<F: std::future::Future + Send + 'static>(fs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
