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

import numpy as np
import torch

from .errors import UsageError

_LOG2 = math.log(2.0)


def log_c(beta: float, A: float | torch.Tensor) -> float | torch.Tensor:
    """log c_t = log(β/2) − 4 A_t (β > 0)."""
    if beta <= 0:
        raise UsageError(f"the mirror-flow theory needs beta > 0 (beta = 0 is spred), got {beta}")
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


def cosh_times_c(y: torch.Tensor, logc: float | torch.Tensor) -> torch.Tensor:
    """c · cosh(y), computed without overflow for tiny c and large |y|."""
    logc = torch.as_tensor(logc, dtype=y.dtype)
    return torch.exp(logc + y.abs() - _LOG2) * (1 + torch.exp(-2 * y.abs()))


def mirror_interpolator(
    Z: torch.Tensor,
    Y: torch.Tensor,
    z0: torch.Tensor,
    logc: float,
    tol: float = 1e-12,
    max_iter: int = 100,
) -> torch.Tensor:
    """argmin_{Zx = Y} R_c(x): the limit the theory predicts for underdetermined least squares.

    Newton's method on the dual D(λ) = Σ ½ c cosh(z0 + 2 Zᵀλ) − λᵀY (R_c's conjugate is
    ½ c cosh(2s + z0)), whose minimizer gives x = c sinh(z0 + 2 Zᵀλ); the KKT condition
    ∇R_c(x) = Zᵀλ ∈ span(Zᵀ) holds by construction. For tiny c the dual is nearly piecewise
    linear, so c is lowered by continuation from c = ½ in steps of e^-2, warm-starting λ.
    Works in float64; `tol` is on ‖Zx − Y‖ / (1 + ‖Y‖).
    """
    Z, Y, z0 = (t.to(torch.float64) for t in (Z, Y, z0))
    lam = torch.zeros(Z.shape[0], dtype=torch.float64)
    start = max(math.log(0.5), logc)
    n_stages = max(1, math.ceil((start - logc) / 2))
    for i in range(1, n_stages + 1):  # intermediate stages only need a rough warm start
        stage_tol = tol if i == n_stages else max(tol, 1e-6)
        lam = _dual_newton(Z, Y, z0, start + (logc - start) * i / n_stages, lam, stage_tol,
                           max_iter)
    x = flow_x(z0, -(Z.T @ lam), logc)
    gap = float((Z @ x - Y).norm()) / (1 + float(Y.norm()))
    if gap > 1e-8:
        raise RuntimeError(f"mirror_interpolator did not converge: relative residual {gap:.2e}")
    return x


def _dual_newton(Z, Y, z0, logc, lam, tol, max_iter):
    def dual(lam):
        return 0.5 * cosh_times_c(z0 + 2 * Z.T @ lam, logc).sum() - lam @ Y

    scale = 1 + float(Y.norm())
    for _ in range(max_iter):
        y = z0 + 2 * Z.T @ lam
        grad = Z @ flow_x(y, torch.zeros_like(y), logc) - Y
        if float(grad.norm()) <= tol * scale:
            return lam
        H = 2 * (Z * cosh_times_c(y, logc)) @ Z.T
        step = torch.linalg.solve(H + 1e-300 * torch.eye(len(H), dtype=H.dtype), grad)
        t, d0, slope = 1.0, dual(lam), float(grad @ step)
        while t > 1e-12:  # backtracking (Armijo) on the dual; overflow reads as +inf
            new = lam - t * step
            d1 = dual(new)
            if torch.isfinite(d1) and d1 <= d0 - 0.25 * t * slope:
                break
            t /= 2
        if t <= 1e-12:
            return lam  # no further progress possible at this precision
        lam = new
    return lam


def basis_pursuit(Z: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """argmin_{Zx = Y} ‖x‖₁ as a linear program (SciPy's HiGHS): the c → 0 limit of
    `mirror_interpolator`."""
    try:
        from scipy.optimize import linprog
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("basis_pursuit needs SciPy: pip install 'mirrorprune[theory]'") from e
    Zn, Yn = Z.double().numpy(), Y.double().numpy()
    n = Zn.shape[1]
    # x = p − q with p, q ≥ 0: minimize Σ p + q subject to Z p − Z q = Y
    res = linprog(c=[1.0] * (2 * n), A_eq=np.hstack([Zn, -Zn]), b_eq=Yn, bounds=(0, None),
                  method="highs")
    if not res.success:
        raise RuntimeError(f"basis pursuit LP failed: {res.message}")
    return torch.tensor(res.x[:n] - res.x[n:], dtype=torch.float64)
