"""Streaming prepared images from an S3 object store: a local S3-compatible server (moto's) at an ``http://``
endpoint, reached through LitData's S3 downloader (boto3 and obstore) as a cluster's MinIO or Ceph would be."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer

from ssl_lightning.datamodules import StreamingImages
from ssl_lightning.datamodules.object_store import S3Downloader
from ssl_lightning.transforms import SimCLRViews
from tests.test_streaming import fit, items, prepared  # noqa: F401 (module fixture: a prepared folder of 24 images)

URL = "s3://datasets/train"


@pytest.fixture(scope="module")
def bucket(prepared) -> Iterator[str]:  # noqa: F811
    """The prepared folder uploaded to ``URL`` on a local S3 server; its endpoint and credentials in the environment
    (where LitData's forked workers find them too)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_DEFAULT_REGION", "us-east-1")):
            env.setenv(name, value)
        env.delenv("AWS_PROFILE", raising=False)
        client = boto3.client("s3")
        client.create_bucket(Bucket="datasets")
        for path in prepared[1].iterdir():
            client.upload_file(str(path), "datasets", f"train/{path.name}")
        yield URL
    server.stop()


def views_by_index(data: StreamingImages) -> dict[int, torch.Tensor]:
    data.setup("fit")
    return {int(i): view for batch in data.train_dataloader() for i, view in zip(batch["index"], batch["views"][0])}


def test_an_epoch_from_s3_over_http_is_the_local_epoch(prepared, bucket, tmp_path) -> None:  # noqa: F811
    """Every image once with its label and the same views as from the local folder; chunks fetched in this process,
    by obstore, which LitData (0.2.76) builds without http support: ``object_store.S3Downloader`` adds it."""
    kwargs = {"batch_size": 4, "num_workers": 0, "views": SimCLRViews(size=16), "seed": 3}
    remote = StreamingImages(bucket, cache_dir=str(tmp_path / "cache"), **kwargs)
    assert (remote.classes, remote.num_train) == (("cat", "dog", "eel"), 24)
    local, streamed = views_by_index(StreamingImages(str(prepared[1]), **kwargs)), views_by_index(remote)
    assert sorted(streamed) == list(range(24))
    for index, view in local.items():
        assert torch.equal(streamed[index], view), index
    labels = [item["label"] for item in items(prepared[1])]
    assert [remote.train_eval_dataset()[i]["label"] for i in range(24)] == labels


def test_reading_the_metadata_leaves_obstore_to_the_workers(bucket, tmp_path, monkeypatch) -> None:
    """LitData keeps forked workers off obstore once the main process has started it; the datamodule's own
    metadata is fetched through boto3, as LitData fetches ``index.json``."""
    def refuse(self, bucket_name):
        raise AssertionError("obstore started in the main process")

    monkeypatch.setattr(S3Downloader, "_get_store", refuse)
    assert StreamingImages(bucket, cache_dir=str(tmp_path / "cache")).num_train == 24


def test_a_fit_from_s3_with_two_workers_resumes_mid_epoch_exactly_into_another_cache(prepared, bucket, tmp_path) -> None:  # noqa: F811
    """Same batches as from the local folder; resumed on a "new node" whose chunk cache is elsewhere."""
    _, local_seen, _ = fit(prepared[1], tmp_path / "local", 8, num_workers=2)
    full, full_seen, _ = fit(bucket, tmp_path / "full", 8, num_workers=2, cache_dir=str(tmp_path / "cache_full"))
    assert full_seen.indices == local_seen.indices  # the same batches as from the local folder
    resumed, seen, trainer = fit(bucket, tmp_path / "resumed", 8, ckpt_path=str(tmp_path / "full" / "step=4.ckpt"),
                                 num_workers=2, cache_dir=str(tmp_path / "cache_resumed"))
    assert trainer.global_step == 8 and seen.indices == full_seen.indices[4:]
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_url_without_prepared_data_is_one_line_naming_it(bucket, tmp_path) -> None:
    for url in ("s3://datasets/elsewhere", "s3://no-such-bucket/train"):
        with pytest.raises(ValueError, match=f"^{url}: not readable `ssl-lightning prepare` output \\(.*404.*\\)$"):
            StreamingImages(url, cache_dir=str(tmp_path / "cache"))
