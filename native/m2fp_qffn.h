// The INT8 feed-forward and linear ops of the custom-op library (m2fp_qffn.cc), added to its domain.
#pragma once

#include <onnxruntime_lite_custom_op.h>

#include <memory>
#include <vector>

// Adds ai.m2fp::QFeedForward and ai.m2fp::QLinear to `domain`; `keep` owns the op objects (they must outlive
// every session that uses the domain).
void m2fp_add_qfeedforward_ops(Ort::CustomOpDomain& domain,
                              std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep);
