"""Weight update ``admm``: choose a layer's mask and solve its kept weights together by ADMM with gradual pruning
(Boža, "Fast and Effective Weight Update for Pruned Large Language Models", 2024).

The layer problem is ``min ||(W - W') X||^2`` over weights ``W'`` with the mask's zeros. ADMM splits it into a
least-squares step on ``W'`` (one fixed linear solve, shared by every row) and a projection ``Z`` of ``W' + U``
onto the allowed masks; the scaled dual ``U`` carries what the projection removed into the next least-squares
step, so the mask is chosen on weights that have already started to compensate for it. The sparsity of the
projection rises along a cubic schedule over the first ``gradual`` iterations (a little pruned early, most late),
then the mask stays fixed for the remaining iterations. Everything runs in input-normalised coordinates (each
column scaled by its input's norm), where the projection's magnitude is Wanda's score |W| * ||X|| and one penalty
``rho`` suits every layer. The kept weights are finally solved for the final mask in least squares
(``besa.stages.update.masked_least_squares``), so pruned weights are exactly 0 and the survivors are the optimum
of their mask.

Which masks are allowed is a ``MaskChoice`` (``besa.stages.update``): a share of the whole layer, learned counts
per row (BESA), N:M groups, or a mask given in advance (only the weights are solved then).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from besa.stages.update import MaskChoice, masked_least_squares

__all__ = [
    "AdmmSettings",
    "AdmmState",
    "gradual_fraction",
    "choose_mask",
    "admm_iterate",
    "admm_prune",
    "admm_saliency",
]


@dataclass(frozen=True)
class AdmmSettings:
    """How ``admm_prune`` runs (the defaults are the paper's, apart from the final exact solve).

    Args:
        iters: ADMM iterations.
        gradual: iterations over which the projection's sparsity rises to the target (0: the mask is chosen once,
            from the dense weights, and only the weights are solved).
        rho: the ADMM penalty, in input-normalised coordinates (the Hessian's diagonal is 1 there).
        percdamp: ridge toward the dense weights added to the normalised Hessian during the iterations.
        lsq_iters: conjugate-gradient steps of the final least-squares solve of the kept weights (0: the ADMM
            iterate itself), with SparseGPT's dampening (``lsq_percdamp``).
        lsq_percdamp: dampening of that solve, as a fraction of the Hessian's mean diagonal.
    """

    iters: int = 20
    gradual: int = 15
    rho: float = 1.0
    percdamp: float = 0.1
    lsq_iters: int = 20
    lsq_percdamp: float = 0.01

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise ValueError(f"ADMM needs at least one iteration, got {self.iters}")
        if not 0 <= self.gradual <= self.iters:
            raise ValueError(f"ADMM's gradual iterations must be in [0, iters], got {self.gradual}")
        if self.rho <= 0 or self.percdamp < 0:
            raise ValueError(f"ADMM needs rho > 0 and percdamp >= 0, got {self.rho}, {self.percdamp}")


def gradual_fraction(step: int, gradual: int) -> float:
    """Share of the final pruned weights that iteration ``step`` (0-based) prunes: ``1 - (1 - (step+1)/gradual)^3``
    while ``step < gradual``, then 1 (a cubic schedule: few weights go early, most late)."""
    if step >= gradual:
        return 1.0
    return 1.0 - (1.0 - (step + 1) / gradual) ** 3


def choose_mask(saliency: torch.Tensor, choice: MaskChoice, fraction: float = 1.0) -> torch.Tensor:
    """The prune mask (``True`` = pruned) that ``choice`` allows for ``saliency`` (rows, cols), thinned to its
    ``fraction`` of lowest-saliency weights (rounded; 1: the whole mask, with its exact structure)."""
    if choice.group is not None:
        full = choice.group_mask(saliency)
    else:
        full = choice.block_mask(saliency, 0, saliency.shape[1])
    if fraction >= 1.0:
        return full
    k = round(fraction * int(full.sum()))
    candidates = saliency.masked_fill(~full, float("inf")).flatten()
    order = torch.argsort(candidates, stable=True)
    mask = torch.zeros(saliency.numel(), dtype=torch.bool, device=saliency.device)
    mask[order[:k]] = True
    return mask.reshape(saliency.shape)


@dataclass
class AdmmState:
    """Where ``admm_iterate`` ended, in input-normalised coordinates: the least-squares iterate, the scaled dual,
    the final prune mask, the saliency |W' + U| that mask was chosen by, and the inputs' norms and dead inputs."""

    weight: torch.Tensor
    dual: torch.Tensor
    prune: torch.Tensor
    saliency: torch.Tensor
    norm: torch.Tensor
    dead: torch.Tensor


def admm_iterate(
    w: torch.Tensor, hessian: torch.Tensor, choice: MaskChoice, settings: AdmmSettings
) -> AdmmState:
    """The ADMM iterations with gradual pruning on weight ``w`` (out, in) and its inputs' Hessian (in, in), before
    any final solve (``admm_prune`` and ``admm_saliency`` read what they need of it)."""
    h = hessian.float()
    dead = h.diagonal() <= 0
    norm = h.diagonal().clamp_min(0).sqrt()
    norm[dead] = 1.0
    hn = h / norm.unsqueeze(0) / norm.unsqueeze(1)  # unit diagonal (dead inputs: a zero row and column)
    diag = torch.arange(hn.shape[0], device=hn.device)
    hn[diag[dead], diag[dead]] = 1.0
    w0 = w.float() * norm
    w0[:, dead] = 0
    hn[diag, diag] += settings.percdamp  # the ridge pulls toward w0
    target = w0 @ hn
    hn[diag, diag] += settings.rho
    chol = torch.linalg.cholesky(hn)
    weight, dual = w0.clone(), torch.zeros_like(w0)
    saliency = w0.abs()
    prune = choose_mask(saliency, choice)  # gradual = 0: the mask of the dense weights, kept throughout
    for step in range(settings.iters):
        if step < settings.gradual:
            saliency = (weight + dual).abs()
            prune = choose_mask(saliency, choice, gradual_fraction(step, settings.gradual))
        z = (weight + dual).masked_fill(prune, 0)
        dual = dual + weight - z
        # (target + rho (z - u)) (H + damp + rho)^-1, H symmetric: solved as its transpose
        weight = torch.cholesky_solve((target + settings.rho * (z - dual)).t(), chol).t()
    return AdmmState(weight, dual, prune, saliency, norm, dead)


def admm_prune(
    w: torch.Tensor, hessian: torch.Tensor, choice: MaskChoice, settings: AdmmSettings | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune weight ``w`` (out, in) given its inputs' Hessian (in, in) (H = 2/N X X^T, any positive scale); return
    (new weight, prune mask). The mask has exactly the structure ``choice`` asks for; pruned weights, and the weights
    of inputs that never fire, are exactly 0 (a dead input's weight is pruned first, as its saliency is 0)."""
    settings = settings if settings is not None else AdmmSettings()
    state = admm_iterate(w, hessian, choice, settings)
    prune = state.prune
    z = (state.weight + state.dual).masked_fill(prune, 0) / state.norm
    z[:, state.dead] = 0
    if settings.lsq_iters:
        z = masked_least_squares(w, hessian, prune, z, settings.lsq_iters, settings.lsq_percdamp)
    return z.to(w.dtype), prune


def admm_saliency(
    w: torch.Tensor, hessian: torch.Tensor, choice: MaskChoice, settings: AdmmSettings | None = None
) -> torch.Tensor:
    """ADMM's importance of every weight of ``w`` (out, in): the saliency |W' + U| (input-normalised) its final
    mask was chosen by, in float32, 0 for inputs that never fire. Choosing ``choice``'s mask of it, lowest first,
    gives ``admm_prune``'s mask; unlike that mask it ranks every weight, so BESA can start from it (``--metric
    admm``) and move away."""
    state = admm_iterate(w, hessian, choice, settings if settings is not None else AdmmSettings())
    return state.saliency.masked_fill(state.dead.unsqueeze(0), 0.0)
