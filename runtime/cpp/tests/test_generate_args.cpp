// mixtral-generate's command line (the program itself needs TensorRT; its parsing does not).
#include "generate_args.h"

#include "test_util.h"

namespace mixtral::cli {
namespace {

TEST(GenerateArgs, GreedyByDefault) {
  const Args a = parse_args({"--build", "out/engine", "--prompt", "Paris is", "--max-new-tokens", "16"});
  EXPECT_EQ(a.build, "out/engine");
  EXPECT_EQ(a.prompts, std::vector<std::string>{"Paris is"});
  EXPECT_EQ(a.sampling.max_new_tokens, 16);
  EXPECT_TRUE(a.sampling.is_greedy());
  EXPECT_TRUE(a.verify);
  EXPECT_TRUE(a.engine.cuda_graphs);
}

TEST(GenerateArgs, SamplingOptionsTurnSamplingOn) {
  const Args a = parse_args({"--build", "b", "--prompt", "x", "--prompt", "y", "--top-p", "0.9", "--temperature",
                             "0.7", "--seed", "7", "--plugin", "/opt/libmoe.so", "--no-cuda-graphs", "--device",
                             "1", "--no-verify"});
  EXPECT_EQ(a.prompts.size(), 2u);
  EXPECT_FALSE(a.sampling.is_greedy());
  EXPECT_DOUBLE_EQ(a.sampling.top_p, 0.9);
  EXPECT_DOUBLE_EQ(a.sampling.temperature, 0.7);
  EXPECT_EQ(a.sampling.seed, 7u);
  EXPECT_EQ(a.engine.plugin_libraries.at(0), "/opt/libmoe.so");
  EXPECT_FALSE(a.engine.cuda_graphs);
  EXPECT_EQ(a.engine.device, 1);
  EXPECT_FALSE(a.verify);
}

TEST(GenerateArgs, UsageErrorsNameTheFlag) {
  EXPECT_TRUE(parse_args({"--help"}).help);
  EXPECT_THROW_WITH(parse_args({"--prompt", "x"}), UsageError, "--build DIR is required");
  EXPECT_THROW_WITH(parse_args({"--build", "b"}), UsageError, "--prompt");
  EXPECT_THROW_WITH(parse_args({"--build", "b", "--prompt", "x", "--top-p", "1.5"}), UsageError,
                    "top_p=1.5 must be in (0, 1]");
  EXPECT_THROW_WITH(parse_args({"--build", "b", "--prompt", "x", "--seed", "-3"}), UsageError,
                    "--seed expects a number, got '-3'");
  EXPECT_THROW_WITH(parse_args({"--build", "b", "--prompt", "x", "--max-new-tokens", "8x"}), UsageError,
                    "--max-new-tokens expects a number");
  EXPECT_THROW_WITH(parse_args({"--build"}), UsageError, "--build needs a value");
  EXPECT_THROW_WITH(parse_args({"--bild", "b"}), UsageError, "unknown option '--bild'");
}

}  // namespace
}  // namespace mixtral::cli
