"""Every kernel task: its reference against an independent float64 oracle, its baselines against it,
its tolerance calibrated (rounding noise passes, a 1% error fails), and its declared shapes sane."""

import numpy as np
import pytest

from agent.compare import error_ratio, leaves, noise_ratio
from agent.tasks import FAMILIES, LEVELS, all_tasks

TASKS = all_tasks()
CASES = [(name, i) for name, task in TASKS.items() for i in range(len(task.test_shapes))]


def test_registry_covers_every_family_with_enough_tasks():
    assert len(TASKS) >= 20
    for family in FAMILIES:
        assert sum(t.family == family for t in TASKS.values()) >= 3, family
    for task in TASKS.values():
        assert task.level in LEVELS and task.bench_shapes and task.test_shapes


@pytest.mark.parametrize("name,index", CASES)
def test_reference_and_baselines_match_the_oracle(name, index):
    task = TASKS[name]
    shape = task.test_shapes[index]
    args = task.inputs(shape, seed=7)
    expected = task.oracle(*[np.asarray(a) for a in args], **task.static(shape))
    atol, rtol = task.tolerance_for(shape)
    for label, fn in task.all_baselines().items():
        out = fn(*args, **task.static(shape))
        # The oracle is float64: compare values at the reference's dtypes.
        cast = [np.asarray(e).astype(np.asarray(o).dtype) for e, o in zip(leaves(expected), leaves(out))]
        assert error_ratio(out, cast if isinstance(out, tuple) else cast[0], atol, rtol) <= 1, label


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tolerance_admits_rounding_noise_and_rejects_a_one_percent_error(name):
    task = TASKS[name]
    shape = task.test_shapes[0]
    ratio, out = noise_ratio(task, shape)
    assert ratio <= 0.5
    out = leaves(out)
    floats = [i for i, o in enumerate(out) if np.issubdtype(np.asarray(o).dtype, np.floating)]
    wrong = [o * (1.01 if i in floats else 1) + (0 if i in floats else 1) for i, o in enumerate(out)]
    atol, rtol = task.tolerance_for(shape)
    assert error_ratio(wrong, out, atol, rtol) > 1


@pytest.mark.parametrize("name", sorted(TASKS))
def test_inputs_are_deterministic_in_the_seed_and_fresh_shapes_change_them(name):
    task = TASKS[name]
    shape = task.test_shapes[0]
    a, b, c = (task.inputs(shape, s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))
    fresh = task.fresh_shape(shape, np.random.default_rng(0))
    assert fresh != shape
    assert [a.shape for a in task.inputs(fresh, 0)] != [a.shape for a in a]


@pytest.mark.parametrize("name", [n for n, t in TASKS.items() if "chunk" in t.static_keys])
def test_fresh_shapes_of_chunked_tasks_stay_whole_chunks(name):
    # The references reject a length that is not a multiple of the chunk: a fresh shape that broke
    # that rule would fail every candidate on the GPU's benchmark shapes (chunks of 64 to 256).
    task = TASKS[name]
    rng = np.random.default_rng(0)
    for shape in task.test_shapes + task.bench_shapes:
        fresh = task.fresh_shape(shape, rng)
        assert fresh["t"] > shape["t"] and fresh["t"] % shape["chunk"] == 0


def test_large_draws_come_from_the_device_deterministically(monkeypatch):
    import agent.tasks as tasks_module

    monkeypatch.setattr(tasks_module, "DEVICE_DRAW_ELEMENTS", 64)
    first = tasks_module.normal(np.random.default_rng(3), (32, 8), "bfloat16", scale=0.5)
    again = tasks_module.normal(np.random.default_rng(3), (32, 8), "bfloat16", scale=0.5)
    other = tasks_module.normal(np.random.default_rng(4), (32, 8), "bfloat16", scale=0.5)
    small = tasks_module.normal(np.random.default_rng(3), (4, 8), "float32")
    assert not isinstance(first, np.ndarray) and isinstance(small, np.ndarray)  # device array vs host array
    assert first.shape == (32, 8) and str(first.dtype) == "bfloat16"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    assert 0.35 < float(np.std(np.asarray(first, np.float32))) < 0.65  # the scale applies
