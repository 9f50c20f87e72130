#pragma once
#include <string>

namespace flowfm {
std::string build_info();
}
