"""User story: "turn samples into populations and free energies with error bars".

Uses the shipped replica-exchange reference of alanine dipeptide (or any SampleSet):
the phi > 0 population with a block error, the conformational free energy, and the free-energy
difference between 300 K and 330 K by EXP (reweighting the same configurations).

    python examples/reweighting_free_energies.py [--quick] [--samples SAMPLES.npz]
"""

import argparse

from boltzflow.estimators import block_average, conformational_free_energy, exp_free_energy, parse_region
from boltzflow.sampling import SampleSet
from boltzflow.systems.builtin import builtin_dir, builtin_system


def main(quick: bool = False, samples: str | None = None) -> dict:
    system = builtin_system("alanine-dipeptide")
    s = SampleSet.load(samples or builtin_dir("alanine-dipeptide") / "reference_300K.npz")
    region = parse_region("phi>0", topology=system.topology)
    inside = region.indicator(s.positions)
    p = block_average(inside.astype(float), s.log_weights, n_blocks=10, name="P(phi>0)")
    df = conformational_free_energy(~inside, inside, s.log_weights, name="dF(phi<0 -> phi>0)",
                                    temperature_k=system.temperature)
    print(p)
    print(df)
    # thermodynamic free energy 300 K -> 330 K on the same configurations: delta u = u (T/T' - 1)
    if s.reduced_energy is not None:
        du = s.reduced_energy * (300.0 / 330.0 - 1.0)
        f = exp_free_energy(du, s.log_weights, name="F(330 K) - F(300 K) [reduced, EXP]")
        print(f)
    return {"population": p.value, "stderr": p.stderr}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--samples")
    a = ap.parse_args()
    main(a.quick, a.samples)
