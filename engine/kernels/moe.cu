// Switchyard MoE expert kernels (v1). Compiled at run time by NVRTC for the device's
// architecture (sm_80 or newer: bf16 mma.sync). No includes: bf16 values are raw 16-bit
// integers, so this file compiles under NVRTC anywhere, without a CUDA toolkit.
//
// One layer is a fixed sequence of three launches, whatever the number of experts:
//   1. moe_gate_up  grouped GEMM over all local experts, rows gathered by token,
//                   epilogue act = bf16(SiLU(x Wg^T) * (x Wu^T))          -> act [n, F]
//   2. moe_down     grouped GEMM act Wd^T, epilogue * routing weight,
//                   optional split-K over grid.z (each slice its own buffer) -> yp [S][n, H]
//   3. moe_combine  per token, sum of its assignments' rows over all slices -> out [T, H_out]
// The host plans the permutation (rows grouped by expert) and the M-tile schedule; see
// engine/src/cuda/plan.rs. Tiling, budgets and version notes: engine/kernels/NOTES.md.
//
// Layout contract (the host pads): H and F below are padded to multiples of 8, so every
// 16-byte chunk of a row is either wholly inside the row or wholly past its end; padding
// is zero in the weights and in x, so it adds nothing to any dot product.
//   x    [T][H]            bf16, token rows
//   wgu  [E][2F][H]        bf16, per expert gate rows 0..F then up rows F..2F
//   wd   [E][H][F]         bf16
//   act  [n][F]            bf16, permuted rows (grouped by expert)
//   yp   [S][n][H]         f32, weighted expert outputs, one buffer per split-K slice
//   out  [T][H_out]        f32, H_out <= H the real hidden size

typedef unsigned short bf16_t;
typedef unsigned int u32;

#define BM 64            // rows (assignments) per block tile
#define BN 64            // columns per half-tile; a block holds two halves of B
#define BK 32            // K per pipeline stage
#define SK (BK + 8)      // shared row stride in elements: 80 bytes, conflict-free ldmatrix
#define STAGES 3
#define THREADS 128      // 4 warps, 2 x 2, each 32 rows x (2 halves x 32 columns)

struct Tile {
    int expert;   // local expert index
    int row0;     // first permuted row of this tile
    int row_end;  // end of this expert's rows (exclusive)
    int pad;
};

__device__ __forceinline__ float bf16_to_f32(bf16_t v) {
    return __uint_as_float(((u32)v) << 16);
}

// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ u32 f32_to_bf16_bits(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// 16-byte async copy global -> shared; src_bytes = 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
}

// c += a * b on tensor cores: A 16x16 row-major, B 16x8 column-major, f32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct Smem {
    bf16_t a[STAGES][BM][SK];      // 15,360 bytes
    bf16_t b[STAGES][2 * BN][SK];  // 30,720 bytes
};

