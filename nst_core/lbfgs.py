"""L-BFGS that lives on the device: the steps of torch.optim.LBFGS, without host synchronisation.

`LBFGS` takes the same steps as ``torch.optim.LBFGS([x], lr=lr, max_iter=1, history_size=H,
line_search_fn=None)`` called once per step (the engine's way: one loss evaluation per step), up to
float rounding:

- the first step goes ``-g`` scaled by ``min(1, 1/|g|₁)·lr``, every later one ``lr`` along the
  L-BFGS direction;
- a pair (s, y) enters the history only when ``y·s > 1e-10``, the oldest leaving a full history,
  and ``H_diag = y·s / y·y`` follows the last pair taken;
- ``max|g| <= tolerance_grad`` makes the step a no-op (nothing moves, no state changes);
  ``g·d > -tolerance_change`` leaves x where it is but keeps the new direction and gradient;
  torch's other tolerance tests come after its ``n_iter == max_iter`` exit and never run with
  max_iter=1.

What differs is how. Every scalar (step length, curvature, history count, where the ring buffer
starts) is a device tensor and every branch is a ``torch.where``, so a step never reads a value
back to the host and can be captured in a CUDA graph. The two-loop recursion is computed in its
compact form: the history is one preallocated (2(H+1))×n buffer (H+1 slots of s, then of y: the
spare slot takes each new pair before the curvature test decides), the inner products s_i·y_j
and y_i·y_j are kept in small (H+1)×(H+1) matrices updated by one matrix product per step, and
the recursion's two loops become two triangular solves on them. A step reads the history twice
(one product with [g, y, s], one with the combination weights) in about twenty kernels, where
the loop form needs ~6H small kernels. The same algebra in another order rounds differently:
the iterates agree with torch's to float precision (tests/test_lbfgs.py states how closely).

The history may live on the host (``history_device="cpu"`` for a CUDA x) when it does not fit
beside the network: it is streamed through the device in chunks, and each step then reads back
one integer (where to write), i.e. synchronises once.
"""

from __future__ import annotations

import os

import torch

from .devices import exact_float32

DEFAULT_HISTORY = 100  # the engine's history length (torch.optim.LBFGS's default)
IMPLEMENTATIONS = ("device", "torch")
IMPLEMENTATION_ENV = "NST_LBFGS"  # "torch" runs torch.optim.LBFGS instead (for comparison)
CURVATURE_EPS = 1e-10  # torch.optim.LBFGS's test y·s > 1e-10
HOST_CHUNK_BYTES = 256 << 20  # rows of a host history moved to the device at a time


def history_bytes(numel: int, history_size: int = DEFAULT_HISTORY) -> int:
    """Bytes of the (s, y) history of an image of `numel` values (float32, H+1 slots of each)."""
    return 2 * (history_size + 1) * numel * 4


def implementation() -> str:
    """The L-BFGS the engine should use: ``$NST_LBFGS`` (device or torch), device by default."""
    name = os.environ.get(IMPLEMENTATION_ENV, "device").strip().lower() or "device"
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{IMPLEMENTATION_ENV}={name!r}: must be one of {', '.join(IMPLEMENTATIONS)}")
    return name


def make(x: torch.Tensor, lr: float = 1.0, history_size: int = DEFAULT_HISTORY, kind: str | None = None,
         history_device: torch.device | str | None = None):
    """An L-BFGS over the single tensor `x` with ``step(closure)``: ours, or torch's (`kind`)."""
    kind = kind or implementation()
    if kind == "torch":
        return torch.optim.LBFGS([x], lr=lr, max_iter=1, history_size=history_size)
    if kind != "device":
        raise ValueError(f"unknown L-BFGS {kind!r}: must be one of {', '.join(IMPLEMENTATIONS)}")
    return LBFGS(x, lr=lr, history_size=history_size, history_device=history_device)


