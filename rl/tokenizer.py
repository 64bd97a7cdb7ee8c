"""A byte-level BPE tokenizer trained in code on an environment's texts, for tiny from-scratch policies.

A vocabulary of about a thousand tokens trained on the texts a policy will read and write keeps
trajectories about four times shorter than bytes would, which is what makes a tiny policy trainable on
a CPU. The tokenizer is a :class:`transformers.PreTrainedTokenizerFast`; save it with
``save_pretrained`` and load it with :func:`load_tokenizer` (the explicit class, never ``AutoTokenizer``,
which needs a model config to pick the class).
"""

from __future__ import annotations

import json
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rl.errors import ConfigError
from rl.hf import PLAIN_SPECIAL_TOKENS


HEX = "0123456789abcdef"
# The 12 hex digits of an artifact id (``img_3f2a9c01d4e7``), two at a time: a pair at offset 2k after the
# underscore, followed by the rest of the 12 digits and no further letter or digit (fixed-length look-arounds).
ID_PAIRS = Regex("|".join(f"(?<=_[0-9a-f]{{{2 * k}}})[0-9a-f]{{2}}(?=[0-9a-f]{{{10 - 2 * k}}}(?![0-9A-Za-z]))"
                          for k in range(6)))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000,
                    special_tokens: tuple[str, ...] = PLAIN_SPECIAL_TOKENS,
                    id_pairs: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``.

    Args:
        texts: the texts the policy will see and write (observations and correct turns).
        vocab_size: size of the vocabulary, special tokens and the 256 byte tokens included (plus, with
            ``id_pairs``, those of the 256 hex pairs the training did not learn).
        special_tokens: tokens never split; the first is the padding token (see :class:`ChatFormat`).
        id_pairs: the 12 hex digits of an artifact id (``img_3f2a9c01d4e7``) become six tokens of two
            digits each, every one of the 256 pairs in the vocabulary (without it the BPE splits an id
            into single digits and a few learned merges). Meant to make copying an id from a tool
            response into the answer easier (each token one of 256 symbols that rarely repeats within an
            id); on the main job's 0.5M-parameter policy it did not: docs/main-job.md, "Where the rest of
            the gap is".

    Returns:
        The tokenizer, with ``pad_token`` set; every string can be encoded (byte fallback).
    """
    if vocab_size < 256 + len(special_tokens):
        raise ConfigError(f"vocab_size ({vocab_size}) must be at least {256 + len(special_tokens)} "
                         "(256 byte tokens plus the special tokens).")
    tokenizer = Tokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(r" ?\S+|\s+"), behavior="isolated")]
    if id_pairs:
        splits.append(pre_tokenizers.Split(ID_PAIRS, behavior="isolated"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if id_pairs:
        tokenizer = _with_hex_pairs(tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=special_tokens[0],
                                   additional_special_tokens=list(special_tokens[1:]))


def _with_hex_pairs(tokenizer: Tokenizer) -> Tokenizer:
    """The trained BPE with every two-hex-digit token: the missing ones appended to the vocabulary, their
    merges ranked after the learned ones (hex digits are their own byte-level characters). Elsewhere such a
    merge applies only to two hex characters that the learned merges left apart."""
    spec = json.loads(tokenizer.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    as_pairs = bool(merges) and isinstance(merges[0], list)
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens") or [])])
    for pair in (a + b for a in HEX for b in HEX):
        if pair not in vocab:
            vocab[pair], next_id = next_id, next_id + 1
            merges.append([pair[0], pair[1]] if as_pairs or not merges else f"{pair[0]} {pair[1]}")
    return Tokenizer.from_str(json.dumps(spec))


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by ``save_pretrained`` (from :func:`train_tokenizer` or any fast tokenizer)."""
    return PreTrainedTokenizerFast.from_pretrained(path)
