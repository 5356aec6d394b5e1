// MixtralMoETop2 plugin: fields, validation and bounds-checked (de)serialization.
//
// Plain C++17, no TensorRT and no CUDA types, so that it can be compiled alone with
// -fsanitize=address,undefined and fuzzed (tests/fuzz_deserialize.cpp). plugin.cpp maps
// nvinfer1::PluginField / DataType onto the mirrors below and static_asserts that the
// numeric codes agree with the TensorRT headers it is compiled against.
//
// Contract shared with plugins/python/moe_plugin.py (same name, version, namespace, fields):
//   name "MixtralMoETop2", namespace "mixtral", version "1"
//   num_experts  INT32 [1]   E, must equal dim 0 of router / w13 / w2 (and the scales)
//   top_k        INT32 [1]   must be 2
//   activation   CHAR        "swiglu"
//   quantization CHAR        "none" | "int8"
// TensorRT V3 plugins are serialized as this field collection (getFieldsToSerialize); a
// changed set or meaning of fields needs a new plugin version (kPluginVersion).
//
// Every function here is noexcept and reports refusal through its return value and an
// error string; nothing reads past a length it was given (CHAR data need not be terminated).
// Field *names* are NUL-terminated by TensorRT's API contract (PluginField::name); they are
// only compared byte by byte against known names, and printed at most kMaxPrintedName bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <vector>

