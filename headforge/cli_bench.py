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
    animation: bool = typer.Option(
        False,
        "--animation",
        help="Run only the animation section: FLAME head + 8,192 bound splats driven per second on the CPU, "
        "against the unoptimised paths (set OMP_NUM_THREADS for the thread count).",
    ),
) -> None:
    """Measure headforge against references in the same run; print one JSON line."""
    from headforge.benchmarks import OPTIONAL_SECTIONS, run_all

    if vggheads:
        print(json.dumps(OPTIONAL_SECTIONS["vggheads"](quick)))
    elif animation:
        print(json.dumps(OPTIONAL_SECTIONS["animation"](quick)))
    else:
        print(json.dumps(run_all(quick)))
