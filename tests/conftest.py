"""Shared fixtures: tiny real-architecture checkpoints (Llama with tied embeddings, GPT-2) built in the tests."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts: SkillBench builds in two processes

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


def mergekit_python() -> str | None:
    """The python live mergekit tests run mergekit with: $SKILLGRAFT_MERGEKIT_PY, else this one if it has it."""
    import importlib.util
    import sys

    if py := os.environ.get("SKILLGRAFT_MERGEKIT_PY"):
        return py
    return sys.executable if importlib.util.find_spec("mergekit") else None


def pytest_collection_modifyitems(config, items):
    """Tests marked ``live_mergekit`` are deselected where no mergekit python exists (`make test-mergekit` sets
    one up): reported as deselected, never as a skip that looks like a pass."""
    if mergekit_python() is not None:
        return
    live = [i for i in items if i.get_closest_marker("live_mergekit")]
    if live:
        config.hook.pytest_deselected(items=live)
        items[:] = [i for i in items if not i.get_closest_marker("live_mergekit")]


def llama_config(**kw):
    from transformers import LlamaConfig

    args = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    args.update(kw)
    return LlamaConfig(**args)


def gpt2_config(**kw):
    from transformers import GPT2Config

    args = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    args.update(kw)
    return GPT2Config(**args)


def build(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def finetune_like(model, seed: int = 1, scale: float = 0.02, rank: int = 4, skip: tuple[str, ...] = ()) -> None:
    """Perturb a model in place the way fine-tunes look: low-rank-plus-noise on matrices, noise on vectors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in skip):
                continue
            if p.dim() == 2:
                a, b = torch.randn(p.shape[0], rank, generator=g), torch.randn(rank, p.shape[1], generator=g)
                d = scale * (a @ b) / rank + 0.1 * scale * torch.randn(p.shape, generator=g)
            else:
                d = 0.1 * scale * torch.randn(p.shape, generator=g)
            p.add_(d.to(p.dtype))


def save(model, path: Path, **kw) -> Path:
    model.save_pretrained(path, **kw)
    return path


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(base, tuned) tiny Llama checkpoints (fp32, tied embeddings); layer-1 MLP left unchanged."""
    root = tmp_path_factory.mktemp("llama")
    m = build(llama_config())
    base = save(m, root / "base")
    finetune_like(m, skip=("layers.1.mlp",))
    return base, save(m, root / "tuned")


@pytest.fixture(scope="session")
def llama_pair_bf16(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llama_bf16")
    m = build(llama_config(hidden_size=128, intermediate_size=256), dtype=torch.bfloat16)
    base = save(m, root / "base")
    finetune_like(m, seed=2)
    return base, save(m, root / "tuned")


@pytest.fixture(scope="session")
def gpt2_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gpt2")
    m = build(gpt2_config())
    base = save(m, root / "base")
    finetune_like(m, seed=3)
    return base, save(m, root / "tuned")


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """Same architecture as ``llama_pair`` but different weights."""
    return save(build(llama_config(), seed=42), tmp_path_factory.mktemp("other") / "base")


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def leftovers(directory: Path) -> list[str]:
    """Temporary files/directories a failed write could have left behind."""
    return sorted(p.name for p in Path(directory).iterdir() if ".partial" in p.name or p.name.endswith(".tmp"))


@pytest.fixture(scope="session")
def quick_bench(tmp_path_factory):
    """The quick SkillBench profile, built once per test session (or reused from $SKILLGRAFT_TEST_CACHE)."""
    from skillgraft.bench.build import build

    cache = os.environ.get("SKILLGRAFT_TEST_CACHE")
    return build("quick", Path(cache) if cache else tmp_path_factory.mktemp("skillbench"))
