"""COGuard: collapse rule, rollback, policies, stop, logs, resume.

Most tests script the measured accuracies through ``measure_fn`` (so the
decision logic is tested exactly); ``test_real_measurement_*`` run the real
compiled PGD/FGSM measurement on a model whose gradient is masked on purpose
(FGSM fails, PGD succeeds: the signature of catastrophic overfitting).
Every fit runs in graph mode (the default compile).
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_backsmooth import co_guard
from tf_backsmooth.co_guard import COGuard, collapse_detected
from tf_backsmooth.robust_model import RobustModel

HEALTHY = (0.6, 0.6)
COLLAPSED = (0.0, 0.9)


class Scripted:
    """``measure_fn`` returning (pgd, fgsm) accuracies from a list, then the
    last entry forever; counts calls."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def __call__(self, model):
        pgd, fgsm = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return {"pgd_accuracy": pgd, "fgsm_accuracy": fgsm}


def _data(n=32, d=6, classes=3, seed=0):
    rs = np.random.RandomState(seed)
    return (0.3 + 0.4 * rs.rand(n, d)).astype(np.float32), rs.randint(0, classes, n)


def _model(method="fgsm_rs", batchnorm=False, lr=0.05, momentum=0.9, seed=0,
           d=6, **kw):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((d,)), keras.layers.Dense(8)]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    layers += [keras.layers.ReLU(), keras.layers.Dense(3)]
    model = RobustModel(keras.Sequential(layers), method=method,
                        epsilon=kw.pop("epsilon", 0.1), **kw)
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum))
    return model


def _numpy(variables):
    return [np.array(v.numpy()) for v in variables]


def _assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


class StepLog(keras.callbacks.Callback):
    """Per-step batch logs and the optimizer step of every batch."""

    def __init__(self):
        super().__init__()
        self.logs, self.iterations = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(dict(logs))
        self.iterations.append(int(self.model.optimizer.iterations.numpy()))


# ----------------------------------------------------------------- the rule
def test_rule():
    # drop 0.7 > 0.2 and gap 0.9 > 0.2
    assert collapse_detected([0.5, 0.7], 0.0, 0.9)
    # drop without gap (everything got worse: divergence, not CO)
    assert not collapse_detected([0.7], 0.1, 0.2)
    assert collapse_detected([0.7], 0.1, 0.2, rule="drop")
    # gap without drop (PGD never was high)
    assert not collapse_detected([0.1], 0.05, 0.9)
    assert collapse_detected([0.1], 0.05, 0.9, rule="gap")
    # thresholds are strict and absolute
    assert not collapse_detected([0.5], 0.3, 0.5, drop=0.2, gap=0.2)
    assert collapse_detected([0.5], 0.29, 0.5, drop=0.2, gap=0.2)
    assert not collapse_detected([0.5], 0.29, 0.5, drop=0.25, gap=0.2)
    assert not collapse_detected([], 0.0, 1.0)   # no history, no drop
    # floor_and_gap: never robust, FGSM fooled (no drop needed)
    assert collapse_detected([], 0.01, 0.7, gap=0.5, rule="floor_and_gap")
    assert not collapse_detected([], 0.01, 0.4, gap=0.5, rule="floor_and_gap")
    assert not collapse_detected([], 0.38, 0.93, gap=0.5, rule="floor_and_gap")
    with pytest.raises(ValueError, match="rule"):
        COGuard(measure_fn=Scripted([HEALTHY]), rule="nope")
    with pytest.raises(ValueError, match="policy"):
        COGuard(measure_fn=Scripted([HEALTHY]), policy="nope")
    with pytest.raises(ValueError, match="factor"):
        COGuard(measure_fn=Scripted([HEALTHY]), factor=1.5)
    with pytest.raises(ValueError, match="unknown method"):
        COGuard(measure_fn=Scripted([HEALTHY]), policy="switch_method",
                fallback="nope")
    with pytest.raises(ValueError, match="fixed batch"):
        COGuard()


def test_overhead_formula():
    # defaults at B=128 for FGSM-RS (2 grad evals/example/step): 11%.
    assert co_guard.overhead(256, 10, 100, 128, 2) == pytest.approx(0.11)
    assert co_guard.overhead(128, 10, 200, 128, 2) == pytest.approx(0.0275)
    assert co_guard.overhead(256, 10, 100, 128, 2, alignment=True) == \
        pytest.approx(256 * 13 / 25600)


