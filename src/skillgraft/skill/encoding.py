"""Per-tensor delta encodings of a skill pack: ``dense``, ``lowrank`` (optionally int8 factors) and ``sparse``.

Each encoder takes an fp32 delta (or its factors) and returns the stored tensors plus the entry fields; ``decode``
is the single deterministic inverse (fp32 on the CPU) used by apply, export and verification.
"""

from __future__ import annotations

import torch

from skillgraft.errors import FormatError

FP16_MAX = 65504.0
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in STORE_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def store_dtype_for(t: torch.Tensor, preferred: torch.dtype = torch.float16) -> torch.dtype:
    """fp16 unless values overflow it (then fp32)."""
    if preferred == torch.float16 and t.numel() and t.abs().max().item() > FP16_MAX / 2:
        return torch.float32
    return preferred


def encode_dense(delta: torch.Tensor, base: torch.Tensor | None, tuned: torch.Tensor | None) -> tuple[dict, dict]:
    """Store the delta in the smallest float dtype that still reproduces ``tuned`` bit for bit from ``base``.

    When base/tuned are not given (e.g. a delta from an adapter) the delta is kept in fp32.
    """
    chosen = torch.float32
    if base is not None and tuned is not None and tuned.dtype in (torch.float16, torch.bfloat16, torch.float32):
        for cand in (tuned.dtype, torch.float16, torch.float32):
            if cand.itemsize > torch.float32.itemsize:
                continue
            approx = delta.to(cand)
            if not torch.isfinite(approx).all():
                continue
            if torch.equal((base.float() + approx.float()).to(tuned.dtype), tuned):
                chosen = cand
                break
        else:
            chosen = torch.float32
    stored = delta.to(chosen)
    fields = {"encoding": "dense", "value_dtype": dtype_name(chosen)}
    return {"dense": stored}, fields


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantisation: x ≈ q * scale[:, None]."""
    scale = x.abs().amax(dim=1).clamp_min(1e-30) / 127.0
    q = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


def encode_lowrank(
    up: torch.Tensor, down: torch.Tensor, int8: bool = False, dtype: torch.dtype | None = None
) -> tuple[dict, dict]:
    """Store delta ≈ up @ down with up [m, r] and down [r, n].

    Factors are kept in ``dtype`` when given (e.g. an imported adapter's own dtype, for exactness), else fp16
    (fp32 if fp16 would overflow), else — with ``int8`` — as per-row int8 with fp32 scales.
    """
    r = up.shape[1]
    if int8:
        uq, us = quantize_rows(up.float())
        dq, ds = quantize_rows(down.float())
        tensors = {"up": uq, "up_scale": us, "down": dq, "down_scale": ds}
        fields = {"encoding": "lowrank", "rank": r, "quant": "int8", "value_dtype": "int8"}
    else:
        dt = dtype or store_dtype_for(torch.cat([up.abs().amax().view(1), down.abs().amax().view(1)]))
        tensors = {"up": up.to(dt).contiguous(), "down": down.to(dt).contiguous()}
        fields = {"encoding": "lowrank", "rank": r, "quant": None, "value_dtype": dtype_name(dt)}
    return tensors, fields


def encode_sparse(delta: torch.Tensor, k: int) -> tuple[dict, dict]:
    """Keep the ``k`` largest-magnitude entries (flat int32/int64 indices, sorted, and their values)."""
    flat = delta.reshape(-1)
    k = max(0, min(k, flat.numel()))
    idx = torch.topk(flat.abs(), k, sorted=False).indices if k < flat.numel() else torch.arange(flat.numel())
    idx = torch.sort(idx).values
    vals = flat[idx]
    dt = store_dtype_for(vals)
    idx_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    tensors = {"idx": idx.to(idx_dtype), "val": vals.to(dt)}
    return tensors, {"encoding": "sparse", "nnz": k, "value_dtype": dtype_name(dt)}


def decode(entry: dict, get) -> torch.Tensor:
    """Rebuild the fp32 delta of one tensor from its entry and a ``get(part) -> tensor`` accessor."""
    shape = tuple(entry["shape"])
    enc = entry["encoding"]
    try:
        if enc == "dense":
            return get("dense").to(torch.float32).reshape(shape)
        if enc == "lowrank":
            up, down = get("up"), get("down")
            if entry.get("quant") == "int8":
                up = up.float() * get("up_scale")[:, None]
                down = down.float() * get("down_scale")[:, None]
            m = shape[0]
            return (up.float() @ down.float()).reshape(m, -1).reshape(shape)
        if enc == "sparse":
            n = 1
            for s in shape:
                n *= s
            out = torch.zeros(n, dtype=torch.float32)
            out[get("idx").long()] = get("val").float()
            return out.reshape(shape)
    except (RuntimeError, IndexError, KeyError) as e:
        raise FormatError(f"tensor {entry.get('name')!r}: stored {enc} parts do not fit its shape {shape} ({e})") from e
    raise FormatError(f"tensor {entry.get('name')!r}: unknown encoding {enc!r}")


def stored_parts(entry: dict) -> tuple[str, ...]:
    enc = entry["encoding"]
    if enc == "dense":
        return ("dense",)
    if enc == "lowrank":
        return ("up", "up_scale", "down", "down_scale") if entry.get("quant") == "int8" else ("up", "down")
    if enc == "sparse":
        return ("idx", "val")
    raise FormatError(f"tensor {entry.get('name')!r}: unknown encoding {enc!r}")


def sq_norm(t: torch.Tensor) -> float:
    """‖t‖²_F without an fp64 copy of ``t`` (a BLAS dot product in fp32)."""
    flat = t.reshape(-1).float()
    return float(torch.dot(flat, flat)) if flat.numel() else 0.0


def rel_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    """‖Δ − Δ̂‖_F / ‖Δ‖_F (0 for an all-zero Δ reproduced exactly)."""
    num = sq_norm(delta - approx) ** 0.5
    den = sq_norm(delta) ** 0.5
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))
