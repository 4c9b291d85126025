"""Shared-base PPO: policy, reference, reward and value as LoRA adapters on one frozen copy of the SFT model.

    policy    = base + "default" adapter (trained; PEFT's and TRL's name for the policy adapter)
    reference = base with no adapter (PPO, RLOO and GRPO alike: no "ref" copy of the policy adapter)
    reward    = base + "reward" adapter (stage 2's, frozen) + its score head (frozen)
    value     = base + "value" adapter (starts as the reward adapter, trained) + a copy of the score head (trained)

TRL 1.12's PPOTrainer reads a reward or value model as `getattr(model, model.base_model_prefix)` (the body)
and `model.score` (the head); `AdapterScoreModel` is such a model over the shared body. PEFT's own switches
(`set_adapter`, `disable_adapter`, `enable_adapters`) also rewrite `requires_grad`: the reference forward
alone would freeze the value adapter. `AdapterRouter` only chooses which adapter each layer computes with;
`requires_grad` is set once, here, and never touched again. Under gradient checkpointing the recomputation
runs in backward, outside any forward's context; the router hands torch's checkpoint a context that
recomputes with the adapter the forward used. The settings it needs are checked in
`kochat_trl.config.shared_base_checks`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kochat_trl.errors import ConfigError

POLICY, REWARD, VALUE = "default", "reward", "value"
TRAINED_ADAPTERS = (POLICY, VALUE)
# PEFT's file names (peft.utils.CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME), spelled out so that importing this module
# does not import peft (and with it bitsandbytes).
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_HEAD_PREFIX = "base_model.model.score."  # where PEFT saves a SEQ_CLS adapter's `score` (modules_to_save)


class AdapterRouter:
    """Which adapter the shared base's PEFT layers compute with (None: none, the reference)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.current: str | None = POLICY
        self.refresh()

    def refresh(self) -> None:
        """Find the PEFT layers again (after adapters were added or deleted) and route the current adapter."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self._lora_layers = [module for module in self.model.modules() if isinstance(module, BaseTunerLayer)]
        self._wrappers = [module for module in self.model.modules() if isinstance(module, AuxiliaryTrainingWrapper)]
        self._route(self.current)

    def _route(self, adapter: str | None) -> None:
        # LoRA layers skip active names they do not hold; a modules_to_save wrapper (the policy's lm_head) falls
        # back to the original module when its active list is empty.
        for layer in self._lora_layers:
            layer._active_adapter = [] if adapter is None else [adapter]
        for wrapper in self._wrappers:
            wrapper._active_adapter = [adapter] if adapter in getattr(wrapper, "modules_to_save", {}) else []
        self.current = adapter

    @contextmanager
    def use(self, adapter: str | None) -> Iterator[None]:
        """Compute with `adapter` inside the block, then with whatever was active before."""
        previous = self.current
        self._route(adapter)
        try:
            yield
        finally:
            self._route(previous)

    def checkpoint_contexts(self) -> tuple[Any, Any]:
        """torch.utils.checkpoint's `context_fn`: forward as is, recompute with the adapter active now."""
        return nullcontext(), self.use(self.current)


class _RoutedBody:
    """The base's transformer body, run with one adapter. A plain object, not a submodule: the weights belong to
    the policy, so they are counted, moved, wrapped by DDP and saved once, through it."""

    def __init__(self, body: nn.Module, router: AdapterRouter, adapter: str, frozen: bool = False) -> None:
        self.body, self.router, self.adapter, self.frozen = body, router, adapter, frozen

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.router.use(self.adapter), _in_eval_mode(self.body) if self.frozen else nullcontext():
            return self.body(*args, **kwargs)


@contextmanager
def _in_eval_mode(module: nn.Module) -> Iterator[None]:
    """The frozen reward model scores without dropout, whatever mode the trainer left the shared base in."""
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for child, training in modes:
            child.training = training


