"""`declare`: the one declaration of an op, its torch.library pieces and its registry entries.

For `cogvx::<name>` and each backend it names:
* `cpu` / `cuda`: the extension's C++ op (schema in csrc/ops.cpp, kernels from `_C`), when `_C` loads;
* a Python backend with `kernels=(module, forward[, backward])`, functions of a module under
  cogvx_kernels imported at the first call (Triton loads only when a Triton kernel runs): the custom
  ops `cogvx::<name>_<backend>` (+ `_backward`) with the given schemas;
* `reference`: its `fn`, plain PyTorch (autograd by torch itself).
The C++ and Python ops all get the same fake impls (torch.compile traces them without graph breaks)
and autograd, and each backend becomes a `_registry.Implementation` with the remaining fields.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from .. import _extension, _registry
from ._checks import check_no_internal_overlap


def declare(name: str, schema: str, fake: Callable, *, backends: dict[str, dict],
            backward: Callable | None = None, setup_context: Callable | None = None,
            backward_schema: str | None = None, backward_fake: Callable | None = None,
            register: bool = True) -> dict[str, Callable]:
    """Declares `cogvx::<name>` on `backends` ({backend: registry fields, with `fn` for the reference
    and `kernels` for a Python backend}) and returns {backend: callable}.

    `schema` and `backward_schema` ("(Tensor x, ...) -> Tensor") are the Python ops'; `fake` and
    `backward_fake` take the ops' arguments. Autograd, with `backward`: torch.library's
    `setup_context(ctx, inputs, output)`, and `backward(backward_op, ctx, *grads)` returning the
    gradients of the leading inputs (None for the rest), where backward_op is the backend's
    `<name>_backward` op, or the op itself without `backward_schema`. An op that writes an argument
    (`Tensor(a!)` in its schema, an in-place `name_` by torch's convention) refuses overlapping memory
    there in its Python implementations, as the C++ ones do; its custom ops are `<name>_<backend>_`.
    register=False: no registry entry (a variant the public function picks by the backend chosen
    for its out-of-place op)."""
    args = torch._C.parse_schema(f"cogvx::{name}{schema}").arguments
    written = {i: a.name for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write}

    def refuse_overlap(fn: Callable, label: str) -> Callable:
        if not written:
            return fn

        def call(*a):
            for i, arg in written.items():
                check_no_internal_overlap(f"{label}: {arg}", a[i])
            return fn(*a)
        return call

    def library(op, backward_op) -> None:
        """Fake impls and autograd of one backend's op (an OpOverload or a custom op)."""
        torch.library.register_fake(op, fake)
        if backward_schema is not None:
            torch.library.register_fake(backward_op, backward_fake)
        if backward is not None:
            def grads(ctx, *grad_outputs):
                leading = tuple(backward(backward_op, ctx, *grad_outputs))
                return leading + (None,) * (len(args) - len(leading))
            torch.library.register_autograd(op, grads, setup_context=setup_context)

    native = None
    if _extension.load_error() is None and {"cpu", "cuda"} & set(backends):
        native = getattr(torch.ops.cogvx, name).default
        library(native, getattr(torch.ops.cogvx, f"{name}_backward").default if backward_schema else native)

    def python_op(backend: str, module: str, forward_fn: str, backward_fn: str | None = None):
        def kernel(fn_name: str) -> Callable:
            return lambda *a: getattr(importlib.import_module(module, "cogvx_kernels"), fn_name)(*a)
        base = name.rstrip("_")  # rope3d_ -> rope3d_triton_
        qualname = f"cogvx::{base}_{backend}{name[len(base):]}"
        op = torch.library.custom_op(qualname, refuse_overlap(kernel(forward_fn), qualname),
                                     mutates_args=tuple(written.values()), schema=schema)
        backward_op = op
        if backward_schema is not None:
            backward_op = torch.library.custom_op(f"{qualname}_backward", kernel(backward_fn), mutates_args=(),
                                                  schema=backward_schema)
        library(op, backward_op)
        return op

    fns = {}
    for backend, fields in backends.items():
        fields = dict(fields)
        kernels = fields.pop("kernels", None)
        if backend in ("cpu", "cuda"):
            fn = native if native is not None else _not_loaded
            fields["native_op"] = name
        elif kernels is not None:
            fn = python_op(backend, *kernels)
        else:
            fn = refuse_overlap(fields.pop("fn"), name)
        fns[backend] = fn
        if register:
            _registry.register(_registry.Implementation(name, backend, fn, **fields))
    return fns


def _not_loaded(*args):
    raise RuntimeError(_extension.load_error())
