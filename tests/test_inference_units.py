"""Inference building blocks that need no model: request validation, sampling, streaming text."""

from __future__ import annotations

import pytest
import torch
from novelcrafter.inference.client import build_request
from novelcrafter.inference.sampling import SamplingParams, TextAssembler, make_generator, next_token
from novelcrafter.inference.service import Limits, validate_request

from novelcrafter.errors import InvalidArgument

LIMITS = Limits(max_new_tokens_cap=64)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"max_new_tokens": 65}, "exceeds this server's cap of 64"),
        ({"max_new_tokens": -3}, "max_new_tokens must be positive"),
        ({"temperature": 2.5}, "temperature must be in [0, 2]"),
        ({"temperature": float("nan")}, "temperature must be in"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be in (0, 2]"),
        ({"repetition_penalty": 2.5}, "repetition_penalty must be in (0, 2]"),
        ({"stop": [""]}, "stop sequences must have 1 to"),
        ({"stop": ["x"] * 17}, "at most 16 stop sequences"),
    ],
)
def test_invalid_requests_get_readable_messages(fields: dict, message: str) -> None:
    prompt = fields.pop("prompt", "Once upon a time")
    with pytest.raises(InvalidArgument) as info:
        validate_request(build_request(prompt, book_id="0123456789abcdef", **fields), LIMITS)
    assert message in info.value.message


def test_defaults_follow_the_contract() -> None:
    spec = validate_request(build_request("Once", book_id="0123456789abcdef"), LIMITS)
    assert spec.adapter == "latest"
    assert spec.max_new_tokens == 64  # the default (128) is capped, not an error
    assert validate_request(build_request("Once", book_id="0123456789abcdef"), Limits()).max_new_tokens == 128
    assert spec.params == SamplingParams(0.8, 0.95, 50, 1.1, None)
    explicit = validate_request(
        build_request("Once", adapter="base", max_new_tokens=5, temperature=0.0, top_k=0, seed=7), LIMITS
    )
    assert (explicit.adapter, explicit.max_new_tokens) == ("base", 5)
    assert explicit.params == SamplingParams(0.0, 0.95, 0, 1.1, 7)


def test_seeded_sampling_is_reproducible_and_respects_filters() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, repetition_penalty=1.3, seed=11)
    seen = torch.tensor([3, 5, 7])

    def draw(seed: int) -> list[int]:
        gen, _ = make_generator(seed)
        return [next_token(logits, params, gen, seen) for _ in range(50)]

    assert draw(11) == draw(11)
    assert draw(11) != draw(12)
    top20 = set(torch.topk(logits, 20).indices.tolist())
    assert set(draw(11)) <= top20
    greedy = SamplingParams(temperature=0.0)
    assert next_token(logits, greedy, make_generator(1)[0], None) == int(logits.argmax())
    # Repetition penalty divides positive logits of seen tokens: the argmax can move.
    best = int(logits.argmax())
    penalized = next_token(
        logits, SamplingParams(0.0, 1.0, 0, 100.0), make_generator(1)[0], torch.tensor([best])
    )
    assert penalized != best


class CharTokenizer:
    """Byte-level stand-in: one token per UTF-8 byte (multi-byte characters span tokens)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _assemble(text: str, stop: list[str]) -> tuple[list[str], TextAssembler]:
    tok = CharTokenizer()
    assembler = TextAssembler(tok, stop)
    pieces = []
    for token in tok.encode(text):
        pieces.append(assembler.add(token))
        if assembler.stopped:
            break
    pieces.append(assembler.finish())
    return [p for p in pieces if p], assembler


def test_text_pieces_never_split_characters_and_concatenate_to_the_text() -> None:
    text = "Café — naïve 東京 done"
    pieces, assembler = _assemble(text, [])
    assert "".join(pieces) == text == assembler.text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_sequence_ends_text_before_it_even_across_pieces() -> None:
    pieces, assembler = _assemble("The end. THE END of it", ["THE END", "zzz"])
    assert assembler.stopped
    assert "".join(pieces) == "The end. " == assembler.text
    pieces, assembler = _assemble("no stop here", ["zzz"])
    assert not assembler.stopped and "".join(pieces) == "no stop here"
