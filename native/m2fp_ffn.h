// The feed-forward and linear ops of the custom-op library (m2fp_ffn.cc), added to its domain.
#pragma once

#include <onnxruntime_lite_custom_op.h>

#include <memory>
#include <vector>

#include "m2fp_ffn_product.h"

// Adds ai.m2fp::FeedForward and ai.m2fp::Linear to `domain`; `keep` owns the op objects (they must
// outlive every session that uses the domain).
void m2fp_add_feedforward_ops(Ort::CustomOpDomain& domain, std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep);