class AdapterScoreModel(nn.Module):
    """A reward or value model over the shared base: the body with `adapter` active, and its own score head.

    Called like a `*ForSequenceClassification` model: `.logits` is the score at the last non-pad token."""

    base_model_prefix = "body"

    def __init__(
        self, shared: SharedBase, adapter: str, score: nn.Linear, pad_token_id: int, frozen: bool = False
    ) -> None:
        super().__init__()
        self.body = _RoutedBody(shared.body, shared.router, adapter, frozen)
        self.score = score
        self.adapter, self.pad_token_id = adapter, pad_token_id
        object.__setattr__(self, "_shared", shared)  # not a submodule (see _RoutedBody)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        logits = self.score(hidden)
        # The rightmost non-pad token, as transformers' sequence classifiers pick it.
        positions = torch.arange(input_ids.shape[-1], device=logits.device)
        last = (positions * (input_ids != self.pad_token_id).to(logits.device)).argmax(-1)
        return SequenceClassifierOutput(logits=logits[torch.arange(len(input_ids), device=logits.device), last])

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """The adapter and head as a SEQ_CLS LoRA adapter folder: `AutoPeftModelForSequenceClassification` loads
        it on the SFT base, `kochat-trl merge` merges it. (`state_dict=` from callers is ignored: the adapter's
        weights live in the policy.)"""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = get_peft_model_state_dict(self._shared.policy, adapter_name=self.adapter)
        weights.update({_HEAD_PREFIX + name: tensor for name, tensor in self.score.state_dict().items()})
        save_file(
            {name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()},
            str(folder / ADAPTER_WEIGHTS),
            metadata={"format": "pt"},
        )
        self._shared.reward_adapter_config.save_pretrained(str(folder))

    def load_adapter_weights(self, folder: str | Path) -> None:
        """Load what `save_pretrained` wrote back into this adapter and head (resume), strictly."""
        lora, head = _read_adapter_weights(Path(folder))
        _load_lora(self._shared.policy, lora, self.adapter, Path(folder))
        self.score.load_state_dict(head)


