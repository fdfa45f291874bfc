"""
What every optimization buys, measured in one run: the from-scratch GPT against its optimized twin
(and an ablation that adds one technique at a time), LoRA against QLoRA (and Unsloth on a GPU) with
and without packing, and decoding with and without the KV cache. Same corpus, same device, same run.

    python bench.py --quick                  # CPU, small shapes, about 13 min on two cores (make demo)
    python bench.py --full                   # GPU, the seed's shapes (GPT seed preset, Llama-3.2-1B)
    python bench.py --quick --only gpt       # one stage: gpt, finetune or infer (comma list)
    python bench.py --quick --only finetune --baseline-rev 58f11e9   # + the earlier loop against SFTTrainer

Every figure comes from the scripts' own output files (summary.json, metrics.jsonl, run.json, infer.py
--json-out; contracts.py lists the keys read from each, and a run whose file lacks one counts as failed);
bench.py runs them as subprocesses, so each run's peak memory is its own. It writes into
--out: results.json (every figure with device, torch version, date, git commit, flags), report.md
(Table 1 per model, the ablation tables, the plots), *.png, and runs/ + logs/ for each run.
Ctrl-C, SIGTERM (kill, `timeout`, a scheduler's time limit: the same, but exit 143 instead of 130), a full
disk (a run, or bench.py, refused a write) or any other failed write of bench.py's own (one line with its
error) stops it (and the run in progress) keeping the finished runs;
`python bench.py --report-only --out DIR` (with the same --record/--readme) builds the report from them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import hashlib
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from tqdm import tqdm

import contracts

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = "data/finance_corpus.txt"
DEFAULT_STAGES = "gpt,finetune,infer"


def die(msg: str) -> None:
    print(f"bench.py: {msg}", file=sys.stderr)
    sys.exit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, `timeout`, docker stop, a scheduler's time limit): Ctrl-C's path, but exit 143."""


def on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopping already: a second one must not cut that short
    raise Terminated


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (`by`), carrying the one line that says what was kept and how to go on."""

    def __init__(self, msg: str, by: KeyboardInterrupt):
        super().__init__(msg)
        self.code = interrupted_exit_code(by)


def interrupted_exit_code(e: KeyboardInterrupt) -> int:
    return e.code if isinstance(e, Interrupted) else 143 if isinstance(e, Terminated) else 130


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage block; one line says it better
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default said once: a help that names it keeps its own words ("--quick ... (the
    default)", "--model ... default: smollm2 ..."), and a flag left unset reads "not set", not "None"."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        if action.default is None and action.option_strings:
            return f"{action.help} (default: not set)"
        return super()._get_help_string(action)


def positive_seconds(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number of seconds")
    if not (0 < x < math.inf):  # also refuses nan
        raise argparse.ArgumentTypeError(f"{s}: give a number of seconds above 0")
    return x


def refuse_empty(args, flags: tuple[str, ...]) -> None:
    """A name given as "" (a quoted shell variable that is not set) would mean the current folder, or no file
    at all: refused, as the flag's value cannot have been meant."""
    for flag in flags:
        value = getattr(args, flag[2:].replace("-", "_"))
        if any(isinstance(v, str) and not v.strip() for v in (value if isinstance(value, list) else [value])):
            die(f"{flag} got an empty string: give it a value")


def refuse_non_utf8(args, flags: tuple[str, ...]) -> None:
    """A name holding bytes that are not UTF-8 (a folder from an older system, or started in one: relative
    names are made absolute) reaches argv as lone surrogates: the logs and the report, UTF-8 text, could not
    name it, a traceback after the first run. Refused before any run."""
    for flag in flags:
        value = getattr(args, flag[2:].replace("-", "_"))
        for v in value if isinstance(value, list) else [value]:
            try:
                v.encode("utf-8") if isinstance(v, str) else None
            except UnicodeEncodeError as e:
                shown = os.fsencode(v).decode("utf-8", "backslashreplace")
                die(f"{flag} {shown} is not a UTF-8 name (byte {len(os.fsencode(v[: e.start]))}): rename it")


def refuse_folder_names(args, flags: tuple[str, ...]) -> None:
    """A file to write named with a trailing / (a folder) is refused: Path drops the slash, and the report
    became a file of the folder's name."""
    for flag in flags:
        given = getattr(args, flag[2:].replace("-", "_"))
        if given and given.endswith("/"):
            die(f"{flag} {given} ends in /, which names a folder; give the file to write")


def check_writable_dir(path: Path, flag: str, folder: Path | None = None) -> None:
    """Refuse an output location that cannot be written, before any run: probe the nearest existing
    folder of `folder` (default: path itself) with a temp file, without creating any folder."""
    if folder is None and path.exists() and not path.is_dir():
        die(f"{flag} {path} is a file, not a folder")
    probe = path if folder is None else folder
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: mkdir would fail on it only when the outputs are written
            die(f"{flag} {path}: {probe} is a link to {os.readlink(probe)}, which does not exist")
        probe = probe.parent
    if not probe.is_dir():
        die(f"{flag} {path} lies under a file ({probe})")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        die(f"{flag} {path} is not writable ({e.strerror})")


def check_writable_file(path: Path, flag: str) -> None:
    """A file written atomically (temp file + rename): its folder must take new files."""
    if path.is_dir():
        die(f"{flag} {path} is a folder, not a file")
    if path.exists() and not path.is_file():  # /dev/null: a temp file moved over it would replace the device
        die(f"{flag} {path} is not a regular file; give the markdown file to update")
    if path.exists() and through_open_fd(path):  # /dev/stdout with stdout redirected to a file
        die(f"{flag} {path} is a link to an open stream, not a file; give the markdown file to update")
    check_writable_dir(path, flag, folder=path.parent)


def through_open_fd(path: Path) -> bool:
    """/dev/stdout (a link to /proc/self/fd/1), /dev/fd/1: a stream's link, to a regular file when the stream
    is redirected to one; a temp file moved over it would replace the link for every program."""
    return os.path.realpath(path.parent).startswith("/proc/") or (
        path.is_symlink() and os.readlink(path).startswith("/proc/")
    )


def cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX-BF16: CPUs where bf16 matmuls beat fp32 (without them bf16 ran ~10x slower)."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_bf16_flags() -> dict:
    import torch

    return {
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx": bool(torch.cpu._is_amx_tile_supported()),
    }


# -----------------------------------------------------------------------------
# the plan: what each mode runs, as settings (a script's flag names, underscored); `flags` renders them into
# command lines. `cost` is a rough seconds estimate, used only for the ETA.


def flags(settings: dict) -> list[str]:
    """Settings as command-line flags, in their order: max_iters=30 -> --max-iters 30, True/False ->
    --x/--no-x, a list -> the flag once per item, None -> left out."""
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True or value is False:
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            out += [f for item in value for f in (flag, str(item))]
        elif value is not None:
            out += [flag, str(value)]
    return out


# gpt_scratch.py / gpt_optimized.py shapes and token budget per mode (lr as typed: flags keep its text)
GPT_SHAPES = {
    # the seed's shape on a GPU; 300 steps (1.2M tokens) keep the whole run within minutes
    "full": dict(
        preset="seed",
        batch_size=16,
        max_iters=300,
        eval_interval=30,
        eval_iters=10,
        warmup_iters=30,
        lr="6e-4",
        vocab_size=8192,
    ),
    "quick": dict(preset="cpu", batch_size=8, max_iters=48, eval_interval=12, eval_iters=4, warmup_iters=6),
    "tiny": dict(  # the test suite's size
        preset="cpu",
        n_layer=2,
        n_embd=64,
        n_head=2,
        block_size=32,
        vocab_size=512,
        batch_size=8,
        max_iters=30,
        eval_interval=10,
        eval_iters=2,
        warmup_iters=5,
    ),
}
GPT_KEYS = ("gpt_scratch", "gpt_optimized")  # the two scripts' runs in runs/, the ones decoding is timed for
BIG_BATCH = {"full": 64, "quick": 32, "tiny": 16}  # the ladder's last row: the same tokens in fewer steps

# gpt_optimized.py's techniques: setting -> (its value with the technique off, the ablation row's words)
TECHNIQUES = {
    "flash": (False, "flash attention (SDPA)"),
    "fused": (False, "fused / foreach AdamW"),
    "bias": (True, "bias-free linears"),
    "tie_weights": (False, "weight tying"),
    "pad_vocab": (False, "vocab padded to 64"),
    "rope": (False, "rotary embeddings"),
    "relu2": (False, "ReLU^2 MLP"),
    "bf16": (False, "bf16 autocast"),
    "compile": (False, "torch.compile"),
}


def gpt_plan(mode: str, bf16_units: bool = False) -> dict:
    """Shapes, token budget and the ablation ladder for the GPT stage, as settings. bf16_units: the device
    runs bf16 matmuls faster than fp32 (see bf16_units_decision), so gpt_optimized.py turns bf16 autocast on
    by default and --quick measures it."""
    # A cumulative ladder from the optimized script with every technique off (the baseline's model
    # with AdamW, cosine LR and clipping) to everything on; each row adds one step to the row above.
    # The row where the script's own defaults on this device are reached is the gpt_optimized run.
    # On the CPU sizes, techniques with small effects share a row, to keep --quick within minutes.
    groups = [["flash"], ["fused"], ["bias", "tie_weights", "pad_vocab"], ["rope", "relu2"]]
    if mode == "full":
        # every row is a process start, a token budget and, with compile, a compilation: the small
        # architecture changes share rows so the GPU run stays within its minutes
        groups += [["bf16"], ["compile"]]
        defaults_at = len(groups)  # on a GPU the defaults include bf16 and compile: the last ladder row
    else:
        # CPU defaults: everything but compile, and bf16 only on CPUs with bf16 matrix units (AVX512-BF16,
        # AMX): without them autocast ran about 10x slower. Compiling costs minutes on a CPU, so --quick
        # leaves it to --full; it measures bf16 where it is a default (the test suite always keeps the
        # bf16 row to exercise the flag).
        if mode == "tiny" or bf16_units:
            groups += [["bf16"]]
        defaults_at = 5 if bf16_units else 4
    state = {k: off for k, (off, _) in TECHNIQUES.items()}
    ladder = [("optimized script, every technique off", dict(state))]
    for g in groups:
        state.update({k: not TECHNIQUES[k][0] for k in g})
        ladder.append(("+ " + ", ".join(TECHNIQUES[k][1] for k in g), dict(state)))
    ladder.append((f"+ batch size {BIG_BATCH[mode]}", {**state, **big_batch_shape(mode)}))
    # off by default: measured here, neither shortened the time to a given loss on the CPU
    extras = [
        ("+ QK-norm", {"qk_norm": True}),
        ("+ Muon optimizer", {"muon": True}),
    ]  # on top of the defaults
    if mode == "quick":  # Muon's Newton-Schulz steps are slow on a CPU; measured in --full
        extras = extras[:1]
    elif mode == "full":  # QK-norm would cost another compilation; it is measured in --quick
        # compilation counts in the time to a loss: regional compilation (one block compiled, reused by all),
        # and each scope again with inductor's cache warm from the run before (a user's second run); CUDA
        # graphs replay each block's kernels with one launch
        extras = extras[1:] + [
            ("+ regional compilation (each block)", {"compile_scope": "blocks"}),
            ("+ regional compilation, compile cache warm", {"compile_scope": "blocks"}),
            (
                "+ CUDA graphs (regional compilation)",
                {"compile_scope": "blocks", "compile_mode": "reduce-overhead"},
            ),
            ("defaults again, compile cache warm", {}),
        ]
    return {"base": GPT_SHAPES[mode], "ladder": ladder, "defaults_at": defaults_at, "extras": extras}


