// mixtral.MoETop2 kernels and their C ABI (see moe_top2.h for the contract and the workspace
// layout, README.md for the design). No host synchronisation, no allocation: one enqueue is
// five kernel launches on the caller's stream (router, permute, GEMM1, GEMM2, combine); the
// sm_90a prefill path (MOE_FLAG_PREFILL_SM90, prefill_sm90.cu) makes five in place of the two GEMMs.
// With MOE_FLAG_PDL on sm_90+, each of the five is a programmatic dependent of the launch before it.
// With MOE_FLAG_DECODE_FUSED, decode's GEMM2 applies the combine, and a single router CTA (up to 8
// tokens) permutes too: three or four launches.
#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "decode.cuh"
#include "moe_top2.h"
#include "prefill.cuh"
#include "prefill_sm90.h"

namespace moe {

constexpr int kRouterWarps = 8;

// Where permute leaves the routing (moe_top2.h's workspace regions).
struct Routing {
    int* offsets;
    int* counters;
    int* active;
    int* perm;
    int4* tiles;
};

// One CTA (any size): per-expert counts, offsets, active-expert list, prefill row tiles, and a
// stable permutation (warp per expert, ballot + popc), all left on the device. ids may have been
// written by this CTA (before a __syncthreads), so they are read with plain loads.
__device__ void permute_block(const int* ids, int A, int E, const Routing& r) {
    __shared__ int cnt[MOE_MAX_EXPERTS], off[MOE_MAX_EXPERTS + 1], toff[MOE_MAX_EXPERTS], aidx[MOE_MAX_EXPERTS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    for (int e = tid; e < E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int a = tid; a < A; a += blockDim.x) atomicAdd(&cnt[ids[a]], 1);
    __syncthreads();
    if (tid == 0) {
        int o = 0, to = 0, na = 0;
        for (int e = 0; e < E; ++e) {
            off[e] = o, toff[e] = to, aidx[e] = na;
            o += cnt[e];
            to += (cnt[e] + kBM - 1) / kBM;
            na += cnt[e] > 0;
        }
        off[E] = o;
        r.counters[0] = to, r.counters[1] = na, r.counters[2] = 0, r.counters[3] = 0;
    }
    __syncthreads();
    for (int e = tid; e <= E; e += blockDim.x) r.offsets[e] = off[e];
    for (int e = tid; e < E; e += blockDim.x) {
        if (cnt[e] == 0) continue;
        r.active[aidx[e]] = e;
        for (int m = 0; m * kBM < cnt[e]; ++m)
            r.tiles[toff[e] + m] = make_int4(e, off[e] + m * kBM, off[e] + min(cnt[e], (m + 1) * kBM), 0);
    }
    for (int e = warp; e < E; e += nwarps) {
        if (cnt[e] == 0) continue;
        int base = off[e];
        for (int c = 0; c < A; c += 32) {
            const int a = c + lane;
            const bool hit = a < A && ids[a] == e;
            const unsigned b = __ballot_sync(0xffffffffu, hit);
            if (hit) r.perm[base + __popc(b & ((1u << lane) - 1u))] = a;
            base += __popc(b);
        }
    }
}

// A CTA routes kRouterWarps tokens: its warps share the (token, expert) dot products (at T=1
// each warp takes one expert, so the E logits come in parallel), then one thread per token
// takes softmax, top-2 (lowest index wins ties) and renormalises exactly as softmax -> topk ->
// divide by their sum. fuse (MOE_FLAG_DECODE_FUSED, a single CTA only): the CTA then permutes too,
// in place of permute_kernel.
template <typename T, typename R>
__global__ void __launch_bounds__(kRouterWarps * 32) router_kernel(const T* hidden, const R* router, int tokens, int H,
                                                                   int E, int* ids, float* wts, Routing fuse_into) {
    __shared__ float logits[kRouterWarps][MOE_MAX_EXPERTS];
    pdl_wait();  // MOE_FLAG_PDL: the caller's kernel that wrote hidden has completed (common.cuh)
    pdl_launch_dependents();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t0 = blockIdx.x * kRouterWarps, nt = min(kRouterWarps, tokens - t0);
    for (int pair = warp; pair < nt * E; pair += kRouterWarps) {
        const int tt = pair / E, e = pair % E;
        const T* x = hidden + static_cast<size_t>(t0 + tt) * H;
        const R* r = router + static_cast<size_t>(e) * H;
        float acc = 0.f;
#pragma unroll 4
        for (int k = lane * 8; k < H; k += 256) {
            const uint4 xv = ld_cached(x + k);
            const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv);
            float rf[8];
            if constexpr (sizeof(R) == 4) {
                const float4 a = __ldg(reinterpret_cast<const float4*>(r + k));
                const float4 b = __ldg(reinterpret_cast<const float4*>(r + k + 4));
                rf[0] = a.x, rf[1] = a.y, rf[2] = a.z, rf[3] = a.w, rf[4] = b.x, rf[5] = b.y, rf[6] = b.z, rf[7] = b.w;
            } else {
                const uint4 rv = ld_cached(r + k);
                const uint32_t* rw = reinterpret_cast<const uint32_t*>(&rv);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float2 f = Elem<T>::unpack2(rw[i]);
                    rf[2 * i] = f.x, rf[2 * i + 1] = f.y;
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float2 f = Elem<T>::unpack2(xw[i]);
                acc = fmaf(f.x, rf[2 * i], acc);
                acc = fmaf(f.y, rf[2 * i + 1], acc);
            }
        }
#pragma unroll
        for (int off = 16; off; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (lane == 0) logits[tt][e] = acc;
    }
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < nt) {
        const int t = t0 + threadIdx.x;
        const float* l = logits[threadIdx.x];
        int i0 = 0;
        for (int e = 1; e < E; ++e)
            if (l[e] > l[i0]) i0 = e;
        int i1 = i0 == 0 ? 1 : 0;
        for (int e = 0; e < E; ++e)
            if (e != i0 && l[e] > l[i1]) i1 = e;
        float s = 0.f;
        for (int e = 0; e < E; ++e) s += expf(l[e] - l[i0]);
        const float p0 = 1.f / s, p1 = expf(l[i1] - l[i0]) / s, d = p0 + p1;
        ids[2 * t] = i0;
        ids[2 * t + 1] = i1;
        wts[2 * t] = p0 / d;
        wts[2 * t + 1] = p1 / d;
    }
    if (fuse_into.offsets == nullptr) return;
    __syncthreads();  // this CTA's ids are visible to all its threads
    permute_block(ids, tokens * kTopK, E, fuse_into);
}

__global__ void __launch_bounds__(1024) permute_kernel(const int* ids, int A, int E, Routing r) {
    pdl_wait();
    pdl_launch_dependents();
    permute_block(ids, A, E, r);
}

// out[t] = w0 * y[2t] + w1 * y[2t+1] (combine8). PERMUTED (the sm_90a path, whose GEMM2 cannot
// scatter rows): y holds permuted rows, assignment a is row row_of[a]; the arithmetic is the same.
template <typename T, bool PERMUTED>
__global__ void combine_kernel(const T* y, const int* row_of, const float* wts, T* out, int tokens, int H) {
    const int h8 = H / 8;
    pdl_wait();  // the caller's next kernel launches once this one ends
    const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= static_cast<size_t>(tokens) * h8) return;
    const size_t t = i / h8, c = (i % h8) * 8;
    const size_t ra = PERMUTED ? static_cast<size_t>(row_of[2 * t]) : 2 * t;
    const size_t rb = PERMUTED ? static_cast<size_t>(row_of[2 * t + 1]) : 2 * t + 1;
    const uint4 a = ld_cached(y + ra * H + c), b = ld_cached(y + rb * H + c);
    *reinterpret_cast<uint4*>(out + t * H + c) = combine8<T>(a, b, wts[2 * t], wts[2 * t + 1]);
}

