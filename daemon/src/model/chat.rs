//! Chat template rendering compatible with Hugging Face transformers.
//!
//! Models ship a Jinja `chat_template` (in `tokenizer_config.json` or the GGUF key
//! `tokenizer.chat_template`) that turns a list of messages into the exact prompt string
//! the model was trained on. A single stray newline or a missing special token changes the
//! token ids and degrades the model, so this module reproduces what
//! `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does
//! in transformers, on top of minijinja instead of Python's Jinja2:
//!
//! * the environment options of transformers' `_compile_jinja_template`: `trim_blocks`,
//!   `lstrip_blocks`, loop controls (`{% break %}` / `{% continue %}`), no autoescape, and
//!   Jinja2's default of dropping one trailing newline of the template source;
//! * the globals `raise_exception(message)` (fails the render with that message) and
//!   `strftime_now(format)`;
//! * transformers' own `tojson` filter, which is Python's `json.dumps(x, ensure_ascii=False,
//!   indent=None, separators=None, sort_keys=False)` (no HTML escaping, `", "` / `": "`
//!   separators, key order kept);
//! * the variables `messages`, `add_generation_prompt`, `tools` and `documents` (both
//!   `None`, as transformers passes them explicitly) and the special tokens (`bos_token`,
//!   `eos_token`, plus any added with [`ChatTemplate::with_special_token`]);
//! * Python string / dict / list methods (`.strip()`, `.startswith()`, `.items()`, ...)
//!   through `minijinja_contrib::pycompat`, because real templates are written against
//!   Python objects;
//! * printing of non-string values the way Python's `str()` does (`True`, `None`,
//!   `['a', 'b']`), which is what Jinja2 outputs for `{{ value }}`.
//!
//! Known remaining differences from Jinja2 (none is used by mainstream templates): the `~`
//! operator and the `string` filter stringify with minijinja's rules (`true`, not `True`);
//! an unknown filter is reported at render time rather than at compile time; Python's
//! `%` string formatting is not supported; `strftime_now` formats the current time in UTC,
//! where Python uses the host's local time zone.

use std::fmt::Write as _;
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Rest, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State};
use serde::{Deserialize, Serialize};

/// One chat turn as the OpenAI-style API and HF chat templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ... — passed through to the template unchanged.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// Convenience constructor, mostly for tests and internal callers.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a chat template could not be compiled or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template source is not valid Jinja. Reported by [`ChatTemplate::new`] so a broken
    /// model is rejected at load time, not on the first request.
    #[error("chat template syntax error{}: {message}", at_line(*.line))]
    Syntax {
        /// 1-based line in the template source, when known.
        line: Option<usize>,
        message: String,
    },
    /// The template itself called `raise_exception(message)`, typically to reject a
    /// conversation shape the model does not support (e.g. roles not alternating). The
    /// message is the template author's and is meant to be shown to the API client.
    #[error("chat template rejected the conversation: {0}")]
    Raised(String),
    /// Any other failure while rendering (undefined attribute access, type errors, ...).
    #[error("chat template render error{}: {message}", at_line(*.line))]
    Render {
        /// 1-based line in the template source, when known.
        line: Option<usize>,
        message: String,
    },
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

