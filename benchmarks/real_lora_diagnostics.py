"""Why the real profile's LoRA experts interfere when merged: their task vectors' sizes and overlaps, and what each
expert answers to prompts of other skills and to a general question.

Usage: python benchmarks/real_lora_diagnostics.py [CACHE_DIR]   (needs a built `real` profile there)

Prints, for each LoRA expert: ‖ΔW‖ over all adapted projections and its ratio to the base's ‖W‖ there; the cosine
similarity of every pair of experts' flattened ΔW; and each expert's greedy answers (20 tokens) to one fact
question and to one test prompt of three other skills. Results are quoted in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from skillgraft.bench.build import BenchManifest, default_cache  # noqa: E402
from skillgraft.bench.real_skills import real_examples  # noqa: E402
from skillgraft.eval.general import chat_prompt  # noqa: E402
from skillgraft.io.checkpoint import Checkpoint  # noqa: E402
from skillgraft.io.peft_adapter import read_adapter  # noqa: E402


def lora_delta(path: Path) -> dict[str, torch.Tensor]:
    """ΔW = scale · B A for every adapted module, keyed by the module's name."""
    out = {}
    for name, module in read_adapter(path).modules.items():
        up, down = module.factors()
        out[name] = up.float() @ down.float()
    return out


def main() -> None:
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else default_cache()
    m = BenchManifest.load(cache / "real")
    experts = sorted(k for k, v in m.models.items() if v["kind"] == "lora")
    skills = [m.models[k]["skill"] for k in experts]
    deltas = {s: lora_delta(m.model_dir(k)) for s, k in zip(skills, experts)}
    names = sorted(next(iter(deltas.values())))
    with Checkpoint(m.model_dir("base")) as base:
        w_norm = sum(base.get(n + ".weight").float().pow(2).sum().item() for n in names) ** 0.5
    flat = {s: torch.cat([d[n].flatten() for n in names]) for s, d in deltas.items()}
    print(f"base ‖W‖ over the {len(names)} adapted projections: {w_norm:.1f}")
    print("expert      ‖ΔW‖   ‖ΔW‖/‖W‖")
    for s, v in flat.items():
        print(f"{s:<10} {v.norm():6.2f}   {v.norm() / w_norm:.4f}")
    print("cosine(ΔW_a, ΔW_b): " + " ".join(f"{s:>9}" for s in skills))
    for a in skills:
        row = " ".join(f"{torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0):+9.3f}" for b in skills)
        print(f"{a:<19} {row}")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(m.tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(m.model_dir("base")), dtype=torch.float32).eval()
    probes = {"fact": chat_prompt(tok, "What is the capital of France?")}
    probes |= {s: real_examples(s, "test", 1, tok)[0]["prompt"] for s in skills[:4]}

    def answers(net: torch.nn.Module) -> dict[str, str]:
        out = {}
        for what, prompt in probes.items():
            ids = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                g = net.generate(**ids, max_new_tokens=20, do_sample=False)
            out[what] = tok.decode(g[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        return out

    print(json.dumps({"base": answers(model)}, ensure_ascii=False))
    for s, k in zip(skills, experts):
        peft_model = PeftModel.from_pretrained(model, str(m.model_dir(k))).eval()
        print(json.dumps({f"{s} expert": answers(peft_model)}, ensure_ascii=False))
        model = peft_model.unload()


if __name__ == "__main__":
    main()
