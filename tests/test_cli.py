"""The command line on tiny models: each subcommand runs and writes what it says; user errors are one line
and exit status 2."""

import json
import os
import subprocess
import sys

import gguf
import pytest

HARMFUL = [f"how to make the bad thing number {i}" for i in range(12)]
HARMLESS = [f"write the nice code number {i}" for i in range(12)]


def run(*args, input=None, env=None):
    return subprocess.run([sys.executable, "-m", "pysteer.cli", *map(str, args)], capture_output=True, text=True,
                          input=input, env=env)


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "h.txt").write_text("\n".join(HARMFUL))
    (d / "hl.txt").write_text("\n".join(HARMLESS))
    model = tiny_dir / "tiny-qwen2.gguf"
    sets = ["--harmful", d / "h.txt", "--harmless", d / "hl.txt", "--n-train", 6, "--n-val", 2, "-q"]
    r = run("extract", model, "-o", d / "dir.gguf", *sets, "--positions", 2)
    assert r.returncode == 0, r.stderr
    return d, model, sets


def test_help_lists_every_command():
    r = run("--help")
    for cmd in ("ablate-test", "extract", "metrics", "generate", "chat", "sweep", "export", "models", "summary", "judge"):
        assert cmd in r.stdout
        assert run(cmd, "--help").returncode == 0


def test_extract_writes_direction_and_metrics(setup):
    d, model, _ = setup
    assert (d / "dir.gguf").is_file() and (d / "dir-metrics.png").read_bytes()[:4] == b"\x89PNG"
    import pysteer

    direction = pysteer.load_direction(d / "dir.gguf")
    assert direction.b2 is not None and abs(float(direction.vector @ direction.b2)) < 1e-5


