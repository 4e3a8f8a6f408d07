"""
The fast paths of GateRA's adapters: each computes one part of gatera.AdaptedLinear.forward_plain
with less memory or fewer passes over the data, its backward derived by hand in its docstring.

An extra: a learner reads gatera.py (forward_plain is the equations) and may skip this file;
test_gatera.py holds each Function equal to the plain formula in output and every gradient.
Every tensor a Function gets is in one dtype, the frozen base's (AdaptedLinear casts the adapter
to it). The tokens are the rows of one (N, in) matrix, so each output is a fresh matrix that a
matmul can add into in place (in-place ops on views are costly).
"""

import torch
import torch.nn.functional as F


def add_linear(y, h, W):
    """y + h W^T, added into y in place: y must be a fresh (N, out) matrix that nothing else uses.
    The matmul itself adds into y (a GEMM with beta = 1), saving a pass."""
    return y.addmm_(h, W.T)


class LowRankTokenGated(torch.autograd.Function):
    """y + (g s h) B^T: a low-rank update with a token gate g (N, 1) on h = A x (N, r), added into
    the fresh output y (N, out) in place. LoRA's update, and DoRA's with B scaled by m/n.

    Plain autograd would keep both h and g s h for the backward; this keeps h and g.
    With the loss gradient dz (N, out) and e = dz B (N, r):
        dy = dz,   dh = g s e,   dg = s (e . h) per token,   dB = dz^T (g s h).
    Every tensor is in one dtype, the base's."""

    @staticmethod
    def forward(ctx, y, h, g, B, s):
        ctx.save_for_backward(h, g, B)
        ctx.s = s
        ctx.mark_dirty(y)
        return add_linear(y, h * (g * s), B)

    @staticmethod
    def backward(ctx, dz):
        h, g, B = ctx.saved_tensors
        gs = g * ctx.s
        e = dz @ B                                                       # (N, r)
        return dz, e * gs, ctx.s * (e * h).sum(-1, keepdim=True), dz.T @ (h * gs), None


class HiRAMerged(torch.autograd.Function):
    """x (W0 * (1 + B A))^T + b as one matmul: HiRA with one gate value for all tokens, folded into B.

    Plain autograd would keep the merged (out, in) weight of every adapted layer for the backward,
    as much memory as the frozen layer itself; this keeps x, B and A and rebuilds the weight there
    (one rank-r product). With W = W0 + W0 * M, M = B A and the loss gradient dy (N, out):
        dx = dy W,   dW = dy^T x,   dM = W0 * dW,   dB = dM A^T,   dA = B^T dM.
    W0 and the bias are frozen: they get no gradient."""

    @staticmethod
    def forward(ctx, x, W0, bias, B, A):  # x: (N, in)
        ctx.save_for_backward(x, W0, B, A)
        return F.linear(x, torch.addcmul(W0, W0, B @ A), bias)          # (N, out)

    @staticmethod
    def backward(ctx, dy):
        x, W0, B, A = ctx.saved_tensors
        dx = dy @ torch.addcmul(W0, W0, B @ A) if ctx.needs_input_grad[0] else None  # (N, in)
        dM = W0 * (dy.T @ x)                                             # (out, in)
        return dx, None, None, dM @ A.T, B.T @ dM


class HiRAGated(torch.autograd.Function):
    """W0 x + b + g * (Delta_W x), Delta_W = W0 * B A: the frozen layer of x (N, in) and the HiRA update,
    scaled by g: (N, 1), one value per token (a token gate), or one value for all.

    Two matmuls, W0 x and Delta_W x: a token gate cannot be folded into one weight, and in bf16 the
    merged W0 * (1 + g BA) would round a small BA away. Plain autograd would keep Delta_W (out, in)
    and the update Delta_W x (N, out) of every layer for the backward; this keeps x and g and rebuilds
    Delta_W there (one rank-r product). With the loss gradient dz (N, out) and u = dz Delta_W (N, in):
        dx = dz W0 + g u,   dg = u . x (per token; = dz . Delta_W x),
        dDelta_W = dz^T (g x),   dM = W0 * dDelta_W,   dB = dM A^T,   dA = B^T dM.
    W0 and the bias are frozen: they get no gradient. Every tensor is in one dtype, the base's
    (AdaptedLinear casts the adapter to it)."""

    @staticmethod
    def forward(ctx, x, g, W0, bias, B, A, delta_w=None):  # delta_w: W0 * B A, if the caller keeps it
        ctx.save_for_backward(x, g, W0, B, A)
        delta_w = W0 * (B @ A) if delta_w is None else delta_w          # (out, in)
        return torch.addcmul(F.linear(x, W0, bias), g, F.linear(x, delta_w))  # (N, out) W0 x + b + g Delta_W x

    @staticmethod
    def backward(ctx, dz):
        x, g, W0, B, A = ctx.saved_tensors
        dx = dg = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            u = dz @ (W0 * (B @ A))                                      # (N, in)
            dx = (dz @ W0).addcmul_(g, u) if ctx.needs_input_grad[0] else None  # (N, in) dz W0 + g u
            dg = (u * x).sum(-1, keepdim=True).sum_to_size(g.shape) if ctx.needs_input_grad[1] else None
        # dz^T (g x) = (g dz)^T x: the gate scales whichever of x (N, in) and dz (N, out) is smaller
        dM = W0 * (dz.T @ (g * x) if x.shape[1] <= dz.shape[1] else (g * dz).T @ x)  # (out, in)
        return dx, dg, None, None, dM @ A.T, B.T @ dM, None


