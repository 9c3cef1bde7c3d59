"""`MOGA`, a torch.optim.Optimizer: momentum, then row- (or column-) normalized updates with
width-aware scales; sign updates for embeddings and vectors.

Owns validation, state, the interface engines use, and checkpoints. A step is torch.optim's
shape: `step` -> `_init_group` (the pieces, cached by step_builder.py) -> `moga()`, the functional
form (functional.py) -> one backend per piece (backends.py: torch loop, cpu, triton kernels); the
reductions are in collectives.py. No engine is imported here.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence

import torch

from .adopters import ADOPTERS, ON_CONSTRUCT
from .backends import BACKENDS
from .collectives import StatReducer
from .dtensor import declare_dtensors, declare_swapped_dtensors, local_view
from .flat import FlatSegment
from .functional import StepProgram, moga
from .hparams import check_hparams
from .layout import ShardLayout
from .param_spec import ParamSpec, Slot, check_slots, declare_slots
from .plan import build_plan
from .roles import resolve_missing_roles
from .step_builder import ProgramCache
from .tensors import FlatBuffer, Ghost, TensorRegistry, role_of


class NonFiniteGradientError(ValueError):
    """A gradient held NaN or Inf; the step was refused and no parameter was written."""


class MOGA(torch.optim.Optimizer):
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

    # ----- the interface engines use ---------------------------------------------------------
    @classmethod
    def from_engine(cls, groups: list[dict], specs: Sequence[Sequence[Slot]], *,
                    process_groups: Mapping | None = None, ghosts: Iterable[ParamSpec] = (), **settings) -> MOGA:
        """MOGA over an engine's own tensors (Megatron's fp32 shards, which may be non-leaf views of
        its buffers), described slot by slot: the one constructor for engine adapters.

        groups: param groups whose "params" are the engine's tensors, plus per-group settings
            (missing ones take `settings`, then MOGA's defaults).
        specs: specs[i][j] describes groups[i]["params"][j]: a ParamSpec (that tensor is the
            parameter, or its shard per spec.layout) or a FlatBuffer (it holds segments of many);
            see `declare_engine`.
        process_groups: {key: ProcessGroup} the layouts name (e.g. "tp", "dp").
        ghosts: ParamSpecs of parameters this rank holds nothing of but shares statistics of
            (layout.local_numel == 0), see `declare_ghosts`.
        settings: MOGA's keyword arguments (lr, momentum, norm, backend, ...)."""
        # torch.optim refuses an empty parameter list and leaf-checks tensors: start from one empty
        # group, then adopt the engine's groups as they are.
        moga = cls([{"params": []}], **settings, process_groups=process_groups)
        moga.replace_param_groups(groups)
        moga.declare_engine(specs, ghosts=ghosts)
        return moga

    def declare_engine(self, specs: Sequence[Sequence[Slot]], *, process_groups: Mapping | None = None,
                       ghosts: Iterable[ParamSpec] | None = None) -> None:
        """Describe the param groups slot by slot for an engine that owns the tensors in them:
        specs[i][j] (a ParamSpec, or a FlatBuffer of segments) is what param_groups[i]["params"][j]
        holds. The tensors there now are declared at once; a tensor the engine puts into a slot later
        (Megatron's Float16 wrapper swaps in fp32 main copies; ZeRO-3 fills its groups only while it
        steps) is declared with the slot's description before the next step-program build. A group
        holding more tensors than described is refused at that build. process_groups: named as by
        `set_process_group`; ghosts: ParamSpecs for `declare_ghosts` (None: keep the current ones)."""
        slots = check_slots(specs, self.param_groups)
        for key, group in (process_groups or {}).items():
            self.set_process_group(key, group)
        self.tensors.slots, self.tensors.slot_ids = slots, {}
        if ghosts is not None:
            self.declare_ghosts([g.ghost() if isinstance(g, ParamSpec) else g for g in ghosts])
        declare_slots(self)
        self.invalidate()

    def declare(self, tensor: torch.Tensor, *, layout: ShardLayout | None = None,
                options: Mapping | None = None, order_key=None) -> None:
        """Tell MOGA about one tensor of its param groups.

        layout: where the local tensor sits in its global matrix (numel must match);
        options: settings over its group's, e.g. {"role": "embedding"} where an engine's groups mix
        roles; order_key: a key equal on every rank for the same parameter, so the reduction order
        does not depend on which tensors a rank holds."""
        self._check_member(tensor)
        name = self.tensors.name_of(tensor)
        if layout is not None:
            if not isinstance(layout, ShardLayout):
                raise ValueError(f"layout must be a ShardLayout, got {type(layout).__name__}")
            if local_view(tensor).numel() != layout.local_numel:
                raise ValueError(f"{name}: local numel {tensor.numel()} does not match its layout "
                                 f"({layout.local_numel} elements of global {layout.global_shape})")
            self._check_groups(layout)
            self.tensors.layouts[id(tensor)] = layout
        if options is not None:
            check_hparams({**self.defaults, **options}, f"options of {name}")
            self.tensors.options[id(tensor)] = dict(options)
        if order_key is not None:
            self.tensors.order[id(tensor)] = order_key
        self.tensors.known.add(id(tensor))
        self.invalidate()

    def declare_flat_buffer(self, buffer: torch.Tensor, segments: list[FlatSegment], base_lr: float) -> None:
        """Declare `buffer` (a 1-D tensor of the param groups) as segments of parameters, each
        updated as its own parameter with its own layout and options; a segment's lr is
        options["lr"] * group["lr"] / base_lr, so a schedule on the buffer's group applies (with
        base_lr 0, the group's lr itself: there is no ratio to keep)."""
        self._check_member(buffer)
        if buffer.dim() != 1:
            raise ValueError(f"a flat buffer must be 1-D, got shape {tuple(buffer.shape)}")
        if not base_lr >= 0:
            raise ValueError(f"base_lr={base_lr!r}: must be >= 0 (segment lrs are relative to it)")
        for seg in segments:
            if seg.start < 0 or seg.start + seg.numel > buffer.numel():
                raise ValueError(f"segment {seg.name!r} [{seg.start}, {seg.start + seg.numel}) lies outside "
                                 f"the buffer of {buffer.numel()} elements")
            check_hparams({**self.defaults, **seg.options}, f"segment {seg.name!r}")
            self._check_groups(seg.layout)
        self.tensors.flat[id(buffer)] = FlatBuffer(list(segments), float(base_lr))
        self.tensors.known.add(id(buffer))
        self.invalidate()

    def declare_ghosts(self, ghosts: list[tuple]) -> None:
        """ParamSpecs (or (order_key, ShardLayout, options) tuples) of parameters this rank holds nothing of but whose
        statistics other ranks share (Megatron's distributed optimizer drops them from a rank's
        groups); they contribute zeros so every rank packs the same all-reduce buffer, and their
        process groups join every step's all-reduce. options["dtype"] = torch.float64 for a
        float64 parameter (its statistics are float64 on the ranks that hold it)."""
        self.tensors.ghosts = []
        for key, layout, options in (g.ghost() if isinstance(g, ParamSpec) else g for g in ghosts):
            if layout.local_numel != 0:
                raise ValueError(f"ghost {key!r} must hold nothing locally, its layout holds {layout.local_numel}")
            # A rank may share a group only through ghosts: it must join every step's all-reduce.
            self._check_groups(layout)
            role = role_of(options, layout)
            if role in ("hidden", "head"):
                axis = {**self.defaults, **options}["norm"] if role == "hidden" else "row"
                plan = build_plan(layout, axis)
                if plan.group_slots:
                    self.tensors.ghosts.append(Ghost(key, plan, options.get("dtype", torch.float32)))
        self.invalidate()

    def replace_param_groups(self, groups: list[dict]) -> None:
        """Replace the param groups with engine-owned tensors, which may be views of a buffer
        (non-leaf, so torch's add_param_group would refuse them); missing settings take defaults."""
        for i, group in enumerate(groups):
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            check_hparams(group, f"MOGA param group {i}")
            group["params"] = list(group["params"])
            _refuse_complex(group)
        self.param_groups = groups
        self.tensors.slots, self.tensors.slot_ids = [], {}      # an engine describes the new groups again
        self.tensors.known.update(id(p) for g in groups for p in g["params"])
        self.tensors.index_names(groups)
        self.invalidate()

    def set_process_group(self, key: str, group) -> None:
        """Name a process group that layouts refer to by `key` (e.g. "tp", "dp")."""
        self.reducer.process_groups[key] = group
        self.invalidate()

    def process_group(self, key: str):
        """The process group named `key` (by `set_process_group` or process_groups=), or None."""
        return self.reducer.process_groups.get(key)

    def invalidate(self) -> None:
        """Settings, layouts, tensors or state changed outside step(): rebuild the step program."""
        self._programs.clear()
        self.tensors.changed()

    def refresh_tensors(self) -> None:
        """Re-derive what MOGA knows about the tensors now in its groups; run before each step
        program build. A tensor an engine put into a slot it described (`declare_engine`) takes
        that slot's ParamSpec; a DTensor put into the groups after construction (Accelerate's FSDP2 swaps
        every parameter for one) gets its layout from its placements, and registered engine
        adopters (core/adopters.py: torch FSDP1) map their engine's tensors; matrices still without a
        role take their model's roles (core/roles.py)."""
        declare_slots(self)             # tensors an engine put into its described slots (from_engine)
        if declare_swapped_dtensors(self):
            self.invalidate()
        for adopt in ADOPTERS:
            adopt(self)
        resolve_missing_roles(self)     # role-less matrices left: the model's roles, or one warning

    def layout_of(self, tensor: torch.Tensor) -> ShardLayout:
        """The tensor's declared layout (a whole tensor unless one was declared)."""
        return self.tensors.layout_of(tensor)

    def options_of(self, tensor: torch.Tensor) -> dict:
        """The settings declared for the tensor over its group's (`declare(options=...)`, e.g. a
        role `take_roles` declared); {} if none."""
        return dict(self.tensors.options.get(id(tensor), {}))

    def _check_member(self, tensor: torch.Tensor) -> None:
        if not any(p is tensor for g in self.param_groups for p in g["params"]):
            raise ValueError(f"a tensor of shape {tuple(tensor.shape)} is not in this optimizer's param groups")

    def _check_groups(self, layout: ShardLayout) -> None:
        if layout.tp is not None and layout.tp.world_size > 1:
            self.reducer.check_group(layout.tp.group, layout.tp.world_size, order=1)
        if layout.flat is not None and len(layout.flat.ranges) > 1:
            self.reducer.check_group(layout.flat.group, len(layout.flat.ranges), order=0)

    # ----- step ------------------------------------------------------------------------------
    def init_state(self, tensor: torch.Tensor) -> dict:
        """The tensor's state, created if missing: `momentum_buffer` of its shape (fp32; float64
        for a float64 tensor, whose math then stays float64) and `step` 0."""
        state = self.state[tensor]
        if "momentum_buffer" not in state:
            # zeros_like: a DTensor parameter gets a DTensor momentum of its placements.
            state["momentum_buffer"] = torch.zeros_like(tensor, dtype=momentum_dtype(tensor),
                                                       memory_format=torch.contiguous_format)
            state["step"] = 0
        return state

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

    @contextlib.contextmanager
    def suspended(self):
        """Within this context step() does nothing (an engine's set-up call with zero gradients
        would otherwise apply weight decay once)."""
        self._suspended = True
        try:
            yield self
        finally:
            self._suspended = False

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
        """Load, keeping momentum in fp32 and refusing a checkpoint written for another layout."""
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
        momenta = {k: v["momentum_buffer"].clone() for k, v in state_dict["state"].items()
                   if "momentum_buffer" in v}
        super().load_state_dict(state_dict)
        self.invalidate()
        # torch casts state to the parameter dtype on load; MOGA keeps momentum in fp32.
        index = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(index, params):
            if i in momenta:
                self.state[p]["momentum_buffer"] = momenta[i].to(device=p.device, dtype=momentum_dtype(p))


def momentum_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 momentum for fp32 and lower precision; float64 tensors keep float64 throughout."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _refuse_complex(group: Mapping) -> None:
    """Raise for a complex tensor in `group` (a row norm of complex numbers is another algorithm)."""
    for i, t in enumerate(group["params"]):
        if isinstance(t, torch.Tensor) and t.is_complex():
            name = group["param_names"][i] if "param_names" in group else i
            raise ValueError(f"parameter {name!r} of a group is complex ({t.dtype}): MOGA supports real floating "
                             "tensors only; view it as real (torch.view_as_real) or use another optimizer")


def _plain(obj):
    """Tuples and lists compare alike (a layout dict after a round trip through a checkpoint)."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
