#include "mixtral/manifest.h"

#include <openssl/evp.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <fstream>
#include <memory>
#include <sstream>

namespace mixtral {
namespace {

using nlohmann::json;

std::string quoted(const json& value) {
  if (value.is_null()) return "null";
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  return text.size() <= 60 ? text : text.substr(0, 57) + "...";
}

bool is_hex_digest(const std::string& s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

// Typed reads of one object's fields; errors name the manifest, the field and what was found.
class Reader {
 public:
  Reader(const json& obj, std::string where, std::string prefix)
      : obj_(obj), where_(std::move(where)), prefix_(std::move(prefix)) {}

  bool has(const char* key) const { return obj_.contains(key) && !obj_.at(key).is_null(); }

  int64_t integer(const char* key) const {
    const json& v = need(key);
    if (!v.is_number_integer()) fail(key, "an integer", v);
    return v.get<int64_t>();
  }
  std::optional<int64_t> optional_integer(const char* key) const {
    if (!has(key)) return std::nullopt;
    return integer(key);
  }
  double number(const char* key) const {
    const json& v = need(key);
    if (!v.is_number()) fail(key, "a number", v);
    return v.get<double>();
  }
  bool boolean(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = obj_.at(key);
    if (!v.is_boolean()) fail(key, "true or false", v);
    return v.get<bool>();
  }
  std::string string(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const json& v = obj_.at(key);
    if (!v.is_string()) fail(key, "a string", v);
    return v.get<std::string>();
  }
  // A version may be written as "1" or 1.
  std::string text(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const json& v = obj_.at(key);
    if (v.is_string()) return v.get<std::string>();
    if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
    fail(key, "a string", v);
  }
  const json& object(const char* key) const {
    const json& v = need(key);
    if (!v.is_object()) fail(key, "an object", v);
    return v;
  }
  const json& array(const char* key) const {
    const json& v = need(key);
    if (!v.is_array()) fail(key, "a list", v);
    return v;
  }
  const std::string& where() const { return where_; }
  std::string field(const char* key) const { return prefix_ + key; }

  [[noreturn]] void fail(const char* key, const char* expected, const json& got) const {
    throw ManifestError(where_ + ": " + field(key) + " must be " + expected + ", got " + quoted(got) +
                        "; the manifest is damaged or was written by another tool");
  }

 private:
  const json& need(const char* key) const {
    if (!obj_.contains(key))
      throw ManifestError(where_ + ": " + field(key) + " is missing; re-run the stage that wrote " + where_);
    return obj_.at(key);
  }
  const json& obj_;
  std::string where_, prefix_;
};

ModelConfig parse_config(const Reader& r) {
  ModelConfig c;
  c.vocab_size = r.integer("vocab_size");
  c.hidden_size = r.integer("hidden_size");
  c.intermediate_size = r.integer("intermediate_size");
  c.num_hidden_layers = r.integer("num_hidden_layers");
  c.num_attention_heads = r.integer("num_attention_heads");
  c.num_key_value_heads = r.integer("num_key_value_heads");
  c.head_dim = r.integer("head_dim");
  c.num_local_experts = r.integer("num_local_experts");
  c.num_experts_per_tok = r.integer("num_experts_per_tok");
  c.rms_norm_eps = r.number("rms_norm_eps");
  c.rope_theta = r.number("rope_theta");
  c.max_position_embeddings = r.integer("max_position_embeddings");
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  c.bos_token_id = r.optional_integer("bos_token_id");
  c.eos_token_id = r.optional_integer("eos_token_id");
  c.torch_dtype = r.string("torch_dtype", "");
  const std::pair<const char*, int64_t> positive[] = {
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
      {"num_local_experts", c.num_local_experts},
      {"num_experts_per_tok", c.num_experts_per_tok},
      {"max_position_embeddings", c.max_position_embeddings}};
  for (const auto& [key, value] : positive)
    if (value < 1) r.fail(key, "a positive integer", value);
  if (!(c.rms_norm_eps > 0)) r.fail("rms_norm_eps", "a positive number", c.rms_norm_eps);
  if (!(c.rope_theta > 0)) r.fail("rope_theta", "a positive number", c.rope_theta);
  for (const auto& [key, id] : {std::pair{"bos_token_id", c.bos_token_id}, std::pair{"eos_token_id", c.eos_token_id}})
    if (id && *id < 0) r.fail(key, "a token id >= 0 or null", *id);
  return c;
}

std::vector<TensorSpec> parse_tensors(const Reader& io, const char* key) {
  std::vector<TensorSpec> out;
  const json& list = io.array(key);
  for (size_t n = 0; n < list.size(); ++n) {
    const json& e = list[n];
    std::string at = std::string(key) + "[" + std::to_string(n) + "].";
    if (!e.is_object()) io.fail(key, "a list of {name, dtype, shape}", e);
    Reader r(e, io.where(), io.field(at.c_str()));
    TensorSpec t{r.string("name", ""), r.string("dtype", ""), {}};
    if (t.name.empty()) r.fail("name", "a non-empty string", e.value("name", json()));
    for (const json& d : r.array("shape")) {
      if (d.is_number_integer() && d.get<int64_t>() >= 0) {
        t.shape.push_back(Dim{d.get<int64_t>(), ""});
      } else if (d.is_string() && !d.get<std::string>().empty()) {
        t.shape.push_back(Dim{-1, d.get<std::string>()});
      } else {
        r.fail("shape", "a list of sizes (integers >= 0) and dim names", e.at("shape"));
      }
    }
    out.push_back(std::move(t));
  }
  return out;
}

// min, opt, max of one dim of a profile.
std::array<int64_t, 3> range(const Reader& r, const char* key) {
  const json& v = r.array(key);
  if (v.size() != 3 || !std::all_of(v.begin(), v.end(), [](const json& x) { return x.is_number_integer(); }))
    r.fail(key, "[min, opt, max] integers", v);
  return {v[0].get<int64_t>(), v[1].get<int64_t>(), v[2].get<int64_t>()};
}

std::vector<Profile> parse_profiles(const Reader& eng) {
  std::vector<Profile> out;
  if (!eng.has("profiles")) return out;
  const json& list = eng.array("profiles");
  for (size_t n = 0; n < list.size(); ++n) {
    if (!list[n].is_object()) eng.fail("profiles", "a list of {name, batch, seq}", list);
    const std::string at = "profiles[" + std::to_string(n) + "].";
    Reader p(list[n], eng.where(), eng.field(at.c_str()));
    out.push_back({p.string("name", ""), range(p, "batch"), range(p, "seq")});
  }
  return out;
}

EngineSection parse_engine(const Reader& r) {
  EngineSection e;
  e.plan_file = r.string("plan_file", "model.plan");
  if (!is_plain_file_name(e.plan_file)) r.fail("plan_file", "a file name of the build directory", e.plan_file);
  e.target = r.string("target", "");
  if (!e.target.empty() && e.target != "tensorrt" && e.target != "tensorrt_rtx")
    r.fail("target", "\"tensorrt\" or \"tensorrt_rtx\"", e.target);
  e.trt_version = r.text("trt_version", "");
  e.cache_dtype = r.string("cache_dtype", "");
  if (!e.cache_dtype.empty() && e.cache_dtype != "float32" && e.cache_dtype != "float16" &&
      e.cache_dtype != "bfloat16")
    r.fail("cache_dtype", "one of \"float32\", \"float16\", \"bfloat16\"", e.cache_dtype);
  if (r.has("target_sms"))
    for (const json& sm : r.array("target_sms"))
      e.target_sms.push_back(sm.is_string() ? sm.get<std::string>() : sm.dump());
  e.profiles = parse_profiles(r);
  if (r.has("plugins")) {
    const json& list = r.array("plugins");
    for (size_t n = 0; n < list.size(); ++n) {
      std::string at = "plugins[" + std::to_string(n) + "].";
      if (!list[n].is_object()) r.fail("plugins", "a list of {name, version, namespace, library, sha256}", list);
      Reader p(list[n], r.where(), r.field(at.c_str()));
      PluginSpec s{p.string("name", ""),    p.text("version", "1"),  p.string("namespace", ""),
                   p.string("library", ""), p.string("sha256", ""), p.string("python", "")};
      if (s.name.empty()) p.fail("name", "a plugin name", list[n].value("name", json()));
      const bool absolute = std::filesystem::path(s.library).is_absolute() && s.library.find('\0') == std::string::npos;
      if (!s.library.empty() && !absolute && !is_plain_file_name(s.library))
        p.fail("library", "null, a file name of the build directory or an absolute path", s.library);
      e.plugins.push_back(std::move(s));
    }
  }
  return e;
}

std::string hex(const unsigned char* bytes, unsigned size) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < size; ++i) {
    out += digits[bytes[i] >> 4];
    out += digits[bytes[i] & 15];
  }
  return out;
}

}  // namespace

