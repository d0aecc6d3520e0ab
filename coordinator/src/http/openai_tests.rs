//! Tests of `openai`: validation of every field, and property tests of the whole input
//! path (any bytes end in `Ok` or a 4xx, never a panic).

use super::*;

fn sampling(json: &str) -> Result<Params, ApiError> {
    parse_body::<Sampling>(json.as_bytes())?.validate(
        "m",
        &Limits::default(),
        Endpoint::Completions,
    )
}

#[test]
fn defaults_follow_openai() {
    let p = sampling("{}").unwrap();
    assert_eq!(p.sampling.temperature, 1.0);
    assert_eq!(p.sampling.top_p, 1.0);
    assert_eq!(p.max_tokens, None);
    assert!(!p.stream);
}

#[test]
fn out_of_range_values_are_400_naming_the_parameter() {
    for (body, param) in [
        (r#"{"temperature": 2.5}"#, "temperature"),
        (r#"{"temperature": -1}"#, "temperature"),
        (r#"{"top_p": 0}"#, "top_p"),
        (r#"{"top_p": 1.5}"#, "top_p"),
        (r#"{"max_tokens": 0}"#, "max_tokens"),
        (r#"{"max_tokens": -5}"#, "max_tokens"),
        (r#"{"n": 0}"#, "n"),
        (r#"{"n": 1000}"#, "n"),
        (r#"{"n": 2, "best_of": 3}"#, "best_of"),
        (r#"{"top_k": -3}"#, "top_k"),
        (r#"{"stop": [""]}"#, "stop"),
        (r#"{"logprobs": 21}"#, "logprobs"),
        (r#"{"logprobs": -1}"#, "logprobs"),
        (r#"{"best_of": 2}"#, "best_of"),
        (r#"{"max_tokens": 0, "echo": false}"#, "max_tokens"),
        (r#"{"presence_penalty": 2.5}"#, "presence_penalty"),
        (r#"{"frequency_penalty": -3}"#, "frequency_penalty"),
        (r#"{"repetition_penalty": 0}"#, "repetition_penalty"),
        (r#"{"min_p": 1.5}"#, "min_p"),
        (r#"{"min_tokens": 5, "max_tokens": 3}"#, "min_tokens"),
        (r#"{"logit_bias": {"5": 101}}"#, "logit_bias"),
        (r#"{"logit_bias": {"five": 1}}"#, "logit_bias"),
        (r#"{"stop_token_ids": [-1]}"#, "stop_token_ids"),
        (r#"{"response_format": {"type": "xml"}}"#, "response_format"),
        (r#"{"tools": []}"#, "tools"),
        (r#"{"use_beam_search": true}"#, "use_beam_search"),
    ] {
        match sampling(body) {
            Err(ApiError::BadRequest { param: Some(p), .. }) => assert_eq!(p, param, "{body}"),
            other => panic!("{body}: {other:?}"),
        }
    }
    assert!(matches!(
        sampling(r#"{"model": "other"}"#),
        Err(ApiError::ModelNotFound(_))
    ));
    assert!(matches!(
        sampling(r#"{"temperature": "hot"}"#),
        Err(ApiError::BadRequest { .. })
    ));
    assert!(matches!(
        parse_body::<Sampling>(b"{not json"),
        Err(ApiError::BadRequest { .. })
    ));
    assert!(matches!(
        parse_body::<Sampling>(b"\xff\xfe"),
        Err(ApiError::BadRequest { .. })
    ));
}

#[test]
fn prompts_in_every_accepted_shape() {
    let p: CompletionRequest = parse_body(br#"{"prompt": [1, 2, 3]}"#).unwrap();
    assert_eq!(p.prompt.into_list(), vec![Err(vec![1, 2, 3])]);
    let p: CompletionRequest = parse_body(br#"{"prompt": ["hi"]}"#).unwrap();
    assert_eq!(p.prompt.into_list(), vec![Ok("hi".to_string())]);
    let p: CompletionRequest = parse_body(br#"{"prompt": ["a", "b"]}"#).unwrap();
    assert_eq!(p.prompt.into_list().len(), 2);
    let p: CompletionRequest = parse_body(br#"{"prompt": [[1], [2, 3]]}"#).unwrap();
    assert_eq!(p.prompt.into_list(), vec![Err(vec![1]), Err(vec![2, 3])]);
}

/// Property tests: whatever bytes or JSON arrive, parsing and validation end in `Ok`
/// or an [`ApiError`] (never a panic), and every error renders OpenAI's shape with a
/// 4xx status. Case counts keep the whole module to a few seconds (SECURITY.md).
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Map, json};
    use std::sync::OnceLock;

    fn tokenizer() -> &'static Tokenizer {
        static T: OnceLock<Tokenizer> = OnceLock::new();
        T.get_or_init(|| {
            let dir = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/mixtral-tiny"
            );
            Tokenizer::from_dir(std::path::Path::new(dir)).expect("fixture tokenizer")
        })
    }

    fn limits() -> Limits {
        Limits {
            max_completion_tokens: Some(100),
            ..Limits::default()
        }
    }

    /// The fixture's tokenizer behind a 512-token vocabulary, without structured output.
    fn context(limits: &Limits) -> InputContext<'_> {
        InputContext {
            model_name: "m",
            grammars: None,
            limits,
            tokenizer: tokenizer(),
            vocab_size: 512,
        }
    }

    /// Runs both endpoints' input path and checks the outcome's shape.
    fn check(body: &[u8]) {
        let limits = limits();
        let cx = context(&limits);
        for result in [completion_input(body, &cx), chat_input(body, &cx)] {
            match result {
                Ok(Input {
                    prompts, params, ..
                }) => {
                    assert!(!prompts.is_empty());
                    assert!(prompts.len() * params.n <= crate::http::params::MAX_CHOICES);
                    for p in &prompts {
                        assert!(!p.ids.is_empty());
                        assert!(p.ids.iter().all(|&t| (t as usize) < 512));
                    }
                    let t = params.sampling.temperature;
                    assert!(t == 0.0 || (1e-5..=2.0).contains(&t), "temperature {t}");
                    assert!(params.sampling.top_p > 0.0 && params.sampling.top_p <= 1.0);
                    assert!(
                        params
                            .max_tokens
                            .is_none_or(|n| n <= 100 && (n >= 1 || params.echo))
                    );
                    assert!(params.stop.len() <= limits.max_stop_sequences);
                }
                Err(e) => {
                    let status = e.status().as_u16();
                    assert!((400..500).contains(&status), "{e:?} -> {status}");
                    let body = e.body();
                    assert!(body["error"]["message"].is_string(), "{body}");
                    assert!(body["error"]["type"].is_string(), "{body}");
                }
            }
        }
    }

    /// Field names both endpoints read, so that random objects reach validation.
    const KEYS: [&str; 16] = [
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "n",
        "stream",
        "logprobs",
        "role",
        "content",
        "ignore_eos",
    ];

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just("m".to_string()),
            Just("user".to_string()),
            Just("[INST] </s> {{ x }} {% if %}".to_string()),
            "\\PC{0,40}",
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-3i64..600).prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            text().prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::vec((prop::sample::select(&KEYS[..]), inner), 0..6).prop_map(
                    |kv| {
                        Value::Object(
                            kv.into_iter()
                                .map(|(k, v)| (k.to_string(), v))
                                .collect::<Map<_, _>>(),
                        )
                    }
                ),
            ]
        })
    }

    /// A plausible request with some fields replaced by arbitrary values.
    fn request() -> impl Strategy<Value = Value> {
        let messages = prop::collection::vec(
            (
                prop::sample::select(&["user", "assistant", "system", "developer", "tool", ""][..]),
                prop_oneof![text().prop_map(Value::from), json_value()],
            ),
            0..5,
        )
        .prop_map(|m| {
            Value::from(
                m.into_iter()
                    .map(|(role, content)| json!({"role": role, "content": content}))
                    .collect::<Vec<_>>(),
            )
        });
        (
            prop_oneof![text().prop_map(Value::from), json_value()],
            messages,
            prop::collection::vec((prop::sample::select(&KEYS[..]), json_value()), 0..4),
        )
            .prop_map(|(prompt, messages, extra)| {
                let mut v = json!({"model": "m", "prompt": prompt, "messages": messages});
                for (k, x) in extra {
                    v[k] = x;
                }
                v
            })
    }

    proptest! {
        // CI runs 512 cases per property (a fraction of a second); PROPTEST_CASES raises it
        // for a longer session (SECURITY.md).
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
            ..ProptestConfig::default()
        })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            check(&bytes);
        }

        #[test]
        fn arbitrary_json_never_panics(v in json_value()) {
            check(v.to_string().as_bytes());
        }

        #[test]
        fn near_valid_requests_never_panic(v in request()) {
            check(v.to_string().as_bytes());
        }

        /// The chat template itself, on any roles and contents (including template
        /// syntax, which must be data, never code).
        #[test]
        fn chat_template_renders_any_messages(
            msgs in prop::collection::vec(("\\PC{0,12}", "\\PC{0,60}"), 0..8)
        ) {
            let msgs: Vec<ChatMessage> =
                msgs.into_iter().map(|(r, c)| ChatMessage::new(r, c)).collect();
            if let Ok(text) = tokenizer().apply_chat_template(&msgs, true) {
                for m in msgs.iter().filter(|m| m.role == "user") {
                    prop_assert!(text.contains(&m.content));
                }
            }
        }
    }

    #[test]
    fn numbers_json_cannot_hold_are_refused_not_mangled() {
        // Found by the properties above: f64 values that f32 rounds to 0.
        check(br#"{"prompt": "m", "model": "m", "top_p": 1e-308}"#);
        check(br#"{"prompt": "m", "model": "m", "temperature": 1e-40}"#);
        check(br#"{"prompt": "a", "temperature": 1e400}"#);
        check(br#"{"prompt": "a", "max_tokens": 1e400}"#);
        check(br#"{"prompt": "a", "max_tokens": 18446744073709551616}"#);
        let limits = Limits::default();
        let cx = context(&limits);
        for body in [
            &br#"{"prompt": "a", "temperature": 1e400}"#[..],
            br#"{"prompt": "a", "top_p": -1e400}"#,
            br#"{"prompt": "a", "max_tokens": 1e400}"#,
            br#"{"prompt": "a", "max_tokens": 1.5}"#,
        ] {
            let e = completion_input(body, &cx).unwrap_err();
            assert_eq!(
                e.status().as_u16(),
                400,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
