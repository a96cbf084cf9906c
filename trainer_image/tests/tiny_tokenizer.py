"""A tiny character-level tokenizer built in memory (no download), for trainer and data tests.

``make_tiny_tokenizer()`` returns a ``PreTrainedTokenizerFast`` whose vocabulary is the special tokens
``<pad> <unk> <s> </s> <|im_start|> <|im_end|>`` followed by every printable ASCII character (one token per
character, offsets included), with ``pad/unk/bos/eos`` set and a ChatML chat template. ``vocab_size`` is
about 106, small enough for a randomly initialised model of a few thousand parameters.

    from tiny_tokenizer import make_tiny_tokenizer   # trainer_image/tests is on sys.path under pytest
    tok = make_tiny_tokenizer()
    tok.save_pretrained(path)                         # loadable with AutoTokenizer.from_pretrained(path)
"""

from __future__ import annotations

import string
from typing import Any

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer(extra_chars: str = "") -> Any:
    """A fast character-level tokenizer: printable ASCII plus ``extra_chars``, ChatML chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) | set(extra_chars))
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.name_or_path = "tiny-char-tokenizer"
    return tokenizer