def big_batch_shape(mode: str) -> dict:
    """The bigger batch at the same token budget: fewer, larger steps (the lr schedule scales with them).
    Rendered after the shape's own flags, whose --batch-size it overrides."""
    shape = GPT_SHAPES[mode]
    k = BIG_BATCH[mode] // shape.get("batch_size", 16)
    return {
        "batch_size": BIG_BATCH[mode],
        "max_iters": shape["max_iters"] // k,
        "eval_interval": max(1, shape["eval_interval"] // k),
        "warmup_iters": max(1, shape["warmup_iters"] // k),
    }


def bf16_units_decision(device: str) -> tuple[bool, str]:
    """Whether the device has bf16 matrix units (bf16 autocast is then a gpt_optimized default and --quick
    measures it), and the line that says which CPU flags decided it."""
    if device == "cuda":
        return True, "GPU: the ablation includes bf16 autocast"
    f = cpu_bf16_flags()
    units = " and ".join(n for k, n in (("avx512_bf16", "AVX512-BF16"), ("amx", "AMX")) if f[k])
    if units:
        return True, f"CPU has {units}: the ablation includes bf16 autocast (a gpt_optimized default here)"
    return False, (
        "CPU has neither AVX512-BF16 nor AMX: bf16 autocast (about 10x slower than fp32 on such "
        "CPUs) is left out of the ablation"
    )


# finetune_llama.py shapes per mode (lr as typed)
FINETUNE_SHAPES = {
    "full": dict(max_seq_length=512, batch_size=8, max_steps=30, eval_tokens=8192, warmup_steps=3, lr="2e-4"),
    "quick": dict(max_seq_length=128, batch_size=4, max_steps=6, eval_tokens=1024, warmup_steps=2, lr="2e-3"),
    "tiny": dict(max_seq_length=64, batch_size=2, max_steps=3, eval_tokens=512, warmup_steps=1),
}
# no bf16 setting either way: finetune_llama.py picks it where the device has the units, and each
# run.json records the setting it used
LORA = {"backend": "hf", "load_in_4bit": False}
QLORA = {"backend": "hf", "load_in_4bit": True}
PLAIN_LOSS = {**LORA, "loss_impl": "plain"}
CHECKPOINTS_ON_GPU = {**LORA, "offload_checkpoints": False}  # what keeping them in host memory buys


def finetune_plan(mode: str, gpu: bool, bf16_units: bool = False) -> dict:
    shape = FINETUNE_SHAPES[mode]
    # the recipe run: finetune_llama.py's own defaults, i.e. a user's default command (replay, retention set,
    # its own step count); --tiny keeps the test suite's shapes and few, short base samples
    recipe = {**shape, "retention_docs": 8, "retention_tokens": 16} if mode == "tiny" else {}
    # the speed runs time the training step alone: no replay rows (their KL loss adds a forward pass of the
    # base) and no base sampling for a retention set, so their tokens/s compare like with like
    common = {**shape, "replay": 0, "retention_docs": 0}
    # (method, settings, packing): packing is measured on LoRA, where it changes nothing but the rows
    runs = [("LoRA", LORA, True), ("LoRA", LORA, False), ("QLoRA (NF4)", QLORA, True)]
    if gpu:  # and what the chunked loss and the host-memory checkpoints buy: LoRA without each
        runs += [("Unsloth 4-bit", {"backend": "unsloth"}, True), ("LoRA plain loss", PLAIN_LOSS, True)]
        runs.append(("LoRA checkpoints on the GPU", CHECKPOINTS_ON_GPU, True))
    elif bf16_units:  # a CPU with bf16 units trains under bf16 autocast by default: measure what that buys
        runs.append(("LoRA fp32", {**LORA, "bf16": False}, True))
    # recipe_cost: the recipe run's ETA weight in speed runs (40 steps, replay, 64 base samples to draw)
    return {"common": common, "runs": runs, "recipe": recipe, "recipe_cost": 1.5 if mode == "tiny" else 5.0}


# --baseline-rev: the hand-written training loop of an earlier finetune_llama.py (read from git) against the
# current script's SFTTrainer, on the LoRA packed speed run's command. More steps than the speed runs so the
# steady rate is not noise; the two scripts run alternately, so a change in the machine's load falls on both.
LOOP_VS_TRAINER = {
    "settings": {**LORA, "packing": True},
    "max_steps": {"full": 40, "quick": 20, "tiny": 4},
    "repeats": 2,
    "sides": (("loop", "hand-written loop"), ("trainer", "SFTTrainer")),  # the order each repeat runs them
    "tolerance": 0.10,  # the trainer's steady tokens/s within 10% of the loop's
    "cost": {"full": 1.5, "quick": 2.5, "tiny": 1.0},  # one run's ETA weight, in speed runs
}


def loop_vs_trainer_settings(mode: str, common: dict) -> dict:
    """The LoRA packed speed run's settings (finetune_plan's common ones), LOOP_VS_TRAINER's step count."""
    return {**LOOP_VS_TRAINER["settings"], **common, "max_steps": LOOP_VS_TRAINER["max_steps"][mode]}


# Fine-tune settings `--sweep transfer` compares: (name, finetune_llama.py flags), each run on the same base
# command. The question: which settings keep the in-domain gain while the model keeps what it knew.
TRANSFER_SWEEP: list[tuple[str, list[str]]] = [
    ("no replay (the earlier recipe)", ["--replay", "0", "--replay-loss", "ce"]),
    ("no replay, lr 5e-4", ["--replay", "0", "--replay-loss", "ce", "--lr", "5e-4"]),
    ("replay 50% ce, lr 5e-4", ["--replay-loss", "ce", "--lr", "5e-4"]),
    ("replay 75% ce", ["--replay", "0.75", "--replay-loss", "ce"]),
    ("replay 25% kl", ["--replay", "0.25", "--replay-weight", "1"]),
    ("replay 50% kl, weight 1", ["--replay-weight", "1"]),
    ("replay 50% kl, weight 1, seed 2", ["--replay-weight", "1", "--seed", "2"]),
    ("replay 50% kl, weight 1, attention only", ["--replay-weight", "1", "--target-modules", "q,k,v,o"]),
    ("replay 75% kl", ["--replay", "0.75", "--replay-weight", "1"]),
    ("replay 50% kl, weight 2", ["--replay-weight", "2"]),
    ("replay 50% kl, weight 2, seed 2", ["--replay-weight", "2", "--seed", "2"]),
    ("replay 50% kl, weight 4", ["--replay-weight", "4"]),
    ("replay 50% kl, weight 4, seed 2", ["--replay-weight", "4", "--seed", "2"]),
    ("default, seed 2", ["--seed", "2"]),
    ("default, fp32 (a CPU without bf16 units)", ["--no-bf16"]),
    ("default: replay 50% kl", []),  # [] flags: finetune_llama.py's defaults (weight 3), starred on the plot
]
TRANSFER_TARGET = (-0.30, 0.05)  # a setting in the box: in-domain ppl -30% or better, no other set over +5%


# -----------------------------------------------------------------------------
# running the scripts


class Runner:
    def __init__(
        self,
        out: Path,
        total_cost: float,
        time_limit: float | None = None,
        replay: bool = False,
        device: str = "cpu",  # where the runs go: cpu hides any GPU from them
    ):
        self.py, self.replay = sys.executable, replay
        # --device cpu on a GPU machine: finetune_llama.py has no --device, so no run may see the GPU
        self.env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
        self.out, self.logs = out, out / "logs"
        if not replay:  # --report-only runs nothing, so it writes no logs
            make_folder(self.logs)
        self.bar = tqdm(
            total=round(total_cost),
            desc="bench",
            unit="s~",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} est. s [{elapsed}<{remaining}] {postfix}",
        )
        self.failures: list[str] = []
        self.done: list[str] = []  # runs finished in this invocation, and the one in progress (for Ctrl-C)
        self.reused: list[str] = []  # runs whose earlier output matched and was kept, not run again
        self.current: str | None = None
        self.current_expect: Path | None = None
        self.current_started = 0.0  # wall clock: an output older than this is an earlier invocation's
        self.deadline = time.perf_counter() + time_limit if time_limit else None

    def run(
        self, name: str, cmd: list[str], cost: float, expect: Path, env: dict | None = None, reuse=None
    ) -> bool:
        """Run one script; its output goes to logs/<name>.log. False (and a note) when it fails, or when
        --time-limit has run out (the run is stopped, or not started, and the report says so).
        With --report-only nothing runs: True when the run's output file `expect` is already there.
        reuse(): True when an `expect` already there came from this very command: it is kept, not rerun."""
        self.bar.set_postfix_str(name)
        log = self.logs / f"{name}.log"
        if reuse is not None and not self.replay and expect.is_file() and reuse():
            self.bar.update(round(cost))
            self.bar.write(f"bench.py: {name} reused: {expect} comes from the same command")
            self.reused.append(name)
            return True
        if self.replay:
            self.bar.update(round(cost))
            if not expect.is_file():
                self.failures.append(f"{name}: no output in {expect.parent}")
            return expect.is_file()
        left = self.deadline - time.perf_counter() if self.deadline else None
        if left is not None and left <= 0:
            self.failures.append(f"{name}: not run: --time-limit reached")
            self.bar.update(round(cost))
            return False
        t0 = time.perf_counter()
        self.current, self.current_expect, self.current_started = name, expect, time.time()
        atomic_write(log, "$ " + shlex.join(cmd) + "\n")  # a full disk: an error that names the log
        with open(log, "a") as f:
            # passive OpenMP waiting: spinning threads cost many times their work when any other
            # process shares the cores (the fine-tuning scripts set the same)
            proc = subprocess.Popen(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=HERE,
                env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **self.env, **(env or {})},
                start_new_session=True,  # a terminal's Ctrl-C reaches bench.py alone, which passes it on once
            )
            try:
                rc = proc.wait(timeout=left)
            except KeyboardInterrupt as e:
                stop_run(proc, signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
                raise
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.current = None
                self.failures.append(
                    f"{name}: stopped after {time.perf_counter() - t0:.0f}s: --time-limit reached"
                )
                self.bar.write(f"bench.py: {name} stopped: --time-limit reached")
                self.bar.update(round(cost))
                return False
        self.current = None
        self.bar.update(round(cost))
        if rc != 0:
            tail = log.read_text().strip().splitlines()[-1:] or [""]
            refused = refused_write(tail[0], name)
            if refused:  # every run after it would stop the same way: bench.py stops here (die_write_failed)
                raise refused
            self.failures.append(f"{name}: exit {rc}: {tail[0][:200]} (see {log})")
            self.bar.write(f"bench.py: {name} failed (exit {rc}); see {log}")
            return False
        self.bar.write(f"bench.py: {name} done in {time.perf_counter() - t0:.1f}s")
        self.done.append(name)
        return True

    def collect(self, name: str, read):
        """read(): the run's figures from its output files. A key missing there, or a file that cannot be
        read or parsed (a run cut off mid-line), fails that run alone: one line in the report's failures,
        and None."""
        try:
            return read()
        except (OutputError, ValueError, OSError) as e:
            why = str(e) if isinstance(e, OutputError) else f"output cannot be read ({e})"
            why = " ".join(why.split())[:300]  # one line, however the error was worded
            self.failures.append(f"{name}: {why}")
            self.bar.write(f"bench.py: {name} failed: {why}")
            return None


def stop_run(proc: subprocess.Popen, sig: int, grace: float = 10.0) -> None:
    """bench.py stopped by Ctrl-C or SIGTERM: the run it started must not outlive it, writing on into --out.
    The run has a session of its own (no terminal's or `timeout`'s signal reaches it), so it gets the signal
    once, from here, and writes its own line into its log; SIGKILL after `grace` seconds. Another Ctrl-C or
    SIGTERM meanwhile is ignored: the run is stopping already."""
    held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc.send_signal(sig)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write path whole or not at all: a temp file beside it, renamed over it."""
    tmp = write_temp(path, data)
    try:
        with writing(path):  # a folder where path goes refuses the rename
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_temp(path: Path, data: str | bytes) -> Path:
    """data in a temp file beside path, for the caller to rename over it. A failed write (a full disk), or
    Ctrl-C or SIGTERM landing in it, leaves no temp file behind, and its error names path, the file meant (a
    failed write() names no file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path):
        try:
            tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
        except BaseException:
            if not tmp.is_dir():  # a folder squatting on the temp's name is not ours to remove
                tmp.unlink(missing_ok=True)
            raise
    return tmp


@contextlib.contextmanager
def writing(path: Path):
    """A write of bench.py's own, into the file or folder path: its OSError names path (a temp file's names
    another) and is marked as bench.py's write, which die_write_failed says in one line whatever its errno
    (a full disk, or a folder where a file goes)."""
    try:
        yield
    except OSError as e:
        e.filename, e.filename2, e.own_write = str(path), None, True
        raise


def make_folder(path: Path) -> None:
    """A folder of bench.py's own, with its parents: a file in its way is a failed write (writing)."""
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)


# how the scripts word a write the disk refused, on their last line: "cannot write FILE (STRERROR)..."
FULL_DISK = {os.strerror(n): n for n in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)}
REFUSED_WRITE = re.compile(r"cannot write (.+) \((" + "|".join(map(re.escape, FULL_DISK)) + r")\)")


def refused_write(line: str, run: str) -> OSError | None:
    """The write that stopped run's script for a full disk or a file-size limit, as an OSError naming its
    file (and the run), from the script's last line; None for any other failure."""
    m = REFUSED_WRITE.search(line)
    if m is None:
        return None
    e = OSError(FULL_DISK[m[2]], m[2], m[1])
    e.run = run
    return e


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


class OutputError(Exception):
    """A script's output file lacks a key bench.py reads (contracts.py), or cannot be read or parsed: the
    run counts as failed."""


def read_output(path: Path, contract: contracts.Contract) -> dict | list[dict]:
    """A script's output file (JSON, or JSON lines), holding every key its contract lists."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OutputError(f"{path} cannot be read ({e})") from None
    jsonl = path.suffix == ".jsonl"
    lines = enumerate(text.splitlines(), 1) if jsonl else [(None, text)]
    data = []
    for n, line in lines:
        if n is not None and not line.strip():
            continue
        try:
            data.append(json.loads(line))
        except ValueError as e:  # a run cut off mid-write leaves a truncated last line
            raise OutputError(f"{path}{f' line {n}' if n else ''} is not valid JSON ({e})") from None
    for i, record in enumerate(data):
        line = f" line {i + 1}" if jsonl else ""
        if not isinstance(record, dict):
            raise OutputError(f"{path}{line} holds a {type(record).__name__}, not a JSON object")
        missing = contracts.missing_key(contract, record)
        if missing:
            key, listed_by, meaning = missing
            raise OutputError(f"{path}{line} has no {key!r} ({listed_by.name}: {meaning})")
    return data if jsonl else data[0]


def train_seconds_curve(rows: list[dict]) -> list[tuple[float, float]]:
    """(training seconds, val loss) per evaluation: evaluation time left out, so scripts with slower
    evaluation are not penalised. Each row's tokens_per_s covers the steps since the row before."""
    curve, t, prev_tokens = [], 0.0, 0
    for r in rows:
        d = r["tokens"] - prev_tokens
        if d > 0 and r.get("tokens_per_s"):
            t += d / r["tokens_per_s"]
        prev_tokens = r["tokens"]
        curve.append((t, r["val_loss"]))
    return curve


def time_to_loss(curve: list[tuple[float, float]], target: float) -> float | None:
    """Training seconds until val loss first reaches target, interpolated between evaluations."""
    if curve and curve[0][1] <= target:
        return curve[0][0]
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


# -----------------------------------------------------------------------------
# stages

# rough seconds per run (GPT, fine-tuning, inference), measured on the two-core CPU and the GPU: for the ETA
COST = {"full": (25, 50, 40), "quick": (15, 60, 30), "tiny": (8, 15, 10)}


def gpt_run(R: Runner, res: dict, key: str, script: str, run_flags: list[str], cost: float) -> dict | None:
    """One GPT training run into runs/<key>; its summary, metrics and loss-vs-time curve go into
    res["runs"]."""
    runs = R.out / "runs"
    folder = runs / key
    share_token_cache(runs, folder)
    cmd = [R.py, script, "--out", str(folder), "--overwrite"] + res["base_flags"] + run_flags
    if not R.run(key, cmd, cost, folder / "summary.json"):
        return None
    r = R.collect(key, lambda: gpt_record(folder, run_flags))
    if r:
        res["runs"][key] = r
    return r


def gpt_record(folder: Path, run_flags: list[str]) -> dict:
    summary = read_output(folder / "summary.json", contracts.GPT_SUMMARY)
    m = read_output(folder / "metrics.jsonl", contracts.GPT_METRICS)
    return {
        "flags": run_flags,
        "summary": summary,
        "metrics": m,
        "curve": train_seconds_curve(m),
        "ckpt": str(folder / "ckpt.pt"),
    }


def stage_gpt(R: Runner, mode: str, data: str, device: str, bf16_units: bool = False) -> dict:
    """gpt_scratch, then the ablation ladder (whose defaults row is gpt_optimized) and the headline ratios."""
    plan = gpt_plan(mode, bf16_units)
    res: dict = {
        "base_flags": flags(gpt_base(mode, data, device)),
        "runs": {},
    }

    cost = COST[mode][0]
    scratch = None
    if tokenize_first(R, res["base_flags"], R.out / "runs" / "gpt_scratch", cost * 1.5):
        scratch = gpt_run(R, res, "gpt_scratch", "gpt_scratch.py", [], cost * 1.5)
    target = scratch["summary"]["val_loss"] if scratch else None
    rows = [ablation_row("gpt_scratch.py (baseline)", scratch, target)] if scratch else []
    optimized = None
    for i, (name, settings) in enumerate(plan["ladder"]):
        key = "gpt_optimized" if i == plan["defaults_at"] else f"ablation_{i:02d}"
        r = gpt_run(
            R, res, key, "gpt_optimized.py", flags(settings), cost * (2 if settings["compile"] else 1)
        )
        if r:
            rows.append(
                ablation_row(
                    name + ("  (= gpt_optimized defaults)" if key == "gpt_optimized" else ""), r, target
                )
            )
            optimized = r if key == "gpt_optimized" else optimized
    res["ablation"] = rows
    res["extras"] = []
    if scratch and optimized:
        t_s, t_o = time_to_loss(scratch["curve"], target), time_to_loss(optimized["curve"], target)
        st_s, st_o = steady_s_to_loss(scratch, target), steady_s_to_loss(optimized, target)
        n_s, n_o = tokens_to_loss(scratch, target), tokens_to_loss(optimized, target)
        res["headline"] = {
            "target_val_loss": target,
            "tokens_per_s_ratio": optimized["summary"]["tokens_per_s"] / scratch["summary"]["tokens_per_s"],
            "time_to_target_s": {"gpt_scratch": t_s, "gpt_optimized": t_o},
            "time_to_target_ratio": (t_s / t_o) if (t_s and t_o) else None,
            "steady_time_to_target_s": {"gpt_scratch": st_s, "gpt_optimized": st_o},
            "steady_time_to_target_ratio": (st_s / st_o) if (st_s and st_o) else None,
            "tokens_to_target_ratio": (n_o / n_s) if (n_s and n_o) else None,
            "val_loss_delta": optimized["summary"]["val_loss"] - scratch["summary"]["val_loss"],
        }
    return res


def tokenize_first(R: Runner, base_flags: list[str], folder: Path, cost: float) -> bool:
    """The GPT runs' token cache, made before the first run by a process of its own: a run that trains the
    tokenizer holds it in its peak memory (on a CPU, the process's peak RSS), which the runs linking the cache
    do not, so gpt_scratch's figure would not compare with the others'. A corpus the scripts refuse is left to
    the run to report. False when --time-limit stopped it: that was gpt_scratch's work, reported as such."""
    left = R.deadline - time.perf_counter() if R.deadline else None
    if R.replay or (left is not None and left <= 0):
        return True  # nothing to make, or gpt_scratch's run reports the time limit
    make_folder(folder)
    t0 = time.perf_counter()
    try:
        subprocess.run(
            [R.py, "-c", TOKENIZE, *base_flags, "--out", str(folder)],
            capture_output=True,
            cwd=HERE,
            timeout=left,
            env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **R.env},
        )
    except subprocess.TimeoutExpired:
        took = time.perf_counter() - t0
        R.failures.append(
            f"gpt_scratch: stopped after {took:.0f}s, making its token cache: --time-limit reached"
        )
        R.bar.update(round(cost))
        return False
    except OSError:
        pass
    return True


TOKENIZE = (  # gpt_scratch.py's data preparation alone: the token cache every GPT run of the stage links
    "import sys; from pathlib import Path; import gpt_scratch as g; "
    "a = g.parse_args(sys.argv[1:]); g.prepare_data(a, Path(a.out))"
)


def share_token_cache(runs: Path, folder: Path) -> None:
    """Every GPT run tokenizes the same corpus the same way: link the first run's cache files (keyed by
    corpus hash, tokenizer and vocab size, so a mismatch is never picked up) instead of re-training BPE."""
    make_folder(folder)
    for f in sorted(runs.glob("*/tokens-*")) + sorted(runs.glob("*/tokenizer-*")):
        dest = folder / f.name
        if f.parent != folder and not dest.exists():
            try:
                os.link(f, dest)
            except OSError:
                shutil.copyfile(f, dest)


def stage_gpt_extras(R: Runner, mode: str, res: dict) -> None:
    """The speedrun extras that are off by default, one at a time on top of the gpt_optimized defaults; run
    last, after the inference stage, since they answer the least asked question."""
    optimized = res["runs"].get("gpt_optimized")
    target = res.get("headline", {}).get("target_val_loss")
    if optimized is None:
        return
    rows = [ablation_row("gpt_optimized defaults", optimized, target)]
    for i, (name, settings) in enumerate(gpt_plan(mode)["extras"]):
        run_flags = optimized["flags"] + flags(settings)
        r = gpt_run(R, res, f"extra_{i:02d}", "gpt_optimized.py", run_flags, COST[mode][0])
        if r:
            rows.append(ablation_row(name, r, target))
    res["extras"] = rows if len(rows) > 1 else []