/// Name under which the template is registered; it has no extension so minijinja never
/// picks an HTML auto-escape mode from it.
const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template plus the special-token variables it is rendered with.
///
/// Compile once per model and share it: rendering takes `&self` and the type is
/// `Send + Sync`.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Extra template variables (special tokens, flags) in insertion order.
    variables: Vec<(String, Value)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("variables", &self.variables)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` with transformers' Jinja settings.
    ///
    /// `bos_token` / `eos_token` become the template variables of the same name (the
    /// strings, not ids: templates concatenate them into the prompt). Pass `None` when the
    /// tokenizer has no such token; the variable is then undefined, as in transformers, and
    /// renders as an empty string.
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        // Same whitespace handling as transformers' ImmutableSandboxedEnvironment(
        // trim_blocks=True, lstrip_blocks=True); keep_trailing_newline stays at Jinja2's
        // default (false), which minijinja shares.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| ChatTemplateError::Syntax {
                line: None,
                message: describe(&e),
            })?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        // Debug mode only adds source snippets to errors; we report line + message.
        env.set_debug(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_str_formatter);
        env.add_filter("tojson", tojson_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);

        let source = rewrite_generation_tags(source);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| ChatTemplateError::Syntax {
                line: e.line(),
                message: describe(&e),
            })?;

        let mut template = Self {
            env,
            variables: Vec::new(),
        };
        if let Some(bos) = bos_token {
            template = template.with_special_token("bos_token", bos);
        }
        if let Some(eos) = eos_token {
            template = template.with_special_token("eos_token", eos);
        }
        Ok(template)
    }

    /// Adds (or replaces) a string variable such as `unk_token` or `pad_token`.
    ///
    /// transformers passes every entry of the tokenizer's `special_tokens_map` to the
    /// template; this is how callers provide the ones beyond BOS/EOS.
    pub fn with_special_token(self, name: &str, value: &str) -> Self {
        self.with_value(name, Value::from(value))
    }

    /// Adds (or replaces) an arbitrary template variable, e.g. `additional_special_tokens`
    /// (a list) or template switches like `enable_thinking` that transformers forwards from
    /// `apply_chat_template(**kwargs)`.
    pub fn with_variable(self, name: &str, value: &serde_json::Value) -> Self {
        self.with_value(name, json_to_value(value))
    }

    fn with_value(mut self, name: &str, value: Value) -> Self {
        match self.variables.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value,
            None => self.variables.push((name.to_owned(), value)),
        }
        self
    }

    /// Renders the prompt for `messages`.
    ///
    /// With `add_generation_prompt` the template appends the header that opens the
    /// assistant's turn (e.g. `<|im_start|>assistant\n`), which is what a server wants
    /// before generating.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let messages: Value = messages
            .iter()
            .map(|m| {
                PyDict::value(vec![
                    ("role".to_owned(), Value::from(m.role.as_str())),
                    ("content".to_owned(), Value::from(m.content.as_str())),
                ])
            })
            .collect();

        // transformers: template_kwargs = {**special_tokens_map, **kwargs}, then
        // render(messages=..., tools=None, documents=None, add_generation_prompt=..., **kw).
        let mut ctx: Vec<(String, Value)> = self.variables.clone();
        for (k, v) in [
            ("messages", messages),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ] {
            match ctx.iter_mut().find(|(name, _)| name == k) {
                Some(slot) => slot.1 = v,
                None => ctx.push((k.to_owned(), v)),
            }
        }

        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| render_error(&e))?;
        template
            .render(PyDict::value(ctx))
            .map_err(|e| render_error(&e))
    }
}

/// Message text of a minijinja error without the "(in template:line)" suffix, which we
/// report as a separate field.
fn describe(err: &Error) -> String {
    match err.detail() {
        Some(detail) => format!("{}: {}", err.kind(), detail),
        None => err.kind().to_string(),
    }
}

fn render_error(err: &Error) -> ChatTemplateError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<RaisedByTemplate>() {
            return ChatTemplateError::Raised(raised.0.clone());
        }
        source = e.source();
    }
    ChatTemplateError::Render {
        line: err.line(),
        message: describe(err),
    }
}

/// Marker attached as the source of the error `raise_exception` returns, so `render` can
/// tell a deliberate rejection by the template from a template bug.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

/// `raise_exception(message)`: transformers raises `jinja2.exceptions.TemplateError(message)`.
fn raise_exception(message: Value) -> Result<Value, Error> {
    let text = match message.as_str() {
        Some(s) => s.to_owned(),
        None => python_str(&message),
    };
    Err(Error::new(ErrorKind::InvalidOperation, text.clone()).with_source(RaisedByTemplate(text)))
}

/// `strftime_now(format)`: transformers returns `datetime.now().strftime(format)`. Used by
/// e.g. Llama 3.x templates for "Today Date". jiff's strftime (via minijinja-contrib)
/// accepts the same `%d %b %Y`-style directives; the time zone is UTC.
fn strftime_now(state: &State, format: String) -> Result<String, Error> {
    let kwargs = Kwargs::from_iter([("format", Value::from(format))]);
    minijinja_contrib::filters::datetimeformat(state, minijinja_contrib::globals::now(), kwargs)
}

/// Rewrites HF's `{% generation %}` / `{% endgeneration %}` tags (an extension transformers
/// registers to find assistant tokens for training masks) into `{% if true %}` /
/// `{% endif %}`, which renders the body unchanged and keeps whitespace-control markers and
/// line numbers. Without this, templates such as SmolLM3's fail to compile in minijinja.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos + 2]);
        rest = &rest[pos + 2..];
        // Optional whitespace-control marker, then spaces, then the tag word.
        let marker_len = usize::from(rest.starts_with('-') || rest.starts_with('+'));
        let after_marker = &rest[marker_len..];
        let word_start = marker_len + (after_marker.len() - after_marker.trim_start().len());
        let word: String = rest[word_start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let replacement = match word.as_str() {
            "generation" => "if true",
            "endgeneration" => "endif",
            _ => continue,
        };
        // Only rewrite when the tag has no arguments: the next non-space text must close it.
        let tail = rest[word_start + word.len()..].trim_start();
        if !(tail.starts_with("%}") || tail.starts_with("-%}") || tail.starts_with("+%}")) {
            continue;
        }
        out.push_str(&rest[..word_start]);
        out.push_str(replacement);
        rest = &rest[word_start + word.len()..];
    }
    out.push_str(rest);
    out
}

/// A map that keeps insertion order, like a Python dict. minijinja's own maps are sorted
/// unless its `preserve_order` feature is enabled, and `{{ message | tojson }}` or
/// `message.items()` must list keys in the order transformers would (role, then content).
#[derive(Debug)]
struct PyDict(Vec<(String, Value)>);

impl PyDict {
    fn value(entries: Vec<(String, Value)>) -> Value {
        Value::from_object(PyDict(entries))
    }
}

impl Object for PyDict {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(
            self.0
                .iter()
                .map(|(k, _)| Value::from(k.as_str()))
                .collect(),
        )
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}

pub(crate) fn json_to_value(value: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match value {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        J::String(s) => Value::from(s.as_str()),
        J::Array(items) => items.iter().map(json_to_value).collect(),
        J::Object(map) => PyDict::value(
            map.iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Python-compatible stringification (what Jinja2 prints for `{{ value }}`).
// ---------------------------------------------------------------------------------------

fn python_str_formatter(out: &mut Output, state: &mut State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        // Strings are by far the common case; undefined prints as "" in both engines.
        ValueKind::String | ValueKind::Undefined => minijinja::escape_formatter(out, state, value),
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            out.write_str(&python_str(value))
                .map_err(|_| Error::new(ErrorKind::WriteFailure, "formatting failed"))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Python's `str(value)`.
fn python_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_owned(),
        ValueKind::Undefined => String::new(),
        _ => python_repr(value),
    }
}

/// Python's `repr(value)` for the value kinds a template can produce.
fn python_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".to_owned(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.to_owned(),
        ValueKind::Number => {
            if value.is_integer() {
                value.to_string()
            } else {
                match f64::try_from(value.clone()) {
                    Ok(f) => python_float_repr(f),
                    Err(_) => value.to_string(),
                }
            }
        }
        ValueKind::String => python_str_repr(value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<String> = match value.try_iter() {
                Ok(iter) => iter.map(|v| python_repr(&v)).collect(),
                Err(_) => Vec::new(),
            };
            format!("[{}]", items.join(", "))
        }
        ValueKind::Map => {
            let mut parts = Vec::new();
            if let Ok(keys) = value.try_iter() {
                for key in keys {
                    let item = value.get_item(&key).unwrap_or_default();
                    parts.push(format!("{}: {}", python_repr(&key), python_repr(&item)));
                }
            }
            format!("{{{}}}", parts.join(", "))
        }
        _ => value.to_string(),
    }
}

/// Python's `repr(float)`: shortest round-trip digits, positional for exponents in
/// [-4, 16), otherwise `1e+16` / `1.5e-05` style; always shows a decimal point or exponent.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') { s } else { format!("{s}.0") }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// Python's `repr(str)`: single quotes unless the text contains `'` but no `"`.
fn python_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

