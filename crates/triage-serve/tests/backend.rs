//! `serve --backend openai:URL`: the service's tickets come from the OpenAI-compatible
//! server (a loopback fake here), validated; an invalid answer is that request's error.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use common::{answer, client, tiny_structurer, Server};
use serde_json::{json, Value};
use triage_infer::remote::{RemoteOptions, RemoteStructurer};
use triage_llm::Tokenizer;
use triage_serve::{Desk, ServeConfig};

/// A fake chat-completions server: the first answer is a valid ticket, the next breaks the
/// subcategory rule.
async fn fake_backend() -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |Json(req): Json<Value>| {
            let n = n.clone();
            async move {
                assert_eq!(req["response_format"]["type"], "json_schema");
                let sub = match n.fetch_add(1, Ordering::SeqCst) {
                    0 => "VPN",
                    _ => "Printer / Scanner",
                };
                let ticket = json!({
                    "summary": "VPN drops", "category": "Network", "subcategory": sub,
                    "priority": "High", "assignment_group": "Network Operations",
                    "request_type": "Incident",
                });
                Json(json!({"choices": [{"message": {"content": ticket.to_string()}}]}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_come_from_the_backend_and_invalid_answers_are_errors() {
    let (url, calls) = fake_backend().await;
    let s = tiny_structurer();
    let remote = RemoteStructurer::new(
        RemoteOptions {
            url,
            model: "default-1.5b".into(),
            api_key: None,
            max_new_tokens: 256,
            max_input_tokens: 512,
            timeout: Duration::from_secs(30),
            min_confidence: None,
            ..RemoteOptions::default()
        },
        s.taxonomy().clone(),
        Tokenizer::clone(s.tokenizer()),
    )
    .unwrap();
    let desk = Desk::new(s, None).with_remote(remote);
    let server = Server::start_desks(ServeConfig::default(), vec![desk], None).await;
    let c = client();
    let body = json!({"text": "My VPN drops every 10 minutes"});
    let (status, v) = answer(c.post(server.url("/v1/tickets")).json(&body)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["ticket"]["subcategory"], "VPN");
    // No logprobs from this server: no confidences, rather than invented ones.
    assert_eq!(v["meta"]["confidence"], json!({}), "{v}");
    let (status, v) = answer(c.post(server.url("/v1/tickets")).json(&body)).await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], "backend_invalid_answer", "{v}");
    assert!(v.to_string().contains("subcategory"), "{v}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