#ifdef MIXTRAL_MOE_NO_SM90_PATH
// Built without CUTLASS's headers (plugins/python/build.py found none): prefill_sm90.cu is not in
// this library, and its flag is refused with the fix. Every other path is unaffected.
int sm90_prefill_check(char* msg, size_t size) {
    snprintf(msg, size,
             "MOE_FLAG_PREFILL_SM90: this library was built without CUTLASS, so without the sm_90a prefill path; "
             "pip install nvidia-cutlass==4.2.0.0 (or set MIXTRAL_TRT_CUTLASS_INCLUDE) and rebuild "
             "(python -m mixtral_trt.plugins.build)");
    return cudaErrorInvalidValue;
}
int sm90_prefill_enqueue(const Sm90PrefillArgs&, cudaStream_t, char* msg, size_t size) {
    return sm90_prefill_check(msg, size);
}
#endif

}  // namespace moe

// ------------------------------------------------------------------------------------------
// Host side: workspace layout, validation, dispatch.
// ------------------------------------------------------------------------------------------
namespace {

using namespace moe;

thread_local char g_error[512] = "";

int fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
int fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof(g_error), fmt, ap);
    va_end(ap);
    return static_cast<int>(cudaErrorInvalidValue);
}

struct Layout {
    size_t ids, wts, offsets, counters, active, perm, tiles, act, y;
    size_t row_of, up, sm90_args, sm90_gemm;  // the sm_90a path's (sm90 layouts only), after every path's regions
    size_t total;
};

