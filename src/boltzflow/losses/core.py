"""KLz (maximum likelihood), KLx (reverse KL), KLz-df (importance weighted), the chi-square divergence
on data and L2+ (masked L2 with detached mean) with its two ablations. Formulas: science.md section 1; felardos2023 eqs. 4,
6, 7, 15 and appendix H. ``r(x) = -u(x) - log p_G(x)``; "detached" = no gradient.
"""

from __future__ import annotations

import torch

from ..energy.base import cap_norm
from ..errors import InputError
from ..sampling.pool import PoolConfig, ReweightedPool
from .base import EnergyFn, LossOutput, kish_ess, nan_loss, sample_stats


def _penalty(gen, x: torch.Tensor, weight: float) -> torch.Tensor | None:
    """``weight * mean(gen.penalty(x))`` or None when the weight is 0."""
    if not weight:
        return None
    return weight * gen.penalty(x).mean()


def _generated_penalty(gen, n: int, generator, weight: float) -> torch.Tensor | None:
    """The penalty of the data losses, taken on n generated configurations (None when the weight is 0)."""
    if not weight:
        return None
    x_g, _ = gen.sample_and_log_prob(n, generator=generator)
    return _penalty(gen, x_g, weight)


def _detached_batch(gen, energy: EnergyFn, n: int, generator, penalty_weight: float):
    """Sample n detached configurations, their energies (no gradient) and the penalty term.

    Returns (x detached, log_q detached, u detached, penalty or None)."""
    pen = None
    if penalty_weight:
        # the alignment penalty needs the path z -> x to carry gradient
        x_g, log_q = gen.sample_and_log_prob(n, generator=generator)
        pen = _penalty(gen, x_g, penalty_weight)
        x = x_g.detach()
    else:
        with torch.no_grad():
            x, log_q = gen.sample_and_log_prob(n, generator=generator)
    with torch.no_grad():
        u = energy(x)
    return x, log_q.detach(), u.detach(), pen


def _finish(loss: torch.Tensor, pen: torch.Tensor | None, metrics: dict[str, float]) -> torch.Tensor:
    if pen is not None:
        metrics["penalty"] = float(pen.detach())
        loss = loss + pen
    metrics["loss"] = float(loss.detach())
    return loss


def klz(gen, x_data: torch.Tensor, *, generator: torch.Generator | None = None, penalty_weight: float = 0.0) -> LossOutput:
    """Maximum likelihood on data (eq. 4): ``mean(-log p_G(x_data))``.

    x_data: (batch, ...) configurations from p_B (nm for molecules). With ``penalty_weight`` the
    penalty is taken on a generated batch of the same size."""
    nll = -gen.log_prob(x_data)
    ok = torch.isfinite(nll)
    loss = nll[ok].mean() if ok.any() else nan_loss(nll)
    metrics = {"nll": float(loss.detach()), "n_invalid": float((~ok).sum())}
    loss = _finish(loss, _generated_penalty(gen, x_data.shape[0], generator, penalty_weight), metrics)
    return LossOutput(loss=loss, metrics=metrics, samples=None, log_w=None, energy_evals=0)


def klx(gen, energy: EnergyFn, n: int, *, generator: torch.Generator | None = None, penalty_weight: float = 0.0) -> LossOutput:
    """Reverse KL (eq. 6): ``mean_z[u(G(z)) + log p_G(G(z))]``, differentiated through samples and energy."""
    x, log_q = gen.sample_and_log_prob(n, generator=generator)
    u = energy(x)
    valid, log_w, metrics = sample_stats(u, log_q)
    per = u + log_q
    loss = per[valid].mean() if valid.any() else nan_loss(per)
    pen = _penalty(gen, x, penalty_weight)
    loss = _finish(loss, pen, metrics)
    return LossOutput(loss=loss, metrics=metrics, samples=x.detach(), log_w=log_w, energy_evals=n)


