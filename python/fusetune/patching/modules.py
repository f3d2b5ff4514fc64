"""Fused forwards, written once for every family, and the fused causal-LM loss.

Each mixin is combined with the original Hugging Face class into a subclass
(`Fused<Original>`, see core.fused_class) whose class attributes carry the family's options; a
module is patched by assigning that subclass to its `__class__`. Parameters, buffers, children
(PEFT LoRA layers, bitsandbytes linears), hooks and state_dict keys stay what they were, and
`_fusetune_original` names the class that unpatching puts back.

The forwards call the child modules (q_proj, q_norm, gate_proj, ...) rather than their weights,
so LoRA adapters, quantised linears and a separately patched or unpatched q/k norm all work.
"""
from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fusetune.lora import lora_linear, lora_mlp
from fusetune.lora.adapters import fused_projections, hooked
from fusetune.lora.projection import without_autocast
from fusetune.ops.cross_entropy import cross_entropy
from fusetune.ops.glu import glu
from fusetune.ops.linear_cross_entropy import linear_cross_entropy
from fusetune.ops.rms_norm import rms_norm
from fusetune.ops.rope import rope
from fusetune.ops.tiling import mlp_chunk_rows, sequence_tiled
from fusetune.patching import attention as fused_attention


def _project(module, names, x):
    """The outputs of module's projections `names` on x: one fused LoRA group when the module's
    class option allows it and the projections fuse (fusetune.lora.adapters), else each called."""
    projections = [getattr(module, name) for name in names]
    fused = fused_projections(projections, x) if module._fusetune_lora else None
    if fused is None:
        return [p(x) for p in projections]
    specs, dtype = fused
    with without_autocast(x.device.type):
        return list(lora_linear(x.to(dtype), *specs))


class FusedRMSNorm:
    """RMSNorm over the last dim through fusetune.ops.rms_norm (class options: variant, eps attribute,
    and whether the output takes a 16-bit weight's dtype, as T5LayerNorm's does)."""

    _fusetune_variant = "llama"
    _fusetune_eps_attr = "variance_epsilon"
    _fusetune_weight_dtype = False

    def forward(self, hidden_states):
        out = rms_norm(hidden_states, self.weight, getattr(self, self._fusetune_eps_attr), self._fusetune_variant)
        if self._fusetune_weight_dtype and self.weight.dtype in (torch.float16, torch.bfloat16):
            out = out.to(self.weight.dtype)  # as T5LayerNorm: its input may be fp32 (after a wo kept in fp32)
        return out


class FusedGatedMLP:
    """down_proj(act(gate) * up) with the activation and product in one fused op.

    Class options: the activation (fusetune.reference.glu.ACTIVATIONS: "silu" | "gelu_tanh" |
    "gelu_erf"); the fused gate/up projection name when the family has one (its output is
    [gate | up] along the last dim; the two halves go to the op as views, no copy).
    """

    _fusetune_activation = "silu"
    _fusetune_gate_up = None
    _fusetune_lora = False
    _fusetune_tile = True  # sequence tiling (ops/tiling.py): True where memory asks, N: always, N rows a chunk

    def forward(self, hidden_states):
        chunk = self._tile_rows(hidden_states)
        if chunk is None:
            return self._forward_whole(hidden_states)
        return sequence_tiled(self._forward_whole, hidden_states, chunk, self.parameters())

    def _tile_rows(self, x):
        """Rows per chunk of a sequence-tiled forward, or None. The automatic choice is kept per
        token count, so a checkpointed layer's recompute splits as its forward did (the same
        dropout masks), even with other forwards between them (DPO's chosen and rejected)."""
        tile = self._fusetune_tile
        if tile is False:
            return None
        if tile is not True:
            return tile
        if not x.is_cuda:
            return None
        rows = x.shape[:-1].numel()
        chosen = self.__dict__.setdefault("_fusetune_tiles", {})
        if rows not in chosen:
            chosen[rows] = mlp_chunk_rows(x, self.down_proj.in_features)
        return chosen[rows]

    def _forward_whole(self, hidden_states):
        if self._fusetune_lora:
            out = self._fused_lora_forward(hidden_states)
            if out is not None:
                return out
        if self._fusetune_gate_up is not None:
            gate, up = getattr(self, self._fusetune_gate_up)(hidden_states).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(hidden_states), self.up_proj(hidden_states)
        return self.down_proj(glu(gate, up, self._fusetune_activation))

    def _fused_lora_forward(self, x):
        """The whole block as one fused LoRA MLP (fusetune.lora.mlp), or None where it does not fuse."""
        upper = (self._fusetune_gate_up,) if self._fusetune_gate_up else ("gate_proj", "up_proj")
        fused = fused_projections([getattr(self, name) for name in (*upper, "down_proj")], x)
        if fused is None:
            return None
        specs, dtype = fused
        if len(upper) == 1:
            upper_specs = dict(gate=None, up=None, gate_up=specs[0])
        else:
            upper_specs = dict(gate=specs[0], up=specs[1])
        with without_autocast(x.device.type):
            return lora_mlp(x.to(dtype), down=specs[-1], activation=self._fusetune_activation, **upper_specs)


