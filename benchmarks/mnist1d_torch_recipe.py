"""MNIST-1D's benchmark recipe in plain PyTorch, over seeds: the spread the published single runs were drawn from.

    python benchmarks/mnist1d_torch_recipe.py --out experiments/references/reruns/mnist1d_pytorch.json

(about 30 min on 2 CPU cores, nearly all of it the GRU; split it with --models and --seeds, then merge with
--load A.json B.json --out C.json).

The published curves (greydanus/mnist1d, notebooks/mnist1d-classification.ipynb) are one run each, made with
PyTorch and no torch seed (the notebook's `set_seed` seeds only `random` and numpy). This script runs the same
recipe, written from its description (Adam 1e-2, batch 100, batches in order, PyTorch's default initialisation,
test accuracy after the update of every 250th step), once per torch seed, so that `jaxepochs reproduce mnist1d`
can be compared with PyTorch's own seed-to-seed spread rather than with one draw from it. It prints, per model
and logged step, the mean, SD, min and max over seeds, and writes the per-seed curves as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from mnist1d.data import get_dataset_args, make_dataset
from torch import nn


class MLP(nn.Module):
    """40 -> 100 -> 100 -> 10, the second layer residual: h = relu(W1 x); h = h + relu(W2 h)."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.out = nn.Linear(40, 100), nn.Linear(100, 100), nn.Linear(100, 10)

    def forward(self, x_bl):
        h = self.first(x_bl).relu()
        return self.out(h + self.second(h).relu())


class CNN(nn.Module):
    """Three Conv1d of 25 channels (k5 s2 p1, k3 s2 p1, k3 s2 p1), then a linear layer on the 125 features."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv1d(1, 25, 5, stride=2, padding=1), nn.Conv1d(25, 25, 3, 2, 1), nn.Conv1d(25, 25, 3, 2, 1)]
        )
        self.out = nn.Linear(125, 10)

    def forward(self, x_bl):
        h = x_bl[:, None, :]
        for conv in self.convs:
            h = conv(h).relu()
        return self.out(h.flatten(1))


class GRU(nn.Module):
    """Bidirectional torch.nn.GRU, hidden 6, over the 40 steps; a linear layer on all 480 outputs."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(1, 6, batch_first=True, bidirectional=True)
        self.out = nn.Linear(480, 10)

    def forward(self, x_bl):
        h_blf, _ = self.gru(x_bl[:, :, None])
        return self.out(h_blf.flatten(1))


MODELS = {"logreg": lambda: nn.Linear(40, 10), "mlp": MLP, "cnn": CNN, "gru": GRU}


def train_curve(model_name: str, seed: int, data: dict, steps: int, every: int) -> dict[int, float]:
    """Test accuracy after the update of each step that is a multiple of `every` (step 0 is the first)."""
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    x, y = torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"], dtype=torch.long)
    x_test, y_test = torch.tensor(data["x_test"], dtype=torch.float32), torch.tensor(data["y_test"])
    curve = {}
    for step in range(steps + 1):
        start = (step * 100) % len(x)
        loss = nn.functional.cross_entropy(model(x[start : start + 100]), y[start : start + 100])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0:
            with torch.no_grad():
                curve[step] = float((model(x_test).argmax(-1) == y_test).float().mean())
    return curve


def parse_seeds(text: str) -> list[int]:
    """ "0-9" or "0,3,7"."""
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in text.split(",")]


