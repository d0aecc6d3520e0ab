//! Host-side planning of one expert batch: the permutation that groups assignments by
//! expert, the per-expert row offsets, the per-token list of rows to sum, and the M-tile
//! schedule the grouped GEMM kernels run over. Pure Rust, no GPU: unit-tested on any machine.

/// Rows per M tile of the grouped GEMM kernels (`BM` in `kernels/moe.cu`).
pub const TILE_M: usize = 64;

/// One M tile: rows `row0..row_end.min(row0 + TILE_M)` of the permuted batch, all of expert
/// `expert`. Laid out as the kernels' `struct Tile` (four `int`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Tile {
    pub expert: i32,
    pub row0: i32,
    /// End of this expert's rows (exclusive), not of the tile.
    pub row_end: i32,
    pub pad: i32,
}

/// The permutation and schedule of one batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub tokens: usize,
    pub experts: usize,
    /// Token of each permuted row (rows grouped by expert, stable within an expert).
    pub sorted_tok: Vec<i32>,
    /// Routing weight of each permuted row.
    pub sorted_w: Vec<f32>,
    /// `experts + 1` offsets: expert `e` owns permuted rows `expert_off[e]..expert_off[e+1]`.
    pub expert_off: Vec<i32>,
    /// `tokens + 1` offsets into `tok_rows`.
    pub tok_off: Vec<i32>,
    /// For each token, the permuted rows of its assignments, in the order they were given.
    pub tok_rows: Vec<i32>,
    /// M tiles in expert order; experts with no rows have none.
    pub tiles: Vec<Tile>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("assignment {index}: token {token} out of range ({tokens} tokens)")]
    BadToken {
        index: usize,
        token: u32,
        tokens: usize,
    },
    #[error("assignment {index}: local expert {expert} out of range ({experts} experts)")]
    BadExpert {
        index: usize,
        expert: u32,
        experts: usize,
    },
    #[error("batch too large for 32-bit indices ({0} rows)")]
    TooLarge(usize),
}

/// Where each part of a plan lies in the one `i32` buffer that is uploaded per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanLayout {
    pub sorted_tok: usize,
    pub sorted_w: usize,
    pub tok_off: usize,
    pub tok_rows: usize,
    /// Multiple of 4 (16-byte aligned `Tile`s).
    pub tiles: usize,
    pub len: usize,
}

impl PlanLayout {
    pub fn new(rows: usize, tokens: usize, tiles: usize) -> Self {
        let sorted_tok = 0;
        let sorted_w = rows;
        let tok_off = 2 * rows;
        let tok_rows = tok_off + tokens + 1;
        let tiles_at = (tok_rows + rows).div_ceil(4) * 4;
        PlanLayout {
            sorted_tok,
            sorted_w,
            tok_off,
            tok_rows,
            tiles: tiles_at,
            len: tiles_at + 4 * tiles,
        }
    }
}

/// Upper bound on the number of M tiles of any batch of `rows` rows over `experts` experts.
pub fn max_tiles(rows: usize, experts: usize) -> usize {
    rows.div_ceil(TILE_M) + experts.min(rows)
}

impl Plan {
    /// Plans `(token, local expert, weight)` triples over `tokens` tokens and `experts` local
    /// experts. A counting sort: O(rows + experts + tokens).
    pub fn build(
        tokens: usize,
        experts: usize,
        work: &[(u32, u32, f32)],
    ) -> Result<Plan, PlanError> {
        let rows = work.len();
        if rows > i32::MAX as usize / 2 || tokens > i32::MAX as usize / 2 {
            return Err(PlanError::TooLarge(rows.max(tokens)));
        }
        let mut expert_count = vec![0usize; experts];
        let mut token_count = vec![0usize; tokens];
        for (index, &(token, expert, _)) in work.iter().enumerate() {
            if token as usize >= tokens {
                return Err(PlanError::BadToken {
                    index,
                    token,
                    tokens,
                });
            }
            if expert as usize >= experts {
                return Err(PlanError::BadExpert {
                    index,
                    expert,
                    experts,
                });
            }
            expert_count[expert as usize] += 1;
            token_count[token as usize] += 1;
        }
        let expert_off = prefix_sums(&expert_count);
        let tok_off = prefix_sums(&token_count);
        let mut next_row: Vec<i32> = expert_off[..experts].to_vec();
        let mut next_slot: Vec<i32> = tok_off[..tokens].to_vec();
        let mut sorted_tok = vec![0i32; rows];
        let mut sorted_w = vec![0f32; rows];
        let mut tok_rows = vec![0i32; rows];
        for &(token, expert, weight) in work {
            let row = next_row[expert as usize];
            next_row[expert as usize] += 1;
            sorted_tok[row as usize] = token as i32;
            sorted_w[row as usize] = weight;
            let slot = next_slot[token as usize];
            next_slot[token as usize] += 1;
            tok_rows[slot as usize] = row;
        }
        let mut tiles = Vec::with_capacity(max_tiles(rows, experts));
        for e in 0..experts {
            let (begin, end) = (expert_off[e], expert_off[e + 1]);
            let mut row0 = begin;
            while row0 < end {
                tiles.push(Tile {
                    expert: e as i32,
                    row0,
                    row_end: end,
                    pad: 0,
                });
                row0 += TILE_M as i32;
            }
        }
        Ok(Plan {
            tokens,
            experts,
            sorted_tok,
            sorted_w,
            expert_off,
            tok_off,
            tok_rows,
            tiles,
        })
    }

    pub fn rows(&self) -> usize {
        self.sorted_tok.len()
    }

    /// The most rows any one expert has (0 for an empty batch): whether the batch fits the
    /// skinny kernels.
    pub fn max_expert_rows(&self) -> usize {
        self.expert_off
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
    }

    pub fn layout(&self) -> PlanLayout {
        PlanLayout::new(self.rows(), self.tokens, self.tiles.len())
    }

    /// Writes the plan into `buf` (cleared first) as [`PlanLayout`] says.
    pub fn pack_into(&self, buf: &mut Vec<i32>) {
        let layout = self.layout();
        buf.clear();
        buf.resize(layout.len, 0);
        buf[layout.sorted_tok..layout.sorted_tok + self.rows()].copy_from_slice(&self.sorted_tok);
        for (d, w) in buf[layout.sorted_w..].iter_mut().zip(&self.sorted_w) {
            *d = w.to_bits() as i32;
        }
        buf[layout.tok_off..layout.tok_off + self.tokens + 1].copy_from_slice(&self.tok_off);
        buf[layout.tok_rows..layout.tok_rows + self.rows()].copy_from_slice(&self.tok_rows);
        for (d, t) in buf[layout.tiles..].chunks_exact_mut(4).zip(&self.tiles) {
            d.copy_from_slice(&[t.expert, t.row0, t.row_end, t.pad]);
        }
    }
}

fn prefix_sums(counts: &[usize]) -> Vec<i32> {
    let mut off = Vec::with_capacity(counts.len() + 1);
    let mut acc = 0i32;
    off.push(0);
    for c in counts {
        acc += *c as i32;
        off.push(acc);
    }
    off
}
