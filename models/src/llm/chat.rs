//! Renders HF-style Jinja chat templates (GGUF `tokenizer.chat_template`) into prompt text with
//! minijinja, configured like transformers' `apply_chat_template`: `trim_blocks`,
//! `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a Python-style `tojson`
//! and Python string/dict methods (`minijinja-contrib` pycompat). Rendering is deterministic
//! except for `strftime_now`, which reads the clock (UTC).

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Kwargs;
use minijinja::{context, Environment, Error, ErrorKind, Value};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat template does not compile: {0}")]
    Syntax(#[source] Error),
    #[error("chat template raised an exception: {0}")]
    Raised(String),
    #[error("chat template failed to render: {0}")]
    Render(#[source] Error),
}

const TEMPLATE_NAME: &str = "chat_template";
/// Marks errors coming from `raise_exception` so they map to [`ChatError::Raised`].
const RAISED_MARKER: &str = "raise_exception: ";

/// Instructions a template may run per render: far above any real chat template, far below
/// what would hang the program.
const TEMPLATE_FUEL: u64 = 5_000_000;

/// A compiled chat template plus the special-token strings it may reference.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported as [`ChatError::Syntax`] with minijinja's
    /// description and line.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        // A template is data from the model file: bound the work it may do.
        env.set_fuel(Some(TEMPLATE_FUEL));
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(ChatError::Syntax)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(ChatError::Syntax)?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Renders `messages`; `add_generation_prompt` appends the assistant-turn opener when the
    /// template supports it. Variables: `messages`, `add_generation_prompt`, `bos_token`,
    /// `eos_token`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                context! { role => m.role.as_str(), content => m.content.as_str() }
            })
            .collect();
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatError::Render)?;
        template.render(ctx).map_err(|e| {
            match e.detail().and_then(|d| d.strip_prefix(RAISED_MARKER)) {
                Some(msg) => ChatError::Raised(msg.to_owned()),
                None => ChatError::Render(e),
            }
        })
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED_MARKER}{message}"),
    ))
}

/// Python's `datetime.now().strftime(format)`, in UTC.
fn strftime_now(format: String) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    strftime(&format, secs as i64)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats a Unix time (UTC) with C `strftime` directives; `%-d` style drops zero padding.
/// Unknown directives are copied through.
pub fn strftime(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3).
    let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(is_leap && month > 2);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let num = |v: i64, width: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(month, 2)),
            Some('d') => out.push_str(&num(day, 2)),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num(hour12, 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('S') => out.push_str(&num(second, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b' | 'h') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31), proleptic Gregorian (H. Hinnant).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, with the same keyword arguments.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "separators must be a pair",
            ));
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        indent,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from(out))
}

struct JsonStyle {
    indent: Option<usize>,
    ensure_ascii: bool,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> Result<(), Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = style.indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&value.to_string()),
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or_default(), style),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, style, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                write_json_string(out, &key.to_string(), style);
                out.push_str(&style.key_sep);
                write_json(out, &value.get_item(key)?, style, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => write_json_string(out, &value.to_string(), style),
    }
    Ok(())
}

