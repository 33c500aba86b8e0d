"""Rigs for trying budgets on recorded traffic: traces, rollout pools (`files` reads both),
the replay configuration and budget-span rule (`config`), the rollout simulator (and its
OpenAI-compatible server, `sim_server`), in-process replay on a virtual clock, replay through the
real Kafka daemon path, the typed replay `report`, the embedded broker, the demo and the plot.

May import everything below it (`daemon.core`, `daemon.kafka`, `daemon.vllm`, `daemon.app`,
`daemon.settings`, `solver`, `schemas`); never `daemon.cli` or typer: errors are exceptions.
"""
