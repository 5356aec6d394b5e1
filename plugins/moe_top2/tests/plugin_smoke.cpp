// Drives libmixtral_trt_plugins.so the way TensorRT does, without TensorRT's libraries: dlopen,
// the exported getCreators / setLoggerFinder, then the IPluginV3 interfaces (which are
// header-only virtual interfaces). Build (headers of TensorRT >= 10, CUDA runtime):
//   g++ -std=c++17 -I <trt>/include -I <cuda>/include plugins/moe_top2/tests/plugin_smoke.cpp
//       -L <cuda>/lib64 -lcudart -ldl -o plugin_smoke
//   ./plugin_smoke path/to/libmixtral_trt_plugins.so        # CPU: interfaces, validation, logging
//   ./plugin_smoke path/to/libmixtral_trt_plugins.so gpu    # + enqueue on a GPU vs a host reference
//   ./plugin_smoke path/to/libmixtral_trt_plugins_selfreg.so selfreg [fake libnvinfer.so.N]
//       # the self-registering variant: with the stand-in libnvinfer (fake_nvinfer.cpp) loaded
//       # first it must register exactly once under "mixtral"; without one it must still load
// Prints "plugin_smoke: PASS ..." on success.
#include <NvInferRuntime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int gFailures = 0;
#define CHECK(cond, ...)                                                                                               \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            std::fprintf(stderr, "FAIL line %d: %s: ", __LINE__, #cond);                                              \
            std::fprintf(stderr, __VA_ARGS__);                                                                         \
            std::fprintf(stderr, "\n");                                                                                \
            ++gFailures;                                                                                               \
        }                                                                                                              \
    } while (0)

struct Logger : ILogger
{
    std::string last;
    int errors = 0;
    void log(Severity s, char const* msg) noexcept override
    {
        if (s <= Severity::kERROR)
        {
            ++errors;
            last = msg;
        }
    }
};

struct Finder : ILoggerFinder
{
    Logger* logger;
    explicit Finder(Logger* l) : logger(l) {}
    ILogger* findLogger() override { return logger; }
};

// Constant / unknown dimension expressions for getOutputShapes.
struct ConstImpl : apiv::VDimensionExpr
{
    int64_t v;
    explicit ConstImpl(int64_t x) : v(x) {}
    bool isConstant() const override { return v >= 0; }
    int64_t getConstantValue() const override { return v; }
    bool isSizeTensor() const override { return false; }
};
struct Expr : IDimensionExpr
{
    ConstImpl impl;
    explicit Expr(int64_t x) : impl(x) { mImpl = &impl; }
};
struct NoBuilder : IExprBuilder
{
    NoBuilder() { mImpl = nullptr; }
};

struct Field
{
    std::string name;
    std::vector<char> bytes;
    PluginFieldType type;
    int32_t length;
};

Field i32(char const* n, int32_t v)
{
    Field f{n, std::vector<char>(4), PluginFieldType::kINT32, 1};
    std::memcpy(f.bytes.data(), &v, 4);
    return f;
}

Field str(char const* n, char const* s)  // as the ONNX parser passes strings: with the NUL
{
    size_t const len = std::strlen(s) + 1;
    return Field{n, std::vector<char>(s, s + len), PluginFieldType::kCHAR, static_cast<int32_t>(len)};
}

IPluginV3* create(IPluginCreatorV3One* c, std::vector<Field> const& fs, TensorRTPhase phase)
{
    std::vector<PluginField> pf;
    for (auto const& f : fs) pf.emplace_back(f.name.c_str(), f.bytes.data(), f.type, f.length);
    PluginFieldCollection fc{static_cast<int32_t>(pf.size()), pf.data()};
    return c->createPlugin("moe", &fc, phase);
}

Dims dims(std::vector<int64_t> d)
{
    Dims r{};
    r.nbDims = static_cast<int32_t>(d.size());
    for (size_t i = 0; i < d.size(); ++i) r.d[i] = d[i];
    return r;
}

struct Case
{
    int64_t T, H, I, E;
    DataType act, router, weight, scale;
    bool int8;
};