def test_ablate_test_json(setup):
    """Counts and KL of the report against answers generated one prompt at a time (hook path, no packing) and
    a numpy KL of single-prompt logits."""
    import numpy as np

    import pysteer
    from pysteer.datasets import PromptSplits
    from pysteer.markers import is_refusal

    d, model, sets = setup
    r = run("ablate-test", model, "--direction", d / "dir.gguf", *sets, "--n", 3, "--max-tokens", 6, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    harmful, harmless = PromptSplits.load(str(d / "h.txt"), str(d / "hl.txt"), n_train=6, n_val=2, n_test=3).test
    direction = pysteer.load_direction(d / "dir.gguf")
    with pysteer.load(model, n_ctx=4096) as m:
        def answers(prompts):
            return [m.generate(p, max_tokens=6) for p in prompts]

        base_h, base_hl = answers(harmful), answers(harmless)
        p = np.stack([m.logits(x) for x in harmless]).astype(np.float64)
        with m.steer(pysteer.Ablate(direction.vector), path="hook"):
            ab_h, ab_hl = answers(harmful), answers(harmless)
            q = np.stack([m.logits(x) for x in harmless]).astype(np.float64)
    lp = p - np.log(np.exp(p - p.max(-1, keepdims=True)).sum(-1, keepdims=True)) - p.max(-1, keepdims=True)
    lq = q - np.log(np.exp(q - q.max(-1, keepdims=True)).sum(-1, keepdims=True)) - q.max(-1, keepdims=True)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    assert kl > 1e-3  # the check below would not tell a KL of 0 from a right one otherwise
    assert s["harmless"]["first_token_kl"] == pytest.approx(kl, rel=0.02)
    refused = lambda xs: sum(map(is_refusal, xs))  # noqa: E731
    assert s["harmful"]["base"]["n"] == 3 and s["harmless"]["steered"]["n"] == 3
    assert s["harmful"]["base"]["refused"] == refused(base_h) and s["harmful"]["steered"]["refused"] == refused(ab_h)
    assert s["harmless"]["base"]["refused"] == refused(base_hl)
    assert s["harmless"]["steered"]["refused"] == refused(ab_hl)
    base_refused = [i for i, a in enumerate(base_h) if is_refusal(a)]
    assert s["harmful"]["base_refused"] == len(base_refused)
    assert s["harmful"]["still_refused_after_steering"] == sum(is_refusal(ab_h[i]) for i in base_refused)
    assert s["seconds"]["total"] > 0
    per_prompt = [a["first_token_kl"] for a in s["answers"]["harmless"]]
    assert np.mean(per_prompt) == pytest.approx(s["harmless"]["first_token_kl"])
    assert [a["steered"] for a in s["answers"]["harmful"]] == ab_h  # each answer and its verdicts
    assert [a["steered_refused"] for a in s["answers"]["harmful"]] == [is_refusal(a) for a in ab_h]
    dmg = s["harmless"]["damage"]
    assert dmg["tokens"] > 0 and dmg["token_kl"]["max"] >= dmg["token_kl"]["median"] >= 0
    assert s["harmful"]["base"]["refusal_rate_ci95"][0] <= s["harmful"]["base"]["refusal_rate"]
    r = run("ablate-test", model, "--direction", d / "dir.gguf", *sets, "--n", 2, "--max-tokens", 6,
            "--layers", "1:3")
    assert r.returncode == 0 and "ablated on [1, 2] layers" in r.stdout and "| base answer" in r.stdout
    assert "a phrase matcher's count is a lower bound" in r.stdout  # said where a matcher counted
    # with the model as its own judge: the judge's verdicts count, heretic's markers are shown beside
    r = run("ablate-test", model, "--direction", d / "dir.gguf", *sets, "--n", 3, "--max-tokens", 6, "--json",
            "--judge", "self", "--markers", "heretic")
    assert r.returncode == 0, r.stderr
    sj = json.loads(r.stdout)
    rows = sj["answers"]["harmful"] + sj["answers"]["harmless"]
    assert [a["steered"] for a in sj["answers"]["harmful"]] == ab_h
    assert all(a["steered_refused"] == (a["steered_judge_p"] >= 0.5) for a in rows)
    assert all(a["base_refused"] == (a["base_judge_p"] >= 0.5) for a in rows)
    assert [a["steered_matched"] for a in sj["answers"]["harmful"]] == [is_refusal(a, "heretic") for a in ab_h]
    st = sj["harmful"]["steered"]
    assert st["refused_by"] == "judge" and st["refused"] == sum(a["steered_refused"] for a in sj["answers"]["harmful"])
    assert st["disagreements"] == sum(a["steered_refused"] != a["steered_matched"] for a in sj["answers"]["harmful"])
    assert "load_judge" not in sj["seconds"] or sj["seconds"]["load_judge"] >= 0
    r = run("ablate-test", model, "--direction", d / "dir.gguf", *sets, "--n", 2, "--max-tokens", 6,
            "--judge", "self")
    assert r.returncode == 0 and "phrase matcher (pysteer) and judge disagree on" in r.stdout
    assert "refusals by judge (phrase matcher:" in r.stdout
    assert "a phrase matcher's count is a lower bound" not in r.stdout


def test_generate_chat_sweep_export_metrics(setup):
    d, model, sets = setup
    r = run("generate", "hello there", "--model", model, "--ablate", d / "dir.gguf", "--max-tokens", 5, "-q")
    assert r.returncode == 0, r.stderr
    r = run("chat", model, "--rotate", f"{d / 'dir.gguf'}:90", "--max-tokens", 4, "-q", input="hi\nmore\n\n")
    assert r.returncode == 0 and r.stdout.count("> ") == 3
    r = run("sweep", model, "--rotate", d / "dir.gguf", "--degrees", "0:180:90", *sets, "--n", 2,
            "--max-tokens", 4, "-o", d / "sweep.png")
    assert r.returncode == 0, r.stderr
    assert "| degrees | refusal rate" in r.stdout and r.stdout.count("\n| ") == 2  # 0 and 90: stop excluded
    assert (d / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    r = run("export", model, "--direction", d / "dir.gguf", "--cvec", d / "cv.gguf", "--alpha", 2, "--layers", "1:4",
            "--abliterate", d / "abl.gguf", "-q")
    assert r.returncode == 0, r.stderr
    assert (d / "cv.gguf").is_file() and (d / "abl.gguf").is_file()
    r = run("export", model, "--direction", d / "dir.gguf", "--abliterate", d / "abl8.gguf",
            "--abliterate-type", "q8_0", "-q")
    assert r.returncode == 0, r.stderr
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(d / "abl8.gguf").tensors}
    assert types["blk.1.ffn_down.weight"] == "Q8_0" and types["blk.1.ffn_up.weight"] == "F32"
    info = gguf.GGUFReader(d / "abl8.gguf").get_field("pysteer.abliterated_layer")
    assert info is not None  # the metadata names the direction
    r = run("metrics", model, *sets, "-o", d / "m.png")
    assert r.returncode == 0 and (d / "m.png").is_file()


@pytest.mark.parametrize("args, match", [
    (("ablate-test", "/no/such.gguf"), "no model file"),
    (("generate", "hi", "--model", "MODEL", "--ablate", "DIR", "--layers", "9:x"), "bad layer spec"),
    (("generate", "hi", "--model", "MODEL", "--ablate", "DIR", "--layers", "50"), "the model has layers 0..3"),
    (("generate", "hi", "--model", "OTHER", "--ablate", "DIR"), "does not fit"),
    (("export", "MODEL", "--direction", "DIR", "--cvec", "OUT", "--layers", "0:2"), "no control vector for layer 0"),
    (("sweep", "MODEL", "--add", "DIR", "--alpha", "1:2:0"), "bad --alpha"),
    (("generate", "hi", "--model", "MODEL", "--layers", "1:3"), "--layers applies to"),
    (("export", "MODEL", "--direction", "DIR", "--cvec", "out.txt"), "must name a .gguf"),
    (("extract", "MODEL", "-o", "out.txt"), "must name a .gguf"),
    (("export", "MODEL", "--direction", "DIR", "--abliterate", "OUT", "--abliterate-type", "IQ2_XS"),
     "needs an importance matrix"),
    (("ablate-test", "MODEL", "--direction", "DIR", "--save", "OUT"), "only when the direction is extracted"),
])
def test_user_errors_are_one_line(setup, tiny_dir, args, match):
    d, model, _ = setup
    subst = {"MODEL": model, "OTHER": tiny_dir / "tiny-gemma3.gguf", "DIR": d / "dir.gguf", "OUT": d / "x.gguf"}
    r = run(*[subst.get(a, a) for a in args])
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1 and match in r.stderr
    assert not (d / "x.gguf").exists()


def test_split_sizes_are_named_by_their_flags(setup, tmp_path):
    """Too few prompts for a split the command reads, or a size flag out of range: the flag or file named, not
    an internal parameter ("prompts is empty", "n_test must be...", "need at least 2 validation prompts")."""
    d, model, sets = setup
    (tmp_path / "h3.txt").write_text("\n".join(HARMFUL[:3]))
    (tmp_path / "hl3.txt").write_text("\n".join(HARMLESS[:3]))
    few = ["--harmful", tmp_path / "h3.txt", "--harmless", tmp_path / "hl3.txt", "-q"]
    for args, match in (
            (["ablate-test", model, *few, "--edit", d / "none.json"],
             f"--harmful '{tmp_path / 'h3.txt'}' gives 0 test prompts, and this command needs at least 1: give a set "
             "with more distinct prompts (the test split takes 20% of them)"),
            (["ablate-test", model, *sets, "--n-val", 1, "--n", 2],
             "gives 1 val prompts, and this command needs at least 2: give --n-val 2 or more"),
            (["sweep", model, "--add", d / "dir.gguf", *sets, "--n", 0], "--n must be a positive int, not 0"),
            (["optimize", model, *sets, "--n-val-harmless", -1, "--study", tmp_path / "s.db"],
             "--n-val-harmless must be a positive int, not -1")):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and match in r.stderr, (args, r.stderr)


def test_ablate_test_with_the_probe_judge(setup, tmp_path, monkeypatch, capsys):
    """`ablate-test --judge self --probe-layer 1`: the probe's p(refusal) of each answer counts (p >= 0.3)."""
    import pysteer
    from pysteer import probe_judge
    from pysteer.cli import main
    from pysteer.llm_judge import Judge

    rows = [{"prompt": f"request {i}", "answer": a, "refusal": r} for i, (a, r) in enumerate(
        [("I can't help with that.", True), ("Sorry, I won't.", True), ("Sure: step one, open it.", False),
         ("Here it is: 42.", False)])]
    monkeypatch.setattr(probe_judge, "shipped_rows", lambda: rows)  # the 571 take minutes on a tiny model
    monkeypatch.setattr(probe_judge, "cache_root", lambda: tmp_path)
    d, model, sets = setup
    assert main(["ablate-test", str(model), "--direction", str(d / "dir.gguf"), *map(str, sets), "--n", "3",
                 "--max-tokens", "6", "--json", "--judge", "self", "--probe-layer", "1"]) == 0
    sj = json.loads(capsys.readouterr().out)
    harmful = sj["answers"]["harmful"]
    with pysteer.load(model) as m:
        pj = probe_judge.ProbeJudge(Judge(m), layer=1)  # the command's fit, from the cache
        want = pj.probabilities([a["prompt"] for a in harmful], [a["steered"] for a in harmful])
    assert [a["steered_judge_p"] for a in harmful] == pytest.approx(want, abs=1e-9)
    assert all(a["steered_refused"] == (a["steered_judge_p"] >= 0.3) for a in harmful + sj["answers"]["harmless"])
    assert sj["harmful"]["steered"]["refused_by"] == "judge"


def test_judge_command(tmp_path):
    """`pysteer judge` adds the phrase matcher's verdict to any answers, keeping every other field."""
    from pysteer.markers import is_refusal
    from pysteer.probe_judge import DATA

    labelled = [json.loads(line) for line in (DATA / "labelled_answers.jsonl").read_text().splitlines()][:40]
    labelled = [{k: v for k, v in e.items() if k not in ("refusal", "coherent")} for e in labelled]
    src = tmp_path / "answers.jsonl"
    src.write_text("\n".join(json.dumps(e) for e in labelled) + "\n\n")
    r = run("judge", src, "-o", tmp_path / "out.jsonl")
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["refusal"] for o in out] == [is_refusal(e["answer"]) for e in labelled]
    assert all({k: v for k, v in o.items() if k != "refusal"} == e for o, e in zip(out, labelled))
    assert f"{sum(o['refusal'] for o in out)} of 40 answers are refusals" in r.stderr
    r = run("judge", src)  # to standard output
    assert [json.loads(line)["refusal"] for line in r.stdout.splitlines()] == [o["refusal"] for o in out]
    for bad, match in (('{"prompt": "p"}', "needs string fields"), ("not json", "not JSON"),
                       ('{"prompt": 1, "answer": "a"}', "needs string fields")):
        src.write_text('{"prompt": "p", "answer": "a"}\n' + bad + "\n")
        r = run("judge", src, "-o", tmp_path / "bad.jsonl")
        assert r.returncode == 2 and match in r.stderr and ":2:" in r.stderr and len(r.stderr.splitlines()) == 1
        assert not (tmp_path / "bad.jsonl").exists()
    r = run("judge", src, "-o", src)
    assert r.returncode == 2 and "a file this command reads" in r.stderr


