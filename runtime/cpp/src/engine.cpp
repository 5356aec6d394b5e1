// The TensorRT backend (see engine.h for the binding scheme).
#include "mixtral/engine.h"

#include <NvInferVersion.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include "mixtral/kv_cache.h"
#include "trt_common.h"

namespace mixtral {

using detail::check_cuda;
using detail::CudaBuffer;
using detail::logger;
using nvinfer1::DataType;
using nvinfer1::Dims;

namespace {

const char* const kStepInputs[] = {"input_ids", "position_ids", "write_indices"};

struct ProfileRange {
  int64_t min_batch, min_seq, max_batch, max_seq;
};

// A decode context for one row run (r0, n) and, once captured, its CUDA graph (which holds the
// run's cache addresses, hence one per run).
struct Decoder {
  std::unique_ptr<nvinfer1::IExecutionContext> context;
  cudaGraphExec_t graph = nullptr;
  ~Decoder() {
    if (graph != nullptr) cudaGraphExecDestroy(graph);
  }
};

Dims dims(std::initializer_list<int64_t> values) {
  Dims d{};
  d.nbDims = static_cast<int32_t>(values.size());
  std::copy(values.begin(), values.end(), d.d);
  return d;
}

std::string dims_text(const Dims& d) {
  std::string out = "[";
  for (int32_t i = 0; i < d.nbDims; ++i) out += (i ? ", " : "") + std::to_string(d.d[i]);
  return out + "]";
}

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int shift = 0;
    uint32_t m = mant;
    while (!(m & 0x400u)) m <<= 1, ++shift;
    bits = sign | static_cast<uint32_t>(113 - shift) << 23 | ((m & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

bool is_cache(const std::string& name) {
  return name.rfind("past_key_values.", 0) == 0 || name.rfind("present.", 0) == 0;
}

}  // namespace

struct TensorRTBackend::Impl {
  Manifest manifest;
  EngineOptions options;
  KvCacheLayout kv;
  int64_t vocab = 0;
  cudaStream_t stream = nullptr;
  std::map<std::string, DataType> dtypes;
  std::vector<ProfileRange> profiles;
  std::string graph_error;
  // Declaration order is teardown order reversed: contexts go before buffers, engine and runtime.
  std::unique_ptr<nvinfer1::IRuntime> runtime;
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::map<std::string, CudaBuffer> device, host;  // step inputs and "logits"
  std::vector<CudaBuffer> cache;                   // (layer, kind), layer-major
  CudaBuffer scratch;
  std::map<std::string, void*> addresses;
  std::map<int, std::unique_ptr<nvinfer1::IExecutionContext>> prefill;  // by profile
  std::map<int, int64_t> prefill_rows;                                   // the row each one's caches point at
  std::map<std::pair<int64_t, int64_t>, Decoder> decoders;               // by row run (r0, n)

  Impl(const Manifest& m, const EngineOptions& o) : manifest(m), options(o) {}
  ~Impl() {
    if (stream != nullptr) cudaStreamSynchronize(stream);
    decoders.clear();
    prefill.clear();
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  void open();
  void deserialize(const std::filesystem::path& plan, const EngineSection& spec);
  void check_engine();
  void allocate();
  size_t row_bytes() const { return kv.bytes_per_buffer() / static_cast<size_t>(kv.batch); }  // one [K, L, D] row
  std::map<std::string, void*> addresses_at(int64_t r0) const;
  void bind(nvinfer1::IExecutionContext& ctx, const std::map<std::string, void*>& at, bool cache_only);
  std::unique_ptr<nvinfer1::IExecutionContext> new_context(int profile, int64_t r0);
  nvinfer1::IExecutionContext& prefill_context(int profile, int64_t r0);
  void set_shapes(nvinfer1::IExecutionContext& ctx, int64_t batch, int64_t seq);
  int choose_profile(int64_t batch, int64_t seq) const;
  void enqueue(nvinfer1::IExecutionContext& ctx);
  void decode(int64_t r0, int64_t batch, int profile);
  cudaGraphExec_t capture(nvinfer1::IExecutionContext& ctx, int64_t r0, int64_t batch);
  void stage(const std::string& name, const std::vector<int64_t>& values);
  std::vector<float> read_logits(int64_t batch, int64_t seq, const std::vector<int64_t>& last);
};

void TensorRTBackend::Impl::open() {
  if (manifest.stage != "engine" || !manifest.engine)
    throw ManifestError(manifest.directory.string() + " holds a '" + manifest.stage +
                        "' artifact, not a TensorRT engine build; build an engine from it first");
  const EngineSection& spec = *manifest.engine;
  if (spec.target == "tensorrt_rtx")
    throw TensorRTError(manifest.directory.string() + " was built with TensorRT-RTX; this mixtral_runtime links "
                        "datacenter TensorRT. Rebuild the engine with --target tensorrt");
  kv = kv_cache_layout(manifest);
  vocab = manifest.config.vocab_size;
  const std::filesystem::path plan = manifest.path_of(spec.plan_file);
  if (!std::filesystem::is_regular_file(plan))
    throw ManifestError("engine plan " + plan.string() + " is missing (manifest engine.plan_file); rebuild the engine");
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0)
    throw TensorRTError("the TensorRT backend needs an NVIDIA GPU, and CUDA sees none");
  if (options.device < 0 || options.device >= count)
    throw TensorRTError("device=" + std::to_string(options.device) + ", but CUDA sees " + std::to_string(count) +
                        " device(s)");
  check_cuda(cudaSetDevice(options.device), "cudaSetDevice");
  detail::load_plugins(manifest, options.plugin_libraries);  // before the engine exists
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  deserialize(plan, spec);
  check_engine();
  allocate();
}

void TensorRTBackend::Impl::deserialize(const std::filesystem::path& plan, const EngineSection& spec) {
  runtime.reset(nvinfer1::createInferRuntime(logger()));
  if (!runtime) throw TensorRTError("TensorRT could not create a runtime." + logger().said());
  // Engine host code stays disallowed (the default): a plan is executable code.
  std::ifstream in(plan, std::ios::binary);
  std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string version = library_version();
  if (!spec.trt_version.empty() && spec.trt_version.rfind(version, 0) != 0 && version.rfind(spec.trt_version, 0) != 0)
    std::cerr << "mixtral_runtime: " << plan.string() << " was built with TensorRT " << spec.trt_version
              << "; this is " << version << "\n";
  logger().said();  // forget older errors: the message below is about this call
  engine.reset(runtime->deserializeCudaEngine(blob.data(), blob.size()));
  if (engine) return;
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, options.device);
  std::string built = "TensorRT " + (spec.trt_version.empty() ? "(version not recorded)" : spec.trt_version);
  if (!spec.target_sms.empty()) {
    built += " for";
    for (size_t i = 0; i < spec.target_sms.size(); ++i) built += (i ? ", " : " ") + spec.target_sms[i];
  }
  throw TensorRTError("TensorRT " + version + " could not deserialize " + plan.string() + " (built with " +
                      built + "; this GPU is sm_" + std::to_string(prop.major) + std::to_string(prop.minor) +
                      "). Engines run only with the TensorRT version that built them, on the GPU architectures they "
                      "were built for: install that version or rebuild the engine on this machine." +
                      logger().said());
}

void TensorRTBackend::Impl::check_engine() {
  std::vector<std::string> problems;
  std::map<std::string, bool> seen;
  for (int32_t i = 0; i < engine->getNbIOTensors(); ++i) {
    const std::string name = engine->getIOTensorName(i);
    const char* n = name.c_str();
    const auto mode = engine->getTensorIOMode(n);
    const std::string io = mode == nvinfer1::TensorIOMode::kINPUT ? "input" : "output";
    dtypes[name] = engine->getTensorDataType(n);
    const TensorSpec* want = manifest.io.find(name);
    if (want == nullptr) {
      problems.push_back(io + " '" + name + "': in the engine, not in the manifest");
      continue;
    }
    seen[name] = true;
    const bool is_input = std::any_of(manifest.io.inputs.begin(), manifest.io.inputs.end(),
                                      [&](const TensorSpec& t) { return t.name == name; });
    if (is_input != (mode == nvinfer1::TensorIOMode::kINPUT))
      problems.push_back("'" + name + "': an " + (is_input ? "input" : "output") + " in the manifest, an " + io +
                         " in the engine");
    if (detail::dtype_name(dtypes[name]) != want->dtype)
      problems.push_back("'" + name + "': dtype " + detail::dtype_name(dtypes[name]) + " in the engine, " +
                         want->dtype + " in the manifest");
    const Dims shape = engine->getTensorShape(n);
    bool same = shape.nbDims == static_cast<int32_t>(want->shape.size());
    for (int32_t d = 0; same && d < shape.nbDims; ++d)
      same = want->shape[d].symbolic() || want->shape[d].value == shape.d[d];
    if (!same)
      problems.push_back("'" + name + "': shape " + dims_text(shape) + " in the engine differs from the manifest");
    if (engine->getTensorLocation(n) != nvinfer1::TensorLocation::kDEVICE)
      problems.push_back("'" + name + "': TensorRT wants it in host memory (a shape tensor); expected a device tensor");
    if (engine->getTensorFormat(n) != nvinfer1::TensorFormat::kLINEAR)
      problems.push_back("'" + name + "': not in LINEAR format");
  }
  for (const auto* list : {&manifest.io.inputs, &manifest.io.outputs})
    for (const TensorSpec& t : *list)
      if (!seen.count(t.name)) problems.push_back("'" + t.name + "': in the manifest, missing from the engine");
  for (int64_t i = 0; problems.empty() && i < kv.layers; ++i) {
    for (const char* kind : kKvKinds) {
      const char* alias = engine->getAliasedInputTensor(present_name(i, kind).c_str());
      if (alias == nullptr || past_name(i, kind) != alias)
        problems.push_back(present_name(i, kind) + " aliases " + (alias ? alias : "no input") +
                           ": the KV cache is not updated in place (TensorScatter must become TensorRT's KV-cache "
                           "update layer); rebuild with TensorRT >= 10.15");
    }
  }
  for (const char* name : kStepInputs)
    if (problems.empty() && dtypes[name] != DataType::kINT64 && dtypes[name] != DataType::kINT32)
      problems.push_back(std::string("'") + name + "': dtype " + detail::dtype_name(dtypes[name]) + ", expected int64");
  if (problems.empty() && detail::dtype_name(dtypes[past_name(0, "key")]) != kv.dtype)
    problems.push_back("the engine keeps its KV cache in " + detail::dtype_name(dtypes[past_name(0, "key")]) +
                       "; the manifest says " + kv.dtype);
  const int64_t slots = engine->getTensorShape(past_name(0, "key").c_str()).d[2];
  if (problems.empty() && slots != -1 && slots != kv.max_seq_len)
    problems.push_back("the engine has a KV cache of " + std::to_string(slots) + " slots; the manifest says " +
                       std::to_string(kv.max_seq_len));
  if (!problems.empty()) {
    std::ostringstream msg;
    msg << manifest.path_of(manifest.engine->plan_file).string() << " does not match its manifest:";
    for (const auto& p : problems) msg << "\n  " << p;
    throw ManifestError(msg.str());
  }
  for (int32_t p = 0; p < engine->getNbOptimizationProfiles(); ++p) {
    const Dims lo = engine->getProfileShape("input_ids", p, nvinfer1::OptProfileSelector::kMIN);
    const Dims hi = engine->getProfileShape("input_ids", p, nvinfer1::OptProfileSelector::kMAX);
    profiles.push_back({lo.d[0], lo.d[1], hi.d[0], hi.d[1]});
  }
}

void TensorRTBackend::Impl::allocate() {
  using Kind = CudaBuffer::Kind;
  const int64_t B = kv.batch, L = kv.max_seq_len;
  int64_t tokens = 0;  // the largest batch x seq any profile accepts, at most B x L
  for (const ProfileRange& p : profiles) tokens = std::max(tokens, std::min(p.max_batch, B) * std::min(p.max_seq, L));
  const std::map<std::string, int64_t> counts = {{"input_ids", tokens}, {"position_ids", tokens}, {"write_indices", B}};
  for (const auto& [name, count] : counts) {
    const size_t bytes = count * dtype_size(detail::dtype_name(dtypes[name]));
    device.emplace(name, CudaBuffer(bytes, Kind::kDevice, name));
    host.emplace(name, CudaBuffer(bytes, Kind::kPinnedHost, name));
  }
  const size_t logit_size = dtype_size(detail::dtype_name(dtypes["logits"]));
  device.emplace("logits", CudaBuffer(tokens * vocab * logit_size, Kind::kDevice, "logits"));
  host.emplace("logits", CudaBuffer(B * vocab * logit_size, Kind::kPinnedHost, "logits readback"));
  for (int64_t i = 0; i < kv.layers; ++i) {
    for (const char* kind : kKvKinds) {
      // Zeros, not garbage: masked slots still meet a 0 weight in P.V, and 0 x NaN would be NaN.
      cache.emplace_back(kv.bytes_per_buffer(), Kind::kDevice, past_name(i, kind));
      check_cuda(cudaMemsetAsync(cache.back().get(), 0, kv.bytes_per_buffer(), stream), "zeroing the KV cache");
      addresses[past_name(i, kind)] = addresses[present_name(i, kind)] = cache.back().get();
    }
  }
  scratch = CudaBuffer(std::max<int64_t>(engine->getDeviceMemorySizeV2(), 256), Kind::kDevice, "activations");
  for (const char* name : kStepInputs) addresses[name] = device.at(name).get();
  addresses["logits"] = device.at("logits").get();
  check_cuda(cudaStreamSynchronize(stream), "allocating the engine's buffers");
}

// Every tensor address, the caches at row r0: each cache is row-major [max_batch, K, L, D], so
// rows r0.. start r0 rows in and a run of n rows is the same memory with shape [n, K, L, D].
std::map<std::string, void*> TensorRTBackend::Impl::addresses_at(int64_t r0) const {
  std::map<std::string, void*> at = addresses;
  for (auto& [name, address] : at)
    if (is_cache(name)) address = static_cast<char*>(address) + static_cast<size_t>(r0) * row_bytes();
  return at;
}

void TensorRTBackend::Impl::bind(nvinfer1::IExecutionContext& ctx, const std::map<std::string, void*>& at,
                                 bool cache_only) {
  for (const auto& [name, address] : at)
    if ((!cache_only || is_cache(name)) && !ctx.setTensorAddress(name.c_str(), address))
      throw TensorRTError("TensorRT refused the address of '" + name + "'." + logger().said());
}

// A context on `profile` sharing the activation scratch, every tensor address bound (caches at row r0).
std::unique_ptr<nvinfer1::IExecutionContext> TensorRTBackend::Impl::new_context(int profile, int64_t r0) {
  std::unique_ptr<nvinfer1::IExecutionContext> ctx(
      engine->createExecutionContext(nvinfer1::ExecutionContextAllocationStrategy::kUSER_MANAGED));
  if (!ctx) throw TensorRTError("TensorRT could not create an execution context." + logger().said());
  ctx->setDeviceMemoryV2(scratch.get(), static_cast<int64_t>(scratch.bytes()));
  if (profile != 0 && !ctx->setOptimizationProfileAsync(profile, stream))
    throw TensorRTError("TensorRT refused optimization profile " + std::to_string(profile) + "." + logger().said());
  bind(*ctx, addresses_at(r0), false);
  return ctx;
}

// The profile's prefill context, its cache addresses moved to row r0 when they point elsewhere.
nvinfer1::IExecutionContext& TensorRTBackend::Impl::prefill_context(int profile, int64_t r0) {
  auto& ctx = prefill[profile];
  if (!ctx) ctx = new_context(profile, r0);
  else if (prefill_rows[profile] != r0) bind(*ctx, addresses_at(r0), true);
  prefill_rows[profile] = r0;
  return *ctx;
}

void TensorRTBackend::Impl::set_shapes(nvinfer1::IExecutionContext& ctx, int64_t batch, int64_t seq) {
  std::vector<std::pair<std::string, Dims>> shapes = {
      {"input_ids", dims({batch, seq})}, {"position_ids", dims({batch, seq})}, {"write_indices", dims({batch})}};
  for (int64_t i = 0; i < kv.layers; ++i)
    for (const char* kind : kKvKinds)
      shapes.emplace_back(past_name(i, kind), dims({batch, kv.kv_heads, kv.max_seq_len, kv.head_dim}));
  for (const auto& [name, shape] : shapes)
    if (!ctx.setInputShape(name.c_str(), shape))
      throw TensorRTError("TensorRT rejected shape " + dims_text(shape) + " for '" + name + "'." + logger().said());
}

int TensorRTBackend::Impl::choose_profile(int64_t batch, int64_t seq) const {
  int best = -1;  // the tightest profile that accepts [batch, seq]
  for (int p = 0; p < static_cast<int>(profiles.size()); ++p) {
    const ProfileRange& r = profiles[p];
    if (batch < r.min_batch || batch > r.max_batch || seq < r.min_seq || seq > r.max_seq) continue;
    const ProfileRange* b = best < 0 ? nullptr : &profiles[best];
    if (b == nullptr || std::make_pair(r.max_seq, r.max_batch) < std::make_pair(b->max_seq, b->max_batch)) best = p;
  }
  if (best >= 0) return best;
  std::string have;
  for (size_t p = 0; p < profiles.size(); ++p)
    have += (p ? "; #" : "#") + std::to_string(p) + ": batch " + std::to_string(profiles[p].min_batch) + ".." +
            std::to_string(profiles[p].max_batch) + ", seq " + std::to_string(profiles[p].min_seq) + ".." +
            std::to_string(profiles[p].max_seq);
  throw GenerationError("no optimization profile of the engine accepts input_ids [" + std::to_string(batch) + ", " +
                        std::to_string(seq) + "] (" + have + ")");
}

void TensorRTBackend::Impl::enqueue(nvinfer1::IExecutionContext& ctx) {
  if (!ctx.enqueueV3(stream))
    throw TensorRTError("TensorRT could not enqueue the step (enqueueV3 failed)." + logger().said());
}

void TensorRTBackend::Impl::decode(int64_t r0, int64_t batch, int profile) {
  auto it = decoders.find({r0, batch});
  if (it == decoders.end()) {
    Decoder& dec = decoders[{r0, batch}];
    dec.context = new_context(profile, r0);
    set_shapes(*dec.context, batch, 1);  // once: a decoder serves one row run
    enqueue(*dec.context);  // this step's result, and TensorRT's lazy initialisation before any capture
    if (options.cuda_graphs && graph_error.empty()) dec.graph = capture(*dec.context, r0, batch);
  } else if (it->second.graph != nullptr) {
    check_cuda(cudaGraphLaunch(it->second.graph, stream), "replaying the decode CUDA graph");
  } else {
    enqueue(*it->second.context);
  }
}

cudaGraphExec_t TensorRTBackend::Impl::capture(nvinfer1::IExecutionContext& ctx, int64_t r0, int64_t batch) {
  // Capture records the enqueue; it does not run the step again.
  const cudaError_t began = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
  const bool enqueued = began == cudaSuccess && ctx.enqueueV3(stream);
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = began == cudaSuccess ? cudaStreamEndCapture(stream, &graph) : began;
  cudaGraphExec_t exec = nullptr;
  cudaError_t made = cudaErrorUnknown;
  if (enqueued && ended == cudaSuccess && graph != nullptr) made = cudaGraphInstantiate(&exec, graph, 0);
  if (graph != nullptr) cudaGraphDestroy(graph);
  if (made == cudaSuccess) return exec;
  cudaGetLastError();  // clear the error the failed capture left behind
  std::string why = cudaGetErrorString(ended != cudaSuccess ? ended : made);
  if (began == cudaSuccess && !enqueued) why = "enqueueV3 returned false under capture." + logger().said();
  graph_error = "capturing the decode step of rows " + std::to_string(r0) + ".." + std::to_string(r0 + batch - 1) +
                " failed: " + why;
  std::cerr << "mixtral_runtime: decode runs without CUDA graphs: " << graph_error << "\n";
  return nullptr;
}

void TensorRTBackend::Impl::stage(const std::string& name, const std::vector<int64_t>& values) {
  void* h = host.at(name).get();
  if (dtypes[name] == DataType::kINT32) {
    auto* out = static_cast<int32_t*>(h);
    for (size_t i = 0; i < values.size(); ++i) out[i] = static_cast<int32_t>(values[i]);
  } else {
    std::memcpy(h, values.data(), values.size() * sizeof(int64_t));
  }
  const size_t bytes = values.size() * dtype_size(detail::dtype_name(dtypes[name]));
  check_cuda(cudaMemcpyAsync(device.at(name).get(), h, bytes, cudaMemcpyHostToDevice, stream), "staging " + name);
}

std::vector<float> TensorRTBackend::Impl::read_logits(int64_t batch, int64_t seq, const std::vector<int64_t>& last) {
  const DataType type = dtypes["logits"];
  const size_t row = vocab * dtype_size(detail::dtype_name(type));
  auto* src = static_cast<const char*>(device.at("logits").get());
  auto* dst = static_cast<char*>(host.at("logits").get());
  for (int64_t b = 0; b < batch; ++b)  // only the rows the caller samples from: [batch, V]
    check_cuda(cudaMemcpyAsync(dst + b * row, src + (b * seq + last[b]) * row, row, cudaMemcpyDeviceToHost, stream),
               "reading logits");
  check_cuda(cudaStreamSynchronize(stream), "the step");
  std::vector<float> out(batch * vocab);
  if (type == DataType::kFLOAT) {
    std::memcpy(out.data(), dst, out.size() * sizeof(float));
  } else {
    const auto* half = reinterpret_cast<const uint16_t*>(dst);
    const bool bf16 = type == DataType::kBF16;
    for (size_t i = 0; i < out.size(); ++i) out[i] = bf16 ? bf16_to_float(half[i]) : half_to_float(half[i]);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

TensorRTBackend::TensorRTBackend(const Manifest& manifest, const EngineOptions& options)
    : impl_(std::make_unique<Impl>(manifest, options)) {
  impl_->open();
}

TensorRTBackend::~TensorRTBackend() = default;

int64_t TensorRTBackend::max_batch() const { return impl_->kv.batch; }
int64_t TensorRTBackend::max_seq_len() const { return impl_->kv.max_seq_len; }
int64_t TensorRTBackend::vocab_size() const { return impl_->vocab; }

int64_t TensorRTBackend::max_step_len(int64_t batch) const {
  int64_t longest = 0;
  for (const ProfileRange& p : impl_->profiles)
    if (p.min_batch <= batch && batch <= p.max_batch) longest = std::max(longest, p.max_seq);
  return std::min(longest, impl_->kv.max_seq_len);
}

std::vector<float> TensorRTBackend::step(const std::vector<int64_t>& ids, const std::vector<int64_t>& pos,
                                         const std::vector<int64_t>& where, int64_t batch, int64_t seq,
                                         const std::vector<int64_t>& last) {
  return step_rows(0, ids, pos, where, batch, seq, last);
}

std::vector<float> TensorRTBackend::step_rows(int64_t r0, const std::vector<int64_t>& ids,
                                              const std::vector<int64_t>& pos, const std::vector<int64_t>& where,
                                              int64_t batch, int64_t seq, const std::vector<int64_t>& last) {
  Impl& m = *impl_;
  if (batch < 1 || batch > m.kv.batch || seq < 1 || seq > m.kv.max_seq_len)
    throw GenerationError("batch " + std::to_string(batch) + " x seq " + std::to_string(seq) +
                          " is outside the build's 1.." + std::to_string(m.kv.batch) + " x 1.." +
                          std::to_string(m.kv.max_seq_len));
  if (r0 < 0 || r0 > m.kv.batch - batch)
    throw GenerationError("rows " + std::to_string(r0) + ".." + std::to_string(r0 + batch - 1) +
                          " are outside the cache's rows 0.." + std::to_string(m.kv.batch - 1));
  const auto n = static_cast<size_t>(batch * seq);
  if (ids.size() != n || pos.size() != n || where.size() != static_cast<size_t>(batch) ||
      last.size() != static_cast<size_t>(batch))
    throw GenerationError("step expects input_ids and position_ids of batch x seq values and write_indices, last of "
                          "batch values");
  for (int64_t id : ids)
    if (id < 0 || id >= m.vocab)
      throw GenerationError("input_ids hold token id " + std::to_string(id) + ", outside the vocabulary [0, " +
                            std::to_string(m.vocab) + ")");
  for (int64_t b = 0; b < batch; ++b) {
    if (where[b] < 0 || where[b] + seq > m.kv.max_seq_len)
      throw GenerationError("row " + std::to_string(b) + " would write cache slots " + std::to_string(where[b]) +
                            ".." + std::to_string(where[b] + seq - 1) + "; slots are 0.." +
                            std::to_string(m.kv.max_seq_len - 1));
    if (last[b] < 0 || last[b] >= seq) throw GenerationError("last[" + std::to_string(b) + "] is outside the step");
  }
  const int profile = m.choose_profile(batch, seq);
  check_cuda(cudaSetDevice(m.options.device), "cudaSetDevice");
  m.stage("input_ids", ids);
  m.stage("position_ids", pos);
  m.stage("write_indices", where);
  if (seq == 1) {
    m.decode(r0, batch, profile);
  } else {
    nvinfer1::IExecutionContext& ctx = m.prefill_context(profile, r0);
    m.set_shapes(ctx, batch, seq);
    m.enqueue(ctx);
  }
  return m.read_logits(batch, seq, last);
}

void* TensorRTBackend::cache_address(int64_t layer, const std::string& kind) const {
  return impl_->addresses.at(past_name(layer, kind));
}

bool TensorRTBackend::decode_graphs() const { return impl_->options.cuda_graphs && impl_->graph_error.empty(); }
std::string TensorRTBackend::graph_error() const { return impl_->graph_error; }

std::string TensorRTBackend::library_version() {
  const int32_t v = getInferLibVersion();  // major * 10000 + minor * 100 + patch
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

}  // namespace mixtral
