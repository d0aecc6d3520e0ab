//! Streaming a chat answer that may be a tool call, in OpenAI's delta shape: a call opens
//! with its id and name (`tool_calls: [{index, id, type, function: {name, arguments: ""}}]`)
//! and its arguments follow in fragments.
//!
//! A named function's arguments stream as they are generated. With `"required"` the name
//! is inside the output, and with `"auto"` an output that opens with `{` may be a call or
//! text: both are held until the end and then sent as one call, or as text. An `"auto"`
//! output that opens with anything else streams as text at once.

use std::sync::Arc;

use crate::structured::tools::{ToolCalling, ToolChoice};

/// What one piece of output becomes on the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Content(String),
    /// A call opens: its id and the function's name.
    CallStart {
        id: String,
        name: String,
    },
    /// A fragment of the open call's arguments.
    Arguments(String),
}

#[derive(Debug)]
enum Mode {
    /// The named function: arguments stream; `opened` once the call has been announced.
    Named { name: String, opened: bool },
    /// Held until the end (a call under `"required"`, or `"auto"` output opening with `{`).
    Held,
    /// `"auto"` before the first non-blank character.
    Undecided,
    /// `"auto"` output that is text.
    Text,
}

pub struct ToolStream {
    tools: Arc<ToolCalling>,
    mode: Mode,
    held: String,
    id: String,
    /// Whether a call was made (the finish reason is then `tool_calls`).
    called: bool,
}

impl ToolStream {
    pub fn new(tools: Arc<ToolCalling>, call_id: String) -> Self {
        let mode = match &tools.choice {
            ToolChoice::Named(name) => Mode::Named {
                name: name.clone(),
                opened: false,
            },
            ToolChoice::Required => Mode::Held,
            ToolChoice::Auto => Mode::Undecided,
        };
        ToolStream {
            tools,
            mode,
            held: String::new(),
            id: call_id,
            called: false,
        }
    }

    /// The deltas for the next piece of generated text.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        match &mut self.mode {
            Mode::Named { name, opened } => {
                let mut out = Vec::new();
                if !*opened {
                    *opened = true;
                    self.called = true;
                    out.push(Delta::CallStart {
                        id: self.id.clone(),
                        name: name.clone(),
                    });
                }
                if !text.is_empty() {
                    out.push(Delta::Arguments(text.to_owned()));
                }
                out
            }
            Mode::Held => {
                self.held.push_str(text);
                Vec::new()
            }
            Mode::Undecided => {
                self.held.push_str(text);
                match self.held.trim_start().chars().next() {
                    None => Vec::new(),
                    Some('{') => {
                        self.mode = Mode::Held;
                        Vec::new()
                    }
                    Some(_) => {
                        self.mode = Mode::Text;
                        vec![Delta::Content(std::mem::take(&mut self.held))]
                    }
                }
            }
            Mode::Text => vec![Delta::Content(text.to_owned())],
        }
    }

    /// The deltas once the output is complete: a held call, or held text.
    pub fn finish(&mut self) -> Vec<Delta> {
        match self.mode {
            Mode::Held | Mode::Undecided => {
                let held = std::mem::take(&mut self.held);
                match self.tools.calls(&held).and_then(|c| c.into_iter().next()) {
                    Some(call) => {
                        self.called = true;
                        vec![
                            Delta::CallStart {
                                id: self.id.clone(),
                                name: call.name,
                            },
                            Delta::Arguments(call.arguments),
                        ]
                    }
                    None if held.is_empty() => Vec::new(),
                    None => vec![Delta::Content(held)],
                }
            }
            Mode::Named { .. } | Mode::Text => Vec::new(),
        }
    }

    pub fn called(&self) -> bool {
        self.called
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn tools(choice: serde_json::Value) -> Arc<ToolCalling> {
        let t = json!([{"type": "function", "function": {"name": "f"}},
                       {"type": "function", "function": {"name": "g"}}]);
        Arc::new(
            ToolCalling::parse(Some(&t), Some(&choice))
                .ok()
                .flatten()
                .expect("tools"),
        )
    }

    fn run(s: &mut ToolStream, pieces: &[&str]) -> Vec<Delta> {
        let mut out: Vec<Delta> = pieces.iter().flat_map(|p| s.push(p)).collect();
        out.extend(s.finish());
        out
    }

    #[test]
    fn a_named_call_streams_its_arguments() {
        let mut s = ToolStream::new(
            tools(json!({"type": "function", "function": {"name": "g"}})),
            "c".into(),
        );
        let out = run(&mut s, &["{\"a\"", ":1}"]);
        assert_eq!(
            out,
            vec![
                Delta::CallStart {
                    id: "c".into(),
                    name: "g".into()
                },
                Delta::Arguments("{\"a\"".into()),
                Delta::Arguments(":1}".into()),
            ]
        );
        assert!(s.called());
    }

    #[test]
    fn a_required_call_is_held_and_sent_whole() {
        let mut s = ToolStream::new(tools(json!("required")), "c".into());
        let out = run(&mut s, &["{\"name\":\"f\",", "\"arguments\":{\"x\":2}}"]);
        assert_eq!(
            out,
            vec![
                Delta::CallStart {
                    id: "c".into(),
                    name: "f".into()
                },
                Delta::Arguments("{\"x\":2}".into()),
            ]
        );
        assert!(s.called());
    }

    #[test]
    fn auto_streams_text_at_once_and_holds_what_may_be_a_call() {
        let mut s = ToolStream::new(tools(json!("auto")), "c".into());
        let out = run(&mut s, &["  ", "Hel", "lo"]);
        assert_eq!(
            out,
            vec![Delta::Content("  Hel".into()), Delta::Content("lo".into())]
        );
        assert!(!s.called());

        let mut s = ToolStream::new(tools(json!("auto")), "c".into());
        let out = run(&mut s, &["{not", " a call}"]);
        assert_eq!(out, vec![Delta::Content("{not a call}".into())]);
        assert!(!s.called());

        let mut s = ToolStream::new(tools(json!("auto")), "c".into());
        let out = run(&mut s, &["{\"name\":\"g\",\"arguments\":{}}"]);
        assert_eq!(out.len(), 2);
        assert!(s.called());
    }
}
