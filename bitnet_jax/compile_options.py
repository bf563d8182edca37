"""XLA compiler options for the jitted train and eval steps, per backend.

CPU: XLA hands dots, reductions and elementwise fusions to YNNPACK by default. Keeping YNNPACK for
dots and reductions only (elementwise fusions go to XLA's own loop emitter) makes the BitNet train
step 20-25% faster on x86 (tiny config 166 -> 130 ms, 25M config 2.9 -> 2.3 s on 2 cores; see
benchmarks/README.md): the emitter writes the transposed gradient layouts the weight-gradient dots
want without the slow strided passes. Float summation order changes, not the math.

GPU and TPU: XLA's defaults (nothing passed). An option named in ``XLA_FLAGS`` is left to the
user's value.
"""

from __future__ import annotations

import functools
import os

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.lru_cache(maxsize=None)
def _supported(backend: str, items: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib accepts the options (they are experimental and may be renamed)."""
    import jax
    import jax.numpy as jnp

    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros(2)).compile(compiler_options=dict(items))
        return True
    except Exception:  # an unknown option name: compile with XLA's defaults instead
        return False


def for_backend(backend: str | None = None) -> dict[str, str]:
    """The options to pass to ``jax.jit(..., compiler_options=...)`` on ``backend`` (default: JAX's)."""
    import jax

    backend = backend or jax.default_backend()
    if backend != "cpu":
        return {}
    user = os.environ.get("XLA_FLAGS", "")
    options = {k: v for k, v in CPU_OPTIONS.items() if k not in user}
    return options if options and _supported(backend, tuple(sorted(options.items()))) else {}
