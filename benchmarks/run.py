"""Run every benchmark (``make bench``); each writes its JSON under ``benchmarks/results/``."""

from __future__ import annotations

import json

from benchmarks import bench_losses, bench_ranking, bench_teacher_force


def main() -> None:
    for name, bench, args in (
        ("teacher_force", bench_teacher_force, []),
        ("teacher_force_bf16", bench_teacher_force, ["--dtype", "bfloat16"]),
        ("ranking", bench_ranking, []),
        ("losses", bench_losses, []),
    ):
        result = bench.main(args)
        headline = {k: v for k, v in result.items() if not isinstance(v, dict)}
        print(f"{name}: {json.dumps(headline)}")


if __name__ == "__main__":
    main()
