// Fuzzes the MixtralMoETop2 field parser, blob decoder and I/O checks of ../serialize.h.
//
// Built with only serialize.h (no TensorRT, no CUDA), under AddressSanitizer and UBSan:
//   g++ -std=c++17 -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=all
//       -I plugins/moe_top2 plugins/moe_top2/tests/fuzz_deserialize.cpp -o /tmp/fuzz && /tmp/fuzz
// Every buffer handed to the code under test is a heap allocation of exactly the size a
// well-behaved caller would pass, so any read past a length is an ASan report (and a non-zero
// exit). Each input must be either refused with a message or accepted as a valid config that
// round-trips. Prints "fuzz_deserialize: PASS ..." on success. Args: [iterations] [seed].
#include "serialize.h"

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

using namespace mixtral::moe_top2;

namespace
{

int gFailures = 0;
long gRefused = 0;
long gAccepted = 0;

#define EXPECT(cond, ...)                                                                                              \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                                       \
            std::fprintf(stderr, __VA_ARGS__);                                                                         \
            std::fprintf(stderr, "\n");                                                                                \
            ++gFailures;                                                                                               \
        }                                                                                                              \
    } while (0)

struct Rng
{
    uint64_t s;
    uint64_t next()
    {
        uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }
    uint32_t below(uint32_t n) { return n == 0 ? 0 : static_cast<uint32_t>(next() % n); }
    int32_t anyInt() { return static_cast<int32_t>(next()); }
};

// A heap buffer of exactly n bytes (n == 0 gives a 1-byte allocation that is never valid data).
struct Buf
{
    std::unique_ptr<uint8_t[]> p;
    size_t n;
    explicit Buf(size_t size) : p(new uint8_t[size == 0 ? 1 : size]), n(size) {}
};

bool sameConfig(Config const& a, Config const& b)
{
    return a.numExperts == b.numExperts && a.topK == b.topK && a.activation == b.activation
        && a.quantization == b.quantization;
}

bool validConfig(Config const& c)
{
    return c.topK == kTopK && c.numExperts >= kTopK && c.numExperts <= kMaxExperts
        && c.activation == Activation::kSwiGLU
        && (c.quantization == Quantization::kNone || c.quantization == Quantization::kInt8);
}

// Parse; on acceptance the config must be valid and survive serialize -> parse and
// encode -> decode -> parse unchanged.
bool parseChecked(FieldView const* fields, int32_t n, Config& out)
{
    std::string error;
    Config c;
    if (!parseConfig(fields, n, c, error))
    {
        EXPECT(!error.empty(), "refusal without a message");
        ++gRefused;
        return false;
    }
    ++gAccepted;
    EXPECT(validConfig(c), "accepted an invalid config E=%d k=%d", c.numExperts, c.topK);
    SerializedFields ser(c);
    Config again;
    EXPECT(parseConfig(ser.views(), ser.size(), again, error) && sameConfig(c, again), "round trip: %s", error.c_str());
    std::vector<uint8_t> blob;
    DecodedFields decoded;
    EXPECT(encodeFields(ser.views(), ser.size(), blob, error), "encode: %s", error.c_str());
    EXPECT(decodeFields(blob.data(), blob.size(), decoded, error), "decode: %s", error.c_str());
    EXPECT(parseConfig(decoded.views(), decoded.size(), again, error) && sameConfig(c, again), "blob round trip: %s",
        error.c_str());
    out = c;
    return true;
}

// An owned field: name and data in exact-size heap buffers.
struct OwnedField
{
    std::unique_ptr<char[]> name;
    std::unique_ptr<Buf> data;
    int32_t type;
    int32_t length;
    bool honest() const  // data holds what (type, length) declare: a writer may read it all
    {
        size_t const elem = fieldElementSize(type);
        return length >= 0 && elem != 0 && (length == 0 || (data && data->n == static_cast<size_t>(length) * elem));
    }
    FieldView view() const { return {name.get(), data ? data->p.get() : nullptr, type, length}; }
};

