"""Mixture-of-experts assembly from dense fine-tunes (mergekit-moe configs): a Mixtral checkpoint whose experts
are the fine-tunes' MLPs, routed by gates computed from prompts or drawn at random. See docs/merging.md.
"""

from __future__ import annotations

from pathlib import Path

from skillgraft.merge.moe.assemble import MoeResult, run_moe
from skillgraft.merge.moe.config import GATE_MODES, MoeConfig, MoeExpert, load_moe_config, parse_moe_config
from skillgraft.merge.moe.plan import MoeOptions, MoePlan, plan_moe
from skillgraft.progress import ProgressFn, no_progress

__all__ = [
    "GATE_MODES",
    "MoeConfig",
    "MoeExpert",
    "MoeOptions",
    "MoePlan",
    "MoeResult",
    "build_moe",
    "load_moe_config",
    "parse_moe_config",
    "plan_moe",
    "run_moe",
]


def build_moe(
    config: str | Path | dict | MoeConfig,
    out: str | Path,
    *,
    seed: int = 0,
    layout: str = "fused",
    overwrite: bool = False,
    allow_identical_experts: bool = False,
    progress: ProgressFn = no_progress,
) -> MoeResult:
    """Validate ``config`` (a mergekit-moe YAML path, its mapping, or a :class:`MoeConfig`) completely, then
    write the Mixtral checkpoint to ``out``; nothing is left at ``out`` on error.

    ``seed`` seeds the random gate modes and ``noise_scale`` (mergekit-moe's ``--random-seed``); ``layout`` is
    ``fused`` (transformers ≥ 5's ``experts.gate_up_proj`` / ``experts.down_proj``, what mergekit-moe 0.1.5
    writes) or ``per_expert`` (``block_sparse_moe.experts.N.w1/w2/w3``, which transformers 4 and 5 both load).

    Example::

        from skillgraft.merge.moe import build_moe
        build_moe({"base_model": "./base", "gate_mode": "random", "experts_per_token": 1,
                   "experts": [{"source_model": "./math-ft"}, {"source_model": "./code-ft"}]}, "./moe")
    """
    opts = MoeOptions(
        out=Path(out), overwrite=overwrite, seed=seed, layout=layout, allow_identical_experts=allow_identical_experts
    )
    plan = plan_moe(load_moe_config(config), opts)
    try:
        return run_moe(plan, progress)
    finally:
        plan.close()