def test_no_command_writes_over_a_file_it_reads(setup, tmp_path):
    """extract -o (and its -metrics.png), metrics -o, ablate-test --save and sweep -o replaced the model they
    were loading; now each is refused before any work and every file stays as it was."""
    d, model, sets = setup
    own = tmp_path / "m.gguf"
    own.write_bytes(model.read_bytes())
    (tmp_path / "m2-metrics.png").write_bytes(model.read_bytes())  # a model whose name extract derives
    before = {p: p.read_bytes() for p in (own, tmp_path / "m2-metrics.png", d / "dir.gguf", d / "h.txt",
                                          d / "hl.txt")}
    home = dict(os.environ, HOME=str(d))  # "~/h.txt" is read from $HOME
    tilde = ["--harmful", "~/h.txt", *sets[2:]]
    for args in (("extract", own, "-o", own, *sets),
                 ("metrics", own, "-o", d / "hl.txt", *sets),
                 ("metrics", own, "-o", d / "h.txt", *tilde),
                 ("ablate-test", model, "--judge", own, "--save", own, *sets, "--n", 2),
                 ("sweep", own, "--rotate", d / "dir.gguf", "--degrees", "0,90", "-o", d / "dir.gguf", *sets),
                 ("extract", tmp_path / "m2-metrics.png", "-o", tmp_path / "m2.gguf", *sets),
                 ("metrics", own, "-o", own, *sets),
                 ("metrics", own, "-o", d / "h.txt", *sets),
                 ("ablate-test", own, "--save", own, *sets, "--n", 2, "--max-tokens", 2),
                 ("sweep", own, "--add", d / "dir.gguf", "--alpha", "0,1", "-o", own, *sets),
                 ("sweep", own, "--add", d / "dir.gguf", "--alpha", "0,1", "-o", d / "dir.gguf", *sets)):
        r = run(*args, env=home)
        assert r.returncode == 2 and "is a file this command reads" in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(p.read_bytes() == b for p, b in before.items()) and not (tmp_path / "m2.gguf").exists()
    r = run("metrics", own, "-o", tmp_path / "new" / "m.png", *sets)  # a missing folder is made, as extract's
    assert r.returncode == 0 and (tmp_path / "new" / "m.png").read_bytes()[:4] == b"\x89PNG", r.stderr


