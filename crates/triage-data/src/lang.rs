//! Language detection for imports without a language column, among the five languages
//! triage ships material for (en, de, fr, es, pt).
//!
//! [`detect`] uses [`whatlang`] (character trigram profiles, maintained upstream) restricted to
//! those five languages, and answers `None` (written as `und`) when the text has no letters or
//! whatlang's confidence is under [`MIN_CONFIDENCE`]. [`stopwords::detect`] is the stop-word
//! heuristic it replaced, kept as the baseline of the measurement in
//! `docs/language-detection.md` (recomputed by `cargo nextest run -p triage-data
//! language_detection`).

use whatlang::{Detector, Lang};

/// The languages of the shipped seed material and instruction variants.
pub const LANGS: [&str; 5] = ["en", "de", "fr", "es", "pt"];

/// Below this whatlang confidence (0..=1) the answer is `None`. Texts of a few words get
/// confidences near 0 ("VPN down": 0.03, "SAP error 500": 0.03), while every row of the shared
/// dataset scores far above it, its two wrong answers included (0.52 and 0.59).
pub const MIN_CONFIDENCE: f64 = 0.05;

/// Fewer words of letters than this give `None`: one or two words decide nothing
/// ("Outlook" scores fr with confidence 0.12).
pub const MIN_WORDS: usize = 3;

const WHATLANG: [(Lang, &str); 5] = [
    (Lang::Eng, "en"),
    (Lang::Deu, "de"),
    (Lang::Fra, "fr"),
    (Lang::Spa, "es"),
    (Lang::Por, "pt"),
];

/// A language column's value as an ISO 639-1 code: the primary subtag of a tag (`en-US`,
/// `pt_BR` → `en`, `pt`), lowercased, and the English or native name of the five shipped
/// languages (`English`, `Deutsch`, `français` → `en`, `de`, `fr`); `None` when empty. So one
/// language is one group in evaluation's per-language tables, however the export spells it.
pub fn normalize(value: &str) -> Option<String> {
    let v = value.trim().to_lowercase();
    let primary = v.split(['-', '_']).next().unwrap_or("").trim();
    let code = match primary {
        "" => return None,
        "english" => "en",
        "german" | "deutsch" => "de",
        "french" | "français" | "francais" => "fr",
        "spanish" | "español" | "espanol" | "castellano" => "es",
        "portuguese" | "português" | "portugues" => "pt",
        other => other,
    };
    Some(code.to_owned())
}

/// Guesses the language of `text` among [`LANGS`] (ISO 639-1); `None` when the text gives
/// too little evidence (fewer than [`MIN_WORDS`] words of letters, or a confidence under
/// [`MIN_CONFIDENCE`]).
pub fn detect(text: &str) -> Option<&'static str> {
    let words = text
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| w.chars().count() > 1)
        .take(MIN_WORDS)
        .count();
    if words < MIN_WORDS {
        return None;
    }
    detect_with_confidence(text)
        .filter(|(_, c)| *c >= MIN_CONFIDENCE)
        .map(|(l, _)| l)
}

/// whatlang's best language among [`LANGS`] and its confidence (0..=1), without a threshold;
/// `None` when the text has no letters.
pub fn detect_with_confidence(text: &str) -> Option<(&'static str, f64)> {
    thread_local! {
        static DETECTOR: Detector = Detector::with_allowlist(WHATLANG.iter().map(|(l, _)| *l).collect());
    }
    // whatlang reads the whole text; the first 2,000 characters decide as well as more.
    let end = text.char_indices().nth(2000).map_or(text.len(), |(i, _)| i);
    let info = DETECTOR.with(|d| d.detect(&text[..end]))?;
    WHATLANG
        .iter()
        .find(|(l, _)| *l == info.lang())
        .map(|(_, code)| (*code, info.confidence()))
}

