// Backend-agnostic generation over a static KV cache, as runtime/generator.py: one batched prefill,
// then one decode step per new token (B = batch, S = longest prompt, V = vocab).
//
// Rows are right-padded; token s of row b sits in cache slot (= position) s, so prefill feeds
// positions 0..S-1 and write_indices 0. Decode step t feeds each row's newest token at position and
// write index len_b + t. Rows that finished (EOS or max_new_tokens) keep stepping, their outputs
// ignored, so the batch stays rectangular.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "mixtral/sampling.h"
#include "mixtral/tokenizer.h"

namespace mixtral {

// A request the build cannot serve: names the offending value and the limit.
class GenerationError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// What the generator needs from an engine: limits and one step. ids/positions are row-major
// [batch, seq], write_indices [batch]. The step returns, for each row b, the logits [V] of the
// sequence index last[b] only: [batch, V] row-major (never the whole [batch, seq, V]).
class Backend {
 public:
  virtual ~Backend() = default;
  virtual int64_t max_batch() const = 0;
  virtual int64_t max_seq_len() const = 0;  // KV cache slots
  virtual int64_t vocab_size() const = 0;
  // The longest seq one step may feed at this batch size (the engine's optimization profiles).
  virtual int64_t max_step_len(int64_t batch) const = 0;
  virtual std::vector<float> step(const std::vector<int64_t>& input_ids, const std::vector<int64_t>& position_ids,
                                  const std::vector<int64_t>& write_indices, int64_t batch, int64_t seq,
                                  const std::vector<int64_t>& last) = 0;

  // The same step over the cache rows r0 .. r0+batch-1 only (bound at base + r0 * row_bytes with
  // shape [batch, K, L, D]); other rows are not touched. The executor gives each request its own
  // row through it. A backend without row runs (has_row_runs() false) serves rows from 0 through
  // step() and refuses any other first row; the executor then uses one slot.
  virtual bool has_row_runs() const { return false; }
  virtual std::vector<float> step_rows(int64_t r0, const std::vector<int64_t>& input_ids,
                                       const std::vector<int64_t>& position_ids,
                                       const std::vector<int64_t>& write_indices, int64_t batch, int64_t seq,
                                       const std::vector<int64_t>& last) {
    if (r0 != 0)
      throw GenerationError("this backend has no row runs: a step starts at cache row 0, not row " +
                            std::to_string(r0));
    return step(input_ids, position_ids, write_indices, batch, seq, last);
  }
};

struct Result {
  std::vector<int64_t> prompt_ids;
  std::vector<int64_t> output_ids;  // generated ids only (EOS included when it ended the sequence)
  std::string text;                 // "" without a tokenizer
  std::string finish_reason;        // "eos" | "length"; through the Executor also "stop" | "cancelled" | "error"
  double prefill_ms = 0;
  double decode_tokens_per_s = 0;
  // Set by the Executor only:
  double queue_ms = 0;            // waiting for a free slot
  double ttft_ms = 0;             // submission to first token
  std::vector<double> token_ms;   // gap before each token after the first
  std::string error;              // what ended the request when finish_reason is "error"
};

// (row, token id, text delta; "" without a tokenizer or while a character is incomplete)
using OnToken = std::function<void(size_t, int64_t, const std::string&)>;

class Generator {
 public:
  // `tokenizer` may be null (ids in, ids out); it must outlive the generator.
  Generator(Backend& backend, const Tokenizer* tokenizer, std::optional<int64_t> eos_id = 2);

  std::vector<Result> generate(const std::vector<std::string>& prompts, const SamplingParams& params,
                               const OnToken& on_token = nullptr);
  std::vector<Result> generate_ids(const std::vector<std::vector<int64_t>>& prompts, const SamplingParams& params,
                                   const OnToken& on_token = nullptr);

 private:
  void check(const std::vector<std::vector<int64_t>>& prompts, const SamplingParams& params) const;

  Backend& backend_;
  const Tokenizer* tokenizer_;
  std::optional<int64_t> eos_id_;
};

}  // namespace mixtral
