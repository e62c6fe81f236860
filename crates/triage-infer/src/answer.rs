//! Training targets: a ticket as the constrained decoder would write it, token by token, with
//! how the decoder produces each token.
//!
//! The grammar is replayed over the ticket: tokens it forces (keys, quotes, separators) come
//! from the grammar exactly as at inference (fast-forward); each enum value is tokenized the
//! way the decoder commits it (pending forced bytes plus the value through its closing quote),
//! and at each of its tokens the replay records the tokens the decoder chooses between there
//! (the allowed values' continuations, the same candidates as [`crate::values`] gives the
//! decoder); the free-text summary is tokenized as text. Teaching the BPE of the whole JSON
//! instead would train on token boundaries the decoder never produces, and spend the loss on
//! tokens it never chooses.

use serde::Serialize;
use triage_taxonomy::Ticket;

use crate::values::{choice_sets, enum_candidates, value_state, ValueState};
use crate::{InferError, Structurer};

/// How the constrained decoder produces one answer token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TokenRole {
    /// Appended without a choice: forced by the grammar (keys, quotes, separators), or the
    /// end of turn after the closing brace.
    Forced,
    /// Chosen under the grammar's mask from the whole vocabulary (the free-text summary).
    Free,
    /// A token of enum field `field`'s value, chosen among `candidates` (a single candidate
    /// means no choice at this depth).
    Choice {
        /// The field.
        field: String,
        /// The tokens the decoder renormalises over here.
        candidates: Vec<u32>,
    },
}

/// One token of the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AnswerToken {
    /// Token id.
    pub id: u32,
    /// How the decoder produces it.
    pub role: TokenRole,
}

impl Structurer {
    /// The answer tokens for `ticket` as constrained decoding produces them (the training
    /// target), ending with the end-of-turn token. See the module documentation.
    pub fn answer_tokens(&self, ticket: &Ticket) -> Result<Vec<AnswerToken>, InferError> {
        let target = crate::grammar::render_ticket(ticket).into_bytes();
        let mut matcher = self.grammar.matcher();
        let trie = self.env.tok_trie();
        let fields = &self.taxonomy.fields;
        let mut next_field = 0;
        let mut out: Vec<AnswerToken> = Vec::new();
        let ids = |out: &[AnswerToken]| out.iter().map(|t| t.id).collect::<Vec<u32>>();
        let grammar_err =
            |e: String| InferError::Grammar(format!("target {}: {e}", String::from_utf8_lossy(&target)));
        for _ in 0..target.len() + 8 {
            if matcher.is_accepting().unwrap_or(false) || matcher.is_stopped() {
                let done = trie.decode(&ids(&out));
                if done != target {
                    return Err(grammar_err(format!(
                        "decoder path ended at {:?}",
                        String::from_utf8_lossy(&done)
                    )));
                }
                out.push(AnswerToken {
                    id: self.end_of_turn,
                    role: TokenRole::Forced,
                });
                return Ok(out);
            }
            let ff = matcher.compute_ff_tokens();
            if !ff.is_empty() {
                matcher
                    .consume_tokens(&ff)
                    .map_err(|e| grammar_err(e.to_string()))?;
                out.extend(ff.into_iter().map(|id| AnswerToken {
                    id,
                    role: TokenRole::Forced,
                }));
                continue;
            }
            // An enum value: the decoder scores the allowed values as wholes here.
            if let Some(field) = fields.get(next_field) {
                match value_state(&self.env, &ids(&out), &mut matcher, &field.name) {
                    None => {}
                    Some(ValueState::Forced(_)) => {
                        next_field += 1;
                        continue;
                    }
                    Some(ValueState::Open { opening, pending }) => {
                        let parent = field.dependency.as_ref().and_then(|d| ticket.get(&d.parent));
                        let cands =
                            enum_candidates(&self.env, &mut matcher, field, parent, &opening, &pending);
                        let value = ticket.get(&field.name).unwrap_or_default();
                        let Some((_, toks)) = cands.iter().find(|(v, _)| *v == value) else {
                            return Err(grammar_err(format!(
                                "value {value:?} of `{}` is not among the decoder's candidates",
                                field.name
                            )));
                        };
                        matcher
                            .consume_tokens(toks)
                            .map_err(|e| grammar_err(e.to_string()))?;
                        for (&id, candidates) in toks.iter().zip(choice_sets(&cands, toks)) {
                            out.push(AnswerToken {
                                id,
                                role: TokenRole::Choice {
                                    field: field.name.clone(),
                                    candidates,
                                },
                            });
                        }
                        next_field += 1;
                        continue;
                    }
                }
            }
            // Free text (the summary): through the closing quote of the string being written
            // (an opening quote still pending belongs to it).
            let done = trie.decode(&ids(&out));
            let rest = target
                .get(done.len()..)
                .filter(|r| !r.is_empty())
                .ok_or_else(|| grammar_err("the grammar wants more than the target".into()))?;
            let mut i = usize::from(rest[0] == b'"');
            let segment_end = loop {
                match rest.get(i) {
                    Some(b'\\') => i += 2,
                    Some(b'"') => break i + 1,
                    Some(_) => i += 1,
                    None => break rest.len(),
                }
            };
            let segment = &rest[..segment_end.min(rest.len())];
            let toks = self.env.tokenize_bytes(segment);
            let ok = matcher
                .validate_tokens(&toks)
                .map_err(|e| grammar_err(e.to_string()))?;
            if toks.is_empty() || ok != toks.len() {
                return Err(grammar_err(format!(
                    "segment {:?} is not accepted",
                    String::from_utf8_lossy(segment)
                )));
            }
            matcher
                .consume_tokens(&toks)
                .map_err(|e| grammar_err(e.to_string()))?;
            out.extend(toks.into_iter().map(|id| AnswerToken {
                id,
                role: TokenRole::Free,
            }));
        }
        Err(grammar_err("did not finish".into()))
    }

    /// The answer's token ids ([`Structurer::answer_tokens`] without roles).
    pub fn target_tokens(&self, ticket: &Ticket) -> Result<Vec<u32>, InferError> {
        Ok(self.answer_tokens(ticket)?.into_iter().map(|t| t.id).collect())
    }
}
