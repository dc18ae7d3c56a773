"""Test-time ensembling of affine-invariant depth members (pure functions, torch).

Marigold's members each carry their own unknown scale and shift. Like diffusers'
``ensemble_depth`` we give member i parameters (s_i, t_i) and minimise the pairwise
disagreement of the aligned members

    sum_{i<j} mean((s_i x_i + t_i - s_j x_j - t_j)^2),

where x_i is member i min-max normalised to [0,1] (diffusers' initialisation). The
objective is a quadratic form in p = (s, t), so instead of scipy BFGS with numerical
gradients (hundreds of full-resolution medians) we solve it in closed form: it only needs
the members' Gram matrix, one [E,P]x[P,E] product. The trivial solution s = 0 and the two
gauge directions (a common scale and shift of all members) are fixed by the constraints
sum(s_i sd_i) = sum(sd_i) and mean(t) = 0, sd_i the standard deviation of x_i: the aligned
members keep the normalised members' average spread. Weighting by sd_i matters: with a
plain mean(s) = 1 a constant member (x_i = 0, its s_i free) takes all the scale and every
other member collapses to s = 0, a zero-cost but meaningless solution. diffusers fixes the
gauge with its [0,1] regulariser instead; both finish by normalising the fused depth to
[0,1], so the gauge never reaches the output.

Fusion: the median is a true median (mean of the two middle members at even E; torch.median
would return the lower one, which biases even ensembles towards near and makes the MAD 0 at
E = 2); the mean comes with the unbiased standard deviation, as in diffusers. Why and where
this differs from diffusers: docs/ensembling.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REDUCTIONS = ("median", "mean")


@dataclass
class EnsembleResult:
    depth: torch.Tensor  # [V,h,w] fused, each view normalised to [0,1]
    uncertainty: torch.Tensor  # [V,h,w] >= 0, MAD (median) or std (mean), in output units
    scale: torch.Tensor  # [V,E] per-member scale applied to the normalised member
    shift: torch.Tensor  # [V,E] per-member shift


def normalize_members(members: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min-max normalise each member to [0,1]: [V,E,h,w] -> [V,E,h,w]."""
    flat = members.flatten(2)  # [V,E,P]
    lo = flat.amin(dim=2, keepdim=True)
    hi = flat.amax(dim=2, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(members)


def solve_alignment(members: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form joint scale/shift per member that makes members agree.

    members: [V,E,h,w] (already normalised). Returns scale, shift: [V,E] each, with
    sum(scale * sd) = sum(sd) (sd: each member's standard deviation) and mean(shift) = 0
    per view. Members that are all alike have equal sd, so then mean(scale) = 1.
    """
    v, e = members.shape[:2]
    x = members.flatten(2).to(torch.float64)  # [V,E,P]
    n_pix = x.shape[2]
    gram = x @ x.transpose(1, 2) / n_pix  # [V,E,E]  E[x_i x_j]
    mu = x.mean(dim=2)  # [V,E]             E[x_i]

    # K[a,b] = E[f_a f_b] for features f = (x_1..x_E, 1..1); objective = p^T (E*D - K) p,
    # where D keeps only the entries of K that couple a member with itself.
    k = torch.empty(v, 2 * e, 2 * e, dtype=torch.float64, device=members.device)
    k[:, :e, :e] = gram
    k[:, :e, e:] = mu.unsqueeze(2).expand(v, e, e)
    k[:, e:, :e] = mu.unsqueeze(1).expand(v, e, e)
    k[:, e:, e:] = 1.0
    eye = torch.eye(e, dtype=torch.float64, device=members.device)
    d = torch.zeros_like(k)
    d[:, :e, :e] = gram * eye
    d[:, :e, e:] = torch.diag_embed(mu)
    d[:, e:, :e] = torch.diag_embed(mu)
    d[:, e:, e:] = eye
    q = e * d - k  # [V,2E,2E], positive semi-definite
    q = q + ridge * torch.eye(2 * e, dtype=torch.float64, device=members.device)

    # KKT system of: minimise p^T q p  subject to  sum(s*sd) = sum(sd), sum(t) = 0.
    sd = (torch.diagonal(gram, dim1=1, dim2=2) - mu**2).clamp_min(0).sqrt()  # [V,E]
    # A view whose members are all constant has no spread to keep: fall back to mean(s) = 1.
    sd = torch.where(sd.sum(dim=1, keepdim=True) > 1e-12, sd, torch.ones_like(sd))
    c = torch.zeros(v, 2, 2 * e, dtype=torch.float64, device=members.device)
    c[:, 0, :e] = sd
    c[:, 1, e:] = 1.0
    kkt = torch.zeros(v, 2 * e + 2, 2 * e + 2, dtype=torch.float64, device=members.device)
    kkt[:, : 2 * e, : 2 * e] = 2 * q
    kkt[:, : 2 * e, 2 * e :] = c.transpose(1, 2)
    kkt[:, 2 * e :, : 2 * e] = c
    rhs = torch.zeros(v, 2 * e + 2, 1, dtype=torch.float64, device=members.device)
    rhs[:, 2 * e, 0] = sd.sum(dim=1)
    p = torch.linalg.solve(kkt, rhs)[:, : 2 * e, 0]  # [V,2E]
    return p[:, :e].to(members.dtype), p[:, e:].to(members.dtype)


def middle(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """True median along dim: the middle value for an odd count, the mean of the two
    middle values for an even count (torch.median returns the lower one)."""
    n = x.shape[dim]
    if n % 2:
        return x.median(dim=dim).values
    both = x.topk(n // 2 + 1, dim=dim, largest=False).values.narrow(dim, n // 2 - 1, 2)  # two middles
    return both.mean(dim=dim)


def fuse(aligned: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse aligned members [V,E,h,w] -> depth, uncertainty [V,h,w].

    median: depth = true median (mean of the two middle members at even E), uncertainty
    = median absolute deviation from it (no 1.4826 consistency factor, like diffusers).
    mean: depth = mean, uncertainty = unbiased standard deviation (like diffusers).
    """
    if aligned.shape[1] < 2:
        raise ValueError(f"fuse needs at least 2 members, got {aligned.shape[1]}")
    if reduction == "median":
        depth = middle(aligned, dim=1)  # [V,h,w]
        uncertainty = middle((aligned - depth.unsqueeze(1)).abs(), dim=1)  # [V,h,w]
    elif reduction == "mean":
        depth = aligned.mean(dim=1)  # [V,h,w]
        uncertainty = aligned.std(dim=1, correction=1)  # [V,h,w]
    else:
        raise ValueError(f"ensemble_reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return depth, uncertainty


def ensemble_depth(members: torch.Tensor, reduction: str = "median") -> EnsembleResult:
    """Align, fuse and normalise ensemble members.

    members: [V,E,h,w] affine-invariant depth, E members for each of V views.
    With E = 1 the member is returned as is (it is already in [0,1]) with zero
    uncertainty, exactly like diffusers with ensemble_size=1.
    """
    if members.ndim != 4:
        raise ValueError(f"members must be [V,E,h,w], got {tuple(members.shape)}")
    v, e = members.shape[:2]
    members = members.float()
    if e == 1:
        ones = torch.ones(v, 1, dtype=members.dtype, device=members.device)
        return EnsembleResult(members[:, 0], torch.zeros_like(members[:, 0]), ones, ones * 0)

    # 1. Normalise each member to [0,1] so the solve is well conditioned.
    x = normalize_members(members)  # [V,E,h,w]
    # 2. Joint scale/shift per member, closed form.
    scale, shift = solve_alignment(x)  # [V,E], [V,E]
    aligned = x * scale[:, :, None, None] + shift[:, :, None, None]  # [V,E,h,w]
    # 3. Fuse members; uncertainty in the same units as the fused depth.
    depth, uncertainty = fuse(aligned, reduction)  # [V,h,w] x2
    # 4. Normalise the fused depth to [0,1]; uncertainty follows the same scale.
    flat = depth.flatten(1)
    lo = flat.amin(dim=1)[:, None, None]
    rng = (flat.amax(dim=1)[:, None, None] - lo).clamp_min(1e-6)
    depth = (depth - lo) / rng
    uncertainty = uncertainty / rng
    return EnsembleResult(depth.clamp(0.0, 1.0), uncertainty, scale, shift)