class LBFGS:
    """L-BFGS on one contiguous float tensor `x` (updated in place), state on x's device.

    ``update(grad)`` takes one step from the gradient at the current x; it is what a captured
    step calls. ``step(closure)`` is torch.optim's interface for eager code: the closure fills
    ``x.grad`` (by ``backward()``) and returns the loss, which is returned unread.
    """

    def __init__(self, x: torch.Tensor, lr: float = 1.0, history_size: int = DEFAULT_HISTORY,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9,
                 history_device: torch.device | str | None = None):
        if x.dtype not in (torch.float32, torch.float64) or not x.is_contiguous():
            raise ValueError("LBFGS needs a contiguous float32 (or float64) tensor")
        if history_size < 1:
            raise ValueError(f"history_size must be at least 1, got {history_size}")
        self.x = x
        self.lr = float(lr)
        self.history_size = h = int(history_size)
        self.tolerance_grad = float(tolerance_grad)
        self.tolerance_change = float(tolerance_change)
        dev, n, k = x.device, x.numel(), h + 1
        self.slots = k
        store = torch.device(history_device) if history_device is not None else dev
        if store.type == dev.type and (store.index is None or store.index == dev.index or dev.index is None):
            self._history = _DeviceHistory(2 * k, n, x)
        elif store.type == "cpu":
            self._history = _HostHistory(2 * k, n, x)
        else:
            raise ValueError(f"history on {store} for x on {dev}: use x's device or cpu")
        self.capturable = isinstance(self._history, _DeviceHistory)  # host history reads its slot back
        z = dict(device=dev, dtype=x.dtype)
        self._work = torch.zeros(3, n, **z)  # g, y, s of the step in hand
        self.d = torch.zeros(n, **z)  # the last direction
        self._d_new = torch.zeros(n, **z)
        self.prev_g = torch.zeros(n, **z)
        self.t = torch.zeros((), **z)  # the last step length (torch's state["t"])
        self.h_diag = torch.ones((), **z)
        self.sy = torch.zeros(k, k, **z)  # sy[i, j] = s_i·y_j over the slots
        self.yy = torch.zeros(k, k, **z)  # yy[i, j] = y_i·y_j
        self.rho = torch.zeros(k, **z)  # 1 / y_i·s_i
        self.head = torch.zeros(1, dtype=torch.long, device=dev)  # the spare slot
        self.count = torch.zeros((), dtype=torch.long, device=dev)  # pairs in the history
        self.started = torch.zeros((), dtype=torch.bool, device=dev)  # torch's state["n_iter"] > 0
        self.moved = torch.zeros((), dtype=torch.long, device=dev)  # steps that moved x (stalled: no change)
        self._positions = torch.arange(h, device=dev)
        # The triangular systems are solved at >= 64 unknowns (identity beyond h), where torch's CUDA
        # solve is one cuBLAS trsm (smaller ones take its batched path).
        self._system = torch.eye(max(h, 64), **z)
        self._rhs = torch.zeros(max(h, 64), 1, **z)

    # ---- torch.optim's interface ----------------------------------------------------------------

    def step(self, closure):
        with torch.enable_grad():
            loss = closure()
        grad = self.x.grad if self.x.grad is not None else torch.zeros_like(self.x)
        self.update(grad)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if set_to_none:
            self.x.grad = None
        elif self.x.grad is not None:
            self.x.grad.zero_()

    # ---- one step -------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, grad: torch.Tensor) -> None:
        """One L-BFGS step from `grad`, the gradient at the current x; no host synchronisation.
        Its products are full float32 (float64) whatever the TF32 setting."""
        with exact_float32():
            self._update(grad)

    def _update(self, grad: torch.Tensor) -> None:
        h, k = self.history_size, self.slots
        work = self._work
        g, y, s = work[0], work[1], work[2]
        g.copy_(grad.reshape(-1))
        live = ~(g.abs().max() <= self.tolerance_grad)  # torch returns at once otherwise

        # The pair of the last step goes into the spare slot; the curvature test decides whether
        # the slot joins the history. Before the first step d = t = 0, so s = 0 and it never does.
        torch.sub(g, self.prev_g, out=y)
        torch.mul(self.d, self.t, out=s)
        ys, yy = torch.dot(y, s), torch.dot(y, y)
        head = self.head
        self._history.write(head, s, y)
        dots = self._history.dots(work)  # (2k)×3: S·[g y s], Y·[g y s]
        s_dots, y_dots = dots[:k], dots[k:]
        self.sy.index_copy_(1, head, s_dots[:, 1:2])  # s_i·y
        self.sy.index_copy_(0, head, y_dots[:, 2].view(1, k))  # s·y_j
        self.yy.index_copy_(1, head, y_dots[:, 1:2])
        self.yy.index_copy_(0, head, y_dots[:, 1].view(1, k))
        self.rho.index_copy_(0, head, (1.0 / ys).view(1))
        accept = live & (ys > CURVATURE_EPS)
        torch.where(accept, ys / yy, self.h_diag, out=self.h_diag)
        torch.where(accept, (head + 1) % k, head, out=self.head)
        torch.where(accept, (self.count + 1).clamp_(max=h), self.count, out=self.count)

        # The two-loop recursion over the history, oldest pair first, as two triangular solves.
        order = (self.head + 1 + self._positions) % k  # slot of each position, oldest first
        valid = self._positions >= h - self.count
        rho = torch.where(valid, self.rho.index_select(0, order), 0.0)
        sy = self.sy.index_select(0, order).index_select(1, order)  # sy[a, b] = s_a·y_b by position
        yy = self.yy.index_select(0, order).index_select(1, order)
        minus_sg = -s_dots[:, 0].index_select(0, order)
        yg = y_dots[:, 0].index_select(0, order)
        alpha = self._solve(rho[:, None] * sy.triu(1), rho * minus_sg, upper=True)
        b = self.h_diag * (-yg - yy @ alpha)  # y_i·r before the second loop
        c = self._solve(rho[:, None] * sy.t().tril(-1), alpha - rho * b, upper=False)
        weights = torch.zeros(2 * k, device=g.device, dtype=g.dtype)
        weights.index_copy_(0, order, c)
        weights.index_copy_(0, order + k, -self.h_diag * alpha)
        d_new = self._history.combine(weights, out=self._d_new)  # Σ c_i s_i − H_diag Σ α_i y_i
        d_new.addcmul_(g, self.h_diag, value=-1.0)  # − H_diag g

        # Step length and the move.
        inv_l1 = 1.0 / g.abs().sum()
        t_first = torch.where(inv_l1 < 1.0, inv_l1, 1.0) * self.lr
        t = torch.where(self.started, self.lr, t_first)
        gtd = torch.dot(g, d_new)
        move = live & ~(gtd > -self.tolerance_change)
        self.x.view(-1).addcmul_(d_new, torch.where(move, t, 0.0))
        self.moved += move.long()

        # torch's state after the step (kept when the gradient test returned early).
        torch.where(live, d_new, self.d, out=self.d)
        torch.where(live, t, self.t, out=self.t)
        torch.where(live, g, self.prev_g, out=self.prev_g)
        self.started |= live

    def _solve(self, strict: torch.Tensor, rhs: torch.Tensor, upper: bool) -> torch.Tensor:
        """x with (I + strict) x = rhs, strict strictly upper (or lower) triangular, h×h."""
        h = self.history_size
        self._system[:h, :h] = strict
        self._rhs[:h, 0] = rhs
        return torch.linalg.solve_triangular(self._system, self._rhs, upper=upper, unitriangular=True)[:h, 0]

    # ---- inspection (these synchronise) ---------------------------------------------------------

    def history_len(self) -> int:
        return int(self.count)

    def state_bytes(self) -> int:
        """Bytes held for the optimiser (history, its inner products, vectors)."""
        n, size = self.x.numel(), self.x.element_size()
        return self._history.nbytes + (6 * n + 2 * self.slots * self.slots) * size


