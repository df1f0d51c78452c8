"""The heretic half of benchmarks/heretic_side_by_side.py, run in heretic's own environment (torch, transformers,
heretic-llm 1.4.0; no pysteer). heretic is imported, never copied.

    python heretic_side.py convert MODEL.gguf HF_DIR          # transformers dequantizes the GGUF (float32)
    python heretic_side.py prompts PROMPTS.json DIR            # one datasets folder per prompt list, column "text"
    python heretic_side.py trials STUDY.jsonl OUT.json         # heretic's finished trials, as plain JSON
    python heretic_side.py heldout WORKDIR TRIAL.json TEST.json OUT.json --max-tokens 128
"""

from __future__ import annotations

import json
import os
import sys
import time


def convert(gguf: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    # the weights are plain float32 now; transformers refuses to save a model it still marks GGUF-quantized
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def prompts(spec: str, out: str) -> None:
    from datasets import Dataset

    for name, texts in json.load(open(spec)).items():
        Dataset.from_dict({"text": texts}).save_to_disk(os.path.join(out, name))


def trials(study: str, out: str) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    storage = JournalStorage(JournalFileBackend(study, lock_obj=JournalFileOpenLock(study)))
    s = optuna.load_study(study_name="heretic", storage=storage)
    rows = [{"number": t.number, "params": t.params, **{k: t.user_attrs[k] for k in
             ("direction_index", "parameters", "kl_divergence", "refusals", "base_refusals", "n_bad_prompts")},
             "seconds": (t.datetime_complete - t.datetime_start).total_seconds()}
            for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE]
    prefix = json.loads(s.user_attrs["settings"]).get("response_prefix") or ""
    json.dump({"response_prefix": prefix, "trials": rows}, open(out, "w"), indent=1)


def heldout(workdir: str, trial: str, test: str, out: str, max_tokens: int) -> None:
    """The chosen trial's model, rebuilt the way heretic builds it, answers the held-out prompts."""
    import torch
    import torch.nn.functional as F
    from heretic.config import Settings
    from heretic.model import AbliterationParameters, Model
    from heretic.utils import Prompt, load_prompts

    os.chdir(workdir)
    sys.argv = ["heretic"]  # Settings parses the command line; config.toml in workdir holds the settings
    settings = Settings()
    t = json.load(open(trial))
    settings.response_prefix = t.get("response_prefix") or ""
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = Model(settings)
    # heretic's run(): per-layer directions from the train means, then its projection (orthogonalize_direction)
    good = model.get_residuals_mean(load_prompts(settings, settings.good_prompts))
    bad = model.get_residuals_mean(load_prompts(settings, settings.bad_prompts))
    dirs = F.normalize(bad - good, p=2, dim=1)
    if settings.orthogonalize_direction:
        g = F.normalize(good, p=2, dim=1)
        dirs = F.normalize(dirs - (dirs * g).sum(1, keepdim=True) * g, p=2, dim=1)
    harmful, harmless = json.load(open(test))
    system = settings.system_prompt
    hl = [Prompt(system=system, user=u) for u in harmless]
    hf = [Prompt(system=system, user=u) for u in harmful]
    base_lp = model.get_logprobs_batched(hl)
    settings.max_response_length = max_tokens
    base_answers = model.get_responses_batched(hf, skip_special_tokens=True)
    model.reset_model()
    model.abliterate(dirs, t["direction_index"],
                     {k: AbliterationParameters(**v) for k, v in t["parameters"].items()})
    lp = model.get_logprobs_batched(hl)
    answers = model.get_responses_batched(hf, skip_special_tokens=True)
    kl = (base_lp.exp() * (base_lp - lp)).sum(-1)  # KL(base || edited) per prompt, as heretic's batchmean
    json.dump({"answers": answers, "base_answers": base_answers, "kl": kl.tolist(),
               "seconds": round(time.perf_counter() - t0, 1)}, open(out, "w"), indent=1)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "heldout":
        heldout(*args[:4], max_tokens=int(args[args.index("--max-tokens") + 1]) if "--max-tokens" in args else 128)
    else:
        {"convert": convert, "prompts": prompts, "trials": trials}[cmd](*args)
