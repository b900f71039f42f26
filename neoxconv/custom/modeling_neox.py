"""A GPT-NeoX dense transformer as a Hugging Face causal LM (custom code written by neoxconv).

Copied verbatim into an export next to ``configuration_neox.py``; it depends on torch and
transformers only. Load the export with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.

The model computes what GPT-NeoX's ``megatron/model/transformer.py`` computes for the same weights
merged over tensor-parallel ranks, in the model's dtype, with NeoX's precision choices:

* RMSNorm normalises in fp32 and rounds once after the scale; LayerNorm is torch's kernel.
* Rotary cos/sin come from fp32 inverse frequencies and fp32 positions, then are cast to the
  model dtype. Sinusoidal positions and ALiBi slopes are computed in the model dtype (NeoX keeps
  them in buffers that are cast with the model).
* Attention scores are computed in the model dtype (plus the ALiBi bias in the model dtype), the
  masked softmax in fp32, the probabilities are cast back before multiplying V.
* Activations NeoX runs as fused JIT kernels (tanh GELU, ONNX-safe GELU, mish, swish) are
  evaluated in fp32 and rounded once.

Weights are unfused, with Hugging Face names: ``q_proj``/``k_proj``/``v_proj``/``o_proj``,
``up_proj``/``gate_proj``/``down_proj``, ``input_layernorm``/``post_attention_layernorm``,
``self_attn.qk_norm``, ``embed_tokens``, ``embed_positions`` (learned positions), ``norm``,
``lm_head`` (untied only). The exact semantics are in neoxconv's ``docs/custom-export.md``.
"""

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_neox import CUSTOM_CODE_VERSION, NeoXCustomConfig

try:  # transformers >= 5: initialisers that leave weights loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # transformers 4.x
    from torch.nn import init

__version__ = "1.0"
if CUSTOM_CODE_VERSION != __version__:
    raise ImportError(f"configuration_neox.py is version {CUSTOM_CODE_VERSION}, modeling_neox.py {__version__}")


# transformers < 4.46 has no generic prepare_inputs_for_generation (the mixin's raises).
_OWN_PREPARE_INPUTS = "input_ids" not in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters


def _cache_key(output_class):
    """Name of the KV-cache field: ``cache`` since transformers 5.2x, ``past_key_values`` before."""
    return "cache" if "cache" in output_class.__dataclass_fields__ else "past_key_values"


# --------------------------------------------------------------------------------------------
# Activations (NeoX megatron/model/activations.py)
# --------------------------------------------------------------------------------------------


def _in_fp32(fn):
    """Evaluate ``fn`` in fp32 and round once to the input dtype, as NeoX's fused JIT kernels do."""
    return lambda x: fn(x.float()).to(x.dtype)


_ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf GELU
    "gelu_tanh": _in_fp32(lambda x: x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))),
    "gelu_erf_onnx": _in_fp32(lambda x: x * 0.5 * (torch.erf(x / 1.41421) + 1.0)),
    "relu": F.relu,
    "softsign": F.softsign,
    "swish": F.silu,  # NeoX swish(x, beta=1) = x * sigmoid(x), a fused JIT kernel: one rounding
    "silu": F.silu,
    "mish": _in_fp32(lambda x: x * torch.tanh(F.softplus(x))),
    # gated: output = act(gate) * up (NeoX Gated_Activation)
    "geglu": F.gelu,
    "reglu": F.relu,
    "swiglu": F.silu,
    "bilinear": lambda x: x,
    "glu": torch.sigmoid,
}


def activation_fn(config):
    if config.activation == "gelu" and config.gelu_variant != "erf":
        return _ACTIVATIONS["gelu_" + config.gelu_variant]
    return _ACTIVATIONS[config.activation]


# --------------------------------------------------------------------------------------------
# Positions (NeoX megatron/model/positional_embeddings.py, word_embeddings.py)
# --------------------------------------------------------------------------------------------


