//! Tokenisation and vocabularies.
//!
//! A [`Vocab`] is built from the **training split only** (pass only training texts to
//! [`Vocab::build`]), so that validation and test texts cannot leak into it; their unseen
//! tokens become [`UNK`]. Ids 0..4 are always the special tokens [`PAD`], [`UNK`], [`START`],
//! [`STOP`]; the others follow by decreasing training frequency, ties broken by the token's
//! string order, so a vocabulary is a pure function of its training texts and options.
//!
//! A vocabulary serialises to JSON (with its tokenizer) so it can be stored beside a model and
//! encode exactly as it did during training.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::DataError;

/// Padding; also what [`crate::pad_batch`] fills with.
pub const PAD: u32 = 0;
/// Unknown token: anything not in the vocabulary.
pub const UNK: u32 = 1;
/// Start of sequence.
pub const START: u32 = 2;
/// End of sequence.
pub const STOP: u32 = 3;
/// The strings of the special tokens, indexed by their ids.
pub const SPECIAL_TOKENS: [&str; 4] = ["<pad>", "<unk>", "<s>", "</s>"];

/// How text is cut into tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Tokenizer {
    /// Every Unicode scalar value (whitespace and newlines included) is a token.
    Char,
    /// Words are maximal runs of alphanumeric characters, with apostrophes allowed inside
    /// (`don't`); every other non-whitespace character is a token of its own; whitespace
    /// separates and is dropped. Optionally lowercased first.
    Word {
        /// Lowercase before splitting.
        lowercase: bool,
    },
}

impl Tokenizer {
    /// The tokens of `text`.
    pub fn tokenize(&self, text: &str) -> Vec<String> {
        match self {
            Tokenizer::Char => text.chars().map(String::from).collect(),
            Tokenizer::Word { lowercase } => {
                if *lowercase {
                    split_words(&text.to_lowercase())
                } else {
                    split_words(text)
                }
            }
        }
    }
}

fn split_words(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let inner_apostrophe =
            (c == '\'' || c == '’') && !word.is_empty() && chars.peek().is_some_and(|n| n.is_alphanumeric());
        if c.is_alphanumeric() || inner_apostrophe {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            tokens.push(std::mem::take(&mut word));
        }
        if !c.is_whitespace() {
            tokens.push(c.to_string());
        }
    }
    if !word.is_empty() {
        tokens.push(word);
    }
    tokens
}

/// Limits for [`Vocab::build`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabOptions {
    /// Largest vocabulary size **including** the 4 special tokens (the embedding table's
    /// row count); `None` for no limit.
    pub max_size: Option<usize>,
    /// Tokens seen fewer times than this in the training texts become [`UNK`] (0 acts as 1).
    pub min_freq: usize,
}

impl Default for VocabOptions {
    fn default() -> Self {
        VocabOptions {
            max_size: None,
            min_freq: 1,
        }
    }
}

/// A token ↔ id mapping with its tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vocab {
    tokenizer: Tokenizer,
    tokens: Vec<String>,
    index: HashMap<String, u32>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VocabFile {
    format: String,
    tokenizer: Tokenizer,
    tokens: Vec<String>,
}

const FORMAT: &str = "ringtrain-vocab-v1";

