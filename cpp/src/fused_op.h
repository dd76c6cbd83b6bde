#pragma once

// What the fused operators (fused_lars_sgd.cpp, fused_lamb.cpp) share on the host side:
// their argument checks, made before anything is written so that a refused step modifies
// nothing, and the dense layouts their kernels walk.

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace lars::fused_op {

/// Refuses `tensor` (`name`[i] of operator `op`) unless it is a dense CPU tensor of a dtype
/// the fused kernels step.
void check_floating_cpu(const at::Tensor& tensor, const char* op, const char* name, size_t i);

/// Refuses `tensor` (`name`[i] of `op`) unless it passes check_floating_cpu and has the dtype
/// and shape of `param` (params[i]).
void check_matches(const at::Tensor& tensor, const at::Tensor& param, const char* op, const char* name, size_t i);

/// The value of a one-element CPU tensor (`name` of `op`): a plain read, no device sync.
double cpu_scalar(const at::Tensor& tensor, const char* op, const char* name);

/// `tensor` if it is dense, else a contiguous copy: the kernels then walk its elements in
/// memory order, or in index order for a tensor with gaps.
at::Tensor dense(const at::Tensor& tensor);

/// `tensor` if it is laid out as `like` (a dense tensor), else a copy laid out so.
at::Tensor dense_like(const at::Tensor& tensor, const at::Tensor& like);

/// After a kernel wrote `written` (what dense or dense_like gave for `tensor`): bumps the
/// version of `tensor` if it was written in place, as in-place ATen ops do (autograd relies
/// on it), else copies the result into it.
void written_to(const at::Tensor& tensor, const at::Tensor& written);

} // namespace lars::fused_op