# ------------------------------------------------------- scripted detection
def test_scripted_collapse_fires_once_and_healthy_run_stays_silent():
    x, y = _data(32)
    # healthy: rising, noisy, never a 0.2 drop with a 0.2 gap
    healthy = Scripted([(0.1, 0.15), (0.3, 0.35), (0.45, 0.5), (0.4, 0.55),
                        (0.5, 0.55), (0.55, 0.6), (0.5, 0.6), (0.6, 0.62)])
    guard = COGuard(measure_fn=healthy, every_steps=2, policy="none")
    _model().fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
                 callbacks=[guard])
    assert healthy.calls == 1 + 16 // 2
    assert guard.events == [] and guard.collapses == 0
    assert not any(m["collapse"] for m in guard.history)

    script = Scripted([(0.1, 0.1), (0.3, 0.35), (0.5, 0.55), (0.05, 0.8),
                       (0.45, 0.5)])
    guard = COGuard(measure_fn=script, every_steps=2, policy="none")
    _model().fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
                 callbacks=[guard])
    assert [m["collapse"] for m in guard.history][:5] == [
        False, False, False, True, False]
    (event,) = guard.events
    assert event["event"] == "collapse" and event["step"] == 6
    assert event["restored_step"] == 4
    assert event["window_best_pgd_accuracy"] == 0.5


def test_guard_waits_for_the_end_of_an_epsilon_warmup():
    """During a warm-up the model trains below the full epsilon the guard
    measures at: the guard skips those checks and starts once the schedule
    reaches epsilon (step 6 of a 6-step warm-up: checks at steps 6, 8, ...)."""
    from tf_backsmooth import schedules

    x, y = _data(32)
    script = Scripted([HEALTHY])
    guard = COGuard(measure_fn=script, every_steps=2, policy="none")
    model = _model(epsilon_schedule=schedules.EpsilonWarmup(0.1, 6))
    model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=[guard])
    # 16 steps: the baseline before step 0, then checks due after steps 2, 4,
    # ..., 16; those after steps 2 and 4 fall in the warm-up (the next step
    # trains at 3/6 and 5/6 of epsilon) and are skipped.
    assert [m["step"] for m in guard.history] == [0, 6, 8, 10, 12, 14, 16]
    assert script.calls == 7


def test_gradual_slide_does_not_refresh_snapshot():
    """A measurement 0.15 below the window best is not a collapse but is not
    healthy either: the rollback target stays the earlier snapshot."""
    x, y = _data(32)
    script = Scripted([(0.1, 0.1), (0.6, 0.6), (0.45, 0.6), (0.05, 0.9)])
    guard = COGuard(measure_fn=script, every_steps=2, policy="none")
    _model().fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                 callbacks=[guard])
    assert guard.events[0]["step"] == 6
    assert guard.events[0]["restored_step"] == 2


# -------------------------------------------------------------- rollback
class Recorder(keras.callbacks.Callback):
    """Runs after the guard: keeps the state at ``keep_step`` and the state
    right after the guard acted at ``check_step``."""

    def __init__(self, keep_step, check_step):
        super().__init__()
        self.keep_step, self.check_step = keep_step, check_step
        self.step, self.kept, self.after = 0, None, None

    def _state(self):
        return (_numpy(self.model.weights),
                _numpy(self.model.optimizer.variables))

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step == self.keep_step:
            self.kept = self._state()
        if self.step == self.check_step:
            self.after = self._state()


def test_rollback_restores_weights_and_optimizer_exactly_then_fit_continues():
    x, y = _data(64)
    model = _model(batchnorm=True)
    script = Scripted([HEALTHY, HEALTHY, HEALTHY, COLLAPSED, HEALTHY])
    guard = COGuard(measure_fn=script, every_steps=4, policy="none")
    rec, steps = Recorder(keep_step=8, check_step=12), StepLog()
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[guard, rec, steps])
    assert [e["step"] for e in guard.events] == [12]
    kept_w, kept_opt = rec.kept
    after_w, after_opt = rec.after
    _assert_same(after_w, kept_w)       # incl. BatchNorm moving statistics
    _assert_same(after_opt, kept_opt)   # iterations, learning rate, momenta
    paths = [v.path for v in model.optimizer.variables]
    assert any("momentum" in p for p in paths)
    assert any(np.abs(v).sum() > 0 for v, p in zip(kept_opt, paths)
               if "momentum" in p)
    # The compiled train function keeps running from the restored state
    # (StepLog runs after the guard: step 12 shows the restored counter).
    assert steps.iterations == list(range(1, 12)) + [8, 9, 10, 11, 12]
    assert int(model.optimizer.iterations.numpy()) == 12
    final = _numpy(model.weights)
    assert max(np.abs(a - b).max() for a, b in zip(final, kept_w)) > 1e-5
    assert all(np.isfinite(s["loss"]) for s in steps.logs)


