// The executor over TraceBackend (tools/trace_backend.h), whose tokens are a hash of the cache row
// it reads: a request's greedy tokens must be continuation(prompt) whatever else runs, and the
// scheduling decisions (rows, chunks, runs, placeholders) are checked against hand-worked steps.
#include "mixtral/executor.h"

#include <thread>

#include "test_util.h"
#include "trace_backend.h"

namespace mixtral {
namespace {

using test::continuation;
using test::StepCall;
using test::TraceBackend;

constexpr int64_t kVocab = 50, kEos = 2;

Request greedy(std::vector<int64_t> ids, int64_t n) {
  Request r;
  r.ids = std::move(ids);
  r.params.greedy = true;
  r.params.max_new_tokens = n;
  return r;
}

ExecutorOptions chunked(int64_t chunk, std::optional<int64_t> max_gap = std::nullopt) {
  ExecutorOptions o;
  o.prefill_chunk = chunk;
  o.max_gap = max_gap;
  o.eos_id = kEos;
  return o;
}

std::vector<int64_t> prompt(int64_t length, int64_t salt) {
  std::vector<int64_t> ids{1};
  for (int64_t s = 1; s < length; ++s) ids.push_back(3 + (s * 7 + salt * 13) % (kVocab - 3));
  return ids;
}

void expect_call(const StepCall& c, int64_t r0, int64_t n, int64_t seq, std::vector<int64_t> where) {
  EXPECT_EQ(c.r0, r0);
  EXPECT_EQ(c.batch, n);
  EXPECT_EQ(c.seq, seq);
  EXPECT_EQ(c.write_indices, where);
}

TEST(Executor, RowsChunksAndRunsFollowTheSchedule) {
  TraceBackend backend(3, 64, kVocab);
  Executor ex(backend, nullptr, chunked(4));
  auto a = ex.submit(greedy(prompt(6, 0), 20));  // 4 + 2 prompt tokens
  auto b = ex.submit(greedy(prompt(2, 1), 20));
  ex.step();  // admits a -> row 0, b -> row 1; a's first chunk fills the budget
  ASSERT_EQ(backend.calls.size(), 1u);
  expect_call(backend.calls[0], 0, 1, 4, {0});
  EXPECT_EQ(backend.calls[0].positions, (std::vector<int64_t>{0, 1, 2, 3}));
  ex.step();  // a's last 2 tokens, b's 2 (4 in all), then both decode in one run
  ASSERT_EQ(backend.calls.size(), 4u);
  expect_call(backend.calls[1], 0, 1, 2, {4});
  expect_call(backend.calls[2], 1, 1, 2, {0});
  expect_call(backend.calls[3], 0, 2, 1, {6, 2});
  EXPECT_EQ(backend.calls[3].positions, backend.calls[3].write_indices);
  auto c = ex.submit(greedy(prompt(5, 2), 20));
  ex.step();  // c -> row 2, its first chunk; rows 0..1 decode
  ASSERT_EQ(backend.calls.size(), 6u);
  expect_call(backend.calls[4], 2, 1, 4, {0});
  expect_call(backend.calls[5], 0, 2, 1, {7, 3});
  ex.step();  // c's last token; then rows 0..2 in one run
  ASSERT_EQ(backend.calls.size(), 8u);
  expect_call(backend.calls[6], 2, 1, 1, {4});
  expect_call(backend.calls[7], 0, 3, 1, {8, 4, 5});
  // The tokens fed are the ones chosen: each row's newest token.
  const std::vector<int64_t> want_a = continuation(prompt(6, 0), 3, kVocab, -1);
  EXPECT_EQ(backend.calls[7].ids[0], want_a[2]);
}

TEST(Executor, PrefillGoesInAdmissionOrderNotRowOrder) {
  TraceBackend backend(3, 64, kVocab);
  Executor ex(backend, nullptr, chunked(4));
  auto x = ex.submit(greedy({1}, 1));             // row 0, done within the first step
  auto y = ex.submit(greedy(prompt(12, 1), 4));   // row 1, three chunks
  ex.step();
  EXPECT_TRUE(x->done());
  auto z = ex.submit(greedy(prompt(3, 2), 4));    // row 0 again, admitted after y
  backend.calls.clear();
  ex.step();  // y's first chunk (y came first); z's 3 tokens no longer fit this step's budget of 4
  ASSERT_EQ(backend.calls.size(), 1u);
  expect_call(backend.calls[0], 1, 1, 4, {0});
  ex.run_until_idle();
  EXPECT_EQ(z->wait().output_ids, continuation(prompt(3, 2), 4, kVocab, kEos));
  EXPECT_EQ(y->wait().output_ids, continuation(prompt(12, 1), 4, kVocab, kEos));
}

TEST(Executor, PlaceholdersFillFreeAndPrefillingRowsInsideARun) {
  TraceBackend backend(4, 64, kVocab);
  Executor ex(backend, nullptr, chunked(4));
  auto r0 = ex.submit(greedy(prompt(2, 0), 30));
  auto r1 = ex.submit(greedy(prompt(2, 1), 30));
  auto r2 = ex.submit(greedy(prompt(2, 2), 30));
  ex.step();  // rows 0, 1 prefilled (4 tokens), row 2 waits for the next iteration's budget
  ex.step();
  r1->cancel();  // row 1 free at once
  EXPECT_EQ(ex.stats().running, 2u);
  auto r3 = ex.submit(greedy(prompt(9, 3), 30));  // takes row 1, prefills over 3 iterations
  backend.calls.clear();
  ex.step();
  // r3's first chunk on row 1; then one run over rows 0..2: row 1 gets token 0 at slot 4 (its next
  // chunk's first slot), which that chunk overwrites before row 1 reads it.
  ASSERT_EQ(backend.calls.size(), 2u);
  expect_call(backend.calls[0], 1, 1, 4, {0});
  expect_call(backend.calls[1], 0, 3, 1, {4, 4, 3});
  EXPECT_EQ(backend.calls[1].ids[1], 0);
  r3->cancel();
  backend.calls.clear();
  ex.step();  // a free row inside the run: token 0 at slot 0
  ASSERT_EQ(backend.calls.size(), 1u);
  expect_call(backend.calls[0], 0, 3, 1, {5, 0, 4});
  EXPECT_EQ(backend.calls[0].ids[1], 0);
  for (auto& h : {r0, r2}) EXPECT_FALSE(h->done());
  EXPECT_EQ(r0->wait().output_ids, continuation(prompt(2, 0), 30, kVocab, kEos));
  EXPECT_EQ(r2->wait().output_ids, continuation(prompt(2, 2), 30, kVocab, kEos));
}

TEST(Executor, MaxGapSplitsRunsAroundFreeRows) {
  EXPECT_EQ(row_runs({0, 2, 3, 7}, std::nullopt), (std::vector<std::pair<int64_t, int64_t>>{{0, 8}}));
  EXPECT_EQ(row_runs({0, 2, 3, 7}, 0), (std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {2, 2}, {7, 1}}));
  EXPECT_EQ(row_runs({7, 0, 2, 3}, 1), (std::vector<std::pair<int64_t, int64_t>>{{0, 4}, {7, 1}}));
  EXPECT_TRUE(row_runs({}, 1).empty());

