//! Byte-level BPE tokenizer (GGUF `gpt2` vocabularies) reproducing llama.cpp's `llama_tokenize`,
//! `token_to_piece` and EOG set; ids match HF `tokenizers` on the SmolLM2 vocabulary (tests).
//! Hand-written on `fancy-regex` instead of the `tokenizers` crate: that crate brings 51 crates we
//! do not build otherwise and took ~2 min cold on two cores, yet llama.cpp's special-token
//! partition, EOG rules and piece rendering, most of this file, would still be needed.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Mutex;

use fancy_regex::Regex;

/// GGUF `tokenizer.ggml.*` data for a BPE vocabulary, as plain values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`; only `"gpt2"` (byte-level BPE) is supported.
    pub model: String,
    /// `tokenizer.ggml.pre`: selects the pre-tokenizer regexes (see [`SUPPORTED_PRE`]).
    pub pre: String,
    /// Token texts in the byte-level alphabet, indexed by id.
    pub tokens: Vec<String>,
    /// GGUF token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte);
    /// empty means all normal.
    pub token_types: Vec<i32>,
    /// Merge rules `"left right"`, highest priority first.
    pub merges: Vec<String>,
    /// Beginning-of-sequence token.
    pub bos_id: Option<u32>,
    /// End-of-sequence token; always end-of-generation.
    pub eos_id: Option<u32>,
    /// End-of-turn token; `None` auto-detects it from its text, as llama.cpp does.
    pub eot_id: Option<u32>,
    /// Prepend BOS when encoding with `add_special`.
    pub add_bos: bool,
    /// Append EOS when encoding with `add_special`.
    pub add_eos: bool,
}

/// Pre-tokenizer names accepted in [`TokenizerSpec::pre`].
pub const SUPPORTED_PRE: &[&str] = &[
    "default",
    "smollm",
    "gpt2",
    "gpt-2",
    "llama-bpe",
    "llama3",
    "llama-v3",
];

/// Tokenizer models accepted in [`TokenizerSpec::model`].
pub const SUPPORTED_MODELS: &[&str] = &["gpt2"];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("unsupported tokenizer model {model:?}; supported: {}", SUPPORTED_MODELS.join(", "))]
    UnsupportedModel { model: String },
    #[error("unsupported pre-tokenizer {pre:?}; supported: {}", SUPPORTED_PRE.join(", "))]
    UnsupportedPre { pre: String },
    #[error("vocabulary is empty")]
    EmptyVocab,
    #[error("vocabulary has {0} tokens, more than u32 ids can address")]
    VocabTooLarge(usize),
    #[error("token_types has {types} entries but the vocabulary has {tokens} tokens")]
    TokenTypeCount { types: usize, tokens: usize },
    #[error("{name} token id {id} is outside the vocabulary of {vocab_size} tokens")]
    SpecialIdOutOfRange {
        name: &'static str,
        id: u32,
        vocab_size: usize,
    },
    #[error("pre-tokenizer regex failed to compile: {0}")]
    Regex(#[from] Box<fancy_regex::Error>),
}

/// GGUF token type of one vocabulary entry (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// Maps a GGUF `token_type` value; unknown values become `Undefined`, as in llama.cpp.
    pub fn from_gguf(value: i32) -> Self {
        match value {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }
}

