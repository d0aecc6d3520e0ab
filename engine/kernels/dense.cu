// Dense-path kernels (embedding, RMSNorm, RoPE, router, paged-attention decode, sampling
// helpers). Host side: engine/src/cuda/dense.rs. Each one matches the CPU engine's own
// function (ops.rs, router.rs, attention.rs + kv_cache.rs, sampling.rs); the comments say
// where the GPU's arithmetic can differ and why it does not where it must not.
// No includes: bf16 is handled as raw 16-bit values, so NVRTC needs no toolkit headers.

typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ float bf16_to_f32(u16 b) {
    return __uint_as_float(((u32)b) << 16);
}

// Block-wide reductions over blockDim.x <= 1024 threads (a multiple of 32), through
// 32 floats of shared memory. Every thread gets the result.
__device__ float block_sum(float v, float* shm) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    v = lane < warps ? shm[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ float block_max(float v, float* shm) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    v = lane < warps ? shm[lane] : -__int_as_float(0x7f800000);
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// (value, index) argmax: larger value wins, the lower index among equals (torch.argmax,
// sampling.rs's argmax). NaN never wins a comparison, as with the CPU's `>`.
__device__ __forceinline__ void better(float& v, int& i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
}

__device__ void block_argmax(float& v, int& i, float* shv, int* shi) {
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        int i2 = __shfl_xor_sync(0xffffffffu, i, o);
        better(v, i, v2, i2);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) { shv[warp] = v; shi[warp] = i; }
    __syncthreads();
    v = lane < warps ? shv[lane] : -__int_as_float(0x7f800000);
    i = lane < warps ? shi[lane] : 0x7fffffff;
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        int i2 = __shfl_xor_sync(0xffffffffu, i, o);
        better(v, i, v2, i2);
    }
}

// out[t][:] = table[ids[t]][:] as f32; grid (tokens), any block. An id outside the
// vocabulary gives a zero row (the host refuses such ids before launching).
extern "C" __global__ void embed_gather(const u16* __restrict__ table, const u32* __restrict__ ids,
                                        int hidden, int vocab, float* __restrict__ out) {
    int t = blockIdx.x;
    u32 id = ids[t];
    float* o = out + (long long)t * hidden;
    if (id >= (u32)vocab) {
        for (int c = threadIdx.x; c < hidden; c += blockDim.x) o[c] = 0.0f;
        return;
    }
    const u16* row = table + (long long)id * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) o[c] = bf16_to_f32(row[c]);
}

// ops.rs rms_norm: out = w * (x * (1 / sqrt(mean(x^2) + eps))), per row; grid (rows).
// The sum of squares is a tree sum here and a sequential one on the CPU: they differ in
// the last bits, nothing else does (no FMA contraction in the final products).
extern "C" __global__ void rms_norm(const float* __restrict__ x, const u16* __restrict__ weight,
                                    float eps, int hidden, float* __restrict__ out) {
    __shared__ float shm[32];
    const float* r = x + (long long)blockIdx.x * hidden;
    float* o = out + (long long)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) ss = __fmaf_rn(r[c], r[c], ss);
    ss = block_sum(ss, shm);
    float inv = 1.0f / __fsqrt_rn(__fdiv_rn(ss, (float)hidden) + eps);
    for (int c = threadIdx.x; c < hidden; c += blockDim.x)
        o[c] = __fmul_rn(bf16_to_f32(weight[c]), __fmul_rn(r[c], inv));
}

// ops.rs Rope::apply (split halves, rotate_half) on x [n][heads][head_dim] in place, token
// t at position pos[t]. cos/sin are the CPU's own tables ([max_pos][head_dim / 2], computed
// in f64 and rounded once), and the products and sums are rounded one by one
// (__fmul_rn/__fsub_rn: no FMA contraction), so the result is bit-identical to the CPU.
// grid (n, heads), block: any; positions >= max_pos leave the row untouched (the host
// refuses them).
extern "C" __global__ void rope(float* __restrict__ x, const int* __restrict__ pos,
                                const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                int heads, int head_dim, int max_pos) {
    int t = blockIdx.x, h = blockIdx.y, half = head_dim >> 1;
    int p = pos[t];
    if (p < 0 || p >= max_pos) return;
    float* a = x + ((long long)t * heads + h) * head_dim;
    float* b = a + half;
    const float* c = cos_t + (long long)p * half;
    const float* s = sin_t + (long long)p * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float x1 = a[i], x2 = b[i];
        a[i] = __fsub_rn(__fmul_rn(x1, c[i]), __fmul_rn(x2, s[i]));
        b[i] = __fadd_rn(__fmul_rn(x2, c[i]), __fmul_rn(x1, s[i]));
    }
}

