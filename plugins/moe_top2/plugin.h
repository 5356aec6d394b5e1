// MixtralMoETop2 TensorRT plugin (IPluginV3), version 1, namespace "mixtral".
//
// The C++ twin of plugins/python/moe_plugin.py: same name, version, namespace and serialized
// fields (serialize.h), for trtexec --dynamicPlugins, Triton's TensorRT backend and C++
// services. enqueue runs the CUDA kernels through their C ABI (moe_top2.h). Every override is
// noexcept: a refusal is logged through the logger TensorRT hands to setLoggerFinder and
// returned as a non-zero code (or nullptr / false), never thrown.
#pragma once

#include "serialize.h"

#include <NvInferRuntime.h>

#include <string>

namespace mixtral::moe_top2
{

class MixtralMoETop2Plugin final : public nvinfer1::IPluginV3,
                                   public nvinfer1::IPluginV3OneCore,
                                   public nvinfer1::IPluginV3OneBuild,
                                   public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit MixtralMoETop2Plugin(Config const& config);
    MixtralMoETop2Plugin(MixtralMoETop2Plugin const& other);
    MixtralMoETop2Plugin& operator=(MixtralMoETop2Plugin const&) = delete;
    ~MixtralMoETop2Plugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getTimingCacheID() noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    void linkFields() noexcept;

    Config mConfig;
    std::string mDescription;          // describe(mConfig): timing-cache ID and metadata
    SerializedFields mSerialized;      // owns the bytes mFields point at
    nvinfer1::PluginField mFields[SerializedFields::size()];
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class MixtralMoETop2PluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    MixtralMoETop2PluginCreator() noexcept;

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    nvinfer1::PluginField mFieldNames[4];
    nvinfer1::PluginFieldCollection mFieldNameCollection{};
};

} // namespace mixtral::moe_top2

// Entry points of a TensorRT plugin library (IPluginRegistry::loadLibrary, trtexec
// --dynamicPlugins, Triton's plugins= backend config). Exported with default visibility; the
// library is built with -fvisibility=hidden, so these two are its whole interface.
extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nbCreators) noexcept;
extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