class FusedT5GatedMLP:
    """T5's gated FFN (T5DenseGatedActDense): wo(dropout(act(wi_0(x)) * wi_1(x))) with the GLU fused,
    and, with LoRA, wi_0/wi_1 as one fused group and wo alone. As in Hugging Face's forward, the
    product is cast to wo's weight dtype first (T5 keeps wo in fp32 for 16-bit and 8-bit models).
    The dropout sits between the GLU and wo, so the whole-block fused LoRA MLP does not apply."""

    _fusetune_activation = "gelu_tanh"
    _fusetune_lora = False

    def forward(self, hidden_states):
        gate, up = _project(self, ("wi_0", "wi_1"), hidden_states)
        hidden = self.dropout(glu(gate, up, self._fusetune_activation))
        weight = self.wo.weight
        if isinstance(weight, torch.Tensor) and hidden.dtype != weight.dtype and weight.dtype != torch.int8:
            hidden = hidden.to(weight.dtype)
        (out,) = _project(self, ("wo",), hidden)
        return out


class FusedExperts:
    """MoE experts (transformers' experts classes with gate_up_proj as [gate | up]): act(gate) * up of
    every routed token in one fused op, through the `_apply_gate` hook transformers' grouped_mm and
    batched_mm implementations call (grouped_mm is its default); the grouped GEMMs stay its own. Its
    eager implementation, a loop over experts, computes the product inline and is unchanged."""

    _fusetune_activation = "silu"

    def _apply_gate(self, gate_up_out):
        gate, up = gate_up_out.chunk(2, dim=-1)
        return glu(gate, up, self._fusetune_activation)


class FusedAttention:
    """The attention forward of every supported family, with the fused RoPE.

    Same steps and arguments as the Hugging Face forwards: projections (or one fused qkv
    projection split in three), the per-head q/k norms where the family has them, RoPE (partial
    when cos/sin are narrower than head_dim), the KV-cache update, then the attention function HF
    would call for config._attn_implementation (the family's own eager function for "eager"),
    with the module's scaling and dropout and, where the family passes them, sliding_window and
    softcap; finally o_proj.
    """

    _fusetune_qkv = None
    _fusetune_qk_norm = False
    _fusetune_sliding_window = None
    _fusetune_softcap = False
    _fusetune_eager = None  # staticmethod: the modeling module's eager_attention_forward
    _fusetune_lora = False

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        # transformers >= 5.24 passes the KV cache as `cache`, earlier releases as `past_key_values`
        cache = cache if cache is not None else past_key_values

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        if self._fusetune_qkv is not None:
            q_size = self.config.num_attention_heads * self.head_dim
            kv_size = self.config.num_key_value_heads * self.head_dim
            (qkv,) = _project(self, (self._fusetune_qkv,), hidden_states)
            query, key, value = qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]
        else:
            query, key, value = _project(self, ("q_proj", "k_proj", "v_proj"), hidden_states)
        query, key, value = query.view(hidden_shape), key.view(hidden_shape), value.view(hidden_shape)
        if self._fusetune_qk_norm:
            # normalise before the transpose: rows of head_dim are contiguous there
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        cos, sin = position_embeddings
        query, key = rope(query, key, cos, sin)

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                   self._fusetune_eager)
        if self._fusetune_sliding_window == "module":
            kwargs["sliding_window"] = self.sliding_window
        elif self._fusetune_sliding_window == "config":
            kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
        if self._fusetune_softcap:
            kwargs["softcap"] = self.attn_logit_softcapping
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs)

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        (out,) = _project(self, ("o_proj",), attn_output)
        return out, attn_weights


RETURN_LOGITS = "FUSETUNE_RETURN_LOGITS"  # =1: a forward with labels returns the logits too (memory)


