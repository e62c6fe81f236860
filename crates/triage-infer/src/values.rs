//! Where decoding stands at an enum field, and which values it can choose there: shared by
//! the decoder (which scores the candidates) and by the training targets (which teach the
//! choice the decoder makes), so both see the same candidates and the same tokens.

use llguidance::Matcher;
use toktrie::TokEnv;
use triage_taxonomy::Field;

use crate::grammar::KEY_SEPARATOR;

/// Where decoding stands at an enum field's value.
pub(crate) enum ValueState {
    /// The value has begun (`opening`, e.g. `"`) but is not decided; `pending` are forced
    /// bytes not yet committed as tokens.
    Open { opening: Vec<u8>, pending: Vec<u8> },
    /// The grammar forced the whole value: there was only one choice.
    Forced(String),
}

/// Where the output `out`, plus the bytes the grammar forces next, stands relative to the
/// value of `field`; `None` before its key. Works on bytes: forced bytes may end inside a
/// multi-byte character.
pub(crate) fn value_state(
    env: &TokEnv,
    out: &[u32],
    matcher: &mut Matcher,
    field: &str,
) -> Option<ValueState> {
    let mut full = env.tok_trie().decode(out);
    let pending = matcher.compute_ff_bytes();
    full.extend_from_slice(&pending);
    let key = format!("\"{field}\"{KEY_SEPARATOR}").into_bytes();
    let pos = full.windows(key.len()).rposition(|w| w == key.as_slice())?;
    let after = &full[pos + key.len()..];
    if after.first() != Some(&b'"') {
        return None; // the opening quote is not even forced yet
    }
    // Find the closing quote, skipping escaped characters.
    let mut i = 1;
    while i < after.len() {
        match after[i] {
            b'\\' => i += 2,
            b'"' => {
                let value = serde_json::from_slice::<String>(&after[..=i]).ok()?;
                return Some(ValueState::Forced(value));
            }
            _ => i += 1,
        }
    }
    Some(ValueState::Open {
        opening: after.to_vec(),
        pending,
    })
}

/// The values of `field` allowed here (under `parent`'s value for a dependent field) that the
/// grammar accepts, each with the tokens the decoder appends for it: the pending forced bytes
/// plus the rest of the value through its closing quote.
pub(crate) fn enum_candidates<'f>(
    env: &TokEnv,
    matcher: &mut Matcher,
    field: &'f Field,
    parent: Option<&str>,
    opening: &[u8],
    pending: &[u8],
) -> Vec<(&'f str, Vec<u32>)> {
    let allowed: Vec<&str> = match parent.and_then(|p| field.allowed_under(p)) {
        Some(vals) => vals.iter().map(|v| v.name.as_str()).collect(),
        None => field.value_names().collect(),
    };
    let mut cands = Vec::new();
    for v in allowed {
        let json = serde_json::to_vec(v).expect("string serialises");
        let Some(rest) = json.strip_prefix(opening) else {
            continue;
        };
        let toks = env.tokenize_bytes(&[pending, rest].concat());
        let ok = matcher.validate_tokens(&toks);
        tracing::debug!(field = %field.name, value = v, ?toks, ?ok, "enum candidate");
        if !toks.is_empty() && ok.ok() == Some(toks.len()) {
            cands.push((v, toks));
        }
    }
    cands
}

/// For each token of `chosen` (one of `cands`' token sequences), the distinct tokens the
/// candidates that agree with `chosen` so far continue with: the set the decoder's whole-value
/// scoring renormalises over at that depth (one token: no choice there).
pub(crate) fn choice_sets(cands: &[(&str, Vec<u32>)], chosen: &[u32]) -> Vec<Vec<u32>> {
    (0..chosen.len())
        .map(|d| {
            let mut next: Vec<u32> = Vec::new();
            for (_, t) in cands {
                if t.len() > d && t[..d] == chosen[..d] && !next.contains(&t[d]) {
                    next.push(t[d]);
                }
            }
            next
        })
        .collect()
}
