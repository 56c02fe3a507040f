"""A character-level tokenizer for the built-in tiny model, built offline
with the `tokenizers` library and wrapped as a standard HF fast tokenizer.

It is saved with `tokenizer_class: PreTrainedTokenizerFast` so that
`AutoTokenizer` does not substitute a model-family tokenizer (the qwen2
gotcha in docs/design.md §8).
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
# Digits and operators first: the tasks live there. Letters and a little
# punctuation let real-format prompts encode (rarely well, but without error).
CHARS = string.digits + "+-*/=(),.<>?:#$\\{}^_ \n" + string.ascii_lowercase + string.ascii_uppercase


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # One token per character, spaces included.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    # A leading BOS gives the first prompt character a context to attend to.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
    )
    return tok
