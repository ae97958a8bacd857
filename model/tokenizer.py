"""Text in and out: the tokenizer of a checkpoint folder (tokenizer.json, a Hugging Face fast tokenizer read with
`tokenizers`), detokenisation as tokens arrive, and the small byte-level BPE that the random checkpoints get
(model.generate.write_random_checkpoint), trained at creation on text every Python install carries."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"
# Modules whose docstrings are the training text of the random checkpoints' tokenizer: about 300 KB of English
# and code in every CPython, enough merges for vocabularies up to a few thousand tokens.
TRAINING_MODULES = ("builtins", "os", "re", "json", "collections", "itertools", "functools", "pathlib", "argparse",
                    "textwrap", "string", "math", "random", "statistics", "datetime", "dataclasses", "inspect",
                    "unittest", "logging", "subprocess", "threading", "socket", "email.message", "http.client",
                    "urllib.parse", "csv", "decimal", "fractions", "heapq", "bisect", "shutil", "tempfile",
                    "zipfile", "tarfile", "pickle", "contextlib", "enum", "abc", "io")


class Tokenizer:
    """encode(text) -> token ids, decode(ids) -> text; eos_token_ids: the ids that end a sequence."""

    def __init__(self, inner, eos_token_ids: list[int]):
        self.inner = inner  # a tokenizers.Tokenizer
        self.eos_token_ids = eos_token_ids

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """The tokenizer of a checkpoint folder; its end-of-sequence ids from generation_config.json or
        config.json (eos_token_id), else the tokenizer's <|endoftext|> token. FileNotFoundError without
        tokenizer.json."""
        from tokenizers import Tokenizer as Inner

        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in checkpoint folder {folder} (text in and out needs the "
                                    f"checkpoint's tokenizer)")
        inner = Inner.from_file(str(path))
        eos = None
        for name in ("generation_config.json", "config.json"):
            if (folder / name).is_file() and eos is None:
                eos = json.loads((folder / name).read_text()).get("eos_token_id")
        if eos is None:
            eos = inner.token_to_id(END_OF_TEXT)
        return cls(inner, [] if eos is None else [eos] if isinstance(eos, int) else list(eos))

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=True)


class TextStream:
    """The text of a growing token sequence, piece by piece: push(token) returns the text that token completes.
    A byte-level token may end inside a UTF-8 character; that tail is held back until the character is whole
    (or until flush(), when the sequence has ended: it then shows as U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\N{REPLACEMENT CHARACTER}"):  # an unfinished character
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new

    def flush(self) -> str:
        """What push held back: the text after the last whole character, once no token follows."""
        text = self.tokenizer.decode(self.ids)
        new, self.printed = text[self.printed:], len(text)
        return new


def training_text() -> list[str]:
    """The docstrings of TRAINING_MODULES and of their public members, in a fixed order, each once."""
    docs = []
    for name in TRAINING_MODULES:
        module = importlib.import_module(name)
        docs.append(module.__doc__)
        docs += [getattr(value, "__doc__", None) for attr, value in sorted(vars(module).items())
                 if not attr.startswith("_")]
    return list(dict.fromkeys(doc for doc in docs if isinstance(doc, str)))


def train_byte_level_bpe(vocab_size: int, folder: str | Path) -> Tokenizer:
    """Train a byte-level BPE of (up to) vocab_size tokens on training_text() and save it into folder as a
    transformers fast tokenizer (tokenizer.json, tokenizer_config.json); <|endoftext|> is id 0 and the EOS."""
    from tokenizers import Tokenizer as Inner
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    inner = Inner(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    inner.train_from_iterator(training_text(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=inner, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT,
                            pad_token=END_OF_TEXT).save_pretrained(folder)
    return Tokenizer(inner, [inner.token_to_id(END_OF_TEXT)])
