r"""simpleNN's Newton method on the hand rules: subsampled Gauss-Newton, conjugate gradient, Levenberg-Marquardt.

Each iteration k minimises Lin's objective f(theta) = ||theta||^2 / (2C) + (1/l) sum_i xi_i (eq. 1-2) by

1. the full objective f and gradient g over the l training examples (the hand VJPs, in segments);
2. the direction s solving (G_k + lambda I) s = -g by conjugate gradient, G_k = (1/C) I + (1/|S_k|) sum J^T B J
   over the subsample S_k (``jaxcnn.second_order``: J v by the hand tangent rules, J^T u by the hand VJPs, on
   S_k's forward pass run once and stored, as simpleNN does, when it fits in ``STORE_LIMIT``), stopped at
   ||r|| <= cg_tol ||g|| or cg_max iterations;
3. a backtracking line search: alpha = 1, 1/2, 1/4, ... until f(theta + alpha s) - f <= eta alpha g^T s (eta 1e-4);
   the full step's f comes with its gradient, which is the next iteration's when the step is taken;
4. the Levenberg-Marquardt update of lambda from rho = actual / predicted reduction, the prediction being
   alpha g^T s + alpha^2 / 2 s^T G_k s: lambda *= 3/2 if rho < 1/4, lambda *= 2/3 if rho >= 3/4.

The subsamples S_k (``gn_fraction`` of the training set) are the consecutive parts of one random permutation, taken
in turn; a new permutation (seeded by the seed and the sweep) once all parts are used; the last part is filled up
from the permutation's start, so every S_k has the same size (simpleNN's ``assign_inst_idx``). Everything random
is a function of the seed and k, so a resumed run continues exactly.

The defaults are simpleNN's: squared loss, C = 0.01 l, lambda_0 = 1, |S_k| = 5% of l, cg_tol 0.1, cg_max 250.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxcnn import objective as obj
from jaxcnn import second_order
from jaxcnn.network import Sequential

ETA, BOOST, DROP, MAX_HALVINGS = 1e-4, 1.5, 2.0 / 3.0, 30
STORE_LIMIT = 2**30  # bytes: a larger stored forward pass of S_k is recomputed in every G v instead


def objective_c(cfg, examples: int) -> float:
    """The C of Lin's eq. (1): the recipe's, else simpleNN's default 0.01 l."""
    return cfg.C if cfg.C is not None else 0.01 * examples


def subsample(seed: int, k: int, examples: int, fraction: float) -> np.ndarray:
    """The indices of S_k (k = 1, 2, ...): part (k - 1) mod P of the permutation of sweep (k - 1) div P, P the
    number of parts (see the module docstring)."""
    size = max(1, math.ceil(fraction * examples))
    parts = math.ceil(examples / size)
    sweep, part = divmod(k - 1, parts)
    order = np.random.default_rng([seed, 7919, sweep]).permutation(examples)
    order = np.concatenate([order, order[:size]])
    return order[part * size:(part + 1) * size]


def stored_bytes(net: Sequential, cfg, input_shape: tuple, count: int, dtype=jnp.float32) -> int:
    """The bytes of ``second_order.forward`` over a subsample of ``count`` examples: what conjugate gradient keeps
    when the forward pass of S_k is stored (at most ``STORE_LIMIT``)."""
    def forward(x):
        params = net.init(jax.random.key(0), input_shape, dtype=dtype)
        return second_order.forward(net, params, x, batch_size=min(cfg.batch_size, count), grad=cfg.grad,
                                    rule=cfg.op_rule).stored

    stored = jax.eval_shape(forward, jax.ShapeDtypeStruct((count, *input_shape), dtype))
    return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(stored))


def store_plan(net: Sequential, cfg, input_shape: tuple, examples: int) -> tuple[bool, str]:
    """Whether CG stores S_k's forward pass (``stored_bytes`` <= ``STORE_LIMIT``), and a line saying so."""
    count = max(1, math.ceil(cfg.gn_fraction * examples))
    size = stored_bytes(net, cfg, input_shape, count)
    if size <= STORE_LIMIT:
        return True, f"G v reuses S_k's stored forward pass ({size / 2**20:.0f} MiB)"
    return False, (f"G v recomputes S_k's forward pass in segments of {min(cfg.batch_size, count)} (storing it "
                   f"would take {size / 2**30:.1f} GiB > {STORE_LIMIT / 2**30:g} GiB)")


