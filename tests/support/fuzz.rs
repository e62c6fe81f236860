//! Shared by the property tests of several crates (included with `#[path]`): input
//! strategies that get past a parser's first check, a runner with a stated number of cases
//! (`PROPTEST_CASES` overrides it), and the tally each test prints for `docs/fuzzing.md`.
//!
//! Random bytes rarely get past a magic number or the first `{`; what finds bugs is a valid
//! input with a few mutations: truncation, byte flips, inserted garbage or syntax, deleted or
//! duplicated ranges. [`mutated`] applies one to four of them to a valid seed.

#![allow(dead_code)]

use std::cell::Cell;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};

/// One edit of an input.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Cut everything from here.
    Truncate(Index),
    /// XOR one byte with a non-zero mask.
    Flip(Index, u8),
    /// Insert random bytes.
    Insert(Index, Vec<u8>),
    /// Insert a syntax fragment or a hostile value (quotes, brackets, huge numbers, NUL, ...).
    Token(Index, Index),
    /// Delete up to 32 bytes.
    Delete(Index, u8),
    /// Repeat a range of up to 64 bytes in place.
    Duplicate(Index, u8),
    /// Overwrite 1, 2, 4 or 8 bytes with an extreme little-endian integer (binary formats).
    Integer(Index, u8, u64),
}

/// Fragments that parsers of JSON, TOML, CSV and binary headers treat specially.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"'",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b"[[",
    b"]]",
    b",",
    b":",
    b"=",
    b"\n",
    b"\r\n",
    b"\t",
    b"\0",
    b"#",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"1e999",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"NaN",
    b"\"\"",
    b"{}",
    b"[]",
    b"\\u0000",
    b"\\ud800",
    b"\xff\xfe",
    b"\xe2\x80\xae",
    b"\xf0\x9f\x92\xa5",
    b"\xc3",
    b"\"\"\"",
    b"'''",
    b"a = 1\n",
    b"[x]\n",
    b"\"summary\"",
    b"\"category\"",
    b"\"text\"",
    b"\"id\"",
    b"name",
    b"values",
    b"children",
    b"GGUF",
    b"\xff\xff\xff\xff\xff\xff\xff\xff",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<Index>(), vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, t)| Mutation::Token(i, t)),
        (any::<Index>(), 1u8..32).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<Index>(), 1u8..64).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        (any::<Index>(), 0u8..4, any::<u64>()).prop_map(|(i, w, v)| Mutation::Integer(i, w, v)),
    ]
}

/// Applies `m` to `b`.
pub fn apply(b: &mut Vec<u8>, m: &Mutation) {
    let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
    match m {
        Mutation::Truncate(i) => {
            let n = at(i, b.len());
            b.truncate(n);
        }
        Mutation::Flip(i, mask) => {
            if !b.is_empty() {
                let n = i.index(b.len());
                b[n] ^= mask;
            }
        }
        Mutation::Insert(i, bytes) => {
            let n = at(i, b.len());
            b.splice(n..n, bytes.iter().copied());
        }
        Mutation::Token(i, t) => {
            let n = at(i, b.len());
            b.splice(n..n, t.get(TOKENS).iter().copied());
        }
        Mutation::Delete(i, len) => {
            let n = at(i, b.len());
            let end = (n + *len as usize).min(b.len());
            b.drain(n..end);
        }
        Mutation::Duplicate(i, len) => {
            let n = at(i, b.len());
            let end = (n + *len as usize).min(b.len());
            let copy = b[n..end].to_vec();
            b.splice(n..n, copy);
        }
        Mutation::Integer(i, width, v) => {
            let w = 1usize << width;
            if b.len() >= w {
                let n = i.index(b.len() - w + 1);
                let v = match v % 4 {
                    0 => 0,
                    1 => u64::MAX,
                    2 => 1 << (v % 63),
                    _ => *v,
                };
                b[n..n + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
        }
    }
}

/// `seed` with one to four mutations.
pub fn mutated(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    vec(mutation(), 1..5).prop_map(move |ms| {
        let mut b = seed.clone();
        for m in &ms {
            apply(&mut b, m);
        }
        b
    })
}

/// One of `seeds`, mutated.
pub fn mutated_any(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    (0..n, vec(mutation(), 1..5)).prop_map(move |(k, ms)| {
        let mut b = seeds[k].clone();
        for m in &ms {
            apply(&mut b, m);
        }
        b
    })
}

/// Arbitrary bytes, up to `max` long.
pub fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

/// `PROPTEST_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Why a case failed (proptest's typed failure: it shrinks the input and reports the message).
pub type Failure = TestCaseError;

/// The outcome of checking one input.
pub type Check = Result<Verdict, Failure>;

/// A failed check with `message`.
pub fn fail<T>(message: impl Into<String>) -> Result<T, Failure> {
    Err(TestCaseError::fail(message.into()))
}

/// What a fuzzed function did with one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The input was accepted.
    Accepted,
    /// The input was rejected with an error that passed the test's checks.
    Rejected,
}

/// Runs `check` over `cases(default_cases)` inputs from `strategy`; a panic or a [`fail`]
/// from `check` fails the test (proptest shrinks the input first). Prints and returns the
/// tally `(cases, accepted, rejected)`.
pub fn run<S: Strategy>(
    name: &str,
    default_cases: u32,
    strategy: S,
    check: impl Fn(S::Value) -> Check,
) -> (u32, u32, u32) {
    let n = cases(default_cases);
    let config = Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    };
    let (accepted, rejected) = (Cell::new(0u32), Cell::new(0u32));
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |input| {
        match check(input)? {
            Verdict::Accepted => accepted.set(accepted.get() + 1),
            Verdict::Rejected => rejected.set(rejected.get() + 1),
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    // Shrinking never ran (no failure), so every case was counted once.
    let (a, r) = (accepted.get(), rejected.get());
    eprintln!("fuzz {name}: cases {n}, accepted {a}, rejected {r}, panics 0");
    (n, a, r)
}

/// Fails unless `message` is a usable error message: non-empty, one that names `what`.
pub fn names(message: &str, what: &[&str]) -> Result<(), Failure> {
    if message.trim().is_empty() {
        return fail("empty error message");
    }
    if !what.is_empty() && !what.iter().any(|w| message.contains(w)) {
        return fail(format!("error message {message:?} names none of {what:?}"));
    }
    Ok(())
}
