//! Deployment behaviour against loopback servers: OAuth tokens reused across pushes (in
//! memory and through the private cache file), refreshed once on a 401; no duplicate when the
//! vendor's search sees a create late or a create gets a 503; `unknown` outbox entries
//! settled by reconcile; JSM's requester resolved to an accountId.

mod support;

use std::time::Duration;

use support::*;
use triage_connectors::{
    push, reconcile, ConnectorError, OutboxEntry, OutboxState, RetryPolicy, Session, Vendor,
};

/// (vendor, tag) of the two connectors that use Zoho OAuth.
const OAUTH: [(Vendor, &str); 2] = [(Vendor::Zoho, "zoho"), (Vendor::Sdp, "cloud_sdp")];

#[tokio::test]
async fn twenty_five_pushes_refresh_the_token_once_in_memory() {
    for (vendor, tag) in OAUTH {
        let (create, _, created, ..) = script(vendor);
        let server = serve(vec![
            ("POST", create, vec![Resp::new(201, created)]),
            zoho_token_route(),
        ])
        .await;
        let c = connector(vendor, &server, &format!("mem_{tag}"));
        let ob = outbox(&format!("mem-{tag}"));
        let session = session();
        for n in 1..=25 {
            let p = push(&*c, &input_n(n), &ob, &session).await.unwrap();
            assert_eq!(p.via, "created");
        }
        assert_eq!(creates(&server, vendor), 25, "{vendor}");
        assert_eq!(
            server.requests("POST", "/oauth/v2/token").len(),
            1,
            "{vendor}: one refresh for 25 pushes"
        );
        let auths: Vec<String> = server
            .requests("POST", create)
            .iter()
            .filter_map(|r| r.header("authorization").map(str::to_owned))
            .collect();
        assert!(auths.iter().all(|a| a == "Zoho-oauthtoken 1000.tok"), "{auths:?}");
    }
}

#[tokio::test]
async fn twenty_five_cli_runs_refresh_the_token_once_through_a_private_file() {
    for (vendor, tag) in OAUTH {
        let (create, _, created, ..) = script(vendor);
        let server = serve(vec![
            ("POST", create, vec![Resp::new(201, created)]),
            zoho_token_route(),
        ])
        .await;
        let c = connector(vendor, &server, &format!("file_{tag}"));
        let ob = outbox(&format!("file-{tag}"));
        let cache = scratch(&format!("cache-{tag}")).join("connectors");
        for n in 1..=25 {
            // A new process each time: nothing survives in memory.
            let session = Session::new(reqwest::Client::new(), policy()).with_cache_dir(&cache);
            push(&*c, &input_n(n), &ob, &session).await.unwrap();
        }
        assert_eq!(creates(&server, vendor), 25);
        assert_eq!(server.requests("POST", "/oauth/v2/token").len(), 1, "{vendor}");
        let file = cache.join("oauth-tokens.json");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{mode:o}");
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains(SECRET),
            "the refresh token and client secret are never cached"
        );
    }
}

/// Eight CLI runs at once (`xargs -P`), each with its own memory, share the cache file: one
/// refreshes the token, the others wait for it and read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_cli_runs_refresh_the_token_once_through_a_private_file() {
    let vendor = Vendor::Zoho;
    let (create, _, created, ..) = script(vendor);
    let server = serve(vec![
        ("POST", create, vec![Resp::new(201, created); 8]),
        zoho_token_route(),
    ])
    .await;
    let c: std::sync::Arc<dyn triage_connectors::Connector> = connector(vendor, &server, "parallel").into();
    let ob = outbox("parallel");
    let cache = scratch("cache-parallel").join("connectors");
    let runs: Vec<_> = (1..=8)
        .map(|n| {
            let (c, ob, cache) = (c.clone(), ob.clone(), cache.clone());
            tokio::spawn(async move {
                let session = Session::new(reqwest::Client::new(), policy()).with_cache_dir(&cache);
                push(&*c, &input_n(n), &ob, &session).await.map(|p| p.id)
            })
        })
        .collect();
    for r in runs {
        r.await.unwrap().unwrap();
    }
    assert_eq!(creates(&server, vendor), 8);
    assert_eq!(server.requests("POST", "/oauth/v2/token").len(), 1);
}

