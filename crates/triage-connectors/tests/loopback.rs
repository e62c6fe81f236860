//! Every vendor against a scripted loopback server: success, 400 with field errors (verbatim),
//! 401, 429 + Retry-After, and a timed-out create that is found by external id instead of
//! being created twice. Secrets never appear in logs, errors or dry-run output.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use triage_connectors::{dry_run, push, ConnectorError, RetryPolicy, Session, Vendor};

#[tokio::test]
async fn creates_and_returns_the_vendor_id_and_records_it() {
    for vendor in ALL {
        let (create, _, created, ..) = script(vendor);
        let server = serve(vec![
            ("POST", create, vec![Resp::new(201, created)]),
            zoho_token_route(),
        ])
        .await;
        let c = connector(vendor, &server, &format!("ok_{vendor}"));
        let ob = outbox(&format!("ok-{vendor}"));
        let client = session();
        let p = push(&*c, &input(), &ob, &client).await.unwrap();
        assert_eq!(p.via, "created");
        assert!(
            p.id == "10042" || p.id == "1892000000143237" || p.id == "118",
            "{p:?}"
        );
        assert!(p.external_id.starts_with("triage-"));
        // Auth reached the server, in the vendor's scheme.
        let req = &server.requests("POST", create)[0];
        match vendor {
            Vendor::Jira | Vendor::Jsm => assert!(req.header("authorization").unwrap().starts_with("Basic ")),
            Vendor::Zoho => {
                assert_eq!(req.header("authorization"), Some("Zoho-oauthtoken 1000.tok"));
                assert_eq!(req.header("orgId"), Some("60001234567"));
            }
            Vendor::Sdp => {
                assert_eq!(req.header("authtoken"), Some(SECRET));
                assert_eq!(
                    req.header("accept"),
                    Some("application/vnd.manageengine.sdp.v3+json")
                );
                assert!(req.body.starts_with("input_data="), "{}", req.body);
            }
        }
        assert!(
            req.body.contains(&p.external_id),
            "{vendor}: external id not in the payload"
        );
        // A second push of the same incident is answered from the outbox: no new ticket.
        let again = push(&*c, &input(), &ob, &client).await.unwrap();
        assert_eq!(again.via, "outbox");
        assert_eq!(again.id, p.id);
        assert_eq!(creates(&server, vendor), 1, "{vendor}");
    }
}

#[tokio::test]
async fn vendor_error_text_reaches_the_user_and_4xx_is_not_retried() {
    for vendor in ALL {
        let (create, _, _, _, bad, expected) = script(vendor);
        let server = serve(vec![
            ("POST", create, vec![Resp::new(400, bad)]),
            zoho_token_route(),
        ])
        .await;
        let c = connector(vendor, &server, &format!("bad_{vendor}"));
        let err = push(&*c, &input(), &outbox(&format!("bad-{vendor}")), &session())
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("400") && text.contains(expected),
            "{vendor}: {text}"
        );
        assert_eq!(creates(&server, vendor), 1, "{vendor}: a 400 must not be retried");
    }
}

#[tokio::test]
async fn unauthorized_is_reported_without_leaking_the_secret() {
    for vendor in ALL {
        let (create, ..) = script(vendor);
        let server = serve(vec![
            ("POST", create, vec![Resp::new(401, r#"{"errorMessages":["Client must be authenticated to access this resource."],"message":"Unauthorized"}"#)]),
            zoho_token_route(),
        ])
        .await;
        let c = connector(vendor, &server, &format!("unauth_{vendor}"));
        let err = push(&*c, &input(), &outbox(&format!("unauth-{vendor}")), &session())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ConnectorError::Vendor { status: 401, .. }),
            "{vendor}: {err}"
        );
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains(SECRET), "{vendor}: secret in the error: {shown}");
        // The error names the request it answered and what to check.
        let text = err.to_string();
        assert!(
            text.contains(&format!("to POST {}{create}", server.url))
                && text.contains("check the credentials"),
            "{vendor}: {text}"
        );
        // An OAuth token rejected with 401 is refreshed and the create sent once more.
        let (posts, refreshes) = if vendor == Vendor::Zoho { (2, 2) } else { (1, 0) };
        assert_eq!(creates(&server, vendor), posts, "{vendor}");
        assert_eq!(
            server.requests("POST", "/oauth/v2/token").len(),
            refreshes,
            "{vendor}"
        );
    }
}