OwnedField makeField(std::string const& name, void const* bytes, size_t nbytes, int32_t type, int32_t length)
{
    OwnedField f;
    f.name.reset(new char[name.size() + 1]);
    std::memcpy(f.name.get(), name.c_str(), name.size() + 1);
    if (bytes != nullptr)
    {
        f.data = std::make_unique<Buf>(nbytes);
        std::memcpy(f.data->p.get(), bytes, nbytes);
    }
    f.type = type;
    f.length = length;
    return f;
}

OwnedField intField(std::string const& name, int32_t v)
{
    return makeField(name, &v, 4, static_cast<int32_t>(FieldType::kINT32), 1);
}

// CHAR data of exactly s.size() bytes, no terminator unless s contains one.
OwnedField charField(std::string const& name, std::string const& s)
{
    return makeField(name, s.data(), s.size(), static_cast<int32_t>(FieldType::kCHAR), static_cast<int32_t>(s.size()));
}

bool parseOwned(std::vector<OwnedField> const& owned, Config& out)
{
    std::vector<FieldView> views;
    for (auto const& f : owned) views.push_back(f.view());
    return parseChecked(views.data(), static_cast<int32_t>(views.size()), out);
}

std::vector<OwnedField> validFields(int32_t e, std::string const& quant)
{
    std::vector<OwnedField> f;
    f.push_back(intField("num_experts", e));
    f.push_back(intField("top_k", 2));
    f.push_back(charField("activation", std::string("swiglu\0", 7)));
    f.push_back(charField("quantization", quant + std::string(1, '\0')));
    return f;
}

void testValidAndRoundTrip()
{
    for (int32_t e : {2, 8, 256})
    {
        for (char const* q : {"none", "int8"})
        {
            Config c;
            EXPECT(parseOwned(validFields(e, q), c), "valid fields refused (E=%d, %s)", e, q);
            EXPECT(c.numExperts == e && (c.quantization == Quantization::kInt8) == (std::string(q) == "int8"),
                "wrong config");
        }
    }
    // The serialized form is the Python plugin's encode_fields: INT32 x1, "swiglu\0", "int8\0".
    Config c;
    c.numExperts = 8;
    c.quantization = Quantization::kInt8;
    SerializedFields ser(c);
    FieldView const* v = ser.views();
    EXPECT(ser.size() == 4 && std::string(v[0].name) == "num_experts" && std::string(v[3].name) == "quantization",
        "field names/order");
    EXPECT(v[2].length == 7 && std::memcmp(v[2].data, "swiglu\0", 7) == 0, "activation bytes");
    EXPECT(v[3].length == 5 && std::memcmp(v[3].data, "int8\0", 5) == 0, "quantization bytes");
    EXPECT(v[0].type == 5 && v[2].type == 6, "INT32/CHAR codes");

    // Accepted variants: strings without NUL, INT64 scalars, defaults for the optional fields.
    std::vector<OwnedField> f;
    f.push_back(intField("num_experts", 8));
    f.push_back(charField("quantization", "int8"));
    int64_t const k64 = 2;
    f.push_back(makeField("top_k", &k64, 8, static_cast<int32_t>(FieldType::kINT64), 1));
    EXPECT(parseOwned(f, c) && c.quantization == Quantization::kInt8 && c.topK == 2, "variants refused");
    std::vector<OwnedField> only;
    only.push_back(intField("num_experts", 4));
    EXPECT(parseOwned(only, c) && c.quantization == Quantization::kNone && c.activation == Activation::kSwiGLU,
        "defaults");
}

void expectRefused(std::vector<OwnedField> const& f, char const* what)
{
    Config c;
    EXPECT(!parseOwned(f, c), "accepted %s", what);
}

