// Whether this compiler and target get one kernel variant per CPU capability: x86-64 with GCC,
// whose `#pragma GCC target` compiles a region for an instruction set the rest of the translation
// unit does not assume. Elsewhere (aarch64, clang, or an FLOWFM_NATIVE=1 build that already
// targets the build machine) one variant is compiled with the command line's flags.
#pragma once
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FLOWFM_NATIVE)
#define FLOWFM_CPU_MULTI 1
#else
#define FLOWFM_CPU_MULTI 0
#endif