bool is_plain_file_name(const std::string& name) {
  return !(name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
           name.find('\0') != std::string::npos);
}

const TensorSpec* IoTable::find(const std::string& name) const {
  for (const auto* list : {&inputs, &outputs})
    for (const TensorSpec& t : *list)
      if (t.name == name) return &t;
  return nullptr;
}

std::string sha256_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ManifestError("cannot read " + path.string() + " to hash it");
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1)
    throw ManifestError("OpenSSL could not start a SHA-256 digest");
  std::vector<char> chunk(16 << 20);
  while (in) {
    in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    if (in.gcount() > 0 && EVP_DigestUpdate(ctx.get(), chunk.data(), static_cast<size_t>(in.gcount())) != 1)
      throw ManifestError("OpenSSL failed while hashing " + path.string());
  }
  if (in.bad()) throw ManifestError("read error while hashing " + path.string());
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  unsigned size = 0;
  if (EVP_DigestFinal_ex(ctx.get(), digest.data(), &size) != 1)
    throw ManifestError("OpenSSL failed to finish the digest of " + path.string());
  return hex(digest.data(), size);
}

Manifest parse_manifest(const json& doc, const std::filesystem::path& directory, const std::string& where) {
  if (!doc.is_object() || doc.value("format", json()) != json(kManifestFormat))
    throw ManifestError(where + " is not a " + std::string(kManifestFormat) + " manifest (format=" +
                        quoted(doc.is_object() ? doc.value("format", json()) : doc) + ")");
  const json& version = doc.value("format_version", json());
  if (!version.is_number_integer() || version.get<int64_t>() != kManifestFormatVersion)
    throw ManifestError(where + " has format_version=" + quoted(version) + "; this mixtral_runtime reads version " +
                        std::to_string(kManifestFormatVersion) +
                        ". Re-run the stage that produced it with a matching mixtral-trt");
  Reader top(doc, where, "");
  Manifest m;
  m.directory = directory;
  m.format = kManifestFormat;
  m.format_version = kManifestFormatVersion;
  m.stage = top.string("stage", "");
  if (m.stage.empty()) top.fail("stage", "a stage name", doc.value("stage", json()));
  m.config = parse_config(Reader(top.object("config"), where, "config."));
  Reader limits(top.object("export"), where, "export.");
  m.limits.max_batch = limits.integer("max_batch");
  m.limits.max_seq_len = limits.integer("max_seq_len");
  m.limits.precision = limits.string("precision", "");
  if (m.limits.max_batch < 1) limits.fail("max_batch", "a positive integer", m.limits.max_batch);
  if (m.limits.max_seq_len < 1) limits.fail("max_seq_len", "a positive integer", m.limits.max_seq_len);
  Reader io(top.object("io"), where, "io.");
  m.io.inputs = parse_tensors(io, "inputs");
  m.io.outputs = parse_tensors(io, "outputs");
  for (const auto& [name, entry] : top.object("files").items()) {
    if (!is_plain_file_name(name))
      throw ManifestError(where + ": files lists " + quoted(json(name)) +
                          ": not a plain file name in the directory (manifest corrupt or crafted)");
    if (!entry.is_object()) top.fail(("files." + name).c_str(), "an object of {bytes, sha256}", entry);
    Reader f(entry, where, "files." + name + ".");
    const int64_t bytes = f.integer("bytes");
    if (bytes < 0) f.fail("bytes", "an integer >= 0", bytes);
    m.files[name] = FileEntry{static_cast<uint64_t>(bytes), f.string("sha256", "")};
    if (!is_hex_digest(m.files[name].sha256))
      f.fail("sha256", "64 lower-case hex digits", entry.value("sha256", json()));
  }
  if (top.has("engine")) m.engine = parse_engine(Reader(top.object("engine"), where, "engine."));
  m.raw = std::make_shared<const json>(doc);
  return m;
}

