"""``heal``: train a rewritten program back toward the program before the rewrite (the teacher).

    heal[:tokens=N|steps=N|minutes=M][,objective=local|kd|local+kd]
        [,params=rewritten|attention|lora:R][,lr=X][,seed=N][,batch=N]

objective
  local     layer by layer, through the sequential engine (rewriter.passes.sequential): each
            layer block holding a healed site trains until what it hands on (the residual
            stream) matches the teacher's block run on the *same* inputs (relative squared
            error); the next block then sees the healed block's outputs, so upstream error is
            repaired downstream. After a layer whose attention drop-attn removed, the next
            healed block matches what the teacher's two blocks hand on.
  kd        end to end: KL(teacher || program) of the next-token distributions for language
            models, the relative squared error of the outputs for other models.
  local+kd  (default) local, then kd; the budget is split evenly.
params
  rewritten (default) the q/k/v/o projections of the sites the rewrite changed (after
                      drop-attn: the site following each dropped one)
  attention           the projections of every site
  lora:R              rank-R adapters on the rewritten sites' projection weights, merged back
budget (one of them; default tokens=32k)
  tokens=N   tokens of calibration text through training (k and M suffixes), split between
             the phases; in the local phase each healed block trains on the phase's share
  steps=N    optimizer steps (one calibration window each), split likewise
  minutes=M  wall-clock minutes, split likewise (the only budget that is not deterministic)

batch=N    calibration windows per optimizer step (default 1), their gradients averaged. Under
           torchrun (rewriter.passes.parallel) a step's windows are split over the processes
           and DistributedDataParallel averages the gradients, so N must be a multiple of the
           number of processes and the run trains the weights one process would.

Adam, gradients clipped to norm 1, seeded. A block (or the kd phase) whose error is already at
rounding level is not trained, so healing an exact rewrite changes nothing. The healed program
has the same graph and parameter shapes: save, hf/, ONNX export and decoders work unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from rewriter.errors import SpecError
from rewriter.ir.graph import fetch_attr, set_attr
from rewriter.ir.specs import Key, Spec, choice, non_negative_int, positive_int
from rewriter.passes.base import PassContext, PassResult, is_rewritten
from rewriter.passes.parallel import all_sum, any_rank, distributed, world
from rewriter.passes.registry import variant
from rewriter.passes.sequential import Sequential, align, check_aligned
from rewriter.passes.trainable import Trainable, projection_tensors, rewritten_sites

MAX_WINDOWS = 64  # calibration windows held (64 x 512 tokens stays clear of held-out text)
LOCAL_WINDOWS = 16  # windows whose activations the local phase carries under a minutes budget
PROBE_WINDOWS = 4  # windows a block's error before and after is measured on
DEFAULT_TOKENS = 32_768
SKIP_BELOW = {"local": 1e-10, "kd": 1e-9}  # rounding-level error: nothing to heal
LR = {"full": 1e-4, "lora": 1e-3}


def _count(text: str) -> int:
    """``1M``, ``64k``, ``5000``."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    value = float(text[:-1] if scale > 1 else text) * scale
    if value < 1 or value != int(value):
        raise ValueError
    return int(value)


