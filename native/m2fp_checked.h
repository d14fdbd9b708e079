// ONNX Runtime calls a custom op's kernel through C: no exception may leave it. `m2fp::checked`
// runs a kernel body and turns any exception into a status naming the op (ai.m2fp::<name>).
#pragma once

#include <onnxruntime_lite_custom_op.h>

#include <exception>
#include <string>

namespace m2fp {

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
