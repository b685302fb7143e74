"""Which exceptions are the user's to fix (a setting, a file, a model, an endpoint) rather than EditGrid's bugs.

The command line (grid/launch.py) prints such an error as one ``error: ...`` message without a traceback; ``--debug``
shows the traceback. Any other exception keeps its traceback: it is a bug to report. The classes are named, not
imported, so that checking an exception never imports torch, transformers or MLflow; tests/test_cli_errors.py
checks that every name still resolves to an exception class.
"""

from __future__ import annotations

# module.ClassName of every "user" error; subclasses count too.
USER_ERROR_CLASSES = frozenset({
    "grid.config.ConfigError",                        # the grid's settings (every problem in one message)
    "grid.tracking.TrackingConfigError",              # the MLflow tracking URI or store
    "grid.report.ReportError",                        # --report of a grid MLflow does not hold
    "grid.assembly.AssemblyError",                    # a method that cannot be assembled as configured
    "grid.collapse.CollapseConfigError",              # stop_on_collapse settings
    "grid.trial.TrialError",                          # a trial that cannot run as configured
    "grid.trial_checkpoint.CheckpointError",          # a trial checkpoint that does not fit the trial
    "grid.generation_stage.UneditedBackendMismatch",  # the unedited-answers backend serves other weights
    "evals.datasets.DatasetError",                    # data.path: a file or hub dataset that cannot be read
    "evals.general.GeneralTaskError",                 # eval.general task files
    "evals.abilities.AbilityTaskError",               # eval.abilities task files
    "evals.openai_endpoint.EndpointUnavailable",      # a judge / answer endpoint that cannot be reached
    "evals.lm_eval_bridge.LmEvalUnavailable",         # lm-evaluation-harness missing or unusable
    "methods.infra.models.ModelLoadError",            # a model that cannot be loaded
    "methods.infra.arch.ArchitectureError",           # a model whose architecture EditGrid does not know
    "methods.infra.cpu_linear.LinearBackendError",    # model_args.linear_backend
    "methods.corpus.CorpusError",                     # stats.corpus
    "methods.stats.StatsError",                       # the second-moment statistics
    "retrieval.embedder.EmbedderError",               # the retrieval embedder
})


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_user_error(error: BaseException) -> bool:
    """True when ``error`` (or a class it derives from) is one of USER_ERROR_CLASSES."""
    return any(class_name(cls) in USER_ERROR_CLASSES for cls in type(error).__mro__)


def error_message(error: BaseException) -> str:
    """``error: <message>``, for stderr."""
    return f"error: {error}"
