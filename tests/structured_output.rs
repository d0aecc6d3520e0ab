//! Structured output: `response_format` and `tools` through the OpenAI API. The bundled
//! model is random, so only the grammar's mask can make its output valid: every output
//! must parse and validate against its schema (checked by the small validator below, a
//! second reading of the JSON-schema keywords the schemas use).

mod common;

use std::sync::OnceLock;

use common::{Cluster, post_ok};
use serde_json::{Value, json};

fn cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| Cluster::up(&["--nodes", "2"]))
}

/// Whether `v` is valid under `schema`, for the keywords used in this file.
fn valid(v: &Value, schema: &Value) -> Result<(), String> {
    if let Some(options) = schema["enum"].as_array() {
        return if options.contains(v) {
            Ok(())
        } else {
            Err(format!("{v} not in {schema}"))
        };
    }
    if let Some(any) = schema["anyOf"].as_array() {
        return any
            .iter()
            .any(|s| valid(v, s).is_ok())
            .then_some(())
            .ok_or(format!("{v} matches no anyOf branch"));
    }
    if !schema["const"].is_null() && schema["const"] != *v {
        return Err(format!("{v} is not {}", schema["const"]));
    }
    match schema["type"].as_str() {
        None => Ok(()),
        Some("object") => {
            let o = v.as_object().ok_or(format!("{v} is not an object"))?;
            let props = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap_or("");
                if !o.contains_key(r) {
                    return Err(format!("{v} lacks {r}"));
                }
            }
            for (k, x) in o {
                match props.get(k) {
                    Some(s) => valid(x, s)?,
                    None if schema["additionalProperties"] == json!(false) => {
                        return Err(format!("{v} has {k}"));
                    }
                    None => {}
                }
            }
            Ok(())
        }
        Some("array") => {
            let a = v.as_array().ok_or(format!("{v} is not an array"))?;
            let max = schema["maxItems"].as_u64().unwrap_or(u64::MAX) as usize;
            let min = schema["minItems"].as_u64().unwrap_or(0) as usize;
            if a.len() > max || a.len() < min {
                return Err(format!("{v}: {} items", a.len()));
            }
            a.iter().try_for_each(|x| valid(x, &schema["items"]))
        }
        Some("string") => {
            let s = v.as_str().ok_or(format!("{v} is not a string"))?;
            let max = schema["maxLength"].as_u64().unwrap_or(u64::MAX) as usize;
            (s.chars().count() <= max)
                .then_some(())
                .ok_or(format!("{v} is too long"))
        }
        Some("integer") => {
            let i = v.as_i64().ok_or(format!("{v} is not an integer"))?;
            let lo = schema["minimum"].as_i64().unwrap_or(i64::MIN);
            let hi = schema["maximum"].as_i64().unwrap_or(i64::MAX);
            (lo..=hi)
                .contains(&i)
                .then_some(())
                .ok_or(format!("{i} out of range"))
        }
        Some("boolean") => v
            .is_boolean()
            .then_some(())
            .ok_or(format!("{v} is not a bool")),
        Some(other) => Err(format!("the test validator does not know type {other}")),
    }
}

fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 6},
            "color": {"enum": ["red", "green", "blue"]},
            "ok": {"type": "boolean"}},
            "required": ["name", "color", "ok"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "point": {"type": "object", "properties": {
                "x": {"type": "integer", "minimum": -5, "maximum": 5},
                "y": {"type": "integer", "minimum": 0, "maximum": 99}},
                "required": ["x", "y"], "additionalProperties": false},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
            "required": ["point", "tags"], "additionalProperties": false}),
    ]
}

fn chat(c: &Cluster, extra: Value) -> Value {
    let mut body = json!({"model": c.model, "max_tokens": 200,
        "messages": [{"role": "user", "content": "Describe a thing as JSON."}]});
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    post_ok(&c.client(), "/v1/chat/completions", &body)
}

/// Every output, greedy or sampled under several seeds, is JSON valid under the schema.
#[test]
fn json_schema_outputs_always_validate() {
    let c = cluster();
    for schema in schemas() {
        for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (1.0, 3)] {
            let v = chat(
                c,
                json!({"temperature": temperature, "seed": seed, "response_format":
                    {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}}),
            );
            let choice = &v["choices"][0];
            assert_eq!(choice["finish_reason"], "stop", "{v}");
            let text = choice["message"]["content"].as_str().expect("content");
            let parsed: Value =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
            valid(&parsed, &schema).unwrap_or_else(|e| panic!("{e}: {text}"));
        }
    }
}

