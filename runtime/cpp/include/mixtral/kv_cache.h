// Sizing of the static KV cache a build needs (no allocation here; engine.cpp allocates).
//
// Dimension legend: L = layers, B = max batch, K = KV heads, S = max_seq_len (= max_cache_len),
// D = head dim. One buffer per (layer, kind), kind in {key, value}, each [B, K, S, D], bound as
// both past_key_values.{i}.{kind} (input) and present.{i}.{kind} (output) at the same address.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "mixtral/manifest.h"

namespace mixtral {

inline constexpr const char* kKvKinds[] = {"key", "value"};

// Bytes of one element of a manifest dtype name ("float32", "bfloat16", "int64", ...); throws
// std::invalid_argument naming the dtype when it is not one we know.
size_t dtype_size(const std::string& dtype);

std::string past_name(int64_t layer, const std::string& kind);     // "past_key_values.{layer}.{kind}"
std::string present_name(int64_t layer, const std::string& kind);  // "present.{layer}.{kind}"

struct KvCacheLayout {
  int64_t layers = 0, batch = 0, kv_heads = 0, max_seq_len = 0, head_dim = 0;
  std::string dtype;
  size_t element_size = 0;

  std::vector<int64_t> shape() const { return {batch, kv_heads, max_seq_len, head_dim}; }  // [B, K, S, D]
  size_t elements_per_buffer() const;
  size_t bytes_per_buffer() const { return elements_per_buffer() * element_size; }  // one layer, one kind
  size_t bytes_per_layer() const { return 2 * bytes_per_buffer(); }                  // key + value
  size_t total_bytes() const { return static_cast<size_t>(layers) * bytes_per_layer();  }
  size_t bytes_per_token() const;  // one slot of one row, every layer and kind: 2 L K D element_size
};

// The layout a build needs at its max_batch and max_seq_len. The dtype is engine.cache_dtype, or
// the io table's past_key_values.0.key dtype where the manifest has no engine section; the io
// table's cache entries must agree with config (K, D), the layer count and the cache dtype.
// Throws ManifestError naming the tensor and the expected vs recorded value.
KvCacheLayout kv_cache_layout(const Manifest& manifest);

}  // namespace mixtral
