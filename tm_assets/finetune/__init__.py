"""The fine-tune runner behind `model_versions`: redact and export training data (dataset), train a
LoRA adapter with mlx-lm and evaluate it against its base (training), and serve base + adapter
(serving). Plain functions and one process handle, no Dagster: the asset is a thin shell around them.
Training, evaluation and serving run mlx-lm's own command line in a child process, so a crash or a leak
in MLX never takes the caller down, and what the caller streams into its logs is what an operator would
see running the same command by hand."""

from tm_assets.finetune.dataset import (
    MIN_EXAMPLES,
    SPLITS,
    DatasetInfo,
    export_dataset,
    held_out_examples,
    normalize_prompt,
    read_split,
    validate_dataset,
)
from tm_assets.finetune.serving import ModelServer, free_port
from tm_assets.finetune.training import (
    EvalResult,
    FinetuneError,
    TrainResult,
    evaluate,
    generate_answers,
    mlx_device,
    parse_losses,
    train_lora,
)

__all__ = [
    "MIN_EXAMPLES", "SPLITS", "DatasetInfo", "export_dataset", "held_out_examples", "normalize_prompt",
    "read_split", "validate_dataset", "ModelServer", "free_port", "EvalResult", "FinetuneError",
    "TrainResult", "evaluate", "generate_answers", "mlx_device", "parse_losses", "train_lora",
]
