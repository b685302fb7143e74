"""Shared by the vLLM tests (``make test-vllm``): the HF model folder in $EDITGRID_VLLM_MODEL, one offline engine
and one OpenAI-compatible API server on 127.0.0.1 for the whole session (each takes a minute to start on CPU)."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = os.environ.get("EDITGRID_VLLM_MODEL")
SERVER_START_S = 600
MEMORY_SHARE = 0.15  # on CPU: the share of host RAM vLLM reserves for its KV cache
SERVED_NAME = "smollm2"


def pytest_collection_modifyitems(config, items):
    if not MODEL:
        skip = pytest.mark.skip(reason="EDITGRID_VLLM_MODEL (an HF model folder) is not set; run `make test-vllm`")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_folder() -> str:
    return MODEL


@pytest.fixture(scope="session")
def engine():
    from evals.answer_backends import offline_engine

    llm = offline_engine(MODEL, dtype="float32", max_model_len=1024, gpu_memory_utilization=MEMORY_SHARE)
    yield llm
    del llm
    gc.collect()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
               "--gpu-memory-utilization", str(MEMORY_SHARE), "--served-model-name", SERVED_NAME]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + SERVER_START_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM server exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vLLM server not ready in {SERVER_START_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


