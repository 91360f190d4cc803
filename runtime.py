"""runtime.py — how a training step runs: several processes under torchrun, mixed
precision, loss scaling, gradient clipping, torch.compile.

The objectives (sttp.py) and fine-tuning's step (finetune.py) call a `Runtime` for their
backward and optimiser step, their autocast context and the rows of the global batch they
hold; `TrainingRuntime` below is the one the scripts pass in. Without torchrun and with
float32 it does exactly what sttp.Runtime does.

Under `torchrun --nproc_per_node N` each process drives one GPU (or CPU process) through
DistributedDataParallel, on its contiguous slice of every global batch (engine.Loop).
Two rules make N processes compute what one does on the same global batch:
  - randomness per sample is drawn for the whole global batch, from generators every
    process seeds alike, and each process keeps its rows (`rows`, model.Shard);
  - a loss that is a mean over samples or pixels is this process's sum divided by the
    global count (`global_mean`), so the mean of the processes' gradients, which DDP
    all-reduces, is the one-process gradient. (A mean over the same number of values per
    sample, like the token loss, needs nothing: every process has as many samples.)

--accum_steps N runs each process's rows as N micro-batches one after another, their
gradients adding up before one optimiser step, so one device reaches a batch that does
not fit in its memory. The same two rules make it compute what one step on the whole
batch does: the micro-batches are shards too (world x N of them), and a loss's global
count is counted over the whole batch before the first micro-batch's forward (sttp.py
counts the masked pixels and token positions from the masking plan, finetune.py the
labelled pixels); a stochastic-depth draw is made for the whole batch in every
micro-batch, from the same random state, and each keeps its rows.

One process group per process: init_distributed joins it in the first main() under
torchrun (reproduce.py and the tests run train.main, then finetune.main, in one process;
the later ones find it), and cli.run_cli closes it once the script's main() has returned
and its DDP network is gone (`close_distributed`): a barrier, so that every process has
finished its last collective, then destroy_process_group on the main thread, while the
interpreter is whole. It must be gone before the interpreter finalises (issue 20): Gloo
runs each collective on a worker thread, which lets go of the collective's tensors only
after waking the caller, and freeing a tensor made in Python takes the GIL; a worker that
gets there once finalisation has begun is ended by Python with pthread_exit, whose
unwinding through a C++ destructor aborts the process ("terminate called without an
active exception", exit -6). Destroying the group joins its workers, the GIL released.
Whatever still holds the group keeps it, and its threads, alive past destroy_process_group:
the DDP network (hence after main()), and torch.distributed.nn.functional, whose functions
take `group=group.WORLD` as a default argument, evaluated when it is imported: DDP's
constructor imports it (through torch._dynamo), so init_distributed imports that before
the group exists. (--compile's graphs hold the group too: with it, the threads live on.)
A main() that raised leaves the group alone: a peer may be inside a collective, and
torchrun stops the others when this process exits with an error.
"""
from __future__ import annotations

import builtins
import contextlib
import os
import sys
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

