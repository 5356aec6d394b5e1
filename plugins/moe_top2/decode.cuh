// Decode path: few tokens per expert, memory-bound. Each CTA owns 16 output rows of one active
// expert (GEMM1: 16 gate rows and the 16 matching up rows) and all of that expert's tokens, so
// every selected expert's weights stream from HBM exactly once, in 16-byte loads that feed the
// tensor cores directly from registers (no shared-memory staging).
//
// The trick: a dot product does not care about the order of k. Lane (g, q) loads 16 contiguous
// bytes of weight row g (and g+8) and of token g's activations at the same k offsets, and hands
// them to mma.m16n8k16 as if they were the fragment's k = {2q, 2q+1, 2q+8, 2q+9}. Weights are A
// (16 rows), tokens are B (8 columns per mma): the token count only sets how many mma run.
// The CTA's warps (8 for up to 8 tokens, else 4: fewer, longer CTAs would leave a partial last
// wave) split k in interleaved blocks of U steps and reduce through shared memory in a fixed
// order, so results are deterministic. Every group of 8 token columns runs even when the expert
// has fewer tokens (skipping them with a branch serialised the activation loads: measured 23%
// slower at T=64 on an H200); that is why larger batches go to the tensor-core path.
#pragma once

#include "common.cuh"

namespace moe {

__host__ __device__ constexpr int decode_warps(int nt) { return nt == 1 ? 8 : 4; }

template <bool W8, bool GATED, int NT>
struct DecodeShape {
    static constexpr int kWarps = decode_warps(NT);
    static constexpr int MT = GATED ? 2 : 1;             // 16-row weight tiles per CTA (gate, up)
    static constexpr int WB = W8 ? 1 : 2;                // bytes per weight
    static constexpr int KSTEP = W8 ? 64 : 32;           // k covered by one 16-byte load of 4 lanes
    static constexpr int SUB = KSTEP / 16;               // mma per step
    static constexpr int U = (GATED ? 4 : 8) / (W8 ? 2 : 1);  // steps in flight per warp
    using Red = float[kWarps][MT * NT * 4][32];          // the warps' partial sums
};

// One expert's share of a CTA: its 16 weight rows at n0 (GEMM1: 16 gate and the 16 matching up
// rows) against all of its tokens, written to g.out.
template <typename T, bool W8, bool GATED, int NT>
__device__ __forceinline__ void decode_expert(const GemmArgs& g, int e, int n0,
                                              typename DecodeShape<W8, GATED, NT>::Red& red) {
    using D = DecodeShape<W8, GATED, NT>;
    constexpr int kDecodeWarps = D::kWarps, MT = D::MT, WB = D::WB, KSTEP = D::KSTEP, SUB = D::SUB, U = D::U;
    constexpr int XW = KSTEP / 4 / 8;  // 16-byte activation loads per lane and step
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, q = lane & 3;
    const int K = g.K, N = g.N;
    const size_t wrows = GATED ? 2 * static_cast<size_t>(N) : static_cast<size_t>(N);
    const int row_begin = g.offsets[e];
    const int n_tok = g.offsets[e + 1] - row_begin;
    const char* wrow[MT][2];  // this lane's 16 bytes of rows n0+gi and n0+gi+8 (gate, then up)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            wrow[mt][h] = static_cast<const char*>(g.w) +
                          ((static_cast<size_t>(e) * wrows + mt * N + n0 + gi + 8 * h) * K) * WB + q * 16;
    const int nsteps = K / KSTEP;

    for (int c0 = 0; c0 < n_tok; c0 += NT * 8) {
        const char* xrow[NT];  // token column gi of each group of 8; clamped (extra columns unused)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int r = row_begin + min(c0 + nt * 8 + gi, n_tok - 1);
            const size_t xr = GATED ? static_cast<size_t>(g.perm[r] / kTopK) : static_cast<size_t>(r);
            xrow[nt] = static_cast<const char*>(g.x) + (xr * K + q * (KSTEP / 4)) * sizeof(T);
        }
        float acc[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[mt][nt][c] = 0.f;

        for (int s0 = warp * U; s0 < nsteps; s0 += kDecodeWarps * U) {
            uint4 wv[U][MT][2];
#pragma unroll
            for (int u = 0; u < U; ++u)
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        wv[u][mt][h] = (s0 + u < nsteps)
                                           ? ld_stream(wrow[mt][h] + static_cast<size_t>(s0 + u) * KSTEP * WB)
                                           : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (s0 + u >= nsteps) break;
                uint32_t af[SUB][MT][4];  // a0..a3 of each mma
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const uint32_t* w0 = reinterpret_cast<const uint32_t*>(&wv[u][mt][0]);
                    const uint32_t* w1 = reinterpret_cast<const uint32_t*>(&wv[u][mt][1]);
#pragma unroll
                    for (int sub = 0; sub < SUB; ++sub) {
                        if constexpr (W8) {
                            I8<T>::cvt4(w0[sub], af[sub][mt][0], af[sub][mt][2]);
                            I8<T>::cvt4(w1[sub], af[sub][mt][1], af[sub][mt][3]);
                        } else {
                            af[sub][mt][0] = w0[2 * sub];
                            af[sub][mt][1] = w1[2 * sub];
                            af[sub][mt][2] = w0[2 * sub + 1];
                            af[sub][mt][3] = w1[2 * sub + 1];
                        }
                    }
                }
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    uint4 xv[XW];
#pragma unroll
                    for (int i = 0; i < XW; ++i)
                        xv[i] = ld_cached(xrow[nt] + (static_cast<size_t>(s0 + u) * KSTEP + 8 * i) * sizeof(T));
                    const uint32_t* xw = reinterpret_cast<const uint32_t*>(xv);
#pragma unroll
                    for (int sub = 0; sub < SUB; ++sub)
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt)
                            mma16816<T>(acc[mt][nt], af[sub][mt][0], af[sub][mt][1], af[sub][mt][2], af[sub][mt][3],
                                        xw[2 * sub], xw[2 * sub + 1]);
                }
            }
        }

