//! The request parameters beyond temperature and top-p: logprobs and echo, penalties and
//! the other vLLM sampling extensions, and the refusal by name of every parameter that is
//! known but not honoured. OpenAI refuses arguments it does not know, so this server does
//! too: a client must never believe a parameter applied when it did not.

use serde_json::{Map, Value};

use super::error::ApiError;
use super::openai::{Endpoint, Sampling};
use crate::structured::OutputFormat;
use crate::structured::tools::ToolCalling;

/// The most alternatives per token (`logprobs`, `top_logprobs`), as OpenAI and vLLM.
pub const MAX_LOGPROBS: usize = 20;
/// The most `logit_bias` entries: each is applied at every step.
pub const MAX_LOGIT_BIAS: usize = 1024;
/// The most choices (prompts x `n`) in one request: each is a sequence of its own.
pub const MAX_CHOICES: usize = 128;

/// Parameters this server knows and does not honour, with why.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("suffix", "suffix (insertion) is not supported"),
    ("use_beam_search", "beam search is not supported"),
    (
        "length_penalty",
        "length_penalty applies to beam search, which is not supported",
    ),
    ("functions", "functions is deprecated: use tools"),
    (
        "function_call",
        "function_call is deprecated: use tool_choice",
    ),
    (
        "guided_json",
        "guided_json is not supported: use response_format json_schema",
    ),
    (
        "guided_regex",
        "regular-expression constraints are not supported",
    ),
    (
        "guided_choice",
        "guided_choice is not supported: use a json_schema enum",
    ),
    ("guided_grammar", "grammar constraints are not supported"),
    (
        "structured_outputs",
        "structured_outputs is not supported: use response_format",
    ),
    (
        "prompt_logprobs",
        "prompt_logprobs is not supported: use echo with logprobs (completions)",
    ),
    (
        "include_stop_str_in_output",
        "include_stop_str_in_output is not supported",
    ),
    (
        "truncate_prompt_tokens",
        "truncate_prompt_tokens is not supported",
    ),
    ("bad_words", "bad_words is not supported"),
    ("allowed_token_ids", "allowed_token_ids is not supported"),
    ("logits_processors", "logits_processors are not supported"),
    (
        "return_tokens_as_token_ids",
        "return_tokens_as_token_ids is not supported",
    ),
    ("prompt_embeds", "prompt_embeds are not supported"),
    ("audio", "audio output is not supported"),
    ("prediction", "predicted outputs are not supported"),
    ("web_search_options", "web search is not supported"),
];

/// Parameters that change nothing this server computes, accepted as OpenAI accepts them.
const HARMLESS: &[&str] = &[
    "user",
    "store",
    "metadata",
    "service_tier",
    "parallel_tool_calls",
    "request_id",
    "spaces_between_special_tokens",
];

/// Parameters accepted at their default value only, which is what this server does.
fn default_of(name: &str, endpoint: Endpoint) -> Option<Value> {
    match name {
        "skip_special_tokens" | "add_special_tokens" => Some(Value::Bool(true)),
        "add_generation_prompt" if endpoint == Endpoint::Chat => Some(Value::Bool(true)),
        "modalities" => Some(serde_json::json!(["text"])),
        "priority" => Some(serde_json::json!(0)),
        _ => None,
    }
}

/// Refuses every parameter in `other` (the body's fields no struct field took) that is
/// unsupported or unknown, naming it. A `null` is as good as absent.
pub fn refuse_unsupported(other: &Map<String, Value>, endpoint: Endpoint) -> Result<(), ApiError> {
    for (name, value) in other {
        if value.is_null() || HARMLESS.contains(&name.as_str()) {
            continue;
        }
        if let Some(default) = default_of(name, endpoint) {
            if *value == default {
                continue;
            }
            return Err(ApiError::BadRequest {
                message: format!("{name} is supported only at its default, {default}"),
                param: None,
            });
        }
        if let Some((param, why)) = UNSUPPORTED.iter().find(|(n, _)| n == name) {
            return Err(ApiError::bad(*why, param));
        }
        return Err(ApiError::BadRequest {
            message: format!("Unrecognized request argument supplied: {name}"),
            param: None,
        });
    }
    Ok(())
}

