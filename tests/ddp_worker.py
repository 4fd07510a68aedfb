"""Run by tests/test_distributed.py, once as a plain process and once under torchrun: trains a
small MLP on the digits data with one method and saves what every rank holds."""

import sys
from pathlib import Path

import torch

from mirrorprune.data import load
from mirrorprune.methods import create_method
from mirrorprune.models import create_model
from mirrorprune.train import TrainConfig, init_distributed, train

if __name__ == "__main__":
    out, name = Path(sys.argv[1]), sys.argv[2]
    hp = {"pilot": {"schedule": "target", "target": 0.9, "alpha": 1e-3},
          "gmp": {"target": 0.9, "every": 5}, "pilot_opt": {"strength": 0.5}}[name]
    rank, world = init_distributed()
    torch.manual_seed(0)
    data = load("digits", "train")
    model = create_model("lenet_300_100", 10, data.shape)
    method = create_method(name, **hp)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=0)
    history = train(model, method, data, None, cfg, out / "run", progress=False)
    state = method.state_dict()
    torch.save({"weights": {k: v.detach() for k, v in method.weights().items()},
                "masks": getattr(method, "ramp_masks", None), "method": state,
                "history": history, "world": world},
               out / f"rank{rank}.pt")
