"""Settings of the flow-MCMC samplers (TOML table ``[sampling.mcmc]``; ``boltzflow sample --mcmc``).

Torch-free, so configuration files and the CLI parser can name the methods without loading torch;
:mod:`boltzflow.sampling.flow_mcmc` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

#: "none": plain reweighting; "imh": independence Metropolis-Hastings over the flow's draws (exact
#: unweighted samples, no extra energy evaluations); "mala" / "hmc": MCMC in the flow's latent space on
#: the pulled-back density; "snf": flow + stochastic blocks in latent space with path weights
MCMC_METHODS = ("none", "imh", "mala", "hmc", "snf")
SNF_KERNELS = ("langevin", "mala", "hmc")


@dataclass(frozen=True)
class MCMCConfig:
    """Flow-MCMC settings. method: one of :data:`MCMC_METHODS`. chains: parallel chains (imh, mala, hmc;
    each runs n // chains recorded steps). burnin: transitions per chain discarded before recording (latent
    chains adapt their step size then; IMH chains start on a flow draw, so a few suffice). step_size:
    initial leapfrog / Langevin step in latent units (the base is a standard normal). leapfrog: leapfrog
    steps per HMC transition. target_accept: burn-in step-size adaptation target. candidates: flow draws
    per latent chain start, one picked by importance resampling. snf_blocks / snf_kernel / snf_steps:
    stochastic blocks of the "snf" method (kernel "langevin", "mala" or "hmc"), steps per block."""

    method: str = "none"
    chains: int = 16
    burnin: int = 20
    step_size: float = 0.1
    leapfrog: int = 5
    target_accept: float = 0.6
    candidates: int = 8
    snf_blocks: int = 4
    snf_kernel: str = "mala"
    snf_steps: int = 1

    def __post_init__(self):
        if self.method not in MCMC_METHODS:
            raise ConfigError(f"unknown sampling.mcmc.method {self.method!r}; choose one of {', '.join(MCMC_METHODS)}")
        if self.snf_kernel not in SNF_KERNELS:
            raise ConfigError(f"unknown sampling.mcmc.snf_kernel {self.snf_kernel!r}; choose one of {', '.join(SNF_KERNELS)}")
        for name in ("chains", "leapfrog", "candidates", "snf_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"sampling.mcmc.{name} must be >= 1, got {getattr(self, name)}")
        if self.burnin < 0 or self.snf_blocks < 0:
            raise ConfigError("sampling.mcmc.burnin and snf_blocks must be >= 0")
        if not self.step_size > 0 or not 0 < self.target_accept < 1:
            raise ConfigError("sampling.mcmc.step_size must be > 0 and target_accept in (0, 1)")
