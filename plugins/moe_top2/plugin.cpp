// MixtralMoETop2 TensorRT plugin: IPluginV3 + IPluginCreatorV3One over the kernels' C ABI.
// Validation rules live in serialize.h (shared with the fuzz test); this file maps TensorRT's
// types onto them, logs refusals and calls the kernels.
#include "plugin.h"

#include "moe_top2.h"

#include <cstdio>
#include <limits>
#include <mutex>
#include <new>

#if MIXTRAL_TRT_SELF_REGISTER
#include <dlfcn.h>
#endif

using namespace nvinfer1;

namespace mixtral::moe_top2
{

// serialize.h mirrors TensorRT's and the kernels' codes without including their headers.
static_assert(static_cast<int32_t>(FieldType::kINT32) == static_cast<int32_t>(PluginFieldType::kINT32), "");
static_assert(static_cast<int32_t>(FieldType::kCHAR) == static_cast<int32_t>(PluginFieldType::kCHAR), "");
static_assert(static_cast<int32_t>(FieldType::kINT64) == static_cast<int32_t>(PluginFieldType::kINT64), "");
static_assert(static_cast<int32_t>(FieldType::kFP4) == static_cast<int32_t>(PluginFieldType::kFP4), "");
static_assert(static_cast<int32_t>(DType::kFLOAT) == static_cast<int32_t>(DataType::kFLOAT), "");
static_assert(static_cast<int32_t>(DType::kHALF) == static_cast<int32_t>(DataType::kHALF), "");
static_assert(static_cast<int32_t>(DType::kINT8) == static_cast<int32_t>(DataType::kINT8), "");
static_assert(static_cast<int32_t>(DType::kBF16) == static_cast<int32_t>(DataType::kBF16), "");
static_assert(static_cast<int32_t>(DType::kE8M0) == static_cast<int32_t>(DataType::kE8M0), "");
static_assert(MOE_DTYPE_FP32 == static_cast<int32_t>(DataType::kFLOAT) && MOE_DTYPE_FP16 == static_cast<int32_t>(
    DataType::kHALF) && MOE_DTYPE_INT8 == static_cast<int32_t>(DataType::kINT8) && MOE_DTYPE_BF16 == static_cast<
    int32_t>(DataType::kBF16), "kernel dtype codes are TensorRT's");
static_assert(kMaxDims == Dims::MAX_DIMS, "");
static_assert(kMaxExperts == MOE_MAX_EXPERTS, "num_experts limit is the kernels'");
static_assert(kTopK == 2, "");

namespace
{

constexpr int32_t kOk = 0;
constexpr int32_t kFailed = 1;

std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder{nullptr};

// Logs through the logger of the engine / builder that called us (setLoggerFinder), or stderr
// when the library was not loaded by TensorRT's plugin registry.
void log(ILogger::Severity severity, char const* where, std::string const& message) noexcept
{
    try
    {
        std::string const text = std::string(kPluginName) + "::" + where + ": " + message;
        ILogger* logger = nullptr;
        {
            std::lock_guard<std::mutex> lock(gLoggerMutex);
            logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
        }
        if (logger != nullptr)
        {
            logger->log(severity, text.c_str());
        }
        else
        {
            std::fprintf(stderr, "[%s] %s\n", severity <= ILogger::Severity::kERROR ? "E" : "W", text.c_str());
        }
    }
    catch (...)
    {
        std::fprintf(stderr, "[E] %s: %s (and logging failed)\n", kPluginName, where);
    }
}

int32_t fail(char const* where, std::string const& message) noexcept
{
    log(ILogger::Severity::kERROR, where, message);
    return kFailed;
}

int32_t code(DataType t) noexcept
{
    return static_cast<int32_t>(t);
}

// Dims → Shape; a rank outside 0..MAX_DIMS becomes -1 so that checkShapes refuses it.
Shape toShape(Dims const& d) noexcept
{
    Shape s;
    s.nbDims = d.nbDims >= 0 && d.nbDims <= Dims::MAX_DIMS ? d.nbDims : -1;
    for (int32_t i = 0; i < s.nbDims; ++i)
    {
        s.d[i] = d.d[i];
    }
    return s;
}

bool toInt(int64_t v, int& out) noexcept
{
    if (v < 0 || v > std::numeric_limits<int>::max())
    {
        return false;
    }
    out = static_cast<int>(v);
    return true;
}

// The kernels run fp16 and bf16 activations (moe_top2.h: act_dtype); the op's contract also
// names fp32, which the Python plugin's build rules accept but no kernel runs.
bool kernelRunsActivation(int32_t t) noexcept
{
    return t == MOE_DTYPE_FP16 || t == MOE_DTYPE_BF16;
}

std::string kernelError()
{
    char const* e = mixtral_moe_top2_last_error();
    return e != nullptr && e[0] != '\0' ? std::string(e) : std::string("no reason given");
}

// Checks inputs (shapes with -1 for unknown dims, dtypes) and the single output.
bool validateIo(Config const& c, char const* where, Shape const* shapes, int32_t const* types, int32_t nbInputs,
    int32_t nbOutputs, MoeDims& dims) noexcept
{
    std::string error;
    if (nbOutputs != 1)
    {
        fail(where, std::to_string(nbOutputs) + " outputs; the plugin has exactly 1");
        return false;
    }
    if (!checkTypes(c, types, nbInputs + 1, nbInputs, error) || !checkShapes(c, shapes, nbInputs, dims, error))
    {
        fail(where, error);
        return false;
    }
    if (!kernelRunsActivation(types[0]))
    {
        fail(where, "hidden has DataType " + std::to_string(types[0]) + "; the CUDA kernels run HALF (1) or BF16 (7)"
                " activations only (cast the graph to fp16/bf16 in the optimize stage)");
        return false;
    }
    return true;
}

// The kernels' workspace size for the largest shapes of a profile; 0 (and a log) if refused.
size_t kernelWorkspace(Config const& c, char const* where, DynamicPluginTensorDesc const* in) noexcept
{
    int tokens = 0, hidden = 0, inter = 0, experts = 0;
    if (!toInt(in[0].max.d[0], tokens) || !toInt(in[0].max.d[1], hidden) || !toInt(in[3].max.d[2], inter)
        || !toInt(in[2].max.d[0], experts))
    {
        fail(where, "a dimension of hidden / w13 / w2 does not fit in int (the kernels' parameter type)");
        return 0;
    }
    // enqueue passes MOE_FLAG_AUTO: with fp16/bf16 weights that may take the sm_90a prefill, whose
    // regions are reserved on every GPU (the engine's workspace does not depend on the builder's GPU)
    int const flags = usesScales(c) ? 0 : MOE_FLAG_AUTO;
    size_t const bytes = mixtral_moe_top2_workspace_size_flags(
        tokens, hidden, inter, experts, c.topK, code(in[0].desc.type), flags);
    if (bytes == 0)
    {
        fail(where, "the kernels refuse T=" + std::to_string(tokens) + " H=" + std::to_string(hidden) + " I="
                + std::to_string(inter) + " E=" + std::to_string(experts) + ": " + kernelError());
    }
    return bytes;
}

} // namespace

// ---------------------------------------------------------------------------------------------
// MixtralMoETop2Plugin

MixtralMoETop2Plugin::MixtralMoETop2Plugin(Config const& config)
    : mConfig(config)
    , mDescription(describe(config))
    , mSerialized(config)
{
    linkFields();
}

MixtralMoETop2Plugin::MixtralMoETop2Plugin(MixtralMoETop2Plugin const& other)
    : nvinfer1::IPluginV3(other)
    , nvinfer1::IPluginV3OneCore(other)
    , nvinfer1::IPluginV3OneBuild(other)
    , nvinfer1::IPluginV3OneRuntime(other)
    , mConfig(other.mConfig)
    , mDescription(other.mDescription)
    , mSerialized(other.mConfig)  // fresh storage: the field pointers must point into this object
{
    linkFields();
}

void MixtralMoETop2Plugin::linkFields() noexcept
{
    FieldView const* views = mSerialized.views();
    for (int32_t i = 0; i < SerializedFields::size(); ++i)
    {
        mFields[i] = PluginField(views[i].name, views[i].data, static_cast<PluginFieldType>(views[i].type),
            views[i].length);
    }
    mFieldCollection.nbFields = SerializedFields::size();
    mFieldCollection.fields = mFields;
}

IPluginCapability* MixtralMoETop2Plugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    fail("getCapabilityInterface", "unknown capability type " + std::to_string(static_cast<int32_t>(type)));
    return nullptr;
}

