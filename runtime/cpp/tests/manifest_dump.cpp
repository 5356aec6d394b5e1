// manifest_dump DIR: read DIR/manifest.json with mixtral_runtime (files verified) and print what
// the typed structures hold, plus the KV-cache layout, as JSON. tests/runtime/test_cpp_runtime.py
// compares this with Python's json.load of the same file.
#include <iostream>

#include <nlohmann/json.hpp>

#include "mixtral/kv_cache.h"
#include "mixtral/manifest.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: manifest_dump ARTIFACT_DIR\n";
    return 2;
  }
  try {
    const mixtral::Manifest m = mixtral::read_manifest(argv[1]);
    nlohmann::json out = mixtral::to_json(m);
    const mixtral::KvCacheLayout kv = mixtral::kv_cache_layout(m);
    out["kv_cache"] = {{"dtype", kv.dtype},
                       {"element_size", kv.element_size},
                       {"shape", kv.shape()},
                       {"bytes_per_buffer", kv.bytes_per_buffer()},
                       {"total_bytes", kv.total_bytes()}};
    std::cout << out.dump(2) << "\n";
  } catch (const std::exception& e) {
    std::cerr << "manifest_dump: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
