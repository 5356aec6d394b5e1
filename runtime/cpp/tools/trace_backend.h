// A deterministic Backend for the executor's tests and executor_trace: a "model" that reads a real
// static cache, recording every step it is given.
//
// Each row of the cache holds max_seq_len token slots. A step writes its tokens at write_indices +
// s of rows r0 .. r0+batch-1, then the logits of row b's sequence index last[b], at position p, are
// 10 at next_token(slots 0..p of that row) and 0 elsewhere. So a wrong row, position or write
// index, or a placeholder that is read before its row overwrites it, changes the tokens; and the
// greedy continuation of a prompt is a pure function of the prompt (continuation() below).
// tests/runtime/test_cpp_executor_trace.py implements the same model in Python.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "mixtral/generator.h"

namespace mixtral::test {

// The token after a sequence: a hash of every token in order.
inline int64_t next_token(const int64_t* tokens, size_t n, int64_t vocab) {
  int64_t h = 0;
  for (size_t i = 0; i < n; ++i) h = (h * 31 + tokens[i] + 1) % 1000003;
  return h % vocab;
}

// The greedy continuation of `prompt` alone: up to `n` tokens, ending after `eos` (if >= 0).
inline std::vector<int64_t> continuation(std::vector<int64_t> seq, int64_t n, int64_t vocab, int64_t eos) {
  std::vector<int64_t> out;
  while (static_cast<int64_t>(out.size()) < n) {
    const int64_t t = next_token(seq.data(), seq.size(), vocab);
    out.push_back(t);
    seq.push_back(t);
    if (t == eos) break;
  }
  return out;
}

struct StepCall {
  int64_t r0, batch, seq;
  std::vector<int64_t> ids, positions, write_indices;
};

class TraceBackend : public Backend {
 public:
  TraceBackend(int64_t max_batch, int64_t max_seq, int64_t vocab, bool rows = true)
      : max_batch_(max_batch), max_seq_(max_seq), vocab_(vocab), rows_(rows),
        cache_(max_batch, std::vector<int64_t>(max_seq, 0)) {}
  int64_t max_batch() const override { return max_batch_; }
  int64_t max_seq_len() const override { return max_seq_; }
  int64_t vocab_size() const override { return vocab_; }
  int64_t max_step_len(int64_t batch) const override { return batch <= max_batch_ ? max_seq_ : 0; }
  bool has_row_runs() const override { return rows_; }

  std::vector<float> step(const std::vector<int64_t>& ids, const std::vector<int64_t>& pos,
                          const std::vector<int64_t>& where, int64_t batch, int64_t seq,
                          const std::vector<int64_t>& last) override {
    return run(0, ids, pos, where, batch, seq, last);
  }
  std::vector<float> step_rows(int64_t r0, const std::vector<int64_t>& ids, const std::vector<int64_t>& pos,
                               const std::vector<int64_t>& where, int64_t batch, int64_t seq,
                               const std::vector<int64_t>& last) override {
    if (!rows_) return Backend::step_rows(r0, ids, pos, where, batch, seq, last);
    return run(r0, ids, pos, where, batch, seq, last);
  }

  std::vector<StepCall> calls;
  int64_t fail_at = -1;  // the index of a call that throws (a backend error), -1: none

 private:
  std::vector<float> run(int64_t r0, const std::vector<int64_t>& ids, const std::vector<int64_t>& pos,
                         const std::vector<int64_t>& where, int64_t batch, int64_t seq,
                         const std::vector<int64_t>& last) {
    calls.push_back({r0, batch, seq, ids, pos, where});
    if (static_cast<int64_t>(calls.size()) - 1 == fail_at) throw std::runtime_error("injected backend failure");
    if (r0 < 0 || batch < 1 || r0 + batch > max_batch_) throw std::out_of_range("rows outside the cache");
    std::vector<float> logits(batch * vocab_, 0.0f);
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<int64_t>& row = cache_[r0 + b];
      for (int64_t s = 0; s < seq; ++s) {
        const int64_t id = ids.at(b * seq + s);
        if (id < 0 || id >= vocab_) throw std::out_of_range("token id outside the vocabulary");
        row.at(where.at(b) + s) = id;
      }
      const int64_t p = pos.at(b * seq + last.at(b));  // the query at p reads slots 0..p
      if (p < 0 || p >= max_seq_) throw std::out_of_range("position outside the cache");
      logits[b * vocab_ + next_token(row.data(), static_cast<size_t>(p) + 1, vocab_)] = 10.0f;
    }
    return logits;
  }

  int64_t max_batch_, max_seq_, vocab_;
  bool rows_;
  std::vector<std::vector<int64_t>> cache_;  // [B, S]
};

}  // namespace mixtral::test