def klx_path(gen, energy: EnergyFn, n: int, *, generator: torch.Generator | None = None, penalty_weight: float = 0.0,
             grad_max: float | None = None) -> LossOutput:
    """Reverse KL with the path gradient (Vaitl et al. 2022, "Gradients should stay on path"):
    the gradient of ``mean_z[u(x) + log p_G(x)]``, ``x = G(z)``, without its score term
    ``E_z[d/dtheta log p_G(x)]`` at fixed x, which is zero in expectation but noisy.

    Per sample, ``g = d/dx [u(x) + log p_G(x)]`` at frozen parameters; the surrogate
    ``mean(g . x)`` then carries ``g`` back through the sampling path ``x = G(z)``. At p_G = p every
    g is zero, so the gradient noise vanishes as the generator becomes exact (unlike the
    total-derivative estimator of :func:`klx`). Costs one sampling pass with graph, one density pass
    with input gradient and one energy gradient. Invalid samples (non-finite u, log q or g) carry
    no gradient. ``metrics["loss"]`` is the reverse KL value ``mean(u + log q)``, not the surrogate.

    grad_max (kT/nm, None = off): each sample's g is rescaled to norm <= grad_max. On the alanine
    tetrapeptide the median |g| of a trained generator's draws is ~400 kT/nm, the largest of 2 048 draws
    ~4e9 (a clash with weight e^-1.7e7): uncapped, such draws set the batch's gradient direction."""
    x, log_q = gen.sample_and_log_prob(n, generator=generator)
    xd = x.detach().requires_grad_(True)
    with torch.enable_grad():
        lq = gen.log_prob(xd)
        u = energy(xd)
        (g,) = torch.autograd.grad((u + lq).sum(), xd)
    valid, log_w, metrics = sample_stats(u, lq)
    valid = valid & torch.isfinite(g).flatten(1).all(1)
    g = g.detach()
    gnorm = g.flatten(1).norm(dim=1)
    if grad_max is not None:
        g = cap_norm(g, grad_max)
        metrics["path_grad_capped"] = float((gnorm[valid] > grad_max).float().mean()) if valid.any() else float("nan")
    per = (g * x).flatten(1).sum(1)
    loss = per[valid].sum() / max(int(valid.sum()), 1) if valid.any() else nan_loss(per)
    kl = (u.detach() + lq.detach())[valid]
    metrics["kl"] = float(kl.mean()) if kl.numel() else float("nan")
    metrics["path_grad_rms"] = float(gnorm[valid].pow(2).mean().sqrt()) if valid.any() else float("nan")
    loss = _finish(loss, _penalty(gen, x, penalty_weight), metrics)
    metrics["loss"] = metrics["kl"]  # the surrogate's value means nothing; report the reverse KL
    return LossOutput(loss=loss, metrics=metrics, samples=x.detach(), log_w=log_w, energy_evals=n)


def klz_df(gen, energy: EnergyFn, n: int, *, generator: torch.Generator | None = None, penalty_weight: float = 0.0) -> LossOutput:
    """Importance-weighted data-free KLz (eq. 7): ``sum_i w_i * (-log p_G(x_i))`` with detached
    samples and self-normalised detached weights ``w = softmax(-u - log p_G)`` over the batch."""
    x, log_q0, u, pen = _detached_batch(gen, energy, n, generator, penalty_weight)
    valid, log_w, metrics = sample_stats(u, log_q0)
    if not valid.any():
        return LossOutput(_finish(nan_loss(u), pen, metrics), metrics, x, log_w, n)
    w = torch.softmax(log_w[valid], 0).detach()
    lp = gen.log_prob(x[valid])
    loss = -(w * lp).sum()
    metrics["w_max"] = float(w.max())
    loss = _finish(loss, pen, metrics)
    return LossOutput(loss=loss, metrics=metrics, samples=x, log_w=log_w, energy_evals=n)


