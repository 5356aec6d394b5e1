// Tokenizer glue: ids equal those of Python's sentencepiece on Mixtral's tokenizer.model for the
// cases tests/runtime/test_cpp_runtime.py writes (text, ids with BOS, decoded text).
#include "mixtral/tokenizer.h"

#include <nlohmann/json.hpp>

#include "test_util.h"

namespace mixtral {
namespace {

using nlohmann::json;

json cases() {
  std::ifstream in(test::test_data() / "tokenizer_cases.json");
  return json::parse(in);
}

TEST(Tokenizer, MissingModelSaysWhatToDo) {
  test::TempDir dir;
  EXPECT_THROW_WITH(Tokenizer::from_directory(dir.path()), TokenizerError, "has no tokenizer.model",
                    "Copy the checkpoint's tokenizer.model");
  test::write_file(dir.path() / "tokenizer.json", "{}");
  EXPECT_THROW_WITH(Tokenizer::from_directory(dir.path()), TokenizerError, "Python runtime only");
  test::write_file(dir.path() / "tokenizer.model", "not a model");
  EXPECT_THROW_WITH(Tokenizer::from_directory(dir.path()), TokenizerError, "sentencepiece cannot load");
}

TEST(TokenizerFromPython, EncodesLikePythonSentencepiece) {
  MIXTRAL_NEED_TEST_DATA();
  const json data = cases();
  const Tokenizer tok(data.at("model").get<std::string>());
  EXPECT_EQ(tok.vocab_size(), data.at("vocab_size").get<int64_t>());
  EXPECT_EQ(tok.bos_id(), 1);  // Mixtral's BOS
  EXPECT_EQ(tok.eos_id(), 2);
  ASSERT_GE(data.at("cases").size(), 3u);
  for (const json& c : data.at("cases")) {
    const std::string text = c.at("text");
    const auto ids = c.at("ids").get<std::vector<int64_t>>();  // Python: [BOS] + sp.encode(text)
    EXPECT_EQ(tok.encode(text), ids) << text;
    EXPECT_EQ(tok.encode(text, /*bos=*/false), std::vector<int64_t>(ids.begin() + 1, ids.end())) << text;
    EXPECT_EQ(tok.decode(ids), c.at("decoded").get<std::string>()) << text;
  }
}

TEST(TokenizerFromPython, StreamDecoderConcatenatesToTheWholeText) {
  MIXTRAL_NEED_TEST_DATA();
  const json data = cases();
  const Tokenizer tok(data.at("model").get<std::string>());
  for (const json& c : data.at("cases")) {
    const auto ids = c.at("ids").get<std::vector<int64_t>>();
    StreamDecoder stream(tok);
    std::string text;
    for (size_t i = 1; i < ids.size(); ++i) text += stream.push(ids[i]);
    EXPECT_EQ(text, tok.decode(std::vector<int64_t>(ids.begin() + 1, ids.end()))) << c.at("text");
  }
}

}  // namespace
}  // namespace mixtral
