"""A byte-level BPE tokenizer trained in code on an environment's texts, for tiny from-scratch policies.

A vocabulary of about a thousand tokens trained on the texts a policy will read and write keeps
trajectories about four times shorter than bytes would, which is what makes a tiny policy trainable on
a CPU. The tokenizer is a :class:`transformers.PreTrainedTokenizerFast`; save it with
``save_pretrained`` and load it with :func:`load_tokenizer` (the explicit class, never ``AutoTokenizer``,
which needs a model config to pick the class).
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rl.errors import ConfigError
from rl.hf import PLAIN_SPECIAL_TOKENS


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000,
                    special_tokens: tuple[str, ...] = PLAIN_SPECIAL_TOKENS) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``.

    Args:
        texts: the texts the policy will see and write (observations and correct turns).
        vocab_size: size of the vocabulary, special tokens and the 256 byte tokens included.
        special_tokens: tokens never split; the first is the padding token (see :class:`ChatFormat`).

    Returns:
        The tokenizer, with ``pad_token`` set; every string can be encoded (byte fallback).
    """
    if vocab_size < 256 + len(special_tokens):
        raise ConfigError(f"vocab_size ({vocab_size}) must be at least {256 + len(special_tokens)} "
                         "(256 byte tokens plus the special tokens).")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\S+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=special_tokens[0],
                                   additional_special_tokens=list(special_tokens[1:]))


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by ``save_pretrained`` (from :func:`train_tokenizer` or any fast tokenizer)."""
    return PreTrainedTokenizerFast.from_pretrained(path)
