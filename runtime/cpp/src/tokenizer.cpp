#include "mixtral/tokenizer.h"

#include <sentencepiece_processor.h>

namespace mixtral {

Tokenizer::Tokenizer(const std::filesystem::path& model_file, std::optional<int64_t> bos_id,
                     std::optional<int64_t> eos_id)
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  if (!std::filesystem::is_regular_file(model_file))
    throw TokenizerError(model_file.string() + " does not exist; copy the checkpoint's tokenizer.model there");
  const auto status = sp_->Load(model_file.string());
  if (!status.ok())
    throw TokenizerError("sentencepiece cannot load " + model_file.string() + ": " + status.ToString());
  vocab_size_ = sp_->GetPieceSize();
  bos_id_ = sp_->bos_id() >= 0 ? std::optional<int64_t>(sp_->bos_id()) : bos_id;
  eos_id_ = sp_->eos_id() >= 0 ? std::optional<int64_t>(sp_->eos_id()) : eos_id;
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

Tokenizer Tokenizer::from_directory(const std::filesystem::path& directory, std::optional<int64_t> bos_id,
                                    std::optional<int64_t> eos_id) {
  const auto model = directory / "tokenizer.model";
  if (!std::filesystem::is_regular_file(model)) {
    const bool json = std::filesystem::is_regular_file(directory / "tokenizer.json");
    throw TokenizerError(directory.string() + " has no tokenizer.model (SentencePiece)" +
                         (json ? "; its tokenizer.json is read by the Python runtime only" : "") +
                         ". Copy the checkpoint's tokenizer.model there or give token ids");
  }
  return Tokenizer(model, bos_id, eos_id);
}

std::vector<int64_t> Tokenizer::encode(const std::string& text, bool bos) const {
  std::vector<int> ids;
  const auto status = sp_->Encode(text, &ids);
  if (!status.ok()) throw TokenizerError("sentencepiece could not encode the text: " + status.ToString());
  std::vector<int64_t> out;
  out.reserve(ids.size() + 1);
  if (bos && bos_id_) out.push_back(*bos_id_);
  out.insert(out.end(), ids.begin(), ids.end());
  return out;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  std::vector<int> kept;
  for (int64_t id : ids)
    if (id >= 0 && id < vocab_size_) kept.push_back(static_cast<int>(id));
  std::string text;
  const auto status = sp_->Decode(kept, &text);
  if (!status.ok()) throw TokenizerError("sentencepiece could not decode the ids: " + status.ToString());
  return text;
}

namespace {

// True when `text` ends inside a multi-byte UTF-8 character, or with U+FFFD (what sentencepiece
// emits for byte-fallback pieces that do not form a character yet).
bool incomplete_utf8(const std::string& text) {
  static const std::string replacement = "\xEF\xBF\xBD";
  if (text.size() >= 3 && text.compare(text.size() - 3, 3, replacement) == 0) return true;
  size_t i = text.size(), continuation = 0;
  while (i > 0 && (static_cast<unsigned char>(text[i - 1]) & 0xC0) == 0x80 && continuation < 4) --i, ++continuation;
  if (i == 0) return continuation > 0;
  const auto lead = static_cast<unsigned char>(text[i - 1]);
  const size_t need = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
  return continuation < need;
}

}  // namespace

std::string StreamDecoder::push(int64_t token) {
  ids_.push_back(token);
  std::string text = tokenizer_->decode(ids_);
  if (incomplete_utf8(text)) return "";
  if (text.compare(0, emitted_.size(), emitted_) != 0) return "";  // decoding changed earlier text: hold
  std::string delta = text.substr(emitted_.size());
  emitted_ = std::move(text);
  return delta;
}

}  // namespace mixtral
