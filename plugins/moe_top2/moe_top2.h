/*
 * mixtral.MoETop2 kernels: C ABI (no TensorRT dependency).
 *
 * One enqueue runs Mixtral's sparse MoE on a CUDA stream without any host synchronisation
 * (so decode can be captured in a CUDA graph):
 *
 *   logits = hidden @ router^T (fp32) -> softmax -> top-2 -> renormalise          [router]
 *   per-expert counts, offsets, stable permutation, tile list (all on the device)  [permute]
 *   act = silu(x @ w1[e]^T) * (x @ w3[e]^T), rows gathered by the permutation      [gemm1]
 *   y   = act @ w2[e]^T                                                           [gemm2]
 *   out[t] = w_t0 * y[t, 0] + w_t1 * y[t, 1] (fixed order: deterministic)         [combine]
 *
 * Dimension legend: T tokens, H hidden, I expert FFN size, E experts, K = top_k = 2,
 * A = T*K (token, slot) assignments.
 *
 * Data types use TensorRT's nvinfer1::DataType codes so a plugin passes them through:
 * 0 = fp32, 1 = fp16, 2 = int8, 7 = bf16.
 */
#ifndef MIXTRAL_MOE_TOP2_H
#define MIXTRAL_MOE_TOP2_H

#include <stddef.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MIXTRAL_MOE_TOP2_VERSION 1

#define MOE_DTYPE_FP32 0
#define MOE_DTYPE_FP16 1
#define MOE_DTYPE_INT8 2
#define MOE_DTYPE_BF16 7

/* flags: force one GEMM path (tests, benchmarks); 0 picks by token count. */
#define MOE_FLAG_FORCE_DECODE 1
#define MOE_FLAG_FORCE_PREFILL 2
/* The prefill path (chosen by T, or forced with MOE_FLAG_FORCE_PREFILL) runs CUTLASS grouped GEMMs
 * (TMA + wgmma) instead of the mma.sync kernels. Needs an sm_90 device, a library built with
 * sm_90a, and fp16/bf16 weights; refused otherwise, and together with MOE_FLAG_FORCE_DECODE.
 * MOE_FLAG_AUTO takes it where it runs and is faster. */
#define MOE_FLAG_PREFILL_SM90 4
/* Programmatic dependent launch: on an sm_90+ device each of the five launches may start while the
 * one before it drains (each kernel waits for its predecessor with griddepcontrol.wait before it
 * reads that kernel's output; the decode GEMM2 also warms L2 with its first weights meanwhile).
 * The results are bit-identical to a launch without the flag. The first kernel waits until the
 * kernel before the enqueue on the stream has completed (a caller that launches its own kernels as
 * programmatic dependents must have that kernel wait for its predecessors, as such kernels do), and
 * the caller's next kernel starts after the last one ends, as without the flag. Accepted on every
 * device; it changes nothing before sm_90, with a library whose code for the device is older than
 * sm_90 (PTX JIT-compiled), and on the MOE_FLAG_PREFILL_SM90 path. Opt-in: measured on an H100 and an
 * H200 at most 4% faster in CUDA graphs; with fused decode nothing for fp16/bf16 weights, and int8
 * decode up to 11% slower. */
#define MOE_FLAG_PDL 8
/* The mma.sync prefill GEMMs use 128 x 256 CTA tiles (4 stages, one CTA per SM, 64 x 64 per warp)
 * in place of 128 x 128 (3 stages, two CTAs per SM, 64 x 32 per warp): fewer shared-memory reads
 * per mma. Every output element sums its k in the same order, so the results are bit-identical.
 * No effect on the decode path or with MOE_FLAG_PREFILL_SM90. Opt-in: on an H100 and an H200 it measured
 * 0.86-1.14x the default tiles, faster only at 4096 tokens and not in every run. */
#define MOE_FLAG_PREFILL_WIDE 16
/* Fused decode: on the decode path, up to 8 tokens (one router CTA) the router's CTA also builds
 * the permutation, and GEMM2 runs one CTA per 16 output columns over every active expert in turn
 * (in place of one per 16 columns and expert), then applies the combine to its columns itself:
 * three launches instead of five (four above 8 tokens), and the same weight bytes for every CTA.
 * Bit-identical results. No effect on the prefill paths. MOE_FLAG_AUTO takes it up to 8 tokens, where it
 * measured 4-25% faster on an H100 and an H200; above 8 it is slower with int8 weights. */
#define MOE_FLAG_DECODE_FUSED 32
/* The measured-fastest choices for the device, as the TensorRT plugins enqueue: MOE_FLAG_DECODE_FUSED
 * on the decode path up to 8 tokens; MOE_FLAG_PREFILL_SM90 on the prefill path from
 * MOE_SM90_MIN_TOKENS tokens where it can run (an sm_90 device, a library built with sm_90a and
 * CUTLASS, fp16/bf16 weights), the mma.sync prefill elsewhere. Bit-identical to flags 0 except
 * where the sm_90a path runs (a different summation order). With fp16/bf16 weights the workspace
 * must be sized with this flag (mixtral_moe_top2_workspace_size_flags: the sm_90a layout, on every
 * device, so an engine's workspace does not depend on the GPU it was built on); with int8 weights
 * the flags-0 size suffices. */
#define MOE_FLAG_AUTO 64