def summarise(results: dict[str, dict[int, dict[int, float]]], published: dict | None) -> None:
    """Per model and step: mean ± SD (min, max) over seeds, and the published single run beside it. Then the
    family-wise spread: each seed's largest distance, over every judged point, from the mean of the other seeds."""
    for name, curves in results.items():
        print(f"{name}: {len(curves)} seeds")
        for step in next(iter(curves.values())):
            acc = np.array([c[step] for c in curves.values()])
            line = f"  step {step:>5}: {acc.mean():.3f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.3f}"
            line += f"  (min {acc.min():.3f}, max {acc.max():.3f})"
            if published and name in published and step in published[name]:
                value = published[name][step]
                line += f"  published {value:.3f} (mean - published {acc.mean() - value:+.3f})"
            print(line)
    if not published:
        return
    some_curve = {name: next(iter(curves.values())) for name, curves in results.items()}
    judged = [(name, step) for name in results for step in published.get(name, {}) if step in some_curve[name]]
    seeds = list(next(iter(results.values())))
    if len(seeds) < 3 or any(list(results[name]) != seeds for name in results):
        return
    worst = []
    for seed in seeds:
        distances = []
        for name, step in judged:
            others = [results[name][s][step] for s in seeds if s != seed]
            distances.append((abs(results[name][seed][step] - np.mean(others)), name, step))
        worst.append(max(distances))
        print(
            f"seed {seed}: farthest from the other seeds' mean by {worst[-1][0]:.3f} ({worst[-1][1]} @ {worst[-1][2]})"
        )
    print(
        f"over {len(judged)} points: the largest per-seed distance is {max(w[0] for w in worst):.3f}; "
        f"median {np.median([w[0] for w in worst]):.3f}"
    )


def load_published(path: str) -> dict[str, dict[int, float]]:
    """{model: {step: accuracy}} from experiments/references/mnist1d.json's curves."""
    with open(path) as f:
        reference = json.load(f)
    return {
        curve["experiment"].removeprefix("mnist1d_"): dict(zip(curve["steps"], curve["values"], strict=True))
        for curve in reference["curves"]
    }


def load_rerun(path: str) -> dict[str, dict[int, dict[int, float]]]:
    """{model: {seed: {step: accuracy}}} from a file `--out` wrote."""
    with open(path) as f:
        curves = json.load(f)["curves"]
    return {
        experiment.removeprefix("mnist1d_"): {
            int(seed): {int(step): acc for step, acc in curve.items()} for seed, curve in per_seed.items()
        }
        for experiment, per_seed in curves.items()
    }


def save_rerun(path: str, results: dict[str, dict[int, dict[int, float]]]) -> None:
    """The per-seed curves as experiments/references/reruns/mnist1d_pytorch.json reads them."""
    rerun = {
        "what": "MNIST-1D's benchmark recipe rerun in plain PyTorch, one run per torch seed: test accuracy after "
        "the update of every 1,000th step (step 0 is the first update)",
        "command": "python benchmarks/mnist1d_torch_recipe.py --out " + path,
        "torch": torch.__version__,
        "curves": {
            f"mnist1d_{name}": {
                str(seed): {str(step): acc for step, acc in curve.items()} for seed, curve in per.items()
            }
            for name, per in results.items()
        },
    }
    with open(path, "w") as f:
        json.dump(rerun, f, indent=1)
        f.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="logreg,mlp,cnn,gru")
    parser.add_argument("--seeds", default="0-9", help='"0-9" or "0,3,7"')
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON of the per-seed curves")
    parser.add_argument("--load", nargs="*", default=None, help="merge and summarise these --out files; no training")
    parser.add_argument("--reference", default="experiments/references/mnist1d.json")
    args = parser.parse_args()
    results = {}
    if args.load:
        for path in args.load:
            for name, per_seed in load_rerun(path).items():
                results.setdefault(name, {}).update(per_seed)
        results = {name: dict(sorted(per_seed.items())) for name, per_seed in results.items()}
    else:
        torch.set_num_threads(args.threads)
        data = make_dataset(get_dataset_args())
        for name in args.models.split(","):
            started = time.perf_counter()
            seeds = parse_seeds(args.seeds)
            results[name] = {seed: train_curve(name, seed, data, args.steps, args.every) for seed in seeds}
            print(f"{name}: {time.perf_counter() - started:.0f} s (torch {torch.__version__})")
    summarise(results, load_published(args.reference))
    if args.out:
        save_rerun(args.out, results)


if __name__ == "__main__":
    main()
