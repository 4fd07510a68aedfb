"""Diagonal linear network x = m ⊙ w on underdetermined least squares (paper Fig. 1, 4, 5).

Setting (SPEC §4.1): Z ∈ R^{d×n} with N(0, 1) entries, a ground truth x* with k nonzero N(0, 1)
entries, Y = Z x*, loss f(x) = ‖Zx − Y‖² / (2d) (or over a mini-batch of B rows with SGD).
Choices where the paper is ambiguous, made once here:

- x0 ~ N(0, σ²) with σ = 1/√n (we read "N(0, 1/√n)" as a standard deviation, as in numpy's
  `normal(0, 1/sqrt(n))`); every method starts from the same x0 per initialization.
- Time: one gradient step of size η advances flow time t by η. The schedules' step index k counts
  units of flow time, k = floor(t), so a schedule means the same thing for any η. The paper's
  η = 1e-4 would need 10^7 steps for the horizon used here; we use η = 0.02 and checked that
  η = 0.005 gives the same errors (README, results/diag).
- L1 on x and L1 on m are discretized with a proximal (soft-thresholding) step, the standard
  gradient-descent discretization of an L1 flow; plain subgradient steps chatter around zero.
- PILoT and its β = 0 variant (spred's initialization) follow the exact PILoT SGD update;
  "pilot_opt" is PILoT as an optimizer on x (`mirrorprune.optim`, the same flow taken as
  mirror descent with c_{k+1} = c_k·e^{−4ηα_k}), from the same x0.

All runs (methods × schedules × initializations × SGD seeds) are simulated together as one batch
of tensors; there is no Python loop over runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .. import schedules as S
from .. import theory
from ..config import option
from ..errors import UsageError
from ..files import save_figure, write_json, write_rows
from ..optim import mirror_step
from ..provenance import provenance

#: method name -> (kind, beta): kind "pilot" = α(‖m‖² + ‖w‖²) on m ⊙ w; "opt" = the same flow as
#: an optimizer on x; "l1_m" = λ‖m‖₁ on m ⊙ w; "l1_x" = λ‖x‖₁ on x itself.
METHODS: dict[str, tuple[str, float]] = {
    "pilot": ("pilot", 1.0),
    "pilot_opt": ("opt", 1.0),
    "pilot_beta0": ("pilot", 0.0),
    "l1_m": ("l1_m", 1.0),
    "l1_x": ("l1_x", 0.0),
}


@dataclass
class DiagConfig:
    n: int = option(100, "dimensions")
    d: int = option(40, "samples, d < n")
    k: int = option(5, "nonzeros of the ground truth")
    inits: int = option(5, "initializations")
    seed: int = option(0, "seed of the problem and the initializations")
    steps: int = option(50_000, "gradient steps")
    lr: float = option(0.02, "step size η")
    sgd_batch: int | None = option(None, "SGD with this many samples per step and --sgd-seeds "
                                   "seeds per init (writes fig5.png); None: gradient descent")
    sgd_seeds: int = option(5, "SGD runs per initialization")
    l1_step: str = option("prox", "discretization of the L1 baselines (prox: "
                          "soft-thresholding)", choices=("prox", "subgradient"))
    records: int = option(200, "log-spaced points kept per trajectory in trajectories.csv")
    # The strength grid: 4 constants per method, and the α0 of the harmonic (α0/(k+1)),
    # quadratic (α0/(k+1)²) and geometric (α0·0.95^k) schedules. Chosen so that each method's
    # best schedule lies inside the grid, with the decaying schedules' A_∞ reaching the rich
    # regime; see README for why.
    constants: dict[str, list[float]] = option({
        "pilot": [1e-4, 1e-3, 1e-2, 1e-1], "pilot_opt": [1e-4, 1e-3, 1e-2, 1e-1],
        "pilot_beta0": [1e-3, 1e-2, 1e-1, 1.0],
        "l1_m": [1e-4, 1e-3, 1e-2, 1e-1], "l1_x": [1e-4, 1e-3, 1e-2, 1e-1]},
        "the constant strengths of each method", cli=False)
    alpha0: dict[str, float] = option({"pilot": 1.0, "pilot_opt": 1.0, "pilot_beta0": 1.0,
                                       "l1_m": 0.1, "l1_x": 0.1},
                                      "α0 of each method's decaying schedules", cli=False)

    def validate(self) -> None:
        if not 0 < self.k <= self.n or self.d < 1 or self.n < 2:
            raise UsageError(f"need 0 < k <= n and d >= 1, got n={self.n} d={self.d} k={self.k}")
        if self.inits < 1 or self.steps < 1 or not self.lr > 0 or self.records < 2:
            raise UsageError("inits and steps must be >= 1, records >= 2 and lr > 0")
        if self.l1_step not in ("prox", "subgradient"):
            raise UsageError(f"l1_step must be 'prox' or 'subgradient', got {self.l1_step!r}")
        if self.sgd_batch is not None and not 1 <= self.sgd_batch <= self.d:
            raise UsageError(f"--sgd-batch must be in [1, d={self.d}], got {self.sgd_batch}")


def schedule_grid(cfg: DiagConfig, method: str) -> dict[str, S.Schedule]:
    """The 7 schedules of one method, by name."""
    grid: dict[str, S.Schedule] = {f"const_{a:g}": S.Constant(a) for a in cfg.constants[method]}
    a0 = cfg.alpha0[method]
    grid["harmonic"] = S.Harmonic(a0)
    grid["quadratic"] = S.Quadratic(a0)
    grid["geometric"] = S.Geometric(a0, 0.95)
    return grid


def make_problem(cfg: DiagConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    Z = torch.randn(cfg.d, cfg.n, generator=g, dtype=torch.float64)
    x_star = torch.zeros(cfg.n, dtype=torch.float64)
    support = torch.randperm(cfg.n, generator=g)[: cfg.k]
    x_star[support] = torch.randn(cfg.k, generator=g, dtype=torch.float64)
    x0 = torch.randn(cfg.inits, cfg.n, generator=g, dtype=torch.float64) / math.sqrt(cfg.n)
    return {"Z": Z, "Y": Z @ x_star, "x_star": x_star, "x0": x0}


def _record_steps(steps: int, records: int) -> torch.Tensor:
    pts = torch.logspace(0, math.log10(steps), records, dtype=torch.float64).round().long()
    return torch.unique(torch.cat([torch.tensor([0]), pts]))


def simulate(cfg: DiagConfig, problem: dict[str, torch.Tensor], progress: bool = True) -> dict:
    """Run every (method, schedule, init[, seed]) at once; returns runs, trajectories, finals."""
    cfg.validate()
    Z, Y, x_star, x0 = problem["Z"], problem["Y"], problem["x_star"], problem["x0"]
    seeds = cfg.sgd_seeds if cfg.sgd_batch else 1
    runs = [(meth, name, sched, i, s)
            for meth in METHODS for name, sched in schedule_grid(cfg, meth).items()
            for i in range(cfg.inits) for s in range(seeds)]
    R = len(runs)
    kind = [METHODS[r[0]][0] for r in runs]
    beta = torch.tensor([METHODS[r[0]][1] for r in runs], dtype=torch.float64)[:, None]
    col = lambda flags: torch.tensor(flags, dtype=torch.float64)[:, None]  # noqa: E731
    is_pilot = col([k == "pilot" for k in kind])
    is_opt = col([k == "opt" for k in kind])
    is_l1 = 1 - is_pilot - is_opt
    w_moves = col([k in ("pilot", "l1_m") for k in kind])
    # α per run and per unit of flow time: k = floor(t)
    units = math.floor(cfg.steps * cfg.lr) + 1
    tables = {(r[0], r[1]): [r[2](k) for k in range(units)] for r in runs}
    table = torch.tensor([tables[r[0], r[1]] for r in runs], dtype=torch.float64)

    xi = x0[[r[3] for r in runs]]
    m, w = _init(xi, beta, is_l1_x=1 - w_moves)  # x itself (in m, w = 1) for l1_x and opt
    rec = _record_steps(cfg.steps, cfg.records)
    traj = torch.empty(R, len(rec), dtype=torch.float64)
    A = torch.zeros(R, dtype=torch.float64)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt_rows = [j for j, k in enumerate(kind) if k == "opt"]
    ri, eta, prox = 0, cfg.lr, cfg.l1_step == "prox"
    for step in tqdm(range(cfg.steps + 1), desc="diag", disable=not progress, mininterval=1):
        x = m * w
        if step == rec[ri]:
            traj[:, ri] = (x - x_star).norm(dim=1)
            ri += 1
        if step == cfg.steps:
            break
        a = table[:, min(int(step * eta), units - 1)][:, None]
        g = _grad(x, Z, Y, cfg.sgd_batch, gen)
        decay = 2 * a * is_pilot  # PILoT: + 2α m, + 2α w
        lam = a * is_l1  # L1 on m, or on x (stored in m with w = 1)
        m_new = m - eta * (g * w + decay * m)
        w = w - eta * (g * m + decay * w) * w_moves
        if prox:  # soft-threshold m by ηλ
            m_new = torch.sign(m_new) * (m_new.abs() - eta * lam).clamp_min(0)
        else:  # subgradient λ·sign(m), sign(0) = 0
            m_new = m_new - eta * lam * torch.sign(m)
        if opt_rows:  # the optimizer form: mirror descent on x with c = β/2·e^{−4A}
            logc = math.log(0.5) - 4 * A[opt_rows][:, None]
            m_new[opt_rows] = mirror_step(m[opt_rows], 2 * eta * g[opt_rows], logc,
                                          logc - 4 * eta * a[opt_rows])
        m = m_new
        A += eta * a[:, 0]
    return {"runs": runs, "record_steps": rec, "traj": traj, "x": m * w, "A": A,
            "residual": (m * w @ Z.T - Y).norm(dim=1)}


def _init(x0: torch.Tensor, beta: torch.Tensor, is_l1_x: torch.Tensor):
    # m0² − w0² = β, m0 w0 = x0 for the m ⊙ w methods; (m, w) = (x0, 1) for L1 on x.
    m = torch.sqrt((beta + torch.sqrt(beta**2 + 4 * x0**2)) / 2)
    w = torch.where(m > 0, x0 / m.clamp_min(1e-300), torch.zeros_like(x0))
    return torch.where(is_l1_x > 0, x0, m), torch.where(is_l1_x > 0, torch.ones_like(x0), w)


def _grad(x, Z, Y, batch, gen):
    if batch is None:
        return (x @ Z.T - Y) @ Z / Z.shape[0]
    idx = torch.rand(x.shape[0], Z.shape[0], generator=gen).argsort(dim=1)[:, :batch]
    Zb, Yb = Z[idx], Y[idx]  # (R, B, n), (R, B): each run draws its own mini-batch
    r = torch.einsum("rbn,rn->rb", Zb, x) - Yb
    return torch.einsum("rb,rbn->rn", r, Zb) / batch


# ----------------------------------------------------------------------------------------------
# summary, files, figures


def summarize(cfg: DiagConfig, problem: dict, sim: dict) -> dict:
    """Final errors per (method, schedule), each method's best, basis pursuit and the KKT gap."""
    xs_norm = float(problem["x_star"].norm())
    final = sim["traj"][:, -1]
    table: dict[str, dict[str, dict]] = {}
    for meth in METHODS:
        table[meth] = {}
        for name in schedule_grid(cfg, meth):
            idx = [j for j, r in enumerate(sim["runs"]) if r[0] == meth and r[1] == name]
            e = final[idx]
            table[meth][name] = {
                "final_error": float(e.mean()), "final_error_std": float(e.std()) if len(e) > 1
                else 0.0, "relative_error": float(e.mean()) / xs_norm,
                "residual": float(sim["residual"][idx].mean()), "A": float(sim["A"][idx[0]])}
    best = {m: min(t, key=lambda s, t=t: t[s]["final_error"]) for m, t in table.items()}
    bp = theory.basis_pursuit(problem["Z"], problem["Y"])
    kkt = {name: _kkt_gaps(problem, sim, name)
           for name in ("harmonic", "quadratic", "geometric", best["pilot"])}
    kkt_opt = _kkt_gaps(problem, sim, best["pilot_opt"], method="pilot_opt")
    return {
        "x_star_norm": xs_norm,
        "methods": {m: {"best_schedule": best[m], "final_error": table[m][best[m]]["final_error"],
                        "relative_error": table[m][best[m]]["relative_error"]} for m in METHODS},
        "basis_pursuit_error": float((bp - problem["x_star"]).norm()),
        "kkt_gap": max(kkt[best["pilot"]]),
        "kkt_gap_pilot_opt": max(kkt_opt),
        # the same for each decaying PILoT schedule (max over inits), with the distance between
        # the theory's limit and x*, to show the gap is not just both being close to x*
        "kkt_gap_by_schedule": {name: max(g) for name, g in kkt.items()},
        "theory_limit_error_by_schedule": _limit_errors(problem, sim, list(kkt)),
        "table": table,
    }


