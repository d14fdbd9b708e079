// The INT8 convolution op of the custom-op library (m2fp_qconv.cc), added to its domain.
#pragma once

#include <onnxruntime_lite_custom_op.h>

#include <memory>
#include <vector>

// Adds ai.m2fp::QConv to `domain`; `keep` owns the op object (it must outlive every session that uses the domain).
void m2fp_add_qconv_op(Ort::CustomOpDomain& domain, std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep);
