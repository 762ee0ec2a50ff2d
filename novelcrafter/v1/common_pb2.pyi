from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngestParams(_message.Message):
    __slots__ = ("chunk_sentences", "parts", "test_fraction", "seed", "auto_reduce_parts")
    CHUNK_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    TEST_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    AUTO_REDUCE_PARTS_FIELD_NUMBER: _ClassVar[int]
    chunk_sentences: int
    parts: int
    test_fraction: float
    seed: int
    auto_reduce_parts: bool
    def __init__(self, chunk_sentences: _Optional[int] = ..., parts: _Optional[int] = ..., test_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., auto_reduce_parts: _Optional[bool] = ...) -> None: ...

class PartInfo(_message.Message):
    __slots__ = ("index", "train_key", "test_key", "train_chunks", "test_chunks")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TRAIN_KEY_FIELD_NUMBER: _ClassVar[int]
    TEST_KEY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TEST_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    index: int
    train_key: str
    test_key: str
    train_chunks: int
    test_chunks: int
    def __init__(self, index: _Optional[int] = ..., train_key: _Optional[str] = ..., test_key: _Optional[str] = ..., train_chunks: _Optional[int] = ..., test_chunks: _Optional[int] = ...) -> None: ...

class BookManifest(_message.Message):
    __slots__ = ("book_id", "title", "source_sha256", "pages", "sentences", "chunks", "params", "cleaning", "parts", "created_at", "warnings", "words", "manifest_json")
    class CleaningEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    BOOK_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    SENTENCES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CLEANING_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    book_id: str
    title: str
    source_sha256: str
    pages: int
    sentences: int
    chunks: int
    params: IngestParams
    cleaning: _containers.ScalarMap[str, int]
    parts: _containers.RepeatedCompositeFieldContainer[PartInfo]
    created_at: float
    warnings: _containers.RepeatedScalarFieldContainer[str]
    words: int
    manifest_json: str
    def __init__(self, book_id: _Optional[str] = ..., title: _Optional[str] = ..., source_sha256: _Optional[str] = ..., pages: _Optional[int] = ..., sentences: _Optional[int] = ..., chunks: _Optional[int] = ..., params: _Optional[_Union[IngestParams, _Mapping]] = ..., cleaning: _Optional[_Mapping[str, int]] = ..., parts: _Optional[_Iterable[_Union[PartInfo, _Mapping]]] = ..., created_at: _Optional[float] = ..., warnings: _Optional[_Iterable[str]] = ..., words: _Optional[int] = ..., manifest_json: _Optional[str] = ...) -> None: ...

class LoraConfig(_message.Message):
    __slots__ = ("r", "alpha", "dropout", "target_modules", "bias")
    R_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    r: int
    alpha: int
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    bias: str
    def __init__(self, r: _Optional[int] = ..., alpha: _Optional[int] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., bias: _Optional[str] = ...) -> None: ...

class TrainingConfig(_message.Message):
    __slots__ = ("epochs", "batch_size", "grad_accum", "learning_rate", "weight_decay", "warmup_steps", "max_length", "max_steps_per_part", "checkpoint_every", "seed", "precision", "no_packing", "eval_max_chunks", "eval_earlier_parts", "memorization_prompts", "memorization_new_tokens", "style_prompts", "style_new_tokens", "replay_fraction")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_PER_PART_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    NO_PACKING_FIELD_NUMBER: _ClassVar[int]
    EVAL_MAX_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    EVAL_EARLIER_PARTS_FIELD_NUMBER: _ClassVar[int]
    MEMORIZATION_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MEMORIZATION_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STYLE_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    STYLE_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    batch_size: int
    grad_accum: int
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    max_length: int
    max_steps_per_part: int
    checkpoint_every: int
    seed: int
    precision: str
    no_packing: bool
    eval_max_chunks: int
    eval_earlier_parts: bool
    memorization_prompts: int
    memorization_new_tokens: int
    style_prompts: int
    style_new_tokens: int
    replay_fraction: float
    def __init__(self, epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., grad_accum: _Optional[int] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., max_length: _Optional[int] = ..., max_steps_per_part: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., seed: _Optional[int] = ..., precision: _Optional[str] = ..., no_packing: _Optional[bool] = ..., eval_max_chunks: _Optional[int] = ..., eval_earlier_parts: _Optional[bool] = ..., memorization_prompts: _Optional[int] = ..., memorization_new_tokens: _Optional[int] = ..., style_prompts: _Optional[int] = ..., style_new_tokens: _Optional[int] = ..., replay_fraction: _Optional[float] = ...) -> None: ...

class JobConfig(_message.Message):
    __slots__ = ("base_model", "lora", "training", "device", "init_adapter", "max_attempts", "hub_repo_id")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INIT_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    HUB_REPO_ID_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    lora: LoraConfig
    training: TrainingConfig
    device: str
    init_adapter: str
    max_attempts: int
    hub_repo_id: str
    def __init__(self, base_model: _Optional[str] = ..., lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., training: _Optional[_Union[TrainingConfig, _Mapping]] = ..., device: _Optional[str] = ..., init_adapter: _Optional[str] = ..., max_attempts: _Optional[int] = ..., hub_repo_id: _Optional[str] = ...) -> None: ...

class AdapterVersion(_message.Message):
    __slots__ = ("book_id", "version", "job_id", "part", "key", "published_at")
    BOOK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    book_id: str
    version: str
    job_id: str
    part: int
    key: str
    published_at: float
    def __init__(self, book_id: _Optional[str] = ..., version: _Optional[str] = ..., job_id: _Optional[str] = ..., part: _Optional[int] = ..., key: _Optional[str] = ..., published_at: _Optional[float] = ...) -> None: ...
