// Argument checks of the compiled entry points: device, dtype, shape and contiguity of every
// tensor, each failure a one-line error naming the argument.
#pragma once

#include <string>
#include <vector>

#include "gca_core.h"

namespace gca {

std::string shape_str(const at::Tensor& t);

// t is defined, on dev, of dtype, of exactly shape, contiguous.
void check_tensor(const char* fn, const char* name, const at::Tensor& t, c10::DeviceType dev,
                  at::ScalarType dtype, std::vector<int64_t> shape);

// Checks every argument of a GCA entry point; returns the problem's sizes (no row maps).
RowLayout check_gca_args(const char* fn, const DeviceBackend& be, const at::Tensor& x_a,
                         const at::Tensor& x_b, const GCAWeights& w, const OptT& kpm,
                         const OptT& am, const GCAConfig& cfg);

// Checks of the cosine-alignment entry points; returns the number of rows.
int64_t check_cos_args(const char* fn, c10::DeviceType dev,
                       const std::vector<at::ScalarType>& dtypes, const at::Tensor& x,
                       const at::Tensor& y, const OptT& mask);

}  // namespace gca