@pytest.mark.parametrize("flag", [("--layers", "1:3"), ("--alpha", "5")])
def test_export_abliterate_refuses_the_control_vector_flags(setup, flag):
    """--abliterate edits every layer with weight 1: it silently ignored --layers and --alpha."""
    d, model, _ = setup
    r = run("export", model, "--direction", d / "dir.gguf", "--abliterate", d / "ab-flags.gguf", *flag, "-q")
    assert r.returncode == 2 and "shape the control vector (--cvec)" in r.stderr, r.stderr
    assert not (d / "ab-flags.gguf").exists()


def test_chat_fits_the_context_by_dropping_the_oldest_exchanges(setup, capsys):
    """The new message alone too long: taken back, the chat kept. Otherwise the oldest exchanges go first."""
    import pysteer
    from pysteer.cli import _fit

    _, model, _ = setup
    ask = lambda i: {"role": "user", "content": f"tell me about the river number {i}"}  # noqa: E731
    with pysteer.load(model, n_ctx=128) as m:
        chat = [ask(1), {"role": "assistant", "content": "abcd efgh"}, ask(2)]
        assert len(m.encode(chat)) + 4 <= 128 and _fit(m, chat, 4) and len(chat) == 3
        chat += [{"role": "assistant", "content": "ijkl"}, {"role": "user", "content": "word " * 200}]
        assert not _fit(m, chat, 4) and chat[-1] == {"role": "assistant", "content": "ijkl"} and len(chat) == 4
        assert "exceed --n-ctx 128" in capsys.readouterr().err
        chat.append(ask(3))
        assert _fit(m, chat, 4) and chat[0] == ask(2) and len(m.encode(chat)) + 4 <= 128
        assert "the 1 oldest exchange(s) dropped" in capsys.readouterr().err