std::vector<DynamicPluginTensorDesc> dynDescs(Case const& c, int64_t maxT)
{
    std::vector<std::vector<int64_t>> shapes = {{-1, c.H}, {c.E, c.H}, {c.E, 2 * c.I, c.H}, {c.E, c.H, c.I},
        {c.E, 2 * c.I}, {c.E, c.H}, {-1, c.H}};
    DataType types[7] = {c.act, c.router, c.weight, c.weight, c.scale, c.scale, c.act};
    std::vector<DynamicPluginTensorDesc> out;
    for (int i = 0; i < 7; ++i)
    {
        if (!c.int8 && (i == 4 || i == 5)) continue;
        DynamicPluginTensorDesc d{};
        d.desc.dims = dims(shapes[i]);
        d.desc.type = types[i];
        d.desc.format = TensorFormat::kLINEAR;
        d.min = d.max = d.opt = dims(shapes[i]);
        if (shapes[i][0] == -1) { d.min.d[0] = 1; d.max.d[0] = maxT; d.opt.d[0] = maxT; }
        out.push_back(d);
    }
    return out;
}

float toF(uint16_t bits, DataType t)
{
    if (t == DataType::kHALF) { __half_raw h; h.x = bits; return __half2float(__half(h)); }
    __nv_bfloat16_raw b; b.x = bits; return __bfloat162float(__nv_bfloat16(b));
}
uint16_t fromF(float x, DataType t)
{
    uint16_t bits;
    if (t == DataType::kHALF) bits = static_cast<__half_raw>(__float2half(x)).x;
    else bits = static_cast<__nv_bfloat16_raw>(__float2bfloat16(x)).x;
    return bits;
}

// Random tensor in dtype t (fp32, fp16/bf16 or int8), and its float values as the kernels see them.
std::vector<char> randomTensor(size_t n, DataType t, float scale, std::mt19937& g, std::vector<float>& values)
{
    std::uniform_real_distribution<float> u(-1.0F, 1.0F);
    size_t const es = t == DataType::kFLOAT ? 4 : t == DataType::kINT8 ? 1 : 2;
    std::vector<char> bytes(n * es);
    values.resize(n);
    for (size_t i = 0; i < n; ++i)
    {
        float x = u(g) * scale;
        if (t == DataType::kFLOAT) { std::memcpy(&bytes[4 * i], &x, 4); }
        else if (t == DataType::kINT8) { auto q = static_cast<int8_t>(std::lround(x)); bytes[i] = q; x = q; }
        else { uint16_t b = fromF(x, t); std::memcpy(&bytes[2 * i], &b, 2); x = toF(b, t); }
        values[i] = x;
    }
    return bytes;
}

