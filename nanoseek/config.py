"""ModelConfig: the DeepSeek-V3 hyper-parameters under their Hugging Face `config.json` names.

One dataclass is the single source of truth: presets build it, `config.json` files read and write
it (unknown keys are kept and written back), and `validate()` rejects impossible values with a
message that names the field. The V3 values are those of the released `config.json` [V3 §4.2].
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from nanoseek.presets import PRESETS


class ConfigError(ValueError):
    """A config value that cannot describe a model; the message names the field."""


# what `torch_dtype` may name (getattr(torch, name) of each is a float dtype)
TORCH_DTYPES = (
    "float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "float8_e5m2", "float", "half",
    "auto",
)  # fmt: skip
_ROPE_FLOATS = ("factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow", "attention_factor")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or float that is finite (JSON's NaN and Infinity are not)."""
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # width of the dense FFN in the first layers
    moe_intermediate_size: int = 2048  # width of one routed (and one shared) expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3  # layers [0, k) use a dense FFN, the rest MoE
    moe_layer_freq: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # MLA has no GQA; kept for HF compatibility
    # Multi-head Latent Attention [V3 §2.1.1]
    q_lora_rank: int | None = 1536  # None: one plain q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # DeepSeekMoE [V3 §2.1.2]
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    n_group: int | None = 8
    topk_group: int | None = 4
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3), "group_limited_greedy" (V2), "greedy"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    aux_loss_alpha: float = 0.0001  # sequence-wise balance loss weight [V3 eq. 17]
    seq_aux: bool = True
    # Multi-Token Prediction [V3 §2.2]
    num_nextn_predict_layers: int = 1
    mtp_loss_weight: float = 0.3  # lambda in L = L_main + lambda/D * sum_k L_k [V3 eq. 25]
    # positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    # the rest
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006  # V3 §4.2 init std
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    torch_dtype: str | None = "bfloat16"
    model_type: str = "deepseek_v3"
    architectures: list[str] = field(default_factory=lambda: ["DeepseekV3ForCausalLM"])
    quantization_config: dict[str, Any] | None = None
    # keys of a config.json that this dataclass does not know; written back unchanged
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if isinstance(self.rope_scaling, dict):
            # one normal form: both the old (`type`) and new (`rope_type`) key, or None
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind in ("default", None):
                self.rope_scaling = None
            else:
                self.rope_scaling = {**self.rope_scaling, "type": kind, "rope_type": kind}
        self.validate()

    # ----------------------------------------------------------------- derived quantities
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn_factor(self) -> float:
        rs = self.rope_scaling or {}
        if rs.get("type", rs.get("rope_type")) != "yarn":
            return 1.0
        return float(rs.get("factor", 1.0))

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk) times mscale(factor, mscale_all_dim)**2.

        YaRN's attention temperature lives entirely in the softmax scale for DeepSeek; using
        `mscale` instead of `mscale_all_dim`, or forgetting the square, is a known bug elsewhere.
        """
        scale = self.qk_head_dim**-0.5
        factor = self.yarn_factor
        mscale_all_dim = (self.rope_scaling or {}).get("mscale_all_dim", 0) or 0
        if factor > 1 and mscale_all_dim:
            m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
            scale = scale * m * m
        return scale

    @property
    def has_correction_bias(self) -> bool:
        """Does a checkpoint of this model hold the routers' `e_score_correction_bias`?

        V3-style routing (sigmoid scores or `noaux_tc` selection [V3 eqs. 15-16]) does, as
        DeepSeek-V3 and transformers' DeepseekV3 write it. V2-style routing (softmax with greedy
        or group-limited selection) has no such tensor: DeepSeek-V2 checkpoints lack it and
        transformers' DeepseekV2 reports it as unexpected.
        """
        return self.scoring_func == "sigmoid" or self.topk_method == "noaux_tc"

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer `layer_idx` (MTP layers count from num_hidden_layers) has a routed MoE."""
        return (
            bool(self.n_routed_experts)
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ConfigError(f"config field '{name}' = {getattr(self, name)!r}: {why}")

        for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "intermediate_size", "moe_intermediate_size", "max_position_embeddings",
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(name, "must be a positive integer")
        for name in ("num_nextn_predict_layers", "first_k_dense_replace", "moe_layer_freq"):
            if not _is_int(getattr(self, name)):
                bad(name, "must be an integer")
        for name in ("n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
                     "topk_group", "num_key_value_heads"):  # fmt: skip
            if getattr(self, name) is not None and not _is_int(getattr(self, name)):
                bad(name, "must be an integer or null")
        for name in ("attention_bias", "norm_topk_prob", "seq_aux", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        # a string ("1e-6"), NaN or inf here would only show up as NaN logits much later
        for name, low in (
            ("rope_theta", "> 0"), ("rms_norm_eps", "> 0"), ("routed_scaling_factor", "> 0"),
            ("initializer_range", ">= 0"), ("aux_loss_alpha", ">= 0"),
            ("mtp_loss_weight", ">= 0"), ("attention_dropout", ">= 0"),
        ):  # fmt: skip
            value = getattr(self, name)
            if not _is_number(value):
                bad(name, "must be a finite number")
            if value < 0 or (low == "> 0" and value == 0):
                bad(name, f"must be {low}")
        if self.torch_dtype is not None and (
            not isinstance(self.torch_dtype, str)
            or self.torch_dtype.removeprefix("torch.") not in TORCH_DTYPES
        ):
            bad("torch_dtype", f"must be one of {', '.join(TORCH_DTYPES)} or null")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            for i in ids:
                if i is not None and not (_is_int(i) and 0 <= i < self.vocab_size):
                    bad(name, f"must be a token id in [0, vocab_size={self.vocab_size}) or null")
        if self.q_lora_rank is not None and (
            not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0
        ):
            bad("q_lora_rank", "must be a positive integer or null (plain q_proj)")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even: RoPE rotates pairs of channels")
        if self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", "must be >= 0")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad(
                "first_k_dense_replace",
                f"must be in [0, num_hidden_layers={self.num_hidden_layers}]",
            )
        if self.moe_layer_freq < 1:
            bad("moe_layer_freq", "must be >= 1")
        if self.hidden_act != "silu":
            bad("hidden_act", "only 'silu' (SwiGLU) is supported")
        if self.scoring_func not in ("sigmoid", "softmax"):
            bad("scoring_func", "must be 'sigmoid' or 'softmax'")
        if self.topk_method not in ("noaux_tc", "group_limited_greedy", "greedy"):
            bad("topk_method", "must be 'noaux_tc', 'group_limited_greedy' or 'greedy'")
        if self.n_routed_experts:
            e = self.n_routed_experts
            groups = self.n_group or 1
            if not self.num_experts_per_tok or self.num_experts_per_tok < 1:
                bad("num_experts_per_tok", "must be >= 1 when n_routed_experts is set")
            if groups < 1:
                bad("n_group", "must be >= 1")
            if e % groups:
                bad("n_routed_experts", f"must be divisible by n_group={groups}")
            topk_group = self.topk_group or groups
            if not 1 <= topk_group <= groups:
                bad("topk_group", f"must be in [1, n_group={groups}]")
            if self.num_experts_per_tok > topk_group * (e // groups):
                bad(
                    "num_experts_per_tok",
                    f"exceeds the experts in the kept groups (topk_group={topk_group} x "
                    f"{e // groups} experts per group)",
                )
            if self.topk_method == "noaux_tc" and groups > 1 and e // groups < 2:
                bad("n_group", "noaux_tc scores a group by its top-2 experts: groups need >= 2")
        if self.n_shared_experts is not None and self.n_shared_experts < 0:
            bad("n_shared_experts", "must be >= 0")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                bad("rope_scaling", "must be an object or null")
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "default"))
            if kind not in ("yarn", "default", None):
                bad("rope_scaling", f"type {kind!r} is not supported (use 'yarn' or null)")
            for key in _ROPE_FLOATS:
                value = self.rope_scaling.get(key)
                if value is not None and not _is_number(value):  # null: the default
                    bad("rope_scaling", f"'{key}' must be a finite number")
            if "truncate" in self.rope_scaling and not isinstance(
                self.rope_scaling["truncate"], bool
            ):
                bad("rope_scaling", "'truncate' must be true or false")
            if kind == "yarn":
                orig = self.rope_scaling.get("original_max_position_embeddings", 0)
                if not _is_int(orig):
                    bad("rope_scaling", "'original_max_position_embeddings' must be an integer")
                if float(self.rope_scaling.get("factor", 0)) < 1:
                    bad("rope_scaling", "yarn 'factor' must be >= 1")
                if int(self.rope_scaling.get("original_max_position_embeddings", 0)) <= 0:
                    bad("rope_scaling", "yarn needs a positive 'original_max_position_embeddings'")

    # ----------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        # newer transformers write `rope_parameters` (rope_theta + rope_type + the yarn keys)
        params = d.pop("rope_parameters", None)
        if params is not None and d.get("rope_scaling") is None:
            params = dict(params)
            if "rope_theta" in params:
                d.setdefault("rope_theta", params.pop("rope_theta"))
            if params.get("rope_type", "default") not in ("default", None):
                d["rope_scaling"] = params
        # HF aliases
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        extra = {k: v for k, v in d.items() if k not in known}
        kwargs = {k: v for k, v in d.items() if k in known}
        if kwargs.get("num_nextn_predict_layers") is None:
            kwargs["num_nextn_predict_layers"] = 0
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if d["quantization_config"] is None:
            del d["quantization_config"]
        d.update(self.extra)
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError; nesting too deep
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(data)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ModelConfig:
        return cls.from_json_file(os.path.join(directory, "config.json"))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