def test_chat_drops_the_oldest_exchanges_to_fit_the_context(setup):
    """A long chat ended the program (exit 2, the conversation lost) once it outgrew --n-ctx."""
    _, model, _ = setup
    lines = [f"tell me about the river number {i}" for i in ("one", "two", "three")] + ["word " * 200, "last", ""]
    r = run("chat", model, "--n-ctx", 128, "--max-tokens", 4, "-q", input="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == 6  # every line read, the empty one ends it
    assert "oldest exchange(s) dropped to fit --n-ctx 128" in r.stderr
    assert "exceed --n-ctx 128; shorten it or raise --n-ctx" in r.stderr


def test_judge_reads_back_its_own_output(tmp_path):
    """`judge -o` writes U+2028 and U+0085 raw (ensure_ascii=False), and reading split lines there: its own output
    was "not JSON"."""
    src = tmp_path / "answers.jsonl"
    src.write_text(json.dumps({"prompt": "p", "answer": "Sure:\u2028step 1\x85step 2"}) + "\n")
    r = run("judge", src, "-o", tmp_path / "once.jsonl")
    assert r.returncode == 0, r.stderr
    r = run("judge", tmp_path / "once.jsonl", "-o", tmp_path / "twice.jsonl")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "twice.jsonl").read_text(encoding="utf-8"))["answer"] == "Sure:\u2028step 1\x85step 2"


