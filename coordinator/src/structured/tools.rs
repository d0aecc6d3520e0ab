//! Tool calling on chat completions: `tools` and `tool_choice` as OpenAI defines them.
//!
//! A named function or `"required"` constrains the output to a call (the arguments' JSON
//! schema, or an object naming one of the tools with its arguments), so even a model that
//! was never taught the tools answers with a valid call. `"auto"` leaves the model free:
//! an output that is exactly a call object (`{"name": ..., "arguments": {...}}`) of a known
//! tool becomes a call, anything else stays text. Models' own call syntaxes (Hermes'
//! `<tool_call>` tags and others) are not parsed yet.

use serde_json::{Value, json};

use super::OutputFormat;

/// How the output relates to the request's tools.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// The output is this function's arguments.
    Named(String),
    /// The output is a call of one of the tools.
    Required,
    /// The model decides: a call object of a known tool is a call, else text.
    Auto,
}

/// The tools of a request and how they are to be used.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCalling {
    /// (name, JSON schema of the arguments).
    pub tools: Vec<(String, Value)>,
    pub choice: ToolChoice,
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as a JSON text (OpenAI sends them as a string).
    pub arguments: String,
}

impl ToolCalling {
    /// `tools` and `tool_choice` of a chat request; `None` when there are no tools or the
    /// choice is `"none"`. The error names what is wrong.
    pub fn parse(
        tools: Option<&Value>,
        tool_choice: Option<&Value>,
    ) -> Result<Option<Self>, String> {
        let list = match tools {
            None | Some(Value::Null) => {
                return match tool_choice {
                    None | Some(Value::Null) => Ok(None),
                    Some(c) if c == "none" => Ok(None),
                    Some(_) => Err("tool_choice needs tools".into()),
                };
            }
            Some(Value::Array(list)) => list,
            Some(_) => return Err("tools must be a list".into()),
        };
        let mut parsed = Vec::with_capacity(list.len());
        for t in list {
            if t["type"] != "function" {
                return Err("every tool must have type \"function\"".into());
            }
            let name = t["function"]["name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .ok_or("every tool needs function.name")?;
            if parsed.iter().any(|(n, _): &(String, Value)| n == name) {
                return Err(format!("tool `{name}` is listed twice"));
            }
            let params = match &t["function"]["parameters"] {
                Value::Null => json!({"type": "object", "properties": {}}),
                p @ Value::Object(_) => p.clone(),
                _ => {
                    return Err(format!(
                        "tool `{name}`: parameters must be a JSON schema object"
                    ));
                }
            };
            parsed.push((name.to_owned(), params));
        }
        if parsed.is_empty() {
            return Err("tools must not be empty".into());
        }
        let choice = match tool_choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(c) if c == "none" => return Ok(None),
            Some(c) if c == "auto" => ToolChoice::Auto,
            Some(c) if c == "required" => ToolChoice::Required,
            Some(c) => {
                let name = c["function"]["name"]
                    .as_str()
                    .filter(|_| c["type"] == "function")
                    .ok_or("tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}")?;
                if !parsed.iter().any(|(n, _)| n == name) {
                    return Err(format!("tool_choice names `{name}`, which is not in tools"));
                }
                ToolChoice::Named(name.to_owned())
            }
        };
        Ok(Some(ToolCalling {
            tools: parsed,
            choice,
        }))
    }

    /// What the output is constrained to (`None`: free, for `"auto"`).
    pub fn format(&self) -> Option<OutputFormat> {
        match &self.choice {
            ToolChoice::Auto => None,
            ToolChoice::Named(name) => self
                .tools
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, schema)| OutputFormat::JsonSchema(schema.clone())),
            ToolChoice::Required => {
                let calls: Vec<Value> = self
                    .tools
                    .iter()
                    .map(|(name, schema)| {
                        json!({
                            "type": "object",
                            "properties": {"name": {"const": name}, "arguments": schema},
                            "required": ["name", "arguments"],
                            "additionalProperties": false,
                        })
                    })
                    .collect();
                Some(OutputFormat::JsonSchema(json!({"anyOf": calls})))
            }
        }
    }

    /// The calls in a finished output, or `None` when it is text.
    pub fn calls(&self, output: &str) -> Option<Vec<ToolCall>> {
        if let ToolChoice::Named(name) = &self.choice {
            return Some(vec![ToolCall {
                name: name.clone(),
                arguments: output.trim().to_owned(),
            }]);
        }
        let v: Value = serde_json::from_str(output.trim()).ok()?;
        let name = v["name"].as_str()?;
        if !self.tools.iter().any(|(n, _)| n == name) || !v["arguments"].is_object() {
            return None;
        }
        Some(vec![ToolCall {
            name: name.to_owned(),
            arguments: v["arguments"].to_string(),
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "time"}}])
    }

    #[test]
    fn choices_parse_as_openai_defines_them() {
        let t = weather();
        assert_eq!(ToolCalling::parse(None, None), Ok(None));
        assert_eq!(ToolCalling::parse(Some(&t), Some(&json!("none"))), Ok(None));
        let auto = ToolCalling::parse(Some(&t), None).unwrap().unwrap();
        assert_eq!(auto.choice, ToolChoice::Auto);
        assert_eq!(auto.format(), None);
        let named = ToolCalling::parse(
            Some(&t),
            Some(&json!({"type": "function", "function": {"name": "time"}})),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            named.format(),
            Some(OutputFormat::JsonSchema(
                json!({"type": "object", "properties": {}})
            ))
        );
        for (tools, choice) in [
            (Some(json!([])), None),
            (Some(json!([{"type": "function", "function": {}}])), None),
            (
                Some(t.clone()),
                Some(json!({"type": "function", "function": {"name": "nope"}})),
            ),
            (Some(t.clone()), Some(json!("sometimes"))),
            (None, Some(json!("required"))),
        ] {
            assert!(
                ToolCalling::parse(tools.as_ref(), choice.as_ref()).is_err(),
                "{tools:?} {choice:?}"
            );
        }
    }

    #[test]
    fn calls_are_recognised_only_when_they_name_a_tool() {
        let t = weather();
        let required = ToolCalling::parse(Some(&t), Some(&json!("required")))
            .unwrap()
            .unwrap();
        let call = required.calls(r#" {"name": "weather", "arguments": {"city": "Oslo"}} "#);
        assert_eq!(
            call,
            Some(vec![ToolCall {
                name: "weather".into(),
                arguments: r#"{"city":"Oslo"}"#.into()
            }])
        );
        assert_eq!(
            required.calls(r#"{"name": "other", "arguments": {}}"#),
            None
        );
        assert_eq!(required.calls("It is sunny."), None);
    }
}
