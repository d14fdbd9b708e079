// What the library's vectorised loops share. M2FP_CLONES: on x86-64 with GCC 11 or newer, a function
// built three times (baseline, x86-64-v3 with AVX2, x86-64-v4 with AVX-512) and the widest one this
// CPU runs picked when the library loads; elsewhere the plain function.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define M2FP_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define M2FP_CLONES
#endif
