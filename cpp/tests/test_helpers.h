#pragma once

// What the C++ test files share: the same random numbers in every test, the text of the
// error a call raises, and a substring test.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <functional>
#include <string>

namespace lars_test {

// libtorch seeds its CPU generator from the clock, so without this a test would draw other
// numbers on every run, and a comparison that holds only to rounding would fail now and then.
// Each test starts from seed 0, whichever tests ran before it.
class SeedEachTest : public ::testing::EmptyTestEventListener {
  void OnTestStart(const ::testing::TestInfo&) override {
    at::manual_seed(0);
  }
};

inline const bool each_test_seeded = [] {
  ::testing::UnitTest::GetInstance()->listeners().Append(new SeedEachTest);
  return true;
}();

/// The message (without backtrace) of the `Error` that `run` raises; a test failure if none.
template <typename Error>
std::string error_of(const std::function<void()>& run) {
  try {
    run();
  } catch (const Error& error) {
    return error.what_without_backtrace();
  }
  ADD_FAILURE() << "no error raised";
  return "";
}

inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

} // namespace lars_test
