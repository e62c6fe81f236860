//! The vendor-independent push flow: external id, outbox, create, search before posting
//! again, and reconciliation.
//!
//! No vendor offers an idempotency key, so a create whose outcome is unknown (a timeout, a
//! 5xx, a 503 — the request may have been acted on) is followed by searches for the external
//! id over [`RetryPolicy::search_window`] (vendor search indexes lag behind writes: Jira's
//! "from a few seconds to minutes"). Found: that ticket is the result. Not found in the
//! window: the create is posted again (or, with `repost = false`, the push stops), and the
//! outbox keeps `unknown` / `reposted` so that [`reconcile`] can settle it and report a
//! duplicate if the first create surfaces later. This bounds duplicates to creates that stay
//! invisible to search for longer than the window; it does not exclude them.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::connector::{Auth, Connector, Lookup};
use crate::http::{self, HttpRequest, Retry, RetryPolicy, Sent, VendorRules};
use crate::oauth::{auth_header, ZohoOAuth};
use crate::outbox::{Outbox, OutboxEntry, OutboxState};
use crate::session::Session;
use crate::types::{external_id, now, PushInput, Pushed};
use crate::{ConnectorError, Secret};

/// Authentication headers for one connector, refreshed once on a 401 when they come from
/// the Zoho OAuth flow.
struct Authed<'a> {
    c: &'a dyn Connector,
    session: &'a Session,
    headers: Vec<(String, Secret)>,
    oauth: Option<(&'a ZohoOAuth, Secret)>,
    refreshed: bool,
}

impl<'a> Authed<'a> {
    async fn new(c: &'a dyn Connector, session: &'a Session) -> Result<Self, ConnectorError> {
        let (headers, oauth) = match c.auth(false)? {
            Auth::Headers(h) => (h, None),
            Auth::ZohoOAuth(o) => {
                let token = session
                    .tokens
                    .token(o, &session.client, &session.policy, None)
                    .await?;
                (vec![auth_header(&token)], Some((o, token)))
            }
        };
        Ok(Authed {
            c,
            session,
            headers,
            oauth,
            refreshed: false,
        })
    }

    /// Sends `req` with the credentials; an OAuth token rejected with 401 is refreshed and
    /// the request sent once more (a 401 means the request was not acted on).
    async fn send(&mut self, req: &HttpRequest, retry: Retry) -> Result<Sent, ConnectorError> {
        let c = self.c;
        let error_text = |b: &str| c.error_text(b);
        let rate_limited = |b: &str| c.rate_limited(b);
        let rules = VendorRules {
            vendor: c.vendor().as_str(),
            error_text: &error_text,
            rate_limited: &rate_limited,
        };
        let mut req = req.clone();
        req.secret_headers = self.headers.clone();
        let s = self.session;
        let first = http::send(&s.client, &req, &s.policy, &rules, retry).await;
        if self.refreshed || !matches!(first, Err(ConnectorError::Vendor { status: 401, .. })) {
            return first;
        }
        let (o, stale) = match self.oauth.take() {
            Some((o, stale)) if o.access_token_env.is_none() => (o, stale),
            other => {
                self.oauth = other;
                return first;
            }
        };
        self.refreshed = true;
        tracing::info!(
            vendor = rules.vendor,
            "access token rejected (401); refreshing it once"
        );
        let token = s.tokens.token(o, &s.client, &s.policy, Some(&stale)).await?;
        self.headers = vec![auth_header(&token)];
        self.oauth = Some((o, token));
        req.secret_headers = self.headers.clone();
        http::send(&s.client, &req, &s.policy, &rules, retry).await
    }

    /// Searches for `ext` until a hit or `deadline` (at least once), pausing
    /// `search_interval`, doubling, between searches. Returns the hits, oldest first.
    async fn search_until(&mut self, ext: &str, deadline: Instant) -> Result<Vec<Pushed>, ConnectorError> {
        let search = self.c.search_request(ext);
        let policy: &RetryPolicy = &self.session.policy;
        let first = policy.search_interval.max(Duration::from_millis(1));
        let mut pause = first;
        let mut searches = 0u32;
        loop {
            searches += 1;
            match self.send(&search, Retry::Safe).await? {
                Sent::Ok(body) => {
                    let hits = self.c.parse_search(&body)?;
                    if !hits.is_empty() {
                        return Ok(hits);
                    }
                }
                Sent::Ambiguous { reason, .. } => {
                    tracing::warn!(vendor = %self.c.vendor(), external_id = ext, "search failed ({reason}); trying again")
                }
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::info!(vendor = %self.c.vendor(), external_id = ext, searches, "not found within the search window");
                return Ok(Vec::new());
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = pause.saturating_mul(2).min(first.saturating_mul(8));
        }
    }
}

/// `d` from now; a window longer than an `Instant` can hold (a library caller's policy may
/// say `Duration::MAX`) ends in 30 years instead of panicking.
fn deadline_in(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400))
}

