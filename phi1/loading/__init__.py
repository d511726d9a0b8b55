"""Loading in one place: any model or run directory to a config, tensors, a model and its tokenizer.

Sits above `core`, `parallel` and `data` and below `training`, `eval`, `serve` and `quality`, which all load
through it (training may import it; it never imports training).

    from phi1.loading import resolve_model_path, load_state, load_pretrained, load_tokenizer

    resolve_model_path("runs/quickstart/finetune")      # ModelSource(kind="run", directory=.../iter_0000040)
    config, tensors = load_state("runs/phi-1-hf")      # whole CPU tensors under phi1 names

Modules: `model_path` (what a path is, and loading it), `checkpoints` (training checkpoints: `latest`, `iter_*`,
TP shards merged on CPU), `manifest` (size-then-SHA-256 verification), `safetensors_file` (headers checked
before the library reads a file), `paths` (names kept inside their directory, regular files only),
`inference` (a model in eval mode with its fused kernels, the vocabulary check), `optimizer_state` (a phi1 checkpoint's AdamW state merged across TP ranks by parameter name), `convert` (phi1
format -> DCP, DCP -> phi1 / HF model directory, on the CPU).
"""

from phi1.loading.checkpoints import (
    complete_iterations,
    export_pretrained,
    find_checkpoint,
    find_selected,
    iteration_dir,
    load_checkpoint_state,
    load_model_shards,
    load_resharded,
    load_shard_config,
    read_trainer_state,
)
from phi1.loading.inference import check_vocab, load_model
from phi1.loading.manifest import CheckpointCorruptError, verify_checkpoint, write_manifest
from phi1.loading.model_path import (
    ACCEPTED,
    KINDS,
    ModelSource,
    find_tokenizer,
    load_config,
    load_pretrained,
    load_state,
    load_tokenizer,
    resolve_model_path,
    tokenizer_files,
)
from phi1.loading.paths import inside, regular_file

__all__ = [
    "ACCEPTED",
    "check_vocab",
    "load_model",
    "CheckpointCorruptError",
    "KINDS",
    "ModelSource",
    "complete_iterations",
    "export_pretrained",
    "find_checkpoint",
    "find_selected",
    "find_tokenizer",
    "inside",
    "iteration_dir",
    "load_checkpoint_state",
    "load_config",
    "load_model_shards",
    "load_pretrained",
    "load_resharded",
    "load_shard_config",
    "load_state",
    "load_tokenizer",
    "read_trainer_state",
    "regular_file",
    "resolve_model_path",
    "tokenizer_files",
    "verify_checkpoint",
    "write_manifest",
]
