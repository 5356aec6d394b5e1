// KV-cache sizing against hand-computed Mixtral-8x7B numbers and the Python-written manifests.
#include "mixtral/kv_cache.h"

#include "test_util.h"

namespace mixtral {
namespace {

// A manifest in memory: Mixtral-8x7B's cache geometry (32 layers, 8 KV heads x 128), batch 1.
Manifest mixtral_8x7b(const std::string& io_dtype, const std::string& cache_dtype, int64_t max_seq_len = 4096) {
  Manifest m;
  m.stage = "engine";
  m.config.num_hidden_layers = 32;
  m.config.num_key_value_heads = 8;
  m.config.head_dim = 128;
  m.limits.max_batch = 1;
  m.limits.max_seq_len = max_seq_len;
  const std::vector<Dim> shape = {{-1, "batch"}, {8, ""}, {-1, "max_cache_len"}, {128, ""}};
  for (int64_t i = 0; i < 32; ++i)
    for (const char* kind : kKvKinds) {
      m.io.inputs.push_back({past_name(i, kind), io_dtype, shape});
      m.io.outputs.push_back({present_name(i, kind), io_dtype, shape});
    }
  if (!cache_dtype.empty()) m.engine = EngineSection{};
  if (m.engine) m.engine->cache_dtype = cache_dtype;
  return m;
}

TEST(KvCache, DtypeSizes) {
  EXPECT_EQ(dtype_size("float32"), 4u);
  EXPECT_EQ(dtype_size("float16"), 2u);
  EXPECT_EQ(dtype_size("bfloat16"), 2u);
  EXPECT_EQ(dtype_size("int64"), 8u);
  EXPECT_EQ(dtype_size("int8"), 1u);
  EXPECT_THROW_WITH(dtype_size("int4"), std::invalid_argument, "'int4'");
}

TEST(KvCache, Names) {
  EXPECT_EQ(past_name(3, "key"), "past_key_values.3.key");
  EXPECT_EQ(present_name(31, "value"), "present.31.value");
}

TEST(KvCache, Mixtral8x7bFp16) {
  const KvCacheLayout kv = kv_cache_layout(mixtral_8x7b("float16", "float16"));
  EXPECT_EQ(kv.shape(), (std::vector<int64_t>{1, 8, 4096, 128}));
  EXPECT_EQ(kv.bytes_per_buffer(), 8u << 20);     // 1 * 8 * 4096 * 128 * 2 B = 8 MiB
  EXPECT_EQ(kv.bytes_per_layer(), 16u << 20);     // key + value
  EXPECT_EQ(kv.total_bytes(), 512u << 20);        // 32 layers
  EXPECT_EQ(kv.bytes_per_token(), 128u << 10);    // 2 * 32 * 8 * 128 * 2 B
  const KvCacheLayout fp32 = kv_cache_layout(mixtral_8x7b("float32", "", 32768));
  EXPECT_EQ(fp32.dtype, "float32");              // from the io table: no engine section
  EXPECT_EQ(fp32.total_bytes(), size_t{8} << 30);  // 32 x 2 x 8 x 32768 x 128 x 4 B = 8 GiB
}

TEST(KvCache, RefusesInconsistentManifests) {
  EXPECT_THROW_WITH(kv_cache_layout(mixtral_8x7b("float32", "float16")), ManifestError,
                    "'past_key_values.0.key' has dtype float32, expected the cache dtype float16");
  Manifest m = mixtral_8x7b("float16", "float16");
  m.config.num_hidden_layers = 33;
  EXPECT_THROW_WITH(kv_cache_layout(m), ManifestError, "no 'past_key_values.32.key'", "33 layers");
  m = mixtral_8x7b("float16", "float16");
  m.io.outputs[5].shape[3] = Dim{64, ""};
  EXPECT_THROW_WITH(kv_cache_layout(m), ManifestError, "present.2.value", "head_dim 64, expected 128");
  m = mixtral_8x7b("float16", "float16");
  m.io.inputs.clear();
  EXPECT_THROW_WITH(kv_cache_layout(m), ManifestError, "no past_key_values.0.key");
}

TEST(KvCacheFromPython, EngineManifest) {
  MIXTRAL_NEED_TEST_DATA();
  const Manifest m = read_manifest(test::test_data() / "engine", {"engine"}, false);
  const KvCacheLayout kv = kv_cache_layout(m);
  EXPECT_EQ(kv.dtype, m.engine->cache_dtype);
  EXPECT_EQ(kv.shape(), (std::vector<int64_t>{m.limits.max_batch, m.config.num_key_value_heads, m.limits.max_seq_len,
                                              m.config.head_dim}));
}

}  // namespace
}  // namespace mixtral