namespace mixtral::moe_top2
{

constexpr char kPluginName[] = "MixtralMoETop2";
constexpr char kPluginVersion[] = "1";
constexpr char kPluginNamespace[] = "mixtral";

constexpr char kFieldNumExperts[] = "num_experts";
constexpr char kFieldTopK[] = "top_k";
constexpr char kFieldActivation[] = "activation";
constexpr char kFieldQuantization[] = "quantization";

constexpr int32_t kTopK = 2;
constexpr int32_t kMaxExperts = 256;       // the kernels' MOE_MAX_EXPERTS (static_assert in plugin.cpp)
constexpr int32_t kMaxFields = 64;         // a collection longer than this is garbage
constexpr int32_t kMaxCharField = 64;      // longest accepted CHAR field, in bytes
constexpr size_t kMaxNameLength = 1023;    // TensorRT: names are <= 1024 bytes with the NUL
constexpr size_t kMaxPrintedName = 64;
constexpr size_t kMaxBlobBytes = 1 << 20;  // a field-record blob larger than this is refused
constexpr int32_t kMaxDims = 8;            // nvinfer1::Dims64::MAX_DIMS

// Mirrors nvinfer1::PluginFieldType (checked in plugin.cpp).
enum class FieldType : int32_t
{
    kFLOAT16 = 0, kFLOAT32 = 1, kFLOAT64 = 2, kINT8 = 3, kINT16 = 4, kINT32 = 5, kCHAR = 6,
    kDIMS = 7, kUNKNOWN = 8, kBF16 = 9, kINT64 = 10, kFP8 = 11, kINT4 = 12, kFP4 = 13,
};

// Mirrors nvinfer1::DataType (checked in plugin.cpp).
enum class DType : int32_t
{
    kFLOAT = 0, kHALF = 1, kINT8 = 2, kINT32 = 3, kBOOL = 4, kUINT8 = 5, kFP8 = 6, kBF16 = 7,
    kINT64 = 8, kINT4 = 9, kFP4 = 10, kE8M0 = 11,
};

enum class Activation : int32_t { kSwiGLU = 0 };
enum class Quantization : int32_t { kNone = 0, kInt8 = 1 };

// One field as TensorRT hands it over: name, data, type, number of elements.
struct FieldView
{
    char const* name;
    void const* data;
    int32_t type;    // a FieldType code (any int32 may arrive)
    int32_t length;  // number of elements of `type`
};

struct Config
{
    int32_t numExperts{0};
    int32_t topK{kTopK};
    Activation activation{Activation::kSwiGLU};
    Quantization quantization{Quantization::kNone};
};

inline char const* activationName(Activation a) noexcept
{
    return a == Activation::kSwiGLU ? "swiglu" : "?";
}

inline char const* quantizationName(Quantization q) noexcept
{
    return q == Quantization::kInt8 ? "int8" : q == Quantization::kNone ? "none" : "?";
}

inline bool usesScales(Config const& c) noexcept
{
    return c.quantization == Quantization::kInt8;
}

inline int32_t expectedNbInputs(Config const& c) noexcept
{
    return usesScales(c) ? 6 : 4;
}

// Bytes per element of a field type; 0 where the size is not fixed here (DIMS, INT4, FP4, bad codes).
inline size_t fieldElementSize(int32_t type) noexcept
{
    switch (static_cast<FieldType>(type))
    {
    case FieldType::kINT8: case FieldType::kCHAR: case FieldType::kUNKNOWN: case FieldType::kFP8: return 1;
    case FieldType::kFLOAT16: case FieldType::kINT16: case FieldType::kBF16: return 2;
    case FieldType::kFLOAT32: case FieldType::kINT32: return 4;
    case FieldType::kFLOAT64: case FieldType::kINT64: return 8;
    default: return 0;
    }
}

namespace detail
{

// True when the NUL-terminated `name` equals `known`; reads at most strlen(known)+1 bytes of
// `name`, and stops at the first byte that differs.
inline bool nameIs(char const* name, char const* known) noexcept
{
    size_t i = 0;
    for (; known[i] != '\0'; ++i)
    {
        if (name[i] != known[i])
        {
            return false;
        }
    }
    return name[i] == '\0';
}

// A printable copy of a field name for messages: at most kMaxPrintedName bytes, non-printing
// bytes escaped. Stops at the NUL (TensorRT's contract) or the limit, whichever comes first.
inline std::string printable(char const* name)
{
    if (name == nullptr)
    {
        return "<null>";
    }
    std::string out;
    for (size_t i = 0; i < kMaxPrintedName && name[i] != '\0'; ++i)
    {
        auto const c = static_cast<unsigned char>(name[i]);
        if (c >= 0x20 && c < 0x7f)
        {
            out += static_cast<char>(c);
        }
        else
        {
            char const* hex = "0123456789abcdef";
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        }
    }
    return out;
}

inline bool fail(std::string& error, std::string message) noexcept
{
    try
    {
        error = std::move(message);
    }
    catch (...)
    {
        // Out of memory while describing an error: the refusal itself still stands.
    }
    return false;
}

// Reads one INT32 (or INT64 that fits in int32, for parsers that forward ONNX INT attributes
// as 64-bit) scalar field.
inline bool readScalar(FieldView const& f, char const* name, int32_t& out, std::string& error)
{
    if (f.length != 1)
    {
        return fail(error, std::string("field '") + name + "' must hold exactly 1 INT32 value, got length "
                + std::to_string(f.length));
    }
    if (f.type == static_cast<int32_t>(FieldType::kINT32))
    {
        std::memcpy(&out, f.data, sizeof(int32_t));  // data may be unaligned
        return true;
    }
    if (f.type == static_cast<int32_t>(FieldType::kINT64))
    {
        int64_t v = 0;
        std::memcpy(&v, f.data, sizeof(int64_t));
        if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
        {
            return fail(error, std::string("field '") + name + "' = " + std::to_string(v) + " does not fit in INT32");
        }
        out = static_cast<int32_t>(v);
        return true;
    }
    return fail(error, std::string("field '") + name + "' must be INT32 (PluginFieldType " + std::to_string(
        static_cast<int32_t>(FieldType::kINT32)) + "), got type " + std::to_string(f.type));
}

// Reads a CHAR field of exactly `length` bytes, up to its first NUL (the Python plugin and the
// ONNX parser write "swiglu\0"; a writer without the NUL is accepted too). The text must be
// printable ASCII.
inline bool readString(FieldView const& f, char const* name, std::string& out, std::string& error)
{
    if (f.type != static_cast<int32_t>(FieldType::kCHAR))
    {
        return fail(error, std::string("field '") + name + "' must be CHAR (PluginFieldType " + std::to_string(
            static_cast<int32_t>(FieldType::kCHAR)) + "), got type " + std::to_string(f.type));
    }
    if (f.length < 1 || f.length > kMaxCharField)
    {
        return fail(error, std::string("field '") + name + "' must hold 1.." + std::to_string(kMaxCharField)
                + " bytes, got length " + std::to_string(f.length));
    }
    auto const* bytes = static_cast<unsigned char const*>(f.data);
    auto const* nul = std::memchr(bytes, 0, static_cast<size_t>(f.length));
    size_t const n = nul == nullptr ? static_cast<size_t>(f.length)
                                    : static_cast<size_t>(static_cast<unsigned char const*>(nul) - bytes);
    for (size_t i = 0; i < n; ++i)
    {
        if (bytes[i] < 0x20 || bytes[i] >= 0x7f)
        {
            return fail(error, std::string("field '") + name + "' holds a non-printing byte at offset "
                    + std::to_string(i));
        }
    }
    out.assign(reinterpret_cast<char const*>(bytes), n);
    return true;
}

inline bool applyField(int k, FieldView const& f, char const* name, Config& c, std::string& error)
{
    if (f.length > 0 && f.data == nullptr)
    {
        return fail(error, std::string("field '") + name + "' has length " + std::to_string(f.length)
                + " but null data");
    }
    if (k == 0) return readScalar(f, name, c.numExperts, error);
    if (k == 1) return readScalar(f, name, c.topK, error);
    std::string s;
    if (!readString(f, name, s, error)) return false;
    if (k == 2)
    {
        if (s != "swiglu")
        {
            return fail(error, "field 'activation' = \"" + s + "\"; expected \"swiglu\"");
        }
        c.activation = Activation::kSwiGLU;
        return true;
    }
    if (s != "none" && s != "int8")
    {
        return fail(error, "field 'quantization' = \"" + s + "\"; expected \"none\" or \"int8\"");
    }
    c.quantization = s == "int8" ? Quantization::kInt8 : Quantization::kNone;
    return true;
}

inline bool parseInto(FieldView const* fields, int32_t nbFields, Config& out, std::string& error)
{
    if (nbFields < 0 || nbFields > kMaxFields)
    {
        return fail(error, "field collection has " + std::to_string(nbFields) + " fields; expected 0.."
                + std::to_string(kMaxFields));
    }
    if (nbFields > 0 && fields == nullptr)
    {
        return fail(error, "field collection has " + std::to_string(nbFields) + " fields but a null array");
    }
    Config c;
    bool seen[4] = {false, false, false, false};
    char const* const known[4] = {kFieldNumExperts, kFieldTopK, kFieldActivation, kFieldQuantization};
    for (int32_t i = 0; i < nbFields; ++i)
    {
        FieldView const& f = fields[i];
        if (f.name == nullptr)
        {
            return fail(error, "field " + std::to_string(i) + " has a null name");
        }
        int k = 0;
        while (k < 4 && !nameIs(f.name, known[k]))
        {
            ++k;
        }
        if (k == 4)
        {
            return fail(error, "unknown field '" + printable(f.name) + "'; fields are num_experts, top_k, "
                    "activation, quantization");
        }
        if (seen[k])
        {
            return fail(error, std::string("field '") + known[k] + "' appears twice");
        }
        seen[k] = true;
        if (!applyField(k, f, known[k], c, error))
        {
            return false;
        }
    }
    if (!seen[0])
    {
        return fail(error, "field 'num_experts' is missing (the ONNX node needs that attribute)");
    }
    if (c.topK != kTopK)
    {
        return fail(error, "field 'top_k' = " + std::to_string(c.topK) + "; this plugin (version "
                + kPluginVersion + ") implements top-2 routing only");
    }
    if (c.numExperts < kTopK || c.numExperts > kMaxExperts)
    {
        return fail(error, "field 'num_experts' = " + std::to_string(c.numExperts) + "; expected "
                + std::to_string(kTopK) + ".." + std::to_string(kMaxExperts) + " (at least top_k)");
    }
    out = c;
    return true;
}

} // namespace detail

// Parses and validates a field collection (createPlugin, at build and at runtime), with the
// Python plugin's rules: num_experts is required, top_k / activation / quantization default to
// 2 / "swiglu" / "none", an unknown or repeated field name is refused.
inline bool parseConfig(FieldView const* fields, int32_t nbFields, Config& out, std::string& error) noexcept
{
    try
    {
        return detail::parseInto(fields, nbFields, out, error);
    }
    catch (...)
    {
        return detail::fail(error, "out of memory while parsing plugin fields");
    }
}

// Owned storage for the fields a plugin serializes; views() stays valid as long as this object
// lives. Strings are NUL-terminated CHAR arrays (length includes the NUL), exactly as the Python
// plugin's encode_fields and the ONNX parser write them.
class SerializedFields
{
public:
    explicit SerializedFields(Config const& c) noexcept
        : mNumExperts(c.numExperts)
        , mTopK(c.topK)
        , mActivation(activationName(c.activation))
        , mQuantization(quantizationName(c.quantization))
    {
        mViews[0] = {kFieldNumExperts, &mNumExperts, static_cast<int32_t>(FieldType::kINT32), 1};
        mViews[1] = {kFieldTopK, &mTopK, static_cast<int32_t>(FieldType::kINT32), 1};
        mViews[2] = {kFieldActivation, mActivation, static_cast<int32_t>(FieldType::kCHAR),
            static_cast<int32_t>(std::strlen(mActivation) + 1)};
        mViews[3] = {kFieldQuantization, mQuantization, static_cast<int32_t>(FieldType::kCHAR),
            static_cast<int32_t>(std::strlen(mQuantization) + 1)};
    }
    SerializedFields(SerializedFields const&) = delete;  // views point into this object
    SerializedFields& operator=(SerializedFields const&) = delete;

