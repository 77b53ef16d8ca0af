"""Counting tensor memory without an allocator: every storage alive (each once, until
freed) and every tensor autograd saved for backward, on fake or real tensors.

LiveBytes is a TorchDispatchMode: each op's outputs are registered by storage (a weak
reference: a storage counts until it is freed; FSDP's storage resizes are patched in, as
torch's own MemTracker does), giving the live bytes, their peak and what was alive at it.
Its saved-tensor hooks give the bytes held for backward (by storage, parameters excluded:
what benchmarks/worker.py measures) and their peak. gpt3d/planner/fake.py runs it on fake
tensors; benchmarks/bench_planner.py on real ones, for the same numbers from a real run.

IndexArithmetic is for fake worlds: a fake tensor has no values, so index arithmetic that
Python reads back (DeviceMesh coordinates, shard offsets, pipeline votes) runs on real
tensors: ops whose tensor arguments are all real, and small integer tensors made from
nothing, stay real; a data-dependent size (nonzero) takes its upper bound; a data-dependent
choice (topk: MoE routing) is balanced, and an all-to-all of real metadata (tokens per
expert) returns what this rank sent, as every rank of a balanced world would.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SMALL_INDEX = 1 << 16  # integer tensors up to this many elements made from nothing stay real


def _is_dtensor_type(t: type) -> bool:
    from torch.distributed.tensor import DTensor

    return issubclass(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors) -> float:
    return float(sum(local(t).numel() * local(t).element_size() for t in tensors))


class IndexArithmetic(TorchDispatchMode):
    """Inside FakeTensorMode: keep index arithmetic real and bound data-dependent sizes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        if any(_is_dtensor_type(t) for t in types):
            return NotImplemented  # let DTensor unwrap to local ops first
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        fake = any(isinstance(t, FakeTensor) or t.is_meta for t in tensors)  # meta: to_empty
        if tensors and not fake:
            if func is torch.ops.c10d.alltoall_base_.default:  # e.g. MoE token counts:
                args[0].copy_(args[1])  # every rank sends what this one does (balanced)
            with unset_fake_temporarily():  # e.g. a DeviceMesh's rank tensor
                return func(*args, **kwargs)
        if func is torch.ops.aten.topk.default:  # data-dependent choice: balanced
            return _balanced_topk(func, args, kwargs)
        if func is torch.ops.aten.nonzero.default:  # (numel, ndim): every element non-zero
            x = args[0]
            return torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device)
        out = func(*args, **kwargs)
        small_index = isinstance(out, FakeTensor) and not out.is_floating_point()
        if not tensors and small_index and out.numel() <= SMALL_INDEX:
            with unset_fake_temporarily():  # torch.arange / zeros of offsets and votes
                return func(*args, **kwargs)
        return out


