// Prefill path: grouped GEMM on tensor cores (mma.m16n8k16 via ldmatrix, sm_80..sm_120).
// One CTA computes a 128-row x BN-weight-row tile of one expert (BN = 128 by default; 256 with
// MOE_FLAG_PREFILL_WIDE); the row tiles come from the
// device-side tile list built by the permute kernel, so the grid is sized for the worst case
// (ceil(A / 128) + E tiles) and idle CTAs exit at once: no host synchronisation.
// Operands stream through a cp.async pipeline (3 stages; 4 when wide) into XOR-swizzled shared memory
// (conflict-free ldmatrix). GEMM1 gathers hidden rows through the permutation while loading and
// interleaves gate and up rows in 16-row blocks, so each warp holds matching gate/up
// accumulators and applies silu(gate) * up in registers. int8 weights land in shared memory as
// int8 and are widened once per stage; their per-row scales apply in the epilogue.
#pragma once

#include "common.cuh"

namespace moe {

constexpr int kBM = 128, kBN = 128, kBNWide = 256, kBK = 64, kPrefillThreads = 256;

// The CTA tile's shape: 128 rows x BN weight rows x 64 k, 8 warps as 2 x 4 of 64 x BN/4 each.
// BN = 128: 3 stages, about 97 KB of shared memory, two CTAs per SM. BN = 256 (the wide tile):
// 4 stages, about 193 KB, one CTA per SM, and each warp's ldmatrix feeds twice the mma (0.25
// ldmatrix.x4 per mma in place of 0.375).
template <bool W8, int BN>
struct PrefillSmem {
    static_assert(BN == kBN || BN == kBNWide, "prefill tiles are 128 or 256 weight rows");
    static constexpr int kStages = BN == kBN ? 3 : 4;
    static constexpr int kAStage = kBM * kBK * 2;
    static constexpr int kBStage = BN * kBK * (W8 ? 1 : 2);
    static constexpr int kBc = W8 ? BN * kBK * 2 : 0;  // widened int8 stage
    static constexpr int kBytes = kStages * (kAStage + kBStage) + kBc + kBM * 4;
    static_assert(kBytes <= 227 * 1024, "a CTA's shared memory is at most 227 KB");
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;  // 0: zero-fill, source not read
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// Element offset of (row, 16-byte chunk) in a [rows][kBK] tile of 2-byte elements.
__device__ __forceinline__ int swz(int row, int chunk) { return row * kBK + ((chunk ^ (row & 7)) << 3); }

template <typename T, bool W8, bool GATED, int BN>
__global__ void __launch_bounds__(kPrefillThreads) prefill_gemm(GemmArgs g) {
    using S = PrefillSmem<W8, BN>;
    constexpr int kStages = S::kStages;
    constexpr int NB = BN / (W8 ? 64 : 32);  // 16-byte weight copies per thread and stage
    constexpr int WN = BN / 4;               // weight rows (output columns) per warp
    constexpr int NI = WN / 8;               // mma columns of 8 per warp
    extern __shared__ __align__(128) unsigned char smem[];
    pdl_wait();  // MOE_FLAG_PDL: see common.cuh
    pdl_launch_dependents();
    if (static_cast<int>(blockIdx.x) >= g.counters[0]) return;
    const int4 ti = g.tiles[blockIdx.x];
    const int e = ti.x, r0 = ti.y, rows = ti.z - ti.y;
    const int K = g.K, N = g.N, tid = threadIdx.x;
    const size_t wrows = GATED ? 2 * static_cast<size_t>(N) : static_cast<size_t>(N);
    unsigned char* sA = smem;
    unsigned char* sB = smem + kStages * S::kAStage;
    T* sBc = reinterpret_cast<T*>(sB + kStages * S::kBStage);
    int* s_rows = reinterpret_cast<int*>(sB + kStages * S::kBStage + S::kBc);
    for (int i = tid; i < kBM; i += kPrefillThreads) s_rows[i] = i < rows ? g.perm[r0 + i] : 0;
    __syncthreads();

    const T* a_src[4];
    uint32_t a_dst[4];
    bool a_ok[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = (tid >> 3) + 32 * i;
        a_ok[i] = r < rows;
        const size_t xr = GATED ? static_cast<size_t>(s_rows[r] / kTopK) : static_cast<size_t>(r0 + (a_ok[i] ? r : 0));
        a_src[i] = static_cast<const T*>(g.x) + xr * K + (tid & 7) * 8;
        a_dst[i] = smem_u32(sA) + swz(r, tid & 7) * 2;
    }
    const char* b_src[NB];
    uint32_t b_dst[NB];
    bool b_ok[NB];
#pragma unroll
    for (int i = 0; i < NB; ++i) {
        const int rr = W8 ? (tid >> 2) + 64 * i : (tid >> 3) + 32 * i;  // tile row
        int wr;
        if constexpr (GATED) {  // 16-row blocks alternate gate (w1) and up (w3) rows
            const int blk = rr >> 4, feature = blockIdx.y * (BN / 2) + (blk >> 1) * 16 + (rr & 15);
            wr = (blk & 1) * N + feature;
            b_ok[i] = feature < N;  // N is a multiple of 64: only the wide tile's last 128 can overhang
        } else {
            wr = blockIdx.y * BN + rr;
            b_ok[i] = wr < N;
        }
        const size_t off = (static_cast<size_t>(e) * wrows + (b_ok[i] ? wr : 0)) * K;
        if constexpr (W8) {
            b_src[i] = static_cast<const char*>(g.w) + off + (tid & 3) * 16;
            b_dst[i] = smem_u32(sB) + rr * kBK + (tid & 3) * 16;
        } else {
            b_src[i] = static_cast<const char*>(g.w) + (off + (tid & 7) * 8) * 2;
            b_dst[i] = smem_u32(sB) + swz(rr, tid & 7) * 2;
        }
    }
    auto load_stage = [&](int stage, int kt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) cp_async16(a_dst[i] + stage * S::kAStage, a_src[i] + kt * kBK, a_ok[i]);
#pragma unroll
        for (int i = 0; i < NB; ++i)
            cp_async16(b_dst[i] + stage * S::kBStage, b_src[i] + static_cast<size_t>(kt) * kBK * (W8 ? 1 : 2), b_ok[i]);
    };