void testRefusals()
{
    auto with = [](int index, OwnedField replacement) {
        auto f = validFields(8, "none");
        f[index] = std::move(replacement);
        return f;
    };
    int64_t const big = int64_t{1} << 40;
    float const fl = 8.0F;
    expectRefused(with(0, intField("num_experts", 0)), "num_experts 0");
    expectRefused(with(0, intField("num_experts", 1)), "num_experts 1 (< top_k)");
    expectRefused(with(0, intField("num_experts", kMaxExperts + 1)), "num_experts above the kernels' maximum");
    expectRefused(with(0, intField("num_experts", -8)), "negative num_experts");
    expectRefused(with(0, makeField("num_experts", &big, 8, static_cast<int32_t>(FieldType::kINT64), 1)), "INT64 > int32");
    expectRefused(with(0, makeField("num_experts", &fl, 4, static_cast<int32_t>(FieldType::kFLOAT32), 1)), "FLOAT32 E");
    expectRefused(with(0, makeField("num_experts", "8", 1, static_cast<int32_t>(FieldType::kCHAR), 1)), "CHAR E");
    int32_t two[2] = {8, 8};
    expectRefused(with(0, makeField("num_experts", two, 8, static_cast<int32_t>(FieldType::kINT32), 2)), "length 2");
    expectRefused(with(0, makeField("num_experts", two, 4, static_cast<int32_t>(FieldType::kINT32), 0)), "length 0");
    expectRefused(with(0, makeField("num_experts", two, 4, static_cast<int32_t>(FieldType::kINT32), -1)), "length -1");
    expectRefused(with(0, makeField("num_experts", two, 4, static_cast<int32_t>(FieldType::kINT32), 0x7fffffff)),
        "huge INT32 length");
    expectRefused(with(0, makeField("num_experts", nullptr, 0, static_cast<int32_t>(FieldType::kINT32), 1)),
        "null data");
    expectRefused(with(0, makeField("num_experts", two, 4, 999, 1)), "type code out of range");
    expectRefused(with(1, intField("top_k", 1)), "top_k 1");
    expectRefused(with(1, intField("top_k", 3)), "top_k 3");
    expectRefused(with(2, charField("activation", "gelu")), "activation gelu");
    expectRefused(with(2, charField("activation", "")), "empty activation");
    expectRefused(with(2, charField("activation", "swiglu\x01")), "control byte");
    expectRefused(with(2, charField("activation", "sw\xffiglu")), "non-ASCII byte");
    expectRefused(with(2, intField("activation", 0)), "INT32 activation");
    expectRefused(with(3, charField("quantization", "int4")), "quantization int4");
    expectRefused(with(3, charField("quantization", std::string(kMaxCharField + 1, 'n'))), "over-long CHAR");
    expectRefused(with(3, charField("quantization", std::string(kMaxCharField, 'x'))), "64 garbage bytes, no NUL");
    expectRefused(with(3, makeField("quantization", "int8", 4, static_cast<int32_t>(FieldType::kCHAR), 1 << 30)),
        "CHAR length far beyond its data (must refuse without reading)");
    expectRefused(with(3, intField("num_experts", 8)), "duplicate num_experts");
    expectRefused(with(3, intField("plugin_version", 1)), "unknown field");
    auto noE = validFields(8, "none");
    noE.erase(noE.begin());
    expectRefused(noE, "missing num_experts");
    std::vector<OwnedField> none;
    expectRefused(none, "empty collection");

    std::string error;
    Config c;
    auto f = validFields(8, "none");
    std::vector<FieldView> v;
    for (auto const& x : f) v.push_back(x.view());
    EXPECT(!parseConfig(v.data(), -1, c, error), "negative count");
    EXPECT(!parseConfig(v.data(), 0x7fffffff, c, error), "huge count (must refuse before reading)");
    EXPECT(!parseConfig(nullptr, 4, c, error), "null array");
    v[1].name = nullptr;
    EXPECT(!parseConfig(v.data(), 4, c, error), "null name");
    gRefused += 4;
}

