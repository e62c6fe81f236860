//! Property tests of the service's request parsing, called as functions (no model, no
//! server): the JSON bodies of `/v1/tickets`, `/v1/tickets:batch`, `/api/v1/classify` and
//! `/api/v1/train` (with the job configuration built from it), and the query of
//! `/api/v1/train-data`. None may panic; every refusal is a 400 or 422 with a code and a message
//! that names the body (and the field, where one is at fault). Figures: `docs/fuzzing.md`.

#[path = "../../../tests/support/fuzz.rs"]
mod fuzz;

use axum::body::Bytes;
use axum::http::StatusCode;
use fuzz::{bytes, fail, mutated_any, names, run, Check, Failure, Verdict};
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use triage_taxonomy::Taxonomy;
use triage_train::trainer::TrainConfig;

use crate::api::{parse_json, BatchRequest, ClassifyRequest, TicketRequest};
use crate::error::ApiError;
use crate::jobs::{job_config, query_pairs, upload_query, TrainRequest};
use crate::TrainLimits;

/// A refusal of a request: 400 `malformed_json` or 422 with a code, a message naming the body,
/// and `field` when the message names one.
fn check_refusal(e: &ApiError) -> Result<(), Failure> {
    if !matches!(
        e.status,
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY
    ) {
        return fail(format!("status {} for {e:?}", e.status));
    }
    names(e.code, &[])?;
    names(&e.message, &[])?;
    if let Some((_, field)) = e.details.iter().find(|(k, _)| *k == "field") {
        let Some(f) = field.as_str() else {
            return fail("`field` is not a string");
        };
        names(&e.message, &[f])?;
    }
    Ok(())
}

fn check_body<T: DeserializeOwned>(b: &[u8]) -> Check {
    match parse_json::<T>(&Bytes::copy_from_slice(b)) {
        Ok(_) => Ok(Verdict::Accepted),
        Err(e) => {
            check_refusal(&e)?;
            names(&e.message, &["request body"])?;
            Ok(Verdict::Rejected)
        }
    }
}

fn seeds(texts: &[&str]) -> Vec<Vec<u8>> {
    texts.iter().map(|t| t.as_bytes().to_vec()).collect()
}

#[test]
fn ticket_bodies_never_panic_and_refusals_name_the_body_and_field() {
    let tickets = seeds(&[
        r#"{"text": "My VPN drops every 10 minutes", "taxonomy": "default"}"#,
        r#"{"text": "Printer \"HP\" jams\n\u00e9\ud83d\ude00"}"#,
    ]);
    let (_, a, r) = run("serve/tickets-mutated", 100_000, mutated_any(tickets), |b| {
        check_body::<TicketRequest>(&b)
    });
    assert!(a > 0 && r > 0, "{a} / {r}");
    let batch = seeds(&[
        r#"{"items": [{"id": "a", "text": "VPN down"}, {"text": "printer"}], "taxonomy": "default"}"#,
    ]);
    run("serve/batch-mutated", 50_000, mutated_any(batch), |b| {
        check_body::<BatchRequest>(&b)
    });
    let classify = seeds(&[r#"{"ticket_data": "Subject: VPN\n\nIt drops."}"#]);
    run("serve/classify-mutated", 30_000, mutated_any(classify), |b| {
        check_body::<ClassifyRequest>(&b)
    });
    run("serve/tickets-bytes", 20_000, bytes(128), |b| {
        check_body::<TicketRequest>(&b)
    });
}

#[test]
fn train_bodies_never_panic_and_out_of_bounds_values_name_their_field() {
    let base = TrainConfig::default();
    let limits = TrainLimits::default();
    let check = |b: Vec<u8>| -> Check {
        let req = match parse_json::<TrainRequest>(&Bytes::from(b)) {
            Ok(r) => r,
            Err(e) => {
                check_refusal(&e)?;
                names(&e.message, &["request body"])?;
                return Ok(Verdict::Rejected);
            }
        };
        match job_config(&base, &req, &limits) {
            Ok(c) => {
                let over = |given: Option<usize>, value: usize| given.is_some_and(|g| g != value);
                if over(req.steps, c.steps) || over(req.rank, c.rank) {
                    return fail(format!("the request's values were not applied: {req:?}"));
                }
                Ok(Verdict::Accepted)
            }
            Err(e) => {
                check_refusal(&e)?;
                if e.code == "limit_exceeded" {
                    let field = e.details.iter().find(|(k, _)| *k == "field");
                    let Some(f) = field.and_then(|(_, v)| v.as_str()) else {
                        return fail("no `field`");
                    };
                    if ["rank", "steps", "lr"].contains(&f) {
                        let given = match f {
                            "rank" => req.rank.is_some(),
                            "steps" => req.steps.is_some(),
                            _ => req.lr.is_some(),
                        };
                        if !given {
                            return fail(format!("blames `{f}`, which the request did not send"));
                        }
                    }
                }
                Ok(Verdict::Rejected)
            }
        }
    };
    let train = seeds(&[
        r#"{"dataset_id": "ds-0123456789ab", "steps": 20, "lr": 0.0002, "rank": 8, "activate": true, "taxonomy": "default"}"#,
        r#"{"dataset_id": "ds-0123456789ab"}"#,
        r#"{"dataset_id": "ds-0123456789ab", "steps": 2000, "lr": 1e-2, "rank": 64}"#,
    ]);
    let (_, a, r) = run("serve/train-mutated", 100_000, mutated_any(train), check);
    assert!(a > 0 && r > 0, "{a} / {r}");
    // Numbers anywhere in their range and beyond.
    let numbers = (
        proptest::option::of(any::<u64>()),
        proptest::option::of(prop_oneof![any::<f64>(), 0.0f64..0.1]),
        proptest::option::of(prop_oneof![any::<u64>(), 0u64..100]),
    )
        .prop_map(|(steps, lr, rank)| {
            let mut o = serde_json::json!({"dataset_id": "ds-0123456789ab"});
            if let Some(v) = steps {
                o["steps"] = v.into();
            }
            if let Some(v) = lr {
                o["lr"] = serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into);
            }
            if let Some(v) = rank {
                o["rank"] = v.into();
            }
            o.to_string().into_bytes()
        });
    run("serve/train-numbers", 50_000, numbers, check);
}

#[test]
fn upload_queries_never_panic_and_refusals_say_what_to_send() {
    let taxonomy = Taxonomy::builtin_default();
    let check = |b: Vec<u8>| -> Check {
        let q = String::from_utf8_lossy(&b);
        let pairs = query_pairs(Some(&q));
        match upload_query(&pairs, &taxonomy) {
            Ok(u) => {
                if u.specs.is_empty() || u.mapping.text.is_empty() {
                    return fail(format!("accepted an upload without a text column: {q:?}"));
                }
                Ok(Verdict::Accepted)
            }
            Err(e) => {
                check_refusal(&e)?;
                names(&e.message, &["map", "format", "column"])?;
                Ok(Verdict::Rejected)
            }
        }
    };
    let queries = seeds(&[
        "map=text=body&map=subject=subj&map=category=cat&map=subcategory=sub&map=priority=prio&map=assignment_group=grp&map=request_type=kind&format=csv&taxonomy=default",
        "map=text%3Dbody&map=category%3Dq&map=subcategory=s&map=priority=p&map=assignment_group=g&map=request_type=k&format=jsonl",
    ]);
    let (_, a, r) = run("serve/upload-query-mutated", 100_000, mutated_any(queries), check);
    assert!(a > 0 && r > 0, "{a} / {r}");
    run("serve/upload-query-bytes", 20_000, bytes(128), check);
}
