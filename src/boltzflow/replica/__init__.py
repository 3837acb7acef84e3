"""Replica exchange / parallel tempering (openmmtools.multistate) -> SampleSet, and MBAR analysis.

    from boltzflow.replica import ReplicaExchangeConfig, run_replica_exchange, extract_samples, mbar_analysis
    path = run_replica_exchange(system, ReplicaExchangeConfig(n_iterations=2000), "runs/adp-pt")
    samples = extract_samples(path)              # SampleSet of the 300 K state, decorrelated
    res = mbar_analysis(path, {"phi>0": fn})     # free energies between temperatures, populations
"""

from .analysis import MBARResult, ReplicaData, extract_samples, mbar_analysis, read_replica, state_populations
from .exchange import METHODS, ReplicaExchangeConfig, prune_unused_cmap_maps, run_replica_exchange, storage_path

__all__ = ["ReplicaExchangeConfig", "run_replica_exchange", "extract_samples", "mbar_analysis", "MBARResult",
           "ReplicaData", "read_replica", "state_populations", "storage_path", "prune_unused_cmap_maps", "METHODS"]
