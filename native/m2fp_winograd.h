// The Winograd convolution ops of the custom-op library (m2fp_winograd.cc), added to its domain.
#pragma once

#include <onnxruntime_lite_custom_op.h>

#include <memory>
#include <vector>

// Adds ai.m2fp::Winograd4x3Input, Winograd4x3Output and Winograd4x3OutputRelu to `domain`; `keep`
// owns the op objects (they must outlive every session that uses the domain).
void m2fp_add_winograd_ops(Ort::CustomOpDomain& domain, std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep);
