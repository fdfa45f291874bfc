"""finetune_llama.py on TRL's SFTTrainer: packing that keeps documents apart, resume after kill -9, and
data-parallel training with two processes. Tiny random Llamas (conftest.py) on the CPU, through the real
script."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from conftest import assert_user_error, tiny_finetune_cmd  # noqa: E402

import finetune_llama  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def finetune_cmd(tiny, out, *extra) -> list[str]:
    """A run on the 32-wide Llama whose every step trains one checkpointable, deterministic update."""
    flags = "--max-seq-length 64 --batch-size 4 --lr 1e-2 --warmup-steps 2 --eval-split 8 --eval-tokens 0"
    flags += " --retention-docs 16 --retention-tokens 32 --threads 1"
    return tiny_finetune_cmd(tiny, flags, "--out", out, *extra)


def run(cmd, check=True, cache=None):
    env = {**ENV, "FINLLM_CACHE": str(cache)} if cache else ENV
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


# -----------------------------------------------------------------------------
# the trainer


def test_training_runs_through_trl_sfttrainer_on_a_datasets_dataset(tiny, tmp_path):
    import datasets
    import trl

    out = tmp_path / "o"
    p = run(finetune_cmd(tiny, out, "--max-steps", 6), cache=tmp_path / "cache")
    rec = json.loads((out / "run.json").read_text())
    assert rec["trainer"]["class"] == "FinetuneTrainer" and "SFTTrainer" in rec["trainer"]["bases"]
    assert rec["trainer"]["trl"] == trl.__version__ and rec["trainer"]["datasets"] == datasets.__version__
    assert rec["world_size"] == 1 and rec["resumed_from_step"] is None and rec["steps"] == 6
    lines = metrics(out)
    train = [m for m in lines if "train_loss" in m]
    assert [m["iter"] for m in train] == [1, 2, 3, 4, 5, 6]
    assert [m["tokens"] for m in train] == [256 * k for k in range(1, 7)]  # 4 packed rows of 64 per step
    # linear warmup over 2 steps, then cosine from --lr to 10% of it over the other 4: 1e-2 * (0.1 + 0.45 *
    # (1 + cos(pi * k / 4))) at their k = 0..3
    cosine = [1e-2 * (0.1 + 0.45 * (1 + c)) for c in (1.0, 0.5**0.5, 0.0, -(0.5**0.5))]
    assert [m["lr"] for m in train] == pytest.approx([5e-3, 1e-2, *cosine], rel=1e-9)
    assert all(m["tokens_per_s"] > 0 for m in train) and rec["tokens_per_s_steady"] > 0
    assert "{'loss'" not in p.stdout + p.stderr  # the trainer's own log printer is off: one progress bar
    assert not (out / "checkpoints").exists()  # no --save-steps: no checkpoints


def test_the_optimizer_steps_at_the_logged_learning_rate(tiny, tmp_path):
    """The rate each step's optimizer update uses is the one metrics.jsonl logs for that step."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    out, applied = tmp_path / "o", []
    cmd = finetune_cmd(tiny, out, "--max-steps", 6, "--retention-docs", 0, "--cache-dir", tmp_path / "cache")
    handle = register_optimizer_step_pre_hook(lambda opt, a, kw: applied.append(opt.param_groups[0]["lr"]))
    try:
        finetune_llama.main(finetune_llama.build_parser().parse_args(cmd[2:]))
    finally:
        handle.remove()
    logged = [m["lr"] for m in metrics(out) if "train_loss" in m]
    assert len(logged) == 6 and applied == pytest.approx(logged, rel=1e-9)