def _scored_frames(gen, energy: EnergyFn, x_data: torch.Tensor):
    """The first step of the losses on data frames with their energies: ``(log q (n,) with gradient, valid mask,
    detached log w, metrics)``; the metrics leave out ``ess`` and ``log_z`` (of frames, not of the generator's
    draws: not comparable, not logged)."""
    lp = gen.log_prob(x_data)
    with torch.no_grad():
        u = energy(x_data)
    valid, log_w, metrics = sample_stats(u, lp)
    for k in ("ess", "log_z"):
        metrics.pop(k)
    return lp, valid, log_w, metrics


def chi2_data(gen, energy: EnergyFn, x_data: torch.Tensor, *, power: float = 1.0, ml_fraction: float = 0.0,
              generator: torch.Generator | None = None, penalty_weight: float = 0.0) -> LossOutput:
    """Chi-square divergence estimated on data: ``-sum_i v_i log p_G(x_i)`` over frames ``x_data: (batch, ...)``
    drawn from p_B, with detached weights ``v = softmax(power * (-u - log p_G))`` over the batch.

    With ``power`` 1 the gradient is that of ``log E_p[p/q] = log E_q[w^2]``, the log of 1 / (the Kish ESS
    fraction of the generator's own samples): maximum likelihood in which each frame counts in proportion
    to how much q under-fills p there, so the states that carry the weights' heavy tail pull hardest. Unlike
    ``alpha2`` and ``rwml`` (the same divergence estimated on the generator's draws), the frames of those
    states come from the data, not from the generator's few draws into them. ``power`` 0 is maximum
    likelihood (``klz``); between, an interpolation. ``ml_fraction`` f in [0, 1] mixes the two objectives
    instead: frame weights ``(1 - f) v + f / batch``, so a share f of every step's gradient is plain maximum
    likelihood over the whole batch, which holds the bulk in place while the rest pulls on the tail.
    Costs ``batch`` energy evaluations (no forces). Metrics: ``nll`` (unweighted, of the batch) and ``batch_ess`` (Kish fraction of v: the share of the
    batch that effectively counts)."""
    lp, valid, log_w, metrics = _scored_frames(gen, energy, x_data)
    n = x_data.shape[0]
    if not valid.any():
        return LossOutput(_finish(nan_loss(lp), None, metrics), metrics, None, None, n)
    if not 0.0 <= ml_fraction <= 1.0:
        raise InputError(f"ml_fraction must be in [0, 1] (0: chi-square only, 1: maximum likelihood), got {ml_fraction}")
    v = torch.softmax(float(power) * log_w[valid].double(), 0)
    v = ((1.0 - ml_fraction) * v + ml_fraction / v.numel()).to(lp.dtype).detach()
    loss = -(v * lp[valid]).sum()
    metrics["nll"] = float(-lp[valid].detach().mean())
    metrics["batch_ess"] = kish_ess(float(power) * log_w[valid])
    loss = _finish(loss, _generated_penalty(gen, n, generator, penalty_weight), metrics)
    return LossOutput(loss=loss, metrics=metrics, samples=None, log_w=None, energy_evals=n)


#: logvar_data clips each frame's centred log weight to +-this many nats: a frame far out in the tail pulls
#: like one at the clip, so single frames cannot steer a step (the loss stays a regression, not a max)
LOGVAR_CLIP = 4.0


