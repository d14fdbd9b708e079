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