/// The first hit as the result, the others as duplicates.
fn first_of(mut hits: Vec<Pushed>, ext: &str, via: &'static str) -> Pushed {
    let mut found = hits.remove(0);
    found.duplicates = hits.into_iter().map(|p| p.id).collect();
    found.external_id = ext.to_owned();
    found.via = via;
    if !found.duplicates.is_empty() {
        tracing::warn!(external_id = ext, id = %found.id, duplicates = ?found.duplicates, "more than one ticket carries this external id");
    }
    found
}

fn created_entry(vendor: &str, p: &Pushed, reposted: bool) -> OutboxEntry {
    OutboxEntry {
        id: Some(p.id.clone()),
        key: p.key.clone(),
        url: p.url.clone(),
        reposted,
        duplicates: p.duplicates.clone(),
        ..OutboxEntry::new(vendor, &p.external_id, OutboxState::Created)
    }
}

/// After a create the vendor refused: `absent`, unless an earlier attempt of this push may
/// have created the ticket (`reposted`), which keeps it `unknown` for a later search.
fn refused_entry(vendor: &str, ext: &str, e: &ConnectorError, reposted: bool) -> OutboxEntry {
    match reposted {
        true => unknown_entry(vendor, ext, &e.to_string(), true),
        false => OutboxEntry {
            reason: Some(e.to_string()),
            ..OutboxEntry::new(vendor, ext, OutboxState::Absent)
        },
    }
}

fn unknown_entry(vendor: &str, ext: &str, reason: &str, reposted: bool) -> OutboxEntry {
    OutboxEntry {
        reason: Some(reason.to_owned()),
        reposted,
        ..OutboxEntry::new(vendor, ext, OutboxState::Unknown)
    }
}

