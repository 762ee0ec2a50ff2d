"""The CPU decode kernels (services/inference/kernels/rowgemm.cpp) against torch, and the
engine's decode step in them against its torch path: values within stated tolerances, and a
row's result bitwise independent of the other rows (what seeded generations rely on)."""

from __future__ import annotations

import logging
import math
import subprocess

import pytest
import torch
import torch.nn.functional as F
from novelcrafter.inference import cpu_kernels

pytestmark = pytest.mark.skipif(
    not cpu_kernels.supported_cpu(), reason="the CPU kernels need an x86-64 CPU with AVX2, FMA and F16C"
)


@pytest.fixture(scope="module")
def kern() -> cpu_kernels.RowGemm:
    loaded = cpu_kernels.load(threads=2)
    assert loaded is not None, "supported CPU but the kernel did not build (is g++ installed?)"
    return loaded


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), w.double()).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k"), [(37, 576), (1539, 200), (8, 1536), (5, 13)])
def test_rowgemm_matches_a_float64_matmul_on_the_stored_weights(kern, dtype, n, k) -> None:
    gen = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(9, k, generator=gen)
    y = kern(x, w)
    # fp32 accumulation over k terms of size ~1: error ~ sqrt(k) * 2^-24 * |terms|
    assert torch.allclose(y, _reference(x, w), atol=1e-5 * math.sqrt(k) * 4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_rows_result_does_not_depend_on_the_other_rows_or_the_threads(kern, dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(1027, 576, generator=gen).to(dtype)
    x = torch.randn(9, 576, generator=gen) * 3
    full = kern(x, w)
    for rows in range(1, 10):
        part = kern(x[:rows], w)
        assert torch.equal(part, full[:rows]), rows
        assert torch.equal(kern(x[rows - 1 : rows], w)[0], full[rows - 1])
    single = cpu_kernels.load(threads=1)
    assert single is not None
    assert torch.equal(single(x, w), full)


def _cpu_has_avx512() -> bool:
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    return "avx512f" in flags and "avx512bw" in flags


def test_the_bf16_loop_is_avx512_where_the_cpu_has_it_and_can_be_asked_for(kern) -> None:
    best = "avx512" if _cpu_has_avx512() else "avx2"
    assert kern.isa == best
    try:
        assert kern.use_isa("avx2") == "avx2"
        assert kern.use_isa("avx512") == best  # stays avx2 on a CPU without AVX-512
        with pytest.raises(ValueError, match="unknown ISA"):
            kern.use_isa("sse2")
    finally:
        kern.use_isa(best)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize(("n", "k"), [(1539, 576), (37, 600), (6, 1536), (5, 13)])
def test_each_bf16_loop_matches_float64_and_keeps_rows_independent(kern, isa, n, k) -> None:
    """Both loops on every row count 1..9 (the AVX-512 one tiles up to 4 rows, and k = 600 or
    13 leaves a tail past its 32-wide chunks): within fp32 rounding of float64, and each row
    bitwise the same as computed alone."""
    if isa == "avx512" and not _cpu_has_avx512():
        pytest.skip("this CPU has no AVX-512 (F and BW)")
    best = kern.isa
    try:
        assert kern.use_isa(isa) == isa
        gen = torch.Generator().manual_seed(n + k)
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        x = torch.randn(9, k, generator=gen) * 3
        full = kern(x, w)
        assert torch.allclose(full, _reference(x, w), atol=3e-5 * math.sqrt(k) * 4, rtol=1e-5)
        for rows in range(1, 10):
            assert torch.equal(kern(x[:rows], w), full[:rows]), rows
            assert torch.equal(kern(x[rows - 1 : rows], w)[0], full[rows - 1]), rows
    finally:
        kern.use_isa(best)


def test_accumulate_into_a_column_slice_is_out_plus_scaled_product(kern) -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(8, 576, generator=gen)
    b = torch.randn(192, 8, generator=gen)
    x = torch.randn(3, 576, generator=gen)
    out = torch.randn(3, 960, generator=gen)
    expected = out.clone()
    t = kern(x, a)
    expected[:, 576:768] = expected[:, 576:768] + kern(t, b) * 0.25
    kern(t, b, out[:, 576:768], alpha=0.25, accumulate=True)
    assert torch.equal(out, expected)


def test_bad_shapes_raise_instead_of_reading_out_of_bounds(kern) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        kern(torch.randn(2, 10), torch.randn(4, 11))
    with pytest.raises(ValueError, match="does not fit"):
        kern(torch.randn(2, 10), torch.randn(4, 10), torch.empty(3, 4))
    with pytest.raises(ValueError, match="accumulate"):
        kern(torch.randn(2, 10), torch.randn(4, 10), accumulate=True)
    with pytest.raises(ValueError, match="full"):
        cpu_kernels.DecodeCaches([torch.zeros(1, 1, 4, 8)], [torch.zeros(1, 1, 4, 8)], [4])


def test_rmsnorm_and_silu_gate_match_the_llama_modules(kern) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(3)
    norm = LlamaRMSNorm(576, eps=1e-5)
    norm.weight.data = torch.randn(576, generator=gen).to(torch.bfloat16)
    x = torch.randn(4, 576, generator=gen) * 5
    expected = norm(x)
    assert torch.allclose(kern.rmsnorm(x, norm.weight.data, 1e-5), expected, atol=1e-5, rtol=1e-5)
    gate_up = torch.randn(4, 2 * 1536, generator=gen) * 4
    expected = F.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    assert torch.allclose(kern.silu_mul(gate_up), expected, atol=1e-5, rtol=1e-5)


def test_decode_attention_rotates_writes_the_cache_and_attends_like_sdpa(kern) -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    heads, kv_heads, dim, layers = 6, 2, 16, 2
    gen = torch.Generator().manual_seed(4)
    theta = 10000.0 ** (-torch.arange(0, dim, 2).float() / dim)
    angles = torch.arange(64).float()[:, None] * theta[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    lengths = [5, 0, 17]
    keys = [torch.randn(layers, kv_heads, 32, dim, generator=gen) for _ in lengths]
    values = [torch.randn(layers, kv_heads, 32, dim, generator=gen) for _ in lengths]
    before = [(k.clone(), v.clone()) for k, v in zip(keys, values, strict=True)]
    qkv = torch.randn(len(lengths), (heads + 2 * kv_heads) * dim, generator=gen)
    original = qkv.clone()
    layer = 1
    out = kern.decode_attention(
        qkv,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=dim,
        cos=cos,
        sin=sin,
        caches=cpu_kernels.DecodeCaches(keys, values, lengths),
        layer=layer,
        scale=dim**-0.5,
    )
    for row, pos in enumerate(lengths):
        q = original[row, : heads * dim].view(1, heads, 1, dim)
        k = original[row, heads * dim : (heads + kv_heads) * dim].view(1, kv_heads, 1, dim)
        v = original[row, (heads + kv_heads) * dim :].view(1, kv_heads, 1, dim)
        q, k = apply_rotary_pos_emb(q, k, cos[pos : pos + 1][None], sin[pos : pos + 1][None])
        cache_k, cache_v = before[row][0].clone(), before[row][1].clone()
        cache_k[layer, :, pos], cache_v[layer, :, pos] = k[0, :, 0], v[0, :, 0]
        assert torch.allclose(keys[row], cache_k, atol=1e-6) and torch.equal(values[row], cache_v)
        expected = F.scaled_dot_product_attention(
            q,
            cache_k[layer, :, : pos + 1][None],
            cache_v[layer, :, : pos + 1][None],
            scale=dim**-0.5,
            enable_gqa=True,
        )
        assert torch.allclose(out[row], expected.reshape(-1), atol=1e-5), row


def test_no_compiler_means_no_kernel_and_a_clear_log_not_a_crash(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / c++ to be found
    monkeypatch.setenv("CXX", "g++")
    monkeypatch.setattr(cpu_kernels, "PREBUILT", tmp_path / "missing.so")
    assert cpu_kernels._open(tmp_path / "home") is None


def test_a_prebuilt_kernel_is_loaded_first_and_nothing_is_compiled(tmp_path, monkeypatch, caplog) -> None:
    """A container image ships rowgemm.so and no compiler: it must load that library, say so,
    and neither warn about the missing compiler nor compile a second copy where one exists."""
    prebuilt = tmp_path / "rowgemm.so"
    assert cpu_kernels._compile(cpu_kernels._compiler(), prebuilt)
    monkeypatch.setattr(cpu_kernels, "PREBUILT", prebuilt)
    home = tmp_path / "home"
    with caplog.at_level(logging.INFO, logger=cpu_kernels.log.name):
        assert cpu_kernels._open(home) is not None  # a compiler is on PATH here: it is not used
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # and as in the image, with none
        monkeypatch.setenv("CXX", "g++")
        assert cpu_kernels._open(home) is not None
    assert not (home / "kernels").exists(), "compiled although a prebuilt library was there"
    messages = [record.getMessage() for record in caplog.records]
    assert messages.count("CPU kernels on (prebuilt)") == 2, messages
    assert not [m for m in messages if "compiler" in m or "building" in m], messages


def test_a_prebuilt_kernel_of_another_abi_is_ignored_and_rebuilt(tmp_path, monkeypatch, caplog) -> None:
    stale = tmp_path / "rowgemm.so"
    source = tmp_path / "stale.cpp"
    source.write_text('extern "C" int nc_rowgemm_abi() { return -1; }\n')
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(stale), str(source)], check=True)
    monkeypatch.setattr(cpu_kernels, "PREBUILT", stale)
    with caplog.at_level(logging.INFO, logger=cpu_kernels.log.name):
        assert cpu_kernels._open(tmp_path / "home") is not None
    messages = [record.getMessage() for record in caplog.records]
    assert "CPU kernel of another version ignored" in messages
    assert "CPU kernels on (built on this machine)" in messages
    assert list((tmp_path / "home" / "kernels").glob("rowgemm-*.so"))


@pytest.fixture(scope="module")
def engines():
    from novelcrafter.inference.engine import Engine, random_lora

    from novelcrafter.models import load_base_model, provision_base_model

    model_dir = provision_base_model("smollm2-135m-instruct")
    made = {}
    for kernels in ("auto", "off"):
        engine = Engine(
            load_base_model(model_dir, dtype=torch.float32).eval(),
            device="cpu",
            dtype=torch.float32,
            max_batch=4,
            kernels=kernels,
        )
        made[kernels] = (engine, [random_lora(engine, rank=8, seed=s) for s in (1, 2)])
    return made


def _greedy(engine, prompts, adapters, steps=5):
    caches = [engine.new_cache(128) for _ in prompts]
    first = [engine.prefill(p, c, a) for p, c, a in zip(prompts, caches, adapters, strict=True)]
    tokens = [int(f.argmax()) for f in first]
    out = [torch.stack(first)]
    for _ in range(steps):
        logits = engine.decode(tokens, caches, adapters)
        out.append(logits)
        tokens = [int(row.argmax()) for row in logits]
    return torch.stack(out)  # [steps + 1, rows, vocab]


# Short prompts are prefilled in the kernels, the 80-token one with torch's GEMM (wide path).
PROMPTS = [list(range(100, 120)), list(range(200, 280)), list(range(300, 305))]


def test_engine_decode_in_kernels_matches_its_torch_path(engines) -> None:
    fast, fast_loras = engines["auto"]
    slow, slow_loras = engines["off"]
    assert fast.rowgemm is not None and slow.rowgemm is None
    ours = _greedy(fast, PROMPTS, [fast_loras[0], None, fast_loras[1]])
    torch_path = _greedy(slow, PROMPTS, [slow_loras[0], None, slow_loras[1]])
    # Same fp32 arithmetic in another summation order: logits of magnitude ~20 agree to ~1e-4.
    assert (ours - torch_path).abs().max() < 2e-3
    assert torch.equal(ours.argmax(-1), torch_path.argmax(-1))


def test_engine_rows_decode_the_same_alone_and_mixed_with_other_adapters(engines) -> None:
    engine, loras = engines["auto"]
    mixed = _greedy(engine, PROMPTS, [loras[0], None, loras[1]])
    for row, adapter in enumerate([loras[0], None, loras[1]]):
        alone = _greedy(engine, [PROMPTS[row]], [adapter])
        assert torch.equal(alone[:, 0], mixed[:, row]), row
    shared = _greedy(engine, PROMPTS, [loras[1]] * 3)  # one adapter on every row: the in-place path
    assert torch.equal(shared[:, 2], mixed[:, 2])


def _inverse_cdf_reference(logits: torch.Tensor, params, seen: torch.Tensor) -> tuple[list[int], list[float]]:
    """The sampling algorithm written out plainly in float64: the kept ids in draw order, and
    the cumulative probability at which a uniform draw moves past each."""
    row = logits.double().clone()
    if params.repetition_penalty != 1.0:
        for i in set(seen.tolist()):
            v = float(logits[i])
            row[i] = v * params.repetition_penalty if v < 0 else v / params.repetition_penalty
    ids = list(range(row.shape[0]))
    if 0 < params.top_k < len(ids) or params.top_p < 1.0:  # filters rank: best first, ties by id
        ids.sort(key=lambda i: (-float(row[i]), i))
    if 0 < params.top_k < len(ids):
        ids = ids[: params.top_k]
    w = torch.exp((row[ids] - row.max()) / params.temperature)
    if params.top_p < 1.0:
        before = (torch.cumsum(w, 0) - w).tolist()
        ids = [i for i, b in zip(ids, before, strict=True) if b < params.top_p * float(w.sum())] or ids[:1]
        w = w[: len(ids)]
    return ids, (torch.cumsum(w, 0) / w.sum()).tolist()


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k", "penalty"),
    [(0.8, 0.95, 50, 1.1), (1.0, 1.0, 0, 1.0), (0.7, 0.9, 0, 1.3), (0.0, 1.0, 0, 1.2), (1.3, 0.5, 20, 1.0)],
)
def test_the_compiled_sampler_draws_what_the_torch_path_and_a_plain_reference_draw(
    kern, temperature, top_p, top_k, penalty
) -> None:
    from novelcrafter.inference.sampling import SamplingParams, make_generator, next_token

    params = SamplingParams(temperature, top_p, top_k, penalty)
    logits = torch.randn(4099, generator=torch.Generator().manual_seed(3)) * 3
    original = logits.clone()
    seen = torch.tensor([5, 17, 17, int(logits.argmax()), 4098])
    ours, torch_path, draws = (make_generator(9)[0] for _ in range(3))
    by_kernel = [next_token(logits, params, ours, seen, kern) for _ in range(200)]
    by_torch = [next_token(logits, params, torch_path, seen, None) for _ in range(200)]
    assert torch.equal(logits, original)  # the caller's row is not penalized in place
    if temperature == 0.0:
        penalized = logits.clone()
        penalized[seen] = torch.where(logits[seen] < 0, logits[seen] * penalty, logits[seen] / penalty)
        assert set(by_kernel) == set(by_torch) == {int(penalized.argmax())}
        return
    ids, cdf = _inverse_cdf_reference(logits, params, seen)
    near_edge = 0
    for a, b in zip(by_kernel, by_torch, strict=True):
        u = float(torch.rand((), generator=draws, dtype=torch.float64))
        if min(abs(u - c) for c in cdf) < 1e-9:
            near_edge += 1  # float rounding may pick the neighbour there
            continue
        assert a == b == ids[next((j for j, c in enumerate(cdf) if u < c), len(ids) - 1)]
    assert near_edge < 3
    assert len(set(by_kernel)) > 1  # it samples, it does not always pick the best


def test_the_compiled_sampler_rejects_what_it_cannot_read(kern) -> None:
    from novelcrafter.inference.sampling import SamplingParams

    with pytest.raises(ValueError, match="outside the vocabulary"):
        kern.sample(torch.zeros(10), SamplingParams(repetition_penalty=1.2), torch.tensor([3, 10]), 0.5)
    with pytest.raises(ValueError, match="contiguous fp32 row"):
        kern.sample(torch.zeros(10, dtype=torch.float64), SamplingParams(), None, 0.5)


@pytest.mark.parametrize(
    ("dtype", "isa"),
    [(torch.bfloat16, "avx2"), (torch.bfloat16, "avx512"), (torch.float32, "avx2"), (torch.float16, "avx2")],
)
def test_the_shortlisted_lm_head_is_bitwise_exact_on_the_top_k_and_always_ids_and_screens_the_rest(
    kern, dtype, isa
) -> None:
    if isa == "avx512" and not _cpu_has_avx512():
        pytest.skip("this CPU has no AVX-512 (F and BW)")
    best = kern.isa
    try:
        kern.use_isa(isa)
        _check_shortlist(kern, dtype)
    finally:
        kern.use_isa(best)


def _check_shortlist(kern, dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(3001, 576, generator=gen) * 0.05).to(dtype)  # 3001: no multiple of any tile
    w[11] = w[10]  # duplicate rows: the same bounds, kept or screened together
    x = torch.randn(3, 576, generator=gen) * 2
    screen = cpu_kernels.LmHeadScreen.build(w)
    # The bound the screening rests on, checked in float64 for these rows.
    exact64 = x.double() @ w.double().T
    approx64 = x.double() @ (screen.q.double() * screen.scale.double()[:, None]).T
    assert ((exact64 - approx64).abs() <= x.double().norm(dim=1, keepdim=True) * screen.bound.double()).all()
    full = kern(x, w)
    always = torch.tensor([7, 7, 3000, int(full[0].argmin())])
    rows = [cpu_kernels.Shortlist(50, always), cpu_kernels.Shortlist(1), cpu_kernels.Shortlist(200)]
    out = kern.lm_head_shortlist(x, screen, w, rows)
    for b, row in enumerate(rows):
        finite = torch.isfinite(out[b])
        assert torch.equal(out[b][finite], full[b][finite]), b  # bitwise the full product's
        best_ids = full[b].topk(row.k).indices.sort().values
        assert torch.equal(out[b].topk(row.k).indices.sort().values, best_ids)
        if row.always is not None:
            assert finite[always].all()
        assert finite.sum() < 3001 // 2, "nothing was screened out"
    with pytest.raises(ValueError, match="out of range"):
        kern.lm_head_shortlist(x[:1], screen, w, [cpu_kernels.Shortlist(50, torch.tensor([3001]))])
    with pytest.raises(ValueError, match="out of range"):
        kern.lm_head_shortlist(x[:1], screen, w, [cpu_kernels.Shortlist(0)])


@pytest.mark.parametrize("temperature", [0.8, 0.0])
def test_a_shortlisted_decode_samples_exactly_the_tokens_of_the_full_lm_head(engines, temperature) -> None:
    from novelcrafter.inference.sampling import SamplingParams, make_generator, next_token, shortlist

    engine, loras = engines["auto"]
    params = SamplingParams(temperature, 0.95, 50, 1.1, 3)

    def run(shortlisted: bool) -> tuple[list[int], bool]:
        cache, rng, seen = engine.new_cache(64), make_generator(3)[0], list(PROMPTS[0])
        screened = False

        def need():  # type: ignore[no-untyped-def]
            return shortlist(params, torch.tensor(seen)) if shortlisted else None

        logits = engine.prefill(PROMPTS[0], cache, loras[0], need())
        tokens = []
        for _ in range(12):
            screened |= bool(torch.isinf(logits).any())
            token = next_token(logits, params, rng, torch.tensor(seen), engine.rowgemm)
            tokens.append(token)
            seen.append(token)
            logits = engine.decode([token], [cache], [loras[0]], [need()])[0]
        return tokens, screened

    ours, screened = run(True)
    assert screened, "the shortlist path did not run"
    assert (ours, False) == run(False)
