//! [`Batcher`]: the forward passes of tickets decoded at the same time, merged into one.
//!
//! Each ticket is decoded by its own thread, written as plain sequential code. When it needs
//! logits it hands its KV cache and new tokens to the batcher and waits. As soon as every
//! ticket in flight is waiting (or [`GATHER`] has passed since the first one asked), one of
//! them runs a single [`Qwen2::forward_batch`] for all, and each gets its cache and logits
//! back. The weights are read once per pass instead of once per ticket: on a CPU, a decoding
//! step of one token is bound by reading them, so B tickets cost little more than one.
//!
//! A ticket that joins while a pass runs waits for the next one, and one that finishes
//! leaves at once: the batch refills continuously. Each ticket's logits depend only on its
//! own tokens, bit for bit on CPU (the kernels compute every row alike, see
//! `Qwen2::forward_batch`), so batching does not change tickets.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use triage_llm::lora::Lora;
use triage_llm::qwen2::{BatchItem, KvCache, Qwen2, Seq};
use triage_llm::LlmError;

use crate::InferError;

/// How long a waiting ticket gives the others to join its pass before it runs without them
/// (one busy computing a grammar mask, or prefilling a long prompt, does not hold the rest).
pub(crate) const GATHER: Duration = Duration::from_millis(30);

/// One ticket's request: its cache and what to run on it.
pub(crate) struct Job {
    /// The ticket's KV cache; given back with the result.
    pub(crate) cache: KvCache,
    /// What to compute.
    pub(crate) work: Work,
}

/// What a [`Job`] computes.
pub(crate) enum Work {
    /// Append these tokens to the cache; logits after the last one.
    Extend(Vec<u32>),
    /// Score each token sequence after the cache's positions without keeping it (the
    /// branches of an enum value); logits after the last token of each.
    Peek(Vec<Vec<u32>>),
}

/// A finished [`Job`].
pub(crate) struct Done {
    /// The cache, extended by an `Extend`'s tokens.
    pub(crate) cache: KvCache,
    /// One row of logits per `Extend`, or per `Peek` sequence.
    pub(crate) logits: Vec<Vec<f32>>,
    /// Jobs in the pass that ran this one (1: it ran alone).
    pub(crate) batch: usize,
}

#[derive(Default)]
struct State {
    members: usize,
    queue: Vec<(u64, Job)>,
    /// When the oldest queued job arrived.
    since: Option<Instant>,
    done: HashMap<u64, Result<Done, InferError>>,
    next_id: u64,
    running: bool,
}

/// Merges the forward passes of concurrent decodes (see the module documentation).
#[derive(Default)]
pub(crate) struct Batcher {
    state: Mutex<State>,
    wake: Condvar,
}

/// A ticket in flight: counted by the batcher until dropped.
pub(crate) struct Member<'a> {
    batcher: &'a Batcher,
}

impl Batcher {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a ticket in flight; the batcher waits for each member's request (up to
    /// [`GATHER`]) before it runs a pass.
    pub(crate) fn join(&self) -> Member<'_> {
        self.lock().members += 1;
        Member { batcher: self }
    }
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        let mut st = self.batcher.lock();
        st.members = st.members.saturating_sub(1);
        drop(st);
        // The others may all be waiting for this one.
        self.batcher.wake.notify_all();
    }
}