@pytest.mark.parametrize("ty, match", [("Q9_9", "unknown tensor type 'Q9_9'"), ("IQ2_XXS", "needs an importance matrix")])
def test_export_checks_the_abliteration_before_writing_the_control_vector(setup, tmp_path, ty, match):
    """`export --cvec A --abliterate B --abliterate-type BAD` replaced A, then failed on the type."""
    d, model, _ = setup
    (tmp_path / "keep.gguf").write_bytes(b"PRECIOUS")
    r = run("export", model, "--direction", d / "dir.gguf", "--cvec", tmp_path / "keep.gguf", "--abliterate",
            tmp_path / "abl.gguf", "--abliterate-type", ty, "-q")
    assert r.returncode == 2 and match in r.stderr and len(r.stderr.splitlines()) == 1
    assert (tmp_path / "keep.gguf").read_bytes() == b"PRECIOUS" and not (tmp_path / "abl.gguf").exists()


def test_a_failed_extract_keeps_the_direction_and_its_plot_together(setup, tmp_path, monkeypatch):
    """The metrics plot is drawn before the direction is chosen: a run that failed there replaced OUT-metrics.png
    and kept the old OUT.gguf."""
    from pysteer import jobs
    from pysteer.cli import main

    def fail(*args, **kwargs):
        raise ValueError("no direction today")

    _, model, sets = setup
    old = {"dir.gguf": b"the old direction", "dir-metrics.png": b"its plot"}
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.setattr(jobs, "select_direction", fail)  # fails after the plot, as a selection error would
    assert main(["extract", str(model), *map(str, sets), "--positions", "1", "-o", str(tmp_path / "dir.gguf")]) == 2
    assert {name: (tmp_path / name).read_bytes() for name in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir-metrics.png", "dir.gguf"]  # no scratch folder


def test_an_output_under_a_file_is_refused_by_name(setup, tmp_path):
    """It gave a bare "[Errno 17] File exists"."""
    d, model, _ = setup
    (tmp_path / "afile").write_text("")
    r = run("export", model, "--direction", d / "dir.gguf", "--cvec", tmp_path / "afile" / "c.gguf", "-q")
    assert r.returncode == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in r.stderr


def test_a_failed_command_leaves_no_folder_it_made(setup, tmp_path):
    """The folders made for an output stayed when the command failed."""
    d, model, _ = setup
    r = run("export", model, "--direction", tmp_path / "nope.gguf", "--cvec", tmp_path / "new" / "deep" / "c.gguf")
    assert r.returncode == 2 and "no control-vector file" in r.stderr
    assert not (tmp_path / "new").exists()
    r = run("export", model, "--direction", d / "dir.gguf", "--cvec", tmp_path / "new" / "deep" / "c.gguf", "-q")
    assert r.returncode == 0 and (tmp_path / "new" / "deep" / "c.gguf").is_file()