class FusedCausalLMLoss:
    """Drop-in for transformers' ForCausalLMLoss, installed as the model's `loss_function`.

    Labels are shifted the HF way (padded with ignore_index, then [..., 1:]) unless HF passes
    shift_labels; the mean honours ignore_index and num_items_in_batch. The loss runs with
    inplace_backward=True: the backward writes d(loss)/d(logits) into the logits' memory, so
    outputs.logits of a forward given labels hold gradients, not logits, once backward has run.
    Logits arrive after any final softcap HF applies in its forward (Gemma2/3), so no softcap here.

    `previous` is the model's own `_loss_function` before patching (None: it had none); unpatching
    puts it back.
    """

    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                 shift_labels=None, **kwargs):
        if shift_labels is None:
            shift_labels = _shift(labels, ignore_index)
        targets = shift_labels.reshape(-1).to(logits.device)
        # the backward may write the gradient over the logits, unless the caller asked to keep them
        keep = os.environ.get(RETURN_LOGITS) == "1"
        return cross_entropy(logits.reshape(-1, vocab_size), targets, ignore_index=ignore_index,
                             reduction="mean", num_items_in_batch=num_items_in_batch, inplace_backward=not keep)

    def __repr__(self):
        return "FusedCausalLMLoss()"



@functools.cache
def _fused_loss_output():
    """CausalLMOutputWithPast whose outputs["logits"], when the fused loss held no logits, says why
    and how to get them (a KeyError, as for any missing key; outputs.logits stays None)."""
    from dataclasses import dataclass

    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclass
    class FusedLossOutput(CausalLMOutputWithPast):
        def __getitem__(self, key):
            if key == "logits" and self.logits is None:
                raise KeyError(f"logits: fusetune's fused loss computes the loss without the (tokens x vocab) logits; "
                               f"set the environment variable {RETURN_LOGITS}=1 to get them with the loss (they "
                               f"take that memory), or call the model without labels")
            return super().__getitem__(key)

    return FusedLossOutput