    FieldView const* views() const noexcept { return mViews; }
    static constexpr int32_t size() noexcept { return 4; }

private:
    int32_t mNumExperts;
    int32_t mTopK;
    char const* mActivation;    // static strings from activationName / quantizationName
    char const* mQuantization;
    FieldView mViews[4]{};
};

// A one-line description of the configuration: timing-cache ID and metadata string.
inline std::string describe(Config const& c)
{
    return std::string("num_experts=") + std::to_string(c.numExperts) + ";top_k=" + std::to_string(c.topK)
        + ";activation=" + activationName(c.activation) + ";quantization=" + quantizationName(c.quantization);
}

// ---------------------------------------------------------------------------------------------
// Bounds-checked byte reader/writer and the field-record blob.
//
// A TensorRT V3 plan stores the field collection itself, not a blob; the blob is this seam's
// flat form of a collection (what a plan holds for the plugin, record by record) for tools that
// keep plugin attributes outside TensorRT, and the input the fuzzer mutates: decodeFields turns
// any byte string into either a refusal or a collection that parseConfig then validates.
// Layout, little-endian: magic "MXM2", u32 format version (1), u32 count, then per field:
// u32 name length (1..kMaxNameLength), name bytes (no NUL), i32 type, i32 length,
// u32 byte count (= length * element size), data bytes.

constexpr uint32_t kBlobMagic = 0x324d584dU;  // "MXM2" read as little-endian u32
constexpr uint32_t kBlobFormatVersion = 1;

class ByteWriter
{
public:
    void u32(uint32_t v) { for (int i = 0; i < 4; ++i) mBytes.push_back(static_cast<uint8_t>(v >> (8 * i))); }
    void i32(int32_t v) { u32(static_cast<uint32_t>(v)); }
    void bytes(void const* p, size_t n)
    {
        auto const* b = static_cast<uint8_t const*>(p);
        mBytes.insert(mBytes.end(), b, b + n);
    }
    std::vector<uint8_t> take() { return std::move(mBytes); }

private:
    std::vector<uint8_t> mBytes;
};

class ByteReader
{
public:
    ByteReader(uint8_t const* data, size_t size) noexcept : mData(data), mSize(data == nullptr ? 0 : size) {}

