"""Does a fused activation pay inside MoE experts? transformers' experts (Qwen3-MoE, Mixtral) run
as a Python loop over experts (eager) or as grouped GEMMs (grouped_mm), the gate's activation and
product as separate ops (`_apply_gate`). This times one sparse-MoE block forward + backward
(frozen experts, LoRA-style: gradients to the input only) in bf16 at real shapes, each
implementation with transformers' gate and with fusetune's fused glu as `_apply_gate`, and checks
the outputs and input gradients agree.

    python -m bench.moe_experts            # on a GPU; prints a table, writes bench/results JSON
"""
from __future__ import annotations

import argparse

import torch

from bench.common import do_bench, environment, write_results

SHAPES = {  # hidden, moe_intermediate, experts, top-k
    "qwen3-30b-a3b": dict(model="qwen3_moe", hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8),
    "mixtral-8x7b": dict(model="mixtral", hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                         num_experts_per_tok=2),
}


def fused_gate(self, gate_up_out):
    """[gate | up] -> act(gate) * up in one fused op (views, no copy)."""
    from fusetune.ops.glu import glu

    gate, up = gate_up_out.chunk(2, dim=-1)
    return glu(gate, up, "silu")


def block(name: str, implementation: str):
    import transformers

    shape = dict(SHAPES[name])
    kind = shape.pop("model")
    config_class = transformers.Qwen3MoeConfig if kind == "qwen3_moe" else transformers.MixtralConfig
    config = config_class(**shape, num_hidden_layers=1, vocab_size=1024)
    config._experts_implementation = implementation
    if kind == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
    else:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    torch.manual_seed(0)
    module = Block(config).to("cuda", torch.bfloat16)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
        p.requires_grad_(False)
    return module


def step(module, x, dy):
    x.grad = None
    y = module(x)
    y = y[0] if isinstance(y, tuple) else y
    y.backward(dy)
    return y


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    rows = []
    for name in SHAPES:
        hidden = SHAPES[name]["hidden_size"]
        x = torch.randn(1, args.tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        reference = None
        for implementation in ("eager", "grouped_mm"):
            for gate in ("transformers", "fusetune"):
                try:
                    module = block(name, implementation)
                except Exception as err:  # an implementation this transformers lacks
                    rows.append({"shape": name, "experts": implementation, "gate": gate, "error": repr(err)[:120]})
                    continue
                if gate == "fusetune":
                    module.experts._apply_gate = fused_gate.__get__(module.experts)
                    if implementation == "eager":  # the eager loop computes its activation inline
                        rows.append({"shape": name, "experts": implementation, "gate": gate,
                                     "error": "eager computes act(gate) * up inline: no hook"})
                        continue
                y = step(module, x, dy)
                got = (y.float(), x.grad.float())
                if reference is None:
                    reference = got
                err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, reference))
                torch.cuda.reset_peak_memory_stats()
                ms = do_bench(lambda: step(module, x, dy), grad_to_none=[x])
                peak = torch.cuda.max_memory_allocated() / 2**30
                rows.append({"shape": name, "experts": implementation, "gate": gate, "ms": ms, "peak_gib": peak,
                             "max_rel_diff_vs_first": err})
                del module
    print(f"{'shape':<15}{'experts':<12}{'gate':<14}{'fwd+bwd ms':>11}{'peak GiB':>10}{'rel diff':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<15}{r['experts']:<12}{r['gate']:<14}  {r['error']}")
        else:
            print(f"{r['shape']:<15}{r['experts']:<12}{r['gate']:<14}{r['ms']:>11.3f}{r['peak_gib']:>10.2f}"
                  f"{r['max_rel_diff_vs_first']:>10.1e}")
    print(write_results("moe-experts", {"environment": environment(), "tokens": args.tokens, "rows": rows}))


if __name__ == "__main__":
    main()
