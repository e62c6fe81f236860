//! Evaluation of ticket structuring (issue #6, in progress).
//!
//! * [`metrics`]: per-field accuracy, macro-F1, per-class precision/recall, confusion
//!   matrices, and the reliability of confidences (accuracy per confidence bucket and the
//!   coverage/accuracy trade-off of a review threshold).
//! * [`baseline`]: the classical baseline measured in the same run: TF-IDF features (word
//!   unigrams and bigrams plus character 4-grams inside words, robust to typos and
//!   inflection across languages) and a multinomial logistic regression per field.

pub mod baseline;
pub mod metrics;
