"""A skill pack's low-rank form: per module, factors (P, Q) with ``extra = x @ P @ Q`` — what runs unmerged.

A pack is *LoRA-form* when every entry is a ``lowrank`` delta of a ``Linear`` (or GPT-2 ``Conv1D``) weight;
any other pack (dense or sparse entries, biases, norms, embeddings) is applied by hot-swapping the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skillgraft.skill.pack import SkillPack


@dataclass(frozen=True)
class ModuleFactors:
    """``extra = x @ p @ q`` for one module: ``p`` [in, r], ``q`` [r, out], fp32, the pack's scale folded in."""

    p: torch.Tensor
    q: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.p.shape[1])

    def prototype(self) -> torch.Tensor:
        """Arrow's prototype: the unit top singular direction of ΔW in the module's *input* space ([in]).

        ΔWᵀ = P Q = Qₚ (Rₚ R_qᵀ) Q_qᵀ by two thin QRs, so only an r×r SVD is needed; the sign is arbitrary
        (Arrow scores |⟨v, x⟩|).
        """
        qp, rp = torch.linalg.qr(self.p)  # [in, r], [r, r]
        _, rq = torch.linalg.qr(self.q.T)  # [out, r], [r, r]
        u, _, _ = torch.linalg.svd(rp @ rq.T)
        return qp @ u[:, 0]


def _linear_kind(module: torch.nn.Module) -> str | None:
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return "conv1d"
    return None


def lora_form(pack: SkillPack, model: torch.nn.Module) -> dict[str, ModuleFactors] | None:
    """The pack's factors keyed by module name when it is LoRA-form for ``model``, else None."""
    modules = dict(model.named_modules())
    out: dict[str, ModuleFactors] = {}
    for name, entry in pack.manifest.tensors.items():
        if entry.get("encoding") != "lowrank" or not name.endswith(".weight"):
            return None
        module_name = name[: -len(".weight")]
        kind = _linear_kind(modules.get(module_name)) if module_name in modules else None
        if kind is None:
            return None
        up, down = pack.part(name, "up").float(), pack.part(name, "down").float()
        if entry.get("quant") == "int8":
            up = up * pack.part(name, "up_scale").float()[:, None]
            down = down * pack.part(name, "down_scale").float()[:, None]
        if kind == "linear":  # weight [out, in] = up @ down: x @ Wᵀ gains x @ downᵀ @ upᵀ
            out[module_name] = ModuleFactors(down.T.contiguous(), up.T.contiguous())
        else:  # Conv1D weight [in, out] = up @ down: x @ W gains x @ up @ down
            out[module_name] = ModuleFactors(up.contiguous(), down.contiguous())
    return out or None