// router.rs route_softmax_topk (Mixtral): softmax over all experts in f32 (max subtracted,
// sequential sum, multiply by 1/sum), the k largest (lower expert id first among equals,
// as the CPU's stable sort), weights renormalised by the sum of the k chosen
// probabilities. One thread per token; probs is scratch [tokens][experts]. __expf is not
// used: expf is within 2 ulp of the CPU's exp, so weights agree to ~1e-6 relative and the
// choice agrees unless two probabilities are that close.
extern "C" __global__ void router_softmax_topk(const float* __restrict__ logits, int tokens,
                                               int experts, int k, float* __restrict__ probs,
                                               int* __restrict__ top, float* __restrict__ weights) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* l = logits + (long long)t * experts;
    float* p = probs + (long long)t * experts;
    int* te = top + (long long)t * k;
    float* tw = weights + (long long)t * k;
    float mx = -__int_as_float(0x7f800000);
    for (int e = 0; e < experts; ++e) mx = fmaxf(mx, l[e]);
    float sum = 0.0f;
    for (int e = 0; e < experts; ++e) {
        float v = expf(__fsub_rn(l[e], mx));
        p[e] = v;
        sum = __fadd_rn(sum, v);
    }
    float inv = 1.0f / sum;
    for (int e = 0; e < experts; ++e) p[e] = __fmul_rn(p[e], inv);
    float chosen = 0.0f;
    for (int j = 0; j < k; ++j) {
        int best = -1;
        float bv = 0.0f;
        for (int e = 0; e < experts; ++e) {
            bool taken = false;
            for (int q = 0; q < j; ++q) taken |= te[q] == e;
            if (!taken && (best < 0 || p[e] > bv)) { best = e; bv = p[e]; }
        }
        te[j] = best;
        chosen = __fadd_rn(chosen, bv);
    }
    for (int j = 0; j < k; ++j) tw[j] = __fdiv_rn(p[te[j]], chosen);
}

// Decode attention over the engine's paged KV cache (kv_cache.rs): one layer's keys and
// values are [blocks][block_size][kv_heads * head_dim] f32; position j of sequence s is
// row block_tables[s][j / block_size] * block_size + j % block_size. The query of sequence
// s (its last position, len - 1) sees keys 0..len. GQA: head h reads kv head
// h / (heads / kv_heads); scores scaled by 1/sqrt(head_dim) before the softmax
// (attention.rs). grid (seqs, heads), block 128; scores is scratch [seqs][heads][max_len].
extern "C" __global__ void paged_attention_decode(
    const float* __restrict__ q, const float* __restrict__ k_cache, const float* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ lens, int max_blocks,
    int heads, int kv_heads, int head_dim, int block_size, float scale, int max_len,
    float* __restrict__ scores, float* __restrict__ out) {
    __shared__ float shm[32];
    int s = blockIdx.x, h = blockIdx.y;
    int len = lens[s];
    int kvd = kv_heads * head_dim;
    int g = h / (heads / kv_heads);
    const float* qh = q + ((long long)s * heads + h) * head_dim;
    const int* table = block_tables + (long long)s * max_blocks;
    float* sc = scores + ((long long)s * heads + h) * max_len;
    float* o = out + ((long long)s * heads + h) * head_dim;
    if (len <= 0 || len > max_len || len > max_blocks * block_size) {
        for (int c = threadIdx.x; c < head_dim; c += blockDim.x) o[c] = 0.0f;
        return;
    }
    float mx = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        long long row = (long long)table[j / block_size] * block_size + j % block_size;
        const float* kr = k_cache + row * kvd + (long long)g * head_dim;
        float dot = 0.0f;
        for (int c = 0; c < head_dim; ++c) dot = __fmaf_rn(qh[c], kr[c], dot);
        dot *= scale;
        sc[j] = dot;
        mx = fmaxf(mx, dot);
    }
    mx = block_max(mx, shm);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        float e = expf(sc[j] - mx);
        sc[j] = e;
        sum += e;
    }
    sum = block_sum(sum, shm);
    __syncthreads();  // every exp written before any thread reads them all
    float inv = 1.0f / sum;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < len; ++j) {
            long long row = (long long)table[j / block_size] * block_size + j % block_size;
            acc = __fmaf_rn(sc[j], v_cache[row * kvd + (long long)g * head_dim + c], acc);
        }
        o[c] = acc * inv;
    }
}

// sampling.rs argmax per row of logits [rows][vocab]; grid (rows), block 256.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int vocab,
                                       int* __restrict__ out) {
    __shared__ float shv[32];
    __shared__ int shi[32];
    const float* l = logits + (long long)blockIdx.x * vocab;
    float v = -__int_as_float(0x7f800000);
    int i = 0x7fffffff;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) better(v, i, l[c], c);
    block_argmax(v, i, shv, shi);
    if (threadIdx.x == 0) out[blockIdx.x] = i == 0x7fffffff ? 0 : i;
}