void testGpuCase(IPluginCreatorV3One* creator, Case const& c, std::mt19937& g)
{
    IPluginV3* plugin = create(creator, {i32("num_experts", static_cast<int32_t>(c.E)), i32("top_k", 2),
        str("activation", "swiglu"), str("quantization", c.int8 ? "int8" : "none")}, TensorRTPhase::kRUNTIME);
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* rt = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    int const nIn = c.int8 ? 6 : 4;
    auto dyn = dynDescs(c, c.T);
    size_t const ws = build->getWorkspaceSize(dyn.data(), nIn, &dyn[nIn], 1);
    CHECK(ws > 0, "workspace");
    // Host data.
    std::vector<float> x, r, w13, w2, s13, s2;
    float const wscale = c.int8 ? 100.0F : 0.2F;
    std::vector<std::vector<char>> host = {randomTensor(c.T * c.H, c.act, 1.0F, g, x),
        randomTensor(c.E * c.H, c.router, 0.5F, g, r), randomTensor(c.E * 2 * c.I * c.H, c.weight, wscale, g, w13),
        randomTensor(c.E * c.H * c.I, c.weight, wscale, g, w2)};
    if (c.int8)
    {
        std::uniform_real_distribution<float> u(0.001F, 0.003F);
        host.push_back(randomTensor(c.E * 2 * c.I, c.scale, 1.0F, g, s13));
        host.push_back(randomTensor(c.E * c.H, c.scale, 1.0F, g, s2));
        for (auto* s : {&s13, &s2})  // positive scales, re-encoded
        {
            auto& bytes = host[s == &s13 ? 4 : 5];
            for (size_t i = 0; i < s->size(); ++i)
            {
                float v = u(g);
                if (c.scale == DataType::kFLOAT) std::memcpy(&bytes[4 * i], &v, 4);
                else { uint16_t b = fromF(v, c.scale); std::memcpy(&bytes[2 * i], &b, 2); v = toF(b, c.scale); }
                (*s)[i] = v;
            }
        }
    }
    std::vector<void*> dev(nIn);
    for (int i = 0; i < nIn; ++i)
    {
        cudaMalloc(&dev[i], host[i].size());
        cudaMemcpy(dev[i], host[i].data(), host[i].size(), cudaMemcpyHostToDevice);
    }
    void* out = nullptr;
    void* workspace = nullptr;
    cudaMalloc(&out, c.T * c.H * 2);
    cudaMalloc(&workspace, ws);
    cudaStream_t stream;
    cudaStreamCreate(&stream);
    std::vector<PluginTensorDesc> desc;
    for (int i = 0; i <= nIn; ++i)
    {
        PluginTensorDesc d = dyn[i].desc;
        if (d.dims.d[0] == -1) d.dims.d[0] = c.T;
        desc.push_back(d);
    }
    CHECK(rt->onShapeChange(desc.data(), nIn, &desc[nIn], 1) == 0, "onShapeChange");
    int const rc = rt->enqueue(desc.data(), &desc[nIn], const_cast<void const* const*>(dev.data()), &out, workspace,
        stream);
    CHECK(rc == 0, "enqueue rc %d", rc);
    std::vector<uint16_t> y(c.T * c.H);
    CHECK(cudaStreamSynchronize(stream) == cudaSuccess, "sync");
    cudaMemcpy(y.data(), out, y.size() * 2, cudaMemcpyDeviceToHost);
    // Host reference: fp32 router, softmax, top-2, renormalise, SwiGLU experts.
    auto wq = [&](std::vector<float> const& w, std::vector<float> const& s, size_t row, size_t col, size_t cols) {
        float const v = w[row * cols + col];
        return c.int8 ? v * s[row] : v;
    };
    double maxErr = 0, maxRef = 0;
    int skipped = 0;
    for (int64_t t = 0; t < c.T; ++t)
    {
        std::vector<float> logit(c.E);
        for (int64_t e = 0; e < c.E; ++e)
        {
            double a = 0;
            for (int64_t h = 0; h < c.H; ++h) a += double(x[t * c.H + h]) * r[e * c.H + h];
            logit[e] = static_cast<float>(a);
        }
        std::vector<int> idx(c.E);
        for (int e = 0; e < c.E; ++e) idx[e] = e;
        std::sort(idx.begin(), idx.end(), [&](int a, int b) { return logit[a] > logit[b]; });
        if (logit[idx[1]] - logit[idx[2]] < 1e-2F) { ++skipped; continue; }  // near tie: order may differ
        float const p0 = 1.0F / (1.0F + std::exp(logit[idx[1]] - logit[idx[0]]));
        float const wts[2] = {p0, 1.0F - p0};
        std::vector<double> acc(c.H, 0.0);
        for (int k = 0; k < 2; ++k)
        {
            int64_t const e = idx[k];
            std::vector<float> act(c.I);
            for (int64_t i = 0; i < c.I; ++i)
            {
                double gate = 0, up = 0;
                for (int64_t h = 0; h < c.H; ++h)
                {
                    gate += x[t * c.H + h] * wq(w13, s13, e * 2 * c.I + i, h, c.H);
                    up += x[t * c.H + h] * wq(w13, s13, e * 2 * c.I + c.I + i, h, c.H);
                }
                act[i] = toF(fromF(static_cast<float>(gate / (1 + std::exp(-gate)) * up), c.act), c.act);
            }
            for (int64_t h = 0; h < c.H; ++h)
            {
                double o = 0;
                for (int64_t i = 0; i < c.I; ++i) o += act[i] * wq(w2, s2, e * c.H + h, i, c.I);
                acc[h] += wts[k] * toF(fromF(static_cast<float>(o), c.act), c.act);
            }
        }
        for (int64_t h = 0; h < c.H; ++h)
        {
            maxErr = std::max(maxErr, std::fabs(acc[h] - toF(y[t * c.H + h], c.act)));
            maxRef = std::max(maxRef, std::fabs(acc[h]));
        }
    }
    double const tol = (c.act == DataType::kBF16 ? 0.03 : 0.01) * maxRef + 1e-3;
    std::printf("gpu case T=%ld H=%ld I=%ld E=%ld act=%d int8=%d: max|err|=%.3g (max|ref|=%.3g, tol %.3g), %d near-tie "
                "tokens skipped\n", long(c.T), long(c.H), long(c.I), long(c.E), int(c.act), int(c.int8), maxErr, maxRef,
        tol, skipped);
    CHECK(maxErr <= tol && skipped < c.T, "GPU result differs from the host reference");
    for (void* p : dev) cudaFree(p);
    cudaFree(out);
    cudaFree(workspace);
    cudaStreamDestroy(stream);
    delete plugin;
}

} // namespace

