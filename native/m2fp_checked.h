// What the ops' kernels share. ONNX Runtime calls a custom op's kernel through C: no exception may leave
// it. `m2fp::checked` runs a kernel body and turns any exception into a status naming the op
// (ai.m2fp::<name>); `m2fp::fail` is an op's refusal of its inputs, `m2fp::dims` a shape in its messages.
// Included only by the ops' translation units (built with the library's baseline flags), never by a
// kernel built for one instruction set: inline functions here are emitted with the baseline's code.
#pragma once

#include <onnxruntime_lite_custom_op.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

namespace m2fp {

// "ai.m2fp::<op>: <message>", an invalid argument.
inline Ort::Status fail(const char* op, const std::string& message) {
  return Ort::Status((std::string("ai.m2fp::") + op + ": " + message).c_str(), ORT_INVALID_ARGUMENT);
}

// "(2, 3, 4)".
inline std::string dims(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + ")";
}

// A feed-forward block's shapes, x (..., D), w1 (D, F), w2 (F, E): "" with d, f, e set, or what is wrong.
inline std::string block_shapes(const std::vector<int64_t>& xs, const std::vector<int64_t>& w1s,
                                const std::vector<int64_t>& w2s, int64_t& d, int64_t& f, int64_t& e) {
  if (xs.empty()) return "x must have a last dimension (..., D)";
  if (w1s.size() != 2 || w1s[0] != xs.back()) {
    return "w1 must be (D, F) with D = x's last dimension; x " + dims(xs) + ", w1 " + dims(w1s);
  }
  d = w1s[0], f = w1s[1];
  if (w2s.size() != 2 || w2s[0] != f) {
    return "w2 must be (F, E) with F = w1's columns; w1 " + dims(w1s) + ", w2 " + dims(w2s);
  }
  e = w2s[1];
  return "";
}

// A scalar's shape: () or (1).
inline bool scalar(const std::vector<int64_t>& shape) { return shape.empty() || (shape.size() == 1 && shape[0] == 1); }

// The rows of x (..., D): the product of its leading dimensions.
inline int64_t rows_of(const std::vector<int64_t>& shape) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  return rows;
}

template <typename F>
Ort::Status checked(const char* name, F&& body) {
  const std::string op = std::string("ai.m2fp::") + name + ": ";
  try {
    return body();
  } catch (const Ort::Exception& e) {
    return Ort::Status((op + e.what()).c_str(), e.GetOrtErrorCode());
  } catch (const std::exception& e) {
    return Ort::Status((op + e.what()).c_str(), ORT_FAIL);
  } catch (...) {
    return Ort::Status((op + "unknown error").c_str(), ORT_FAIL);
  }
}

}  // namespace m2fp