// Top-p (nucleus) sampling of one row, given the uniform draw u in [0, 1) made on the host.
// Same rule as sampling.rs without top-k: probabilities p_i = softmax(logit_i / T); the
// nucleus is the most likely tokens whose mass first reaches top_p; u * (mass of the
// nucleus) picks a token walking it in order of decreasing probability, lower id first
// among equals. Found without sorting: the nucleus is {p_i >= tau} for the largest tau
// whose mass reaches top_p, and tau is one of the p_i: 32 rounds of bisection over the
// probabilities' bit patterns (monotone for non-negative floats), each a block-wide sum.
// Then the token is the one whose cumulative mass (in nucleus order) first exceeds u*mass:
// found by repeated selection of the next largest (rank walk), bounded by the nucleus
// size. grid (rows), block 256; probs is scratch [rows][vocab]; out[row] the token.
extern "C" __global__ void top_p_sample(const float* __restrict__ logits, int vocab, float temperature,
                                        float top_p, const float* __restrict__ u,
                                        float* __restrict__ probs, int* __restrict__ out) {
    __shared__ float shm[32];
    __shared__ float shv[32];
    __shared__ int shi[32];
    const float* l = logits + (long long)blockIdx.x * vocab;
    float* p = probs + (long long)blockIdx.x * vocab;
    float inv_t = 1.0f / temperature;
    float mx = -__int_as_float(0x7f800000);
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) mx = fmaxf(mx, l[c] * inv_t);
    mx = block_max(mx, shm);
    float sum = 0.0f;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        float e = expf(l[c] * inv_t - mx);
        p[c] = e;
        sum += e;
    }
    sum = block_sum(sum, shm);
    __syncthreads();
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) p[c] = p[c] / sum;
    __syncthreads();
    // Largest tau (as bits) with mass(p >= tau) >= top_p.
    u32 lo = 0u, hi = 0x3f800000u;  // [0, 1.0]
    for (int it = 0; it < 32 && lo < hi; ++it) {
        u32 mid = lo + ((hi - lo + 1u) >> 1);
        float tau = __uint_as_float(mid);
        float m = 0.0f;
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) m += p[c] >= tau ? p[c] : 0.0f;
        m = block_sum(m, shm);
        if (m >= top_p) lo = mid; else hi = mid - 1u;
    }
    float tau = __uint_as_float(lo);
    float mass = 0.0f;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) mass += p[c] >= tau ? p[c] : 0.0f;
    mass = block_sum(mass, shm);
    float target = u[blockIdx.x] * mass;
    // Walk the nucleus in order: each step selects the largest remaining (value, id) pair
    // strictly after the previous one in (value desc, id asc) order. Zero probabilities
    // never enter it (tau can bisect down to 0 when the tree sum rounds below top_p = 1).
    // Unlike the CPU's shortest prefix, every token tied at tau is in the nucleus.
    float prev_v = __int_as_float(0x7f800000);
    int prev_i = -1, pick = -1;
    float cum = 0.0f;
    for (int step = 0; step < vocab; ++step) {
        float v = -1.0f;
        int i = 0x7fffffff;
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
            float pc = p[c];
            bool after = pc < prev_v || (pc == prev_v && c > prev_i);
            if (after && pc >= tau && pc > 0.0f) better(v, i, pc, c);
        }
        block_argmax(v, i, shv, shi);
        if (i == 0x7fffffff) break;
        pick = i;
        cum += v;
        if (cum >= target) break;
        prev_v = v;
        prev_i = i;
    }
    if (threadIdx.x == 0) out[blockIdx.x] = pick < 0 ? 0 : pick;
}

// ---- Glue for the device-resident forward (engine/src/cuda/model.rs) ----

// f32 -> bf16 bits, round to nearest even, NaN kept quiet: the `half` crate's
// bf16::from_f32, so a GEMM input rounded here equals the CPU emulation's rounding.
__device__ __forceinline__ u16 f32_to_bf16_bits(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// out[i] = bf16(x[i]) for i < n; any grid (grid-stride loop).
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, long long n,
                                       u16* __restrict__ out) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16_bits(x[i]);
}

// x[i] += y[i] for i < n (the residual adds); __fadd_rn so the sum is rounded once, as
// the CPU's `*x += y`. Any grid.
extern "C" __global__ void add_f32(float* __restrict__ x, const float* __restrict__ y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = __fadd_rn(x[i], y[i]);
}

// Writes token t's key and value rows into one layer's paged cache at row slots[t]
// (= block * block_size + position % block_size, planned on the host from the block
// tables, kv_cache.rs `slot`). A negative slot writes nothing. grid (tokens), any block.
extern "C" __global__ void kv_write(const float* __restrict__ k, const float* __restrict__ v,
                                    const int* __restrict__ slots, int kv_dim,
                                    float* __restrict__ k_cache, float* __restrict__ v_cache) {
    int t = blockIdx.x;
    int slot = slots[t];
    if (slot < 0) return;
    const float* kr = k + (long long)t * kv_dim;
    const float* vr = v + (long long)t * kv_dim;
    float* kc = k_cache + (long long)slot * kv_dim;
    float* vc = v_cache + (long long)slot * kv_dim;
    for (int c = threadIdx.x; c < kv_dim; c += blockDim.x) {
        kc[c] = kr[c];
        vc[c] = vr[c];
    }
}

// dst[i][:] = src[rows[i]][:] for f32 rows of `cols` values (the rows whose logits are
// wanted). grid (rows), any block.
extern "C" __global__ void gather_rows_f32(const float* __restrict__ src, const int* __restrict__ rows,
                                           int cols, float* __restrict__ dst) {
    const float* s = src + (long long)rows[blockIdx.x] * cols;
    float* d = dst + (long long)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) d[c] = s[c];
}
