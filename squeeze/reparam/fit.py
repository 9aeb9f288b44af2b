"""Initialising a replacement from the trained conv it replaces, by least squares on the conv's own responses to
sampled training images (not from scratch): GhostNet and LegoNet train their layers from random weights, a
trained model's conv already knows what its outputs should be.

Ghost: the primary conv keeps m of the n original filters, the cheap depthwise ops reproduce the other n - m
outputs, each from one primary channel through a d x d filter. Which channels are primary, and which primary
feeds which cheap output, is chosen from the relative least-squares error of every (source, target) pair: a
greedy facility location picks the m sources that explain the others best, then the pairs are assigned in order
of error with s - 1 cheap outputs per source. Exact on the primary channels, a closed form on the others.

Layers are fitted in model order, each on its inputs in the model as replaced so far and to the original
layer's outputs: a dense least-squares re-fit of the conv to those (`effective_conv`) first, so that a layer
corrects what the layers before it got wrong instead of compounding it.

Lego: the slides' objective, min over B, M of sum_i ||Y - X_i^T (B M_i)||^2 with each M_i one-hot and scaled,
per input fragment f with its input statistics G_f = X_f^T X_f: alternate the assignment (for every output and
fragment the lego filter and coefficient that fit its filter best under G_f, in closed form) with the lego
filters (a quadratic in B, solved by conjugate gradients from the current B). Both steps only lower the
objective, which `LegoFit.errors` records per iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.reparam.modules import GhostConv2d, GhostSpec, LegoConv2d, LegoSpec
from squeeze.util.patches import sample_patches

__all__ = ["LayerData", "capture", "relative_error", "effective_conv", "fit_ghost", "fit_lego", "LegoFit"]

# Positions sampled for the pairwise cheap-op fits (bounded: the fit is R x n^2 x (d^2 + 1) multiply-adds).
_GHOST_ROWS = 8192


@dataclass
class LayerData:
    """A conv's inputs and outputs (bias included) on sampled images, split into fitting and held-out images."""

    x: torch.Tensor  # (N, c, H, W)
    y: torch.Tensor  # (N, n, H', W')
    x_check: torch.Tensor
    y_check: torch.Tensor


