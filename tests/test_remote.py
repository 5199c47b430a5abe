"""A prepared dataset served from S3: a moto server on 127.0.0.1 stands in for the object store."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import shrink

from app.train import run_training
from cluster.local import free_port

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's standalone S3-compatible server on a free loopback port."""
    port = free_port()
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(url, timeout=1):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("moto_server exited") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def upload(directory: Path, bucket: str, prefix: str, endpoint: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory)}")


def test_softmax_two_tower_trains_from_s3_like_from_a_local_path(
    s3_server: str, ml_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {
        "S3_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    upload(ml_dataset, "recsys", "datasets/ml", s3_server)
    # the shipped preset: a sampled softmax with log-Q correction and corpus negatives, which need the corpus
    local = shrink("two-tower-movielens", ml_dataset, tmp_path / "local")
    assert local.arch.loss == "softmax" and local.arch.uniform_negatives > 0
    remote = dataclasses.replace(local, data=dataclasses.replace(local.data, path="s3://recsys/datasets/ml"))
    remote = dataclasses.replace(remote, trainer=dataclasses.replace(local.trainer, output_dir=str(tmp_path / "s3")))
    from_local, from_s3 = run_training(local), run_training(remote)
    keys = ("test/ndcg_at_10", "test/recall_at_10", "test/auroc", "test/logloss")
    assert all(k in from_s3 for k in keys), from_s3  # the corpus was loaded: full-corpus metrics exist
    for key in (*keys, "train/loss"):
        assert from_s3[key] == pytest.approx(from_local[key], abs=1e-6), key