def tokens_to_loss(r: dict, target: float | None) -> float | None:
    """Training tokens until val loss first reaches target, interpolated between evaluations."""
    if target is None:
        return None
    return time_to_loss([(m["tokens"], m["val_loss"]) for m in r["metrics"]], target)


def steady_s_to_loss(r: dict, target: float | None) -> float | None:
    """Tokens to target at the run's steady tokens/s: the time to target without the first steps' one-off
    costs (torch.compile's compilation, allocation), which the curve's first interval carries."""
    n = tokens_to_loss(r, target)
    return n / r["summary"]["tokens_per_s"] if n is not None else None


def ablation_row(name: str, r: dict, target: float | None) -> dict:
    s = r["summary"]
    return {
        "name": name,
        "flags": r["flags"],
        "tokens_per_s": s["tokens_per_s"],
        "val_loss": s["val_loss"],
        "peak_mem_mb": s.get("peak_mem_mb"),
        "mfu": s.get("mfu"),
        "train_s_to_target": time_to_loss(r["curve"], target) if target is not None else None,
        "steady_s_to_target": steady_s_to_loss(r, target),
        "train_time_s": s.get("train_time_s"),
    }


def stage_finetune(
    R: Runner,
    mode: str,
    data: str,
    model: str,
    gpu: bool,
    bf16_units: bool = False,
    eval_texts: list[str] | None = None,
    baseline: dict | None = None,
) -> dict:
    """The speed runs (one training step's cost per method), then the recipe run: the user's default command,
    whose figures the transfer table and the headline quote; with a baseline (--baseline-rev), the earlier
    script's hand-written loop against the current one."""
    plan = finetune_plan(mode, gpu, bf16_units)
    eval_texts = list(eval_texts or [])  # every run scores them too: the transfer table of each run
    res: dict = {"model": model, "common": flags(plan["common"]), "eval_texts": eval_texts, "runs": []}
    cost = COST[mode][1]
    for name, settings, packing in plan["runs"]:
        # "QLoRA (NF4)" -> qlora, "LoRA fp32" -> lora_fp32
        words = [w for w in name.lower().split() if w.isalnum()]
        key = f"ft_{'_'.join(words)}_{'packed' if packing else 'padded'}"
        folder = R.out / "runs" / key
        run = {"model": model, "data": data, "out": str(folder), "overwrite": True, "packing": packing}
        run |= {**settings, **plan["common"], "eval_text": eval_texts}
        cmd = [R.py, "finetune_llama.py"] + flags(run)
        if R.run(key, cmd, cost, folder / "run.json"):
            record = R.collect(key, lambda: finetune_record(name, packing, folder))
            res["runs"] += [record] if record else []
    # nothing but what a user types (and the eval texts): on a GPU the script picks its backend itself
    recipe = recipe_flags(mode, model, data, eval_texts)
    folder = R.out / "runs" / "ft_recipe"
    cmd = [R.py, "finetune_llama.py", *recipe, "--out", str(folder), "--overwrite"]
    if R.run("ft_recipe", cmd, cost * plan["recipe_cost"], folder / "run.json"):
        record = R.collect("ft_recipe", lambda: finetune_record("LoRA recipe", None, folder))
        res["runs"] += [{**record, "recipe": True, "flags": recipe}] if record else []
    if baseline:
        res["loop_vs_trainer"] = loop_vs_trainer(R, mode, data, model, plan["common"], baseline)
    return res


def recipe_flags(mode: str, model: str, data: str, eval_texts: list[str]) -> list[str]:
    """The recipe run's finetune_llama.py flags (less --out): also every --sweep run's, before its own."""
    recipe = finetune_plan(mode, gpu=False)["recipe"]  # the same on a GPU: the script's own defaults
    return flags({"model": model, "data": data, **recipe, "eval_text": eval_texts})


def loop_vs_trainer(R: Runner, mode: str, data: str, model: str, common: dict, baseline: dict) -> dict:
    """The same command run by the baseline script (its hand-written loop) and by the current one,
    alternately, LOOP_VS_TRAINER["repeats"] times each, into runs/ft_loop_r1, ft_trainer_r1, ...; the figures
    come from each run's run.json. The baseline runs from the repository root like the current one, so
    data/... resolves the same."""
    run_flags = flags({"model": model, "data": data, **loop_vs_trainer_settings(mode, common)})
    scripts = {"loop": str(Path(baseline["script"]).resolve()), "trainer": "finetune_llama.py"}
    cost = COST[mode][1] * LOOP_VS_TRAINER["cost"][mode]
    runs = []
    for i in range(1, LOOP_VS_TRAINER["repeats"] + 1):
        for side, _ in LOOP_VS_TRAINER["sides"]:
            key = f"ft_{side}_r{i}"
            folder = R.out / "runs" / key
            cmd = [R.py, scripts[side], *run_flags, "--out", str(folder), "--overwrite"]
            if R.run(key, cmd, cost, folder / "run.json"):
                run = R.collect(key, lambda: read_output(folder / "run.json", contracts.FINETUNE_RUN))
                if run:
                    runs.append({"side": side, "repeat": i, "folder": str(folder), **run_speed(run)})
    return {
        "baseline_rev": baseline["rev"],
        "baseline_commit": baseline["commit"],
        "baseline_script": baseline["script"],
        "flags": run_flags,
        "runs": runs,
        **loop_vs_trainer_means(runs),
    }


def run_speed(run: dict) -> dict:
    """A run.json's speed figures: steady and all-steps tokens/s, the steps' time, the whole process's."""
    keys = ("tokens_per_s_steady", "tokens_per_s", "train_time_s", "steps", "wall_time_s", "load_time_s")
    return {k: run.get(k) for k in keys + ("bf16",)}


def loop_vs_trainer_means(runs: list[dict]) -> dict:
    """Per side: each repeat's steady tokens/s and the means; then trainer / loop. Outside the steps: the
    process's wall time less its training steps' (loading, tokenization, evaluation, saving)."""

    def mean(xs: list) -> float | None:
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    sides = {}
    for side, _ in LOOP_VS_TRAINER["sides"]:
        rs = [r for r in runs if r["side"] == side]
        sides[side] = {
            "tokens_per_s_steady": [r["tokens_per_s_steady"] for r in rs],
            "mean_tokens_per_s_steady": mean([r["tokens_per_s_steady"] for r in rs]),
            "mean_tokens_per_s": mean([r["tokens_per_s"] for r in rs]),
            "mean_train_time_s": mean([r["train_time_s"] for r in rs]),
            "mean_wall_time_s": mean([r["wall_time_s"] for r in rs]),
            "mean_outside_steps_s": mean(
                [
                    r["wall_time_s"] - r["train_time_s"]
                    for r in rs
                    if None not in (r["wall_time_s"], r["train_time_s"])
                ]
            ),
        }
    loop, trainer = sides["loop"], sides["trainer"]

    def ratio(key: str) -> float | None:
        return trainer[key] / loop[key] if trainer[key] and loop[key] else None

    r = ratio("mean_tokens_per_s_steady")
    return {
        **sides,
        "ratio_steady": r,
        "ratio_wall_time": ratio("mean_wall_time_s"),
        "within_tolerance": None if r is None else abs(r - 1) <= LOOP_VS_TRAINER["tolerance"],
    }


def finetune_record(method: str, packing: bool | None, folder: Path) -> dict:
    """One fine-tune run's figures from its run.json; packing None: the setting the run recorded."""
    run = read_output(folder / "run.json", contracts.FINETUNE_RUN)
    if packing is None:
        packing = bool((run.get("data") or {}).get("packing", (run.get("args") or {}).get("packing", True)))
    # steady state: the first steps (allocation; Unsloth compiles its kernels there) are left out
    return {
        "method": method,
        "packing": packing,
        "adapter": str(folder),
        "tokens_per_s": run.get("tokens_per_s_steady", run["tokens_per_s"]),
        "tokens_per_s_all_steps": run["tokens_per_s"],
        "peak_mem_mb": run["peak_mem_mb"],
        "peak_mem_kind": run.get("peak_mem_kind"),
        "eval_ppl_before": run["eval_ppl_before"],
        "eval_ppl_after": run["eval_ppl_after"],
        "train_time_s": run.get("train_time_s"),
        "wall_time_s": run.get("wall_time_s"),
        "backend": run.get("backend"),
        "base": run.get("base"),
        "bf16": run.get("bf16"),
        "eval_sets": eval_sets_of(run),
        "eval_context": run.get("eval_context"),
        "replay": run.get("replay"),
        "steps": run.get("steps"),
    }


def eval_sets_of(run: dict) -> dict:
    """Every set a run scored before and after training (run.json's eval_sets, or a stage_finetune record of
    one); a run.json written before eval_sets existed gives its held-out figures alone."""
    sets = run.get("eval_sets")
    if not sets:
        data = run.get("data") or {}
        sets = {
            "heldout": {
                "kind": "heldout",
                "source": data.get("path"),
                "documents": data.get("eval_scored_documents"),
                "tokens": data.get("eval_tokens"),
                "ppl_before": run["eval_ppl_before"],
                "ppl_after": run["eval_ppl_after"],
            }
        }
    return {
        name: {**s, "change": s.get("change", s["ppl_after"] / s["ppl_before"] - 1)}
        for name, s in sets.items()
    }


def stage_infer(
    R: Runner,
    mode: str,
    gpt: dict | None,
    ft: dict | None,
    device: str,
    data: str | None = None,
    model: str | None = None,
) -> dict:
    """Decoding at batch 1 for the models the other stages trained; run alone (--only infer), for what
    earlier runs left in --out, else for the base model itself and a GPT checkpoint of one step (decoding
    speed does not depend on what the weights learned), so the stage fits a short GPU session."""
    res: dict = {"rows": [], "generations": []}
    runs = R.out / "runs"
    if gpt is None and data is not None:
        gpt = gpt_on_disk(runs) or gpt_decode_checkpoint(R, mode, data, device)
    if ft is None and model is not None:
        ft = ft_on_disk(runs, model)
    for key, source in infer_targets(gpt, ft, four_bit=mode == "full"):
        out_json = runs / f"infer_{key}.json"
        cmd = [R.py, "infer.py"] + flags(infer_settings(mode, key, source, out_json, device))
        if R.run(f"infer_{key}", cmd, COST[mode][2], out_json):
            out = R.collect(f"infer_{key}", lambda: read_output(out_json, contracts.INFER_JSON))
            for row in (out or {}).get("bench", []):
                res["rows"].append({**row, "label": row.get("model"), "model": key})
            res["generations"] += [{**g, "model": key} for g in (out or {}).get("generations", [])]
    return res


def gpt_base(mode: str, data: str, device: str) -> dict:
    """Every GPT run's settings: the mode's shape and token budget, the corpus and device, no sample."""
    return {**GPT_SHAPES[mode], "data": data, "device": device, "max_new_tokens": 0}


def gpt_on_disk(runs: Path) -> dict | None:
    """The GPT checkpoints an earlier bench run left in runs/, in gpt_record's shape (for infer_targets)."""
    found = {k: {"ckpt": str(runs / k / "ckpt.pt")} for k in GPT_KEYS if (runs / k / "ckpt.pt").is_file()}
    return {"runs": found} if found else None


def gpt_decode_checkpoint(R: Runner, mode: str, data: str, device: str) -> dict | None:
    """A gpt_optimized checkpoint at the mode's shape after one step, eager: enough to time decoding."""
    folder = R.out / "runs" / "gpt_optimized"
    base = gpt_base(mode, data, device)
    one_step = {"max_iters": 1, "eval_interval": 1, "eval_iters": 1, "warmup_iters": 1, "compile": False}
    cmd = [R.py, "gpt_optimized.py", "--out", str(folder), "--overwrite"] + flags({**base, **one_step})
    if not R.run("gpt_optimized_1_step", cmd, COST[mode][0], folder / "ckpt.pt"):
        return None
    return {"runs": {"gpt_optimized": {"ckpt": str(folder / "ckpt.pt")}}}


def ft_on_disk(runs: Path, model: str) -> dict:
    """The LoRA and QLoRA adapters an earlier bench run left in runs/; the base model itself (and on its
    4-bit load) where there are none."""
    found = [
        {"method": method, "packing": True, "adapter": str(runs / key)}
        for method, key in (("LoRA", "ft_lora_packed"), ("QLoRA (NF4)", "ft_qlora_packed"))
        if (runs / key / "adapter_config.json").is_file()
    ]
    return {"runs": found, "base_model": None if found else model}


def infer_targets(gpt: dict | None, ft: dict | None, four_bit: bool = False) -> list[tuple[str, dict]]:
    """The models to time: both GPTs (their checkpoints) and the packed LoRA run's adapter; four_bit: the
    QLoRA run's too, on its 4-bit base (on a GPU: a CPU takes minutes to compile a step for it)."""
    targets = []
    if gpt:
        for key in GPT_KEYS:
            if key in gpt["runs"]:
                targets.append((key, {"ckpt": gpt["runs"][key]["ckpt"]}))
    if ft:
        packed = [r for r in ft["runs"] if r["packing"] and r["method"] == "LoRA"] or ft["runs"]
        if packed:
            targets.append(("llama_lora", {"adapter": packed[0]["adapter"]}))
        qlora = [r for r in ft["runs"] if r["method"].startswith("QLoRA")]
        if four_bit and qlora:
            targets.append(("llama_qlora", {"adapter": qlora[0]["adapter"]}))
        if ft.get("base_model"):  # no adapter at hand: the base alone decodes at the same speed
            targets.append(("llama_base", {"model": ft["base_model"]}))
            if four_bit:
                targets.append(("llama_base_4bit", {"model": ft["base_model"], "load_in_4bit": True}))
    return targets


def infer_settings(mode: str, key: str, source: dict, out_json: Path, device: str) -> dict:
    # on a CPU, re-running a 135M model's whole context for each of 128 tokens takes minutes:
    # --quick times the Llama at 32 new tokens (the report says so), the GPTs at 128
    n_new = 32 if key.startswith("llama") and mode != "full" else 128
    runs = 1 if mode == "tiny" or (mode == "quick" and key.startswith("llama")) else 3
    settings = {**source, "bench": True, "bench_new_tokens": n_new, "bench_runs": runs}
    settings |= {"json_out": str(out_json), "device": device}
    if mode != "full":  # compiling the decoding step takes minutes on a CPU: timed on the GPU only
        settings["bench_compile"] = False
    if key.startswith("llama"):  # on plain transformers, whichever backend trained it
        settings["backend"] = "hf"
    if key == "llama_lora":  # the demo's side-by-side
        settings |= {"compare_base": True, "prompt": "The S&P 500", "max_new_tokens": 32, "temperature": 0}
    return settings


# -----------------------------------------------------------------------------
# report


def fmt(x, spec: str = ".1f", none: str = "–") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def percent(x: float | None) -> str:
    """A fraction as a percentage; "–" where it is missing (on a CPU the GPT scripts report no MFU: its
    peak FLOP/s would be a guess)."""
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def signed_percent(x: float | None) -> str:
    """A change as a signed percentage: -0.41 -> "-41.0%"; "–" where it is missing."""
    return "–" if x is None else f"{100 * x:+.1f}%"


def precision(bf16: bool | None) -> str:
    return {True: "bf16", False: "fp32"}.get(bf16, "–")


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def timed_row(infer: dict | None, model: str, variant: str) -> dict | None:
    """The inference row of this model and variant that has a latency (a failed variant has none)."""
    for r in (infer or {}).get("rows", []):
        if r["model"] == model and r["variant"] == variant and "latency_ms" in r:
            return r
    return None


def latency_of(infer: dict | None, model: str, variant: str) -> float | None:
    row = timed_row(infer, model, variant)
    return row["latency_ms"] if row else None


def human(x: float) -> str:
    """A short axis figure: 1.25M, 250k, 2k, 674."""
    for scale, unit in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}".rstrip("0").rstrip(".") + unit
    return f"{x:.0f}"