fn write_json_string(out: &mut String, s: &str, style: &JsonStyle) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (style.ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ChatML as SmolLM2 ships it (GGUF `tokenizer.chat_template`).
    const SMOLLM2_CHATML: &str = "{% for message in messages %}{% if loop.first and \
        messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI \
        assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' \
        + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if \
        add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn chatml() -> ChatTemplate {
        ChatTemplate::new(SMOLLM2_CHATML, "<|im_start|>", "<|im_end|>").expect("ChatML compiles")
    }

    #[test]
    fn chatml_adds_default_system_prompt_and_generation_prompt() {
        let out = chatml()
            .render(&[ChatMessage::new("user", "hi")], true)
            .expect("renders");
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
             Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn chatml_keeps_explicit_system_prompt_and_omits_generation_prompt() {
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "2+2?"),
            ChatMessage::new("assistant", "4"),
        ];
        let out = chatml().render(&msgs, false).expect("renders");
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n\
             <|im_start|>assistant\n4<|im_end|>\n"
        );
    }

    #[test]
    fn real_smollm2_template_renders_like_the_embedded_copy() {
        let path = match std::env::var_os("TESSERA_MODEL") {
            Some(p) => std::path::PathBuf::from(p),
            None => crate::fetch::ensure_default_model(&mut |_| {})
                .expect("this test needs the default model: run tools/test.sh"),
        };
        let file = tessera_runtime::io::gguf::GgufFile::open(&path).expect("model opens");
        let source = file
            .get_str("tokenizer.chat_template")
            .expect("chat_template present");
        assert_eq!(source, SMOLLM2_CHATML);
        let t = ChatTemplate::new(source, "<|im_start|>", "<|im_end|>").expect("compiles");
        let msgs = [ChatMessage::new("user", "What is 2+2?")];
        assert_eq!(
            t.render(&msgs, true).expect("renders"),
            chatml().render(&msgs, true).expect("renders")
        );
    }

    #[test]
    fn syntax_error_names_the_problem() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", "", "")
            .expect_err("unclosed for loop");
        assert!(matches!(err, ChatError::Syntax(_)));
        let text = err.to_string();
        assert!(
            text.contains("syntax error: unexpected end of input"),
            "{text}"
        );
    }

    #[test]
    fn raise_exception_becomes_raised_error_with_its_message() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}\
                   {% endif %}ok";
        let t = ChatTemplate::new(src, "", "").expect("compiles");
        let err = t
            .render(&[ChatMessage::new("system", "x")], false)
            .expect_err("raises");
        assert!(
            matches!(&err, ChatError::Raised(m) if m == "first must be user"),
            "{err}"
        );
        assert_eq!(
            t.render(&[ChatMessage::new("user", "x")], false)
                .expect("renders"),
            "ok"
        );
    }

    #[test]
    fn hf_features_trim_loop_vars_and_python_methods_render_like_jinja2() {
        // Expected output produced by Python jinja2 3.1 with transformers' settings.
        let src = concat!(
            "{{ bos_token }}\n{% for m in messages %}\n  {% if loop.index0 > 0 %}|{% endif %}",
            "{{ m['content'] | trim }}-{{ m.role.upper() }}-",
            "{{ m.content.strip().startswith('a') }}",
            "{% if loop.last %}.{% endif %}\n{% endfor %}\n{{ eos_token }}"
        );
        let t = ChatTemplate::new(src, "<s>", "</s>").expect("compiles");
        let msgs = [
            ChatMessage::new("user", "  abc "),
            ChatMessage::new("assistant", "x"),
        ];
        assert_eq!(
            t.render(&msgs, false).expect("renders"),
            "<s>\nabc-USER-True|x-ASSISTANT-False.</s>"
        );
    }

    #[test]
    fn loop_controls_and_namespace_are_available() {
        let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'stop' %}\
                   {% break %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}";
        let t = ChatTemplate::new(src, "", "").expect("compiles");
        let msgs = [
            ChatMessage::new("a", ""),
            ChatMessage::new("stop", ""),
            ChatMessage::new("b", ""),
        ];
        assert_eq!(t.render(&msgs, false).expect("renders"), "1");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let src = "{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}";
        let t = ChatTemplate::new(src, "", "").expect("compiles");
        let msgs = [ChatMessage::new("user", "é \"q\"\n")];
        assert_eq!(
            t.render(&msgs, false).expect("renders"),
            "{\"role\": \"user\", \"content\": \"é \\\"q\\\"\\n\"}|[\n  {\n    \"role\": \
             \"user\",\n    \"content\": \"é \\\"q\\\"\\n\"\n  }\n]"
        );
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(
            strftime("%A %B %-d, %I%p %j %%", t),
            "Thursday February 29, 01PM 060 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        assert_eq!(strftime("%Y-%m-%d", -86_400), "1969-12-31");
    }

    #[test]
    fn strftime_now_is_callable_from_templates() {
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}", "", "").expect("compiles");
        let year = t.render(&[], false).expect("renders");
        assert!(year.len() == 4 && year.starts_with('2'), "{year}");
    }
}