def make_functions(net: Sequential, cfg, x_fit: jax.Array, y_fit: jax.Array, C: float, store: bool = True):
    """The jitted pieces of an iteration: ``value_grad(theta) -> (f, g, correct)`` and ``value(theta) -> f`` over
    the training set, and ``cg(theta, g, lam, x_sub) -> (s, iterations, g^T s, s^T G s)``; theta is flat. With
    ``store``, CG runs S_k's forward pass once and every G v reuses it (simpleNN's way); else each G v recomputes
    it segment by segment (memory of one segment)."""
    examples = x_fit.shape[0]
    (xs, ys), ws = second_order.segments(min(cfg.batch_size, examples), x_fit, y_fit)

    def segment_terms(params, x, y, w):
        """sum_i xi_i over one segment and its number of correct predictions."""
        logits = net.apply(params, x, grad=cfg.grad, rule=cfg.op_rule)
        xi = obj.per_example_loss(logits, y, cfg.loss)
        return jnp.sum(jnp.where(w, xi, 0.0)), jnp.sum((jnp.argmax(logits, -1) == y) & w, dtype=jnp.int32)

    def build(template):
        _, unravel = ravel_pytree(template)

        @jax.jit
        def value_grad(theta):
            """f, g and the correct count; each segment's gradient is summed as it is computed, so the memory is
            that of one segment (differentiating through the loop would keep every segment's activations)."""
            def add(carry, segment):
                (total, correct), grad = jax.value_and_grad(
                    lambda t: segment_terms(unravel(t), *segment), has_aux=True)(theta)
                return jax.tree_util.tree_map(jnp.add, carry, (total, grad, correct)), None

            zero = (jnp.zeros((), theta.dtype), jnp.zeros_like(theta), jnp.zeros((), jnp.int32))
            (total, grad, correct), _ = lax.scan(add, zero, (xs, ys, ws))
            return total / examples + jnp.vdot(theta, theta) / (2 * C), grad / examples + theta / C, correct

        @jax.jit
        def value(theta):
            totals, _ = lax.map(lambda segment: segment_terms(unravel(theta), *segment), (xs, ys, ws))
            return totals.sum() / examples + jnp.vdot(theta, theta) / (2 * C)

        @jax.jit
        def cg(theta, g, lam, x_sub):
            params = unravel(theta)
            sub = second_order.forward(net, params, x_sub, batch_size=min(cfg.batch_size, x_sub.shape[0]),
                                       grad=cfg.grad, rule=cfg.op_rule) if store else x_sub

            def gv(v):  # (lambda + 1/C) v + (1/|S|) J^T B J v
                product = second_order.gauss_newton_product(
                    net, params, sub, unravel(v), loss=cfg.loss, C=C, damping=lam, batch_size=cfg.batch_size,
                    grad=cfg.grad, rule=cfg.op_rule)
                return ravel_pytree(product)[0]

            tol = cfg.cg_tol * jnp.linalg.norm(g)

            def go_on(state):
                *_, r2, k = state
                return (jnp.sqrt(r2) > tol) & (k < cfg.cg_max)

            def step(state):
                s, r, d, r2, k = state
                gd = gv(d)
                alpha = r2 / jnp.vdot(d, gd)
                s, r = s + alpha * d, r - alpha * gd
                r2_new = jnp.vdot(r, r)
                return s, r, r + (r2_new / r2) * d, r2_new, k + 1

            zero = jnp.zeros_like(g)
            s, r, _, _, k = lax.while_loop(go_on, step, (zero, -g, -g, jnp.vdot(g, g), 0))
            # G s = -g - r, so s^T G s without lambda (the model's curvature) is s^T (-g - r - lambda s)
            return s, k, jnp.vdot(g, s), jnp.vdot(s, -g - r - lam * s)

        return value_grad, value, cg, unravel

    return build


