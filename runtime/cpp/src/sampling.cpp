#include "mixtral/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>

namespace mixtral {

namespace {

std::string text(double value) {  // 0.7, not std::to_string's 0.700000
  std::ostringstream out;
  out << value;
  return out.str();
}

}  // namespace

void SamplingParams::validate() const {
  auto bad = [](const std::string& what) { throw std::invalid_argument(what); };
  if (max_new_tokens < 1) bad("max_new_tokens=" + std::to_string(max_new_tokens) + " must be >= 1");
  if (!(temperature >= 0)) bad("temperature=" + text(temperature) + " must be >= 0 (0 means greedy)");
  if (top_k < 0) bad("top_k=" + std::to_string(top_k) + " must be >= 0 (0 disables it)");
  if (!(top_p > 0 && top_p <= 1)) bad("top_p=" + text(top_p) + " must be in (0, 1]");
  if (!(repetition_penalty > 0))
    bad("repetition_penalty=" + text(repetition_penalty) + " must be > 0 (1 disables it)");
}

size_t argmax(const double* values, size_t n) {
  return static_cast<size_t>(std::max_element(values, values + n) - values);  // first of equal maxima
}

Sampler::Sampler(const SamplingParams& params) : params_(params) {
  params_.validate();
  std::random_device entropy;
  rng_.seed(params_.seed ? *params_.seed : (static_cast<uint64_t>(entropy()) << 32) ^ entropy());
}

double Sampler::uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

std::vector<double> Sampler::penalized(const float* logits, size_t vocab, const std::vector<int64_t>& history) const {
  std::vector<double> x(logits, logits + vocab);  // [V], in double as the Python sampler
  const double rp = params_.repetition_penalty;
  if (rp != 1.0) {
    std::vector<bool> seen(vocab, false);
    for (int64_t t : history)
      if (t >= 0 && static_cast<size_t>(t) < vocab) seen[t] = true;
    for (size_t v = 0; v < vocab; ++v)
      if (seen[v]) x[v] = x[v] > 0 ? x[v] / rp : x[v] * rp;
  }
  return x;
}

std::vector<double> Sampler::probabilities(const float* logits, size_t vocab,
                                           const std::vector<int64_t>& history) const {
  if (vocab == 0) throw std::invalid_argument("cannot sample from an empty vocabulary");
  std::vector<double> x = penalized(logits, vocab, history);
  if (params_.is_greedy()) {
    std::vector<double> one(vocab, 0.0);
    one[argmax(x.data(), vocab)] = 1.0;
    return one;
  }
  for (double& v : x) v /= params_.temperature;
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < vocab) {
    std::vector<double> sorted = x;  // keep every logit >= the k-th largest (ties kept, as numpy)
    std::nth_element(sorted.begin(), sorted.begin() + (params_.top_k - 1), sorted.end(), std::greater<>());
    const double kth = sorted[params_.top_k - 1];
    for (double& v : x)
      if (v < kth) v = -std::numeric_limits<double>::infinity();
  }
  const double top = *std::max_element(x.begin(), x.end());
  std::vector<double> p(vocab);
  for (size_t v = 0; v < vocab; ++v) p[v] = std::exp(x[v] - top);
  double sum = std::accumulate(p.begin(), p.end(), 0.0);
  for (double& v : p) v /= sum;
  if (params_.top_p < 1.0) {
    // Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays when the
    // mass of the tokens before it (descending, stable on ties) is below top_p.
    std::vector<size_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return p[a] > p[b]; });
    double before = 0.0;
    std::vector<bool> keep(vocab, false);
    for (size_t idx : order) {
      keep[idx] = before < params_.top_p;
      before += p[idx];
    }
    sum = 0.0;
    for (size_t v = 0; v < vocab; ++v) sum += keep[v] ? p[v] : (p[v] = 0.0);
    for (double& v : p) v /= sum;
  }
  return p;
}

int64_t Sampler::sample(const float* logits, size_t vocab, const std::vector<int64_t>& history) {
  if (params_.is_greedy()) {
    std::vector<double> x = penalized(logits, vocab, history);
    return static_cast<int64_t>(argmax(x.data(), vocab));
  }
  const std::vector<double> p = probabilities(logits, vocab, history);
  // Inverse CDF over the vocabulary order; u < 1 and the last kept token catches rounding.
  const double u = uniform();
  double cumulative = 0.0;
  size_t last = 0;
  for (size_t v = 0; v < vocab; ++v) {
    if (p[v] <= 0.0) continue;
    last = v;
    cumulative += p[v];
    if (u < cumulative) return static_cast<int64_t>(v);
  }
  return static_cast<int64_t>(last);
}

}  // namespace mixtral