// ---------------------------------------------------------------------------------------
// tojson: transformers' override of Jinja's filter, i.e. Python json.dumps.
// ---------------------------------------------------------------------------------------

/// `x | tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False)` with
/// Python's positional order, exactly like transformers' replacement filter. Jinja's (and
/// minijinja's) built-in `tojson` HTML-escapes `<`, `>`, `&`, `'` and uses other spacing,
/// which would corrupt tool schemas in prompts.
fn tojson_filter(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    if args.len() > 4 {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments (ensure_ascii, indent, separators, sort_keys)",
        ));
    }
    let positional = |i: usize| args.get(i).cloned();
    let ensure_ascii = pick(positional(0), &kwargs, "ensure_ascii")?;
    let indent = pick(positional(1), &kwargs, "indent")?;
    let separators = pick(positional(2), &kwargs, "separators")?;
    let sort_keys = pick(positional(3), &kwargs, "sort_keys")?;
    kwargs.assert_all_used()?;

    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.kind() {
            ValueKind::String => v.as_str().unwrap_or_default().to_owned(),
            // Python: bool is an int, negative counts give "".
            ValueKind::Bool => if v.is_true() { " " } else { "" }.to_owned(),
            _ => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an int or str",
                    )
                })?;
                " ".repeat(usize::try_from(n).unwrap_or(0))
            }
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    )
                })?;
            (parts[0].clone(), parts[1].clone())
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let opts = JsonOpts {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from(out))
}

