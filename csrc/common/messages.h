// Error messages of the argument checks, built with std::string alone.
//
// c10::str formats its arguments through a std::ostringstream. In the CUDA build on the lent H200
// (torch 2.11.0+cu130, gcc 13, nvcc 13.0) inserting an integer that way jumped into
// std::codecvt<char16_t>::do_unshift and segfaulted (cuda-gdb backtrace in
// benchmarks/results/h200/NOTES.md), so a bad direct call of an op killed the process instead of
// raising. Given one std::string, c10::str returns it untouched: no stream is involved.
#pragma once
#include <ATen/ATen.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace flowfm {

inline void append(std::string& out, const char* s) { out += s; }
inline void append(std::string& out, const std::string& s) { out += s; }
template <typename I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
inline void append(std::string& out, I v) { out += std::to_string(v); }
inline void append(std::string& out, double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  out += buf;
}
inline void append(std::string& out, at::IntArrayRef shape) {
  out += "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  out += "]";
}
inline void append(std::string& out, at::ScalarType t) { out += c10::toString(t); }
inline void append(std::string& out, const at::Device& d) { out += d.str(); }

// msg("x must have shape ", shape, ", got ", x.sizes()): the pieces concatenated.
template <typename... Args> std::string msg(const Args&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}

}  // namespace flowfm
