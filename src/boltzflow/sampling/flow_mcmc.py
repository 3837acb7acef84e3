"""Flow-MCMC as SampleSets: run an :class:`~boltzflow.sampling.mcmc_config.MCMCConfig` on a flow.

* "imh": :func:`~boltzflow.sampling.imh.imh_chains` over flow draws (given, or drawn here): unweighted,
  exactly Boltzmann-distributed chains, one energy evaluation per proposal;
* "mala" / "hmc": :func:`~boltzflow.sampling.latent.latent_mcmc` on the pulled-back density;
* "snf": :func:`~boltzflow.sampling.snf.latent_snf`: weighted i.i.d. samples with path weights.

Chains come back as one unweighted SampleSet, chain after chain in time order (provenance
``layout: "chain-major"``, ``decorrelated: False``), so :mod:`boltzflow.estimators` gives them block
errors; ``energy_evals`` counts every single-configuration energy (or energy+gradient) evaluation.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..core.sampleset import SampleSet
from ..errors import InputError
from .imh import imh_chains
from .latent import EnergyFn, LatentMap, latent_mcmc
from .mcmc_config import MCMCConfig
from .snf import latent_snf


def draw_proposals(latent: LatentMap, energy: EnergyFn, n: int, batch_size: int = 2000,
                   generator: torch.Generator | None = None) -> SampleSet:
    """``n`` flow draws ``x = G(z)`` with log q, u and log weights ``-u - log q`` (n energy evaluations)."""
    xs, lqs, us = [], [], []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            x, lq = latent.push(latent.sample_latent(min(batch_size, n - s), generator=generator))
            xs.append(x.detach().cpu())
            lqs.append(lq.detach().cpu().double())
            us.append(energy(x).detach().cpu().double())
    u, lq = torch.cat(us), torch.cat(lqs)
    lw = torch.where(torch.isfinite(u), -u - lq, torch.full_like(u, -np.inf))
    return SampleSet(torch.cat(xs).numpy().astype(np.float32), u.numpy(), lq.numpy(), lw.numpy(),
                     provenance={"sampler": "flow", "energy_evals": n})


def _chains_set(x: np.ndarray, u: np.ndarray, lq: np.ndarray, prov: dict[str, Any]) -> SampleSet:
    """(steps, chains, ...) arrays -> chain-major unweighted SampleSet."""
    steps, chains = u.shape
    pos = np.swapaxes(x, 0, 1).reshape(steps * chains, *x.shape[2:])
    return SampleSet(pos.astype(np.float32), u.T.reshape(-1), lq.T.reshape(-1), None,
                     provenance={**prov, "chains": chains, "steps": steps, "layout": "chain-major",
                                 "decorrelated": False})


def run_flow_mcmc(latent: LatentMap, energy: EnergyFn, config: MCMCConfig, n: int,
                  generator: torch.Generator | None = None, proposals: SampleSet | None = None,
                  batch_size: int = 2000, seed: int = 0) -> SampleSet:
    """``n`` samples of ``config.method`` (not "none") as a SampleSet (module docstring).

    imh: ``n`` proposals (``proposals``, a weighted flow SampleSet, or ``n`` fresh draws) feed
    ``config.chains`` chains; the first ``config.burnin`` steps of each are dropped. mala / hmc:
    ``config.chains`` chains of ``n // chains`` recorded steps. snf: ``n`` weighted samples.
    seed: the IMH acceptance draws (numpy)."""
    c = config
    if c.method == "none":
        raise InputError("sampling.mcmc.method is 'none': plain reweighting needs no MCMC run")
    if n < 1:
        raise InputError(f"the number of samples must be >= 1, got {n}")
    t0 = time.time()
    base: dict[str, Any] = {"sampler": f"flow-mcmc:{c.method}", "method": c.method}
    if c.method == "imh":
        if proposals is None:
            proposals = draw_proposals(latent, energy, n, batch_size, generator)
        if proposals.log_weights is None:
            raise InputError("IMH needs weighted flow draws (log weights -u - log q)")
        res = imh_chains(proposals.log_weights, c.chains, seed)
        if res.steps <= c.burnin:
            raise InputError(f"{len(proposals)} proposals give {res.steps} IMH steps per chain, not more than "
                             f"burnin={c.burnin}; draw more or use fewer chains")
        idx = res.index[c.burnin:]
        order = np.ascontiguousarray(idx.T).reshape(-1)
        prov = dict(proposals.provenance)
        evals = prov.get("energy_evals", len(proposals))
        prov.update(base, chains=res.chains, steps=res.steps - c.burnin, burnin=c.burnin, layout="chain-major",
                    decorrelated=False, accept_rate=res.accept_rate, energy_evals=evals,
                    wall_s=float(prov.get("wall_s") or 0.0) + time.time() - t0)
        return SampleSet(proposals.positions[order], proposals.reduced_energy[order]
                         if proposals.reduced_energy is not None else None,
                         proposals.log_q[order] if proposals.log_q is not None else None, None,
                         proposals.temperature, prov)
    if c.method in ("mala", "hmc"):
        steps = n // c.chains
        if steps < 1:
            raise InputError(f"{n} samples cannot fill {c.chains} chains; ask for at least {c.chains}")
        ch = latent_mcmc(latent, energy, c.chains, steps, c.step_size, 1 if c.method == "mala" else c.leapfrog,
                         c.burnin, c.target_accept, c.candidates, generator)
        prov = {**base, "accept_rate": ch.accept_rate, "step_size": ch.step_size, "burnin": c.burnin,
                "energy_evals": ch.energy_evals, "wall_s": time.time() - t0}
        return _chains_set(ch.x.cpu().numpy(), ch.u.double().cpu().numpy(), ch.log_q.double().cpu().numpy(), prov)
    xs, lws, us, lqs, evals, rates = [], [], [], [], 0, []
    for s in range(0, n, batch_size):
        r = latent_snf(latent, energy, min(batch_size, n - s), c.snf_blocks, c.snf_kernel, c.step_size, c.snf_steps,
                       c.leapfrog, generator)
        xs.append(r.x.cpu())
        lws.append(r.log_w.double().cpu())
        us.append(r.u.double().cpu())
        lqs.append(r.log_q.double().cpu())
        evals += r.energy_evals
        rates.append(r.accept_rate)
    prov = {**base, "snf_blocks": c.snf_blocks, "snf_kernel": c.snf_kernel, "accept_rate": float(np.mean(rates)),
            "energy_evals": evals, "wall_s": time.time() - t0}
    return SampleSet(torch.cat(xs).numpy().astype(np.float32), torch.cat(us).numpy(), torch.cat(lqs).numpy(),
                     torch.cat(lws).numpy(), provenance=prov)
