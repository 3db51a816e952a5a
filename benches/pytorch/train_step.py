"""PyTorch eager reference for `benches/train_step.rs`: the same four model shapes as
`../shared/design/peers.md` (and the issues' benches), one training step = forward + backward +
optimizer step on synthetic inputs, in examples/s.

`cargo xtask peers` installs PyTorch into target/tools/torch-venv, runs our criterion bench and
this script one after the other on the same machine, and prints the ratios. By hand:

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
    /tmp/torchenv/bin/python benches/pytorch/train_step.py [--threads 1] [--warmup 50] [--steps 200] [--clock cpu] [--json]

Prints one line per model: median and best examples/s over the timed steps, after 50 warm-up
steps (PyTorch's eager ops are slower for the first tens of steps: its LeNet read 9–11k ex/s
timed over 30 steps after 5, and 13–15k over 300 on the same machine).
`--clock cpu` times by the calling thread's CPU time (valid with one thread, where every op
runs on the calling thread), as `RINGTRAIN_BENCH_CLOCK=cpu` does for our bench on a busy machine.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5, padding=2)
        self.c2 = nn.Conv2d(6, 16, 5)
        self.f1 = nn.Linear(400, 120)
        self.f2 = nn.Linear(120, 84)
        self.f3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        x = x.flatten(1)
        return self.f3(F.relu(self.f2(F.relu(self.f1(x)))))


class RnnClassifier(nn.Module):
    def __init__(self, cell, vocab=10_000, emb=64, hidden=128, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb, padding_idx=0)
        self.rnn = cell(emb, hidden, batch_first=True)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        _, h = self.rnn(self.emb(x))
        h = h[0] if isinstance(h, tuple) else h  # the LSTM's state is (h, c)
        return self.out(h[-1])


class TransformerClassifier(nn.Module):
    def __init__(self, vocab=10_000, d=64, heads=4, layers=2, ff=256, seq=64, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, seq, d))
        layer = nn.TransformerEncoderLayer(d, heads, ff, batch_first=True)  # post-norm, ReLU, dropout 0.1
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        h = self.enc(self.emb(x) * 8.0 + self.pos)
        return self.out(h.mean(1))


def models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    yield "mlp_784_256_128_10_b128_sgd", mlp, torch.randn(128, 784), 10, lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9)
    yield "lenet5_b64_adam", LeNet5(), torch.randn(64, 1, 28, 28), 10, lambda p: torch.optim.Adam(p, lr=1e-3)
    tokens = torch.randint(1, 10_000, (32, 64))
    yield "lstm_v10000_e64_h128_t64_b32_adam", RnnClassifier(nn.LSTM), tokens, 2, lambda p: torch.optim.Adam(p, lr=1e-3)
    yield "gru_v10000_e64_h128_t64_b32_adam", RnnClassifier(nn.GRU), tokens, 2, lambda p: torch.optim.Adam(p, lr=1e-3)
    yield "transformer_v10000_d64_h4_l2_ff256_t64_b32_adam", TransformerClassifier(), tokens, 2, lambda p: torch.optim.Adam(p, lr=1e-3)


def conv2d_fwd_bwd(warmup, steps, clock):
    """LeNet's second convolution (6→16, 5×5) forward + backward on a batch of 64, in GFLOP/s."""
    x = torch.randn(64, 6, 14, 14, requires_grad=True)
    w = torch.randn(16, 6, 5, 5, requires_grad=True)
    flops = 3 * 2 * 16 * 6 * 25 * 10 * 10 * 64
    times = []
    for i in range(warmup + steps):
        t0 = clock()
        F.conv2d(x, w).sum().backward()
        dt = clock() - t0
        if i >= warmup:
            times.append(dt)
    return flops / statistics.median(times) / 1e9, flops / min(times) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=50, help="untimed steps first (PyTorch needs ~50)")
    ap.add_argument("--steps", type=int, default=200, help="timed steps")
    ap.add_argument("--filter", default="")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    def report(name, unit, median, best):
        if args.json:
            print(json.dumps({"name": name, "unit": unit, "median": median, "best": best}), flush=True)
        else:
            print(f"{name}: median {median:9.1f} {unit}, best {best:9.1f} {unit}", flush=True)

    if not args.json:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock")
    for name, model, x, classes, make_opt in models():
        if args.filter not in name:
            continue
        opt = make_opt(model.parameters())
        y = torch.arange(x.shape[0]) % classes
        model.train()
        times = []
        for i in range(args.warmup + args.steps):
            t0 = clock()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            dt = clock() - t0
            if i >= args.warmup:
                times.append(dt)
        b = x.shape[0]
        report(name, "ex/s", b / statistics.median(times), b / min(times))
    if "conv2d" in args.filter or not args.filter:
        med, best = conv2d_fwd_bwd(args.warmup, args.steps, clock)
        report("conv2d_6to16_k5_b64_fwd_bwd_flops", "GFLOP/s", med, best)


if __name__ == "__main__":
    main()
