"""The README's main job: a short end-to-end run on tiny models this module trains itself.

A character-level Llama learns to copy strings (the base), a full fine-tune learns to reverse them (the skill);
the skill is extracted under a budget, stored in a library, applied by reference, and measured by exact match.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ALPHABET = "abcdefghijklmnop"
TASKS = {"copy": lambda s: s, "reverse": lambda s: s[::-1]}
TAG = {"copy": "C", "reverse": "R"}


def _tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", " ", ">", *TAG.values(), *ALPHABET])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")
    fast.save_pretrained(path)
    return fast


def _examples(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 6)))
        out.append((f"{TAG[task]} {s}>", TASKS[task](s)))
    return out


def _train(model, tok, data: list[tuple[str, str]], steps: int, lr: float, seed: int) -> None:
    """Teacher-forced training on target tokens only (prompt tokens are masked from the loss)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = [data[i] for i in torch.randint(0, len(data), (64,), generator=g).tolist()]
        texts = [p + t + tok.eos_token for p, t in batch]
        enc = tok(texts, return_tensors="pt", padding=True)
        labels = enc.input_ids.clone()
        for row, (p, _) in enumerate(batch):
            pad = int((enc.attention_mask[row] == 0).sum())
            labels[row, : pad + len(p)] = -100
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def exact_match(model, tok, data: list[tuple[str, str]]) -> float:
    """Greedy generation, batched with left padding; the share of outputs equal to the target."""
    enc = tok([p for p, _ in data], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
        )
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return sum(t.replace(" ", "") == target for t, (_, target) in zip(texts, data)) / len(data)


def _build_models(work: Path, say: Callable[[str], None]) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir, tuned_dir = work / "base", work / "reverse-tuned"
    if (base_dir / "config.json").exists() and (tuned_dir / "config.json").exists():
        return base_dir, tuned_dir
    tok = _tokenizer(base_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    t0 = time.time()
    _train(model, tok, _examples("copy", 4000, 1), steps=500, lr=3e-3, seed=0)
    model.save_pretrained(base_dir)
    say(f"  trained the base (copy task) in {time.time() - t0:.0f} s")
    t0 = time.time()
    _train(model, tok, _examples("reverse", 4000, 2), steps=400, lr=1e-3, seed=1)
    model.save_pretrained(tuned_dir)
    tok.save_pretrained(tuned_dir)
    say(f"  fine-tuned it on the reverse skill in {time.time() - t0:.0f} s")
    return base_dir, tuned_dir


BUDGETS = (0.05, 0.25, 0.5, None)  # None = dense (exact)


def run_demo(workdir: Path | None = None, say: Callable[[str], None] = print) -> bool:
    """Run the demo; returns True when the skill is there: the dense pack reproduces the fine-tune exactly,
    the largest budgeted pack keeps most of its accuracy, and unapply restores the base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skillgraft import ExtractSpec, apply, apply_to_checkpoint, extract, unapply
    from skillgraft.library import Library

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="skillgraft-demo-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        say("1. building tiny models (character-level Llama, real HF tokenizer)")
        base_dir, tuned_dir = _build_models(work, say)
        tok = AutoTokenizer.from_pretrained(base_dir, padding_side="left")
        test = _examples("reverse", 200, 99)

        def load(d: Path):
            return AutoModelForCausalLM.from_pretrained(d).eval()

        base_em, tuned_em = exact_match(load(base_dir), tok, test), exact_match(load(tuned_dir), tok, test)
        say(f"   exact match on 200 held-out reverse prompts: base {base_em:.1%}, fine-tuned {tuned_em:.1%}")
        lib = Library(work / "library")
        say("2. extract the skill at several budgets, store each in a library, apply it by reference")
        rows = []
        for i, budget in enumerate(BUDGETS):
            label = "dense" if budget is None else f"{budget:.0%}"
            spec = ExtractSpec(
                base=base_dir,
                tuned=tuned_dir,
                out=work / f"reverse-{label.rstrip('%')}.skill",
                budget=budget,
                dense=budget is None,
                name="reverse",
                version=i + 1,
                description=f"reverse a string ({label})",
                tags=("demo", label),
                overwrite=True,
            )
            res = extract(spec)
            rec = lib.add(res.path)
            out = work / f"base+reverse@{rec.version}"
            apply_to_checkpoint(base_dir, [(lib.path(rec.ref), 1.0)], out, overwrite=True)
            energy = sum(t.energy for t in res.tensors)
            kept = sum(t.energy * t.retained for t in res.tensors) / energy if energy else 1.0
            rows.append(
                (
                    rec.ref,
                    label,
                    res.file_bytes,
                    res.file_bytes / res.dense_delta_bytes,
                    kept,
                    exact_match(load(out), tok, test),
                )
            )
        say(f"   {'skill':<11}{'budget':>7}{'bytes':>10}{'of dense Δ':>12}{'energy kept':>13}{'exact match':>13}")
        for ref, label, size, frac, kept, em in rows:
            say(f"   {ref:<11}{label:>7}{size:>10,}{frac:>12.1%}{kept:>13.1%}{em:>13.1%}")
        say("3. hot-swap in place: apply the dense skill to a loaded base, then unapply it")
        model = load(base_dir)
        apply(model, [lib.path(rows[-1][0])])
        em_in = exact_match(model, tok, test)
        unapply(model)
        em_out = exact_match(model, tok, test)
        say(f"   applied in place: {em_in:.1%}; after unapply: {em_out:.1%}")
        lib.close()
        ok = rows[-1][-1] == tuned_em and em_in == tuned_em and em_out == base_em and tuned_em > base_em + 0.5
        best_budgeted = max(r[-1] for r in rows[:-1])
        say(
            f"the skill is there: dense pack = fine-tune ({tuned_em:.1%}), best budgeted pack {best_budgeted:.1%}, "
            f"base {base_em:.1%}"
            if ok
            else "FAILED: the applied skill does not reproduce the fine-tune"
        )
        return ok
