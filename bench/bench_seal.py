"""Cost of sealing records: p50/p99 of seal and open for agent-state-like JSON payloads.

    python bench/bench_seal.py [--iterations 200] [--level 3]

Payloads of 1 KB, 100 KB and 1 MB (a message list of pseudo-random words, seeded, so
it compresses about as well as real chat transcripts do), each sealed three ways:
``plain`` (checksum only), ``compressed`` (zstd + checksum) and
``compressed+encrypted`` (zstd + AES-256-GCM + checksum). The product target is a
p99 under 5 ms for a 100 KB checkpoint. Runs in this process: no database involved.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

from crashsafe._keys import Keyring
from crashsafe._seal import RecordContext, Sealer

SIZES = {"1 KB": 1_000, "100 KB": 100_000, "1 MB": 1_000_000}


def agent_state(size: int, seed: int = 1) -> bytes:
    """JSON shaped like an agent's state, cut to exactly ``size`` bytes of a valid
    document's worth of content (the tail message is trimmed to fit)."""
    rng = random.Random(seed)
    vocab = [f"{rng.choice('bcdfghklmnprstvz')}{rng.choice('aeiou')}"
             f"{rng.choice('bcdfghklmnprstvz')}{rng.choice('aeiouy')}{i % 97}"
             for i in range(4000)]
    messages: list[dict[str, str]] = []
    doc = b""
    while len(doc) < size:
        role = "user" if len(messages) % 2 == 0 else "assistant"
        words = " ".join(rng.choice(vocab) for _ in range(rng.randrange(20, 200)))
        messages.append({"role": role, "content": words})
        doc = json.dumps({"messages": messages, "step": len(messages)}).encode()
    while len(doc) > size and messages[-1]["content"]:
        over = len(doc) - size
        messages[-1]["content"] = messages[-1]["content"][: max(0, len(
            messages[-1]["content"]) - over)]
        doc = json.dumps({"messages": messages, "step": len(messages)}).encode()
    return doc


def percentiles(fn: Callable[[], object], iterations: int) -> tuple[float, float]:
    fn()  # warm up (allocates the zstd contexts)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    args = parser.parse_args()

    ring = Keyring.generate("bench")
    modes = {
        "plain": Sealer(None, compress_min=2**62, level=args.level),
        "compressed": Sealer(None, level=args.level),
        "compressed+encrypted": Sealer(ring, level=args.level),
    }
    ctx = RecordContext("bench-workflow", 7, "checkpoint")
    print(f"{args.iterations} iterations, zstd level {args.level}; times in ms")
    print(f"{'payload':>8}  {'mode':<22}{'stored':>10}  {'seal p50':>9}{'seal p99':>9}"
          f"{'open p50':>9}{'open p99':>9}{'both p50':>9}{'both p99':>9}")
    for label, size in SIZES.items():
        payload = agent_state(size)
        for mode, sealer in modes.items():
            stored = sealer.seal(payload, ctx)
            if sealer.open(stored, ctx) != payload:
                raise SystemExit(f"round trip failed for {label} {mode}")
            seal = percentiles(lambda s=sealer, p=payload: s.seal(p, ctx), args.iterations)
            opened = percentiles(lambda s=sealer, r=stored: s.open(r, ctx), args.iterations)
            both = percentiles(lambda s=sealer, p=payload: s.open(s.seal(p, ctx), ctx),
                               args.iterations)
            print(f"{label:>8}  {mode:<22}{len(stored):>10,}  {seal[0]:>9.3f}{seal[1]:>9.3f}"
                  f"{opened[0]:>9.3f}{opened[1]:>9.3f}{both[0]:>9.3f}{both[1]:>9.3f}")


if __name__ == "__main__":
    main()