def _balanced_topk(func, args, kwargs):
    """topk of fake scores: the values' shape from fake, indices real and spread evenly
    (row n takes n*k .. n*k+k-1 mod the dim's size): MoE routing every expert the same
    number of tokens, the planner's assumption."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    values, _ = func(*args, **kwargs)
    x, k = args[0], args[1]
    dim = kwargs.get("dim", args[2] if len(args) > 2 else -1) % x.dim()
    with unset_fake_temporarily():
        rows = torch.arange(values.numel() // k).unsqueeze(1) * k + torch.arange(k)  # (R, k)
        shape = [*values.shape[:dim], *values.shape[dim + 1 :], k]
        idx = (rows % x.shape[dim]).reshape(shape).movedim(-1, dim).contiguous()
    return values, idx


class LiveBytes(TorchDispatchMode):
    """Bytes of storages alive (every op's outputs, each storage once, until freed), their
    peak and what was alive at it; bytes of tensors saved for backward and their peak."""

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode = fake_mode
        self.uid: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> id
        self.size: dict[int, int] = {}  # id -> bytes, live storages only
        self.now = self.peak = 0
        self.at_peak: dict[int, int] = {}
        self.saved: dict[int, int] = {}  # id -> saves alive
        self.saved_bytes: dict[int, int] = {}  # id -> bytes counted when first saved
        self.saved_now = self.saved_peak = self.saved_at_peak = 0
        self.skip: set[int] = set()  # parameters' storages: never counted as saved
        self.count = 0  # storages seen

    # ---- storages
    def track(self, t: torch.Tensor) -> int | None:
        t = local(t)
        if not isinstance(t, torch.Tensor) or _is_dtensor_type(type(t)):
            return None
        st = t.untyped_storage()
        uid = self.uid.get(st)
        if uid is None:
            self.count += 1
            uid = self.uid[st] = self.count
            weakref.finalize(st, self._free, uid)
            self._add(uid, st.nbytes())
        return uid

    def _add(self, uid: int, nbytes: int) -> None:
        self.size[uid] = self.size.get(uid, 0) + nbytes
        self.now += nbytes
        if self.now > self.peak:
            self.peak, self.at_peak = self.now, dict(self.size)
            self.saved_at_peak = self.saved_now

    def _free(self, uid: int) -> None:
        self.now -= self.size.pop(uid, 0)

    def resized(self, st: torch.UntypedStorage) -> None:
        uid = self.uid.get(st)
        if uid is not None:
            self._add(uid, st.nbytes() - self.size.get(uid, 0))

    def reset_peak(self) -> None:
        self.peak, self.at_peak, self.saved_at_peak = self.now, dict(self.size), self.saved_now
        self.saved_peak = self.saved_now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._guards import active_fake_mode

        if any(_is_dtensor_type(t) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if active_fake_mode() in (self.fake_mode, None):  # not DTensor's shape propagation
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.track(t)
        return out

    def breakdown(self, params, optimizer, dims, rank: int):
        """A MemoryBreakdown after the measured step: state (params, their grads, the
        optimizer's tensors), activations = the saved-tensor peak, temporaries = what the
        live-byte peak needs beyond the state alive at it and that saved peak (>= 0). Its
        total (gradients counted whole) is >= the live peak, by at most the gradients that
        did not exist yet at it."""
        from gpt3d.planner.memory import MemoryBreakdown

        grads = [p.grad for p in params if p.grad is not None]
        opt = [v for s in optimizer.state.values() for v in s.values()]
        opt = [v for v in opt if isinstance(v, torch.Tensor)]
        state = {self.track(t) for t in (*params, *grads, *opt)}
        state_at_peak = sum(n for uid, n in self.at_peak.items() if uid in state)
        return MemoryBreakdown(
            params=nbytes(params),
            grads=nbytes(grads),
            optimizer=nbytes(opt),
            activations=float(self.saved_peak),
            temporaries=float(max(0, self.peak - state_at_peak - self.saved_peak)),
            pp_rank=rank // (dims.world_size // dims.pp),
            detail={
                "peak": float(self.peak),
                "state_at_peak": float(state_at_peak),
                "saved_at_peak": float(self.saved_at_peak),
                "rank": rank,
            },
        )

    # ---- tensors saved for backward
    def pack(self, t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return t
        uid = self.track(t)
        if uid is None or uid in self.skip or not self.size.get(uid):
            return t
        self.saved[uid] = self.saved.get(uid, 0) + 1
        if self.saved[uid] == 1:  # released by the same amount, whatever resizes happen
            self.saved_bytes[uid] = self.size[uid]  # to the storage meanwhile (FSDP frees
            self.saved_now += self.size[uid]  # unsharded parameters by resizing to 0)
            self.saved_peak = max(self.saved_peak, self.saved_now)
        # Hold a detached alias: holding `t` itself would tie a saved output to its own
        # grad_fn (node -> holder -> t -> node), a cycle gc cannot see, and split backward
        # (zero-bubble I/W) never releases some nodes, so their tensors would leak.
        return _Saved(self, uid, t.detach())

    @staticmethod
    def unpack(held):
        return held.t if isinstance(held, _Saved) else held

    def unsave(self, uid: int) -> None:
        self.saved[uid] -= 1
        if self.saved[uid] == 0:
            del self.saved[uid]
            self.saved_now -= self.saved_bytes.pop(uid)

    @contextlib.contextmanager
    def tracking(self):
        """Count storages and saved tensors (storage resizes too: FSDP frees unsharded
        parameters by resizing their storage to 0, which no dispatch mode sees)."""
        resize = torch.UntypedStorage.resize_

        def resize_(st, size):
            out = resize(st, size)
            self.resized(st)
            return out

        torch.UntypedStorage.resize_ = resize_
        try:
            with self, torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield self
        finally:
            torch.UntypedStorage.resize_ = resize


class _Saved:
    __slots__ = ("meter", "uid", "t")

    def __init__(self, meter: LiveBytes, uid: int, t: torch.Tensor):
        self.meter, self.uid, self.t = meter, uid, t

    def __del__(self):
        self.meter.unsave(self.uid)
