//! Next-token sampling with the OpenAI/vLLM request parameters, and the logprobs that
//! the API reports.
//!
//! A request's sampling is more than temperature/top-k/top-p: clients also send logit
//! bias, presence/frequency/repetition penalties, `min_p` and `min_tokens`, and expect
//! them to mean what they mean in vLLM (which follows OpenAI for the penalties). This
//! module applies them in vLLM v1's order:
//!
//! 1. `logit_bias` is added, and while fewer than `min_tokens` tokens have been generated
//!    the stop tokens (EOS and the request's stop ids) are set to `-inf`;
//! 2. the repetition penalty (prompt and output tokens), then the frequency and presence
//!    penalties (output tokens only);
//! 3. greedy takes the argmax of these processed logits; otherwise temperature, `min_p`,
//!    top-k and top-p restrict the distribution and a token is drawn.
//!
//! A seeded [`Sampler`] draws the same tokens from the same logits every time. With every
//! new parameter at its default the sampler takes the same path as before these
//! parameters existed, bit for bit and draw for draw, without copying the logits; when
//! some processing is active it works in a buffer it keeps between calls, and the
//! penalties touch only the ids that have been seen, never the whole vocabulary.
//!
//! Logprobs ([`log_softmax`], [`top_logprobs`], [`logprob_of`], [`TokenLogprobs`]) are
//! of the model's raw logits, before any penalty or temperature, which is what OpenAI
//! and vLLM report by default.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod logprobs;

pub use logprobs::{TokenLogprobs, log_softmax, log_sum_exp, logprob_of, top_logprobs};

/// The sampling parameters of one request. `Default` is greedy with everything else off.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// After temperature, drop the tokens whose probability is below `min_p` times the
    /// largest probability. 0 disables it.
    pub min_p: f32,
    /// Subtracted once from the logit of every token generated so far. 0 disables it.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated. 0 disables it.
    pub frequency_penalty: f32,
    /// Divides the positive logits and multiplies the others of every token in the
    /// prompt or the output. 1 disables it.
    pub repetition_penalty: f32,
    /// `(token id, bias)` added to the logits; ids outside the vocabulary are ignored.
    pub logit_bias: Vec<(u32, f32)>,
    /// The stop tokens given to [`Sampler::with_stop_ids`] cannot be drawn before this
    /// many tokens have been generated.
    pub min_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    fn has_repetition_penalty(&self) -> bool {
        self.repetition_penalty != 1.0
    }

    fn has_output_penalty(&self) -> bool {
        self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }

    /// Whether the sampler must remember which tokens it generated.
    fn tracks_output(&self) -> bool {
        self.has_repetition_penalty() || self.has_output_penalty()
    }
}

