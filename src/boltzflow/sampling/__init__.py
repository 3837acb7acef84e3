"""Sampling: the SampleSet container, flow samplers, MCMC / AIS / HMC kernels."""

from ..core.sampleset import SampleSet

__all__ = ["SampleSet"]
