"""The user's module run on other tensors: the ``m`` that ``loss_fn`` gets, and the base of
the adapted model ``MAML.adapt`` returns.

``FunctionalModel(model, tensors, buffers)`` behaves as ``model`` with its parameters and
buffers replaced by ``tensors`` and ``buffers``, and never changes ``model``: calling it,
any method (``m.embed(x)``), submodule (``m.backbone(x)``, ``m[0]``), parameter or buffer
(``m.fc.weight``), property, ``parameters()``, ``named_parameters()`` and ``state_dict()``
run on the given tensors (``torch.func.functional_call``). Its train/eval mode is its own
(``m.eval()``): set on the model only while one of its calls runs, and restored after.
``to_module()`` is a plain ``nn.Module`` copy with the tensors detached (for deployment).

Cost: calling it is one ``functional_call`` (what a hand-written loop pays); a method, a
property or a submodule's call also prefixes the name mapping (O(parameters) Python work);
a mode of its own adds two walks over the model's modules per call. Nothing is copied
except the buffers when ``copy_buffers`` (one clone per buffer per call).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import inspect
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["FunctionalModel", "inside_module"]

# what would change the user's model rather than this view of it
_MUTATORS = frozenset(
    {
        "add_module",
        "apply",
        "bfloat16",
        "compile",
        "cpu",
        "cuda",
        "double",
        "float",
        "half",
        "ipu",
        "load_state_dict",
        "mtia",
        "register_backward_hook",
        "register_buffer",
        "register_forward_hook",
        "register_forward_pre_hook",
        "register_full_backward_hook",
        "register_full_backward_pre_hook",
        "register_load_state_dict_post_hook",
        "register_load_state_dict_pre_hook",
        "register_module",
        "register_parameter",
        "register_state_dict_post_hook",
        "register_state_dict_pre_hook",
        "requires_grad_",
        "set_extra_state",
        "set_submodule",
        "share_memory",
        "to",
        "to_empty",
        "type",
        "xpu",
        "zero_grad",
    }
)

_INSIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("effmaml_inside", default=False)


def inside_module() -> bool:
    """Whether a ``FunctionalModel``'s call (or method, or property) is running now: the
    model's tensors are then the ones it was given (``effmaml.outer``'s check of the
    captured model looks only outside)."""
    return _INSIDE.get()


def reparametrized(
    module: nn.Module, tensors: Mapping[str, Tensor], args: Any, kwargs: Any = None
) -> Any:
    """``module(*args, **kwargs)`` with ``tensors`` (names as ``named_parameters()`` and
    ``named_buffers()`` give them) in place of its own, and the module as it was after.

    Cost: one walk over the module's submodules and tensors per call (what
    ``functional_call`` walks anyway to tie weights), then one swap in and out per tensor.
    """
    # Note [A submodule under two names]
    # torch.func.functional_call ties weights by tensor: it swaps every name that holds the
    # same tensor. A submodule registered twice (self.b = self.a) has two names for one
    # slot, so the swap sees a.weight's new value as b.weight's "original" and leaves it in
    # the user's model on the way out (torch 2.14): the model's Parameter replaced by an
    # adapted tensor, silently. We expand the names ourselves, one per slot (an owning
    # module's attribute), to every slot that holds the same tensor (true weight tying:
    # one Parameter in two modules), and call without torch's tying.
    slots: dict[tuple[int, str], str] = {}
    by_tensor: dict[int, list[str]] = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for attr, t in [*owner._parameters.items(), *owner._buffers.items()]:
            if t is None or (id(owner), attr) in slots:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            slots[id(owner), attr] = name
            by_tensor.setdefault(id(t), []).append(name)
    named: dict[str, Tensor] = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    untied: dict[str, Tensor] = {}
    for name, value in tensors.items():
        own = named.get(name)
        for slot in by_tensor.get(id(own), [name]) if own is not None else [name]:
            untied[slot] = value
    return functional_call(module, untied, args, kwargs, tie_weights=False)


class _Caller(nn.Module):
    """Runs a function with the model it holds reparametrized (``functional_call`` runs a
    module's forward only; this one's forward runs what it is handed)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


