//! The correctness probe: repeats of one prompt at temperature 0 must produce the same
//! text however the server batched, routed or transported them. A difference means
//! state leaked between sequences, an activation went to the wrong place, or bytes were
//! corrupted on the way: the failures load testing exists to find.

use std::collections::HashMap;

use crate::client::RequestOutput;

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeMismatch {
    /// Position of the request in the run.
    pub request: usize,
    /// First character where its text differs from the reference.
    pub first_difference: usize,
    /// The text around that point, reference then this request's.
    pub expected: String,
    pub got: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    pub requests: usize,
    pub completed: usize,
    /// Probe requests that failed (also counted in the run's `failed`); they have no
    /// text to compare.
    pub failed: usize,
    pub distinct_outputs: usize,
    /// Completed probes whose text differs from the reference.
    pub mismatches: usize,
    /// The most common text (ties: the earliest sent).
    pub reference: String,
    pub examples: Vec<ProbeMismatch>,
}

/// Examples kept in the report; the count covers all of them.
const MAX_EXAMPLES: usize = 10;

/// None when the run had no probes.
pub fn check(outputs: &[RequestOutput]) -> Option<ProbeReport> {
    let probes: Vec<(usize, &RequestOutput)> = outputs
        .iter()
        .enumerate()
        .filter(|(_, o)| o.probe)
        .collect();
    if probes.is_empty() {
        return None;
    }
    let mut texts: Vec<(usize, f64, &str)> = probes
        .iter()
        .filter_map(|(i, o)| {
            o.result
                .as_ref()
                .ok()
                .map(|s| (*i, o.start, s.text.as_str()))
        })
        .collect();
    texts.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (_, _, t) in &texts {
        *counts.entry(t).or_insert(0) += 1;
    }
    let best = counts.values().copied().max().unwrap_or(0);
    let reference = texts
        .iter()
        .map(|(_, _, t)| *t)
        .find(|t| counts.get(t) == Some(&best))
        .unwrap_or("");
    let differing: Vec<(usize, &str)> = texts
        .iter()
        .filter(|(_, _, t)| *t != reference)
        .map(|(i, _, t)| (*i, *t))
        .collect();
    let mut examples: Vec<ProbeMismatch> = differing
        .iter()
        .take(MAX_EXAMPLES)
        .map(|&(request, got)| mismatch(request, reference, got))
        .collect();
    examples.sort_by_key(|m| m.request);
    Some(ProbeReport {
        requests: probes.len(),
        completed: texts.len(),
        failed: probes.len() - texts.len(),
        distinct_outputs: counts.len(),
        mismatches: differing.len(),
        reference: reference.to_owned(),
        examples,
    })
}

fn mismatch(request: usize, expected: &str, got: &str) -> ProbeMismatch {
    let e: Vec<char> = expected.chars().collect();
    let g: Vec<char> = got.chars().collect();
    let at = e.iter().zip(&g).take_while(|(a, b)| a == b).count();
    let window = |cs: &[char]| -> String {
        let from = at.saturating_sub(20);
        cs[from.min(cs.len())..(at + 40).min(cs.len())]
            .iter()
            .collect()
    };
    ProbeMismatch {
        request,
        first_difference: at,
        expected: window(&e),
        got: window(&g),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ErrorKind, Failure, Success};

    fn probe(start: f64, text: Option<&str>) -> RequestOutput {
        RequestOutput {
            probe: true,
            prompt_len: 4,
            start,
            latency: 0.1,
            result: match text {
                Some(t) => Ok(Success {
                    ttft: 0.01,
                    itl: vec![],
                    latency: 0.1,
                    prompt_tokens: None,
                    output_tokens: None,
                    content_chunks: 1,
                    text: t.into(),
                }),
                None => Err(Failure {
                    kind: ErrorKind::Timeout,
                    message: String::new(),
                }),
            },
        }
    }

    #[test]
    fn majority_text_is_the_reference() {
        let mut plain = probe(0.0, Some("zzz"));
        plain.probe = false;
        let outputs = vec![
            plain,
            probe(0.1, Some("the cat sat")),
            probe(0.2, Some("the cat sat")),
            probe(0.3, Some("the cot sat")),
            probe(0.4, None),
            probe(0.5, Some("the cat sat")),
        ];
        let r = check(&outputs).expect("has probes");
        assert_eq!((r.requests, r.completed, r.failed), (5, 4, 1));
        assert_eq!((r.distinct_outputs, r.mismatches), (2, 1));
        assert_eq!(r.reference, "the cat sat");
        assert_eq!(r.examples.len(), 1);
        assert_eq!(r.examples[0].request, 3);
        assert_eq!(r.examples[0].first_difference, 5);
        assert_eq!(r.examples[0].got, "the cot sat");
    }

    #[test]
    fn agreement_and_no_probes() {
        let same = vec![probe(0.0, Some("a")), probe(0.1, Some("a"))];
        let r = check(&same).expect("has probes");
        assert_eq!((r.distinct_outputs, r.mismatches), (1, 0));
        assert_eq!(check(&[]), None);
    }
}
