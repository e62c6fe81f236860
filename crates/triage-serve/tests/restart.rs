//! The training job list survives a restart of the service (the tiny random model, as in
//! `limits.rs`): a job running when the service stops is listed by the next one as
//! `interrupted`, with its last checkpoint, and new jobs get new ids.

mod common;

use std::time::{Duration, Instant};

use common::{answer, client, csv, tiny_structurer, tiny_train_context, Server, MAP};
use reqwest::StatusCode;
use serde_json::{json, Value};
use triage_serve::{JobState, ServeConfig, TrainContext};

/// The tiny training context, checkpointing after every step.
fn train_context() -> TrainContext {
    let mut ctx = tiny_train_context();
    ctx.config.checkpoint_every = 1;
    ctx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_when_the_service_stops_is_listed_as_interrupted_after_a_restart() {
    let dir = std::env::temp_dir().join(format!("triage-serve-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = || ServeConfig {
        data_dir: dir.clone(),
        ..ServeConfig::default()
    };
    let c = client();

    // A job that would run for long, stopped by a shutdown once it has checkpointed. The
    // first service and its state end with this block.
    let (dataset, id, checkpoint_step) = {
        let mut server = Server::start(config(), tiny_structurer(), Some(train_context())).await;
        let (s, up) = answer(
            c.post(server.url(&format!("/api/v1/train-data?{MAP}")))
                .header("content-type", "text/csv")
                .body(csv(8)),
        )
        .await;
        assert_eq!(s, 201, "{up}");
        let (s, body) = answer(
            c.post(server.url("/api/v1/train"))
                .json(&json!({"dataset_id": up["id"], "steps": 2000})),
        )
        .await;
        assert_eq!(s, 202, "{body}");
        let id = body["job_id"].as_str().unwrap().to_owned();
        let record = dir.join("runs").join(format!("{id}.json"));
        let state_json = dir.join("runs").join(&id).join("checkpoint/state.json");
        let t0 = Instant::now();
        loop {
            let (_, st) = answer(c.get(server.url(&format!("/api/v1/train/{id}")))).await;
            assert_eq!(st["state"], "running", "{st}");
            if st["step"].as_u64().unwrap_or(0) >= 2 && state_json.exists() {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "{st}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The record on disk is what a crash right now would leave.
        let on_disk: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
        assert_eq!(
            (on_disk["id"].as_str(), on_disk["state"].as_str()),
            (Some(id.as_str()), Some("running"))
        );
        server.shutdown();
        server.done.await.unwrap().unwrap();
        // `serve` returned once the job had checkpointed and stopped.
        let jobs = server.state.training_jobs();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].state, JobState::Stopped, "{:?}", jobs[0]);
        let saved: Value = serde_json::from_slice(&std::fs::read(&state_json).unwrap()).unwrap();
        let checkpoint_step = saved["state"]["step"].as_u64().unwrap();
        assert!(checkpoint_step >= 2, "{saved}");
        (up["id"].clone(), id, checkpoint_step)
    };

    // A new service over the same data folder lists the job as interrupted.
    let mut server = Server::start(config(), tiny_structurer(), Some(train_context())).await;
    let (s, list) = answer(c.get(server.url("/api/v1/train"))).await;
    assert_eq!(s, 200, "{list}");
    let jobs = list["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{list}");
    let job = &jobs[0];
    assert_eq!(job["id"], id.as_str());
    assert_eq!(job["state"], "interrupted", "{job}");
    assert_eq!(job["checkpoint_step"].as_u64(), Some(checkpoint_step), "{job}");
    let checkpoint = job["checkpoint"].as_str().unwrap();
    assert!(
        std::path::Path::new(checkpoint).join("state.json").is_file(),
        "{job}"
    );
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains(&format!("step {checkpoint_step}")),
        "{job}"
    );
    let (s, one) = answer(c.get(server.url(&format!("/api/v1/train/{id}")))).await;
    assert_eq!((s, &one), (StatusCode::OK, job));
    // Not an adapter to activate.
    let (s, _) = answer(c.post(server.url(&format!("/api/v1/train/{id}/activate")))).await;
    assert_eq!(s, 409);

    // A new job in this process (the same process id) gets a new id, and both are listed.
    let (s, body) = answer(
        c.post(server.url("/api/v1/train"))
            .json(&json!({"dataset_id": dataset, "steps": 1})),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let second = body["job_id"].as_str().unwrap().to_owned();
    assert_ne!(second, id);
    let t0 = Instant::now();
    loop {
        let (_, st) = answer(c.get(server.url(&format!("/api/v1/train/{second}")))).await;
        if st["state"] != "running" {
            assert_eq!(st["state"], "succeeded", "{st}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "{st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, list) = answer(c.get(server.url("/api/v1/train"))).await;
    let states: Vec<(&str, &str)> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["id"].as_str().unwrap(), j["state"].as_str().unwrap()))
        .collect();
    assert!(states.contains(&(id.as_str(), "interrupted")), "{states:?}");
    assert!(states.contains(&(second.as_str(), "succeeded")), "{states:?}");
    server.shutdown();
    server.done.await.unwrap().unwrap();

    // And a third start reads the finished job as finished.
    let mut server = Server::start(config(), tiny_structurer(), Some(train_context())).await;
    let (_, st) = answer(c.get(server.url(&format!("/api/v1/train/{second}")))).await;
    assert_eq!(st["state"], "succeeded", "{st}");
    assert!(st["adapter"].as_str().is_some(), "{st}");
    server.shutdown();
    server.done.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