/// Index of the largest logit; the lowest index among equals, like `torch.argmax`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws tokens for one sequence and remembers what it drew, for the penalties and
/// `min_tokens`.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Candidates of a draw, kept between calls.
    scratch: Vec<(u32, f32)>,
    /// The processed logits, kept between calls; untouched while no processing is active.
    processed: Vec<f32>,
    /// Distinct prompt ids, sorted; filled only when the repetition penalty is on.
    prompt: Vec<u32>,
    /// How often each id was generated; filled only when a penalty is on.
    output: HashMap<u32, u32>,
    /// Distinct ids banned while fewer than `min_tokens` tokens were generated, sorted.
    stop_ids: Vec<u32>,
    generated: usize,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            scratch: Vec::new(),
            processed: Vec::new(),
            prompt: Vec::new(),
            output: HashMap::new(),
            stop_ids: Vec::new(),
            generated: 0,
        }
    }

    /// The prompt's token ids, which the repetition penalty counts as seen.
    pub fn with_prompt(mut self, prompt: &[u32]) -> Self {
        if self.params.has_repetition_penalty() {
            self.prompt = sorted_distinct(prompt);
        }
        self
    }

    /// The tokens that `min_tokens` holds back: the EOS ids (unless the request ignores
    /// EOS) and the request's stop token ids.
    pub fn with_stop_ids(mut self, ids: &[u32]) -> Self {
        self.stop_ids = sorted_distinct(ids);
        self
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// How many tokens [`Sampler::sample`] has returned.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// The next token from one row of logits; it counts as generated from then on.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let token = if self.processing_active() {
            let mut processed = std::mem::take(&mut self.processed);
            processed.clear();
            processed.extend_from_slice(logits);
            self.process(&mut processed);
            let token = self.choose(&processed);
            self.processed = processed;
            token
        } else {
            self.choose(logits)
        };
        self.record(token);
        token
    }

    /// [`Sampler::sample`] with `restrict` applied to the processed logits before the
    /// choice (structured output's mask: the tokens it sets to `-inf` cannot be drawn).
    /// One copy of the row, whatever else is active.
    pub fn sample_restricted<E>(
        &mut self,
        logits: &[f32],
        restrict: impl FnOnce(&mut [f32]) -> Result<(), E>,
    ) -> Result<u32, E> {
        let mut processed = std::mem::take(&mut self.processed);
        processed.clear();
        processed.extend_from_slice(logits);
        if self.processing_active() {
            self.process(&mut processed);
        }
        let restricted = restrict(&mut processed);
        let token = restricted.map(|()| self.choose(&processed));
        self.processed = processed;
        if let Ok(t) = token {
            self.record(t);
        }
        token
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            argmax(logits)
        } else {
            draw(&self.params, &mut self.rng, &mut self.scratch, logits)
        }
    }

    fn record(&mut self, token: u32) {
        self.generated += 1;
        if self.params.tracks_output() {
            *self.output.entry(token).or_insert(0) += 1;
        }
    }

    fn min_tokens_active(&self) -> bool {
        self.generated < self.params.min_tokens && !self.stop_ids.is_empty()
    }

    /// Whether any step before the draw would change a logit.
    fn processing_active(&self) -> bool {
        let p = &self.params;
        !p.logit_bias.is_empty()
            || self.min_tokens_active()
            || (p.has_repetition_penalty() && !(self.prompt.is_empty() && self.output.is_empty()))
            || (p.has_output_penalty() && !self.output.is_empty())
    }

    /// Bias, penalties and the `min_tokens` ban, in place. The ban is written last so that
    /// it holds whatever the other values are; for valid parameters (finite bias,
    /// repetition penalty > 0) `-inf` is unchanged by the other steps, so this equals
    /// vLLM's order (ban, bias, penalties).
    fn process(&self, logits: &mut [f32]) {
        apply_logit_bias(logits, &self.params.logit_bias);
        self.apply_penalties(logits);
        if self.min_tokens_active() {
            ban(logits, &self.stop_ids);
        }
    }

    /// vLLM's `apply_penalties`: repetition over prompt and output ids, then
    /// `logit -= frequency * count`, then `logit -= presence`, for the output ids.
    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.has_repetition_penalty() {
            for &id in &self.prompt {
                repetition(logits, id, p.repetition_penalty);
            }
            for &id in self.output.keys() {
                if self.prompt.binary_search(&id).is_err() {
                    repetition(logits, id, p.repetition_penalty);
                }
            }
        }
        if p.has_output_penalty() {
            for (&id, &count) in &self.output {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.frequency_penalty * count as f32;
                    *l -= p.presence_penalty;
                }
            }
        }
    }

    /// The logits as [`Sampler::sample`] would see them now, without drawing.
    #[cfg(test)]
    fn processed_logits(&self, logits: &[f32]) -> Vec<f32> {
        let mut out = logits.to_vec();
        self.process(&mut out);
        out
    }
}

