from novelcrafter.v1 import common_pb2 as _common_pb2
from novelcrafter.v1 import jobs_pb2 as _jobs_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngestMetadata(_message.Message):
    __slots__ = ("filename", "title", "password", "params", "create_job", "job_config", "size_bytes")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CREATE_JOB_FIELD_NUMBER: _ClassVar[int]
    JOB_CONFIG_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    filename: str
    title: str
    password: str
    params: _common_pb2.IngestParams
    create_job: bool
    job_config: _common_pb2.JobConfig
    size_bytes: int
    def __init__(self, filename: _Optional[str] = ..., title: _Optional[str] = ..., password: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.IngestParams, _Mapping]] = ..., create_job: _Optional[bool] = ..., job_config: _Optional[_Union[_common_pb2.JobConfig, _Mapping]] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class IngestBookRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: IngestMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[IngestMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class IngestBookResponse(_message.Message):
    __slots__ = ("manifest", "already_existed", "job")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ALREADY_EXISTED_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    manifest: _common_pb2.BookManifest
    already_existed: bool
    job: _jobs_pb2.Job
    def __init__(self, manifest: _Optional[_Union[_common_pb2.BookManifest, _Mapping]] = ..., already_existed: _Optional[bool] = ..., job: _Optional[_Union[_jobs_pb2.Job, _Mapping]] = ...) -> None: ...

class GetBookRequest(_message.Message):
    __slots__ = ("book_id", "preview_chunks")
    BOOK_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    book_id: str
    preview_chunks: int
    def __init__(self, book_id: _Optional[str] = ..., preview_chunks: _Optional[int] = ...) -> None: ...

class GetBookResponse(_message.Message):
    __slots__ = ("manifest", "preview")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    manifest: _common_pb2.BookManifest
    preview: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, manifest: _Optional[_Union[_common_pb2.BookManifest, _Mapping]] = ..., preview: _Optional[_Iterable[str]] = ...) -> None: ...

class ListBooksRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListBooksResponse(_message.Message):
    __slots__ = ("books", "next_page_token")
    BOOKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    books: _containers.RepeatedCompositeFieldContainer[_common_pb2.BookManifest]
    next_page_token: str
    def __init__(self, books: _Optional[_Iterable[_Union[_common_pb2.BookManifest, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetAdapterCardRequest(_message.Message):
    __slots__ = ("book_id", "adapter")
    BOOK_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    book_id: str
    adapter: str
    def __init__(self, book_id: _Optional[str] = ..., adapter: _Optional[str] = ...) -> None: ...

class GetAdapterCardResponse(_message.Message):
    __slots__ = ("version", "model_card")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_CARD_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.AdapterVersion
    model_card: str
    def __init__(self, version: _Optional[_Union[_common_pb2.AdapterVersion, _Mapping]] = ..., model_card: _Optional[str] = ...) -> None: ...

class ExportAdapterRequest(_message.Message):
    __slots__ = ("book_id", "adapter")
    BOOK_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    book_id: str
    adapter: str
    def __init__(self, book_id: _Optional[str] = ..., adapter: _Optional[str] = ...) -> None: ...

class ExportAdapterChunk(_message.Message):
    __slots__ = ("filename", "data")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    filename: str
    data: bytes
    def __init__(self, filename: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...
