#include "mixtral/executor.h"

#include <algorithm>
#include <chrono>

namespace mixtral {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// Sets `slot` to this thread for the scope: cancel() and wait() called from a callback inside
// step() must not take the step lock this thread already holds.
class SteppingScope {
 public:
  explicit SteppingScope(std::atomic<std::thread::id>& slot) : slot_(slot) { slot_ = std::this_thread::get_id(); }
  ~SteppingScope() { slot_ = std::thread::id(); }

 private:
  std::atomic<std::thread::id>& slot_;
};

}  // namespace

// One request while the executor holds it: prompt, sampler, tokens, timings, slot.
struct Executor::Active {
  Active(std::shared_ptr<Handle> h, Request&& r, std::vector<int64_t> prompt, const Tokenizer* tokenizer)
      : handle(std::move(h)), ids(std::move(prompt)), params(r.params), stop_ids(std::move(r.stop_ids)),
        on_token(std::move(r.on_token)), on_done(std::move(r.on_done)), sampler(r.params),
        stream(tokenizer ? std::make_unique<StreamDecoder>(*tokenizer) : nullptr), submitted(Clock::now()) {}

  std::shared_ptr<Handle> handle;
  std::vector<int64_t> ids;
  SamplingParams params;
  std::vector<int64_t> stop_ids;
  std::function<void(Handle&, const Delta&)> on_token;
  std::function<void(Handle&, const Result&)> on_done;
  Sampler sampler;  // its own generator: a seed reproduces the request whatever else runs
  std::unique_ptr<StreamDecoder> stream;
  std::vector<int64_t> outputs;
  std::string reason;  // "" while it runs
  int64_t row = -1;
  int64_t fed = 0;  // prompt tokens written to the cache (= the next prefill write index)
  uint64_t admission = 0;
  Clock::time_point submitted, admitted, first, last;
  bool was_admitted = false;
  std::vector<double> token_ms;

  bool decoding() const { return fed == static_cast<int64_t>(ids.size()) && reason.empty(); }
  // Slot (= position) of the newest token, which the next decode step feeds.
  int64_t position() const { return static_cast<int64_t>(ids.size() + outputs.size()) - 1; }
};

// --- Handle --------------------------------------------------------------------------------------

void Handle::cancel() {
  cancelled_ = true;
  executor_.cancel(*this);
}

bool Handle::done() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return result_.has_value();
}

Result Handle::wait() {
  executor_.not_from_a_callback("Handle::wait");
  std::unique_lock<std::mutex> lock(mutex_);
  while (!result_) {
    if (!executor_.running()) {  // no loop thread: this caller steps the executor
      lock.unlock();
      executor_.step();
      lock.lock();
      continue;
    }
    cv_.wait_for(lock, std::chrono::milliseconds(100));  // re-check: the loop may have been stopped
  }
  return *result_;
}

void Handle::finish(Result result) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    result_ = std::move(result);
  }
  cv_.notify_all();
}

// --- Executor ------------------------------------------------------------------------------------

Executor::Executor(Backend& backend, const Tokenizer* tokenizer, const ExecutorOptions& options)
    : backend_(backend), tokenizer_(tokenizer), options_(options) {
  if (tokenizer_ != nullptr) options_.eos_id = tokenizer_->eos_id();
  if (options_.max_queue < 1) throw GenerationError("max_queue=0 must be >= 1");
  if (options_.max_gap && *options_.max_gap < 0)
    throw GenerationError("max_gap=" + std::to_string(*options_.max_gap) + " must be none or >= 0");
  const int64_t longest = backend_.max_step_len(1);
  if (longest < 1) throw GenerationError("no optimization profile of the engine accepts a batch of 1 (prefill)");
  if (options_.prefill_chunk < 0)
    throw GenerationError("prefill_chunk=" + std::to_string(options_.prefill_chunk) + " must be >= 1 (0: default)");
  if (options_.prefill_chunk > longest)
    throw GenerationError("prefill_chunk=" + std::to_string(options_.prefill_chunk) + " exceeds the " +
                          std::to_string(longest) + " tokens one batch-1 step of the engine accepts; give at most " +
                          std::to_string(longest));
  chunk_ = options_.prefill_chunk ? options_.prefill_chunk : std::min<int64_t>(256, longest);
  // A backend without row runs has one usable row: row 0 through its step().
  rows_.resize(backend_.has_row_runs() ? static_cast<size_t>(backend_.max_batch()) : 1);
}

