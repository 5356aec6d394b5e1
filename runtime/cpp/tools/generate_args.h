// Command line of mixtral-generate, kept apart from TensorRT so it is tested where none exists.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "mixtral/engine.h"
#include "mixtral/sampling.h"

namespace mixtral::cli {

inline constexpr char kUsage[] =
    "usage: mixtral-generate --build DIR --prompt TEXT [--prompt TEXT ...] [options]\n"
    "\n"
    "Generate text with a TensorRT engine build (a directory with manifest.json of stage \"engine\",\n"
    "model.plan and tokenizer.model). Greedy unless a sampling option is given.\n"
    "\n"
    "  --build DIR               engine build directory (required)\n"
    "  --prompt TEXT             prompt text; repeat for a batch (BOS is prepended, as Mixtral expects)\n"
    "  --max-new-tokens N        tokens to generate per prompt [32]\n"
    "  --temperature T           sampling temperature (0 = greedy)\n"
    "  --top-p P                 nucleus sampling mass, in (0, 1]\n"
    "  --top-k K                 sample among the K most likely tokens (0 = all)\n"
    "  --repetition-penalty R    > 0; 1 disables it [1]\n"
    "  --seed S                  the same seed reproduces the same sample\n"
    "  --device N                CUDA device [0]\n"
    "  --plugin PATH             plugin library replacing the manifest's of that file name (repeatable)\n"
    "  --no-cuda-graphs          decode with plain enqueueV3\n"
    "  --no-verify               skip re-hashing the build's files against its manifest\n"
    "  --help                    this text\n";

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Args {
  std::filesystem::path build;
  std::vector<std::string> prompts;
  SamplingParams sampling;
  EngineOptions engine;
  bool verify = true;
  bool help = false;
};

namespace detail {

template <typename T>
T number(const std::string& flag, const std::string& text) {
  size_t used = 0;
  T value{};
  try {
    if constexpr (std::is_same_v<T, double>) {
      value = std::stod(text, &used);
    } else if constexpr (std::is_same_v<T, uint64_t>) {
      if (!text.empty() && text[0] == '-') throw std::invalid_argument(text);
      value = std::stoull(text, &used);
    } else {
      value = static_cast<T>(std::stoll(text, &used));
    }
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) throw UsageError(flag + " expects a number, got '" + text + "'");
  return value;
}

}  // namespace detail

// Throws UsageError naming the flag; validates sampling values with their allowed ranges.
inline Args parse_args(const std::vector<std::string>& argv) {
  Args a;
  bool sampled = false;
  a.sampling.greedy = true;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& flag = argv[i];
    auto value = [&]() -> const std::string& {
      if (i + 1 >= argv.size()) throw UsageError(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h") {
      a.help = true;
    } else if (flag == "--build") {
      a.build = value();
    } else if (flag == "--prompt") {
      a.prompts.push_back(value());
    } else if (flag == "--max-new-tokens") {
      a.sampling.max_new_tokens = detail::number<int64_t>(flag, value());
    } else if (flag == "--temperature") {
      a.sampling.temperature = detail::number<double>(flag, value()), sampled = true;
    } else if (flag == "--top-p") {
      a.sampling.top_p = detail::number<double>(flag, value()), sampled = true;
    } else if (flag == "--top-k") {
      a.sampling.top_k = detail::number<int64_t>(flag, value()), sampled = true;
    } else if (flag == "--repetition-penalty") {
      a.sampling.repetition_penalty = detail::number<double>(flag, value());
    } else if (flag == "--seed") {
      a.sampling.seed = detail::number<uint64_t>(flag, value());
    } else if (flag == "--device") {
      a.engine.device = static_cast<int>(detail::number<int64_t>(flag, value()));
    } else if (flag == "--plugin") {
      a.engine.plugin_libraries.emplace_back(value());
    } else if (flag == "--no-cuda-graphs") {
      a.engine.cuda_graphs = false;
    } else if (flag == "--no-verify") {
      a.verify = false;
    } else {
      throw UsageError("unknown option '" + flag + "'");
    }
  }
  if (a.help) return a;
  if (a.build.empty()) throw UsageError("--build DIR is required");
  if (a.prompts.empty()) throw UsageError("give at least one --prompt TEXT");
  a.sampling.greedy = !sampled;
  try {
    a.sampling.validate();
  } catch (const std::invalid_argument& e) {
    throw UsageError(e.what());
  }
  return a;
}

}  // namespace mixtral::cli
