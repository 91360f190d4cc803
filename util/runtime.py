"""util/runtime.py — how a training step runs: the iterations of an objective (sttp.py) and
fine-tuning's step, on one process or several under torchrun, in micro-batches, in mixed
precision, compiled.

    rt = Runtime(device, dtype, scaler, clip_grad, accum_steps, compile)
    model = rt.wrap(net)                                   # DDP under torchrun
    logs = rt.run_objective(sttp.OBJECTIVES["sttp"], model, optimizer, batch, ocfg, generator)
    outs = rt.learn(model, optimizer, forward, n, rows)    # one optimiser step (finetune.py)

The objectives say what each iteration computes; this file decides how. For each Iteration
an objective yields: draw its masking (sttp.input_plan) for the global batch, keep this
process's rows, count what each loss averages over (sttp.loss_weights) over the global
batch, run the network and its loss (autocast, --compile) on each micro-batch, backward,
one optimiser step (loss scaling, clipping); then send the objective the outputs of the
whole global batch (its tokens: a target), gathered from every process.

Three guarantees, and what keeps them:
  - **N processes compute what one does** on the same global batch (torchrun
    --nproc_per_node N, DistributedDataParallel, each process a contiguous slice of every
    global batch, engine.Loop). Every random draw per sample is made for the global batch
    from generators every process seeds alike, and each process keeps its rows: the
    masking plans here, fine-tuning's choice of inputs, and stochastic depth (`wrap` makes
    every model.DropPath draw for the global batch). Every loss term is a sttp.Mean whose
    count is counted over the global batch before the forward, so each process's term is
    its part of the global batch's mean; DDP averages the processes' gradients, so each
    process back-propagates its part times N. The objective sees the global batch's
    outputs (`gather`), so statistics it takes over the batch (the token normalisation)
    are the global batch's.
  - **--accum_steps M equals one batch**: each process's rows run as M micro-batches one
    after another, their gradients adding up before one optimiser step. They are shards too
    (N x M in all): the counts are those of the whole batch, a mean of equally weighted
    samples is divided by N x M, and each micro-batch replays the random state of the
    step's start, so that stochastic depth draws what the whole batch draws and each
    micro-batch keeps its rows. A target forward (no gradient) runs on all rows at once.
  - **--compile is one graph** per kind of forward: `compiled` compiles the network and its
    pixel losses whole (the pre-training forward; finetune.forward_loss: the segmenter and
    its loss), fullgraph=True. The masking plan (drawn from a torch.Generator, which dynamo
    does not trace) and the loss weights are its inputs, and the plan states its visible-
    token count V (the budget) and whether it pads, so no shape and no branch depends on the
    data. Guards then tell the passes apart: MIM, M²IM and the STTP teacher and student
    share one graph under the Dirichlet scheme (same budget, no padding); under the "mae"
    scheme with dropped modalities, or with a no-grad or an unmasked forward (some
    --token_target levels), a second one is compiled. dynamic=False: shapes are specialised
    (a smaller last batch compiles once more). Two cases fall back to fullgraph=False
    (graph breaks, not errors): the pure-PyTorch reference gather (no extension, or no CUDA
    kernel for this device), which selects with a boolean mask of data-dependent size; and
    torchrun, whose DDP hooks run in the forward. In the segmenter, the compiled graph
    upsamples its logits with two matmuls (`resize_bilinear`, installed by `wrap`): inductor
    turns F.interpolate's backward into a scatter-add that took ~9x eager's time on CPU
    (109 ms of a 230 ms tiny fine-tuning step).

One process group per process: init_distributed joins it in the first main() under
torchrun (studies/reproduce.py and the tests run train.main, then finetune.main, in one process;
the later ones find it); cli.run_cli closes it once the script's main() has returned (see
there why it must be closed before the interpreter finalises). torch._dynamo is imported
before the group exists: DDP's constructor imports it, and with it
torch.distributed.nn.functional, whose default arguments would hold the group.
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import os
import sys
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

import masking
import model as M
import sttp
from modalities import prepare_inputs
from util import ops
from util.cli import UserError


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
    number of processes, device); without torchrun (0, 1, device), nothing touched."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():               # once per process (finetune.main after train.main)
        import torch._dynamo  # noqa: F401  (before the group: see the module's docstring)
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        if dist.get_rank() != 0:
            builtin_print = builtins.print

            def print_errors_only(*args, **kwargs):
                if kwargs.get("file") is sys.stderr:
                    builtin_print(*args, **kwargs)

            builtins.print = print_errors_only
    return dist.get_rank(), dist.get_world_size(), device


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
# The runtime


class Runtime:
    """How the steps run: this process's rows of the global batch under torchrun, micro-
    batches, autocast to `dtype`, float16's loss scaling, gradient clipping, --compile, and
    the profiler labels "forward", "backward" and "optimizer" (studies/bench.py's time split).
    Without torchrun, accumulation, autocast or compile it is a plain forward, backward
    and optimizer.step()."""

    def __init__(self, device: torch.device, dtype: Optional[torch.dtype] = None,
                 scaler: Optional[torch.amp.GradScaler] = None, clip_grad: float = 0.0, accum_steps: int = 1,
                 compile: bool = False):
        self.device, self.dtype, self.scaler, self.clip_grad = device, dtype, scaler, clip_grad
        self.rank, self.world = rank_and_world()
        self.micro_steps, self.micro = accum_steps, 0      # micro-batches per step; the one running
        self.shards = self.world * accum_steps             # parts of the global batch, one at a time
        self.compile = compile
        self._compiled = {}

    # -- a pre-training batch: the iterations of an objective

    def run_objective(self, objective, model, optimizer, batch: dict, cfg: sttp.ObjectiveConfig, generator,
                      teacher: Optional[torch.nn.Module] = None) -> dict:
        """One batch of a pre-training objective (sttp.OBJECTIVES): every Iteration it
        yields is run (a training iteration: one optimiser step; else a forward without
        gradient, of `teacher` if it asks for kd's), and what its forward produced on the
        global batch is sent back. Returns the objective's logs."""
        net = self.network(model)
        inputs = prepare_inputs(batch, net.inputs)
        B = inputs[net.inputs[0]].shape[0] * self.world
        K, N = len(net.inputs), net.num_tokens(*M.image_size(inputs))
        steps, reply = objective(cfg, generator), None
        while True:
            try:
                it = steps.send(reply)
            except StopIteration as end:
                return end.value
            plan = _take(sttp.input_plan(it, B, K, N, cfg, generator, self.device), self._rows_of(B))
            weights = self._global(sttp.loss_weights(net, inputs, masking.hidden_mask(plan), plan.keep,
                                                     cfg.token_positions))
            if it.teacher and teacher is None:
                raise ValueError("this objective's target comes from a frozen, separate teacher: none was given")
            if it.loss is None:
                reply = self._target(teacher if it.teacher else net, inputs, plan, weights)
            else:                     # the objective's targets are the global batch's: this process's rows
                reply = self._train(it, model, optimizer, inputs, plan, weights, _take(it.targets, self._rows_of(B)))

    def _train(self, it: sttp.Iteration, model, optimizer, inputs: dict, plan, weights: dict, targets: dict) -> sttp.Pass:
        """A training iteration: forward and loss on each micro-batch, one optimiser step."""
        patch = self.network(model).cfg.patch_size

        def forward(model, rows):
            with record_function("forward"):
                p = self.compiled(self._forward)(model, rows["inputs"], rows["plan"], rows["weights"], patch)
            terms = it.loss(p, rows["targets"])
            values = {k: self._part(m) for k, m in {**p.losses, **terms}.items()}
            loss = sum(terms[k].weight * values[k] for k in terms)
            return loss, (p, {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in values.items()}})

        outs = self.learn(model, optimizer, forward, plan.keep.shape[0],
                          {"inputs": inputs, "plan": plan, "weights": weights, "targets": targets})
        logs = {}
        for _, numbers in outs:
            for k, v in numbers.items():
                logs[k] = logs.get(k, 0.0) + v
        return self._whole_batch([p for p, _ in outs], logs)

    @torch.no_grad()
    def _target(self, net, inputs: dict, plan, weights: dict) -> sttp.Pass:
        """A forward without gradient (a target): the bare network (nothing to synchronise) on
        all of this process's rows at once."""
        p = self.compiled(self._forward)(net, inputs, plan, weights, net.cfg.patch_size)
        return self._whole_batch([p], {})

    def _forward(self, model, inputs: dict, plan, weights: dict, patch: int) -> sttp.Pass:
        """What --compile compiles: the network and its pixel losses, under autocast."""
        with self.autocast():
            return sttp.masked_forward(model, inputs, plan, weights, patch)

    def _part(self, mean: sttp.Mean) -> torch.Tensor:
        """This forward's part of a loss term over the global batch: its sum over the global
        count (the weights' counts are global), or, for a mean of equally weighted samples,
        its mean over the number of parts."""
        if mean.count is None and self.shards > 1:
            return mean.total / self.shards
        return mean.value()

    def _whole_batch(self, passes: list, logs: dict) -> sttp.Pass:
        """The global batch's outputs of an iteration, for the objective: the micro-batches'
        tokens, hidden patches and kept modalities one after another, gathered from every
        process (detached: they are data from here on)."""
        cat = lambda xs: self.gather(torch.cat([x.detach() for x in xs]))
        return sttp.Pass({}, {h: cat([p.tokens[h] for p in passes]) for h in passes[0].tokens},
                         cat([p.hidden for p in passes]), cat([p.keep for p in passes]), logs=logs)

    def _global(self, weights: dict) -> dict:
        """Loss weights whose counts are those of the global batch."""
        return {k: sttp.Weights(w.map, None if w.count is None else self.all_sum(w.count)) for k, w in weights.items()}

    # -- one optimiser step

    def learn(self, model, optimizer, forward, n: int, rows: dict) -> list:
        """One optimiser step on this process's n rows (`rows`: tensors with one row per
        sample, in dicts and dataclasses; 0-dim tensors are of the whole batch): forward(model,
        the rows of a micro-batch) -> (its part of the loss, anything) for each micro-batch in
        turn and its backward (DDP synchronises the gradients in the last one's only), then
        the update. Returns what each forward returned besides its loss."""
        size = n // self.micro_steps
        optimizer.zero_grad(set_to_none=True)
        start = _rng_state(self.device) if self.micro_steps > 1 else None
        outs = []
        for j in range(self.micro_steps):
            self.micro = j
            if j:                              # each micro-batch draws what the whole batch draws
                _set_rng_state(start, self.device)
            last = j == self.micro_steps - 1
            sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else None
            with sync or contextlib.nullcontext():
                loss, out = forward(model, _take(rows, slice(j * size, (j + 1) * size)))
                self._backward(loss * self.world if self.world > 1 else loss)
            outs.append(out)
        self.micro = 0
        self._update(model, optimizer)
        return outs

    def _backward(self, loss: torch.Tensor) -> None:
        with record_function("backward"):
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def _update(self, model, optimizer) -> None:
        """With float16's GradScaler the gradients are unscaled before clipping, so
        `clip_grad` bounds the true gradient norm; scaler.step skips a step whose gradients
        overflowed (the same on every process: DDP all-reduces them first)."""
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

    # -- the processes

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """This process's rows of a tensor drawn for the global batch."""
        return x[self._rows_of(x.shape[0])] if self.world > 1 else x

    def _rows_of(self, n: int) -> slice:
        """This process's rows of a global batch of n: a contiguous slice (engine.Loop's)."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """A sum over the processes (no gradient): `x` itself in one process."""
        if self.world == 1:
            return x
        x = x.detach().clone()
        dist.all_reduce(x)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The processes' rows one after another: the global batch's (`x` in one process)."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def network(self, model: torch.nn.Module) -> torch.nn.Module:
        """The bare network (its cfg, num_tokens) inside whatever wraps it for training."""
        return model.module if isinstance(model, DistributedDataParallel) else model

    def wrap(self, net: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """The network the training steps run: `net` itself in one process; under torchrun
        `net` wrapped in DistributedDataParallel, whose backward all-reduces (averages) the
        gradients. Checkpoints keep saving `net`, so their format doesn't depend on the
        process count. When the batch is split (processes or micro-batches), every
        model.DropPath of `net` draws for the global batch and keeps its rows; with
        --compile the segmenter upsamples with resize_bilinear (see `compiled`).
        find_unused_parameters: some parameter may get no gradient in a step (DDP must then
        look for them after each forward, or it waits for their gradients forever)."""
        for m in net.modules():
            if isinstance(m, M.DropPath) and self.shards > 1:
                m.draw = self._draw_for_the_global_batch
            if isinstance(m, M.ConvNeXtAdapter) and self.compile:
                m.upsample = resize_bilinear
        if self.world == 1:
            return net
        return DistributedDataParallel(net, device_ids=[self.device] if self.device.type == "cuda" else None,
                                       find_unused_parameters=find_unused_parameters)

    def _draw_for_the_global_batch(self, x: torch.Tensor) -> torch.Tensor:
        """model.DropPath.draw when the batch is split: one uniform per sample of the global
        batch, of which this part keeps its rows (micro-batch `micro` of process `rank`)."""
        u = torch.rand(x.shape[0] * self.shards, *([1] * (x.dim() - 1)), device=x.device)
        return u.chunk(self.shards)[self.rank * self.micro_steps + self.micro]

    # -- mixed precision, compile

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def compiled(self, fn):
        """--compile: `fn` compiled whole, once per runtime (the module's docstring says how);
        without --compile, `fn` itself."""
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
        (checkpoints.load_optimizer_state)."""
        return {"fused": True} if self.compile and self.device.type in ("cpu", "cuda") else {}


def resize_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """F.interpolate(x, size, mode="bilinear", align_corners=False) as two matmuls with the
    1-D interpolation weights (each output row mixes two input rows); equal up to rounding.
    model.ConvNeXtAdapter.upsample under --compile (the module's docstring says why)."""
    def weights(n_out: int, n_in: int) -> torch.Tensor:
        # Output pixel i samples the input at (i + 0.5) * n_in / n_out - 0.5 (pixel centres),
        # clamped at the first pixel; it mixes its two neighbours linearly.
        src = ((torch.arange(n_out, device=x.device, dtype=torch.float32) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
        lo = src.floor().clamp_max(n_in - 1)
        hi = (lo + 1).clamp_max(n_in - 1)
        frac = (src - lo)[:, None]
        cols = torch.arange(n_in, device=x.device, dtype=torch.float32)
        return ((cols == lo[:, None]) * (1 - frac) + (cols == hi[:, None]) * frac).to(x.dtype)

    (H, W), (h, w) = size, x.shape[-2:]
    return weights(H, h) @ x @ weights(W, w).t()


# -----------------------------------------------------------------------------
# Rows of a batch


def _take(x, rows: slice):
    """The rows `rows` of every tensor with one row per sample in x (dicts and dataclasses
    looked into; 0-dim tensors, of the whole batch, and other values kept)."""
    if torch.is_tensor(x):
        return x[rows] if x.dim() else x
    if isinstance(x, dict):
        return {k: _take(v, rows) for k, v in x.items()}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _take(getattr(x, f.name), rows) for f in dataclasses.fields(x)})
    return x


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
