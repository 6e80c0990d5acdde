"""The tokenizer of a model folder: ``tokenizer.json`` through the ``tokenizers`` library, the chat template from
``tokenizer_config.json`` rendered in a sandbox, end-of-sequence ids, and streaming detokenisation.

The chat template is Jinja text shipped inside the model folder, i.e. code written by whoever made the folder. We
render it as transformers does, in Jinja's ``ImmutableSandboxedEnvironment``: templates can loop, branch and call
string methods, but cannot reach Python internals, import modules or mutate the objects they are given.
"""

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .errors import CheckpointError


class Qwen3Tokenizer:
    def __init__(self, model_dir: str | Path, extra_eos_ids: tuple[int, ...] = ()):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path} not found: the model folder needs its tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises plain Exceptions for malformed files
            raise CheckpointError(f"{path} could not be read by the tokenizers library: {e}") from None
        self.config = read_json(model_dir / "tokenizer_config.json")
        self.chat_template = self.config.get("chat_template")
        self.eos_token_ids = self._eos_ids(model_dir, extra_eos_ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) are recognised."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool | None = None) -> str:
        """Render the folder's chat template. ``enable_thinking`` is Qwen3's switch (None: the template's default)."""
        if not self.chat_template:
            raise CheckpointError("this model's tokenizer_config.json has no chat_template; use raw prompts")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_template_error
        variables = {k: v for k, v in self.config.items() if k.endswith("_token") and isinstance(v, str)}
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise CheckpointError(f"the model's chat template failed to render: {e}") from None

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def _eos_ids(self, model_dir: Path, extra: tuple[int, ...]) -> tuple[int, ...]:
        """generation_config.json's eos_token_id (int or list), config.json's, and the tokenizer's eos_token."""
        ids = list(extra)
        eos = read_json(model_dir / "generation_config.json").get("eos_token_id")
        ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
        eos_token = self.config.get("eos_token")
        if isinstance(eos_token, dict):  # older tokenizer_config.json files store an AddedToken object
            eos_token = eos_token.get("content")
        if isinstance(eos_token, str) and self.token_to_id(eos_token) is not None:
            ids.append(self.token_to_id(eos_token))
        return tuple(dict.fromkeys(int(i) for i in ids))


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never emitting half a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a multi-byte character; decoding them alone gives U+FFFD. We
    decode from a small prefix of already-emitted tokens (so spacing decisions stay consistent) and hold the text
    back while it ends in U+FFFD.
    """

    def __init__(self, tokenizer: Qwen3Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the ids whose text gives context for the next piece
        self.read = 0  # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that is now complete (possibly '')."""
        self.ids.append(int(token_id))
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end is emitted as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


def _raise_template_error(message: str):
    raise jinja2.TemplateError(message)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or {} when the file is absent (optional files like generation_config.json)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}