def hbars(
    ax,
    labels: list[str],
    values: list[float],
    texts: list[str],
    colors: list[str],
    baseline: float | None = None,
    baseline_label: str = "",
) -> None:
    """Horizontal bars, first row on top, the label of each row on the left (wrapped, so long names do
    not squeeze the bars) and its figure written at the bar's end; the baseline a dashed vertical line."""
    ys = range(len(values))
    ax.barh(ys, values, color=colors, height=0.7)
    ax.set_yticks(list(ys), [wrap_label(s) for s in labels])
    ax.invert_yaxis()
    right = max(values + [baseline or 0]) or 1
    for y, v, t in zip(ys, values, texts):
        ax.text(
            v + right * 0.01,
            y,
            t,
            va="center",
            fontsize=8,
            gid="bar-value",
            bbox=dict(facecolor="white", edgecolor="none", pad=1, alpha=0.85),
        )  # legible over a line
    ax.set_xlim(0, right * 1.1)  # widened to fit the written figures once the layout is known (save_plot)
    ax.xaxis.set_major_formatter(lambda x, _: human(x))
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if baseline is not None:
        ax.axvline(baseline, color="dimgrey", ls="--", lw=1)
        ax.annotate(
            baseline_label,
            xy=(baseline, 1),
            xycoords=("data", "axes fraction"),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
            color="dimgrey",
        )


def wrap_label(s: str) -> str:
    return "\n".join(textwrap.fill(part, 42) for part in s.split("\n"))


def bar_rows_height(labels: list[str]) -> float:
    """Figure height in inches for horizontal bars: by the number of (wrapped) label lines."""
    return sum(0.48 + 0.17 * wrap_label(s).count("\n") for s in labels)


def fit_bar_values(fig) -> None:
    """Widen each bar chart's x range until the figures written past the bars end inside the axes: a text
    of w pixels starting at data x0 fits when x0 + w * right / axes_width <= 0.98 * right."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    for ax in fig.axes:
        texts = [t for t in ax.texts if t.get_gid() == "bar-value"]
        if not texts:
            continue
        width = ax.get_window_extent(r).width
        right = max(
            [ax.get_xlim()[1]]
            + [t.get_position()[0] / (0.98 - t.get_window_extent(r).width / width) for t in texts]
        )
        ax.set_xlim(0, right)


def save_plot(fig, title: str, path: Path) -> None:
    """The title over the whole figure, wrapped to its width, so long row labels never push it off the
    right edge; the figures on the bars inside their axes; saved with a tight box, so nothing is cut."""
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 11)))
    fig.tight_layout()
    fit_bar_values(fig)
    fit_signed_values(fig)
    png = io.BytesIO()  # written whole or not at all: a full disk must not leave half a plot
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, png.getvalue())


def fit_signed_values(fig) -> None:
    """Widen either end of a chart whose bars go both ways until the figures written past the bars' ends lie
    inside the axes (a few passes: each widening shrinks the bars, the texts keep their size)."""
    for _ in range(6):
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        moved = False
        for ax in fig.axes:
            boxes = [t.get_window_extent(r) for t in ax.texts if t.get_gid() == "signed-value"]
            if not boxes:
                continue
            box, (lo, hi) = ax.get_window_extent(r), ax.get_xlim()
            per_px = (hi - lo) / box.width
            over_right = max(b.x1 for b in boxes) - (box.x1 - 4)
            over_left = (box.x0 + 4) - min(b.x0 for b in boxes)
            hi += max(over_right, 0) * per_px * 1.2
            lo -= max(over_left, 0) * per_px * 1.2
            moved |= over_right > 0 or over_left > 0
            ax.set_xlim(lo, hi)
        if not moved:
            return


def ablation_figure(gpt: dict):
    """Training tokens/s per ablation row, the baseline (gpt_scratch, or the ladder's first row) marked."""
    import matplotlib.pyplot as plt

    rows = list(gpt["ablation"]) + [
        {**r, "name": "gpt_optimized defaults " + r["name"]} for r in gpt.get("extras", [])[1:]
    ]  # extras[0] repeats the defaults row
    base = rows[0]["tokens_per_s"]
    labels = [r["name"].replace("  (= gpt_optimized defaults)", "\n(= gpt_optimized defaults)") for r in rows]
    colors = [
        "dimgrey"
        if i == 0
        else "tab:green"
        if "gpt_optimized defaults)" in r["name"]
        else "tab:purple"
        if i >= len(gpt["ablation"])
        else "tab:blue"
        for i, r in enumerate(rows)
    ]
    texts = [f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s'] / base:.2f}x)" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 1.2 + bar_rows_height(labels)))
    hbars(
        ax,
        labels,
        [r["tokens_per_s"] for r in rows],
        texts,
        colors,
        base,
        f"baseline: {rows[0]['name'].replace(' (baseline)', '')}",
    )
    ax.set_xlabel("training tokens/s (steady state; higher is better)")
    return fig, "GPT ablation: training tokens/s as each technique is added (x = ratio to the baseline)"


def val_loss_figure(gpt: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in ("gpt_scratch", "gpt_optimized"):
        if key in gpt["runs"]:
            r = gpt["runs"][key]
            c = r["curve"]
            (line,) = ax.plot([t for t, _ in c], [loss for _, loss in c], marker="o", ms=3, label=key)
            steady = [(m["tokens"] / r["summary"]["tokens_per_s"], m["val_loss"]) for m in r["metrics"]]
            if c and c[-1][0] > 1.5 * steady[-1][0]:  # one-off costs (compilation) dominate: show both
                ax.plot(
                    [t for t, _ in steady],
                    [loss for _, loss in steady],
                    ls="--",
                    color=line.get_color(),
                    label=f"{key} at steady speed (without compilation)",
                )
    if "headline" in gpt:
        target = gpt["headline"]["target_val_loss"]
        ax.axhline(
            target,
            color="dimgrey",
            ls=":",
            lw=1,
            label=f"baseline: gpt_scratch's final val loss {target:.3f}",
        )
    ax.set_xlabel("training time (s, evaluation excluded)")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, "GPT: validation loss against training time (lower and further left is better)"


def finetune_figure(ft: dict):
    import matplotlib.pyplot as plt

    runs = ft["runs"]
    labels = [
        f"{r['method']}, {'packed' if r['packing'] else 'padded'}"
        + (f", {precision(r.get('bf16'))}" if r.get("bf16") is not None else "")
        for r in runs
    ]
    base = runs[0]["peak_mem_mb"]
    texts = [
        f"{r['peak_mem_mb']:,.0f} MB ({r['peak_mem_mb'] / base:.2f}x), {r['tokens_per_s']:,.0f} tokens/s"
        for r in runs
    ]
    fig, ax = plt.subplots(figsize=(8, 1.2 + bar_rows_height(labels)))
    hbars(
        ax,
        labels,
        [r["peak_mem_mb"] for r in runs],
        texts,
        ["dimgrey"] + ["tab:orange"] * (len(runs) - 1),
        base,
        f"baseline: {labels[0]}",
    )
    ax.set_xlabel(f"peak memory (MB, {runs[0].get('peak_mem_kind') or 'process'}; lower is better)")
    return fig, "Fine-tuning: peak memory per method (x = ratio to the baseline)"


def infer_figure(inf: dict):
    """One panel per model (their latencies differ by orders of magnitude), its no-cache run the baseline."""
    import matplotlib.pyplot as plt

    timed = [r for r in inf["rows"] if "latency_ms" in r]
    models = list(dict.fromkeys(r["model"] for r in timed))
    per = {m: [r for r in timed if r["model"] == m] for m in models}
    fig, axes = plt.subplots(
        len(models),
        1,
        squeeze=False,
        figsize=(8, 0.9 * len(models) + sum(0.45 * len(v) for v in per.values()) + 0.6),
    )
    for ax, m in zip(axes[:, 0], models):
        rows = per[m]
        nc = next((r["latency_ms"] for r in rows if r["variant"] == "no cache"), None)
        texts = [
            f"{r['latency_ms']:,.0f} ms"
            + (f" ({speed_words(nc / r['latency_ms'])})" if nc and r["variant"] != "no cache" else "")
            for r in rows
        ]
        hbars(
            ax,
            [variant_label(r) for r in rows],
            [r["latency_ms"] for r in rows],
            texts,
            ["dimgrey" if r["variant"] == "no cache" else "tab:blue" for r in rows],
            nc,
            "baseline: no cache" if nc else "",
        )
        ax.set_ylabel(f"{m}\n{rows[0]['new_tokens']} tokens", fontsize=9)
    axes[-1, 0].set_xlabel("decoding latency, batch 1 (ms; lower is better)")
    return fig, "Decoding latency, batch 1: with and without the KV cache"


def variant_label(row: dict) -> str:
    """An inference row's variant, saying how many of its steps ran past a GPT's window, where a cached
    variant re-runs the whole window as without a cache (infer.py counts them)."""
    n = row.get("uncached_steps")
    return row["variant"] + (f" ({n} of {row['new_tokens']} steps uncached)" if n else "")


def speed_words(r: float) -> str:
    """A speed ratio (the baseline's time over this one's) with its direction: "1.25x faster", or
    "1.25x slower" for a ratio of 0.80."""
    return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"


SET_LABELS = {"heldout": "held-out (in-domain)", "retention": "retention (base-model samples)"}
TOLERANCE = TRANSFER_TARGET[1]  # how much worse a set other than the in-domain one may get and still pass


def transfer_run(ft: dict | None) -> dict | None:
    """The run the transfer figures describe: the recipe run (what a user's default command gives), else LoRA
    with packing (a speed run), else the first one."""
    runs = (ft or {}).get("runs", [])
    recipe = next((r for r in runs if r.get("recipe")), None)
    lora = next((r for r in runs if r["method"] == "LoRA" and r["packing"]), runs[0] if runs else None)
    return recipe or lora


def run_label(run: dict) -> str:
    """ "LoRA, default recipe" for the recipe run, else its method and rows: "LoRA (packed)"."""
    if run.get("recipe"):
        return "LoRA, default recipe"
    return f"{run['method']} ({'packed' if run['packing'] else 'padded'})"


def replay_words(replay: dict | None) -> str:
    """ "50% of the training rows from base-samples, kl loss", or "none"."""
    if not (replay or {}).get("fraction"):
        return "none"
    loss = f", {replay['loss']} loss" if replay.get("loss") else ""
    return f"{100 * replay['fraction']:.0f}% of the training rows from {replay.get('source')}{loss}"


def set_label(name: str, kind: str) -> str:
    return SET_LABELS.get(kind, name) if name == kind else f"{name} ({kind})"


def transfer_figure(ft: dict):
    """Perplexity change per evaluation set: negative (green) is better; 0 and the +5% tolerance marked."""
    import matplotlib.pyplot as plt

    run = transfer_run(ft)
    sets = eval_sets_of(run)
    labels = [set_label(n, s["kind"]) for n, s in sets.items()]
    changes = [100 * s["change"] for s in sets.values()]
    colors = ["tab:green" if c < 0 else "tab:orange" if c <= 100 * TOLERANCE else "tab:red" for c in changes]
    fig, ax = plt.subplots(figsize=(8, 1.6 + bar_rows_height(labels)))
    ys = range(len(changes))
    ax.barh(ys, changes, color=colors, height=0.7)
    ax.set_yticks(list(ys), [wrap_label(s) for s in labels])
    ax.invert_yaxis()
    for y, c in zip(ys, changes):  # the figure past the bar's end, on whichever side that is
        ax.text(
            c,
            y,
            f" {c:+.1f}% ",
            ha="left" if c >= 0 else "right",
            va="center",
            fontsize=8,
            gid="signed-value",
            bbox=dict(facecolor="white", edgecolor="none", pad=1, alpha=0.85),
        )
    ax.axvline(0, color="black", lw=0.8, label="0: no change")
    ax.axvline(100 * TOLERANCE, color="dimgrey", ls="--", lw=1, label=f"+{100 * TOLERANCE:.0f}% tolerance")
    lo, hi = min(changes + [0.0]), max(changes + [100 * TOLERANCE])
    ax.set_xlim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))  # widened to fit the figures (save_plot)
    ax.xaxis.set_major_formatter(lambda x, _: f"{x:+.0f}%" if round(x) else "0%")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1), ncol=2, frameon=False)  # not on a bar
    ax.set_xlabel("perplexity after fine-tuning / before - 1 (negative is better)")
    return fig, f"Transfer: perplexity change per evaluation set, {run_label(run)}"


