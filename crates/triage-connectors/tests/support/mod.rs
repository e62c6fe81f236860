//! A scripted loopback HTTP/1.1 server for connector tests: each route answers from a queue
//! of canned responses (the last one repeats), optionally after a delay, and every request is
//! recorded. Also the shared fixtures: a ticket, a fast retry policy, a connector for each
//! vendor pointed at a server, a fresh outbox.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use triage_connectors::{Connector, Outbox, PushInput, RetryPolicy, Session, Vendor};
use triage_taxonomy::{Taxonomy, Validator};

pub const SECRET: &str = "s3cr3t-T0KEN-value";

/// The VPN incident; `n` > 0 gives a distinct incident (another external id).
pub fn input_n(n: usize) -> PushInput {
    let v = Validator::new(&Taxonomy::builtin_default());
    let ticket = v
        .parse_str(r#"{"summary":"VPN drops every 10 minutes since the update; payroll deadline today","category":"Network","subcategory":"VPN","priority":"Critical","assignment_group":"Network Operations","request_type":"Incident"}"#)
        .unwrap();
    let mut text = "my VPN drops every 10 min since the update, payroll is due today!".to_owned();
    if n > 0 {
        text.push_str(&format!(" (incident {n})"));
    }
    PushInput {
        ticket,
        text,
        source_message_id: None,
        requester: None,
    }
}

pub fn input() -> PushInput {
    input_n(0)
}

/// Short timeouts; a 300 ms search window with 20 ms first pause.
pub fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        timeout: Duration::from_millis(400),
        max_retry_after: Duration::from_secs(5),
        backoff: Duration::from_millis(10),
        search_window: Duration::from_millis(300),
        search_interval: Duration::from_millis(20),
        repost: true,
    }
}

pub fn session() -> Session {
    Session::new(Session::client_builder().build().unwrap(), policy())
}

/// Sets `TRIAGE_TEST_<TAG>_<NAME>` to the secret and returns the variable's name.
pub fn env(tag: &str, name: &str) -> String {
    let var = format!("TRIAGE_TEST_{}_{}", tag.to_uppercase(), name);
    std::env::set_var(&var, SECRET);
    var
}

/// The mapping TOML of `vendor` pointed at `url`, credentials in test-specific env vars.
/// `Vendor::Sdp` with a tag containing `cloud` uses Zoho OAuth (ServiceDesk Plus Cloud).
pub fn mapping(vendor: Vendor, url: &str, tag: &str) -> String {
    let env = |name: &str| env(tag, name);
    match vendor {
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
        Vendor::Sdp if tag.contains("cloud") => format!(
            "base_url = \"{url}\"\ndefault_requester_email = \"sd@example.com\"\n[auth]\nkind = \"oauth\"\nregion = \"eu\"\naccounts_url = \"{url}\"\nclient_id_env = \"{}\"\nclient_secret_env = \"{}\"\nrefresh_token_env = \"{}\"\n[fields.category]\nto = \"category\"\n",
            env("CID"),
            env("CSECRET"),
            env("REFRESH")
        ),
        Vendor::Sdp => format!(
            "base_url = \"{url}\"\ndefault_requester_email = \"sd@example.com\"\n[auth]\nkind = \"authtoken\"\ntoken_env = \"{}\"\n[fields.category]\nto = \"category\"\n",
            env("TOKEN")
        ),
    }
}

/// A connector for `vendor` pointed at `server`.
pub fn connector(vendor: Vendor, server: &Server, tag: &str) -> Box<dyn Connector> {
    triage_connectors::from_toml_str(vendor, &mapping(vendor, &server.url, tag), Path::new("test.toml"))
        .unwrap()
}

/// A fresh outbox in a folder of its own.
pub fn outbox(tag: &str) -> Outbox {
    Outbox::new(scratch(tag).join("outbox.jsonl"))
}

/// A fresh, empty folder for this test process.
pub fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("triage-connectors-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// (create path, search path, created body, search-hit body, 400 body, expected error text)
pub fn script(
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

/// An empty search answer of `vendor`.
pub fn no_hits(vendor: Vendor) -> &'static str {
    match vendor {
        Vendor::Jira | Vendor::Jsm => r#"{"issues":[],"isLast":true}"#,
        Vendor::Zoho => "",
        Vendor::Sdp => r#"{"requests":[],"response_status":[{"status_code":2000,"status":"success"}]}"#,
    }
}

/// The token route: the same token, valid an hour.
pub fn zoho_token_route() -> (&'static str, &'static str, Vec<Resp>) {
    (
        "POST",
        "/oauth/v2/token",
        vec![Resp::new(
            200,
            r#"{"access_token":"1000.tok","expires_in":3600,"token_type":"Bearer"}"#,
        )],
    )
}

pub const ALL: [Vendor; 4] = [Vendor::Jira, Vendor::Jsm, Vendor::Zoho, Vendor::Sdp];

/// POSTs to the create path (not the search, which shares SDP's path).
pub fn creates(server: &Server, vendor: Vendor) -> usize {
    let (create, ..) = script(vendor);
    server
        .requests("POST", create)
        .iter()
        .filter(|r| !r.path.contains('?'))
        .count()
}

#[derive(Clone, Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Resp {
    pub fn new(status: u16, body: &str) -> Self {
        Resp {
            status,
            headers: vec![],
            body: body.to_owned(),
            delay: Duration::ZERO,
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn after(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Route {
    method: &'static str,
    path: &'static str,
    queue: VecDeque<Resp>,
}

#[derive(Clone)]
pub struct Server {
    pub url: String,
    pub log: Arc<Mutex<Vec<Recorded>>>,
}

impl Server {
    pub fn requests(&self, method: &str, path_prefix: &str) -> Vec<Recorded> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.method == method && r.path.starts_with(path_prefix))
            .cloned()
            .collect()
    }
}

/// Starts a server; `routes` are (method, path prefix, responses).
pub async fn serve(routes: Vec<(&'static str, &'static str, Vec<Resp>)>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let routes = Arc::new(Mutex::new(
        routes
            .into_iter()
            .map(|(method, path, r)| Route {
                method,
                path,
                queue: r.into(),
            })
            .collect::<Vec<_>>(),
    ));
    let server = Server {
        url,
        log: log.clone(),
    };
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            let routes = routes.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                let mut lines = head.split("\r\n");
                let mut first = lines.next().unwrap_or("").split(' ');
                let method = first.next().unwrap_or("").to_owned();
                let path = first.next().unwrap_or("").to_owned();
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
                log.lock().unwrap().push(Recorded {
                    method: method.clone(),
                    path: path.clone(),
                    headers,
                    body,
                });
                let resp = {
                    let mut routes = routes.lock().unwrap();
                    match routes
                        .iter_mut()
                        .find(|r| r.method == method && path.starts_with(r.path))
                    {
                        Some(r) if r.queue.len() > 1 => r.queue.pop_front().unwrap(),
                        Some(r) => r
                            .queue
                            .front()
                            .cloned()
                            .unwrap_or_else(|| Resp::new(500, "empty script")),
                        None => Resp::new(404, "{\"errorMessages\":[\"no such route\"]}"),
                    }
                };
                tokio::time::sleep(resp.delay).await;
                let mut out = format!(
                    "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                    resp.status,
                    resp.body.len()
                );
                if !resp.body.is_empty() {
                    out.push_str("Content-Type: application/json\r\n");
                }
                for (k, v) in &resp.headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                out.push_str(&resp.body);
                let _ = sock.write_all(out.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    server
}
