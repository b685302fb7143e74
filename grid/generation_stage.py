"""The second protocol inside a trial: generation + LLM judge, general abilities and fluency at each checkpoint.

Beside the teacher-forced ``edit/*`` metrics, on the same model at the same checkpoints (with SCR: on the prompts
SCR builds; with PRUNE-once: on the restrained weights):

  judge/*, gen/*            ``eval.generate`` + ``eval.judge``  (evals/autoregressive.py, evals/judge.py)
  general/<task>[/...]      ``eval.general``, at ``eval.general.steps`` (evals/general.py)
  gen/fluency               ``eval.fluency`` (evals/fluency.py)
  lm_eval/<task>/<metric>   ``eval.lm_eval``, at ``eval.lm_eval.steps`` (evals/lm_eval_bridge.py)
  cost/judge_*              judgments per second of the backend, share answered from the judgment cache

Tables per checkpoint: ``tables/generations/step_<n>.json`` (prompt, generation, gold, contains, verdict, judge
reply) and ``tables/general/step_<n>.json``. The unedited model's answers are computed once per (model, records,
generation settings, backend) and shared through the cache (evals/pre_edit.py); ``eval.generate.unedited_answers``
may generate them on vLLM (offline engine or endpoint), checked first against the in-process model
(``gen/unedited_backend_agreement`` at step 0, the probe in ``tables/generations/unedited_backend_probe.json``).
The check runs only when the answers are generated; it is cached with them, and trials that read the answers
from the cache log the check those answers passed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from evals.answer_backends import AnswerBackend, OpenAICompletionsAnswers, VllmAnswers
from evals.autoregressive import (GenerationSettings, agreement_with_in_process, answer_queries, evaluate_generation,
                                  generate_answers)
from evals.fluency import mean_fluency
from evals.general import evaluate_general, load_task
from evals.judge import Judge, JudgmentCache, LogitJudge, OpenAIJudge, TransformersJudge, VllmJudge
from grid.config import judge_model_name, judge_verdict
from evals.lm_eval_bridge import run_lm_eval
from evals.metric_names import COST_JUDGE_CACHED_SHARE, COST_JUDGE_JUDGMENTS_PER_SECOND, gen_metric
from evals.pre_edit import pre_edit_answers
from evals.records import EditRecord

logger = logging.getLogger(__name__)


ENDPOINT_SETTINGS = ("api_key_env", "requests_per_second", "max_retries", "timeout_s", "concurrency")


def endpoint_settings(section: dict) -> dict:
    """The OpenAI-endpoint keyword arguments of a config section (``eval.judge``, ``eval.generate.unedited_answers``;
    validated alike in grid/config.py)."""
    return {key: section[key] for key in ENDPOINT_SETTINGS}


def build_judge(judge_cfg: dict, trial_model: str, model_args: dict, cache_dir: Path) -> Judge:
    """The judge of ``eval.judge`` with the shared judgment cache."""
    backend_name = judge_cfg["backend"]
    if backend_name == "openai":
        backend = OpenAIJudge(judge_cfg["base_url"], judge_cfg["model"],
                              constrained_choice=judge_cfg["constrained_choice"], **endpoint_settings(judge_cfg))
    elif backend_name == "vllm":
        backend = VllmJudge(judge_cfg["model"], chat_template=judge_cfg["chat_template"])
    else:
        from methods.infra.models import load_model

        name = judge_model_name(judge_cfg, trial_model)
        loaded = load_model(name, dtype=model_args["dtype"], device=model_args["device"], cache_dir=cache_dir,
                            linear_backend=model_args["linear_backend"])
        identity = f"hf:{name}@{loaded.fingerprint}"
        if judge_verdict(judge_cfg) == "logit":
            backend = LogitJudge(loaded.model, loaded.tokenizer, name=identity, chat_template=judge_cfg["chat_template"],
                                 few_shot=judge_cfg["few_shot"], batch_size=judge_cfg["batch_size"])
        else:
            backend = TransformersJudge(loaded.model, loaded.tokenizer, name=identity,
                                        chat_template=judge_cfg["chat_template"], batch_size=judge_cfg["batch_size"])
    return Judge(backend, JudgmentCache.in_folder(cache_dir), batch_size=judge_cfg["batch_size"])


class UneditedBackendMismatch(RuntimeError):
    """The backend chosen for the unedited model's answers does not answer like the trial's unedited model."""


def build_unedited_backend(section: dict, trial_model: str, model_args: dict, cache_dir: Path) -> AnswerBackend | None:
    """The backend of ``eval.generate.unedited_answers`` (None = in process)."""
    if section["backend"] == "openai":
        return OpenAICompletionsAnswers(section["base_url"], section["model"], **endpoint_settings(section))
    if section["backend"] == "vllm":
        from methods.infra.models import model_folder

        folder = section["model"] or model_folder(trial_model, cache_dir=cache_dir)
        dtype = model_args["dtype"] if model_args["dtype"] in ("float32", "float16", "bfloat16") else "auto"
        return VllmAnswers(folder, dtype=dtype)
    return None


class GenerationStage:
    def __init__(self, eval_cfg: dict, model, tokenizer, records: list[EditRecord], model_key: str,
                 trial_model: str, model_args: dict, cache_dir: Path, progress: bool = False):
        self.model, self.tokenizer, self.records, self.progress = model, tokenizer, records, progress
        gen = eval_cfg["generate"]
        self.settings = GenerationSettings(max_new_tokens=gen["max_new_tokens"], chat_template=gen["chat_template"],
                                           reasoning=gen["reasoning"],
                                           reasoning_max_new_tokens=gen["reasoning_max_new_tokens"])
        self.batch_size = gen["batch_size"]
        self.judge = build_judge(eval_cfg["judge"], trial_model, model_args, cache_dir) if gen["enabled"] else None
        general = eval_cfg["general"]
        self.general_items = ({task: load_task(general["path"], task, general["n_items"]) for task in general["tasks"]}
                              if general["enabled"] else {})
        self.general_steps = general["steps"]
        self.general_generate = general["generate"]
        self.fluency = eval_cfg["fluency"]
        self.lm_eval = eval_cfg["lm_eval"]
        self.pre_answers: dict[str, str] | None = None
        self.step0_metrics: dict[str, float] = {}
        self.step0_tables: dict[str, list] = {}
        if self.judge is not None:
            section = gen["unedited_answers"]
            backend = build_unedited_backend(section, trial_model, model_args, cache_dir)
            check = (None if backend is None else
                     lambda: self._check_unedited_backend(backend, section["verify_prompts"], section["min_agreement"]))
            pre = pre_edit_answers(
                model, tokenizer, records, self.settings, model_key, self.batch_size, cache_dir,
                progress=f"unedited model: answering {len(records)} edits' prompts" if progress else None,
                backend=backend, check_backend=check)
            self.pre_answers = pre.answers
            if pre.backend_check is not None:  # checked now, or when the cached answers were generated
                self.step0_metrics[gen_metric("unedited_backend_agreement")] = pre.backend_check["share"]
                self.step0_tables["tables/generations/unedited_backend_probe.json"] = pre.backend_check["rows"]
            logger.info("pre-edit answers %s", "from the cache" if pre.from_cache else
                        f"generated by {backend.name if backend else 'the in-process model'}")

    def _check_unedited_backend(self, backend: AnswerBackend, verify_prompts: int, min_agreement: float) -> dict:
        """Stop before a backend serving other weights becomes the unedited reference (see answer_backends.py)."""
        prompts = list(dict.fromkeys(q.prompt for q in answer_queries(self.records)))[:verify_prompts]
        agreement = agreement_with_in_process(backend, self.model, self.tokenizer, prompts, self.settings,
                                              self.batch_size)
        logger.info("unedited answers from %s: %d of %d probe answers equal the in-process model's", backend.name,
                    sum(r["same"] for r in agreement.rows), len(agreement.rows))
        if agreement.share < min_agreement:
            differing = next(r for r in agreement.rows if not r["same"])
            raise UneditedBackendMismatch(
                f"eval.generate.unedited_answers: {backend.name} answered {agreement.share:.0%} of "
                f"{len(agreement.rows)} probe prompts like the trial's unedited model (min_agreement "
                f"{min_agreement}); it serves other weights. E.g. {differing['prompt']!r}: in process "
                f"{differing['in_process']!r}, backend {differing['backend']!r}")
        return {"share": agreement.share, "rows": agreement.rows}

    @property
    def active(self) -> bool:
        return (self.judge is not None or bool(self.general_items) or self.fluency["enabled"]
                or self.lm_eval["enabled"])

    def evaluate(self, step: int, subset: list[EditRecord],
                 prompt_builder: Callable[[list[str]], list[str]] | None) -> tuple[dict[str, float], dict[str, list]]:
        """Metrics after ``step`` edits and the tables to log (artifact path → rows)."""
        metrics: dict[str, float] = dict(self.step0_metrics) if step == 0 else {}
        tables: dict[str, list] = dict(self.step0_tables) if step == 0 else {}
        if self.judge is not None:
            asked, seconds, cached = self.judge.stats.asked, self.judge.stats.seconds, self.judge.stats.cached
            result = evaluate_generation(self.model, self.tokenizer, subset, self.judge, self.settings,
                                         pre_edit_answers=self.pre_answers, batch_size=self.batch_size,
                                         prompt_builder=prompt_builder,
                                         answers=self.pre_answers if step == 0 else None, progress=self.progress)
            metrics.update(result.metrics)
            fresh = self.judge.stats.asked - asked
            judged = fresh + self.judge.stats.cached - cached
            if fresh:
                metrics[COST_JUDGE_JUDGMENTS_PER_SECOND] = fresh / (self.judge.stats.seconds - seconds)
            if judged:
                metrics[COST_JUDGE_CACHED_SHARE] = (self.judge.stats.cached - cached) / judged
            tables[f"tables/generations/step_{step:06d}.json"] = result.rows
        if self.general_items and (self.general_steps is None or step in self.general_steps):
            general = evaluate_general(self.model, self.tokenizer, self.general_items, batch_size=self.batch_size,
                                       generate=self.general_generate, progress=self.progress)
            metrics.update(general.metrics)
            tables[f"tables/general/step_{step:06d}.json"] = general.rows
        if self.fluency["enabled"]:
            metrics[gen_metric("fluency")] = self._fluency(subset)
        harness = self.lm_eval
        if harness["enabled"] and (harness["steps"] is None or step in harness["steps"]):
            harness_metrics, results = run_lm_eval(self.model, self.tokenizer, harness["tasks"], limit=harness["limit"],
                                                   batch_size=harness["batch_size"],
                                                   include_path=harness["include_path"],
                                                   num_fewshot=harness["num_fewshot"])
            metrics.update(harness_metrics)
            tables[f"tables/lm_eval/step_{step:06d}.json"] = [{"task": task, **values}
                                                              for task, values in results.items()]
        return metrics, tables

    def _fluency(self, subset: list[EditRecord]) -> float:
        prompts = [p for r in subset for p in (r.generation_prompts or (r.prompt,))][:self.fluency["num_prompts"]]
        settings = GenerationSettings(max_new_tokens=self.fluency["max_new_tokens"], stop=())
        return mean_fluency(generate_answers(self.model, self.tokenizer, prompts, settings, self.batch_size))
