"""The prior book's memory stays bounded whatever tags producers invent."""

from __future__ import annotations

from pathlib import Path

from clearbudget.solver.priors import PriorBook


def test_the_stalest_key_goes_first_and_the_global_pool_stays() -> None:
    book = PriorBook(max_keys=3)
    for value in ("a", "b", "c"):
        book.observe({"task": value}, 500, finished=True, answered=True)
    book.observe({"task": "a"}, 400, finished=True, answered=True)  # a is fresh again
    book.observe({"task": "d"}, 300, finished=True, answered=True)  # b is the stalest
    assert book.evicted_keys == 1
    assert book.keys == 4  # three task keys and the global pool
    assert book.chains_seen({"task": "b"}) == 0
    assert book.chains_seen({"task": "a"}) == 2
    assert book.chains_seen() == 5  # the global pool kept every chain


def test_two_hundred_thousand_distinct_tags_hold_flat_memory() -> None:
    book = PriorBook(max_keys=1000)

    def flood(start: int, count: int) -> None:
        for i in range(start, start + count):
            tags = {"task": f"t{i}", "model": "m", "tenant": f"x{i}"}
            book.observe(tags, 300 + i % 500, finished=True, answered=True)
            if i % 97 == 0:
                book.prior(tags, survived=256)  # fits are cached per key: bounded too

    flood(0, 20_000)
    after_warmup = rss_bytes()
    flood(20_000, 180_000)
    grown = rss_bytes() - after_warmup
    assert book.keys <= 1001
    assert book.evicted_keys >= 2 * 200_000 - 1000  # two new keys per chain
    # Unbounded, 180k more values would add about 800 MiB (4.7 KB each); bounded, noise.
    assert grown < 32 * 1024 * 1024, f"RSS grew {grown / 2**20:.0f} MiB"


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")
