// Hopper prefill path (MOE_FLAG_PREFILL_SM90): the expert GEMMs as CUTLASS 3.x grouped GEMMs,
// KernelPtrArrayTmaWarpSpecializedCooperative (TMA loads, wgmma, persistent CTAs), one kernel
// type per dtype shared by both GEMMs. See KERNELS.md ("sm_90a prefill path") for the design.
//
// The routing is known only on the device, so a setup kernel writes each group's problem shape,
// pointers and strides from the permute kernel's offsets, and CUTLASS is given no host problem
// shapes (GroupProblemShape::host_problem_shapes = nullptr). In that mode
// PersistentTileSchedulerSm90Group sizes the grid from the SM count alone (get_tiled_cta_shape_mnl:
// total_ctas = sm_count) and every CTA walks the groups' tile counts on the device; a group with
// M = 0 has no tiles and is skipped. The kernels' host side only builds placeholder TMA
// descriptors (to_underlying_arguments); the real shapes and addresses are patched in per group
// by the kernel, so an enqueue never waits for the device.
//
// TMA cannot gather rows on Hopper, so the permuted rows are copied into y first (y is free until
// GEMM2). GEMM1 runs as 2E groups, gate (w1 rows) into act and up (w3 rows) into up, so that
// silu(gate) * up needs no [A, 2I] buffer. GEMM2 writes y in permuted order (TMA stores
// whole tiles; it cannot scatter), and combine reads it through row_of.
//
// Every architecture of the build compiles this file: CUDA requires a launched kernel template
// to be instantiated in every compilation pass, and CUTLASS compiles the GEMM bodies for archs
// other than sm_90a to a trap. sm90_prefill_check tells, before anything is launched, whether the
// device is sm_90 and whether this library holds the sm_90a image.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#include "common.cuh"
#include "prefill_sm90.h"

// The ptr-array GEMMs rewrite each group's TMA descriptors on the device (tensormap.replace). Without
// that (nvcc before 12.3), CUTLASS compiles the rewrite to a printf and the GEMMs would run on
// placeholder descriptors: refuse to build such an sm_90a image.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(CUTE_ARCH_DEVICE_MODIFIABLE_TMA_SM90_ENABLED)
#error "prefill_sm90.cu needs device-modifiable TMA descriptors (CUDA 12.3 or newer) for its sm_90a image"
#endif

namespace moe {
namespace {

// ------------------------------------------------------------------------------------------
// The GEMM: D[M, N] = A[M, K] * B[N, K]^T per group. A = permuted activation rows, B = one
// expert's weight rows (K contiguous in both: "TN"), D row-major, fp32 accumulation.
// ------------------------------------------------------------------------------------------

template <typename T>
struct CutlassElem;
template <>
struct CutlassElem<half> {
    using type = cutlass::half_t;
};
template <>
struct CutlassElem<__nv_bfloat16> {
    using type = cutlass::bfloat16_t;
};

template <typename T>
struct Grouped {
    using E = typename CutlassElem<T>::type;
    using Problem = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K) per group
    using RowMajor = cutlass::layout::RowMajor;
    using ColMajor = cutlass::layout::ColumnMajor;
    static constexpr int kAlign = 16 / sizeof(E);  // TMA: 16-byte rows and addresses
    // 128 rows per tile: an expert gets about 2T/E rows, so a taller tile wastes more on each
    // expert's last partial tile. 256 weight rows and two consumer warpgroups of 64 x 256.
    using Tile = cute::Shape<cute::_128, cute::_256, cute::_64>;
    using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;

    using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float,
        void, RowMajor*, kAlign,  // no source operand C: D = acc
        E, RowMajor*, kAlign, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
        cutlass::epilogue::fusion::LinearCombination<E, float, void, float>>::CollectiveOp;

    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, RowMajor*, kAlign, E, ColMajor*, kAlign, float, Tile,
        Cluster,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

    using Kernel = cutlass::gemm::kernel::GemmUniversal<Problem, Mainloop, Epilogue>;

