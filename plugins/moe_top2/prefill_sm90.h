// Hopper prefill path (MOE_FLAG_PREFILL_SM90): the expert GEMMs as CUTLASS 3.x grouped GEMMs
// (TMA + wgmma, sm_90a only), in their own translation unit (prefill_sm90.cu) so that only it
// needs the CUTLASS headers. kernels.cu lays out the workspace, validates, and runs the router,
// the permutation and the combine around it.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>

namespace moe {

// Workspace of this path beyond the regions every path shares (moe_top2.h). Fixed per shape so
// that mixtral_moe_top2_workspace_size_flags stays a pure function of the shapes and flags;
// prefill_sm90.cu checks at run time that what CUTLASS asks for fits.
//   args: per group of the two grouped GEMMs (2E + E groups) a problem shape, three pointers and
//         three strides (60 bytes), each array 16-byte aligned.
//   gemm: CUTLASS's TMA descriptors, at most 4 x 128 bytes per SM; enough for 256 SMs (GH100
//         has 144), and the persistent grid is capped there.
constexpr size_t kSm90ArgBytesPerGroup = 64;
constexpr int kSm90MaxSms = 256;
constexpr size_t kSm90GemmWorkspaceBytes = 4 * 128 * static_cast<size_t>(kSm90MaxSms);
inline size_t sm90_args_bytes(size_t experts) { return kSm90ArgBytesPerGroup * (3 * experts + 4); }

// Device pointers into the workspace and the op's tensors (A = 2T assignments, permuted rows).
struct Sm90PrefillArgs {
    int tokens, hidden, inter, experts;  // T, H, I, E
    bool bf16;                           // activations and weights: bf16, else fp16
    const void* hidden_states;           // [T, H]
    const void* w13;                     // [E, 2I, H]
    const void* w2;                      // [E, H, I]
    const int* offsets;                  // [E + 1] first permuted row of each expert
    const int* perm;                     // [A] assignment held by permuted row r
    void* y;        // [A, H]: the gathered rows during GEMM1, then GEMM2's output (permuted rows)
    void* act;      // [A, I]: gate, then silu(gate) * up (permuted rows)
    void* up;       // [A, I]
    int* row_of;    // [A]: permuted row of assignment a (combine reads y through it)
    void* args;     // sm90_args_bytes(E)
    void* gemm_ws;  // kSm90GemmWorkspaceBytes
};

// 0 if this library can run the path on the current device, else cudaErrorInvalidValue with
// the reason (and the fix) in msg.
int sm90_prefill_check(char* msg, size_t msg_size);

// gather -> grouped GEMM1 (gate and up) -> silu(gate) * up -> grouped GEMM2, on stream, with no
// host synchronisation. Returns 0 or a cudaError_t code with a message in msg.
int sm90_prefill_enqueue(const Sm90PrefillArgs& a, cudaStream_t stream, char* msg, size_t msg_size);

}  // namespace moe
