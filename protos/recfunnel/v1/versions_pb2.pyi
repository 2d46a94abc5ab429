from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class LoadVersionRequest(_message.Message):
    __slots__ = ("bundle_path", "keep_default")
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    KEEP_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    bundle_path: str
    keep_default: bool
    def __init__(self, bundle_path: _Optional[str] = ..., keep_default: _Optional[bool] = ...) -> None: ...

class LoadVersionResponse(_message.Message):
    __slots__ = ("model_version", "loaded_versions")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    loaded_versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_version: _Optional[str] = ..., loaded_versions: _Optional[_Iterable[str]] = ...) -> None: ...

class UnloadVersionRequest(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    def __init__(self, model_version: _Optional[str] = ...) -> None: ...

class UnloadVersionResponse(_message.Message):
    __slots__ = ("loaded_versions",)
    LOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    loaded_versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, loaded_versions: _Optional[_Iterable[str]] = ...) -> None: ...

class SwapVersionRequest(_message.Message):
    __slots__ = ("bundle_path",)
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    bundle_path: str
    def __init__(self, bundle_path: _Optional[str] = ...) -> None: ...

class SwapVersionResponse(_message.Message):
    __slots__ = ("model_version", "previous_version", "replayed_changes", "seconds")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_CHANGES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    previous_version: str
    replayed_changes: int
    seconds: float
    def __init__(self, model_version: _Optional[str] = ..., previous_version: _Optional[str] = ..., replayed_changes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class ServingVersionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServingVersionResponse(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    def __init__(self, model_version: _Optional[str] = ...) -> None: ...