// llama.cpp's regex lists (llama-vocab.cpp, llm_tokenizer_bpe). Each regex splits the pieces left
// by the previous one; text between matches stays a piece of its own (unicode_regex_split).
// llama.cpp runs the GPT-2 and Llama-3 regexes through hand-written matchers whose documented
// form ends in `|\s+`; the trailing alternative is spelled out here.
const RE_DIGIT: &str = r"\p{N}";
const RE_DIGITS: &str = r"\p{N}+";
const RE_DIGITS3: &str = r"[0-9][0-9][0-9]";
const RE_DEFAULT_PUNCT: &str = r"[\p{P}\$\+<=>\^~\|]+";
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const RE_LLAMA3: &str = concat!(
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// Texts llama.cpp treats as end-of-generation whatever the metadata says.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// Texts llama.cpp auto-detects as the EOT token when the metadata names none.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

const BPE_CACHE_LIMIT: usize = 1 << 16;

/// Byte-level BPE tokenizer; see the module docs. `Send + Sync`: share it behind an `Arc`.
pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    token_to_id: HashMap<String, u32>,
    /// Merge rule text (`"left right"`) to rank.
    merge_ranks: HashMap<String, u32>,
    /// Control, user-defined and unknown tokens, longest text first.
    special_tokens: Vec<u32>,
    eog: HashSet<u32>,
    /// Rendered piece of every token with `special = true`.
    pieces: Vec<Box<[u8]>>,
    byte_to_char: [char; 256],
    regexes: Vec<Regex>,
    ignore_merges: bool,
    clean_spaces: bool,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    eot_id: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("merges", &self.merge_ranks.len())
            .field("special_tokens", &self.special_tokens.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("eot_id", &self.eot_id)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

enum Fragment<'a> {
    Token(u32),
    Text(&'a str),
}

impl Tokenizer {
    /// Builds the tokenizer; fails on an unsupported model or pre-tokenizer, inconsistent
    /// token types, or a special id outside the vocabulary.
    pub fn new(spec: TokenizerSpec) -> Result<Self, TokenizerError> {
        if !SUPPORTED_MODELS.contains(&spec.model.as_str()) {
            return Err(TokenizerError::UnsupportedModel { model: spec.model });
        }
        // Regexes, ignore_merges and clean_spaces as llama.cpp's llama_vocab::impl::load sets them.
        type PreConfig = (&'static [&'static str], bool, bool);
        let (patterns, ignore_merges, clean_spaces): PreConfig = match spec.pre.as_str() {
            "default" => (
                &[RE_DEFAULT_PUNCT, RE_GPT2, RE_DIGITS, RE_DIGITS3],
                false,
                true,
            ),
            "smollm" => (&[RE_DIGIT, RE_GPT2], false, false),
            "gpt2" | "gpt-2" => (&[RE_GPT2], false, true),
            "llama-bpe" | "llama3" | "llama-v3" => (&[RE_LLAMA3], true, true),
            _ => return Err(TokenizerError::UnsupportedPre { pre: spec.pre }),
        };
        let regexes = patterns
            .iter()
            .map(|p| Regex::new(p).map_err(|e| TokenizerError::Regex(Box::new(e))))
            .collect::<Result<Vec<_>, _>>()?;

        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::VocabTooLarge(n));
        }
        if !spec.token_types.is_empty() && spec.token_types.len() != n {
            return Err(TokenizerError::TokenTypeCount {
                types: spec.token_types.len(),
                tokens: n,
            });
        }
        for (name, id) in [
            ("bos", spec.bos_id),
            ("eos", spec.eos_id),
            ("eot", spec.eot_id),
        ] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(TokenizerError::SpecialIdOutOfRange {
                        name,
                        id,
                        vocab_size: n,
                    });
                }
            }
        }

        let mut tokens = spec.tokens;
        let mut types: Vec<TokenType> = if spec.token_types.is_empty() {
            vec![TokenType::Normal; n]
        } else {
            spec.token_types
                .iter()
                .map(|&t| TokenType::from_gguf(t))
                .collect()
        };
        let mut token_to_id = HashMap::with_capacity(n);
        for (id, text) in tokens.iter_mut().enumerate() {
            if text.is_empty() {
                *text = format!("[EMPTY_{id}]");
            }
            // Later duplicates win, as in llama.cpp's `token_to_id[word] = i`.
            token_to_id.insert(text.clone(), id as u32);
        }

        let mut merge_ranks = HashMap::with_capacity(spec.merges.len());
        for (rank, merge) in spec.merges.into_iter().enumerate() {
            // llama.cpp splits at the first space after the first byte; a rule without one can
            // never match, so it is dropped. The first of duplicate rules keeps its rank.
            if merge.bytes().skip(1).any(|b| b == b' ') {
                merge_ranks.entry(merge).or_insert(rank as u32);
            }
        }

        // EOT: metadata, else the lowest id among llama.cpp's auto-detected texts.
        let eot_id = spec.eot_id.or_else(|| {
            EOT_TEXTS
                .iter()
                .filter_map(|t| token_to_id.get(*t).copied())
                .min()
        });
        let mut eog: HashSet<u32> = EOG_TEXTS
            .iter()
            .filter_map(|t| token_to_id.get(*t).copied())
            .collect();
        eog.extend(spec.eos_id);
        eog.extend(eot_id);
        // llama.cpp forces the EOG-looking and auto-detected EOT tokens to control type.
        let named_eog = EOG_TEXTS
            .iter()
            .filter_map(|t| token_to_id.get(*t).copied());
        let auto_eot = if spec.eot_id.is_none() { eot_id } else { None };
        for id in named_eog.chain(auto_eot) {
            types[id as usize] = TokenType::Control;
        }

        let mut special_tokens: Vec<u32> = (0..n as u32)
            .filter(|&id| {
                matches!(
                    types[id as usize],
                    TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                )
            })
            .collect();
        special_tokens.sort_by_key(|&id| Reverse(tokens[id as usize].len()));

        let byte_to_char = bytes_to_unicode();
        let char_to_byte: HashMap<char, u8> = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let pieces = tokens
            .iter()
            .zip(&types)
            .map(|(text, ty)| match ty {
                TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
                    text.as_bytes().into()
                }
                TokenType::Normal => decode_byte_level(text, &char_to_byte).into(),
                TokenType::Undefined | TokenType::Unused | TokenType::Byte => Box::default(),
            })
            .collect();

        Ok(Self {
            tokens,
            types,
            token_to_id,
            merge_ranks,
            special_tokens,
            eog,
            pieces,
            byte_to_char,
            regexes,
            ignore_merges,
            clean_spaces,
            bos_id: spec.bos_id,
            eos_id: spec.eos_id,
            eot_id,
            add_bos: spec.add_bos,
            add_eos: spec.add_eos,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Tokenizes `text` like `llama_tokenize(text, add_special, parse_special)`.
    ///
    /// `add_special` adds BOS/EOS where the vocabulary asks for them. `parse_special` turns the
    /// texts of control tokens into their ids; user-defined tokens are split out in both modes,
    /// as llama.cpp (and HF `tokenizers`) do.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos_id);
        }
        for fragment in self.partition_special(text, parse_special) {
            match fragment {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(t) => self.encode_fragment(t, &mut out),
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos_id);
        }
        out
    }

    /// Text of `ids` like `llama_detokenize(ids, remove_special = false, special)`: control
    /// tokens render as their text only when `special`; invalid UTF-8 is replaced lossily.
    pub fn detokenize(&self, ids: &[u32], special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.token_to_piece(id, special));
        }
        if self.clean_spaces {
            clean_up_spaces(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Text of `ids` with control tokens omitted (`detokenize(ids, false)`).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.detokenize(ids, false)
    }

    /// Raw bytes of one token (llama.cpp `token_to_piece`, no lstrip): control and unknown
    /// tokens are empty unless `special`; ids outside the vocabulary are empty.
    pub fn token_to_piece(&self, id: u32, special: bool) -> &[u8] {
        let idx = id as usize;
        match self.types.get(idx) {
            None => &[],
            Some(TokenType::Control | TokenType::Unknown) if !special => &[],
            Some(_) => &self.pieces[idx],
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// EOT from the metadata, else auto-detected from its text (`<|im_end|>`, `<|eot_id|>`...).
    pub fn eot_id(&self) -> Option<u32> {
        self.eot_id
    }

    /// Whether `encode(.., add_special = true, ..)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// True for end-of-generation tokens: EOS, EOT and the texts llama.cpp collects as EOG.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// Id of the token whose vocabulary text is exactly `text` (byte-level alphabet).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// Vocabulary text of `id` (byte-level alphabet for normal tokens).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Token type after llama.cpp's fix-ups (EOG-looking tokens become control).
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// llama.cpp's `tokenizer_st_partition`: for each special token, longest text first, split
    /// every remaining text fragment at each of its occurrences.
    fn partition_special<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut fragments = Vec::new();
        if text.is_empty() {
            return fragments;
        }
        fragments.push(Fragment::Text(text));
        for &id in &self.special_tokens {
            let ty = self.types[id as usize];
            if !parse_special && matches!(ty, TokenType::Control | TokenType::Unknown) {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len());
            for fragment in fragments {
                let Fragment::Text(mut rest) = fragment else {
                    next.push(fragment);
                    continue;
                };
                while let Some(pos) = rest.find(needle) {
                    if pos > 0 {
                        next.push(Fragment::Text(&rest[..pos]));
                    }
                    next.push(Fragment::Token(id));
                    rest = &rest[pos + needle.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            fragments = next;
        }
        fragments
    }

    fn encode_fragment(&self, text: &str, out: &mut Vec<u32>) {
        let mut word = String::new();
        for piece in self.pre_tokenize(text) {
            word.clear();
            for &b in piece.as_bytes() {
                word.push(self.byte_to_char[b as usize]);
            }
            self.encode_word(&word, out);
        }
    }

    /// Applies the regex list: each regex splits every current piece into its matches and the
    /// text between them (llama.cpp's `unicode_regex_split`).
    fn pre_tokenize<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                let mut last = 0;
                for m in re.find_iter(piece) {
                    let m = match m {
                        Ok(m) => m,
                        Err(e) => {
                            // Only a backtracking limit can fail here; keep the rest whole.
                            log::warn!(
                                "pre-tokenizer regex gave up ({e}); keeping text as one piece"
                            );
                            break;
                        }
                    };
                    if m.start() > last {
                        next.push(&piece[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < piece.len() {
                    next.push(&piece[last..]);
                }
            }
            pieces = next;
        }
        pieces
    }

    /// Encodes one byte-level word, through the cache.
    fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        if let Some(ids) = self.lock_cache().get(word) {
            out.extend_from_slice(ids);
            return;
        }
        let start = out.len();
        self.bpe(word, out);
        let mut cache = self.lock_cache();
        if cache.len() >= BPE_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(word.to_owned(), out[start..].to_vec());
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u32>>> {
        // The cache holds no invariant a panicking thread could break.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// llama.cpp's `llm_tokenizer_bpe_session::tokenize` for one word: merge the adjacent pair
    /// with the lowest rank (leftmost on ties) until none applies.
    fn bpe(&self, word: &str, out: &mut Vec<u32>) {
        if self.ignore_merges {
            if let Some(&id) = self.token_to_id.get(word) {
                out.push(id);
                return;
            }
        }
        const NONE: usize = usize::MAX;
        struct Symbol {
            start: usize,
            len: usize,
            prev: usize,
            next: usize,
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        for (i, (start, c)) in word.char_indices().enumerate() {
            let len = c.len_utf8();
            let next = if start + len == word.len() {
                NONE
            } else {
                i + 1
            };
            symbols.push(Symbol {
                start,
                len,
                prev: i.wrapping_sub(1),
                next,
            });
        }
        if let Some(first) = symbols.first_mut() {
            first.prev = NONE;
        }

        /// A mergeable pair; ordered by rank, then leftmost. Stale ones are skipped when popped.
        #[derive(PartialEq, Eq, PartialOrd, Ord)]
        struct Bigram {
            rank: u32,
            left: usize,
            right: usize,
            left_len: usize,
            right_len: usize,
        }
        let mut queue: BinaryHeap<Reverse<Bigram>> = BinaryHeap::new();
        let mut key = String::new();
        let mut push_pair = |symbols: &[Symbol], queue: &mut BinaryHeap<_>, l: usize, r: usize| {
            if l == NONE || r == NONE {
                return;
            }
            let (ls, rs) = (&symbols[l], &symbols[r]);
            key.clear();
            key.push_str(&word[ls.start..ls.start + ls.len]);
            key.push(' ');
            key.push_str(&word[rs.start..rs.start + rs.len]);
            if let Some(&rank) = self.merge_ranks.get(key.as_str()) {
                queue.push(Reverse(Bigram {
                    rank,
                    left: l,
                    right: r,
                    left_len: ls.len,
                    right_len: rs.len,
                }));
            }
        };
        for i in 1..symbols.len() {
            push_pair(&symbols, &mut queue, i - 1, i);
        }
        while let Some(Reverse(bigram)) = queue.pop() {
            let (l, r, l_len, r_len) =
                (bigram.left, bigram.right, bigram.left_len, bigram.right_len);
            let (left, right) = (&symbols[l], &symbols[r]);
            // Symbols only grow, so equal lengths mean equal texts (llama.cpp compares texts).
            if left.len == 0 || right.len == 0 || left.len != l_len || right.len != r_len {
                continue;
            }
            let right_next = right.next;
            symbols[l].len += r_len;
            symbols[r].len = 0;
            symbols[l].next = right_next;
            if right_next != NONE {
                symbols[right_next].prev = l;
            }
            let prev = symbols[l].prev;
            push_pair(&symbols, &mut queue, prev, l);
            push_pair(&symbols, &mut queue, l, right_next);
        }

        for sym in symbols.iter().filter(|s| s.len > 0) {
            let text = &word[sym.start..sym.start + sym.len];
            match self.token_to_id.get(text) {
                Some(&id) => out.push(id),
                None => {
                    // A merge produced a text missing from the vocabulary: fall back to the
                    // tokens of its bytes. (llama.cpp looks up each UTF-8 byte of the
                    // byte-level text, which only differs for non-ASCII bytes, where it drops
                    // them.) Bytes without a token are dropped, as in llama.cpp.
                    let mut buf = [0u8; 4];
                    for c in text.chars() {
                        if let Some(&id) = self.token_to_id.get(&*c.encode_utf8(&mut buf)) {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }
}

/// Incremental detokenizer: push ids, get back the text that is complete so far. Never splits a
/// UTF-8 character: a trailing incomplete sequence is held back until the next token completes
/// it; invalid bytes become U+FFFD; [`StreamDecoder::finish`] flushes what is left, lossily.
/// Pieces are concatenated without llama.cpp's `clean_spaces` pass (as llama.cpp streams).
#[derive(Debug)]
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    special: bool,
    pending: Vec<u8>,
}

impl<'t> StreamDecoder<'t> {
    /// `special`: render control tokens as their text (llama.cpp's `special` flag).
    pub fn new(tokenizer: &'t Tokenizer, special: bool) -> Self {
        Self {
            tokenizer,
            special,
            pending: Vec::new(),
        }
    }

    /// Adds one token; returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.pending
            .extend_from_slice(self.tokenizer.token_to_piece(id, self.special));
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix is valid UTF-8 by construction; the fallback never triggers.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete sequence at the end: hold it back.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending_bytes(&self) -> &[u8] {
        &self.pending
    }

    /// Flushes held-back bytes (an incomplete character becomes U+FFFD) and resets.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to U+0100 onwards.
fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
    }
    map
}

/// Maps a byte-level token text back to bytes; characters outside the alphabet are kept as
/// their UTF-8 (llama.cpp writes an `[UNK_BYTE_0x..]` marker instead).
fn decode_byte_level(text: &str, char_to_byte: &HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut buf = [0u8; 4];
    for c in text.chars() {
        match char_to_byte.get(&c) {
            Some(&b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes()),
        }
    }
    out
}

/// llama.cpp's `clean_spaces` pass of `llama_detokenize`, ported literally (in place).
fn clean_up_spaces(text: &mut Vec<u8>) {
    // First pass: " ?", " !", " .", " ," lose the space.
    let total1 = text.len();
    let mut total = usize::from(total1 > 0);
    for i in 1..total1 {
        let x = text[i];
        if text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        text[total] = x;
        total += 1;
    }
    // Second pass: a single apostrophe between spaces loses both spaces.
    let total2 = total;
    total = usize::from(total2 > 0);
    let mut i = 1;
    while i < total2 {
        let x = text[i];
        if x == b'\'' && i + 1 < total2 && text[i - 1] == b' ' && text[i + 1] == b' ' {
            total -= 1;
            i += 1;
            text[i] = 0;
        }
        text[total] = x;
        total += 1;
        i += 1;
    }
    // Third pass: " 's", " 'm", " 're", " 've" lose the space.
    let total3 = total;
    total = usize::from(total3 > 0);
    for i in 1..total3 {
        let x = text[i];
        if text[i - 1] == b' ' && x == b'\'' && i + 1 < total3 {
            let x1 = text[i + 1];
            if matches!(x1, b's' | b'm') {
                total -= 1;
            } else if x1 != b't' && x1 != b'd' && i + 2 < total3 {
                let x2 = text[i + 2];
                if (x1 == b'r' || x1 == b'v') && x2 == b'e' {
                    total -= 1;
                }
            }
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(pre: &str, tokens: &[(&str, i32)], merges: &[&str]) -> Tokenizer {
        let spec = TokenizerSpec {
            model: "gpt2".into(),
            pre: pre.into(),
            tokens: tokens.iter().map(|(t, _)| t.to_string()).collect(),
            token_types: tokens.iter().map(|&(_, ty)| ty).collect(),
            merges: merges.iter().map(|m| m.to_string()).collect(),
            bos_id: Some(0),
            eos_id: Some(1),
            eot_id: None,
            add_bos: false,
            add_eos: false,
        };
        Tokenizer::new(spec).expect("tiny vocabulary is valid")
    }

    /// Control tokens 0..=2, then the byte-level alphabet of all 256 bytes, then `extra`.
    fn tiny_full(pre: &str, extra: &[&str], merges: &[&str]) -> Tokenizer {
        let mut tokens: Vec<(String, i32)> = vec![
            ("<|endoftext|>".into(), 3),
            ("<|im_start|>".into(), 3),
            ("<|im_end|>".into(), 3),
        ];
        for c in bytes_to_unicode() {
            tokens.push((c.to_string(), 1));
        }
        tokens.extend(extra.iter().map(|t| (t.to_string(), 1)));
        let refs: Vec<(&str, i32)> = tokens.iter().map(|(t, ty)| (t.as_str(), *ty)).collect();
        tiny(pre, &refs, merges)
    }

    fn ids(t: &Tokenizer, texts: &[&str]) -> Vec<u32> {
        texts
            .iter()
            .map(|s| t.token_id(s).expect("token in the tiny vocabulary"))
            .collect()
    }

    #[test]
    fn bytes_to_unicode_matches_gpt2_table() {
        let m = bytes_to_unicode();
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        assert_eq!(m[b'\t' as usize], 'ĉ');
        assert_eq!(m[0], 'Ā');
        assert_eq!(m[b'a' as usize], 'a');
        assert_eq!(m[0xAD], 'Ń');
        let distinct: HashSet<char> = m.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn lower_rank_merge_applies_first() {
        let t = tiny_full("gpt2", &["ab", "bc"], &["a b", "b c"]);
        assert_eq!(t.encode("abc", false, false), ids(&t, &["ab", "c"]));
        let t = tiny_full("gpt2", &["ab", "bc"], &["b c", "a b"]);
        assert_eq!(t.encode("abc", false, false), ids(&t, &["a", "bc"]));
    }

    #[test]
    fn merges_chain_into_longer_tokens() {
        let t = tiny_full("gpt2", &["bc", "abc", "Ġabc"], &["b c", "a bc", "Ġ abc"]);
        assert_eq!(t.encode("abc abc", false, false), ids(&t, &["abc", "Ġabc"]));
    }

    #[test]
    fn equal_rank_pairs_merge_leftmost_first() {
        let t = tiny_full("gpt2", &["aa"], &["a a"]);
        assert_eq!(t.encode("aaa", false, false), ids(&t, &["aa", "a"]));
        assert_eq!(t.encode("aaaa", false, false), ids(&t, &["aa", "aa"]));
    }

    #[test]
    fn unmerged_multibyte_char_falls_back_to_byte_tokens() {
        let t = tiny_full("gpt2", &[], &[]);
        // "é" is C3 A9: byte-level "Ã" and "©".
        assert_eq!(t.encode("é", false, false), ids(&t, &["Ã", "©"]));
        assert_eq!(t.decode(&t.encode("é", false, false)), "é");
    }

    #[test]
    fn merge_result_missing_from_vocab_falls_back_to_its_bytes() {
        // "c a" merges, but "ca" is no token: emit "c" and "a".
        let t = tiny_full("gpt2", &[], &["c a"]);
        assert_eq!(t.encode("ca", false, false), ids(&t, &["c", "a"]));
    }

    #[test]
    fn spaces_attach_to_the_following_word() {
        let t = tiny_full("gpt2", &["Ġb", "ĠĠ"], &["Ġ b", "Ġ Ġ"]);
        // "a   b" pre-tokenizes to "a", "  ", " b".
        assert_eq!(t.encode("a   b", false, false), ids(&t, &["a", "ĠĠ", "Ġb"]));
    }

    #[test]
    fn smollm_splits_every_digit() {
        let t = tiny_full("smollm", &["12", "Ġ1"], &["1 2", "Ġ 1"]);
        assert_eq!(
            t.encode("12 1", false, false),
            ids(&t, &["1", "2", "Ġ", "1"])
        );
        let t = tiny_full("gpt2", &["12", "Ġ1"], &["1 2", "Ġ 1"]);
        assert_eq!(t.encode("12 1", false, false), ids(&t, &["12", "Ġ1"]));
    }

    #[test]
    fn llama3_groups_digits_by_three_and_ignores_merges_for_whole_words() {
        let t = tiny_full("llama-bpe", &["123", "hello"], &[]);
        assert_eq!(t.encode("12345", false, false), ids(&t, &["123", "4", "5"]));
        // No merges at all, yet "hello" is one token: ignore_merges.
        assert_eq!(t.encode("hello", false, false), ids(&t, &["hello"]));
    }

    #[test]
    fn default_pre_splits_punctuation_digit_runs_and_digit_triples() {
        let extra = ["Ġb", "!!", "12", "123", "Ġ1"];
        let t = tiny_full("default", &extra, &["Ġ b", "! !", "1 2", "12 3", "Ġ 1"]);
        let want = ids(&t, &["a", ",", "Ġb", "!!", "Ġ", "123", "4"]);
        assert_eq!(t.encode("a, b!! 1234", false, false), want);
    }

    #[test]
    fn parse_special_emits_control_ids_only_when_asked() {
        let t = tiny_full("gpt2", &[], &[]);
        let with = t.encode("<|im_start|>hi<|im_end|>", false, true);
        assert_eq!(with, [vec![1], ids(&t, &["h", "i"]), vec![2]].concat());
        let without = t.encode("<|im_start|>", false, false);
        assert_eq!(
            without,
            ids(
                &t,
                &["<", "|", "i", "m", "_", "s", "t", "a", "r", "t", "|", ">"]
            )
        );
    }

    #[test]
    fn longer_special_token_wins_over_its_prefix() {
        let mut tokens: Vec<(String, i32)> =
            vec![("<s>".into(), 3), ("</s>".into(), 3), ("<s>x".into(), 4)];
        tokens.extend(bytes_to_unicode().iter().map(|c| (c.to_string(), 1)));
        let refs: Vec<(&str, i32)> = tokens.iter().map(|(t, ty)| (t.as_str(), *ty)).collect();
        let t = tiny("gpt2", &refs, &[]);
        assert_eq!(t.encode("<s>x<s>", false, true), vec![2, 0]);
        // User-defined tokens are split out even without parse_special (llama.cpp behaviour).
        assert_eq!(t.encode("<s>x", false, false), vec![2]);
    }

    #[test]
    fn add_special_adds_bos_and_eos_only_when_configured() {
        let t = tiny_full("gpt2", &[], &[]);
        assert_eq!(t.encode("", true, false), Vec::<u32>::new());
        let mut spec_tokens: Vec<String> = vec!["<s>".into(), "</s>".into()];
        spec_tokens.extend(bytes_to_unicode().iter().map(|c| c.to_string()));
        let spec = TokenizerSpec {
            model: "gpt2".into(),
            pre: "gpt2".into(),
            token_types: std::iter::repeat_n(3, 2)
                .chain(std::iter::repeat_n(1, 256))
                .collect(),
            tokens: spec_tokens,
            bos_id: Some(0),
            eos_id: Some(1),
            add_bos: true,
            add_eos: true,
            ..Default::default()
        };
        let t = Tokenizer::new(spec).expect("valid spec");
        let a = t.token_id("a").expect("byte token");
        assert_eq!(t.encode("a", true, false), vec![0, a, 1]);
        assert_eq!(t.encode("a", false, false), vec![a]);
    }

    #[test]
    fn unsupported_model_or_pre_is_an_error_listing_the_supported_ones() {
        let spec = TokenizerSpec {
            model: "llama".into(),
            pre: "smollm".into(),
            tokens: vec!["a".into()],
            ..Default::default()
        };
        let err = Tokenizer::new(spec.clone())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("\"llama\"") && err.contains("gpt2"), "{err}");
        let spec = TokenizerSpec {
            model: "gpt2".into(),
            pre: "qwen2".into(),
            ..spec
        };
        let err = Tokenizer::new(spec)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("qwen2") && err.contains("smollm") && err.contains("llama-bpe"));
    }

    #[test]
    fn mismatched_token_types_are_rejected() {
        let spec = TokenizerSpec {
            model: "gpt2".into(),
            pre: "gpt2".into(),
            tokens: vec!["a".into(), "b".into()],
            token_types: vec![1],
            ..Default::default()
        };
        assert!(matches!(
            Tokenizer::new(spec),
            Err(TokenizerError::TokenTypeCount { .. })
        ));
    }

    #[test]
    fn control_pieces_render_only_with_special() {
        let t = tiny_full("gpt2", &[], &[]);
        assert_eq!(t.token_to_piece(2, false), b"");
        assert_eq!(t.token_to_piece(2, true), b"<|im_end|>");
        assert_eq!(t.token_to_piece(99_999, true), b"");
        let hi = t.encode("<|im_start|>hi", false, true);
        assert_eq!(t.decode(&hi), "hi");
        assert_eq!(t.detokenize(&hi, true), "<|im_start|>hi");
    }

    #[test]
    fn eog_covers_eos_and_end_of_turn_texts() {
        let t = tiny_full("gpt2", &[], &[]);
        assert!(t.is_eog(0), "<|endoftext|>");
        assert!(t.is_eog(1), "eos id from the spec");
        assert!(t.is_eog(2), "<|im_end|>");
        assert!(!t.is_eog(3));
        assert_eq!(t.eot_id(), Some(0));
    }

    #[test]
    fn clean_spaces_matches_llama_cpp_detokenize() {
        let mut s = b"Hello , world ! it ' s I 're 'll".to_vec();
        clean_up_spaces(&mut s);
        assert_eq!(String::from_utf8_lossy(&s), "Hello, world! it's I're 'll");
    }

    #[test]
    fn stream_decoder_holds_back_split_emoji_until_complete() {
        let t = tiny_full("gpt2", &[], &[]);
        let wave = "👋"; // F0 9F 91 8B
        let toks = t.encode(&format!("a{wave}b"), false, false);
        assert_eq!(toks.len(), 6);
        let mut dec = StreamDecoder::new(&t, false);
        let outs: Vec<String> = toks.iter().map(|&id| dec.push(id)).collect();
        assert_eq!(outs, vec!["a", "", "", "", wave, "b"]);
        assert_eq!(dec.finish(), "");
    }

    #[test]
    fn stream_decoder_flushes_incomplete_tail_lossily() {
        let t = tiny_full("gpt2", &[], &[]);
        let toks = t.encode("👋", false, false);
        let mut dec = StreamDecoder::new(&t, false);
        assert_eq!(dec.push(toks[0]), "");
        assert_eq!(dec.push(toks[1]), "");
        assert_eq!(dec.pending_bytes(), &[0xF0, 0x9F]);
        assert_eq!(dec.finish(), "\u{FFFD}");
    }

    #[test]
    fn stream_decoder_replaces_invalid_bytes_without_stalling() {
        let t = tiny_full("gpt2", &[], &[]);
        let ff = t
            .token_id(&bytes_to_unicode()[0xFF].to_string())
            .expect("byte token");
        let x = t.token_id("x").expect("byte token");
        let mut dec = StreamDecoder::new(&t, false);
        assert_eq!(dec.push(ff), "\u{FFFD}");
        assert_eq!(dec.push(x), "x");
    }

    // ---- The real SmolLM2 vocabulary. ----

    /// The real SmolLM2 vocabulary, read from the model (`$TESSERA_MODEL` or the cached
    /// download, fetched if missing).
    fn smollm2() -> Option<Tokenizer> {
        let path = match std::env::var_os("TESSERA_MODEL") {
            Some(p) => std::path::PathBuf::from(p),
            None => crate::fetch::ensure_default_model(&mut |_| {})
                .expect("the vocabulary tests need the default model: run tools/test.sh"),
        };
        let file = tessera_runtime::io::gguf::GgufFile::open(&path).expect("model opens");
        Some(crate::llm::load::tokenizer_from_gguf(&file).expect("tokenizer builds"))
    }

    #[test]
    fn smollm2_encodes_known_llama_cpp_ids() {
        let Some(t) = smollm2() else { return };
        assert_eq!(t.vocab_size(), 49152);
        assert_eq!(t.encode("Hello world", false, false), vec![19556, 905]);
        assert_eq!(t.encode(" Hello", false, false), vec![38699], "ĠHello");
        assert_eq!(t.encode("hello", false, false), vec![28120]);
        assert_eq!(
            t.encode("Hello world", true, false),
            vec![19556, 905],
            "add_bos is false"
        );
        assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));
        assert!(t.is_eog(2) && t.is_eog(0) && !t.is_eog(1));
        assert_eq!(t.token_id("<|im_start|>"), Some(1));
    }

    /// Reference ids from HF `tokenizers` (0.22) with SmolLM2's vocab and merges, pre-tokenizer
    /// Sequence[Split(\p{N}, Isolated), ByteLevel(add_prefix_space=False)], and the 17 control
    /// tokens added as special tokens; see the module docs for how they were produced.
    const HF_REFERENCE: &[(&str, &[u32])] = &[
        ("", &[]),
        (" ", &[216]),
        ("  ", &[256]),
        ("   ", &[333]),
        ("\n", &[198]),
        ("\n\n", &[1116]),
        (" \n", &[3717]),
        ("\n \n  \n", &[198, 3717, 32057]),
        ("a  b", &[81, 216, 278]),
        ("a   b\t\tc", &[81, 256, 278, 197, 197, 83]),
        ("\tindented\n\ttab", &[197, 526, 6574, 198, 197, 15999]),
        ("trailing spaces   ", &[4861, 4966, 5600, 333]),
        ("   leading", &[256, 2899]),
        ("Hello world", &[19556, 905]),
        (" Hello", &[38699]),
        ("hello", &[28120]),
        (
            "12345 1.5e-10",
            &[33, 34, 35, 36, 37, 216, 33, 30, 37, 85, 29, 33, 32],
        ),
        (
            "3.14159 and 2,000,000",
            &[
                35, 30, 33, 36, 33, 37, 41, 284, 216, 34, 28, 32, 32, 32, 28, 32, 32, 32,
            ],
        ),
        (
            "phone: +1 (555) 010-9999",
            &[
                6733, 42, 1232, 33, 365, 37, 37, 37, 25, 216, 32, 33, 32, 29, 41, 41, 41, 41,
            ],
        ),
        (
            "café naïve résumé",
            &[83, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756],
        ),
        (
            "Ünïcödé ÀÉÎÕÜ",
            &[
                142, 246, 94, 25972, 83, 7466, 84, 2756, 5549, 218, 39614, 142, 232, 142, 239, 142,
                246,
            ],
        ),
        (
            "你好世界",
            &[18645, 250, 48392, 138, 7906, 240, 178, 239, 230],
        ),
        (
            "日本語のテキスト",
            &[
                23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100,
                226,
            ],
        ),
        (
            "한국어 문장",
            &[
                33085, 246, 181, 130, 251, 183, 240, 129, 25947, 122, 133, 183, 248, 115,
            ],
        ),
        (
            "Привет, мир!",
            &[155, 249, 46879, 16464, 32547, 28, 41337, 7872, 9175, 17],
        ),
        (
            "مرحبا بالعالم",
            &[
                21706, 20602, 44626, 31462, 10805, 45726, 22208, 34966, 22208, 21706,
            ],
        ),
        (
            "👋🏽 👨\u{200d}👩\u{200d}👧",
            &[
                10813, 235, 229, 10813, 233, 138, 15107, 235, 118, 321, 231, 10813, 235, 119, 321,
                231, 10813, 235, 117,
            ],
        ),
        (
            "emoji 🎉🎉 done",
            &[391, 33777, 15107, 232, 227, 10813, 232, 227, 2294],
        ),
        (
            "fn main() { println!(\"hi\"); }",
            &[
                7853, 1085, 1000, 1662, 1628, 34115, 17, 1470, 6004, 21646, 4029,
            ],
        ),
        (
            "def f(x):\n    return x**2  # square",
            &[
                1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5222,
            ],
        ),
        (
            "<div class=\"a\">&amp;</div>",
            &[
                44, 10014, 1128, 2671, 81, 15889, 22, 1613, 43, 9617, 10014, 46,
            ],
        ),
        (
            "don't I'LL we've they're she's",
            &[12420, 982, 339, 23, 16421, 392, 3543, 502, 2316, 1041, 506],
        ),
        ("it's 'quoted' text", &[269, 506, 637, 385, 5036, 23, 1694]),
        (
            "<|im_start|>user\nhi<|im_end|>\n",
            &[1, 4093, 198, 6004, 2, 198],
        ),
        ("text <|endoftext|> more text", &[2692, 216, 0, 540, 1694]),
        ("<|im_end|><|im_start|>", &[2, 1]),
        ("<|im_start|", &[44, 108, 306, 79, 3738, 108]),
        (
            "snake_case camelCase kebab-case",
            &[48284, 79, 7544, 32782, 10802, 902, 82, 369, 29, 7544],
        ),
        (
            "Ⅻ ² ½ ٣",
            &[173, 223, 121, 216, 19133, 216, 16738, 216, 164, 113],
        ),
        (
            "a\u{a0}b\u{2003}c\u{200b}d",
            &[81, 15442, 82, 321, 221, 83, 321, 229, 84],
        ),
        ("...!!!???", &[2026, 29646, 16693, 47]),
        (
            "x = y + z * 2 / (w - 1)",
            &[
                104, 446, 329, 1232, 1892, 1672, 216, 34, 2272, 365, 103, 731, 216, 33, 25,
            ],
        ),
        (
            "https://example.com/path?q=1&r=2",
            &[
                4687, 1742, 7434, 30, 824, 31, 1537, 47, 97, 45, 33, 22, 98, 45, 34,
            ],
        ),
        (
            "The quick brown fox jumps over the lazy dog.",
            &[504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30],
        ),
    ];

    #[test]
    fn smollm2_matches_hf_reference_on_awkward_strings() {
        let Some(t) = smollm2() else { return };
        let mut failures = Vec::new();
        for &(text, want) in HF_REFERENCE {
            let got = t.encode(text, false, true);
            if got != want {
                failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
            }
            // Byte-level BPE is lossless: decoding with specials restores the input.
            assert_eq!(t.detokenize(&got, true), text);
        }
        assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
    }

    #[test]
    fn smollm2_stream_decoder_reassembles_multibyte_text() {
        let Some(t) = smollm2() else { return };
        let text = "你好世界 👋🏽 👨‍👩‍👧 café";
        let mut dec = StreamDecoder::new(&t, false);
        let mut out = String::new();
        for id in t.encode(text, false, false) {
            let chunk = dec.push(id);
            assert!(!chunk.contains('\u{FFFD}'), "split a character: {chunk:?}");
            out.push_str(&chunk);
        }
        out.push_str(&dec.finish());
        assert_eq!(out, text);
    }
}
