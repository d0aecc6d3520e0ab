//! The router's rule, per model family. Mixtral: softmax over all experts in f32, top-k,
//! renormalise the k weights to sum to one.

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

/// Mixtral routing over router logits `[tokens, num_experts]`.
pub fn route_softmax_topk(logits: &[f32], num_experts: usize, k: usize) -> Routing {
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
        order.clear();
        order.extend(0..num_experts as u32);
        // Stable sort: among equal scores the lower expert id wins, deterministically.
        order.sort_by(|a, b| probs[*b as usize].total_cmp(&probs[*a as usize]));
        let top = &order[..k];
        let sum: f32 = top.iter().map(|e| probs[*e as usize]).sum();
        for e in top {
            routing.experts.push(*e);
            routing.weights.push(probs[*e as usize] / sum);
        }
    }
    routing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_k_largest_and_renormalises() {
        let logits = [0.1, 2.0, -1.0, 1.5, /* token 2 */ 3.0, 0.0, 0.0, 3.5];
        let r = route_softmax_topk(&logits, 4, 2);
        assert_eq!(r.tokens(), 2);
        assert_eq!(r.token(0).0, &[1, 3]);
        assert_eq!(r.token(1).0, &[3, 0]);
        let (_, w) = r.token(0);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6);
        // Renormalised softmax over the chosen two equals a softmax over just those logits.
        let expect = 1.0 / (1.0 + (1.5f32 - 2.0).exp());
        assert!((w[0] - expect).abs() < 1e-6);
    }
}
