"""Router features, chosen on val: fit centroid/classifier on a SkillBench build's train prompts, score val prompts.

Usage: ``python benchmarks/router_pooling.py PROFILE CACHE MODEL SPLIT``, e.g.
``python benchmarks/router_pooling.py full /tmp/sbfull6 base-large val`` (MODEL: a model in the build, ``base`` or
``base-large``). Prints routing accuracy for mean, max, bag-of-tokens and concatenated poolings of the last hidden
state, at 64 and 256 training prompts per skill (centroid: the first 8). Results: docs/benchmarks.md, session 29.
"""

import json
import sys
from pathlib import Path

import torch

from skillgraft.bench.build import build
from skillgraft.route.routers import _batches, _logistic
from skillgraft.route.runtime import SkillRuntime
from skillgraft.study.common import load

torch.set_num_threads(1)
profile, cache, which, split = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
m = build(profile, cache)
skills = [s for s in m.raw["skills"] if f"experts/{s}-full" in m.models or f"experts/{s}-lora" in m.models]
model, tok = load(m.model_dir(which))
rt = SkillRuntime(model, tok)
V = len(tok)


def rows(s, sp, n):
    with open(m.data_path(s, sp)) as f:
        return [json.loads(line)["prompt"] for _, line in zip(range(n), f)]


@torch.no_grad()
def feats(prompts):
    out = {k: [] for k in ("mean", "max", "bow", "mean+max", "mean+bow")}
    for _, b in _batches(rt, prompts, 32):
        h = model(**b, output_hidden_states=True, use_cache=False).hidden_states[-1].float()
        msk = b["attention_mask"][..., None].float()
        mean = (h * msk).sum(1) / msk.sum(1)
        mx = h.masked_fill(msk == 0, float("-inf")).amax(1)
        bow = torch.zeros(len(h), V)
        bow.scatter_add_(1, b["input_ids"], b["attention_mask"].float())
        bow = (bow > 0).float()
        n = torch.nn.functional.normalize
        out["mean"].append(mean)
        out["max"].append(mx)
        out["bow"].append(bow)
        out["mean+max"].append(torch.cat([n(mean, dim=-1), n(mx, dim=-1)], -1))
        out["mean+bow"].append(torch.cat([n(mean, dim=-1), n(bow, dim=-1)], -1))
    return {k: torch.cat(v) for k, v in out.items()}


for n_k in (64, 256):
    tr = {s: feats(rows(s, "train", n_k)) for s in skills}
    ev = {s: feats(rows(s, split, 50)) for s in skills}
    for k in tr[skills[0]]:
        mu = torch.cat([tr[s][k] for s in skills]).mean(0)

        def nz(x, mu=mu):
            return torch.nn.functional.normalize(x - mu, dim=-1)

        x = torch.cat([nz(tr[s][k]) for s in skills])
        y = torch.cat([torch.full((len(tr[s][k]),), i) for i, s in enumerate(skills)])
        st = _logistic(x, y, len(skills))
        ok = tot = 0
        for i, s in enumerate(skills):
            f = nz(ev[s][k])
            ok += int(((f @ st["weight"].T + st["bias"]).argmax(-1) == i).sum())
            tot += len(f)
        cent = torch.nn.functional.normalize(torch.stack([nz(tr[s][k][:8]).mean(0) for s in skills]), dim=-1)
        okc = sum(int(((nz(ev[s][k]) @ cent.T).argmax(-1) == i).sum()) for i, s in enumerate(skills))
        print(f"{which} {split} n={n_k} {k:10s} classifier {ok / tot:.3f} centroid(8) {okc / tot:.3f}", flush=True)