def test_rollback_can_keep_iterations():
    x, y = _data(32)
    model = _model()
    guard = COGuard(measure_fn=Scripted([HEALTHY, HEALTHY, COLLAPSED, HEALTHY]),
                    every_steps=2, policy="none", restore_iterations=False)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[guard])
    assert guard.collapses == 1
    assert int(model.optimizer.iterations.numpy()) == 8


# --------------------------------------------------------------- policies
def _fgsm_loss(w, b, x, y, eps, step):
    """Analytic FGSM (no random start) + CE of a linear model, numpy."""
    def ce_and_grad(xx):
        z = xx @ w + b
        z = z - z.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        onehot = np.eye(w.shape[1])[y]
        return -np.log(p[np.arange(len(y)), y]), (p - onehot) @ w.T
    _, g = ce_and_grad(x)
    x_adv = np.clip(np.clip(x + step * np.sign(g), x - eps, x + eps), 0, 1)
    return ce_and_grad(x_adv)[0].mean()


def _linear_model(step_size, epsilon=0.2, seed=1):
    keras.utils.set_random_seed(seed)
    base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    model = RobustModel(base, method="fgsm_rs", epsilon=epsilon,
                        step_size=step_size, random_start=False)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    return model


def test_shrink_step_is_used_by_the_compiled_train_step():
    x, y = _data(16)
    model = _linear_model(step_size=0.16)
    w, b = _numpy(model.base_model.weights)
    expected = {s: _fgsm_loss(w, b, x, y, 0.2, s) for s in (0.16, 0.08)}
    assert abs(expected[0.16] - expected[0.08]) > 1e-2
    # measurements: start, steps 1..4 -> collapse after step 2
    guard = COGuard(measure_fn=Scripted([HEALTHY, HEALTHY, COLLAPSED, HEALTHY]),
                    every_steps=1, policy="shrink_step", factor=0.5)
    steps = StepLog()
    model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0,
              callbacks=[guard, steps])   # one step per epoch
    losses = [s["loss"] for s in steps.logs]
    np.testing.assert_allclose(losses[:2], expected[0.16], rtol=1e-5)
    np.testing.assert_allclose(losses[2:], expected[0.08], rtol=1e-5)
    assert model.params.step_size == pytest.approx(0.08)
    (event,) = guard.events
    assert event["old_step_size"] == pytest.approx(0.16)
    assert event["new_step_size"] == pytest.approx(0.08)


def test_params_change_needs_retrace():
    """Why the guard retraces: RobustModel reads params at trace time."""
    import dataclasses
    x, y = _data(16)
    model = _linear_model(step_size=0.16)
    w, b = _numpy(model.base_model.weights)
    first = model.train_on_batch(x, y, return_dict=True)["loss"]
    model.params = dataclasses.replace(model.params, step_size=0.08)
    stale = model.train_on_batch(x, y, return_dict=True)["loss"]
    np.testing.assert_allclose(stale, first, rtol=1e-6)   # not retraced
    model.retrace()
    new = model.train_on_batch(x, y, return_dict=True)["loss"]
    np.testing.assert_allclose(new, _fgsm_loss(w, b, x, y, 0.2, 0.08),
                               rtol=1e-5)


def test_switch_method_is_used_by_the_compiled_train_step():
    x, y = _data(16)
    model = _model(lr=0.01)
    guard = COGuard(measure_fn=Scripted([HEALTHY, HEALTHY, COLLAPSED, HEALTHY]),
                    every_steps=1, policy="switch_method",
                    fallback="backward_smoothing")
    steps = StepLog()
    model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0,
              callbacks=[guard, steps])
    assert model.method_name == "backward_smoothing"
    assert model.method.name == "backward_smoothing"
    assert model.params.epsilon == pytest.approx(0.1)
    assert model.params.step_size == pytest.approx(0.1)   # BS default alpha=eps
    assert model.params.beta == 6.0
    # fgsm_rs has no natural term; Backward Smoothing has CE(f(x), y).
    natural = [s["natural_loss"] for s in steps.logs]
    assert natural[:2] == [0.0, 0.0]
    assert all(v > 0.1 for v in natural[2:])
    event = guard.events[0]
    assert (event["old_method"], event["new_method"]) == (
        "fgsm_rs", "backward_smoothing")


