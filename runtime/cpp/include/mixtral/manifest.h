// Artifact manifests (manifest.json) as written by mixtral_trt/manifest.py: read, check, typed access.
//
// A directory written by a stage carries manifest.json: {format "mixtral-trt", format_version 1,
// stage, config, export, io, files, engine (engine builds only), tools}. read_manifest() refuses
// another format, format version or stage, a malformed field (named, e.g. "export.max_batch must
// be an integer"), a listed name that is not a plain file name, and (verify = true) any listed
// file that is a symbolic link, not a regular file, or whose size or sha256 differs.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>  // the full <nlohmann/json.hpp> only where a json is used

namespace mixtral {

inline constexpr char kManifestFormat[] = "mixtral-trt";
inline constexpr int kManifestFormatVersion = 1;
inline constexpr char kManifestFile[] = "manifest.json";

// A manifest is missing, unreadable, from another format version or stage, or its files differ.
class ManifestError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The frozen model configuration (field names as in mixtral_trt/config.py and config.json).
struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  int64_t num_local_experts = 0;
  int64_t num_experts_per_tok = 0;
  double rms_norm_eps = 0;
  double rope_theta = 0;
  int64_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  std::optional<int64_t> bos_token_id;  // null in the manifest: none
  std::optional<int64_t> eos_token_id;
  std::string torch_dtype;
};

// The export limits every later stage inherits.
struct ExportLimits {
  int64_t max_batch = 0;
  int64_t max_seq_len = 0;  // = max_cache_len of the KV cache tensors
  std::string precision;    // "" when the manifest does not say
};

// One dim of an I/O shape: a fixed size, or a symbol ("batch", "seq", "max_cache_len").
struct Dim {
  int64_t value = -1;  // -1 when symbolic
  std::string symbol;
  bool symbolic() const { return !symbol.empty(); }
};

struct TensorSpec {
  std::string name;
  std::string dtype;  // "int64", "float32", "float16", "bfloat16", ...
  std::vector<Dim> shape;
};

struct IoTable {
  std::vector<TensorSpec> inputs, outputs;
  // nullptr when no input or output has that name
  const TensorSpec* find(const std::string& name) const;
};

struct FileEntry {
  uint64_t bytes = 0;
  std::string sha256;  // lower-case hex
};

struct PluginSpec {
  std::string name, version, plugin_namespace;
  std::string library;  // a file name in the build directory or an absolute path; "" (null) = none
  std::string sha256;   // of the library; "" (null) = not recorded
  std::string python;   // module of the Python creator the engine was built with; "" = none
};

// One optimization profile as optimize/engine.py records it:
// {"name": "prefill", "batch": [min, opt, max], "seq": [min, opt, max]}.
struct Profile {
  std::string name;
  std::array<int64_t, 3> batch{}, seq{};  // min, opt, max
};

// The "engine" section of an engine build.
struct EngineSection {
  std::string plan_file = "model.plan";
  std::string target;       // "tensorrt" | "tensorrt_rtx" | "" (not recorded)
  std::string trt_version;  // of the TensorRT that built the plan; "" = not recorded
  std::string cache_dtype;  // "float32" | "float16" | "bfloat16" | ""
  std::vector<std::string> target_sms;
  std::vector<Profile> profiles;  // informative: the engine itself is authoritative
  std::vector<PluginSpec> plugins;
};

struct Manifest {
  std::filesystem::path directory;
  std::string format;
  int format_version = 0;
  std::string stage;  // "export" | "optimize" | "engine"
  ModelConfig config;
  ExportLimits limits;
  IoTable io;
  std::map<std::string, FileEntry> files;
  std::optional<EngineSection> engine;
  std::shared_ptr<const nlohmann::json> raw;  // the whole document, for fields not typed here

  std::filesystem::path path_of(const std::string& file) const { return directory / file; }
};

// Load and check directory/manifest.json. `stages` empty: any stage. `verify`: re-hash every
// listed file (OpenSSL SHA-256) and refuse the manifest when one differs.
Manifest read_manifest(const std::filesystem::path& directory, const std::vector<std::string>& stages = {},
                       bool verify = true);

// Parse a manifest document already in memory (no file checks); `where` names it in errors.
Manifest parse_manifest(const nlohmann::json& doc, const std::filesystem::path& directory,
                        const std::string& where = kManifestFile);

// Check every listed file is a regular file of the directory (not a symbolic link, which could be
// repointed after hashing) with the recorded size and sha256; throws ManifestError listing each
// problem.
void verify_files(const Manifest& manifest);

// A name of a file in the directory itself: not empty, not "." or "..", no '/' (so not absolute),
// no NUL. Every file a manifest lists, and engine.plan_file, must be one.
bool is_plain_file_name(const std::string& name);

// Lower-case hex SHA-256 of a file's bytes (streamed; files of any size).
std::string sha256_file(const std::filesystem::path& path);

// The manifest as the typed structures see it, written back as JSON (for tools and tests).
nlohmann::json to_json(const Manifest& manifest);

}  // namespace mixtral
