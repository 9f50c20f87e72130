#pragma once
// Bump when any schema in schema.cpp or a kernel's contract changes: Python refuses an extension built
// from other sources (stale build) and falls back to the reference with one warning.
#define FLOWFM_ABI_VERSION 7