class DoRAScaledBase(torch.autograd.Function):
    """(1 + g c) * (W0 x) + b: DoRA's frozen term, the base output of x (N, in) rescaled per output
    row by c = m/n - 1 (out,) and by the gate g: (N, 1), one value per token, or one value for all.

    It keeps w = W0 x (N, out), which the gradient of c needs, and never forms W0 x + b as a
    matrix of its own. With the loss gradient dz (N, out) and P = dz * w:
        z = w + (g c) * w + b,   dx = (dz + (g c) * dz) W0,   dc = sum_t g_t P_t,   dg_t = P_t . c.
    (g c) * w is added to w, not w multiplied by 1 + g c: c is small (m/n stays near 1), and in
    bf16 1 + g c would round to 1. With one gate value g c is (out,): z is one pass over (N, out)
    (plus one for the bias), dx = dz (W0 + (g c) * W0) scales the (out, in) weight instead of dz,
    and dc = g sum_t P_t, dg = (sum_t P_t) . c. Every tensor is in the base's dtype."""

    @staticmethod
    def forward(ctx, x, W0, bias, g, c):
        w = F.linear(x, W0)                                              # (N, out) W0 x
        ctx.save_for_backward(w, W0, g, c)
        z = torch.addcmul(w, w, g * c) if g.dim() == 0 else torch.addcmul(w, g, w * c)  # (N, out) w + g c w
        return z if bias is None else z.add_(bias)

    @staticmethod
    def backward(ctx, dz):
        w, W0, g, c = ctx.saved_tensors
        dx = None
        if g.dim() == 0:
            if ctx.needs_input_grad[0]:
                dx = dz @ torch.addcmul(W0, W0, (g * c)[:, None])        # (N, in)
            P = torch.linalg.vecdot(dz, w, dim=0)                        # (out,) sum over tokens of dz * w
            return dx, None, None, P @ c, g * P
        if ctx.needs_input_grad[0]:
            dx = torch.addcmul(dz, g, dz * c) @ W0                       # (N, in) (dz + g c dz) W0
        P = dz * w                                                       # (N, out)
        return dx, None, None, P @ c[:, None], (g.T @ P)[0]


class RMSNormKeepingInput(torch.autograd.Function):
    """w * (x / rms(x)) with rms(x) = sqrt(mean(x^2) + eps), computed in fp32 (or fp64) and cast back to x's dtype
    before the scale w (as Llama does): model.RMSNorm's formula.

    Plain autograd would keep the fp32 copy of x (N, C) for the backward, twice the bytes of a bf16 x;
    this keeps x in its own dtype and r = 1 / rms(x) (N, 1), and rebuilds x_hat = x r in fp32 there.
    With the loss gradient dy and d = dy * w in fp32:
        dx = r (d - x_hat mean(d * x_hat)),   dw = sum over tokens of dy * x_hat (cast as the forward)."""

    @staticmethod
    def forward(ctx, x, w, eps):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))         # fp32 (fp64 stays fp64)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)           # (..., 1) 1 / rms(x)
        ctx.save_for_backward(x, w, r)
        return w * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w, r = ctx.saved_tensors
        x_hat = x.to(r.dtype) * r
        d = dy.to(r.dtype) * w.to(r.dtype)
        dx = (r * (d - x_hat * (d * x_hat).mean(-1, keepdim=True))).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = (dy * x_hat.to(x.dtype)).sum_to_size(w.shape) if ctx.needs_input_grad[1] else None
        return dx, dw, None


class SiLUMul(torch.autograd.Function):
    """silu(a) * b, SwiGLU's product (a the gate projection's output, b the up projection's).

    Plain autograd would keep a for silu's backward and both silu(a) and b for the product's; this
    keeps a and b and recomputes silu(a) there. With s = sigmoid(a) and the loss gradient dy:
        da = dy * b * s (1 + a (1 - s)),   db = dy * a s."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, dy):
        a0, b0 = ctx.saved_tensors
        a, b, dy = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (a0, b0, dy))  # fp32 at least
        s = torch.sigmoid(a)
        return (dy * b * s * (1 + a * (1 - s))).to(a0.dtype), (dy * a * s).to(b0.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of the logits z = h W^T (N, V) against the targets y (N,), without ever
    holding all N rows of logits: the training loss through a frozen, bias-free lm_head.

    Plain autograd keeps the logits and their log-softmax for the backward, (N, V) each in fp32 (V = 49,152
    for SmolLM2: 190 MB each for a micro-batch of 968 targets); this computes the loss and its gradient
    together, `chunk` rows at a time, and keeps only dh (N, C). With p = softmax(z) per row:
        L = sum_i (logsumexp(z_i) - z_i[y_i]),   dh = (p - onehot(y)) W,   W is frozen: no gradient.
    The logits are made in h's dtype and taken to fp32 (at least) for the softmax, as F.cross_entropy(z.float())."""

    @staticmethod
    def forward(ctx, h, W, y, chunk=256):  # h: (N, C), W: (V, C), y: (N,)
        loss = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        dh = torch.empty_like(h)                                         # (N, C)
        for i in range(0, len(h), chunk):
            z = (h[i:i + chunk] @ W.T).to(loss.dtype)                    # (n, V) logits
            lse = torch.logsumexp(z, -1)                                 # (n,)
            t = y[i:i + chunk, None]                                     # (n, 1) the targets
            loss += (lse - z.gather(1, t)[:, 0]).sum()
            p = z.sub_(lse[:, None]).exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=z.dtype))  # p - onehot
            torch.mm(p.to(h.dtype), W, out=dh[i:i + chunk])              # (n, C)
        ctx.save_for_backward(dh)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dh, = ctx.saved_tensors
        return dh * dloss.to(dh.dtype), None, None, None