impl Vocab {
    /// Builds a vocabulary from training texts (and nothing else; see the module docs).
    pub fn build<'a>(
        tokenizer: Tokenizer,
        training_texts: impl IntoIterator<Item = &'a str>,
        opts: &VocabOptions,
    ) -> Result<Vocab, DataError> {
        if let Some(max) = opts.max_size {
            if max < SPECIAL_TOKENS.len() {
                return Err(DataError::arg(
                    "max_size",
                    format!(
                        "must be at least {} (the special tokens), got {max}",
                        SPECIAL_TOKENS.len()
                    ),
                ));
            }
        }
        let mut counts: HashMap<String, u64> = HashMap::new();
        for text in training_texts {
            for token in tokenizer.tokenize(text) {
                *counts.entry(token).or_insert(0) += 1;
            }
        }
        let min_freq = opts.min_freq.max(1) as u64;
        let mut ranked: Vec<(String, u64)> = counts
            .into_iter()
            .filter(|(t, c)| *c >= min_freq && !SPECIAL_TOKENS.contains(&t.as_str()))
            .collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let room = opts.max_size.map_or(usize::MAX, |m| m - SPECIAL_TOKENS.len());
        let tokens = SPECIAL_TOKENS
            .iter()
            .map(|s| s.to_string())
            .chain(ranked.into_iter().take(room).map(|(t, _)| t))
            .collect();
        Ok(Self::from_parts(tokenizer, tokens))
    }

    fn from_parts(tokenizer: Tokenizer, tokens: Vec<String>) -> Vocab {
        let index = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        Vocab {
            tokenizer,
            tokens,
            index,
        }
    }

    /// Number of ids, specials included.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Always false: the special tokens are always present.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The tokenizer this vocabulary was built with.
    pub fn tokenizer(&self) -> Tokenizer {
        self.tokenizer
    }

    /// The id of a token, [`UNK`] if absent.
    pub fn id(&self, token: &str) -> u32 {
        self.index.get(token).copied().unwrap_or(UNK)
    }

    /// The token of an id.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Tokenises and maps to ids, without START/STOP.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.tokenizer.tokenize(text).iter().map(|t| self.id(t)).collect()
    }

    /// [`Vocab::encode`] wrapped in [`START`] … [`STOP`].
    pub fn encode_with_bounds(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![START];
        ids.extend(self.encode(text));
        ids.push(STOP);
        ids
    }

    /// Maps ids back to text, skipping PAD/START/STOP; characters are concatenated, words
    /// joined with single spaces. Unknown ids and [`UNK`] show as `<unk>`.
    pub fn decode(&self, ids: &[u32]) -> String {
        let parts = ids
            .iter()
            .filter(|&&id| id != PAD && id != START && id != STOP)
            .map(|&id| self.token(id).unwrap_or(SPECIAL_TOKENS[UNK as usize]));
        match self.tokenizer {
            Tokenizer::Char => parts.collect(),
            Tokenizer::Word { .. } => parts.collect::<Vec<_>>().join(" "),
        }
    }

    /// Serialises to JSON.
    pub fn to_json(&self) -> Result<String, DataError> {
        Ok(serde_json::to_string(&VocabFile {
            format: FORMAT.into(),
            tokenizer: self.tokenizer,
            tokens: self.tokens.clone(),
        })?)
    }

    /// Parses [`Vocab::to_json`]'s output, checking the format tag, the special tokens and
    /// that no token appears twice.
    pub fn from_json(json: &str) -> Result<Vocab, DataError> {
        let file: VocabFile = serde_json::from_str(json)?;
        Self::validate(file).map_err(|p| DataError::arg("vocab", p))
    }

    fn validate(file: VocabFile) -> Result<Vocab, String> {
        if file.format != FORMAT {
            return Err(format!("format is {:?}, expected {FORMAT:?}", file.format));
        }
        if file.tokens.len() < SPECIAL_TOKENS.len() || file.tokens[..SPECIAL_TOKENS.len()] != SPECIAL_TOKENS {
            return Err(format!("the first tokens must be {SPECIAL_TOKENS:?}"));
        }
        let vocab = Self::from_parts(file.tokenizer, file.tokens);
        if vocab.index.len() != vocab.tokens.len() {
            return Err("a token appears twice".into());
        }
        Ok(vocab)
    }

    /// Writes the JSON form to `path`.
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        std::fs::write(path, self.to_json()?).map_err(|e| DataError::io(path, e))
    }

    /// Reads a vocabulary written by [`Vocab::save`].
    pub fn load(path: &Path) -> Result<Vocab, DataError> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let format_err = |problem: String| DataError::Format {
            path: path.to_path_buf(),
            problem,
        };
        let file: VocabFile = serde_json::from_str(&text).map_err(|e| format_err(format!("vocabulary JSON: {e}")))?;
        Self::validate(file).map_err(format_err)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn word_tokenizer() {
        let t = Tokenizer::Word { lowercase: true };
        assert_eq!(
            t.tokenize("Don't stop -- it's 2 o'clock, Ham.\n'Tis"),
            ["don't", "stop", "-", "-", "it's", "2", "o'clock", ",", "ham", ".", "'", "tis"]
        );
        assert_eq!(Tokenizer::Char.tokenize("a b"), ["a", " ", "b"]);
    }

    #[test]
    fn build_orders_by_frequency_then_string_and_respects_limits() {
        let texts = ["b a b c", "a b d"];
        let word = Tokenizer::Word { lowercase: false };
        let v = Vocab::build(word, texts, &VocabOptions::default()).unwrap();
        assert_eq!(v.len(), 8);
        assert_eq!((v.id("b"), v.id("a"), v.id("c"), v.id("d")), (4, 5, 6, 7));
        assert_eq!(v.id("zebra"), UNK);
        let opts = VocabOptions {
            max_size: Some(5),
            min_freq: 1,
        };
        let v = Vocab::build(word, texts, &opts).unwrap();
        assert_eq!(v.len(), 5);
        assert_eq!(v.encode("a b"), [UNK, 4]);
        let opts = VocabOptions {
            max_size: None,
            min_freq: 2,
        };
        let v = Vocab::build(word, texts, &opts).unwrap();
        assert_eq!(v.len(), 6);
        let opts = VocabOptions {
            max_size: Some(3),
            min_freq: 1,
        };
        assert!(Vocab::build(word, texts, &opts).is_err());
    }

    #[test]
    fn only_training_texts_enter_the_vocabulary() {
        let v = Vocab::build(Tokenizer::Char, ["ab"], &VocabOptions::default()).unwrap();
        assert_eq!(v.encode("abz"), [4, 5, UNK]);
        assert_eq!(v.encode_with_bounds("b"), [START, 5, STOP]);
        assert_eq!(v.decode(&[START, 4, 5, UNK, STOP, PAD]), "ab<unk>");
    }

    #[test]
    fn json_round_trip_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let word = Tokenizer::Word { lowercase: true };
        let v = Vocab::build(word, ["To be, or not to be"], &VocabOptions::default()).unwrap();
        let path = dir.path().join("vocab.json");
        v.save(&path).unwrap();
        let back = Vocab::load(&path).unwrap();
        assert_eq!(back, v);
        assert_eq!(back.decode(&back.encode("not to be")), "not to be");

        let bad = r#"{"format":"ringtrain-vocab-v1","tokenizer":"char","tokens":["a"]}"#;
        assert!(Vocab::from_json(bad).is_err());
        let dup =
            r#"{"format":"ringtrain-vocab-v1","tokenizer":"char","tokens":["<pad>","<unk>","<s>","</s>","a","a"]}"#;
        assert!(Vocab::from_json(dup).unwrap_err().to_string().contains("twice"));
        std::fs::write(&path, "{not json").unwrap();
        let err = Vocab::load(&path).unwrap_err();
        assert!(err.to_string().starts_with(&path.display().to_string()), "{err}");
    }
}