// The self-registering variant, loaded after a stand-in libnvinfer (or none).
int selfRegistration(char const* library, char const* fakeNvinfer)
{
    void* fake = fakeNvinfer ? dlopen(fakeNvinfer, RTLD_NOW | RTLD_GLOBAL) : nullptr;
    CHECK(!fakeNvinfer || fake, "dlopen %s: %s", fakeNvinfer, dlerror());
    void* lib = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    CHECK(lib != nullptr, "dlopen %s: %s", library, dlerror());
    if (fake != nullptr)
    {
        auto seen = reinterpret_cast<char const* (*)()>(dlsym(fake, "fakeRegistrations"));
        CHECK(seen && std::string(seen()) == "1 MixtralMoETop2 mixtral", "registrations: %s", seen ? seen() : "?");
    }
    if (gFailures != 0)
    {
        std::printf("plugin_smoke: FAIL (%d failures)\n", gFailures);
        return 1;
    }
    std::printf("plugin_smoke: PASS (self-registration %s)\n", fake ? "with libnvinfer" : "without libnvinfer");
    return 0;
}

int main(int argc, char** argv)
{
    if (argc < 2) { std::fprintf(stderr, "usage: plugin_smoke LIB [gpu | selfreg [FAKE_NVINFER]]\n"); return 2; }
    if (argc > 2 && std::string(argv[2]) == "selfreg") return selfRegistration(argv[1], argc > 3 ? argv[3] : nullptr);
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    CHECK(lib != nullptr, "dlopen: %s", dlerror());
    if (lib == nullptr) return 1;
    using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
    using SetFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    auto setFinder = reinterpret_cast<SetFinder>(dlsym(lib, "setLoggerFinder"));
    CHECK(getCreators != nullptr && setFinder != nullptr, "entry points not exported");
    CHECK(dlsym(lib, "mixtral_moe_top2_enqueue") == nullptr, "kernel symbols should stay hidden");
    Logger logger;
    Finder finder(&logger);
    setFinder(&finder);

    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    CHECK(n == 1 && creators != nullptr, "one creator");
    CHECK(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "creator kind");
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    CHECK(std::strcmp(creator->getPluginName(), "MixtralMoETop2") == 0 && std::strcmp(creator->getPluginVersion(), "1")
        == 0 && std::strcmp(creator->getPluginNamespace(), "mixtral") == 0, "name/version/namespace");
    CHECK(creator->getFieldNames()->nbFields == 4, "field names");

    // createPlugin: ONNX-parser-style fields, then the serialized fields at runtime.
    std::vector<Field> good = {i32("num_experts", 8), i32("top_k", 2), str("activation", "swiglu"),
        str("quantization", "int8")};
    IPluginV3* plugin = create(creator, good, TensorRTPhase::kBUILD);
    CHECK(plugin != nullptr, "valid fields refused: %s", logger.last.c_str());
    if (plugin == nullptr) return 1;
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* rt = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    CHECK(core && build && rt, "capabilities");
    CHECK(std::strcmp(core->getPluginName(), "MixtralMoETop2") == 0, "core name");
    CHECK(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0, "core kind");
    PluginFieldCollection const* ser = rt->getFieldsToSerialize();
    CHECK(ser && ser->nbFields == 4 && ser->fields[3].length == 5 && std::memcmp(ser->fields[3].data, "int8", 5) == 0,
        "serialized fields");
    IPluginV3* again = creator->createPlugin("moe", ser, TensorRTPhase::kRUNTIME);
    CHECK(again != nullptr, "runtime createPlugin from serialized fields");
    IPluginV3* cloned = rt->attachToContext(nullptr);
    CHECK(cloned != nullptr, "attachToContext");
    auto* rt2 = static_cast<IPluginV3OneRuntime*>(cloned->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* ser2 = rt2->getFieldsToSerialize();
    CHECK(ser2 != ser && ser2->fields[0].data != ser->fields[0].data && *static_cast<int32_t const*>(
        ser2->fields[0].data) == 8, "clone owns its fields");
    delete again;
    delete cloned;

    // Refusals are logged and return nullptr.
    int const errs = logger.errors;
    std::vector<Field> bad = good;
    bad[1] = i32("top_k", 3);
    CHECK(create(creator, bad, TensorRTPhase::kBUILD) == nullptr && logger.last.find("top_k") != std::string::npos,
        "top_k=3: %s", logger.last.c_str());
    bad = good;
    bad[3] = str("quantization", "int4");
    CHECK(create(creator, bad, TensorRTPhase::kRUNTIME) == nullptr, "int4");
    PluginField one("num_experts", good[0].bytes.data(), PluginFieldType::kINT32, 1);
    PluginFieldCollection lying{1 << 30, &one};
    CHECK(creator->createPlugin("moe", &lying, TensorRTPhase::kRUNTIME) == nullptr, "huge nbFields");
    CHECK(creator->createPlugin("moe", nullptr, TensorRTPhase::kRUNTIME) == nullptr, "null fc");
    CHECK(logger.errors == errs + 4, "each refusal logged once (%d)", logger.errors - errs);

    // Build-time checks.
    DataType out[1];
    DataType in6[6] = {DataType::kHALF, DataType::kFLOAT, DataType::kINT8, DataType::kINT8, DataType::kHALF,
        DataType::kFLOAT};
    CHECK(build->getOutputDataTypes(out, 1, in6, 6) == 0 && out[0] == DataType::kHALF, "output dtype");
    CHECK(build->getOutputDataTypes(out, 1, in6, 4) != 0, "int8 needs 6 inputs");
    in6[0] = DataType::kFLOAT;
    CHECK(build->getOutputDataTypes(out, 1, in6, 6) != 0, "fp32 activations (kernels run fp16/bf16)");
    Case mixtral{-1, 4096, 14336, 8, DataType::kHALF, DataType::kFLOAT, DataType::kINT8, DataType::kHALF, true};
    auto dyn = dynDescs(mixtral, 512);
    CHECK(build->configurePlugin(dyn.data(), 6, &dyn[6], 1) == 0, "configure Mixtral shapes: %s", logger.last.c_str());
    size_t const ws512 = build->getWorkspaceSize(dyn.data(), 6, &dyn[6], 1);
    auto dyn1 = dynDescs(mixtral, 1);
    size_t const ws1 = build->getWorkspaceSize(dyn1.data(), 6, &dyn1[6], 1);
    CHECK(ws1 > 0 && ws512 > ws1, "workspace grows with tokens (%zu, %zu)", ws1, ws512);
    {   // fp16 weights: the sm_90a prefill's regions too (enqueue passes MOE_FLAG_AUTO), on any GPU
        IPluginV3* fp16 = create(creator, {i32("num_experts", 8), i32("top_k", 2), str("activation", "swiglu"),
            str("quantization", "none")}, TensorRTPhase::kBUILD);
        CHECK(fp16 != nullptr, "fp16 plugin");
        auto* b16 = static_cast<IPluginV3OneBuild*>(fp16->getCapabilityInterface(PluginCapabilityType::kBUILD));
        Case half = mixtral;
        half.weight = DataType::kHALF;
        half.int8 = false;
        auto dyn16 = dynDescs(half, 512);
        size_t const sm90 = 4 * 1024 + 2 * 1024 * 14336 + 64 * 28 + 131072; // row_of, up, GEMM args, TMA
        size_t const ws16 = b16->getWorkspaceSize(dyn16.data(), 4, &dyn16[4], 1);
        CHECK(ws16 == ws512 + sm90, "fp16 workspace = int8's + the sm_90a regions (%zu, %zu)", ws16, ws512);
        delete fp16;
    }
    Case odd = mixtral;
    odd.H = 100;
    auto dynOdd = dynDescs(odd, 8);
    CHECK(build->configurePlugin(dynOdd.data(), 6, &dynOdd[6], 1) != 0 && logger.last.find("hidden=100")
        != std::string::npos, "H=100 refused by the kernels' rules: %s", logger.last.c_str());
    dyn[1].desc.dims.d[0] = 4;
    CHECK(build->configurePlugin(dyn.data(), 6, &dyn[6], 1) != 0, "router E mismatch");
    // supportsFormatCombination, position by position.
    dyn = dynDescs(mixtral, 8);
    bool all = true;
    for (int pos = 0; pos < 7; ++pos) all = all && build->supportsFormatCombination(pos, dyn.data(), 6, 1);
    CHECK(all, "Mixtral int8 combination");
    dyn[2].desc.type = DataType::kHALF;
    CHECK(!build->supportsFormatCombination(2, dyn.data(), 6, 1), "fp16 weights in an int8 plugin");
    dyn[0].desc.type = DataType::kFLOAT;
    CHECK(!build->supportsFormatCombination(0, dyn.data(), 6, 1), "fp32 hidden");
    dyn[0].desc.type = DataType::kHALF;
    dyn[0].desc.format = TensorFormat::kCHW32;
    CHECK(!build->supportsFormatCombination(0, dyn.data(), 6, 1), "non-linear format");
    CHECK(!build->supportsFormatCombination(7, dyn.data(), 6, 1), "pos out of range");
    // getOutputShapes with symbolic T.
    Expr T(-1), H(4096), E(8), I2(28672), I(14336), E4(4);
    DimsExprs shapes[6] = {{2, {&T, &H}}, {2, {&E, &H}}, {3, {&E, &I2, &H}}, {3, {&E, &H, &I}}, {2, {&E, &I2}},
        {2, {&E, &H}}};
    DimsExprs outShape{};
    NoBuilder nb;
    CHECK(build->getOutputShapes(shapes, 6, nullptr, 0, &outShape, 1, nb) == 0 && outShape.nbDims == 2
        && outShape.d[0] == &T && outShape.d[1] == &H, "output shape = hidden's");
    shapes[3].d[0] = &E4;
    CHECK(build->getOutputShapes(shapes, 6, nullptr, 0, &outShape, 1, nb) != 0, "w2 experts mismatch");
    // enqueue with T = 0: the kernels return before touching memory (no GPU needed).
    std::vector<PluginTensorDesc> desc;
    dyn = dynDescs(mixtral, 8);
    for (auto& d : dyn) { d.desc.dims.d[0] = d.desc.dims.d[0] == -1 ? 0 : d.desc.dims.d[0]; desc.push_back(d.desc); }
    void const* ptrs[6] = {};
    void* outPtr = nullptr;
    CHECK(rt->onShapeChange(desc.data(), 6, &desc[6], 1) == 0, "onShapeChange T=0");
    CHECK(rt->enqueue(desc.data(), &desc[6], ptrs, &outPtr, nullptr, nullptr) == 0, "enqueue T=0: %s",
        logger.last.c_str());
    delete plugin;

    int gpuCases = 0;
    if (argc > 2 && std::string(argv[2]) == "gpu")
    {
        std::mt19937 g(1234);
        Case cases[] = {{5, 128, 128, 8, DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kFLOAT, false},
            {100, 256, 192, 8, DataType::kBF16, DataType::kFLOAT, DataType::kBF16, DataType::kFLOAT, false},
            {3, 128, 256, 8, DataType::kHALF, DataType::kFLOAT, DataType::kINT8, DataType::kFLOAT, true},
            {70, 192, 128, 4, DataType::kBF16, DataType::kBF16, DataType::kINT8, DataType::kHALF, true}};
        for (Case const& c : cases)
        {
            testGpuCase(creator, c, g);
            ++gpuCases;
        }
    }
    if (gFailures != 0)
    {
        std::printf("plugin_smoke: FAIL (%d failures)\n", gFailures);
        return 1;
    }
    std::printf("plugin_smoke: PASS (CPU interface checks%s)\n", gpuCases ? ", GPU enqueue vs host reference" : "");
    return 0;
}
