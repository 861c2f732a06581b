"""The tokenizer: a `tokenizers` tokenizer.json plus the few facts beside it (BOS/EOS, chat template).

Files in a checkpoint folder:
    tokenizer.json          the `tokenizers` model (BPE, pre-tokenizer, added tokens)
    tokenizer_config.json   {"bos_token", "eos_tokens", "add_bos_token", "chat_template"}
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

try:
    from tokenizers.decoders import DecodeStream as _DecodeStream  # tokenizers >= 0.21
except ImportError:  # pragma: no cover - older tokenizers: the Python windows do the same
    _DecodeStream = None

from meshserve.models.errors import CheckpointError, ConfigError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
LONG_TEXT = 4096  # characters: longer texts are tokenized with the GIL released


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    bos_token: str | None
    eos_tokens: tuple[str, ...]
    add_bos_token: bool
    chat_template: str | None

    def to_json(self) -> str:
        # `eos_token` is the key other tools read (transformers, lm-eval, vLLM); `eos_tokens` keeps
        # every id that ends generation
        eos = {"eos_token": self.eos_tokens[0]} if self.eos_tokens else {}
        return json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **dataclasses.asdict(self), **eos,
                           "eos_tokens": list(self.eos_tokens)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TokenizerConfig":
        data = json.loads(text)
        eos = data.get("eos_tokens") or ([data["eos_token"]] if isinstance(data.get("eos_token"), str) else [])
        return cls(bos_token=data.get("bos_token"), eos_tokens=tuple(eos),
                   add_bos_token=bool(data.get("add_bos_token", False)),
                   chat_template=data.get("chat_template"))


class Tokenizer:
    def __init__(self, backend: HFTokenizer, config: TokenizerConfig):
        self.backend = backend
        self.config = config
        self.bos_id = None if config.bos_token is None else self._id(config.bos_token)
        self.eos_ids = tuple(self._id(t) for t in config.eos_tokens)
        self._template = _compile_template(config.chat_template) if config.chat_template else None

    def _id(self, token: str) -> int:
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise ConfigError(f"special token {token!r} is not in the vocabulary")
        return tid

    @classmethod
    def load(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        try:
            backend = HFTokenizer.from_file(str(folder / TOKENIZER_FILE))
            config = TokenizerConfig.from_json((folder / TOKENIZER_CONFIG_FILE).read_text())
        except Exception as e:  # tokenizers raises plain Exception; OSError/ValueError for the JSON
            raise CheckpointError(f"cannot read the tokenizer in {folder}: {e}") from None
        return cls(backend, config)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.backend.save(str(folder / TOKENIZER_FILE))
        (folder / TOKENIZER_CONFIG_FILE).write_text(self.config.to_json())

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for: the longest string in the vocabulary
        (a byte-level token's string has a character per byte it decodes to, so this bounds it). A
        text longer than n × this cannot encode to n tokens or fewer."""
        return max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=1)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token text (e.g. "<|im_start|>") maps to its single id."""
        if len(text) > LONG_TEXT:  # encode_batch releases the GIL (encode does not): other threads run meanwhile
            ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.config.add_bos_token if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        if self._template is None:
            raise ConfigError("this model has no chat template; send plain text instead of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ConfigError(f"messages[{i}] must have a string 'role' and a 'content'")
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token=self.config.bos_token or "",
            eos_token=self.config.eos_tokens[0] if self.config.eos_tokens else "")

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
        # The template writes BOS itself where the model wants one.
        return self.encode(self.apply_chat_template(messages, tools=tools), add_bos=False)

    def incremental_decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas that never split a UTF-8 character.

    Decoding token by token breaks multi-byte characters (a byte-level BPE token can hold half of
    one) and word-initial spaces (SentencePiece). So each step decodes a short window
    [prefix_offset, end) and emits only what extends the text already sent; while the window's
    text ends in U+FFFD (an incomplete byte sequence) nothing is emitted. The tokenizers library's
    own DecodeStream does the same in one native call per token (where it has it); the windows
    are still kept, for `flush`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: decoded text from here is context only
        self._read_offset = 0  # tokens before this have been emitted
        native = _DecodeStream is not None and isinstance(getattr(tokenizer, "backend", None), HFTokenizer)
        self._stream = _DecodeStream(skip_special_tokens=True) if native else None

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._stream is not None:
            text = self._stream.step(self._tok.backend, token_id)
            if not text:
                return ""
        else:
            decode = self._tok.decode
            prefix = decode(self._ids[self._prefix_offset:self._read_offset])
            full = decode(self._ids[self._prefix_offset:])
            if len(full) <= len(prefix) or full.endswith("\ufffd"):
                return ""
            text = full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream (a lone broken byte included)."""
        prefix = self._tok.decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._tok.decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""


def _compile_template(source: str) -> jinja2.Template:
    def raise_exception(message):
        raise ConfigError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not parse: {e}") from None

