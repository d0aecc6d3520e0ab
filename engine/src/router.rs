//! The router's rules, per model family, over router logits computed in f32:
//! - softmax top-k (Mixtral, Qwen2/3-MoE): softmax over all experts, the k largest,
//!   renormalised to sum to one where the family says so;
//! - sigmoid group-limited (DeepSeek-V3, `noaux_tc`): sigmoid scores plus a correction
//!   bias choose experts within the best groups; the unbiased scores are the weights.

/// Each token's chosen experts (best first) and their weights, `k` per token.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    pub k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn tokens(&self) -> usize {
        self.experts.len().checked_div(self.k).unwrap_or(0)
    }

    pub fn token(&self, t: usize) -> (&[u32], &[f32]) {
        let r = t * self.k..(t + 1) * self.k;
        (&self.experts[r.clone()], &self.weights[r])
    }
}

/// Softmax top-k over router logits `[tokens, num_experts]`; the k weights are
/// renormalised to sum to one when `renormalize`.
pub fn route_softmax_topk(
    logits: &[f32],
    num_experts: usize,
    k: usize,
    renormalize: bool,
) -> Routing {
    let tokens = logits.len() / num_experts;
    let mut routing = Routing {
        k,
        experts: Vec::with_capacity(tokens * k),
        weights: Vec::with_capacity(tokens * k),
    };
    let mut probs = vec![0.0f32; num_experts];
    let mut order: Vec<u32> = Vec::with_capacity(num_experts);
    for row in logits.chunks_exact(num_experts) {
        probs.copy_from_slice(row);
        crate::ops::softmax_in_place(&mut probs);
        descending(&probs, &mut order);
        let top = &order[..k];
        let sum: f32 = if renormalize {
            top.iter().map(|e| probs[*e as usize]).sum()
        } else {
            1.0
        };
        for e in top {
            routing.experts.push(*e);
            routing.weights.push(probs[*e as usize] / sum);
        }
    }
    routing
}

/// DeepSeek-V3's group-limited routing (transformers' `DeepseekV3TopkRouter`).
#[derive(Debug, Clone, Copy)]
pub struct GroupedSigmoid<'a> {
    pub num_experts: usize,
    pub k: usize,
    pub groups: usize,
    pub topk_groups: usize,
    /// `e_score_correction_bias`: steers the choice, never the weights.
    pub bias: &'a [f32],
    pub renormalize: bool,
    pub scaling: f32,
}

impl GroupedSigmoid<'_> {
    /// Routes router logits `[tokens, num_experts]`.
    pub fn route(&self, logits: &[f32]) -> Routing {
        let e = self.num_experts;
        let per_group = e / self.groups;
        let tokens = logits.len() / e;
        let mut routing = Routing {
            k: self.k,
            experts: Vec::with_capacity(tokens * self.k),
            weights: Vec::with_capacity(tokens * self.k),
        };
        let mut scores = vec![0.0f32; e];
        let mut biased = vec![0.0f32; e];
        let mut group_scores = vec![0.0f32; self.groups];
        let mut order: Vec<u32> = Vec::with_capacity(e);
        let mut group_order: Vec<u32> = Vec::with_capacity(self.groups);
        for row in logits.chunks_exact(e) {
            for i in 0..e {
                scores[i] = 1.0 / (1.0 + (-row[i]).exp());
                biased[i] = scores[i] + self.bias[i];
            }
            // A group's score: the sum of its two best biased scores.
            for (g, members) in biased.chunks_exact(per_group).enumerate() {
                let (mut best, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &s in members {
                    if s > best {
                        second = best;
                        best = s;
                    } else if s > second {
                        second = s;
                    }
                }
                group_scores[g] = best + if per_group > 1 { second } else { 0.0 };
            }
            descending(&group_scores, &mut group_order);
            let mut allowed = vec![false; self.groups];
            for g in &group_order[..self.topk_groups] {
                allowed[*g as usize] = true;
            }
            for (i, s) in biased.iter_mut().enumerate() {
                if !allowed[i / per_group] {
                    *s = f32::NEG_INFINITY;
                }
            }
            descending(&biased, &mut order);
            let top = &order[..self.k];
            let sum: f32 = if self.renormalize {
                top.iter().map(|i| scores[*i as usize]).sum::<f32>() + 1e-20
            } else {
                1.0
            };
            for i in top {
                routing.experts.push(*i);
                routing
                    .weights
                    .push(scores[*i as usize] / sum * self.scaling);
            }
        }
        routing
    }
}

