#include "mixtral/kv_cache.h"

#include <map>
#include <stdexcept>

namespace mixtral {

size_t dtype_size(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {
      {"float32", 4}, {"float16", 2}, {"bfloat16", 2}, {"float8e4m3fn", 1}, {"int64", 8},
      {"int32", 4},   {"int8", 1},    {"uint8", 1},    {"bool", 1}};
  auto it = sizes.find(dtype);
  if (it == sizes.end()) throw std::invalid_argument("unknown dtype '" + dtype + "' (no element size for it)");
  return it->second;
}

std::string past_name(int64_t layer, const std::string& kind) {
  return "past_key_values." + std::to_string(layer) + "." + kind;
}

std::string present_name(int64_t layer, const std::string& kind) {
  return "present." + std::to_string(layer) + "." + kind;
}

size_t KvCacheLayout::elements_per_buffer() const {
  return static_cast<size_t>(batch) * kv_heads * max_seq_len * head_dim;
}

size_t KvCacheLayout::bytes_per_token() const {
  return 2 * static_cast<size_t>(layers) * kv_heads * head_dim * element_size;
}

namespace {

// [batch, K, max_cache_len, D]: fixed dims must be K and D; the two others may be symbols or sizes.
void check_cache_entry(const TensorSpec& t, const KvCacheLayout& kv, const std::string& where) {
  auto bad = [&](const std::string& what) {
    throw ManifestError(where + ": io entry '" + t.name + "' " + what + "; the io table does not fit the config");
  };
  if (t.dtype != kv.dtype) bad("has dtype " + t.dtype + ", expected the cache dtype " + kv.dtype);
  if (t.shape.size() != 4)
    bad("has " + std::to_string(t.shape.size()) + " dims, expected 4 [batch, K, max_cache_len, D]");
  const int64_t want[] = {kv.batch, kv.kv_heads, kv.max_seq_len, kv.head_dim};
  const char* names[] = {"batch", "num_key_value_heads", "max_cache_len", "head_dim"};
  for (int i = 0; i < 4; ++i) {
    const Dim& d = t.shape[i];
    if (d.symbolic()) {
      if (i == 1 || i == 3) bad("has a symbolic " + std::string(names[i]) + " '" + d.symbol + "'");
    } else if (d.value != want[i] && i != 0) {
      bad("has " + std::string(names[i]) + " " + std::to_string(d.value) + ", expected " + std::to_string(want[i]));
    }
  }
}

}  // namespace

KvCacheLayout kv_cache_layout(const Manifest& m) {
  KvCacheLayout kv;
  kv.layers = m.config.num_hidden_layers;
  kv.batch = m.limits.max_batch;
  kv.kv_heads = m.config.num_key_value_heads;
  kv.max_seq_len = m.limits.max_seq_len;
  kv.head_dim = m.config.head_dim;
  const std::string where = (m.directory / kManifestFile).string();
  const TensorSpec* first = m.io.find(past_name(0, "key"));
  if (first == nullptr) throw ManifestError(where + ": the io table has no " + past_name(0, "key"));
  kv.dtype = m.engine && !m.engine->cache_dtype.empty() ? m.engine->cache_dtype : first->dtype;
  try {
    kv.element_size = dtype_size(kv.dtype);
  } catch (const std::invalid_argument& e) {
    throw ManifestError(where + ": KV cache " + e.what());
  }
  for (int64_t i = 0; i < kv.layers; ++i) {
    for (const char* kind : kKvKinds) {
      for (const std::string& name : {past_name(i, kind), present_name(i, kind)}) {
        const TensorSpec* t = m.io.find(name);
        if (t == nullptr)
          throw ManifestError(where + ": the io table has no '" + name + "' (config says " +
                              std::to_string(kv.layers) + " layers)");
        check_cache_entry(*t, kv, where);
      }
    }
  }
  return kv;
}

}  // namespace mixtral
