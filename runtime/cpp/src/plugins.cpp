// Plugin loading, the logger and CUDA buffers of the TensorRT backend.
#include <dlfcn.h>

#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include "trt_common.h"

namespace mixtral::detail {

void Logger::log(Severity severity, const char* msg) noexcept {
  try {
    if (severity <= Severity::kERROR) {
      std::lock_guard<std::mutex> lock(mutex_);
      errors_.emplace_back(msg);
      if (errors_.size() > 8) errors_.pop_front();
    }
    if (severity <= Severity::kWARNING)
      std::cerr << "TensorRT " << (severity <= Severity::kERROR ? "error" : "warning") << ": " << msg << "\n";
  } catch (...) {  // a logger must not throw into TensorRT
  }
}

std::string Logger::said() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::string out;
  for (const auto& e : errors_) out += (out.empty() ? " TensorRT said: " : " | ") + e;
  errors_.clear();
  return out;
}

Logger& logger() {
  static Logger instance;
  return instance;
}

CudaBuffer::CudaBuffer(size_t bytes, Kind kind, const std::string& what) : bytes_(bytes), kind_(kind) {
  const size_t n = bytes ? bytes : 1;
  if (kind == Kind::kDevice) {
    check_cuda(cudaMalloc(&ptr_, n), "cudaMalloc of " + std::to_string(n) + " bytes for " + what);
  } else {
    check_cuda(cudaMallocHost(&ptr_, n), "cudaMallocHost of " + std::to_string(n) + " bytes for " + what);
  }
}

CudaBuffer::~CudaBuffer() {
  if (ptr_ == nullptr) return;
  if (kind_ == Kind::kDevice) {
    cudaFree(ptr_);
  } else {
    cudaFreeHost(ptr_);
  }
}

CudaBuffer& CudaBuffer::operator=(CudaBuffer&& other) noexcept {
  std::swap(ptr_, other.ptr_);
  std::swap(bytes_, other.bytes_);
  std::swap(kind_, other.kind_);
  return *this;
}

std::string dtype_name(nvinfer1::DataType type) {
  using nvinfer1::DataType;
  switch (type) {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kBF16: return "bfloat16";
    case DataType::kINT64: return "int64";
    case DataType::kINT32: return "int32";
    case DataType::kINT8: return "int8";
    case DataType::kUINT8: return "uint8";
    case DataType::kBOOL: return "bool";
    case DataType::kFP8: return "float8e4m3fn";
    default: return "datatype" + std::to_string(static_cast<int>(type));
  }
}

namespace {

std::mutex loaded_mutex;
std::set<std::string>& loaded_libraries() {  // canonical paths: TensorRT refuses a second load
  static std::set<std::string> loaded;
  return loaded;
}

void load_library(nvinfer1::IPluginRegistry& registry, const std::filesystem::path& path) {
  const std::string key = std::filesystem::weakly_canonical(path).string();
  std::lock_guard<std::mutex> lock(loaded_mutex);
  if (loaded_libraries().count(key)) return;
  if (registry.loadLibrary(key.c_str()) == nullptr) {
    // nullptr: one of its creators is registered already, or the library registers its creators
    // from static initialisers. Keep it loaded either way; the creator check below decides.
    if (dlopen(key.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr)
      throw TensorRTError("cannot load plugin library " + key + ": " + dlerror() + logger().said());
  }
  loaded_libraries().insert(key);
}

std::string short_hash(const std::string& sha) { return sha.substr(0, 12) + "..."; }

}  // namespace

void load_plugins(const Manifest& manifest, const std::vector<std::filesystem::path>& extra) {
  nvinfer1::IPluginRegistry* registry = getPluginRegistry();
  if (registry == nullptr) throw TensorRTError("TensorRT returned no plugin registry" + logger().said());
  std::map<std::string, std::filesystem::path> overrides;  // file name -> path given by the caller
  for (const auto& p : extra) overrides[p.filename().string()] = p;
  std::vector<std::string> problems;
  std::vector<std::filesystem::path> to_load;
  const auto& plugins = manifest.engine->plugins;
  for (const PluginSpec& p : plugins) {
    if (p.library.empty()) continue;
    const std::filesystem::path listed(p.library);
    std::filesystem::path path = listed.is_absolute() ? listed : manifest.path_of(p.library);
    if (auto it = overrides.find(listed.filename().string()); it != overrides.end()) {
      path = it->second;
      overrides.erase(it);
    }
    if (!std::filesystem::is_regular_file(path)) {
      problems.push_back("plugin " + p.name + ": library " + path.string() +
                         " not found; pass its path with --plugin (EngineOptions::plugin_libraries)");
    } else if (std::string got; !p.sha256.empty() && (got = sha256_file(path)) != p.sha256) {
      problems.push_back("plugin " + p.name + ": " + path.string() + " has sha256 " + short_hash(got) +
                         ", the manifest says " + short_hash(p.sha256) +
                         ": the engine was built against another build of the plugin; rebuild the engine or "
                         "pass the library it was built with");
    } else {
      to_load.push_back(path);
    }
  }
  for (const auto& [name, path] : overrides) to_load.push_back(path);
  if (problems.empty()) {
    for (const auto& path : to_load) load_library(*registry, path);
    for (const PluginSpec& p : plugins) {
      if (registry->getCreator(p.name.c_str(), p.version.c_str(), p.plugin_namespace.c_str()) != nullptr) continue;
      std::string why = "after loading " + p.library;
      if (p.library.empty())
        why = "and the manifest names no library" +
              (p.python.empty() ? std::string() : " (the engine was built with the Python creator " + p.python + ")") +
              ": pass the C++ plugin library (plugins/moe_top2) with --plugin PATH "
              "(EngineOptions::plugin_libraries)";
      problems.push_back("plugin '" + p.name + "' version " + p.version + " namespace '" + p.plugin_namespace +
                         "' is not registered " + why);
    }
  }
  if (problems.empty()) return;
  std::ostringstream msg;
  msg << "cannot load the engine's plugins:";
  for (const auto& p : problems) msg << "\n  " << p;
  throw TensorRTError(msg.str());
}

}  // namespace mixtral::detail
