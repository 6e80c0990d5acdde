"""The tokenizer of a model folder: byte-level encode/decode, special tokens, the sandboxed chat template, eos ids and
streaming detokenisation.

The synthetic tokenizer (qwen3moe.synthetic) is byte-level BPE without merges, so token id == UTF-8 byte value for
ordinary text and the special tokens follow the 256 bytes; the expected ids below come from that, not from the code.
"""

import json
import unicodedata
from pathlib import Path

import pytest

from qwen3moe.errors import CheckpointError
from qwen3moe.synthetic import CHAT_TEMPLATE, SPECIAL_TOKENS, byte_level_tokenizer
from qwen3moe.tokenizer import Qwen3Tokenizer

RECIPE_TEMPLATE = Path(__file__).resolve().parent.parent / "data" / "recipes" / "qwen3_chat_template.jinja"
TEXT = "héllo wörld — 你好 🙂"


def make_tokenizer_dir(folder: Path, tokenizer_config=None, generation_config=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    if tokenizer_config is None:
        tokenizer_config = {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


@pytest.fixture
def tok(tmp_path) -> Qwen3Tokenizer:
    return Qwen3Tokenizer(make_tokenizer_dir(tmp_path / "tok"))


def with_template(tmp_path, template: str) -> Qwen3Tokenizer:
    return Qwen3Tokenizer(make_tokenizer_dir(tmp_path / "tpl", {"chat_template": template, "eos_token": "<|im_end|>"}))


def random_text(rng, n=40) -> str:
    """Characters from ASCII, Latin-1, Greek/Cyrillic, CJK and emoji ranges: 1- to 4-byte UTF-8, NFC-normalised
    because the tokenizer normalises to NFC (as Qwen's does)."""
    ranges = [(0x20, 0x7E), (0xA1, 0xFF), (0x391, 0x3C9), (0x410, 0x44F), (0x4E00, 0x9FFF), (0x1F300, 0x1F64F)]
    chars = []
    for _ in range(n):
        lo, hi = ranges[rng.integers(len(ranges))]
        chars.append(chr(int(rng.integers(lo, hi + 1))))
    return unicodedata.normalize("NFC", "".join(chars))


# --- encode / decode ----------------------------------------------------------------------------------------------


def test_round_trip_of_unicode_text(tok):
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))  # byte-level without merges: one token per UTF-8 byte
    assert tok.decode(ids) == TEXT


def test_round_trip_of_random_text(tok, rng):
    for _ in range(20):
        text = random_text(rng)
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8")), text
        assert tok.decode(ids) == text


def test_special_tokens_in_text_are_single_ids(tok):
    specials = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert sorted(specials.values()) == list(range(256, 256 + len(SPECIAL_TOKENS)))  # after the 256 bytes

    text = "<|im_start|>user\nhi<think></think><|im_end|><|endoftext|>"
    ids = tok.encode(text)
    assert ids == [specials["<|im_start|>"], *b"user\nhi", specials["<think>"], specials["</think>"],
                   specials["<|im_end|>"], specials["<|endoftext|>"]]
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "user\nhi"  # skipped by default
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS)


def test_special_token_lookalikes_are_plain_bytes(tok):
    assert tok.encode("<|im_start |>") == list(b"<|im_start |>")


# --- chat template ------------------------------------------------------------------------------------------------


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi — 你好?"}]
CHATML = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi — 你好?<|im_end|>\n"


def templates() -> list:
    """The synthetic template and, where the repository has it, the Qwen3 release template from data/recipes/."""
    found = [pytest.param(CHAT_TEMPLATE, id="synthetic")]
    if RECIPE_TEMPLATE.is_file():
        found.append(pytest.param(RECIPE_TEMPLATE.read_text(), id="qwen3-recipe"))
    return found


@pytest.mark.parametrize("template", templates())
def test_chat_template_renders_chatml(tmp_path, template):
    tok = with_template(tmp_path, template)
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == CHATML
    assert tok.apply_chat_template(MESSAGES) == CHATML + "<|im_start|>assistant\n"
    assert tok.apply_chat_template(MESSAGES, enable_thinking=None) == CHATML + "<|im_start|>assistant\n"
    assert tok.apply_chat_template(MESSAGES, enable_thinking=True) == CHATML + "<|im_start|>assistant\n"
    assert tok.apply_chat_template(MESSAGES, enable_thinking=False) == \
        CHATML + "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_rendered_chat_encodes_specials_as_single_ids(tok):
    ids = tok.encode(tok.apply_chat_template(MESSAGES))
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert ids[0] == im_start


def test_template_sees_the_tokenizer_config_tokens(tmp_path):
    tok = with_template(tmp_path, "{{ eos_token }}|{{ messages[0]['content'] | tojson }}")
    assert tok.apply_chat_template([{"role": "user", "content": "ü\"x"}]) == '<|im_end|>|"ü\\"x"'


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
    "{{ joiner.__init__.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% set x = messages.append({'role': 'injected', 'content': ''}) %}{{ messages | length }}",
    "{% set x = messages[0].update({'content': 'changed'}) %}{{ messages[0].content }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_refuses_escapes(tmp_path, template):
    tok = with_template(tmp_path, template)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(CheckpointError) as e:
        tok.apply_chat_template(messages)
    assert "chat template failed to render" in str(e.value)
    assert "unsafe" in str(e.value)  # refused by the sandbox, not some accidental error
    assert messages == [{"role": "user", "content": "hi"}]  # and nothing was mutated


