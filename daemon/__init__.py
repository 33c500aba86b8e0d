"""The asyncio service around the solver, in rooms by role (arrows point down only):

- `app` (composition root) and `settings`: build the daemon from `CLEAR_*` settings.
- `http_server`: `/metrics`, `/healthz`, `/readyz`.
- `core/`: one window's work (pipeline, policies, windows, budget, metrics) behind ports.
- `kafka/`: the service loop, intake, offsets, sinks and client factories.
- `vllm/`: the OpenAI completions wire format, circuit breaker and the pod pool.
- `replay/`: traces, rollouts, the simulator, in-process and Kafka replay, the demo.
- `cli/`: one module per `clearbudget` command.

`core` imports only `solver`, `schemas` and the standard library (plus numpy, structlog and
prometheus_client); the adapters import `core`; `app` wires adapters; `cli` sits on top.
"""
