"""Prompt tuning: trainable virtual tokens in front of the input (Lester et al. 2021, arXiv:2104.08691).

::

    input_ids (B, L) ──> word embeddings ──> E (B, L, D)
    P (n, D), trained ──────────────────> [P; E] (B, n + L, D) ──> frozen model ──> drop the first n outputs

The unit sits on the stack that embeds the tokens: `base_model` itself for encoders and decoders, the
encoder stack of an encoder-decoder (T5: the decoder is untouched and cross-attends to the real positions
only). In a forward pre-hook it turns `input_ids` into `inputs_embeds` with the model's own
`get_input_embeddings()`, prepends P and extends the inputs that run along the sequence:
`attention_mask` (ones: every token sees the prompt), `token_type_ids` (zeros), `position_ids` and
`cache_position` (the prompt takes positions 0..n-1, the tokens n..n+L-1, exactly as if the prompt had been
typed first). Its forward hook removes the n virtual positions from `last_hidden_state` (and from
`hidden_states` / `attentions` when the model returns them), so every head, modfit's or HuggingFace's (token
classification, MLM, causal LM logits), lines up with the real tokens. A pooler that reads position 0
(BERT's `pooler_output`) reads the first virtual token, as in PEFT.

Generation (causal LMs): the prompt goes in once, on the step that fills an empty cache; the cache then
holds the virtual tokens, so every later step only extends the attention mask by n and shifts positions by
n. The unit marks the cache it has filled (`cache._modfit_virtual`), which also lets a prompt and a prefix
module be stacked on one cache.

Parameters: n × D (D = the word-embedding width), e.g. 20 × 768 = 15,360 on BERT-base, PEFT's number.
Init (`init`): "vocab" copies the embeddings of `init_text`'s tokens (repeated to fill n, PEFT's
`PromptTuningInit.TEXT`), or, without text, of n random vocabulary tokens (PEFT's `SAMPLE_VOCAB`, Lester
et al.'s recommendation); "random" draws N(0, s²) with s the word embeddings' own standard deviation.
The prompt changes attention from the first step, so a new module is not an identity
(`identity_at_init = False`) and cannot be merged into weights.

Learning rate (`default_lr`, used by `modfit train` without `--lr`): 3e-2, measured on MiniLM
(tests/test_learning_prompt.py); 1e-1 already loses accuracy and 3e-1 diverges.

The helpers below (`bind_inputs`, `extend_mask`, `shift_positions`, `claims_cache`) are shared with
`prefix.py`.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast, get_args

import torch
from torch import nn

from ..config import ModuleConfig, check
from ..registry import register_method
from ..sites import Attachment, SiteCall, Unit
from ..targets import ModelView, TargetError

Init = Literal["vocab", "random"]


# -- helpers shared by the input-composition methods ------------------------------------------------


class _Ref:
    """Holds a base-model module without registering it (units must not own base modules)."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module


def bind_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's inputs as keywords: positional arguments get their parameter names.

    HF models call their stacks both ways (`self.transformer(input_ids, past_key_values=...)`).
    """
    if not args:
        return dict(kwargs)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(module.forward).parameters.values() if p.kind in kinds]
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}: more positional inputs than named parameters")
    return {**dict(zip(names, args, strict=False)), **kwargs}


_CACHE_KEYWORDS: dict[type, str] = {}  # per model class: its forward's signature does not change


def cache_keyword(module: nn.Module) -> str:
    """The keyword of a stack's key/value cache: `cache` from transformers 5.24 on (which ignores a
    `past_key_values` given beside it), `past_key_values` before."""
    kind = type(module)
    if kind not in _CACHE_KEYWORDS:
        names = inspect.signature(module.forward).parameters
        _CACHE_KEYWORDS[kind] = "cache" if "cache" in names else "past_key_values"
    return _CACHE_KEYWORDS[kind]


def get_cache(module: nn.Module, kwargs: dict[str, Any]) -> Any:
    """The cache this call of `module` carries, under either keyword (None: none)."""
    cache = kwargs.get(cache_keyword(module))
    return cache if cache is not None else kwargs.get("past_key_values")


def put_cache(module: nn.Module, kwargs: dict[str, Any], cache: Any) -> None:
    """Give this call of `module` `cache`, under the keyword its forward reads (and only that one)."""
    key = cache_keyword(module)
    if key != "past_key_values":
        kwargs.pop("past_key_values", None)
    kwargs[key] = cache


def extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Prepend n "attend" columns to a 2-D padding mask (B, L) -> (B, n + L); None stays None."""
    if mask is None:
        return None
    if mask.ndim != 2:
        raise ValueError(
            f"virtual tokens need a 2-D attention_mask (batch, seq); got shape {tuple(mask.shape)}"
        )
    ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)


