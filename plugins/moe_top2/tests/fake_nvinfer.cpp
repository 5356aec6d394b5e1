// A stand-in libnvinfer for plugin_smoke.cpp: soname libnvinfer.so.<major>, exports
// getPluginRegistry() whose registry only records registerCreator calls. Lets the test check
// that libmixtral_trt_plugins_selfreg.so registers itself with the process's libnvinfer.
//   g++ -std=c++17 -shared -fPIC -I <trt>/include -I <cuda>/include fake_nvinfer.cpp
//       -Wl,-soname,libnvinfer.so.<major> -o libnvinfer.so.<major>
#include <NvInferRuntime.h>

#include <cstring>
#include <string>

using namespace nvinfer1;

namespace
{
class FakeRegistry : public IPluginRegistry
{
public:
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
    bool isParentSearchEnabled() const override { return false; }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override { return nullptr; }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const ns) noexcept override
    {
        ++count;
        name = static_cast<IPluginCreatorV3One&>(creator).getPluginName();
        nameSpace = ns == nullptr ? "<null>" : ns;
        return true;
    }
    IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override
    {
        *n = 0;
        return nullptr;
    }
    IPluginCreatorInterface* getCreator(AsciiChar const* const, AsciiChar const* const,
        AsciiChar const* const) noexcept override
    {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreatorInterface const&) noexcept override { return false; }
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override { return nullptr; }
    int32_t releasePluginResource(AsciiChar const*) noexcept override { return 0; }
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override
    {
        *n = 0;
        return nullptr;
    }

    int count = 0;
    std::string name;
    std::string nameSpace;
};

FakeRegistry gRegistry;
} // namespace

extern "C" __attribute__((visibility("default"))) IPluginRegistry* getPluginRegistry() noexcept
{
    return &gRegistry;
}

// For the test: "<count> <name> <namespace>" of the registrations seen so far.
extern "C" __attribute__((visibility("default"))) char const* fakeRegistrations() noexcept
{
    static std::string s;
    s = std::to_string(gRegistry.count) + " " + gRegistry.name + " " + gRegistry.nameSpace;
    return s.c_str();
}