def _theory_limits(problem: dict, sim: dict, schedule: str, method: str = "pilot"):
    """(run index, argmin_{Zx=Y} R_{c_∞}(x)) for each run of `method` (pilot or pilot_opt) with
    `schedule`, with c_∞ = β/2·exp(−4A) from that run's own A and z0 from its own
    initialization."""
    beta = METHODS[method][1]
    for j, r in enumerate(sim["runs"]):
        if r[0] == method and r[1] == schedule:
            z0 = theory.z0_from_x0(problem["x0"][r[3]], beta)
            yield j, theory.mirror_interpolator(problem["Z"], problem["Y"], z0,
                                                theory.log_c(beta, float(sim["A"][j])))


def _kkt_gaps(problem: dict, sim: dict, schedule: str, method: str = "pilot") -> list[float]:
    """‖x_T − argmin R_{c_∞}‖ / ‖argmin R_{c_∞}‖ per run (Theorem 3.3's limit)."""
    return [float((sim["x"][j] - target).norm() / target.norm())
            for j, target in _theory_limits(problem, sim, schedule, method)]


def _limit_errors(problem: dict, sim: dict, schedules: list[str]) -> dict[str, float]:
    return {s: max(float((t - problem["x_star"]).norm()) for _, t in
                   _theory_limits(problem, sim, s)) for s in schedules}