IPluginV3* MixtralMoETop2Plugin::clone() noexcept
{
    try
    {
        return new MixtralMoETop2Plugin(*this);
    }
    catch (...)
    {
        fail("clone", "out of memory");
        return nullptr;
    }
}

char const* MixtralMoETop2Plugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* MixtralMoETop2Plugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* MixtralMoETop2Plugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t MixtralMoETop2Plugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t MixtralMoETop2Plugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    char const* where = "getOutputDataTypes";
    if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != 1)
    {
        return fail(where, "expected 1 output and non-null type arrays");
    }
    int32_t types[6 + 1];
    std::string error;
    if (nbInputs != expectedNbInputs(mConfig))
    {
        return fail(where, std::to_string(nbInputs) + " inputs; expected " + std::to_string(expectedNbInputs(mConfig))
                + " for quantization '" + quantizationName(mConfig.quantization) + "'");
    }
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        types[i] = code(inputTypes[i]);
    }
    if (!checkTypes(mConfig, types, nbInputs, nbInputs, error))
    {
        return fail(where, error);
    }
    if (!kernelRunsActivation(types[0]))
    {
        return fail(where, "hidden has DataType " + std::to_string(types[0]) + "; the CUDA kernels run HALF or BF16");
    }
    outputTypes[0] = inputTypes[0];
    return kOk;
}