#[tokio::test]
async fn rate_limits_wait_for_retry_after_then_succeed() {
    for vendor in ALL {
        let (create, _, created, ..) = script(vendor);
        let limited = if vendor == Vendor::Sdp {
            // SDP signals its limit with code 4015 in the body.
            Resp::new(400, r#"{"response_status":{"status_code":4000,"messages":[{"status_code":4015,"message":"Too many requests"}],"status":"failed"}}"#)
                .header("Retry-After", "1")
        } else {
            Resp::new(429, r#"{"errorMessages":["Rate limit exceeded."]}"#).header("Retry-After", "1")
        };
        let server = serve(vec![
            ("POST", create, vec![limited, Resp::new(201, created)]),
            zoho_token_route(),
        ])
        .await;
        let c = connector(vendor, &server, &format!("rl_{vendor}"));
        let start = std::time::Instant::now();
        let p = push(&*c, &input(), &outbox(&format!("rl-{vendor}")), &session())
            .await
            .unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(950),
            "{vendor}: did not wait for Retry-After"
        );
        assert_eq!(p.via, "created");
        assert_eq!(creates(&server, vendor), 2);
    }
}

/// Every vendor, and once more with a policy a library caller may write, `Duration::MAX` for
/// the search window and pause: the search deadline is then far away instead of an `Instant`
/// overflow (it panicked).
#[tokio::test]
async fn a_timed_out_create_is_found_by_external_id_and_not_created_twice() {
    let unbounded = RetryPolicy {
        search_window: Duration::MAX,
        search_interval: Duration::MAX,
        ..policy()
    };
    let cases = ALL.map(|v| (v, policy(), format!("{v}"))).into_iter().chain([(
        Vendor::Jira,
        unbounded,
        "unbounded".to_owned(),
    )]);
    for (vendor, policy, tag) in cases {
        let (create, search, created, hit, ..) = script(vendor);
        // The vendor creates the ticket but answers after the client gave up.
        let server = serve(vec![
            ("GET", search, vec![Resp::new(200, hit)]),
            (
                "POST",
                create,
                vec![Resp::new(201, created).after(Duration::from_secs(2))],
            ),
            zoho_token_route(),
        ])
        .await;
        let c = connector(vendor, &server, &format!("to_{tag}"));
        let session = Session::new(reqwest::Client::new(), policy);
        let p = push(&*c, &input(), &outbox(&format!("to-{tag}")), &session)
            .await
            .unwrap();
        assert_eq!(p.via, "search", "{tag}");
        assert_eq!(creates(&server, vendor), 1, "{tag}: created twice");
        let searches = server.requests("GET", search);
        assert_eq!(searches.len(), 1);
        assert!(
            searches[0].path.contains(&p.external_id.replace('-', ""))
                || searches[0].path.contains(&p.external_id),
            "{tag}: {}",
            searches[0].path
        );
    }
}

#[tokio::test]
async fn a_5xx_create_not_found_within_the_window_is_posted_again_once() {
    let vendor = Vendor::Jira;
    let (create, search, created, ..) = script(vendor);
    let server = serve(vec![
        (
            "GET",
            search,
            vec![Resp::new(200, r#"{"issues":[],"isLast":true}"#)],
        ),
        (
            "POST",
            create,
            vec![
                Resp::new(504, "<html>gateway timeout</html>"),
                Resp::new(201, created),
            ],
        ),
    ])
    .await;
    let c = connector(vendor, &server, "again");
    let p = push(&*c, &input(), &outbox("again"), &session()).await.unwrap();
    assert_eq!(p.via, "created");
    assert_eq!(creates(&server, vendor), 2);
    // Searched repeatedly over the window (the index may lag), all between the two posts.
    let log = server.log.lock().unwrap().clone();
    let kinds: Vec<&str> = log.iter().map(|r| r.method.as_str()).collect();
    let searches = kinds.iter().filter(|k| **k == "GET").count();
    assert!(searches >= 3, "{kinds:?}");
    assert_eq!(kinds.first(), Some(&"POST"));
    assert_eq!(kinds.last(), Some(&"POST"));
    assert_eq!(kinds.len(), searches + 2, "{kinds:?}");
}

/// A 2xx answer to the create that cannot be read most likely means the ticket exists: the
/// push fails as unsettled, the outbox says `unknown`, and the next push searches by external
/// id and finds it instead of posting a duplicate.
#[tokio::test]
async fn an_unreadable_2xx_create_is_searched_before_posting_again() {
    let vendor = Vendor::Jira;
    let (create, search, _, hit, ..) = script(vendor);
    let server = serve(vec![
        ("POST", create, vec![Resp::new(201, "<html>created</html>")]),
        ("GET", search, vec![Resp::new(200, hit)]),
    ])
    .await;
    let c = connector(vendor, &server, "unreadable");
    let ob = outbox("unreadable");
    let err = push(&*c, &input(), &ob, &session()).await.unwrap_err();
    assert!(matches!(err, ConnectorError::Unsettled { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("cannot be read") && text.contains("--reconcile"),
        "{text}"
    );
    let ext = triage_connectors::external_id(&input());
    let entry = ob.latest(vendor.as_str(), &ext).unwrap().unwrap();
    assert_eq!(entry.state, triage_connectors::OutboxState::Unknown);
    let p = push(&*c, &input(), &ob, &session()).await.unwrap();
    assert_eq!(p.via, "search");
    assert_eq!(p.key.as_deref(), Some("IT-42"));
    assert_eq!(creates(&server, vendor), 1, "posted twice");
}

/// SDP may refuse a create with HTTP 200 and `"status": "failed"`: its own message reaches
/// the user, nothing is searched or posted again, and the outbox says `absent`.
#[tokio::test]
async fn an_sdp_create_refused_inside_a_200_is_the_vendors_error() {
    let vendor = Vendor::Sdp;
    let (create, _, _, _, bad, expected) = script(vendor);
    let server = serve(vec![("POST", create, vec![Resp::new(200, bad)])]).await;
    let c = connector(vendor, &server, "failed200");
    let ob = outbox("failed200");
    let err = push(&*c, &input(), &ob, &session()).await.unwrap_err();
    assert!(matches!(err, ConnectorError::Vendor { status: 200, .. }), "{err}");
    assert!(err.to_string().contains(expected), "{err}");
    let ext = triage_connectors::external_id(&input());
    let entry = ob.latest(vendor.as_str(), &ext).unwrap().unwrap();
    assert_eq!(entry.state, triage_connectors::OutboxState::Absent);
    assert_eq!(server.log.lock().unwrap().len(), 1, "only the one create");
}

/// A refusal inside a 200 after a repost: the first, ambiguous attempt may have created the
/// ticket, so the outbox keeps the incident `unknown` (searched later), not `absent`.
#[tokio::test]
async fn a_refusal_after_a_repost_keeps_the_incident_unknown() {
    let vendor = Vendor::Sdp;
    let (create, search, _, _, bad, _) = script(vendor);
    let server = serve(vec![
        ("GET", search, vec![Resp::new(200, no_hits(vendor))]),
        (
            "POST",
            create,
            vec![
                Resp::new(504, "<html>gateway timeout</html>"),
                Resp::new(200, bad),
            ],
        ),
    ])
    .await;
    let c = connector(vendor, &server, "refused_repost");
    let ob = outbox("refused-repost");
    let err = push(&*c, &input(), &ob, &session()).await.unwrap_err();
    assert!(matches!(err, ConnectorError::Vendor { status: 200, .. }), "{err}");
    let ext = triage_connectors::external_id(&input());
    let entry = ob.latest(vendor.as_str(), &ext).unwrap().unwrap();
    assert_eq!(entry.state, triage_connectors::OutboxState::Unknown);
    assert!(entry.reposted);
    assert_eq!(creates(&server, vendor), 2);
}

/// Two pushes of the same incident at once (two CLI runs, two server requests) post it once:
/// the second waits for the first's claim, then finds its ticket in the outbox.
#[tokio::test]
async fn two_concurrent_pushes_of_one_incident_create_one_ticket() {
    let vendor = Vendor::Jira;
    let (create, _, created, ..) = script(vendor);
    let server = serve(vec![(
        "POST",
        create,
        vec![
            Resp::new(201, created).after(Duration::from_millis(150)),
            Resp::new(201, r#"{"id":"10043","key":"IT-43","self":"x"}"#),
        ],
    )])
    .await;
    let c = connector(vendor, &server, "concurrent");
    let ob = outbox("concurrent");
    let (s1, s2) = (session(), session());
    let (i1, i2) = (input(), input());
    let (a, b) = tokio::join!(push(&*c, &i1, &ob, &s1), push(&*c, &i2, &ob, &s2));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(creates(&server, vendor), 1, "posted twice");
    assert_eq!(a.id, b.id);
    let mut via = [a.via, b.via];
    via.sort();
    assert_eq!(via, ["created", "outbox"]);
}

/// An answer larger than the cap is cut there, not read into memory whole; a create whose
/// answer was cut has an unknown outcome, so it is searched for before anything is re-posted.
#[tokio::test]
async fn a_huge_answer_is_cut_at_the_cap_and_searched() {
    let vendor = Vendor::Jira;
    let (create, search, _, hit, ..) = script(vendor);
    let huge = "x".repeat(triage_connectors::MAX_BODY_BYTES + (1 << 20));
    let server = serve(vec![
        ("POST", create, vec![Resp::new(201, &huge)]),
        ("GET", search, vec![Resp::new(200, hit)]),
    ])
    .await;
    let c = connector(vendor, &server, "huge");
    let p = push(&*c, &input(), &outbox("huge"), &session()).await.unwrap();
    assert_eq!((p.via, p.key.as_deref()), ("search", Some("IT-42")));
    assert_eq!(creates(&server, vendor), 1);
}

/// A redirect is never followed: SDP's `authtoken` header would go along to the other host
/// (reqwest drops only `Authorization`). The error names where it pointed and what to set.
#[tokio::test]
async fn a_redirect_is_reported_and_credentials_never_follow_it() {
    let vendor = Vendor::Sdp;
    let (create, _, created, ..) = script(vendor);
    let elsewhere = serve(vec![("POST", create, vec![Resp::new(201, created)])]).await;
    let target = format!("{}{create}", elsewhere.url);
    let server = serve(vec![(
        "POST",
        create,
        vec![Resp::new(302, "").header("Location", &target)],
    )])
    .await;
    let c = connector(vendor, &server, "redirect");
    let err = push(&*c, &input(), &outbox("redirect"), &session())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectorError::Redirected { status: 302, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains(&target) && text.contains("base_url"), "{text}");
    assert!(!text.contains(SECRET), "{text}");
    assert_eq!(creates(&server, vendor), 1);
    assert!(
        elsewhere.log.lock().unwrap().is_empty(),
        "the redirect was followed"
    );
}

#[tokio::test]
async fn an_unreachable_itsm_is_a_clear_error() {
    // A port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let server = Server {
        url,
        log: Default::default(),
    };
    let c = connector(Vendor::Jira, &server, "unreach");
    let err = push(&*c, &input(), &outbox("unreach"), &session())
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("unreachable"), "{err}");
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_never_appear_in_logs_or_dry_runs() {
    let capture = Capture::default();
    let sink = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let mut dry_runs = String::new();
    for vendor in ALL {
        let (create, search, created, hit, ..) = script(vendor);
        let server = serve(vec![
            ("GET", search, vec![Resp::new(200, hit)]),
            (
                "POST",
                create,
                vec![
                    Resp::new(429, "{}").header("Retry-After", "0"),
                    Resp::new(201, created).after(Duration::from_secs(1)),
                ],
            ),
            zoho_token_route(),
        ])
        .await;
        let c = connector(vendor, &server, &format!("log_{vendor}"));
        let p = push(&*c, &input(), &outbox(&format!("log-{vendor}")), &session()).await;
        assert!(p.is_ok(), "{vendor}: {p:?}");
        // The secret was really used on the wire...
        let sent: String = server
            .log
            .lock()
            .unwrap()
            .iter()
            .map(|r| format!("{:?}", r.headers))
            .collect();
        let basic = "Basic ";
        assert!(
            sent.contains(SECRET) || sent.contains(basic) || sent.contains("1000.tok"),
            "{vendor}"
        );
        dry_runs.push_str(&dry_run(&*c, &input()).await.unwrap());
    }
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("will search before retrying"),
        "logging was captured: {logs}"
    );
    assert!(
        !logs.contains(SECRET) && !logs.contains("1000.tok"),
        "secret in logs:\n{logs}"
    );
    // Basic credentials are base64(email:token): check that form too.
    assert!(!logs.contains("czNjcjN0"), "encoded secret in logs");
    assert!(
        !dry_runs.contains(SECRET) && dry_runs.contains("<redacted>"),
        "{dry_runs}"
    );
}
