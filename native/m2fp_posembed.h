// The sine position embedding op of the custom-op library (m2fp_posembed.cc), added to its domain.
#pragma once

#include <onnxruntime_lite_custom_op.h>

#include <memory>
#include <vector>

// Adds ai.m2fp::SinePositionEmbedding to `domain`; `keep` owns the op object (it must outlive every session that
// uses the domain).
void m2fp_add_posembed_op(Ort::CustomOpDomain& domain, std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep);
