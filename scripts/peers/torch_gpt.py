#!/usr/bin/env python3
"""The PyTorch peer of `fp8train bench step`: the same GPT (pre-LayerNorm, learned
positions, GELU-tanh, causal multi-head attention, tied LM head, biases), trained the
way its users would: torch.compile, BF16 autocast, SDPA (flash) attention, fused AdamW;
with --fp8, torchao float8 training (tensorwise scaling) on the block linears, the
LM head kept in BF16 as fp8train keeps it. Random tokens; median step time after
warm-up. Prints one JSON line (and a summary line with --verbose). A model that does
not fit prints a JSON line with "oom": true and the allocator's message, exit status 3.

  python3 scripts/peers/torch_gpt.py --model gpt2-124m --batch 16 --seq 1024 [--fp8]
"""
import argparse, json, math, statistics, sys, time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {  # n_layer, n_embd, n_head, seq, batch
    "gpt2-124m": (12, 768, 12, 1024, 16),
    "gpt-1.3b": (24, 2048, 16, 2048, 8),
    "gpt-6.7b": (32, 4096, 32, 2048, 1),
    "gpt-13b": (40, 5120, 40, 2048, 1),
}


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, n_layer, d, h, seq, vocab):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.h = nn.ModuleList(Block(d, h) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for n, p in self.named_parameters():
            if n.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif n.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.h:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-124m", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--fp8", action="store_true", help="torchao float8 training (tensorwise)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    n_layer, d, h, seq, batch = PRESETS[args.model]
    seq = args.seq or seq
    batch = args.batch or batch
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = "cuda"
    try:
        return run(args, n_layer, d, h, seq, batch, dev)
    except torch.cuda.OutOfMemoryError as e:
        print(json.dumps({
            "bench": "peer", "peer": "pytorch", "recipe": "torchao-float8-tensorwise" if args.fp8 else "bf16",
            "torch": torch.__version__, "model": args.model, "batch": batch, "seq": seq, "oom": True,
            "error": str(e).splitlines()[0][:300], "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "device": torch.cuda.get_device_name(),
        }), flush=True)
        return 3


def run(args, n_layer, d, h, seq, batch, dev):
    # Built on the device (parameters never pass through host memory).
    with torch.device(dev):
        model = GPT(n_layer, d, h, seq, args.vocab)
    recipe = "bf16"
    if args.fp8:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(
            model,
            config=Float8LinearConfig.from_recipe_name("tensorwise"),
            module_filter_fn=lambda m, fqn: fqn != "lm_head",
        )
        recipe = "torchao-float8-tensorwise"
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    step_model = model if args.no_compile else torch.compile(model)
    g = torch.Generator(device=dev).manual_seed(1)

    def step():
        x = torch.randint(0, args.vocab, (batch, seq + 1), device=dev, generator=g)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        loss = step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    ms = statistics.median(times)
    tok_s = batch * seq / (ms / 1e3)
    flops_per_token = 6 * params + 12 * n_layer * d * seq
    print(json.dumps({
        "bench": "peer", "peer": "pytorch", "recipe": recipe, "torch": torch.__version__,
        "compile": not args.no_compile, "model": args.model, "params": params, "batch": batch, "seq": seq,
        "step_ms_median": ms, "step_ms_min": min(times), "tokens_per_s": tok_s,
        "tflops": flops_per_token * tok_s / 1e12, "warmup_s": warm_s, "final_loss": float(loss),
        "max_memory_allocated": torch.cuda.max_memory_allocated(),
        "max_memory_reserved": torch.cuda.max_memory_reserved(),
        "device": torch.cuda.get_device_name(),
    }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
