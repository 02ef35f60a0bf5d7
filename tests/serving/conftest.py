"""Fixtures of the server tests (tests/serving/remote.py holds the harness): one checkpoint and one server
per test module, imported lazily so the engine tests run without the server's dependencies."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def checkpoint(small_data, tmp_path_factory) -> Path:
    from tests.serving.remote import make_checkpoint

    return make_checkpoint(small_data, tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def tokenizer(checkpoint):  # noqa: ANN201
    from longcat.inference.chat import CheckpointTokenizer

    return CheckpointTokenizer(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint):  # noqa: ANN201
    from tests.serving.remote import RemoteServer

    remote = RemoteServer(checkpoint, "--max-batch", "16")
    yield remote
    remote.stop()


@pytest.fixture(scope="module")
def client(server):  # noqa: ANN201
    return server.client()


@pytest.fixture(scope="module")
def guarded(checkpoint):  # noqa: ANN201
    """One slot, no queue, an API key: for 503s on a full server and 401s."""
    from tests.serving.remote import RemoteServer

    remote = RemoteServer(checkpoint, "--max-batch", "1", "--max-queue", "0", env={"LONGCAT_API_KEY": "secret"})
    yield remote
    remote.stop()
