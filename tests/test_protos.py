"""The checked-in generated code is current, and tensors survive the wire."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from protos.recfunnel.v1 import tensor_pb2
from protos.wire import BadTensor, from_tensor, to_tensor


def test_generated_code_is_current() -> None:
    result = subprocess.run([sys.executable, "-m", "protos.generate", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_public_contract_names_are_stable() -> None:
    from protos.recfunnel.v1 import recommender_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Recommender"]
    assert service.full_name == "recfunnel.v1.Recommender"
    assert {m.name for m in service.methods} == {"Recommend", "Feedback", "UpsertItems", "DeleteItems", "DeleteUser",
                                                 "SimilarItems", "UpsertUsers"}

    def numbers(message) -> dict[str, int]:  # type: ignore[no-untyped-def]
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(pb.RecommendRequest) == {"user_id": 1, "k": 2, "exclude_item_ids": 3, "context_item_ids": 4,
                                            "diversity": 5, "explain": 6, "filter": 7, "page_size": 8,
                                            "page_token": 9}
    assert numbers(pb.RecommendResponse) == {"items": 1, "model_version": 2, "degraded": 3, "recall_coverage": 4,
                                             "request_id": 5, "next_page_token": 6, "filter_passed": 7,
                                             "experiment": 8, "variant": 9}
    assert numbers(pb.DeleteUserResponse) == {"events_removed": 1}
    assert numbers(pb.Item) == {"item_id": 1, "text": 2, "tags": 3, "properties": 4, "created_ms": 5, "vectors": 6}
    assert numbers(pb.FloatVector) == {"values": 1}
    assert numbers(pb.ItemFilter) == {"tags_any": 1, "tags_all": 2, "tags_none": 3, "ranges": 4, "equals": 5,
                                      "newer_than_ms": 6}
    assert numbers(pb.SimilarItemsRequest) == {"item_ids": 1, "k": 2, "filter": 3, "exclude_item_ids": 4,
                                               "user_id": 5}
    assert numbers(pb.NumberRange) == {"property": 1, "min": 2, "max": 3}
    assert numbers(pb.PropertyEquals) == {"property": 1, "any_of": 2}
    assert numbers(pb.PropertyValue) == {"number": 1, "text": 2}
    assert numbers(pb.User) == {"user_id": 1, "properties": 2, "text": 3}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tensor_round_trip(dtype: str) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    back = from_tensor(to_tensor(array, dtype))
    assert back.shape == (3, 4)
    np.testing.assert_allclose(back, array, rtol=1e-3 if dtype == "float16" else 0)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (tensor_pb2.Tensor(dtype="int8", shape=[1], data=b"\0"), "unsupported"),
        (tensor_pb2.Tensor(dtype="float32", shape=[3], data=b"\0" * 8), "needs 12"),
        (tensor_pb2.Tensor(dtype="float32", shape=[-1], data=b""), "negative"),
        (tensor_pb2.Tensor(dtype="float32", shape=[1 << 20, 1 << 10], data=b""), "exceeds"),
    ],
)
def test_bad_tensors_are_named(message: tensor_pb2.Tensor, error: str) -> None:
    with pytest.raises(BadTensor, match=error):
        from_tensor(message)
