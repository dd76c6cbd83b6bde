#pragma once

// What the C++ test files share: the text of the error a call raises, and a substring test.

#include <gtest/gtest.h>

#include <functional>
#include <string>

namespace lars_test {

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