def make_plots(results: dict, out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpt, ft, inf = results.get("gpt"), results.get("finetune"), results.get("infer")
    todo = [
        (
            gpt and gpt["runs"],
            val_loss_figure,
            gpt,
            "Validation loss against training time",
            "gpt_val_loss_vs_time.png",
        ),
        (
            gpt and gpt.get("ablation"),
            ablation_figure,
            gpt,
            "Tokens/s per ablation step",
            "gpt_ablation_tokens_per_s.png",
        ),
        (
            ft and ft["runs"],
            finetune_figure,
            ft,
            "Peak memory per fine-tuning method",
            "finetune_peak_memory.png",
        ),
        (
            transfer_run(ft),
            transfer_figure,
            ft,
            "Perplexity change per evaluation set",
            "finetune_transfer.png",
        ),
        (
            inf and any("latency_ms" in r for r in inf["rows"]),
            infer_figure,
            inf,
            "Latency with and without the KV cache",
            "infer_latency_kv_cache.png",
        ),
    ]
    plots = []
    for wanted, figure, data, caption, name in todo:
        if wanted:
            fig, title = figure(data)
            save_plot(fig, title, out / name)
            plt.close(fig)
            plots.append((caption, name))
    return plots


def make_report(results: dict, plots: list[tuple[str, str]]) -> str:
    meta = results["meta"]
    gpt, ft, inf = results.get("gpt"), results.get("finetune"), results.get("infer")
    L = report_header(meta)
    h = results.get("headline", {})
    if h:
        L += ["## Headline", ""] + [f"- {line}" for line in headline_lines(h)] + [""]
    L += table1_section(gpt, ft, inf, meta["device"])
    if gpt and gpt.get("ablation"):
        L += ablation_section(gpt)
    if ft and ft["runs"]:
        L += finetune_section(ft)
    if ft and ft.get("loop_vs_trainer"):
        L += loop_vs_trainer_section(ft["loop_vs_trainer"], meta["device"])
    if inf and inf["rows"]:
        L += infer_section(inf)
    if plots:
        L += ["## Plots", ""] + [f"### {title}\n\n![{title}]({name})\n" for title, name in plots]
    if results.get("failures"):
        L += ["## Runs that failed", ""] + [f"- {f}" for f in results["failures"]] + [""]
    return "\n".join(L) + "\n"


def report_header(meta: dict) -> list[str]:
    rebuilt = meta.get("report_rebuilt_by")
    L = [
        f"# Benchmark report ({meta['mode']})",
        "",
        f"Device: **{meta['device_name']}** · torch {meta['torch']} · {meta['date']} · "
        f"commit `{meta['git_commit']}`  ",
        f"Command: `{meta['command']}`"
        + (f"  \nReport rebuilt from its run folders by `{rebuilt}`" if rebuilt else ""),
        "",
    ]
    return L + [f"Note: {n}  " for n in meta.get("notes", [])] + ([""] if meta.get("notes") else [])


TABLE1_HEADERS = [
    "model",
    "final val loss",
    "perplexity",
    "decode latency (ms)",
    "model size (MB)",
    "peak memory (MB)",
    "time/epoch (s)",
    "train tokens/s",
    "device",
]


def table1_section(gpt: dict | None, ft: dict | None, inf: dict | None, device: str) -> list[str]:
    """Table 1: the seed's columns, one row per model."""
    rows = []
    for key in ("gpt_scratch", "gpt_optimized") if gpt else ():
        if key not in gpt["runs"]:
            continue
        s = gpt["runs"][key]["summary"]
        lat = latency_of(inf, key, "kv cache") or latency_of(inf, key, "no cache") or s.get("latency_ms")
        rows.append(
            [
                key,
                fmt(s["val_loss"], ".4f"),
                fmt(s["perplexity"], ".2f"),
                fmt(lat),
                fmt(s["model_size_mb"], ".2f"),
            ]
            + [
                fmt(s["peak_mem_mb"], ".0f"),
                fmt(s["time_per_epoch_s"], ".1f"),
                fmt(s["tokens_per_s"], ",.0f"),
            ]
            + [s["device"]]
        )
    for r in ft["runs"] if ft else ():
        if r["packing"]:
            lat = latency_of(inf, "llama_lora", "kv cache") if r["method"] == "LoRA" else None
            base = r["base"].get("resolved", ft["model"]) if isinstance(r["base"], dict) else ft["model"]
            rows.append(
                [f"{Path(str(base)).name} + {r['method']}", fmt(math.log(r["eval_ppl_after"]), ".4f")]
                + [fmt(r["eval_ppl_after"], ".2f"), fmt(lat), fmt(adapter_mb(r["adapter"]), ".2f")]
                + [fmt(r["peak_mem_mb"], ".0f"), "–", fmt(r["tokens_per_s"], ",.0f"), device]
            )
    return [
        "## Table 1: the three models",
        "",
        table(TABLE1_HEADERS, rows),
        "",
        "Latency: the KV-cache decoding time of the inference table below (128 new tokens for the GPTs; "
        "the Llama row at 32 except in --full)"
        + (
            "; gpt_scratch has no KV cache: its time is without one."
            if any(r[0] == "gpt_scratch" for r in rows)
            else "."
        ),
        "",
        "Fine-tuned rows: loss and perplexity on held-out documents after training; model size is the "
        "adapter alone; time/epoch is not applicable to a fixed step budget.",
        "",
    ]


def ablation_section(gpt: dict) -> list[str]:
    L = [
        "## GPT ablation: one technique at a time",
        "",
        f"Same shape and token budget (`{' '.join(gpt['base_flags'])}`); each row adds one technique to "
        "the row above. Time to target = training seconds until validation loss reaches gpt_scratch's "
        f"final {fmt(gpt.get('headline', {}).get('target_val_loss'), '.4f')} (evaluation excluded; "
        "compilation and warm-up included); at steady speed = the tokens it took at the run's steady "
        "tokens/s. Tokens/s and MFU are steady-state figures.",
        "",
        ablation_table(gpt["ablation"]),
        "",
    ]
    if gpt.get("extras"):
        L += [
            "### NanoGPT-speedrun extras, one at a time on top of the gpt_optimized defaults",
            "",
            ablation_table(gpt["extras"]),
            "",
        ]
    return L


def finetune_section(ft: dict) -> list[str]:
    unsloth = " vs Unsloth" if any("Unsloth" in r["method"] for r in ft["runs"]) else ""
    headers = ["method", "packing", "precision", "tokens/s", "peak memory (MB)", "held-out ppl before"]
    rows = [
        [r["method"], "packed" if r["packing"] else "padded", precision(r.get("bf16"))]
        + [fmt(r["tokens_per_s"], ",.0f"), fmt(r["peak_mem_mb"], ".0f"), fmt(r["eval_ppl_before"], ".2f")]
        + [fmt(r["eval_ppl_after"], ".2f")]
        + [fmt(100 * (r["eval_ppl_after"] / r["eval_ppl_before"] - 1), "+.1f") + "%"]
        for r in ft["runs"]
    ]
    return [
        "## Fine-tuning: LoRA vs QLoRA" + unsloth,
        "",
        f"Base `{ft['model']}`, speed runs' flags `{' '.join(ft['common'])}`; precision: the "
        "setting each run used (finetune_llama.py's default: bf16 where the device has bf16 units)."
        + recipe_note(ft),
        "",
        table(headers + ["after", "change"], rows),
        "",
    ] + transfer_section(ft)


def infer_section(inf: dict) -> list[str]:
    headers = ["model", "variant", "new tokens", "latency (ms)", "tokens/s", "ms/token", "vs no cache"]
    headers += ["same tokens as no cache", "of the bandwidth bound"]
    rows = [
        [
            r["model"],
            variant_label(r),
            str(r["new_tokens"]),
            fmt(r.get("latency_ms")),
            fmt(r.get("tokens_per_s")),
        ]
        + [fmt(r.get("ms_per_token"), ".2f")]
        + [
            fmt(r.get("speedup_vs_no_cache"), ".2f") + "x"
            if r.get("speedup_vs_no_cache")
            else r.get("error", "–")
        ]
        + [{True: "yes", False: "no"}.get(r.get("same_tokens_as_no_cache"), "–")]
        + [percent(r.get("roofline_fraction"))]
        for r in inf["rows"]
    ]
    L = ["## Inference: batch 1, greedy", "", table(headers, rows), ""]
    L += [
        "Of the bandwidth bound: the weights' bytes times tokens/s over the card's memory bandwidth "
        "(decoding at batch 1 reads every weight once per token); GPU rows only.",
        "",
    ]
    for g in inf.get("generations", []):
        L += [f"**Prompt:** {g.get('prompt', '')!r}", ""]
        for k in ("base", "adapted", "output"):
            if g.get(k) is not None:
                L += [f"- {k}: {str(g[k]).strip()!r}"]
        L += [""]
    return L


def recipe_note(ft: dict) -> str:
    """What sets the LoRA recipe row apart from the speed runs above it."""
    run = next((r for r in ft["runs"] if r.get("recipe")), None)
    if run is None:
        return ""
    steps = f"{run['steps']} steps, " if run.get("steps") else ""
    return (
        f" LoRA recipe: a user's default command ({steps}replay: {replay_words(run.get('replay'))}); "
        "its tokens/s count the replay rows, whose KL loss costs one more forward pass of the base each, "
        "so the speed runs (no replay, no retention set) are the ones to compare for speed."
    )


def transfer_section(ft: dict) -> list[str]:
    """Every set the headline run scored before and after training: in-domain, retention, other texts."""
    run = transfer_run(ft)
    if run is None:
        return []
    windows = f"windows of {run['eval_context']:,} tokens" if run.get("eval_context") else "the run's windows"
    replayed = (
        f" Replay: {replay_words(run.get('replay'))}."
        if run.get("recipe") or (run.get("replay") or {}).get("fraction")
        else ""
    )
    L = [f"### Transfer: {run_label(run)}, every evaluation set", ""]
    if run.get("recipe"):  # the command a user runs, with the script's own defaults for everything else
        steps = f" ({run['steps']} steps)" if run.get("steps") else ""
        L += [
            f"Command: `python finetune_llama.py {shlex.join(run['flags'])}`{steps}: finetune_llama.py's "
            "defaults besides these flags.",
            "",
        ]
    L += [
        f"Each set scored by the base and by the adapter in {windows}; change = ppl after / ppl before - 1 "
        "(negative: better). heldout: the corpus's held-out end (in-domain); retention: documents sampled "
        "from the base model itself (a rise: the model moved off what it knew); text: an `--eval-text` file. "
        f"Target: in-domain {100 * TRANSFER_TARGET[0]:+.0f}% or better, every other set at most "
        f"{100 * TOLERANCE:+.0f}%.{replayed}",
        "",
    ]
    L += [
        table(
            ["set", "kind", "documents", "tokens", "ppl before", "ppl after", "change"],
            [
                [
                    name,
                    s["kind"],
                    fmt(s.get("documents"), ","),
                    fmt(s.get("tokens"), ","),
                    fmt(s["ppl_before"], ".2f"),
                    fmt(s["ppl_after"], ".2f"),
                    signed_percent(s["change"]),
                ]
                for name, s in eval_sets_of(run).items()
            ],
        ),
        "",
    ]
    return L


def rev_words(lvt: dict) -> str:
    """ "58f11e9" for a revision given as its own short hash, else "HEAD~3 58f11e9": its name and commit."""
    rev, short = lvt["baseline_rev"], lvt["baseline_commit"][:7]
    return short if lvt["baseline_commit"].startswith(rev) else f"{rev} {short}"


def loop_vs_trainer_words(lvt: dict, device: str) -> str:
    """The ratio line: trainer / loop at steady speed, and plainly whether it is within the tolerance."""
    r, tol = lvt["ratio_steady"], LOOP_VS_TRAINER["tolerance"]
    line = (
        f"SFTTrainer: {r:.2f}x the hand-written loop's steady tokens/s ({rev_words(lvt)}, same "
        f"{'GPU' if device == 'cuda' else 'CPU'}, one bench run)"
    )
    if lvt["within_tolerance"]:
        return line + f": within {100 * tol:.0f}%"
    return line + (
        f": {100 * abs(r - 1):.1f}% {'slower' if r < 1 else 'faster'}, outside the {100 * tol:.0f}% tolerance"
    )


def loop_vs_trainer_cost(lvt: dict) -> str:
    """What the trainer costs outside the training steps: the whole process's wall time per side."""
    loop, tr = lvt["loop"], lvt["trainer"]
    if not (loop["mean_wall_time_s"] and tr["mean_wall_time_s"]):
        return ""
    d = tr["mean_wall_time_s"] - loop["mean_wall_time_s"]
    out = (
        f"Whole run (setup, evaluation before and after, saving included): SFTTrainer "
        f"{tr['mean_wall_time_s']:.1f} s, the loop {loop['mean_wall_time_s']:.1f} s on average "
        f"({d:+.1f} s, {lvt['ratio_wall_time']:.2f}x)"
    )
    if loop["mean_outside_steps_s"] is not None and tr["mean_outside_steps_s"] is not None:
        out += (
            f"; outside the training steps {tr['mean_outside_steps_s']:.1f} s against "
            f"{loop['mean_outside_steps_s']:.1f} s"
        )
    return out + "."


def loop_vs_trainer_section(lvt: dict, device: str) -> list[str]:
    """The earlier script's hand-written loop against the current SFTTrainer, same command, alternate runs."""
    L = [
        "## Training loop vs SFTTrainer",
        "",
        f"`python finetune_llama.py {shlex.join(lvt['flags'])}`, run alternately by finetune_llama.py of "
        f"commit `{lvt['baseline_commit']}` (`--baseline-rev {lvt['baseline_rev']}`, its hand-written loop) "
        "and "
        f"by the current one (SFTTrainer), {LOOP_VS_TRAINER['repeats']} times each, one after the other. "
        "Steady tokens/s: the training steps without the first ones; wall time: the whole process.",
        "",
    ]
    rows = []
    for side, name in LOOP_VS_TRAINER["sides"]:
        s = lvt[side]
        bf16 = {r["bf16"] for r in lvt["runs"] if r["side"] == side}
        rows.append(
            [
                name,
                ", ".join(fmt(x, ",.0f") for x in s["tokens_per_s_steady"]) or "failed",
                fmt(s["mean_tokens_per_s_steady"], ",.0f"),
                fmt(s["mean_tokens_per_s"], ",.0f"),
                fmt(s["mean_train_time_s"], ".2f"),
                fmt(s["mean_wall_time_s"]),
                precision(bf16.pop()) if len(bf16) == 1 else "–",
            ]
        )
    L += [
        table(
            [
                "side",
                "steady tokens/s per repeat",
                "mean",
                "all steps, mean",
                "steps time (s)",
                "wall time (s)",
                "precision",
            ],
            rows,
        ),
        "",
    ]
    if lvt["ratio_steady"] is not None:
        L += [loop_vs_trainer_words(lvt, device), ""]
    cost = loop_vs_trainer_cost(lvt)
    return L + ([cost, ""] if cost else [])


def ablation_table(rows: list[dict]) -> str:
    base = rows[0]["tokens_per_s"] if rows else None
    return table(
        [
            "configuration",
            "tokens/s",
            "vs first row",
            "final val loss",
            "train s to target",
            "at steady speed",
            "MFU",
            "peak mem (MB)",
        ],
        [
            [
                r["name"],
                fmt(r["tokens_per_s"], ",.0f"),
                fmt(r["tokens_per_s"] / base, ".2f") + "x",
                fmt(r["val_loss"], ".4f"),
                fmt(r["train_s_to_target"], ".2f", "not reached"),
                fmt(r.get("steady_s_to_target"), ".2f", "not reached"),
                percent(r.get("mfu")),
                fmt(r["peak_mem_mb"], ".0f"),
            ]
            for r in rows
        ],
    )


def adapter_mb(folder: str) -> float | None:
    p = Path(folder) / "adapter_model.safetensors"
    return p.stat().st_size / 2**20 if p.exists() else None


# (key, run, against, words): a pair of fine-tuning runs (by method, packed rows) set side by side in the
# headline: m and t in words are run's peak memory and tokens/s over those of the run it is set against. The
# chunked loss's aim: LoRA within 2x Unsloth's memory at its tokens/s or more
FT_PAIRS = (
    (
        "qlora_vs_lora",
        "QLoRA (NF4)",
        "LoRA",
        "QLoRA (NF4) uses **{m:.2f}x** LoRA's peak memory at {t:.2f}x its tokens/s",
    ),
    (
        "unsloth_vs_qlora",
        "Unsloth 4-bit",
        "QLoRA (NF4)",
        "Unsloth: **{t:.2f}x** QLoRA's tokens/s at {m:.2f}x its peak memory",
    ),
    (
        "lora_vs_unsloth",
        "LoRA",
        "Unsloth 4-bit",
        "LoRA (transformers + peft, chunked loss): **{m:.2f}x** Unsloth's peak memory at "
        "{t:.2f}x its tokens/s",
    ),
    (
        "chunked_vs_plain",
        "LoRA",
        "LoRA plain loss",
        "the chunked loss: **{m:.2f}x** the plain loss's peak memory at {t:.2f}x its tokens/s",
    ),
    (
        "offload_vs_device_checkpoints",
        "LoRA",
        "LoRA checkpoints on the GPU",
        "the checkpoints in host memory: **{m:.2f}x** the peak memory of keeping them on the GPU at {t:.2f}x "
        "its tokens/s",
    ),
)


def headline(results: dict) -> dict:
    """The ratios quoted in the README, computed from the measured figures above."""
    h: dict = {}
    gpt, ft, inf = results.get("gpt"), results.get("finetune"), results.get("infer")
    if gpt and "headline" in gpt:
        g = gpt["headline"]
        h["gpt_tokens_per_s_ratio"] = g["tokens_per_s_ratio"]
        h["gpt_time_to_target_ratio"] = g["time_to_target_ratio"]
        h["gpt_steady_time_to_target_ratio"] = g.get("steady_time_to_target_ratio")
        h["gpt_tokens_to_target_ratio"] = g.get("tokens_to_target_ratio")
        h["gpt_val_loss_delta"] = g["val_loss_delta"]
    rows = (gpt or {}).get("ablation", [])
    for above, row in zip(rows, rows[1:]):  # the ladder's bf16 row against the fp32 row above it
        if row["name"].startswith("+ bf16 autocast") and row["tokens_per_s"] and above["tokens_per_s"]:
            h["gpt_bf16_vs_fp32_tokens_per_s"] = row["tokens_per_s"] / above["tokens_per_s"]
    if ft:
        by = {(r["method"], r["packing"]): r for r in ft["runs"]}
        lora = by.get(("LoRA", True))
        for key, method, against_method, _ in FT_PAIRS:
            run, against = by.get((method, True)), by.get((against_method, True))
            if run and against:
                h[f"{key}_memory"] = run["peak_mem_mb"] / against["peak_mem_mb"]
                h[f"{key}_tokens_per_s"] = run["tokens_per_s"] / against["tokens_per_s"]
        fp32 = by.get(("LoRA fp32", True))
        if lora and fp32:
            h["lora_bf16_vs_fp32_tokens_per_s"] = lora["tokens_per_s"] / fp32["tokens_per_s"]
        padded = by.get(("LoRA", False))
        if lora and padded:
            h["packing_tokens_per_s_ratio"] = lora["tokens_per_s"] / padded["tokens_per_s"]
        # the quality figures: the recipe run's (a user's default command), else the LoRA speed run's
        run = next((r for r in ft["runs"] if r.get("recipe")), lora)
        if run and (run.get("base") or {}).get("source") != "random-init":  # random weights: no quality
            h["lora_label"] = "LoRA, default recipe" if run.get("recipe") else "LoRA"
            h["lora_ppl_change"] = run["eval_ppl_after"] / run["eval_ppl_before"] - 1
            h["lora_transfer"] = [
                {"set": n, "kind": s["kind"], "change": s["change"]} for n, s in eval_sets_of(run).items()
            ]
    lvt = (ft or {}).get("loop_vs_trainer")
    if lvt and lvt.get("ratio_steady") is not None:
        h["trainer_vs_loop_tokens_per_s"] = lvt["ratio_steady"]
        h["trainer_vs_loop_wall_time"] = lvt["ratio_wall_time"]
        h["trainer_vs_loop_rev"] = rev_words(lvt)
    for model in ("gpt_optimized", "llama_lora"):
        kv_row, nc = timed_row(inf, model, "kv cache"), latency_of(inf, model, "no cache")
        kv = kv_row["latency_ms"] if kv_row else None
        if kv and nc:
            h[f"{model}_kv_cache_speedup"] = nc / kv
            h[f"{model}_kv_cache_new_tokens"] = kv_row["new_tokens"]
            if kv_row.get("uncached_steps"):  # past the window: those steps re-ran the context too
                h[f"{model}_kv_cache_uncached_steps"] = kv_row["uncached_steps"]
        comp = [
            r
            for r in (inf or {}).get("rows", [])
            if r["model"] == model and r["variant"].startswith("static") and "latency_ms" in r
        ]
        if comp and kv:  # the fastest compiled variant (transformers' modules, or the fused step)
            best = min(comp, key=lambda r: r["latency_ms"])
            h[f"{model}_compiled_tokens_per_s"] = best["tokens_per_s"]
            h[f"{model}_compiled_vs_kv_cache"] = kv / best["latency_ms"]
            h[f"{model}_compiled_variant"] = best["variant"]
    return h


def headline_lines(h: dict) -> list[str]:
    """The README's headline, one line per ratio that the results hold."""
    out = gpt_headline_lines(h)
    out += [
        w.format(m=h[f"{k}_memory"], t=h[f"{k}_tokens_per_s"])
        for k, _, _, w in FT_PAIRS
        if f"{k}_memory" in h
    ]
    bf16 = [
        f"{what} **{h[key]:.2f}x**"
        for what, key in (
            ("the GPT at", "gpt_bf16_vs_fp32_tokens_per_s"),
            ("LoRA at", "lora_bf16_vs_fp32_tokens_per_s"),
        )
        if key in h
    ]
    if bf16:
        out.append(f"bf16 autocast trains {' and '.join(bf16)} fp32's tokens/s")
    if "packing_tokens_per_s_ratio" in h:
        out.append(f"packing: **{h['packing_tokens_per_s_ratio']:.2f}x** the tokens/s of padded rows (LoRA)")
    if "trainer_vs_loop_tokens_per_s" in h:
        out.append(trainer_vs_loop_line(h))
    label = h.get("lora_label", "LoRA")
    if h.get("lora_transfer"):
        out.append(f"{label}: " + transfer_words(h["lora_transfer"]))
    elif "lora_ppl_change" in h:
        out.append(f"{label} held-out perplexity change: **{100 * h['lora_ppl_change']:+.1f}%**")
    return out + decoding_headline_lines(h)


def gpt_headline_lines(h: dict) -> list[str]:
    out = []
    if "gpt_tokens_per_s_ratio" in h:
        out.append(
            f"gpt_optimized trains at **{h['gpt_tokens_per_s_ratio']:.2f}x** gpt_scratch's tokens/s; "
            f"val loss at equal tokens {h['gpt_val_loss_delta']:+.4f}"
        )
    if h.get("gpt_time_to_target_ratio"):

        def part(r: float) -> str:  # a ratio of scratch's time over optimized's
            return f"1/{r:.2f} of" if r >= 1 else f"{1 / r:.2f}x"

        line = (
            "gpt_optimized reaches gpt_scratch's final val loss in "
            f"**{part(h['gpt_time_to_target_ratio'])}** gpt_scratch's training time"
        )
        if h.get("gpt_steady_time_to_target_ratio"):
            line += (
                f" ({part(h['gpt_steady_time_to_target_ratio'])} it at steady speed, without compilation and "
                f"warm-up; {100 * h['gpt_tokens_to_target_ratio']:.0f}% of the tokens)"
            )
        out.append(line)
    return out


def trainer_vs_loop_line(h: dict) -> str:
    r, tol = h["trainer_vs_loop_tokens_per_s"], LOOP_VS_TRAINER["tolerance"]
    verdict = (
        f"within {100 * tol:.0f}%"
        if abs(r - 1) <= tol
        else f"{100 * abs(r - 1):.1f}% {'slower' if r < 1 else 'faster'}, outside {100 * tol:.0f}%"
    )
    wall = h.get("trainer_vs_loop_wall_time")
    return (
        f"SFTTrainer trains at **{r:.2f}x** the hand-written loop's steady tokens/s "
        f"({h['trainer_vs_loop_rev']}; {verdict})"
        + (f", {wall:.2f}x its whole-run wall time" if wall else "")
    )


def decoding_headline_lines(h: dict) -> list[str]:
    out = []
    for model in ("gpt_optimized", "llama_lora"):
        if f"{model}_kv_cache_speedup" in h:
            ratio, words = speed_words(h[f"{model}_kv_cache_speedup"]).split(" ", 1)
            uncached = h.get(f"{model}_kv_cache_uncached_steps")
            out.append(
                f"{model}: the KV cache decodes {h[f'{model}_kv_cache_new_tokens']} tokens "
                f"**{ratio}** {words} than re-running the context"
                + (f" ({uncached} of its steps ran past the window, uncached)" if uncached else "")
            )
        if f"{model}_compiled_tokens_per_s" in h:
            r = h[f"{model}_compiled_vs_kv_cache"]  # slower than the eager cache: say so, not "0.80x"
            against = (
                f"{r:.2f}x the eager KV cache" if r >= 1 else f"{1 / r:.2f}x slower than the eager KV cache"
            )
            out.append(
                f"{model}: a static KV cache with compiled decoding runs "
                f"**{h[f'{model}_compiled_tokens_per_s']:.0f} tokens/s** at batch 1, {against}"
                + variant_words(h.get(f"{model}_compiled_variant"))
            )
    return out


def variant_words(variant: str | None) -> str:
    """Which compiled decoding gave the headline's figure, when it is not the plain static-cache step."""
    return f" ({variant})" if variant and variant != "static cache + compile" else ""


def transfer_words(sets: list[dict]) -> str:
    """ "held-out ppl **-41.0%**, retention +3.1%, fiqa_posts +2.0%": the in-domain change first, in bold."""
    words = {"heldout": "held-out ppl", "retention": "retention"}
    parts = []
    for s in sorted(sets, key=lambda s: s["kind"] != "heldout"):  # stable: the rest keep run.json's order
        name = words.get(s["kind"], s["set"]) if s["set"] == s["kind"] else s["set"]
        change = signed_percent(s["change"])
        parts.append(f"{name} **{change}**" if s["kind"] == "heldout" else f"{name} {change}")
    return ", ".join(parts)


def headline_markers(key: str) -> tuple[str, str]:
    return f"<!-- headline:{key} -->", f"<!-- /headline:{key} -->"


def record_markers(key: str) -> tuple[str, str]:
    return f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"


def marker_problem(text: str, start: str, end: str) -> str | None:
    """What is wrong with text's start ... end markers, in words; None when neither is there, or there is
    exactly one start followed by exactly one end (the block that is replaced)."""
    ns, ne = text.count(start), text.count(end)
    if ns == ne == 0 or (ns == ne == 1 and text.find(end, text.index(start)) >= 0):
        return None
    if ns > 1 or ne > 1:
        return f"{start} appears {ns} times and {end} {ne} times; keep one block"
    if ne == 0:
        return f"{start} has no {end} after it"
    if ns == 0:
        return f"{end} has no {start} before it"
    return f"{end} comes before {start}"


def read_markdown(path: Path, flag: str, start: str, end: str) -> str:
    """path's text as it is on disk (newlines untranslated), its start ... end markers checked: absent, or
    one block (a user mistake otherwise: one line, exit 2)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        die(f"{flag} {path} cannot be read ({e})")
    problem = marker_problem(text, start, end)
    if problem:
        die(f"{flag} {path}: {problem}; fix its markers by hand")
    return text


def replace_block(text: str, start: str, end: str, body: str, keep_markers: bool) -> str:
    """text with its one start ... end block's content (keep_markers) or the whole block replaced by body,
    written with text's own newlines; every byte outside the block stays as it was."""
    nl = "\r\n" if "\r\n" in text else "\n"
    body = body.replace("\r\n", "\n").replace("\n", nl)
    i = text.index(start)
    j = text.index(end, i)
    if keep_markers:
        return text[: i + len(start)] + nl + body + nl + text[j:]
    return text[:i] + body + text[j + len(end) :]


def record_headline(readme: Path, key: str, results: dict) -> None:
    """Replace the <!-- headline:KEY --> ... <!-- /headline:KEY --> block of readme with this run's headline
    ratios, with the command, device, date and commit they come from."""
    start, end = headline_markers(key)
    text = read_markdown(readme, "--readme", start, end)
    if start not in text:
        die(f"--readme {readme}: no {start} ... {end} block to fill")
    m = results["meta"]
    lines = [
        f"**{key}** (`{m['command']}`, {m['device_name']}, {m['date'][:10]}, commit {m['git_commit']}; "
        "details in [BENCHMARKS.md](BENCHMARKS.md)):",
        "",
    ] + [f"- {x}" for x in headline_lines(results["headline"])]
    atomic_write(readme, replace_block(text, start, end, "\n".join(lines), keep_markers=True).encode("utf-8"))


def record(md: Path, key: str, report: str, out: Path) -> None:
    """Replace (or append) this mode's section of md with the report, headings one level down; the
    plots are copied beside md into benchmarks/<key>/ so the file shows them."""
    start, end = record_markers(key)
    text = read_markdown(md, "--record", start, end) if md.exists() else "# Benchmarks\n"
    figs = md.parent / "benchmarks" / key
    make_folder(figs)
    # (temp file, file) for the plots and md, each written whole before any is renamed: a full disk leaves
    # the recorded section beside the plots it shows, not beside the new run's
    staged: list[tuple[Path, Path]] = []
    try:
        for png in out.glob("*.png"):
            if f"]({png.name})" in report:  # this report's plots, not an earlier run's left in --out
                staged.append((write_temp(figs / png.name, png.read_bytes()), figs / png.name))
                report = report.replace(f"]({png.name})", f"](benchmarks/{key}/{png.name})")
        body = "\n".join(
            ("#" + line) if line.startswith("#") else line for line in report.strip().splitlines()
        )
        section = f"{start}\n{body}\n{end}"
        if start in text:
            text = replace_block(text, start, end, section, keep_markers=False)
        else:
            nl = "\r\n" if "\r\n" in text else "\n"
            text = text.rstrip() + nl + nl + section.replace("\n", nl) + nl
        staged.append((write_temp(md, text.encode("utf-8")), md))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    try:
        for tmp, path in staged:
            with writing(path):
                os.replace(tmp, path)
    finally:  # a rename refused (a folder where a plot goes) leaves no temp file behind
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# --sweep transfer: fine-tune settings side by side, the in-domain gain against what else changed


def slug(name: str) -> str:
    """A setting's folder name: "lr 5e-4 + replay 25%" -> lr_5e-4_replay_25."""
    return re.sub(r"[^a-z0-9.-]+", "_", name.lower()).strip("_") or "setting"


def sweep_settings(spec: str | None) -> list[tuple[str, list[str]]]:
    """The settings --sweep-settings names (by name or folder name), in TRANSFER_SWEEP's order. A name may
    hold a comma itself ("no replay, lr 5e-4"): the longest run of comma-separated pieces naming one wins."""
    if spec is None:
        return list(TRANSFER_SWEEP)
    known = {key: name for name, _ in TRANSFER_SWEEP for key in (name, slug(name))}
    pieces, wanted, i = spec.split(","), set(), 0
    while i < len(pieces):
        for j in range(len(pieces), i, -1):
            name = re.sub(r"\s*,\s*", ", ", ",".join(pieces[i:j]).strip())
            if name in known:
                wanted.add(known[name])
                break
        else:
            j = i + 1
            if pieces[i].strip() or not wanted and j == len(pieces):
                die(
                    f"--sweep-settings: no setting {pieces[i].strip() or spec!r}; the settings are: "
                    + "; ".join(name for name, _ in TRANSFER_SWEEP)
                )
        i = j
    return [(name, flags) for name, flags in TRANSFER_SWEEP if name in wanted]


def finetune_identity(flags: list[str]) -> dict:
    """The flags as finetune_llama.py records them in run.json's args (less --out): what makes two runs the
    same. A flag it refuses raises ValueError carrying argparse's message."""
    import finetune_llama

    parser = finetune_llama.build_parser()

    def refuse(message: str):
        raise ValueError(message)

    parser.error = refuse
    return json.loads(json.dumps(finetune_llama.run_identity(parser.parse_args(flags))))


def documents_sha256(path: str) -> str | None:
    """A file's documents hashed as finetune_llama.py records them in run.json; None where they cannot be
    read (the run says why). A relative path is the runs', from the repository."""
    import finetune_llama

    try:
        text = (HERE / path).read_text(encoding="utf-8").removeprefix("\ufeff")
    except (OSError, UnicodeDecodeError):
        return None
    return finetune_llama.documents_sha256(finetune_llama.split_documents(text))


def same_run(folder: Path, identity: dict, corpus_sha256: str) -> bool:
    """The run.json in folder came from these flags on these inputs, where it records them: the corpus's
    bytes, the --eval-text and --replay-data documents and the weights in the base's folder (an edited text
    or a base rewritten in place would leave its figures another input's)."""
    import finetune_llama

    try:
        run = read_json(folder / "run.json")
    except (OSError, ValueError):
        return False
    args = {k: v for k, v in (run.get("args") or {}).items() if k != "out"}
    if args != identity or (run.get("data") or {}).get("corpus_sha256") not in (None, corpus_sha256):
        return False
    texts = [
        s for s in (run.get("eval_sets") or {}).values() if isinstance(s, dict) and s.get("kind") == "text"
    ]
    replay = run.get("replay") if isinstance(run.get("replay"), dict) else {}
    if identity.get("replay_data"):  # from a file: base samples are the base's, checked below
        texts.append({"source": identity["replay_data"], "sha256": replay.get("sha256")})
    if any(s.get("sha256") and s["sha256"] != documents_sha256(s.get("source")) for s in texts):
        return False
    base = run.get("base") if isinstance(run.get("base"), dict) else {}
    weights, resolved = base.get("weights_sha256"), base.get("resolved")
    if not (weights and isinstance(resolved, str)):  # a hub base, or a run.json from before they were hashed
        return True
    if not same_gguf(identity.get("model"), resolved):
        return False
    now = finetune_llama.weights_fingerprint(resolved)
    return now is None or weights == now  # None: a converted base gone from the cache, built again the same


def same_gguf(model: str | None, resolved: str) -> bool:
    """A .gguf --model is still the file converted into the folder recorded: another model copied over it is
    converted into another folder (finetune_llama.gguf_folder_name), so the recorded one's weights say
    nothing of it. A relative name is the runs', from the repository."""
    import finetune_llama

    gguf = HERE / os.path.expanduser(model or "")
    try:
        return not (gguf.suffix == ".gguf" and gguf.is_file()) or (
            Path(resolved).name == finetune_llama.gguf_folder_name(gguf)
        )
    except OSError:  # unreadable: the run says so
        return False


def sweep_plan(settings: list[tuple[str, list[str]]], base: list[str], extra: list[str]) -> list[dict]:
    """Each setting's full finetune_llama.py flags, checked by its own parser before any run."""
    plan = []
    for name, own in settings:
        ft_flags = base + own + extra
        try:
            identity = finetune_identity(ft_flags)
        except ValueError as e:
            die(f"--sweep setting {name!r} (`{shlex.join(own + extra)}`): finetune_llama.py refuses it: {e}")
        plan.append(
            {"setting": name, "slug": slug(name), "flags": own, "ft_flags": ft_flags, "identity": identity}
        )
    return plan


def sweep_row(p: dict, folder: Path, run: dict | None) -> dict:
    """One setting's figures, straight from its run.json: the change of every set it scored."""
    row = {"setting": p["setting"], "flags": p["flags"], "folder": str(folder)}
    if run is None:
        return {**row, "failed": True}
    sets = eval_sets_of(run)
    others = [s["change"] for s in sets.values() if s["kind"] != "heldout"]
    return {
        **row,
        "in_domain_change": sets["heldout"]["change"] if "heldout" in sets else None,
        "retention_change": next((s["change"] for s in sets.values() if s["kind"] == "retention"), None),
        "text_changes": {n: s["change"] for n, s in sets.items() if s["kind"] == "text"},
        "worst_other_change": max(others) if others else None,
        "wall_time_s": run.get("wall_time_s"),
        "eval_context": run.get("eval_context"),
        "replay": run.get("replay"),
        "eval_sets": sets,
    }


def run_sweep(R: Runner, plan: list[dict], corpus_sha256: str, cost: float) -> list[dict]:
    rows = []
    for p in plan:
        folder = R.out / p["slug"]
        cmd = [R.py, "finetune_llama.py", *p["ft_flags"], "--out", str(folder), "--overwrite"]
        ok = R.run(
            p["slug"],
            cmd,
            cost,
            folder / "run.json",
            reuse=lambda: same_run(folder, p["identity"], corpus_sha256),
        )
        run = ok and R.collect(p["slug"], lambda: read_output(folder / "run.json", contracts.FINETUNE_RUN))
        rows.append(sweep_row(p, folder, run or None))
    return rows


def sweep_table(rows: list[dict]) -> str:
    """setting | flags | in-domain change | retention change | one column per eval text | wall time."""
    texts = list(dict.fromkeys(n for r in rows for n in r.get("text_changes", {})))
    lines = []
    for r in rows:
        shown = f"`{shlex.join(r['flags'])}`" if r["flags"] else "(finetune_llama.py defaults)"
        if r.get("failed"):
            lines.append([r["setting"], shown, "failed"] + ["–"] * (len(texts) + 2))
            continue
        changes = [r["in_domain_change"], r["retention_change"]] + [r["text_changes"].get(n) for n in texts]
        lines.append(
            [r["setting"], shown]
            + [signed_percent(c) for c in changes]
            + [fmt(r["wall_time_s"], ",.0f") + " s" if r.get("wall_time_s") is not None else "–"]
        )
    return table(
        ["setting", "flags", "in-domain change", "retention change"]
        + [f"{n} change" for n in texts]
        + ["wall time"],
        lines,
    )


def frontier_figure(rows: list[dict]):
    """x: in-domain change, y: the worst change among the other sets; the default starred, the target shaded.
    Left the whole sweep, right a close-up of the target corner; points are numbered, names in the key below.
    A setting without a retention or eval-text figure has no y and is left out."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    pts = [r for r in rows if None not in (r.get("in_domain_change"), r.get("worst_other_change"))]
    xs, ys = [100 * r["in_domain_change"] for r in pts], [100 * r["worst_other_change"] for r in pts]
    tx, ty = 100 * TRANSFER_TARGET[0], 100 * TRANSFER_TARGET[1]
    half = (len(pts) + 1) // 2
    fig, grid = plt.subplots(2, 2, figsize=(11, 5.5 + 0.16 * half), height_ratios=[5.5, 0.16 * half + 0.2])
    axes = grid[0]
    near = [(x, y) for x, y in zip(xs, ys) if y <= 3 * ty] or list(zip(xs, ys))
    views = [(xs, ys), ([x for x, _ in near], [y for _, y in near])]
    for ax, (vx, vy) in zip(axes, views):
        (x0, x1), (y0, y1) = [(min(v + [t, 0.0]), max(v + [t, 0.0])) for v, t in ((vx, tx), (vy, ty))]
        dx, dy = x1 - x0, y1 - y0
        x0, x1, y0, y1 = x0 - 0.1 * dx, x1 + 0.1 * dx, y0 - 0.1 * dy, y1 + 0.1 * dy
        ax.add_patch(
            Rectangle(
                (x0, y0),
                tx - x0,
                ty - y0,
                color="tab:green",
                alpha=0.12,
                lw=0,
                label=f"target: in-domain <= {tx:+.0f}%, others <= {ty:+.0f}%",
            )
        )
        ax.axvline(0, color="dimgrey", lw=0.8)
        ax.axhline(0, color="dimgrey", lw=0.8)
        for i, (r, x, y) in enumerate(zip(pts, xs, ys), 1):
            default = not r["flags"]
            ax.scatter(
                [x],
                [y],
                marker="*" if default else "o",
                s=180 if default else 40,
                zorder=3,
                color="tab:red" if default else "tab:blue",
                label="default" if default else None,
            )
            ax.annotate(str(i), (x, y), xytext=(5, 3), textcoords="offset points", fontsize=8, clip_on=True)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.xaxis.set_major_formatter(lambda v, _: f"{v:+.0f}%" if round(v) else "0%")
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:+.0f}%" if round(v) else "0%")
        ax.set_xlabel("in-domain (held-out) perplexity change (left is better)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("worst change: retention and eval texts (lower is better)")
    axes[0].legend(fontsize=8, loc="upper right")
    axes[1].set_title("close-up of the target corner", fontsize=9)
    key = [f"{i}: {r['setting']}" for i, r in enumerate(pts, 1)]
    for ax, part in zip(grid[1], (key[:half], key[half:])):  # the key: two columns under the plots
        ax.axis("off")
        ax.text(0, 1, "\n".join(part), fontsize=8, va="top", family="monospace", transform=ax.transAxes)
    return fig, "Transfer sweep: the in-domain gain against the worst change elsewhere, one point per setting"


def sweep_report(
    meta: dict, rows: list[dict], base_cmd: list[str], extra: list[str], plot: str | None, failures: list[str]
) -> str:
    ctx = sorted({r["eval_context"] for r in rows if r.get("eval_context")})
    windows = f" of {', '.join(f'{c:,}' for c in ctx)} tokens" if ctx else ""
    L = [
        f"# Transfer sweep ({meta['device']})",
        "",
        f"Device: **{meta['device_name']}** · torch {meta['torch']} · {meta['date']} · "
        f"commit `{meta['git_commit']}`  ",
        f"Command: `{meta['command']}`",
        "",
        f"Every run: `python finetune_llama.py {shlex.join(base_cmd + extra)}` plus the setting's flags. "
        "Change = ppl after / ppl before - 1 (negative: better), every set scored by the base and the "
        f"adapter in the same windows{windows}. "
        "In-domain: the corpus's held-out end; retention: documents sampled from the base model itself; "
        f"then each `--eval-text` file. Target: in-domain {100 * TRANSFER_TARGET[0]:+.0f}% or better, every "
        f"other set at most {100 * TRANSFER_TARGET[1]:+.0f}%.",
        "",
        sweep_table(rows),
        "",
    ]
    if plot:
        L += [f"![Transfer sweep: in-domain change against the worst change elsewhere]({plot})", ""]
    if failures:
        L += ["## Runs that failed", ""] + [f"- {f}" for f in failures] + [""]
    return "\n".join(L) + "\n"


def sweep_main(args: argparse.Namespace, mode: str, out: Path, command: str, created: bool) -> dict:
    """Run the chosen settings into OUT/sweep/, then its results.json, report.md and frontier plot."""
    data = Path(args.data)
    check_corpus(data)
    device, device_name, gpu = device_info(args.device)
    check_full_has_gpu(mode, gpu)
    key = f"sweep-{args.sweep}-{device}"
    check_record_targets(args, key, run_inputs(data, args.eval_text))
    model = args.model or ("auto" if mode == "full" else "smollm2")
    try:
        extra = shlex.split(args.sweep_extra)
    except ValueError as e:
        die(f"--sweep-extra {args.sweep_extra!r}: {e}")
    base = recipe_flags(mode, model, str(data), args.eval_text)  # --tiny: the test suite's shapes
    plan = sweep_plan(sweep_settings(args.sweep_settings), base, extra)
    meta = run_meta(mode, device, device_name, command, args, data, model)
    sweep_dir = out / "sweep"
    cost = 2 * COST[mode][1]  # finetune_llama.py's own step count: more than the stages' runs
    resume = "run the same command again to go on (finished runs are reused)"
    try:
        make_folder(sweep_dir)
        R = Runner(sweep_dir, cost * len(plan), args.time_limit, device=device)
    except OSError as e:
        die_write_failed(e, None, out, created, False, resume)
    try:  # the runs, then the report's files: a stop in either keeps the finished runs
        rows = run_sweep(R, plan, hashlib.sha256(data.read_bytes()).hexdigest(), cost)
        R.bar.close()
        plot = "transfer_frontier.png" if any(r.get("worst_other_change") is not None for r in rows) else None
        if plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, title = frontier_figure(rows)
            save_plot(fig, title, sweep_dir / plot)
            plt.close(fig)
        report = sweep_report(meta, rows, base, extra, plot, R.failures)
        results = {"meta": meta, "sweep": args.sweep, "rows": rows}
        results.update(reused=R.reused, failures=R.failures)
        atomic_write(sweep_dir / "results.json", json.dumps(results, indent=2, default=str) + "\n")
        atomic_write(sweep_dir / "report.md", report)
        kept = None
        if args.record and R.failures:  # a sweep with holes must not overwrite the recorded one
            kept = f"bench.py: --record {args.record} left as it was: {len(R.failures)} run(s) failed"
            kept += f" (the report is in {sweep_dir / 'report.md'})"
        elif args.record:
            record(Path(args.record), key, report, sweep_dir)
    except KeyboardInterrupt as e:
        R.bar.close()
        raise Interrupted(interrupted_message(R, out, created, False, resume), e) from None
    except OSError as e:
        die_write_failed(e, R, out, created, False, resume)
    print("\n" + sweep_table(rows))
    print(f"\nbench.py: {len(rows)} setting(s) -> {sweep_dir / 'report.md'}")
    for f in R.failures:
        print("  failed: " + f, file=sys.stderr)
    if kept:
        print(kept, file=sys.stderr)
    return results


# -----------------------------------------------------------------------------


def git_commit() -> str:
    if os.environ.get("BENCH_GIT_COMMIT"):  # a copy of the tree without .git (e.g. sent to a GPU machine)
        return os.environ["BENCH_GIT_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or "unknown"
    except OSError:
        return "unknown"


def device_info(requested: str) -> tuple[str, str, bool]:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():  # not silently on the CPU
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        die(f"--device cuda: no CUDA device here ({why}; torch {torch.__version__}): use --device cpu")
    gpu = torch.cuda.is_available() and requested != "cpu"
    if gpu:
        return "cuda", torch.cuda.get_device_name(0), True
    return "cpu", f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores", False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(
        prog="bench.py",
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=HelpFormatter,
    )
    m = p.add_mutually_exclusive_group()
    m.add_argument(
        "--quick", action="store_true", help="CPU, small shapes, about 13 min on two cores (the default)"
    )
    m.add_argument(
        "--full", action="store_true", help="GPU, the seed's shapes (GPT seed preset, Llama-3.2-1B)"
    )
    m.add_argument("--tiny", action="store_true", help="an even smaller --quick, for the test suite")
    # --only and --data default to None, so a flag given as its default is told apart: --sweep and
    # --report-only refuse it as they refuse any other value
    p.add_argument(
        "--only", help=f"stages to run: comma list of gpt, finetune, infer (default: {DEFAULT_STAGES})"
    )
    p.add_argument("--out", type=os.path.expanduser, default="out/bench", help="report folder")
    p.add_argument(
        "--data", type=os.path.expanduser, help=f"corpus shared by every stage (default: {DEFAULT_DATA})"
    )
    p.add_argument(
        "--model",
        default=None,
        help="fine-tuning base (finetune_llama.py --model); default: smollm2 for --quick/--tiny, auto for "
        "--full",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the scripts run")
    p.add_argument(
        "--time-limit",
        type=positive_seconds,
        default=None,
        metavar="S",
        help="stop after S seconds: the run in progress is stopped, later runs are skipped, and the "
        "report holds everything measured so far",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rebuild results.json and report.md from the runs already in --out (e.g. "
        "after a run was cut off), with the device and command recorded in its meta.json",
    )
    add_output_flags(p)
    add_finetune_flags(p)
    return p.parse_args(argv)


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """--readme and --record: the files the results are copied into besides --out."""
    p.add_argument(
        "--readme",
        type=os.path.expanduser,
        metavar="MD",
        default=None,
        help="also write the headline ratios into this file's <!-- headline:MODE-DEVICE --> block "
        "(e.g. README.md)",
    )
    p.add_argument(
        "--record",
        type=os.path.expanduser,
        metavar="MD",
        default=None,
        help="also copy the report into this markdown file (e.g. BENCHMARKS.md), replacing the "
        "section of the same mode and device kind",
    )


def add_finetune_flags(p: argparse.ArgumentParser) -> None:
    """The fine-tune stage's extra runs (--eval-text, --baseline-rev) and --sweep."""
    p.add_argument(
        "--eval-text",
        type=os.path.expanduser,
        metavar="FILE",
        action="append",
        default=[],
        help="a text every fine-tune run also scores before and after training (finetune_llama.py "
        "--eval-text; repeatable): the transfer table, plot and headline show its change",
    )
    p.add_argument(
        "--baseline-rev",
        metavar="REV",
        default=None,
        help="the fine-tune stage also runs the LoRA packed speed run's command, with more "
        "steps, alternately by finetune_llama.py of git revision REV (its hand-written "
        "training loop, read with git show into OUT/baseline/) and by the current one, twice "
        "each, and reports the trainer's steady tokens/s as a ratio to the loop's",
    )
    p.add_argument(
        "--sweep",
        choices=["transfer"],
        default=None,
        help="instead of the stages: run each fine-tune setting of TRANSFER_SWEEP on the fine-tune "
        "stage's recipe command (finetune_llama.py's own shapes; with --tiny, the test suite's) into "
        "OUT/sweep/NAME (a run whose run.json has the same flags, corpus, --eval-text and --replay-data "
        "documents and base weights is reused), then a table and a frontier plot (see --sweep-settings)",
    )
    p.add_argument(
        "--sweep-settings",
        metavar="NAMES",
        default=None,
        help="comma list of the settings to run, by name or folder name (default: all: "
        + "; ".join(n for n, _ in TRANSFER_SWEEP).replace("%", "%%")
        + ")",
    )
    p.add_argument(
        "--sweep-extra",
        metavar="FLAGS",
        default="",
        help='finetune_llama.py flags added to every sweep run, e.g. "--max-steps 2" (one flag '
        "alone: --sweep-extra=--no-packing)",
    )


def check_flag_combinations(args: argparse.Namespace, stages: list[str]) -> None:
    if args.sweep:
        given = [
            f
            for f, v in (
                ("--report-only", args.report_only),
                ("--readme", args.readme),
                ("--only", args.only is not None),
                ("--baseline-rev", args.baseline_rev is not None),
            )
            if v
        ]
        if given:
            die(f"--sweep runs its fine-tune settings alone (run it again to go on); drop {', '.join(given)}")
        return
    given = [f for f in ("--sweep-settings", "--sweep-extra") if getattr(args, f[2:].replace("-", "_"))]
    if given:
        die(f"{given[0]} needs --sweep transfer")
    if args.eval_text and "finetune" not in stages and not args.report_only:
        die("--eval-text is scored by the fine-tune runs: add finetune to --only")
    if args.baseline_rev is not None and "finetune" not in stages and not args.report_only:
        die("--baseline-rev is compared in the fine-tune stage: add finetune to --only")
    if args.model is not None and not {"finetune", "infer"} & set(stages) and not args.report_only:
        die("--model is the fine-tune and inference stages' base model: add finetune or infer to --only")


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=HERE, capture_output=True)


