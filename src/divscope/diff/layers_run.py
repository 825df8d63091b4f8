"""``divscope diff --layers``: the checks, the units through the cache on the executor, and
``layers.json`` (the aggregation is :mod:`divscope.diff.layers_summary`).

:func:`check_layers` refuses pairs the decomposition does not apply to (one line, before any
work). :func:`layer_analysis` runs every prompt's :func:`divscope.diff.layers.score_layers`
unit, reads out each block's mean change through both models' final norm and head, then the
causal check of the leading blocks' directions against random ones, and returns the
``layers.json`` document. Units are cached under the diff's cache directory (keyed on both
conditions) by their prompt and samples, the directions by their content too.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from divscope.bounded import ArrayFileError, read_unit_arrays, write_unit_arrays
from divscope.diff.conditions import DiffInputError
from divscope.diff.layer_options import N_CAUSAL, N_RANDOM
from divscope.diff.layers import (
    DirectionUnit,
    LayerScores,
    LayerUnit,
    directions_on,
    layers_on,
    readout_on,
)
from divscope.diff.layers_summary import leading_blocks, summarize
from divscope.execution.executors import Pool
from divscope.runmeta import content_hash

FORMAT = 1  # bump when a unit's meaning changes (old cache entries are then not used)
ARCH_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
             "num_attention_heads", "num_key_value_heads", "vocab_size")  # fmt: skip


DROP = "drop --layers (kl_demo: LAYERS = False)"


def _refuse(msg: str) -> None:
    raise DiffInputError(f"--layers: {msg}")


def check_layers(setup: Any) -> None:
    """Refuse (:class:`DiffInputError`) pairs without a per-block decomposition: different
    tokenizers or architectures, different system prompts, or all weights shared."""
    a, b = setup.conditions["a"], setup.conditions["b"]
    ident = [{k: v for k, v in c.identity().items() if k != "system"} for c in (a, b)]
    if ident[0] == ident[1] or _same_weights(setup.models["a"], setup.models["b"]):
        _refuse(f"{a.label} and {b.label} share all weights: the difference lies in the "
                "system prompt, not in any block. Fix: " + DROP)  # fmt: skip
    if a.system != b.system:
        _refuse("the two sides have different system prompts, so no hybrid network has one "
                "input. Fix: give both the same system prompt, or " + DROP)  # fmt: skip
    if not setup.same_tokenizer:
        _refuse(f"{a.label} and {b.label} have different tokenizers. Fix: " + DROP)
    ca, cb = setup.models["a"].config, setup.models["b"].config
    for key in ARCH_KEYS:
        if getattr(ca, key, None) != getattr(cb, key, None):
            _refuse(f"{a.label} and {b.label} differ in architecture ({key}: "
                    f"{getattr(ca, key, None)} vs {getattr(cb, key, None)}). Fix: compare a "
                    "model with its own fine-tune, adapter or dtype, or " + DROP)  # fmt: skip
    _check_runnable(setup.models["a"])


def _check_runnable(model: Any) -> None:
    from divscope.models.hybrid import HybridError, blocks

    if hasattr(model, "parameters"):
        try:
            blocks(model)
        except HybridError as e:
            _refuse(str(e))


def _same_weights(ma: Any, mb: Any) -> bool:
    """Whether two loaded models hold identical weights (False when not loaded here)."""
    if not (hasattr(ma, "state_dict") and hasattr(mb, "state_dict")):
        return False
    sa, sb = ma.state_dict(), mb.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(sa[k].dtype == sb[k].dtype and sa[k].equal(sb[k]) for k in sa)


_LAYER_SPEC = {
    "kl_total": ("f", ()),
    "forward": ("f", (-1,)),
    "reverse": ("f", (-1,)),
    "drift": ("f", (5, -1)),
    "delta": ("f", (2, -1, -1)),
    "n_positions": ("iu", ()),
}


def write_layer_unit(path: Path, unit: LayerScores) -> None:
    """A layer unit as one checksummed ``.npz``, written atomically."""
    arrays = {k: np.asarray(getattr(unit, k)) for k in _LAYER_SPEC}
    write_unit_arrays(path, path.stem, arrays)


def read_layer_unit(path: Path) -> LayerScores | None:
    """A cached layer unit, or None (none, or failing its checks: then recomputed)."""
    z = _read(path, _LAYER_SPEC)
    if z is None:
        return None
    return LayerScores(float(z["kl_total"]), z["forward"], z["reverse"], z["drift"],
                       z["delta"], int(z["n_positions"]))  # fmt: skip


def _read(path: Path, spec: dict) -> dict[str, np.ndarray] | None:
    import warnings

    if not path.exists():
        return None
    try:
        return read_unit_arrays(path, path.stem, spec)
    except ArrayFileError as e:
        warnings.warn(f"{e}; recomputing this unit", stacklevel=3)
        return None


def _write_sums(path: Path, sums: np.ndarray) -> None:
    write_unit_arrays(path, path.stem, {"sums": sums})


def _read_sums(path: Path) -> np.ndarray | None:
    z = _read(path, {"sums": ("f", (-1, -1))})
    return None if z is None else z["sums"]


def cached_map(
    pool: Pool,
    work: Callable[[Any, Any], Any],
    units: dict[int, tuple[Any, Path]],
    io: tuple[Callable[[Path], Any], Callable[[Path, Any], None]],
    *,
    desc: str,
    progress: bool,
) -> dict[int, Any]:
    """Results of ``work`` on every unit (key -> ``(unit, cache file)``) in key order: cached
    ones read with ``io[0]``, the rest run on ``pool`` and written with ``io[1]`` as they
    arrive."""
    from tqdm.auto import tqdm

    read, write = io
    found = {i: got for i, (_, f) in units.items() if (got := read(f)) is not None}
    todo = [(i, u) for i, (u, _) in units.items() if i not in found]
    with tqdm(total=len(units), desc=desc, unit="prompt", disable=not progress) as bar:
        bar.update(len(found))
        for i, res in pool.map(work, todo):
            write(units[i][1], res)
            found[i] = res
            bar.update(1)
    return {i: found[i] for i in sorted(found)}


def layer_units(
    setup: Any, responses: dict[str, list], pool: Pool, *, progress: bool, label: str
) -> dict[int, LayerScores]:
    """Every prompt's :class:`LayerScores` on A's samples, through the cache."""
    units = {}
    for i in range(len(setup.prompts)):
        unit = LayerUnit(setup.prompt_ids["a"][i], responses["a"][i])
        key = content_hash({"layers": FORMAT, **unit.__dict__})
        units[i] = (unit, setup.cache / f"layers_{key}.npz")
    io = (read_layer_unit, write_layer_unit)
    return cached_map(pool, layers_on, units, io, desc=f"layers [{label}]", progress=progress)


def random_directions(deltas: np.ndarray, blocks: list[int], seed: int) -> np.ndarray:
    """``(blocks, 1 + N_RANDOM, H)`` unit directions: each block's mean change, then random
    ones drawn from a generator seeded by ``(seed, block)`` (a block's draws do not depend on
    which other blocks are checked)."""
    out = np.stack([
        np.random.default_rng([seed, b]).standard_normal((1 + N_RANDOM, deltas.shape[1]))
        for b in blocks
    ])  # fmt: skip
    out[:, 0] = deltas[blocks]
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def direction_units(
    setup: Any, responses: dict[str, list], pool: Pool, dirs: tuple[list[int], np.ndarray],
    *, progress: bool, label: str,
) -> dict[int, np.ndarray]:  # fmt: skip
    """Every prompt's causal-check sums ``(blocks, directions)``, through the cache."""
    blocks, directions = dirs
    units = {}
    dkey = content_hash({"b": blocks, "d": directions.round(12).tolist()})
    for i in range(len(setup.prompts)):
        unit = DirectionUnit(setup.prompt_ids["a"][i], responses["a"][i], blocks, directions)
        key = content_hash({"dirs": FORMAT, "p": unit.prompt, "r": unit.responses, "d": dkey})
        units[i] = (unit, setup.cache / f"dirs_{key}.npz")
    io = (_read_sums, _write_sums)
    return cached_map(pool, directions_on, units, io, desc=f"directions [{label}]",
                      progress=progress)  # fmt: skip