fn sorted_distinct(ids: &[u32]) -> Vec<u32> {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

fn apply_logit_bias(logits: &mut [f32], bias: &[(u32, f32)]) {
    for &(id, b) in bias {
        if let Some(l) = logits.get_mut(id as usize) {
            *l += b;
        }
    }
}

fn ban(logits: &mut [f32], ids: &[u32]) {
    for &id in ids {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Positive logits are divided by the penalty, the others multiplied (vLLM, after CTRL).
fn repetition(logits: &mut [f32], id: u32, penalty: f32) {
    if let Some(l) = logits.get_mut(id as usize) {
        *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
    }
}

/// Temperature, `min_p`, top-k and top-p, then one draw from what is left.
fn draw(
    params: &SamplingParams,
    rng: &mut ChaCha8Rng,
    cand: &mut Vec<(u32, f32)>,
    logits: &[f32],
) -> u32 {
    let t = params.temperature;
    cand.clear();
    cand.extend(logits.iter().enumerate().map(|(i, l)| (i as u32, l / t)));
    // Sorting by score (ties by id) makes the draw independent of input order.
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // Tokens at -inf (banned, or masked by the model) have no mass: never draw them.
    let possible = cand.partition_point(|c| c.1 != f32::NEG_INFINITY);
    if possible == 0 {
        return cand.first().map_or(0, |c| c.0);
    }
    cand.truncate(possible);
    if params.min_p > 0.0 {
        // p / p_max = exp(l - l_max); sorted descending, so the kept tokens are a prefix.
        let max = cand[0].1;
        let keep = cand.partition_point(|c| (c.1 - max).exp() >= params.min_p);
        cand.truncate(keep.max(1));
    }
    if params.top_k > 0 {
        cand.truncate(params.top_k);
    }
    let max = cand[0].1;
    let mut sum = 0.0f64;
    for c in cand.iter_mut() {
        c.1 = (c.1 - max).exp();
        sum += c.1 as f64;
    }
    if params.top_p < 1.0 {
        // Smallest prefix whose mass reaches top_p (always at least one token).
        let mut acc = 0.0f64;
        let mut keep = cand.len();
        for (i, c) in cand.iter().enumerate() {
            acc += c.1 as f64 / sum;
            if acc >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep);
        sum = cand.iter().map(|c| c.1 as f64).sum();
    }
    let mut r = rng.random::<f64>() * sum;
    for c in cand.iter() {
        r -= c.1 as f64;
        if r <= 0.0 {
            return c.0;
        }
    }
    cand[cand.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy(), 1);
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0]), 1);
        assert_eq!(argmax(&[1.0, 1.0]), 0);
    }

    #[test]
    fn same_seed_same_draws_and_other_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            ..Default::default()
        };
        let draw = |seed| {
            let mut s = Sampler::new(p.clone(), seed);
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0, 4.0, 3.0, -10.0, -10.0];
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                top_k: 2,
                ..Default::default()
            },
            3,
        );
        for _ in 0..200 {
            assert!(s.sample(&logits) < 2);
        }
        // p(0) = 0.665: top_p 0.5 leaves only token 0.
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_p: 0.5,
                top_k: 0,
                ..Default::default()
            },
            3,
        );
        for _ in 0..200 {
            assert_eq!(s.sample(&logits), 0);
        }
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let logits = [1.0f32, 0.0, 2.0];
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                top_k: 0,
                ..Default::default()
            },
            11,
        );
        let n = 20000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for i in 0..3 {
            let expect = logits[i].exp() / z;
            let got = counts[i] as f32 / n as f32;
            assert!((got - expect).abs() < 0.02, "token {i}: {got} vs {expect}");
        }
    }

    // ---- the fast path ----

    /// `Sampler::sample` as it was before the penalties, logit bias, min_p and
    /// min_tokens existed: the reference for the fast path.
    fn old_sample(
        temperature: f32,
        top_p: f32,
        top_k: usize,
        rng: &mut ChaCha8Rng,
        logits: &[f32],
    ) -> u32 {
        if temperature <= 0.0 || top_k == 1 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, l / temperature))
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if top_k > 0 {
            cand.truncate(top_k);
        }
        let max = cand[0].1;
        let mut sum = 0.0f64;
        for c in cand.iter_mut() {
            c.1 = (c.1 - max).exp();
            sum += c.1 as f64;
        }
        if top_p < 1.0 {
            let mut acc = 0.0f64;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.1 as f64 / sum;
                if acc >= top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
            sum = cand.iter().map(|c| c.1 as f64).sum();
        }
        let mut r = rng.random::<f64>() * sum;
        for c in cand.iter() {
            r -= c.1 as f64;
            if r <= 0.0 {
                return c.0;
            }
        }
        cand[cand.len() - 1].0
    }

    fn random_logits(rng: &mut ChaCha8Rng, vocab: usize, scale: f32) -> Vec<f32> {
        (0..vocab)
            .map(|_| (rng.random::<f32>() - 0.5) * scale)
            .collect()
    }

    #[test]
    fn defaults_draw_exactly_what_the_old_sampler_drew() {
        let mut src = ChaCha8Rng::seed_from_u64(99);
        let settings = [
            (1.0, 1.0, 0),
            (0.7, 0.9, 0),
            (1.3, 1.0, 40),
            (0.5, 0.8, 10),
            (0.0, 1.0, 0),
            (1.0, 1.0, 1),
        ];
        for (seed, &(temperature, top_p, top_k)) in settings.iter().enumerate() {
            let params = SamplingParams {
                temperature,
                top_p,
                top_k,
                ..Default::default()
            };
            // The same params with processing switched on but without effect: a bias of 0.
            let noop = SamplingParams {
                logit_bias: vec![(0, 0.0)],
                ..params.clone()
            };
            let mut new = Sampler::new(params, seed as u64);
            let mut busy = Sampler::new(noop, seed as u64).with_prompt(&[1, 2, 3]);
            let mut old_rng = ChaCha8Rng::seed_from_u64(seed as u64);
            for _ in 0..300 {
                let logits = random_logits(&mut src, 64, 8.0);
                let want = old_sample(temperature, top_p, top_k, &mut old_rng, &logits);
                assert_eq!(new.sample(&logits), want);
                assert_eq!(busy.sample(&logits), want);
            }
            // Nothing active: the logits were never copied.
            assert_eq!(new.processed.capacity(), 0);
            assert!(new.output.is_empty());
            assert!(busy.processed.capacity() >= 64);
        }
    }

    // ---- penalties, on logits [2.0, -1.0, 0.5, 1.0] ----

    const L: [f32; 4] = [2.0, -1.0, 0.5, 1.0];

    fn greedy_with(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::greedy();
        f(&mut p);
        p
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                g == w || (g - w).abs() < 1e-6,
                "logit {i}: got {g}, want {w} ({got:?} vs {want:?})"
            );
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        // Prompt [1], output [0], penalty 4: 2.0 / 4 = 0.5, -1.0 * 4 = -4.0.
        let mut s =
            Sampler::new(greedy_with(|p| p.repetition_penalty = 4.0), 0).with_prompt(&[1, 1]);
        assert_close(&s.processed_logits(&L), &[2.0, -4.0, 0.5, 1.0]);
        assert_eq!(s.sample(&L), 0);
        assert_close(&s.processed_logits(&L), &[0.5, -4.0, 0.5, 1.0]);
        // The argmax flips from 0 to 3.
        assert_eq!(s.sample(&L), 3);
        // Seen twice or once is the same: 1.0 / 4 = 0.25; then 0 and 2 tie at 0.5.
        assert_close(&s.processed_logits(&L), &[0.5, -4.0, 0.5, 0.25]);
        assert_eq!(s.sample(&L), 0);
        assert_eq!(s.generated(), 3);
    }

    #[test]
    fn frequency_penalty_scales_with_the_count_of_output_tokens() {
        // Output [0, 0, 3], penalty 0.8: 2.0 - 2 * 0.8 = 0.4, 1.0 - 0.8 = 0.2.
        let mut s =
            Sampler::new(greedy_with(|p| p.frequency_penalty = 0.8), 0).with_prompt(&[2, 2, 2]);
        assert_eq!(s.processed_logits(&L), L.to_vec());
        for t in [0, 0, 3] {
            s.record(t);
        }
        // The prompt token 2 is not penalized.
        assert_close(&s.processed_logits(&L), &[0.4, -1.0, 0.5, 0.2]);
        assert_eq!(s.sample(&L), 2);
    }

    #[test]
    fn presence_penalty_is_subtracted_once_per_output_token() {
        // Output [0, 0, 3], penalty 1.6: 2.0 - 1.6 = 0.4, 1.0 - 1.6 = -0.6.
        let mut s = Sampler::new(greedy_with(|p| p.presence_penalty = 1.6), 0);
        assert_eq!(s.sample(&L), 0);
        s.record(0);
        s.record(3);
        assert_close(&s.processed_logits(&L), &[0.4, -1.0, 0.5, -0.6]);
        assert_eq!(s.sample(&L), 2);
    }

    #[test]
    fn penalties_combine_in_vllm_order() {
        // Prompt [3], output [0, 0, 1]; repetition 2, frequency 0.5, presence 0.25.
        // Repetition over {0, 1, 3}: [1.0, -2.0, 0.5, 0.5].
        // Frequency on the output (0 twice, 1 once): [0.0, -2.5, 0.5, 0.5].
        // Presence on the output: [-0.25, -2.75, 0.5, 0.5].
        let params = greedy_with(|p| {
            p.repetition_penalty = 2.0;
            p.frequency_penalty = 0.5;
            p.presence_penalty = 0.25;
        });
        let mut s = Sampler::new(params, 0).with_prompt(&[3]);
        for t in [0, 0, 1] {
            s.record(t);
        }
        assert_close(&s.processed_logits(&L), &[-0.25, -2.75, 0.5, 0.5]);
        assert_eq!(s.sample(&L), 2);
    }

    #[test]
    fn penalties_ignore_ids_outside_the_vocabulary() {
        let params = greedy_with(|p| {
            p.repetition_penalty = 2.0;
            p.frequency_penalty = 1.0;
        });
        let mut s = Sampler::new(params, 0).with_prompt(&[1000]);
        s.record(7);
        assert_close(&s.processed_logits(&L), &L);
        assert_eq!(s.sample(&L), 0);
    }

    // ---- logit bias ----

    #[test]
    fn logit_bias_moves_the_greedy_choice() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut s = Sampler::new(greedy_with(|p| p.logit_bias = vec![(1, -100.0)]), 0);
        assert_close(&s.processed_logits(&logits), &[0.1, -97.0, 2.9, -1.0]);
        assert_eq!(s.sample(&logits), 2);
        for id in 0..4u32 {
            let bias = vec![(id, 100.0), (1_000_000, 5.0)];
            let mut s = Sampler::new(greedy_with(|p| p.logit_bias = bias), 0);
            assert_eq!(s.sample(&logits), id);
        }
    }

    #[test]
    fn logit_bias_applies_to_sampling_too() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let params = SamplingParams {
            temperature: 1.0,
            logit_bias: vec![(3, 100.0)],
            ..Default::default()
        };
        let mut s = Sampler::new(params, 5);
        for _ in 0..100 {
            assert_eq!(s.sample(&logits), 3);
        }
    }

    // ---- min_p ----

    fn support(params: SamplingParams, logits: &[f32], draws: usize) -> Vec<u32> {
        let mut s = Sampler::new(params, 17);
        let mut seen: Vec<u32> = (0..draws).map(|_| s.sample(logits)).collect();
        seen.sort_unstable();
        seen.dedup();
        seen
    }

    #[test]
    fn min_p_drops_exactly_the_tokens_below_the_threshold() {
        // Probabilities relative to the best: 1, 0.5, 0.2, 0.05, 0.01.
        let logits: Vec<f32> = [1.0f32, 0.5, 0.2, 0.05, 0.01]
            .iter()
            .map(|p| p.ln())
            .collect();
        let at = |temperature, min_p| SamplingParams {
            temperature,
            min_p,
            ..Default::default()
        };
        assert_eq!(support(at(1.0, 0.0), &logits, 20000), vec![0, 1, 2, 3, 4]);
        assert_eq!(support(at(1.0, 0.1), &logits, 4000), vec![0, 1, 2]);
        assert_eq!(support(at(1.0, 0.6), &logits, 1000), vec![0]);
        // After temperature 2 the ratios are their square roots: 1, .71, .45, .22, .1.
        assert_eq!(support(at(2.0, 0.15), &logits, 4000), vec![0, 1, 2, 3]);
        assert_eq!(support(at(2.0, 0.3), &logits, 4000), vec![0, 1, 2]);
    }

    #[test]
    fn min_p_keeps_the_relative_frequencies_of_what_remains() {
        let logits: Vec<f32> = [1.0f32, 0.5, 0.2, 0.05].iter().map(|p| p.ln()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            min_p: 0.1,
            ..Default::default()
        };
        let mut s = Sampler::new(params, 23);
        let n = 20000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        assert_eq!(counts[3], 0);
        for (i, p) in [1.0f32 / 1.7, 0.5 / 1.7, 0.2 / 1.7].iter().enumerate() {
            let got = counts[i] as f32 / n as f32;
            assert!((got - p).abs() < 0.02, "token {i}: {got} vs {p}");
        }
    }

    // ---- min_tokens ----

    #[test]
    fn min_tokens_holds_back_eos_until_enough_tokens() {
        // EOS (2) is the argmax; 4 is another stop id; 99 is outside the vocabulary.
        let logits = [0.0, 1.0, 5.0, 0.5, 0.9];
        let mut s = Sampler::new(greedy_with(|p| p.min_tokens = 3), 0).with_stop_ids(&[2, 4, 99]);
        assert_eq!(
            s.processed_logits(&logits),
            vec![0.0, 1.0, f32::NEG_INFINITY, 0.5, f32::NEG_INFINITY]
        );
        let got: Vec<u32> = (0..5).map(|_| s.sample(&logits)).collect();
        assert_eq!(got, vec![1, 1, 1, 2, 2]);
    }

    #[test]
    fn min_tokens_holds_when_sampling_and_when_everything_else_is_banned() {
        let logits = [0.0, 1.0, 5.0];
        for seed in 0..50 {
            let params = SamplingParams {
                temperature: 1.5,
                min_tokens: 4,
                ..Default::default()
            };
            let mut s = Sampler::new(params, seed).with_stop_ids(&[2]);
            for _ in 0..4 {
                assert_ne!(s.sample(&logits), 2);
            }
        }
        // Only one token is allowed: it is drawn every time, even at a high temperature.
        let params = SamplingParams {
            temperature: 2.0,
            min_tokens: 100,
            logit_bias: vec![(0, 50.0)],
            ..Default::default()
        };
        let mut s = Sampler::new(params, 1).with_stop_ids(&[1, 2]);
        for _ in 0..100 {
            assert_eq!(s.sample(&logits), 0);
        }
    }

    #[test]
    fn a_restriction_applies_after_the_processing_and_before_the_choice() {
        // The bias makes 0 the greedy pick; the restriction rules it out, so 3 (the best
        // left) is chosen, and the restriction's error stops the sample.
        let params = greedy_with(|p| p.logit_bias = vec![(0, 100.0)]);
        let mut s = Sampler::new(params, 0);
        let pick = s.sample_restricted(&L, |l| {
            l[0] = f32::NEG_INFINITY;
            Ok::<(), ()>(())
        });
        assert_eq!(pick, Ok(3));
        assert_eq!(s.generated(), 1);
        assert_eq!(s.sample_restricted(&L, |_| Err("no")), Err("no"));
        assert_eq!(s.generated(), 1, "a failed sample is not generated");
    }

    #[test]
    fn a_fully_banned_row_does_not_panic() {
        let logits = [0.0, 1.0];
        let params = SamplingParams {
            temperature: 1.0,
            min_tokens: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(params, 1).with_stop_ids(&[0, 1]);
        assert!(s.sample(&logits) < 2);
    }

    // ---- logprobs ----

    #[test]
    fn logprobs_are_of_the_raw_logits_not_the_processed_ones() {
        // The sampler's penalties do not leak into the reported logprobs.
        let params = greedy_with(|p| p.logit_bias = vec![(0, -100.0)]);
        let mut s = Sampler::new(params, 0);
        let token = s.sample(&L);
        assert_eq!(token, 3);
        let t = TokenLogprobs::from_logits(&L, token, 1);
        assert_eq!(t.top[0].0, 0);
        assert_eq!(t.logprob, log_softmax(&L)[3]);
    }
}