class _OriginalSignature:
    """Base of the mixins of a whole model (FusedCausalLM, FusedSeq2SeqLM): transformers reads
    forward's signature (Trainer's column filter, generate's position ids and logits_to_keep, TRL's
    wrapper), so the fused class's forward shows the original's."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        original = cls.__dict__.get("_fusetune_original")
        if original is None:
            return
        mixin = cls.__bases__[0]  # core.fused_class: (mixin, original)

        def forward(self, *args, **kwargs):
            return mixin.forward(self, *args, **kwargs)

        forward.__signature__ = _forward_signature(original)
        forward.__doc__ = mixin.forward.__doc__
        cls.forward = forward


class FusedCausalLM(_OriginalSignature):
    """The causal-LM forward with the fused linear cross-entropy.

    When gradients are being recorded and labels are given, the loss comes straight from the
    decoder's last hidden states and the lm_head weight (fusetune.linear_cross_entropy): the
    (tokens x vocab) logits are never held, and outputs.logits is None (outputs["logits"] raises
    a KeyError saying so); FUSETUNE_RETURN_LOGITS=1 in the environment runs the unfused head
    instead, for code that reads the logits of a training forward; so does a MoE model asked for
    its router logits (their auxiliary loss is added in Hugging Face's forward). Gemma2/3's
    final_logit_softcapping is applied inside the loss. Otherwise (no labels, evaluation under
    no_grad, where callers want logits for metrics, or an lm_head with LoRA adapters),
    Hugging Face's own forward runs and its loss goes through FusedCausalLMLoss. An lm_head that
    PEFT trains in full (modules_to_save) gets its weight gradient from the fused loss.
    """

    def forward(self, *args, **kwargs):
        # bind to the installed transformers' own signature: the KV cache is `cache` from 5.24 on,
        # `past_key_values` before, and the model and its outputs use the same spelling
        call = _forward_signature(self._fusetune_original).bind(self, *args, **kwargs).arguments
        del call["self"]
        call.update(call.pop("kwargs", {}))
        if self.config._attn_implementation == fused_attention.KEY and "fusetune_documents" not in call:
            # the packed documents, once for every layer (none when the caller gave no position ids)
            tokens = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
            if tokens is not None:
                kwargs["fusetune_documents"] = call["fusetune_documents"] = fused_attention.documents(
                    call.get("position_ids"), tokens.shape[0])
        labels = call.pop("labels", None)
        head = _plain_head(self.get_output_embeddings())
        # a MoE model asked for its router logits adds their load-balancing loss in its own forward
        router = call.get("output_router_logits", getattr(self.config, "output_router_logits", False))
        if labels is None or not torch.is_grad_enabled() or head is None or router or \
                os.environ.get(RETURN_LOGITS) == "1":
            return super().forward(*args, **kwargs)
        output_class = _fused_loss_output()

        call.pop("logits_to_keep", None)
        num_items_in_batch = call.pop("num_items_in_batch", None)
        ignore_index = call.pop("ignore_index", -100)
        shift_labels = call.pop("shift_labels", None)
        return_dict = call.pop("return_dict", None)
        outputs = self.model(**call, return_dict=True)
        hidden = outputs.last_hidden_state
        device_type = hidden.device.type
        # the lm_head would run in the autocast dtype when autocast is on, else in hidden's
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        if shift_labels is None:
            shift_labels = _shift(labels, ignore_index)
        with torch.autocast(device_type, enabled=False):
            loss = linear_cross_entropy(hidden.to(dtype), head.weight.to(dtype), shift_labels.to(hidden.device),
                                        None if head.bias is None else head.bias.to(dtype),
                                        ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                                        softcap=getattr(self.config, "final_logit_softcapping", None))
        cache_field = "cache" if "cache" in output_class.__dataclass_fields__ else "past_key_values"
        out = output_class(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions, **{cache_field: outputs.get(cache_field)})
        use_dict = return_dict if return_dict is not None else self.config.return_dict
        return out if use_dict else out.to_tuple()

    def __setattr__(self, name, value):
        if name == "forward" and is_trl_fused_head(value):
            print(f"fusetune: TRL's fused LM head now computes the loss of {type(self).__name__} (TRL's SFT, DPO, "
                  f"GRPO, KTO and RLOO trainers install it for per-token log-probabilities, entropy and accuracy), "
                  f"not fusetune's fused linear cross-entropy; fusetune's kernels still run in the decoder and its "
                  f"LoRA layers")
        super().__setattr__(name, value)


class FusedSeq2SeqLM(_OriginalSignature):
    """The encoder-decoder LM forward (T5ForConditionalGeneration) with fusetune's cross-entropy.

    Given labels, Hugging Face's forward runs without them (decoder inputs made from the labels as
    it would: shifted right), then the loss is the fused cross-entropy of its logits against the
    unshifted labels, mean over the tokens not ignored (-100), or over num_items_in_batch when the
    caller passes it (gradient accumulation; T5's own loss ignores it). As with FusedCausalLMLoss,
    backward writes d(loss)/d(logits) over outputs.logits unless FUSETUNE_RETURN_LOGITS=1.
    """

    def forward(self, *args, **kwargs):
        call = _forward_signature(self._fusetune_original).bind(self, *args, **kwargs).arguments
        del call["self"]
        call.update(call.pop("kwargs", {}))
        labels = call.pop("labels", None)
        if labels is None:
            return super().forward(*args, **kwargs)
        num_items_in_batch = call.pop("num_items_in_batch", None)
        return_dict = call.pop("return_dict", None)
        if call.get("decoder_input_ids") is None and call.get("decoder_inputs_embeds") is None:
            call["decoder_input_ids"] = self._shift_right(labels)
        outputs = super().forward(**call, return_dict=True)
        logits = outputs.logits
        loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                             reduction="mean", num_items_in_batch=num_items_in_batch,
                             inplace_backward=os.environ.get(RETURN_LOGITS) != "1")
        out = type(outputs)(loss=loss, **outputs)  # a new output: loss first in its tuple form, as HF's
        use_dict = return_dict if return_dict is not None else self.config.return_dict
        return out if use_dict else out.to_tuple()


@functools.lru_cache(maxsize=None)
def _forward_signature(original: type) -> inspect.Signature:
    return inspect.signature(original.forward)  # read once per class, not at every decoding step


def is_trl_fused_head(forward) -> bool:
    """Is `forward` TRL's fused LM head (trl.trainer.utils.add_fused_lm_head, TRL >= 1.15), which
    its trainers set as the model's forward, computing the loss themselves?"""
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)  # functools.wraps hides its name
    return code is not None and code.co_name == "_fused_forward" and "trl" in Path(code.co_filename).parts


def _plain_head(head):
    """The nn.Linear that computes the logits: the head itself, or the active trainable copy of a
    PEFT modules_to_save wrapper (lm_head trained in full); None for anything else (LoRA on it), and
    where hooks need the head called (PEFT's mixed-adapter batches, accelerate, a user's hook)."""
    if type(head).__name__ == "ModulesToSaveWrapper" and not hooked(head):
        active = [name for name in head.active_adapters if name in head.modules_to_save]
        if head.disable_adapters or not active:
            head = head.original_module
        else:
            head = head.modules_to_save[active[0]]
    return head if type(head) is nn.Linear and not hooked(head) else None


def _shift(labels, ignore_index):
    """Hugging Face's label shift: pad with ignore_index and drop the first (the logits stay put)."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
