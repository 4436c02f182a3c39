//! Tests of the chat template renderer against transformers' behaviour.
use super::*;
use std::path::{Path, PathBuf};

/// Locates a test fixture by its path under the repository's `tests/fixtures/`
/// (`tiny-llama/...`, `smollm2/...`, `smollm2-derived/...`). This is the single place to
/// repoint when the file moves; in the workspace it becomes
/// `Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)`.
fn fixture_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

fn read_json(rel: &str) -> serde_json::Value {
    let path = fixture_path(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn messages_from(json: &serde_json::Value) -> Vec<ChatMessage> {
    serde_json::from_value(json.clone()).expect("messages array")
}

fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
    pairs
        .iter()
        .map(|(r, c)| ChatMessage::new(*r, *c))
        .collect()
}

fn render(source: &str, messages: &[ChatMessage], agp: bool) -> String {
    ChatTemplate::new(source, Some("<s>"), Some("</s>"))
        .expect("template compiles")
        .render(messages, agp)
        .expect("template renders")
}

#[test]
fn tiny_llama_fixture_matches_transformers() {
    let config = read_json("tiny-llama/tokenizer_config.json");
    let source = config["chat_template"].as_str().expect("chat_template");
    let golden = read_json("tiny-llama/golden.json");
    let case = &golden["tokenizer"]["chat_case"];
    let template = ChatTemplate::new(source, Some("<|bos|>"), Some("<|eos|>")).unwrap();
    let rendered = template
        .render(
            &messages_from(&case["messages"]),
            case["add_generation_prompt"].as_bool().unwrap(),
        )
        .unwrap();
    assert_eq!(rendered, case["rendered"].as_str().unwrap());
}

#[test]
fn smollm2_template_matches_golden_prompts() {
    let path = fixture_path("smollm2-derived/smollm2_chat_template.jinja");
    let source = std::fs::read_to_string(&path).unwrap();
    // SmolLM2's GGUF: bos id 1 = "<|im_start|>", eos id 2 = "<|im_end|>".
    let template = ChatTemplate::new(&source, Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
    let golden = read_json("smollm2/golden.json");
    let chats: Vec<&serde_json::Value> = golden["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["kind"] == "chat")
        .collect();
    assert_eq!(chats.len(), 2);
    for prompt in chats {
        let rendered = template
            .render(&messages_from(&prompt["messages"]), true)
            .unwrap();
        assert_eq!(
            rendered,
            prompt["rendered"].as_str().unwrap(),
            "{}",
            prompt["name"]
        );
    }
}

/// Cases rendered by Python Jinja2 with transformers' environment
/// (`smollm2-derived/make_jinja2_cases.py`): whitespace control, Python methods and
/// printing, tojson, loop controls, namespace, raise_exception, `{% generation %}`.
#[test]
fn matches_python_jinja2_reference_cases() {
    let cases = read_json("smollm2-derived/jinja2_cases.json");
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut template = ChatTemplate::new(
            case["template"].as_str().unwrap(),
            case["bos_token"].as_str(),
            case["eos_token"].as_str(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (k, v) in case["variables"].as_object().unwrap() {
            template = template.with_variable(k, v);
        }
        let result = template.render(
            &messages_from(&case["messages"]),
            case["add_generation_prompt"].as_bool().unwrap(),
        );
        match (case.get("expected"), case.get("error")) {
            (Some(expected), _) => {
                let got = result.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(got, expected.as_str().unwrap(), "case {name}");
            }
            (None, Some(error)) => assert_eq!(
                result,
                Err(ChatTemplateError::Raised(
                    error.as_str().unwrap().to_owned()
                )),
                "case {name}"
            ),
            _ => panic!("{name}: case has neither expected nor error"),
        }
    }
}

#[test]
fn raise_exception_carries_the_message() {
    let source = "{% if messages[0]['role'] == 'system' %}\
                  {{ raise_exception('System role not supported') }}{% endif %}ok";
    let template = ChatTemplate::new(source, None, None).unwrap();
    let err = template
        .render(&msgs(&[("system", "x"), ("user", "y")]), true)
        .unwrap_err();
    assert_eq!(
        err,
        ChatTemplateError::Raised("System role not supported".into())
    );
    assert!(err.to_string().contains("System role not supported"));
    // The same template accepts a conversation without a system turn.
    assert_eq!(
        template.render(&msgs(&[("user", "y")]), true).unwrap(),
        "ok"
    );
}

#[test]
fn syntax_error_is_reported_at_construction_with_line() {
    let source = "{% for m in messages %}\n{{ m.content }}\n{% if %}\n{% endfor %}";
    match ChatTemplate::new(source, None, None) {
        Err(ChatTemplateError::Syntax { line, message }) => {
            assert_eq!(line, Some(3), "{message}");
            assert!(message.contains("syntax error"), "{message}");
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    match ChatTemplate::new("line one\n{{ unclosed", None, None) {
        Err(ChatTemplateError::Syntax { line, .. }) => assert_eq!(line, Some(2)),
        other => panic!("expected a syntax error, got {other:?}"),
    }
    let err = ChatTemplate::new("{% endfor %}", None, None).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("chat template syntax error at line 1"),
        "{err}"
    );
}

#[test]
fn runtime_errors_are_render_errors_with_line() {
    let template = ChatTemplate::new("first\n{{ messages | no_such_filter }}", None, None).unwrap();
    match template.render(&msgs(&[("user", "x")]), false) {
        Err(ChatTemplateError::Render { line, message }) => {
            assert_eq!(line, Some(2));
            assert!(message.contains("no_such_filter"), "{message}");
        }
        other => panic!("expected a render error, got {other:?}"),
    }
    // Attribute access on an undefined value fails in Jinja2 too.
    let template = ChatTemplate::new("{{ nothing.attr }}", None, None).unwrap();
    assert!(matches!(
        template.render(&[], false),
        Err(ChatTemplateError::Render { .. })
    ));
}

#[test]
fn real_world_constructs() {
    let conv = msgs(&[
        ("user", "  Hi there \n"),
        ("assistant", "Yo"),
        ("user", "Bye"),
    ]);

    // SmolLM2 / Qwen: default system prompt when the first turn is not a system turn.
    let source = "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}\
                  [sys]{% endif %}<{{ m['role'] }}>{% endfor %}";
    assert_eq!(render(source, &conv, false), "[sys]<user><assistant><user>");

    // Python string methods on message content.
    let source = "{{ messages[0]['content'].strip() }}|\
                  {{ messages[0]['content'].startswith('  Hi') }}|\
                  {% for k, v in messages[1].items() %}{{ k }}={{ v }};{% endfor %}";
    assert_eq!(
        render(source, &conv, false),
        "Hi there|True|role=assistant;content=Yo;"
    );

    // transformers' tojson: key order kept, no HTML escaping, Python separators.
    let source = "{{ messages[1] | tojson }} {{ {'a': '<b>&'} | tojson }}";
    assert_eq!(
        render(source, &conv, false),
        r#"{"role": "assistant", "content": "Yo"} {"a": "<b>&"}"#
    );

    // Loop controls.
    let source = "{% for m in messages %}{% if m.role == 'assistant' %}{% break %}\
                  {% endif %}{{ m.role }}{% endfor %}.";
    assert_eq!(render(source, &conv, false), "user.");

    // trim_blocks + lstrip_blocks: block tags on their own lines leave no whitespace.
    let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ m.role }}\n    {% endif %}\n{% endfor %}";
    assert_eq!(render(source, &conv, false), "user\nuser\n");

    // Special tokens and add_generation_prompt.
    let source = "{{ bos_token }}{{ messages|length }}{% if add_generation_prompt %}{{ eos_token }}{% endif %}";
    assert_eq!(render(source, &conv, true), "<s>3</s>");
    assert_eq!(render(source, &conv, false), "<s>3");
}

#[test]
fn missing_special_tokens_render_empty_and_extra_tokens_can_be_added() {
    let source = "[{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ tools }}|{{ documents }}]\
                  {{ additional_special_tokens | tojson }}";
    let template = ChatTemplate::new(source, None, Some("E"))
        .unwrap()
        .with_special_token("pad_token", "P")
        .with_variable(
            "additional_special_tokens",
            &serde_json::json!(["<a>", "<b>"]),
        );
    assert_eq!(
        template.render(&[], false).unwrap(),
        r#"[|E|P|None|None]["<a>", "<b>"]"#
    );
}

#[test]
fn strftime_now_formats_current_utc_time() {
    let template = ChatTemplate::new(
        "{{ strftime_now('%Y-%m-%d') }}|{{ strftime_now('%d %b %Y') }}",
        None,
        None,
    )
    .unwrap();
    let out = template.render(&[], false).unwrap();
    let (iso, human) = out.split_once('|').unwrap();
    assert_eq!(iso.len(), 10, "{out}");
    assert!(
        iso.chars().enumerate().all(|(i, c)| if i == 4 || i == 7 {
            c == '-'
        } else {
            c.is_ascii_digit()
        }),
        "{out}"
    );
    assert_eq!(human.len(), 11, "{out}");
    assert_eq!(&human[7..], &iso[..4], "{out}");
}

#[test]
fn generation_tag_rewrite_leaves_other_tags_alone() {
    assert_eq!(
        rewrite_generation_tags(
            "{%- generation -%}x{% endgeneration %}{% if generation %}{% set generation_x = 1 %}"
        ),
        "{%- if true -%}x{% endif %}{% if generation %}{% set generation_x = 1 %}"
    );
}

#[test]
fn python_float_repr_matches_python() {
    for (f, s) in [
        (1.0, "1.0"),
        (0.1, "0.1"),
        (-0.0, "-0.0"),
        (1e16, "1e+16"),
        (1234567890123456.0, "1234567890123456.0"),
        (1e-5, "1e-05"),
        (0.0001, "0.0001"),
        (1.5e300, "1.5e+300"),
        (2.5e-7, "2.5e-07"),
    ] {
        assert_eq!(python_float_repr(f), s);
    }
}

#[test]
fn chat_template_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChatTemplate>();
}