impl Member<'_> {
    /// Runs `job` in the next pass and returns its result (see [`Work`]).
    pub(crate) fn run(&self, model: &Qwen2, lora: Option<&Lora>, job: Job) -> Result<Done, InferError> {
        let b = self.batcher;
        let mut st = b.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.queue.push((id, job));
        st.since.get_or_insert_with(Instant::now);
        b.wake.notify_all();
        loop {
            if let Some(r) = st.done.remove(&id) {
                return r;
            }
            let waited = st.since.map_or(Duration::ZERO, |t| t.elapsed());
            let everyone = st.queue.len() >= st.members;
            if !st.running && !st.queue.is_empty() && (everyone || waited >= GATHER) {
                let batch = std::mem::take(&mut st.queue);
                st.since = None;
                st.running = true;
                drop(st);
                let results = run_batch(model, lora, batch);
                st = b.lock();
                st.running = false;
                st.done.extend(results);
                b.wake.notify_all();
                continue;
            }
            let timeout = GATHER.saturating_sub(waited).max(Duration::from_millis(1));
            st = b
                .wake
                .wait_timeout(st, timeout)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// One row of logits as a vector.
pub(crate) fn to_vec(logits: &Tensor) -> Result<Vec<f32>, InferError> {
    logits
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| InferError::Model(e.into()))
}

/// One pass over every job; if it fails, each job alone (so an error reaches only the job
/// that caused it).
fn run_batch(
    model: &Qwen2,
    lora: Option<&Lora>,
    batch: Vec<(u64, Job)>,
) -> Vec<(u64, Result<Done, InferError>)> {
    let (ids, jobs): (Vec<u64>, Vec<Job>) = batch.into_iter().unzip();
    match run_jobs(model, lora, jobs) {
        Ok(done) => ids.into_iter().zip(done).map(|(id, d)| (id, Ok(d))).collect(),
        Err((e, jobs)) if jobs.len() == 1 => vec![(ids[0], Err(e))],
        Err((e, jobs)) => {
            tracing::debug!(
                "a batched pass failed ({e}); running its {} jobs one by one",
                jobs.len()
            );
            ids.into_iter()
                .zip(jobs)
                .map(|(id, job)| {
                    let r = run_jobs(model, lora, vec![job]);
                    (id, r.map(|mut d| d.remove(0)).map_err(|(e, _)| e))
                })
                .collect()
        }
    }
}

/// Runs `jobs` in one forward pass. On failure the jobs come back with their caches as they
/// were.
#[allow(clippy::type_complexity)]
fn run_jobs(
    model: &Qwen2,
    lora: Option<&Lora>,
    mut jobs: Vec<Job>,
) -> Result<Vec<Done>, (InferError, Vec<Job>)> {
    let lens: Vec<usize> = jobs.iter().map(|j| j.cache.len()).collect();
    let result = {
        let mut items = Vec::new();
        for job in jobs.iter_mut() {
            let Job { cache, work } = job;
            match work {
                Work::Extend(tokens) => items.push(BatchItem {
                    tokens,
                    seq: Seq::Extend(cache),
                    n_logits: 1,
                }),
                Work::Peek(seqs) => {
                    let cache: &KvCache = cache;
                    items.extend(seqs.iter().map(|tokens| BatchItem {
                        tokens,
                        seq: Seq::Peek(cache),
                        n_logits: 1,
                    }));
                }
            }
        }
        catch_unwind(AssertUnwindSafe(|| model.forward_batch(&mut items, lora)))
    };
    let rows = match result {
        Ok(Ok(logits)) => logits.iter().map(to_vec).collect::<Result<Vec<_>, _>>(),
        Ok(Err(e)) => Err(InferError::Model(e)),
        Err(_) => Err(InferError::Model(LlmError::Candle(
            "a forward pass panicked".into(),
        ))),
    };
    let batch = jobs.len();
    let mut rows = match rows {
        Ok(rows) => rows.into_iter(),
        Err(e) => {
            for (job, len) in jobs.iter_mut().zip(lens) {
                job.cache.truncate(len);
            }
            return Err((e, jobs));
        }
    };
    Ok(jobs
        .into_iter()
        .map(|job| {
            let n = match &job.work {
                Work::Extend(_) => 1,
                Work::Peek(seqs) => seqs.len(),
            };
            Done {
                cache: job.cache,
                logits: rows.by_ref().take(n).collect(),
                batch,
            }
        })
        .collect())
}
