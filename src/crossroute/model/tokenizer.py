"""The embedded default's character-level tokenizer, built with `tokenizers` and wrapped for transformers."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]
# Every character the built-in domains can produce; fixed so the vocabulary never depends on data.
CHARSET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " +-*/=?:;.,()'_<>!"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic char-level tokenizer: one id per character, <pad>/<eos>/<unk> specials."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARSET:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=256,
    )
    return fast
