"""The ``--engine vllm`` mapping logic, without a vLLM server (issue 19): our sampling fields onto
vLLM's completion request, vLLM's server-sent events onto our stream, finish reasons, the
one-name-per-load bookkeeping, and the errors of a vLLM URL that is wrong or unreachable (real
sockets; the real-process tests against vLLM's CPU build are in ``test_inference_vllm.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from novelcrafter.inference.lora import AdapterRejected
from novelcrafter.inference.sampling import SamplingParams
from novelcrafter.inference.vllm_backend import AdapterNames, VllmBackend
from novelcrafter.inference.vllm_client import (
    StreamDelta,
    StreamEnd,
    VllmClient,
    completion_body,
    finish_reason,
    parse_stream,
)
from support import base_env, free_port, run_cli

from novelcrafter.errors import InvalidArgument, Unavailable


def test_sampling_fields_map_one_to_one() -> None:
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.2, seed=11)
    body = completion_body("b:v@x", [1, 2, 3], params, 17, ["\n\n", "THE END"], {2, 0})
    assert body == {
        "model": "b:v@x",
        "prompt": [1, 2, 3],  # our tokens: our limits and chat template decide the prompt
        "max_tokens": 17,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "repetition_penalty": 1.2,
        "seed": 11,
        "stop": ["\n\n", "THE END"],
        "stop_token_ids": [0, 2],
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_top_k_off_and_no_seed() -> None:
    body = completion_body("base", [5], SamplingParams(0.0, 1.0, 0, 1.0, None), 1, [], set())
    assert body["top_k"] == 0  # off, on both sides
    assert "seed" not in body  # unseeded: vLLM draws its own
    assert body["temperature"] == 0.0  # greedy on both sides


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"finish_reason": "length", "stop_reason": None}, "length"),
        ({"finish_reason": "stop", "stop_reason": "THE END"}, "stop"),  # one of our stop strings
        ({"finish_reason": "stop", "stop_reason": 2}, "eos"),  # one of our end-of-text ids
        ({"finish_reason": "stop", "stop_reason": None}, "eos"),  # the model's own eos
    ],
)
def test_finish_reasons(choice: dict, expected: str) -> None:
    assert finish_reason(choice) == expected


def test_finish_reason_abort_is_unavailable() -> None:
    with pytest.raises(Unavailable, match="abort"):
        finish_reason({"finish_reason": "abort"})


def _sse(*events: object) -> list[bytes]:
    lines: list[bytes] = [b": keep-alive\n"]
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        lines += [f"data: {data}\n".encode(), b"\n"]
    return lines


def test_sse_maps_to_text_pieces_then_one_end_with_usage() -> None:
    chunk = {"object": "text_completion", "choices": [{"index": 0, "text": "", "finish_reason": None}]}
    stream = _sse(
        {**chunk, "choices": [{"index": 0, "text": "Once", "finish_reason": None}]},
        chunk,  # an empty delta (vLLM holds back half a character or a partial stop string)
        {**chunk, "choices": [{"index": 0, "text": " upon", "finish_reason": "stop", "stop_reason": "\n"}]},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}},
        "[DONE]",
    )
    assert list(parse_stream(iter(stream))) == [
        StreamDelta("Once"),
        StreamDelta(" upon"),
        StreamEnd("stop", prompt_tokens=4, completion_tokens=2),
    ]


def test_sse_error_event_and_early_close_are_unavailable() -> None:
    with pytest.raises(Unavailable, match="failed the generation: boom"):
        list(parse_stream(iter(_sse({"error": {"message": "boom", "code": 500}}))))
    truncated = _sse({"choices": [{"index": 0, "text": "Once", "finish_reason": None}]})
    events = parse_stream(iter(truncated))
    assert next(events) == StreamDelta("Once")
    with pytest.raises(Unavailable, match="closed the stream before the generation finished"):
        next(events)


def test_one_name_per_load() -> None:
    names = AdapterNames("a1b2c3d4")
    first = names.next("b000000000000001", "j-000000000001-p00")
    again = names.next("b000000000000001", "j-000000000001-p00")
    other = names.next("b000000000000002", "j-000000000001-p00")
    assert first == "b000000000000001:j-000000000001-p00@a1b2c3d4"
    assert again == first + ".2"  # a reload after an unload never reuses the name
    assert len({first, again, other}) == 3
    assert names.ours(first) and names.ours(again)
    assert not AdapterNames("ffffffff").ours(first)  # another process of ours: stale there
    assert AdapterNames.looks_like_ours(first) and not AdapterNames.looks_like_ours("some-lora")


def test_bad_and_unreachable_vllm_urls() -> None:
    with pytest.raises(InvalidArgument, match="http"):
        VllmClient("ftp://example:1")
    port = free_port()  # bound and released: nothing listens there
    client = VllmClient(f"http://127.0.0.1:{port}", timeout=5)
    with pytest.raises(Unavailable, match=f"vLLM server at http://127.0.0.1:{port} is unreachable"):
        client.models()
    with pytest.raises(Unavailable, match="unreachable"):
        list(client.stream({"model": "base"}, lambda: False))
    assert issubclass(AdapterRejected, Exception)


def test_cli_engine_errors_are_one_line() -> None:
    bad = run_cli("serve", "inference", "--engine", "tensorrt", env=base_env())
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == ["error: --engine must be native or vllm, got 'tensorrt'"]
    no_url = run_cli("serve", "inference", "--engine", "vllm", env=base_env())
    assert no_url.returncode != 0
    assert (
        no_url.stderr.strip().splitlines()[-1].startswith("error: --engine vllm needs the vLLM server's URL")
    )


def test_cli_unreachable_vllm_url_is_one_error_line(tmp_path: Path) -> None:
    port, grpc_port = free_port(), free_port()
    env = base_env(
        NOVELCRAFTER_ENGINE="vllm",
        NOVELCRAFTER_VLLM_URL=f"http://127.0.0.1:{port}",
        NOVELCRAFTER_METRICS_LISTEN="off",
        NOVELCRAFTER_LOG_LEVEL="ERROR",
    )
    argv = ["serve", "inference", "--listen", f"127.0.0.1:{grpc_port}", "--store", str(tmp_path / "store")]
    result = run_cli(*argv, "--vllm-wait", "0", env=env)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"error: the vLLM server at http://127.0.0.1:{port} is unreachable: ")
    assert "Connection refused" in errors[0]


def test_only_our_stale_adapter_folders_are_cleared(tmp_path: Path) -> None:
    """At start, versions an earlier process of ours wrote go; nothing else in the folder does."""
    backend = VllmBackend(VllmClient("http://127.0.0.1:9"), tmp_path, validate=lambda path, meta: None)
    (tmp_path / "keep-me").mkdir()
    (tmp_path / "notes@2026").mkdir()
    stale = tmp_path / "b000000000000001--j-000000000001-p00@deadbeef"
    stale.mkdir()
    mine = backend._dir_for(backend.names.next("b000000000000001", "j-000000000001-p00"))
    mine.mkdir()
    backend._clear_stale_dirs()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["keep-me", "notes@2026", mine.name])


def test_the_base_model_is_shared_with_vllm_once_and_atomically(tmp_path: Path) -> None:
    from novelcrafter.inference.vllm_runtime import share_base_model

    model = tmp_path / "cache" / "smollm2"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"weights")
    target = tmp_path / "shared" / "model"
    assert share_base_model(model, target) is True
    assert (target / "config.json").read_text() == '{"model_type": "llama"}'
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert not [p for p in target.parent.iterdir() if p.name != "model"]  # no staging left behind
    assert share_base_model(model, target) is False  # already there: vLLM may be reading it
    other = tmp_path / "cache" / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "other"}')
    assert share_base_model(other, target) is True  # another base model replaces it
    assert sorted(p.name for p in target.iterdir()) == [".novelcrafter-source", "config.json"]
