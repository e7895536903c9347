"""The fast path: how an engine's hypergradient is executed, chosen per problem and device.

An engine computes its hypergradient eagerly, calling its execution policy's ``solve_lower`` for
its first-order inner loop and wrapping its inner solve and Hessian-vector products in
``reduced_precision(problem)`` (``bilevel.engines.base.Execution``). :class:`FastPath` is such a
policy; wrapped around an engine (``bilevel.fastpath.accelerated``), it runs that one
implementation in the fastest way the problem allows:

==============  ====================================================  =========================
mode            CUDA                                                  CPU
==============  ====================================================  =========================
``off``         eager                                                 eager
``auto``        whole hypergradient in one CUDA graph; else the       eager
                inner loop in a graph; else the inner loop compiled
``cuda_graph``  whole hypergradient in one CUDA graph; else the       eager (says why)
                inner loop in a graph; else eager
``compile``     inner loop compiled, the whole hypergradient          inner loop compiled, kept
                captured around it when possible                      only if measured faster
==============  ====================================================  =========================

A CUDA graph is captured the second time the same signature (shapes, dtypes, structure of the
state, data) is seen, replayed from then on, and captured anew when the signature changes. It
is not used, and the reason is logged once, when the lower level draws minibatches on the host
(each replay would reuse the captured batches), when the engine's call depends on host-side
state (``graph_safe = False``), when the computation synchronizes with the host, when capture
fails, or when a replay does not reproduce the eager result. Reduced precision (TF32, bf16) is
checked every ``precision.check_every`` calls against an eager full-precision computation on the
same inputs and batches; the cosine and relative error go into ``Stats.extra``.

Not split: it is one policy object whose decisions (signatures seen, graphs captured, the
compiled loop's calibration, the fallbacks said once) are shared by the whole-call and the
inner-loop paths; the mechanisms themselves live in graph.py, compiled.py and precision.py."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from bilevel.distributed.reduce import current_world
from bilevel.engines.inner import solve_lower
from bilevel.engines.results import Hypergrad, Stats
from bilevel.engines.state import EngineState
from bilevel.fastpath.compiled import CompiledInnerLoop
from bilevel.fastpath.graph import CapturedCall, CaptureMismatch, CudaGraphBackend, GraphBackend, signature
from bilevel.fastpath.precision import agreement, precision_scope
from bilevel.optim import InnerOptimizer
from bilevel.problem import Params, Problem
from bilevel.spec.fastpath import PrecisionSpec

__all__ = ["FastPath", "set_graph_backend"]

log = logging.getLogger("bilevel.fastpath")

Compute = Callable[[Problem, Params, EngineState, Any], Hypergrad]
_MAX_GRAPHS = 4  # captured signatures kept per engine (a new one evicts the oldest)
_CALIBRATION_MARGIN = 0.97  # the compiled inner loop must take < 97% of the eager time to be kept

_backend_override: Callable[[torch.device], GraphBackend] | None = None
_capture_at_sighting = 2  # capture a signature the second time it is seen (one-offs stay eager)


def set_graph_backend(factory: Callable[[torch.device], GraphBackend] | None, capture_at_sighting: int = 2) -> None:
    """Use ``factory(device)`` for every capture, on any device (None: CUDA graphs on CUDA only),
    capturing a signature at its ``capture_at_sighting``-th call. The tests install
    :class:`~bilevel.fastpath.graph.ReplayBackend` (with 1: every call replays) to run the
    capture logic, and the conformance suite through it, on CPU."""
    global _backend_override, _capture_at_sighting
    _backend_override = factory
    _capture_at_sighting = capture_at_sighting


def _graph_backend(device: torch.device) -> GraphBackend | None:
    if _backend_override is not None:
        return _backend_override(device)
    if device.type == "cuda":
        return CudaGraphBackend(device)
    return None


def _data_signature(problem: Problem) -> tuple[Any, ...]:
    parts = []
    for name, level in problem.levels.items():
        if level.data is not None:
            parts.append((name, level.data.batch_size,
                          tuple((k, v.data_ptr(), tuple(v.shape), v.dtype) for k, v in level.data.full.items())))
    return tuple(parts)


def _minibatched(problem: Problem) -> bool:
    """Whether the lower level's batches change between calls (minibatches, or new tasks)."""
    data = problem.lower.data
    return data is not None and (data.batch_size is not None or getattr(data, "resampled", False))