size_t align256(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

// sm90: append the regions only MOE_FLAG_PREFILL_SM90 uses; the common regions' offsets are the same either way.
Layout layout(size_t T, size_t H, size_t I, size_t E, size_t act_size, bool sm90) {
    const size_t A = T * kTopK, max_tiles = (A + kBM - 1) / kBM + E;
    Layout L{};
    size_t o = 0;
    L.ids = o, o = align256(o + 4 * A);
    L.wts = o, o = align256(o + 4 * A);
    L.offsets = o, o = align256(o + 4 * (E + 1));
    L.counters = o, o = align256(o + 4 * 4);
    L.active = o, o = align256(o + 4 * E);
    L.perm = o, o = align256(o + 4 * A);
    L.tiles = o, o = align256(o + 16 * max_tiles);
    L.act = o, o = align256(o + act_size * A * I);
    L.y = o, o = align256(o + act_size * A * H);
    if (!sm90) {
        L.total = o;
        return L;
    }
    L.row_of = o, o = align256(o + 4 * A);
    L.up = o, o = align256(o + act_size * A * I);
    L.sm90_args = o, o = align256(o + sm90_args_bytes(E));
    L.sm90_gemm = o, o = align256(o + kSm90GemmWorkspaceBytes);
    L.total = o;
    return L;
}

const char* dtype_name(int d) {
    switch (d) {
        case MOE_DTYPE_FP32: return "fp32";
        case MOE_DTYPE_FP16: return "fp16";
        case MOE_DTYPE_INT8: return "int8";
        case MOE_DTYPE_BF16: return "bf16";
        default: return "unknown";
    }
}

int check_shapes(long T, long H, long I, long E, int top_k, int act_dtype) {
    if (top_k != kTopK) return fail("top_k=%d; these kernels implement top_k=2 only", top_k);
    if (T < 0 || T > (1L << 28)) return fail("tokens=%ld; expected 0..%ld", T, 1L << 28);
    if (H <= 0 || H % 64) return fail("hidden=%ld; expected a positive multiple of 64", H);
    if (I <= 0 || I % 64 || I / 64 > 65535) return fail("inter=%ld; expected a positive multiple of 64", I);
    if (E < 2 || E > MOE_MAX_EXPERTS) return fail("experts=%ld; expected 2..%d", E, MOE_MAX_EXPERTS);
    if (act_dtype != MOE_DTYPE_FP16 && act_dtype != MOE_DTYPE_BF16)
        return fail("act_dtype=%d (%s); expected fp16 (%d) or bf16 (%d)", act_dtype, dtype_name(act_dtype),
                    MOE_DTYPE_FP16, MOE_DTYPE_BF16);
    return 0;
}

int check_pointer(const char* name, const void* p, size_t align) {
    if (p == nullptr) return fail("%s is null", name);
    if (reinterpret_cast<uintptr_t>(p) % align) return fail("%s=%p is not %zu-byte aligned", name, p, align);
    return 0;
}

int validate(const MoeTop2Params* p, const void* workspace) {
    if (p == nullptr) return fail("params is null");
    if (int rc = check_shapes(p->tokens, p->hidden_size, p->inter_size, p->num_experts, p->top_k, p->act_dtype)) return rc;
    if (p->router_dtype != p->act_dtype && p->router_dtype != MOE_DTYPE_FP32)
        return fail("router_dtype=%d (%s); expected the activations' %s or fp32", p->router_dtype,
                    dtype_name(p->router_dtype), dtype_name(p->act_dtype));
    const bool w8 = p->weight_dtype == MOE_DTYPE_INT8;
    if (p->weight_dtype != p->act_dtype && !w8)
        return fail("weight_dtype=%d (%s); expected the activations' %s or int8", p->weight_dtype,
                    dtype_name(p->weight_dtype), dtype_name(p->act_dtype));
    if (w8 && p->scale_dtype != MOE_DTYPE_FP16 && p->scale_dtype != MOE_DTYPE_FP32)
        return fail("scale_dtype=%d (%s); int8 weights need fp16 or fp32 scales", p->scale_dtype,
                    dtype_name(p->scale_dtype));
    const int known = MOE_FLAG_FORCE_DECODE | MOE_FLAG_FORCE_PREFILL | MOE_FLAG_PREFILL_SM90 | MOE_FLAG_PDL |
                      MOE_FLAG_PREFILL_WIDE | MOE_FLAG_DECODE_FUSED | MOE_FLAG_AUTO;
    if ((p->flags & ~known) || (p->flags & MOE_FLAG_FORCE_DECODE && p->flags & MOE_FLAG_FORCE_PREFILL))
        return fail("flags=%d; expected a sum of at most one of %d (force decode) and %d (force prefill), and "
                    "optionally %d (sm_90a prefill GEMMs), %d (programmatic dependent launch), %d (wide prefill "
                    "tiles), %d (fused decode) and %d (the measured-fastest choices)",
                    p->flags, MOE_FLAG_FORCE_DECODE, MOE_FLAG_FORCE_PREFILL, MOE_FLAG_PREFILL_SM90, MOE_FLAG_PDL,
                    MOE_FLAG_PREFILL_WIDE, MOE_FLAG_DECODE_FUSED, MOE_FLAG_AUTO);
    const bool sm90 = p->flags & MOE_FLAG_PREFILL_SM90;
    if (sm90 && p->flags & MOE_FLAG_FORCE_DECODE)
        return fail("flags=%d: MOE_FLAG_PREFILL_SM90 (%d) selects prefill GEMMs; it cannot be combined with "
                    "MOE_FLAG_FORCE_DECODE (%d)",
                    p->flags, MOE_FLAG_PREFILL_SM90, MOE_FLAG_FORCE_DECODE);
    if (sm90 && w8)
        return fail("flags=%d: MOE_FLAG_PREFILL_SM90 needs fp16/bf16 weights; int8 weights run on the default "
                    "prefill path (leave the flag out)",
                    p->flags);
    if (p->tokens == 0) return 0;
    if (int rc = check_pointer("workspace", workspace, 256)) return rc;
    if (int rc = check_pointer("hidden", p->hidden, 16)) return rc;
    if (int rc = check_pointer("router", p->router, 16)) return rc;
    if (int rc = check_pointer("w13", p->w13, 16)) return rc;
    if (int rc = check_pointer("w2", p->w2, 16)) return rc;
    if (int rc = check_pointer("out", p->out, 16)) return rc;
    if (w8) {
        const size_t s = p->scale_dtype == MOE_DTYPE_FP32 ? 4 : 2;
        if (int rc = check_pointer("w13_scale", p->w13_scale, s)) return rc;
        if (int rc = check_pointer("w2_scale", p->w2_scale, s)) return rc;
    }
    if (sm90) return sm90_prefill_check(g_error, sizeof(g_error));  // asks CUDA: the device, this library's images
    return 0;
}

int launch_error(cudaError_t err) {
    snprintf(g_error, sizeof(g_error), "kernel launch failed: %s (%s)", cudaGetErrorName(err),
             cudaGetErrorString(err));
    return static_cast<int>(err);
}

// The enqueue's launches: all on one stream, all with or all without PDL (common.cuh).
struct Launch {
    cudaStream_t stream;
    bool pdl;
    template <typename... Params, typename... Args>
    int operator()(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args... args) const {
        const cudaError_t err = launch_kernel(pdl, kernel, grid, block, smem, stream, args...);
        return err == cudaSuccess ? 0 : launch_error(err);
    }
};

// Compiled into the same image as every kernel here, so its attributes say what code the device runs.
__global__ void pdl_probe_kernel() {}

// MOE_FLAG_PDL takes effect only on a device of compute capability 9.0 or newer that runs code
// compiled for 9.0 or newer: a library carrying only older PTX, JIT-compiled on a Hopper, has no
// griddepcontrol.wait in its kernels, and launching them as programmatic dependents would let a
// kernel read its predecessor's output before it is written. Elsewhere the flag is accepted and
// changes nothing. Asked once per device (two queries and a module lookup), then remembered.
bool device_has_pdl() {
    static DeviceMemo memo;
    return memo.current([](int dev) {
        int major = 0;
        cudaFuncAttributes fa{};
        const bool usable = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                            major >= 9 && cudaFuncGetAttributes(&fa, pdl_probe_kernel) == cudaSuccess &&
                            fa.ptxVersion >= 90;
        cudaGetLastError();  // not left behind for the next launch check
        return usable;
    });
}

// MOE_FLAG_AUTO's question: can the sm_90a prefill run on the current device with this library?
// Asked once per device (the answer either way is remembered; the reason for a no is not needed).
bool sm90_prefill_available() {
    static DeviceMemo memo;
    return memo.current([](int) {
        char why[256];
        return sm90_prefill_check(why, sizeof(why)) == 0;
    });
}

// combine: GEMM2 also applies the combine (one CTA per 16 output columns, over every active expert).
template <typename T, bool W8, int NT>
int decode_pair(const GemmArgs& g1, const GemmArgs& g2, int slots, bool combine, const Launch& launch) {
    const int threads = decode_warps(NT) * 32;
    if (int rc = launch(decode_gemm<T, W8, true, NT>, dim3(g1.N / 16, slots), threads, 0, g1)) return rc;
    if (combine) return launch(decode_gemm<T, W8, false, NT, true>, dim3(g2.N / 16, 1), threads, 0, g2);
    return launch(decode_gemm<T, W8, false, NT>, dim3(g2.N / 16, slots), threads, 0, g2);
}

template <typename T, bool W8>
int decode_gemms(int nt, const GemmArgs& g1, const GemmArgs& g2, int slots, bool combine, const Launch& launch) {
    switch (nt) {
        case 1: return decode_pair<T, W8, 1>(g1, g2, slots, combine, launch);
        case 2: return decode_pair<T, W8, 2>(g1, g2, slots, combine, launch);
        case 4: return decode_pair<T, W8, 4>(g1, g2, slots, combine, launch);
        default: return decode_pair<T, W8, 8>(g1, g2, slots, combine, launch);
    }
}

template <typename T, bool W8, int BN>
int prefill_gemms(const GemmArgs& g1, const GemmArgs& g2, int max_tiles, const Launch& launch) {
    constexpr int smem = PrefillSmem<W8, BN>::kBytes;
    cudaError_t err =
        cudaFuncSetAttribute(prefill_gemm<T, W8, true, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err == cudaSuccess)
        err = cudaFuncSetAttribute(prefill_gemm<T, W8, false, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) {
        cudaGetLastError();
        return launch_error(err);
    }
    const int gate_tiles = (g1.N + BN / 2 - 1) / (BN / 2);  // GEMM1's tile holds BN / 2 gate and BN / 2 up rows
    if (int rc = launch(prefill_gemm<T, W8, true, BN>, dim3(max_tiles, gate_tiles), kPrefillThreads, smem, g1))
        return rc;
    return launch(prefill_gemm<T, W8, false, BN>, dim3(max_tiles, (g2.N + BN - 1) / BN), kPrefillThreads, smem, g2);
}

template <typename T, bool W8>
int prefill_gemms(bool wide, const GemmArgs& g1, const GemmArgs& g2, int max_tiles, const Launch& launch) {
    return wide ? prefill_gemms<T, W8, kBNWide>(g1, g2, max_tiles, launch)
                : prefill_gemms<T, W8, kBN>(g1, g2, max_tiles, launch);
}

template <typename T>
int enqueue(const MoeTop2Params& p, char* ws, cudaStream_t s) {
    const int T_ = p.tokens, H = p.hidden_size, I = p.inter_size, E = p.num_experts, A = T_ * kTopK;
    const T* hidden = static_cast<const T*>(p.hidden);

    const bool w8 = p.weight_dtype == MOE_DTYPE_INT8;
    const int decode_max = w8 ? MOE_DECODE_MAX_TOKENS_INT8 : MOE_DECODE_MAX_TOKENS;
    const bool decode = (p.flags & MOE_FLAG_FORCE_DECODE) || (!(p.flags & MOE_FLAG_FORCE_PREFILL) && T_ <= decode_max);
    const bool tuned = p.flags & MOE_FLAG_AUTO;  // moe_top2.h: the measured-fastest choices
    const bool sm90 = !decode && ((p.flags & MOE_FLAG_PREFILL_SM90) ||
                                  (tuned && !w8 && T_ >= MOE_SM90_MIN_TOKENS && sm90_prefill_available()));
    // The common regions sit at the same offsets in both layouts: with MOE_FLAG_AUTO a workspace
    // sized for the sm_90a layout serves the other paths as well.
    const Layout L = layout(T_, H, I, E, sizeof(T), sm90);
    int* ids = reinterpret_cast<int*>(ws + L.ids);
    float* wts = reinterpret_cast<float*>(ws + L.wts);
    int* offsets = reinterpret_cast<int*>(ws + L.offsets);
    int* counters = reinterpret_cast<int*>(ws + L.counters);
    int* active = reinterpret_cast<int*>(ws + L.active);
    int* perm = reinterpret_cast<int*>(ws + L.perm);
    int4* tiles = reinterpret_cast<int4*>(ws + L.tiles);
    T* act = reinterpret_cast<T*>(ws + L.act);
    T* y = reinterpret_cast<T*>(ws + L.y);
    // The sm_90a path's CUTLASS GEMMs do not wait on their predecessors: that path never uses PDL.
    const Launch launch{s, (p.flags & MOE_FLAG_PDL) && !sm90 && device_has_pdl()};
    const int rblocks = (T_ + kRouterWarps - 1) / kRouterWarps;
    const Routing routing{offsets, counters, active, perm, tiles};
    const bool fused = decode && ((p.flags & MOE_FLAG_DECODE_FUSED) || (tuned && rblocks == 1));
    const bool fuse_permute = fused && rblocks == 1;  // one router CTA: it permutes too
    const Routing fuse_into = fuse_permute ? routing : Routing{};
    int rc = p.router_dtype == MOE_DTYPE_FP32
                 ? launch(router_kernel<T, float>, rblocks, kRouterWarps * 32, 0, hidden,
                          static_cast<const float*>(p.router), T_, H, E, ids, wts, fuse_into)
                 : launch(router_kernel<T, T>, rblocks, kRouterWarps * 32, 0, hidden, static_cast<const T*>(p.router),
                          T_, H, E, ids, wts, fuse_into);
    if (rc) return rc;
    if (!fuse_permute && (rc = launch(permute_kernel, 1, 1024, 0, ids, A, E, routing))) return rc;

    const int scale_fp32 = p.scale_dtype == MOE_DTYPE_FP32;
    T* out = static_cast<T*>(p.out);
    const GemmArgs g1{p.hidden, p.w13, p.w13_scale, act, offsets, perm, active, counters, tiles, H, I, scale_fp32,
                      nullptr, nullptr, T_};
    const GemmArgs g2{act, p.w2, p.w2_scale, y, offsets, perm, active, counters, tiles, I, H, scale_fp32, wts, out, T_};

    int* row_of = reinterpret_cast<int*>(ws + L.row_of);
    if (sm90) {
        const Sm90PrefillArgs a{T_, H, I, E, std::is_same_v<T, __nv_bfloat16>, p.hidden, p.w13, p.w2, offsets, perm,
                                y, act, ws + L.up, row_of, ws + L.sm90_args, ws + L.sm90_gemm};
        rc = sm90_prefill_enqueue(a, s, g_error, sizeof(g_error));
    } else if (decode) {
        const int groups = (min(T_, 64) + 7) / 8;  // most tokens one expert can get, 64 per pass
        const int nt = groups <= 1 ? 1 : groups <= 2 ? 2 : groups <= 4 ? 4 : 8;
        const int slots = min(E, A);  // active experts
        rc = w8 ? decode_gemms<T, true>(nt, g1, g2, slots, fused, launch)
                : decode_gemms<T, false>(nt, g1, g2, slots, fused, launch);
    } else {
        const int max_tiles = (A + kBM - 1) / kBM + E;
        const bool wide = p.flags & MOE_FLAG_PREFILL_WIDE;
        rc = w8 ? prefill_gemms<T, true>(wide, g1, g2, max_tiles, launch)
                : prefill_gemms<T, false>(wide, g1, g2, max_tiles, launch);
    }
    if (rc || fused) return rc;
    const size_t n8 = static_cast<size_t>(T_) * (H / 8);
    const unsigned cblocks = static_cast<unsigned>((n8 + 255) / 256);
    return sm90 ? launch(combine_kernel<T, true>, cblocks, 256, 0, y, row_of, wts, out, T_, H)
                : launch(combine_kernel<T, false>, cblocks, 256, 0, y, nullptr, wts, out, T_, H);
}

}  // namespace