def write_csv(path: Path, cfg: DiagConfig, sim: dict) -> None:
    rows = ({"method": meth, "schedule": name, "init": i, "seed": s, "step": st,
             "t": f"{st * cfg.lr:.6g}", "error": f"{float(sim['traj'][j, c]):.6e}"}
            for j, (meth, name, _, i, s) in enumerate(sim["runs"])
            for c, st in enumerate(sim["record_steps"].tolist()))
    write_rows(path, rows)


LABELS = {"pilot": "PILoT (β=1)", "pilot_opt": "PILoT as an optimizer on x (β=1)",
          "pilot_beta0": "PILoT, spred init (β=0)", "l1_m": "L1 on m", "l1_x": "L1 on x"}


def _mean_traj(cfg, sim, meth, name):
    idx = [j for j, r in enumerate(sim["runs"]) if r[0] == meth and r[1] == name]
    t = sim["record_steps"].double() * cfg.lr
    tr = sim["traj"][idx]
    return t[1:], tr.mean(0)[1:], tr.min(0).values[1:], tr.max(0).values[1:]


def plot_all(out: Path, cfg: DiagConfig, problem: dict, sim: dict, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    xs_norm = summary["x_star_norm"]
    colors = plt.cm.viridis([i / 6 for i in range(7)])  # by position in a method's grid

    def axes_style(ax, title):
        ax.set(xscale="log", yscale="log", xlabel="flow time t = step · η",
               ylabel="‖x_t − x*‖₂ (mean over runs)", title=title)
        ax.axhline(0.01 * xs_norm, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)

    mode = f"SGD, batch {cfg.sgd_batch}" if cfg.sgd_batch else "gradient descent"
    # fig1a: β = 1 vs β = 0 for every strength
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for meth, ls in (("pilot", "-"), ("pilot_beta0", "--")):
        for i, name in enumerate(schedule_grid(cfg, meth)):
            t, mean, _, _ = _mean_traj(cfg, sim, meth, name)
            ax.plot(t, mean, ls=ls, color=colors[i], label=f"β={METHODS[meth][1]:g}: {name}")
    axes_style(ax, f"Initialization: β = 1 (solid) vs spred's β = 0 (dashed); {mode}")
    ax.legend(fontsize=6, ncol=2)
    written.append(_save(fig, out / "fig1a.png"))

    # fig1b (or fig5 under SGD): each method's best schedule, band = min..max over runs
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for meth in METHODS:
        name = summary["methods"][meth]["best_schedule"]
        t, mean, lo, hi = _mean_traj(cfg, sim, meth, name)
        line, = ax.plot(t, mean, label=f"{LABELS[meth]}: {name}")
        ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.2)
    axes_style(ax, f"Best schedule per method; {mode} (dotted: 1% of ‖x*‖)")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / ("fig5.png" if cfg.sgd_batch else "fig1b.png")))

    # fig4: all schedules of every method
    fig, axs = plt.subplots(2, 3, figsize=(15, 8), sharex=True, sharey=True)
    for ax, meth in zip(axs.flat, METHODS):
        for i, name in enumerate(schedule_grid(cfg, meth)):
            t, mean, _, _ = _mean_traj(cfg, sim, meth, name)
            ax.plot(t, mean, color=colors[i], label=name)
        axes_style(ax, LABELS[meth])
        ax.legend(fontsize=7)
    fig.suptitle(f"All schedules ({mode})")
    written.append(_save(fig, out / "fig4.png"))

    # fig1c: the potential R for n = 1 as A grows
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    x = torch.linspace(-2, 2, 801, dtype=torch.float64)
    x0 = 0.5
    z0 = theory.z0_from_x0(torch.tensor(x0, dtype=torch.float64), 1.0)
    for A in (0.0, 0.25, 0.5, 1.0, 2.0, 5.0):
        logc = theory.log_c(1.0, A)
        vals = torch.stack([theory.R(v.reshape(1), logc, z0.reshape(1)) for v in x])
        vals = (vals - vals.min()) / (0.5 * -logc)  # shape comparable across A
        ax.plot(x, vals, label=f"A = {A:g}")
    ax.plot(x, x.abs(), "k:", label="|x|")
    ax.set(xlabel="x", ylabel="(R_c(x) − min R_c) / (½ log(1/c))",
           title=f"Potential for n = 1, x0 = {x0}, β = 1: minimum e^(−4A)·x0 → 0, shape → |x|")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    written.append(_save(fig, out / "fig1c.png"))
    return written


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    save_figure(fig, path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def run(cfg: DiagConfig, out: Path | str, progress: bool = True) -> dict:
    """Simulate, then write results.json, trajectories.csv and the figures into `out`."""
    cfg.validate()
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    problem = make_problem(cfg)
    sim = simulate(cfg, problem, progress)
    summary = summarize(cfg, problem, sim)
    write_csv(out / "trajectories.csv", cfg, sim)
    figures = plot_all(out, cfg, problem, sim, summary)
    summary["seconds"] = time.time() - t0
    result = {"provenance": provenance(), "config": asdict(cfg), "figures": figures, **summary}
    write_json(out / "results.json", result)
    return result


def headline(result: dict) -> dict:
    """The one-line JSON summary printed last by `mirrorprune diag`."""
    return {
        "methods": result["methods"],
        "basis_pursuit_error": result["basis_pursuit_error"],
        "kkt_gap": result["kkt_gap"],
        "kkt_gap_pilot_opt": result["kkt_gap_pilot_opt"],
        "seconds": round(result["seconds"], 1),
    }


CONFIG = DiagConfig  # the command line's options (cli.py)