int32_t MixtralMoETop2Plugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& /*exprBuilder*/) noexcept
{
    char const* where = "getOutputShapes";
    if (inputs == nullptr || outputs == nullptr || nbOutputs != 1 || nbInputs != expectedNbInputs(mConfig))
    {
        return fail(where, std::to_string(nbInputs) + " inputs / " + std::to_string(nbOutputs) + " outputs; expected "
                + std::to_string(expectedNbInputs(mConfig)) + " / 1");
    }
    Shape shapes[6];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        DimsExprs const& e = inputs[i];
        shapes[i].nbDims = e.nbDims >= 0 && e.nbDims <= Dims::MAX_DIMS ? e.nbDims : -1;
        for (int32_t j = 0; j < shapes[i].nbDims; ++j)
        {
            shapes[i].d[j] = e.d[j] != nullptr && e.d[j]->isConstant() ? e.d[j]->getConstantValue() : -1;
        }
    }
    MoeDims dims;
    std::string error;
    if (!checkShapes(mConfig, shapes, nbInputs, dims, error))
    {
        return fail(where, error);
    }
    outputs[0] = inputs[0];  // [T, H], hidden's expressions
    return kOk;
}

bool MixtralMoETop2Plugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || nbOutputs != 1 || nbInputs != expectedNbInputs(mConfig) || pos < 0
        || pos > nbInputs || inOut[pos].desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    int32_t types[6 + 1];
    for (int32_t i = 0; i <= pos; ++i)
    {
        types[i] = code(inOut[i].desc.type);
    }
    return supportsType(mConfig, pos, types, nbInputs) && (pos != 0 || kernelRunsActivation(types[0]));
}

int32_t MixtralMoETop2Plugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    char const* where = "configurePlugin";
    if (in == nullptr || out == nullptr || nbInputs != expectedNbInputs(mConfig) || nbOutputs != 1)
    {
        return fail(where, std::to_string(nbInputs) + " inputs / " + std::to_string(nbOutputs) + " outputs; expected "
                + std::to_string(expectedNbInputs(mConfig)) + " / 1");
    }
    Shape shapes[6];
    int32_t types[6 + 1];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        shapes[i] = toShape(in[i].desc.dims);
        types[i] = code(in[i].desc.type);
    }
    types[nbInputs] = code(out[0].desc.type);
    MoeDims dims;
    if (!validateIo(mConfig, where, shapes, types, nbInputs, nbOutputs, dims))
    {
        return kFailed;
    }
    // The kernels' own shape rules (H, I multiples of 64, ...) are checked once, here, at build time.
    return kernelWorkspace(mConfig, where, in) == 0 ? kFailed : kOk;
}