def fit(net: Sequential, prep, cfg, *, on_epoch: Callable | None = None, checkpoint: Callable | None = None,
        resume: tuple | None = None, devices: int | None = None):
    """``train.fit`` for ``cfg.optimizer == "newton"``: ``cfg.iterations`` Newton iterations (see the module
    docstring). ``on_epoch(record, best_params, improved, {})`` after every iteration; ``checkpoint(state)`` after every
    iteration (each is a full pass over the data, so always). A non-finite objective or gradient at the current
    point stops the run (NonFiniteError, whatever ``train.fit``'s ``on_nan`` says: no Newton step can skip it); a
    non-finite trial point in the line search is rejected like an insufficient decrease."""
    from jaxcnn import train

    if devices not in (None, 1) and len(jax.local_devices()) > 1:
        raise ValueError("the newton optimizer runs on one device for now (--devices 1); the Gauss-Newton product "
                         "itself can be data-parallel (jaxcnn.second_order.gauss_newton_product(axis_name=...))")
    train.check_network(net, prep.input_shape, prep.classes)
    second_order.check_stateless(net)
    if net.random:
        raise ValueError(f"{net.name} has dropout: the newton optimizer's line search and Gauss-Newton products need "
                         f"a deterministic objective; remove the dropout layers or use a first-order optimizer")
    examples = len(prep.x_fit)
    C = objective_c(cfg, examples)
    x_fit, y_fit = jnp.asarray(prep.x_fit), jnp.asarray(prep.y_fit)
    params = net.init(jax.random.key(cfg.seed), prep.input_shape)
    store = store_plan(net, cfg, prep.input_shape, examples)[0]
    value_grad, value, cg, unravel = make_functions(net, cfg, x_fit, y_fit, C, store)(params)
    evaluate = train.make_evaluator(net, cfg, max(len(prep.x_val), len(prep.x_test)))
    theta = ravel_pytree(params)[0]
    k, lam, history, best_key, best_epoch, best_params = 1, float(cfg.damping), [], None, 0, None
    if resume is not None:
        arrays, meta = resume
        if not np.array_equal(arrays["preprocess"]["mean"], prep.mean):
            raise ValueError("the training data differ from those this run started with (another mean image): "
                             "resume with the same dataset and --data-dir")
        theta = jnp.asarray(ravel_pytree(arrays["params"])[0], theta.dtype)
        pos = meta["position"]
        k, lam, history, best_key, best_epoch = pos["epoch"], pos["damping"], pos["history"], pos["best_key"], \
            pos["best_epoch"]
        best_params = arrays.get("best") or None
    f, g, _ = value_grad(theta)
    while k <= cfg.iterations:
        start = time.perf_counter()
        if not (np.isfinite(float(f)) and bool(jnp.all(jnp.isfinite(g)))):
            raise train.NonFiniteError(f"newton iteration {k}: the objective or gradient is not finite at the "
                                       f"current point (f = {float(f)}); lower --damping's start or set --C")
        x_sub = x_fit[subsample(cfg.seed, k, examples, cfg.gn_fraction)]
        s, cg_iterations, gs, sGs = cg(theta, g, jnp.asarray(lam, theta.dtype), x_sub)
        alpha, f_old = 1.0, f
        f_new, g_new, correct = value_grad(theta + s)  # the full step, nearly always taken: its gradient is reused
        for halvings in range(MAX_HALVINGS + 1):
            if halvings:
                alpha /= 2
                f_new, g_new = value(theta + alpha * s), None
            if np.isfinite(float(f_new)) and float(f_new) - float(f_old) <= ETA * alpha * float(gs):
                break
        else:
            raise train.NonFiniteError(f"newton iteration {k}: no sufficient decrease after {MAX_HALVINGS} halvings "
                                       f"of the step (g^T s = {float(gs):.3e}); the direction is not a descent one")
        actual, predicted = float(f_new) - float(f_old), alpha * float(gs) + 0.5 * alpha**2 * float(sGs)
        ratio = actual / predicted if predicted != 0 else 1.0
        lam = lam * BOOST if ratio < 0.25 else lam * DROP if ratio >= 0.75 else lam
        theta = theta + alpha * s
        f, g, correct = (f_new, g_new, correct) if g_new is not None else value_grad(theta)
        params = unravel(theta)
        record = {"epoch": k, "iteration": k, "train_objective": float(f), "train_accuracy": int(correct) / examples,
                  "gradient_norm": float(jnp.linalg.norm(g)), "cg_iterations": int(cg_iterations), "lambda": lam,
                  "step_size": alpha, "ratio": ratio, "skipped_steps": 0}
        if len(prep.x_val):
            val = evaluate(params, prep.x_val, prep.y_val)
            record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            key = [val["accuracy"], -val["loss"]]
        else:
            key = [k]
        record["seconds"] = time.perf_counter() - start
        improved = best_key is None or key > best_key
        if improved:
            best_key, best_epoch, best_params = key, k, jax.device_get(params)
        history.append(record)
        k += 1
        if checkpoint is not None:
            position = {"epoch": k, "step": 0, "history": history, "best_key": best_key, "best_epoch": best_epoch,
                        "damping": lam}
            arrays = {"params": jax.device_get(params), "opt": {}, "best": best_params or {},
                      "preprocess": {"mean": prep.mean}}
            checkpoint((k - 1, arrays, {"position": position, "train": dataclasses.asdict(cfg),
                                        "network": net.to_config(), "dataset": prep.name, "steps_per_epoch": 1}))
        if on_epoch is not None:
            on_epoch(record, best_params, improved, {})
    if best_params is None:  # iterations already done (a resumed, finished run)
        best_params = unravel(theta)
    result = train.FitResult(best_params, best_epoch, history, np.asarray([r["train_objective"] for r in history]))
    result.test = evaluate(best_params, prep.x_test, prep.y_test)
    return result