/// What a request asked for in logprobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogprobsRequest {
    /// Alternatives per generated token (`None`: no logprobs).
    pub logprobs: Option<usize>,
    /// Alternatives per prompt token (`None`: none).
    pub prompt_logprobs: Option<usize>,
    pub echo: bool,
}

fn alternatives(n: i64, param: &'static str) -> Result<usize, ApiError> {
    usize::try_from(n)
        .ok()
        .filter(|n| *n <= MAX_LOGPROBS)
        .ok_or_else(|| {
            ApiError::bad(
                format!("{param} must be between 0 and {MAX_LOGPROBS}, got {n}"),
                param,
            )
        })
}

/// `logprobs`, `top_logprobs` and `echo`, which mean different things per endpoint:
/// completions take `logprobs: N` and `echo` (then the prompt's logprobs too); chat takes
/// `logprobs: true` and `top_logprobs: N`.
pub fn logprobs(s: &Sampling, endpoint: Endpoint) -> Result<LogprobsRequest, ApiError> {
    let echo = s.echo.unwrap_or(false);
    match endpoint {
        Endpoint::Completions => {
            if s.top_logprobs.is_some() {
                return Err(ApiError::bad(
                    "top_logprobs is a chat parameter: completions take logprobs: N",
                    "top_logprobs",
                ));
            }
            let logprobs = match &s.logprobs {
                None | Some(Value::Null) | Some(Value::Bool(false)) => None,
                Some(v) => match v.as_i64() {
                    Some(n) => Some(alternatives(n, "logprobs")?),
                    None => {
                        return Err(ApiError::bad(
                            format!(
                                "logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {v}"
                            ),
                            "logprobs",
                        ));
                    }
                },
            };
            Ok(LogprobsRequest {
                logprobs,
                prompt_logprobs: logprobs.filter(|_| echo),
                echo,
            })
        }
        Endpoint::Chat => {
            if echo {
                return Err(ApiError::bad(
                    "echo is supported on /v1/completions only",
                    "echo",
                ));
            }
            let on = match &s.logprobs {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(ApiError::bad(
                        format!(
                            "logprobs must be true or false on chat completions, got {v} (top_logprobs sets how many)"
                        ),
                        "logprobs",
                    ));
                }
            };
            let top = s
                .top_logprobs
                .map(|n| alternatives(n, "top_logprobs"))
                .transpose()?;
            if top.is_some() && !on {
                return Err(ApiError::bad(
                    "top_logprobs needs logprobs: true",
                    "top_logprobs",
                ));
            }
            Ok(LogprobsRequest {
                logprobs: on.then_some(top.unwrap_or(0)),
                prompt_logprobs: None,
                echo: false,
            })
        }
    }
}

/// `response_format`, `tools` and `tool_choice`: what the output is constrained to.
pub fn structured(
    s: &Sampling,
    endpoint: Endpoint,
) -> Result<(Option<OutputFormat>, Option<ToolCalling>), ApiError> {
    let format = match &s.response_format {
        None | Some(Value::Null) => None,
        Some(f) => match f["type"].as_str() {
            Some("text") => None,
            Some("json_object") => Some(OutputFormat::JsonObject),
            Some("json_schema") => match &f["json_schema"]["schema"] {
                schema @ Value::Object(_) => Some(OutputFormat::JsonSchema(schema.clone())),
                _ => {
                    return Err(ApiError::bad(
                        "response_format json_schema needs json_schema.schema, a JSON schema object",
                        "response_format",
                    ));
                }
            },
            _ => {
                return Err(ApiError::bad(
                    format!(
                        "response_format type must be \"text\", \"json_object\" or \"json_schema\", got {}",
                        f["type"]
                    ),
                    "response_format",
                ));
            }
        },
    };
    let tools = if endpoint == Endpoint::Chat {
        ToolCalling::parse(s.tools.as_ref(), s.tool_choice.as_ref())
            .map_err(|e| ApiError::bad(e, "tools"))?
    } else if s.tools.as_ref().is_some_and(|t| !t.is_null())
        || s.tool_choice.as_ref().is_some_and(|t| !t.is_null())
    {
        return Err(ApiError::bad(
            "tools are a chat completions parameter",
            "tools",
        ));
    } else {
        None
    };
    if format.is_some() && tools.as_ref().is_some_and(|t| t.format().is_some()) {
        return Err(ApiError::bad(
            "response_format cannot be combined with a required or named tool_choice",
            "response_format",
        ));
    }
    let constrained = format.is_some() || tools.as_ref().is_some_and(|t| t.format().is_some());
    if constrained && s.min_tokens.is_some_and(|n| n > 0) {
        return Err(ApiError::bad(
            "min_tokens cannot be combined with structured output (the grammar decides the end)",
            "min_tokens",
        ));
    }
    Ok((format, tools))
}

