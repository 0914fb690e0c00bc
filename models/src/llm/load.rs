//! Opens a GGUF language model: the file, its graph on the device, its tokenizer and its chat
//! template, each read from the file's metadata.

use std::path::Path;
use std::sync::Arc;

use tessera_runtime::io::gguf::GgufFile;
use tessera_runtime::Gpu;

use crate::llm::chat::ChatTemplate;
use crate::llm::tokenizer::{Tokenizer, TokenizerSpec};
use crate::llm::{LlamaModel, LlmError};

/// A model ready to run, with what is needed to talk to it.
pub struct LoadedModel {
    pub file: GgufFile,
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    /// `None` when the file has no `tokenizer.chat_template`, or when it does not compile (then
    /// `chat_template_error` says why; plain generation does not need it).
    pub chat_template: Option<ChatTemplate>,
    pub chat_template_error: Option<String>,
}

impl LoadedModel {
    /// Opens `path` and uploads the weights to `gpu`.
    pub fn open(path: &Path, gpu: Arc<Gpu>) -> Result<Self, LlmError> {
        let file = GgufFile::open(path)?;
        // The architecture is checked before the tokenizer so that an unknown model says so.
        crate::llm::LlamaConfig::from_gguf(&file)?;
        let tokenizer = tokenizer_from_gguf(&file)?;
        let (chat_template, chat_template_error) = match chat_template_from_gguf(&file, &tokenizer)
        {
            Ok(template) => (template, None),
            Err(e) => {
                log::warn!("the model's chat template is unusable: {e}");
                (None, Some(e.to_string()))
            }
        };
        let model = LlamaModel::load(gpu, &file)?;
        Ok(LoadedModel {
            file,
            model,
            tokenizer,
            chat_template,
            chat_template_error,
        })
    }
}

/// Builds the tokenizer from the `tokenizer.ggml.*` keys.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Tokenizer, LlmError> {
    let strings = |key: &str| -> Result<Vec<String>, LlmError> {
        Ok(file
            .get_str_array(key)?
            .into_iter()
            .map(str::to_owned)
            .collect())
    };
    let model = file.get_str("tokenizer.ggml.model")?.to_owned();
    let spec = TokenizerSpec {
        pre: file
            .get_str_opt("tokenizer.ggml.pre")?
            .unwrap_or("default")
            .to_owned(),
        tokens: strings("tokenizer.ggml.tokens")?,
        token_types: file
            .get_i32_array_opt("tokenizer.ggml.token_type")?
            .unwrap_or_default(),
        merges: match file.get_str_array_opt("tokenizer.ggml.merges")? {
            Some(m) => m.into_iter().map(str::to_owned).collect(),
            None => Vec::new(),
        },
        bos_id: file.get_u32_opt("tokenizer.ggml.bos_token_id")?,
        eos_id: file.get_u32_opt("tokenizer.ggml.eos_token_id")?,
        eot_id: file.get_u32_opt("tokenizer.ggml.eot_token_id")?,
        add_bos: file
            .get_bool_opt("tokenizer.ggml.add_bos_token")?
            .unwrap_or(false),
        add_eos: file
            .get_bool_opt("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false),
        model,
    };
    Ok(Tokenizer::new(spec)?)
}

/// Compiles `tokenizer.chat_template`, if the file has one.
pub fn chat_template_from_gguf(
    file: &GgufFile,
    tokenizer: &Tokenizer,
) -> Result<Option<ChatTemplate>, LlmError> {
    let Some(source) = file.get_str_opt("tokenizer.chat_template")? else {
        return Ok(None);
    };
    let text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.token_text(i))
            .unwrap_or("")
            .to_owned()
    };
    let template = ChatTemplate::new(source, &text(tokenizer.bos_id()), &text(tokenizer.eos_id()))?;
    Ok(Some(template))
}