def check_baseline_rev(rev: str) -> str:
    """--baseline-rev: a commit of this repository that holds finetune_llama.py; its full hash."""
    try:
        inside = git("rev-parse", "--is-inside-work-tree")
    except OSError as e:
        die(f"--baseline-rev {rev}: git cannot be run ({e.strerror})")
    if inside.returncode != 0 or inside.stdout.strip() != b"true":
        die(f"--baseline-rev {rev}: {HERE} is not a git checkout (the earlier script comes from its history)")
    sha = git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    if not rev or sha.returncode != 0:
        die(f"--baseline-rev {rev!r} is not a commit in this repository")
    commit = sha.stdout.decode().strip()
    if git("cat-file", "-e", f"{commit}:finetune_llama.py").returncode != 0:
        die(f"--baseline-rev {rev}: commit {commit[:7]} has no finetune_llama.py")
    return commit


def extract_baseline(out: Path, rev: str, commit: str) -> dict:
    """The baseline script, `git show COMMIT:finetune_llama.py`, written (atomically) to OUT/baseline/: run
    as `python OUT/baseline/finetune_llama.py`, it imports nothing from this checkout."""
    shown = git("show", f"{commit}:finetune_llama.py")
    if shown.returncode != 0:
        die(
            f"--baseline-rev {rev}: git show {commit[:7]}:finetune_llama.py failed: "
            f"{shown.stderr.decode(errors='replace').strip()[:200]}"
        )
    path = out / "baseline" / "finetune_llama.py"
    make_folder(path.parent)
    atomic_write(path, shown.stdout)
    return {"rev": rev, "commit": commit, "script": str(path)}