@dataclass
class SharedBase:
    """The roles over one base (PPO: four; RLOO/GRPO: policy, reference, reward); `policy` is the PEFT model that
    owns every weight but the heads."""

    policy: Any
    router: AdapterRouter
    body: nn.Module
    reward_adapter_config: Any
    reward: AdapterScoreModel | None = None
    value: AdapterScoreModel | None = None

    @property
    def roles(self) -> list[AdapterScoreModel]:
        return [role for role in (self.reward, self.value) if role is not None]

    def set_trainable(self) -> None:
        """requires_grad on the policy adapter, the value adapter and the value head; off everywhere else."""
        for name, parameter in self.policy.named_parameters():
            parameter.requires_grad_(_adapter_of(name) in TRAINED_ADAPTERS)
        self.reward.score.requires_grad_(False)
        if self.value is not None:
            self.value.score.requires_grad_(True)

    def draw_policy_adapter(self) -> None:
        """Draw the policy adapter's initial weights anew from the global generator, through PEFT's own adapter
        creation: called where TRL would wrap a separate policy (`PPOTrainer(peft_config=...)`), it draws exactly
        what a separate-model run draws, so the two start from the same weights."""
        config = self.policy.peft_config[POLICY]
        with warnings.catch_warnings():  # "Adapter default was active which is now deleted": it is back next line
            warnings.filterwarnings("ignore", message=f"Adapter {POLICY} was active which is now deleted")
            self.policy.delete_adapter(POLICY)
        self.policy.add_adapter(POLICY, config)
        self.policy.set_adapter(POLICY)  # PEFT's notion of the active adapter (saving); routing is the router's
        self.router.refresh()
        self.set_trainable()

    @contextmanager
    def trainer_adds_no_adapter(self) -> Iterator[None]:
        """Around building TRL's RLOO/GRPOTrainer: given a PEFT model, it adds a "ref" adapter, a copy of the policy's,
        and computes the reference with it. Here the reference is the base with no adapter routed, as PPO's
        (`reference`; TRL falls back to `disable_adapter` when "ref" is gone): every adapter added inside is deleted
        on the way out (a copy of the policy adapter, its lm_head included, no longer trains beside it). It drew its
        weights from a forked generator, so every later sample is the one a separate-model run draws."""
        added_before, add_adapter = set(self.policy.peft_config), self.policy.add_adapter

        def add_without_drawing(*args: Any, **kwargs: Any) -> Any:
            with torch.random.fork_rng():
                return add_adapter(*args, **kwargs)

        self.policy.add_adapter = add_without_drawing
        try:
            yield
        finally:
            del self.policy.add_adapter
        for name in set(self.policy.peft_config) - added_before:
            self.policy.delete_adapter(name)
        self.router.refresh()
        self.set_trainable()

    def reference(self) -> Any:
        """Context in which the policy computes the reference: no adapter, `requires_grad` untouched."""
        return self.router.use(None)

    def trainable_names(self) -> list[str]:
        """Names (in the policy, then `value.score.*`) of every parameter that must train: policy adapter,
        value adapter, value head."""
        names = [name for name, _ in self.policy.named_parameters() if _adapter_of(name) in TRAINED_ADAPTERS]
        if self.value is None:
            return names
        return names + [f"value.score.{name}" for name, _ in self.value.score.named_parameters()]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter of the four roles, once: the policy's (base and all adapters), then both heads."""
        yield from self.policy.named_parameters()
        for role in self.roles:
            for name, parameter in role.score.named_parameters():
                yield f"{role.adapter}.score.{name}", parameter

    def parameter_counts(self) -> dict[str, int]:
        """Elements per part: the frozen base, each adapter, each head."""
        counts = {"base": 0, **{f"{name}_adapter": 0 for name in (POLICY, REWARD, VALUE)}}
        for name, parameter in self.policy.named_parameters():
            adapter = _adapter_of(name)
            key = "base" if adapter is None else f"{adapter}_adapter"
            counts[key] = counts.get(key, 0) + parameter.numel()
        counts["policy_adapter"] = counts.pop(f"{POLICY}_adapter")
        for role in self.roles:
            counts[f"{role.adapter}_head"] = sum(p.numel() for p in role.score.parameters())
        return counts


def build(
    causal_lm: nn.Module,
    policy_lora: Any,
    reward_adapter: str | Path,
    tokenizer: Any,
    gradient_checkpointing: bool = False,
    with_value: bool = True,
) -> SharedBase:
    """Wrap the SFT `causal_lm` with the policy adapter (`policy_lora`) and stage 2's reward adapter (as "reward",
    frozen, and, for PPO, as "value", trained), and build the reward (and value) models over its base."""
    from peft import get_peft_model

    policy = get_peft_model(causal_lm, policy_lora)
    reward_adapter = Path(reward_adapter)
    # PEFT saves every adapter of a model (the others in subfolders); PPO's output is the policy adapter alone.
    policy.save_pretrained = functools.partial(type(policy).save_pretrained, policy, selected_adapters=[POLICY])
    config = _adapter_config_on_causal_lm(reward_adapter)
    lora, head = _read_adapter_weights(reward_adapter)
    for adapter in (REWARD, VALUE) if with_value else (REWARD,):
        policy.add_adapter(adapter, config)
        _load_lora(policy, lora, adapter, reward_adapter)
    base = policy.get_base_model()
    body = getattr(base, base.base_model_prefix)
    shared = SharedBase(policy, AdapterRouter(policy), body, _reward_adapter_config(reward_adapter))
    dtype = base.get_input_embeddings().weight.dtype
    device = base.get_input_embeddings().weight.device
    shared.reward = AdapterScoreModel(
        shared, REWARD, _score_head(head, dtype, device), tokenizer.pad_token_id, frozen=True
    )
    if with_value:
        shared.value = AdapterScoreModel(shared, VALUE, _score_head(head, dtype, device), tokenizer.pad_token_id)
    shared.set_trainable()
    # Whoever disables the policy's adapters (TRL's RLOO/GRPO reference forward, the held-out KL) gets the reference
    # route: PEFT's own disable_adapter would rewrite requires_grad on exit (the value adapter frozen).
    policy.disable_adapter = shared.reference
    # Left in eval mode, as from_pretrained leaves a separate model: the held-out scoring before training switches
    # only the reward head to eval, and the base's dropout would change the scores (and the generator's state).
    policy.eval()
    if gradient_checkpointing:
        _checkpoint_with_routes(policy, base, shared.router)
    return shared