std::string randomName(Rng& r)
{
    static char const* const names[] = {"num_experts", "top_k", "activation", "quantization", "num_expert",
        "num_experts_", "", "TOP_K", "plugin_namespace"};
    if (r.below(4) != 0) return names[r.below(9)];
    std::string s(r.below(20), ' ');
    for (auto& ch : s) ch = static_cast<char>(1 + r.below(255));  // any byte but NUL (the name's terminator)
    return s;
}

OwnedField randomField(Rng& r)
{
    int32_t type = r.below(3) == 0 ? r.anyInt() : static_cast<int32_t>(r.below(15));
    int32_t length = 0;
    switch (r.below(5))
    {
    case 0: length = r.anyInt(); break;
    case 1: length = -static_cast<int32_t>(r.below(3)); break;
    default: length = static_cast<int32_t>(r.below(80)); break;
    }
    // Data sized as a correct caller would size it; beyond 4 KiB the length is a lie the
    // parser must refuse without reading.
    size_t const elem = fieldElementSize(type);
    uint64_t want = length > 0 ? static_cast<uint64_t>(length) * (elem ? elem : 1) : 0;
    size_t const n = want <= 4096 ? static_cast<size_t>(want) : r.below(16);
    std::vector<uint8_t> bytes(n);
    static char const* const texts[] = {"swiglu", "none", "int8"};
    char const* t = texts[r.below(3)];
    for (size_t i = 0; i < n; ++i)
    {
        bytes[i] = r.below(2) ? static_cast<uint8_t>(r.next()) : static_cast<uint8_t>(i < std::strlen(t) ? t[i] : 0);
    }
    if (n >= 4 && r.below(2)) { int32_t v = static_cast<int32_t>(r.below(300)) - 20; std::memcpy(bytes.data(), &v, 4); }
    bool const nullData = r.below(20) == 0;
    return makeField(randomName(r), nullData ? nullptr : bytes.data(), n, type, length);
}

// Any collection of honest fields survives encode -> decode byte for byte (names, types, data).
void blobRoundTrip(std::vector<OwnedField> const& f)
{
    std::vector<FieldView> views;
    for (auto const& x : f)
    {
        if (!x.honest() || x.name.get()[0] == '\0') return;
        views.push_back(x.view());
    }
    std::vector<uint8_t> blob;
    DecodedFields d;
    std::string error;
    EXPECT(encodeFields(views.data(), static_cast<int32_t>(views.size()), blob, error), "encode: %s", error.c_str());
    EXPECT(decodeFields(blob.data(), blob.size(), d, error) && d.size() == static_cast<int32_t>(views.size()),
        "decode: %s", error.c_str());
    for (int32_t i = 0; i < d.size() && i < static_cast<int32_t>(views.size()); ++i)
    {
        FieldView const& a = views[i];
        FieldView const& b = d.views()[i];
        size_t const n = static_cast<size_t>(a.length) * fieldElementSize(a.type);
        EXPECT(std::strcmp(a.name, b.name) == 0 && a.type == b.type && a.length == b.length
            && (n == 0 || std::memcmp(a.data, b.data, n) == 0), "field %d differs after the blob round trip", i);
    }
}

void fuzzFieldCollections(Rng& r, long iterations)
{
    for (long it = 0; it < iterations; ++it)
    {
        std::vector<OwnedField> f;
        if (r.below(2)) f = validFields(static_cast<int32_t>(2 + r.below(8)), r.below(2) ? "int8" : "none");
        int const extra = static_cast<int>(r.below(6));
        for (int i = 0; i < extra; ++i)
        {
            OwnedField x = randomField(r);
            if (!f.empty() && r.below(2)) f[r.below(static_cast<uint32_t>(f.size()))] = std::move(x);
            else f.push_back(std::move(x));
        }
        Config c;
        parseOwned(f, c);
        blobRoundTrip(f);
    }
}