extern "C" {

size_t mixtral_moe_top2_workspace_size(int tokens, int hidden, int inter, int experts, int top_k, int act_dtype) {
    return mixtral_moe_top2_workspace_size_flags(tokens, hidden, inter, experts, top_k, act_dtype, 0);
}

size_t mixtral_moe_top2_workspace_size_flags(int tokens, int hidden, int inter, int experts, int top_k,
                                             int act_dtype, int flags) {
    if (check_shapes(tokens, hidden, inter, experts, top_k, act_dtype)) return 0;
    g_error[0] = '\0';
    return layout(tokens, hidden, inter, experts, 2, flags & (MOE_FLAG_PREFILL_SM90 | MOE_FLAG_AUTO)).total;
}

int mixtral_moe_top2_enqueue(const MoeTop2Params* p, void* workspace, cudaStream_t stream) {
    if (int rc = validate(p, workspace)) return rc;
    g_error[0] = '\0';
    if (p->tokens == 0) return 0;
    char* ws = static_cast<char*>(workspace);
    return p->act_dtype == MOE_DTYPE_FP16 ? enqueue<half>(*p, ws, stream) : enqueue<__nv_bfloat16>(*p, ws, stream);
}

const char* mixtral_moe_top2_last_error(void) { return g_error; }

int mixtral_moe_top2_version(void) { return MIXTRAL_MOE_TOP2_VERSION; }

}  // extern "C"