#[tokio::test]
async fn a_rejected_token_is_refreshed_once_and_an_expiring_one_is_not_reused() {
    let vendor = Vendor::Zoho;
    let (create, _, created, ..) = script(vendor);
    let server = serve(vec![
        (
            "POST",
            create,
            vec![
                Resp::new(
                    401,
                    r#"{"errorCode":"INVALID_OAUTH","message":"The OAuth Token you provided is invalid."}"#,
                ),
                Resp::new(201, created),
            ],
        ),
        (
            "POST",
            "/oauth/v2/token",
            vec![
                Resp::new(200, r#"{"access_token":"1000.old","expires_in":3600}"#),
                Resp::new(200, r#"{"access_token":"1000.new","expires_in":3600}"#),
            ],
        ),
    ])
    .await;
    let c = connector(vendor, &server, "revoked");
    let session = session();
    let p = push(&*c, &input(), &outbox("revoked"), &session).await.unwrap();
    assert_eq!(p.via, "created");
    let posts = server.requests("POST", create);
    assert_eq!(posts.len(), 2);
    assert_eq!(posts[0].header("authorization"), Some("Zoho-oauthtoken 1000.old"));
    assert_eq!(posts[1].header("authorization"), Some("Zoho-oauthtoken 1000.new"));
    assert_eq!(server.requests("POST", "/oauth/v2/token").len(), 2);

    // A token that expires within the margin is refreshed at every push.
    let server = serve(vec![
        ("POST", create, vec![Resp::new(201, created)]),
        (
            "POST",
            "/oauth/v2/token",
            vec![Resp::new(200, r#"{"access_token":"1000.short","expires_in":1}"#)],
        ),
    ])
    .await;
    let c = connector(vendor, &server, "short");
    let ob = outbox("short");
    for n in 1..=3 {
        push(&*c, &input_n(n), &ob, &session).await.unwrap();
    }
    assert_eq!(server.requests("POST", "/oauth/v2/token").len(), 3);
}

#[tokio::test]
async fn a_create_that_search_sees_late_is_not_posted_twice() {
    // Jira's search is not read-after-write consistent: the ticket created by the timed-out
    // POST shows up only at the third search.
    for vendor in ALL {
        let (create, search, created, hit, ..) = script(vendor);
        let server = serve(vec![
            (
                "GET",
                search,
                vec![
                    Resp::new(if vendor == Vendor::Zoho { 204 } else { 200 }, no_hits(vendor)),
                    Resp::new(if vendor == Vendor::Zoho { 204 } else { 200 }, no_hits(vendor)),
                    Resp::new(200, hit),
                ],
            ),
            (
                "POST",
                create,
                vec![Resp::new(201, created).after(Duration::from_secs(2))],
            ),
            zoho_token_route(),
        ])
        .await;
        let c = connector(vendor, &server, &format!("late_{vendor}"));
        let ob = outbox(&format!("late-{vendor}"));
        let p = push(&*c, &input(), &ob, &session()).await.unwrap();
        assert_eq!(p.via, "search", "{vendor}");
        assert_eq!(
            creates(&server, vendor),
            1,
            "{vendor}: posted again before the index caught up"
        );
        assert_eq!(server.requests("GET", search).len(), 3, "{vendor}");
        let e = ob.latest(vendor.as_str(), &p.external_id).unwrap().unwrap();
        assert_eq!(e.state, OutboxState::Created);
        assert!(!e.reposted);
    }
}

#[tokio::test]
async fn a_503_on_create_is_searched_before_posting_again() {
    for vendor in ALL {
        let (create, search, created, hit, ..) = script(vendor);
        // The gateway answered 503 although the ticket was created.
        let server = serve(vec![
            ("GET", search, vec![Resp::new(200, hit)]),
            (
                "POST",
                create,
                vec![
                    Resp::new(503, "<html>Service Unavailable</html>").header("Retry-After", "0"),
                    Resp::new(201, created),
                ],
            ),
            zoho_token_route(),
        ])
        .await;
        let c = connector(vendor, &server, &format!("u503_{vendor}"));
        let p = push(&*c, &input(), &outbox(&format!("u503-{vendor}")), &session())
            .await
            .unwrap();
        assert_eq!(p.via, "search", "{vendor}");
        assert_eq!(creates(&server, vendor), 1, "{vendor}: a 503 was re-sent blindly");
    }
}

#[tokio::test]
async fn a_repost_after_an_unsettled_create_is_checked_for_a_duplicate_by_reconcile() {
    let vendor = Vendor::Jira;
    let (create, search, created, ..) = script(vendor);
    let server = serve(vec![
        ("GET", search, vec![Resp::new(200, no_hits(vendor))]),
        (
            "POST",
            create,
            vec![
                Resp::new(503, "{}").header("Retry-After", "0"),
                Resp::new(201, created),
            ],
        ),
    ])
    .await;
    let c = connector(vendor, &server, "dup");
    let ob = outbox("dup");
    let p = push(&*c, &input(), &ob, &session()).await.unwrap();
    assert_eq!((p.via, p.id.as_str()), ("created", "10042"));
    let states: Vec<OutboxState> = std::fs::read_to_string(ob.path())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<OutboxEntry>(l).unwrap().state)
        .collect();
    assert_eq!(
        states,
        [OutboxState::Pending, OutboxState::Unknown, OutboxState::Created]
    );
    assert!(ob.latest("jira", &p.external_id).unwrap().unwrap().reposted);

    // A reconcile while the index still shows only the repost: no duplicate yet, and the
    // entry stays watched (the first create may surface later) ...
    let later = serve(vec![(
        "GET",
        search,
        vec![
            Resp::new(200, r#"{"issues":[{"id":"10042","key":"IT-42"}],"isLast":true}"#),
            Resp::new(
                200,
                r#"{"issues":[{"id":"10041","key":"IT-41"},{"id":"10042","key":"IT-42"}],"isLast":true}"#,
            ),
        ],
    )])
    .await;
    let c = connector(vendor, &later, "dup");
    let r = reconcile(&*c, &ob, &session()).await.unwrap();
    assert_eq!(r.len(), 1);
    assert!(r[0].duplicates.is_empty());
    assert!(
        r[0].note.as_deref().unwrap_or("").contains("checked again"),
        "{r:?}"
    );
    assert!(ob.latest("jira", &p.external_id).unwrap().unwrap().reposted);
    // ... so when the index shows the first create too, the next reconcile reports it.
    let r = reconcile(&*c, &ob, &session()).await.unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].id.as_deref(), Some("10042"));
    assert_eq!(r[0].duplicates, ["10041"]);
    let e = ob.latest("jira", &p.external_id).unwrap().unwrap();
    assert!(!e.reposted && e.duplicates == ["10041"]);
    // Checked once: a second reconcile has nothing to do.
    assert!(reconcile(&*c, &ob, &session()).await.unwrap().is_empty());
    assert_eq!(later.requests("GET", search).len(), 2);
}

/// Reconcile waits for a push of the same incident that is under way, and settles what that
/// push left rather than its own earlier snapshot: a `created` recorded meanwhile is never
/// overwritten with `absent` (which would let the next push post a duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_waits_for_a_running_push_and_keeps_what_it_recorded() {
    let vendor = Vendor::Jira;
    let (_, search, ..) = script(vendor);
    let ob = outbox("race");
    let ext = triage_connectors::external_id(&input());
    // An old unknown entry: with no ticket found, reconcile would call it absent.
    ob.record(&OutboxEntry {
        at: 0,
        ..OutboxEntry::new("jira", &ext, OutboxState::Unknown)
    })
    .unwrap();
    let server = serve(vec![("GET", search, vec![Resp::new(200, no_hits(vendor))])]).await;
    let c: std::sync::Arc<dyn triage_connectors::Connector> = connector(vendor, &server, "race").into();
    // A push holds the incident's claim ...
    let claim = ob.claim("jira", &ext).await.unwrap();
    let task = {
        let (c, ob) = (c.clone(), ob.clone());
        tokio::spawn(async move { reconcile(&*c, &ob, &session()).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ... and records its ticket before letting go.
    ob.record(&OutboxEntry {
        id: Some("10042".into()),
        ..OutboxEntry::new("jira", &ext, OutboxState::Created)
    })
    .unwrap();
    drop(claim);
    let r = task.await.unwrap().unwrap();
    assert!(r.is_empty(), "{r:?}");
    assert_eq!(
        ob.latest("jira", &ext).unwrap().unwrap().state,
        OutboxState::Created
    );
    assert!(
        server.requests("GET", search).is_empty(),
        "searched a settled entry"
    );
}

/// One entry whose search fails (a 400 here) keeps its state, with a note, and reconcile goes
/// on: the entries after it are settled and reported in the same run.
#[tokio::test]
async fn a_failed_search_leaves_its_entry_open_and_reconcile_goes_on() {
    let vendor = Vendor::Jira;
    let (_, search, _, hit, ..) = script(vendor);
    let ob = outbox("partial");
    for n in 0..2 {
        let ext = triage_connectors::external_id(&input_n(n));
        ob.record(&OutboxEntry::new("jira", &ext, OutboxState::Unknown))
            .unwrap();
    }
    let server = serve(vec![(
        "GET",
        search,
        vec![
            Resp::new(400, r#"{"errorMessages":["bad JQL"],"errors":{}}"#),
            Resp::new(200, hit),
        ],
    )])
    .await;
    let c = connector(vendor, &server, "partial");
    let r = reconcile(&*c, &ob, &session()).await.unwrap();
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0].after, OutboxState::Unknown);
    let note = r[0].note.as_deref().unwrap_or("");
    assert!(
        note.contains("400") && note.contains("--reconcile again"),
        "{note}"
    );
    assert_eq!(
        (r[1].after, r[1].key.as_deref()),
        (OutboxState::Created, Some("IT-42"))
    );
}

#[tokio::test]
async fn without_repost_an_unsettled_create_stops_as_unknown_and_reconcile_settles_it() {
    let vendor = Vendor::Zoho;
    let (create, search, created, hit, ..) = script(vendor);
    let server = serve(vec![
        ("GET", search, vec![Resp::new(204, "")]),
        (
            "POST",
            create,
            vec![Resp::new(201, created).after(Duration::from_secs(2))],
        ),
        zoho_token_route(),
    ])
    .await;
    let c = connector(vendor, &server, "norepost");
    let ob = outbox("norepost");
    let strict = Session::new(
        reqwest::Client::new(),
        RetryPolicy {
            repost: false,
            ..policy()
        },
    );
    let err = push(&*c, &input(), &ob, &strict).await.unwrap_err();
    assert!(matches!(err, ConnectorError::Unsettled { .. }), "{err}");
    assert!(err.to_string().contains("triage push --reconcile"), "{err}");
    assert_eq!(creates(&server, vendor), 1);
    let ext = triage_connectors::external_id(&input());
    assert_eq!(
        ob.latest("zoho", &ext).unwrap().unwrap().state,
        OutboxState::Unknown
    );

    // Too recent to call it absent: reconcile leaves it and says why.
    let r = reconcile(
        &*c,
        &ob,
        &Session::new(
            reqwest::Client::new(),
            RetryPolicy {
                search_window: Duration::from_secs(3600),
                ..policy()
            },
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        (r[0].before, r[0].after),
        (OutboxState::Unknown, OutboxState::Unknown)
    );
    assert!(r[0].note.as_deref().unwrap_or("").contains("too recent"), "{r:?}");

    // The ticket is visible now: reconcile settles it; the next push answers from the outbox.
    let later = serve(vec![
        ("GET", search, vec![Resp::new(200, hit)]),
        zoho_token_route(),
    ])
    .await;
    let c = connector(vendor, &later, "norepost");
    let r = reconcile(&*c, &ob, &session()).await.unwrap();
    assert_eq!(
        (r[0].before, r[0].after),
        (OutboxState::Unknown, OutboxState::Created)
    );
    assert_eq!(r[0].id.as_deref(), Some("1892000000143237"));
    let p = push(&*c, &input(), &ob, &session()).await.unwrap();
    assert_eq!(p.via, "outbox");
    assert!(later.requests("POST", create).is_empty());
}

#[tokio::test]
async fn an_old_unknown_entry_without_a_ticket_becomes_absent_and_is_then_posted() {
    let vendor = Vendor::Sdp;
    let (create, search, created, ..) = script(vendor);
    let server = serve(vec![
        ("GET", search, vec![Resp::new(200, no_hits(vendor))]),
        ("POST", create, vec![Resp::new(201, created)]),
    ])
    .await;
    let c = connector(vendor, &server, "absent");
    let ob = outbox("absent");
    let ext = triage_connectors::external_id(&input());
    ob.record(&OutboxEntry {
        at: 1_000,
        ..OutboxEntry::new("sdp", &ext, OutboxState::Unknown)
    })
    .unwrap();
    let r = reconcile(&*c, &ob, &session()).await.unwrap();
    assert_eq!(r[0].after, OutboxState::Absent);
    assert_eq!(creates(&server, vendor), 0, "reconcile never posts");
    let p = push(&*c, &input(), &ob, &session()).await.unwrap();
    assert_eq!(p.via, "created");
    assert_eq!(creates(&server, vendor), 1);
}

#[tokio::test]
async fn a_push_after_a_crash_searches_before_posting() {
    // A previous run recorded `pending` and died: the ticket may exist.
    let vendor = Vendor::Jira;
    let (create, search, created, hit, ..) = script(vendor);
    let server = serve(vec![
        ("GET", search, vec![Resp::new(200, hit)]),
        ("POST", create, vec![Resp::new(201, created)]),
    ])
    .await;
    let c = connector(vendor, &server, "crash");
    let ob = outbox("crash");
    let ext = triage_connectors::external_id(&input());
    ob.record(&OutboxEntry::new("jira", &ext, OutboxState::Pending))
        .unwrap();
    let p = push(&*c, &input(), &ob, &session()).await.unwrap();
    assert_eq!(p.via, "search");
    assert_eq!(creates(&server, vendor), 0);
}

const ANNA: &str = r#"[{"accountId":"5b10ac8d82e05b22cc7d4ef5","accountType":"customer","emailAddress":"anna@example.com","active":true}]"#;

#[tokio::test]
async fn jsm_raises_on_behalf_of_the_account_id_of_an_e_mail_address() {
    let vendor = Vendor::Jsm;
    let (create, _, created, ..) = script(vendor);
    let server = serve(vec![
        ("GET", "/rest/api/3/user/search", vec![Resp::new(200, ANNA)]),
        ("POST", create, vec![Resp::new(201, created)]),
    ])
    .await;
    let c = connector(vendor, &server, "jsm_anna");
    let ob = outbox("jsm-anna");
    let session = session();
    for n in 1..=3 {
        let mut i = input_n(n);
        i.requester = Some("anna@example.com".into());
        push(&*c, &i, &ob, &session).await.unwrap();
    }
    let posts = server.requests("POST", create);
    assert_eq!(posts.len(), 3);
    for p in &posts {
        let body: serde_json::Value = serde_json::from_str(&p.body).unwrap();
        assert_eq!(body["raiseOnBehalfOf"], "5b10ac8d82e05b22cc7d4ef5", "{}", p.body);
    }
    let lookups = server.requests("GET", "/rest/api/3/user/search");
    assert_eq!(lookups.len(), 1, "the lookup is cached");
    assert!(
        lookups[0].path.contains("query=anna%40example.com"),
        "{}",
        lookups[0].path
    );
    assert!(lookups[0]
        .header("authorization")
        .is_some_and(|a| a.starts_with("Basic ")));

    // An accountId goes through as is, without a lookup.
    let mut i = input_n(10);
    i.requester = Some("557058:f58131cb-b67d-43c7-b30d-6b58d40bd077".into());
    push(&*c, &i, &ob, &session).await.unwrap();
    let last = server.requests("POST", create).pop().unwrap();
    assert!(last.body.contains("557058:f58131cb"), "{}", last.body);
    assert_eq!(server.requests("GET", "/rest/api/3/user/search").len(), 1);
}

#[tokio::test]
async fn jsm_refuses_an_unknown_e_mail_or_one_it_may_not_look_up_with_advice() {
    let vendor = Vendor::Jsm;
    let (create, _, created, ..) = script(vendor);
    let server = serve(vec![
        ("GET", "/rest/api/3/user/search", vec![Resp::new(200, "[]")]),
        ("POST", create, vec![Resp::new(201, created)]),
    ])
    .await;
    let c = connector(vendor, &server, "jsm_nobody");
    let mut i = input();
    i.requester = Some("nobody@example.com".into());
    let err = push(&*c, &i, &outbox("jsm-nobody"), &session())
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Requester { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("nobody@example.com") && text.contains("accountId"),
        "{text}"
    );
    assert_eq!(
        creates(&server, vendor),
        0,
        "nothing is created for an unknown requester"
    );

    // requester_lookup = false: an e-mail address is refused before anything is sent.
    let toml =
        mapping(vendor, &server.url, "jsm_strict").replacen("[site]", "requester_lookup = false\n[site]", 1);
    let c = triage_connectors::from_toml_str(vendor, &toml, std::path::Path::new("jsm.toml")).unwrap();
    let err = push(&*c, &i, &outbox("jsm-strict"), &session())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("takes an Atlassian accountId") && text.contains("jsm.toml"),
        "{text}"
    );
    assert_eq!(server.requests("GET", "/rest/api/3/user/search").len(), 1);
    // Neither an e-mail nor an accountId.
    i.requester = Some("Anna Smith".into());
    let err = push(&*c, &i, &outbox("jsm-name"), &session()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("neither an e-mail address nor an Atlassian accountId"),
        "{err}"
    );
}