std::vector<uint8_t> validBlob(int32_t e, std::string const& q)
{
    auto f = validFields(e, q);
    std::vector<FieldView> v;
    for (auto const& x : f) v.push_back(x.view());
    std::vector<uint8_t> blob;
    std::string error;
    EXPECT(encodeFields(v.data(), static_cast<int32_t>(v.size()), blob, error), "encode: %s", error.c_str());
    return blob;
}

void decodeChecked(std::vector<uint8_t> const& bytes, bool mustRefuse, char const* what)
{
    Buf b(bytes.size());
    if (!bytes.empty()) std::memcpy(b.p.get(), bytes.data(), bytes.size());
    DecodedFields d;
    std::string error;
    bool const ok = decodeFields(b.p.get(), b.n, d, error);
    EXPECT(ok || !error.empty(), "refusal without a message");
    EXPECT(!(ok && mustRefuse), "decoded %s", what);
    if (ok)
    {
        Config c;
        parseChecked(d.views(), d.size(), c);
    }
    else
    {
        ++gRefused;
    }
}

void fuzzBlobs(Rng& r, long iterations)
{
    std::vector<uint8_t> const good = validBlob(8, "int8");
    for (size_t n = 0; n < good.size(); ++n)
    {
        decodeChecked(std::vector<uint8_t>(good.begin(), good.begin() + static_cast<long>(n)), true, "a truncated blob");
    }
    decodeChecked(good, false, "");
    std::vector<uint8_t> longer = good;
    longer.push_back(0);
    decodeChecked(longer, true, "trailing bytes");
    // Huge declared counts / lengths right after a valid header.
    for (uint32_t v : {0xffffffffU, 0x80000000U, 65U, 1025U})
    {
        for (size_t at : {size_t{8}, size_t{12}})
        {
            std::vector<uint8_t> b = good;
            std::memcpy(b.data() + at, &v, 4);
            decodeChecked(b, true, "a huge count or name length");
        }
    }
    for (long it = 0; it < iterations; ++it)
    {
        std::vector<uint8_t> b = good;
        int const flips = 1 + static_cast<int>(r.below(4));
        for (int i = 0; i < flips; ++i)
        {
            b[r.below(static_cast<uint32_t>(b.size()))] = static_cast<uint8_t>(r.next());
        }
        if (r.below(4) == 0) b.resize(r.below(static_cast<uint32_t>(b.size() + 8)));
        decodeChecked(b, false, "");
        std::vector<uint8_t> junk(r.below(200));
        for (auto& x : junk) x = static_cast<uint8_t>(r.next());
        if (junk.size() >= 8 && r.below(2))
        {
            std::memcpy(junk.data(), good.data(), 8);  // valid magic and version, garbage after
        }
        decodeChecked(junk, false, "");
    }
    DecodedFields d;
    std::string error;
    EXPECT(!decodeFields(nullptr, 100, d, error), "null blob");
    EXPECT(!decodeFields(good.data(), kMaxBlobBytes + 1, d, error), "over-long blob (must refuse before reading)");
}

Shape shape(std::initializer_list<int64_t> d)
{
    Shape s;
    s.nbDims = static_cast<int32_t>(d.size());
    int i = 0;
    for (int64_t x : d) s.d[i++] = x;
    return s;
}