Manifest read_manifest(const std::filesystem::path& directory, const std::vector<std::string>& stages, bool verify) {
  const std::filesystem::path path = directory / kManifestFile;
  std::ifstream in(path);
  if (!in)
    throw ManifestError(directory.string() + " has no " + kManifestFile +
                        ": it is not a mixtral-trt artifact directory");
  json doc = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) throw ManifestError(path.string() + " is not valid JSON");
  Manifest m = parse_manifest(doc, directory, path.string());
  if (!stages.empty() && std::find(stages.begin(), stages.end(), m.stage) == stages.end()) {
    std::string expected;
    for (const auto& s : stages) expected += (expected.empty() ? "'" : ", '") + s + "'";
    throw ManifestError(path.string() + " is a '" + m.stage + "' artifact; expected one of [" + expected + "]");
  }
  if (verify) verify_files(m);
  return m;
}

void verify_files(const Manifest& m) {
  std::vector<std::string> problems;
  for (const auto& [name, entry] : m.files) {
    const std::filesystem::path path = m.path_of(name);
    if (!is_plain_file_name(name)) {
      problems.push_back(quoted(json(name)) + ": not a plain file name in the directory (manifest corrupt or crafted)");
      continue;
    }
    std::error_code ec;
    // Not followed: a link could be repointed after hashing (mixtral_trt/manifest.py refuses it too).
    const std::filesystem::file_status status = std::filesystem::symlink_status(path, ec);
    if (std::filesystem::is_symlink(status)) {
      problems.push_back(name + ": a symbolic link; artifact files must be regular files (replace the link with the "
                         "file, or re-run the stage)");
      continue;
    }
    if (!std::filesystem::exists(status)) {
      problems.push_back(name + ": missing");
      continue;
    }
    if (!std::filesystem::is_regular_file(status)) {
      problems.push_back(name + ": not a regular file");
      continue;
    }
    const uint64_t size = std::filesystem::file_size(path, ec);
    if (size != entry.bytes) {
      problems.push_back(name + ": " + std::to_string(size) + " bytes, manifest says " + std::to_string(entry.bytes));
    } else if (std::string got = sha256_file(path); got != entry.sha256) {
      problems.push_back(name + ": sha256 " + got.substr(0, 12) + "..., manifest says " + entry.sha256.substr(0, 12) +
                         "... (file modified or corrupt)");
    }
  }
  if (problems.empty()) return;
  std::ostringstream msg;
  msg << m.directory.string() << " does not match its manifest:";
  for (const auto& p : problems) msg << "\n  " << p;
  throw ManifestError(msg.str());
}