/// Creates the ticket unless the outbox or the vendor already has it; see the module
/// documentation for what happens when a create's outcome is unknown.
pub async fn push(
    c: &dyn Connector,
    input: &PushInput,
    outbox: &Outbox,
    session: &Session,
) -> Result<Pushed, ConnectorError> {
    let ext = external_id(input);
    let vendor = c.vendor().as_str();
    let policy = &session.policy;
    // Held until this push returns: a concurrent push of the same incident waits, then finds
    // what this one recorded.
    let _claim = outbox.claim(vendor, &ext).await?;
    let previous = outbox.latest(vendor, &ext)?;
    if let Some(e) = previous.as_ref().filter(|e| e.state == OutboxState::Created) {
        tracing::info!(vendor, external_id = %ext, "already pushed (outbox)");
        return Ok(Pushed {
            id: e.id.clone().unwrap_or_default(),
            key: e.key.clone(),
            url: e.url.clone(),
            external_id: ext,
            via: "outbox",
            duplicates: e.duplicates.clone(),
        });
    }
    let mut auth = Authed::new(c, session).await?;
    // An unknown outcome (or a crash after posting): look before posting, over what is left
    // of the window since that attempt.
    let mut reposted = false;
    if let Some(e) = previous.filter(|e| e.state.unsettled()) {
        // `at` comes from the outbox file: a corrupt one must not overflow the deadline.
        let window = policy.search_window.as_secs();
        let left = e.at.saturating_add(window).saturating_sub(now()).min(window);
        tracing::info!(vendor, external_id = %ext, state = e.state.as_str(), "an earlier attempt may have created it; searching first");
        let hits = auth
            .search_until(&ext, deadline_in(Duration::from_secs(left)))
            .await?;
        if !hits.is_empty() {
            let found = first_of(hits, &ext, "search");
            outbox.record(&created_entry(vendor, &found, false))?;
            return Ok(found);
        }
        reposted = true;
    }
    let headers = auth.headers.clone();
    let resolved = c
        .resolve(
            input,
            Lookup::Live {
                session,
                auth: &headers,
            },
        )
        .await?;
    let req = c.create_request(&resolved, &ext)?;
    outbox.record(&OutboxEntry {
        reposted,
        ..OutboxEntry::new(vendor, &ext, OutboxState::Pending)
    })?;
    let unsettled = |last: String| ConnectorError::Unsettled {
        vendor,
        external_id: ext.clone(),
        outbox: outbox.path().to_owned(),
        last,
    };
    for attempt in 1..=policy.max_attempts.max(1) {
        let sent = match auth.send(&req, Retry::CreateOnce).await {
            Ok(s) => s,
            Err(e) => {
                // A definitive answer (4xx, unreachable): this attempt created nothing.
                outbox.record(&refused_entry(vendor, &ext, &e, reposted))?;
                return Err(e);
            }
        };
        match sent {
            Sent::Ok(body) => {
                let mut created = match c.parse_created(&body) {
                    Ok(created) => created,
                    Err(e @ ConnectorError::Vendor { .. }) => {
                        // The vendor says, in a 2xx, that it refused the create.
                        outbox.record(&refused_entry(vendor, &ext, &e, reposted))?;
                        return Err(e);
                    }
                    Err(e) => {
                        // A 2xx whose answer cannot be read: the ticket was most likely
                        // created. Recorded as unknown, so the next push or reconcile
                        // searches by external id before anything is posted again.
                        let reason = format!("a 2xx answer to the create that cannot be read: {e}");
                        tracing::warn!(vendor, external_id = %ext, "{reason}");
                        outbox.record(&unknown_entry(vendor, &ext, &reason, reposted))?;
                        return Err(unsettled(reason));
                    }
                };
                created.external_id = ext.clone();
                outbox.record(&created_entry(vendor, &created, reposted))?;
                tracing::info!(vendor, external_id = %ext, id = %created.id, reposted, "created");
                return Ok(created);
            }
            Sent::Ambiguous { reason, retry_after } => {
                tracing::warn!(vendor, external_id = %ext, "create outcome unknown ({reason}); will search before retrying");
                outbox.record(&unknown_entry(vendor, &ext, &reason, reposted))?;
                if let Some(wait) = retry_after {
                    if wait > policy.max_retry_after {
                        return Err(unsettled(format!("{reason}; Retry-After {wait:?} is too long")));
                    }
                    tokio::time::sleep(wait).await;
                }
                let hits = auth
                    .search_until(&ext, deadline_in(policy.search_window))
                    .await
                    .map_err(|e| unsettled(format!("{reason}; then searching failed: {e}")))?;
                if !hits.is_empty() {
                    let found = first_of(hits, &ext, "search");
                    tracing::info!(vendor, external_id = %ext, id = %found.id, "found the ticket of the ambiguous attempt; not creating it again");
                    outbox.record(&created_entry(vendor, &found, reposted))?;
                    return Ok(found);
                }
                if !policy.repost {
                    return Err(unsettled(format!(
                        "{reason}; not found by search within {:?}; not posting again (repost disabled)",
                        policy.search_window
                    )));
                }
                if attempt == policy.max_attempts {
                    return Err(unsettled(format!(
                        "{reason}; not found by search within {:?} after {attempt} posts",
                        policy.search_window
                    )));
                }
                tracing::warn!(vendor, external_id = %ext, "not found within {:?}; posting again (a duplicate is possible if the first create surfaces later; --reconcile reports it)", policy.search_window);
                reposted = true;
            }
        }
    }
    Err(unsettled("no attempt was made".into()))
}

/// How long after a reposted ticket is recorded [`reconcile`] keeps searching for a duplicate
/// (the first create, surfacing late in the vendor's search index).
pub const RECHECK_REPOSTED_SECS: u64 = 24 * 3600;

/// What [`reconcile`] found for one incident.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reconciled {
    /// Vendor.
    pub vendor: String,
    /// External id.
    pub external_id: String,
    /// State before.
    pub before: OutboxState,
    /// State after (unchanged when it could not be settled yet).
    pub after: OutboxState,
    /// The ticket, when one exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Its key or number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Its link.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Other tickets with the same external id: duplicates to close by hand.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub duplicates: Vec<String>,
    /// Why nothing changed, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Settles this connector's outbox entries that a push left open: `pending` / `unknown`
