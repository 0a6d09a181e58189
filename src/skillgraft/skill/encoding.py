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
            if cand not in DTYPE_NAMES:  # fp8 checkpoints: the delta is stored in fp16/fp32
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


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def expected_parts(entry: dict) -> dict[str, tuple[tuple[int, ...] | None, tuple[torch.dtype, ...] | None]]:
    """The stored parts an entry needs: part → (shape or None when only its rank is fixed, allowed dtypes)."""
    shape = tuple(entry["shape"])
    floats = tuple(STORE_DTYPES.values())
    ints = (torch.int32, torch.int64)
    enc = entry["encoding"]
    if enc == "dense":
        return {"dense": (shape, floats)}
    if enc == "lowrank":
        m, r = shape[0], entry["rank"]
        n = _numel(shape[1:])
        if entry.get("quant") == "int8":
            i8 = (torch.int8,)
            return {"up": ((m, r), i8), "up_scale": ((m,), floats), "down": ((r, n), i8), "down_scale": ((r,), floats)}
        return {"up": ((m, r), floats), "down": ((r, n), floats)}
    if enc == "sparse":
        nnz = entry["nnz"]
        return {"idx": ((nnz,), ints), "val": ((nnz,), floats)}
    raise FormatError(f"tensor {entry.get('name')!r}: unknown encoding {enc!r}")


def check_parts(name: str, entry: dict, parts: dict[str, tuple[torch.dtype, tuple[int, ...]]], where: str) -> None:
    """Refuse stored parts whose dtype, shape or byte count disagree with the manifest entry (no data is read)."""
    hint = "the pack is damaged or was not written by skillgraft: extract or download it again"
    nbytes = 0
    for part, (want_shape, want_dtypes) in expected_parts(entry).items():
        dtype, shape = parts[part]
        if tuple(shape) != want_shape:
            raise FormatError(
                f"{where}: tensor {name!r} stores its {entry['encoding']} part {part!r} as {list(shape)}, "
                f"but its manifest entry needs {list(want_shape)}",
                hint=hint,
            )
        if dtype not in want_dtypes:
            raise FormatError(f"{where}: tensor {name!r} stores its part {part!r} as {dtype_name(dtype)}", hint=hint)
        nbytes += _numel(shape) * dtype.itemsize
    if entry["encoding"] == "sparse" and entry["nnz"] > _numel(entry["shape"]):
        raise FormatError(
            f"{where}: tensor {name!r} stores {entry['nnz']} sparse entries for {_numel(entry['shape'])} elements",
            hint=hint,
        )
    if entry["bytes"] != nbytes:
        raise FormatError(
            f"{where}: tensor {name!r} says it stores {entry['bytes']} bytes but its parts hold {nbytes}", hint=hint
        )


def decode(entry: dict, get) -> torch.Tensor:
    """Rebuild the fp32 delta of one tensor from its entry and a ``get(part) -> tensor`` accessor.

    Part shapes must be exactly the ones the spec gives for the entry (a [32, 64] part never fills a [64, 32]
    tensor), and sparse indices must be in range, sorted and unique.
    """
    shape = tuple(entry["shape"])
    enc = entry["encoding"]
    name = entry.get("name")
    try:
        want = expected_parts(entry)
    except (KeyError, IndexError, TypeError) as e:
        raise FormatError(f"tensor {name!r}: manifest entry lacks a field its {enc} encoding needs ({e})") from e
    parts = {}
    for part, (want_shape, _) in want.items():
        t = get(part)
        if tuple(t.shape) != want_shape:
            raise FormatError(
                f"tensor {name!r}: stored {enc} part {part!r} has shape {list(t.shape)}, "
                f"its manifest entry needs {list(want_shape)}"
            )
        parts[part] = t
    if enc == "dense":
        return parts["dense"].to(torch.float32)
    if enc == "lowrank":
        up, down = parts["up"].float(), parts["down"].float()
        if entry.get("quant") == "int8":
            up = up * parts["up_scale"].float()[:, None]
            down = down * parts["down_scale"].float()[:, None]
        return (up @ down).reshape(shape)
    n = _numel(shape)
    idx = parts["idx"].long()
    if idx.numel():
        if int(idx[0]) < 0 or int(idx[-1]) >= n or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
            bad = (
                "negative"
                if int(idx.min()) < 0
                else "out of range"
                if int(idx.max()) >= n
                else "unsorted or duplicated"
            )
            raise FormatError(
                f"tensor {name!r}: sparse indices are {bad} (they must be sorted, unique and in [0, {n}))",
                hint="the pack is damaged: extract or download it again",
            )
    out = torch.zeros(n, dtype=torch.float32)
    out[idx] = parts["val"].float()
    return out.reshape(shape)


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
