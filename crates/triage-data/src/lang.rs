//! A small stop-word language guesser for the five languages triage ships material for
//! (en, de, fr, es, pt). Used when an import has no language column; it is approximate and
//! returns `None` (written as `und`) when the evidence is thin or ambiguous.

/// The languages of the shipped seed material and instruction variants.
pub const LANGS: [&str; 5] = ["en", "de", "fr", "es", "pt"];

const STOP: [(&str, &[&str]); 5] = [
    (
        "en",
        &[
            "the", "and", "is", "to", "my", "i", "it", "not", "of", "in", "for", "with", "this", "on", "can",
            "please", "have", "we", "you", "since", "but", "after", "when",
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
            "el", "la", "los", "las", "y", "es", "no", "mi", "con", "para", "desde", "una", "por", "favor",
            "que", "funciona", "puedo", "tengo", "del", "se", "al", "pero", "hola",
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

/// Guesses the language of `text` among [`LANGS`]; `None` when fewer than two stop words
/// match or two languages tie.
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

#[cfg(test)]
mod tests {
    use super::detect;

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
    }
}
