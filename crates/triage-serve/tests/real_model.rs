//! Every endpoint against the real 0.5B model over loopback: a ticket, a batch, classify,
//! a CSV upload, a one-step training job, its status, and activating its adapter without a
//! restart (later tickets report it).

mod common;

use std::time::{Duration, Instant};

use common::{client, real_structurer, Server};
use serde_json::{json, Value};
use triage_serve::ServeConfig;
use triage_taxonomy::Validator;
use triage_train::trainer::TrainConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_with_the_real_model() {
    let train = TrainConfig {
        steps: 1,
        warmup_steps: 0,
        batch_size: 1,
        grad_accum: 1,
        eval_every: 0,
        accuracy_samples: 0,
        checkpoint_every: 0,
        max_tokens: 256,
        ..TrainConfig::default()
    };
    let (structurer, ctx) = tokio::task::spawn_blocking(move || real_structurer(train))
        .await
        .unwrap();
    let data_dir = std::env::temp_dir().join(format!("triage-serve-real-{}", std::process::id()));
    let cfg = ServeConfig {
        data_dir: data_dir.clone(),
        ..ServeConfig::default()
    };
    let mut server = Server::start(cfg, structurer, Some(ctx)).await;
    let c = client();
    let validator = Validator::new(&common::taxonomy());
    let post = |p: &str, b: Value| c.post(server.url(p)).json(&b).send();
    let post_json = |p: &str, b: Value| {
        let req = c.post(server.url(p)).json(&b);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };

    let r = post_json(
        "/v1/tickets",
        json!({"text": "My VPN drops every 10 minutes since the update, payroll is due today!"}),
    )
    .await;
    assert!(validator.schema_accepts(&r["ticket"]), "{r}");
    assert_eq!(r["ticket"]["category"], "Network", "{r}");
    assert_eq!(r["meta"]["adapter"], Value::Null);

    let r = post_json(
        "/v1/tickets:batch",
        json!({"items": [{"id": "1", "text": "Outlook keeps asking for my password"}, {"id": "2", "text": "Please order a second monitor for me"}]}),
    )
    .await;
    for item in r["results"].as_array().unwrap() {
        assert!(validator.schema_accepts(&item["ticket"]), "{item}");
    }

    let r = post_json(
        "/api/v1/classify",
        json!({"ticket_data": "The office printer jams on every page"}),
    )
    .await;
    assert_eq!(r["predicted_label"], r["ticket"]["category"]);

    // Upload labelled tickets, train one step, watch the job, activate the adapter.
    let mut csv = String::from("body,cat,sub,prio,grp,kind\n");
    for i in 0..6 {
        csv.push_str(&format!(
            "\"VPN disconnects every {} minutes when working from home\",Network,VPN,High,Network Operations,Incident\n",
            5 + i
        ));
        csv.push_str(&format!(
            "\"Please install Visio on laptop LT-{i}04\",Software,Installation / Update,Low,Desktop Support,Service Request\n"
        ));
    }
    let map = "map=text=body&map=category=cat&map=subcategory=sub&map=priority=prio&map=assignment_group=grp&map=request_type=kind";
    let up: Value = c
        .post(server.url(&format!("/api/v1/train-data?{map}")))
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (up["imported"].as_u64(), up["rejected"].as_u64()),
        (Some(12), Some(0)),
        "{up}"
    );
    let id = up["id"].as_str().unwrap();
    let r = post("/api/v1/train", json!({"dataset_id": id})).await.unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    let job_id = job["job_id"].as_str().unwrap().to_owned();
    // One job at a time.
    let again = post("/api/v1/train", json!({"dataset_id": id})).await.unwrap();
    assert_eq!(again.status(), 409);

    let t0 = Instant::now();
    let status = loop {
        let s: Value = c
            .get(server.url(&format!("/api/v1/train/{job_id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if s["state"] != "running" {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(900),
            "training did not finish: {s}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(status["step"], 1);
    assert!(status["loss"].as_f64().is_some_and(f64::is_finite));
    let adapter_dir = std::path::PathBuf::from(status["adapter"].as_str().unwrap());
    assert!(adapter_dir.join("adapter_model.safetensors").exists());
    assert!(adapter_dir.join("adapter_config.json").exists());
    // It records the upload it was trained on, by content.
    let meta: Value =
        serde_json::from_slice(&std::fs::read(adapter_dir.join("triage.json")).unwrap()).unwrap();
    let data = &meta["data"][0];
    assert_eq!(
        (&data["role"], &data["examples"]),
        (&json!("dataset"), &json!(12)),
        "{meta}"
    );
    assert!(
        data["file"].as_str().unwrap().ends_with(&format!("{id}.jsonl")),
        "{meta}"
    );
    assert_eq!(data["sha256"].as_str().map(str::len), Some(64), "{meta}");

    let r = post(&format!("/api/v1/train/{job_id}/activate"), json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = post_json(
        "/v1/tickets",
        json!({"text": "Wi-Fi keeps dropping in meeting room 3"}),
    )
    .await;
    assert_eq!(r["meta"]["adapter"], job_id.as_str(), "{r}");
    assert!(validator.schema_accepts(&r["ticket"]), "{r}");
    let ready: Value = c
        .get(server.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["taxonomies"][0]["adapter"], job_id.as_str());

    server.shutdown();
    server.done.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
}
