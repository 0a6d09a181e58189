"""What kind of module a parameter belongs to (attention, MLP, embedding, norm, other) and its layout.

Kinds drive module-aware budgeting: 1-D tensors are always stored dense, embeddings favour sparse encodings.
"""

from __future__ import annotations

import re

ATTN = re.compile(r"(self_attn|attention|\.attn\.|q_proj|k_proj|v_proj|o_proj|qkv|c_attn|query|key|value|out_proj)")
MLP = re.compile(
    r"(mlp|ffn|feed_forward|gate_proj|up_proj|down_proj|fc1|fc2|c_fc|dense_h_to_4h|dense_4h_to_h|w1|w2|w3)"
)
EMBED = re.compile(r"(embed|wte|wpe|lm_head|word_embeddings|position_embeddings|shared)")
NORM = re.compile(r"(norm|ln_|layernorm|\.ln\d?\.)", re.IGNORECASE)
# GPT-2 style Conv1D modules store weights as [in, out] ("fan_in_fan_out").
CONV1D_MODEL_TYPES = {"gpt2", "gpt_bigcode", "imagegpt", "decision_transformer"}
CONV1D_NAMES = re.compile(r"\.(c_attn|c_proj|c_fc|q_attn)\.weight$")


def module_kind(name: str, shape: tuple[int, ...]) -> str:
    """Classify a parameter by name and rank: ``embedding``, ``attention``, ``mlp``, ``norm`` or ``other``."""
    if len(shape) < 2:
        return "norm" if NORM.search(name) else "other"
    if EMBED.search(name):
        return "embedding"
    if ATTN.search(name):
        return "attention"
    if MLP.search(name):
        return "mlp"
    return "other"


def layout(name: str, model_type: str | None) -> str | None:
    """``fan_in_fan_out`` for Conv1D weights of GPT-2-family models, else None (torch Linear layout)."""
    if model_type in CONV1D_MODEL_TYPES and CONV1D_NAMES.search(name):
        return "fan_in_fan_out"
    return None