/// A named tool's arguments follow its schema; `required` picks one of the tools.
#[test]
fn tool_calls_follow_the_tools_schemas() {
    let c = cluster();
    let [thing, point] = <[Value; 2]>::try_from(schemas()).expect("two schemas");
    let tools = json!([
        {"type": "function", "function": {"name": "describe", "parameters": thing}},
        {"type": "function", "function": {"name": "plot", "parameters": point}},
    ]);
    let v = chat(
        c,
        json!({"temperature": 0, "tools": tools,
               "tool_choice": {"type": "function", "function": {"name": "plot"}}}),
    );
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert!(choice["message"]["content"].is_null());
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "plot");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("args"))
        .expect("arguments are JSON");
    valid(&args, &point).expect("arguments follow the schema");

    for seed in 0..3 {
        let v = chat(
            c,
            json!({"temperature": 1.0, "seed": seed, "tools": tools, "tool_choice": "required"}),
        );
        let call = &v["choices"][0]["message"]["tool_calls"][0];
        let name = call["function"]["name"].as_str().expect("a call");
        let schema = if name == "describe" { &thing } else { &point };
        assert!(name == "describe" || name == "plot", "{v}");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().expect("args"))
                .expect("JSON");
        valid(&args, schema).expect("arguments follow the named tool's schema");
    }
}

/// `json_object` gives an object; a schema the grammar engine rejects is a 400 naming
/// `response_format`, before anything is queued.
#[test]
fn json_object_and_bad_schemas() {
    let c = cluster();
    let v = chat(
        c,
        json!({"temperature": 0, "response_format": {"type": "json_object"}}),
    );
    let choice = &v["choices"][0];
    let text = choice["message"]["content"].as_str().expect("content");
    assert!(text.starts_with('{'), "{text}");
    // A random model need not ever close an unbounded key: the grammar forbids leaving
    // it, not staying in it. Where it did finish, the object parses.
    if choice["finish_reason"] == "stop" {
        let parsed: Value = serde_json::from_str(text).expect("an object");
        assert!(parsed.is_object(), "{text}");
    }
    let bad = json!({"model": c.model, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x",
            "schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}},
                       "required": ["a"]}}}});
    let resp = c
        .client()
        .post_json("/v1/chat/completions", &bad)
        .expect("POST");
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert_eq!(resp.json()["error"]["param"], "response_format");
}

/// A tool round trip: the call the server made goes back as the assistant's message, the
/// tool's answer as a `tool` message, and the conversation goes on.
#[test]
fn a_tool_round_trip_continues_the_conversation() {
    let c = cluster();
    let [thing, _] = <[Value; 2]>::try_from(schemas()).expect("two schemas");
    let tools =
        json!([{"type": "function", "function": {"name": "describe", "parameters": thing}}]);
    let first = chat(
        c,
        json!({"temperature": 0, "tools": tools, "tool_choice": "required"}),
    );
    let call = first["choices"][0]["message"]["tool_calls"][0].clone();
    assert!(call["id"].is_string(), "{first}");
    let body = json!({"model": c.model, "max_tokens": 8, "temperature": 0, "tools": tools,
    "messages": [
        {"role": "user", "content": "Describe a thing as JSON."},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "done"},
    ]});
    let v = post_ok(&c.client(), "/v1/chat/completions", &body);
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
}

/// Streamed calls: the call opens with its id and name, its arguments arrive in
/// fragments that join into valid arguments, and the finish reason is `tool_calls`.
#[test]
fn streamed_tool_calls_join_into_valid_calls() {
    let c = cluster();
    let [thing, point] = <[Value; 2]>::try_from(schemas()).expect("two schemas");
    let tools = json!([
        {"type": "function", "function": {"name": "describe", "parameters": thing}},
        {"type": "function", "function": {"name": "plot", "parameters": point}},
    ]);
    for choice in [
        json!({"type": "function", "function": {"name": "plot"}}),
        json!("required"),
    ] {
        let body = json!({"model": c.model, "max_tokens": 200, "temperature": 0, "stream": true,
            "messages": [{"role": "user", "content": "Plot a point."}],
            "tools": tools, "tool_choice": choice});
        let events = c
            .client()
            .post_stream("/v1/chat/completions", &body)
            .expect("POST stream")
            .events()
            .expect("SSE events");
        let (mut name, mut id, mut args, mut finish) = (None, None, String::new(), Value::Null);
        for ev in events.iter().filter(|e| e.as_str() != "[DONE]") {
            let v: Value = serde_json::from_str(ev).expect("a JSON chunk");
            let ch = &v["choices"][0];
            if let Some(call) = ch["delta"]["tool_calls"].get(0) {
                assert_eq!(call["index"], 0);
                if let Some(n) = call["function"]["name"].as_str() {
                    assert!(name.is_none(), "the call opens once: {ev}");
                    name = Some(n.to_owned());
                    id = call["id"].as_str().map(str::to_owned);
                }
                args.push_str(call["function"]["arguments"].as_str().unwrap_or(""));
            }
            if !ch["finish_reason"].is_null() {
                finish = ch["finish_reason"].clone();
            }
        }
        assert_eq!(finish, "tool_calls", "{choice}: {events:?}");
        assert!(id.is_some_and(|i| i.starts_with("call_")));
        let name = name.expect("a call");
        let schema = if name == "describe" { &thing } else { &point };
        let args: Value = serde_json::from_str(&args).unwrap_or_else(|e| panic!("{e}: {args}"));
        valid(&args, schema).unwrap_or_else(|e| panic!("{choice}: {e}"));
    }
}
