#!/usr/bin/env python3
"""Reference trajectories for ringtrain-optim, written from PyTorch's documented update rules
(torch.optim.{SGD, Adagrad, RMSprop, Adam, AdamW}, defaults as in PyTorch 2.x, no amsgrad/
centered/maximize) in plain float64 Python, so it runs anywhere without torch.

Problem: p0 = [0.5, -1.0, 2.0], loss gradient g(p) = c * p + d with c = [1, 2, 3],
d = [0.1, -0.2, 0.3] (a separable quadratic), 5 steps. Prints Rust array literals of p after
each step; tests/main.rs holds the printed values.  Run: python3 tests/reference.py
"""
import math

C = [1.0, 2.0, 3.0]
D = [0.1, -0.2, 0.3]
P0 = [0.5, -1.0, 2.0]
STEPS = 5


def grad(p):
    return [c * x + d for c, x, d in zip(C, p, D)]


def sgd(lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    p, buf, out = list(P0), None, []
    for t in range(STEPS):
        g = [gi + weight_decay * pi for gi, pi in zip(grad(p), p)]
        if momentum != 0.0:
            buf = list(g) if buf is None else [momentum * b + (1 - dampening) * gi for b, gi in zip(buf, g)]
            g = [gi + momentum * b for gi, b in zip(g, buf)] if nesterov else list(buf)
        p = [pi - lr * gi for pi, gi in zip(p, g)]
        out.append(p)
    return out


def adagrad(lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10):
    p, s, out = list(P0), [0.0] * 3, []
    for t in range(1, STEPS + 1):
        g = [gi + weight_decay * pi for gi, pi in zip(grad(p), p)]
        clr = lr / (1 + (t - 1) * lr_decay)
        s = [si + gi * gi for si, gi in zip(s, g)]
        p = [pi - clr * gi / (math.sqrt(si) + eps) for pi, gi, si in zip(p, g, s)]
        out.append(p)
    return out


def rmsprop(lr, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0):
    p, sq, buf, out = list(P0), [0.0] * 3, [0.0] * 3, []
    for t in range(STEPS):
        g = [gi + weight_decay * pi for gi, pi in zip(grad(p), p)]
        sq = [alpha * v + (1 - alpha) * gi * gi for v, gi in zip(sq, g)]
        avg = [math.sqrt(v) + eps for v in sq]
        if momentum > 0:
            buf = [momentum * b + gi / a for b, gi, a in zip(buf, g, avg)]
            p = [pi - lr * b for pi, b in zip(p, buf)]
        else:
            p = [pi - lr * gi / a for pi, gi, a in zip(p, g, avg)]
        out.append(p)
    return out


def adam(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False):
    p, m, v, out = list(P0), [0.0] * 3, [0.0] * 3, []
    for t in range(1, STEPS + 1):
        g = grad(p)
        if decoupled:
            p = [pi * (1 - lr * weight_decay) for pi in p]
        else:
            g = [gi + weight_decay * pi for gi, pi in zip(g, p)]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        step = lr / bc1
        p = [pi - step * mi / (math.sqrt(vi) / math.sqrt(bc2) + eps) for pi, mi, vi in zip(p, m, v)]
        out.append(p)
    return out


CASES = {
    "sgd": sgd(0.1),
    "sgd_momentum_wd": sgd(0.1, momentum=0.9, weight_decay=0.01),
    "sgd_nesterov": sgd(0.05, momentum=0.9, nesterov=True),
    "adagrad": adagrad(0.1, lr_decay=0.01, weight_decay=0.01),
    "rmsprop": rmsprop(0.01),
    "rmsprop_momentum": rmsprop(0.01, momentum=0.9, weight_decay=0.01),
    "adam": adam(0.1),
    "adam_l2": adam(0.1, weight_decay=0.1),
    "adamw": adam(0.1, weight_decay=0.1, decoupled=True),
}

if __name__ == "__main__":
    for name, traj in CASES.items():
        rows = ", ".join("[" + ", ".join(f"{x:.9}" for x in p) + "]" for p in traj)
        print(f"const {name.upper()}: [[f64; 3]; {STEPS}] = [{rows}];")
