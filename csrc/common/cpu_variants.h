// Compiles one op's CPU kernels once per CPU capability, in one translation unit. Usage, in
// csrc/<op>/cpu.cpp after common/cpu.h:
//   #define FLOWFM_CPU_KERNELS "../<op>/cpu_kernels.h"   (a path relative to this folder)
//   #include "../common/cpu_variants.h"
// and register FLOWFM_CPU_BY_CAPABILITY(fn) for each entry point fn of the kernels header.
//
// Each variant is the kernels header (with common/cpu_vec.h first) inside its own namespace,
// flowfm::cpu::{generic, avx2, avx512}, and its own `#pragma GCC target` region, so the AVX2 and
// AVX-512 code exists beside a baseline x86-64 one and the choice is made at run time
// (cpu_capability.h). Torch and the standard library are included before any region: their inline
// functions and templates are compiled for the baseline only, so no AVX-512 copy of a shared
// (COMDAT) function can be picked by the linker for code that runs on an AVX2 CPU, the hazard of
// compiling whole translation units with different -m flags. The headers are parsed once, which
// keeps the build to one torch-header unit per op.
//
// An op whose avx2 kernels measured faster than its avx512 ones on AVX-512 CPUs defines
// FLOWFM_CPU_AVX512_RUNS_AVX2 before this include (the measurement named beside it): its avx512
// variant is not compiled and AVX-512 CPUs run its avx2 one (the other ops keep their avx512 variant).
#include "cpu_variants_config.h"

#ifndef FLOWFM_CPU_KERNELS
#error "define FLOWFM_CPU_KERNELS (the op's kernels header) before including cpu_variants.h"
#endif

#if FLOWFM_CPU_MULTI && !defined(FLOWFM_CPU_AVX512_RUNS_AVX2)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")
#define FLOWFM_CPU_AVX2 1
#define FLOWFM_CPU_AVX512 1
namespace flowfm::cpu::avx512 {
namespace {
#include "cpu_vec.h"
#include FLOWFM_CPU_KERNELS
}  // namespace
}  // namespace flowfm::cpu::avx512
#undef FLOWFM_CPU_AVX2
#undef FLOWFM_CPU_AVX512
#pragma GCC pop_options
#endif

#if FLOWFM_CPU_MULTI
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FLOWFM_CPU_AVX2 1
#define FLOWFM_CPU_AVX512 0
namespace flowfm::cpu::avx2 {
namespace {
#include "cpu_vec.h"
#include FLOWFM_CPU_KERNELS
}  // namespace
}  // namespace flowfm::cpu::avx2
#undef FLOWFM_CPU_AVX2
#undef FLOWFM_CPU_AVX512
#pragma GCC pop_options
#ifdef FLOWFM_CPU_AVX512_RUNS_AVX2
namespace flowfm::cpu {
namespace avx512 = avx2;
}  // namespace flowfm::cpu
#endif
#endif

// The baseline: the command line's flags (x86-64 or aarch64 generic; the build machine's ISA when
// FLOWFM_NATIVE=1, whose intrinsic paths follow the compiler's own macros).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define FLOWFM_CPU_AVX512 1
#else
#define FLOWFM_CPU_AVX512 0
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define FLOWFM_CPU_AVX2 1
#else
#define FLOWFM_CPU_AVX2 0
#endif
namespace flowfm::cpu::generic {
namespace {
#include "cpu_vec.h"
#include FLOWFM_CPU_KERNELS
}  // namespace
}  // namespace flowfm::cpu::generic
#undef FLOWFM_CPU_AVX2
#undef FLOWFM_CPU_AVX512

#if !FLOWFM_CPU_MULTI
namespace flowfm::cpu {
namespace avx2 = generic;
namespace avx512 = generic;
}  // namespace flowfm::cpu
#endif

#undef FLOWFM_CPU_KERNELS
#undef FLOWFM_CPU_AVX512_RUNS_AVX2