def capture(module: nn.Module, names: list[str], images: torch.Tensor, check_images: torch.Tensor,
            batch_size: int = 32) -> dict[str, LayerData]:
    """Inputs and outputs of the named convs of `module` (eval mode) on `images` and `check_images`."""
    got: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}

    def hook(name: str):
        def record(_m, inputs, output) -> None:
            got[name].append((inputs[0].detach(), output.detach()))

        return record

    handles = [module.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    training = module.training
    try:
        with torch.no_grad():
            module.eval()
            for batch in (images, check_images):
                for start in range(0, len(batch), batch_size):
                    module(batch[start:start + batch_size])
    finally:
        module.train(training)
        for h in handles:
            h.remove()
    out = {}
    for name, parts in got.items():
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        k = len(images)
        out[name] = LayerData(x[:k], y[:k], x[k:], y[k:])
    return out


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    """||pred - target||^2 / ||target||^2."""
    return float(((pred - target) ** 2).sum() / (target ** 2).sum().clamp_min(1e-12))


# --- Ghost -------------------------------------------------------------------------------------------------


def _patches(src: torch.Tensor, tgt: torch.Tensor, d: int, rows: int, generator: torch.Generator, bias: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, n, d^2 (+ 1)) d x d neighbourhoods of every source channel's map (with a constant 1 for a bias), and
    (R, n) the target maps at the same positions."""
    n_img, n, h, w = src.shape
    per_image = max(1, min(h * w, math.ceil(rows / n_img)))
    cols, centres = [], []
    for s_img, t_img in zip(src, tgt):  # one image at a time: unfold holds n d^2 H' W' values
        unf = F.unfold(s_img[None], d, padding=d // 2)[0].reshape(n, d * d, h * w)  # (n, d^2, L)
        idx = torch.randperm(h * w, generator=generator)[:per_image]
        cols.append(unf[:, :, idx].permute(2, 0, 1))
        centres.append(t_img.reshape(n, -1)[:, idx].T)
    a = torch.cat(cols).double()
    return torch.cat([a, torch.ones_like(a[..., :1])], -1) if bias else a, torch.cat(centres).double()


def _pair_fits(src: torch.Tensor, tgt: torch.Tensor, d: int, generator: torch.Generator, bias: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """For every source channel i and target t: the d x d filter (and bias) that best map source map i to
    target map t, (n, d^2 (+ 1), n), and its relative squared error, (n, n) (the diagonal: inf)."""
    a, t = _patches(src, tgt, d, _GHOST_ROWS, generator, bias)
    q = a.shape[-1]
    gram = torch.einsum("rnq,rnp->nqp", a, a)  # (n, q, q)
    gram += 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(q, dtype=a.dtype)
    rhs = torch.einsum("rnq,rt->nqt", a, t)  # (n, q, n)
    coef = torch.linalg.solve(gram, rhs)
    energy = (t ** 2).sum(0).clamp_min(1e-12)  # (n,)
    explained = (rhs * coef).sum(1)  # (n, n): ||t||^2 - residual, for least squares
    err = ((energy[None] - explained) / energy[None]).clamp(0.0, 1.0)
    err.fill_diagonal_(float("inf"))
    return coef, err


def _choose_sources(err: torch.Tensor, m: int) -> list[int]:
    """Greedy facility location: m channels that, as sources, leave the least error on the others."""
    n = err.shape[0]
    cost = torch.ones(n, dtype=err.dtype)  # a channel nothing explains yet: predicted as zero
    chosen: list[int] = []
    for _ in range(m):
        gain = cost + (cost[None] - err).clamp_min(0).sum(1)
        gain[chosen] = -float("inf")
        c = int(gain.argmax())
        chosen.append(c)
        cost = torch.minimum(cost, err[c])
        cost[chosen] = 0
    return sorted(chosen)


def _assign(err: torch.Tensor, sources: list[int], per_source: int) -> dict[int, int]:
    """Target channel -> source channel, pairs taken in order of error, at most `per_source` per source."""
    targets = [t for t in range(err.shape[0]) if t not in set(sources)]
    sub = err[sources][:, targets]  # (m, n - m)
    load = dict.fromkeys(sources, 0)
    out: dict[int, int] = {}
    for flat in torch.argsort(sub.flatten()).tolist():
        i, j = divmod(flat, len(targets))
        src, tgt = sources[i], targets[j]
        if tgt not in out and load[src] < per_source:
            out[tgt] = src
            load[src] += 1
            if len(out) == len(targets):
                break
    return out


def fit_ghost(conv: nn.Conv2d, spec: GhostSpec, data: LayerData, seed: int = 0) -> tuple[GhostConv2d, float]:
    """A Ghost module fitted to `conv`'s responses, and its relative error on the held-out images."""
    g = torch.Generator().manual_seed(seed)
    module = GhostConv2d(conv, spec)
    n, s, d = conv.out_channels, spec.ratio, spec.dw_size
    m = module.primary.out_channels
    bias = conv.bias is not None  # a conv followed by BN has none (unless the module absorbs the BN)
    with torch.no_grad():  # the primary channels as they will be computed, the cheap ops' inputs
        source = conv(data.x)
    coef, err = _pair_fits(source, data.y, d, g, bias)
    sources = _choose_sources(err, m)
    owner = _assign(err, sources, s - 1)
    order = torch.empty(n, dtype=torch.long)
    cheap_w = torch.zeros_like(module.cheap.weight)  # (m (s - 1), 1, d, d): cheap output j reads primary j // (s-1)
    cheap_b = torch.zeros(m * (s - 1))
    used = [0] * m
    with torch.no_grad():
        module.primary.weight.copy_(conv.weight[sources])
        if conv.bias is not None:
            module.primary.bias.copy_(conv.bias[sources])
        for slot, src in enumerate(sources):
            order[src] = slot
        for tgt, src in sorted(owner.items()):
            slot = sources.index(src)
            j = slot * (s - 1) + used[slot]
            used[slot] += 1
            cheap_w[j, 0] = coef[src, :d * d, tgt].reshape(d, d).float()
            if bias:
                cheap_b[j] = float(coef[src, d * d, tgt])
            order[tgt] = m + j
        module.cheap.weight.copy_(cheap_w)
        if bias:
            module.cheap.bias.copy_(cheap_b)
        module.order.copy_(order)
    return module, _check_error(module, data)


def effective_conv(conv: nn.Conv2d, data: LayerData, points: int = 64, seed: int = 0) -> nn.Conv2d:
    """A copy of `conv` re-fitted by least squares so that on `data.x` it outputs `data.y`: when data.x are
    the inputs of a model whose earlier layers were replaced, the filter that undoes their error (as AMC's
    reconstruction does for pruning). On the original inputs it is the conv itself, up to the sampling."""
    import copy

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(conv)
    unknowns = conv.in_channels * math.prod(conv.kernel_size) + 1
    points = max(points, math.ceil(2 * unknowns / len(data.x)))
    cols, y = sample_patches(conv, data.x, data.y, points, g)  # (R, c, k^2), (R, n) less the conv's bias
    if len(cols) < unknowns:
        return out
    a = cols.reshape(len(cols), -1).double()
    if conv.bias is not None:
        y = y + conv.bias.detach()
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
    gram = a.T @ a
    gram += 1e-6 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    sol = torch.linalg.solve(gram, a.T @ y.double())  # (c k^2 (+ 1), n)
    with torch.no_grad():
        k = conv.in_channels * math.prod(conv.kernel_size)
        out.weight.copy_(sol[:k].T.reshape(conv.weight.shape).float())
        if conv.bias is not None:
            out.bias.copy_(sol[k].float())
    # Kept only where it reproduces the held-out images better than the trained conv does.
    return out if _check_error(out, data) < _check_error(conv, data) else conv


def _check_error(module: nn.Module, data: LayerData) -> float:
    with torch.no_grad():
        return relative_error(module.eval()(data.x_check), data.y_check)


# --- Lego --------------------------------------------------------------------------------------------------


@dataclass
class LegoFit:
    errors: list[float] = field(default_factory=list)  # the objective per iteration, relative to the all-zero fit
    check_error: float = float("nan")  # relative output error on the held-out images


def fit_lego(conv: nn.Conv2d, spec: LegoSpec, data: LayerData, iterations: int = 10, points: int = 64,
             seed: int = 0, cg_steps: int = 10) -> tuple[LegoConv2d, LegoFit]:
    """A Lego conv fitted to `conv` under its input statistics on the sampled images."""
    g = torch.Generator().manual_seed(seed)
    module = LegoConv2d(conv, spec)
    n, o, m = conv.out_channels, spec.splits, module.legos
    cols, _ = sample_patches(conv, data.x, data.y, points, g)  # (R, c, k^2)
    frag = conv.in_channels // o
    x = cols.double().reshape(len(cols), o, frag * cols.shape[2])  # (R, o, d): fragment f's patches
    grams = torch.einsum("rfd,rfe->fde", x, x) / len(x)  # (o, d, d)
    w = conv.weight.detach().double().reshape(n, o, -1)  # (n, o, d): output j's filter on fragment f
    total = float(_quadratic(w, grams).sum())
    pick = torch.randperm(n * o, generator=g)[:m]
    lego = w.reshape(n * o, -1)[pick].clone()  # (m, d): start from m of the trained fragment filters
    fit = LegoFit()
    index = coef = None
    for _ in range(iterations):
        index, coef = _lego_assign(w, grams, lego)
        fit.errors.append(_lego_objective(w, grams, lego, index, coef) / total)
        lego = _lego_filters(w, grams, lego, index, coef, cg_steps)
    index, coef = _lego_assign(w, grams, lego)
    fit.errors.append(_lego_objective(w, grams, lego, index, coef) / total)
    with torch.no_grad():
        module.lego.copy_(lego.reshape(module.lego.shape).float())
        module.coef.copy_(coef.float())
        module.index.copy_(index)
        if conv.bias is not None:
            module.bias.copy_(conv.bias)
    _refit_coefficients(module, data, points, g)
    fit.check_error = _check_error(module, data)
    return module, fit


def _refit_coefficients(module: LegoConv2d, data: LayerData, points: int, generator: torch.Generator) -> None:
    """The coefficients (and bias) of each output re-fitted by least squares to the layer's outputs on its
    selected lego maps: the filter fit weighs each fragment alone and misses how the fragments' inputs
    correlate (the digits CNN's conv4: objective 0.24 of the filters' energy, output error 1.57 before this
    step)."""
    n, o, m = module.out_channels, module.splits, module.legos
    with torch.no_grad():
        maps = module.lego_maps(data.x).flatten(2)  # (N, o m, L)
    y = data.y.flatten(2)  # (N, n, L)
    idx = torch.randint(0, maps.shape[2], (len(maps), points), generator=generator)
    maps = maps.gather(2, idx[:, None].expand(-1, maps.shape[1], -1)).transpose(1, 2).reshape(-1, o * m)
    y = y.gather(2, idx[:, None].expand(-1, n, -1)).transpose(1, 2).reshape(-1, n).double()  # (R, n)
    a = maps[:, module.gather_index()].reshape(-1, n, o).double()  # (R, n, o): output j's maps
    if module.bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
    gram = torch.einsum("rjq,rjp->jqp", a, a)
    ridge = 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
    gram += ridge[:, None, None] * torch.eye(a.shape[-1], dtype=a.dtype)
    sol = torch.linalg.solve(gram, torch.einsum("rjq,rj->jq", a, y))  # (n, o (+ 1))
    with torch.no_grad():
        module.coef.copy_(sol[:, :o].float())
        if module.bias is not None:
            module.bias.copy_(sol[:, o].float())


def _lego_assign(w: torch.Tensor, grams: torch.Tensor, lego: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every output j and fragment f: the lego filter l and scale a minimising (w - a b_l)^T G_f (w - a b_l):
    a = b^T G w / b^T G b, the error falling by (b^T G w)^2 / b^T G b."""
    gb = torch.einsum("fde,le->fld", grams, lego)  # (o, m, d): G_f b_l
    num = torch.einsum("jfd,fld->jfl", w, gb)  # (n, o, m)
    den = torch.einsum("fld,ld->fl", gb, lego).clamp_min(1e-20)  # (o, m)
    index = (num ** 2 / den[None]).argmax(-1)  # (n, o)
    coef = num.gather(2, index[..., None])[..., 0] / torch.gather(den, 1, index.T).T  # den[f, index[j, f]]
    return index, coef


def _lego_objective(w, grams, lego, index, coef) -> float:
    return float(_quadratic(w - coef[..., None] * lego[index], grams).sum())


def _quadratic(r: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """(n, o): r_jf^T G_f r_jf for (n, o, d) rows."""
    return (torch.einsum("jfd,fde->jfe", r, grams) * r).sum(-1)


def _lego_filters(w, grams, lego, index, coef, steps: int) -> torch.Tensor:
    """The lego filters minimising the objective for a fixed assignment: for each l, H_l b = r_l with
    H_l = sum_f alpha_lf G_f (alpha_lf: the squared scales of the pairs using l on f) and
    r_l = sum_f G_f sum_j a_jf w_jf; conjugate gradients from the current filters, every l at once.
    A lego filter no pair uses is restarted at the worst-fitted fragment filter (the objective is unchanged:
    nothing uses it until the next assignment, which can only lower it)."""
    m = lego.shape[0]
    onehot = F.one_hot(index, m).double()  # (n, o, m)
    alpha = torch.einsum("jfl,jf->lf", onehot, coef ** 2)  # (m, o)
    v = torch.einsum("jfl,jf,jfd->lfd", onehot, coef, w)  # (m, o, d)
    rhs = sum(v[:, f] @ grams[f] for f in range(len(grams)))  # (m, d); G_f is symmetric

    def apply(b: torch.Tensor) -> torch.Tensor:  # H_l b_l for every l: (m, d)
        return sum(alpha[:, f, None] * (b @ grams[f]) for f in range(len(grams)))

    used = alpha.sum(1) > 0
    b = lego.clone()
    r = torch.where(used[:, None], rhs - apply(b), torch.zeros_like(b))
    p = r.clone()
    rr = (r * r).sum(1)
    for _ in range(steps):
        hp = apply(p)
        php = (p * hp).sum(1)
        step = torch.where(php > 1e-30, rr / php.clamp_min(1e-30), torch.zeros_like(rr))
        b = b + step[:, None] * p
        r = r - step[:, None] * hp
        rr_new = (r * r).sum(1)
        p = r + torch.where(rr > 1e-30, rr_new / rr.clamp_min(1e-30), torch.zeros_like(rr))[:, None] * p
        rr = rr_new
    if not used.all():
        worst = _quadratic(w - coef[..., None] * lego[index], grams).flatten().argsort(descending=True)
        flat = w.reshape(-1, w.shape[-1])
        for slot, src in zip(torch.nonzero(~used).flatten().tolist(), worst.tolist()):
            b[slot] = flat[src]
    return b
