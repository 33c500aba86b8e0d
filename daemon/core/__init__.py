"""The window core: expire → probe → decide → dispatch for one window, on injected ports.

What the daemon and trace replay share: `ports` (the completion backend and the result sink),
`pipeline`, `policies`, `windowing`, `budget`, `metrics`, `tags` (tenant budgets),
`tag_spend` (the pipeline counting spend per tag) and `feedback` (what a policy remembers for
graded feedback). May import `solver`, `schemas`, the standard library, numpy, structlog and
prometheus_client; never aiokafka, aiohttp, typer or any other `daemon` room (a test checks
this).
"""
