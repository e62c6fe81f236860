//! Evaluation of ticket structuring (issue #6, in progress).
//!
//! * [`run`]: runs systems over a labelled set: the real inference path (zero-shot or with an
//!   adapter) and the TF-IDF baseline, recording each example's prediction, confidence,
//!   validity and latency.
//! * [`journal`]: keeps each decoded example as it is made, so an interrupted run resumes.
//! * [`report`]: turns runs into `report.json` (with every per-example output, so every
//!   number can be recomputed), `report.md`, `report.html` and confusion-matrix SVGs.
//! * [`metrics`]: per-field accuracy, macro-F1, per-class precision/recall, confusion
//!   matrices, and the reliability of confidences (accuracy and mean confidence per confidence
//!   bucket, the expected calibration error, and the coverage/accuracy trade-off of a review
//!   threshold).
//! * [`baseline`]: the classical baseline measured in the same run: TF-IDF features (word
//!   unigrams and bigrams plus character 4-grams inside words, robust to typos and
//!   inflection across languages) and a multinomial logistic regression per field.

pub mod baseline;
pub mod journal;
pub mod metrics;
pub mod report;
pub mod run;
