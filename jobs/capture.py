"""Forward hooks that fill ``ckd.features.Features`` from a BERT-style encoder, with no edits to model code.

Works on any model whose body (``model.base_model``) has ``embeddings`` and ``encoder.layer[i]`` with
``attention.self.{query,key,value}`` and ``attention.output.dense`` — BERT and RoBERTa (tested on
transformers 5.x; the known 4.x differences are handled) — and on DeepSpeed engines / DDP /
``torch.compile`` wrappers around one (hooks go on the inner modules, the forward pass goes through the
wrapper so the wrapper's own logic still runs).

Only the hooks a ``FeatureNeeds`` asks for are registered. Hooks record only while a capture call is
running, so activation-checkpoint recomputation during backward, or an unrelated forward pass (e.g.
evaluation), stores nothing; each call starts from an empty store and the capture object keeps no
reference to the tensors afterwards, so they are freed with the step's ``Features``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import transformers
from torch import nn

from ckd.features import FeatureNeeds, Features
from jobs.models import ENCODER_INPUT_KEYS, unwrap_model

# transformers 4.x returns attention weights from the self-attention module only when asked with
# output_attentions=True; 5.x eager attention always returns them (and output_attentions=True would make
# transformers keep every layer's map as well).
_ASK_FOR_ATTENTIONS = int(transformers.__version__.split(".")[0]) < 5
_KINDS = ("hidden_states", "attentions", "queries", "keys", "values", "attention_outputs")


def encoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The embeddings-and-encoder body of a (possibly wrapped) model and its list of layers.

    Raises:
        TypeError: the model does not have the BERT/RoBERTa module layout.
    """
    inner = unwrap_model(model)
    base = getattr(inner, "base_model", inner)
    try:
        base.embeddings  # noqa: B018 - probe the layout
        layers = base.encoder.layer
        for layer in layers:
            layer.attention.self.query, layer.attention.output.dense  # noqa: B018
    except AttributeError as err:
        raise TypeError(
            f"{type(inner).__name__} lacks the BERT/RoBERTa layout (base_model.embeddings, "
            f"base_model.encoder.layer[i].attention.self.query, .attention.output.dense): {err}"
        ) from err
    return base, layers


def attn_implementation(model: nn.Module) -> str | None:
    """The attention implementation a (possibly wrapped) model runs with ("eager", "sdpa", ...)."""
    return getattr(unwrap_model(model).config, "_attn_implementation", None)


def ensure_eager_attention(model: nn.Module) -> None:
    """Switch a model to eager attention, the only implementation that returns attention probabilities.

    Uses ``PreTrainedModel.set_attn_implementation`` (transformers 5.x), which switches the config in
    place and works through wrappers; do it before ``torch.compile`` traces the model, or load with
    ``attn_implementation="eager"`` instead.
    """
    inner = unwrap_model(model)
    if attn_implementation(inner) != "eager":
        inner.set_attn_implementation("eager")


def _validate(needs: FeatureNeeds, num_layers: int) -> None:
    bad = [i for i in needs.hidden_states if not 0 <= i <= num_layers]
    for name in ("attentions", "qkv", "attention_outputs"):
        bad += [i for i in getattr(needs, name) if not 1 <= i <= num_layers]
    if bad:
        raise ValueError(
            f"FeatureNeeds asks for layers {sorted(bad)} of a {num_layers}-layer model "
            f"(hidden_states: 0..{num_layers}, others: 1..{num_layers}); needs={needs}"
        )


