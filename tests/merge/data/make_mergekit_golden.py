"""Regenerate ``mergekit_golden.safetensors``: mergekit 0.1.5's own per-tensor merges on fixed seeded tensors.

Run in a separate venv that has mergekit (never a skillgraft dependency), e.g.
``python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5`` then
``/tmp/mkvenv/bin/python tests/merge/data/make_mergekit_golden.py``. Cases (method, weights, parameters and, for
randomized methods, the torch seed set just before the call) are stored in the file's metadata as JSON.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import torch
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.registry import get
from safetensors.torch import save_file

OUT = Path(__file__).with_name("mergekit_golden.safetensors")

CASES = [
    # name, method, weights, parameters (mergekit names), seed
    ("ties_d03", "ties", [1.0, 0.5, 0.8], {"density": 0.3}, None),
    ("ties_negw", "ties", [1.0, -0.6, 0.4], {"density": 0.5, "lambda": 1.5}, None),
    ("ties_sum", "ties", [0.7, 0.3, 1.2], {"density": 0.25, "normalize": False}, None),
    ("task_arithmetic", "task_arithmetic", [0.5, -1.0, 0.25], {"lambda": 0.7}, None),
    ("breadcrumbs", "breadcrumbs", [1.0, 0.5, 0.5], {"density": 0.6, "gamma": 0.05}, None),
    ("breadcrumbs_small_gamma", "breadcrumbs", [1.0, 0.5, 0.5], {"density": 0.6, "gamma": 0.001}, None),
    ("breadcrumbs_ties", "breadcrumbs_ties", [1.0, 0.5, 0.8], {"density": 0.7, "gamma": 0.02}, None),
    ("dare_linear", "dare_linear", [1.0, 0.5, 0.8], {"density": 0.4}, 1234),
    ("dare_ties", "dare_ties", [1.0, 0.5, 0.8], {"density": 0.4}, 99),
    ("della", "della", [1.0, 0.5, 0.8], {"density": 0.5, "epsilon": 0.1}, 7),
    ("della_linear", "della_linear", [1.0, 0.5, 0.8], {"density": 0.5, "epsilon": 0.15}, 8),
    ("linear", "linear", [0.2, 0.3, 0.5], {}, None),
]


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(20260501)
    base = torch.randn(16, 24, generator=g)
    out = {"base": base}
    for i in range(3):
        # Deltas on a 1/256 grid: many equal magnitudes, so tie-breaking matters.
        delta = torch.round(torch.randn(16, 24, generator=g) * 0.02 * 256) / 256
        out[f"ft{i}"] = base + delta
    return out


def run_case(method: str, tensors: dict[str, torch.Tensor], weights: list[float], params: dict) -> torch.Tensor:
    m = get(method)
    fts = [tensors[f"ft{i}"] for i in range(3)]
    if method == "linear":
        from mergekit.merge_methods.base import TensorBatch

        batch = TensorBatch(tensors=tuple(t.unsqueeze(0) for t in fts))
        w = torch.tensor([weights], dtype=torch.float32)
        return m.merge_batch(batch, weight=w, normalize=True)[0]
    group = TensorGroup.from_tensors([tensors["base"], *fts], base_index=0)
    defaults = {s.name: s.default for s in m.spec.parameters if s.name not in ("weight", "density", "gamma", "epsilon")}
    per_input = {"weight": dict(zip(range(1, 4), weights))}
    for key, default in (("density", 1.0), ("gamma", 0.01), ("epsilon", 0.15)):
        if any(s.name == key for s in m.spec.parameters):
            per_input[key] = {i: params.get(key, default) for i in range(1, 4)}
    shared = {**defaults, **{k: v for k, v in params.items() if k not in per_input}}
    return m.merge_group(group, **shared, **per_input)


def main() -> None:
    tensors = inputs()
    meta = []
    for name, method, weights, params, seed in CASES:
        if seed is not None:
            torch.manual_seed(seed)
        tensors[f"out.{name}"] = run_case(method, tensors, weights, params).contiguous()
        meta.append({"name": name, "method": method, "weights": weights, "params": params, "seed": seed})
    save_file(tensors, OUT, metadata={"cases": json.dumps(meta), "mergekit": version("mergekit")})
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