def _minutes(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise ValueError
    return value


def _params(text: str) -> tuple[str, int | None]:
    if text in ("rewritten", "attention"):
        return text, None
    kind, _, rank = text.partition(":")
    if kind != "lora":
        raise ValueError
    return "lora", positive_int(rank)


def _lr(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise ValueError
    return value


KEYS = {
    "tokens": Key(_count, "a positive token count like 64k or 1M", metavar="N"),
    "steps": Key(positive_int, "a positive integer", metavar="N"),
    "minutes": Key(_minutes, "a positive number of minutes", metavar="M"),
    "objective": Key(choice("local", "kd", "local+kd"), "local, kd or local+kd",
                     default="local+kd", metavar="local|kd|local+kd"),
    "params": Key(_params, "rewritten, attention or lora:R (R a positive rank)",
                  default=("rewritten", None), metavar="rewritten|attention|lora:R"),
    "lr": Key(_lr, "a positive learning rate", metavar="X"),
    "seed": Key(non_negative_int, "an integer >= 0", default=0, metavar="N"),
    "batch": Key(positive_int, "a positive integer", default=1, metavar="N"),
}


@dataclass
class Budget:
    """How long one phase (or one block of the local phase) trains."""

    kind: str  # "tokens", "steps" or "minutes"
    amount: float

    def share(self, parts: int) -> Budget:
        return Budget(self.kind, self.amount / parts)

    def spent(self, steps: int, tokens: int, seconds: float) -> bool:
        used = {"tokens": tokens, "steps": steps, "minutes": seconds / 60}[self.kind]
        return used >= self.amount

    def steps_hint(self, tokens_per_step: int) -> int | None:
        """The number of steps, when the budget fixes it (for the progress bar)."""
        if self.kind == "steps":
            return max(1, math.ceil(self.amount))
        if self.kind == "tokens":
            return max(1, math.ceil(self.amount / tokens_per_step))
        return None


@variant("heal", KEYS, "applied after the other specs: trains the rewritten program toward the "
         "original (layer-wise output matching, then next-token KL) on calibration text; same "
         "graph and parameter shapes afterwards",
         usage=("heal[:tokens=N|steps=N|minutes=M][,objective=local|kd|local+kd]"
                "[,params=rewritten|attention|lora:R][,lr=X][,seed=N][,batch=N]",))
class HealPass:
    name = "heal"

    def __init__(self, spec: Spec):
        self.spec = spec
        p = spec.params
        given = [k for k in ("tokens", "steps", "minutes") if p[k] is not None]
        if len(given) > 1:
            raise SpecError(f"spec {spec}: give one budget, not {' and '.join(given)}")
        kind = given[0] if given else "tokens"
        self.budget = Budget(kind, p[kind] if given else DEFAULT_TOKENS)
        self.params, self.rank = p["params"]
        self.lr = p["lr"] or LR["lora" if self.rank else "full"]
        self.batch = p["batch"]

    def run(self, program, ctx: PassContext) -> PassResult:
        teacher = ctx.teacher
        if not is_rewritten(program):
            raise SpecError(f"spec {self.spec}: heal repairs a rewrite; put it after the "
                            "variants it heals (e.g. gqa:kv-heads=1,heal)")
        if teacher is None or teacher is program:
            raise SpecError(f"spec {self.spec}: the program before the rewrite is not at hand "
                            "(a program loaded from disk does not keep it): rewrite and heal "
                            "in one call")
        processes = world()[1]
        if self.batch % processes:
            raise SpecError(f"spec {self.spec}: batch={self.batch} windows per step cannot be "
                            f"split over {processes} processes; give batch= a multiple of "
                            f"{processes}")
        sites = rewritten_sites(program, teacher)
        if self.params == "attention":
            names = projection_tensors(program, [s.index for s in program.sites])
        else:
            names = projection_tensors(program, sites, biases=self.rank is None)
        generator = torch.Generator().manual_seed(self.spec.params["seed"])
        trained = Trainable(program.module, names, self.rank, generator)
        objectives = self.spec.params["objective"].split("+")
        wanted = self._windows_needed(len(objectives))
        batches = ctx.batches(program, wanted)
        log = {"objective": self.spec.params["objective"],
               "params": self.params if self.rank is None else f"lora:{self.rank}", "lr": self.lr,
               "seed": self.spec.params["seed"],
               "budget": {self.budget.kind: self.budget.amount}, "sites": sites,
               "trained_tensors": len(trained.names), "trained_parameters": trained.count(),
               "windows": len(batches), "tokens_per_window": _tokens(batches[0])}
        start = time.perf_counter()
        share = self.budget.share(len(objectives))
        if trained.names:
            if "local" in objectives:
                log["local"] = self._local(program, teacher, trained, sites, batches, share,
                                           ctx, generator)
            if "kd" in objectives:
                if self.budget.kind == "minutes":  # what the local phase left of the time
                    spent = (time.perf_counter() - start) / 60
                    share = Budget("minutes", max(0.0, self.budget.amount - spent))
                log["kd"] = self._kd(program, teacher, trained, batches, share, ctx, generator)
        log["seconds"] = round(time.perf_counter() - start, 1)
        healed = program.clone()
        for name, tensor in trained.merged().items():
            old = fetch_attr(healed.module, name)
            set_attr(healed.module, name, torch.nn.Parameter(tensor, requires_grad=False)
                     if isinstance(old, torch.nn.Parameter) else tensor)
        changed = any(phase.get("steps", 0) for phase in
                      (log.get("local", {}), log.get("kd", {})))
        return PassResult(healed, changed, {"heal": log})

    def _windows_needed(self, phases: int) -> int:
        per_phase = self.budget.share(phases).steps_hint(512 * self.batch)
        return min(MAX_WINDOWS, per_phase * self.batch if per_phase else MAX_WINDOWS)

    # --- local: block by block --------------------------------------------------------------

    def _local(self, program, teacher, trained: Trainable, sites: list[int], batches,
               budget: Budget, ctx: PassContext, generator) -> dict:
        teacher_seq = Sequential(teacher.module, teacher.sites)
        student_seq = Sequential(program.module, program.sites, blocks=teacher_seq.blocks)
        check_aligned(student_seq, teacher_seq)
        blocks = sorted({student_seq.segment_of_site[i] for i in sites}) if sites \
            else list(range(len(student_seq)))
        trainable_in = {i: student_seq.attributes(i) & set(trained.names) for i in blocks}
        blocks = [i for i in blocks if trainable_in[i]]
        hint = budget.steps_hint(_tokens(batches[0]) * self.batch)
        # a block trains on at most `hint` steps of windows: carry no more activations
        batches = batches[:min(len(batches), hint * self.batch if hint else LOCAL_WINDOWS)]
        task = f"{self.spec}: local"
        total = hint * len(blocks) if hint else int(budget.amount * 60)
        s_envs = [student_seq.start(a, k) for a, k in batches]
        t_envs = [teacher_seq.start(a, k) for a, k in batches]
        report = {"blocks": [], "steps": 0, "windows": len(batches)}
        start = time.perf_counter()
        # after a block whose attention was dropped the teacher runs on from its own outputs:
        # the next healed block then learns to hand on what both teacher blocks would have
        kept = {s.index for s in program.sites}
        dropped = {teacher_seq.segment_of_site[s.index] for s in teacher.sites
                   if s.index not in kept}
        for i in range(len(student_seq)):
            with torch.no_grad():
                t_runs = [teacher_seq.run(t if i - 1 in dropped else align(t, s), i)
                          for t, s in zip(t_envs, s_envs, strict=True)]
            if i in blocks:
                targets = [{n: env[n] for n in produced} for env, produced in t_runs]
                if budget.kind == "minutes":  # deadlines: time lost on one block is not lent
                    done = blocks.index(i) + 1
                    per_block = Budget("minutes", max(0.0, start / 60 + budget.amount * done
                                                      / len(blocks) - time.perf_counter() / 60))
                else:
                    per_block = budget
                block = self._fit_block(student_seq, i, trained, trainable_in[i], s_envs,
                                        targets, [_tokens(b) for b in batches], per_block,
                                        generator, ctx, task, report, total, start)
                report["blocks"].append(block)
            with torch.no_grad():
                s_envs = [student_seq.run(s, i, weights=trained.weight)[0] for s in s_envs]
            t_envs = [env for env, _ in t_runs]
        report["seconds"] = round(time.perf_counter() - start, 1)
        return report

    def _fit_block(self, seq: Sequential, i: int, trained: Trainable, names: set[str],
                   envs, targets, sizes: list[int], budget: Budget, generator, ctx, task,
                   report, total, start) -> dict:
        def loss_on(b: int) -> torch.Tensor:
            env, _ = seq.run(envs[b], i, weights=trained.weight)
            return relative_error({n: env[n] for n in targets[b] if n in env}, targets[b])

        probe = range(min(PROBE_WINDOWS, len(envs)))
        with torch.no_grad():
            first = float(sum(loss_on(b) for b in probe)) / len(probe)
        entry = {"segment": i, "block": seq.blocks[i - 1] if i else "(before the layers)",
                 "error_before": first, "steps": 0}
        if first < SKIP_BELOW["local"]:
            entry["skipped"] = "already exact"
            return entry

        def progress(steps: int, losses: list[float]) -> None:
            report["steps"] += 1
            done = report["steps"] if budget.kind != "minutes" \
                else int(time.perf_counter() - start)
            ctx.report(task, min(done, total), total,
                       status=f"{entry['block']}: error {_running(losses):.2e}")

        steps, tokens, _ = self._train(trained.parameters(names), loss_on, sizes, budget,
                                       generator, progress)
        with torch.no_grad():
            entry["error_after"] = float(sum(loss_on(b) for b in probe)) / len(probe)
        entry.update(steps=steps, tokens=tokens)
        return entry

    def _train(self, params: list, loss_on: Callable[[int], torch.Tensor], sizes: list[int],
               budget: Budget, generator: torch.Generator,
               progress: Callable[[int, list[float]], None]) -> tuple[int, int, list[float]]:
        """Adam on ``params`` over the windows (``sizes`` tokens each), ``batch`` windows a
        step in a seeded order, until ``budget`` is spent; gradients clipped to norm 1;
        ``progress(steps, losses)`` after each step. Under torchrun each process runs its
        share of a step's windows and DDP averages the gradients. Returns the steps, the
        tokens and the mean window loss of each step."""
        rank, processes = world()

        def step_loss(windows: list[int]) -> torch.Tensor:
            # DDP averages over processes: scaled so the gradient is the mean over the step
            return sum(loss_on(b) for b in windows) * (processes / self.batch)

        objective = distributed(params, step_loss)
        opt = torch.optim.Adam(params, lr=self.lr)
        order = _order(len(sizes), generator)
        steps, tokens, losses, t0 = 0, 0, [], time.perf_counter()
        while not any_rank(budget.spent(steps, tokens, time.perf_counter() - t0)):
            windows = [order[(steps * self.batch + j) % len(order)] for j in range(self.batch)]
            loss = objective(windows[rank::processes])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            mean = {"loss": float(loss.detach()) / processes}
            all_sum(mean)
            losses.append(mean["loss"])
            steps += 1
            tokens += sum(sizes[b] for b in windows)
            progress(steps, losses)
        return steps, tokens, losses

    # --- kd: end to end ---------------------------------------------------------------------

    def _kd(self, program, teacher, trained: Trainable, batches, budget: Budget,
            ctx: PassContext, generator) -> dict:
        seq = Sequential(program.module, program.sites)
        task = f"{self.spec}: kd"
        hint = budget.steps_hint(_tokens(batches[0]) * self.batch)
        total = hint or int(budget.amount * 60)

        def loss_on(b: int) -> torch.Tensor:
            args, kwargs = batches[b]
            with torch.no_grad():
                want = teacher.module(*args, **kwargs)
            return distillation_loss(seq.forward(args, kwargs, weights=trained.weight), want)

        with torch.no_grad():
            first = float(loss_on(0))
        report = {"loss_before": first, "steps": 0}
        if first < SKIP_BELOW["kd"]:
            report["skipped"] = "already exact"
            return report
        t0 = time.perf_counter()

        def progress(steps: int, losses: list[float]) -> None:
            done = steps if hint else int(time.perf_counter() - t0)
            ctx.report(task, min(done, total), total, status=f"KL {_running(losses):.3f}")

        steps, tokens, losses = self._train(trained.parameters(), loss_on,
                                            [_tokens(b) for b in batches], budget, generator,
                                            progress)
        report.update(steps=steps, tokens=tokens, loss_curve=_curve(losses),
                      seconds=round(time.perf_counter() - t0, 1))
        return report


def relative_error(got: dict, want: dict) -> torch.Tensor:
    """Sum over the floating tensors of ``want`` of ||got - want||^2 / ||want||^2."""
    total = torch.zeros(())
    for name, target in want.items():
        if name not in got:
            continue
        pairs = zip(tree_leaves(got[name]), tree_leaves(target), strict=True)
        for g, w in pairs:
            if isinstance(w, torch.Tensor) and w.is_floating_point():
                w = w.float()
                total = total + ((g.float() - w) ** 2).sum() / (w ** 2).sum().clamp_min(1e-30)
    return total


def distillation_loss(got, want) -> torch.Tensor:
    """KL(teacher || student) per token for language models; else the relative squared error
    of every output tensor."""
    if hasattr(got, "logits") and hasattr(want, "logits"):
        s = torch.log_softmax(got.logits.float().flatten(0, -2), -1)
        t = torch.log_softmax(want.logits.float().flatten(0, -2), -1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean")
    return relative_error({"out": got}, {"out": want})


def _order(n: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=generator).tolist()


def _tokens(batch) -> int:
    args, kwargs = batch
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return int(t.shape[0] * t.shape[1])
    return 1


def _running(losses: list[float], n: int = 8) -> float:
    tail = losses[-n:]
    return sum(tail) / len(tail)


def _curve(losses: list[float], points: int = 5) -> list[float]:
    """The mean loss over ``points`` equal stretches of training: a summary for the manifest."""
    if not losses:
        return []
    size = max(1, len(losses) // points)
    return [round(sum(c) / len(c), 6) for c in
            (losses[i:i + size] for i in range(0, len(losses), size))][:points]