def check_eval_texts(paths: list[str]) -> None:
    """Each --eval-text as finetune_llama.py reads it (UTF-8, documents separated by blank lines, at least
    one), checked before any run: a file it refuses would fail every fine-tune run after the GPT stage."""
    for path in map(Path, paths):
        if path.is_dir():
            die(f"--eval-text {path} is a folder, not a file")
        if path.exists() and not path.is_file():
            die(f"--eval-text {path} is not a regular file")
        if not path.is_file():
            die(f"--eval-text {path}: file not found")
        if path.stat().st_size == 0:
            die(f"--eval-text {path} is empty")
        try:
            data = path.read_bytes()
        except OSError as e:
            die(f"--eval-text {path} cannot be read ({e.strerror})")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            die(f"--eval-text {path} is not UTF-8 text ({e.reason} at byte {e.start})")
        if not any(doc.strip() for doc in re.split(r"\n\s*\n", text)):
            die(f"--eval-text {path} is empty: blank lines only, no document to score")


def check_corpus(data: Path, finetune: bool = True) -> None:
    """The corpus, checked before any run: one the scripts refuse would fail every run of their stage. The
    GPT scripts replace bytes that are not UTF-8; finetune_llama.py refuses them (finetune: it reads it)."""
    if data.exists() and not data.is_file():
        what = "a folder" if data.is_dir() else "not a regular file"
        die(f"--data {data} is {what}; give the corpus text file")
    if not data.is_file() or data.stat().st_size == 0:
        import finetune_llama

        die(f"corpus {data} is missing or empty: {finetune_llama.corpus_hint(data)}")
    try:
        raw = data.read_bytes()
    except OSError as e:
        die(f"corpus {data} cannot be read ({e.strerror})")
    try:
        text = raw.decode("utf-8", errors="strict" if finetune else "replace")
    except UnicodeDecodeError as e:
        die(f"corpus {data} is not UTF-8 text ({e.reason} at byte {e.start}); the fine-tune runs refuse it")
    # split as the scripts split it: Windows and old Mac line ends are newlines
    docs = [d for d in re.split(r"\n\s*\n", text.replace("\r\n", "\n").replace("\r", "\n")) if d.strip()]
    if not docs:
        die(f"corpus {data} is empty: blank lines only, no document")
    if len(docs) < 2:  # each script holds the last documents out for validation
        die(f"corpus {data} holds 1 document; the scripts need at least 2, separated by a blank line")


