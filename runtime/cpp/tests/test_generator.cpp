// The generation loop over a toy backend whose "model" reads a real static cache: the next token
// after position p of row b is (sum of the cache slots 0..p of row b) mod V. Slots are written at
// write_indices + s, so wrong padding, positions or write indices change the tokens; the oracle
// below recomputes the sequence from the prompt alone.
#include "mixtral/generator.h"

#include <numeric>

#include "test_util.h"

namespace mixtral {
namespace {

constexpr int64_t kVocab = 50, kEos = 2;

struct Call {
  int64_t batch, seq;
  std::vector<int64_t> ids, pos, where, last;
};

class ToyBackend : public Backend {
 public:
  ToyBackend(int64_t max_batch, int64_t max_seq, int64_t max_step)
      : max_batch_(max_batch), max_seq_(max_seq), max_step_(max_step),
        cache_(max_batch, std::vector<int64_t>(max_seq, 0)) {}
  int64_t max_batch() const override { return max_batch_; }
  int64_t max_seq_len() const override { return max_seq_; }
  int64_t vocab_size() const override { return kVocab; }
  int64_t max_step_len(int64_t batch) const override { return batch <= max_batch_ ? max_step_ : 0; }

  std::vector<float> step(const std::vector<int64_t>& ids, const std::vector<int64_t>& pos,
                          const std::vector<int64_t>& where, int64_t batch, int64_t seq,
                          const std::vector<int64_t>& last) override {
    calls.push_back({batch, seq, ids, pos, where, last});
    std::vector<float> logits(batch * kVocab, 0.0f);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t s = 0; s < seq; ++s) cache_[b].at(where[b] + s) = ids[b * seq + s];
      const int64_t p = pos[b * seq + last[b]];  // attends to slots 0..p (key slot <= query position)
      const int64_t next = std::accumulate(cache_[b].begin(), cache_[b].begin() + p + 1, int64_t{0}) % kVocab;
      logits[b * kVocab + next] = 10.0f;
    }
    return logits;
  }

  std::vector<Call> calls;

 private:
  int64_t max_batch_, max_seq_, max_step_;
  std::vector<std::vector<int64_t>> cache_;  // [B, S]
};

// The toy model's greedy continuation, computed from the prompt alone.
std::vector<int64_t> oracle(std::vector<int64_t> seq, int64_t n) {
  std::vector<int64_t> out;
  while (static_cast<int64_t>(out.size()) < n) {
    const int64_t next = std::accumulate(seq.begin(), seq.end(), int64_t{0}) % kVocab;
    out.push_back(next);
    seq.push_back(next);
    if (next == kEos) break;
  }
  return out;
}

SamplingParams greedy(int64_t n) {
  SamplingParams p;
  p.greedy = true;
  p.max_new_tokens = n;
  return p;
}

