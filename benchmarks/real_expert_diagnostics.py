"""Why the real profile's LoRA experts interfere when merged and its full fine-tunes do not: the experts' task
vectors' sizes and overlaps, and what each expert answers to prompts of other skills and to a general question.

Usage: python benchmarks/real_expert_diagnostics.py [CACHE_DIR]   (needs a built `real` profile there)

Prints, for each LoRA and full fine-tune expert: ‖ΔW‖ over the adapted projections (the ones full fine-tunes train)
and its ratio to the base's ‖W‖ there; the cosine similarity of every pair of experts' ΔW; and each expert's
greedy answers (20 tokens) to one fact question and to one test prompt of four skills. Quoted in
docs/benchmarks.md; output of the run there: benchmarks/results/real_expert_diagnostics.txt.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from skillgraft.bench.build import BenchManifest, default_cache  # noqa: E402
from skillgraft.bench.real_skills import real_examples  # noqa: E402
from skillgraft.eval.general import chat_prompt  # noqa: E402
from skillgraft.io.checkpoint import Checkpoint  # noqa: E402
from skillgraft.skill.peft import read_adapter  # noqa: E402


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
    lora = sorted(k for k, v in m.models.items() if v["kind"] == "lora")
    experts = lora + sorted(k for k, v in m.models.items() if v["kind"] == "full")
    label = {k: f"{m.models[k]['skill']} {m.models[k]['kind']}" for k in experts}
    deltas = {k: lora_delta(m.model_dir(k)) for k in lora}
    names = sorted(deltas[lora[0]])  # the projections LoRA adapts, which are the ones full fine-tunes train
    with Checkpoint(m.model_dir("base")) as base:
        for k in experts[len(lora) :]:  # a full fine-tune: its trained projections minus the base's
            with Checkpoint(m.model_dir(k)) as tuned:
                deltas[k] = {n: tuned.get(n + ".weight").float() - base.get(n + ".weight").float() for n in names}
        w_norm = sum(base.get(n + ".weight").float().pow(2).sum().item() for n in names) ** 0.5

    def dot(a: str, b: str) -> float:  # over every adapted projection, accumulated in float64
        return sum(float((deltas[a][n].double() * deltas[b][n].double()).sum()) for n in names)

    norm = {k: dot(k, k) ** 0.5 for k in experts}
    print(f"base ‖W‖ over the {len(names)} adapted projections: {w_norm:.1f}")
    print("expert             ‖ΔW‖   ‖ΔW‖/‖W‖")
    for k in experts:
        print(f"{label[k]:<16} {norm[k]:6.2f}   {norm[k] / w_norm:.4f}")
    print("cosine(ΔW_a, ΔW_b)   " + " ".join(f"{label[k]:>14}" for k in experts))
    for a in experts:
        row = " ".join(f"{dot(a, b) / (norm[a] * norm[b]):+14.3f}" for b in experts)
        print(f"{label[a]:<20} {row}")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(m.tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(m.model_dir("base")), dtype=torch.float32).eval()
    probes = {"fact": chat_prompt(tok, "What is the capital of France?")}
    probes |= {s: real_examples(s, "test", 1, tok)[0]["prompt"] for s in ("units", "compare", "extract", "list")}

    def answers(net: torch.nn.Module) -> dict[str, str]:
        out = {}
        for what, prompt in probes.items():
            ids = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                g = net.generate(**ids, max_new_tokens=20, do_sample=False)
            out[what] = tok.decode(g[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        return out

    print(json.dumps({"base": answers(model)}, ensure_ascii=False))
    for k in experts:
        if m.models[k]["kind"] == "lora":
            peft_model = PeftModel.from_pretrained(model, str(m.model_dir(k))).eval()
            print(json.dumps({label[k]: answers(peft_model)}, ensure_ascii=False))
            model = peft_model.unload()
        else:
            tuned = AutoModelForCausalLM.from_pretrained(str(m.model_dir(k)), dtype=torch.float32).eval()
            print(json.dumps({label[k]: answers(tuned)}, ensure_ascii=False))


if __name__ == "__main__":
    main()