class FeatureCapture:
    """Registers the hooks one side of an objective needs and runs capture forward passes.

    Use one per model for the whole training run, and ``close()`` it (or use it as a context manager)::

        s_cap = FeatureCapture(student, needs.student)
        t_cap = FeatureCapture(teacher, needs.teacher, grad=False)
        s_out, s_feats = s_cap(batch)   # tensors keep their autograd graph
        _, t_feats = t_cap(batch)       # run under torch.no_grad
        ...
        s_cap.close(); t_cap.close()

    Args:
        model: a BERT/RoBERTa model, possibly wrapped in DeepSpeed / DDP / torch.compile.
        needs: what to capture.
        grad: False runs the forward under ``torch.no_grad`` (the teacher); True leaves grad mode to the
            caller, so student features carry their graph during training.

    Raises:
        ValueError: layer indices out of range, or attention maps requested from a model that does not run
            eager attention (sdpa / flash attention never materialise the probabilities).
    """

    def __init__(self, model: nn.Module, needs: FeatureNeeds, *, grad: bool = True) -> None:
        self.model = model
        self.needs = needs
        self.grad = grad
        self._inner = unwrap_model(model)
        base, layers = encoder_parts(self._inner)
        self.num_layers = len(layers)
        _validate(needs, self.num_layers)
        self._check_eager()
        self._store: dict[str, dict[int, torch.Tensor]] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._warned_dropout = False
        self._closed = False
        try:
            for i in sorted(needs.hidden_states):
                # Index 0 is the embedding output; index i the output of layer i (layer i - 1, 0-based).
                module = base.embeddings if i == 0 else layers[i - 1]
                self._handles.append(module.register_forward_hook(self._saver("hidden_states", i, _first)))
            for i in sorted(needs.attentions):
                # The self-attention module returns (context, attention_probs) under eager attention.
                module = layers[i - 1].attention.self
                self._handles.append(module.register_forward_hook(self._saver("attentions", i, _second)))
            for i in sorted(needs.qkv):
                self_attn = layers[i - 1].attention.self
                for name, kind in (("query", "queries"), ("key", "keys"), ("value", "values")):
                    hook = self._saver(kind, i, _whole)
                    self._handles.append(getattr(self_attn, name).register_forward_hook(hook))
            for i in sorted(needs.attention_outputs):
                # The input of the output projection is the concatenated per-head context vectors.
                dense = layers[i - 1].attention.output.dense
                self._handles.append(dense.register_forward_pre_hook(self._pre_saver("attention_outputs", i)))
        except BaseException:
            self.close()
            raise

    @property
    def num_hooks(self) -> int:
        """Hooks this capture has registered (0 after ``close()``)."""
        return len(self._handles)

    def _check_eager(self) -> None:
        impl = attn_implementation(self._inner)
        if self.needs.attentions and impl != "eager":
            raise ValueError(
                f"attention maps of layers {sorted(self.needs.attentions)} are needed but the model uses "
                f"{impl!r} attention, which does not return them; load it with attn_implementation='eager' "
                "(jobs.models.load_teacher / student builders) or call "
                "jobs.capture.ensure_eager_attention(model)"
            )

    def _saver(self, kind: str, index: int, pick: Callable[[Any], torch.Tensor | None]):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._store is not None:
                value = pick(output)
                if value is not None:
                    self._store[kind][index] = value

        return hook

    def _pre_saver(self, kind: str, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if self._store is not None:
                self._store[kind][index] = args[0]

        return hook

    def _warn_post_dropout(self) -> None:
        p = getattr(self._inner.config, "attention_probs_dropout_prob", 0.0) or 0.0
        if self.needs.attentions and self._inner.training and p > 0 and not self._warned_dropout:
            self._warned_dropout = True
            warnings.warn(
                f"capturing attention maps in train mode with attention_probs_dropout_prob={p}: eager attention "
                "returns the probabilities after dropout (rows no longer sum to 1); set "
                "attention_probs_dropout_prob=0 for a student whose attention maps are distilled",
                RuntimeWarning,
                stacklevel=3,
            )

    def __call__(self, batch: Mapping[str, Any]) -> tuple[Any, Features]:
        """Run one forward pass and collect the needed features.

        Args:
            batch: model inputs (``input_ids``, ``attention_mask``, ...); other keys are ignored.

        Returns:
            ``(outputs, features)``: the model's own output object and the ``Features``. Hidden-state
            entries not in ``needs.hidden_states`` are None (the tuple still has num_layers + 1 entries);
            ``features.logits`` is None unless ``needs.logits``.
        """
        if self._closed:
            raise RuntimeError("FeatureCapture was closed")
        self._check_eager()  # the implementation can be switched after construction
        self._warn_post_dropout()
        inputs = {k: v for k, v in batch.items() if k in ENCODER_INPUT_KEYS}
        if "input_ids" not in inputs and "inputs_embeds" not in inputs:
            raise KeyError(f"batch has neither input_ids nor inputs_embeds (keys: {sorted(batch)})")
        kwargs = {"output_attentions": True} if self.needs.attentions and _ASK_FOR_ATTENTIONS else {}
        self._store = {kind: {} for kind in _KINDS}
        try:
            with torch.no_grad() if not self.grad else contextlib.nullcontext():
                outputs = self.model(**inputs, **kwargs)
        finally:
            store, self._store = self._store, None
        self._check_complete(store)
        reference = inputs.get("input_ids", inputs.get("inputs_embeds"))
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        features = Features(
            hidden_states=tuple(store["hidden_states"].get(i) for i in range(self.num_layers + 1)),
            attention_mask=mask,
            logits=outputs.logits if self.needs.logits else None,
            attentions=store["attentions"],
            queries=store["queries"],
            keys=store["keys"],
            values=store["values"],
            attention_outputs=store["attention_outputs"],
            num_heads=self._inner.config.num_attention_heads,
        )
        return outputs, features

    def _check_complete(self, store: dict[str, dict[int, torch.Tensor]]) -> None:
        wanted = {"hidden_states": self.needs.hidden_states, "attentions": self.needs.attentions,
                  "queries": self.needs.qkv, "keys": self.needs.qkv, "values": self.needs.qkv,
                  "attention_outputs": self.needs.attention_outputs}
        missing = {kind: sorted(set(layers) - set(store[kind])) for kind, layers in wanted.items()}
        missing = {kind: layers for kind, layers in missing.items() if layers}
        if missing:
            hint = " (attention weights come back only from eager attention)" if "attentions" in missing else ""
            raise RuntimeError(f"forward pass did not produce {missing}{hint}")

    def close(self) -> None:
        """Remove every hook; the model runs exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._store = None
        self._closed = True

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def capture(model: nn.Module, needs: FeatureNeeds, batch: Mapping[str, Any], *,
            grad: bool = True) -> tuple[Any, Features]:
    """One-shot ``FeatureCapture``: register hooks, run ``batch``, remove the hooks.

    Convenient for evaluation and tests; a training loop should keep one ``FeatureCapture`` per model.
    """
    with FeatureCapture(model, needs, grad=grad) as cap:
        return cap(batch)


def _first(output: Any) -> torch.Tensor:
    # Layers return a tensor in transformers 5.x and a tuple whose first item is the tensor in 4.x.
    return output[0] if isinstance(output, tuple) else output


def _second(output: Any) -> torch.Tensor | None:
    return output[1] if isinstance(output, tuple) and len(output) > 1 else None


def _whole(output: torch.Tensor) -> torch.Tensor:
    return output