/// The stop-word heuristic used before [`detect`] (kept as the measured baseline).
pub mod stopwords {
    const STOP: [(&str, &[&str]); 5] = [
        (
            "en",
            &[
                "the", "and", "is", "to", "my", "i", "it", "not", "of", "in", "for", "with", "this", "on",
                "can", "please", "have", "we", "you", "since", "but", "after", "when",
            ],
        ),
        (
            "de",
            &[
                "der",
                "die",
                "das",
                "und",
                "ist",
                "nicht",
                "ich",
                "mein",
                "meine",
                "mit",
                "auf",
                "bitte",
                "seit",
                "kann",
                "wir",
                "ein",
                "eine",
                "es",
                "zu",
                "den",
                "sich",
                "funktioniert",
                "auch",
            ],
        ),
        (
            "fr",
            &[
                "le",
                "la",
                "les",
                "et",
                "est",
                "je",
                "ne",
                "pas",
                "mon",
                "ma",
                "mes",
                "avec",
                "pour",
                "depuis",
                "une",
                "des",
                "sur",
                "nous",
                "vous",
                "merci",
                "plus",
                "fonctionne",
                "au",
            ],
        ),
        (
            "es",
            &[
                "el", "la", "los", "las", "y", "es", "no", "mi", "con", "para", "desde", "una", "por",
                "favor", "que", "funciona", "puedo", "tengo", "del", "se", "al", "pero", "hola",
            ],
        ),
        (
            "pt",
            &[
                "o", "a", "os", "as", "e", "é", "não", "meu", "minha", "com", "para", "desde", "uma", "por",
                "favor", "que", "funciona", "consigo", "tenho", "do", "da", "mas", "está",
            ],
        ),
    ];

    /// Guesses the language of `text` among [`super::LANGS`]; `None` when fewer than two stop
    /// words match or two languages tie.
    pub fn detect(text: &str) -> Option<&'static str> {
        let mut scores = [0usize; 5];
        for word in text
            .split(|c: char| !c.is_alphanumeric() && c != '\'')
            .filter(|w| !w.is_empty())
            .take(400)
        {
            let w = word.to_lowercase();
            for (i, (_, stops)) in STOP.iter().enumerate() {
                if stops.contains(&w.as_str()) {
                    scores[i] += 1;
                }
            }
        }
        let (best, &score) = scores.iter().enumerate().max_by_key(|(_, s)| **s)?;
        let ties = scores.iter().filter(|&&s| s == score).count();
        (score >= 2 && ties == 1).then_some(STOP[best].0)
    }
}

#[cfg(test)]
mod tests {
    use super::{detect, normalize};

    #[test]
    fn language_values_become_iso_codes() {
        for (value, code) in [
            ("en", "en"),
            ("EN-us", "en"),
            ("pt_BR", "pt"),
            ("English", "en"),
            (" Deutsch ", "de"),
            ("Français", "fr"),
            ("español", "es"),
            ("zh-Hant", "zh"),
        ] {
            assert_eq!(normalize(value).as_deref(), Some(code), "{value}");
        }
        assert_eq!(normalize("  "), None);
    }

    #[test]
    fn guesses_the_five_languages() {
        assert_eq!(
            detect("My VPN drops every ten minutes since the update, please help."),
            Some("en")
        );
        assert_eq!(
            detect("Mein VPN bricht seit dem Update ständig ab, bitte helft mir."),
            Some("de")
        );
        assert_eq!(
            detect("Mon VPN se coupe toutes les dix minutes depuis la mise à jour."),
            Some("fr")
        );
        assert_eq!(
            detect("Mi VPN se desconecta cada diez minutos desde la actualización, por favor."),
            Some("es")
        );
        assert_eq!(
            detect("Minha VPN não funciona desde a atualização, está caindo."),
            Some("pt")
        );
        assert_eq!(detect("VPN 0x80070005"), None);
        assert_eq!(detect("Outlook"), None);
        assert_eq!(detect("VPN down"), None);
        assert_eq!(detect(""), None);
    }
}