fn pick(positional: Option<Value>, kwargs: &Kwargs, name: &str) -> Result<Option<Value>, Error> {
    let keyword: Option<Value> = kwargs.get(name)?;
    match (positional, keyword) {
        (Some(_), Some(_)) => Err(Error::new(
            ErrorKind::TooManyArguments,
            format!("tojson: got multiple values for argument '{name}'"),
        )),
        (p, k) => Ok(p.or(k)),
    }
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn not_serializable(value: &Value) -> Error {
    let kind = match value.kind() {
        ValueKind::Undefined => "Undefined".to_owned(),
        other => other.to_string(),
    };
    Error::new(
        ErrorKind::InvalidOperation,
        format!("Object of type {kind} is not JSON serializable"),
    )
}

fn write_json(out: &mut String, value: &Value, opts: &JsonOpts, depth: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                let f = f64::try_from(value.clone()).map_err(|_| not_serializable(value))?;
                out.push_str(&json_float(f));
            }
        }
        ValueKind::String => write_json_str(out, value.as_str().unwrap_or_default(), opts),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', &items, opts, depth, |out, item, depth| {
                write_json(out, item, opts, depth)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(
                out,
                '{',
                '}',
                &entries,
                opts,
                depth,
                |out, (k, v), depth| {
                    write_json_str(out, k, opts);
                    out.push_str(&opts.key_sep);
                    write_json(out, v, opts, depth)
                },
            )?;
        }
        _ => return Err(not_serializable(value)),
    }
    Ok(())
}

/// Shared list/dict layout of Python's encoder: empty containers stay `[]` / `{}`, with an
/// indent every item goes on its own line.
fn write_container<T>(
    out: &mut String,
    open: char,
    close: char,
    items: &[T],
    opts: &JsonOpts,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&opts.item_sep);
        }
        if let Some(indent) = &opts.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        write_item(out, item, depth + 1)?;
    }
    if let Some(indent) = &opts.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// Python's encoder turns non-string dict keys into strings (`True` → `"true"`, ...).
fn json_key(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_owned()),
        ValueKind::None => Ok("null".to_owned()),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_owned()),
        ValueKind::Number if key.is_integer() => Ok(key.to_string()),
        ValueKind::Number => Ok(json_float(
            f64::try_from(key.clone()).map_err(|_| not_serializable(key))?,
        )),
        _ => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "keys must be str, int, float, bool or None, not {}",
                key.kind()
            ),
        )),
    }
}

/// Python's json float encoding: `repr(float)`, with `NaN` / `Infinity` for non-finite.
fn json_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".to_owned()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned()
    } else {
        python_float_repr(f)
    }
}

fn write_json_str(out: &mut String, s: &str, opts: &JsonOpts) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if opts.ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
#[path = "chat_tests.rs"]
mod tests;