// The shared main loop of both grouped GEMMs: acc[mt][half][nt][4] += A_tile * B_tile^T over
// K tiles [kt_begin, kt_end). Each thread copies 2 A rows and 4 B rows, one 16-byte chunk
// of each per stage (chunk column (tid & 3) * 8); a_src/b_src are the row starts (any valid
// pointer where the row is out of range, then ok = false and zeros are copied).
__device__ __forceinline__ void gemm_mainloop(Smem& sm, const bf16_t* const (&a_src)[2], const bool (&a_ok)[2],
                                              const bf16_t* const (&b_src)[4], const bool (&b_ok)[4], int K,
                                              int kt_begin, int kt_end, float (&acc)[2][2][4][4]) {
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int wm = warp >> 1;
    const int wn = warp & 1;
    const int crow = tid >> 2;
    const int ccol = (tid & 3) * 8;
    const int nkt = kt_end - kt_begin;

    auto load_stage = [&](int stage, int kt) {
        const int k = kt * BK + ccol;
        const bool kin = k < K;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const bool ok = a_ok[i] && kin;
            cp_async16(smem_addr(&sm.a[stage][crow + 32 * i][ccol]), ok ? (const void*)(a_src[i] + k) : (const void*)a_src[i],
                       ok ? 16 : 0);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const bool ok = b_ok[i] && kin;
            cp_async16(smem_addr(&sm.b[stage][crow + 32 * i][ccol]), ok ? (const void*)(b_src[i] + k) : (const void*)b_src[i],
                       ok ? 16 : 0);
        }
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < nkt) load_stage(s, kt_begin + s);
        cp_async_commit();
    }

    for (int i = 0; i < nkt; ++i) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int nxt = i + STAGES - 1;
        if (nxt < nkt) load_stage(nxt % STAGES, kt_begin + nxt);
        cp_async_commit();

        const int st = i % STAGES;
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
            u32 a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                // matrices: 0 rows 0-7 k 0-7, 1 rows 8-15 k 0-7, 2 rows 0-7 k 8-15, 3 rows 8-15 k 8-15
                const int row = wm * 32 + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int col = ks * 16 + (lane >> 4) * 8;
                ldmatrix_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3], smem_addr(&sm.a[st][row][col]));
            }
            u32 b[2][4][2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
#pragma unroll
                for (int jj = 0; jj < 2; ++jj) {
                    // matrices: 0 n 0-7 k 0-7, 1 n 0-7 k 8-15, 2 n 8-15 k 0-7, 3 n 8-15 k 8-15
                    const int row = h * BN + wn * 32 + jj * 16 + (lane >> 4) * 8 + (lane & 7);
                    const int col = ks * 16 + ((lane >> 3) & 1) * 8;
                    ldmatrix_x4(b[h][2 * jj][0], b[h][2 * jj][1], b[h][2 * jj + 1][0], b[h][2 * jj + 1][1],
                                smem_addr(&sm.b[st][row][col]));
                }
            }
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[mt][h][j], a[mt], b[h][j][0], b[h][j][1]);
        }
    }
    cp_async_wait<0>();
}

// grid: (tiles, ceil(F / BN)); block: THREADS. Half 0 of B holds gate rows n0.., half 1 the
// up rows F + n0.., so each thread has gate and up for the same (row, column).
extern "C" __global__ void __launch_bounds__(THREADS)
    moe_gate_up(const bf16_t* __restrict__ x, const bf16_t* __restrict__ wgu, const int* __restrict__ sorted_tok,
                const Tile* __restrict__ tiles, bf16_t* __restrict__ act, int H, int F) {
    __shared__ __align__(128) Smem sm;
    const Tile tile = tiles[blockIdx.x];
    const int n0 = blockIdx.y * BN;
    const int tid = threadIdx.x;
    const int crow = tid >> 2;
    const bf16_t* w = wgu + (size_t)tile.expert * (size_t)(2 * F) * (size_t)H;

    const bf16_t* a_src[2];
    bool a_ok[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int p = tile.row0 + crow + 32 * i;
        a_ok[i] = p < tile.row_end;
        a_src[i] = a_ok[i] ? x + (size_t)sorted_tok[p] * (size_t)H : x;
    }
    const bf16_t* b_src[4];
    bool b_ok[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int half = i >> 1;
        const int n = n0 + crow + 32 * (i & 1);
        b_ok[i] = n < F;
        b_src[i] = b_ok[i] ? w + (size_t)(half * F + n) * (size_t)H : w;
    }

    float acc[2][2][4][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[mt][h][j][c] = 0.0f;

    gemm_mainloop(sm, a_src, a_ok, b_src, b_ok, H, 0, (H + BK - 1) / BK, acc);

    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int wm = warp >> 1;
    const int wn = warp & 1;
    const int g = lane >> 2;
    const int tig = lane & 3;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int p = tile.row0 + wm * 32 + mt * 16 + g + hr * 8;
            if (p >= tile.row_end) continue;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int col = n0 + wn * 32 + j * 8 + tig * 2;
                if (col >= F) continue;  // F is even, so col + 1 < F too
                const float g0 = acc[mt][0][j][2 * hr], g1 = acc[mt][0][j][2 * hr + 1];
                const float u0 = acc[mt][1][j][2 * hr], u1 = acc[mt][1][j][2 * hr + 1];
                const float v0 = g0 / (1.0f + expf(-g0)) * u0;
                const float v1 = g1 / (1.0f + expf(-g1)) * u1;
                const u32 packed = f32_to_bf16_bits(v0) | (f32_to_bf16_bits(v1) << 16);
                *reinterpret_cast<u32*>(act + (size_t)p * (size_t)F + col) = packed;
            }
        }
    }
}