    bool u32(uint32_t& v) noexcept
    {
        if (remaining() < 4) return false;
        v = 0;
        for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(mData[mPos + i]) << (8 * i);
        mPos += 4;
        return true;
    }
    bool i32(int32_t& v) noexcept
    {
        uint32_t u = 0;
        if (!u32(u)) return false;
        std::memcpy(&v, &u, sizeof v);
        return true;
    }
    // Points `p` at the next n bytes without copying; refuses if fewer than n remain.
    bool view(size_t n, uint8_t const*& p) noexcept
    {
        if (n > remaining()) return false;
        p = mData + mPos;
        mPos += n;
        return true;
    }
    size_t remaining() const noexcept { return mSize - mPos; }

private:
    uint8_t const* mData;
    size_t mSize;
    size_t mPos{0};
};

// Encodes a field collection; returns false (and says why) for fields it cannot represent.
inline bool encodeFields(FieldView const* fields, int32_t nbFields, std::vector<uint8_t>& out,
    std::string& error) noexcept
{
    try
    {
        if (nbFields < 0 || nbFields > kMaxFields || (nbFields > 0 && fields == nullptr))
        {
            return detail::fail(error, "cannot encode " + std::to_string(nbFields) + " fields");
        }
        ByteWriter w;
        w.u32(kBlobMagic);
        w.u32(kBlobFormatVersion);
        w.u32(static_cast<uint32_t>(nbFields));
        for (int32_t i = 0; i < nbFields; ++i)
        {
            FieldView const& f = fields[i];
            size_t const nameLen = f.name == nullptr ? 0 : ::strnlen(f.name, kMaxNameLength + 1);
            size_t const elem = fieldElementSize(f.type);
            if (nameLen == 0 || nameLen > kMaxNameLength || elem == 0 || f.length < 0
                || (f.length > 0 && f.data == nullptr) || static_cast<uint64_t>(f.length) * elem > kMaxBlobBytes)
            {
                return detail::fail(error, "cannot encode field " + std::to_string(i) + " ('"
                        + detail::printable(f.name) + "', type " + std::to_string(f.type) + ", length "
                        + std::to_string(f.length) + ")");
            }
            size_t const nbBytes = static_cast<size_t>(f.length) * elem;
            w.u32(static_cast<uint32_t>(nameLen));
            w.bytes(f.name, nameLen);
            w.i32(f.type);
            w.i32(f.length);
            w.u32(static_cast<uint32_t>(nbBytes));
            w.bytes(f.data, nbBytes);
        }
        out = w.take();
        if (out.size() > kMaxBlobBytes)
        {
            out.clear();
            return detail::fail(error, "encoded fields exceed " + std::to_string(kMaxBlobBytes) + " bytes");
        }
        return true;
    }
    catch (...)
    {
        return detail::fail(error, "out of memory while encoding plugin fields");
    }
}

// A decoded collection: owns names and data; views() point into it (moving keeps them valid,
// since a moved vector keeps its elements where they are; copying is not allowed).
struct DecodedFields
{
    std::vector<std::string> names;
    std::vector<std::vector<uint8_t>> data;
    std::vector<FieldView> fields;