#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int c = 0; c < 4; ++c) red[warp][(mt * NT + nt) * 4 + c][lane] = acc[mt][nt][c];
        __syncthreads();
        for (int i = threadIdx.x; i < NT * 4 * 32; i += kDecodeWarps * 32) {
            const int l = i & 31, idx = i >> 5, nt = idx >> 2, c = idx & 3;
            const int j = c0 + nt * 8 + 2 * (l & 3) + (c & 1);  // token within the expert
            const int f = n0 + (l >> 2) + ((c & 2) ? 8 : 0);    // output feature
            if (j >= n_tok) continue;
            float v = 0.f;
#pragma unroll
            for (int w = 0; w < kDecodeWarps; ++w) v += red[w][idx][l];
            if constexpr (GATED) {
                float up = 0.f;
#pragma unroll
                for (int w = 0; w < kDecodeWarps; ++w) up += red[w][NT * 4 + idx][l];
                if constexpr (W8) {
                    v *= load_scale(g.scale, static_cast<size_t>(e) * wrows + f, g.scale_fp32);
                    up *= load_scale(g.scale, static_cast<size_t>(e) * wrows + N + f, g.scale_fp32);
                }
                static_cast<T*>(g.out)[static_cast<size_t>(row_begin + j) * N + f] = Elem<T>::from_float(silu(v) * up);
            } else {
                if constexpr (W8) v *= load_scale(g.scale, static_cast<size_t>(e) * wrows + f, g.scale_fp32);
                const size_t a = static_cast<size_t>(g.perm[row_begin + j]);
                static_cast<T*>(g.out)[a * N + f] = Elem<T>::from_float(v);
            }
        }
        __syncthreads();
    }
}

// COMBINE (GEMM2 only, with MOE_FLAG_DECODE_FUSED): the CTA takes its 16 output columns of every active
// expert in turn (grid.y = 1), so every CTA streams the same number of weight bytes, then applies
// the combine to those columns itself: the separate combine launch goes away.
template <typename T, bool W8, bool GATED, int NT, bool COMBINE = false>
__global__ void __launch_bounds__(decode_warps(NT) * 32) decode_gemm(GemmArgs g) {
    static_assert(!(GATED && COMBINE), "the combine follows GEMM2");
    using D = DecodeShape<W8, GATED, NT>;
    __shared__ typename D::Red red;

    // Under MOE_FLAG_PDL, GEMM1 waits for permute before it reads the routing. GEMM2 reads the
    // routing before its wait: GEMM1 let GEMM2 launch only after its own wait for permute, so the
    // routing is complete by then. GEMM2 then warms L2 with its first round of weights while GEMM1
    // drains, and waits before it reads GEMM1's output.
    if constexpr (GATED) {
        pdl_wait();
        pdl_launch_dependents();
    }
    const int n_active = g.counters[1];
    const int first_slot = COMBINE ? 0 : static_cast<int>(blockIdx.y);
    // A GEMM2 CTA without an expert leaves before its wait. Slot 0 always has one (tokens > 0), and
    // its CTAs wait before they trigger, so the combine still starts only after GEMM1 completed.
    if (first_slot >= n_active) return;
    const int n0 = blockIdx.x * 16;
    if constexpr (!GATED) {
        // This warp's first round: 16 rows x U * KSTEP * WB bytes, one 128-byte line per lane and turn.
        constexpr int kRound = D::U * D::KSTEP * D::WB;
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const size_t row = static_cast<size_t>(g.K) * D::WB, first = static_cast<size_t>(warp) * kRound;
        const char* w0 = static_cast<const char*>(g.w) + (static_cast<size_t>(g.active[first_slot]) * g.N + n0) * row;
#pragma unroll 1
        for (int i = lane; i < 16 * (kRound / 128); i += 32)
            if (first + (i >> 4) * 128 < row) prefetch_l2(w0 + (i & 15) * row + first + (i >> 4) * 128);
        pdl_wait();
        if constexpr (!COMBINE) pdl_launch_dependents();  // else the caller's next kernel waits for this one
    }

    if constexpr (!COMBINE) {
        decode_expert<T, W8, GATED, NT>(g, g.active[first_slot], n0, red);
    } else {
        for (int slot = 0; slot < n_active; ++slot) decode_expert<T, W8, GATED, NT>(g, g.active[slot], n0, red);
        // out[t] = w0 * y[2t] + w1 * y[2t+1] over this CTA's columns (combine8, as combine_kernel).
        // This CTA wrote those y columns itself (visible after decode_expert's last __syncthreads);
        // read them through L2, not the read-only path.
        const T* y = static_cast<const T*>(g.out);
        const size_t N = g.N;
        for (int i = threadIdx.x; i < g.tokens * 2; i += D::kWarps * 32) {
            const size_t t = i >> 1, c = n0 + 8 * (i & 1);
            const uint4 a = __ldcg(reinterpret_cast<const uint4*>(y + 2 * t * N + c));
            const uint4 b = __ldcg(reinterpret_cast<const uint4*>(y + (2 * t + 1) * N + c));
            *reinterpret_cast<uint4*>(static_cast<T*>(g.final_out) + t * N + c) =
                combine8<T>(a, b, g.wts[2 * t], g.wts[2 * t + 1]);
        }
    }
}

}  // namespace moe