def logvar_data(gen, energy: EnergyFn, x_data: torch.Tensor, *, ml_fraction: float = 0.0, clip: float = LOGVAR_CLIP,
                generator: torch.Generator | None = None, penalty_weight: float = 0.0) -> LossOutput:
    """Log-variance divergence on data: the gradient of ``Var_p[log w] / 2``, ``log w = -u - log p_G``, over
    frames ``x_data: (batch, ...)`` drawn from p_B, as ``-mean_i c_i log p_G(x_i)`` with detached
    ``c = log w - mean(log w)`` clipped to +-``clip`` nats.

    ``Var_p[log w]`` is 0 only for p_G = p_B, and for near-log-normal weights the Kish ESS fraction is
    ``exp(-Var[log w])``, so this regresses log p_G onto -u where the frames are: frames where q under-fills p
    (c > 0) are pulled up and frames where it over-fills (c < 0) pushed down, each in proportion to its misfit.
    It is the first-order expansion of :func:`chi2_data` (weights ``softmax(log w) ~ (1 + c) / batch``) and
    keeps the whole batch counting where chi2_data's exponential weights rest on a handful of frames.
    ``ml_fraction`` f mixes in maximum likelihood: frame weights ``f + (1 - f) c`` (f = 0.5: ML plus the
    log-variance at equal scale). Costs ``batch`` energy evaluations (no forces). Metrics: ``nll``
    (unweighted) and ``var_log_w`` (of the batch; its decrease is what the loss buys)."""
    if not 0.0 <= ml_fraction <= 1.0:
        raise InputError(f"ml_fraction must be in [0, 1] (0: log-variance only, 1: maximum likelihood), got {ml_fraction}")
    if not clip > 0:
        raise InputError(f"clip must be > 0 nats, got {clip}")
    lp, valid, log_w, metrics = _scored_frames(gen, energy, x_data)
    n = x_data.shape[0]
    if not valid.any():
        return LossOutput(_finish(nan_loss(lp), None, metrics), metrics, None, None, n)
    lw = log_w[valid].double()
    c = (lw - lw.mean()).clamp(-clip, clip)
    v = (ml_fraction + (1.0 - ml_fraction) * c).to(lp.dtype).detach()
    loss = -(v * lp[valid]).mean()
    metrics["nll"] = float(-lp[valid].detach().mean())
    metrics["var_log_w"] = float(lw.var()) if lw.numel() > 1 else float("nan")
    loss = _finish(loss, _generated_penalty(gen, n, generator, penalty_weight), metrics)
    return LossOutput(loss=loss, metrics=metrics, samples=None, log_w=None, energy_evals=n)


def l2plus(
    gen,
    energy: EnergyFn,
    n: int,
    *,
    generator: torch.Generator | None = None,
    penalty_weight: float = 0.0,
    mask: bool = True,
    detach_k: bool = True,
) -> LossOutput:
    """Masked L2 loss with detached mean (eq. 15): ``mean(relu(r - K)^2)``, ``K = detach(mean r)``,
    ``r = -u(x) - log p_G(x)`` on detached samples x, u detached, log p_G evaluated through F.

    Ablations (appendix H): ``mask=False`` gives ``mean((r - K)^2)`` (log-variance / VarGrad);
    ``detach_k=False`` lets gradient flow through K."""
    x, log_q0, u, pen = _detached_batch(gen, energy, n, generator, penalty_weight)
    valid, log_w, metrics = sample_stats(u, log_q0)
    if not valid.any():
        return LossOutput(_finish(nan_loss(u), pen, metrics), metrics, x, log_w, n)
    lp = gen.log_prob(x[valid])
    r = -u[valid] - lp
    k = r.mean()
    if detach_k:
        k = k.detach()
    d = r - k
    if mask:
        d = torch.relu(d)
    loss = d.pow(2).mean()
    metrics["K"] = float(k.detach())
    metrics["mask_fraction"] = float((r.detach() > k.detach()).double().mean())
    loss = _finish(loss, pen, metrics)
    return LossOutput(loss=loss, metrics=metrics, samples=x, log_w=log_w, energy_evals=n)


def l2plus_nomask(gen, energy: EnergyFn, n: int, *, generator: torch.Generator | None = None, penalty_weight: float = 0.0) -> LossOutput:
    """L2+ ablation without the mask: log-variance (VarGrad) loss with detached K."""
    return l2plus(gen, energy, n, generator=generator, penalty_weight=penalty_weight, mask=False, detach_k=True)


def l2plus_nodetach(gen, energy: EnergyFn, n: int, *, generator: torch.Generator | None = None, penalty_weight: float = 0.0) -> LossOutput:
    """L2+ ablation with K not detached (gradient flows through the batch mean of r)."""
    return l2plus(gen, energy, n, generator=generator, penalty_weight=penalty_weight, mask=True, detach_k=False)