size_t MixtralMoETop2Plugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (inputs == nullptr || nbInputs != expectedNbInputs(mConfig))
    {
        fail("getWorkspaceSize", std::to_string(nbInputs) + " inputs");
        return 0;
    }
    return kernelWorkspace(mConfig, "getWorkspaceSize", inputs);
}

char const* MixtralMoETop2Plugin::getTimingCacheID() noexcept
{
    return mDescription.c_str();
}

char const* MixtralMoETop2Plugin::getMetadataString() noexcept
{
    return mDescription.c_str();
}

int32_t MixtralMoETop2Plugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    char const* where = "onShapeChange";
    if (in == nullptr || out == nullptr || nbInputs != expectedNbInputs(mConfig) || nbOutputs != 1)
    {
        return fail(where, std::to_string(nbInputs) + " inputs / " + std::to_string(nbOutputs) + " outputs; expected "
                + std::to_string(expectedNbInputs(mConfig)) + " / 1");
    }
    Shape shapes[6];
    int32_t types[6 + 1];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        shapes[i] = toShape(in[i].dims);
        types[i] = code(in[i].type);
    }
    types[nbInputs] = code(out[0].type);
    MoeDims dims;
    return validateIo(mConfig, where, shapes, types, nbInputs, nbOutputs, dims) ? kOk : kFailed;
}

int32_t MixtralMoETop2Plugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    char const* where = "enqueue";
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
    {
        return fail(where, "null tensor descriptions or addresses");
    }
    bool const int8 = usesScales(mConfig);
    Dims const& hidden = inputDesc[0].dims;
    Dims const& w13 = inputDesc[2].dims;
    Dims const& w2 = inputDesc[3].dims;
    MoeTop2Params p{};
    if (hidden.nbDims != 2 || w13.nbDims != 3 || w2.nbDims != 3 || !toInt(hidden.d[0], p.tokens)
        || !toInt(hidden.d[1], p.hidden_size) || !toInt(w2.d[2], p.inter_size) || !toInt(w13.d[0], p.num_experts))
    {
        return fail(where, "hidden must be [T, H], w13 [E, 2I, H], w2 [E, H, I] with dims that fit in int");
    }
    p.top_k = mConfig.topK;
    p.act_dtype = code(inputDesc[0].type);
    p.router_dtype = code(inputDesc[1].type);
    p.weight_dtype = code(inputDesc[2].type);
    p.scale_dtype = int8 ? code(inputDesc[4].type) : MOE_DTYPE_FP32;
    p.flags = MOE_FLAG_AUTO; // the measured-fastest paths for this GPU, within kernelWorkspace's reservation
    p.hidden = inputs[0];
    p.router = inputs[1];
    p.w13 = inputs[2];
    p.w2 = inputs[3];
    p.w13_scale = int8 ? inputs[4] : nullptr;
    p.w2_scale = int8 ? inputs[5] : nullptr;
    p.out = outputs[0];
    // The kernels validate p (shapes, dtypes, pointers) and enqueue on `stream` without any
    // host synchronisation, so decode steps can be captured in a CUDA graph.
    int const rc = mixtral_moe_top2_enqueue(&p, workspace, stream);
    if (rc != 0)
    {
        return fail(where, "kernels returned CUDA error " + std::to_string(rc) + ": " + kernelError());
    }
    return kOk;
}

IPluginV3* MixtralMoETop2Plugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();  // no per-context resources
}

PluginFieldCollection const* MixtralMoETop2Plugin::getFieldsToSerialize() noexcept
{
    return &mFieldCollection;
}

// ---------------------------------------------------------------------------------------------
// MixtralMoETop2PluginCreator

MixtralMoETop2PluginCreator::MixtralMoETop2PluginCreator() noexcept
    : mFieldNames{PluginField(kFieldNumExperts, nullptr, PluginFieldType::kINT32, 1),
        PluginField(kFieldTopK, nullptr, PluginFieldType::kINT32, 1),
        PluginField(kFieldActivation, nullptr, PluginFieldType::kCHAR, 0),
        PluginField(kFieldQuantization, nullptr, PluginFieldType::kCHAR, 0)}
{
    mFieldNameCollection.nbFields = 4;
    mFieldNameCollection.fields = mFieldNames;
}