void testIo(Rng& r, long iterations)
{
    Config c;
    c.numExperts = 8;
    MoeDims dims;
    std::string error;
    Shape ok4[4] = {shape({-1, 4096}), shape({8, 4096}), shape({8, 28672, 4096}), shape({8, 4096, 14336})};
    EXPECT(checkShapes(c, ok4, 4, dims, error) && dims.inter == 14336 && dims.tokens == -1, "mixtral shapes: %s",
        error.c_str());
    Shape bad[4] = {shape({3, 4096}), shape({8, 4096}), shape({8, 28671, 4096}), shape({8, 4096, 14336})};
    EXPECT(!checkShapes(c, bad, 4, dims, error), "odd 2I");
    bad[2] = shape({4, 28672, 4096});
    EXPECT(!checkShapes(c, bad, 4, dims, error), "w13 experts != num_experts");
    bad[2] = shape({8, 28672, 4096});
    bad[3] = shape({8, 4096, 1000});
    EXPECT(!checkShapes(c, bad, 4, dims, error), "w2 I mismatch");
    EXPECT(!checkShapes(c, ok4, 6, dims, error), "6 inputs without int8");
    c.quantization = Quantization::kInt8;
    EXPECT(!checkShapes(c, ok4, 4, dims, error), "int8 without scales");
    Shape ok6[6] = {ok4[0], ok4[1], ok4[2], ok4[3], shape({8, 28672}), shape({8, 4096})};
    EXPECT(checkShapes(c, ok6, 6, dims, error), "int8 shapes: %s", error.c_str());
    ok6[5] = shape({8, 4096, 1});
    EXPECT(!checkShapes(c, ok6, 6, dims, error), "scale rank");

    int32_t const half = static_cast<int32_t>(DType::kHALF), f32 = static_cast<int32_t>(DType::kFLOAT);
    int32_t const i8 = static_cast<int32_t>(DType::kINT8), bf = static_cast<int32_t>(DType::kBF16);
    int32_t t6[7] = {bf, f32, i8, i8, half, f32, bf};
    EXPECT(checkTypes(c, t6, 7, 6, error), "int8 dtypes: %s", error.c_str());
    t6[6] = half;
    EXPECT(!checkTypes(c, t6, 7, 6, error), "output dtype != hidden");
    c.quantization = Quantization::kNone;
    int32_t t4[5] = {half, half, half, half, half};
    EXPECT(checkTypes(c, t4, 5, 4, error), "fp16 dtypes: %s", error.c_str());
    t4[2] = i8;
    EXPECT(!checkTypes(c, t4, 5, 4, error), "int8 weights without quantization");

    for (long it = 0; it < iterations; ++it)  // garbage shapes and dtypes: no crash, a message on refusal
    {
        c.quantization = r.below(2) ? Quantization::kInt8 : Quantization::kNone;
        Shape s[6];
        int32_t types[7];
        int32_t const n = static_cast<int32_t>(r.below(8));
        for (auto& x : s)
        {
            x.nbDims = r.below(8) == 0 ? r.anyInt() : static_cast<int32_t>(r.below(4));
            for (auto& d : x.d) d = r.below(3) == 0 ? static_cast<int64_t>(r.next()) : static_cast<int64_t>(r.below(10)) - 1;
            if (x.nbDims < 0 || x.nbDims > kMaxDims) x.nbDims = r.below(2) ? 2 : 3;  // callers clamp to Dims
        }
        for (auto& t : types) t = r.below(4) == 0 ? r.anyInt() : static_cast<int32_t>(r.below(12));
        error.clear();
        if (!checkShapes(c, s, n > 6 ? 6 : n, dims, error)) EXPECT(!error.empty(), "shape refusal without a message");
        error.clear();
        if (!checkTypes(c, types, n > 6 ? 7 : n + 1, n > 6 ? 6 : n, error)) EXPECT(!error.empty(), "dtype message");
        for (int32_t pos = 0; pos < 7; ++pos) (void) supportsType(c, pos, types, n > 6 ? 6 : n);
    }
}

} // namespace

int main(int argc, char** argv)
{
    long const iterations = argc > 1 ? std::atol(argv[1]) : 20000;
    Rng r{argc > 2 ? std::strtoull(argv[2], nullptr, 0) : 0x5eed};
    testValidAndRoundTrip();
    testRefusals();
    fuzzFieldCollections(r, iterations);
    fuzzBlobs(r, iterations);
    testIo(r, iterations);
    if (gFailures != 0)
    {
        std::printf("fuzz_deserialize: FAIL (%d failures)\n", gFailures);
        return 1;
    }
    std::printf("fuzz_deserialize: PASS (%ld iterations, %ld inputs refused, %ld accepted and round-tripped)\n",
        iterations, gRefused, gAccepted);
    return 0;
}