import ops
import sttp
from model import Shard
from cli import UserError


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless torchrun started several."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join torchrun's process group when it started several processes (WORLD_SIZE > 1):
    NCCL between GPUs, Gloo between CPU processes, and each process takes the GPU
    cuda:LOCAL_RANK. Every process runs the same script; from here on only rank 0 prints
    (as MultiMAE's setup_for_distributed does), errors to stderr excepted. Returns (rank,
    number of processes, device); without torchrun (0, 1, device), nothing touched.
    close_distributed ends it (see the module's docstring)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():               # once per process (finetune.main after train.main)
        # Before the group exists: DDP's constructor imports torch._dynamo, and with it
        # torch.distributed.nn.functional, whose default arguments would hold the group.
        import torch._dynamo  # noqa: F401
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        if dist.get_rank() != 0:
            builtin_print = builtins.print

            def print_errors_only(*args, **kwargs):
                if kwargs.get("file") is sys.stderr:
                    builtin_print(*args, **kwargs)

            builtins.print = print_errors_only
    return dist.get_rank(), dist.get_world_size(), device


def close_distributed() -> None:
    """The end of a torchrun process, once its main() has returned (cli.run_cli): every
    process waits until all have finished their last collective, then destroys the process
    group here, on the main thread, before the interpreter shuts down. Nothing without
    torchrun."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def global_mean(local_sum: torch.Tensor, local_count) -> torch.Tensor:
    """Under DDP: this process's share of a mean over the global batch, i.e. its sum over the
    global count, times the number of processes because DDP averages the gradients over
    them. The gradient is then the one-process gradient of the global-batch mean, and the
    mean over processes of the returned values is that mean (engine.Loop logs it). The count
    is all-reduced without gradient; a global count of 0 gives 0 (the sum is empty)."""
    count = torch.as_tensor(local_count, device=local_sum.device).detach().to(torch.int64)
    dist.all_reduce(count)
    return local_sum * (dist.get_world_size() / count.clamp_min(1))


# -----------------------------------------------------------------------------
# Precision


DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """--dtype -> the autocast dtype (None: float32, no autocast). One line when this
    device's autocast does not support it (torch would only warn and run float32)."""
    dtype = DTYPES[name]
    if dtype is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                torch.autocast(device.type, dtype=dtype)
            except RuntimeError as e:            # e.g. bfloat16 on a GPU without it
                caught.append(e)
        if caught:
            why = str(getattr(caught[0], "message", caught[0])).splitlines()[0]
            raise UserError(f"--dtype {name}: autocast on {device.type} does not support it ({why})")
    return dtype


def grad_scaler(dtype: Optional[torch.dtype], device: torch.device) -> Optional[torch.amp.GradScaler]:
    """float16 needs loss scaling (its gradients underflow); bfloat16 has float32's range."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


# -----------------------------------------------------------------------------
# The runtime the scripts hand to the objectives


class TrainingRuntime(sttp.Runtime):
    """sttp.Runtime for real runs: this process's shard of the global batch under torchrun,
    autocast to `dtype`, float16's loss scaling, gradient clipping, --compile (`compiled`),
    and the profiler labels "backward" and "optimizer" (bench.py's time split)."""

    def __init__(self, device: torch.device, dtype: Optional[torch.dtype] = None,
                 scaler: Optional[torch.amp.GradScaler] = None, clip_grad: float = 0.0, accum_steps: int = 1,
                 compile: bool = False):
        self.device, self.dtype, self.scaler, self.clip_grad = device, dtype, scaler, clip_grad
        self.rank, self.world = rank_and_world()
        self.micro_steps, self.micro = accum_steps, 0      # micro-batches per step; the one running
        self.compile = compile
        self._compiled = {}

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.chunk(self.world)[self.rank] if self.world > 1 else x

    def network(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def mean(self, total: torch.Tensor, count: torch.Tensor, global_count=None) -> torch.Tensor:
        if self.world == 1:
            return super().mean(total, count, global_count)
        if global_count is not None:
            return total * (self.world / global_count.clamp_min(1))
        return global_mean(total, count)

    def share(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.micro_steps if self.micro_steps > 1 else x   # equally large micro-batches

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        x = x.detach().clone()
        dist.all_reduce(x)
        return x

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def compiled(self, fn):
        """--compile: `fn` (sttp._masked_pass: input adapters, masking, encoder, MIM heads,
        pixel losses; finetune.forward_loss: the segmenter and its loss) compiled whole,
        once per runtime. Without --compile, `fn` itself.

        fullgraph=True, one graph per kind of pass: the masking plan (stages 1 and 2, drawn
        from a torch.Generator, which dynamo does not trace) is an input, and it states its
        visible-token count V (the budget) and whether it pads, so no shape and no branch
        depends on the data. Guards then tell the passes apart: MIM, M²IM and the STTP
        teacher and student share one graph under the Dirichlet scheme (same budget, no
        padding); under the "mae" scheme with dropped modalities, or with a no-grad or an
        unmasked forward (some --token_target levels), a second one is compiled.
        dynamic=False: shapes are specialised (a smaller last batch compiles once more).
        Two cases fall back to fullgraph=False (graph breaks, not errors):
          - the pure-PyTorch reference gather (no extension, or no CUDA kernel for this
            device): it selects with a boolean mask, whose size is data-dependent;
          - torchrun: the losses' global means all-reduce counts (dist.all_reduce on the
            process group) and DDP's hooks run in its forward."""
        if not self.compile:
            return fn
        if fn not in self._compiled:
            fullgraph = self.world == 1 and ops.available(self.device)
            self._compiled[fn] = torch.compile(fn, fullgraph=fullgraph, dynamic=False)
        return self._compiled[fn]

    def optimizer_options(self) -> dict:
        """Keyword arguments for torch.optim.AdamW. With --compile: AdamW's fused kernel (one
        pass over each parameter, where the default CPU implementation runs ~8 elementwise
        ops per parameter tensor, one tensor at a time). At ViT-B the update takes 0.06 s
        instead of 0.20 s on the 2-core CPU, 14% of an eager MIM step at batch 4 that the
        compiled pass cannot touch. Like the compiled pass it changes the update by rounding
        (~1e-8 here), so plain runs keep the default and their results stay bit-identical.
        Which implementation runs belongs to the invocation, not to the checkpoint
        (engine.load_optimizer_state)."""
        return {"fused": True} if self.compile and self.device.type in ("cpu", "cuda") else {}

    def step(self, model, optimizer, loss: torch.Tensor) -> None:
        """Backward and one optimiser step. With float16's GradScaler the loss is scaled for
        the backward and the gradients unscaled before clipping, so `clip_grad` bounds the
        true gradient norm; scaler.step skips a step whose gradients overflowed (the same on
        every process: DDP all-reduces them first)."""
        optimizer.zero_grad(set_to_none=True)
        self._backward(loss)
        self._update(model, optimizer)

    def accumulate(self, model, optimizer, forward, batch_size: int) -> list:
        """sttp.Runtime.accumulate over --accum_steps micro-batches: forward and backward of
        each in turn (DDP synchronises the gradients in the last one's backward only), then
        one optimiser step."""
        if self.micro_steps == 1:
            return super().accumulate(model, optimizer, forward, batch_size)
        size = batch_size // self.micro_steps
        optimizer.zero_grad(set_to_none=True)
        start = _rng_state(self.device)
        outs = []
        for j in range(self.micro_steps):
            self.micro = j
            if j:                              # each micro-batch draws what the whole batch draws
                _set_rng_state(start, self.device)
            last = j == self.micro_steps - 1
            no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else None
            with no_sync or contextlib.nullcontext():
                outs.append(forward(slice(j * size, (j + 1) * size)))
                self._backward(outs[-1][0])
        self.micro = 0
        self._update(model, optimizer)
        return outs

    def _backward(self, loss: torch.Tensor) -> None:
        with record_function("backward"):
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def _update(self, model, optimizer) -> None:
        with record_function("optimizer"):
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            if self.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad)
            if self.scaler is None:
                optimizer.step()
            else:
                self.scaler.step(optimizer)
                self.scaler.update()

    def wrap(self, net: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """The network the training steps run: `net` itself in one process; under torchrun
        `net` wrapped in DistributedDataParallel, whose backward all-reduces (averages) the
        gradients, with `net.shard` set to this process's rows. Checkpoints keep saving
        `net`, so their format doesn't depend on the process count. find_unused_parameters:
        some parameter may get no gradient in a step (DDP must then look for them after
        each forward, or it waits for their gradients forever)."""
        if self.world > 1 or self.micro_steps > 1:
            net.shard = _Rows(self)             # stochastic depth draws for the global batch
        if self.world == 1:
            return net
        return DistributedDataParallel(net, device_ids=[self.device] if self.device.type == "cuda" else None,
                                       find_unused_parameters=find_unused_parameters)


class _Rows(Shard):
    """The network's model.Shard: the rows of the global batch that its forward holds, the
    micro-batch running now of this process's slice."""

    def __init__(self, runtime: TrainingRuntime):
        self.runtime = runtime

    @property
    def world(self) -> int:
        return self.runtime.world * self.runtime.micro_steps

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        return x.chunk(self.world)[rt.rank * rt.micro_steps + rt.micro]


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)

