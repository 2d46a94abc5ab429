from protos.recfunnel.v1 import recommender_pb2 as _recommender_pb2
from protos.recfunnel.v1 import tensor_pb2 as _tensor_pb2
from protos.recfunnel.v1 import versions_pb2 as _versions_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChannelQuery(_message.Message):
    __slots__ = ("channel", "vector", "k", "item_ids", "user_properties")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    USER_PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    channel: str
    vector: _tensor_pb2.Tensor
    k: int
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    user_properties: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, channel: _Optional[str] = ..., vector: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., k: _Optional[int] = ..., item_ids: _Optional[_Iterable[str]] = ..., user_properties: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("queries", "exclude_item_ids", "model_version", "filter")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[ChannelQuery]
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    filter: _recommender_pb2.ItemFilter
    def __init__(self, queries: _Optional[_Iterable[_Union[ChannelQuery, _Mapping]]] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ..., filter: _Optional[_Union[_recommender_pb2.ItemFilter, _Mapping]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("item_id", "score")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ChannelResult(_message.Message):
    __slots__ = ("channel", "candidates")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    channel: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    def __init__(self, channel: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "model_version", "shard_id", "filter_passed")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    FILTER_PASSED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ChannelResult]
    model_version: str
    shard_id: int
    filter_passed: int
    def __init__(self, results: _Optional[_Iterable[_Union[ChannelResult, _Mapping]]] = ..., model_version: _Optional[str] = ..., shard_id: _Optional[int] = ..., filter_passed: _Optional[int] = ...) -> None: ...

class ShardInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChannelInfo(_message.Message):
    __slots__ = ("channel", "dim", "items", "index_kind", "recall_at_k", "index_params_json")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    INDEX_KIND_FIELD_NUMBER: _ClassVar[int]
    RECALL_AT_K_FIELD_NUMBER: _ClassVar[int]
    INDEX_PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    channel: str
    dim: int
    items: int
    index_kind: str
    recall_at_k: float
    index_params_json: str
    def __init__(self, channel: _Optional[str] = ..., dim: _Optional[int] = ..., items: _Optional[int] = ..., index_kind: _Optional[str] = ..., recall_at_k: _Optional[float] = ..., index_params_json: _Optional[str] = ...) -> None: ...

class ShardInfoResponse(_message.Message):
    __slots__ = ("shard_id", "num_shards", "model_version", "channels", "loaded_versions")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    num_shards: int
    model_version: str
    channels: _containers.RepeatedCompositeFieldContainer[ChannelInfo]
    loaded_versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shard_id: _Optional[int] = ..., num_shards: _Optional[int] = ..., model_version: _Optional[str] = ..., channels: _Optional[_Iterable[_Union[ChannelInfo, _Mapping]]] = ..., loaded_versions: _Optional[_Iterable[str]] = ...) -> None: ...

class AddItemsRequest(_message.Message):
    __slots__ = ("item_ids", "vectors", "model_version", "attributes")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    vectors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.ChannelVectors]
    model_version: str
    attributes: _containers.RepeatedCompositeFieldContainer[ItemAttributes]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., vectors: _Optional[_Iterable[_Union[_tensor_pb2.ChannelVectors, _Mapping]]] = ..., model_version: _Optional[str] = ..., attributes: _Optional[_Iterable[_Union[ItemAttributes, _Mapping]]] = ...) -> None: ...

class ItemAttributes(_message.Message):
    __slots__ = ("tags", "properties", "created_ms")
    class PropertiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _recommender_pb2.PropertyValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_recommender_pb2.PropertyValue, _Mapping]] = ...) -> None: ...
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    tags: _containers.RepeatedScalarFieldContainer[str]
    properties: _containers.MessageMap[str, _recommender_pb2.PropertyValue]
    created_ms: int
    def __init__(self, tags: _Optional[_Iterable[str]] = ..., properties: _Optional[_Mapping[str, _recommender_pb2.PropertyValue]] = ..., created_ms: _Optional[int] = ...) -> None: ...

class AddItemsResponse(_message.Message):
    __slots__ = ("added",)
    ADDED_FIELD_NUMBER: _ClassVar[int]
    added: int
    def __init__(self, added: _Optional[int] = ...) -> None: ...

class RemoveItemsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RemoveItemsResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...
