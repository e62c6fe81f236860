//! Every vendor against a scripted loopback server: success, 400 with field errors (verbatim),
//! 401, 429 + Retry-After, and a timed-out create that is found by external id instead of
//! being created twice. Secrets never appear in logs, errors or dry-run output.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{serve, Resp, Server};
use triage_connectors::{push, Connector, ConnectorError, Outbox, PushInput, RetryPolicy, Vendor};
use triage_taxonomy::{Taxonomy, Validator};

const SECRET: &str = "s3cr3t-T0KEN-value";

fn input() -> PushInput {
    let v = Validator::new(&Taxonomy::builtin_default());
    let ticket = v
        .parse_str(r#"{"summary":"VPN drops every 10 minutes since the update; payroll deadline today","category":"Network","subcategory":"VPN","priority":"Critical","assignment_group":"Network Operations","request_type":"Incident"}"#)
        .unwrap();
    PushInput {
        ticket,
        text: "my VPN drops every 10 min since the update, payroll is due today!".into(),
        source_message_id: None,
        requester: None,
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        timeout: Duration::from_millis(400),
        max_retry_after: Duration::from_secs(5),
        backoff: Duration::from_millis(10),
    }
}

/// A connector for `vendor` pointed at `server`, credentials in test-specific env vars.
fn connector(vendor: Vendor, server: &Server, tag: &str) -> Connector {
    let env = |name: &str| {
        let var = format!("TRIAGE_TEST_{}_{}", tag.to_uppercase(), name);
        std::env::set_var(&var, SECRET);
        var
    };
    let url = &server.url;
    let toml = match vendor {
        Vendor::Jira => format!(
            "project_key = \"IT\"\n[site]\nbase_url = \"{url}\"\nemail_env = \"{}\"\ntoken_env = \"{}\"\n[issue_types]\n\"Incident\" = \"Incident\"\n\"Service Request\" = \"Service Request\"\n",
            env("EMAIL"),
            env("TOKEN")
        ),
        Vendor::Jsm => format!(
            "service_desk_id = \"1\"\n[site]\nbase_url = \"{url}\"\nemail_env = \"{}\"\ntoken_env = \"{}\"\n[request_type_ids]\n\"Incident\" = \"10\"\n\"Service Request\" = \"11\"\n",
            env("EMAIL"),
            env("TOKEN")
        ),
        Vendor::Zoho => format!(
            "org_id = \"60001234567\"\ndepartment_id = \"1892000000006907\"\ndesk_url = \"{url}\"\n[oauth]\naccounts_url = \"{url}\"\nclient_id_env = \"{}\"\nclient_secret_env = \"{}\"\nrefresh_token_env = \"{}\"\n[contact]\nemail = \"sd@example.com\"\nlast_name = \"Desk\"\n",
            env("CID"),
            env("CSECRET"),
            env("REFRESH")
        ),
        Vendor::Sdp => format!(
            "base_url = \"{url}\"\ndefault_requester_email = \"sd@example.com\"\n[auth]\nkind = \"authtoken\"\ntoken_env = \"{}\"\n[fields.category]\nto = \"category\"\n",
            env("TOKEN")
        ),
    };
    Connector::from_toml_str(vendor, &toml).unwrap()
}

fn outbox(tag: &str) -> Outbox {
    let dir = std::env::temp_dir().join(format!("triage-outbox-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    Outbox::new(dir.join("outbox.jsonl"))
}

/// (create path, search path, created body, search-hit body, 400 body, expected error text)
fn script(
    vendor: Vendor,
) -> (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
) {
    match vendor {
        Vendor::Jira => (
            "/rest/api/3/issue",
            "/rest/api/3/search/jql",
            r#"{"id":"10042","key":"IT-42","self":"x"}"#,
            r#"{"issues":[{"id":"10042","key":"IT-42"}],"isLast":true}"#,
            r#"{"errorMessages":[],"errors":{"customfield_10050":"Option id 'Network Operations' is not valid"}}"#,
            "customfield_10050: Option id 'Network Operations' is not valid",
        ),
        Vendor::Jsm => (
            "/rest/servicedeskapi/request",
            "/rest/api/3/search/jql",
            r#"{"issueId":"10042","issueKey":"IT-42","_links":{"web":"https://x/servicedesk/customer/portal/1/IT-42"}}"#,
            r#"{"issues":[{"id":"10042","key":"IT-42"}],"isLast":true}"#,
            r#"{"errorMessage":"The request type you are trying to use does not exist."}"#,
            "The request type you are trying to use does not exist.",
        ),
        Vendor::Zoho => (
            "/api/v1/tickets",
            "/api/v1/tickets/search",
            r#"{"id":"1892000000143237","ticketNumber":"101","webUrl":"https://desk.zoho.com/support/x/ShowHomePage.do#Cases/dv/1892000000143237"}"#,
            r#"{"data":[{"id":"1892000000143237","ticketNumber":"101"}],"count":1}"#,
            r#"{"errorCode":"INVALID_DATA","message":"The data is invalid due to validation restrictions","errors":[{"fieldName":"/departmentId","errorType":"invalid","errorMessage":""}]}"#,
            "INVALID_DATA: The data is invalid due to validation restrictions: /departmentId invalid",
        ),
        Vendor::Sdp => (
            "/api/v3/requests",
            "/api/v3/requests?",
            r#"{"request":{"id":"118"},"response_status":{"status_code":2000,"status":"success"}}"#,
            r#"{"requests":[{"id":"118"}],"response_status":[{"status_code":2000,"status":"success"}]}"#,
            r#"{"response_status":{"status_code":4000,"messages":[{"status_code":4001,"field":"category","type":"failed","message":"Value for category is invalid"}],"status":"failed"}}"#,
            "4001 category: Value for category is invalid",
        ),
    }
}

fn zoho_token_route() -> (&'static str, &'static str, Vec<Resp>) {
    (
        "POST",
        "/oauth/v2/token",
        vec![Resp::new(
            200,
            r#"{"access_token":"1000.tok","expires_in":3600,"token_type":"Bearer"}"#,
        )],
    )
}

const ALL: [Vendor; 4] = [Vendor::Jira, Vendor::Jsm, Vendor::Zoho, Vendor::Sdp];

fn creates(server: &Server, vendor: Vendor) -> usize {
    let (create, ..) = script(vendor);
    server
        .requests("POST", create)
        .iter()
        .filter(|r| !r.path.contains('?'))
        .count()
}

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
        let client = reqwest::Client::new();
        let p = push(&c, &input(), &ob, &client, &policy()).await.unwrap();
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
        let again = push(&c, &input(), &ob, &client, &policy()).await.unwrap();
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
        let err = push(
            &c,
            &input(),
            &outbox(&format!("bad-{vendor}")),
            &reqwest::Client::new(),
            &policy(),
        )
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
        let err = push(
            &c,
            &input(),
            &outbox(&format!("unauth-{vendor}")),
            &reqwest::Client::new(),
            &policy(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, ConnectorError::Vendor { status: 401, .. }),
            "{vendor}: {err}"
        );
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains(SECRET), "{vendor}: secret in the error: {shown}");
        assert_eq!(creates(&server, vendor), 1);
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
        let p = push(
            &c,
            &input(),
            &outbox(&format!("rl-{vendor}")),
            &reqwest::Client::new(),
            &policy(),
        )
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

#[tokio::test]
async fn a_timed_out_create_is_found_by_external_id_and_not_created_twice() {
    for vendor in ALL {
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
        let c = connector(vendor, &server, &format!("to_{vendor}"));
        let p = push(
            &c,
            &input(),
            &outbox(&format!("to-{vendor}")),
            &reqwest::Client::new(),
            &policy(),
        )
        .await
        .unwrap();
        assert_eq!(p.via, "search", "{vendor}");
        assert_eq!(creates(&server, vendor), 1, "{vendor}: created twice");
        let searches = server.requests("GET", search);
        assert_eq!(searches.len(), 1);
        assert!(
            searches[0].path.contains(&p.external_id.replace('-', ""))
                || searches[0].path.contains(&p.external_id),
            "{vendor}: {}",
            searches[0].path
        );
    }
}

#[tokio::test]
async fn a_timed_out_create_that_did_not_happen_is_posted_again_once() {
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
    let p = push(&c, &input(), &outbox("again"), &reqwest::Client::new(), &policy())
        .await
        .unwrap();
    assert_eq!(p.via, "created");
    assert_eq!(creates(&server, vendor), 2);
    assert_eq!(
        server.requests("GET", search).len(),
        1,
        "searched once, between the two posts"
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
    let err = push(
        &c,
        &input(),
        &outbox("unreach"),
        &reqwest::Client::new(),
        &policy(),
    )
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
        let p = push(
            &c,
            &input(),
            &outbox(&format!("log-{vendor}")),
            &reqwest::Client::new(),
            &policy(),
        )
        .await;
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
        dry_runs.push_str(&c.dry_run(&input()).await.unwrap());
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