class _Calibration:
    """Eager vs compiled inner loop, timed once each after compilation."""

    def __init__(self) -> None:
        self.eager_s: float | None = None
        self.compiled_s: float | None = None
        self.compiled_calls = 0


class FastPath:
    """Execution policy of one engine (see the module docstring). Holds caches (captured graphs,
    compiled functions, timings), never algorithm state: a run resumed from a checkpoint with a
    fresh engine computes the same hypergradients."""

    def __init__(self, mode: str = "auto", precision: PrecisionSpec | None = None, graph_safe: bool = True):
        self.mode = mode
        self.precision = precision or PrecisionSpec()
        self.graph_safe = graph_safe
        self.reasons: list[str] = []
        self.compile_seconds: float | None = None
        self._graphs: OrderedDict[Any, tuple[CapturedCall, int]] = OrderedDict()  # -> (graph, state.step at capture)
        self._inner_graphs: OrderedDict[Any, CapturedCall] = OrderedDict()
        self._seen: dict[Any, int] = {}  # signature -> times seen before its capture
        self._graph_ok: dict[int, bool] = {}  # id(problem) -> whole-hypergradient capture allowed
        self._inner_graph_ok: dict[int, bool] = {}
        self._compiled: dict[Any, CompiledInnerLoop] = {}
        self._calibration: dict[Any, _Calibration] = {}
        self._compile_ok = mode in ("compile", "auto")
        self._in_graph = False
        self._reference = False
        self.used = {"hypergradient": "eager", "inner_loop": "eager"}

    def release(self) -> None:
        """Drop the captured graphs (and their memory pools) and compiled loops; later calls
        capture or compile again."""
        self._graphs.clear()
        self._inner_graphs.clear()
        self._seen.clear()
        self._compiled.clear()

    # --- reporting ----------------------------------------------------------------------------
    def _note(self, reason: str, warn: bool = False) -> None:
        if reason in self.reasons:
            return
        self.reasons.append(reason)
        (log.warning if warn else log.info)("fast path (%s): %s", self.mode, reason)

    def report(self) -> dict[str, Any]:
        """What ran and why, for result.json."""
        out: dict[str, Any] = {"requested": self.mode, **self.used, "precision": self.precision.mode, "reasons": list(self.reasons)}
        if self.compile_seconds is not None:
            out["compile_seconds"] = self.compile_seconds
        timings = {
            str(i): {"eager_s": c.eager_s, "compiled_s": c.compiled_s}
            for i, c in enumerate(self._calibration.values())
            if c.eager_s is not None and c.compiled_s is not None
        }
        if timings:
            out["inner_loop_calibration"] = timings
        return out

    # --- precision ----------------------------------------------------------------------------
    def reduced_precision(self, problem: Problem) -> contextlib.AbstractContextManager[None]:
        """The context engines put around their inner solve and Hessian-vector products."""
        mode = self.precision.mode
        if mode == "full" or self._reference:
            return contextlib.nullcontext()
        if problem.dtype != torch.float32:
            self._note(f"precision {mode} ignored: the run's dtype is {str(problem.dtype).removeprefix('torch.')}, not float32",
                       warn=True)
        elif mode == "tf32" and problem.device.type != "cuda":
            self._note("precision tf32 applies to CUDA matrix products only; on CPU the call runs in float32", warn=True)
        return precision_scope(mode, problem.device, problem.dtype)

    def _reduces(self, problem: Problem) -> bool:
        """Whether the precision mode changes anything for this problem (else nothing to check)."""
        mode = self.precision.mode
        if mode == "full" or problem.dtype != torch.float32:
            return False
        return mode == "bf16" or problem.device.type == "cuda"

    # --- the hypergradient --------------------------------------------------------------------
    def hypergrad(self, compute: Compute, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad:
        """``compute(problem, x, state, batch)``, run as the mode and the problem allow."""
        start = time.perf_counter()
        every = self.precision.check_every
        check = self._reduces(problem) and every is not None and state.step % every == 0
        before = _stream_states(problem) if check else None
        result = None
        if self._whole_graph_allowed(problem):
            result = self._graphed(compute, problem, x, state, batch)
        if result is None:
            result = compute(problem, x, state, batch)
        if check:
            after = _stream_states(problem)
            _restore_streams(problem, before)
            with self.reference():
                reference = compute(problem, x, state, batch)
            _restore_streams(problem, after)
            cosine, rel = agreement(result.grad, reference.grad)
            result.stats.extra["precision_cosine"] = cosine
            result.stats.extra["precision_rel_err"] = rel
        result.stats.time_s = time.perf_counter() - start
        return result

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside: eager, full precision (the plain implementation the fast path is checked against)."""
        previous = self._reference
        self._reference = True
        try:
            yield
        finally:
            self._reference = previous

    def _eager_only(self, problem: Problem) -> str | None:
        """Why nothing of this problem may be captured or compiled (None: no such reason)."""
        if current_world().active:
            return "data-parallel run: every gradient and product is summed over ranks, which stays eager"
        if problem.depth > 2:
            return f"{problem.depth} levels: the nested solves and their implicit derivatives stay eager"
        if problem.lower.solution is not None:
            return "the lower level has a closed-form solution: its solve is exact and eager"
        solver = problem.lower.solver
        if solver is not None and solver.tol is not None and solver.check_every > 0:
            return (f"the inner solve reads its residual stop on the host every {solver.check_every} steps (set"
                    " solver.check_every: 0 for a static shape, which can be captured)")
        return None

    def _whole_graph_allowed(self, problem: Problem) -> bool:
        key = id(problem)
        if key in self._graph_ok:
            return self._graph_ok[key]
        allowed = False
        eager_only = self._eager_only(problem)
        if self.mode == "off":
            pass
        elif eager_only is not None:
            self._note(f"{eager_only}: eager", warn=self.mode in ("cuda_graph", "compile"))
        elif problem.device.type != "cuda" and _backend_override is None:
            if self.mode == "cuda_graph":
                self._note(f"cuda_graph needs a CUDA device; the problem is on {problem.device.type}: eager", warn=True)
            elif self.mode == "auto":
                self._note("CPU: eager (CUDA graphs need a GPU; torch.compile of the inner loop pays off only for long"
                           " runs of small problems: choose fast_path: compile, which keeps it only where it is faster)")
        elif not self.graph_safe:
            self._note("the engine's call depends on host-side state (schedules, periodic updates): no whole-hypergradient graph",
                       warn=self.mode == "cuda_graph")
        elif _minibatched(problem):
            self._note("the lower level draws minibatches on the host (data.batch_size is set): each graph replay would"
                       " reuse the captured batches, so nothing is captured", warn=self.mode == "cuda_graph")
        else:
            allowed = True
        self._graph_ok[key] = allowed
        return allowed

    def _graphed(self, compute: Compute, problem: Problem, x: Params, state: EngineState, batch: Any) -> Hypergrad | None:
        args = (tuple(x), state.tensors(), batch)
        key = (id(problem), type(state), signature(args), _data_signature(problem), torch.is_grad_enabled())
        if key not in self._graphs:
            if not self._sighted(key):  # first sighting: eager (a one-off signature is never captured)
                return None
            captured = self._capture(compute, problem, args, state)
            if captured is None:
                return None
            self._graphs[key] = (captured, state.step)
            while len(self._graphs) > _MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        entry, captured_step = self._graphs[key]
        with self._inside_graph():
            out = entry(*args)
        # the graph baked the step counter of its capture; engines only count calls with it
        return _hypergrad_from(out, state, state.step + out["step"] - captured_step)

    def _capture(self, compute: Compute, problem: Problem, args: tuple[Any, ...], state: EngineState) -> CapturedCall | None:
        backend = _graph_backend(problem.device)
        assert backend is not None
        step = state.step

        def whole(x: Params, tensors: dict[str, Any], batch: Any) -> dict[str, Any]:
            return _hypergrad_tree(compute(problem, x, state.rebuilt(tensors, step), batch))

        try:
            with self._inside_graph():
                entry = CapturedCall(whole, args, backend, tolerance=self._tolerance())
        except Exception as exc:  # capture is an optimization: any failure means eager, said once
            self._graph_ok[id(problem)] = False
            self._note(f"whole-hypergradient capture failed ({_describe(exc)}): eager", warn=self.mode == "cuda_graph")
            return None
        self.used["hypergradient"] = "cuda_graph"
        self.used["inner_loop"] = "compiled (inside the graph)" if self._compile_ok and self.mode == "compile" else "inside the graph"
        return entry

    def _sighted(self, key: Any) -> bool:
        """Count a sighting of ``key``; True once it is due for capture."""
        self._seen[key] = self._seen.get(key, 0) + 1
        return self._seen[key] >= _capture_at_sighting

    def _tolerance(self) -> float:
        return 1e-2 if self.precision.mode == "bf16" else 1e-4

    @contextlib.contextmanager
    def _inside_graph(self) -> Iterator[None]:
        previous = self._in_graph
        self._in_graph = True
        try:
            yield
        finally:
            self._in_graph = previous

    # --- the inner loop -----------------------------------------------------------------------
    def solve_lower(
        self,
        problem: Problem,
        optimizer: InnerOptimizer,
        x: Params,
        y: Params,
        state: Params,
        steps: int = 0,
        batches: Sequence[Any] | None = None,
    ) -> tuple[Params, Params]:
        """``bilevel.engines.inner.solve_lower``, possibly captured or compiled."""
        if self._reference or self.mode == "off" or self._eager_only(problem) is not None:
            return solve_lower(problem, optimizer, x, y, state, steps, batches)
        if self.mode == "compile" or (self._in_graph is False and self._needs_compiled_fallback(problem)):
            out = self._compiled_solve(problem, optimizer, x, y, state, steps, batches)
            if out is not None:
                return out
        if not self._in_graph and batches is None and self._inner_graph_allowed(problem):
            out = self._inner_graphed(problem, optimizer, x, y, state, steps)
            if out is not None:
                return out
        return solve_lower(problem, optimizer, x, y, state, steps, batches)

    def _needs_compiled_fallback(self, problem: Problem) -> bool:
        """auto on CUDA compiles the inner loop where no graph can hold it (host-drawn minibatches)."""
        return self.mode == "auto" and problem.device.type == "cuda" and _minibatched(problem)

    def _inner_graph_allowed(self, problem: Problem) -> bool:
        key = id(problem)
        if key not in self._inner_graph_ok:
            self._inner_graph_ok[key] = (
                self.mode in ("auto", "cuda_graph")
                and (problem.device.type == "cuda" or _backend_override is not None)
                and not _minibatched(problem)
            )
        return self._inner_graph_ok[key] and not self._graph_ok.get(key, False)

    def _inner_graphed(
        self, problem: Problem, optimizer: InnerOptimizer, x: Params, y: Params, state: Params, steps: int
    ) -> tuple[Params, Params] | None:
        args = (tuple(p.detach() for p in x), tuple(y), tuple(state))
        key = (id(problem), optimizer.spec.model_dump_json(), steps, signature(args), _data_signature(problem))
        entry = self._inner_graphs.get(key)
        if entry is None:
            if not self._sighted(key):
                return None
            backend = _graph_backend(problem.device)
            assert backend is not None

            def loop(xx: Params, yy: Params, ss: Params) -> tuple[Params, Params]:
                return solve_lower(problem, optimizer, xx, yy, ss, steps)

            try:
                entry = CapturedCall(loop, args, backend, tolerance=self._tolerance())
            except Exception as exc:
                self._inner_graph_ok[id(problem)] = False
                self._note(f"inner-loop capture failed ({_describe(exc)}): eager", warn=self.mode == "cuda_graph")
                return None
            self._inner_graphs[key] = entry
            while len(self._inner_graphs) > _MAX_GRAPHS:
                self._inner_graphs.popitem(last=False)
            self.used["inner_loop"] = "cuda_graph"
        return entry(*args)

    def _compiled_solve(
        self,
        problem: Problem,
        optimizer: InnerOptimizer,
        x: Params,
        y: Params,
        state: Params,
        steps: int,
        batches: Sequence[Any] | None,
    ) -> tuple[Params, Params] | None:
        n_steps = steps if batches is None else len(batches)
        if not self._compile_ok or n_steps == 0:
            return None
        key = (id(problem), optimizer.spec.model_dump_json())
        calibration = self._calibration.setdefault(key, _Calibration())
        # inside a captured graph nothing can be timed: the compiled loop is used as is, and is
        # compiled at its first sighting, outside the capture
        calibrate = not self._in_graph and not self._graph_ok.get(id(problem), False)
        if calibrate and calibration.eager_s is None:  # first call: the eager time per step
            started = _clock(problem)
            out = solve_lower(problem, optimizer, x, y, state, steps, batches)
            calibration.eager_s = (_clock(problem) - started) / n_steps
            return out
        loop = self._compiled.get(key)
        if loop is None:
            loop = self._compiled[key] = CompiledInnerLoop(problem, optimizer)
        started = _clock(problem)
        try:
            out = loop(problem, optimizer, x, y, state, steps, batches)
        except Exception as exc:  # a compiler failure means eager, said once
            self._compile_ok = False
            self._note(f"torch.compile of the inner loop failed ({_describe(exc)}): eager", warn=self.mode == "compile")
            return None
        per_step = (_clock(problem) - started) / n_steps
        if loop.compile_seconds and self.compile_seconds is None:
            self.compile_seconds = loop.compile_seconds
        calibration.compiled_calls += 1
        # the first compiled call includes compilation; the second is timed against eager
        if calibrate and calibration.compiled_calls == 2 and calibration.compiled_s is None:
            calibration.compiled_s = per_step
            eager_s = calibration.eager_s or 0.0
            if per_step >= _CALIBRATION_MARGIN * eager_s:
                self._compile_ok = False
                self._note(f"the compiled inner loop took {1e3 * per_step:.3f} ms per step against {1e3 * eager_s:.3f} ms"
                           " eager: no gain on this problem, back to eager")
                self.used["inner_loop"] = "eager"
                return out
            self._note(f"the compiled inner loop takes {1e3 * per_step:.3f} ms per step against {1e3 * eager_s:.3f} ms"
                       f" eager (compilation took {self.compile_seconds or 0.0:.1f} s)")
        self.used["inner_loop"] = "compiled"
        return out


def _clock(problem: Problem) -> float:
    if problem.device.type == "cuda":
        torch.cuda.synchronize(problem.device)
    return time.perf_counter()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    kind = "replay mismatch" if isinstance(exc, CaptureMismatch) else type(exc).__name__
    return f"{kind}: {text[:300]}" if text else kind


def _hypergrad_tree(result: Hypergrad) -> dict[str, Any]:
    stats = result.stats
    return {
        "grad": tuple(result.grad),
        "upper_loss": result.upper_loss,
        "state": result.state.tensors(),
        "step": result.state.step,
        "estimate": result.estimate,
        "inner_residual": stats.inner_residual,
        "linear_residual": stats.linear_residual,
        "hvp_count": stats.hvp_count,
        "inner_steps": stats.inner_steps,
        "stats_extra": dict(stats.extra),
        "stop": result.stop,
    }


def _hypergrad_from(tree: dict[str, Any], like: EngineState, step: int) -> Hypergrad:
    state = like.rebuilt(tree["state"], step)
    stats = Stats(tree["inner_residual"], tree["linear_residual"], tree["hvp_count"], tree["inner_steps"], 0.0,
                  dict(tree["stats_extra"]))
    return Hypergrad(tuple(tree["grad"]), tree["upper_loss"], state, stats, tree["stop"], estimate=tree["estimate"])


def _stream_states(problem: Problem) -> dict[str, Any]:
    """The sampling state of every minibatch stream (full-batch streams have none)."""
    return {name: level.data.state_dict() for name, level in problem.levels.items()
            if level.data is not None and level.data.batch_size is not None}


def _restore_streams(problem: Problem, states: dict[str, Any] | None) -> None:
    for name, saved in (states or {}).items():
        problem.levels[name].data.load_state_dict(saved)
