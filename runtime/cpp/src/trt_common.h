// Internal to the TensorRT backend: the process-wide logger, CUDA error checks, RAII holders.
#pragma once

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "mixtral/engine.h"

namespace mixtral::detail {

// TensorRT keeps the first logger a process registers, so there is one: it prints warnings and
// errors to stderr and keeps the recent errors for exception messages.
class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override;
  std::string said();  // " TensorRT said: a | b" for errors since the last call; "" when none

 private:
  std::mutex mutex_;
  std::deque<std::string> errors_;
};

Logger& logger();

inline void check_cuda(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess)
    throw TensorRTError(what + " failed: " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

// cudaMalloc'd or cudaMallocHost'd bytes, freed on destruction.
class CudaBuffer {
 public:
  enum class Kind { kDevice, kPinnedHost };
  CudaBuffer() = default;
  CudaBuffer(size_t bytes, Kind kind, const std::string& what);
  ~CudaBuffer();
  CudaBuffer(CudaBuffer&& other) noexcept { *this = std::move(other); }
  CudaBuffer& operator=(CudaBuffer&& other) noexcept;
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  Kind kind_ = Kind::kDevice;
};

// Load the manifest's plugin libraries (sha256-checked) and `extra` ones, then require each
// listed creator to be registered. Each library is loaded once per process.
void load_plugins(const Manifest& manifest, const std::vector<std::filesystem::path>& extra);

std::string dtype_name(nvinfer1::DataType type);

}  // namespace mixtral::detail
