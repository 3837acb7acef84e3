"""Normalizing flows: bijections with log-dets, coupling layers, base distributions, generators."""

from .base import BaseDistribution, Bijection, Compose, Flow, Inverse, MixedBase, StandardNormal

__all__ = ["Bijection", "Compose", "Inverse", "BaseDistribution", "StandardNormal", "MixedBase", "Flow"]