Executor::~Executor() { close(); }

std::shared_ptr<Handle> Executor::submit(Request request) {
  try {
    request.params.validate();
  } catch (const std::invalid_argument& e) {
    throw GenerationError(e.what());
  }
  std::vector<int64_t> ids = std::move(request.ids);
  if (ids.empty() && !request.text.empty()) {
    if (tokenizer_ == nullptr) throw GenerationError("text prompts need a tokenizer (tokenizer.model); pass token ids");
    ids = tokenizer_->encode(request.text);
  }
  if (ids.empty()) throw GenerationError("prompt is empty");
  for (int64_t id : ids)
    if (id < 0 || id >= backend_.vocab_size())
      throw GenerationError("prompt has token id " + std::to_string(id) + " outside the vocabulary [0, " +
                            std::to_string(backend_.vocab_size()) + ")");
  const int64_t total = static_cast<int64_t>(ids.size()) + request.params.max_new_tokens;
  if (total > backend_.max_seq_len())
    throw GenerationError("prompt of " + std::to_string(ids.size()) + " tokens + max_new_tokens=" +
                          std::to_string(request.params.max_new_tokens) + " = " + std::to_string(total) +
                          " exceeds the build's max_seq_len=" + std::to_string(backend_.max_seq_len()));
  std::lock_guard<std::mutex> lock(queue_mutex_);
  if (closed_) throw GenerationError("the executor is closed; create a new one");
  if (queue_.size() >= options_.max_queue)
    throw QueueFullError("the request queue is full (" + std::to_string(queue_.size()) + " waiting, max_queue=" +
                         std::to_string(options_.max_queue) + "); retry later or raise max_queue");
  std::shared_ptr<Handle> handle(new Handle(*this, next_id_++));
  queue_.push_back(std::make_unique<Active>(handle, std::move(request), std::move(ids), tokenizer_));
  wake_.notify_all();
  return handle;
}

bool Executor::step() {
  bool more;
  {
    std::lock_guard<std::mutex> lock(step_mutex_);
    SteppingScope scope(stepping_);
    reap();
    admit();
    prefill();
    decode();
    reap();
    more = busy();
  }
  ++iterations_;
  return more;
}

void Executor::run_until_idle() {
  while (step()) {
  }
}

bool Executor::busy() const {
  std::lock_guard<std::mutex> lock(queue_mutex_);
  return !queue_.empty() || occupied_ > 0;
}

ExecutorStats Executor::stats() const {
  std::lock_guard<std::mutex> lock(queue_mutex_);
  return {queue_.size(), occupied_, rows_.size(), iterations_, generated_};
}

void Executor::not_from_a_callback(const char* what) const {
  if (stepping_ == std::this_thread::get_id())
    throw GenerationError(std::string(what) + "() called from a callback inside step() would wait for "
                          "itself; call it outside the callbacks");
}

void Executor::start() {
  not_from_a_callback("Executor::start");
  std::lock_guard<std::mutex> control(control_mutex_);
  {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    if (closed_) throw GenerationError("the executor is closed; create a new one");
    if (running_) return;
    stopping_ = false;
  }
  running_ = true;
  thread_ = std::thread([this] { loop(); });
}

