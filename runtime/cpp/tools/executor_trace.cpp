// executor_trace TRACE.json: runs the Executor over TraceBackend (trace_backend.h) on an arrival
// trace and prints its decisions as JSON lines, for comparison with the Python executor's.
//
// TRACE.json: {"slots", "max_seq_len", "vocab_size", "eos_id" (or null), "prefill_chunk",
// "max_gap" (or null), "max_queue", "requests": [{"arrival": iteration, "ids": [...],
// "max_new_tokens", "cancel": iteration or null, optional "temperature" and "seed"}]}.
//
// Iteration i: submit the requests arriving at i (in file order), cancel those whose cancel is i,
// then one step(); until the last event has passed and the executor is idle. Output, in order:
//   {"event": "step", "iteration", "r0", "n", "seq", "ids", "positions", "write_indices"}
//   {"event": "rejected", "iteration", "request"}        (the queue was full)
//   {"event": "result", "request", "output_ids", "finish_reason"}   (per submitted request, at the end)
#include <algorithm>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "mixtral/executor.h"
#include "trace_backend.h"

namespace {

using nlohmann::json;

std::optional<int64_t> optional_int(const json& doc, const char* key) {
  if (!doc.contains(key) || doc.at(key).is_null()) return std::nullopt;
  return doc.at(key).get<int64_t>();
}

int run(const json& trace) {
  mixtral::test::TraceBackend backend(trace.at("slots").get<int64_t>(), trace.at("max_seq_len").get<int64_t>(),
                                      trace.at("vocab_size").get<int64_t>());
  mixtral::ExecutorOptions options;
  options.eos_id = optional_int(trace, "eos_id");
  options.prefill_chunk = trace.at("prefill_chunk").get<int64_t>();
  options.max_gap = optional_int(trace, "max_gap");
  options.max_queue = trace.at("max_queue").get<size_t>();
  mixtral::Executor executor(backend, nullptr, options);

  const json& requests = trace.at("requests");
  std::vector<std::shared_ptr<mixtral::Handle>> handles(requests.size());
  int64_t last_event = 0;
  for (const json& r : requests)
    last_event = std::max({last_event, r.at("arrival").get<int64_t>(), optional_int(r, "cancel").value_or(0)});
  size_t printed = 0;
  for (int64_t it = 0;; ++it) {
    for (size_t k = 0; k < requests.size(); ++k) {
      const json& r = requests[k];
      if (r.at("arrival").get<int64_t>() != it) continue;
      mixtral::Request request;
      request.ids = r.at("ids").get<std::vector<int64_t>>();
      request.params.max_new_tokens = r.at("max_new_tokens").get<int64_t>();
      request.params.temperature = r.value("temperature", 0.0);
      request.params.seed = optional_int(r, "seed");
      try {
        handles[k] = executor.submit(std::move(request));
      } catch (const mixtral::QueueFullError&) {
        std::cout << json{{"event", "rejected"}, {"iteration", it}, {"request", k}}.dump() << "\n";
      }
    }
    for (size_t k = 0; k < requests.size(); ++k)
      if (handles[k] && optional_int(requests[k], "cancel") == it) handles[k]->cancel();
    const bool busy = executor.step();
    for (; printed < backend.calls.size(); ++printed) {
      const auto& c = backend.calls[printed];
      std::cout << json{{"event", "step"}, {"iteration", it}, {"r0", c.r0}, {"n", c.batch}, {"seq", c.seq},
                        {"ids", c.ids}, {"positions", c.positions}, {"write_indices", c.write_indices}}
                       .dump()
                << "\n";
    }
    if (it >= last_event && !busy) break;
  }
  for (size_t k = 0; k < handles.size(); ++k) {
    if (!handles[k]) continue;
    const mixtral::Result result = handles[k]->wait();
    std::cout << json{{"event", "result"}, {"request", k}, {"output_ids", result.output_ids},
                      {"finish_reason", result.finish_reason}}
                     .dump()
              << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: executor_trace TRACE.json\n";
    return 2;
  }
  try {
    std::ifstream in(argv[1]);
    if (!in) throw std::runtime_error(std::string("cannot read ") + argv[1]);
    return run(json::parse(in));
  } catch (const std::exception& e) {
    std::cerr << "executor_trace: " << e.what() << "\n";
    return 1;
  }
}
