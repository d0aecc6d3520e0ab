//! Structured output by constrained decoding: a grammar (from a JSON schema) decides at
//! every step which tokens may come next, and the others are masked out before sampling.
//! The grammar engine is llguidance (what vLLM, SGLang and llama.cpp use); `tokens` tells
//! it what bytes each token of our vocabulary stands for.
//!
//! A grammar is compiled when the request is validated (a bad schema is a 400 before
//! anything is queued); the scheduler then asks the constraint for a mask before each
//! sample and tells it the token chosen.

mod tokens;
pub mod tools;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};
use switchyard_engine::tokenizer::Tokenizer;

pub use tokens::{TokenEnvError, token_env};

/// What the output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid under this schema.
    JsonSchema(Value),
}

impl OutputFormat {
    /// The schema the grammar is compiled from. JSON's optional whitespace is not allowed
    /// between tokens (the output is compact, `{"a":1,"b":[2]}`): a model that keeps
    /// choosing whitespace would otherwise never finish the object. A schema with its own
    /// `x-guidance` options keeps them.
    fn schema(&self) -> Value {
        let mut schema = match self {
            OutputFormat::JsonObject => json!({"type": "object"}),
            OutputFormat::JsonSchema(schema) => schema.clone(),
        };
        if let Some(o) = schema.as_object_mut() {
            o.entry("x-guidance")
                .or_insert_with(|| json!({"whitespace_flexible": false}));
        }
        schema
    }
}

/// Compiles output formats into constraints for one model's vocabulary (built once).
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Self, String> {
        let env = token_env(tokenizer, vocab_size).map_err(|e| e.to_string())?;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        // Grammar warnings become request errors here, not lines on the server's stderr.
        factory.set_stderr_log_level(0);
        Ok(Grammars { factory })
    }

    /// The constraint for `format`, or why the format cannot be followed (a client
    /// error: an unsupported or contradictory schema).
    pub fn constraint(&self, format: &OutputFormat) -> Result<Constraint, String> {
        let grammar = TopLevelGrammar::from_json_schema(format.schema());
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| format!("the schema cannot be used: {e}"))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(format!("the schema cannot be used: {e}"));
        }
        Ok(Constraint { matcher })
    }
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    /// Sets every logit the grammar does not allow next to -inf. Once the grammar is
    /// complete only EOS is allowed.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| format!("structured output failed: {e}"))?;
        if allowed.num_set() == 0 {
            return Err("structured output failed: the grammar allows no token".into());
        }
        allowed.iter_unset_entries(|i| {
            if let Some(l) = logits.get_mut(i) {
                *l = f32::NEG_INFINITY;
            }
        });
        // Ids past the grammar's vocabulary (padding rows of the LM head) are never allowed.
        for l in logits.iter_mut().skip(allowed.len()) {
            *l = f32::NEG_INFINITY;
        }
        Ok(())
    }

    /// Advances past the token sampled.
    pub fn accept(&mut self, token: u32) -> Result<(), String> {
        if self.matcher.is_stopped() {
            return Ok(()); // EOS after a complete output
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| format!("structured output failed: {e}"))
    }

    /// A second sequence under the same grammar, from the same state (`n` choices).
    pub fn fork(&self) -> Constraint {
        Constraint {
            matcher: self.matcher.deep_clone(),
        }
    }

    /// Whether the output is complete: nothing but EOS may follow.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}