def test_packed_rows_never_attend_to_the_document_before(tiny):
    """A token's logits do not depend on the document packed before it in the row, in either layout of the
    batch; the same rows without the position restart do depend on it (so the check can fail)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["llama_a"]).eval()
    torch.manual_seed(0)
    a, other, b = (torch.randint(1, 300, (n,)).tolist() for n in (20, 20, 12))

    def logits(collator, rows):
        batch = collator([{"input_ids": r, "seq_lengths": lengths, "replay": 0} for r, lengths in rows])
        for k in ("labels", "replay", "packed_seq_lengths"):  # packed_seq_lengths: read by Unsloth only
            batch.pop(k, None)
        with torch.no_grad():
            return model(**batch).logits.view(len(rows), -1, model.config.vocab_size)

    alone = logits(finetune_llama.RowCollator(0, packed=True), [(b, [12])])[0]
    for flat in (False, True):
        collator = finetune_llama.RowCollator(0, packed=True, flat=flat)
        x = logits(collator, [(a + b, [20, 12]), (other + b, [20, 12])])
        assert torch.allclose(x[0, 20:], x[1, 20:], atol=1e-5) and torch.allclose(x[0, 20:], alone, atol=1e-5)
        assert not torch.allclose(x[0, :20], x[1, :20], atol=1e-3)  # the first documents do differ
    crossing = logits(finetune_llama.RowCollator(0, packed=True), [(a + b, [32]), (other + b, [32])])
    assert (crossing[0, 20:] - crossing[1, 20:]).abs().max() > 1e-3


def test_collator_masks_each_document_start_and_flat_layout_carries_piece_lengths():
    collator = finetune_llama.RowCollator(pad_id=0, packed=True, flat=True)
    batch = collator(
        [
            {"input_ids": [5, 6, 7, 8, 9, 10], "seq_lengths": [2, 4], "replay": 1},
            {"input_ids": [11, 12, 13, 14, 15, 16], "seq_lengths": [6], "replay": 0},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]
    assert (
        batch["packed_seq_lengths"].tolist() == [2, 4, 6] and batch["packed_seq_lengths"].dtype == torch.int32
    )
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, 9, 10], [-100, 12, 13, 14, 15, 16]]
    assert (
        batch["replay"].tolist() == [True, False]
        and batch["use_cache"] is False
        and "attention_mask" not in batch
    )
    picked = finetune_llama.select_rows(
        {k: v for k, v in batch.items() if k not in ("labels", "replay")}, torch.tensor([True, False]), T=6
    )
    assert picked["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]] and picked[
        "packed_seq_lengths"
    ].tolist() == [2, 4]
    padded = finetune_llama.RowCollator(pad_id=0, packed=False)(
        [
            {"input_ids": [5, 6, 7], "seq_lengths": [3], "replay": 0},
            {"input_ids": [8], "seq_lengths": [1], "replay": 0},
        ]
    )
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert padded["labels"].tolist() == [[5, 6, 7], [8, -100, -100]] and "position_ids" not in padded


def test_pack_blocks_records_the_document_pieces_of_each_row():
    rows = finetune_llama.pack_blocks([[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]], 4)
    assert rows == [([1, 2, 3, 4], [3, 1]), ([5, 6, 7, 8], [4])]  # the tail (9, 10) is dropped
    assert finetune_llama.pack_blocks([[1, 2], [3, 4]], 2) == [([1, 2], [2]), ([3, 4], [2])]


# -----------------------------------------------------------------------------
# resume


def wait_for_checkpoint(proc, out: Path, timeout: float = 300) -> None:
    t0 = time.time()
    while not list((out / "checkpoints").glob("checkpoint-*/checkpoint_done.json")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.02)


def test_resume_after_kill_9_reaches_the_uninterrupted_run(tiny, tmp_path):
    cache = tmp_path / "cache"
    full, killed = tmp_path / "full", tmp_path / "killed"
    steps = 120
    run(finetune_cmd(tiny, full, "--max-steps", steps, "--save-steps", 5), cache=cache)
    proc = subprocess.Popen(
        finetune_cmd(tiny, killed, "--max-steps", steps, "--save-steps", 5),
        cwd=ROOT,
        env={**ENV, "FINLLM_CACHE": str(cache)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_checkpoint(proc, killed)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (killed / "run.json").exists()
    done = finetune_llama.complete_checkpoints(killed)
    assert done and finetune_llama.checkpoint_step(done[-1]) < steps

    again = run(finetune_cmd(tiny, killed, "--max-steps", steps, "--save-steps", 5), check=False, cache=cache)
    assert_user_error(again, "holds an unfinished run", "--resume")  # a plain rerun does not start over
    resumed = run(
        finetune_cmd(tiny, killed, "--max-steps", steps, "--save-steps", 5, "--resume"), cache=cache
    )
    assert "resuming from" in resumed.stderr
    a, b = metrics(full), metrics(killed)
    assert [m["iter"] for m in a] == [
        m["iter"] for m in b
    ]  # the whole run's lines, not only the resumed part
    loss_a, loss_b = (next(m["train_loss"] for m in reversed(x) if "train_loss" in m) for x in (a, b))
    assert abs(loss_a - loss_b) < 1e-3
    ra, rb = (json.loads((d / "run.json").read_text()) for d in (full, killed))
    assert (
        rb["resumed_from_step"] == finetune_llama.checkpoint_step(done[-1])
        and ra["resumed_from_step"] is None
    )
    assert abs(ra["eval_ppl_after"] - rb["eval_ppl_after"]) < 1e-3 * ra["eval_ppl_after"]
    elapsed = [m["elapsed_s"] for m in b if "elapsed_s" in m]  # the resumed session goes on from the first's
    assert elapsed == sorted(elapsed) and rb["train_time_s"] >= elapsed[-1] > 0
    assert ra["eval_sets"]["retention"]["ppl_before"] == rb["eval_sets"]["retention"]["ppl_before"]
    wa, wb = adapter_weights(full), adapter_weights(killed)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    finished = run(finetune_cmd(tiny, killed, "--max-steps", steps, "--resume"), check=False, cache=cache)
    assert_user_error(finished, "finished", "nothing to resume")


@pytest.mark.parametrize(
    "sig, code, overwrite", [(signal.SIGINT, 130, []), (signal.SIGTERM, 143, ["--overwrite"])]
)
def test_interrupted_training_keeps_the_checkpoints_and_resume_goes_on(tiny, tmp_path, sig, code, overwrite):
    """Ctrl-C while training, or SIGTERM (kill, timeout, a scheduler's time limit: exit 143, 128 + 15): one
    line, the last on stderr (the progress bar is not redrawn under it), naming the kept checkpoints and
    --resume, no traceback; the command it names finishes (a command with --overwrite: --resume in its place,
    as the two together are refused)."""
    cache, out = tmp_path / "cache", tmp_path / "o"
    cmd = finetune_cmd(tiny, out, "--max-steps", 60, "--save-steps", 2, *overwrite)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**ENV, "FINLLM_CACHE": str(cache)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # background jobs ignore it
    )
    try:
        wait_for_checkpoint(proc, out)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code and "Traceback" not in err, err[-2000:]
    done = finetune_llama.complete_checkpoints(out)
    assert done and not (out / "run.json").exists()
    last = err.strip().replace("\r", "\n").splitlines()[-1]
    assert last.startswith(f"interrupted: {out} keeps the checkpoints (started "), last
    if overwrite:
        assert last.endswith("; continue with the same command with --resume in place of --overwrite"), last
    else:
        assert last.endswith("; continue with the same command and --resume"), last
    resumed = run([*(c for c in cmd if c != "--overwrite"), "--resume"], cache=cache)
    assert "resuming from" in resumed.stderr
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] >= 2


def test_resume_refuses_checkpoints_of_another_command(tiny, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "o"
    p = run(finetune_cmd(tiny, out, "--max-steps", 4), check=False, cache=cache)
    assert p.returncode == 0
    assert_user_error(
        run(finetune_cmd(tiny, tmp_path / "none", "--max-steps", 4, "--resume"), check=False),
        "--resume",
        "no complete checkpoint",
        "--save-steps",
    )
    assert not (tmp_path / "none").exists()
    # an unfinished run: its adapter is not written yet; kill it after its first checkpoint
    part = tmp_path / "part"
    proc = subprocess.Popen(
        finetune_cmd(tiny, part, "--max-steps", 100000, "--save-steps", 3),
        cwd=ROOT,
        env={**ENV, "FINLLM_CACHE": str(cache)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_checkpoint(proc, part)
    proc.kill()
    proc.wait(timeout=60)
    before = sorted(p.name for p in (part / "checkpoints").iterdir())
    other = run(
        finetune_cmd(tiny, part, "--max-steps", 100000, "--save-steps", 3, "--lr", "5e-3", "--resume"),
        check=False,
        cache=cache,
    )
    assert_user_error(other, "--resume", "do not match", "--lr 0.01 then, 0.005 now")
    assert_user_error(
        run(
            finetune_cmd(tiny, part, "--max-steps", 100000, "--resume", "--overwrite"),
            check=False,
            cache=cache,
        ),
        "--resume",
        "--overwrite",
    )
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == before  # refusals touch nothing
    # damaged files never start the run over: an unreadable record, then a truncated optimizer state,
    # adapter or trainer state
    record = part / "checkpoints" / "resume.json"
    saved = record.read_bytes()
    record.write_text("[]")
    command = finetune_cmd(tiny, part, "--max-steps", 100000, "--save-steps", 3)
    plain = run(command, check=False, cache=cache)
    assert_user_error(plain, "holds an unfinished run", "resume.json missing or unreadable", "--overwrite")
    assert_user_error(run([*command, "--resume"], check=False, cache=cache), "missing or unreadable")
    record.write_bytes(saved)
    *earlier, last = finetune_llama.complete_checkpoints(part)
    # removing the damaged checkpoint resumes from the one before it; the run's only one, from none
    fix = "resume from the checkpoint before it" if earlier else "no checkpoint before it: pass --overwrite"
    for name in ("optimizer.pt", "adapter_model.safetensors", "trainer_state.json"):
        whole = (last / name).read_bytes()
        (last / name).write_bytes(whole[: len(whole) * 3 // 4])
        damaged = run([*command, "--resume"], check=False, cache=cache)
        assert_user_error(damaged, f"--resume: {last / name} is damaged", fix)
        (last / name).write_bytes(whole)
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == before


# -----------------------------------------------------------------------------
# data parallel


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_data_parallel_like_one_with_twice_the_batch(tiny, tmp_path):
    """torchrun --nproc_per_node=2 (gloo on the CPU): each step's rows split between the processes, gradients
    averaged; the result matches one process taking both halves. Only the first process writes."""
    cache = tmp_path / "cache"
    single, dp = tmp_path / "single", tmp_path / "dp"
    base = finetune_cmd(tiny, single, "--max-steps", 8)
    run(base, cache=cache)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        *finetune_cmd(tiny, dp, "--max-steps", 8, "--batch-size", 2)[1:],
    ]
    p = run(cmd, cache=cache)
    assert p.stdout.count("adapter written to") == 1 and p.stderr.count("data: ") == 1  # one process speaks
    a, b = (json.loads((d / "run.json").read_text()) for d in (single, dp))
    assert b["world_size"] == 2 and a["world_size"] == 1 and a["train_tokens"] == b["train_tokens"]
    la = [m["train_loss"] for m in metrics(single) if "train_loss" in m]
    lb = [m["train_loss"] for m in metrics(dp) if "train_loss" in m]
    assert len(la) == len(lb) == 8 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-3
    assert abs(a["eval_ppl_after"] - b["eval_ppl_after"]) < 1e-3 * a["eval_ppl_after"]
    assert sorted(f.name for f in dp.iterdir()) == sorted(f.name for f in single.iterdir())  # no stray files
    ppl = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), "--adapter", str(dp), "--ppl", str(dp / "eval_docs.txt")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=300,
    )
    assert ppl.returncode == 0, ppl.stderr[-2000:]
    line = next(x for x in ppl.stdout.splitlines() if x.startswith("perplexity: "))
    assert (
        abs(float(line.split()[1]) - b["eval_ppl_after"]) < 1e-3 * b["eval_ppl_after"]
    )  # the adapter it trained


@pytest.mark.parametrize("flat", [False, True])
def test_the_models_own_loss_equals_token_losses_cross_entropy(tiny, flat):
    """Batches without KL rows train on the model's own loss (fused in Unsloth): the same figure as
    token_losses, as a mean and as a sum over the step's tokens, in either batch layout."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["llama_a"]).eval()
    torch.manual_seed(1)
    rows = [(torch.randint(1, 300, (16,)).tolist(), lengths) for lengths in ([16], [5, 11], [9, 7])]
    batch = finetune_llama.RowCollator(0, packed=True, flat=flat)(
        [{"input_ids": r, "seq_lengths": lengths, "replay": 0} for r, lengths in rows]
    )
    labels, replay = batch.pop("labels"), batch.pop("replay")
    if not flat:
        batch.pop("packed_seq_lengths", None)
    inputs = {k: v for k, v in batch.items() if k != "packed_seq_lengths"}
    with torch.no_grad():
        total, n = finetune_llama.token_losses(model, inputs, labels, replay, weight=None)
        assert int(n) == 15 + 14 + 14  # a row predicts 15 tokens, less one for each piece starting inside it
        mean = finetune_llama.cross_entropy_loss(model, inputs, labels)
        summed = finetune_llama.cross_entropy_loss(
            model, inputs, labels, num_items_in_batch=torch.tensor(100)
        )
    assert abs(mean.item() - (total / n).item()) < 1e-5
    assert abs(summed.item() - total.item() / 100) < 1e-5


def test_resuming_a_checkpoint_of_the_last_step_reports_the_run_s_tokens_per_s(tiny, tmp_path):
    """A run killed after its last step (while it scores the adapter, say) resumes with no step left to time:
    run.json's tokens/s are still every step's, as JSON numbers (no NaN), and so is the closing line's."""
    cache, out = tmp_path / "cache", tmp_path / "o"
    command = finetune_cmd(tiny, out, "--max-steps", 2, "--save-steps", 2)
    run(command, cache=cache)
    first = json.loads((out / "run.json").read_text())
    (out / "run.json").unlink()  # as a kill after training, before the adapter was published, leaves it
    p = run([*command, "--resume"], cache=cache)

    def strict(c):
        raise ValueError(f"{c} in run.json")

    again = json.loads((out / "run.json").read_text(), parse_constant=strict)
    assert again["resumed_from_step"] == 2
    assert again["tokens_per_s"] == pytest.approx(first["tokens_per_s"], rel=1e-9)
    assert again["tokens_per_s_steady"] == pytest.approx(first["tokens_per_s"], rel=1e-9)
    assert f"({again['tokens_per_s']:.0f} tokens/s)" in p.stdout and "nan" not in p.stdout


def test_resume_refuses_checkpoints_of_another_base(tiny, tmp_path):
    """--model names a folder (or auto) whose model may not be the one the checkpoints were trained on: the
    resume is refused in one line, not a traceback from loading the checkpoint into another model."""
    import shutil

    cache, out, base = tmp_path / "cache", tmp_path / "o", tmp_path / "base"
    shutil.copytree(tiny["llama_a"], base)
    command = finetune_cmd(tiny, out, "--model", base, "--max-steps", 2, "--save-steps", 1)
    run(command, cache=cache)
    (out / "run.json").unlink()  # as a kill after training, before the adapter was published, leaves it
    shutil.rmtree(base)
    shutil.copytree(tiny["llama_b"], base)  # another model in the same folder: 48 wide, not 32
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    p = run([*command, "--resume"], check=False, cache=cache)
    where = f"{base} then, {base} now: another config"
    assert_user_error(
        p, "--resume: the checkpoints in", f"do not match this command (the base model changed ({where})"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_resume_takes_the_same_files_spelled_another_way(tiny, tmp_path):
    """--resume compares the corpora and text files by their bytes: the same files named by another path
    (relative, ./, absolute) continue the run, where the flags' text alone refused it."""
    cache, out = tmp_path / "cache", tmp_path / "o"
    text = tmp_path / "notes.txt"
    text.write_text("The index rose.\n\nBond yields fell.\n")
    command = finetune_cmd(tiny, out, "--max-steps", 2, "--save-steps", 1, "--eval-text", text)
    run(command, cache=cache)
    (out / "run.json").unlink()  # as a kill after training, before the adapter was published, leaves it

    def rel(p) -> str:
        return "./" + os.path.relpath(p, ROOT)

    respelled = [*command, "--data", rel(tiny["corpus"]), "--model", rel(tiny["llama_a"])]
    respelled[respelled.index("--eval-text") + 1] = rel(text)
    p = run([*respelled, "--resume"], check=False, cache=cache)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["steps"] == 2
    (out / "run.json").unlink()
    renamed = tmp_path / "other.txt"  # another file: refused, as before
    renamed.write_text(text.read_text())
    respelled[respelled.index("--eval-text") + 1] = str(renamed)
    p = run([*respelled, "--resume"], check=False, cache=cache)
    assert_user_error(p, "--resume", "do not match", "--eval-text")


def test_other_weights_in_the_base_folder_are_another_base(tiny, tmp_path):
    """The base folder rewritten with other weights under the same config (a merged model made again in
    place): --resume is refused, as the scores before training were the old weights', and the retention
    documents are sampled from the new weights, not read from the old ones' cache."""
    import shutil

    from transformers import AutoModelForCausalLM

    cache, out, base = tmp_path / "cache", tmp_path / "o", tmp_path / "base"
    shutil.copytree(tiny["llama_a"], base)
    command = finetune_cmd(tiny, out, "--model", base, "--max-steps", 2, "--save-steps", 1)
    run(command, cache=cache)
    first = json.loads((out / "run.json").read_text())["eval_sets"]["retention"]["source"]
    (out / "run.json").unlink()  # as a kill after training, before the adapter was published, leaves it
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(base)
    p = run([*command, "--resume"], check=False, cache=cache)
    where = f"{base} then, {base} now: other weights"
    assert_user_error(p, "--resume: the checkpoints in", f"(the base model changed ({where})")
    run([*command, "--overwrite"], cache=cache)
    again = json.loads((out / "run.json").read_text())["eval_sets"]["retention"]["source"]
    assert again != first and Path(first).is_file() and Path(again).is_file()
    assert Path(again).read_text() != Path(first).read_text()


def test_resume_refuses_an_edited_eval_text_and_a_damaged_record(tmp_path, capsys):
    """The files a run scores (--eval-text) or trains on (--replay-data) are part of what a checkpoint
    continues: the scores before training are not measured again, so an edited file would report a change
    the adapter never made. A record of the wrong shape is refused, not a traceback."""
    import argparse

    text = tmp_path / "ev.txt"
    text.write_text("Oil fell.\n\nRates rose.\n")
    given = {"lr": 0.01, "eval_text": [str(text)], "replay_data": None}
    out = tmp_path / "o"
    record = out / finetune_llama.CHECKPOINTS / finetune_llama.RESUME_FILE
    record.parent.mkdir(parents=True)
    identity = finetune_llama.resume_identity(given, [])
    record.write_text(json.dumps({"identity": identity, "before": {}}))
    args = argparse.Namespace(out=str(out))
    assert finetune_llama.check_resume(args, given, [])["before"] == {}
    for edit, says in (
        (
            lambda: text.write_text("Oil rose.\n\nRates rose.\n"),
            "an --eval-text or --replay-data file changed",
        ),
        (lambda: record.write_text(json.dumps({"identity": {}, "before": {}})), "is damaged"),
        (lambda: record.write_text(json.dumps({"identity": identity, "before": None})), "is damaged"),
    ):
        edit()
        with pytest.raises(SystemExit) as stop:
            finetune_llama.check_resume(args, given, [])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and says in err and err.count("\n") == 1, err


def test_a_two_process_run_resumes_after_kill_9(tiny, tmp_path):
    """Both processes killed after a checkpoint; torchrun with --resume ends where the uninterrupted
    two-process run ends (each process restores its own random state; the optimizer state loads on the
    CPU)."""
    cache = tmp_path / "cache"

    def torchrun(out, *extra):
        cmd = finetune_cmd(tiny, out, "--max-steps", 60, "--batch-size", 2, "--save-steps", 5, *extra)
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            *cmd[1:],
        ]

    full, killed = tmp_path / "full", tmp_path / "killed"
    run(torchrun(full), cache=cache)
    proc = subprocess.Popen(
        torchrun(killed),
        cwd=ROOT,
        env={**ENV, "FINLLM_CACHE": str(cache)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_checkpoint(proc, killed)
    # torchrun starts each training process in a session of its own: killing torchrun's group alone leaves
    # them training on to the end (they wrote the adapter after this test's checks, under load)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) >= 2, workers
    for pid in [proc.pid, *map(int, workers)]:
        os.killpg(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "run.json").exists()
    resumed = run(torchrun(killed, "--resume"), cache=cache)
    assert "resuming from" in resumed.stderr
    a, b = (next(m["train_loss"] for m in reversed(metrics(d)) if "train_loss" in m) for d in (full, killed))
    assert abs(a - b) < 1e-3
    rb = json.loads((killed / "run.json").read_text())
    assert rb["world_size"] == 2 and rb["resumed_from_step"] >= 5


def test_evaluation_after_bf16_training_is_in_full_precision_like_the_one_before(tiny, tmp_path):
    """The trainer wraps the model's forward in bf16 autocast for training; the scores after training must
    still come from the plain fp32 forward, as the scores before do and as infer.py recomputes them."""
    sys.path.insert(0, str(ROOT))
    import infer

    out = tmp_path / "bf16"
    run(finetune_cmd(tiny, out, "--max-steps", 6, "--bf16"), cache=tmp_path / "cache")
    rec = json.loads((out / "run.json").read_text())
    assert rec["bf16"] is True
    again = infer.main(["--adapter", str(out), "--ppl", str(out / "eval_docs.txt")])["ppl"]["perplexity"]
    assert abs(again / rec["eval_ppl_after"] - 1) < 1e-6  # bf16 scoring was 2e-5 off on this model


def test_unsloths_packed_rows_name_their_kernel_and_a_missing_one_is_said_with_its_fix(monkeypatch):
    """Unsloth attends a packed row in one call with flash-attn, xformers, or torch's varlen kernel where it
    takes enable_gqa and flash attention is built in; else once per document, which is said in one line."""
    import importlib.util

    import torch.nn.attention.varlen as varlen

    flash_built = torch.backends.cuda.is_flash_attention_available()
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    assert finetune_llama.unsloth_packed_kernel() == "torch varlen"  # torch 2.13's varlen_attn

    def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        raise AssertionError("only its signature is read")

    monkeypatch.setattr(varlen, "varlen_attn", varlen_2_11)  # torch 2.11: no enable_gqa
    assert finetune_llama.unsloth_packed_kernel() is None
    note = finetune_llama.packed_attention_note(None)
    assert note.startswith("note: Unsloth attends each document") and f"torch {torch.__version__}" in note
    assert "\n" not in note and "torch >= 2.12" in note and "--no-packing" in note
    assert finetune_llama.packed_attention_note("torch varlen") is None

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "xformers" else real_find_spec(name, *a),
    )
    assert finetune_llama.unsloth_packed_kernel() == "xformers"
    monkeypatch.undo()
    if not flash_built:  # a CPU build of torch: no flash kernel for varlen to call
        assert finetune_llama.unsloth_packed_kernel() is None


def test_a_kill_while_the_adapter_is_published_never_pairs_new_weights_with_an_old_run_json(
    tiny, tmp_path, monkeypatch
):
    """--overwrite over a finished run, killed after each possible file move: whenever run.json is there, the
    files beside it are all of one run, the one it describes (without it, --resume continues from the
    checkpoints)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny["llama_a"])
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    tok = AutoTokenizer.from_pretrained(tiny["llama_a"])

    def save(out, run_id):
        with torch.no_grad():  # each run's own LoRA weights
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.1 if run_id == "new" else -0.1)
        finetune_llama.save_outputs(out, model, tok, {"run_id": run_id}, [{"step": run_id}], f"{run_id}\n")

    files = {}
    for run_id in ("old", "new"):
        save(tmp_path / run_id, run_id)
        files[run_id] = {f.name: f.read_bytes() for f in (tmp_path / run_id).iterdir() if f.is_file()}
    real_replace, k = os.replace, 0
    while True:
        out, moved = tmp_path / f"kill_after_{k}", []
        save(out, "old")

        def replace(src, dst, out=out, moved=moved, k=k):
            if Path(dst).parent == out:  # a move into --out (not the savers' own renames in the temp folder)
                if len(moved) == k:
                    raise KeyboardInterrupt  # the kill
                moved.append(Path(dst).name)
            real_replace(src, dst)

        monkeypatch.setattr(finetune_llama.os, "replace", replace)
        try:
            save(out, "new")
            killed = False
        except KeyboardInterrupt:
            killed = True
        monkeypatch.setattr(finetune_llama.os, "replace", real_replace)
        if (out / "run.json").exists():  # one run's files, all of them
            assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} in files.values(), moved
        else:
            assert killed and "run.json" not in moved
        if not killed:
            break
        k += 1
    assert k == len(files["new"]) and moved[-1] == "run.json"  # every cut was tried; run.json moved in last


# -----------------------------------------------------------------------------
# a full disk


def run_with_file_limit(cmd, limit: int, cache: Path) -> subprocess.CompletedProcess:
    """cmd as run() runs it, but every write past `limit` bytes of a file fails as on a full disk (EFBIG:
    Python ignores SIGXFSZ)."""
    import resource

    return subprocess.run(
        [*map(str, cmd)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**ENV, "FINLLM_CACHE": str(cache)},
        timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )


def full_disk_line(p) -> str:
    """Exit 2 and no traceback; returns the last line of stderr (the progress bar may stand before it)."""
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return p.stderr.strip().replace("\r", "\n").splitlines()[-1]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture
def full_disk(tmp_path):
    """A tmpfs with room for two inodes, its own root and one more: the run's first folder takes the last,
    so the next folder or file it makes finds the disk full (ENOSPC), as a real one does. Needs root and
    mount."""
    d = tmp_path / "disk"
    d.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=2", "tmpfs", str(d)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)


@pytest.mark.parametrize("flags", [[], ["--save-steps", 1]], ids=["adapter", "checkpoints"])
def test_a_disk_too_full_for_the_run_s_folders_leaves_none_of_them(tiny, tmp_path, full_disk, flags):
    """--out passes the writability check (a file can be made there), then the disk is full when the run makes
    its folders: the adapter's temp folder, or the checkpoints' folder. One line, and --out is not left."""
    out = full_disk / "o"
    p = run(finetune_cmd(tiny, out, "--max-steps", 2, *flags), check=False, cache=tmp_path / "cache")
    where = out / "checkpoints" if flags else out
    assert full_disk_line(p) == (
        f"error: disk full: cannot write {where} (No space left on device); {out} has no new adapter; "
        "free space, then run the same command"
    )
    assert list(full_disk.iterdir()) == []


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_resume_goes_on(tiny, tmp_path):
    """A checkpoint holds a 150 kB optimizer state; under a 100 kB file-size limit the one being written
    fails. It is removed (no half-written folder holds the space), the one before stays byte for byte, and
    once there is room --resume finishes the run from it."""
    import shutil

    cache, out = tmp_path / "cache", tmp_path / "o"
    command = finetune_cmd(tiny, out, "--max-steps", 4, "--save-steps", 2)
    run(command, cache=cache)
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")  # what a kill after the first checkpoint leaves
    for f in out.iterdir():
        if f.is_file():
            f.unlink()
    card = "checkpoints/README.md"  # the trainer's model card, written again (tags in any order) at each save
    kept = files_of(out)
    p = run_with_file_limit([*command, "--resume"], 100_000, cache)
    line = full_disk_line(p)
    # torch.save says only that a write fell short: the file-size limit in force names the cause
    assert line.startswith(
        f"error: disk full: cannot write {out / 'checkpoints' / 'checkpoint-4'} (File too large); "
    )
    assert line.endswith("last checkpoint at step 2 of 4); free space, then rerun with --resume"), line
    now = files_of(out)
    assert now.pop(card) and kept.pop(card)
    assert now == kept  # checkpoint-2 and the run's record as they were; nothing else
    run([*command, "--resume"], cache=cache)
    rec = json.loads((out / "run.json").read_text())
    assert rec["resumed_from_step"] == 2 and rec["steps"] == 4


def test_a_full_disk_while_writing_the_adapter_keeps_the_earlier_one(tiny, tmp_path):
    """The adapter's weights (69 kB) under a 50 kB file-size limit: the earlier adapter in --out stays byte
    for byte, with no temp folder beside it; a new --out is not left behind empty."""
    cache, out = tmp_path / "cache", tmp_path / "o"
    run(finetune_cmd(tiny, out, "--max-steps", 2), cache=cache)
    kept = files_of(out)
    p = run_with_file_limit(finetune_cmd(tiny, out, "--max-steps", 3, "--overwrite"), 50_000, cache)
    line = full_disk_line(p)
    assert line.startswith(
        f"error: disk full: cannot write {out} (File too large); {out} keeps an adapter from "
    )
    assert line.endswith(" 2 steps); free space, then run the same command"), line
    assert files_of(out) == kept and sorted(p.name for p in out.iterdir()) == sorted(kept)
    fresh = tmp_path / "new" / "o"
    p = run_with_file_limit(finetune_cmd(tiny, fresh, "--max-steps", 2), 50_000, cache)
    assert full_disk_line(p) == (
        f"error: disk full: cannot write {fresh} (File too large); {fresh} has no new adapter; "
        "free space, then run the same command"
    )
    assert not (tmp_path / "new").exists()


def test_a_full_disk_while_caching_the_base_samples_leaves_no_temp_file(tiny, tmp_path):
    """The retention documents sampled from the base (over 1 kB) under a 200-byte file-size limit."""
    cache, out = tmp_path / "cache", tmp_path / "o"
    p = run_with_file_limit(finetune_cmd(tiny, out, "--max-steps", 2), 200, cache)
    line = full_disk_line(p)
    assert line.startswith(f"error: disk full: cannot write {cache / 'samples'}/"), line
    assert line.endswith(
        "/retention-n16-len32.txt (File too large); "
        f"{out} has no new adapter; free space, then run the same command"
    ), line
    assert not [f for f in cache.rglob("*") if f.is_file()] and not out.exists()


def test_a_full_disk_while_caching_a_converted_base_leaves_no_partial_folder(tiny, tmp_path):
    """save_model_folder writes the cached HF folder of a GGUF (smollm2) or of random-llama-3.2-1b: with no
    room for its weights, it raises DiskFull naming the folder, and neither it nor its temp folder is left."""
    script = (
        "import sys\nfrom pathlib import Path\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "import finetune_llama\nsrc, dest = sys.argv[1:]\n"
        "model, tok = AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src)\n"
        "try:\n    finetune_llama.save_model_folder(model, tok, Path(dest), 'converted')\n"
        "except finetune_llama.DiskFull as e:\n    sys.exit(str(e))\n"
    )
    cache = tmp_path / "cache"
    dest = cache / "base"
    p = run_with_file_limit([sys.executable, "-c", script, tiny["llama_a"], dest], 10_000, cache)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == f"disk full: cannot write {dest} (File too large)"
    assert list(cache.iterdir()) == []


# -----------------------------------------------------------------------------
# other write errors: a folder where a file goes (EISDIR, ENOTEMPTY), as a read-only disk or an I/O error


def test_a_folder_where_the_run_writes_a_file_is_refused_before_training(tiny, tmp_path):
    """Found only when the adapter was moved into --out, it cost the whole training run and a traceback; a
    file named checkpoints, a traceback when the run cleared that folder."""
    out = tmp_path / "o"
    (out / "metrics.jsonl").mkdir(parents=True)
    p = run(finetune_cmd(tiny, out, "--max-steps", 2, "--overwrite"), check=False, cache=tmp_path / "cache")
    assert_user_error(p, f"--out {out}: {out / 'metrics.jsonl'} is a folder where the run writes a file")
    assert sorted(f.name for f in out.iterdir()) == ["metrics.jsonl"]
    (out / "metrics.jsonl").rmdir()
    (out / "checkpoints").write_text("notes\n")  # every run clears its checkpoints folder first
    p = run(finetune_cmd(tiny, out, "--max-steps", 2), check=False, cache=tmp_path / "cache")
    assert_user_error(p, f"--out {out}: {out / 'checkpoints'} is a file where the run keeps its checkpoints")
    assert (out / "checkpoints").read_text() == "notes\n" and len(list(out.iterdir())) == 1
    (out / "checkpoints").unlink()
    (out / "tokenizer").mkdir()  # the run writes tokenizer.json and tokenizer_config.json: not in its way
    run(finetune_cmd(tiny, out, "--max-steps", 2), cache=tmp_path / "cache")
    assert (out / "tokenizer").is_dir() and (out / "tokenizer.json").is_file()


def test_a_folder_in_the_way_of_the_cached_base_samples_is_one_line(tiny, tmp_path):
    """The sampled retention documents cannot take their place in the cache: the system's reason in one
    line, without the free-space advice of a full disk, and no temp file left."""
    cache = tmp_path / "cache"
    run(finetune_cmd(tiny, tmp_path / "first", "--max-steps", 1), cache=cache)
    (samples,) = cache.glob("samples/*/retention-n16-len32.txt")
    samples.unlink()
    (samples / "kept.txt").parent.mkdir()
    (samples / "kept.txt").write_text("x")
    out = tmp_path / "o"
    p = run(finetune_cmd(tiny, out, "--max-steps", 1), check=False, cache=cache)
    assert full_disk_line(p) == (
        f"error: cannot write {samples} (Is a directory); {out} has no new adapter; once it can be written, "
        "run the same command"
    )
    assert not [f for f in samples.parent.iterdir() if f.name.startswith(".")]  # no temp file
    assert (samples / "kept.txt").read_text() == "x" and not out.exists()


def test_a_folder_in_the_way_of_a_converted_base_is_one_line(tiny, tmp_path):
    """save_model_folder moves the finished folder into the cache: a folder of another program already there
    (not a model: no config.json) is named with the system's reason, and no temp folder is left."""
    script = (
        "import sys\nfrom pathlib import Path\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "import finetune_llama\nsrc, dest = sys.argv[1:]\n"
        "model, tok = AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src)\n"
        "try:\n    finetune_llama.save_model_folder(model, tok, Path(dest), 'converted')\n"
        "except finetune_llama.WriteFailed as e:\n    sys.exit(str(e))\n"
    )
    dest = tmp_path / "cache" / "base"
    dest.mkdir(parents=True)
    (dest / "notes.txt").write_text("kept\n")
    p = run([sys.executable, "-c", script, tiny["llama_a"], dest], check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == f"cannot write {dest} (Directory not empty)"
    assert list(dest.parent.iterdir()) == [dest] and list(dest.iterdir()) == [dest / "notes.txt"]


# finetune_llama.py run with the signal raised in the third write torch.save makes to optimizer.pt: torch
# writes a name that is not ASCII through a Python file, whose write is where a Ctrl-C's handler then runs
SIGNAL_IN_OPTIMIZER_WRITE = """
import builtins, runpy, signal, sys
import torch.serialization
sig, writes = getattr(signal, sys.argv[1]), []
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal: background jobs (CI) ignore it
class Signalled:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        writes.append(len(data))
        if len(writes) == 3:
            signal.raise_signal(sig)
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)
def open_(name, mode="r", *a, **kw):
    f = builtins.open(name, mode, *a, **kw)
    return Signalled(f) if "w" in mode and str(name).endswith("optimizer.pt") else f
torch.serialization.open = open_
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_while_a_checkpoint_is_written_under_a_non_ascii_out_stops_with_its_line(
    tiny, tmp_path, sig, code
):
    """Ctrl-C or SIGTERM while the trainer's torch.save writes a checkpoint into an --out whose name is not
    ASCII: the interrupt's line and exit code, not torch's RuntimeError ("unexpected pos") taken for a full
    disk (exit 2)."""
    out = tmp_path / "résultats"
    cmd = finetune_cmd(tiny, out, "--max-steps", 6, "--save-steps", 2)
    wrapped = [sys.executable, "-c", SIGNAL_IN_OPTIMIZER_WRITE, sig, *cmd[1:]]
    p = run(wrapped, check=False, cache=tmp_path / "c")
    last = p.stderr.strip().replace("\r", "\n").splitlines()[-1]
    assert p.returncode == code and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert last.startswith("interrupted: ") and "disk full" not in p.stderr, last
    assert not (out / "run.json").exists() and not finetune_llama.complete_checkpoints(out)
