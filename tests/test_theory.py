import math

import pytest
import torch

from mirrorprune import theory as T


def test_grad_R_is_the_gradient_of_R():
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    z0 = torch.randn(20, dtype=torch.float64)
    for logc in (math.log(0.5), -3.0, -40.0):
        T.R(x, logc, z0).backward()
        torch.testing.assert_close(x.grad, T.grad_R(x.detach(), logc, z0), rtol=1e-9, atol=1e-12)
        x.grad = None
        eps = 1e-6  # and by central finite differences
        e = torch.zeros(20, dtype=torch.float64)
        e[3] = eps
        fd = (T.R(x.detach() + e, logc, z0) - T.R(x.detach() - e, logc, z0)) / (2 * eps)
        assert float(fd) == pytest.approx(float(T.grad_R(x.detach(), logc, z0)[3]), rel=1e-6)


def test_flow_x_inverts_grad_R_and_starts_at_x0():
    beta = 1.0
    x0 = torch.randn(50, dtype=torch.float64)
    z0 = T.z0_from_x0(x0, beta)
    torch.testing.assert_close(T.flow_x(z0, torch.zeros_like(x0), T.log_c(beta, 0.0)), x0)
    L = torch.randn(50, dtype=torch.float64)
    for A in (0.0, 0.7, 30.0):
        logc = T.log_c(beta, A)
        x = T.flow_x(z0, L, logc)
        torch.testing.assert_close(T.mirror_residual(x, L, z0, logc), torch.zeros_like(x),
                                   rtol=0, atol=1e-9)


def test_small_c_makes_R_an_l1_norm():
    x = torch.randn(30, dtype=torch.float64)
    z0 = torch.zeros(30, dtype=torch.float64)
    prev = math.inf
    for A in (5.0, 50.0, 500.0):
        logc = T.log_c(1.0, A)
        ratio = float(T.R(x, logc, z0)) / (-logc) / float(x.abs().sum())
        gap = abs(ratio - 0.5)  # R_c(x) ≈ ½ log(1/c) ‖x‖₁ in this convention
        assert gap < prev
        prev = gap
    assert prev < 1e-2


def test_stable_for_tiny_c_and_huge_x():
    x = torch.tensor([0.0, 1e-300, -1e-8, 3.0, -1e30], dtype=torch.float64)
    z0 = torch.zeros_like(x)
    for A in (0.0, 100.0, 1e4):
        logc = T.log_c(1.0, A)
        for v in (T.asinh_over_c(x, logc), T.grad_R(x, logc, z0), T.R(x, logc, z0)):
            assert torch.isfinite(v).all()
        assert T.asinh_over_c(x, logc)[0] == 0
    f64 = {"dtype": torch.float64}
    # c·sinh(800.5) = e^199 although sinh(800.5) alone overflows
    big = T.flow_x(torch.tensor([0.5], **f64), torch.tensor([-400.0], **f64), T.log_c(1.0, 150.0))
    assert torch.isfinite(big).all() and big.item() > 0
    with pytest.raises(ValueError, match="beta > 0"):
        T.log_c(0.0, 1.0)


def _problem(n=40, d=15, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(d, n, generator=g, dtype=torch.float64)
    xs = torch.zeros(n, dtype=torch.float64)
    xs[:k] = torch.tensor([1.0, -0.7, 0.4], dtype=torch.float64)
    x0 = torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(n)
    return Z, Z @ xs, xs, T.z0_from_x0(x0, 1.0)


@pytest.mark.parametrize("A", [0.0, 0.5, 3.0, 30.0])
def test_mirror_interpolator_satisfies_kkt(A):
    Z, Y, _, z0 = _problem()
    logc = T.log_c(1.0, A)
    x = T.mirror_interpolator(Z, Y, z0, logc)
    assert float((Z @ x - Y).norm()) < 1e-9
    # ∇R_c(x) ∈ span(Zᵀ): its component orthogonal to the row space vanishes
    gr = T.grad_R(x, logc, z0)
    coef = torch.linalg.lstsq(Z.T, gr.unsqueeze(1)).solution.squeeze(1)
    assert float((gr - Z.T @ coef).norm()) < 1e-8
    # and it beats other interpolators on R_c (random feasible perturbations)
    null = torch.linalg.svd(Z, full_matrices=True).Vh[Z.shape[0]:]
    for _ in range(5):
        other = x + 1e-2 * null.T @ torch.randn(null.shape[0], dtype=torch.float64)
        assert float(T.R(other, logc, z0)) > float(T.R(x, logc, z0))


def test_tiny_c_limit_is_basis_pursuit_and_recovers_sparse_truth():
    pytest.importorskip("scipy")
    Z, Y, xs, z0 = _problem()
    bp = T.basis_pursuit(Z, Y)
    assert float((bp - xs).norm()) < 1e-8
    x = T.mirror_interpolator(Z, Y, z0, T.log_c(1.0, 40.0))
    assert float((x - bp).norm()) < 1e-8
    far = T.mirror_interpolator(Z, Y, z0, T.log_c(1.0, 0.0))  # L2-like: not sparse
    assert float((far - bp).norm()) > 0.1
