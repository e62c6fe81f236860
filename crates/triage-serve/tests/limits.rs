//! Admission control over loopback with the tiny random model: every bound answers 422 (or 413
//! for bytes) and tickets are still served; a training job over an artificially low memory
//! limit is refused before it allocates anything; the disk quota refuses an upload and deletes
//! nothing it should keep. `docs/limits.md` lists the limits.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{answer, client, csv, tiny_structurer, tiny_structurer_for, tiny_train_context, Server, MAP};
use reqwest::StatusCode;
use serde_json::{json, Value};
use triage_serve::{Desk, ServeConfig, TrainLimits};
use triage_taxonomy::Validator;
use triage_train::admission::MemoryLimit;

const VPN: &str = "My VPN drops every 10 minutes since the update, payroll is due today!";
fn data_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("triage-limits-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

async fn upload(c: &reqwest::Client, server: &Server, body: String) -> (StatusCode, Value) {
    answer(
        c.post(server.url(&format!("/api/v1/train-data?{MAP}")))
            .header("content-type", "text/csv")
            .body(body),
    )
    .await
}

/// A ticket is still served, valid against the schema.
async fn still_serves(c: &reqwest::Client, server: &Server) {
    let (s, body) = answer(c.post(server.url("/v1/tickets")).json(&json!({"text": VPN}))).await;
    assert_eq!(s, 200, "{body}");
    assert!(
        Validator::new(&common::taxonomy()).schema_accepts(&body["ticket"]),
        "{body}"
    );
}

/// Files under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            match e.file_type().unwrap().is_dir() {
                true => walk(root, &e.path(), out),
                false => out.push(e.path().strip_prefix(root).unwrap().display().to_string()),
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bound_answers_422_and_tickets_are_still_served() {
    let dir = data_dir("bounds");
    let cfg = ServeConfig {
        data_dir: dir.clone(),
        max_upload_rows: 30,
        max_upload_bytes: 8 * 1024,
        max_input_chars: 500,
        max_batch: 3,
        ..ServeConfig::default()
    };
    let mut server = Server::start(cfg, tiny_structurer(), Some(tiny_train_context())).await;
    let c = client();

    // The request: a 30-row dataset, then rank 2,000,000. Refused at once, naming
    // `rank`, its bound and the flag.
    let (s, up) = upload(&c, &server, csv(30)).await;
    assert_eq!(s, 201, "{up}");
    assert_eq!(up["imported"], 30, "{up}");
    let id = up["id"].as_str().unwrap().to_owned();
    // A dataset none of whose rows was imported (labels of another taxonomy) is refused
    // before any admission, naming its rejects.
    let (s, empty) = upload(
        &c,
        &server,
        csv(4)
            .replace("Network,VPN", "Netz,VPN")
            .replace("Software,", "Programme,"),
    )
    .await;
    assert_eq!(
        (s.as_u16(), empty["imported"].as_u64()),
        (201, Some(0)),
        "{empty}"
    );
    let (s, body) = answer(
        c.post(server.url("/api/v1/train"))
            .json(&json!({"dataset_id": empty["id"]})),
    )
    .await;
    assert_eq!(
        (s.as_u16(), body["error"]["code"].as_str()),
        (422, Some("empty_dataset")),
        "{body}"
    );
    let t0 = Instant::now();
    let (s, body) = answer(
        c.post(server.url("/api/v1/train"))
            .json(&json!({"dataset_id": id, "rank": 2_000_000, "steps": 1})),
    )
    .await;
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(s, 422, "{body}");
    let e = &body["error"];
    assert_eq!(
        (e["code"].as_str(), e["field"].as_str(), e["limit"].as_str()),
        (Some("limit_exceeded"), Some("rank"), Some("1..=64")),
        "{body}"
    );
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("rank = 2000000") && message.contains("--max-train-rank"),
        "{message}"
    );

    // Every other training bound, each named.
    let cases = [
        (
            json!({"dataset_id": id, "steps": 10_000_000}),
            "steps",
            "1..=2000",
        ),
        (json!({"dataset_id": id, "steps": 0}), "steps", "1..=2000"),
        (json!({"dataset_id": id, "rank": 0}), "rank", "1..=64"),
        (json!({"dataset_id": id, "rank": 65}), "rank", "1..=64"),
        (json!({"dataset_id": id, "lr": 5.0}), "lr", "(0, 0.01]"),
        (json!({"dataset_id": id, "lr": 0.0}), "lr", "(0, 0.01]"),
        (json!({"dataset_id": id, "lr": -1e-4}), "lr", "(0, 0.01]"),
        (json!({"dataset_id": id, "lr": 1e300}), "lr", "(0, 0.01]"),
    ];
    for (req, field, limit) in cases {
        let (s, body) = answer(c.post(server.url("/api/v1/train")).json(&req)).await;
        assert_eq!(s, 422, "{req}: {body}");
        assert_eq!(body["error"]["code"], "limit_exceeded", "{req}: {body}");
        assert_eq!(body["error"]["field"], field, "{req}: {body}");
        assert_eq!(body["error"]["limit"], limit, "{req}: {body}");
    }
    // Values JSON cannot hold in the field's type name the field too.
    for req in [
        json!({"dataset_id": id, "rank": -1}),
        json!({"dataset_id": id, "steps": 1e30}),
    ] {
        let (s, body) = answer(c.post(server.url("/api/v1/train")).json(&req)).await;
        assert_eq!(s, 422, "{req}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
        assert!(
            ["rank", "steps"].contains(&body["error"]["field"].as_str().unwrap()),
            "{body}"
        );
    }

    // Uploads: rows (422) and bytes (413, a JSON error naming the flag). Nothing is stored.
    let before = files(&dir);
    let (s, body) = upload(&c, &server, csv(31)).await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(
        (body["error"]["field"].as_str(), body["error"]["limit"].as_str()),
        (Some("rows"), Some("1..=30")),
        "{body}"
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-upload-rows"));
    let (s, body) = upload(&c, &server, csv(200)).await;
    assert_eq!(s, 413, "{body}");
    assert_eq!(body["error"]["code"], "body_too_large", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-upload-bytes"));
    assert_eq!(files(&dir), before, "a refused upload left files");

    // Ticket requests: text length, batch size, body size.
    let (s, body) = answer(
        c.post(server.url("/v1/tickets"))
            .json(&json!({"text": "x".repeat(501)})),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(
        (body["error"]["code"].as_str(), body["error"]["field"].as_str()),
        (Some("text_too_long"), Some("text"))
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-input-chars"));
    let (s, body) = answer(
        c.post(server.url("/api/v1/classify"))
            .json(&json!({"ticket_data": "x".repeat(501)})),
    )
    .await;
    assert_eq!(
        (s.as_u16(), body["error"]["code"].as_str()),
        (422, Some("text_too_long"))
    );
    let items: Vec<Value> = (0..4).map(|_| json!({"text": VPN})).collect();
    let (s, body) = answer(
        c.post(server.url("/v1/tickets:batch"))
            .json(&json!({ "items": items })),
    )
    .await;
    assert_eq!(
        (s.as_u16(), body["error"]["code"].as_str()),
        (422, Some("batch_size"))
    );
    assert!(body["error"]["message"].as_str().unwrap().contains("--max-batch"));
    let (s, body) = answer(
        c.post(server.url("/v1/tickets"))
            .json(&json!({"text": "x".repeat(300 * 1024)})),
    )
    .await;
    assert_eq!(
        (s.as_u16(), body["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-body-bytes"));

    // No job was started, and the service still answers.
    assert!(!dir.join("runs").exists(), "a refused job wrote a run directory");
    still_serves(&c, &server).await;
    let ready = c.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    server.shutdown();
    server.done.await.unwrap().unwrap();

    // A server whose training configuration exceeds one of its limits names the key and the
    // configuration it comes from.
    let mut ctx = tiny_train_context();
    ctx.config.batch_size = 2;
    let cfg = ServeConfig {
        data_dir: dir.clone(),
        train_limits: TrainLimits {
            batch_size: 1,
            ..TrainLimits::default()
        },
        ..ServeConfig::default()
    };
    let mut server = Server::start(cfg, tiny_structurer(), Some(ctx)).await;
    let (s, body) = answer(
        c.post(server.url("/api/v1/train"))
            .json(&json!({"dataset_id": id})),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(body["error"]["field"], "batch_size", "{body}");
    let m = body["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("--train-config") && m.contains("--max-train-batch-size"),
        "{m}"
    );
    still_serves(&c, &server).await;
    server.shutdown();
    server.done.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_imported_for_one_taxonomy_is_not_trained_for_another() {
    let dir = data_dir("taxonomy");
    let cfg = ServeConfig {
        data_dir: dir.clone(),
        ..ServeConfig::default()
    };
    let cs =
        triage_taxonomy::Taxonomy::from_file(common::repo().join("configs/taxonomy/customer-support.toml"))
            .unwrap();
    let desks = vec![
        Desk::new(tiny_structurer(), None),
        Desk::new(tiny_structurer_for(cs), None),
    ];
    let mut server = Server::start_desks(cfg, desks, Some(tiny_train_context())).await;
    let c = client();
    // Imported for the default taxonomy (the first desk).
    let (s, up) = upload(&c, &server, csv(6)).await;
    assert_eq!((s.as_u16(), up["imported"].as_u64()), (201, Some(6)), "{up}");
    let (s, body) = answer(
        c.post(server.url("/api/v1/train"))
            .json(&json!({"dataset_id": up["id"], "taxonomy": "customer-support", "steps": 1})),
    )
    .await;
    assert_eq!(
        (s.as_u16(), body["error"]["code"].as_str()),
        (422, Some("dataset_taxonomy_mismatch")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"default\"") && message.contains("customer-support"),
        "{message}"
    );
    // Nothing was admitted: no job is listed and no run folder was made.
    let (s, jobs) = answer(c.get(server.url("/api/v1/train"))).await;
    assert_eq!(s, 200, "{jobs}");
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(0), "{jobs}");
    assert!(
        files(&dir.join("runs")).is_empty(),
        "{:?}",
        files(&dir.join("runs"))
    );
    server.shutdown();
    server.done.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_an_artificially_low_memory_limit_is_refused_before_it_allocates() {
    let dir = data_dir("memory");
    let c = client();
    let low = ServeConfig {
        data_dir: dir.clone(),
        memory_limit: MemoryLimit::Bytes(64 << 20),
        ..ServeConfig::default()
    };
    let mut server = Server::start(low, tiny_structurer(), Some(tiny_train_context())).await;
    let (s, up) = upload(&c, &server, csv(8)).await;
    assert_eq!(s, 201, "{up}");
    let id = up["id"].as_str().unwrap().to_owned();
    let t0 = Instant::now();
    let (s, body) = answer(
        c.post(server.url("/api/v1/train"))
            .json(&json!({"dataset_id": id})),
    )
    .await;
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(s, 507, "{body}");
    let e = &body["error"];
    assert_eq!(e["code"], "insufficient_memory", "{body}");
    let (need, available) = (
        e["need_bytes"].as_u64().unwrap(),
        e["available_bytes"].as_u64().unwrap(),
    );
    assert!(need > available, "{body}");
    let m = e["message"].as_str().unwrap();
    assert!(
        m.contains("not enough memory: training (rank 8") && m.contains("--memory-limit"),
        "{m}"
    );
    // Refused before anything was allocated or written: no job, no run directory, no adapter.
    assert!(!dir.join("runs").exists() && !dir.join("adapters").exists());
    let job = format!("/api/v1/train/job-{}-1", std::process::id());
    assert_eq!(c.get(server.url(&job)).send().await.unwrap().status(), 404);
    // The slot is free again and the service serves.
    let (s, _) = answer(
        c.post(server.url("/api/v1/train"))
            .json(&json!({"dataset_id": id})),
    )
    .await;
    assert_eq!(s, 507);
    still_serves(&c, &server).await;
    server.shutdown();
    server.done.await.unwrap().unwrap();

    // The same job on the machine's real budget is admitted and runs to its adapter.
    let mut server = Server::start(
        ServeConfig {
            data_dir: dir.clone(),
            ..ServeConfig::default()
        },
        tiny_structurer(),
        Some(tiny_train_context()),
    )
    .await;
    let (s, body) = answer(
        c.post(server.url("/api/v1/train"))
            .json(&json!({"dataset_id": id})),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let url = server.url(&format!("/api/v1/train/{}", body["job_id"].as_str().unwrap()));
    let t0 = Instant::now();
    let status = loop {
        let (_, st) = answer(c.get(&url)).await;
        if st["state"] != "running" {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "{st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status["state"], "succeeded", "{status}");
    still_serves(&c, &server).await;
    server.shutdown();
    server.done.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes `bytes` zero bytes to `p` (parents created).
fn put(p: &Path, bytes: usize) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, vec![0u8; bytes]).unwrap();
}

/// Sets the modification time of directory `p` to `secs_ago` seconds ago.
fn age(p: &Path, secs_ago: u64) {
    let t = std::time::SystemTime::now() - Duration::from_secs(secs_ago);
    std::fs::File::open(p).unwrap().set_modified(t).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_refuses_an_upload_and_deletes_nothing_it_should_keep() {
    let dir = data_dir("quota");
    // A dataset, the active adapter, an adapter nothing serves, two finished runs (the older
    // first to go), and a temporary a crashed writer left behind.
    put(&dir.join("datasets/ds-00000000aaaa.jsonl"), 1000);
    put(&dir.join("datasets/ds-00000000aaaa.json"), 100);
    put(&dir.join("adapters/job-9-1/adapter_model.safetensors"), 4000);
    put(&dir.join("adapters/job-9-2/adapter_model.safetensors"), 4000);
    put(&dir.join("runs/job-9-1/features/a.f32"), 8000);
    put(&dir.join("runs/job-9-2/features/a.f32"), 8000);
    put(&dir.join("datasets/.ds-00000000bbbb.jsonl.tmp-999999999"), 500);
    age(&dir.join("adapters/job-9-1"), 3000);
    age(&dir.join("adapters/job-9-2"), 2000);
    age(&dir.join("runs/job-9-1"), 3000);
    age(&dir.join("runs/job-9-2"), 1000);
    let kept = [
        "datasets/ds-00000000aaaa.jsonl",
        "datasets/ds-00000000aaaa.json",
        "adapters/job-9-1/adapter_model.safetensors",
    ];
    let used = 1000 + 100 + 4000 + 4000 + 8000 + 8000;
    let cfg = ServeConfig {
        data_dir: dir.clone(),
        disk_quota_bytes: used + 1000,
        ..ServeConfig::default()
    };
    // job-9-1's adapter serves the taxonomy.
    let desk = Desk::new(tiny_structurer(), Some("job-9-1".into()));
    let mut server = Server::start_desks(cfg, vec![desk], Some(tiny_train_context())).await;
    let c = client();
    assert!(
        !dir.join("datasets/.ds-00000000bbbb.jsonl.tmp-999999999").exists(),
        "the crashed writer's temporary is still there"
    );

    // An upload larger than everything the retention rule could free: 507, nothing deleted.
    let before = files(&dir);
    let big = csv(400);
    assert!(big.len() > 1000 + 8000 + 8000 + 4000, "{}", big.len());
    let (s, body) = upload(&c, &server, big).await;
    assert_eq!(s, 507, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_storage", "{body}");
    let m = body["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("--disk-quota") && m.contains("Nothing was deleted"),
        "{m}"
    );
    assert_eq!(files(&dir), before, "a refused upload deleted or wrote something");

    // An upload that fits once the oldest finished run is gone: that run only is deleted.
    let (s, body) = upload(&c, &server, csv(6)).await;
    assert_eq!(s, 201, "{body}");
    let now = files(&dir);
    assert!(!dir.join("runs/job-9-1").exists(), "{now:?}");
    for f in kept.iter().chain(&[
        "adapters/job-9-2/adapter_model.safetensors",
        "runs/job-9-2/features/a.f32",
    ]) {
        assert!(dir.join(f).exists(), "{f} was deleted: {now:?}");
    }
    let id = body["id"].as_str().unwrap();
    for ext in ["jsonl", "json", "rejects.jsonl"] {
        assert!(dir.join(format!("datasets/{id}.{ext}")).exists(), "{now:?}");
    }
    assert!(
        !now.iter().any(|f| f.contains(".tmp-") || f.contains(".upload.")),
        "{now:?}"
    );

    // Fill the quota with datasets, which the rule never deletes: finished runs and the unused
    // adapter go as needed, the active adapter and the datasets stay, and what still does not
    // fit is refused.
    let mut refused = None;
    for n in 7..40 {
        let (s, body) = upload(&c, &server, csv(n)).await;
        if s != 201 {
            refused = Some((s, body));
            break;
        }
    }
    let (s, body) = refused.expect("the quota never refused an upload");
    assert_eq!(s, 507, "{body}");
    for f in kept {
        assert!(dir.join(f).exists(), "{f} was deleted");
    }
    assert!(dir.join(format!("datasets/{id}.jsonl")).exists());
    let total: u64 = files(&dir)
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).unwrap().len())
        .sum();
    assert!(total <= used + 1000, "{total} over the quota");
    still_serves(&c, &server).await;
    server.shutdown();
    server.done.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