namespace {

json dims_json(const std::vector<Dim>& shape) {
  json out = json::array();
  for (const Dim& d : shape) out.push_back(d.symbolic() ? json(d.symbol) : json(d.value));
  return out;
}

json tensors_json(const std::vector<TensorSpec>& list) {
  json out = json::array();
  for (const TensorSpec& t : list) out.push_back({{"name", t.name}, {"dtype", t.dtype}, {"shape", dims_json(t.shape)}});
  return out;
}

json optional_json(const std::optional<int64_t>& v) { return v ? json(*v) : json(); }

}  // namespace

json to_json(const Manifest& m) {
  const ModelConfig& c = m.config;
  json out = {
      {"format", m.format},
      {"format_version", m.format_version},
      {"stage", m.stage},
      {"config",
       {{"vocab_size", c.vocab_size}, {"hidden_size", c.hidden_size}, {"intermediate_size", c.intermediate_size},
        {"num_hidden_layers", c.num_hidden_layers}, {"num_attention_heads", c.num_attention_heads},
        {"num_key_value_heads", c.num_key_value_heads}, {"head_dim", c.head_dim},
        {"num_local_experts", c.num_local_experts}, {"num_experts_per_tok", c.num_experts_per_tok},
        {"rms_norm_eps", c.rms_norm_eps}, {"rope_theta", c.rope_theta},
        {"max_position_embeddings", c.max_position_embeddings}, {"tie_word_embeddings", c.tie_word_embeddings},
        {"bos_token_id", optional_json(c.bos_token_id)}, {"eos_token_id", optional_json(c.eos_token_id)},
        {"torch_dtype", c.torch_dtype}}},
      {"export", {{"max_batch", m.limits.max_batch}, {"max_seq_len", m.limits.max_seq_len}}},
      {"io", {{"inputs", tensors_json(m.io.inputs)}, {"outputs", tensors_json(m.io.outputs)}}},
      {"files", json::object()},
  };
  if (!m.limits.precision.empty()) out["export"]["precision"] = m.limits.precision;
  for (const auto& [name, f] : m.files) out["files"][name] = {{"bytes", f.bytes}, {"sha256", f.sha256}};
  if (m.engine) {
    const EngineSection& e = *m.engine;
    json plugins = json::array(), profiles = json::array();
    auto or_null = [](const std::string& v) { return v.empty() ? json() : json(v); };
    for (const PluginSpec& p : e.plugins) {
      plugins.push_back({{"name", p.name}, {"version", p.version}, {"namespace", p.plugin_namespace},
                         {"library", or_null(p.library)}, {"sha256", or_null(p.sha256)}});
      if (!p.python.empty()) plugins.back()["python"] = p.python;
    }
    for (const Profile& p : e.profiles) profiles.push_back({{"name", p.name}, {"batch", p.batch}, {"seq", p.seq}});
    out["engine"] = {{"plan_file", e.plan_file}, {"target", e.target}, {"trt_version", e.trt_version},
                     {"cache_dtype", e.cache_dtype}, {"target_sms", e.target_sms}, {"profiles", profiles},
                     {"plugins", plugins}};
  }
  return out;
}

}  // namespace mixtral
