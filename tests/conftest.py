"""Suite-wide settings and the real-MNIST fixture shared by the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The suite runs tiny models on a shared 2-core machine: a second intra-op thread only spins.
torch.set_num_threads(1)

E2E_MODEL = "mnist-cnn"


@pytest.fixture(scope="session")
def mnist_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding a real MNIST classifier (one epoch: ~98% test accuracy, ~15 s on this CPU)."""
    from daemon.cli import main

    reg = tmp_path_factory.mktemp("registry")
    rc = main(["pretrain", "--dataset", "mnist", "--registry", str(reg), "--model", E2E_MODEL, "--epochs", "1"])
    assert rc == 0
    return reg


@pytest.fixture()
def broker():
    """A real Kafka-protocol broker (Tansu, in memory) on a free port of 127.0.0.1, for one test."""
    from tests.pipeline_harness import Broker

    b = Broker().start()
    yield b
    b.stop()
