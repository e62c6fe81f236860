//! Prometheus metrics in the text exposition format (`GET /metrics`), kept in memory.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use triage_infer::Meta;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in BUCKETS.iter().zip(self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    queue_wait: Histogram,
    tickets: u64,
    needs_review: u64,
    output_tokens: u64,
}

/// Counters and histograms of the service.
#[derive(Default)]
pub struct Metrics(Mutex<Inner>);

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// One answered request on `route` (the matched path pattern).
    pub fn request(&self, route: &str, status: u16, seconds: f64) {
        self.with(|m| {
            *m.requests.entry((route.to_owned(), status)).or_default() += 1;
            m.latency.entry(route.to_owned()).or_default().observe(seconds);
        });
    }

    /// Time a request waited for a worker.
    pub fn queue_wait(&self, seconds: f64) {
        self.with(|m| m.queue_wait.observe(seconds));
    }

    /// One structured ticket.
    pub fn ticket(&self, meta: &Meta) {
        self.with(|m| {
            m.tickets += 1;
            m.needs_review += u64::from(meta.needs_review);
            m.output_tokens += meta.output_tokens as u64;
        });
    }

    /// The exposition text, with the current gauges.
    pub fn render(&self, busy: usize, waiting: usize, ready: bool, training: bool) -> String {
        self.with(|m| {
            let mut o = String::new();
            o.push_str("# HELP triage_http_requests_total HTTP requests answered, by route and status.\n");
            o.push_str("# TYPE triage_http_requests_total counter\n");
            for ((route, status), n) in &m.requests {
                let _ = writeln!(
                    o,
                    "triage_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
            o.push_str("# HELP triage_http_request_duration_seconds Request latency, by route.\n");
            o.push_str("# TYPE triage_http_request_duration_seconds histogram\n");
            for (route, h) in &m.latency {
                h.render(
                    &mut o,
                    "triage_http_request_duration_seconds",
                    &format!("route=\"{route}\""),
                );
            }
            o.push_str("# HELP triage_queue_wait_seconds Time waiting for a worker.\n");
            o.push_str("# TYPE triage_queue_wait_seconds histogram\n");
            m.queue_wait.render(&mut o, "triage_queue_wait_seconds", "");
            for (name, help, v) in [
                ("triage_tickets_total", "Tickets structured.", m.tickets),
                (
                    "triage_tickets_needs_review_total",
                    "Tickets flagged for human review.",
                    m.needs_review,
                ),
                (
                    "triage_output_tokens_total",
                    "Ticket JSON tokens produced.",
                    m.output_tokens,
                ),
            ] {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
            }
            for (name, help, v) in [
                ("triage_workers_busy", "Requests being decoded.", busy),
                ("triage_queue_waiting", "Requests waiting for a worker.", waiting),
                (
                    "triage_ready",
                    "1 once the model is loaded and warmed up.",
                    usize::from(ready),
                ),
                (
                    "triage_training_running",
                    "1 while a training job runs.",
                    usize::from(training),
                ),
            ] {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            }
            o
        })
    }
}