class _DeviceHistory:
    """The (s, y) slots as one matrix on the device."""

    def __init__(self, rows: int, n: int, like: torch.Tensor):
        self.buf = torch.zeros(rows, n, device=like.device, dtype=like.dtype)
        self.half = rows // 2
        self.nbytes = self.buf.numel() * self.buf.element_size()

    def write(self, slot: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
        self.buf.index_copy_(0, slot, s.view(1, -1))
        self.buf.index_copy_(0, slot + self.half, y.view(1, -1))

    def dots(self, vectors: torch.Tensor) -> torch.Tensor:
        return (vectors @ self.buf.t()).t()  # this way round: 3.6x faster on the CPU (a 3-row product)

    def combine(self, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mv(self.buf.t(), weights, out=out)


class _HostHistory:
    """The (s, y) slots in pinned host memory, moved through the device in chunks of rows."""

    def __init__(self, rows: int, n: int, like: torch.Tensor):
        self.buf = torch.zeros(rows, n, dtype=like.dtype, pin_memory=like.device.type == "cuda")
        self.half = rows // 2
        self.nbytes = self.buf.numel() * self.buf.element_size()
        self.chunk = max(1, min(rows, HOST_CHUNK_BYTES // max(1, n * self.buf.element_size())))
        self.stage = torch.zeros(self.chunk, n, device=like.device, dtype=like.dtype)
        self.device = like.device

    def write(self, slot: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
        i = int(slot)  # the one synchronisation of a step with host history
        self.buf[i].copy_(s, non_blocking=True)
        self.buf[i + self.half].copy_(y, non_blocking=True)

    def _chunks(self):
        for r0 in range(0, self.buf.shape[0], self.chunk):
            r1 = min(r0 + self.chunk, self.buf.shape[0])
            stage = self.stage[: r1 - r0]
            stage.copy_(self.buf[r0:r1], non_blocking=True)
            yield r0, r1, stage

    def dots(self, vectors: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.buf.shape[0], vectors.shape[0], device=self.device, dtype=self.buf.dtype)
        for r0, r1, stage in self._chunks():
            out[r0:r1] = (vectors @ stage.t()).t()
        return out

    def combine(self, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out.zero_()
        for r0, r1, stage in self._chunks():
            out.addmv_(stage.t(), weights[r0:r1])
        return out
