"""The mirror-flow theory of PILoT (SPEC §2.4), vectorized and stable for tiny c and large |x|.

Convention (stated once, verified in tests against the discrete dynamics): with u = (m + w)/√2,
v = (m − w)/√2, A_t = ∫ α ds and L_t = ∫ ∇f(x_s) ds,

    x_t = c_t · sinh(z0 − 2 L_t),   c_t = (β/2) · exp(−4 A_t),   z0 = log(u0/v0) = arcsinh(2 x0 / β)

i.e. ∇R_{c_t}(x_t) = −L_t for R_c(x) = ½ Σ [x arcsinh(x/c) − sqrt(x² + c²) − x z0].
Under the flow, m² − w² = 2 c_t exactly, whatever the loss — which makes c_t measurable.
The paper's constant a_t = 2 u0 v0 exp(−2 A_t) belongs to its own parametrization; we keep c_t.

Everything takes `log_c` rather than c, so c far below the float range (A in the hundreds) works.
"""

from __future__ import annotations

import math

import torch

_LOG2 = math.log(2.0)


def log_c(beta: float, A: float | torch.Tensor) -> float | torch.Tensor:
    """log c_t = log(β/2) − 4 A_t (β > 0)."""
    if beta <= 0:
        raise ValueError(f"the mirror-flow theory needs beta > 0 (beta = 0 is spred), got {beta}")
    return math.log(beta / 2) - 4 * A


def z0_from_x0(x0: torch.Tensor, beta: float) -> torch.Tensor:
    """z0 = log(u0/v0) = arcsinh(2 x0 / β): the initialization's offset of ∇R."""
    return torch.asinh(2 * x0 / beta)


def asinh_over_c(x: torch.Tensor, logc: float | torch.Tensor) -> torch.Tensor:
    """arcsinh(x / c) for c = exp(logc), finite even when x / c overflows."""
    logc = torch.as_tensor(logc, dtype=x.dtype)
    r = torch.log(x.abs()) - logc  # log(|x|/c); -inf at x = 0
    # asinh(y) = log(2y) + O(1/y²): exact to float64 beyond y = e^20, and never overflows.
    direct = torch.asinh(torch.sign(x) * torch.exp(r.clamp(max=20)))
    return torch.where(r > 20, torch.sign(x) * (r + _LOG2), direct)


def grad_R(x: torch.Tensor, logc: float | torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """∇R_c(x) = ½ [arcsinh(x/c) − z0]."""
    return 0.5 * (asinh_over_c(x, logc) - z0)


def R(x: torch.Tensor, logc: float | torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """R_c(x) = ½ Σ [x arcsinh(x/c) − sqrt(x² + c²) − x z0] (a scalar)."""
    c = torch.exp(torch.as_tensor(logc, dtype=x.dtype))
    return 0.5 * (x * asinh_over_c(x, logc) - torch.hypot(x, c) - x * z0).sum()


def flow_x(z0: torch.Tensor, L: torch.Tensor, logc: float | torch.Tensor) -> torch.Tensor:
    """Closed-form x_t = c_t sinh(z0 − 2 L_t), computed without overflow."""
    y = z0 - 2 * L
    logc = torch.as_tensor(logc, dtype=y.dtype)
    # c·sinh(y) = sign(y) · exp(log c + |y| − log 2) · (1 − e^{−2|y|})
    return torch.sign(y) * torch.exp(logc + y.abs() - _LOG2) * -torch.expm1(-2 * y.abs())


def mirror_residual(
    x: torch.Tensor, L: torch.Tensor, z0: torch.Tensor, logc: float | torch.Tensor
) -> torch.Tensor:
    """∇R_{c_t}(x_t) + L_t elementwise: zero along the exact flow."""
    return grad_R(x, logc, z0) + L
