"""`MOGA`, a torch.optim.Optimizer: momentum, then row- (or column-) normalized updates with
width-aware scales; sign updates for embeddings and vectors.

Read as torch.optim's optimizers are: the constructor (validation), `step`, `_init_group`, the
public properties, pickling and state dicts. A step is torch.optim's shape: `step` ->
`_init_group` (the pieces, cached by step_builder.py) -> `moga()`, the functional form
(functional.py) -> one backend per piece (backends.py: torch loop, cpu, triton kernels); the
reductions are in collectives.py. The interface engines use (`from_engine`, `declare*`,
`layout_of`, `init_state`, `invalidate`, ...) is the `EngineInterface` mixin MOGA inherits
(engine_interface.py). No engine is imported here.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .adopters import ON_CONSTRUCT
from .backends import BACKENDS
from .collectives import StatReducer
from .dtensor import declare_dtensors
from .engine_interface import EngineInterface, _refuse_complex, momentum_dtype
from .functional import StepProgram, moga
from .hparams import check_hparams
from .step_builder import ProgramCache
from .tensors import TensorRegistry


class NonFiniteGradientError(ValueError):
    """A gradient held NaN or Inf; the step was refused and no parameter was written."""


class MOGA(EngineInterface, torch.optim.Optimizer):
    r"""MOGA (Xu, Li, Lu 2026), distributed-exact.

    For every parameter with gradient g and fp32 momentum m (state ``momentum_buffer``)::

        m <- β m + (1 - β) g                     (β = momentum)
        u  = m, or β2 m_old + (1 - β2) g         (β2 = lookahead, off by default)
        hidden, norm="row": W <- W(1 - lr wd) - lr hidden_mult d_in^(-1/p)        rownorm_p(u)
        hidden, norm="col": W <- W(1 - lr wd) - lr hidden_mult d_out^(1/q) / d_in colnorm_q(u)
        head:               W <- W(1 - lr wd) - lr head_mult rownorm_p(u)
        embedding:          W <- W(1 - lr wd) - lr embedding_mult sign(u)
        vector:             w <- w            - lr vector_mult sign(u)           (no decay)

    rownorm_p(u)[r] = sign(u_r)|u_r|^(p-1) / max(‖u_r‖_p^(p-1), eps), colnorm_q likewise with q*.
    d_out, d_in are the *global* matrix dims; on shards they come from ``layouts``.

    Args:
        params: parameters or param groups; a group's ``role`` is one of hidden, embedding, head,
            vector (default: hidden for 2-D and higher global shapes, normalized as
            [d_out, prod(rest)], i.e. flatten(1); vector otherwise). Any hyper-parameter below
            may be overridden per group. ``param_names`` (list of str) improves error messages.
        lr (float or 0-dim Tensor): learning rate η; a Tensor is read every step (a CUDA one
            costs a host read per step, so such a step is not CUDA-graph capturable).
            momentum (float, 0.95): β. weight_decay (float, 0.1): decoupled, applied with the
            unscaled lr to hidden, embedding and head weights; lr * weight_decay must stay < 1
            (checked every step: a refused step's undo divides by 1 - lr * weight_decay).
        norm ("row" | "col"): normalize rows (over d_in) or columns (over d_out) of hidden weights.
        p (float, 2.0), q (float, 2.0): row ℓp geometry / column ℓq geometry.
        hidden_mult (20.0), embedding_mult, head_mult, vector_mult (1.0): per-role multipliers.
        head_width_scale (bool, False), base_width: the paper's head scale (base_width/d_in)^(1/p).
        eps (1e-8): floor on the norm, so a zero row gives a zero update.
        lookahead (float | None): Algorithm 1's β2.
        layouts (Mapping[Tensor, ShardLayout]): how sharded parameters sit in their global
            matrix; unlisted parameters are whole tensors.
        process_groups (Mapping[str, ProcessGroup]): the groups the layouts' keys name.
        backend ("auto" | "torch" | "cpu" | "triton"): who computes the step (core/backends.py):
            auto picks the Triton kernels for CUDA tensors and the fused C++ kernels for CPU ones;
            torch is the plain loop. A piece a backend does not accept goes to the torch loop
            (the same update). ``fused=False`` is the old spelling of backend="torch", kept for
            callers that pass torch.optim's ``fused`` argument (litgpt); there is no ``fused``
            attribute: read or set ``backend``.
        sync_free (bool, False): never ask the host during a step (for CUDA graphs and
            torch.compile): a non-finite step is then skipped on every rank and counted in
            ``skipped_steps`` (a device tensor), as GradScaler does, instead of raising.

    Every rank must step the same parameters (gradients present on all or none), as DDP, ZeRO
    and Megatron guarantee.

    A non-finite gradient raises NonFiniteGradientError after undoing the step (parameters and
    momentum restored to rounding); the verdict rides in the statistics all-reduce, so every rank
    sharing statistics with the offending one refuses the same step.
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, momentum: float = 0.95,
                 weight_decay: float = 0.1, norm: str = "row", p: float = 2.0, q: float = 2.0,
                 hidden_mult: float = 20.0, embedding_mult: float = 1.0, head_mult: float = 1.0,
                 vector_mult: float = 1.0, head_width_scale: bool = False,
                 base_width: float | None = None, eps: float = 1e-8, lookahead: float | None = None,
                 *, layouts: Mapping | None = None, process_groups: Mapping | None = None,
                 backend: str = "auto", sync_free: bool = False, fused: bool | None = None):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, norm=norm, p=p, q=q,
                        hidden_mult=hidden_mult, embedding_mult=embedding_mult, head_mult=head_mult,
                        vector_mult=vector_mult, head_width_scale=head_width_scale,
                        base_width=base_width, eps=eps, lookahead=lookahead, role=None)
        check_hparams(defaults, "MOGA")
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            check_hparams(group, f"MOGA param group {i}")
        self.reducer = StatReducer(process_groups)
        self.backend = "torch" if fused is False else backend
        self.sync_free = bool(sync_free)
        self.skipped_steps: torch.Tensor | None = None
        self._suspended = False
        # Record layouts in state_dict() so a per-rank checkpoint is not loaded into another layout.
        # Engines whose checkpoints reshard state per parameter (Megatron dist_checkpointing) turn it off.
        self.save_layouts = True
        self._programs = ProgramCache()
        for param, layout in (layouts or {}).items():
            self.declare(param, layout=layout)
        # DTensor parameters (FSDP2, TP) describe their own sharding: no layouts to pass.
        declare_dtensors(self, [p for g in self.param_groups for p in g["params"]])
        for hook in ON_CONSTRUCT:      # e.g. moga_dist/__init__.py: patch DeepSpeed on first use
            hook()

    def add_param_group(self, param_group):
        """torch.optim's add_param_group, remembering which tensors MOGA was given; complex
        tensors are refused (a row norm of complex numbers is another algorithm)."""
        super().add_param_group(param_group)
        # Checked after torch unpacked the group, so named parameters ("w", t) are seen too.
        try:
            _refuse_complex(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise
        if not hasattr(self, "tensors"):        # Optimizer.__init__ adds the first groups
            self.tensors = TensorRegistry()
        self.tensors.known.update(id(p) for p in self.param_groups[-1]["params"])
        self.tensors.index_names(self.param_groups)
        self.tensors.changed()
        if hasattr(self, "reducer"):            # a group added after construction
            declare_dtensors(self, self.param_groups[-1]["params"])

    # ----- properties and step ---------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Who computes the step: "auto", "torch", "cpu" or "triton" (core/backends.py)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend={value!r}: allowed {BACKENDS}")
        self._backend = value
        if hasattr(self, "_programs"):          # not during __init__
            self.invalidate()

    @property
    def last_program(self) -> StepProgram | None:
        """The StepProgram of the last step (None before the first): the pieces, which backend
        computed each (`backend_of`) and their statistics (`stats`), for inspection."""
        return self._programs.program

    @torch.no_grad()
    def step(self, closure=None):
        """One MOGA step over all groups: momentum and partial statistics, one reduction across
        ranks, the update. torch.optim's shape: _init_group, then the functional moga()."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._suspended:
            return loss
        try:
            pieces, program, reduce = self._init_group()
            if not pieces and reduce is None:
                return loss
            verdict = moga(pieces, reduce=reduce, backend=self.backend, sync_free=self.sync_free, program=program)
            if self.sync_free:
                if self.skipped_steps is None:
                    self.skipped_steps = torch.zeros((), device=program.device)
                self.skipped_steps.add_(verdict.refused.reshape(()))
            elif verdict.refused:
                self._refuse_non_finite(program, verdict.elsewhere)       # raises: the step is not counted
            self._programs.count_step()
        finally:
            self._programs.release()        # the step's gradient references
        return loss

    def _init_group(self):
        """(pieces, program, reduce) of this step: a Piece (piece.py: param, grad, momentum,
        reduction plan, lr, decay) per parameter or flat-buffer segment with a gradient, the
        StepProgram that computes them, and reduce(flag), which sums the statistics the plans share
        and the verdict flag across ranks (None without process groups). Built from the param
        groups and declarations once, then kept (step_builder.py): a step only binds the gradients
        and re-reads lr and weight decay."""
        return self._programs.get(self)

    def _refuse_non_finite(self, program: StepProgram, elsewhere: bool = False) -> None:
        bad = [pc.name for pc, st in zip(program.pieces, program.stats) if not bool(torch.isfinite(st).all())]
        where = "another rank's shard (this rank's gradients were finite)" if elsewhere else ", ".join(bad)
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or Inf) in {where}; step refused on every rank that shares statistics "
            "with it: parameters and momentum "
            "were restored to their pre-step values (to float rounding; momentum entries whose gradient "
            "was non-finite reset to 0). Lower the learning rate, enable gradient clipping, or skip this batch.")

    # ----- copies and pickles ----------------------------------------------------------------
    def __getstate__(self):
        """torch.optim's state plus MOGA's settings and declarations, keyed by parameter position
        (ids change in a copy). Process-group handles are not carried: set_process_group again."""
        state = super().__getstate__()
        position = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        t = self.tensors
        state["moga"] = dict(
            backend=self._backend, sync_free=self.sync_free, save_layouts=self.save_layouts,
            reduce_order=dict(self.reducer.reduce_order), ghosts=list(t.ghosts),
            **{name: {position[k]: v for k, v in table.items() if k in position}
               for name, table in (("layouts", t.layouts), ("options", t.options), ("order", t.order),
                                   ("flat", t.flat))},
            slots=[list(s) for s in t.slots])
        return state

    def __setstate__(self, state):
        extra = state.pop("moga", None)
        super().__setstate__(state)
        if extra is None:           # an object pickled by torch.optim's own machinery
            return
        params = [p for g in self.param_groups for p in g["params"]]
        self.tensors = TensorRegistry(known={id(p) for p in params}, ghosts=extra["ghosts"])
        self.tensors.index_names(self.param_groups)
        for name in ("layouts", "options", "order", "flat"):
            getattr(self.tensors, name).update({id(params[i]): v for i, v in extra[name].items()})
        self.tensors.slots = extra.get("slots", [])     # re-declared per slot at the next build (ids changed)
        self.reducer = StatReducer(None)
        self.reducer.reduce_order = dict(extra["reduce_order"] if "reduce_order" in extra else extra["stage"])
        self._backend, self.sync_free, self.save_layouts = extra["backend"], extra["sync_free"], extra["save_layouts"]
        self.skipped_steps, self._suspended = None, False
        self._programs = ProgramCache()

    # ----- checkpoints -----------------------------------------------------------------------
    def state_dict(self):
        """torch.optim state dict plus each parameter's layout, to refuse a foreign layout."""
        sd = super().state_dict()
        if self.save_layouts:
            sd["layouts"] = [self.layout_of(p).to_dict() for g in self.param_groups for p in g["params"]]
        return sd

    def load_state_dict(self, state_dict):
        """Load (the given momentum tensors become the state, as in torch.optim), keeping momentum in
        fp32 and refusing a checkpoint written for another layout."""
        state_dict = dict(state_dict)
        saved_layouts = state_dict.pop("layouts", None)
        params = [p for g in self.param_groups for p in g["params"]]
        if saved_layouts is not None:
            if len(saved_layouts) != len(params):
                raise ValueError(f"checkpoint has {len(saved_layouts)} parameters, this optimizer {len(params)}")
            for i, (saved, p) in enumerate(zip(saved_layouts, params)):
                mine = self.layout_of(p).to_dict()
                if _plain(saved) != _plain(mine):
                    raise ValueError(f"checkpoint parameter {i} ({self.tensors.name_of(p)}) was saved with layout "
                                     f"{saved}, but this run has {mine}; reshard the checkpoint first")
        # As torch.optim does, the given fp32 tensors become the state (no copy: DCP and the engines
        # load in place, and a copy would cost 4 B x parameters / DP at every resume).
        momenta = {k: v["momentum_buffer"] for k, v in state_dict["state"].items() if "momentum_buffer" in v}
        self._programs.forget_tensors()     # the old momenta go now, not at the next step's rebuild
        super().load_state_dict(state_dict)
        self.invalidate()
        # torch casts state to the parameter dtype on load; MOGA keeps momentum in fp32.
        index = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(index, params):
            if i in momenta:
                self.state[p]["momentum_buffer"] = momenta[i].to(device=p.device, dtype=momentum_dtype(p))


def _plain(obj):
    """Tuples and lists compare alike (a layout dict after a round trip through a checkpoint)."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