/* Tokens up to which the memory-bound decode path is chosen automatically (measured crossover
 * with the tensor-core path on an H200 at Mixtral dims: between 32 and 64 tokens for fp16/bf16
 * weights, above 64 for int8; on an H100 the mma.sync prefill is already 4-8% faster at 16-32
 * fp16/bf16 tokens, where the H200's decode path is 19-31% faster). Forced decode handles any T,
 * 64 token columns per pass. */
#define MOE_DECODE_MAX_TOKENS 32
#define MOE_DECODE_MAX_TOKENS_INT8 64
/* Tokens from which MOE_FLAG_AUTO runs the sm_90a prefill (measured crossover with the mma.sync
 * prefill at Mixtral dims: between 384 and 512 tokens on an H100; at 512 the sm_90a path is
 * 1.1-1.2x faster on an H100 and 1.4-1.7x on an H200). */
#define MOE_SM90_MIN_TOKENS 512
#define MOE_MAX_EXPERTS 256

typedef struct MoeTop2Params {
    int tokens;       /* T >= 0 (0: nothing to do) */
    int hidden_size;  /* H, multiple of 64 */
    int inter_size;   /* I, multiple of 64 */
    int num_experts;  /* E, 2..256 */
    int top_k;        /* must be 2 */
    int act_dtype;    /* hidden/out: fp16 or bf16 */
    int router_dtype; /* router: act_dtype or fp32 */
    int weight_dtype; /* w13/w2: act_dtype or int8 */
    int scale_dtype;  /* int8 scales: fp16 or fp32 (ignored otherwise) */
    int flags;        /* MOE_FLAG_* */
    const void* hidden;    /* [T, H] */
    const void* router;    /* [E, H] */
    const void* w13;       /* [E, 2I, H]: w1 rows 0..I-1, then w3 rows I..2I-1 */
    const void* w2;        /* [E, H, I] */
    const void* w13_scale; /* [E, 2I] (int8 only) */
    const void* w2_scale;  /* [E, H]  (int8 only) */
    void* out;             /* [T, H] */
} MoeTop2Params;

/* Bytes of device workspace one enqueue with flags 0, MOE_FLAG_FORCE_DECODE or
 * MOE_FLAG_FORCE_PREFILL needs: a pure function of the shapes (and of the activation dtype's size).
 * Layout, each region starting at a multiple of
 * 256 bytes, A = T*K, MT = ceil(A / 128) + E (most prefill row tiles):
 *   topk_ids     int32 [A]       expert of assignment a = t*K + k
 *   topk_w       fp32  [A]       renormalised routing weight of a
 *   offsets      int32 [E + 1]   first permuted row of each expert; offsets[E] = A
 *   counters     int32 [4]       {number of row tiles, number of active experts, 0, 0}
 *   active       int32 [E]       active experts, ascending
 *   perm         int32 [A]       assignment a held by permuted row r (stable within an expert)
 *   tiles        int4  [MT]      prefill row tiles {expert, first row, end row, 0}
 *   act          act   [A, I]    silu(gate) * up, permuted rows
 *   y            act   [A, H]    expert outputs, assignment order (row a = t*K + k); on the sm_90a
 *                                path first the gathered rows hidden[perm[r] / K], then the expert
 *                                outputs in permuted order
 * then, in mixtral_moe_top2_workspace_size_flags with MOE_FLAG_PREFILL_SM90 or MOE_FLAG_AUTO only,
 * the regions the sm_90a prefill path uses:
 *   row_of       int32 [A]       permuted row of assignment a (combine reads y through it)
 *   up           act   [A, I]    x @ w3[e]^T, permuted rows (act holds the gate, then the product)
 *   sm90_args    64 * (3E + 4) bytes: the grouped GEMMs' problem shapes, pointers, strides
 *   sm90_gemm    131072 bytes    CUTLASS workspace (TMA descriptors, up to 256 SMs)
 * Returns 0 when the shapes are invalid (see mixtral_moe_top2_last_error). */
size_t mixtral_moe_top2_workspace_size(int tokens, int hidden, int inter, int experts, int top_k, int act_dtype);

/* The same for an enqueue with these flags: a pure function of the shapes and the flags. Only
 * MOE_FLAG_PREFILL_SM90 and MOE_FLAG_AUTO change it (the regions above, ~1.8x at Mixtral dims); an
 * enqueue with either flag needs a workspace of at least this size (MOE_FLAG_AUTO with int8
 * weights: the flags-0 size). */
size_t mixtral_moe_top2_workspace_size_flags(int tokens, int hidden, int inter, int experts, int top_k,
                                             int act_dtype, int flags);

/* Validates p, then enqueues the whole op on stream. Returns 0 (cudaSuccess) or a cudaError_t
 * code: cudaErrorInvalidValue (1) for invalid parameters, with a message in
 * mixtral_moe_top2_last_error(). Never synchronises; never allocates. */
int mixtral_moe_top2_enqueue(const MoeTop2Params* p, void* workspace, cudaStream_t stream);

/* Human-readable reason of this thread's last failure ("" if none). */
const char* mixtral_moe_top2_last_error(void);

/* MIXTRAL_MOE_TOP2_VERSION of the built library. */
int mixtral_moe_top2_version(void);

#ifdef __cplusplus
}
#endif

#endif /* MIXTRAL_MOE_TOP2_H */
