// Shared device helpers of the MoETop2 kernels: element types, 16-byte loads, int8 -> fp16/bf16
// conversion, and the m16n8k16 tensor-core instruction (sm_80+, also sm_89/90a/120).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>

namespace moe {

constexpr int kTopK = 2;

template <typename T>
struct Elem;
template <>
struct Elem<half> {
    static __device__ __forceinline__ float to_float(half x) { return __half2float(x); }
    static __device__ __forceinline__ half from_float(float x) { return __float2half_rn(x); }
    static __device__ __forceinline__ uint32_t pack2(float a, float b) {
        __half2 h = __floats2half2_rn(a, b);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    static __device__ __forceinline__ float2 unpack2(uint32_t v) {
        return __half22float2(*reinterpret_cast<__half2*>(&v));
    }
};
template <>
struct Elem<__nv_bfloat16> {
    static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
    static __device__ __forceinline__ uint32_t pack2(float a, float b) {
        __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    static __device__ __forceinline__ float2 unpack2(uint32_t v) {
        return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
    }
};

// Eight elements of a and eight of b (one 16-byte vector each) -> f(a_i, b_i) computed in fp32 and
// rounded back to T, as one 16-byte vector.
template <typename T, typename F>
__device__ __forceinline__ uint4 map8(const uint4& a, const uint4& b, F f) {
    const uint32_t* aw = reinterpret_cast<const uint32_t*>(&a);
    const uint32_t* bw = reinterpret_cast<const uint32_t*>(&b);
    uint4 o;
    uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 fa = Elem<T>::unpack2(aw[k]), fb = Elem<T>::unpack2(bw[k]);
        ow[k] = Elem<T>::pack2(f(fa.x, fb.x), f(fa.y, fb.y));
    }
    return o;
}

// The combine of eight output elements: w0 * a_i + w1 * b_i, each product rounded, then one rounded
// sum (the same value in either order, and the reference's index_add into zeros). combine_kernel
// and the fused decode GEMM2 both use it, so their results are the same bits.
template <typename T>
__device__ __forceinline__ uint4 combine8(const uint4& a, const uint4& b, float w0, float w1) {
    return map8<T>(a, b, [=](float fa, float fb) { return __fadd_rn(__fmul_rn(w0, fa), __fmul_rn(w1, fb)); });
}

// Weights are streamed once: skip L1, ask L2 for 256-byte prefetch.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ uint4 ld_cached(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Warm L2 with the line holding p (no register result, nothing to wait for).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Programmatic dependent launch (MOE_FLAG_PDL, sm_90+). A kernel launched as a programmatic
// dependent may start while the previous kernel on the stream drains: pdl_wait() returns once
// that kernel has completed and its writes are visible, and pdl_launch_dependents() lets the next
// kernel launch before this one ends. Every kernel here waits before it reads anything an earlier
// kernel wrote, and lets its dependents launch only after its own wait, so when a kernel starts
// every kernel two or more launches back has completed. Both are no-ops without the launch
// attribute and on archs before sm_90 (where the host never sets it).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
    uint32_t d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

// Four int8 (little-endian in w) -> two packed pairs {e0,e1}, {e2,e3}, exactly.
template <typename T>
struct I8;
template <>
struct I8<half> {
    // 0x64XX as fp16 is 1024 + XX; with the sign bit flipped XX = x + 128, so subtract 1152.
    static __device__ __forceinline__ void cvt4(uint32_t w, uint32_t& lo, uint32_t& hi) {
        const uint32_t u = w ^ 0x80808080u;
        lo = prmt(u, 0x64646464u, 0x4140u);
        hi = prmt(u, 0x64646464u, 0x4342u);
        const uint32_t magic = 0x64806480u;
        asm("sub.f16x2 %0, %1, %2;" : "=r"(lo) : "r"(lo), "r"(magic));
        asm("sub.f16x2 %0, %1, %2;" : "=r"(hi) : "r"(hi), "r"(magic));
    }
};
template <>
struct I8<__nv_bfloat16> {
    // 0x4B0000XX as fp32 is 2^23 + XX; subtract 2^23 + 128, then keep the top 16 bits (exact:
    // integers of magnitude <= 128 are bf16 values).
    static __device__ __forceinline__ void cvt4(uint32_t w, uint32_t& lo, uint32_t& hi) {
        const uint32_t u = w ^ 0x80808080u;
        float f[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(prmt(u, 0x4B000000u, 0x7540u | i)) - 8388736.0f;
        lo = prmt(__float_as_uint(f[0]), __float_as_uint(f[1]), 0x7632u);
        hi = prmt(__float_as_uint(f[2]), __float_as_uint(f[3]), 0x7632u);
    }
};

// D = A(16x16, row) * B(16x8, col) + D, fp32 accumulators. Fragment layout (g = lane / 4,
// q = lane % 4): a0 (row g, k 2q..2q+1), a1 (row g+8, same k), a2 (row g, k 2q+8..), a3 (row g+8,
// k 2q+8..); b0 (k 2q..2q+1, col g), b1 (k 2q+8.., col g); c0,c1 (row g, cols 2q, 2q+1),
// c2,c3 (row g+8, same cols).
template <typename T>
__device__ __forceinline__ void mma16816(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<half>(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                        uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

__device__ __forceinline__ float load_scale(const void* s, size_t i, bool fp32) {
    return fp32 ? static_cast<const float*>(s)[i] : __half2float(static_cast<const half*>(s)[i]);
}

// Yes/no answers about a device that hold for the life of the process (its compute capability,
// which image of this library it runs), remembered per device ordinal so that an enqueue asks CUDA
// once per device. A static DeviceMemo starts with every answer unknown.
struct DeviceMemo {
    static constexpr int kDevices = 64;
    std::atomic<signed char> known[kDevices];  // 0 unknown, 1 yes, -1 no
    // 1 or -1 once remembered for device dev, else 0 (devices beyond kDevices are never remembered).
    signed char get(int dev) const {
        return dev >= 0 && dev < kDevices ? known[dev].load(std::memory_order_relaxed) : 0;
    }
    void set(int dev, bool yes) {
        if (dev >= 0 && dev < kDevices) known[dev].store(yes ? 1 : -1, std::memory_order_relaxed);
    }
    // The current device's answer: remembered, or ask(dev) once and remembered either way. No
    // device (cudaGetDevice fails) is a no, and its error is not left behind for the next launch check.
    template <typename Ask>
    bool current(Ask ask) {
        int dev = 0;
        if (cudaGetDevice(&dev) != cudaSuccess) {
            cudaGetLastError();
            return false;
        }
        if (const signed char seen = get(dev)) return seen > 0;
        const bool yes = ask(dev);
        set(dev, yes);
        return yes;
    }
};

// One launch on stream s; with pdl, as a programmatic dependent of the previous launch there (see
// pdl_wait). Returns this launch's own error, never one left over from an earlier call, and clears
// it (a launch error is not sticky).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(bool pdl, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                          Args... args) {
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cfg.attrs = pdl ? &attr : nullptr;
    cfg.numAttrs = pdl ? 1 : 0;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
    if (err != cudaSuccess) cudaGetLastError();
    return err;
}

// Arguments shared by the decode and prefill expert GEMMs. GEMM1 (gated): x = hidden gathered
// through perm, w = w13 [E, 2N, K], out = act [A, N]. GEMM2: x = act [A, K], w = w2 [E, N, K],
// out = y [A, N] at row perm[r] (assignment order).
struct GemmArgs {
    const void* x;
    const void* w;
    const void* scale;  // [E, rows of w] or null
    void* out;
    const int* offsets;   // [E + 1]
    const int* perm;      // [A]
    const int* active;    // [E]
    const int* counters;  // {tiles, active experts}
    const int4* tiles;    // prefill row tiles
    int K;                // reduction length
    int N;                // outputs per expert (GEMM1: I, GEMM2: H)
    int scale_fp32;
    // The decode GEMM2 with the combine fused (MOE_FLAG_DECODE_FUSED) only:
    const float* wts;     // [A] routing weights
    void* final_out;      // [T, N] the op's output
    int tokens;           // T
};

}  // namespace moe
