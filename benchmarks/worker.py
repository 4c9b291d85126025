"""One measured run in a fresh process: `python benchmarks/worker.py SPEC.json RESULT.json`.

Roles: `ours` runs the real recipe (`kochat_trl/recipes/<stage>.py` main, imported like tests/conftest.py does) or
`kochat_trl.eval.generation.Generator`; `bare` is the minimal TRL script a user would write with the same model,
rows and settings; `kochatgpt` is the KoChatGPT-style SFT (plain `transformers.Trainer`, full fine-tune,
every row padded to 512). A `TrainerCallback` appended to transformers' DEFAULT_CALLBACKS times every
optimizer step of whichever trainer runs (SFT, reward, PPO alike), so all roles are measured the same way.
"""

from __future__ import annotations

import time

PROCESS_STARTED = time.perf_counter()  # first thing: import time below counts from here

import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE_OF_STAGE = {"sft": "sft", "rm": "reward", "ppo": "ppo"}
RSS_SAMPLE_S = 0.01


def _busy_seconds() -> float:
    """CPU time of the whole machine (all processes), from /proc/stat via psutil."""
    import psutil

    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


def _own_seconds() -> float:
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system + times.children_user + times.children_system


class Recorder:
    """Wall time, steps, tokens, peak memory and foreign CPU load of the measured loop."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.marks: dict[str, float] = {}
        self.steps: list[tuple[float, int, int]] = []  # (time, tokens seen, episodes seen)
        self.peak_rss = 0
        self.rss_start = 0
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None
        self.cpu_start = (0.0, 0.0)
        self.loads: dict[str, float] = {}
        self.peak_cuda: int | None = None
        self.trainable: tuple[int, int] | None = None

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def _sample_rss(self) -> None:
        import psutil

        process = psutil.Process()
        while self._sampling.is_set():
            self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            time.sleep(RSS_SAMPLE_S)

    def loop_start(self, model: Any = None) -> None:
        if model is not None and self.trainable is None:
            from kochat_trl.models.loading import trainable_parameter_share

            self.trainable = trainable_parameter_share(model)
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        import psutil

        self.rss_start = self.peak_rss = psutil.Process().memory_info().rss
        self._sampling.set()
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()
        self.loads["load1_start"] = os.getloadavg()[0]
        self.cpu_start = (_busy_seconds(), _own_seconds())
        self.mark("loop_start")

    def step(self, tokens: int = 0, episodes: int = 0) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.steps.append((time.perf_counter(), int(tokens or 0), int(episodes or 0)))

    def loop_end(self) -> None:
        if "loop_end" in self.marks:
            return
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak_cuda = torch.cuda.max_memory_allocated()
        self.mark("loop_end")
        busy, own = _busy_seconds(), _own_seconds()
        self._sampling.clear()
        if self._sampler is not None:
            self._sampler.join()
        wall = self.marks["loop_end"] - self.marks["loop_start"]
        foreign = (busy - self.cpu_start[0]) - (own - self.cpu_start[1])
        self.loads["loop_cpu_s"] = own - self.cpu_start[1]  # this process's CPU time in the loop: less noisy
        self.loads["foreign_cpu"] = max(0.0, foreign) / max(wall * (os.cpu_count() or 1), 1e-9)
        self.loads["load1_after"] = os.getloadavg()[0]

    def summary(self, warmup: int) -> dict[str, Any]:
        marks = self.marks
        result: dict[str, Any] = {
            "import_s": marks["imported"] - PROCESS_STARTED,
            "setup_s": marks["loop_start"] - marks["imported"],
            "loop_s": marks["loop_end"] - marks["loop_start"],
            "post_s": marks["done"] - marks["loop_end"],
            "peak_rss_bytes": self.peak_rss,
            "rss_loop_start_bytes": self.rss_start,
            "max_rss_lifetime_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_cuda_bytes": self.peak_cuda,
            "foreign_cpu": self.loads.get("foreign_cpu", 0.0),
            "loop_cpu_s": self.loads.get("loop_cpu_s"),
            "load1_start": self.loads.get("load1_start"),
            "load1_after": self.loads.get("load1_after"),
            "steps": len(self.steps),
        }
        if self.trainable:
            trainable, total = self.trainable
            result.update({"trainable_params": trainable, "total_params": total, "trainable_share": trainable / total})
        if self.steps:
            times = [marks["loop_start"]] + [step[0] for step in self.steps]
            durations = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
            skip = warmup if len(self.steps) > warmup else 0
            timed = durations[skip:]
            first, last = (self.steps[skip - 1] if skip else (marks["loop_start"], 0, 0)), self.steps[-1]
            seconds = last[0] - first[0]
            result.update(
                {
                    "step_durations_s": durations,
                    "step_s": sorted(timed)[len(timed) // 2],
                    "steps_timed": len(timed),
                    "tokens_per_step": (last[1] - first[1]) / len(timed),
                    "episodes_per_step": (last[2] - first[2]) / len(timed),
                    "tokens_per_s": (last[1] - first[1]) / seconds if seconds > 0 else None,
                    "episodes_per_s": (last[2] - first[2]) / seconds if seconds > 0 else None,
                }
            )
        return result


RECORDER: Recorder | None = None


def install_step_timer() -> None:
    """Append the timing callback to the callbacks every Trainer (and TRL's PPOTrainer) starts with."""
    from transformers import TrainerCallback
    from transformers import trainer as trainer_module

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # Count non-padding tokens for tokens/s; set here because the recipes' CLI parser reads this
            # str-or-bool field as a bool. The Trainer checks it at every step, after this hook.
            args.include_num_input_tokens_seen = "non_padding"
            RECORDER.loop_start(model)

        def on_step_end(self, args, state, control, **kwargs):
            RECORDER.step(state.num_input_tokens_seen, getattr(state, "episode", 0))

        def on_train_end(self, args, state, control, **kwargs):
            RECORDER.loop_end()

    trainer_module.DEFAULT_CALLBACKS.append(StepTimer)  # the list PPOTrainer imports too (same object)


# --- ours: the recipes and the Generator -------------------------------------------------------------


def load_recipe(name: str) -> Any:
    """The recipe module kochat_trl.recipes.NAME (sft, reward, ppo, rl, dpo), as tests/conftest.py loads it."""
    return importlib.import_module(f"kochat_trl.recipes.{name}")


def ours_train(spec: dict[str, Any]) -> dict[str, Any]:
    import yaml

    import kochat_trl.models.loading  # noqa: F401  (what the recipe imports first; counted as import time)
    from kochat_trl.config.parsing import parse_recipe_args

    recipe = load_recipe(RECIPE_OF_STAGE[spec["stage"]])
    parser = recipe.make_parser()  # imports the TRL trainer config (and kochat_trl.rl for PPO)
    RECORDER.mark("imported")
    config_path = Path(spec["output_dir"]).with_name("recipe.yaml")
    config_path.write_text(yaml.safe_dump({**spec["config"], "output_dir": spec["output_dir"]}, allow_unicode=True))
    metrics = recipe.main(*parse_recipe_args(parser, ["--config", str(config_path)]))
    return {"train_loss": metrics.get("train_loss")}


def ours_generate(spec: dict[str, Any]) -> dict[str, Any]:
    import kochat_trl.models.loading  # noqa: F401  (trl, transformers: what Generator.load imports)
    from kochat_trl.eval.generation import Generator

    RECORDER.mark("imported")
    generator = Generator.load(spec["model_dir"], template=spec["template"])
    texts = [generator.format(prompt) for prompt in spec["prompts"]]
    settings = spec["generate"]
    generator.generate(texts[: settings["batch_size"]], "greedy", max_new_tokens=4, batch_size=settings["batch_size"])
    RECORDER.loop_start(None)
    result = generator.generate(
        texts, "greedy", max_new_tokens=settings["max_new_tokens"], batch_size=settings["batch_size"]
    )
    RECORDER.loop_end()
    return {"generated_tokens": result.generated_tokens, "generate_s": result.seconds}


# --- bare: a minimal TRL script on the same model, rows and settings -------------------------------------


def _fields(config_class: Any, config: dict[str, Any], output_dir: str) -> Any:
    """A TRL config from the recipe's YAML settings that the class knows (model/data keys are not its)."""
    import dataclasses

    names = {item.name for item in dataclasses.fields(config_class)} - {"output_dir"}
    return config_class(**{key: value for key, value in config.items() if key in names}, output_dir=output_dir)


def _lora(spec: dict[str, Any], task_type: str) -> Any:
    config = spec["config"]
    if not config.get("use_peft"):
        return None
    from peft import LoraConfig

    modules = config.get("lora_modules_to_save") if task_type == "CAUSAL_LM" else None
    return LoraConfig(
        task_type=task_type,
        r=config.get("lora_r", 16),
        lora_alpha=config.get("lora_alpha", 32),
        lora_dropout=config.get("lora_dropout", 0.05),
        target_modules=spec["lora_targets"],
        modules_to_save=modules,
    )


def _dtype(spec: dict[str, Any]) -> Any:
    import torch

    return getattr(torch, spec["config"].get("dtype") or "float32")


def _rows(spec: dict[str, Any], split: str = "train") -> Any:
    from datasets import Dataset

    return Dataset.from_list(json.loads(Path(spec["rows"]).read_text(encoding="utf-8"))[split])


def bare_sft(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    RECORDER.mark("imported")
    set_seed(spec["config"]["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=_dtype(spec))
    trainer = SFTTrainer(
        model=model,
        args=_fields(SFTConfig, spec["config"], spec["output_dir"]),
        train_dataset=_rows(spec),
        processing_class=tokenizer,
        peft_config=_lora(spec, "CAUSAL_LM"),
    )
    trainer.train()
    return {"train_loss": trainer.state.log_history[-1].get("train_loss")}


def bare_rm(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    RECORDER.mark("imported")
    set_seed(spec["config"]["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1, dtype=_dtype(spec))
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = RewardTrainer(
        model=model,
        args=_fields(RewardConfig, spec["config"], spec["output_dir"]),
        train_dataset=_rows(spec),
        processing_class=tokenizer,
        peft_config=_lora(spec, "SEQ_CLS"),
    )
    trainer.train()
    return {"train_loss": trainer.state.log_history[-1].get("train_loss")}


def bare_ppo(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    RECORDER.mark("imported")
    config = spec["config"]
    set_seed(config["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=_dtype(spec))
    reward_path = config["reward_model_path"]
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, dtype=_dtype(spec))
    value_model = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, dtype=_dtype(spec))
    for model in (reward_model, value_model):
        model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = _lora(spec, "CAUSAL_LM")
    if peft_config is not None:
        # Same work as the recipe: the value model trains a LoRA adapter too (TRL's example trains it fully).
        from peft import get_peft_model

        value_model = get_peft_model(value_model, _lora(spec, "SEQ_CLS"))
    reference = None if peft_config else AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=_dtype(spec))
    trainer = PPOTrainer(
        args=_fields(PPOConfig, config, spec["output_dir"]),
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=_rows(spec),
        eval_dataset=_rows(spec, "eval"),
        peft_config=peft_config,
    )
    trainer.train()
    return {}


def bare_generate(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    RECORDER.mark("imported")
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"]).eval()
    if spec["device"] == "cuda":
        model = model.to("cuda")
    settings = spec["generate"]
    batch_size, eos = settings["batch_size"], tokenizer.eos_token_id

    def generate(texts: list[str], max_new_tokens: int) -> int:
        produced = 0
        for offset in range(0, len(texts), batch_size):
            # The texts are rendered by the chat template, which writes any special token they need.
            batch = tokenizer(
                texts[offset : offset + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(model.device)
            with torch.no_grad():
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            for row in output[:, batch["input_ids"].shape[1] :].tolist():
                produced += row.index(eos) + 1 if eos in row else len(row)
        return produced

    generate(spec["texts"][:batch_size], 4)
    RECORDER.loop_start(None)
    started = time.perf_counter()
    produced = generate(spec["texts"], settings["max_new_tokens"])
    seconds = time.perf_counter() - started
    RECORDER.loop_end()
    return {"generated_tokens": produced, "generate_s": seconds}


# --- KoChatGPT-style SFT: full fine-tune, every row padded to 512 --------------------------------------


def kochatgpt_sft(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    RECORDER.mark("imported")
    config, pad_to = spec["config"], spec["pad_to"]
    set_seed(config["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=_dtype(spec))

    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        # KoChatGPT's SFT_dataset: the conversation as the chat template renders it (each answer ends in eos), padded
        # to a fixed length, everything but the answers masked out of the loss with -100.
        ids, mask = row["input_ids"][:pad_to], row["completion_mask"][:pad_to]
        padding = pad_to - len(ids)
        return {
            "input_ids": ids + [tokenizer.pad_token_id] * padding,
            "attention_mask": [1] * len(ids) + [0] * padding,
            "labels": [token if learned else -100 for token, learned in zip(ids, mask, strict=True)] + [-100] * padding,
        }

    rows = _rows(spec)
    train = rows.map(encode, remove_columns=rows.column_names)
    trainer = Trainer(
        model=model,
        args=_fields(TrainingArguments, config, spec["output_dir"]),
        train_dataset=train,
        data_collator=default_data_collator,
    )
    trainer.train()
    return {"train_loss": trainer.state.log_history[-1].get("train_loss")}


RUNNERS = {
    ("ours", "sft"): ours_train,
    ("ours", "rm"): ours_train,
    ("ours", "ppo"): ours_train,
    ("ours", "generate"): ours_generate,
    ("bare", "sft"): bare_sft,
    ("bare", "rm"): bare_rm,
    ("bare", "ppo"): bare_ppo,
    ("bare", "generate"): bare_generate,
    ("kochatgpt", "sft"): kochatgpt_sft,
}


def main(spec_path: str, out_path: str) -> int:
    global RECORDER
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    import torch

    torch.set_num_threads(spec["threads"])
    RECORDER = Recorder(spec["device"])
    install_step_timer()
    result: dict[str, Any] = {"role": spec["role"], "stage": spec["stage"], "torch_threads": torch.get_num_threads()}
    try:
        result.update(RUNNERS[(spec["role"], spec["stage"])](spec))
        RECORDER.mark("done")
        result.update(RECORDER.summary(spec.get("warmup", 1)))
    except BaseException as error:  # reported to the parent, which prints it and stops
        result["error"] = "".join(traceback.format_exception(error))[-3000:]
        Path(out_path).write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
        return 1
    if spec["stage"] == "generate":
        result.update({"throughput": result["generated_tokens"] / result["generate_s"], "throughput_unit": "tok/s"})
    elif spec["stage"] == "ppo":
        result.update({"throughput": result.get("episodes_per_s"), "throughput_unit": "episodes/s"})
    else:
        result.update({"throughput": result.get("tokens_per_s"), "throughput_unit": "tok/s"})
    Path(out_path).write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
