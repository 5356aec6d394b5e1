// Helpers shared by the tests: temporary directories, files, the Python-written test data.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

namespace mixtral::test {

// A fresh directory under the system temp dir, removed with the object.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    const std::string name = "mixtral-cpp-test-" + std::to_string(rd()) + std::to_string(rd());
    path_ = std::filesystem::temp_directory_path() / name;
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

inline void write_file(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

// The directory tests/runtime/test_cpp_runtime.py fills (export/, engine/, tokenizer_cases.json);
// empty when MIXTRAL_TEST_DATA is unset.
inline std::filesystem::path test_data() {
  const char* dir = std::getenv("MIXTRAL_TEST_DATA");
  return dir ? std::filesystem::path(dir) : std::filesystem::path();
}

#define MIXTRAL_NEED_TEST_DATA()                                                                      \
  if (::mixtral::test::test_data().empty())                                                           \
  GTEST_SKIP() << "MIXTRAL_TEST_DATA is unset: run tests/runtime/test_cpp_runtime.py, which writes " \
                  "the Python-side data and runs ctest with it"

// Expect `statement` to throw `type` with a message containing each of the given parts.
#define EXPECT_THROW_WITH(statement, type, ...)                                            \
  do {                                                                                     \
    try {                                                                                  \
      statement;                                                                           \
      ADD_FAILURE() << "expected " #type " from: " #statement;                             \
    } catch (const type& e) {                                                              \
      const std::string message = e.what();                                                \
      for (const std::string& part : std::initializer_list<std::string>{__VA_ARGS__})      \
        EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message; \
    }                                                                                      \
  } while (0)

}  // namespace mixtral::test