def alpha2_resampled(gen, energy: EnergyFn, n: int, *, generator: torch.Generator | None = None,
                     penalty_weight: float = 0.0, pool: int = 4) -> LossOutput:
    """Alpha = 2 divergence by importance resampling (FAB's target p^2/q without the AIS chain).

    Draws ``pool * n`` detached samples from the generator, resamples ``n`` of them with probability
    proportional to ``w^2`` (``w = exp(-u - log q)``, self-normalised over the pool) and returns
    ``mean(-log q)`` on the resampled set: a maximum-likelihood step towards ``p^2 / q``, whose fixed
    point is ``q = p``. Minimising ``D_2(p || q) = log E_q[w^2]`` maximises the expected Kish ESS
    directly (ESS = E[w]^2 / E[w^2]), and the gradient raises q where it underestimates p, the tails
    that cap the ESS, unlike the mode-seeking reverse KL. Needs energies only (no energy gradient).
    Costs ``pool * n`` energy evaluations; only useful from a generator that already overlaps p
    (e.g. after maximum likelihood)."""
    x, log_q0, u, pen = _detached_batch(gen, energy, int(pool) * n, generator, penalty_weight)
    valid, log_w, metrics = sample_stats(u, log_q0)
    if not valid.any():
        return LossOutput(_finish(nan_loss(u), pen, metrics), metrics, x, log_w, int(pool) * n)
    p2 = torch.softmax(2.0 * log_w.double(), 0)
    idx = torch.multinomial(p2, n, replacement=True, generator=generator)
    metrics["ess_w2"] = float(1.0 / (p2 * p2).sum())  # effective size of the resampling distribution
    loss = -gen.log_prob(x[idx]).mean()
    loss = _finish(loss, pen, metrics)
    return LossOutput(loss=loss, metrics=metrics, samples=x, log_w=log_w, energy_evals=int(pool) * n)


def rwml(gen, energy: EnergyFn, n: int, pool: ReweightedPool | None = None, *, generator: torch.Generator | None = None,
         penalty_weight: float = 0.0, pool_factor: int = 4, anchor: torch.Tensor | None = None) -> LossOutput:
    """Reweighted maximum likelihood: ``mean(-log p_G(x))`` over ``n`` frames of an importance-resampled
    pool of the generator's own samples (:class:`~boltzflow.sampling.pool.ReweightedPool`), i.e. the
    forward KL to the Boltzmann distribution estimated with the generator as proposal (the last stage of
    Schopmans & Friederich 2025's temperature annealing, at the target temperature).

    Unlike reverse KL it is mass-covering: where q < p the resampled frames are denser than q's own, and
    the gradient raises q there, which is what shortens the weights' heavy tail. Large pools (1e6 draws)
    make the estimate far less noisy than the per-batch self-normalised version (``klz_df``): the pool
    is drawn once per ``pool.config.refresh`` steps (refreshed here when ``pool.due``; its ``size`` energy
    evaluations, no forces, are counted then). Without ``pool``, a one-shot pool of ``pool_factor * n``
    draws is resampled to ``n`` frames (unclipped) on every call. ``anchor``: frames ``(k, ...)`` appended
    to the ``n`` pool frames, so the batch's maximum likelihood covers them too (``pool.data_fraction``)."""
    if pool is None:
        pool = ReweightedPool(PoolConfig(size=int(pool_factor) * n, resample=n, clip=0.0, refresh=1,
                                         batch_size=max(int(pool_factor) * n, 1)))
    evals = pool.refresh(gen, energy, generator) if pool.due else 0
    x = pool.batch(n, generator)
    if anchor is not None and anchor.shape[0] > 0:
        x = torch.cat([x, anchor.to(x.dtype)], dim=0)
    out = klz(gen, x, generator=generator, penalty_weight=penalty_weight)
    out.metrics.update({f"pool_{k}": v for k, v in pool.stats.items()})
    return LossOutput(loss=out.loss, metrics=out.metrics, samples=None, log_w=None, energy_evals=evals)