    DecodedFields() = default;
    DecodedFields(DecodedFields const&) = delete;
    DecodedFields& operator=(DecodedFields const&) = delete;
    DecodedFields(DecodedFields&&) = default;
    DecodedFields& operator=(DecodedFields&&) = default;

    FieldView const* views() const noexcept { return fields.data(); }
    int32_t size() const noexcept { return static_cast<int32_t>(fields.size()); }
};

inline bool decodeFields(uint8_t const* blob, size_t size, DecodedFields& out, std::string& error) noexcept
{
    try
    {
        if (blob == nullptr || size > kMaxBlobBytes)
        {
            return detail::fail(error, "field blob is null or larger than " + std::to_string(kMaxBlobBytes) + " bytes");
        }
        ByteReader r(blob, size);
        uint32_t magic = 0, version = 0, count = 0;
        if (!r.u32(magic) || magic != kBlobMagic)
        {
            return detail::fail(error, "field blob: bad magic (not a MixtralMoETop2 field blob)");
        }
        if (!r.u32(version) || version != kBlobFormatVersion)
        {
            return detail::fail(error, "field blob: format version " + std::to_string(version) + ", expected "
                    + std::to_string(kBlobFormatVersion));
        }
        if (!r.u32(count) || count > static_cast<uint32_t>(kMaxFields))
        {
            return detail::fail(error, "field blob: truncated header or " + std::to_string(count) + " fields (max "
                    + std::to_string(kMaxFields) + ")");
        }
        DecodedFields d;
        d.names.reserve(count);
        d.data.reserve(count);
        for (uint32_t i = 0; i < count; ++i)
        {
            std::string const where = "field blob: record " + std::to_string(i) + ": ";
            uint32_t nameLen = 0, nbBytes = 0;
            int32_t type = 0, length = 0;
            uint8_t const* name = nullptr;
            uint8_t const* bytes = nullptr;
            if (!r.u32(nameLen) || nameLen == 0 || nameLen > kMaxNameLength || !r.view(nameLen, name))
            {
                return detail::fail(error, where + "truncated or bad name length " + std::to_string(nameLen));
            }
            if (std::memchr(name, 0, nameLen) != nullptr)
            {
                return detail::fail(error, where + "name contains a NUL byte");
            }
            if (!r.i32(type) || !r.i32(length) || !r.u32(nbBytes))
            {
                return detail::fail(error, where + "truncated type/length");
            }
            size_t const elem = fieldElementSize(type);
            if (elem == 0 || length < 0 || static_cast<uint64_t>(length) * elem != nbBytes)
            {
                return detail::fail(error, where + "type " + std::to_string(type) + " with length "
                        + std::to_string(length) + " does not match " + std::to_string(nbBytes) + " data bytes");
            }
            if (!r.view(nbBytes, bytes))
            {
                return detail::fail(error, where + "truncated data (" + std::to_string(nbBytes) + " bytes declared, "
                        + std::to_string(r.remaining()) + " left)");
            }
            d.names.emplace_back(reinterpret_cast<char const*>(name), nameLen);
            d.data.emplace_back(bytes, bytes + nbBytes);
            d.fields.push_back({nullptr, nullptr, type, length});
        }
        if (r.remaining() != 0)
        {
            return detail::fail(error, "field blob: " + std::to_string(r.remaining()) + " trailing bytes");
        }
        out = std::move(d);
        for (size_t i = 0; i < out.fields.size(); ++i)  // link only where the bytes now live
        {
            out.fields[i].name = out.names[i].c_str();
            out.fields[i].data = out.data[i].empty() ? nullptr : out.data[i].data();
        }
        return true;
    }
    catch (...)
    {
        return detail::fail(error, "out of memory while decoding plugin fields");
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs and output: dtypes and shapes (the rules of moe_plugin.py's supports_dtypes and
// check_shapes). Legend: T tokens, H hidden, I expert FFN size, E experts.
//   0 hidden [T,H] A in {fp32, fp16, bf16}     1 router [E,H] A or fp32
//   2 w13 [E,2I,H] A, int8 if quantized        3 w2 [E,H,I] A, int8 if quantized
//   4 w13_scale [E,2I] fp32/fp16 (int8 only)   5 w2_scale [E,H] fp32/fp16 (int8 only)
//   output [T,H] A

constexpr char const* kInputNames[6] = {"hidden", "router", "w13", "w2", "w13_scale", "w2_scale"};

inline bool isActivationType(int32_t t) noexcept
{
    return t == static_cast<int32_t>(DType::kFLOAT) || t == static_cast<int32_t>(DType::kHALF)
        || t == static_cast<int32_t>(DType::kBF16);
}

// May tensor `pos` (inputs 0..nbInputs-1, then the output) have dtype types[pos], given the
// dtypes of positions 0..pos-1? Only types[0..pos] are read.
inline bool supportsType(Config const& c, int32_t pos, int32_t const* types, int32_t nbInputs) noexcept
{
    if (types == nullptr || pos < 0 || nbInputs != expectedNbInputs(c) || pos > nbInputs)
    {
        return false;
    }
    int32_t const act = types[0];
    int32_t const t = types[pos];
    if (pos == 0) return isActivationType(t);
    if (pos == nbInputs) return t == act;
    if (pos == 1) return t == act || t == static_cast<int32_t>(DType::kFLOAT);
    if (pos == 2 || pos == 3) return t == (usesScales(c) ? static_cast<int32_t>(DType::kINT8) : act);
    return t == static_cast<int32_t>(DType::kFLOAT) || t == static_cast<int32_t>(DType::kHALF);  // scales
}

// Checks every input dtype (and the output's when nbTypes == nbInputs + 1).
inline bool checkTypes(Config const& c, int32_t const* types, int32_t nbTypes, int32_t nbInputs,
    std::string& error) noexcept
{
    if (nbInputs != expectedNbInputs(c) || (nbTypes != nbInputs && nbTypes != nbInputs + 1) || types == nullptr)
    {
        return detail::fail(error, std::to_string(nbInputs) + " inputs; expected " + std::to_string(expectedNbInputs(c))
                + (usesScales(c) ? " (quantization 'int8' needs w13_scale and w2_scale)"
                                 : " (hidden, router, w13, w2; scales only with quantization 'int8')"));
    }
    for (int32_t pos = 0; pos < nbTypes; ++pos)
    {
        if (!supportsType(c, pos, types, nbInputs))
        {
            std::string const what = pos < nbInputs ? std::string("input ") + kInputNames[pos] : "output";
            return detail::fail(error, what + " has DataType " + std::to_string(types[pos]) + ", not allowed with hidden "
                    + "DataType " + std::to_string(types[0]) + " and quantization '" + quantizationName(c.quantization)
                    + "' (hidden: FLOAT/HALF/BF16; router: hidden's or FLOAT; w13/w2: hidden's, or INT8 when "
                      "quantized; scales: FLOAT/HALF; output: hidden's)");
        }
    }
    return true;
}

struct Shape
{
    int32_t nbDims{0};
    int64_t d[kMaxDims]{};  // -1: not known yet (build time)
};

struct MoeDims
{
    int64_t tokens{-1};  // -1 when dynamic
    int64_t hidden{-1};
    int64_t inter{-1};
    int64_t experts{-1};
};

namespace detail
{

inline std::string shapeString(Shape const& s)
{
    std::string out = "[";
    for (int32_t i = 0; i < s.nbDims; ++i)
    {
        out += (i ? ", " : "") + (s.d[i] < 0 ? std::string("?") : std::to_string(s.d[i]));
    }
    return out + "]";
}

inline bool checkShapesImpl(Config const& c, Shape const* in, int32_t nbInputs, MoeDims& out, std::string& error)
{
    if (in == nullptr || nbInputs != expectedNbInputs(c))
    {
        return fail(error, std::to_string(nbInputs) + " inputs; expected " + std::to_string(expectedNbInputs(c)));
    }
    int32_t const ranks[6] = {2, 2, 3, 3, 2, 2};
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (in[i].nbDims != ranks[i])
        {
            return fail(error, std::string("input ") + kInputNames[i] + " has rank " + std::to_string(in[i].nbDims)
                    + "; expected " + std::to_string(ranks[i]));
        }
        for (int32_t j = 0; j < ranks[i]; ++j)
        {
            if (in[i].d[j] < -1)
            {
                return fail(error, std::string("input ") + kInputNames[i] + " has dim " + std::to_string(in[i].d[j]));
            }
        }
    }
    int64_t const T = in[0].d[0], H = in[0].d[1], E = in[2].d[0], I2 = in[2].d[1];
    if (I2 >= 0 && I2 % 2 != 0)
    {
        return fail(error, "w13 has " + std::to_string(I2) + " rows per expert; expected 2*I (w1 rows, then w3 rows)");
    }
    int64_t const I = I2 >= 0 ? I2 / 2 : -1;
    int64_t const twoI = I >= 0 ? 2 * I : -1;
    struct Want { int32_t input; int64_t d[3]; char const* legend; };
    Want const wants[5] = {
        {1, {E, H, 0}, "[E, H]"},
        {2, {c.numExperts, twoI, H}, "[E, 2I, H]"},
        {3, {E, H, I}, "[E, H, I]"},
        {4, {E, twoI, 0}, "[E, 2I]"},
        {5, {E, H, 0}, "[E, H]"},
    };
    for (Want const& w : wants)
    {
        if (w.input >= nbInputs) continue;
        Shape const& s = in[w.input];
        for (int32_t j = 0; j < s.nbDims; ++j)
        {
            if (w.d[j] >= 0 && s.d[j] >= 0 && w.d[j] != s.d[j])
            {
                Shape want{s.nbDims, {w.d[0], w.d[1], w.d[2]}};
                return fail(error, std::string("input ") + kInputNames[w.input] + " has shape " + shapeString(s)
                        + "; expected " + w.legend + " = " + shapeString(want) + " from hidden " + shapeString(in[0])
                        + ", w13 " + shapeString(in[2]) + " and num_experts=" + std::to_string(c.numExperts));
            }
        }
    }
    out = MoeDims{T, H, I, E >= 0 ? E : c.numExperts};
    return true;
}

} // namespace detail

// Validates the input shapes against each other and the fields; -1 dims are skipped.
inline bool checkShapes(Config const& c, Shape const* in, int32_t nbInputs, MoeDims& out, std::string& error) noexcept
{
    try
    {
        return detail::checkShapesImpl(c, in, nbInputs, out, error);
    }
    catch (...)
    {
        return detail::fail(error, "out of memory while checking shapes");
    }
}


} // namespace mixtral::moe_top2