    // Every operand is a K- (or N-) contiguous row-major matrix: one leading dimension per group.
    using Stride = cute::Stride<int64_t, cute::_1, cute::_0>;
    static_assert(std::is_same_v<typename Kernel::InternalStrideA, Stride>, "A must be row-major (K contiguous)");
    static_assert(std::is_same_v<typename Kernel::InternalStrideB, Stride>, "B must be [N, K] (K contiguous)");
    static_assert(std::is_same_v<typename Kernel::InternalStrideD, Stride>, "D must be row-major");
    // Launch limits, checked here rather than by a failed launch on a GPU: an sm_90 CTA may opt in
    // to 227 KB of shared memory (the tile's 4 stages and epilogue take 210 KB), and kernel
    // parameters beyond 4 KB need CUDA 12.1's large-parameter launches (they take 1.75 KB).
    static_assert(Kernel::SharedStorageSize <= 227 * 1024, "the GEMM's shared memory exceeds an sm_90 CTA's 227 KB");
    static_assert(sizeof(typename Kernel::Params) <= 4096, "the GEMM's kernel parameters exceed 4 KB");
};

// One grouped GEMM's device-side arguments, carved from the workspace's args region.
template <typename T>
struct GroupArrays {
    using E = typename Grouped<T>::E;
    using Shape = typename Grouped<T>::Problem::UnderlyingProblemShape;
    using Stride = typename Grouped<T>::Stride;
    Shape* shape;
    const E** a;
    const E** b;
    E** d;
    Stride* sa;
    Stride* sb;
    Stride* sd;
};

constexpr size_t align16(size_t n) { return (n + 15) & ~static_cast<size_t>(15); }

template <typename T>
T* carve(char*& p, size_t n) {
    T* r = reinterpret_cast<T*>(p);
    p += align16(n * sizeof(T));
    return r;
}

template <typename T>
GroupArrays<T> carve_groups(char*& p, int groups) {
    using G = GroupArrays<T>;
    static_assert(sizeof(typename G::Shape) + 3 * sizeof(void*) + 3 * sizeof(typename G::Stride) <= kSm90ArgBytesPerGroup,
                  "kSm90ArgBytesPerGroup (prefill_sm90.h) is too small for one group's arguments");
    G g;
    g.shape = carve<typename G::Shape>(p, groups);
    g.a = carve<const typename G::E*>(p, groups);
    g.b = carve<const typename G::E*>(p, groups);
    g.d = carve<typename G::E*>(p, groups);
    g.sa = carve<typename G::Stride>(p, groups);
    g.sb = carve<typename G::Stride>(p, groups);
    g.sd = carve<typename G::Stride>(p, groups);
    return g;
}

// ------------------------------------------------------------------------------------------
// Plain kernels around the GEMMs (any arch; launched only after sm90_prefill_check).
// ------------------------------------------------------------------------------------------

// xperm[r] = hidden[perm[r] / 2], 16 bytes per thread; also row_of[perm[r]] = r for combine.
template <typename T>
__global__ void __launch_bounds__(256)
    gather_rows_kernel(const T* hidden, const int* perm, int A, int H, T* xperm, int* row_of) {
    const int h8 = H / 8;
    const size_t n = static_cast<size_t>(A) * h8;
    for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<size_t>(gridDim.x) * blockDim.x) {
        const size_t r = i / h8, c = (i % h8) * 8;
        const int a = perm[r];
        if (c == 0) row_of[a] = static_cast<int>(r);
        *reinterpret_cast<uint4*>(xperm + r * H + c) = ld_cached(hidden + static_cast<size_t>(a / kTopK) * H + c);
    }
}

// Problem shapes, pointers and strides of GEMM1 (groups e: gate, E + e: up) and GEMM2 (group e)
// from the offsets. Experts without tokens get M = 0 (no tiles; their pointers are never read).
template <typename T>
__global__ void setup_groups_kernel(GroupArrays<T> g1, GroupArrays<T> g2, const int* offsets, int E, int H, int I,
                                    const T* xperm, const T* w13, const T* w2, T* act, T* up, T* y) {
    using C = typename Grouped<T>::E;
    const auto ld = [](int n) { return cute::make_stride(static_cast<int64_t>(n), cute::_1{}, cute::_0{}); };
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const int r0 = offsets[e], m = offsets[e + 1] - r0;
        const C* x = reinterpret_cast<const C*>(xperm + static_cast<size_t>(r0) * H);
        const C* w1 = reinterpret_cast<const C*>(w13 + static_cast<size_t>(e) * 2 * I * H);
        const int up_g = E + e;
        g1.shape[e] = g1.shape[up_g] = cute::make_shape(m, I, H);
        g1.a[e] = g1.a[up_g] = x;
        g1.b[e] = w1;
        g1.b[up_g] = w1 + static_cast<size_t>(I) * H;
        g1.d[e] = reinterpret_cast<C*>(act + static_cast<size_t>(r0) * I);
        g1.d[up_g] = reinterpret_cast<C*>(up + static_cast<size_t>(r0) * I);
        g1.sa[e] = g1.sa[up_g] = ld(H);
        g1.sb[e] = g1.sb[up_g] = ld(H);
        g1.sd[e] = g1.sd[up_g] = ld(I);

        g2.shape[e] = cute::make_shape(m, H, I);
        g2.a[e] = reinterpret_cast<const C*>(act + static_cast<size_t>(r0) * I);
        g2.b[e] = reinterpret_cast<const C*>(w2 + static_cast<size_t>(e) * H * I);
        g2.d[e] = reinterpret_cast<C*>(y + static_cast<size_t>(r0) * H);
        g2.sa[e] = ld(I);
        g2.sb[e] = ld(I);
        g2.sd[e] = ld(H);
    }
}