def _checkpoint_with_routes(policy: Any, base: nn.Module, router: AdapterRouter) -> None:
    """Gradient checkpointing whose recomputation uses the adapter of the forward it replays. TRL turns
    checkpointing off around every rollout and back on with no arguments (`unwrap_model_for_generation`, through
    the policy), which would drop `context_fn`: the policy's enable always passes it."""
    kwargs = {"use_reentrant": False, "context_fn": router.checkpoint_contexts}

    def enable(**_: Any) -> None:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)

    policy.gradient_checkpointing_enable = enable
    enable()


def _adapter_of(parameter_name: str) -> str | None:
    """The adapter a PEFT parameter belongs to (`...q_proj.lora_A.value.weight` -> "value"), None for the base."""
    from peft.tuners.lora import LoraLayer

    parts = parameter_name.split(".")
    owners = {*LoraLayer.adapter_layer_names, "modules_to_save"}
    return next((parts[i + 1] for i in range(len(parts) - 1) if parts[i] in owners), None)


def _reward_adapter_config(folder: Path) -> Any:
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(folder))


def _adapter_config_on_causal_lm(folder: Path) -> Any:
    """The reward adapter's LoRA settings for the causal LM's layers; its `score` head is handled apart."""
    config = _reward_adapter_config(folder)
    config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, False
    return config


def _read_adapter_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA weights, score head weights) of a SEQ_CLS adapter folder."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / ADAPTER_WEIGHTS), device="cpu")
    head = {
        name.removeprefix(_HEAD_PREFIX): tensor for name, tensor in weights.items() if name.startswith(_HEAD_PREFIX)
    }
    if "weight" not in head:
        raise ConfigError(
            f"{folder / ADAPTER_WEIGHTS}: no score head ({_HEAD_PREFIX}weight); train the reward model "
            "with use_peft: true (score is saved with the adapter)"
        )
    return {name: tensor for name, tensor in weights.items() if not name.startswith(_HEAD_PREFIX)}, head


def _load_lora(policy: Any, weights: dict[str, torch.Tensor], adapter: str, folder: Path) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(policy, weights, adapter_name=adapter)
    missing = [name for name in result.missing_keys if f".{adapter}." in name]
    if result.unexpected_keys or missing:
        raise ConfigError(
            f"{folder}: the adapter does not fit the policy's layers (unexpected "
            f"{list(result.unexpected_keys)[:2]}, missing {missing[:2]}); train the reward model on "
            "the same SFT model as the policy"
        )


def _score_head(weights: dict[str, torch.Tensor], dtype: torch.dtype, device: Any) -> nn.Linear:
    out_features, in_features = weights["weight"].shape
    head = nn.Linear(in_features, out_features, bias="bias" in weights, dtype=dtype, device=device)
    head.load_state_dict({name: tensor.to(dtype) for name, tensor in weights.items()})
    return head


class SharedBaseReference:
    """PPOTrainer mixin: with a shared base (`self.shared_base`), the reference is computed with no adapter routed,
    instead of TRL's `disable_adapter()`, whose exit makes only the policy adapter trainable again."""

    shared_base: SharedBase | None = None

    @contextmanager
    def null_ref_context(self) -> Iterator[None]:
        if self.shared_base is None:
            with super().null_ref_context():
                yield
            return
        with self.shared_base.reference():
            yield