    const int warp = tid >> 5, lane = tid & 31, wm = warp >> 2, wn = warp & 3;
    float acc[4][NI][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.f;

    const int ktiles = K / kBK;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < ktiles) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        const int stage = kt % kStages;
        cp_async_wait<kStages - 2>();
        __syncthreads();  // stage kt visible; everyone is done with stage kt-1 and sBc
        if (kt + kStages - 1 < ktiles) load_stage((kt + kStages - 1) % kStages, kt + kStages - 1);
        cp_async_commit();
        if constexpr (W8) {
#pragma unroll
            for (int i = 0; i < BN / 64; ++i) {
                const int c = tid + kPrefillThreads * i, rr = c >> 2, c16 = c & 3;
                const uint4 v = *reinterpret_cast<const uint4*>(sB + stage * S::kBStage + rr * kBK + c16 * 16);
                uint4 lo, hi;
                I8<T>::cvt4(v.x, lo.x, lo.y);
                I8<T>::cvt4(v.y, lo.z, lo.w);
                I8<T>::cvt4(v.z, hi.x, hi.y);
                I8<T>::cvt4(v.w, hi.z, hi.w);
                *reinterpret_cast<uint4*>(sBc + swz(rr, 2 * c16)) = lo;
                *reinterpret_cast<uint4*>(sBc + swz(rr, 2 * c16 + 1)) = hi;
            }
            __syncthreads();
        }
        const uint32_t a_base = smem_u32(sA) + stage * S::kAStage;
        const uint32_t b_base = W8 ? smem_u32(sBc) : smem_u32(sB) + stage * S::kBStage;
#pragma unroll
        for (int kk = 0; kk < kBK / 16; ++kk) {
            uint32_t af[4][4], bf[NI][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
                ldmatrix_x4(af[mi], a_base + swz(wm * 64 + mi * 16 + (lane & 15), kk * 2 + (lane >> 4)) * 2);
#pragma unroll
            for (int nj = 0; nj < NI / 2; ++nj) {
                uint32_t r[4];
                ldmatrix_x4(r, b_base + swz(wn * WN + nj * 16 + (lane & 7) + ((lane >> 4) << 3),
                                            kk * 2 + ((lane >> 3) & 1)) * 2);
                bf[2 * nj][0] = r[0];
                bf[2 * nj][1] = r[1];
                bf[2 * nj + 1][0] = r[2];
                bf[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni)
                    mma16816<T>(acc[mi][ni], af[mi][0], af[mi][1], af[mi][2], af[mi][3], bf[ni][0], bf[ni][1]);
        }
    }
    cp_async_wait<0>();

    const int gi = lane >> 2, q = lane & 3;
    if constexpr (GATED) {
        // The warp's WN columns are WN / 32 pairs of 16-column blocks, gate then up: mma columns
        // 4p, 4p+1 hold the gate and 4p+2, 4p+3 the up of output features f0(p) + 0..15.
        constexpr int P = NI / 4;
        const int f_warp = blockIdx.y * (BN / 2) + wn * (WN / 2);
        float sg[P][2][2], su[P][2][2];
#pragma unroll
        for (int pb = 0; pb < P; ++pb)
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int cc = 0; cc < 2; ++cc) {
                    const int f = f_warp + pb * 16 + j * 8 + 2 * q + cc;
                    const bool scaled = W8 && f < N;
                    sg[pb][j][cc] = scaled ? load_scale(g.scale, e * wrows + f, g.scale_fp32) : 1.f;
                    su[pb][j][cc] = scaled ? load_scale(g.scale, e * wrows + N + f, g.scale_fp32) : 1.f;
                }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = wm * 64 + mi * 16 + gi + 8 * h;
                if (r >= rows) continue;
                T* dst = static_cast<T*>(g.out) + static_cast<size_t>(r0 + r) * N + f_warp + 2 * q;
#pragma unroll
                for (int pb = 0; pb < P; ++pb) {
                    if (f_warp + pb * 16 >= N) continue;  // a wide tile past the last feature (N % 64 == 0)
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        const float* ga = acc[mi][4 * pb + j];
                        const float* ua = acc[mi][4 * pb + 2 + j];
                        const float v0 = silu(ga[2 * h] * sg[pb][j][0]) * (ua[2 * h] * su[pb][j][0]);
                        const float v1 = silu(ga[2 * h + 1] * sg[pb][j][1]) * (ua[2 * h + 1] * su[pb][j][1]);
                        *reinterpret_cast<uint32_t*>(dst + pb * 16 + j * 8) = Elem<T>::pack2(v0, v1);
                    }
                }
            }
    } else {
        float sc[NI][2];
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int cc = 0; cc < 2; ++cc) {
                const int f = blockIdx.y * BN + wn * WN + ni * 8 + 2 * q + cc;
                sc[ni][cc] = (W8 && f < N) ? load_scale(g.scale, e * wrows + f, g.scale_fp32) : 1.f;
            }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = wm * 64 + mi * 16 + gi + 8 * h;
                if (r >= rows) continue;
                T* dst = static_cast<T*>(g.out) + static_cast<size_t>(s_rows[r]) * N;
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) {
                    const int f = blockIdx.y * BN + wn * WN + ni * 8 + 2 * q;
                    if (f >= N) continue;
                    *reinterpret_cast<uint32_t*>(dst + f) =
                        Elem<T>::pack2(acc[mi][ni][2 * h] * sc[ni][0], acc[mi][ni][2 * h + 1] * sc[ni][1]);
                }
            }
    }
}

}  // namespace moe