def layer_analysis(
    setup: Any,
    responses: dict[str, list],
    pool: Pool,
    *,
    n_bootstrap: int,
    seed: int,
    progress: bool = True,
    label: str = "in-process",
    causal_blocks: int | str = N_CAUSAL,
) -> dict[str, Any]:
    """The ``layers.json`` document of a diff (see the module doc and
    :func:`divscope.diff.layers_summary.summarize`); the causal check runs on the
    ``causal_blocks`` leading blocks (``"all"``: every block whose mean change is not 0)."""
    units = layer_units(setup, responses, pool, progress=progress, label=label)
    n_pos = sum(u.n_positions for u in units.values())
    deltas = np.sum([u.delta[0] for u in units.values()], 0) / max(n_pos, 1)
    readout = dict(pool.map(readout_on, [(0, deltas)]))[0]
    dirs = None
    if causal_blocks != 0:
        n = None if causal_blocks == "all" else int(causal_blocks)
        blocks = leading_blocks(units, deltas, n)
        if blocks:
            directions = random_directions(deltas, blocks, seed)
            sums = direction_units(setup, responses, pool, (blocks, directions),
                                   progress=progress, label=label)  # fmt: skip
            dirs = (blocks, np.sum(list(sums.values()), 0))
    decode = partial(_decode, setup.tokenizers["a"])
    labels = [setup.conditions[s].label for s in ("a", "b")]
    cats = [p.category for p in setup.prompts]
    return summarize(units, readout, dirs, labels=labels, categories=cats, decode=decode,
                     n_bootstrap=n_bootstrap, seed=seed, causal_request=causal_blocks)  # fmt: skip


def _decode(tok: Any, i: int) -> str:
    return tok.decode([int(i)])
