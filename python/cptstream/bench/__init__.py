"""Throughput and memory benchmarks: `cptstream bench shard` and `cptstream bench load`.

Every measured pipeline runs in its own child process (`cptstream.bench.jobs`), so that its
peak RSS is its own and its imports and caches do not leak into the next measurement. The
orchestrators (`shard_bench`, `load_bench`) repeat each measurement, report medians and write
the same figures as JSON. `docs/benchmarks.md` records the numbers of one machine.
"""

__all__: list[str] = []
