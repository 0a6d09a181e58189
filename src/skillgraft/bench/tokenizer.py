"""SkillBench's character-level tokenizer: a real ``tokenizers`` WordLevel model saved as a Hugging Face
tokenizer, one token per character plus one per task tag (``[rev]``), so ``AutoTokenizer`` loads it anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skillgraft.bench.skills import DIGITS, LOWER, UPPER, all_tags

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def vocabulary() -> list[str]:
    """Every token in id order; the order is fixed so every SkillBench build has the same tokenizer."""
    return [PAD, EOS, UNK, " ", ">", ",", *all_tags(), *LOWER, *UPPER, *DIGITS]


def make_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` (left padding, for batched generation) over :func:`vocabulary`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # a tag is one token, anything else one token per character
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\[[a-z]+\]|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def save_tokenizer(tok: Any, path: Path) -> None:
    tok.save_pretrained(path)
