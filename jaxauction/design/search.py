"""Gradient search over rule parameters with optax, a constraint budget, checkpoints and a progress bar.

The search maximises ``f(theta)`` (or minimises it) subject to ``g(theta) <= budget`` with an augmented
Lagrangian (multiplier ``lambda >= 0``, penalty ``mu > 0``, ``s = g(theta) - budget``)::

    loss(theta) = -f(theta) + (max(0, lambda + mu s)**2 - lambda**2) / (2 mu)

Every ``multiplier_every`` steps the multiplier takes a dual step ``lambda <- max(0, lambda + mu s)``.
After each optimiser step the parameters may be projected into a box (:meth:`~jaxauction.design.Bounds.project`).
The compiled step is cached per (objective, constraint function, optimizer) object: budgets, penalties,
seeds and data of the same shapes do not recompile.

A search over the parameters of a registered family (:mod:`jaxauction.design.base`: the power mean, the
learned monotone family, a user's) ends with the strict monotonicity certificate (docs/maths.md §4) of the
rule it returns, on the held-out auctions when given (``holdout=``), else on the fitted ones
(``SearchResult.certified_on`` says which). ``monotone=True`` searches the family's monotone part
(``Family.monotone_part``; for the power mean rho = 1 and temperature = 1 frozen, gamma >= 0 and the base
bid free: monotone by construction, docs/maths.md §3; the learned monotone family is monotone everywhere);
a search asked for a monotone rule (``monotone=True``, or a constraint with budget 0) whose rule fails the
certificate warns with :class:`CertificateWarning`, never claims it silently.

Same inputs, same result: the optional minibatch of step ``k`` is drawn with
``fold_in(key(seed), k)``, so a search resumed from a checkpoint retraces the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxauction import _validation, preferences
from jaxauction.design import checkpoint as checkpoint_lib
from jaxauction.design.base import Bounds, check_bounds, describe, family_of, is_registered
from jaxauction.design.data import AuctionBatch
from jaxauction.design.families import MONOTONE_TRAINABLE  # noqa: F401 (the power mean's monotone part, public here)
from jaxauction.design.objectives import certify_rule


class CertificateWarning(UserWarning):
    """A search asked for a monotone rule returned one that fails the strict certificate (docs/maths.md §4)."""


Objective = Callable[[Any, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class Constraint:
    """``fn(params, data) <= budget``, handled by an augmented Lagrangian.

    Attributes:
      fn: scalar constraint function, differentiable in ``params``.
      budget: the allowed value.
      penalty: the augmented Lagrangian's ``mu`` (> 0): larger enforces harder, but stiffens the loss.
      multiplier_every: steps between dual updates of the multiplier.
    """

    fn: Objective
    budget: float
    penalty: float = 100.0
    multiplier_every: int = 10

    def __post_init__(self):
        if not np.isfinite(self.budget):
            raise ValueError(f"Constraint.budget must be finite, got {self.budget}.")
        if not self.penalty > 0:
            raise ValueError(f"Constraint.penalty must be > 0, got {self.penalty}.")
        if self.multiplier_every < 1:
            raise ValueError(f"Constraint.multiplier_every must be >= 1, got {self.multiplier_every}.")


@dataclasses.dataclass
class SearchResult:
    """The parameters after ``step`` steps, the optimiser state, the multiplier and the history.

    ``history`` maps names to arrays with one entry per step, evaluated at the parameters *before*
    that step's update: ``step``, ``loss``, ``objective``, ``constraint`` (NaN without one),
    ``multiplier``, and ``param<path>`` for every scalar parameter (e.g. ``param.rho``).

    ``certificate``: for the parameters of a registered family, the strict certificate
    (:func:`~jaxauction.design.certify_rule`) of ``params`` on ``certified_on``'s auctions: ``"held-out"``
    (the search's ``holdout``) or ``"fitted"`` (its ``data``, when no holdout was given: not a claim about
    other auctions); None for other parameters. ``monotone`` is True only if that certificate's share is 1.0.
    """

    params: Any
    opt_state: Any
    step: int
    multiplier: float
    history: dict[str, np.ndarray]
    certificate: preferences.Certificate | None = None
    certified_on: str | None = None

    @property
    def monotone(self) -> bool:
        """True iff the result carries a certificate and every (auction, agent) pair passed it."""
        return self.certificate is not None and self.certificate.monotone

    @classmethod
    def of(cls, state: checkpoint_lib.SearchState, certificate, certified_on: str | None) -> SearchResult:
        """The result of a search that ended in ``state`` (its history as float64 arrays)."""
        return cls(
            params=state.params,
            opt_state=state.opt_state,
            step=state.step,
            multiplier=state.multiplier,
            history={name: np.asarray(values, np.float64) for name, values in state.history.items()},
            certificate=certificate,
            certified_on=None if certificate is None else certified_on,
        )


def augmented_lagrangian(slack: jax.Array, multiplier: jax.Array, penalty: float) -> jax.Array:
    """``(max(0, lambda + mu s)**2 - lambda**2) / (2 mu)`` for ``g <= budget`` with slack ``s = g - budget``."""
    return (jnp.maximum(0.0, multiplier + penalty * slack) ** 2 - multiplier**2) / (2.0 * penalty)


def _scalar_names(params) -> list[str]:
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    return [f"param{jax.tree_util.keystr(path)}" for path, leaf in paths if np.size(leaf) == 1]


@functools.lru_cache(maxsize=32)
def _default_optimizer(learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


@functools.lru_cache(maxsize=32)
def _with_frozen(optimizer, labels_treedef, labels) -> optax.GradientTransformation:
    param_labels = jax.tree.unflatten(labels_treedef, labels)
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, param_labels)


@functools.lru_cache(maxsize=32)
def _step_function(objective, constraint_fn, optimizer, sign, batch_size):
    """The jitted search step; cached so that repeated searches (e.g. a budget sweep) compile once."""

    def minibatch(data, step, seed):
        if batch_size is None:
            return data
        count = jax.tree.leaves(data)[0].shape[0]
        key = jax.random.fold_in(jax.random.key(seed), step)
        indices = jax.random.choice(key, count, (batch_size,), replace=False)
        return jax.tree.map(lambda leaf: leaf[indices], data)

    def loss_fn(params, data, multiplier, budget, penalty):
        value = objective(params, data)
        loss = -sign * value
        violation = jnp.full((), jnp.nan, loss.dtype)
        if constraint_fn is not None:
            violation = constraint_fn(params, data)
            loss = loss + augmented_lagrangian(violation - budget, multiplier, penalty)
        return loss, (value, violation)

    @jax.jit
    def step_fn(params, opt_state, data, multiplier, step, seed, budget, penalty, bounds):
        batch = minibatch(data, step, seed)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (value, violation)), grads = grad_fn(params, batch, multiplier, budget, penalty)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if bounds is not None:
            new_params = bounds.project(new_params)
        return new_params, opt_state, loss, value, violation

    return step_fn


def _check_params(params) -> None:
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("search: params has no array leaves; pass a pytree of float32/float64 arrays.")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = jnp.asarray(leaf).dtype
        where = jax.tree_util.keystr(path) or "params"
        if dtype not in (jnp.float32, jnp.float64):
            raise ValueError(
                f"search: parameter {where} has dtype {dtype}; expected float32 or float64 (float16 and "
                "bfloat16 lose the small steps of the search and overflow). Fix: cast with .astype(jnp.float32)."
            )
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(f"search: parameter {where} is not finite: {leaf!r:.60}.")


def _check_step(index: int, loss, value, violation, new_params, constrained: bool) -> None:
    """Raises FloatingPointError naming step ``index`` if anything it produced is not finite."""
    checks = {"loss": loss, "objective": value}
    if constrained:
        checks["constraint"] = violation
    for path, leaf in jax.tree_util.tree_flatten_with_path(new_params)[0]:
        checks[f"parameter {jax.tree_util.keystr(path) or 'params'}"] = leaf
    bad = [name for name, array in checks.items() if not np.all(np.isfinite(np.asarray(array)))]
    if bad:
        raise FloatingPointError(
            f"search: step {index} gave a non-finite {', '.join(bad)} (objective {float(value)!r}, loss "
            f"{float(loss)!r}); stopped before applying it (the checkpoint, if any, keeps step {index}'s "
            "parameters). Lower the learning rate, add bounds, or check the objective."
        )


def search(
    objective: Objective,
    params: Any,
    data: Any = None,
    *,
    steps: int,
    constraint: Constraint | None = None,
    maximize: bool = True,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 0.05,
    trainable: Any = None,
    bounds: Any = None,
    batch_size: int | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    description: str = "design search",
    tag: str | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    monotone: bool = False,
    holdout: AuctionBatch | None = None,
) -> SearchResult:
    """Runs (or resumes) a gradient search for ``steps`` steps in total (see the module docstring).

    Args:
      objective: ``objective(params, data) -> scalar``, differentiable in ``params`` (jit-able).
      params: initial parameters (any pytree of float32/float64 arrays).
      data: the objective's second argument; its leaves share a leading auction axis for ``batch_size``.
      steps: total optimiser steps (a resumed search counts the steps already done).
      constraint: optional ``g(params, data) <= budget`` (augmented Lagrangian).
      maximize: maximise ``objective`` (``True``) or minimise it.
      optimizer: an optax transformation; default ``optax.adam(learning_rate)``. The compiled step is
        cached per (objective, constraint function, optimizer) object: reuse them to compile once.
      trainable: a pytree of bools like ``params``; ``False`` leaves stay fixed. ``None``: all train.
      bounds: ``(lower, upper)`` pytrees like ``params``, or a :class:`~jaxauction.design.Bounds`: the
        parameters are projected into the box (:meth:`Bounds.project`) after every update. ``None``: the
        family's domain (``Family.domain``), else no box. Checked to have the structure of ``params``.
      batch_size: minibatch drawn without replacement each step; ``None`` uses all of ``data``.
      seed: seeds the minibatches.
      checkpoint: ``.npz`` path; an existing one is resumed (its settings must match). Rewritten every
        ``checkpoint_every`` steps, at the end and on any exception (``KeyboardInterrupt`` too), atomically.
      progress, description: a tqdm progress bar and its label.
      tag: a JSON-able label stored in the checkpoint and compared on resume (e.g. a data fingerprint).
      callback: ``callback(step, record)`` after every step (``record``: that step's history entry); an
        exception it raises interrupts the search (after the checkpoint is written).
      monotone: search the family's monotone part (``Family.monotone_part``; power mean: rho = temperature
        = 1, :data:`MONOTONE_TRAINABLE` or the subset ``trainable`` names); the result is still certified.
      holdout: an :class:`~jaxauction.design.AuctionBatch` not fitted, on which the rule is certified.

    Returns: a :class:`SearchResult`, with the certificate of its parameters for a registered family.

    Warns:
      CertificateWarning: a search asked for a monotone rule (``monotone=True``, or a budget of 0 on a
        registered family's parameters) whose result fails the strict certificate (the message gives share, excess, fix).

    Raises:
      ValueError: invalid settings, parameters, monotone requests (or nothing to certify them on), data
        the objective cannot take, or a checkpoint that is corrupt or another search's (named).
      FloatingPointError: a non-finite step (named); the checkpoint keeps the last finite state.
    """
    _check_settings(steps, checkpoint_every, batch_size, optimizer, learning_rate, params, data)
    checkpoint_lib.check_path(checkpoint)  # before any step
    bounds = _as_bounds(bounds, params)
    if monotone:
        params, trainable = _monotone_part(params, trainable, bounds)
    certify_on, certified_on = _certification_data(params, data, holdout)
    wants_monotone = _wants_monotone(params, constraint, monotone, certify_on)
    optimizer = _optimizer(optimizer, learning_rate, trainable)
    settings = _checkpoint_settings(tag, maximize, seed, batch_size, constraint, monotone)
    state = _initial_state(params, optimizer, checkpoint, settings)
    loop = _Loop(
        step_fn=_step_function(objective, getattr(constraint, "fn", None), optimizer, 1.0 if maximize else -1.0, batch_size),
        data=data, seed=seed, constraint=constraint, bounds=_default_bounds(bounds, params),
        names=tuple(_scalar_names(params)), dtype=jnp.result_type(*jax.tree.leaves(params)),
        save=functools.partial(_save, checkpoint, settings), checkpoint_every=checkpoint_every,
    )  # fmt: skip
    state = _run(loop, state, steps, _progress_bar(steps, state.step, description, progress), callback)
    certificate = _certify(state.params, certify_on, certified_on, wants_monotone, monotone, constraint)
    return SearchResult.of(state, certificate, certified_on)


def _progress_bar(steps: int, start: int, description: str, progress: bool):
    return tqdm(total=steps, initial=min(start, steps), desc=description, disable=not progress, leave=False)


def _check_settings(steps, checkpoint_every, batch_size, optimizer, learning_rate, params, data) -> None:
    """The search's integer settings, the learning rate (without an optimizer), the parameters and the batch size."""
    for name, value in (("steps", steps), ("checkpoint_every", checkpoint_every)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"search: {name} must be an int, got {type(value).__name__} {value!r}.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))):
        raise ValueError(f"search: batch_size must be an int or None, got {type(batch_size).__name__} {batch_size!r}.")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}.")
    if optimizer is None:
        try:
            rate = float(learning_rate)
        except (TypeError, ValueError):
            rate = float("nan")
        if not (np.isfinite(rate) and rate > 0):
            raise ValueError(f"search: learning_rate must be a finite number > 0, got {learning_rate!r}.")
    _check_params(params)
    if batch_size is not None:
        count = jax.tree.leaves(data)[0].shape[0] if jax.tree.leaves(data) else 0
        if not 1 <= batch_size <= count:
            raise ValueError(f"batch_size must be in [1, {count}] (the leading size of data), got {batch_size}.")


def _as_bounds(bounds, params) -> Bounds | None:
    """``bounds`` as a :class:`Bounds` (from ``(lower, upper)`` or anything with ``.lower``/``.upper``), checked
    to have the structure of ``params``."""
    if bounds is None:
        return None
    if not isinstance(bounds, Bounds):
        lower, upper = bounds if isinstance(bounds, tuple) else (bounds.lower, bounds.upper)
        bounds = Bounds(lower=lower, upper=upper)
    check_bounds(bounds, params)
    return bounds


def _default_bounds(bounds: Bounds | None, params) -> Bounds | None:
    """``bounds``, else the family's domain (the search never leaves it), else None."""
    if bounds is None and is_registered(params):
        domain = family_of(params, "search").domain
        if domain is not None:
            return domain(params)
    return bounds


def _wants_monotone(params, constraint: Constraint | None, monotone: bool, certify_on) -> bool:
    """Whether the search was asked for a monotone rule; a ValueError if there is nothing to certify it on."""
    # a budget of 0 on a family's search is read as a request for a monotone rule (issue 26)
    wants = monotone or (is_registered(params) and constraint is not None and constraint.budget == 0)
    if wants and certify_on is None:
        raise ValueError(
            "search: asked for a monotone rule (monotone=True or a constraint budget of 0) but there is nothing to "
            "certify it on: pass holdout=AuctionBatch (auctions drawn with another seed) and the parameters of a "
            "registered family (e.g. design.PowerMeanParams)."
        )
    return wants


def _optimizer(optimizer, learning_rate, trainable) -> optax.GradientTransformation:
    """The optax transformation: ``optimizer`` or adam, with the frozen leaves of ``trainable`` set to zero."""
    optimizer = optimizer if optimizer is not None else _default_optimizer(float(learning_rate))
    if trainable is not None:
        labels, labels_treedef = jax.tree.flatten(jax.tree.map(lambda flag: "train" if flag else "frozen", trainable))
        optimizer = _with_frozen(optimizer, labels_treedef, tuple(labels))
    return optimizer


def _checkpoint_settings(tag, maximize, seed, batch_size, constraint: Constraint | None, monotone: bool) -> dict:
    """What a checkpoint records and a resumed search must match."""
    settings = dict(
        tag=tag,
        maximize=maximize,
        seed=_validation.check_seed(seed),  # before any step: the seeds the PRNG tells apart
        batch_size=batch_size,
        budget=None if constraint is None else float(constraint.budget),
        penalty=None if constraint is None else float(constraint.penalty),
        multiplier_every=None if constraint is None else constraint.multiplier_every,
    )
    if monotone:
        settings["monotone"] = True
    return settings


def _initial_state(params, optimizer, checkpoint, settings: dict) -> checkpoint_lib.SearchState:
    """A fresh state at step 0, or the one ``checkpoint`` holds (checked against ``settings``)."""
    names = _scalar_names(params)
    state = checkpoint_lib.SearchState(
        params=params,
        opt_state=optimizer.init(params),
        step=0,
        multiplier=0.0,
        history={name: [] for name in ["step", "loss", "objective", "constraint", "multiplier", *names]},
    )
    if checkpoint is not None and Path(checkpoint).exists():
        state = checkpoint_lib.load(checkpoint, state.params, state.opt_state, settings)
    return state


def _save(checkpoint, settings: dict, state: checkpoint_lib.SearchState) -> None:
    if checkpoint is not None:
        checkpoint_lib.save(checkpoint, state, settings)


@dataclasses.dataclass(frozen=True)
class _Loop:
    """What every step of one search uses: the compiled step, its fixed arguments, the checkpoint writer."""

    step_fn: Callable
    data: Any
    seed: int
    constraint: Constraint | None
    bounds: Bounds | None
    names: tuple[str, ...]
    dtype: Any
    save: Callable[[checkpoint_lib.SearchState], None]
    checkpoint_every: int


def _run(loop: _Loop, state, steps: int, bar, callback) -> checkpoint_lib.SearchState:
    """Steps ``state`` until ``steps``; checkpoints every ``checkpoint_every`` steps, at the end and on any exception."""
    save = loop.save
    try:
        while state.step < steps:
            state, record = _advance(loop, state)
            bar.update(1)
            bar.set_postfix(objective=f"{record['objective']:.4g}", constraint=f"{record['constraint']:.3g}")
            if state.step % loop.checkpoint_every == 0:
                save(state)
            if callback is not None:
                callback(state.step, record)
        save(state)
    except BaseException:
        save(state)
        raise
    finally:
        bar.close()
    return state


def _advance(loop: _Loop, state: checkpoint_lib.SearchState) -> tuple[checkpoint_lib.SearchState, dict[str, float]]:
    """One optimiser step (checked finite), the dual step of the multiplier, and that step's history record."""
    index, constraint = state.step, loop.constraint
    budget = jnp.asarray(0.0 if constraint is None else constraint.budget, loop.dtype)
    penalty = jnp.asarray(1.0 if constraint is None else constraint.penalty, loop.dtype)
    multiplier = jnp.asarray(state.multiplier, loop.dtype)
    try:
        new_params, opt_state, loss, value, violation = loop.step_fn(
            state.params, state.opt_state, loop.data, multiplier, index, loop.seed, budget, penalty, loop.bounds
        )
    except (AttributeError, TypeError, IndexError) as error:
        if loop.data is None:
            raise ValueError(
                f"search: the objective failed with data=None ({type(error).__name__}: {error}); pass "
                "data, the objective's second argument (e.g. a jaxauction.design.AuctionBatch)."
            ) from error
        raise
    _check_step(index, loss, value, violation, new_params, constraint is not None)
    record = dict(
        step=float(index),
        loss=float(loss),
        objective=float(value),
        constraint=float(violation),
        multiplier=state.multiplier,
    )
    leaves = [leaf for leaf in jax.tree.leaves(state.params) if np.size(leaf) == 1]
    record.update({name: float(np.asarray(leaf).reshape(())) for name, leaf in zip(loop.names, leaves)})
    multiplier = state.multiplier
    if constraint is not None and (index + 1) % constraint.multiplier_every == 0:
        multiplier = max(0.0, multiplier + constraint.penalty * (record["constraint"] - constraint.budget))
    history = {name: [*values, record[name]] for name, values in state.history.items()}
    return checkpoint_lib.SearchState(new_params, opt_state, index + 1, multiplier, history), record


def _certify(params, certify_on, certified_on, wants_monotone: bool, monotone: bool, constraint):
    """The strict certificate of ``params`` on ``certify_on`` (None without); warns if a monotone request fails it."""
    certificate = None if certify_on is None else certify_rule(params, certify_on)
    if wants_monotone and not certificate.monotone:
        reason = "monotone=True" if monotone else f"constraint budget {constraint.budget:g}"
        fix = (
            "The monotone part is monotone by construction (docs/maths.md §3): report this with the parameters."
            if monotone
            else "Fix: search the family's monotone part with monotone=True (e.g. the power mean's rho = 1, "
            "temperature = 1), or the learned monotone family (design.MonotoneWeightParams)."
        )
        warnings.warn(
            f"search: asked for a monotone rule ({reason}) but the result {describe(params)} fails the strict "
            f"certificate on the {certified_on} auctions: share {certificate.share:.3f} of (auction, agent) pairs "
            f"pass, worst excess {certificate.worst:.2e} (tolerance {certificate.atol:.1e}). It is not monotone. {fix}",
            CertificateWarning,
            stacklevel=3,
        )
    return certificate


def _monotone_part(params, trainable, bounds):
    """The family's monotone part: its starting point and trainable mask (checked)."""
    family = family_of(params, "search")
    if family.monotone_part is None:
        raise ValueError(
            f"search: monotone=True searches a family's monotone part, but family {family.name!r} declares none "
            "(Family.monotone_part). Fix: drop monotone=True (and constrain the violation), or give the family a "
            "monotone_part."
        )
    return family.monotone_part(params, trainable, bounds)


def _certification_data(params, data, holdout) -> tuple[AuctionBatch | None, str | None]:
    """The auctions the result is certified on and their name: the holdout, else the fitted data."""
    if holdout is not None:
        if not isinstance(holdout, AuctionBatch):
            raise ValueError(
                f"search: holdout must be a jaxauction.design.AuctionBatch (held-out auctions), got "
                f"{type(holdout).__name__}."
            )
        family_of(params, "search")  # holdout certifies a family's member: a ValueError naming the fix otherwise
        return holdout, "held-out"
    if is_registered(params) and isinstance(data, AuctionBatch):
        return data, "fitted"
    return None, None