/// The vLLM sampling extensions, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Extra {
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub min_p: f32,
    pub min_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub logit_bias: Vec<(u32, f32)>,
}

fn in_range(
    v: Option<f64>,
    default: f64,
    ok: impl Fn(f64) -> bool,
    rule: &str,
    param: &'static str,
) -> Result<f32, ApiError> {
    let x = v.unwrap_or(default);
    if x.is_finite() && ok(x) {
        Ok(x as f32)
    } else {
        Err(ApiError::bad(
            format!("{param} must be {rule}, got {x}"),
            param,
        ))
    }
}

/// Penalties, `min_p`, `min_tokens`, `stop_token_ids` and `logit_bias` (token ids are
/// checked against the vocabulary later, by `Params::check_token_ids`).
pub fn penalties_and_more(s: &Sampling, max_tokens: Option<usize>) -> Result<Extra, ApiError> {
    let between_2 = |x: f64| (-2.0..=2.0).contains(&x);
    let presence_penalty = in_range(
        s.presence_penalty,
        0.0,
        between_2,
        "between -2 and 2",
        "presence_penalty",
    )?;
    let frequency_penalty = in_range(
        s.frequency_penalty,
        0.0,
        between_2,
        "between -2 and 2",
        "frequency_penalty",
    )?;
    let repetition_penalty = in_range(
        s.repetition_penalty,
        1.0,
        |x| x > 0.0 && x as f32 > 0.0,
        "greater than 0 (1: off)",
        "repetition_penalty",
    )?;
    let min_p = in_range(
        s.min_p,
        0.0,
        |x| (0.0..=1.0).contains(&x),
        "between 0 and 1",
        "min_p",
    )?;
    let min_tokens = match s.min_tokens {
        None => 0,
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| max_tokens.is_none_or(|max| *n <= max))
            .ok_or_else(|| {
                ApiError::bad(
                    format!("min_tokens must be between 0 and max_tokens, got {n}"),
                    "min_tokens",
                )
            })?,
    };
    let stop_token_ids = s
        .stop_token_ids
        .iter()
        .flatten()
        .map(|&t| {
            u32::try_from(t).map_err(|_| {
                ApiError::bad(
                    format!("stop_token_ids must be token ids, got {t}"),
                    "stop_token_ids",
                )
            })
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let bias = s.logit_bias.as_ref();
    if bias.is_some_and(|b| b.len() > MAX_LOGIT_BIAS) {
        return Err(ApiError::bad(
            format!("logit_bias takes at most {MAX_LOGIT_BIAS} tokens"),
            "logit_bias",
        ));
    }
    let logit_bias = bias
        .into_iter()
        .flatten()
        .map(|(token, &b)| {
            let id = token.trim().parse::<u32>().map_err(|_| {
                ApiError::bad(
                    format!("logit_bias keys must be token ids, got `{token}`"),
                    "logit_bias",
                )
            })?;
            if !(-100.0..=100.0).contains(&b) {
                return Err(ApiError::bad(
                    format!("logit_bias values must be between -100 and 100, got {b}"),
                    "logit_bias",
                ));
            }
            Ok((id, b as f32))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Extra {
        presence_penalty,
        frequency_penalty,
        repetition_penalty,
        min_p,
        min_tokens,
        stop_token_ids,
        logit_bias,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::openai::parse_body;

    fn check(json: &str, endpoint: Endpoint) -> Result<(LogprobsRequest, Extra), ApiError> {
        let s: Sampling = parse_body(json.as_bytes())?;
        refuse_unsupported(&s.other, endpoint)?;
        Ok((logprobs(&s, endpoint)?, penalties_and_more(&s, Some(16))?))
    }

    fn param_of(r: Result<(LogprobsRequest, Extra), ApiError>) -> Option<&'static str> {
        match r {
            Err(ApiError::BadRequest { param, .. }) => param,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn every_unsupported_parameter_is_refused_by_its_name() {
        for (name, _) in UNSUPPORTED {
            let body = format!(r#"{{"{name}": 1}}"#);
            assert_eq!(
                param_of(check(&body, Endpoint::Chat)),
                Some(*name),
                "{name}"
            );
        }
        // Unknown: OpenAI's message, no param.
        match check(r#"{"temprature": 0.5}"#, Endpoint::Completions) {
            Err(ApiError::BadRequest {
                message,
                param: None,
            }) => {
                assert!(message.contains("temprature"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        // Harmless, null or at the default: accepted.
        for ok in [
            r#"{"user": "me", "store": false, "metadata": {"a": "b"}}"#,
            r#"{"tools": null, "skip_special_tokens": true, "modalities": ["text"]}"#,
        ] {
            assert!(check(ok, Endpoint::Chat).is_ok(), "{ok}");
        }
        assert!(check(r#"{"skip_special_tokens": false}"#, Endpoint::Chat).is_err());
    }

    #[test]
    fn logprobs_per_endpoint() {
        let (lp, _) = check(r#"{"logprobs": 3, "echo": true}"#, Endpoint::Completions).unwrap();
        assert_eq!(
            lp,
            LogprobsRequest {
                logprobs: Some(3),
                prompt_logprobs: Some(3),
                echo: true
            }
        );
        let (lp, _) = check(r#"{"logprobs": 0}"#, Endpoint::Completions).unwrap();
        assert_eq!(
            lp,
            LogprobsRequest {
                logprobs: Some(0),
                prompt_logprobs: None,
                echo: false
            }
        );
        let (lp, _) = check(r#"{"echo": true}"#, Endpoint::Completions).unwrap();
        assert_eq!(lp.prompt_logprobs, None);
        let (lp, _) = check(r#"{"logprobs": true, "top_logprobs": 5}"#, Endpoint::Chat).unwrap();
        assert_eq!(lp.logprobs, Some(5));
        let (lp, _) = check(r#"{"logprobs": true}"#, Endpoint::Chat).unwrap();
        assert_eq!(lp.logprobs, Some(0));
        for (body, endpoint, param) in [
            (r#"{"logprobs": true}"#, Endpoint::Completions, "logprobs"),
            (r#"{"logprobs": 3}"#, Endpoint::Chat, "logprobs"),
            (r#"{"top_logprobs": 3}"#, Endpoint::Chat, "top_logprobs"),
            (
                r#"{"logprobs": true, "top_logprobs": 21}"#,
                Endpoint::Chat,
                "top_logprobs",
            ),
            (
                r#"{"top_logprobs": 2}"#,
                Endpoint::Completions,
                "top_logprobs",
            ),
            (r#"{"echo": true}"#, Endpoint::Chat, "echo"),
        ] {
            assert_eq!(param_of(check(body, endpoint)), Some(param), "{body}");
        }
    }

    #[test]
    fn penalties_and_biases_come_through_as_given() {
        let (_, e) = check(
            r#"{"presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
                "min_p": 0.1, "min_tokens": 4, "stop_token_ids": [7, 9],
                "logit_bias": {"5": -100, " 12": 2.5}}"#,
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(e.presence_penalty, 0.5);
        assert_eq!(e.frequency_penalty, -1.0);
        assert_eq!(e.repetition_penalty, 1.2);
        assert_eq!(e.min_p, 0.1);
        assert_eq!(e.min_tokens, 4);
        assert_eq!(e.stop_token_ids, vec![7, 9]);
        let mut bias = e.logit_bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, vec![(5, -100.0), (12, 2.5)]);
        let (_, d) = check("{}", Endpoint::Chat).unwrap();
        assert_eq!(
            (
                d.presence_penalty,
                d.frequency_penalty,
                d.repetition_penalty,
                d.min_p,
                d.min_tokens
            ),
            (0.0, 0.0, 1.0, 0.0, 0)
        );
        assert!(d.logit_bias.is_empty() && d.stop_token_ids.is_empty());
    }
}
