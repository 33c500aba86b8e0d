"""`clearbudget simulate-backend`: serve recorded rollouts as an OpenAI-compatible endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clearbudget.daemon.cli.errors import fail
from clearbudget.daemon.cli.inputs import DEFAULT_ROLLOUTS

if TYPE_CHECKING:
    from clearbudget.daemon.replay.sim_server import PodTiming
    from clearbudget.daemon.replay.simulator import SimulatedBackend

# daemon.replay.sim_server.DEFAULT_MODEL_NAME, spelt out so `--help` need not import aiohttp
# (tests/cli/test_startup.py keeps the two equal).
DEFAULT_MODEL_NAME = "clearbudget-sim"


def simulate_backend(
    rollouts: Annotated[
        Path,
        typer.Option(help="Rollout pool (rollouts.jsonl); relative paths from the current dir."),
    ] = DEFAULT_ROLLOUTS,
    port: Annotated[int, typer.Option(help="TCP port to listen on (0: any free port).")] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    seed: Annotated[int, typer.Option(help="Seed for chain draws of unseeded requests.")] = 0,
    model_name: Annotated[
        str, typer.Option("--model-name", help="Model name reported by the API.")
    ] = DEFAULT_MODEL_NAME,
    decode_rate: Annotated[
        float,
        typer.Option(
            help="Emulate a GPU pod's timing: tokens/second each sequence decodes at "
            "(0: answer at once)."
        ),
    ] = 0.0,
    max_num_seqs: Annotated[
        int,
        typer.Option(help="With --decode-rate: sequences the emulated pod decodes at once."),
    ] = 256,
) -> None:
    """Serve an OpenAI-compatible completions API from recorded rollouts.

    Chains finish or are cut at max_tokens (a cut chain has no answer).
    Usage counts are reported; a prompt ending in a sample's text continues that chain.
    Point CLEAR_VLLM_ENDPOINTS at it like at a vLLM pod. With --decode-rate it also takes the
    time a pod would: at most --max-num-seqs sequences at once, each at --decode-rate tokens/s.
    """
    import asyncio

    from clearbudget.daemon.replay.files import InputFileError
    from clearbudget.daemon.replay.rollouts import load_rollouts
    from clearbudget.daemon.replay.sim_server import PodTiming
    from clearbudget.daemon.replay.simulator import SimulatedBackend

    if not 0 <= port <= 65535:
        fail(f"--port must be between 0 and 65535, got {port}")
    if decode_rate < 0:
        fail(f"--decode-rate must be >= 0, got {decode_rate}")
    if max_num_seqs < 1:
        fail(f"--max-num-seqs must be >= 1, got {max_num_seqs}")
    timing = PodTiming(decode_rate, max_num_seqs) if decode_rate > 0 else None
    try:
        pool = load_rollouts(rollouts)
    except InputFileError as exc:
        hint = " (pass --rollouts FILE)" if rollouts == DEFAULT_ROLLOUTS else ""
        fail(f"cannot load --rollouts: {exc}{hint}")
    backend = SimulatedBackend(pool, seed=seed)
    try:
        asyncio.run(_serve(backend, host=host, port=port, model_name=model_name, timing=timing))
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


async def _serve(
    backend: SimulatedBackend,
    *,
    host: str,
    port: int,
    model_name: str,
    timing: PodTiming | None,
) -> None:
    import asyncio
    import contextlib
    import signal

    from clearbudget.daemon.replay.sim_server import start_simulator

    server = await start_simulator(
        backend, host=host, port=port, model_name=model_name, timing=timing
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # platforms without signal handlers
            loop.add_signal_handler(sig, stop.set)
    typer.echo(
        f"simulated backend: {len(backend.pool)} records from {backend.pool.source}, "
        f"listening on {server.url} (POST /v1/completions, GET /v1/models, GET /health)"
    )
    try:
        await stop.wait()
    finally:
        await server.close()
