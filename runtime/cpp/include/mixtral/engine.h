// The TensorRT backend: a built engine (stage "engine") run through the nvinfer C++ API, with the
// same binding scheme as runtime/backends/tensorrt.py (one device, one CUDA stream):
//
// - Plugin libraries listed in manifest.engine.plugins are hashed against the manifest, loaded with
//   getPluginRegistry()->loadLibrary, and each (name, version, namespace) creator must then exist.
// - The plan is deserialized (engine host code stays disallowed) and its I/O is checked against
//   the manifest's io table; every present.{i}.* must alias past_key_values.{i}.* (in-place update).
// - Device memory is allocated once: the KV cache per (layer, kind) as [max_batch, K, max_seq_len,
//   D] (zeroed), staging buffers for input_ids / position_ids / write_indices, flat logits, and
//   one activation scratch shared by all contexts (USER_MANAGED). A step over the n rows r0 ..
//   r0+n-1 (step_rows; step() is the run at row 0) binds that run of each row-major cache
//   (address base + r0 * row_bytes, shape [n, K, L, D]) as both past and present.
// - Tensor addresses are set once per context; input shapes per step. Prefill (seq > 1) uses one
//   context per optimization profile, its cache addresses re-set when a step's first row differs
//   from the previous one's. Decode (seq == 1) uses one context per row run (r0, n): its first
//   step is a plain enqueueV3, then one enqueueV3 is captured into a CUDA graph (keyed by the same
//   run) that later steps replay after staging their inputs. A failed capture is reported once and
//   decode falls back to plain enqueue.
//
// This header has no TensorRT or CUDA types; link mixtral_runtime (nvinfer, cudart).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "mixtral/generator.h"
#include "mixtral/manifest.h"

namespace mixtral {

// The engine cannot run here: no GPU, another TensorRT, a missing plugin, a failed TensorRT call.
class TensorRTError : public GenerationError {
 public:
  using GenerationError::GenerationError;
};

struct EngineOptions {
  int device = 0;
  bool cuda_graphs = true;
  // Plugin libraries that replace the manifest's by file name, or are loaded in addition.
  std::vector<std::filesystem::path> plugin_libraries;
};

class TensorRTBackend : public Backend {
 public:
  // `manifest` must be an engine build read with read_manifest(dir, {"engine"}) (verified).
  explicit TensorRTBackend(const Manifest& manifest, const EngineOptions& options = {});
  ~TensorRTBackend() override;
  TensorRTBackend(const TensorRTBackend&) = delete;
  TensorRTBackend& operator=(const TensorRTBackend&) = delete;

  int64_t max_batch() const override;
  int64_t max_seq_len() const override;
  int64_t vocab_size() const override;
  int64_t max_step_len(int64_t batch) const override;
  std::vector<float> step(const std::vector<int64_t>& input_ids, const std::vector<int64_t>& position_ids,
                          const std::vector<int64_t>& write_indices, int64_t batch, int64_t seq,
                          const std::vector<int64_t>& last) override;
  bool has_row_runs() const override { return true; }
  std::vector<float> step_rows(int64_t r0, const std::vector<int64_t>& input_ids,
                               const std::vector<int64_t>& position_ids, const std::vector<int64_t>& write_indices,
                               int64_t batch, int64_t seq, const std::vector<int64_t>& last) override;

  void* cache_address(int64_t layer, const std::string& kind) const;  // device address of one KV buffer
  bool decode_graphs() const;       // false once a capture failed (or cuda_graphs was off)
  std::string graph_error() const;  // why decode runs without CUDA graphs; "" when it does not
  static std::string library_version();  // of the libnvinfer this process runs, e.g. "11.1.0"

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mixtral
