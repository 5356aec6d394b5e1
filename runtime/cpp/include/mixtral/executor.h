// In-flight batching over a Backend's static KV cache, making the scheduling decisions of the
// Python executor (runtime/executor.py) step for step.
//
// The cache holds max_batch rows; a request owns one row (its slot) from admission to its end.
// Each step():
//
// 1. frees the slots of cancelled requests, and admits waiting requests (FIFO) into free slots,
//    lowest row first (which keeps running rows contiguous);
// 2. prefills: each admitted prompt is written in chunks of prefill_chunk tokens, each chunk a
//    batch-1 step_rows(row, ...) on that request's row alone; the chunks of one step total at most
//    prefill_chunk tokens (at least one chunk), oldest admission first;
// 3. decodes: one step_rows(r0, ...) per contiguous run of rows over every request past its prompt,
//    each row at its own position and write index. A free or half-prefilled row inside a run (rows
//    closer than max_gap) gets placeholder token 0 at its own next write index (0, or its next
//    chunk's first slot); that row's next real write overwrites it before any query reads it.
//
// A request that ends (EOS, a stop id, max_new_tokens, cancel, a backend error) frees its slot at
// once. Each request samples with its own Sampler, so a seed reproduces it whatever else runs.
//
// Threads: submit() and Handle::cancel() from any thread (also from inside a callback). Either a
// background thread runs the loop (start() / stop()), or callers drive it: step(),
// run_until_idle(), Handle::wait(). Callbacks run on the stepping thread, inside step() (on_done
// of a request cancelled while queued: on the cancelling thread); start(), stop(), close() and
// Handle::wait() refuse to run inside a callback. The Executor must outlive its handles' use.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "mixtral/generator.h"
#include "mixtral/sampling.h"
#include "mixtral/tokenizer.h"

namespace mixtral {

// The queue already holds max_queue waiting requests.
class QueueFullError : public GenerationError {
 public:
  using GenerationError::GenerationError;
};

struct Delta {
  int64_t token_id = 0;
  std::string text;  // new text this token completed ("" without a tokenizer or mid-character)
  int64_t index = 0; // 0 for the first generated token
};

class Executor;

// What submit() returns: cancel it, wait for its Result. Thread-safe.
class Handle {
 public:
  uint64_t id() const { return id_; }
  // Ends the request now: it leaves the queue, or its slot is freed (at the latest after the step
  // in progress). Its Result keeps the tokens chosen so far, finish_reason "cancelled".
  void cancel();
  bool cancelled() const { return cancelled_; }
  bool done() const;
  // The final Result; without a loop thread this caller steps the executor until it is there.
  Result wait();

 private:
  friend class Executor;
  Handle(Executor& executor, uint64_t id) : executor_(executor), id_(id) {}
  void finish(Result result);

  Executor& executor_;
  const uint64_t id_;
  std::atomic<bool> cancelled_{false};
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::optional<Result> result_;
};

struct Request {
  std::vector<int64_t> ids;  // the prompt's token ids; or
  std::string text;          // the prompt as text (needs a tokenizer), when ids is empty
  SamplingParams params;
  std::vector<int64_t> stop_ids;  // tokens that end the request ("stop"; the token is kept)
  std::function<void(Handle&, const Delta&)> on_token;  // each token as it is chosen
  std::function<void(Handle&, const Result&)> on_done;  // once, with the final Result
};

struct ExecutorOptions {
  size_t max_queue = 256;
  // Tokens per prefill chunk; 0: min(256, the backend's longest batch-1 step). A chunk of c tokens
  // costs about c tokens of compute, a decode step one read of the weights: on a GPU 256 tokens
  // cost about a few decode steps.
  int64_t prefill_chunk = 0;
  std::optional<int64_t> max_gap;  // none: one run from the first decoding row to the last
  std::optional<int64_t> eos_id = 2;  // the tokenizer's, when one is given
};

struct ExecutorStats {
  size_t queue_depth = 0, running = 0, slots = 0;
  uint64_t iterations = 0, generated_tokens = 0;
};

class Executor {
 public:
  // `tokenizer` may be null (ids in, ids out); it and `backend` must outlive the executor.
  Executor(Backend& backend, const Tokenizer* tokenizer = nullptr, const ExecutorOptions& options = {});
  ~Executor();  // close()
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Checks the request (GenerationError naming the value and the limit), queues it (QueueFullError
  // when max_queue are waiting) and returns its handle at once.
  std::shared_ptr<Handle> submit(Request request);

  bool step();  // one iteration (admit, prefill chunks, decode); true while work remains
  void run_until_idle();
  void start();  // the loop on a background thread (idempotent)
  void stop();   // after its current iteration; requests stay queued / admitted
  void close();  // stop, cancel everything left, refuse new requests

  bool busy() const;
  bool running() const { return running_; }
  ExecutorStats stats() const;
  int64_t slots() const { return static_cast<int64_t>(rows_.size()); }
  int64_t prefill_chunk() const { return chunk_; }

 private:
  friend class Handle;
  struct Active;

  void cancel(Handle& handle);
  void reap();
  void admit();
  void prefill();
  void decode();
  void choose(Active& a, const float* logits);
  void end(Active& a, const std::string& reason, const std::string& error = "");
  void fail_all(const std::string& error);
  void loop();
  void not_from_a_callback(const char* what) const;  // GenerationError when on the stepping thread

  Backend& backend_;
  const Tokenizer* tokenizer_;
  ExecutorOptions options_;
  int64_t chunk_ = 0;
  std::vector<std::unique_ptr<Active>> rows_;  // one per slot; null when free
  std::deque<std::unique_ptr<Active>> queue_;
  mutable std::mutex queue_mutex_;  // queue_, closed_, stopping_; the loop thread sleeps on wake_
  std::condition_variable wake_;
  std::mutex step_mutex_;           // the backend, rows_
  std::atomic<std::thread::id> stepping_{};  // the thread inside step(), if any
  std::atomic<size_t> occupied_{0};
  std::mutex control_mutex_;  // start / stop
  std::thread thread_;
  std::atomic<bool> running_{false};
  bool stopping_ = false, closed_ = false;
  uint64_t next_id_ = 0, admissions_ = 0;
  std::atomic<uint64_t> iterations_{0}, generated_{0};
};

// Contiguous runs (r0, n) covering the sorted `rows`; two rows with at most max_gap other rows
// between them share a run (none: one run from the first row to the last).
std::vector<std::pair<int64_t, int64_t>> row_runs(const std::vector<int64_t>& rows, std::optional<int64_t> max_gap);

}  // namespace mixtral