TEST(Generator, RightPaddingSlotsAndPerRowEos) {
  ToyBackend backend(4, 64, 32);
  Generator gen(backend, nullptr, kEos);
  // Row 1 ([1]) continues 1, then 2 = EOS; the others run to max_new_tokens.
  const std::vector<std::vector<int64_t>> prompts = {{1, 7, 9, 4, 3}, {1}, {1, 30, 11}};
  std::vector<std::pair<size_t, int64_t>> streamed;
  const auto results = gen.generate_ids(prompts, greedy(8), [&](size_t row, int64_t t, const std::string& delta) {
    EXPECT_EQ(delta, "");  // no tokenizer
    streamed.emplace_back(row, t);
  });
  ASSERT_EQ(results.size(), 3u);
  for (size_t b = 0; b < 3; ++b) {
    EXPECT_EQ(results[b].prompt_ids, prompts[b]);
    EXPECT_EQ(results[b].output_ids, oracle(prompts[b], 8)) << "row " << b;
  }
  EXPECT_EQ(results[1].output_ids, (std::vector<int64_t>{1, kEos}));
  EXPECT_EQ(results[1].finish_reason, "eos");
  EXPECT_EQ(results[0].finish_reason, "length");
  EXPECT_EQ(results[0].output_ids.size(), 8u);
  EXPECT_EQ(streamed.size(), 8u + 2u + 8u);

  // Prefill: [3, 5] right-padded with EOS, positions 0..4, write indices 0, each row's last token.
  const Call& prefill = backend.calls.at(0);
  EXPECT_EQ(prefill.seq, 5);
  EXPECT_EQ(prefill.ids, (std::vector<int64_t>{1, 7, 9, 4, 3, 1, kEos, kEos, kEos, kEos, 1, 30, 11, kEos, kEos}));
  EXPECT_EQ(std::vector<int64_t>(prefill.pos.begin() + 5, prefill.pos.begin() + 10),
            (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(prefill.where, (std::vector<int64_t>{0, 0, 0}));
  EXPECT_EQ(prefill.last, (std::vector<int64_t>{4, 0, 2}));
  // Decode step t: position = write index = len_b + t; 7 decode steps for 8 tokens.
  ASSERT_EQ(backend.calls.size(), 8u);
  const Call& third = backend.calls.at(3);
  EXPECT_EQ(third.seq, 1);
  EXPECT_EQ(third.pos, (std::vector<int64_t>{5 + 2, 1 + 2, 3 + 2}));
  EXPECT_EQ(third.where, third.pos);
  EXPECT_EQ(third.ids[1], kEos);  // the finished row keeps feeding its last token
}

TEST(Generator, SeededSamplingIsReproducible) {
  ToyBackend a(2, 64, 32), b(2, 64, 32);
  SamplingParams p;
  p.max_new_tokens = 10;
  p.temperature = 50.0;  // flat enough to leave the toy's argmax
  p.seed = 99;
  const std::vector<std::vector<int64_t>> prompts = {{1, 5}, {1, 6, 8}};
  const auto ra = Generator(a, nullptr, std::nullopt).generate_ids(prompts, p);
  const auto rb = Generator(b, nullptr, std::nullopt).generate_ids(prompts, p);
  for (size_t r = 0; r < 2; ++r) EXPECT_EQ(ra[r].output_ids, rb[r].output_ids);
  EXPECT_NE(ra[0].output_ids, oracle(prompts[0], 10));  // sampled, not greedy
}

TEST(Generator, PromptLongerThanTheProfileNamesBothNumbers) {
  ToyBackend backend(2, 64, 16);
  Generator gen(backend, nullptr, kEos);
  EXPECT_THROW_WITH(gen.generate_ids({std::vector<int64_t>(20, 5)}, greedy(4)), GenerationError,
                    "prompt of 20 tokens is longer than the engine's prefill profile allows",
                    "at most 16 tokens at batch 1");
  EXPECT_THROW_WITH(gen.generate_ids({std::vector<int64_t>(16, 5)}, greedy(60)), GenerationError,
                    "prompt of 16 tokens + max_new_tokens=60 = 76 exceeds the build's max_seq_len=64");
  EXPECT_TRUE(backend.calls.empty());
}

TEST(Generator, RefusesRequestsTheBuildCannotServe) {
  ToyBackend backend(2, 64, 16);
  Generator gen(backend, nullptr, kEos);
  EXPECT_THROW_WITH(gen.generate_ids({{1}, {1}, {1}}, greedy(1)), GenerationError,
                    "batch of 3 prompts exceeds the build's max_batch=2");
  EXPECT_THROW_WITH(gen.generate_ids({{1, 50}}, greedy(1)), GenerationError,
                    "token id 50 outside the vocabulary [0, 50)");
  EXPECT_THROW_WITH(gen.generate_ids({{}}, greedy(1)), GenerationError, "prompt 0 is empty");
  EXPECT_THROW_WITH(gen.generate_ids({}, greedy(1)), GenerationError, "no prompts given");
  EXPECT_THROW_WITH(gen.generate_ids({{1}}, greedy(0)), GenerationError, "max_new_tokens=0");
  EXPECT_THROW_WITH(gen.generate({"hi"}, greedy(1)), GenerationError, "need a tokenizer");
}

}  // namespace
}  // namespace mixtral