  TraceBackend backend(3, 64, kVocab);
  Executor ex(backend, nullptr, chunked(8, 0));
  auto a = ex.submit(greedy(prompt(3, 0), 10));
  auto b = ex.submit(greedy(prompt(3, 1), 10));
  auto c = ex.submit(greedy(prompt(2, 2), 10));
  ex.step();  // a, b, c prefilled: 3 + 3 + 2 tokens, the whole budget of 8
  b->cancel();
  backend.calls.clear();
  ex.step();
  ASSERT_EQ(backend.calls.size(), 2u);
  expect_call(backend.calls[0], 0, 1, 1, {4});
  expect_call(backend.calls[1], 2, 1, 1, {3});
}

TEST(Executor, EveryRequestGetsItsLoneGreedyTokensWhateverArrives) {
  TraceBackend backend(4, 96, kVocab);
  Executor ex(backend, nullptr, chunked(5));
  std::vector<std::vector<int64_t>> prompts;
  std::vector<int64_t> lengths;
  std::vector<std::shared_ptr<Handle>> handles;
  std::vector<std::vector<int64_t>> streamed(12);
  for (int64_t k = 0; k < 12; ++k) {
    prompts.push_back(prompt(1 + (k * 5) % 17, k));
    lengths.push_back(3 + (k * 3) % 11);
  }
  for (int64_t it = 0, next = 0; next < 12 || ex.busy(); ++it) {
    if (next < 12 && it % 2 == 0) {  // one arrival every other iteration
      Request r = greedy(prompts[next], lengths[next]);
      r.on_token = [&streamed, next](Handle&, const Delta& d) {
        EXPECT_EQ(d.index, static_cast<int64_t>(streamed[next].size()));
        streamed[next].push_back(d.token_id);
      };
      handles.push_back(ex.submit(std::move(r)));
      ++next;
    }
    ex.step();
  }
  size_t widest = 0;
  for (const auto& c : backend.calls) widest = std::max(widest, static_cast<size_t>(c.batch));
  EXPECT_GE(widest, 3u);  // several rows ran in one step
  for (size_t k = 0; k < 12; ++k) {
    const Result r = handles[k]->wait();
    const auto want = continuation(prompts[k], lengths[k], kVocab, kEos);
    EXPECT_EQ(r.output_ids, want) << "request " << k;
    EXPECT_EQ(streamed[k], want);
    EXPECT_EQ(r.finish_reason, want.back() == kEos ? "eos" : "length");
    EXPECT_EQ(r.token_ms.size(), r.output_ids.size() - 1);
    EXPECT_GE(r.ttft_ms, r.queue_ms);
  }
  EXPECT_EQ(ex.stats().running, 0u);
  EXPECT_EQ(ex.stats().queue_depth, 0u);
}

TEST(Executor, SeededSamplingGivesWhatTheRequestGetsAlone) {
  auto sampled = [](int64_t seed) {
    Request r = greedy(prompt(7, 4), 12);
    r.params.greedy = false;
    r.params.temperature = 40.0;  // flat enough to leave the argmax
    r.params.seed = static_cast<uint64_t>(seed);
    return r;
  };
  TraceBackend lone_backend(4, 64, kVocab);
  Executor lone(lone_backend, nullptr, chunked(3));
  const auto alone = lone.submit(sampled(5))->wait().output_ids;
  EXPECT_NE(alone, continuation(prompt(7, 4), 12, kVocab, kEos));

  TraceBackend backend(4, 64, kVocab);
  Executor ex(backend, nullptr, chunked(3));
  auto g0 = ex.submit(greedy(prompt(11, 1), 9));
  ex.step();
  auto s = ex.submit(sampled(5));
  auto g1 = ex.submit(greedy(prompt(2, 2), 14));
  ex.run_until_idle();
  EXPECT_EQ(s->wait().output_ids, alone);
  EXPECT_EQ(g0->wait().output_ids, continuation(prompt(11, 1), 9, kVocab, kEos));
  EXPECT_EQ(g1->wait().output_ids, continuation(prompt(2, 2), 14, kVocab, kEos));
}

TEST(Executor, CancelFreesTheSlotAndKeepsTheTokensSoFar) {
  TraceBackend backend(1, 64, kVocab);
  Executor ex(backend, nullptr, chunked(8));
  auto a = ex.submit(greedy(prompt(3, 0), 40));
  auto queued = ex.submit(greedy(prompt(3, 1), 5));
  auto b = ex.submit(greedy(prompt(4, 2), 6));
  queued->cancel();  // leaves the queue: never admitted
  EXPECT_EQ(queued->wait().finish_reason, "cancelled");
  EXPECT_TRUE(queued->wait().output_ids.empty());
  ex.step();  // a: its prompt, its first token, one decode step
  ex.step();
  a->cancel();  // no step runs: the slot is free now
  EXPECT_EQ(ex.stats().running, 0u);
  const Result ra = a->wait();
  EXPECT_EQ(ra.finish_reason, "cancelled");
  EXPECT_EQ(ra.output_ids, continuation(prompt(3, 0), 3, kVocab, -1));
  ex.run_until_idle();
  EXPECT_EQ(b->wait().output_ids, continuation(prompt(4, 2), 6, kVocab, kEos));
  for (const auto& c : backend.calls) EXPECT_EQ(c.r0, 0);  // b took a's row

  // From its own callback at its first token (chosen in prefill): not even this step's decode runs it.
  Request r = greedy(prompt(5, 3), 30);
  std::vector<int64_t> seen;
  r.on_token = [&](Handle& h, const Delta& d) {
    seen.push_back(d.token_id);
    h.cancel();
  };
  auto c = ex.submit(std::move(r));
  ex.run_until_idle();
  EXPECT_EQ(c->wait().finish_reason, "cancelled");
  EXPECT_EQ(c->wait().output_ids, seen);
  EXPECT_EQ(seen.size(), 1u);
  EXPECT_EQ(ex.stats().running, 0u);
}

TEST(Executor, StopIdsEosAndLengthEndRequests) {
  TraceBackend backend(2, 64, kVocab);
  Executor ex(backend, nullptr, chunked(8));
  const auto want = continuation(prompt(6, 5), 10, kVocab, -1);
  Request r = greedy(prompt(6, 5), 10);
  r.stop_ids = {want[3]};
  auto stopped = ex.submit(std::move(r));
  std::string reason;
  Request one = greedy(prompt(4, 6), 1);
  one.on_done = [&](Handle&, const Result& res) { reason = res.finish_reason; };
  auto single = ex.submit(std::move(one));
  ex.run_until_idle();
  const Result rs = stopped->wait();
  const auto first_stop = std::find(want.begin(), want.end(), want[3]) - want.begin();
  EXPECT_EQ(rs.finish_reason, "stop");
  EXPECT_EQ(rs.output_ids, std::vector<int64_t>(want.begin(), want.begin() + first_stop + 1));
  EXPECT_EQ(single->wait().output_ids.size(), 1u);
  EXPECT_EQ(reason, "length");  // on_done ran before wait() returned
}

TEST(Executor, WaitingInsideACallbackEndsTheRequestInsteadOfHanging) {
  TraceBackend backend(2, 64, kVocab);
  Executor ex(backend, nullptr, chunked(8));
  Request r = greedy(prompt(3, 0), 5);
  r.on_token = [](Handle& h, const Delta&) { h.wait(); };
  auto h = ex.submit(std::move(r));
  auto other = ex.submit(greedy(prompt(4, 1), 5));
  ex.run_until_idle();
  const Result res = h->wait();
  EXPECT_EQ(res.finish_reason, "error");
  EXPECT_NE(res.error.find("the on_token callback threw: Handle::wait() called from a callback"), std::string::npos)
      << res.error;
  EXPECT_EQ(other->wait().output_ids, continuation(prompt(4, 1), 5, kVocab, kEos));
}

TEST(Executor, ABackendErrorEndsOnlyTheRequestsOfThatStep) {
  TraceBackend backend(2, 64, kVocab);
  Executor ex(backend, nullptr, chunked(4));
  auto a = ex.submit(greedy(prompt(3, 0), 5));
  auto b = ex.submit(greedy(prompt(6, 1), 5));
  backend.fail_at = 2;  // b's first chunk: a's prompt and a's first decode step come first
  ex.run_until_idle();
  const Result rb = b->wait();
  EXPECT_EQ(rb.finish_reason, "error");
  EXPECT_NE(rb.error.find("injected backend failure"), std::string::npos);
  EXPECT_EQ(a->wait().output_ids, continuation(prompt(3, 0), 5, kVocab, kEos));
  EXPECT_EQ(ex.stats().running, 0u);
}

TEST(Executor, RefusesWhatItCannotServeNamingTheLimit) {
  TraceBackend backend(2, 32, kVocab);
  ExecutorOptions small = chunked(4);
  small.max_queue = 2;
  Executor ex(backend, nullptr, small);
  EXPECT_THROW_WITH(ex.submit(greedy(prompt(20, 0), 13)), GenerationError,
                    "prompt of 20 tokens + max_new_tokens=13 = 33 exceeds the build's max_seq_len=32");
  EXPECT_THROW_WITH(ex.submit(greedy({1, 50}, 1)), GenerationError, "token id 50 outside the vocabulary [0, 50)");
  EXPECT_THROW_WITH(ex.submit(greedy({}, 1)), GenerationError, "prompt is empty");
  EXPECT_THROW_WITH(ex.submit(greedy({1}, 0)), GenerationError, "max_new_tokens=0");
  EXPECT_THROW_WITH(ex.submit(Request{{}, "text", {}, {}, {}, {}}), GenerationError, "need a tokenizer");
  ex.submit(greedy({1}, 1));
  ex.submit(greedy({1}, 1));
  EXPECT_THROW_WITH(ex.submit(greedy({1}, 1)), QueueFullError, "queue is full (2 waiting, max_queue=2)");
  EXPECT_THROW_WITH(Executor(backend, nullptr, chunked(33)), GenerationError,
                    "prefill_chunk=33 exceeds the 32 tokens one batch-1 step of the engine accepts");
  EXPECT_EQ(Executor(backend, nullptr, chunked(0)).prefill_chunk(), 32);  // min(256, longest step)
  EXPECT_TRUE(backend.calls.empty());
  ex.close();
  EXPECT_THROW_WITH(ex.submit(greedy({1}, 1)), GenerationError, "the executor is closed");
}

TEST(Executor, ABackendWithoutRowRunsGetsOneSlot) {
  TraceBackend backend(4, 64, kVocab, /*rows=*/false);
  Executor ex(backend, nullptr, chunked(8));
  EXPECT_EQ(ex.slots(), 1);
  auto a = ex.submit(greedy(prompt(3, 0), 4));
  auto b = ex.submit(greedy(prompt(5, 1), 4));
  ex.run_until_idle();
  EXPECT_EQ(a->wait().output_ids, continuation(prompt(3, 0), 4, kVocab, kEos));
  EXPECT_EQ(b->wait().output_ids, continuation(prompt(5, 1), 4, kVocab, kEos));
  for (const auto& c : backend.calls) EXPECT_EQ(c.batch, 1);
  EXPECT_THROW_WITH(backend.step_rows(1, {1}, {0}, {0}, 1, 1, {0}), GenerationError, "no row runs", "row 1");
}

TEST(Executor, ALoopThreadServesRequestsFromManyThreads) {
  TraceBackend backend(4, 96, kVocab);
  Executor ex(backend, nullptr, chunked(4));
  ex.start();
  std::vector<std::thread> clients;
  std::vector<std::vector<int64_t>> got(16), want(16);
  for (int64_t t = 0; t < 4; ++t) {
    clients.emplace_back([&, t] {
      for (int64_t k = t; k < 16; k += 4) {
        want[k] = continuation(prompt(2 + k, k), 5 + k % 4, kVocab, kEos);
        got[k] = ex.submit(greedy(prompt(2 + k, k), 5 + k % 4))->wait().output_ids;
      }
    });
  }
  for (auto& c : clients) c.join();
  ex.stop();
  for (size_t k = 0; k < 16; ++k) EXPECT_EQ(got[k], want[k]) << "request " << k;
  EXPECT_EQ(ex.stats().running, 0u);
}

}  // namespace
}  // namespace mixtral
