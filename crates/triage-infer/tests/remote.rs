//! The OpenAI-compatible backend against a loopback fake server: the request carries the
//! local engine's messages and schema; a valid answer becomes a ticket with confidences from
//! the logprobs; an invalid answer, an HTTP error and an unreachable server are per-ticket
//! errors, never repaired tickets.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use triage_infer::prompt::{clean_input, PromptBuilder};
use triage_infer::remote::{RemoteOptions, RemoteStructurer};
use triage_infer::{InferError, TicketEngine};
use triage_llm::{GgufFile, Tokenizer};
use triage_registry::ModelStore;
use triage_taxonomy::{ticket_schema, Taxonomy};

fn tokenizer() -> Tokenizer {
    let store = ModelStore::from_env();
    let path = store
        .ensure(store.registry().get("0.5b").unwrap(), None)
        .expect("`triage model pull 0.5b`");
    Tokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap()
}

/// Serves `answers` in order (status, body), one per connection; records each request body.
fn fake_server(answers: Vec<(u16, String)>) -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for (status, body) in answers {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0usize;
            let mut line = String::new();
            let mut first = true;
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                if first {
                    assert!(line.starts_with("POST /v1/chat/completions "), "{line}");
                    first = false;
                }
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut buf = vec![0u8; len];
            reader.read_exact(&mut buf).unwrap();
            log.lock().unwrap().push(serde_json::from_slice(&buf).unwrap());
            let mut stream = stream;
            write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
    });
    (url, seen)
}

/// A chat-completions answer whose content is `content`, tokenised into pieces of up to 4
/// bytes with the given log-probability each.
fn answer(content: &str, logprob: f64) -> String {
    let mut tokens = Vec::new();
    let chars: Vec<char> = content.chars().collect();
    for chunk in chars.chunks(4) {
        let t: String = chunk.iter().collect();
        tokens.push(json!({"token": t, "logprob": logprob, "top_logprobs": []}));
    }
    json!({
        "choices": [{"message": {"role": "assistant", "content": content}, "logprobs": {"content": tokens}}],
        "usage": {"prompt_tokens": 1234, "completion_tokens": tokens.len()},
    })
    .to_string()
}

fn client(url: &str, tok: Tokenizer) -> RemoteStructurer {
    let opts = RemoteOptions {
        url: url.to_owned(),
        model: "default-1.5b".into(),
        api_key: Some("k3y".into()),
        max_new_tokens: 320,
        max_input_tokens: 1536,
        timeout: Duration::from_secs(20),
        min_confidence: Some(0.5),
        ..RemoteOptions::default()
    };
    RemoteStructurer::new(opts, Taxonomy::builtin_default(), tok).unwrap()
}