@pytest.mark.parametrize("template", ["{{ ''.__class__ }}", "{{ cycler.__init__ }}", "{{ self.__dict__ }}"])
def test_sandbox_renders_unsafe_attributes_as_nothing(tmp_path, template):
    """A single unsafe attribute is an undefined value (Jinja's sandbox semantics): it must not print the object."""
    assert with_template(tmp_path, "[" + template + "]").apply_chat_template([]) == "[]"


def test_raise_exception_in_template(tmp_path):
    tok = with_template(tmp_path, "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles "
                                  "must alternate user/assistant') }}{% endif %}ok")
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "ok"
    with pytest.raises(CheckpointError) as e:
        tok.apply_chat_template([{"role": "assistant", "content": "a"}])
    assert "Conversation roles must alternate user/assistant" in str(e.value)


def test_template_syntax_error(tmp_path):
    with pytest.raises(CheckpointError, match="chat template failed to render"):
        with_template(tmp_path, "{% for m in messages %}{{ m }").apply_chat_template([])


def test_no_chat_template(tmp_path):
    tok = Qwen3Tokenizer(make_tokenizer_dir(tmp_path / "t", {"eos_token": "<|im_end|>"}))
    with pytest.raises(CheckpointError, match="no chat_template"):
        tok.apply_chat_template(MESSAGES)


# --- end-of-sequence ids ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation_eos, eos_token, extra, expected", [
    (258, "<|im_end|>", (), {258}),  # int form
    ([258, 256], "<|im_end|>", (), {258, 256}),  # list form (the Qwen3 releases)
    (258, "<|endoftext|>", (), {258, 256}),  # tokenizer_config's eos_token adds its id
    (None, {"content": "<|endoftext|>", "special": True}, (), {256}),  # AddedToken object form
    (None, None, (), set()),
    (None, "<|not-a-token|>", (), set()),  # an eos_token the vocabulary lacks is ignored
    (None, None, (259,), {259}),  # config.json's eos_token_id, passed in by the model
])
def test_eos_ids(tmp_path, generation_eos, eos_token, extra, expected):
    tokenizer_config = {} if eos_token is None else {"eos_token": eos_token}
    generation = None if generation_eos is None else {"eos_token_id": generation_eos}
    tok = Qwen3Tokenizer(make_tokenizer_dir(tmp_path / "t", tokenizer_config, generation), extra_eos_ids=extra)
    assert set(tok.eos_token_ids) == expected
    assert len(tok.eos_token_ids) == len(expected)  # no duplicates
    assert all(type(i) is int for i in tok.eos_token_ids)


# --- streaming ------------------------------------------------------------------------------------------------------


def stream(tok, ids) -> tuple[list[str], str]:
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


def test_stream_decoder_emits_a_character_when_it_is_complete(tok):
    pieces, rest = stream(tok, tok.encode("a你🙂"))
    assert pieces == ["a", "", "", "你", "", "", "", "🙂"]
    assert rest == ""


def test_stream_decoder_on_multibyte_text(tok, rng):
    for text in [TEXT] + [random_text(rng) for _ in range(20)]:
        ids = tok.encode(text)
        pieces, rest = stream(tok, ids)
        assert not any("\ufffd" in p for p in pieces), (text, pieces)
        assert "".join(pieces) + rest == tok.decode(ids) == text


def test_stream_decoder_with_special_tokens(tok):
    ids = tok.encode("<|im_start|>é<|im_end|>x")
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == "éx"
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_on_arbitrary_ids(tok, rng):
    """Random ids make invalid UTF-8 and special tokens; the pieces must still add up to the full decode."""
    for _ in range(30):
        ids = [int(i) for i in rng.integers(0, tok.vocab_size, 25)]
        pieces, rest = stream(tok, ids)
        assert "".join(pieces) + rest == tok.decode(ids), ids


def test_flush_emits_an_incomplete_character_as_replacement(tok):
    ids = list("ok你".encode("utf-8"))[:-1]  # the last byte of 你 never comes
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) == "ok"
    assert rest == "\ufffd"


# --- broken folders -------------------------------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path):
    folder = make_tokenizer_dir(tmp_path / "t")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as e:
        Qwen3Tokenizer(folder)
    assert str(folder / "tokenizer.json") in str(e.value) and "not found" in str(e.value)


def test_malformed_tokenizer_json(tmp_path):
    folder = make_tokenizer_dir(tmp_path / "t")
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE"')
    with pytest.raises(CheckpointError) as e:
        Qwen3Tokenizer(folder)
    assert str(folder / "tokenizer.json") in str(e.value) and "could not be read" in str(e.value)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json"])
def test_invalid_json_beside_the_tokenizer(tmp_path, name):
    folder = make_tokenizer_dir(tmp_path / "t")
    (folder / name).write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        Qwen3Tokenizer(folder)
    assert str(folder / name) in str(e.value) and "not valid JSON" in str(e.value)
