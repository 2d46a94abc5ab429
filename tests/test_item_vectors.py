"""Named precomputed item vectors: item files, the synthetic image vectors, the item
encoder's fusion, the bundle and ranking service, and UpsertItems over gRPC."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gateway.events import ItemChange
from gateway.server import Gateway
from protos.recfunnel.v1 import recommender_pb2 as pb
from protos.recfunnel.v1 import recommender_pb2_grpc
from ranking.config import ModelConfig
from ranking.inference import InvalidItems, RankingModel
from ranking.item_encoder import ItemEncoder
from ranking.quality import EvaluateConfig, evaluate
from ranking.train import TrainResult, train
from recdata.bundle import read_manifest
from recdata.channels import SEQUENTIAL
from recdata.dataset import Dataset, read_interactions, read_item_file
from recdata.feedback import align_to_catalogue
from recdata.synthetic import IMAGE, SyntheticConfig, generate, write_pairs
from tests.conftest import TINY_TRAINING
from tests.grpc_checks import threaded_stack

IMAGE_DIM = 8


@pytest.fixture(scope="module")
def pictured() -> Dataset:
    """Items with image vectors and bland titles: the vectors are what names their topic."""
    return generate(SyntheticConfig(num_users=300, num_items=200, num_topics=8, mean_length=20, seed=7,
                                    image_dim=IMAGE_DIM, content_signal=0.0))


@pytest.fixture(scope="module")
def pictured_training(pictured: Dataset, tmp_path_factory: pytest.TempPathFactory, text_encoder) -> TrainResult:
    return train(pictured, TINY_TRAINING, tmp_path_factory.mktemp("pictured"), text_encoder)


# ---- data ---------------------------------------------------------------------------------------
def test_item_files_carry_named_vectors_in_csv_and_parquet(tmp_path: Path) -> None:
    csv_file = tmp_path / "items.csv"
    csv_file.write_text("item,text,vector:image,price\na,first,0.5 -1 2,3\nb,second,,4\n", "utf-8")
    found = read_item_file(csv_file)
    np.testing.assert_array_equal(found.vectors["image"]["a"], np.array([0.5, -1, 2], np.float32))
    assert "b" not in found.vectors["image"] and found.properties["a"] == {"price": 3.0}  # not a property

    parquet_file = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item": ["a", "b"], "text": ["first", "second"], "tags": [["x", "y"], []],
                             "vector:image": [[0.5, -1.0, 2.0], None]}), parquet_file)
    found = read_item_file(parquet_file)
    np.testing.assert_array_equal(found.vectors["image"]["a"], np.array([0.5, -1, 2], np.float32))
    assert found.tags["a"] == ("x", "y") and found.texts["b"] == "second"


@pytest.mark.parametrize(("cells", "message"), [
    ("a,t,0.5 x\n", "numbers separated by spaces"),
    ("a,t,1 2\nb,t,1 2 3\n", "one size a column"),
    ("a,t,1 nan\n", "finite"),
])
def test_bad_vector_cells_are_refused_with_their_place(tmp_path: Path, cells: str, message: str) -> None:
    path = tmp_path / "items.csv"
    path.write_text("item,text,vector:image\n" + cells, "utf-8")
    with pytest.raises(ValueError, match=message):
        read_item_file(path)


def test_a_bad_vector_column_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "items.csv"
    path.write_text("item,text,vector:Im.age\na,t,1\n", "utf-8")
    with pytest.raises(ValueError, match="vector name"):
        read_item_file(path)


def test_vectors_survive_the_pairs_files_and_reordering(pictured: Dataset, tmp_path: Path) -> None:
    pairs, items = write_pairs(pictured, tmp_path)
    read = read_interactions(pairs, "pairs", items)
    lined_up = align_to_catalogue(read, pictured.item_ids)
    np.testing.assert_array_equal(lined_up.item_vectors[IMAGE], pictured.item_vectors[IMAGE])
    assert replace(pictured, item_vectors={}).fingerprint() != pictured.fingerprint()


def test_synthetic_image_vectors_carry_the_topic_and_leave_the_events_alone(pictured: Dataset) -> None:
    plain = generate(SyntheticConfig(num_users=300, num_items=200, num_topics=8, mean_length=20, seed=7))
    assert all(np.array_equal(a, b) for a, b in zip(plain.sequences, pictured.sequences, strict=True))
    assert not plain.item_vectors and all(text.startswith("Item #") for text in pictured.item_texts)
    topic = np.array([int(t[0].removeprefix("topic")) for t in plain.item_tags])
    vectors = pictured.item_vectors[IMAGE]
    similarity = vectors @ vectors.T
    same = topic[:, None] == topic[None, :]
    np.fill_diagonal(same, False)
    assert similarity[same].mean() > 0.3 > abs(similarity[~same & ~np.eye(len(topic), dtype=bool)].mean())


# ---- the item encoder -------------------------------------------------------------------------
def test_the_item_encoder_fuses_each_vector_through_its_own_projection() -> None:
    config = ModelConfig(dim=16, heads=2, layers=1, max_len=8)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((5, 6)).astype(np.float32)
    image[3] = 0  # item 3 has no image
    encoder = ItemEncoder(config, np.zeros((5, 4), np.float32), np.zeros((5, 2), np.int64), 0, {"image": image})
    encoder.id_known.zero_()  # content alone: no ID embeddings
    nothing = (torch.zeros(1, 16), torch.zeros(1, 4), torch.zeros((1, 2), dtype=torch.long))
    with torch.no_grad():
        vectors = encoder(torch.arange(1, 6))
        unit = torch.nn.functional.normalize(torch.from_numpy(image[:1]), dim=-1)
        assert torch.allclose(vectors[0], encoder.fuse(*nothing, {"image": unit})[0], atol=1e-5)
        assert torch.allclose(vectors[3], encoder.fuse(*nothing)[0], atol=1e-5)  # no image: content without it
        assert float((vectors[0] - vectors[1]).norm()) > 0.1  # the images tell the items apart
        assert torch.allclose(encoder.content_of(torch.arange(1, 6)), vectors, atol=1e-6)
    assert set(dict(encoder.named_parameters())) >= {"vector_projections.image.weight"}


# ---- bundle and ranking service -----------------------------------------------------------------
def test_the_bundle_names_its_vectors_and_new_items_are_encoded_from_them(pictured_training: TrainResult,
                                                                           pictured: Dataset, text_encoder) -> None:
    assert read_manifest(pictured_training.folder)["item_vectors"] == {IMAGE: IMAGE_DIM}
    model = RankingModel.load(pictured_training.folder, device="cpu")
    model.prepare_item_encoding(text_encoder)
    same_topic, other_topic = pictured.item_vectors[IMAGE][0], -pictured.item_vectors[IMAGE][0]
    fused = model.upsert_items(["pic-a", "pic-b", "bare"], ["", "", ""], [(), (), ()],
                               [{IMAGE: same_topic}, {IMAGE: other_topic}, {}])[SEQUENTIAL]
    # The image is what tells the new items apart: without it every bland new item looks alike.
    assert float(fused[0] @ fused[1]) < 0.9 and float(fused[0] @ fused[2]) < 0.99
    content = model.prepare_item_encoding()[0]
    with torch.no_grad():
        reference = content.fuse(torch.zeros(1, model.config.dim), torch.from_numpy(text_encoder.encode([""])),
                                 torch.zeros((1, 8), dtype=torch.long),
                                 {IMAGE: torch.nn.functional.normalize(torch.from_numpy(same_topic[None]), dim=-1)})
    np.testing.assert_allclose(fused[0], reference[0].numpy(), atol=1e-5)
    with pytest.raises(InvalidItems, match=r"fuses no vector of that name; it takes: image \(8\)"):
        model.upsert_items(["x"], [""], [()], [{"audio": np.ones(8, np.float32)}])
    with pytest.raises(InvalidItems, match="has 3 numbers; this model version's 'image' vectors have 8"):
        model.upsert_items(["x"], [""], [()], [{IMAGE: np.ones(3, np.float32)}])


def test_the_change_log_keeps_an_items_vectors() -> None:
    change = ItemChange("upsert", "a", "t", ("x",), {"price": 2.0}, 5, {IMAGE: [0.25, -1.0]})
    row = ("upsert", "a", "t", json.dumps(["x"]), change.attributes_json())
    assert ItemChange.from_row(*row) == change
    assert "vectors" not in json.loads(ItemChange("upsert", "b").attributes_json())


# ---- over gRPC ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(pictured_training: TrainResult, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[Gateway, grpc.Channel]]:
    with threaded_stack(pictured_training.folder, tmp_path_factory.mktemp("vectors") / "events.sqlite") as stack:
        yield stack


def test_an_item_with_only_an_image_vector_is_recommendable(live, pictured: Dataset) -> None:
    gateway, channel = live
    stub = recommender_pb2_grpc.RecommenderStub(channel)
    image = pictured.item_vectors[IMAGE][3].tolist()
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="pic-1", vectors={IMAGE: pb.FloatVector(
        values=image)})]), timeout=30)
    reply = stub.SimilarItems(pb.SimilarItemsRequest(item_ids=["pic-1"], k=5), timeout=10)
    assert len(reply.items) == 5
    assert gateway.events.item_changes()[-1].vectors == {IMAGE: pytest.approx(image)}


@pytest.mark.parametrize(("vectors", "message"), [
    ({"audio": [1.0] * IMAGE_DIM}, "fuses no vector of that name"),
    ({IMAGE: [1.0] * 3}, "has 3 numbers"),
    ({IMAGE: []}, "allowed 1..4096"),
    ({IMAGE: [float("inf")] * IMAGE_DIM}, "must be finite"),
    ({"Bad.Name": [1.0]}, "vector name"),
    ({f"v{n}": [1.0] for n in range(9)}, "allowed 0..8"),
])
def test_bad_vectors_are_refused_as_invalid_and_change_nothing(live, vectors, message) -> None:
    gateway, channel = live
    stub = recommender_pb2_grpc.RecommenderStub(channel)
    before = len(gateway.events.item_changes())
    with pytest.raises(grpc.RpcError) as caught:
        stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="bad-1", text="t", vectors={
            name: pb.FloatVector(values=v) for name, v in vectors.items()})]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()
    assert len(gateway.events.item_changes()) == before


# ---- evaluate ---------------------------------------------------------------------------------
def test_evaluate_reports_the_funnel_and_cold_start_without_the_vectors(pictured_training: TrainResult,
                                                                        pictured: Dataset, text_encoder) -> None:
    report = evaluate(pictured_training.folder, pictured, EvaluateConfig(seconds_per_model=5.0), text_encoder)
    assert report["ablation"]["no_vectors"]["vectors"] == [IMAGE]
    assert set(report["ablation"]["no_vectors"]["full"]) >= {"hr@10", "ndcg@10"}
    assert set(report["cold_start"]["hr@10"]) == {"text", "no_vectors", "no_text", "random"}