// act = silu(act) * up in place, 8 elements per thread. gate and up were rounded to the
// activation dtype by GEMM1's epilogue, as in the PyTorch reference.
template <typename T>
__global__ void __launch_bounds__(256) silu_mul_kernel(T* act, const T* up, size_t n8) {
    for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n8;
         i += static_cast<size_t>(gridDim.x) * blockDim.x) {
        const uint4 g = *reinterpret_cast<const uint4*>(act + 8 * i), u = ld_cached(up + 8 * i);
        *reinterpret_cast<uint4*>(act + 8 * i) = map8<T>(g, u, [](float fg, float fu) { return silu(fg) * fu; });
    }
}

// Which image of this library the device runs: its launch bound is kProbeSm90a only in an
// sm_90a image (the host reads it back with cudaFuncGetAttributes; nothing is launched).
constexpr int kProbeSm90a = 128;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int kProbeThreads = kProbeSm90a;
#else
constexpr int kProbeThreads = 64;
#endif
__global__ void __launch_bounds__(kProbeThreads) sm90a_probe_kernel(int* out) {
    if (out != nullptr) out[threadIdx.x] = kProbeThreads;
}

// ------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------

int say(char* msg, size_t size, int code, const char* fmt, ...) __attribute__((format(printf, 4, 5)));
int say(char* msg, size_t size, int code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, size, fmt, ap);
    va_end(ap);
    return code;
}

// One launch on stream s (never a programmatic dependent: the CUTLASS GEMMs do not wait on their
// predecessors). 0, or its error, said in msg with the step's name.
template <typename... Params, typename... Args>
int launch(char* msg, size_t size, const char* what, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
           cudaStream_t s, Args... args) {
    const cudaError_t err = launch_kernel(false, kernel, grid, block, smem, s, args...);
    if (err == cudaSuccess) return 0;
    return say(msg, size, static_cast<int>(err), "sm90 prefill: %s launch failed: %s (%s)", what, cudaGetErrorName(err),
               cudaGetErrorString(err));
}

// CUTLASS reports a failed cuTensorMapEncodeTiled only on stderr (its assert is compiled out) and
// leaves that descriptor as it was: all zero, which a valid descriptor never is.
bool blank(const cute::TmaDescriptor* d) {
    const auto* b = reinterpret_cast<const unsigned char*>(d);
    return std::all_of(b, b + sizeof(cute::TmaDescriptor), [](unsigned char c) { return c == 0; });
}

// A persistent grid of about one CTA per SM: enough blocks for the element-wise kernels.
unsigned elementwise_blocks(size_t n, int sms) {
    const size_t want = (n + 255) / 256, most = static_cast<size_t>(sms) * 8;
    return static_cast<unsigned>(want < most ? (want > 0 ? want : 1) : most);
}

template <typename T>
int run_grouped(const GroupArrays<T>& g, int groups, void* ws, int device, int sms, cudaStream_t s, char* msg,
                size_t size, const char* name) {
    using K = typename Grouped<T>::Kernel;
    typename K::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = {groups, g.shape, nullptr};  // shapes only on the device
    args.mainloop = {g.a, g.sa, g.b, g.sb};
    args.epilogue.ptr_C = nullptr;  // beta = 0 (the fusion's default), no C
    args.epilogue.dC = nullptr;
    args.epilogue.ptr_D = g.d;
    args.epilogue.dD = g.sd;
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sms;
    if (!K::can_implement(args))
        return say(msg, size, cudaErrorInvalidValue, "sm90 prefill: CUTLASS refused %s (%d groups)", name, groups);
    const size_t need = K::get_workspace_size(args);
    if (need > kSm90GemmWorkspaceBytes)
        return say(msg, size, cudaErrorInvalidValue,
                   "sm90 prefill: %s needs %zu bytes of CUTLASS workspace for %d SMs; kSm90GemmWorkspaceBytes "
                   "(prefill_sm90.h) reserves %zu",
                   name, need, sms, kSm90GemmWorkspaceBytes);
    if (K::initialize_workspace(args, ws, s) != cutlass::Status::kSuccess)
        return say(msg, size, cudaErrorUnknown, "sm90 prefill: CUTLASS could not initialise the workspace of %s", name);
    const typename K::Params params = K::to_underlying_arguments(args, ws);
    const auto& ml = params.mainloop;
    if (blank(ml.tma_load_a.get_tma_descriptor()) || blank(ml.tma_load_b.get_tma_descriptor()) ||
        blank(params.epilogue.tma_store_d.get_tma_descriptor()))
        return say(msg, size, cudaErrorUnknown,
                   "sm90 prefill: CUTLASS could not build the TMA descriptors of %s (cuTensorMapEncodeTiled failed; "
                   "the reason is on stderr)",
                   name);
    constexpr int smem = K::SharedStorageSize;
    const cudaError_t err = cudaFuncSetAttribute(cutlass::device_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) {
        cudaGetLastError();
        return say(msg, size, static_cast<int>(err), "sm90 prefill: %d bytes of shared memory for %s: %s", smem, name,
                   cudaGetErrorName(err));
    }
    return launch(msg, size, name, cutlass::device_kernel<K>, K::get_grid_shape(params), K::get_block_shape(), smem, s,
                  params);
}