# ------------------------------------------------------------ max_collapses
def test_max_collapses_stops_with_last_good_weights(tmp_path):
    x, y = _data(64)
    model = _model(batchnorm=True)
    start_w = _numpy(model.weights)
    model_dir, log_dir = tmp_path / "run", tmp_path / "tb"
    guard = COGuard(measure_fn=Scripted([HEALTHY, COLLAPSED]), every_steps=2,
                    max_collapses=2, model_dir=str(model_dir),
                    log_dir=str(log_dir))
    steps = StepLog()
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
              callbacks=[guard, steps])
    # collapse 1 after step 2 (rollback to the start, step size halved),
    # collapse 2 after step 4 (rollback, stop).
    assert len(steps.logs) == 4
    assert model.stop_training
    assert [e["action"] for e in guard.events] == ["rollback", "stop"]
    assert "training stopped" in guard.events[-1]["message"]
    _assert_same(_numpy(model.weights), start_w)
    assert int(model.optimizer.iterations.numpy()) == 0
    assert model.params.step_size == pytest.approx(0.125 * 0.5)  # one shrink

    # ---- event log, measurement log, state, snapshot, TensorBoard
    d = model_dir / "co_guard"
    events = [json.loads(ln) for ln in (d / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["collapse", "collapse"]
    assert events[-1]["action"] == "stop"
    measurements = (d / "measurements.jsonl").read_text().splitlines()
    assert len(measurements) == 3
    state = json.loads((d / "state.json").read_text())
    assert state["collapses"] == 2 and state["stopped"]
    assert state["params"]["step_size"] == pytest.approx(0.0625)
    assert (d / "last_good.weights.h5").exists()
    tb = list((log_dir / "co_guard").glob("events.out.tfevents.*"))
    assert tb and sum(f.stat().st_size for f in tb) > 0
    tags = set()
    for f in tb:
        for raw in tf.data.TFRecordDataset(str(f)):
            ev = tf.compat.v1.Event.FromString(raw.numpy())
            tags.update(v.tag for v in ev.summary.value)
    assert {"co_guard/pgd_accuracy", "co_guard/fgsm_accuracy",
            "co_guard/event"} <= tags

    # The on-disk snapshot holds weights and optimizer state.
    other = _model(batchnorm=True, seed=3)
    other.optimizer.build(other.trainable_variables)
    other.load_weights(str(d / "last_good.weights.h5"))
    _assert_same(_numpy(other.weights), start_w)
    _assert_same(_numpy(other.optimizer.variables),
                 _numpy(model.optimizer.variables))


def test_resume_reapplies_policy_state(tmp_path):
    x, y = _data(32)
    guard = COGuard(measure_fn=Scripted([HEALTHY, COLLAPSED, HEALTHY]),
                    every_steps=2, model_dir=str(tmp_path))
    _model().fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                 callbacks=[guard])
    assert guard.collapses == 1
    # A new process: same run directory, fresh model and guard.
    model = _model()
    assert model.params.step_size == pytest.approx(0.125)
    guard2 = COGuard(measure_fn=Scripted([HEALTHY]), every_steps=2,
                     model_dir=str(tmp_path))
    steps = StepLog()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[guard2, steps])
    assert model.params.step_size == pytest.approx(0.0625)
    assert guard2.collapses == 1 and guard2.events[0]["event"] == "resume"


# ------------------------------------------------- the real measurement
class MaskedCurvature(keras.layers.Layer):
    """Two logits ``+-m`` with ``m = 1 - a * mean(8u - 8u^2)``,
    ``u = (x - 0.5) / eps``. At the clean input (all 0.5) ``m = 1``; FGSM's
    full step (u = 1) gives ``m = 1`` again, while PGD's small steps find
    u ~ 0.5 with ``m < 0``. ``a = 0``: flat, robust model; ``a = 1``: a
    gradient-masked ("collapsed") model."""

    def __init__(self, eps, **kw):
        super().__init__(**kw)
        self.eps = eps

    def build(self, shape):
        self.a = self.add_weight(shape=(), initializer="zeros",
                                 trainable=False, name="a")
        self.b = self.add_weight(shape=(2,), initializer="zeros", name="b")

    def call(self, x):
        u = (x - 0.5) / self.eps
        m = 1.0 - self.a * tf.reduce_mean(8.0 * u - 8.0 * u * u, axis=-1)
        return tf.stack([m, -m], axis=-1) + self.b


