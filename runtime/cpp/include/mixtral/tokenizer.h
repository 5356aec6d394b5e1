// Mixtral's SentencePiece tokenizer (tokenizer.model in a build directory) over the sentencepiece
// C++ library, as runtime/tokenizer.py: encode() prepends BOS (id 1 for Mixtral), decode() drops
// ids outside the vocabulary. tokenizer.json (Hugging Face tokenizers) is Python-only.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace mixtral {

// No usable tokenizer: names the file and what to do.
class TokenizerError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Tokenizer {
 public:
  // `bos_id` / `eos_id` are used only where the model defines none (as the Python side).
  explicit Tokenizer(const std::filesystem::path& model_file, std::optional<int64_t> bos_id = 1,
                     std::optional<int64_t> eos_id = 2);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // directory/tokenizer.model; TokenizerError when it is missing (tokenizer.json is not read here).
  static Tokenizer from_directory(const std::filesystem::path& directory, std::optional<int64_t> bos_id = 1,
                                  std::optional<int64_t> eos_id = 2);

  std::vector<int64_t> encode(const std::string& text, bool bos = true) const;
  std::string decode(const std::vector<int64_t>& ids) const;

  int64_t vocab_size() const { return vocab_size_; }
  std::optional<int64_t> bos_id() const { return bos_id_; }
  std::optional<int64_t> eos_id() const { return eos_id_; }

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  int64_t vocab_size_ = 0;
  std::optional<int64_t> bos_id_, eos_id_;
};

// Turns a growing list of ids into text deltas, holding back an incomplete UTF-8 character.
// SentencePiece pieces carry leading spaces and byte-fallback tokens, so each push decodes the
// whole sequence and returns what is new.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer) : tokenizer_(&tokenizer) {}
  std::string push(int64_t token);

 private:
  const Tokenizer* tokenizer_;
  std::vector<int64_t> ids_;
  std::string emitted_;
};

}  // namespace mixtral