template <typename T>
int run_path(const Sm90PrefillArgs& p, cudaStream_t s, char* msg, size_t size) {
    const int A = p.tokens * kTopK, H = p.hidden, I = p.inter, E = p.experts;
    int device = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) {
        cudaGetLastError();
        return say(msg, size, static_cast<int>(err), "sm90 prefill: device query failed: %s", cudaGetErrorName(err));
    }
    sms = sms < kSm90MaxSms ? sms : kSm90MaxSms;  // the workspace holds TMA descriptors for that many
    T* y = static_cast<T*>(p.y);
    T* act = static_cast<T*>(p.act);
    T* up = static_cast<T*>(p.up);

    const unsigned gather_blocks = elementwise_blocks(static_cast<size_t>(A) * (H / 8), sms);
    if (int rc = launch(msg, size, "gather", gather_rows_kernel<T>, gather_blocks, 256, 0, s,
                        static_cast<const T*>(p.hidden_states), p.perm, A, H, y, p.row_of))
        return rc;

    char* cursor = static_cast<char*>(p.args);
    const GroupArrays<T> g1 = carve_groups<T>(cursor, 2 * E), g2 = carve_groups<T>(cursor, E);
    if (static_cast<size_t>(cursor - static_cast<char*>(p.args)) > sm90_args_bytes(E))
        return say(msg, size, cudaErrorInvalidValue, "sm90 prefill: group arguments overflow sm90_args_bytes(%d)", E);
    if (int rc = launch(msg, size, "setup", setup_groups_kernel<T>, 1, 256, 0, s, g1, g2, p.offsets, E, H, I, y,
                        static_cast<const T*>(p.w13), static_cast<const T*>(p.w2), act, up, y))
        return rc;

    if (int rc = run_grouped<T>(g1, 2 * E, p.gemm_ws, device, sms, s, msg, size, "GEMM1 (gate, up)")) return rc;
    const size_t n8 = static_cast<size_t>(A) * I / 8;
    if (int rc = launch(msg, size, "silu(gate) * up", silu_mul_kernel<T>, elementwise_blocks(n8, sms), 256, 0, s, act,
                        up, n8))
        return rc;
    return run_grouped<T>(g2, E, p.gemm_ws, device, sms, s, msg, size, "GEMM2 (down)");
}

}  // namespace

int sm90_prefill_check(char* msg, size_t size) {
    const char* flag = "MOE_FLAG_PREFILL_SM90";
    static DeviceMemo passed;  // only a pass is remembered: a refusal is asked again, to say why
    int device = 0, major = 0, minor = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess && passed.get(device) > 0) return 0;
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (err != cudaSuccess) {
        cudaGetLastError();  // not left behind for the next launch check
        return say(msg, size, cudaErrorInvalidValue, "%s needs an sm_90 (Hopper) GPU; the device query failed: %s", flag,
                   cudaGetErrorName(err));
    }
    if (major != 9 || minor != 0)
        return say(msg, size, cudaErrorInvalidValue,
                   "%s needs an sm_90 (Hopper) GPU; device %d is sm_%d%d: leave the flag out there", flag, device, major,
                   minor);
    cudaFuncAttributes fa{};
    err = cudaFuncGetAttributes(&fa, sm90a_probe_kernel);
    if (err != cudaSuccess) {
        cudaGetLastError();
        return say(msg, size, cudaErrorInvalidValue,
                   "%s: this library has no code for sm_90 (%s); rebuild it with arch 90a "
                   "(python -m mixtral_trt.plugins.build --arch 90a)",
                   flag, cudaGetErrorName(err));
    }
    if (fa.maxThreadsPerBlock != kProbeSm90a)
        return say(msg, size, cudaErrorInvalidValue,
                   "%s: this library was built for sm_90 without the sm_90a features (wgmma, TMA) the path needs; "
                   "rebuild it with arch 90a, not 90",
                   flag);
    passed.set(device, true);
    return 0;
}

int sm90_prefill_enqueue(const Sm90PrefillArgs& a, cudaStream_t stream, char* msg, size_t msg_size) {
    return a.bf16 ? run_path<__nv_bfloat16>(a, stream, msg, msg_size) : run_path<half>(a, stream, msg, msg_size);
}

}  // namespace moe