def shift_positions(kwargs: dict[str, Any], n: int, *, prepend: bool) -> None:
    """Shift `position_ids` (B or 1, L) and `cache_position` (L,) by n, in place in `kwargs`.

    With `prepend`, the n virtual positions 0..n-1 are also put in front (prompt tuning's first step).
    """
    for key in ("position_ids", "cache_position"):
        value = kwargs.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        shifted = value + n
        if prepend:
            head = torch.arange(n, dtype=value.dtype, device=value.device)
            head = head.expand(*value.shape[:-1], n)
            shifted = torch.cat([head, shifted], dim=-1)
        kwargs[key] = shifted


def claims_cache(cache: Any, owner: object) -> bool:
    """True the first time `owner` sees this cache object (it must fill it), False afterwards.

    A generation loop passes the same cache object at every step; marking it (rather than testing for an
    empty cache) keeps two modules on one cache right: the second still fills its part after the first.
    """
    if cache is None:
        return True
    if not hasattr(cache, "__dict__"):  # a legacy tuple cache: a continuation, not ours to fill
        return False
    owners: set[int] = cache.__dict__.setdefault("_modfit_virtual", set())
    if id(owner) in owners:
        return False
    owners.add(id(owner))
    return True


def new_cache(config: Any, cross_attention: bool = False) -> Any:
    """An empty cache of the kind the stack would build itself; with `cross_attention` (the decoder of
    an encoder-decoder) a self-attention cache plus a cross-attention cache."""
    from transformers import DynamicCache, EncoderDecoderCache

    if cross_attention:
        return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    return DynamicCache(config=config)


