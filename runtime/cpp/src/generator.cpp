#include "mixtral/generator.h"

#include <algorithm>
#include <chrono>
#include <memory>

namespace mixtral {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

Generator::Generator(Backend& backend, const Tokenizer* tokenizer, std::optional<int64_t> eos_id)
    : backend_(backend), tokenizer_(tokenizer), eos_id_(tokenizer ? tokenizer->eos_id() : eos_id) {}

std::vector<Result> Generator::generate(const std::vector<std::string>& prompts, const SamplingParams& params,
                                        const OnToken& on_token) {
  if (tokenizer_ == nullptr) throw GenerationError("text prompts need a tokenizer (tokenizer.model); pass token ids");
  std::vector<std::vector<int64_t>> ids;
  for (size_t n = 0; n < prompts.size(); ++n) {
    if (prompts[n].empty()) throw GenerationError("prompt " + std::to_string(n) + " is empty");
    ids.push_back(tokenizer_->encode(prompts[n]));
  }
  return generate_ids(ids, params, on_token);
}

void Generator::check(const std::vector<std::vector<int64_t>>& prompts, const SamplingParams& params) const {
  try {
    params.validate();
  } catch (const std::invalid_argument& e) {
    throw GenerationError(e.what());
  }
  const auto B = static_cast<int64_t>(prompts.size());
  if (B == 0) throw GenerationError("no prompts given");
  if (B > backend_.max_batch())
    throw GenerationError("batch of " + std::to_string(B) + " prompts exceeds the build's max_batch=" +
                          std::to_string(backend_.max_batch()));
  size_t longest = 0;
  for (size_t n = 0; n < prompts.size(); ++n) {
    if (prompts[n].empty()) throw GenerationError("prompt " + std::to_string(n) + " is empty");
    for (int64_t id : prompts[n])
      if (id < 0 || id >= backend_.vocab_size())
        throw GenerationError("prompt " + std::to_string(n) + " has token id " + std::to_string(id) +
                              " outside the vocabulary [0, " + std::to_string(backend_.vocab_size()) + ")");
    longest = std::max(longest, prompts[n].size());
  }
  const int64_t step_len = backend_.max_step_len(B);
  if (step_len < 1)
    throw GenerationError("no optimization profile of the engine accepts a batch of " + std::to_string(B));
  if (static_cast<int64_t>(longest) > step_len)
    throw GenerationError("prompt of " + std::to_string(longest) + " tokens is longer than the engine's prefill " +
                          "profile allows: at most " + std::to_string(step_len) + " tokens at batch " +
                          std::to_string(B) + ". Shorten the prompt or rebuild the engine with a longer profile");
  const int64_t total = static_cast<int64_t>(longest) + params.max_new_tokens;
  if (total > backend_.max_seq_len())
    throw GenerationError("prompt of " + std::to_string(longest) + " tokens + max_new_tokens=" +
                          std::to_string(params.max_new_tokens) + " = " + std::to_string(total) +
                          " exceeds the build's max_seq_len=" + std::to_string(backend_.max_seq_len()));
}

std::vector<Result> Generator::generate_ids(const std::vector<std::vector<int64_t>>& prompts,
                                            const SamplingParams& params, const OnToken& on_token) {
  check(prompts, params);
  const auto B = static_cast<int64_t>(prompts.size());
  const auto V = static_cast<size_t>(backend_.vocab_size());
  int64_t S = 0;
  std::vector<int64_t> lengths(B);
  for (int64_t b = 0; b < B; ++b) S = std::max(S, lengths[b] = static_cast<int64_t>(prompts[b].size()));

  // Prefill: right padding, positions 0..S-1, write indices 0; logits of each row's last prompt token.
  std::vector<int64_t> ids(B * S, eos_id_.value_or(0)), pos(B * S), where(B, 0), last(B);
  for (int64_t b = 0; b < B; ++b) {
    std::copy(prompts[b].begin(), prompts[b].end(), ids.begin() + b * S);
    for (int64_t s = 0; s < S; ++s) pos[b * S + s] = s;
    last[b] = lengths[b] - 1;
  }
  const auto start = Clock::now();
  std::vector<float> logits = backend_.step(ids, pos, where, B, S, last);  // [B, V]
  const double prefill_ms = seconds_since(start) * 1e3;

  Sampler sampler(params);
  std::vector<Result> results(B);
  std::vector<std::unique_ptr<StreamDecoder>> streams;
  std::vector<std::vector<int64_t>> history(prompts.begin(), prompts.end());
  std::vector<double> decode_s(B, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    results[b].prompt_ids = prompts[b];
    if (tokenizer_ != nullptr) streams.push_back(std::make_unique<StreamDecoder>(*tokenizer_));
  }
  const std::vector<int64_t> zeros(B, 0);
  for (int64_t t = 0; t < params.max_new_tokens; ++t) {
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      Result& r = results[b];
      if (!r.finish_reason.empty()) continue;
      const int64_t token = sampler.sample(logits.data() + b * V, V, history[b]);
      r.output_ids.push_back(token);
      history[b].push_back(token);
      const std::string delta = streams.empty() ? std::string() : streams[b]->push(token);
      if (eos_id_ && token == *eos_id_) r.finish_reason = "eos";
      else if (static_cast<int64_t>(r.output_ids.size()) == params.max_new_tokens) r.finish_reason = "length";
      all_done = all_done && !r.finish_reason.empty();
      if (on_token) on_token(static_cast<size_t>(b), token, delta);
    }
    if (all_done) break;
    // Decode: every row's newest token at slot len_b + t (finished rows repeat their last one).
    for (int64_t b = 0; b < B; ++b) {
      ids[b] = results[b].output_ids.back();
      pos[b] = where[b] = lengths[b] + t;
    }
    const auto step_start = Clock::now();
    logits = backend_.step({ids.begin(), ids.begin() + B}, {pos.begin(), pos.begin() + B}, where, B, 1, zeros);
    const double elapsed = seconds_since(step_start);
    for (int64_t b = 0; b < B; ++b)
      if (results[b].finish_reason.empty()) decode_s[b] += elapsed;
  }
  for (int64_t b = 0; b < B; ++b) {
    Result& r = results[b];
    if (r.finish_reason.empty()) r.finish_reason = "length";
    if (tokenizer_ != nullptr) r.text = tokenizer_->decode(r.output_ids);
    r.prefill_ms = prefill_ms;
    const auto steps = static_cast<double>(r.output_ids.size()) - 1;
    r.decode_tokens_per_s = steps > 0 && decode_s[b] > 0 ? steps / decode_s[b] : 0.0;
  }
  return results;
}

}  // namespace mixtral