def rotary_cos_sin(position_ids, rotary_dims, base, dtype):
    """cos/sin [b, 1, s, rotary_dims]: fp32 inv_freq 1/base^(2i/r), angles position*inv_freq
    duplicated as [f, f], cos/sin in fp32, cast to the model dtype."""
    exponents = torch.arange(0, rotary_dims, 2, device=position_ids.device).float() / rotary_dims
    inv_freq = 1.0 / (base**exponents)
    angles = position_ids[..., None].float() * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rotary(x, cos, sin):
    """Rotate-half rotary on the first cos.shape[-1] dims of x [b, heads, s, d]; the rest passes."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = (x_rot * cos) + (torch.cat((-x2, x1), dim=-1) * sin)
    return torch.cat((rotated, x_pass), dim=-1)


def sinusoidal_positions(position_ids, dim, dtype):
    """[b, s, dim] = [sin(p*f), cos(p*f)], f = 1/10000^(2i/dim), all in the model dtype."""
    inv_freq = (1.0 / (10000 ** (torch.arange(0, dim, 2, device=position_ids.device).float() / dim))).to(dtype)
    angles = position_ids[..., None].to(dtype) * inv_freq
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def alibi_slopes(n):
    """ALiBi head slopes (Press et al.; NeoX AliBi._get_slopes), as Python floats."""

    def power_of_2(k):
        start = 2 ** (-(2 ** -(math.log2(k) - 3)))
        return [start * start**i for i in range(k)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    p = 2 ** math.floor(math.log2(n))
    return power_of_2(p) + alibi_slopes(2 * p)[0::2][: n - p]


# --------------------------------------------------------------------------------------------
# Norms (NeoX megatron/model/norms.py)
# --------------------------------------------------------------------------------------------


class NeoXNorm(nn.Module):
    """A NeoX norm over the last dim, or (QK-norm) over ``group`` consecutive heads x head_dim.

    Parameters: layernorm ``weight``, ``bias``; rmsnorm ``weight`` (NeoX ``scale``); scalenorm
    ``weight`` of shape [1] (NeoX ``g``), as QK-norm one gain per head (NeoX: one per TP rank, shared by
    its heads); non_parametric_layernorm none."""

    def __init__(self, config, shape, group=1):
        super().__init__()
        self.kind, self.eps, self.group = config.norm, config.norm_eps, group
        self.eps_inside_sqrt = config.rmsnorm_eps_inside_sqrt
        weight_shape = {"layernorm": shape, "rmsnorm": shape, "scalenorm": shape[:-1] or (1,)}.get(self.kind)
        self.weight = nn.Parameter(torch.ones(weight_shape)) if weight_shape else None
        self.bias = nn.Parameter(torch.zeros(shape)) if self.kind == "layernorm" else None

    def forward(self, x):
        if x.dim() == 3:
            return self._normalize(x, self.weight, self.bias)
        b, s, n, d = x.shape  # QK-norm: statistics over `group` heads, an affine per head
        grouped = x.reshape(b, s, n // self.group, self.group * d)
        weight, bias = self.weight, self.bias
        if self.kind in ("layernorm", "rmsnorm"):
            weight = weight.reshape(grouped.shape[-2:])
            bias = None if bias is None else bias.reshape(grouped.shape[-2:])
        elif self.kind == "scalenorm":  # per head: statistics over head_dim, the head's gain
            weight = weight.view(-1, 1)
        return self._normalize(grouped, weight, bias).reshape(b, s, n, d)

    def _normalize(self, x, weight, bias):
        if self.kind in ("layernorm", "non_parametric_layernorm"):
            if weight is not None and weight.dim() == 2:  # one LayerNorm per group, as each TP rank does
                groups = range(weight.shape[0])
                parts = [F.layer_norm(x[..., g, :], x.shape[-1:], weight[g], bias[g], self.eps) for g in groups]
                return torch.stack(parts, dim=-2)
            return F.layer_norm(x, x.shape[-1:], weight, bias, self.eps)
        if self.kind == "rmsnorm":
            if self.eps_inside_sqrt:  # NeoX since 2025-05: fp32, x * rsqrt(mean(x^2) + eps)
                xf = x.float()
                return (weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)
            rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5  # before: x / (rms + eps)
            return (weight * (x / (rms + self.eps))).to(x.dtype)
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=self.eps) * weight  # scalenorm


# --------------------------------------------------------------------------------------------
# Attention, MLP, layer (NeoX megatron/model/transformer.py)
# --------------------------------------------------------------------------------------------


def _repeat_heads(x, heads):
    """[b, kv, s, d] -> [b, heads, s, d]: query head j uses kv head j // (heads // kv)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


class NeoXAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.local = config.attention_types[layer_idx] == "local"
        self.scaling = self.head_dim**-0.5
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=bias)
        qk_shape = (self.heads, self.head_dim)
        self.qk_norm = NeoXNorm(config, qk_shape, config.qk_norm_group_heads) if config.qk_norm else None

    def forward(self, x, ctx, cache):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm is not None:
            # NeoX repeats K to the query heads first, then one module normalises Q and K.
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=2)
            q, k = self.qk_norm(q), self.qk_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if ctx["cos"] is not None:
            q, k = apply_rotary(q, ctx["cos"], ctx["sin"]), apply_rotary(k, ctx["cos"], ctx["sin"])
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        k, v = _repeat_heads(k, self.heads), _repeat_heads(v, self.heads)

        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if ctx["alibi"] is not None and not self.local:  # NeoX's sparse "local" path adds no ALiBi
            scores = scores + ctx["alibi"]
        allowed = ctx["local_mask"] if self.local else ctx["mask"]
        scores = scores.float().masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = scores.softmax(dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.o_proj(out)


class NeoXMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.up_proj = nn.Linear(h, f, bias=bias)
        self.gate_proj = nn.Linear(h, f, bias=bias) if config.gated else None
        self.down_proj = nn.Linear(f, h, bias=bias)
        self.act = activation_fn(config)

    def forward(self, x):
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class NeoXDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.input_layernorm = NeoXNorm(config, (config.hidden_size,))
        # NeoX keeps this norm under gpt_j_tied too (unused there), so its weights round-trip.
        self.post_attention_layernorm = NeoXNorm(config, (config.hidden_size,))
        self.self_attn = NeoXAttention(config, layer_idx)
        self.mlp = NeoXMLP(config)

    def forward(self, x, ctx, cache):
        if not self.config.parallel_residual:  # x = x + attn(ln1(x)); x = x + mlp(ln2(x))
            x = x + self.self_attn(self.input_layernorm(x), ctx, cache)
            return x + self.mlp(self.post_attention_layernorm(x))
        # GPT-J residual: x + attn(ln1(x)) + mlp(ln2(x)); gpt_j_tied uses ln1 for both
        attn_in = self.input_layernorm(x)
        mlp_in = attn_in if self.config.parallel_norms_tied else self.post_attention_layernorm(x)
        attn, mlp = self.self_attn(attn_in, ctx, cache), self.mlp(mlp_in)
        if not self.config.mlp_bias:
            # NeoX without MLP biases returns the MLP output alone here: the attention output is
            # dropped (transformer.py, GPT-J branch). A model trained so learned without it.
            return x + mlp
        return x + (attn + mlp)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class NeoXCustomPreTrainedModel(PreTrainedModel):
    config_class = NeoXCustomConfig
    base_model_prefix = "model"
    _no_split_modules = ["NeoXDecoderLayer"]
    _supports_cache_class = True  # transformers 4.x: generate() hands the model a DynamicCache

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, NeoXNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


class NeoXEmbedding(nn.Embedding):
    """The word embedding. Called with ``hidden=`` it gives the tied output logits ``hidden @ weight.T``:
    both uses are calls of this one module (so hooks around a module's call see its weight used)."""

    def forward(self, input_ids=None, hidden=None):
        return F.linear(hidden, self.weight) if hidden is not None else super().forward(input_ids)


class NeoXCustomModel(NeoXCustomPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = NeoXEmbedding(config.vocab_size, config.hidden_size)
        if config.position_embedding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(NeoXDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = NeoXNorm(config, (config.hidden_size,))
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                past_key_values=None, use_cache=None, output_hidden_states=None, return_dict=None, **kwargs):
        cfg = self.config
        cache = cache if cache is not None else past_key_values
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if cache is not None and not isinstance(cache, Cache):
            raise ValueError("the KV cache must be a transformers Cache (e.g. DynamicCache), not legacy tuples")
        if use_cache and cache is None:
            cache = DynamicCache()
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        past = cache.get_seq_length() if cache is not None else 0
        key_pos, key_real = self._key_positions(attention_mask, x.shape[0], past + x.shape[1], x.device)
        query_pos = key_pos[:, past:]
        position_ids = query_pos if position_ids is None else position_ids
        x = self._add_positions(x, position_ids)
        ctx = self._attention_context(query_pos, key_pos, key_real, position_ids, x.dtype)

        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, ctx, cache)
            if output_hidden_states:
                hidden_states.append(x)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states[-1] = x
        fields = {"last_hidden_state": x, "hidden_states": tuple(hidden_states) if hidden_states else None,
                  _cache_key(BaseModelOutputWithPast): cache if use_cache else None}
        return BaseModelOutputWithPast(**fields)

    @staticmethod
    def _key_positions(attention_mask, batch, keys, device):
        """Position of every key (cached and new) within its own sequence, and whether it is a real
        token: from the 2D padding mask (left padding shifts positions), else 0..keys-1."""
        if attention_mask is None:
            pos = torch.arange(keys, device=device).expand(batch, keys)
            return pos, torch.ones(batch, keys, dtype=torch.bool, device=device)
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != keys:
            shape = tuple(attention_mask.shape)
            raise ValueError(f"attention_mask must be 2D [batch, {keys}] (cached + new tokens), got {shape}")
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0), attention_mask.bool()

    def _add_positions(self, x, position_ids):
        kind, cfg = self.config.position_embedding, self.config
        if kind == "learned":
            pos = self.embed_positions(position_ids + cfg.position_embedding_offset)
        elif kind == "sinusoidal":
            pos = sinusoidal_positions(position_ids, cfg.hidden_size, x.dtype)
        else:
            return x
        return x + pos * cfg.position_embedding_multiplier

    def _attention_context(self, query_pos, key_pos, key_real, position_ids, dtype):
        """What every layer shares: rotary tables, the ALiBi bias and the boolean masks
        [b, 1, q, k] (True = may attend) for global/flash and for local layers."""
        cfg = self.config
        qp, kp = query_pos[:, None, :, None], key_pos[:, None, None, :]
        mask = (kp <= qp) & key_real[:, None, None, :]
        if cfg.sliding_window_width is not None:  # NeoX W: a query sees itself and W earlier keys
            mask = mask & (kp >= qp - cfg.sliding_window_width)
        ctx = {"mask": mask, "local_mask": None, "cos": None, "sin": None, "alibi": None}
        if "local" in cfg.attention_types:  # DeepSpeed LocalSlidingWindowSparsityConfig, unidirectional
            block, reach = cfg.local_block_size, cfg.local_window_blocks // 2
            ctx["local_mask"] = mask & (kp // block >= qp // block - reach)
        if cfg.position_embedding == "rotary":
            ctx["cos"], ctx["sin"] = rotary_cos_sin(position_ids, cfg.rotary_dims, cfg.rotary_base, dtype)
        elif cfg.position_embedding == "alibi":
            slopes = torch.tensor(alibi_slopes(cfg.num_attention_heads), dtype=torch.float32, device=qp.device)
            slopes = slopes.to(dtype)
            ctx["alibi"] = (kp - qp).clamp(max=0).to(dtype) * slopes.view(1, -1, 1, 1)
        return ctx


class NeoXCustomForCausalLM(NeoXCustomPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = NeoXCustomModel(config)
        # Tied: logits use the input embedding matrix directly (no second parameter to tie).
        untied = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head = None if config.tie_word_embeddings else untied
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    if _OWN_PREPARE_INPUTS:

        def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=None,
                                          **kwargs):
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            return {"input_ids": input_ids[:, past:], "past_key_values": past_key_values,
                    "attention_mask": attention_mask, "use_cache": use_cache}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                past_key_values=None, use_cache=None, labels=None, logits_to_keep=0, output_hidden_states=None,
                return_dict=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, cache=cache if cache is not None else past_key_values,
                         use_cache=use_cache, output_hidden_states=output_hidden_states)
        x = out.last_hidden_state
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        embed = self.model.embed_tokens
        if self.lm_head is not None:
            logits = self.lm_head(x)
        else:  # tied: the input embedding (a replaced one, e.g. by resize_token_embeddings, by its weight)
            logits = embed(hidden=x) if isinstance(embed, NeoXEmbedding) else F.linear(x, embed.weight)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        cache = getattr(out, _cache_key(BaseModelOutputWithPast))
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{_cache_key(CausalLMOutputWithPast): cache})
        return result if return_dict is not False else result.to_tuple()
