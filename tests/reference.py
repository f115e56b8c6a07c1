"""Independent NumPy references for the tests (no TensorFlow in this file).

* A mirror of tf_backsmooth.rng's hash RNG, written from its specification
  (MurmurHash3 fmix32 over element indices), so noise drawn inside a compiled
  train step can be reproduced exactly by hand.
* Closed-form input gradients of a linear classifier ``z = x W + b`` and the
  attacks built from them, and float64 losses for the weight updates.
"""

import numpy as np

M32 = 0xFFFFFFFF


def fmix32(h):
    h = np.asarray(h, dtype=np.uint64) & M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    h ^= h >> 16
    return h


def _u32(v):
    return np.uint64(np.int64(v) & M32)


def fold_in(seed, data):
    s0, s1 = _u32(seed[0]), _u32(seed[1])
    d = _u32(data)
    a = fmix32(s0 ^ fmix32((d * 0x9E3779B9 + 0x632BE5AB) & M32))
    b = fmix32((s1 + fmix32((d + 0x85157AF5) & M32)) & M32)
    return np.array([a, b], dtype=np.uint64).astype(np.uint32).view(np.int32)


def seed_pair(seed):
    return np.array([seed, 0], np.int32) if np.ndim(seed) == 0 else np.asarray(seed, np.int32)


def _unit(shape, seed):
    s = seed_pair(seed)
    n = int(np.prod(shape))
    c = np.arange(n, dtype=np.uint64)
    h = fmix32((c * 0x9E3779B9 + fmix32(_u32(s[0]))) & M32)
    h = fmix32(h ^ fmix32((_u32(s[1]) + 0x632BE5AB) & M32))
    return (((h >> 8).astype(np.float64) + 0.5) * 2.0**-24).reshape(shape)


def uniform(shape, seed, lo=0.0, hi=1.0):
    return (lo + (hi - lo) * _unit(shape, seed).astype(np.float32)).astype(np.float32)


def normal(shape, seed):
    u1 = _unit(shape, fold_in(seed_pair(seed), 1))
    u2 = _unit(shape, fold_in(seed_pair(seed), 2))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


# --------------------------------------------------------------- linear model
def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def onehot(y, c):
    return np.eye(c)[y]


def ce(z, y):
    return -log_softmax(z)[np.arange(len(y)), y]


def kl(zp, zq):
    lp, lq = log_softmax(zp), log_softmax(zq)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def grad_ce(x, y, W, b):
    """d/dx of sum_i CE(x_i W + b, y_i)."""
    z = x @ W + b
    return (softmax(z) - onehot(y, W.shape[1])) @ W.T


def grad_kl(x, target_logits, W, b):
    """d/dx of sum_i KL(softmax(t_i) || softmax(x_i W + b))."""
    return (softmax(x @ W + b) - softmax(target_logits)) @ W.T


def grad_margin(x, y, W, b):
    z = x @ W + b
    masked = z - 1e9 * onehot(y, W.shape[1])
    j = masked.argmax(-1)
    return W[:, j].T - W[:, y].T


def clip(x_adv, x, eps, to_ball=True):
    if to_ball:
        x_adv = np.clip(x_adv, x - eps, x + eps)
    return np.clip(x_adv, 0.0, 1.0)


def ascend(x, x0, grad_fn, eps, step, steps, to_ball=True):
    xa = x0
    for _ in range(steps):
        xa = clip(xa + step * np.sign(grad_fn(xa)), x, eps, to_ball)
    return xa


def fgsm(x, y, W, b, eps, step, init=None, to_ball=True):
    x0 = clip(x + (0 if init is None else init), x, eps, to_ball)
    return ascend(x, x0, lambda v: grad_ce(v, y, W, b), eps, step, 1, to_ball)


def pgd(x, y, W, b, eps, step, steps, init=None, loss="ce"):
    g = grad_ce if loss == "ce" else grad_margin
    x0 = clip(x + (0 if init is None else init), x, eps)
    return ascend(x, x0, lambda v: g(v, y, W, b), eps, step, steps)


def trades(x, W, b, eps, step, steps, init):
    t = x @ W + b
    x0 = clip(x + init, x, eps)
    return ascend(x, x0, lambda v: grad_kl(v, t, W, b), eps, step, steps)


def backward_smoothing(x, W, b, eps, step, gamma, steps, u):
    z = x @ W + b
    g = grad_kl(x, z + gamma * u, W, b)
    x1 = clip(x - step * np.sign(g), x, eps)
    return ascend(x, x1, lambda v: grad_kl(v, z, W, b), eps, step, steps)


def numeric_grad(f, params, h=1e-6):
    """Central finite differences of scalar ``f(*params)`` (float64)."""
    grads = []
    for i, p in enumerate(params):
        g = np.zeros_like(p)
        it = np.nditer(p, flags=["multi_index"])
        for _ in it:
            idx = it.multi_index
            plus = [q.copy() for q in params]
            minus = [q.copy() for q in params]
            plus[i][idx] += h
            minus[i][idx] -= h
            g[idx] = (f(*plus) - f(*minus)) / (2 * h)
        grads.append(g)
    return grads
