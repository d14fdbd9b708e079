// The INT8 group-normalisation op of the custom-op library (m2fp_qgroupnorm.cc), added to its domain.
#pragma once

#include <onnxruntime_lite_custom_op.h>

#include <memory>
#include <vector>

// Adds ai.m2fp::QGroupNorm to `domain`; `keep` owns the op object (it must outlive every session that uses it).
void m2fp_add_qgroupnorm_op(Ort::CustomOpDomain& domain,
                            std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep);
