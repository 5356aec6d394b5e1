// Manifest reading: typed values, refusals with clear messages, sha256 against known digests and
// against manifests written by the Python side (MIXTRAL_TEST_DATA).
#include "mixtral/manifest.h"

#include <nlohmann/json.hpp>

#include <random>

#include "mixtral/kv_cache.h"
#include "test_util.h"

namespace mixtral {
namespace {

using nlohmann::json;
using test::TempDir;
using test::write_file;

// sha256 of the 5 bytes "hello" and of no bytes (FIPS 180-4 test vectors, as `sha256sum` prints).
const char kHelloSha[] = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
const char kEmptySha[] = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

void write_json(const std::filesystem::path& path, const json& doc) { write_file(path, doc.dump(2)); }

json cache_entry(const std::string& name) {
  return {{"name", name}, {"dtype", "float16"}, {"shape", {"batch", 2, "max_cache_len", 8}}};
}

// An engine-stage manifest over one file, model.plan = "hello".
json engine_manifest() {
  json io = {{"inputs", {{{"name", "input_ids"}, {"dtype", "int64"}, {"shape", {"batch", "seq"}}}}},
             {"outputs", {{{"name", "logits"}, {"dtype", "float32"}, {"shape", {"batch", "seq", 96}}}}}};
  for (const char* kind : {"key", "value"}) {
    io["inputs"].push_back(cache_entry(std::string("past_key_values.0.") + kind));
    io["outputs"].push_back(cache_entry(std::string("present.0.") + kind));
  }
  return {{"format", "mixtral-trt"},
          {"format_version", 1},
          {"stage", "engine"},
          {"config",
           {{"vocab_size", 96}, {"hidden_size", 32}, {"intermediate_size", 48}, {"num_hidden_layers", 1},
            {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"head_dim", 8}, {"num_local_experts", 4},
            {"num_experts_per_tok", 2}, {"rms_norm_eps", 1e-5}, {"rope_theta", 1e6},
            {"max_position_embeddings", 4096}, {"tie_word_embeddings", false}, {"bos_token_id", 1},
            {"eos_token_id", nullptr}, {"torch_dtype", "float32"}}},
          {"export", {{"max_batch", 2}, {"max_seq_len", 64}, {"precision", "fp16"}}},
          {"io", io},
          {"files", {{"model.plan", {{"bytes", 5}, {"sha256", kHelloSha}}}}},
          {"engine",
           {{"plan_file", "model.plan"}, {"target", "tensorrt"}, {"trt_version", "11.1.0"},
            {"cache_dtype", "float16"}, {"target_sms", {"sm_90"}},
            {"profiles", {{{"name", "prefill"}, {"batch", {1, 2, 2}}, {"seq", {1, 32, 64}}},
                          {{"name", "decode"}, {"batch", {1, 2, 2}}, {"seq", {1, 1, 1}}}}},
            {"plugins", {{{"name", "MixtralMoETop2"}, {"version", "1"}, {"namespace", "mixtral"},
                          {"library", "libmoe.so"}, {"sha256", kEmptySha}},
                         {{"name", "Other"}, {"version", 2}, {"namespace", ""}, {"library", nullptr},
                          {"sha256", nullptr}, {"python", "mixtral_trt.plugins.other"}}}}}}};
}

TempDir artifact(const json& doc) {
  TempDir dir;
  write_file(dir.path() / "model.plan", "hello");
  write_json(dir.path() / kManifestFile, doc);
  return dir;
}

TEST(Sha256, KnownDigests) {
  TempDir dir;
  write_file(dir.path() / "hello", "hello");
  write_file(dir.path() / "empty", "");
  EXPECT_EQ(sha256_file(dir.path() / "hello"), kHelloSha);
  EXPECT_EQ(sha256_file(dir.path() / "empty"), kEmptySha);
  EXPECT_THROW_WITH(sha256_file(dir.path() / "absent"), ManifestError, "absent");
}

TEST(Manifest, TypedValues) {
  TempDir dir = artifact(engine_manifest());
  const Manifest m = read_manifest(dir.path(), {"engine"});
  EXPECT_EQ(m.stage, "engine");
  EXPECT_EQ(m.config.vocab_size, 96);
  EXPECT_EQ(m.config.head_dim, 8);
  EXPECT_DOUBLE_EQ(m.config.rope_theta, 1e6);
  EXPECT_EQ(m.config.bos_token_id, 1);
  EXPECT_FALSE(m.config.eos_token_id.has_value());  // null
  EXPECT_EQ(m.limits.max_batch, 2);
  EXPECT_EQ(m.limits.max_seq_len, 64);
  const TensorSpec* cache = m.io.find("past_key_values.0.value");
  ASSERT_NE(cache, nullptr);
  EXPECT_EQ(cache->dtype, "float16");
  ASSERT_EQ(cache->shape.size(), 4u);
  EXPECT_EQ(cache->shape[0].symbol, "batch");
  EXPECT_EQ(cache->shape[1].value, 2);
  EXPECT_EQ(m.io.find("nothing"), nullptr);
  EXPECT_EQ(m.files.at("model.plan").bytes, 5u);
  ASSERT_TRUE(m.engine.has_value());
  EXPECT_EQ(m.engine->cache_dtype, "float16");
  EXPECT_EQ(m.engine->target_sms, std::vector<std::string>{"sm_90"});
  ASSERT_EQ(m.engine->profiles.size(), 2u);
  EXPECT_EQ(m.engine->profiles[0].name, "prefill");
  EXPECT_EQ(m.engine->profiles[0].seq, (std::array<int64_t, 3>{1, 32, 64}));
  EXPECT_EQ(m.engine->profiles[1].batch, (std::array<int64_t, 3>{1, 2, 2}));
  ASSERT_EQ(m.engine->plugins.size(), 2u);
  EXPECT_EQ(m.engine->plugins[0].plugin_namespace, "mixtral");
  EXPECT_EQ(m.engine->plugins[0].sha256, kEmptySha);
  EXPECT_EQ(m.engine->plugins[1].version, "2");  // a number is read as its text
  EXPECT_EQ(m.engine->plugins[1].library, "");   // null: none
  EXPECT_EQ(m.engine->plugins[1].python, "mixtral_trt.plugins.other");
  const json back = to_json(m)["engine"];
  EXPECT_EQ(back["plugins"][0]["library"], "libmoe.so");
  EXPECT_TRUE(back["plugins"][1]["library"].is_null());
  EXPECT_EQ(back["profiles"][1], engine_manifest()["engine"]["profiles"][1]);
}

TEST(Manifest, RefusesWrongSha256) {
  TempDir dir = artifact(engine_manifest());
  write_file(dir.path() / "model.plan", "jello");  // same size, other bytes
  EXPECT_THROW_WITH(read_manifest(dir.path()), ManifestError, "does not match its manifest", "model.plan: sha256",
                    "manifest says 2cf24dba5fb0", "modified or corrupt");
  EXPECT_NO_THROW(read_manifest(dir.path(), {}, /*verify=*/false));
}

TEST(Manifest, RefusesWrongSizeAndMissingFile) {
  json doc = engine_manifest();
  doc["files"]["tokenizer.model"] = {{"bytes", 3}, {"sha256", kEmptySha}};
  TempDir dir = artifact(doc);
  write_file(dir.path() / "model.plan", "hello!");
  EXPECT_THROW_WITH(read_manifest(dir.path()), ManifestError, "model.plan: 6 bytes, manifest says 5",
                    "tokenizer.model: missing");
}

TEST(Manifest, RefusesOtherFormatVersion) {
  json doc = engine_manifest();
  doc["format_version"] = 2;
  TempDir dir = artifact(doc);
  EXPECT_THROW_WITH(read_manifest(dir.path()), ManifestError, "format_version=2", "reads version 1",
                    "Re-run the stage");
  doc["format_version"] = "1";
  write_json(dir.path() / kManifestFile, doc);
  EXPECT_THROW_WITH(read_manifest(dir.path()), ManifestError, "format_version=\"1\"");
}

TEST(Manifest, RefusesOtherFormatStageAndFiles) {
  json doc = engine_manifest();
  doc["format"] = "onnx";
  TempDir dir = artifact(doc);
  EXPECT_THROW_WITH(read_manifest(dir.path()), ManifestError, "not a mixtral-trt manifest", "\"onnx\"");
  write_json(dir.path() / kManifestFile, engine_manifest());
  EXPECT_THROW_WITH(read_manifest(dir.path(), {"export", "optimize"}), ManifestError, "is a 'engine' artifact",
                    "'export', 'optimize'");
  write_file(dir.path() / kManifestFile, "{not json");
  EXPECT_THROW_WITH(read_manifest(dir.path()), ManifestError, "is not valid JSON");
  std::filesystem::remove(dir.path() / kManifestFile);
  EXPECT_THROW_WITH(read_manifest(dir.path()), ManifestError, "has no manifest.json");
}

TEST(Manifest, NamesTheBadField) {
  json doc = engine_manifest();
  doc["config"]["vocab_size"] = "96";
  EXPECT_THROW_WITH(parse_manifest(doc, "d"), ManifestError, "config.vocab_size must be an integer, got \"96\"");
  doc = engine_manifest();
  doc["export"].erase("max_seq_len");
  EXPECT_THROW_WITH(parse_manifest(doc, "d"), ManifestError, "export.max_seq_len is missing");
  doc = engine_manifest();
  doc["io"]["inputs"][0]["shape"] = {"batch", 1.5};
  EXPECT_THROW_WITH(parse_manifest(doc, "d"), ManifestError, "io.inputs[0].shape");
  doc = engine_manifest();
  doc["engine"]["cache_dtype"] = "int4";
  EXPECT_THROW_WITH(parse_manifest(doc, "d"), ManifestError, "engine.cache_dtype", "\"int4\"");
  doc = engine_manifest();
  doc["engine"]["profiles"][0]["seq"] = {1, 64};
  EXPECT_THROW_WITH(parse_manifest(doc, "d"), ManifestError, "engine.profiles[0].seq must be [min, opt, max]");
  doc = engine_manifest();
  doc["engine"]["plugins"][0].erase("name");
  EXPECT_THROW_WITH(parse_manifest(doc, "d"), ManifestError, "engine.plugins[0].name");
}

TEST(Manifest, RefusesLinkedAndNonRegularFiles) {
  TempDir dir = artifact(engine_manifest());
  // The link points at identical bytes: every hash matches, only the link is wrong.
  write_file(dir.path() / "elsewhere.plan", "hello");
  std::filesystem::remove(dir.path() / "model.plan");
  std::filesystem::create_symlink(dir.path() / "elsewhere.plan", dir.path() / "model.plan");
  EXPECT_THROW_WITH(read_manifest(dir.path()), ManifestError, "model.plan: a symbolic link",
                    "must be regular files");
  EXPECT_NO_THROW(read_manifest(dir.path(), {}, /*verify=*/false));  // the link is a file check, not a field

  json doc = engine_manifest();
  doc["files"]["tokenizer.model"] = {{"bytes", 0}, {"sha256", kEmptySha}};
  TempDir other = artifact(doc);
  std::filesystem::create_directory(other.path() / "tokenizer.model");
  EXPECT_THROW_WITH(read_manifest(other.path()), ManifestError, "tokenizer.model: not a regular file");
}

TEST(Manifest, RefusesNamesOutsideTheDirectory) {
  for (const char* name : {"../outside", "/etc/passwd", "", "sub/model.plan", ".", ".."}) {
    json doc = engine_manifest();
    doc["files"][name] = {{"bytes", 1}, {"sha256", kEmptySha}};
    SCOPED_TRACE(name);
    EXPECT_THROW_WITH(parse_manifest(doc, "d"), ManifestError, "not a plain file name");
  }
  json doc = engine_manifest();
  doc["engine"]["plan_file"] = "../model.plan";
  EXPECT_THROW_WITH(parse_manifest(doc, "d"), ManifestError, "engine.plan_file must be a file name",
                    "\"../model.plan\"");
  doc = engine_manifest();
  doc["engine"]["plugins"][0]["library"] = "../lib/libmoe.so";
  EXPECT_THROW_WITH(parse_manifest(doc, "d"), ManifestError, "engine.plugins[0].library");
  doc["engine"]["plugins"][0]["library"] = "/opt/plugins/libmoe.so";  // an absolute path is allowed
  EXPECT_NO_THROW(parse_manifest(doc, "d"));
  EXPECT_TRUE(is_plain_file_name("model.onnx.data"));
  EXPECT_FALSE(is_plain_file_name(std::string("a\0b", 3)));
}

TEST(Manifest, RefusesMalformedFileEntries) {
  const std::pair<json, const char*> cases[] = {
      {json::array(), "files must be an object"},
      {{{"model.plan", 5}}, "files.model.plan must be an object of {bytes, sha256}"},
      {{{"model.plan", {{"bytes", -1}, {"sha256", kHelloSha}}}}, "files.model.plan.bytes must be an integer >= 0"},
      {{{"model.plan", {{"bytes", "5"}, {"sha256", kHelloSha}}}}, "files.model.plan.bytes must be an integer"},
      {{{"model.plan", {{"bytes", 5}, {"sha256", std::string(64, 'g')}}}}, "files.model.plan.sha256 must be 64"},
      {{{"model.plan", {{"bytes", 5}, {"sha256", std::string(64, 'A')}}}}, "files.model.plan.sha256 must be 64"},
      {{{"model.plan", {{"bytes", 5}, {"sha256", 7}}}}, "files.model.plan.sha256 must be a string"},
  };
  for (const auto& [files, message] : cases) {
    json doc = engine_manifest();
    doc["files"] = files;
    SCOPED_TRACE(files.dump());
    EXPECT_THROW_WITH(parse_manifest(doc, "d"), ManifestError, message);
  }
  json doc = engine_manifest();
  doc["io"]["inputs"][0]["shape"] = {"batch", -1};
  EXPECT_THROW_WITH(parse_manifest(doc, "d"), ManifestError, "io.inputs[0].shape must be a list of sizes");
  doc = engine_manifest();
  doc["config"]["num_local_experts"] = 0;
  EXPECT_THROW_WITH(parse_manifest(doc, "d"), ManifestError, "config.num_local_experts must be a positive integer");
  doc = engine_manifest();
  doc["config"]["eos_token_id"] = -2;
  EXPECT_THROW_WITH(parse_manifest(doc, "d"), ManifestError, "config.eos_token_id must be a token id >= 0");
}

// Every location of a document, as JSON pointers, parents before children.
void locations(const json& value, const json::json_pointer& at, std::vector<json::json_pointer>& out) {
  if (value.is_object()) {
    for (const auto& [key, child] : value.items()) {
      out.push_back(at / key);
      locations(child, at / key, out);
    }
  } else if (value.is_array()) {
    for (size_t i = 0; i < value.size(); ++i) {
      out.push_back(at / i);
      locations(value[i], at / i, out);
    }
  }
}

json random_json(std::mt19937_64& rng, int depth = 0) {
  switch (rng() % (depth < 3 ? 7 : 5)) {
    case 0: return json::array({nullptr, true, false})[rng() % 3];
    case 1: return json::array({0, 1, -1, 7, INT64_MAX, UINT64_MAX, INT64_MIN})[rng() % 7];
    case 2: return json::array({0.0, -0.5, 1e-9, 1e308, 2.5})[rng() % 5];
    case 3: case 4: return json::array({"", "a", "model.plan", "float16", "batch", "..", "/x", "sm_90"})[rng() % 8];
    case 5: {
      json out = json::array();
      for (size_t n = rng() % 4; n > 0; --n) out.push_back(random_json(rng, depth + 1));
      return out;
    }
    default: {
      json out = json::object();
      for (const char* key : {"name", "bytes", "shape"})
        if (rng() % 2) out[key] = random_json(rng, depth + 1);
      return out;
    }
  }
}

// Every reader of a parsed manifest: a malformed one must end in ManifestError, nothing else.
void read_all(const json& doc) {
  const Manifest m = parse_manifest(doc, "d");
  (void)to_json(m).dump();
  (void)kv_cache_layout(m);
}

TEST(Manifest, MutationsEndInManifestErrorOnly) {
  const json base = engine_manifest();
  std::vector<json::json_pointer> where;
  locations(base, json::json_pointer(), where);
  std::vector<std::pair<json::json_pointer, json>> mutations;  // a null json_pointer value: delete
  std::mt19937_64 rng(18);
  for (const auto& p : where) mutations.emplace_back(p, json(json::value_t::discarded));
  for (int n = 0; n < 1500; ++n) mutations.emplace_back(where[rng() % where.size()], random_json(rng));
  int refused = 0, read = 0;
  std::vector<std::string> escaped;
  for (const auto& [p, value] : mutations) {
    json doc = base;
    if (value.is_discarded()) {
      json& parent = doc[p.parent_pointer()];
      if (parent.is_object()) parent.erase(p.back());
      else parent.erase(static_cast<size_t>(std::stoul(p.back())));
    } else {
      doc[p] = value;
    }
    try {
      read_all(doc);
      ++read;
    } catch (const ManifestError&) {
      ++refused;
    } catch (const std::exception& e) {
      escaped.push_back(p.to_string() + " = " + (value.is_discarded() ? "(deleted)" : value.dump()) + ": " + e.what());
    }
  }
  EXPECT_TRUE(escaped.empty()) << escaped.size() << " mutations escaped, first: " << escaped.front();
  EXPECT_GT(refused, 500);  // both outcomes happen: the mutations reach the checks
  EXPECT_GT(read, 100);
}

// Manifests written by mixtral_trt (a real tiny export and an engine-stage manifest).
TEST(ManifestFromPython, ExportAndEngineVerify) {
  MIXTRAL_NEED_TEST_DATA();
  const Manifest exported = read_manifest(test::test_data() / "export", {"export"});
  EXPECT_TRUE(exported.files.count("model.onnx.data"));
  EXPECT_FALSE(exported.engine.has_value());
  const Manifest engine = read_manifest(test::test_data() / "engine", {"engine"});
  ASSERT_TRUE(engine.engine.has_value());
  EXPECT_FALSE(engine.engine->plugins.empty());
}

TEST(ManifestFromPython, RefusesATamperedCopy) {
  MIXTRAL_NEED_TEST_DATA();
  TempDir dir;
  std::filesystem::copy(test::test_data() / "engine", dir.path(), std::filesystem::copy_options::recursive);
  const auto plan = dir.path() / "model.plan";
  std::string bytes;
  {
    std::ifstream in(plan, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  ASSERT_FALSE(bytes.empty());
  bytes[bytes.size() / 2] ^= 1;
  write_file(plan, bytes);
  EXPECT_THROW_WITH(read_manifest(dir.path(), {"engine"}), ManifestError, "model.plan: sha256");
}

}  // namespace
}  // namespace mixtral