def input_stack(view: ModelView, method: str) -> str:
    """Path (relative to base_model) of the module that embeds the input tokens.

    `base_model` itself, or for an encoder-decoder its encoder (`get_encoder()`).

    Raises:
        TargetError: an encoder-decoder whose encoder is not inside base_model.
    """
    config = getattr(view.model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return ""
    encoder = cast(Any, view.model).get_encoder()
    for path, module in view.base_model.named_modules():
        if module is encoder:
            return path
    raise TargetError(f"{method}: cannot find the encoder of this {view.model_type} model")


def is_causal_stack(view: ModelView, path: str) -> bool:
    """Whether the stack at `path` is a causal (cached, generating) one: the base of a decoder-only
    model (by the architecture table, or a model that can generate) or a decoder stack (`is_decoder`)."""
    config = getattr(view.model, "config", None)
    if path == "" and not getattr(config, "is_encoder_decoder", False):
        if view.arch is not None and view.arch.decoder_only:
            return True
        can_generate = getattr(view.model, "can_generate", None)
        if view.arch is None and can_generate is not None and can_generate():
            return True
    module = view.module(path)
    config = getattr(module, "config", None)
    return bool(getattr(module, "is_decoder", False) or getattr(config, "is_decoder", False))


# -- prompt tuning -------------------------------------------------------------------------------------


class PromptUnit(Unit):
    """n trainable input embeddings prepended to the sequence at one stack.

    Args:
        prompt: the initial embeddings, (n, D).
        embeddings: the model's input word embeddings (`get_input_embeddings()`).
        stack: the watched stack (for naming positional inputs).
        causal: the stack generates with a cache (prompt only on the step that fills it).
    """

    edits_input = True
    whole_output = True

    def __init__(self, prompt: torch.Tensor, embeddings: nn.Module, stack: nn.Module, causal: bool) -> None:
        super().__init__()
        self.prompt_embeddings = nn.Parameter(prompt)  # (n, D): PEFT's `prompt_embeddings` layout
        self._embeddings = _Ref(embeddings)
        self._stack = _Ref(stack)
        self.causal = causal
        self._call = threading.local()  # whether this thread's current call got the prompt

    @property
    def n(self) -> int:
        return int(self.prompt_embeddings.shape[0])

    def before(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs = bind_inputs(self._stack.module, args, kwargs)
        n = self.n
        cache = get_cache(self._stack.module, kwargs)
        if self.causal and cache is None and _use_cache(self._stack.module, kwargs):
            # Build the cache the model would build, so that a manual loop passing it back is recognised.
            cache = new_cache(_config(self._stack.module))
        if cache is not None:
            put_cache(self._stack.module, kwargs, cache)
        prepend = claims_cache(cache, self) if self.causal else True
        self._call.prepended = prepend
        kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), n)
        shift_positions(kwargs, n, prepend=prepend)
        if not prepend:
            return (), kwargs  # a later generation step: the cache holds the virtual tokens
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            ids = kwargs.get("input_ids")
            if ids is None:
                raise ValueError("prompt tuning needs input_ids or inputs_embeds")
            embeds = self._embeddings.module(ids)  # (B, L, D)
        prompt = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, n + L, D)
        kwargs["input_ids"] = None
        token_types = kwargs.get("token_type_ids")
        if isinstance(token_types, torch.Tensor):
            zeros = torch.zeros(token_types.shape[0], n, dtype=token_types.dtype, device=token_types.device)
            kwargs["token_type_ids"] = torch.cat([zeros, token_types], dim=1)
        return (), kwargs

    def forward(self, output: Any, call: SiteCall) -> Any:
        if not getattr(self._call, "prepended", False):
            return output
        self._call.prepended = False
        return drop_virtual(output, self.n)

    # -- per-example routing (`route(...)`, routing/fixed.py) --------------------------------------

    @classmethod
    def can_batch(cls, units: Sequence[PromptUnit | None]) -> bool:
        """Prompts batch together when they have the same number of virtual tokens."""
        return len({u.n for u in units if u is not None}) == 1

    @classmethod
    def batched_before(
        cls,
        units: Sequence[PromptUnit | None],
        rows: Callable[[int, torch.device], torch.Tensor],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Each row gets its own prompt: (B, n + L, D) with row b = [P_i; E_b], i its module.

        A row without a prompt module must see exactly the base model, so its n extra positions go
        *after* its tokens, as zeros the attention mask hides: its tokens keep the positions, token
        types and attention they have without a prompt (absolute position tables, causal masks and
        RoBERTa-style position ids alike), and the virtual positions are dropped again on the way out.
        A generation step that continues a cache is refused for such rows: their hidden positions would
        sit between their tokens and the new ones, which would then take other positions.
        """
        first = next(u for u in units if u is not None)
        stack, n = first._stack.module, first.n
        kwargs = bind_inputs(stack, args, kwargs)
        cache = get_cache(stack, kwargs)
        if first.causal and cache is None and _use_cache(stack, kwargs):
            cache = new_cache(_config(stack))
        if cache is not None:
            put_cache(stack, kwargs, cache)
        prepend = claims_cache(cache, first) if first.causal else True
        embeds, ids = kwargs.get("inputs_embeds"), kwargs.get("input_ids")
        reference = embeds if embeds is not None else ids
        if reference is None:
            raise ValueError("prompt tuning needs input_ids or inputs_embeds")
        index = rows(reference.shape[0], reference.device)
        keep = index < len(units)  # rows with a prompt
        every = bool(keep.all())
        first._call.prepended = prepend
        first._call.keep = None if every else keep
        if not prepend:
            if not every:
                raise ValueError(
                    "route(): a generation step continuing a cache cannot mix rows with and without a prompt "
                    "module; route every row to a prompt (or generate them in separate batches)"
                )
            kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), n)
            shift_positions(kwargs, n, prepend=False)
            return (), kwargs
        if embeds is None:
            embeds = first._embeddings.module(ids)  # (B, L, D)
        zeros = first.prompt_embeddings.new_zeros(n, embeds.shape[-1])
        table = torch.stack([u.prompt_embeddings if u is not None else zeros for u in units] + [zeros])
        prompts = table.to(embeds.dtype)[index]  # (B, n, D)
        kwargs["inputs_embeds"] = _per_row(
            keep, torch.cat([prompts, embeds], 1), torch.cat([embeds, prompts], 1)
        )
        kwargs["input_ids"] = None
        mask = kwargs.get("attention_mask")
        if mask is None and not every:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if mask is not None:
            if mask.ndim != 2:
                raise ValueError(
                    f"virtual tokens need a 2-D attention_mask (batch, seq); got shape {tuple(mask.shape)}"
                )
            ones, no = mask.new_ones(mask.shape[0], n), mask.new_zeros(mask.shape[0], n)
            kwargs["attention_mask"] = _per_row(keep, torch.cat([ones, mask], 1), torch.cat([mask, no], 1))
        token_types = kwargs.get("token_type_ids")
        if isinstance(token_types, torch.Tensor):
            no = token_types.new_zeros(token_types.shape[0], n)
            kwargs["token_type_ids"] = _per_row(
                keep, torch.cat([no, token_types], 1), torch.cat([token_types, no], 1)
            )
        positions = kwargs.pop("position_ids", None)
        shift_positions(kwargs, n, prepend=True)  # cache_position: one per sequence slot, every row alike
        if isinstance(positions, torch.Tensor):
            positions = positions.expand(embeds.shape[0], -1)
            virtual = torch.arange(n, dtype=positions.dtype, device=positions.device).expand(
                positions.shape[0], n
            )
            after = positions[:, -1:] + 1 + virtual
            kwargs["position_ids"] = _per_row(
                keep, torch.cat([virtual, positions + n], 1), torch.cat([positions, after], 1)
            )
        return (), kwargs

    @classmethod
    def batched(
        cls, units: Sequence[PromptUnit | None], index: torch.Tensor, output: Any, call: SiteCall
    ) -> Any:
        """Drop every row's n virtual positions: the first n, or the last n for rows without a prompt."""
        first = next(u for u in units if u is not None)
        if not getattr(first._call, "prepended", False):
            return output
        first._call.prepended = False
        keep = getattr(first._call, "keep", None)
        first._call.keep = None
        if keep is None:
            return drop_virtual(output, first.n)
        return drop_virtual_rows(output, first.n, keep)


def _per_row(keep: torch.Tensor, front: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """Row b of `front` where keep[b], of `back` elsewhere (both (B, ...))."""
    return torch.where(keep.view(-1, *([1] * (front.ndim - 1))), front, back)


def drop_virtual_rows(output: Any, n: int, keep: torch.Tensor) -> Any:
    """`drop_virtual` for a batch whose rows put their n virtual positions first (keep) or last."""
    start = n * keep.long()  # (B,): n where the prompt is in front, 0 where it is behind

    def take(value: torch.Tensor, dim: int) -> torch.Tensor:
        length = value.shape[dim] - n
        picks = start.to(value.device).view(-1, 1) + torch.arange(length, device=value.device)  # (B, length)
        shape = [value.shape[0]] + [1] * (value.ndim - 1)
        shape[dim] = length
        index = picks.view(shape).expand(*value.shape[:dim], length, *value.shape[dim + 1 :])
        return value.gather(dim, index)

    if isinstance(output, torch.Tensor):
        return take(output, 1)
    if isinstance(output, dict):  # a transformers ModelOutput: its fields, changed in place
        for key in list(output.keys()):
            value = output[key]
            if key == "last_hidden_state":
                output[key] = take(value, 1)
            elif key == "hidden_states" and isinstance(value, tuple):
                output[key] = tuple(take(h, 1) for h in value)
            elif key == "attentions" and isinstance(value, tuple):
                output[key] = tuple(take(take(a, 2), 3) for a in value)  # (B, heads, q, k): both axes
        return output
    if isinstance(output, tuple):
        return (take(output[0], 1), *output[1:])
    return output


def drop_virtual(output: Any, n: int) -> Any:
    """Remove the first n sequence positions from a stack's output (a ModelOutput, tuple or tensor)."""
    if isinstance(output, torch.Tensor):
        return output[:, n:]
    if isinstance(output, dict):  # a transformers ModelOutput: its fields, changed in place
        for key in list(output.keys()):
            value = output[key]
            if key == "last_hidden_state":
                output[key] = value[:, n:]
            elif key == "hidden_states" and isinstance(value, tuple):
                output[key] = tuple(h[:, n:] for h in value)
            elif key == "attentions" and isinstance(value, tuple):
                output[key] = tuple(a[..., n:, n:] for a in value)  # (B, heads, q, k): both axes
        return output
    if isinstance(output, tuple):
        return (output[0][:, n:], *output[1:])
    return output


def _config(module: nn.Module) -> Any:
    return getattr(module, "config", None)


def _use_cache(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    """The call's `use_cache`, or the model config's default when the call leaves it unset."""
    use_cache = kwargs.get("use_cache")
    return bool(getattr(_config(module), "use_cache", False) if use_cache is None else use_cache)


def _prompt_init(config: PromptConfig, view: ModelView, embeddings: nn.Module) -> torch.Tensor:
    """The initial (n, D) prompt, per `config.init`."""
    weight = cast(torch.Tensor, embeddings.weight).detach()  # (vocab, D)
    n = config.num_virtual_tokens
    vocab = weight.shape[0]
    if config.init == "random":
        std = 1.0 if weight.is_meta else float(weight.float().std())
        return torch.randn(n, weight.shape[1], device=weight.device) * std
    if config.init_text is not None:
        ids = _text_ids(config, view)
        ids = (ids * (n // len(ids) + 1))[:n]  # repeat to fill n, then cut (as PEFT does)
        index = torch.tensor(ids, device=weight.device)
    else:
        index = torch.randperm(vocab, device=weight.device)[:n] if vocab >= n else torch.randint(vocab, (n,))
    return weight[index.to(weight.device)].float().clone()


def _text_ids(config: PromptConfig, view: ModelView) -> list[int]:
    from transformers import AutoTokenizer

    name = config.tokenizer or getattr(getattr(view.model, "config", None), "_name_or_path", None)
    if not name:
        raise ValueError(
            "prompt.init_text: the model has no name or path to load its tokenizer from; set tokenizer="
        )
    tokenizer = AutoTokenizer.from_pretrained(name)
    ids = [int(i) for i in tokenizer(config.init_text, add_special_tokens=False)["input_ids"]]
    check(len(ids) > 0, "prompt", "init_text", f"{config.init_text!r} has no tokens")
    vocab = int(cast(torch.Tensor, view.model.get_input_embeddings().weight).shape[0])  # type: ignore[operator]
    check(max(ids) < vocab, "prompt", "tokenizer", f"token ids of {name} exceed the model's vocabulary")
    return ids


@register_method(
    "prompt", PromptUnit, "trainable virtual tokens prepended to the input embeddings (Lester et al. 2021)"
)
@dataclass(frozen=True)
class PromptConfig(ModuleConfig):
    """Prompt tuning settings.

    Attributes:
        num_virtual_tokens: n, the number of trainable input embeddings.
        init: "vocab" (embeddings of `init_text`'s tokens, or of n random vocabulary tokens) or "random"
            (N(0, s²), s the word embeddings' standard deviation).
        init_text: words whose token embeddings start the prompt (repeated or cut to n tokens).
        tokenizer: name or path of the tokenizer for `init_text` (default: the base model's own).
    """

    identity_at_init: ClassVar[bool] = False
    default_lr: ClassVar[float | None] = 3e-2

    num_virtual_tokens: int = 20
    init: Init = "vocab"
    init_text: str | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        check(n >= 1, "prompt", "num_virtual_tokens", f"must be >= 1, got {n}")
        check(self.init in get_args(Init), "prompt", "init", f"unknown {self.init!r}; use {get_args(Init)}")
        check(
            self.init_text is None or self.init == "vocab",
            "prompt",
            "init_text",
            'needs init="vocab" (the text\'s token embeddings start the prompt)',
        )
        check(self.init_text is None or self.init_text.strip() != "", "prompt", "init_text", "is empty")

    def build(self, view: ModelView) -> list[Attachment]:
        """One `PromptUnit` on the stack that embeds the input tokens."""
        get_embeddings = getattr(view.model, "get_input_embeddings", None)
        embeddings = get_embeddings() if get_embeddings is not None else None
        if not isinstance(getattr(embeddings, "weight", None), torch.Tensor):
            raise TargetError(f"prompt: this {view.model_type} model has no input word embeddings")
        assert embeddings is not None
        path = input_stack(view, "prompt")
        stack = view.module(path)
        prompt = _prompt_init(self, view, embeddings)
        return [Attachment(path, PromptUnit(prompt, embeddings, stack, is_causal_stack(view, path)))]
