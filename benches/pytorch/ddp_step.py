"""PyTorch DDP (Gloo) reference for `cargo xtask cluster-sim ddp`: the models of our example
jobs (examples/mnist-lenet.toml, sentiment-lstm.toml, sentiment-transformer.toml) trained with
DistributedDataParallel on the same data, batch per rank and thread count as
`cargo xtask cluster-sim scale` trains ours, one process per simulated host.

One process per rank, started by the xtask inside its host's network namespace with
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and GLOO_SOCKET_IFNAME=eth0 set. Each rank trains on
its shard (DistributedSampler's interleaving) for --warmup steps, then --steps timed steps;
rank 0 prints one JSON line: global examples/s over the timed steps (wall clock).

Text is split into words as our `word` tokenizer does (lower-cased runs of letters and digits,
an apostrophe kept inside a word), with the 12 000 most frequent words seen at least twice,
texts cut to 60 words and each batch padded to its longest text.
"""

import argparse
import collections
import gzip
import json
import os
import re
import struct
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from train_step import LeNet5  # the script's directory is on the path

WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


class LstmClassifier(nn.Module):
    """sentiment-lstm: embeddings (dropout 0.3), a bidirectional LSTM, masked mean pooling."""

    def __init__(self, vocab):
        super().__init__()
        self.emb = nn.Embedding(vocab, 64, padding_idx=0)
        self.drop = nn.Dropout(0.3)
        self.rnn = nn.LSTM(64, 64, batch_first=True, bidirectional=True)
        self.out = nn.Linear(128, 2)

    def forward(self, x, mask):
        h, _ = self.rnn(self.drop(self.emb(x)))
        h = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.out(h)


class TransformerClassifier(nn.Module):
    """sentiment-transformer: one pre-norm block, 4 heads, FF 128, dropout 0.3, learned
    positions, masked mean pooling."""

    def __init__(self, vocab):
        super().__init__()
        self.emb = nn.Embedding(vocab, 64, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, 60, 64))
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.3, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(64)
        self.out = nn.Linear(64, 2)

    def forward(self, x, mask):
        t = x.shape[1]
        h = self.enc(self.emb(x) * 8.0 + self.pos[:, :t], src_key_padding_mask=mask == 0)
        h = self.norm(h)
        h = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.out(h)


def mnist(root):
    with gzip.open(os.path.join(root, "train-images-idx3-ubyte.gz")) as f:
        _, n, r, c = struct.unpack(">IIII", f.read(16))
        x = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).view(n, 1, r, c).float() / 255.0
    with gzip.open(os.path.join(root, "train-labels-idx1-ubyte.gz")) as f:
        f.read(8)
        y = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
    return x, y


def texts(path):
    labels, words = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            label, _, text = line.rstrip("\n").partition("\t")
            labels.append(int(label))
            words.append(WORD.findall(text.lower())[:60])
    counts = collections.Counter(w for ws in words for w in ws)
    vocab = {w: i + 2 for i, (w, c) in enumerate(counts.most_common(12_000)) if c >= 2}  # 0 PAD, 1 UNK
    ids = [[vocab.get(w, 1) for w in ws] or [1] for ws in words]
    return ids, torch.tensor(labels), len(vocab) + 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["lenet", "lstm", "transformer"], required=True)
    ap.add_argument("--data", required=True, help="MNIST directory or the training TSV")
    ap.add_argument("--per-rank-batch", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    b = args.per_rank_batch
    if args.model == "lenet":
        x, y = mnist(args.data)
        model, lr = LeNet5(), 0.002

        def batch(k):
            idx = torch.arange(k * b * world + rank, (k + 1) * b * world, world) % len(y)
            return x[idx], None, y[idx]

        def forward(xs, _mask):
            return model(xs)

    else:
        ids, y, vocab = texts(args.data)
        model = LstmClassifier(vocab) if args.model == "lstm" else TransformerClassifier(vocab)
        lr = 0.003

        def forward(xs, mask):
            return model(xs, mask)

        def batch(k):
            rows = [(k * b * world + rank + j * world) % len(ids) for j in range(b)]
            t = max(len(ids[r]) for r in rows)
            xs = torch.zeros(b, t, dtype=torch.long)
            for j, r in enumerate(rows):
                xs[j, : len(ids[r])] = torch.tensor(ids[r])
            return xs, (xs != 0).float(), y[rows]

    model = DDP(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)

    def step(k):
        xs, mask, ys = batch(k)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(xs, mask), ys).backward()
        if args.model != "lenet":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    for k in range(args.warmup):
        step(k)
    dist.barrier()
    start = time.perf_counter()
    for k in range(args.warmup, args.warmup + args.steps):
        step(k)
    dist.barrier()
    secs = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({
            "model": args.model, "world": world, "per_rank_batch": b, "steps": args.steps,
            "secs": secs, "examples_per_sec": world * b * args.steps / secs,
            "torch": torch.__version__,
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
