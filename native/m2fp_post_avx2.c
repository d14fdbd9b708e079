/* libm2fp_post.so's per-pixel kernels built for x86-64-v3 (8 lanes), in a build for x86-64's levels
 * whose own target is narrower (m2fp_post_lanes.h). */
#include "m2fp_post.h"

#if defined(M2FP_WIDTHS) && M2FP_TARGET_LANES < 8
#pragma GCC target("arch=x86-64-v3")
#undef M2FP_TARGET_LANES
#define M2FP_TARGET_LANES 8
#include "m2fp_post_lanes.h"
#endif