def run_meta(
    mode: str, device: str, device_name: str, command: str, args: argparse.Namespace, data: Path, model: str
) -> dict:
    """What a run was: where, when, from which commit and flags."""
    return {
        "mode": mode,
        "device": device,
        "device_name": device_name,
        "torch": __import__("torch").__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": command,
        "flags": vars(args),
        "data": str(data),
        "model": model,
    }


def read_meta(out: Path) -> dict:
    """The run's own record of what it was (mode, device, flags, stages), for --report-only."""
    path = out / "meta.json"
    if not path.is_file():
        die(f"--report-only: {out} holds no meta.json (not a bench.py output folder)")
    try:
        meta = read_json(path)
        missing = [k for k in contracts.BENCH_META.keys if k not in meta]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        die(f"--report-only: {path} cannot be read ({e})")
    if missing:
        die(f"--report-only: {path} is not a bench.py meta.json (no {', '.join(missing)})")
    mode, stages = meta["mode"], meta["stages"]
    if mode not in COST or not isinstance(stages, list) or not set(stages) <= set(DEFAULT_STAGES.split(",")):
        die(f"--report-only: {path} is not a bench.py meta.json (mode {mode!r}, stages {stages!r})")
    return meta


def check_outputs(args: argparse.Namespace, out: Path) -> None:
    """Every place this run writes, checked before any run: a long run that cannot save its report
    would be lost."""
    check_writable_dir(out, "--out")
    for flag, md in (("--readme", args.readme), ("--record", args.record)):
        if md:
            check_writable_file(Path(md), flag)
    if args.readme and not Path(args.readme).is_file():
        die(f"--readme {args.readme} does not exist")


def run_inputs(data, eval_texts: list[str]) -> list[tuple[str, str]]:
    """The files a run reads, as (flag, path): what --record and --readme must not be."""
    return [("--data", str(data))] + [("--eval-text", t) for t in eval_texts]


def check_record_targets(args: argparse.Namespace, key: str, inputs: list[tuple[str, str]] = ()) -> None:
    """--readme must hold this mode's headline block; --record's file holds its section once or not at all
    (then it is appended); a marker unpaired, repeated or out of order in either is refused before any run,
    not left to corrupt the file. --record copies the plots into benchmarks/KEY beside its file. Neither is
    one of the run's inputs, (flag, path) pairs: the corpus or an --eval-text would get the report in it."""
    for flag, md in (("--readme", args.readme), ("--record", args.record)):
        for given_flag, given in inputs:
            if md and Path(md).resolve() == Path(given).resolve():
                die(f"{flag} {md} would overwrite the {given_flag} input {given}: write it elsewhere")
    if args.readme:
        start, end = headline_markers(key)
        if start not in read_markdown(Path(args.readme), "--readme", start, end):
            die(f"--readme {args.readme}: no {start} ... {end} block to fill")
    if args.record:
        if Path(args.record).is_file():
            read_markdown(Path(args.record), "--record", *record_markers(key))
        check_writable_dir(Path(args.record).parent / "benchmarks" / key, "--record: its plot folder")


def interrupted_message(
    R: Runner | None,
    out: Path,
    created: bool,
    report_only: bool,
    resume: str | None = None,
    stop: str = "interrupted",
    then: str = "",
) -> str:
    """What Ctrl-C (or a failed write: `stop` names the file) leaves behind and how to go on (resume; default:
    rebuild the report), in one line; then: what to do first, where the same command would fail again."""
    if report_only:
        return f"{stop}: the runs in {out} are untouched; {then}run the same command again for the report"
    finished = (  # stopped as it ended: its output is whole, and this run wrote it (not an earlier one)
        R is not None
        and R.current
        and R.current_expect.is_file()
        and R.current_expect.stat().st_mtime >= R.current_started
    )
    if finished:
        R.done.append(R.current)
        R.current = None
    if R is not None and R.done:
        stopped = f" ({R.current} was stopped)" if R.current else ""
        resume = resume or f"rebuild the report from them with `python bench.py --report-only --out {out}`"
        return f"{stop}: {len(R.done)} finished run(s) kept in {R.out}{stopped}; {then}{resume}"
    again = f"; {then}run the same command again" if then else ""
    if created and out.exists():
        shutil.rmtree(out, ignore_errors=True)
        return f"{stop} before any run finished: {out} removed{again}"
    return f"{stop} before any run finished{again}"


def die_write_failed(
    e: OSError, R: Runner | None, out: Path, created: bool, report_only: bool, resume: str | None = None
) -> None:
    """A write that failed, bench.py's own (writing) or for a full disk or a file-size limit (a run's too:
    refused_write), is the machine's problem, not a bug: one line naming the file and its error, what was
    kept and how to go on, exit 2. Any other OSError goes on as a traceback."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if not (full or getattr(e, "own_write", False)):
        raise e
    if R is not None:
        R.bar.close()
        R.current = None  # bench.py writes between runs, or the run that was refused has ended
    stop = f"cannot write {e.filename} ({e.strerror})"
    if getattr(e, "run", None):  # a run's own write (refused_write)
        stop += f", run {e.run} stopped"
    then = "free space, then " if full else "fix that, then "  # the same command would fail again
    die(interrupted_message(R, out, created, report_only, resume, stop, then))


def anchor_paths(args: argparse.Namespace) -> None:
    """Paths given relative to where bench.py was started, made absolute when that is not this repository:
    the runs start in the repository (where their scripts are), so there a relative path names another file.
    Started in the repository, the paths stay as given (as the report shows them); --report-only runs
    nothing, so reads them from where it was started."""
    if args.report_only or Path.cwd().resolve() == HERE:
        return

    def anchor(p: str | None) -> str | None:
        return str(Path(p).absolute()) if p else p

    args.out, args.data, args.record, args.readme = map(
        anchor, (args.out, args.data, args.record, args.readme)
    )
    args.eval_text = [anchor(p) for p in args.eval_text] if args.eval_text else args.eval_text
    if args.model and Path(args.model).exists():  # a model folder or file; not an alias or hub id
        args.model = anchor(args.model)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    refuse_empty(args, ("--out", "--data", "--eval-text", "--model"))  # before anchoring: "" would be the cwd
    refuse_folder_names(args, ("--record", "--readme"))  # before anchoring, which drops the slash
    if not args.report_only:  # which takes the run's own corpus from its meta.json
        args.data = DEFAULT_DATA if args.data is None else args.data
    anchor_paths(args)
    refuse_non_utf8(args, ("--out", "--data", "--eval-text", "--model", "--record", "--readme"))
    mode = "full" if args.full else "tiny" if args.tiny else "quick"
    stages = [s.strip() for s in (DEFAULT_STAGES if args.only is None else args.only).split(",") if s.strip()]
    if not stages or set(stages) - {"gpt", "finetune", "infer"}:
        die(f"--only takes a comma list of gpt, finetune, infer (got {args.only!r})")
    check_flag_combinations(args, stages)
    out = Path(args.out)
    check_outputs(args, out)
    check_eval_texts(args.eval_text)
    baseline_commit = None
    if args.baseline_rev is not None and not args.report_only and not args.sweep:
        baseline_commit = check_baseline_rev(args.baseline_rev)
    command = "python bench.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    created = not out.exists()
    if args.sweep:
        return sweep_main(args, mode, out, command, created)
    if args.report_only:
        meta = report_only_meta(args, mode, out, command)
    else:
        try:
            meta = new_run_meta(args, mode, stages, out, command, baseline_commit)
        except OSError as e:
            die_write_failed(e, None, out, created, False)
    # from here on the run's own record: for --report-only, what the run it rebuilds was planned with
    mode, stages, device, model = meta["mode"], meta["stages"], meta["device"], meta["model"]
    gpu, bf16_units = device == "cuda", bool(meta.get("bf16_units", False))
    total = eta_seconds(mode, stages, gpu, bf16_units, bool(meta.get("baseline")))
    try:
        R = Runner(out, total, args.time_limit, replay=args.report_only, device=device)
    except OSError as e:  # its logs folder
        die_write_failed(e, None, out, created, args.report_only)
    rebuild = rebuild_advice(args, out)
    try:
        return run_bench(R, args, meta, mode, stages, device, gpu, str(Path(meta["data"])), model, bf16_units)
    except KeyboardInterrupt as e:
        R.bar.close()  # the message goes on a line of its own, not after the progress bar
        raise Interrupted(interrupted_message(R, out, created, args.report_only, rebuild), e) from None
    except OSError as e:
        die_write_failed(e, R, out, created, args.report_only, rebuild)


def rebuild_advice(args: argparse.Namespace, out: Path) -> str:
    """How to go on from the runs kept after a stop: --report-only, with the stopped command's --record and
    --readme, so that the files it would have updated are updated (when every run is there)."""
    cmd = ["python", "bench.py", "--report-only", "--out", str(out)]
    for flag, md in (("--record", args.record), ("--readme", args.readme)):
        cmd += [flag, md] if md else []
    return f"rebuild the report from them with `{shlex.join(cmd)}`"


def report_only_meta(args: argparse.Namespace, mode: str, out: Path, command: str) -> dict:
    """--report-only: the run's meta.json, refusing flags that would contradict it; args takes the run's
    --eval-text files (the recipe's command names them) and no time limit."""
    meta = read_meta(out)
    other_mode = (args.full or args.tiny or args.quick) and mode != meta["mode"]
    other_data = args.data is not None and Path(args.data) != Path(meta["data"])
    given = [
        f
        for f, v in (
            ("--time-limit", args.time_limit),
            ("--model", args.model),
            ("--only", args.only is not None),
            ("--eval-text", args.eval_text),
            ("--quick/--full/--tiny", other_mode),
            ("--device", args.device not in ("auto", meta["device"])),
            ("--data", other_data),
            ("--baseline-rev", args.baseline_rev is not None),
        )
        if v
    ]
    if given:
        die(f"--report-only takes the run's own flags from {out / 'meta.json'}; drop {', '.join(given)}")
    meta["report_rebuilt_by"] = command
    args.time_limit = None
    args.eval_text = (meta.get("flags") or {}).get("eval_text") or []
    check_record_targets(args, f"{meta['mode']}-{meta['device']}", run_inputs(meta["data"], args.eval_text))
    return meta


def new_run_meta(
    args: argparse.Namespace,
    mode: str,
    stages: list[str],
    out: Path,
    command: str,
    baseline_commit: str | None,
) -> dict:
    """A new run's record, written to OUT/meta.json before any run: it lets --report-only rebuild a run that
    was cut off."""
    data = Path(args.data)
    check_corpus(data, finetune="finetune" in stages)
    device, device_name, gpu = device_info(args.device)
    check_full_has_gpu(mode, gpu)
    check_record_targets(args, f"{mode}-{device}", run_inputs(data, args.eval_text))
    model = args.model or ("auto" if mode == "full" else "smollm2")
    bf16_units, why = bf16_units_decision(device)
    why = why if mode == "quick" else None  # --tiny always has the bf16 row; --full runs on a GPU
    make_folder(out)
    meta = {
        **run_meta(mode, device, device_name, command, args, data, model),
        "stages": stages,
        "cpu_bf16": cpu_bf16_flags(),
        "bf16_units": bf16_units,
        "notes": [why] if why and "gpt" in stages else [],
    }
    if baseline_commit:  # the meta.json records it, so --report-only finds the comparison's runs
        meta["baseline"] = extract_baseline(out, args.baseline_rev, baseline_commit)
    atomic_write(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    if why and "gpt" in stages:
        print(f"bench.py: {why}")
    return meta


def check_full_has_gpu(mode: str, gpu: bool) -> None:
    """--full is the GPU's size (the stages' shapes, a sweep's base model): not run on a CPU for hours."""
    if mode == "full" and not gpu:
        die("--full runs the seed's shapes on a GPU and none is available here: use --quick")


def eta_seconds(mode: str, stages: list[str], gpu: bool, bf16_units: bool, baseline: bool) -> float:
    """The progress bar's total: COST's rough seconds per run times the runs each stage plans."""
    per = COST[mode]
    plan = gpt_plan(mode, bf16_units)
    n_gpt = 1.5 + len(plan["ladder"]) + len(plan["extras"]) + 1.5
    ft_plan = finetune_plan(mode, gpu, bf16_units)
    n_ft = len(ft_plan["runs"]) + ft_plan["recipe_cost"]
    if baseline:
        n_ft += 2 * LOOP_VS_TRAINER["repeats"] * LOOP_VS_TRAINER["cost"][mode]
    return (
        ("gpt" in stages) * (n_gpt + 0.5) * per[0]
        + ("finetune" in stages) * n_ft * per[1]
        + ("infer" in stages) * 3 * per[2]
    )


def run_bench(
    R: Runner,
    args: argparse.Namespace,
    meta: dict,
    mode: str,
    stages: list[str],
    device: str,
    gpu: bool,
    data: str,
    model: str,
    bf16_units: bool,
) -> dict:
    """Every stage, then results.json, report.md and the plots; the side-by-side printed at the end."""
    out = R.out
    t0 = time.perf_counter()
    results: dict = {"meta": meta}
    if "gpt" in stages:
        results["gpt"] = stage_gpt(R, mode, data, device, bf16_units)
    if "finetune" in stages:
        results["finetune"] = stage_finetune(
            R, mode, data, model, gpu, bf16_units, args.eval_text, meta.get("baseline")
        )
    if "infer" in stages:
        results["infer"] = stage_infer(
            R, mode, results.get("gpt"), results.get("finetune"), device, data, model
        )
    if "gpt" in stages:
        stage_gpt_extras(R, mode, results["gpt"])
    R.bar.close()
    if not args.report_only:
        meta["wall_time_s"] = time.perf_counter() - t0
    results["failures"] = R.failures
    results["headline"] = headline(results)
    plots = make_plots(results, out)
    report = make_report(results, plots)
    atomic_write(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write(out / "report.md", report)
    kept = None
    if (args.record or args.readme) and (R.failures or not results["headline"]):
        # a run that measured nothing (or not everything) must not overwrite the recorded figures
        why = f"{len(R.failures)} run(s) failed" if R.failures else "the run measured no headline figure"
        files = " and ".join(
            f"{f} {p}" for f, p in (("--record", args.record), ("--readme", args.readme)) if p
        )
        kept = f"bench.py: {files} left as they were: {why} (the report is in {out / 'report.md'})"
    else:
        if args.record:
            record(Path(args.record), f"{mode}-{device}", report, out)
        if args.readme:
            record_headline(Path(args.readme), f"{mode}-{device}", results)
    # the side-by-side a user reads first: Table 1, the headline ratios and the generations
    table1 = report.split("## Table 1")[1].split("\n## ")[0] if "## Table 1" in report else ""
    print("\nTable 1" + table1.rstrip())
    gens = (
        report.split("## Inference")[1].split("\n## ")[0].split("**Prompt:**", 1)
        if "## Inference" in report
        else []
    )
    if len(gens) == 2:
        print("\nPrompt:" + gens[1].rstrip())
    print(f"\nbench.py: {time.perf_counter() - t0:.0f}s -> {out / 'report.md'}")
    for line in headline_lines(results["headline"]):
        print("  " + line.replace("**", ""))
    if R.failures:
        print(f"bench.py: {len(R.failures)} run(s) failed:", file=sys.stderr)
        for f in R.failures:
            print("  " + f, file=sys.stderr)
    if kept:
        print(kept, file=sys.stderr)
    return results


if __name__ == "__main__":
    try:
        signal.signal(signal.SIGTERM, on_sigterm)  # SIGTERM takes Ctrl-C's path (the same line), exit 143
        # a closed terminal (unless under nohup) as SIGTERM: the runs have sessions of their own, stop them
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            signal.signal(signal.SIGHUP, on_sigterm)
        res = main()
    except KeyboardInterrupt as e:  # one line that says what was kept, no traceback
        msg = e if isinstance(e, Interrupted) else "interrupted before any run started"
        print(f"bench.py: {msg}", file=sys.stderr)
        sys.exit(interrupted_exit_code(e))
    sys.exit(1 if res.get("failures") else 0)
