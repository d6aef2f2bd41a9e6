"""One quantized base, four roles: policy, reference, value and reward share a single model.

The base causal LM is loaded once (4-bit NF4 through bitsandbytes, or unquantized) and carries three
peft LoRA adapters. A role is "which adapter is active", switched by flipping the active-adapter
field of every LoRA layer, never by copying weights:

    role        adapter     output (what the trainer needs)
    policy      policy      hidden (B, T, H): last hidden state before lm_head, for the fused vocab ops
    reference   (none)      hidden (B, T, H), no grad: the base with every adapter disabled
    values      value       values (B, T): scalar head on the value adapter's hidden state, or on the
                            policy's hidden state when value_mode="policy_head" (no extra base forward)
    reward      reward      scores (B,): scalar head on the hidden state of the last real token; (B, k)
                            with StackConfig.reward_heads = k > 1 (an ensemble of heads on one adapter)

The lm_head is never adapted: every role shares `stack.lm_head_weight` (V, H) and `stack.lm_head_bias` (V,)
or None; a model that multiplies its logits by a constant (Cohere's logit_scale, Granite's logits_scaling)
has it in `stack.logit_scale`, folded into the temperature (`stack.head`); any other transform of the logits
(a soft-cap) is refused when the stack loads (model.loading.logit_scale).

Letters: B batch, T time, H hidden, V vocab.

peft's own `set_adapter(name)` makes only that adapter trainable (it flips requires_grad), and
`enable_adapters(True)` does the same, so a PPO step that runs policy then value would silently lose
the policy's gradients. Trainability here is set once, by `set_trainable`, and role switches leave
it alone. The routing is read during the forward only (autograd records which LoRA weights were
used), so backward needs no routing; activation checkpointing, which re-runs the forward inside
backward, would see the wrong adapter and is therefore not enabled here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ..core.config import from_data
from ..core.device import resolve_device, resolve_dtype
from ..core.files import atomic_write_files, check_safetensors
from ..core.tensors import last_token_index
from ..errors import ConfigError
from .config import MODEL_PRESETS, STACK_FILE, StackConfig, read_stack_meta
from .loading import load_causal_lm, logit_scale
from .prefix import plan_prefixes, prefix_hidden

ROLES_WITH_HEADS = ("value", "reward")
HEADS_FILE = "heads.safetensors"


class ScalarHead(nn.Module):
    """hidden (..., H) -> scalar (...), computed in fp32 whatever the base dtype; with n > 1 outputs,
    (..., n): n heads, each row of the weight its own random init (an ensemble)."""

    def __init__(self, hidden_size: int, n: int = 1):
        super().__init__()
        self.proj = nn.Linear(hidden_size, n)
        nn.init.normal_(self.proj.weight, std=hidden_size**-0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.proj(hidden.float())
        return out.squeeze(-1) if out.shape[-1] == 1 else out


class ModelStack:
    """One base model, adapters for policy/value/reward, scalar heads; see the module docstring.

    Build with `ModelStack.build(StackConfig(...))`; reload saved adapters and heads with
    `ModelStack.from_saved(dir)` (the base is rebuilt from the name stored in stack.json)."""

    def __init__(self, config: StackConfig, model, tokenizer, heads: nn.ModuleDict, device: torch.device,
                 scale: float = 1.0):  # fmt: skip
        self.config = config
        self.logit_scale = scale  # the model's logits = logit_scale * (hidden @ lm_head_weight.T + lm_head_bias)
        self.model = model  # peft PeftModel around the causal LM
        self.tokenizer = tokenizer
        self.heads = heads  # "value" and/or "reward" ScalarHead
        self.device = device
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        causal_lm = model.get_base_model()
        self._decoder = getattr(causal_lm, causal_lm.base_model_prefix)  # the model without lm_head
        self._lm_head = causal_lm.get_output_embeddings()
        if any(isinstance(m, BaseTunerLayer) for m in self._lm_head.modules()):
            raise ConfigError("target_modules adapts lm_head; the shared lm_head must stay unadapted")

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def build(cls, config: StackConfig) -> ModelStack:
        from peft import LoraConfig, get_peft_model

        config.validate()
        if config.value_mode == "policy_head":  # the value is a head on the policy: no value adapter
            config = dataclasses.replace(config, adapters=tuple(a for a in config.adapters if a != "value"))
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.compute_dtype, device)
        base, tokenizer = load_causal_lm(config, device, dtype)
        scale = logit_scale(base, config.model)  # refuses logits the fused kernels would get wrong
        target = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=target, bias="none", task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning per build)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(config.seed + 1)
            first, *rest = config.adapters
            model = get_peft_model(base, lora, adapter_name=first)
            for name in rest:
                model.add_adapter(name, lora)
            hidden = base.config.hidden_size
            outputs = {"value": 1, "reward": config.reward_heads}
            heads = nn.ModuleDict({r: ScalarHead(hidden, outputs[r]) for r in ROLES_WITH_HEADS if r in config.adapters})
            if config.value_mode == "policy_head" and "policy" in config.adapters:
                heads["value"] = ScalarHead(hidden)
        heads.to(device)
        stack = cls(config, model, tokenizer, heads, device, scale)
        stack.set_trainable(*[r for r in ("policy", "value") if r in stack.roles])
        return stack

    @property
    def roles(self) -> tuple[str, ...]:
        """Trainable roles present: adapters, plus "value" when it is a head on the policy."""
        roles = tuple(self.config.adapters)
        if self.config.value_mode == "policy_head" and "value" in self.heads and "value" not in roles:
            roles += ("value",)
        return roles

    # ---- adapters and trainability -------------------------------------------------------------

    @contextlib.contextmanager
    def _active(self, adapter: str | None) -> Iterator[None]:
        """Route every LoRA layer through `adapter` (None: the bare base) without touching
        requires_grad, and restore the previous routing afterwards."""
        saved = [(m._active_adapter, m._disable_adapters) for m in self._tuner_layers]
        if adapter is not None and adapter not in self.config.adapters:
            raise KeyError(f"no {adapter!r} adapter on this stack (adapters: {self.config.adapters})")
        for m in self._tuner_layers:
            if adapter is None:
                m._disable_adapters = True
            else:
                m._active_adapter = [adapter]
                m._disable_adapters = False
        try:
            yield
        finally:
            for m, (active, disabled) in zip(self._tuner_layers, saved):
                m._active_adapter, m._disable_adapters = active, disabled

    def named_role_parameters(self, role: str) -> list[tuple[str, nn.Parameter]]:
        """The parameters a role trains: its LoRA weights (if it has an adapter) and its head."""
        params = []
        if role in self.config.adapters:
            tag = f".{role}."
            params += [(n, p) for n, p in self.model.named_parameters() if "lora_" in n and tag in n]
        if role in self.heads:
            params += [(f"heads.{role}.{n}", p) for n, p in self.heads[role].named_parameters()]
        if not params:
            raise KeyError(f"no {role!r} role on this stack (roles: {self.roles})")
        return params

    def role_parameters(self, role: str) -> list[nn.Parameter]:
        return [p for _, p in self.named_role_parameters(role)]

    def set_trainable(self, *roles: str) -> None:
        """Exactly these roles' adapters and heads require grad; the base and other roles are frozen."""
        if "reference" in roles:
            raise ValueError("the reference adapter is frozen by definition")
        for name, p in self.model.named_parameters():
            p.requires_grad_(False)
        for p in self.heads.parameters():
            p.requires_grad_(False)
        for role in roles:
            for p in self.role_parameters(role):
                p.requires_grad_(True)

    def train(self, mode: bool = True) -> ModelStack:
        self.model.train(mode)
        self.heads.train(mode)
        return self

    def eval(self) -> ModelStack:
        return self.train(False)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode inside (no LoRA dropout: a fixed policy or the reference is a fixed function), the
        previous mode afterwards."""
        was_training = self.model.training
        self.train(False)
        try:
            yield
        finally:
            self.train(was_training)

    # ---- roles -------------------------------------------------------------------------------

    def hidden_states(
        self, adapter: str | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        prefix_lengths: torch.Tensor | None = None, **cache,
    ) -> torch.Tensor:  # fmt: skip
        """(B, T) token ids -> (B, T, H) last hidden state (final norm applied, lm_head not).

        Positions count real tokens only (cumsum of the mask), so a left-padded prompt sits at the
        positions it had alone, as in generation. `cache` passes position_ids / past_key_values /
        cache_position through for KV-cached decoding (model.generation); with past_key_values,
        attention_mask covers the cached tokens too.

        prefix_lengths (B,): how many leading real tokens of each row are its prompt; rows whose prompts
        are equal then run them once (model.prefix, when config.shared_prefix), and positions inside a
        shared prompt but its last come back as zeros (nothing reads them: prompt tokens carry no label)."""
        if prefix_lengths is not None and self.config.shared_prefix:
            plan = plan_prefixes(input_ids, attention_mask, prefix_lengths)
            if plan is not None:
                return prefix_hidden(self, adapter, plan)
        if "position_ids" not in cache:
            cache["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with self._active(adapter):
            out = self._decoder(input_ids=input_ids, attention_mask=attention_mask,
                                use_cache="past_key_values" in cache, **cache)  # fmt: skip
        return out.last_hidden_state

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, H), shared by every role: logits = logit_scale * (hidden @ lm_head_weight.T + lm_head_bias)."""
        return self._lm_head.weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        """(V,) the lm_head's bias (Phi, GPT-J), or None."""
        return self._lm_head.bias

    def head(self, temperature: float = 1.0) -> dict:
        """Keyword arguments of rlhf_kernels.linear_logprobs / linear_token_stats for softmax(logits / T) with
        the model's logits: the bias, and the logit scale s folded into the temperature,
        softmax(s x / T) = softmax(x / (T / s))."""
        return {"bias": self.lm_head_bias, "temperature": temperature / self.logit_scale}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states -> (..., V) fp32 logits as the model computes them (generation's
        next-token distribution; nothing else materialises logits)."""
        return nn.functional.linear(hidden, self.lm_head_weight, self.lm_head_bias).float() * self.logit_scale

    def release_lm_head(self) -> int:
        """Free the (V, H) lm_head weight of a stack that never computes log-probs (the reward model's
        training stack: TRL's sequence classifier has no lm_head either); returns the bytes freed, 0
        when the weight is the input embedding's (tied). lm_head_weight is empty afterwards."""
        weight = self._lm_head.weight
        if weight is self._decoder.get_input_embeddings().weight or weight.numel() == 0:
            return 0
        freed = weight.numel() * weight.element_size()
        self._lm_head.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
        return freed

    def policy(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """(B, T, H) hidden states of the policy adapter (prefix_lengths: hidden_states)."""
        return self.hidden_states("policy", input_ids, attention_mask, prefix_lengths)

    @torch.no_grad()
    def reference(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """(B, T, H) hidden states of the reference policy; never has a grad. The reference is the
        frozen "reference" adapter when the stack has one (a copy of a policy that started from a
        trained adapter: there the bare base would be the wrong reference), else the bare base."""
        return self.hidden_states(self.reference_adapter, input_ids, attention_mask, prefix_lengths)

    @property
    def reference_adapter(self) -> str | None:
        """The adapter the reference role runs (None: every adapter off)."""
        return "reference" if "reference" in self.config.adapters else None

    def copy_adapter(self, src: str, dst: str) -> None:
        """Copy adapter `src`'s LoRA weights into adapter `dst` (same LoRA config), e.g. the policy's
        starting weights into the frozen reference."""
        targets = dict(self.named_role_parameters(dst))
        with torch.no_grad():
            for name, p in self.named_role_parameters(src):
                if name.startswith("heads."):
                    continue
                twin = name.replace(f".{src}.", f".{dst}.")
                targets.pop(twin).copy_(p)
        if any(not n.startswith("heads.") for n in targets):
            raise KeyError(f"adapter {dst!r} has weights that {src!r} lacks: {sorted(targets)[:3]}")

    def init_policy(self, saved_dir: str, *, frozen_reference: bool) -> None:
        """Start the policy from a saved adapter (`saved_dir`: an `engine sft`, `dpo` or `ppo` output;
        "" keeps the fresh one) and, with frozen_reference, copy the starting weights into the frozen
        "reference" adapter: a policy that starts from a trained adapter is compared with it, not with
        the bare base. One place for PPO and DPO."""
        if saved_dir:
            self.load_roles(saved_dir, roles=("policy",))
        if frozen_reference:
            self.copy_adapter("policy", "reference")

    def values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, policy_hidden: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """(B, T) value per position. value_mode="policy_head" reads `policy_hidden` (B, T, H) when
        given (no second base forward); value_mode="adapter" always runs the value adapter."""
        if self.config.value_mode == "policy_head":
            if policy_hidden is None:
                policy_hidden = self.policy(input_ids, attention_mask, prefix_lengths)
            return self.heads["value"](policy_hidden)
        return self.heads["value"](self.hidden_states("value", input_ids, attention_mask, prefix_lengths))

    def policy_and_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, T, H) policy hidden, (B, T) values): one base forward in policy_head mode, two otherwise."""
        hidden = self.policy(input_ids, attention_mask)
        return hidden, self.values(input_ids, attention_mask, policy_hidden=hidden)

    def reward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """(B,) reward-model score read at the last real token of each sequence; (B, k) for k reward heads
        (prefix_lengths: hidden_states; the last real token is never inside a shared prompt)."""
        hidden = self.hidden_states("reward", input_ids, attention_mask, prefix_lengths)  # (B, T, H)
        last = last_token_index(attention_mask)
        return self.heads["reward"](hidden[torch.arange(hidden.shape[0], device=hidden.device), last])

    # ---- save / load ---------------------------------------------------------------------------

    def role_state_dict(self, role: str) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.named_role_parameters(role)}

    def save(self, out_dir: str, roles: tuple[str, ...] | None = None) -> list[str]:
        """Write the roles' adapters and heads (not the base) to out_dir; returns the files written.

        stack.json names the base (preset name or path) and the LoRA config, so `from_saved` can
        rebuild it; adapters are `adapter_<role>.safetensors`, heads `heads.safetensors`. The files are
        written together and atomically (core.files.atomic_write_files: every temp file first, then
        the renames, stack.json last), with the usual mode: a kill or a full disk mid-save leaves the
        previous files whole."""
        from safetensors.torch import save

        roles = tuple(roles or self.roles)
        os.makedirs(out_dir, exist_ok=True)
        files = {}
        heads = {}
        for role in roles:
            state = self.role_state_dict(role)
            heads.update({n: t for n, t in state.items() if n.startswith("heads.")})
            lora = {n: t for n, t in state.items() if not n.startswith("heads.")}
            if lora:
                files[os.path.join(out_dir, f"adapter_{role}.safetensors")] = save(lora)
        if heads:
            files[os.path.join(out_dir, HEADS_FILE)] = save(heads)
        meta = {"stack": dataclasses.asdict(self.config), "roles": list(roles)}
        files[os.path.join(out_dir, STACK_FILE)] = (json.dumps(meta, indent=2) + "\n").encode()
        atomic_write_files([(path, lambda f, data=data: f.write(data)) for path, data in files.items()])
        return list(files)

    def load_roles(self, saved_dir: str, roles: tuple[str, ...] | None = None) -> None:
        """Load adapters and heads written by `save` into this stack (weights copied in place)."""
        from safetensors.torch import load_file

        meta = read_stack_meta(saved_dir)
        # adapters only make sense on the base (and with the LoRA scale) they were trained with
        for key in ("model", "quantization", "lora_r", "lora_alpha", "target_modules", "seed"):
            saved, mine = meta["stack"].get(key), getattr(self.config, key)
            if isinstance(saved, list):
                saved = tuple(saved)
            if key == "seed" and self.config.model not in MODEL_PRESETS:
                continue  # the seed only names the random init of a preset base
            if saved != mine:
                raise ConfigError(f"{saved_dir}: saved with {key}={saved!r}, this stack has {key}={mine!r}")
        roles = tuple(roles or meta["roles"])
        state = {}
        for role in roles:
            path = os.path.join(saved_dir, f"adapter_{role}.safetensors")
            if role in self.config.adapters:
                if not os.path.isfile(path):
                    raise ConfigError(f"{path}: missing (the saved stack has roles {meta['roles']})")
                check_safetensors(path)  # a truncated copy is one line naming it, not a loader traceback
                state.update(load_file(path))
        heads_path = os.path.join(saved_dir, HEADS_FILE)
        if os.path.isfile(heads_path):
            check_safetensors(heads_path)
            state.update({n: t for n, t in load_file(heads_path).items() if n.split(".")[1] in roles})
        params = dict(p for role in roles for p in self.named_role_parameters(role))
        missing = sorted(set(params) - set(state))
        if missing:
            raise ConfigError(f"{saved_dir}: no saved weights for {missing[0]} (and {len(missing) - 1} more)")
        with torch.no_grad():
            for name, p in params.items():
                if state[name].shape != p.shape:
                    raise ConfigError(
                        f"{saved_dir}: {name} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}"
                    )
                p.copy_(state[name])

    @classmethod
    def from_saved(cls, saved_dir: str, **overrides) -> ModelStack:
        """Rebuild the base named in saved_dir/stack.json and load the saved roles onto it."""
        meta = read_stack_meta(saved_dir)
        config = dataclasses.replace(from_data(StackConfig, meta["stack"], "stack"), **overrides)
        stack = cls.build(config)
        stack.load_roles(saved_dir)
        return stack

    # ---- memory --------------------------------------------------------------------------------

    def memory_report(self) -> dict:
        """Parameter counts and bytes: the shared base, each adapter, each head, and the total.

        A 4-bit weight counts its logical parameters (2 per stored byte) and its bytes include the
        quantization state (absmax, nested absmax, code book)."""
        tag = {role: f".{role}." for role in self.config.adapters}
        adapter_params = {
            id(p): role for n, p in self.model.named_parameters() if "lora_" in n for role in tag if tag[role] in n
        }
        head_ids = {id(p): role for role in self.heads for p in self.heads[role].parameters()}
        report = {"base": {"params": 0, "bytes": 0}}
        for role in self.config.adapters:
            report[f"adapter:{role}"] = {"params": 0, "bytes": 0}
        for role in self.heads:
            report[f"head:{role}"] = {"params": 0, "bytes": 0}
        seen = set()
        for p in list(self.model.parameters()) + list(self.heads.parameters()):
            if id(p) in seen:  # tied embeddings count once
                continue
            seen.add(id(p))
            if id(p) in head_ids:
                key = f"head:{head_ids[id(p)]}"
            elif id(p) in adapter_params:
                key = f"adapter:{adapter_params[id(p)]}"
            else:
                key = "base"
            n, b = _param_size(p)
            report[key]["params"] += n
            report[key]["bytes"] += b
        report["total"] = {
            "params": sum(v["params"] for v in report.values()),
            "bytes": sum(v["bytes"] for v in report.values()),
        }
        return report


def _param_size(p: torch.Tensor) -> tuple[int, int]:
    """(logical parameter count, bytes including quantization state) of one parameter."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is None:
        return p.numel(), p.numel() * p.element_size()
    nbytes = p.numel() * p.element_size()
    for v in quant_state.as_dict(packed=True).values():
        if isinstance(v, torch.Tensor):
            nbytes += v.numel() * v.element_size()
    shape = quant_state.shape
    return int(torch.Size(shape).numel()), nbytes


def build_policy_stack(stack_config: StackConfig, init_adapter: str, reference_mode: str = "base"):
    """The (4-bit) base with the trainable policy adapter, started from `init_adapter` when given; with
    reference_mode="init" a frozen "reference" adapter holds the starting weights (ModelStack.init_policy,
    as in PPO)."""
    adapters = ("policy", "reference") if reference_mode == "init" else ("policy",)
    stack = ModelStack.build(dataclasses.replace(stack_config, adapters=adapters))
    stack.init_policy(init_adapter, frozen_reference=reference_mode == "init")
    stack.set_trainable("policy")
    return stack
