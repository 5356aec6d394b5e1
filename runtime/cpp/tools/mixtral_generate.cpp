// mixtral-generate: text generation with a TensorRT engine build, from C++.
//
//   mixtral-generate --build out/engine --prompt "The capital of France is" --max-new-tokens 16
//
// Streams the text of a single prompt to stdout as it is produced (a batch prints each result at
// the end); token counts, finish reason and timings go to stderr.
#include <iostream>

#include "generate_args.h"
#include "mixtral/engine.h"
#include "mixtral/generator.h"
#include "mixtral/manifest.h"
#include "mixtral/tokenizer.h"

namespace {

int run(const mixtral::cli::Args& args) {
  const mixtral::Manifest manifest = mixtral::read_manifest(args.build, {"engine"}, args.verify);
  const auto& cfg = manifest.config;
  const auto tokenizer = mixtral::Tokenizer::from_directory(args.build, cfg.bos_token_id, cfg.eos_token_id);
  mixtral::TensorRTBackend backend(manifest, args.engine);
  mixtral::Generator generator(backend, &tokenizer, cfg.eos_token_id);
  const bool stream = args.prompts.size() == 1;
  auto on_token = [&](size_t, int64_t, const std::string& delta) {
    if (stream && !delta.empty()) std::cout << delta << std::flush;
  };
  const auto results = generator.generate(args.prompts, args.sampling, on_token);
  for (size_t n = 0; n < results.size(); ++n) {
    const auto& r = results[n];
    if (stream) {
      std::cout << "\n";
    } else {
      std::cout << "[" << n << "] " << r.text << "\n";
    }
    std::cerr << "[" << n << "] " << r.output_ids.size() << " tokens, finish: " << r.finish_reason << ", prefill "
              << r.prefill_ms << " ms, decode " << r.decode_tokens_per_s << " tok/s"
              << (backend.decode_graphs() ? "" : " (no CUDA graphs)") << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  mixtral::cli::Args args;
  try {
    args = mixtral::cli::parse_args(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const mixtral::cli::UsageError& e) {
    std::cerr << "mixtral-generate: " << e.what() << "\n\n" << mixtral::cli::kUsage;
    return 2;
  }
  if (args.help) {
    std::cout << mixtral::cli::kUsage;
    return 0;
  }
  try {
    return run(args);
  } catch (const std::exception& e) {  // ManifestError, TokenizerError, GenerationError, TensorRTError
    std::cerr << "mixtral-generate: " << e.what() << "\n";
    return 1;
  }
}