class Collapse(keras.callbacks.Callback):
    def __init__(self, at_step, layer):
        super().__init__()
        self.at_step, self.layer, self.step = at_step, layer, 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step == self.at_step:
            self.layer.a.assign(1.0)


@pytest.mark.parametrize("collapse_at", [None, 6])
def test_real_measurement_detects_masked_gradients(collapse_at):
    eps = 0.1
    layer = MaskedCurvature(eps)
    base = keras.Sequential([keras.Input((8,)), layer])
    model = RobustModel(base, method="fgsm_rs", epsilon=eps)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    x = np.full((32, 8), 0.5, np.float32)
    y = np.zeros(32, np.int64)

    # The measurement itself (compiled once): masked -> FGSM 1, PGD 0.
    layer.a.assign(1.0)
    fn = co_guard.make_measure_fn(base, eps, pgd_steps=10, alignment=True)
    m = {k: float(v) for k, v in fn(tf.constant(x[:16]), tf.constant(y[:16])).items()}
    assert (m["clean_accuracy"], m["fgsm_accuracy"], m["pgd_accuracy"]) == (1, 1, 0)
    assert -1.0 <= m["alignment"] < 0.9
    layer.a.assign(0.0)

    guard = COGuard(x[:16], y[:16], every_steps=2, pgd_steps=10,
                    alignment=True)
    callbacks = [guard] if collapse_at is None else [Collapse(collapse_at, layer),
                                                     guard]
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
              callbacks=callbacks)
    assert len(guard.history) == 1 + 16 // 2
    assert guard.extra_grad_evals == len(guard.history) * 16 * (10 + 1 + 2)
    if collapse_at is None:
        assert guard.events == []
        assert all(h["pgd_accuracy"] == 1.0 for h in guard.history)
        return
    (event,) = guard.events
    assert event["step"] == 6 and event["restored_step"] == 4
    assert event["measurement"]["pgd_accuracy"] == 0.0
    assert event["measurement"]["fgsm_accuracy"] == 1.0
    assert float(layer.a.numpy()) == 0.0            # rolled back
    assert all(h["pgd_accuracy"] == 1.0 for h in guard.history[4:])
    assert model.params.step_size == pytest.approx(0.125 * 0.5)


@pytest.mark.slow
@pytest.mark.multi_device
def test_two_replicas_rollback_and_real_measurement():
    """Under a 2-replica MirroredStrategy: the real measurement runs, the
    rollback assigns every replica's copy and the retraced step trains on."""
    from conftest import two_replica_strategy
    strategy = two_replica_strategy()
    x, y = _data(32)
    with strategy.scope():
        model = _model(batchnorm=True)
    script_values = iter([HEALTHY, HEALTHY, COLLAPSED])
    real = COGuard(x[:8], y[:8], every_steps=2, pgd_steps=3)

    def measure(m):
        real.set_model(m)
        out = real.measure()          # the compiled PGD/FGSM measurement
        assert 0.0 <= out["pgd_accuracy"] <= out["clean_accuracy"] + 1e-6
        pgd, fgsm = next(script_values, HEALTHY)
        return {**out, "pgd_accuracy": pgd, "fgsm_accuracy": fgsm}

    class Replicas(keras.callbacks.Callback):
        """After the guard at step 4: each replica's copy of each weight."""
        step, copies = 0, None

        def on_train_batch_end(self, batch, logs=None):
            Replicas.step += 1
            if Replicas.step == 4:
                Replicas.copies = [
                    [np.array(c.numpy()) for c in getattr(
                        getattr(w, "_value", w), "values", [w])]
                    for w in self.model.weights]

    guard = COGuard(measure_fn=measure, every_steps=2)
    rec, steps = Recorder(keep_step=2, check_step=4), StepLog()
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[guard, rec, Replicas(), steps])
    assert [e["step"] for e in guard.events] == [4]
    _assert_same(rec.after[0], rec.kept[0])
    _assert_same(rec.after[1], rec.kept[1])
    # every replica's copy (mirrored weights, and the per-replica BatchNorm
    # statistics) holds the restored value
    assert max(len(c) for c in Replicas.copies) == 2
    for copies, kept in zip(Replicas.copies, rec.kept[0]):
        for c in copies:
            np.testing.assert_array_equal(c, kept)
    assert model.params.step_size == pytest.approx(0.0625)
    assert steps.iterations == [1, 2, 3, 2, 3, 4, 5, 6]
    assert all(np.isfinite(s["loss"]) for s in steps.logs)
