// Next-token selection on the host, mirroring runtime/sampling.py: repetition penalty, then greedy
// (argmax) or temperature -> top-k -> softmax -> top-p -> one categorical draw (V = vocab).
//
// Draws come from a std::mt19937_64 seeded once per Sampler, turned into doubles in [0, 1) by our
// own bit arithmetic (the standard distributions differ between standard libraries), so a seed
// reproduces a generation exactly on any platform. The numbers are not those of the Python
// sampler (numpy's generator); the filtering rules are the same.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <random>
#include <stdexcept>
#include <vector>

namespace mixtral {

struct SamplingParams {
  int64_t max_new_tokens = 32;
  bool greedy = false;             // or temperature == 0
  double temperature = 1.0;
  int64_t top_k = 0;               // 0: no top-k filter
  double top_p = 1.0;              // 1: no nucleus filter
  double repetition_penalty = 1.0; // 1: none
  std::optional<uint64_t> seed;    // none: seeded from std::random_device

  bool is_greedy() const { return greedy || temperature == 0.0; }
  // Throws std::invalid_argument naming the field and its allowed range.
  void validate() const;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  // logits [V] of one row and that row's tokens so far -> the next token id.
  int64_t sample(const float* logits, size_t vocab, const std::vector<int64_t>& history);

  // The distribution sample() draws from (after penalty, temperature, top-k, top-p), [V]; for a
  // greedy sampler, 1 at the argmax. Deterministic; consumes no random numbers.
  std::vector<double> probabilities(const float* logits, size_t vocab, const std::vector<int64_t>& history) const;

  // A double in [0, 1) from the next 53 random bits.
  double uniform();

  const SamplingParams& params() const { return params_; }

 private:
  std::vector<double> penalized(const float* logits, size_t vocab, const std::vector<int64_t>& history) const;

  SamplingParams params_;
  std::mt19937_64 rng_;
};

// Index of the largest value (the first one on ties, as numpy's argmax).
size_t argmax(const double* values, size_t n);

}  // namespace mixtral