/// become `created` (a ticket carries the external id) or `absent` (none does, and the
/// attempt is older than the search window); `created` entries marked `reposted` are checked
/// for a duplicate, by every reconcile until one is found or [`RECHECK_REPOSTED_SECS`] have
/// passed. Searches only; never posts.
pub async fn reconcile(
    c: &dyn Connector,
    outbox: &Outbox,
    session: &Session,
) -> Result<Vec<Reconciled>, ConnectorError> {
    let vendor = c.vendor().as_str();
    let open: Vec<OutboxEntry> = outbox
        .latest_all(Some(vendor))?
        .into_iter()
        .filter(|e| e.state.unsettled() || (e.state == OutboxState::Created && e.reposted))
        .collect();
    if open.is_empty() {
        return Ok(Vec::new());
    }
    let mut auth = Authed::new(c, session).await?;
    let window = session.policy.search_window.as_secs();
    let mut out = Vec::new();
    for e in open {
        // A push of this incident may be running: wait for it, and settle what it left, not
        // the snapshot above (recording `absent` over its fresh `created` would lead the next
        // push to post a duplicate).
        let _claim = outbox.claim(vendor, &e.external_id).await?;
        if outbox.latest(vendor, &e.external_id)?.as_ref() != Some(&e) {
            continue;
        }
        let mut r = Reconciled {
            vendor: vendor.to_owned(),
            external_id: e.external_id.clone(),
            before: e.state,
            after: e.state,
            id: e.id.clone(),
            key: e.key.clone(),
            url: e.url.clone(),
            duplicates: Vec::new(),
            note: None,
        };
        // A failed search leaves this entry as it was, with a note, and the others go on: the
        // entries settled so far are recorded and reported either way.
        let searched = match auth.send(&c.search_request(&e.external_id), Retry::Safe).await {
            Ok(Sent::Ok(body)) => c.parse_search(&body).map_err(|e| e.to_string()),
            Ok(Sent::Ambiguous { reason, .. }) => Err(reason),
            Err(e) => Err(e.to_string()),
        };
        let hits = match searched {
            Ok(hits) => hits,
            Err(reason) => {
                r.note = Some(format!("search failed ({reason}); run --reconcile again"));
                out.push(r);
                continue;
            }
        };
        if hits.is_empty() {
            if e.state == OutboxState::Created {
                r.note = Some("the ticket is not found by search yet; run --reconcile again later".into());
            } else if now() < e.at.saturating_add(window) {
                r.note = Some(format!(
                    "too recent to call absent (search lags up to the {window} s window); run --reconcile again later"
                ));
            } else {
                r.after = OutboxState::Absent;
                outbox.record(&OutboxEntry {
                    reason: Some("reconcile: no ticket carries the external id".into()),
                    ..OutboxEntry::new(vendor, &e.external_id, OutboxState::Absent)
                })?;
            }
            out.push(r);
            continue;
        }
        let found = match (e.state, e.id.as_deref()) {
            (OutboxState::Created, Some(id)) => {
                let mut p = hits
                    .iter()
                    .find(|h| h.id == id)
                    .cloned()
                    .unwrap_or_else(|| Pushed::new(id.to_owned(), e.key.clone(), e.url.clone()));
                p.duplicates = hits.iter().filter(|h| h.id != id).map(|h| h.id.clone()).collect();
                p.external_id = e.external_id.clone();
                p
            }
            _ => first_of(hits, &e.external_id, "search"),
        };
        // A reposted ticket with no duplicate in sight yet: the first create may still surface
        // (it was invisible to search for a whole window already), so it stays `reposted`
        // and is searched again by every reconcile for a day after it was recorded.
        let still_watched = e.reposted && found.duplicates.is_empty();
        if still_watched && e.state == OutboxState::Created {
            let until = e.at.saturating_add(RECHECK_REPOSTED_SECS);
            if now() < until {
                r.note = Some(format!(
                    "no duplicate seen yet; checked again by every --reconcile for {} h after the repost",
                    RECHECK_REPOSTED_SECS / 3600
                ));
                out.push(r);
                continue;
            }
            // A day without a duplicate: settled, not searched again.
        }
        let watch = still_watched && e.state != OutboxState::Created;
        outbox.record(&created_entry(vendor, &found, watch))?;
        r.after = OutboxState::Created;
        r.id = Some(found.id);
        r.key = found.key;
        r.url = found.url;
        r.duplicates = found.duplicates;
        out.push(r);
    }
    Ok(out)
}

/// The complete create request as `--dry-run` prints it (secrets redacted; nothing sent).
pub async fn dry_run(c: &dyn Connector, input: &PushInput) -> Result<String, ConnectorError> {
    let resolved = c.resolve(input, Lookup::DryRun).await?;
    let mut req = c.create_request(&resolved, &external_id(input))?;
    req.secret_headers = match c.auth(true)? {
        Auth::Headers(h) => h,
        Auth::ZohoOAuth(_) => vec![auth_header(&Secret::new("dry-run"))],
    };
    Ok(req.render())
}
