"""The selective scan (Mamba's S6 recurrence), with mamba-ssm's signature and semantics.

`selective_scan_fn` dispatches to mamba-ssm's fused CUDA kernel when the input is on a
GPU and the real `mamba_ssm` package imports; otherwise it runs `selective_scan_ref`, a
pure-PyTorch loop over the sequence with the same semantics as mamba-ssm's own
`selective_scan_ref` (the reference mamba-ssm tests its kernel against). The reference
is differentiable through autograd and runs on any device.

`install_mamba_ssm_shim()` makes `mamba_ssm.ops.selective_scan_interface` importable for
packages that import it at module load (the `mambavision` package does), when the real
`mamba_ssm` is not installed. It registers a small module in `sys.modules` whose
`selective_scan_fn` is the dispatcher below; it never shadows a real installation.

Recurrence (per batch b, channel d, state n, step l):
    dt[l]  = softplus(delta[l] + delta_bias)      (bias and softplus optional)
    x[l]   = exp(dt[l] * A[d, n]) * x[l-1] + dt[l] * B[n, l] * u[l]      x[-1] = 0
    y[l]   = sum_n C[n, l] * x[l, n]  (+ D[d] * u[l])
    out[l] = y[l] * silu(z[l])                    (if z is given)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_fn", "selective_scan_ref", "install_mamba_ssm_shim", "cuda_kernel_available"]

_SHIM_MARK = "__dakd_selective_scan_shim__"
_CUDA_FN = None
_CUDA_CHECKED = False


def _real_mamba_ssm_scan():
    """mamba-ssm's CUDA `selective_scan_fn` if the real package imports, else None (cached)."""
    global _CUDA_FN, _CUDA_CHECKED
    if _CUDA_CHECKED:
        return _CUDA_FN
    _CUDA_CHECKED = True
    existing = sys.modules.get("mamba_ssm")
    if existing is not None and getattr(existing, _SHIM_MARK, False):
        return None  # our shim is installed: the real package was absent when it was put there
    try:
        if importlib.util.find_spec("mamba_ssm") is None:
            return None
        mod = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        _CUDA_FN = getattr(mod, "selective_scan_fn", None)
    except Exception:  # broken or CPU-only install (selective_scan_cuda missing): reference scan
        _CUDA_FN = None
    return _CUDA_FN


def cuda_kernel_available() -> bool:
    """True when mamba-ssm's CUDA kernel can be used for tensors on a GPU."""
    return _real_mamba_ssm_scan() is not None and torch.cuda.is_available()


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """The selective scan; mamba-ssm's `selective_scan_fn` signature and semantics.

    Shapes (batch b, channels d, state size n, sequence length l):
      u, delta, z: (b, d, l); A: (d, n); B, C: (d, n) fixed or (b, n, l) / (b, g, n, l)
      input-dependent; D, delta_bias: (d,).
    Returns out (b, d, l) in u's dtype, or (out, last_state (b, d, n)) when
    return_last_state. Uses the CUDA kernel for GPU tensors when mamba-ssm imports,
    else `selective_scan_ref`.
    """
    if u.is_cuda:
        kernel = _real_mamba_ssm_scan()
        if kernel is not None:
            return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, bool(return_last_state))
    return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                              delta_softplus=delta_softplus, return_last_state=return_last_state)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Pure-PyTorch selective scan: a loop over the sequence (mamba-ssm's reference semantics).

    Computation is in float32 (complex64 for complex A); `out` is cast back to u's dtype.
    Complex A takes B/C as interleaved real pairs along l (as mamba-ssm), and the output
    is 2 * Re(y).
    """
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    is_variable_B = B.dim() >= 3
    is_variable_C = C.dim() >= 3
    if A.is_complex():
        if is_variable_B:
            B = torch.view_as_complex(B.float().unflatten(-1, (-1, 2)).contiguous())
        if is_variable_C:
            C = torch.view_as_complex(C.float().unflatten(-1, (-1, 2)).contiguous())
    else:
        A = A.float()
        B = B.float()
        C = C.float()
    # dA[b, d, l, n] = exp(dt * A); dBu[b, d, l, n] = dt * B * u
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if not is_variable_B:
        deltaB_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    elif B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:  # (b, groups, n, l): each group serves dim // groups channels
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
        deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    if is_variable_C and C.dim() == 4:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)

    x = deltaB_u.new_zeros((batch, dim, dstate))
    states = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        states.append(x)
    xs = torch.stack(states, dim=2)  # (b, d, l, n)
    last_state = x
    if not is_variable_C:
        y = torch.einsum("bdln,dn->bdl", xs, C)
    elif C.dim() == 3:
        y = torch.einsum("bdln,bnl->bdl", xs, C)
    else:
        y = torch.einsum("bdln,bdnl->bdl", xs, C)
    if y.is_complex():
        y = y.real * 2
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype=dtype_in)
    return (out, last_state) if return_last_state else out


def install_mamba_ssm_shim() -> bool:
    """Make `from mamba_ssm.ops.selective_scan_interface import selective_scan_fn` work.

    Does nothing (returns False) when the real mamba-ssm imports. Otherwise registers
    `mamba_ssm`, `mamba_ssm.ops` and `mamba_ssm.ops.selective_scan_interface` in
    `sys.modules` (the last exposing `selective_scan_fn` and `selective_scan_ref` from
    this module, and `mamba_inner_fn = None`) and returns True. Idempotent.
    """
    existing = sys.modules.get("mamba_ssm")
    if existing is not None:
        return bool(getattr(existing, _SHIM_MARK, False))
    if _real_mamba_ssm_scan() is not None:
        return False
    pkg = types.ModuleType("mamba_ssm")
    ops = types.ModuleType("mamba_ssm.ops")
    ssi = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    for m in (pkg, ops):
        m.__path__ = []  # mark as packages so submodule imports resolve through sys.modules
    for m in (pkg, ops, ssi):
        setattr(m, _SHIM_MARK, True)
    ssi.selective_scan_fn = selective_scan_fn
    ssi.selective_scan_ref = selective_scan_ref
    ssi.mamba_inner_fn = None
    pkg.ops = ops
    ops.selective_scan_interface = ssi
    sys.modules["mamba_ssm"] = pkg
    sys.modules["mamba_ssm.ops"] = ops
    sys.modules["mamba_ssm.ops.selective_scan_interface"] = ssi
    return True