IPluginV3* MixtralMoETop2PluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    char const* where = phase == TensorRTPhase::kRUNTIME ? "createPlugin(runtime)" : "createPlugin(build)";
    if (fc == nullptr)
    {
        fail(where, "null field collection");
        return nullptr;
    }
    // The count is checked before the array is touched: a corrupt collection may lie about it.
    if (fc->nbFields < 0 || fc->nbFields > kMaxFields || (fc->nbFields > 0 && fc->fields == nullptr))
    {
        fail(where, "field collection with " + std::to_string(fc->nbFields) + " fields (expected 1.."
                + std::to_string(kMaxFields) + ", non-null)");
        return nullptr;
    }
    FieldView views[kMaxFields];
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        views[i] = FieldView{f.name, f.data, static_cast<int32_t>(f.type), f.length};
    }
    Config config;
    std::string error;
    if (!parseConfig(views, fc->nbFields, config, error))
    {
        fail(where, error);
        return nullptr;
    }
    try
    {
        return new MixtralMoETop2Plugin(config);
    }
    catch (...)
    {
        fail(where, "out of memory");
        return nullptr;
    }
}

PluginFieldCollection const* MixtralMoETop2PluginCreator::getFieldNames() noexcept
{
    return &mFieldNameCollection;
}

char const* MixtralMoETop2PluginCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* MixtralMoETop2PluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* MixtralMoETop2PluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

} // namespace mixtral::moe_top2

// ---------------------------------------------------------------------------------------------
// Library entry points

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) noexcept
{
    static mixtral::moe_top2::MixtralMoETop2PluginCreator sCreator;
    static IPluginCreatorInterface* const sCreators[] = {&sCreator};
    nbCreators = 1;
    return sCreators;
}

extern "C" void setLoggerFinder(ILoggerFinder* finder) noexcept
{
    std::lock_guard<std::mutex> lock(mixtral::moe_top2::gLoggerMutex);
    mixtral::moe_top2::gLoggerFinder = finder;
}

#if MIXTRAL_TRT_SELF_REGISTER
// Triton's TensorRT backend (plugins=...) and trtexec --staticPlugins only dlopen a plugin
// library and never call getCreators, so this variant (libmixtral_trt_plugins_selfreg.so)
// registers its creator when it is loaded, with the registry of the libnvinfer already loaded in
// the process. It is looked up with RTLD_NOLOAD instead of linked, so the library still needs no
// libnvinfer at link time and cannot load a second copy. Do not hand this variant to
// IPluginRegistry::loadLibrary / --dynamicPlugins: the creator would be registered twice.
namespace
{
struct SelfRegistration
{
    SelfRegistration() noexcept
    {
        using mixtral::moe_top2::log;
        std::string const soname = "libnvinfer.so." + std::to_string(NV_TENSORRT_MAJOR);
        void* nvinfer = dlopen(soname.c_str(), RTLD_NOW | RTLD_NOLOAD);
        auto* getRegistry = nvinfer == nullptr
            ? nullptr
            : reinterpret_cast<IPluginRegistry* (*)()>(dlsym(nvinfer, "getPluginRegistry"));
        IPluginRegistry* registry = getRegistry == nullptr ? nullptr : getRegistry();
        int32_t n = 0;
        IPluginCreatorInterface* const* creators = getCreators(n);
        if (registry == nullptr)
        {
            log(ILogger::Severity::kERROR, "selfRegister", soname + " (with getPluginRegistry) is not loaded in this "
                "process: load TensorRT before this library, or use libmixtral_trt_plugins.so with loadLibrary");
        }
        else if (!registry->registerCreator(*creators[0], mixtral::moe_top2::kPluginNamespace))
        {
            log(ILogger::Severity::kERROR, "selfRegister", "the registry refused the creator (already registered?)");
        }
        if (nvinfer != nullptr)
        {
            dlclose(nvinfer);  // drops the reference RTLD_NOLOAD took; libnvinfer stays loaded
        }
    }
} const gSelfRegistration;
} // namespace
#endif
