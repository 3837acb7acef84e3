"""User story: "show me why the loss matters" (felardos2023 fig. 1 in miniature).

Partially pre-trains a RealNVP flow on the 12D double well by maximum likelihood, fine-tunes it
data-free with reverse KL (KLx) and with L2+, and prints each one's minor-mode fraction next to
the exact value.

    python examples/train_double_well.py [--quick]
"""

import argparse

import torch

from boltzflow.flows.builders import make_flow
from boltzflow.systems.toy import toy_target
from boltzflow.training.trainer import StageConfig, TrainConfig, Trainer


def main(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    target = toy_target("double-well-12d")
    g = torch.Generator().manual_seed(0)
    data = target.sample(4096, generator=g)  # exact samples stand in for MD data
    pre, fine = (50, 30) if quick else (300, 1500)
    out = {"exact": target.exact_minor_fraction}
    for loss in ("klx", "l2plus"):
        torch.manual_seed(0)
        flow = make_flow(target.dim, "realnvp", blocks=2 if quick else 8, hidden=32 if quick else 64)
        cfg = TrainConfig(pretrain=StageConfig(loss="klz", steps=pre, batch=256),
                          finetune=StageConfig(loss=loss, steps=fine, batch=256), progress=False, seed=0)
        Trainer(flow, target.energy, cfg, data=data, modes=target.modes).run()
        with torch.no_grad():
            x = flow.sample(20000, generator=torch.Generator().manual_seed(1))
        frac = target.modes.fractions(x)[target.modes.minor]
        out[loss] = frac
        print(f"{loss:7s} minor-mode fraction {frac:.4f} (exact {target.exact_minor_fraction:.4f})")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    main(p.parse_args().quick)
