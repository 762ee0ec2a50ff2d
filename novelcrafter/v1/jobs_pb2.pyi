from novelcrafter.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_PENDING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class PartState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PART_STATE_UNSPECIFIED: _ClassVar[PartState]
    PART_STATE_PENDING: _ClassVar[PartState]
    PART_STATE_READY: _ClassVar[PartState]
    PART_STATE_RUNNING: _ClassVar[PartState]
    PART_STATE_SUCCEEDED: _ClassVar[PartState]
    PART_STATE_FAILED: _ClassVar[PartState]
    PART_STATE_CANCELLED: _ClassVar[PartState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_PENDING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
PART_STATE_UNSPECIFIED: PartState
PART_STATE_PENDING: PartState
PART_STATE_READY: PartState
PART_STATE_RUNNING: PartState
PART_STATE_SUCCEEDED: PartState
PART_STATE_FAILED: PartState
PART_STATE_CANCELLED: PartState

class PartMetrics(_message.Message):
    __slots__ = ("train_loss", "base_perplexity", "adapter_perplexity", "earlier_perplexity", "train_tokens", "eval_tokens", "train_seconds", "eval_seconds", "steps", "loss_curve", "tokens_per_second", "device", "memorization", "style", "replayed_chunks", "replay_tokens")
    class EarlierPerplexityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    BASE_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    EARLIER_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_CURVE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORIZATION_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    train_loss: float
    base_perplexity: float
    adapter_perplexity: float
    earlier_perplexity: _containers.ScalarMap[int, float]
    train_tokens: int
    eval_tokens: int
    train_seconds: float
    eval_seconds: float
    steps: int
    loss_curve: _containers.RepeatedScalarFieldContainer[float]
    tokens_per_second: float
    device: str
    memorization: Memorization
    style: Style
    replayed_chunks: int
    replay_tokens: int
    def __init__(self, train_loss: _Optional[float] = ..., base_perplexity: _Optional[float] = ..., adapter_perplexity: _Optional[float] = ..., earlier_perplexity: _Optional[_Mapping[int, float]] = ..., train_tokens: _Optional[int] = ..., eval_tokens: _Optional[int] = ..., train_seconds: _Optional[float] = ..., eval_seconds: _Optional[float] = ..., steps: _Optional[int] = ..., loss_curve: _Optional[_Iterable[float]] = ..., tokens_per_second: _Optional[float] = ..., device: _Optional[str] = ..., memorization: _Optional[_Union[Memorization, _Mapping]] = ..., style: _Optional[_Union[Style, _Mapping]] = ..., replayed_chunks: _Optional[int] = ..., replay_tokens: _Optional[int] = ...) -> None: ...

class Extraction(_message.Message):
    __slots__ = ("extraction_rate", "longest_copied_tokens")
    EXTRACTION_RATE_FIELD_NUMBER: _ClassVar[int]
    LONGEST_COPIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    extraction_rate: float
    longest_copied_tokens: int
    def __init__(self, extraction_rate: _Optional[float] = ..., longest_copied_tokens: _Optional[int] = ...) -> None: ...

class Memorization(_message.Message):
    __slots__ = ("prompts", "base", "adapter", "control_prompts", "control_base", "control_adapter")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_BASE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    prompts: int
    base: Extraction
    adapter: Extraction
    control_prompts: int
    control_base: Extraction
    control_adapter: Extraction
    def __init__(self, prompts: _Optional[int] = ..., base: _Optional[_Union[Extraction, _Mapping]] = ..., adapter: _Optional[_Union[Extraction, _Mapping]] = ..., control_prompts: _Optional[int] = ..., control_base: _Optional[_Union[Extraction, _Mapping]] = ..., control_adapter: _Optional[_Union[Extraction, _Mapping]] = ...) -> None: ...

class Style(_message.Message):
    __slots__ = ("metric", "base", "adapter", "prompts")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    metric: str
    base: float
    adapter: float
    prompts: int
    def __init__(self, metric: _Optional[str] = ..., base: _Optional[float] = ..., adapter: _Optional[float] = ..., prompts: _Optional[int] = ...) -> None: ...

class Part(_message.Message):
    __slots__ = ("index", "state", "attempts", "worker_id", "lease_expires_at", "metrics", "adapter_version", "error", "step", "total_steps", "checkpoint_key")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_KEY_FIELD_NUMBER: _ClassVar[int]
    index: int
    state: PartState
    attempts: int
    worker_id: str
    lease_expires_at: float
    metrics: PartMetrics
    adapter_version: str
    error: str
    step: int
    total_steps: int
    checkpoint_key: str
    def __init__(self, index: _Optional[int] = ..., state: _Optional[_Union[PartState, str]] = ..., attempts: _Optional[int] = ..., worker_id: _Optional[str] = ..., lease_expires_at: _Optional[float] = ..., metrics: _Optional[_Union[PartMetrics, _Mapping]] = ..., adapter_version: _Optional[str] = ..., error: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., checkpoint_key: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "book_id", "state", "config", "parts", "created_at", "updated_at", "error")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BOOK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    book_id: str
    state: JobState
    config: _common_pb2.JobConfig
    parts: _containers.RepeatedCompositeFieldContainer[Part]
    created_at: float
    updated_at: float
    error: str
    def __init__(self, job_id: _Optional[str] = ..., book_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., config: _Optional[_Union[_common_pb2.JobConfig, _Mapping]] = ..., parts: _Optional[_Iterable[_Union[Part, _Mapping]]] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("book_id", "config")
    BOOK_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    book_id: str
    config: _common_pb2.JobConfig
    def __init__(self, book_id: _Optional[str] = ..., config: _Optional[_Union[_common_pb2.JobConfig, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("book_id",)
    BOOK_ID_FIELD_NUMBER: _ClassVar[int]
    book_id: str
    def __init__(self, book_id: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_sequence")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_sequence: int
    def __init__(self, job_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class ProgressUpdate(_message.Message):
    __slots__ = ("step", "total_steps", "loss", "learning_rate", "tokens_per_second", "epoch", "phase", "message")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    tokens_per_second: float
    epoch: float
    phase: str
    message: str
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., epoch: _Optional[float] = ..., phase: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "sequence", "time", "part_index", "job_state", "part_state", "progress", "metrics", "message")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PART_INDEX_FIELD_NUMBER: _ClassVar[int]
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    PART_STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    sequence: int
    time: float
    part_index: int
    job_state: JobState
    part_state: PartState
    progress: ProgressUpdate
    metrics: PartMetrics
    message: str
    def __init__(self, job_id: _Optional[str] = ..., sequence: _Optional[int] = ..., time: _Optional[float] = ..., part_index: _Optional[int] = ..., job_state: _Optional[_Union[JobState, str]] = ..., part_state: _Optional[_Union[PartState, str]] = ..., progress: _Optional[_Union[ProgressUpdate, _Mapping]] = ..., metrics: _Optional[_Union[PartMetrics, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "job_id", "part_index", "worker_id", "expires_at", "ttl_seconds", "epoch")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PART_INDEX_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    job_id: str
    part_index: int
    worker_id: str
    expires_at: float
    ttl_seconds: float
    epoch: int
    def __init__(self, lease_id: _Optional[str] = ..., job_id: _Optional[str] = ..., part_index: _Optional[int] = ..., worker_id: _Optional[str] = ..., expires_at: _Optional[float] = ..., ttl_seconds: _Optional[float] = ..., epoch: _Optional[int] = ...) -> None: ...

class ClaimPartRequest(_message.Message):
    __slots__ = ("worker_id", "device", "job_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    device: str
    job_id: str
    def __init__(self, worker_id: _Optional[str] = ..., device: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class PartAssignment(_message.Message):
    __slots__ = ("job_id", "book_id", "part_index", "num_parts", "train_key", "test_key", "earlier_test_keys", "init_adapter_key", "resume_checkpoint_key", "checkpoint_prefix", "adapter_version", "config", "earlier_train_keys")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BOOK_ID_FIELD_NUMBER: _ClassVar[int]
    PART_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_KEY_FIELD_NUMBER: _ClassVar[int]
    TEST_KEY_FIELD_NUMBER: _ClassVar[int]
    EARLIER_TEST_KEYS_FIELD_NUMBER: _ClassVar[int]
    INIT_ADAPTER_KEY_FIELD_NUMBER: _ClassVar[int]
    RESUME_CHECKPOINT_KEY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    EARLIER_TRAIN_KEYS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    book_id: str
    part_index: int
    num_parts: int
    train_key: str
    test_key: str
    earlier_test_keys: _containers.RepeatedScalarFieldContainer[str]
    init_adapter_key: str
    resume_checkpoint_key: str
    checkpoint_prefix: str
    adapter_version: str
    config: _common_pb2.JobConfig
    earlier_train_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., book_id: _Optional[str] = ..., part_index: _Optional[int] = ..., num_parts: _Optional[int] = ..., train_key: _Optional[str] = ..., test_key: _Optional[str] = ..., earlier_test_keys: _Optional[_Iterable[str]] = ..., init_adapter_key: _Optional[str] = ..., resume_checkpoint_key: _Optional[str] = ..., checkpoint_prefix: _Optional[str] = ..., adapter_version: _Optional[str] = ..., config: _Optional[_Union[_common_pb2.JobConfig, _Mapping]] = ..., earlier_train_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class ClaimPartResponse(_message.Message):
    __slots__ = ("assigned", "lease", "assignment")
    ASSIGNED_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    assigned: bool
    lease: Lease
    assignment: PartAssignment
    def __init__(self, assigned: _Optional[bool] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., assignment: _Optional[_Union[PartAssignment, _Mapping]] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class ReportProgressRequest(_message.Message):
    __slots__ = ("lease", "progress", "checkpoint_key")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_KEY_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    progress: ProgressUpdate
    checkpoint_key: str
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., progress: _Optional[_Union[ProgressUpdate, _Mapping]] = ..., checkpoint_key: _Optional[str] = ...) -> None: ...

class ReportProgressResponse(_message.Message):
    __slots__ = ("cancelled", "lease")
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    lease: Lease
    def __init__(self, cancelled: _Optional[bool] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class CompletePartRequest(_message.Message):
    __slots__ = ("lease", "metrics", "adapter")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    metrics: PartMetrics
    adapter: _common_pb2.AdapterVersion
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., metrics: _Optional[_Union[PartMetrics, _Mapping]] = ..., adapter: _Optional[_Union[_common_pb2.AdapterVersion, _Mapping]] = ...) -> None: ...

class FailPartRequest(_message.Message):
    __slots__ = ("lease", "error", "retryable", "release", "checkpoint_key")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_KEY_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    error: str
    retryable: bool
    release: bool
    checkpoint_key: str
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., error: _Optional[str] = ..., retryable: _Optional[bool] = ..., release: _Optional[bool] = ..., checkpoint_key: _Optional[str] = ...) -> None: ...