@dataclass(eq=False)
class _Shared:
    """What a view and the views of its submodules share."""

    model: nn.Module
    tensors: dict[str, Tensor]
    buffers: Mapping[str, Tensor]
    copy_buffers: bool
    context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    modes: dict[str, bool] = field(default_factory=dict)  # module path -> its own mode
    caller: _Caller | None = None
    aliases: dict[str, str] | None = None  # tied names -> the name given
    paths: dict[int, str] | None = None  # id(submodule) -> its path

    def alias(self, name: str) -> str:
        """The name under which a (possibly tied) parameter or buffer was given."""
        if self.aliases is None:
            canon: dict[int, str] = {}
            aliases: dict[str, str] = {}
            named = [
                *self.model.named_parameters(remove_duplicate=False),
                *self.model.named_buffers(remove_duplicate=False),
            ]
            for n, t in named:
                aliases[n] = canon.setdefault(id(t), n)
            self.aliases = aliases
        return self.aliases.get(name, name)

    def path_of(self, module: nn.Module) -> str | None:
        """The path of ``module`` in the model, or None if it is not in it."""
        if self.paths is None:
            self.paths = {id(m): p for p, m in self.model.named_modules(remove_duplicate=False)}
        return self.paths.get(id(module))

    def mode_of(self, path: str, own: bool) -> bool:
        """The mode of the module at ``path``: the nearest mode set on it or a module above
        it, else ``own`` (the model's flag)."""
        best: tuple[int, bool] | None = None
        for p, mode in self.modes.items():
            above = p == "" or path == p or path.startswith(p + ".")
            if above and (best is None or len(p) > best[0]):
                best = (len(p), mode)
        return own if best is None else best[1]


@contextlib.contextmanager
def _in_modes(model: nn.Module, modes: Mapping[str, bool]) -> Iterator[None]:
    saved = [(m, m.training) for m in model.modules()]
    try:
        for path in sorted(modes, key=len):  # a module above another has a shorter path
            model.get_submodule(path).train(modes[path])
        yield
    finally:
        for m, flag in saved:
            m.training = flag


