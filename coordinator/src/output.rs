//! Turning a sequence's sampled tokens into streamed text: incremental detokenisation
//! (never half a UTF-8 character) and stop strings (never emit text a stop string may
//! still turn out to cover; the stop string itself is not part of the output).

use switchyard_engine::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};

pub struct TextOutput {
    decoder: IncrementalDecoder,
    stop: Vec<String>,
    /// Decoded but not yet emitted: a suffix that could begin a stop string.
    held: String,
}

/// What one new token produced.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub text: String,
    /// A stop string was found: generation ends, `text` holds everything before it.
    pub stopped: bool,
}

impl TextOutput {
    pub fn new(stop: Vec<String>, prompt: &[u32]) -> Self {
        TextOutput {
            decoder: IncrementalDecoder::with_prompt(true, prompt),
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Delta, TokenizerError> {
        let new = self.decoder.push(tok, id)?;
        Ok(self.accept(&new))
    }

    /// End of generation: whatever is held back is now final.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Delta, TokenizerError> {
        let rest = self.decoder.finish(tok)?;
        let mut d = self.accept(&rest);
        if !d.stopped {
            d.text.push_str(&std::mem::take(&mut self.held));
        }
        Ok(d)
    }

    fn accept(&mut self, new: &str) -> Delta {
        self.held.push_str(new);
        if self.stop.is_empty() {
            return Delta {
                text: std::mem::take(&mut self.held),
                stopped: false,
            };
        }
        if let Some(pos) = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let text = self.held[..pos].to_owned();
            self.held.clear();
            return Delta {
                text,
                stopped: true,
            };
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let suffix = &self.held[i..];
                self.stop.iter().any(|s| s.starts_with(suffix))
            })
            .unwrap_or(self.held.len());
        let text = self.held[..keep].to_owned();
        self.held.drain(..keep);
        Delta {
            text,
            stopped: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake() -> TextOutput {
        TextOutput::new(vec!["STOP".into(), "\n\n".into()], &[])
    }

    #[test]
    fn text_before_a_stop_string_is_emitted_and_the_stop_string_is_not() {
        let mut o = fake();
        let mut out = String::new();
        let mut stopped = false;
        for piece in ["Hello ", "wor", "ld S", "TO", "P and more"] {
            let d = o.accept(piece);
            out.push_str(&d.text);
            if d.stopped {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(out, "Hello world ");
    }

    #[test]
    fn a_false_start_is_released() {
        let mut o = fake();
        assert_eq!(o.accept("ab S").text, "ab ");
        assert_eq!(o.accept("T").text, "");
        assert_eq!(o.accept("x").text, "STx");
        assert_eq!(o.accept("\n").text, "");
        let d = o.accept("\n");
        assert!(d.stopped);
        assert_eq!(d.text, "");
    }

    #[test]
    fn without_stop_strings_everything_flows() {
        let mut o = TextOutput::new(vec![], &[]);
        assert_eq!(o.accept("a S").text, "a S");
    }
}
