"""`clearbudget run`: the daemon, configured only through CLEAR_* environment variables."""

from __future__ import annotations

from clearbudget.daemon.cli.errors import fail


def run() -> None:
    """Run the daemon: consume clear.queries, probe, price tokens, dispatch to vLLM, publish.

    Configuration comes from CLEAR_* environment variables (or a .env file), e.g.
    CLEAR_KAFKA_BOOTSTRAP, CLEAR_VLLM_ENDPOINTS, CLEAR_TOKENS_PER_SECOND, CLEAR_WINDOW_SECONDS.
    Invalid settings exit with status 2 and name the variable. SIGTERM drains gracefully.
    """
    import asyncio

    from clearbudget.daemon.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        fail(str(exc))
    from clearbudget.daemon.app import (
        configure_logging,
        install_signal_handlers,
        run_daemon,
        tune_gc,
    )
    from clearbudget.daemon.kafka.clients import StartupError

    configure_logging(settings.log_level, settings.secret_values())
    tune_gc()

    async def main() -> str | None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        daemon = await run_daemon(settings, stop)
        return daemon.state.fatal_error

    try:
        fatal = asyncio.run(main())
    except StartupError as exc:
        fail(str(exc), secrets=settings.secret_values())
    if fatal is not None:  # e.g. the results topic refuses the daemon: a restart will not help
        fail(fatal, code=1, secrets=settings.secret_values())