// grid: (tiles, ceil(H / (2 BN)), splits); block: THREADS. Half h of B holds columns
// n0 + h * BN ..; slice z = blockIdx.z covers K tiles [z * kt_per_split, (z + 1) * kt_per_split).
extern "C" __global__ void __launch_bounds__(THREADS)
    moe_down(const bf16_t* __restrict__ act, const bf16_t* __restrict__ wd, const float* __restrict__ sorted_w,
             const Tile* __restrict__ tiles, float* __restrict__ yp, int F, int H, int kt_per_split,
             long long split_stride) {
    __shared__ __align__(128) Smem sm;
    const Tile tile = tiles[blockIdx.x];
    const int n0 = blockIdx.y * (2 * BN);
    const int tid = threadIdx.x;
    const int crow = tid >> 2;
    const bf16_t* w = wd + (size_t)tile.expert * (size_t)H * (size_t)F;

    const bf16_t* a_src[2];
    bool a_ok[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int p = tile.row0 + crow + 32 * i;
        a_ok[i] = p < tile.row_end;
        a_src[i] = a_ok[i] ? act + (size_t)p * (size_t)F : act;
    }
    const bf16_t* b_src[4];
    bool b_ok[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int n = n0 + crow + 32 * i;  // rows i = 0, 1: half 0; i = 2, 3: half 1
        b_ok[i] = n < H;
        b_src[i] = b_ok[i] ? w + (size_t)n * (size_t)F : w;
    }

    float acc[2][2][4][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[mt][h][j][c] = 0.0f;

    const int nkt = (F + BK - 1) / BK;
    const int kt_begin = min(nkt, (int)blockIdx.z * kt_per_split);
    const int kt_end = min(nkt, kt_begin + kt_per_split);
    gemm_mainloop(sm, a_src, a_ok, b_src, b_ok, F, kt_begin, kt_end, acc);

    float* y = yp + (size_t)blockIdx.z * (size_t)split_stride;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int wm = warp >> 1;
    const int wn = warp & 1;
    const int g = lane >> 2;
    const int tig = lane & 3;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int p = tile.row0 + wm * 32 + mt * 16 + g + hr * 8;
            if (p >= tile.row_end) continue;
            const float wgt = sorted_w[p];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int col = n0 + h * BN + wn * 32 + j * 8 + tig * 2;
                    if (col >= H) continue;  // H is even, so col + 1 < H too
                    float2 v;
                    v.x = wgt * acc[mt][h][j][2 * hr];
                    v.y = wgt * acc[mt][h][j][2 * hr + 1];
                    *reinterpret_cast<float2*>(y + (size_t)p * (size_t)H + col) = v;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Skinny path (v2): batches where no expert has more than SK_ROWS rows (decode: T = 1..8
// at top-2 of 8). The mma.sync tiles above are 64 rows tall; at one or two rows per expert
// they spend their time on a B pipeline sized for compute, and moved weights at 54% of the
// copy bandwidth on an H200 (T = 1: 0.325 ms for 0.167 ms of bytes). Here one warp owns
// one output column and streams its weight row(s) with 16-byte non-coherent loads, U
// chunks per lane in flight, dots every row of the expert on CUDA cores (f32), then
// reduces across the warp. Same contract as the tiled kernels: the same Tile list (one
// tile per expert, since SK_ROWS <= BM), act [n][F'] bf16 and yp [n][H'] f32 (no split-K),
// so moe_combine is unchanged.
#define SK_ROWS 8        // most rows of one expert on this path (host: SKINNY_MAX_ROWS)
#define SK_WARPS 8       // warps (output columns) per block

__device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// acc += dot of 8 bf16 weights (w) and 8 bf16 activations (a).
__device__ __forceinline__ float dot8(float acc, uint4 w, uint4 a) {
    const u32 wv[4] = {w.x, w.y, w.z, w.w};
    const u32 av[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        acc = fmaf(__uint_as_float(wv[i] << 16), __uint_as_float(av[i] << 16), acc);
        acc = fmaf(__uint_as_float(wv[i] & 0xffff0000u), __uint_as_float(av[i] & 0xffff0000u), acc);
    }
    return acc;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// grid: (tiles, ceil(F / SK_WARPS)); block: SK_WARPS * 32. Warp w of block (b, y) computes
// column n = y * SK_WARPS + w of act for the rows of tile b: gate row n and up row F + n.
// ROWS: the most rows of one expert this instance handles (its accumulators and row
// pointers are registers; fewer rows, fewer registers, more warps in flight per SM).
template <int ROWS>
__device__ __forceinline__ void gate_up_skinny(const bf16_t* __restrict__ x, const bf16_t* __restrict__ wgu,
                                               const int* __restrict__ sorted_tok, const Tile* __restrict__ tiles,
                                               bf16_t* __restrict__ act, int H, int F) {
    constexpr int U = 4;
    const Tile tile = tiles[blockIdx.x];
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.y * SK_WARPS + (threadIdx.x >> 5);
    if (n >= F) return;  // the whole warp: n is uniform across it
    const int nrows = min(tile.row_end - tile.row0, ROWS);
    const bf16_t* wg = wgu + ((size_t)tile.expert * (size_t)(2 * F) + (size_t)n) * (size_t)H;
    const bf16_t* wu = wg + (size_t)F * (size_t)H;
    const bf16_t* xr[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) xr[r] = x + (size_t)sorted_tok[tile.row0 + min(r, nrows - 1)] * (size_t)H;
    float g[ROWS], u[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) g[r] = u[r] = 0.0f;

    const int chunks = H / 8;
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
        uint4 wgc[U], wuc[U];
#pragma unroll
        for (int j = 0; j < U; ++j) {
            const int c = c0 + 32 * j;
            if (c < chunks) {
                wgc[j] = ld_stream16(wg + 8 * c);
                wuc[j] = ld_stream16(wu + 8 * c);
            }
        }
#pragma unroll
        for (int j = 0; j < U; ++j) {
            const int c = c0 + 32 * j;
            if (c >= chunks) break;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                if (r < nrows) {
                    const uint4 a = *reinterpret_cast<const uint4*>(xr[r] + 8 * c);
                    g[r] = dot8(g[r], wgc[j], a);
                    u[r] = dot8(u[r], wuc[j], a);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        if (r < nrows) {
            const float gs = warp_sum(g[r]);
            const float us = warp_sum(u[r]);
            if (lane == 0) {
                const float v = gs / (1.0f + expf(-gs)) * us;
                act[(size_t)(tile.row0 + r) * (size_t)F + n] = (bf16_t)f32_to_bf16_bits(v);
            }
        }
    }
}

// grid: (tiles, ceil(H / SK_WARPS)); block: SK_WARPS * 32. Warp w of block (b, y) computes
// column n = y * SK_WARPS + w of yp for the rows of tile b: down row n, times the row's
// routing weight.
template <int ROWS>
__device__ __forceinline__ void down_skinny(const bf16_t* __restrict__ act, const bf16_t* __restrict__ wd,
                                            const float* __restrict__ sorted_w, const Tile* __restrict__ tiles,
                                            float* __restrict__ yp, int F, int H) {
    constexpr int U = 8;
    const Tile tile = tiles[blockIdx.x];
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.y * SK_WARPS + (threadIdx.x >> 5);
    if (n >= H) return;
    const int nrows = min(tile.row_end - tile.row0, ROWS);
    const bf16_t* w = wd + ((size_t)tile.expert * (size_t)H + (size_t)n) * (size_t)F;
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;

    const int chunks = F / 8;
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
        uint4 wc[U];
#pragma unroll
        for (int j = 0; j < U; ++j) {
            const int c = c0 + 32 * j;
            if (c < chunks) wc[j] = ld_stream16(w + 8 * c);
        }
#pragma unroll
        for (int j = 0; j < U; ++j) {
            const int c = c0 + 32 * j;
            if (c >= chunks) break;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                if (r < nrows) {
                    const uint4 a =
                        *reinterpret_cast<const uint4*>(act + (size_t)(tile.row0 + r) * (size_t)F + 8 * c);
                    acc[r] = dot8(acc[r], wc[j], a);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        if (r < nrows) {
            const float s = warp_sum(acc[r]);
            if (lane == 0) yp[(size_t)(tile.row0 + r) * (size_t)H + n] = sorted_w[tile.row0 + r] * s;
        }
    }
}

// The entry points: SK_ROWS rows per expert, and 2 (decode of a few sequences at top-2:
// ncu on an H200 showed the 8-row down kernel at 25% occupancy by registers and 46% of
// DRAM bandwidth at T = 1, the gate/up kernel at 37.5% and 84%).
extern "C" __global__ void __launch_bounds__(SK_WARPS * 32)
    moe_gate_up_skinny(const bf16_t* __restrict__ x, const bf16_t* __restrict__ wgu, const int* __restrict__ sorted_tok,
                       const Tile* __restrict__ tiles, bf16_t* __restrict__ act, int H, int F) {
    gate_up_skinny<SK_ROWS>(x, wgu, sorted_tok, tiles, act, H, F);
}
extern "C" __global__ void __launch_bounds__(SK_WARPS * 32)
    moe_gate_up_skinny2(const bf16_t* __restrict__ x, const bf16_t* __restrict__ wgu, const int* __restrict__ sorted_tok,
                        const Tile* __restrict__ tiles, bf16_t* __restrict__ act, int H, int F) {
    gate_up_skinny<2>(x, wgu, sorted_tok, tiles, act, H, F);
}
extern "C" __global__ void __launch_bounds__(SK_WARPS * 32)
    moe_down_skinny(const bf16_t* __restrict__ act, const bf16_t* __restrict__ wd, const float* __restrict__ sorted_w,
                    const Tile* __restrict__ tiles, float* __restrict__ yp, int F, int H) {
    down_skinny<SK_ROWS>(act, wd, sorted_w, tiles, yp, F, H);
}
extern "C" __global__ void __launch_bounds__(SK_WARPS * 32)
    moe_down_skinny2(const bf16_t* __restrict__ act, const bf16_t* __restrict__ wd, const float* __restrict__ sorted_w,
                     const Tile* __restrict__ tiles, float* __restrict__ yp, int F, int H) {
    down_skinny<2>(act, wd, sorted_w, tiles, yp, F, H);
}

// grid: (T, ceil(H_out / 256)); block: 256. out[t] = sum over t's assignments j (tok_off[t]
// .. tok_off[t+1], in the order given) and slices z of yp[z][tok_rows[j]]. A token with no
// assignment gets zeros. One element per thread: with one block per token (v1) a decode
// step's combine was a 16-deep chain of dependent loads per thread, 18-34 us at T = 1.
extern "C" __global__ void __launch_bounds__(256)
    moe_combine(const float* __restrict__ yp, const int* __restrict__ tok_off, const int* __restrict__ tok_rows,
                float* __restrict__ out, int H_out, int H, int splits, long long split_stride) {
    const int t = blockIdx.x;
    const int b = tok_off[t];
    const int e = tok_off[t + 1];
    for (int h = blockIdx.y * blockDim.x + threadIdx.x; h < H_out; h += gridDim.y * blockDim.x) {
        float s = 0.0f;
        for (int j = b; j < e; ++j) {
            const float* y = yp + (size_t)tok_rows[j] * (size_t)H + h;
            for (int z = 0; z < splits; ++z) s += y[(size_t)z * (size_t)split_stride];
        }
        out[(size_t)t * (size_t)H_out + h] = s;
    }
}

// Fills n 32-bit words with a pattern (tests poison outputs with NaN before each run).
extern "C" __global__ void fill_u32(u32* __restrict__ p, long long n, u32 value) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        p[i] = value;
}
