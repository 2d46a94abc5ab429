from protos.recfunnel.v1 import recommender_pb2 as _recommender_pb2
from protos.recfunnel.v1 import tensor_pb2 as _tensor_pb2
from protos.recfunnel.v1 import versions_pb2 as _versions_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("history_item_ids", "model_version", "items_alone")
    HISTORY_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_ALONE_FIELD_NUMBER: _ClassVar[int]
    history_item_ids: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    items_alone: bool
    def __init__(self, history_item_ids: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ..., items_alone: _Optional[bool] = ...) -> None: ...

class ChannelVector(_message.Message):
    __slots__ = ("channel", "vector")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    channel: str
    vector: _tensor_pb2.Tensor
    def __init__(self, channel: _Optional[str] = ..., vector: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("vectors", "model_version", "unknown_item_ids")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    vectors: _containers.RepeatedCompositeFieldContainer[ChannelVector]
    model_version: str
    unknown_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, vectors: _Optional[_Iterable[_Union[ChannelVector, _Mapping]]] = ..., model_version: _Optional[str] = ..., unknown_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("history_item_ids", "candidate_ids", "candidate_channels", "explain_top", "model_version", "k", "diversity", "new_item_place")
    HISTORY_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_TOP_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    NEW_ITEM_PLACE_FIELD_NUMBER: _ClassVar[int]
    history_item_ids: _containers.RepeatedScalarFieldContainer[str]
    candidate_ids: _containers.RepeatedScalarFieldContainer[str]
    candidate_channels: _containers.RepeatedScalarFieldContainer[int]
    explain_top: int
    model_version: str
    k: int
    diversity: float
    new_item_place: int
    def __init__(self, history_item_ids: _Optional[_Iterable[str]] = ..., candidate_ids: _Optional[_Iterable[str]] = ..., candidate_channels: _Optional[_Iterable[int]] = ..., explain_top: _Optional[int] = ..., model_version: _Optional[str] = ..., k: _Optional[int] = ..., diversity: _Optional[float] = ..., new_item_place: _Optional[int] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "because_item_ids")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BECAUSE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    because_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., because_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("items", "model_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class ItemText(_message.Message):
    __slots__ = ("item_id", "text", "tags", "vectors")
    class VectorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _recommender_pb2.FloatVector
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_recommender_pb2.FloatVector, _Mapping]] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    text: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    vectors: _containers.MessageMap[str, _recommender_pb2.FloatVector]
    def __init__(self, item_id: _Optional[str] = ..., text: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., vectors: _Optional[_Mapping[str, _recommender_pb2.FloatVector]] = ...) -> None: ...

class EmbedItemsRequest(_message.Message):
    __slots__ = ("items", "model_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ItemText]
    model_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[ItemText, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class EmbedItemsResponse(_message.Message):
    __slots__ = ("vectors", "model_version")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    vectors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.ChannelVectors]
    model_version: str
    def __init__(self, vectors: _Optional[_Iterable[_Union[_tensor_pb2.ChannelVectors, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...
