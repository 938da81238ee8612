"""`headforge bench`: one JSON line of measurements, each against a same-run reference."""

from __future__ import annotations

import json

import typer


def bench(
    quick: bool = typer.Option(False, "--quick", help="A run under 60 s."),
    vggheads: bool = typer.Option(
        False,
        "--vggheads",
        help="Run only the vggheads section (S, M, L eager vs ONNX Runtime; several minutes; S only with --quick).",
    ),
    kaolrm: bool = typer.Option(
        False,
        "--kaolrm",
        help="Run only the kaolrm section (full KaoLRM, eager vs ONNX Runtime per head at batch 1 and 4; "
        "many minutes; a small config with --quick).",
    ),
    animation: bool = typer.Option(
        False,
        "--animation",
        help="Run only the animation section: FLAME head + 8,192 bound splats driven per second on the CPU, "
        "against the unoptimised paths (set OMP_NUM_THREADS for the thread count).",
    ),
) -> None:
    """Measure headforge against references in the same run; print one JSON line."""
    from headforge.benchmarks import OPTIONAL_SECTIONS, run_all

    chosen = [
        name
        for name, wanted in (("vggheads", vggheads), ("kaolrm", kaolrm), ("animation", animation))
        if wanted
    ]
    if not chosen:
        print(json.dumps(run_all(quick)))
        return
    result: dict[str, object] = {}
    for name in chosen:
        result.update(OPTIONAL_SECTIONS[name](quick))
    print(json.dumps(result))
