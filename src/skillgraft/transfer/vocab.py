"""Shared-vocabulary checks: logit arithmetic is only meaningful when every model's token ids mean the same.

Compares token→id maps and special tokens up front and names the first differing token; a model whose output
layer is padded beyond the tokenizer (unused rows) is sliced to the common range.
"""

from __future__ import annotations

from typing import Any

from skillgraft.errors import MismatchError

SPECIALS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def check_shared_vocab(named: list[tuple[str, Any]]) -> int:
    """Raise MismatchError naming the first difference; return the common vocabulary size."""
    ref_name, ref = named[0]
    ref_vocab = {i: t for t, i in ref.get_vocab().items()}
    for name, tok in named[1:]:
        vocab = {i: t for t, i in tok.get_vocab().items()}
        for i in sorted(set(ref_vocab) | set(vocab)):
            a, b = ref_vocab.get(i), vocab.get(i)
            if a != b:
                raise MismatchError(
                    f"tokenizers differ at id {i}: {a!r} in {ref_name} but {b!r} in {name}",
                    hint="logit arithmetic needs models that share one vocabulary (same tokenizer)",
                )
        for attr in SPECIALS:
            if getattr(ref, attr, None) != getattr(tok, attr, None):
                raise MismatchError(
                    f"special token {attr} differs: {getattr(ref, attr, None)} in {ref_name}, "
                    f"{getattr(tok, attr, None)} in {name}",
                    hint="logit arithmetic needs models that share one vocabulary (same tokenizer)",
                )
    return len(ref_vocab)