class FunctionalModel:
    """The user's module with other parameters and buffers: call it, and use its methods,
    submodules, parameters, buffers and properties as the module's, without touching it.

    Inside ``loss_fn(m, batch)``, ``m`` is one (the model at the step's parameters
    φ_t); ``effmaml.Adapted`` is one (at φ_N). A submodule (``m.backbone``, ``m[0]``) is a
    view of the same tensors; methods and properties run with the whole model
    reparametrized, so ``m.embed(x)`` calling ``self.backbone`` inside reads φ too.
    ``parameters()``, ``named_parameters()``, ``buffers()`` and ``state_dict()`` give the
    view's tensors (differentiable where they are; ``state_dict`` detaches them unless
    ``keep_vars=True``), ``children()`` and ``modules()`` views. Methods that would change
    the model (``to``, ``zero_grad``, ``load_state_dict``, ``register_*``) are refused:
    ``to_module()`` gives a plain copy to call them on. Not an ``nn.Module`` instance.

    Train/eval: ``m.train()`` / ``m.eval()`` set this view's own mode (for the module and
    those under it), which the model takes only while one of the view's calls runs; until
    set, the view follows the model's own flags.

    Args:
        model: the user's module (never changed, except its train/eval flags during a
            call of a view with a mode of its own, restored after).
        tensors: name -> tensor for every parameter (as ``model.named_parameters()`` names
            them).
        buffers: name -> tensor for the buffers. Handed to the module as they are when
            ``copy_buffers`` is False (train-mode BatchNorm then updates them in place: an
            inner step's own copy), cloned per call otherwise.
        copy_buffers: clone the buffers for every call. Default True.
    """

    _fm: _Shared
    _prefix: str
    _module: nn.Module

    def __init__(
        self,
        model: nn.Module,
        tensors: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        copy_buffers: bool = True,
    ) -> None:
        self._fm = _Shared(model, dict(tensors), buffers, copy_buffers)
        self._prefix = ""
        self._module = model

    # -- running ------------------------------------------------------------------------
    def _mapping(self) -> dict[str, Tensor]:
        fm = self._fm
        buffers = fm.buffers
        if fm.copy_buffers:
            buffers = {k: b.clone() for k, b in buffers.items()}
        return {**fm.tensors, **buffers}

    @contextlib.contextmanager
    def _entered(self) -> Iterator[None]:
        fm = self._fm
        token = _INSIDE.set(True)
        try:
            with contextlib.ExitStack() as stack:
                if fm.context is not None:
                    stack.enter_context(fm.context())
                if fm.modes:
                    stack.enter_context(_in_modes(fm.model, fm.modes))
                yield
        finally:
            _INSIDE.reset(token)

    def _run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` with the whole model reparametrized by this view's tensors."""
        fm = self._fm
        if fm.caller is None:
            fm.caller = _Caller(fm.model)
        mapping = {f"m.{k}": v for k, v in self._mapping().items()}
        with self._entered():
            return reparametrized(fm.caller, mapping, (fn,))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._prefix:
            module = self._module
            return self._run(lambda: module(*args, **kwargs))
        with self._entered():
            return reparametrized(self._fm.model, self._mapping(), args, kwargs)

    # -- attributes ---------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_fm", "_prefix", "_module"):
            raise AttributeError(name)
        fm, module = self._fm, self._module
        given = {"_parameters": fm.tensors, "_buffers": fm.buffers}
        for group, values in given.items():
            if name in module.__dict__.get(group, {}):
                value = values.get(fm.alias(self._prefix + name))
                return getattr(module, name) if value is None else value
        if name in module.__dict__.get("_modules", {}):
            return self._child(name)
        if name in _MUTATORS:
            raise AttributeError(
                f"{name}() would change the user's model ({type(fm.model).__name__}), not "
                f"this view of it with the adapted tensors; take a plain copy with "
                f".to_module() and call .{name}() on it (or call model.{name}() on the "
                f"model itself)"
            )
        if name in vars(module):  # an instance attribute: a setting, a tensor attribute
            return vars(module)[name]
        static = inspect.getattr_static(module, name, _MISSING)
        if static is _MISSING:
            raise AttributeError(
                f"{type(module).__name__!r} object has no attribute {name!r} (a view of "
                f"{self._where()})"
            )
        if isinstance(static, (staticmethod, classmethod, type)):
            return getattr(module, name)
        if inspect.isfunction(static) or isinstance(static, functools.partialmethod):
            return self._method(name)
        if hasattr(static, "__get__"):  # a property: evaluated with the view's tensors
            return self._view(self._run(lambda: getattr(module, name)))
        return static

    def _method(self, name: str) -> Callable[..., Any]:
        module = self._module

        def call(*args: Any, **kwargs: Any) -> Any:
            def run() -> Any:
                out = getattr(module, name)(*args, **kwargs)
                if isinstance(out, (types.GeneratorType, Iterator)) and not isinstance(out, Tensor):
                    return _Listed(out)  # read while the model holds the view's tensors
                return out

            out = self._run(run)
            if isinstance(out, _Listed):
                return iter([self._view(v) for v in out.items])
            return self._view(out)

        call.__name__ = name
        call.__doc__ = getattr(type(module), name).__doc__
        return call

    def _view(self, value: Any) -> Any:
        """A submodule of the model as a view of it; anything else as it is."""
        if isinstance(value, nn.Module):
            path = self._fm.path_of(value)
            if path is not None:
                return self._at(path)
        return value

    def _child(self, name: str) -> Any:
        module = self._module._modules[name]
        if module is None:
            return None
        return self._at(self._prefix + name)

    def _at(self, path: str) -> FunctionalModel:
        """A view of the submodule at ``path`` (``""``: the model), sharing this one's
        tensors, context and modes (views are made on demand: none is kept, so that none
        refers back to another)."""
        if path == self._prefix[:-1]:
            return self
        view = object.__new__(FunctionalModel)
        view._fm = self._fm
        view._prefix = f"{path}." if path else ""
        view._module = self._fm.model.get_submodule(path)
        return view

    def _where(self) -> str:
        path = self._prefix[:-1]
        root = type(self._fm.model).__name__
        return f"{root}.{path}" if path else root

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *dir(self._module)})

    # -- the module's own methods, for a view -------------------------------------------
    @property
    def training(self) -> bool:
        """The view's train/eval mode (its own once ``train``/``eval`` set it, else the
        model's flag)."""
        return self._fm.mode_of(self._prefix[:-1], self._module.training)

    def train(self, mode: bool = True) -> FunctionalModel:
        """Set this view's own mode (and its submodules'); the model is not changed.

        Returns:
            The view itself, as ``nn.Module.train`` does.
        """
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean (got {mode!r})")
        path, modes = self._prefix[:-1], self._fm.modes
        for p in [p for p in modes if path == "" or p == path or p.startswith(path + ".")]:
            del modes[p]
        modes[path] = mode
        return self

    def eval(self) -> FunctionalModel:
        """``train(False)``: this view, not the model, in eval mode."""
        return self.train(False)

    def get_submodule(self, target: str) -> FunctionalModel:
        """The view of the submodule ``target`` (``"backbone.layer1"``)."""
        view: FunctionalModel = self
        for part in target.split(".") if target else []:
            if part not in view._module.__dict__.get("_modules", {}):
                raise AttributeError(f"{view._where()} has no submodule {part!r}")
            view = view._child(part)
        return view

    def get_parameter(self, target: str) -> Tensor:
        """The view's tensor of parameter ``target`` (``"fc.weight"``)."""
        path, _, name = target.rpartition(".")
        value: Tensor = getattr(self.get_submodule(path), name)
        return value

    def get_buffer(self, target: str) -> Tensor:
        """The view's tensor of buffer ``target`` (``"bn.running_mean"``)."""
        return self.get_parameter(target)

    def named_children(self) -> Iterator[tuple[str, FunctionalModel]]:
        """``(name, view)`` for each child module."""
        for name, _ in self._module.named_children():
            yield name, self._at(self._prefix + name)

    def children(self) -> Iterator[FunctionalModel]:
        """A view of each child module."""
        for _, view in self.named_children():
            yield view

    def named_modules(
        self, memo: Any = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, FunctionalModel]]:
        """``(name, view)`` for this module and every module under it."""
        for name, _ in self._module.named_modules(memo, "", remove_duplicate):
            full = prefix + ("." if prefix and name else "") + name
            yield full, self._at(self._prefix + name if name else self._prefix[:-1])

    def modules(self) -> Iterator[FunctionalModel]:
        """A view of this module and of every module under it."""
        for _, view in self.named_modules():
            yield view

    def to_module(self) -> nn.Module:
        """A plain ``nn.Module``: a deep copy of the (sub)module with this view's
        parameters and buffers, detached (parameters are new leaves that require grad as
        the model's do), in this view's modes. For deployment or further training.

        Cost: one copy of the module's tensors. A model with per-step modules
        (``effmaml.per_step_batchnorm``) keeps them: run it under ``effmaml.at_step``.
        """
        fm = self._fm
        memo: dict[int, Any] = {}
        for name, p in fm.model.named_parameters(remove_duplicate=False):
            value = fm.tensors.get(fm.alias(name))
            if value is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(value.detach().clone(), requires_grad=p.requires_grad)
        for name, b in fm.model.named_buffers(remove_duplicate=False):
            value = fm.buffers.get(fm.alias(name))
            if value is not None and id(b) not in memo:
                memo[id(b)] = value.detach().clone()
        out: nn.Module = copy.deepcopy(self._module, memo)
        base = self._prefix[:-1]
        for (name, original), clone in zip(self._module.named_modules(), out.modules()):
            path = f"{base}.{name}" if base and name else base or name
            clone.training = fm.mode_of(path, original.training)
        return out

    # -- containers (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList) -----
    def _names(self) -> list[str]:
        module = self._module
        if not hasattr(type(module), "__getitem__"):
            raise TypeError(f"{type(module).__name__!r} object is not subscriptable")
        return list(module._modules) or list(module._parameters)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, slice):
            raise TypeError(
                "a view of a container cannot be sliced; index its members (m[0]) instead"
            )
        names = self._names()
        if isinstance(key, int):
            name = names[key]
        else:
            name = str(key)
            if name not in names:
                raise KeyError(key)
        return getattr(self, name)

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[Any]:
        module = self._module
        if isinstance(module, (nn.ModuleDict, nn.ParameterDict)):
            return iter(self._names())
        return iter([getattr(self, n) for n in self._names()])

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"FunctionalModel({self._where()})"


_MISSING = object()


class _Listed:
    """A method's iterator, read out while the model held the view's tensors."""

    def __init__(self, items: Iterator[Any]) -> None:
        self.items = list(items)