void Executor::stop() {
  not_from_a_callback("Executor::stop");
  std::lock_guard<std::mutex> control(control_mutex_);
  {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
  running_ = false;
}

void Executor::close() {
  not_from_a_callback("Executor::close");
  stop();
  std::deque<std::unique_ptr<Active>> waiting;
  {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    closed_ = true;
    waiting.swap(queue_);
  }
  for (auto& a : waiting) {
    a->handle->cancelled_ = true;
    end(*a, "cancelled");
  }
  std::lock_guard<std::mutex> lock(step_mutex_);
  for (auto& a : rows_)
    if (a) a->handle->cancelled_ = true;
  reap();
}

void Executor::loop() {
  while (true) {
    {
      std::unique_lock<std::mutex> lock(queue_mutex_);
      wake_.wait(lock, [this] { return stopping_ || !queue_.empty() || occupied_ > 0; });
      if (stopping_) return;
    }
    try {
      step();
    } catch (const std::exception& e) {  // a bug here must not leave callers waiting forever
      fail_all(std::string("executor iteration failed: ") + e.what());
    }
  }
}

// --- one iteration's parts -----------------------------------------------------------------------

void Executor::cancel(Handle& handle) {
  std::unique_ptr<Active> queued;
  {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    auto it = std::find_if(queue_.begin(), queue_.end(), [&](const auto& a) { return a->handle.get() == &handle; });
    if (it != queue_.end()) {
      queued = std::move(*it);
      queue_.erase(it);
    }
  }
  wake_.notify_all();
  if (queued) return end(*queued, "cancelled");
  if (stepping_ == std::this_thread::get_id()) return;  // from a callback: freed within this step
  if (step_mutex_.try_lock()) {  // else: freed after the running step
    reap();
    step_mutex_.unlock();
  }
}

void Executor::reap() {
  for (auto& a : rows_)
    if (a && a->handle->cancelled()) end(*a, "cancelled");
}

void Executor::end(Active& a, const std::string& reason, const std::string& error) {
  Result r;
  r.prompt_ids = a.ids;
  r.output_ids = a.outputs;
  r.finish_reason = reason;
  r.error = error;
  if (tokenizer_ != nullptr) r.text = tokenizer_->decode(a.outputs);
  const bool first = !a.outputs.empty();
  if (a.was_admitted) r.queue_ms = ms_between(a.submitted, a.admitted);
  if (first) r.ttft_ms = ms_between(a.submitted, a.first);
  if (first && a.was_admitted) r.prefill_ms = ms_between(a.admitted, a.first);
  r.token_ms = a.token_ms;
  double decode_ms = 0;
  for (double t : a.token_ms) decode_ms += t;
  r.decode_tokens_per_s = decode_ms > 0 ? static_cast<double>(a.token_ms.size()) / (decode_ms / 1e3) : 0.0;

  std::shared_ptr<Handle> handle = a.handle;
  auto on_done = std::move(a.on_done);
  if (a.row >= 0 && rows_[a.row].get() == &a) {
    rows_[a.row].reset();  // `a` is gone from here on
    --occupied_;
  }
  if (on_done) {
    try {
      on_done(*handle, r);
    } catch (...) {  // the result stands; a callback cannot take the executor down
    }
  }
  handle->finish(std::move(r));
}

void Executor::admit() {
  std::lock_guard<std::mutex> lock(queue_mutex_);
  for (size_t row = 0; row < rows_.size() && !queue_.empty(); ++row) {
    if (rows_[row]) continue;
    rows_[row] = std::move(queue_.front());
    queue_.pop_front();
    Active& a = *rows_[row];
    a.row = static_cast<int64_t>(row);
    a.admitted = Clock::now();
    a.was_admitted = true;
    a.admission = admissions_++;
    ++occupied_;
  }
}

void Executor::prefill() {
  std::vector<Active*> waiting;  // oldest admission first
  for (auto& a : rows_)
    if (a && a->fed < static_cast<int64_t>(a->ids.size())) waiting.push_back(a.get());
  std::sort(waiting.begin(), waiting.end(), [](Active* x, Active* y) { return x->admission < y->admission; });
  int64_t used = 0;
  for (Active* a : waiting) {
    const auto length = static_cast<int64_t>(a->ids.size());
    while (a->fed < length) {
      const int64_t start = a->fed, n = std::min(chunk_, length - start);
      if (used > 0 && used + n > chunk_) return;
      used += n;
      std::vector<int64_t> ids(a->ids.begin() + start, a->ids.begin() + start + n), pos(n);
      for (int64_t s = 0; s < n; ++s) pos[s] = start + s;
      std::vector<float> logits;
      try {
        logits = backend_.step_rows(a->row, ids, pos, {start}, 1, n, {n - 1});
      } catch (const std::exception& e) {  // the request ends with the backend's error
        end(*a, "error", e.what());
        break;
      }
      a->fed += n;
      if (a->fed == length) {
        choose(*a, logits.data());  // may end (and free) the request
        break;
      }
    }
  }
}

void Executor::decode() {
  std::vector<int64_t> decoding;
  for (size_t row = 0; row < rows_.size(); ++row)
    if (rows_[row] && rows_[row]->decoding()) decoding.push_back(static_cast<int64_t>(row));
  const auto V = static_cast<size_t>(backend_.vocab_size());
  for (const auto& [r0, n] : row_runs(decoding, options_.max_gap)) {
    std::vector<int64_t> ids(n, 0), where(n, 0);
    for (int64_t k = 0; k < n; ++k) {
      const Active* a = rows_[r0 + k].get();
      if (a && a->decoding()) {
        ids[k] = a->outputs.back();
        where[k] = a->position();
      } else if (a) {  // prefilling: its next chunk overwrites this slot before reading it
        where[k] = a->fed;
      }
    }
    std::vector<float> logits;
    try {
      logits = backend_.step_rows(r0, ids, where, where, n, 1, std::vector<int64_t>(n, 0));
    } catch (const std::exception& e) {  // every request of the run ends with the backend's error
      for (int64_t k = 0; k < n; ++k)
        if (rows_[r0 + k] && rows_[r0 + k]->decoding()) end(*rows_[r0 + k], "error", e.what());
      continue;
    }
    for (int64_t k = 0; k < n; ++k)
      if (rows_[r0 + k] && rows_[r0 + k]->decoding()) choose(*rows_[r0 + k], logits.data() + k * V);
  }
}

void Executor::choose(Active& a, const float* logits) {
  if (a.handle->cancelled()) return end(a, "cancelled");
  std::vector<int64_t> history = a.ids;
  history.insert(history.end(), a.outputs.begin(), a.outputs.end());
  const int64_t token = a.sampler.sample(logits, static_cast<size_t>(backend_.vocab_size()), history);
  const auto now = Clock::now();
  if (a.outputs.empty()) a.first = now;
  else a.token_ms.push_back(ms_between(a.last, now));
  a.last = now;
  a.outputs.push_back(token);
  if (options_.eos_id && token == *options_.eos_id) a.reason = "eos";
  else if (std::find(a.stop_ids.begin(), a.stop_ids.end(), token) != a.stop_ids.end()) a.reason = "stop";
  else if (static_cast<int64_t>(a.outputs.size()) == a.params.max_new_tokens) a.reason = "length";
  ++generated_;
  Delta delta{token, a.stream ? a.stream->push(token) : std::string(), static_cast<int64_t>(a.outputs.size()) - 1};
  if (a.on_token) {
    try {
      a.on_token(*a.handle, delta);
    } catch (const std::exception& e) {
      return end(a, "error", std::string("the on_token callback threw: ") + e.what());
    }
  }
  if (!a.reason.empty()) end(a, a.reason);
}

void Executor::fail_all(const std::string& error) {
  std::deque<std::unique_ptr<Active>> waiting;
  {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    waiting.swap(queue_);
  }
  for (auto& a : waiting) end(*a, "error", error);
  std::lock_guard<std::mutex> lock(step_mutex_);
  for (auto& a : rows_)
    if (a) end(*a, "error", error);
}

std::vector<std::pair<int64_t, int64_t>> row_runs(const std::vector<int64_t>& rows, std::optional<int64_t> max_gap) {
  std::vector<int64_t> sorted = rows;
  std::sort(sorted.begin(), sorted.end());
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t r : sorted) {
    if (!runs.empty() && (!max_gap || r - (runs.back().first + runs.back().second) <= *max_gap))
      runs.back().second = r - runs.back().first + 1;
    else
      runs.emplace_back(r, 1);
  }
  return runs;
}

}  // namespace mixtral