/// Indices of `values` from largest to smallest; among equal values the lower index
/// comes first, deterministically (a stable sort).
fn descending(values: &[f32], order: &mut Vec<u32>) {
    order.clear();
    order.extend(0..values.len() as u32);
    order.sort_by(|a, b| values[*b as usize].total_cmp(&values[*a as usize]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_k_largest_and_renormalises() {
        let logits = [0.1, 2.0, -1.0, 1.5, /* token 2 */ 3.0, 0.0, 0.0, 3.5];
        let r = route_softmax_topk(&logits, 4, 2, true);
        assert_eq!(r.tokens(), 2);
        assert_eq!(r.token(0).0, &[1, 3]);
        assert_eq!(r.token(1).0, &[3, 0]);
        let (_, w) = r.token(0);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6);
        // Renormalised softmax over the chosen two equals a softmax over just those logits.
        let expect = 1.0 / (1.0 + (1.5f32 - 2.0).exp());
        assert!((w[0] - expect).abs() < 1e-6);
    }

    #[test]
    fn without_renormalisation_the_weights_are_the_softmax_probabilities() {
        let logits = [0.1, 2.0, -1.0, 1.5];
        let r = route_softmax_topk(&logits, 4, 2, false);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        let (e, w) = r.token(0);
        assert_eq!(e, &[1, 3]);
        assert!((w[0] - 2.0f32.exp() / z).abs() < 1e-6);
        assert!((w[1] - 1.5f32.exp() / z).abs() < 1e-6);
    }

    /// A brute-force statement of DeepSeek-V3's rule: of every way to pick `topk_groups`
    /// groups, take the one with the largest total group score; then the k best biased
    /// scores inside it.
    fn grouped_reference(router: &GroupedSigmoid<'_>, row: &[f32]) -> (Vec<u32>, Vec<f64>) {
        let e = router.num_experts;
        let per = e / router.groups;
        let score: Vec<f64> = row
            .iter()
            .map(|l| 1.0 / (1.0 + (-*l as f64).exp()))
            .collect();
        let biased: Vec<f64> = (0..e).map(|i| score[i] + router.bias[i] as f64).collect();
        let group_score = |g: usize| {
            let mut m: Vec<f64> = biased[g * per..(g + 1) * per].to_vec();
            m.sort_by(|a, b| b.total_cmp(a));
            m.iter().take(2).sum::<f64>()
        };
        let mut best_groups: Vec<usize> = Vec::new();
        let mut best_total = f64::NEG_INFINITY;
        for mask in 0u32..(1 << router.groups) {
            if mask.count_ones() as usize != router.topk_groups {
                continue;
            }
            let gs: Vec<usize> = (0..router.groups)
                .filter(|g| mask & (1 << g) != 0)
                .collect();
            let total: f64 = gs.iter().map(|g| group_score(*g)).sum();
            if total > best_total {
                best_total = total;
                best_groups = gs;
            }
        }
        let mut candidates: Vec<usize> = best_groups
            .iter()
            .flat_map(|g| g * per..(g + 1) * per)
            .collect();
        candidates.sort_by(|a, b| biased[*b].total_cmp(&biased[*a]));
        let chosen: Vec<u32> = candidates[..router.k].iter().map(|i| *i as u32).collect();
        let sum: f64 = chosen.iter().map(|i| score[*i as usize]).sum();
        let weights = chosen
            .iter()
            .map(|i| {
                let w = score[*i as usize];
                (if router.renormalize { w / sum } else { w }) * router.scaling as f64
            })
            .collect();
        (chosen, weights)
    }

    #[test]
    fn grouped_sigmoid_matches_a_brute_force_statement_of_the_rule() {
        let mut seed = 11u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 8.0 - 4.0
        };
        for (e, groups, topk_groups, k) in
            [(16, 4, 2, 4), (8, 8, 3, 3), (12, 3, 1, 2), (6, 1, 1, 6)]
        {
            let bias: Vec<f32> = (0..e).map(|_| next() * 0.05).collect();
            for renormalize in [true, false] {
                let router = GroupedSigmoid {
                    num_experts: e,
                    k,
                    groups,
                    topk_groups,
                    bias: &bias,
                    renormalize,
                    scaling: 2.5,
                };
                for _ in 0..50 {
                    let row: Vec<f32> = (0..e).map(|_| next()).collect();
                    let got = router.route(&row);
                    let (want, weights) = grouped_reference(&router, &row);
                    let (ge, gw) = got.token(0);
                    assert_eq!(
                        ge,
                        want.as_slice(),
                        "{e} experts, {groups} groups, row {row:?}"
                    );
                    for (a, b) in gw.iter().zip(&weights) {
                        assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
                    }
                }
            }
        }
    }
}