#[test]
fn the_backend_sends_the_local_prompt_and_validates_every_answer() {
    let tok = tokenizer();
    let good = json!({
        "summary": "VPN drops every 10 minutes since the update",
        "category": "Network",
        "subcategory": "VPN",
        "priority": "High",
        "assignment_group": "Network Operations",
        "request_type": "Incident",
    });
    // Keys in the schema's order, as a constrained server writes them.
    let taxonomy = Taxonomy::builtin_default();
    let schema = ticket_schema(&taxonomy);
    let order: Vec<String> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let ordered: serde_json::Map<String, Value> = order
        .iter()
        .filter_map(|k| good.get(k).map(|v| (k.clone(), v.clone())))
        .collect();
    let content = serde_json::to_string(&Value::Object(ordered)).unwrap();
    let mut bad = good.clone();
    bad["subcategory"] = json!("Printer / Scanner"); // a Hardware child under Network: the rule llama.cpp broke
    let answers = vec![
        (200, answer(&content, -0.01)),
        (200, answer(&serde_json::to_string(&bad).unwrap(), -0.01)),
        (500, "{\"error\": \"model overloaded\"}".to_string()),
        (200, json!({"choices": []}).to_string()),
        (
            200,
            json!({"choices": [{"message": {"role": "assistant", "content": content}}]}).to_string(),
        ),
    ];
    let (url, seen) = fake_server(answers);
    let remote = client(&format!("{url}/v1/"), tok.clone());
    let text = "My VPN drops every 10 min since the update, payroll is due today!";

    // 1. A valid answer: the ticket, with one confidence per enum field from the logprobs.
    let out = TicketEngine::structure(&remote, text).unwrap();
    assert_eq!(out.ticket.get("subcategory"), Some("VPN"));
    assert_eq!(out.meta.prompt_tokens, 1234);
    let fields: Vec<&str> = out.meta.confidence.iter().map(|c| c.field.as_str()).collect();
    let enum_fields: Vec<&str> = taxonomy.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(fields, enum_fields);
    for c in &out.meta.confidence {
        // Each value spans 1..=5 pieces of -0.01: a probability in (0.95, 1).
        assert!(c.confidence > 0.94 && c.confidence < 1.0, "{c:?}");
    }
    assert!(!out.meta.needs_review);

    // The request: the local engine's messages, its schema, greedy, the adapter's name.
    let body = seen.lock().unwrap()[0].clone();
    let prompt = PromptBuilder::new(&taxonomy, &schema).unwrap();
    let (incident, _) = clean_input(&tok, text, 1536).unwrap();
    let want = serde_json::to_value(prompt.messages(&incident).unwrap()).unwrap();
    assert_eq!(body["messages"], want);
    assert_eq!(body["response_format"]["json_schema"]["schema"], schema);
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(
        (body["model"].as_str(), body["temperature"].as_f64()),
        (Some("default-1.5b"), Some(0.0))
    );

    // 2. An answer that breaks the subcategory rule is an error, not a repaired ticket.
    match remote.structure(text) {
        Err(InferError::RemoteInvalid { output, reason }) => {
            assert!(output.contains("Printer"), "{output}");
            assert!(reason.contains("subcategory"), "{reason}");
        }
        other => panic!("expected RemoteInvalid, got {other:?}"),
    }
    // 3. An HTTP error names the status and the server's words.
    let e = remote.structure(text).unwrap_err().to_string();
    assert!(e.contains("HTTP 500") && e.contains("overloaded"), "{e}");
    // 4. An answer without content.
    let e = remote.structure(text).unwrap_err().to_string();
    assert!(e.contains("choices[0].message.content"), "{e}");
    // 5. A valid answer without log-probabilities: the ticket, no confidences, and (with
    // --min-confidence) sent to review rather than waved through.
    let out = remote.structure(text).unwrap();
    assert_eq!(out.ticket.get("subcategory"), Some("VPN"));
    assert!(
        out.meta.confidence.is_empty() && out.meta.needs_review,
        "{:?}",
        out.meta
    );
}

#[test]
fn an_unreachable_backend_is_a_clear_error() {
    // A port nobody listens on: bind, note it, close.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let remote = client(&format!("http://127.0.0.1:{port}"), tokenizer());
    let e = remote.structure("The printer on floor 2 is jammed.").unwrap_err();
    assert!(matches!(e, InferError::Remote { .. }), "{e:?}");
    assert!(e.to_string().contains("unreachable"), "{e}");
    assert!(RemoteStructurer::new(
        RemoteOptions {
            url: "ftp://x".into(),
            model: "m".into(),
            api_key: None,
            max_new_tokens: 64,
            max_input_tokens: 64,
            timeout: Duration::from_secs(1),
            min_confidence: None,
            ..RemoteOptions::default()
        },
        Taxonomy::builtin_default(),
        tokenizer(),
    )
    .is_err());
}

/// llama-server mode: the schema goes without its `anyOf` rules and with the engine's own
/// fields, and the answer is still checked against the full rules.
#[test]
fn without_any_of_the_rule_is_still_checked() {
    let bad = json!({
        "summary": "VPN drops", "category": "Network", "subcategory": "Printer / Scanner",
        "priority": "High", "assignment_group": "Network Operations", "request_type": "Incident",
    });
    let (url, seen) = fake_server(vec![(200, answer(&bad.to_string(), -0.1))]);
    let mut extra = serde_json::Map::new();
    extra.insert("cache_prompt".into(), json!(true));
    let opts = RemoteOptions {
        url,
        drop_any_of: true,
        extra,
        ..RemoteOptions::default()
    };
    let remote = RemoteStructurer::new(opts, Taxonomy::builtin_default(), tokenizer()).unwrap();
    let e = remote.structure("VPN drops").unwrap_err();
    assert!(matches!(e, InferError::RemoteInvalid { .. }), "{e:?}");
    let body = seen.lock().unwrap()[0].clone();
    let schema = body["response_format"]["json_schema"]["schema"].to_string();
    assert!(!schema.contains("anyOf"), "{schema}");
    assert!(schema.contains("\"subcategory\""), "{schema}");
    assert_eq!(body["cache_prompt"], true);
    // The prompt still shows the full schema, as local inference does.
    assert!(body["messages"][0]["content"].as_str().unwrap().contains("anyOf"));
}
