"""Character-level language modelling: corpus, bigram baseline, training, sampling.

The pieces, top to bottom:
  TextConfig          every setting of a run, with its unit; experiments.text
                      makes one flag per field.
  load_corpus         the text (a file, a TFDS text dataset, or the shipped
                      default), its vocabulary and a contiguous train/val split.
  bigram_bits_per_char  the baseline: P(c_t | c_{t-1}) counted on train,
                      add-one (Laplace) smoothed, scored on validation.
  make_step           the task's step: draws B random windows of the train
                      text on the device and updates; no host data pipeline.
  evaluate_bpc        validation bits per character, every character scored once.
  sample              generation with the softmax temperature, one jitted loop.
  fit                 the task: eval/checkpoint every --eval_every steps, best
                      by validation bpc, samples; the loop is `jdl.engine.run`.

Bits per character = mean cross-entropy in nats / ln 2.
"""
import dataclasses
import functools
import json
import math
import os
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from jdl import checkpoint, engine, losses, ops, optim, parallel, xla
from jdl.config import option
from jdl.core import PRNG_IMPL, apply_if_finite
from jdl.errors import CheckpointError, ConfigError, DataError
from jdl.logs import write_json
from jdl.models import rnn
from jdl.models.rnn import LanguageModel
from jdl.summary import summarize

# "Clearly beats the bigram baseline": by at least this many bits per character
# (about 8% of a bigram model's typical 3 bits/char).
CLEAR_MARGIN_BPC = 0.25

# The offline default corpus, shipped with the package (see its NOTICE).
DEFAULT_TEXT = os.path.join(os.path.dirname(__file__), "data", "text", "python_reference.txt")


@dataclasses.dataclass
class TextConfig:
  """Everything that defines a character language-model run."""
  # --- data ---
  text_file: str = option("", "a UTF-8 text file to model (default: the Python reference text shipped with jdl)")
  dataset: str = option("", "a TFDS text dataset instead, e.g. tiny_shakespeare (needs the data or the network)")
  data_dir: Optional[str] = option(None, "where TFDS data is looked for (TFDS default if unset)")
  download: bool = option(True, "allow TFDS to download and prepare a dataset that is not there")
  validation_fraction: float = option(0.1, "the last fraction of a single text held out for validation")
  # --- model ---
  embed_dim: int = option(64, "character embedding width")
  hidden_size: int = option(256, "LSTM units per layer")
  num_layers: int = option(2, "stacked LSTM layers")
  dropout: float = option(0.1, "dropout between layers and before the head, in [0, 1)")
  rnn_implementation: str = option("scan", "scan (any backend) or cudnn (the cuDNN LSTM kernel: CUDA GPU)")
  # --- optimisation ---
  optimizer: str = option("adam", "sgd, momentum, nesterov, adagrad, rmsprop, adam, adamw")
  learning_rate: float = option(3e-3, "peak learning rate, per step")
  schedule: str = option("warmup_cosine", "constant, cosine, warmup_cosine, ... (as experiments.cifar)")
  clip_norm: float = option(1.0, "clip gradients to this global norm (0: off)")
  seq_len: int = option(100, "characters per training window (backpropagation through time)")
  batch_size: int = option(32, "windows per step")
  steps: int = option(1500, "training steps")
  eval_every: int = option(250, "steps between validation, checkpoint and metrics row")
  # --- sampling ---
  sample_only: bool = option(False, "restore --workdir's best checkpoint and print samples; no training")
  sample_length: int = option(300, "characters per sample")
  temperatures: Tuple[float, ...] = option((0.5, 1.0, 1.5), "softmax temperatures to sample at")
  prompt: str = option("\n", "text the samples continue (its characters must be in the vocabulary)")
  # --- run ---
  seed: int = option(0, "seed of initialisation, windows, dropout and sampling")
  workdir: Optional[str] = option(None, "checkpoints, metrics, samples go here; rerunning resumes (default runs/text-NAME-seedS)")
  keep_checkpoints: int = option(2, "latest checkpoints kept for resume (the best is kept separately)")
  log_every: int = option(50, "steps between progress-bar loss updates (each is a device sync)")
  nan_policy: str = option("stop", "on a non-finite loss or gradient: stop (naming the step) or skip "
                                   "the step (counted in metrics.jsonl); either way it is not applied")


def validate(config: TextConfig) -> None:
  """Raises ConfigError (one line) for any bad value, before anything loads."""
  optim.OPTIMIZERS.lookup(config.optimizer)
  optim.SCHEDULES.lookup(config.schedule)

  def check(ok, message):
    if not ok:
      raise ConfigError(message)

  check(not (config.text_file and config.dataset), "give --text_file or --dataset, not both")
  check(config.nan_policy in ("stop", "skip"), f"nan_policy must be stop or skip, got {config.nan_policy!r}")
  check(math.isfinite(config.learning_rate) and config.learning_rate > 0,
        f"learning_rate must be > 0, got {config.learning_rate}")
  for name in ("embed_dim", "hidden_size", "num_layers", "seq_len", "batch_size", "eval_every",
               "log_every", "sample_length", "keep_checkpoints"):
    check(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
  check(config.steps >= 0, f"steps must be >= 0, got {config.steps}")
  rnn.check_implementation(config.rnn_implementation, "lstm", backend=True)
  check(0.0 <= config.dropout < 1.0, f"dropout must be in [0, 1), got {config.dropout}")
  check(0.0 < config.validation_fraction < 1.0,
        f"validation_fraction must be in (0, 1), got {config.validation_fraction}")
  check(config.clip_norm >= 0, f"clip_norm must be >= 0, got {config.clip_norm}")
  check(len(config.temperatures) >= 1 and all(t > 0 and math.isfinite(t) for t in config.temperatures),
        f"temperatures must be > 0, got {list(config.temperatures)}")
  check(not config.sample_only or config.workdir,
        "--sample_only needs the --workdir of a trained run")


def _text_name(config: TextConfig) -> str:
  return config.dataset or os.path.splitext(os.path.basename(config.text_file or DEFAULT_TEXT))[0]


# ----------------------------------------------------------------------------
# Corpus and vocabulary.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Characters <-> ids; id i is chars[i] (sorted, so ids do not depend on order seen)."""
  chars: str

  @classmethod
  def from_text(cls, text: str) -> "Vocabulary":
    return cls("".join(sorted(set(text))))

  def __len__(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """Text -> (len(text),) int32 ids; ConfigError naming a character not in the vocabulary."""
    index = {c: i for i, c in enumerate(self.chars)}
    missing = [c for c in text if c not in index]
    if missing:  # Name the first one in reading order.
      raise ConfigError(f"character {missing[0]!r} is not in the model's vocabulary "
                        f"of {len(self)} characters")
    return np.fromiter((index[c] for c in text), np.int32, len(text))

  def decode(self, ids) -> str:
    return "".join(self.chars[int(i)] for i in ids)


@dataclasses.dataclass
class Corpus:
  """A text split for language modelling."""
  name: str
  vocab: Vocabulary
  train: np.ndarray  # (N,) int32 ids
  val: np.ndarray  # (M,) int32 ids


def read_text_file(path: str) -> str:
  """The file's text; DataError (one line) if missing, unreadable or not UTF-8."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"cannot read text file {path}: {e.strerror}") from None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"text file {path} is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                    "convert it, e.g. iconv -t UTF-8") from None


def load_corpus(config: TextConfig) -> Corpus:
  """The text `config` names, split into train and validation ids.

  A single text (a file, or a TFDS dataset without a validation split) is split
  contiguously: the last `validation_fraction` of its characters is validation,
  so validation is unseen running text rather than windows interleaved with
  training ones.
  """
  if config.dataset:
    from jdl.data import tfds_source
    train_text, val_text = tfds_source.load_text(config.dataset, data_dir=config.data_dir,
                                                 download=config.download)
    name = config.dataset
  else:
    path = config.text_file or DEFAULT_TEXT
    train_text, val_text = read_text_file(path), ""
    name = path
  if not val_text:
    cut = int(round(len(train_text) * (1 - config.validation_fraction)))
    train_text, val_text = train_text[:cut], train_text[cut:]
  # Windows need seq_len + 1 characters (inputs and the next-character targets).
  need = config.seq_len + 1
  if len(train_text) < need or len(val_text) < 2:
    raise DataError(f"{name} is too short: {len(train_text)} training and {len(val_text)} "
                    f"validation characters; training needs at least seq_len + 1 = {need} "
                    "(use a longer text or a smaller --seq_len)")
  vocab = Vocabulary.from_text(train_text + val_text)
  return Corpus(name, vocab, vocab.encode(train_text), vocab.encode(val_text))


# ----------------------------------------------------------------------------
# The bigram baseline.
# ----------------------------------------------------------------------------

def bigram_bits_per_char(train: np.ndarray, val: np.ndarray, vocab_size: int,
                         alpha: float = 1.0) -> float:
  """Validation bits per character of an add-alpha smoothed character bigram model.

  P(b | a) = (count(a, b) + alpha) / (count(a) + alpha * V), counted on `train`;
  scored on each of val[1:] given its predecessor, like the LSTM's targets.

  Arguments:
    train, val: (N,) int ids.
    vocab_size: V.
    alpha: pseudo-count per pair (1.0: Laplace).
  """
  counts = np.zeros((vocab_size, vocab_size), np.float64)
  np.add.at(counts, (train[:-1], train[1:]), 1.0)
  probs = (counts + alpha) / (counts.sum(axis=1, keepdims=True) + alpha * vocab_size)
  return float(-np.mean(np.log2(probs[val[:-1], val[1:]])))


# ----------------------------------------------------------------------------
# Model, steps, evaluation and sampling.
# ----------------------------------------------------------------------------

def build_model(config: TextConfig, vocab_size: int) -> LanguageModel:
  return LanguageModel(vocab_size=vocab_size, embed_dim=config.embed_dim,
                       hidden_size=config.hidden_size, num_layers=config.num_layers,
                       dropout=config.dropout, implementation=config.rnn_implementation,
                       **ops.choices(LanguageModel))


def create_state(model: LanguageModel, config: TextConfig, key) -> train_state.TrainState:
  schedule = optim.make_schedule(config.schedule, config.learning_rate, max(config.steps, 1),
                                 decay_steps=config.eval_every)
  tx = optim.make_optimizer(config.optimizer, schedule, clip_norm=config.clip_norm or None)
  params = jax.jit(model.init)(key, jnp.zeros((1, config.seq_len), jnp.int32))["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def make_step(batch_size: int, seq_len: int, batch_sharding=None):
  """The task's step for `jdl.engine`: (state, (tokens, step_key), index) -> (state, metrics).

  tokens: (N,) int32, the whole training text on the device. Step s draws
  `batch_size` window starts from fold_in(step_key, s), so a resumed run sees
  the same windows. A step with a non-finite loss or gradient is not applied
  (only the step counter moves); metrics['status'] (int32: 0 good, 1
  non-finite loss, 2 non-finite gradients, as `core.step_status`) tells the
  loop. With `batch_sharding` (data parallel, see jdl.parallel) the windows
  are split over the devices along the batch axis. Unjitted: the engine jits it.
  """
  def step(state, inputs, index):
    del index  # windows are drawn at random positions, from the step number
    tokens, step_key = inputs
    window_key, dropout_key = jax.random.split(jax.random.fold_in(step_key, state.step))
    starts = jax.random.randint(window_key, (batch_size, 1), 0, tokens.shape[0] - seq_len)
    windows = tokens[starts + jnp.arange(seq_len + 1)[None, :]]  # (B, L + 1)
    windows = parallel.shard_batch(windows, batch_sharding)
    inputs, targets = windows[:, :-1], windows[:, 1:]  # (B, L) each

    def loss_fn(params):
      logits, _ = state.apply_fn({"params": params}, inputs, train=True,
                                 rngs={"dropout": dropout_key})  # (B, L, V)
      return losses.softmax_cross_entropy(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state, status, _ = apply_if_finite(state, grads, loss)
    return state, {"loss": loss, "status": status}
  return step


def validation_windows(ids: np.ndarray, seq_len: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Overlapping windows that score every validation target exactly once.

  Each window of seq_len inputs starts from a zero LSTM state. Windows overlap
  by half, and only targets in a window's second half are scored (all of the
  first window's), so every scored character has at least seq_len / 2
  characters of context -- a fairer measure than disjoint windows.

  Returns:
    inputs, targets, weights: (num_windows, seq_len) int32, int32, float32.
    weights.sum() == len(ids) - 1.
  """
  burn_in = seq_len // 2
  stride = seq_len - burn_in
  n_targets = len(ids) - 1
  starts = list(range(0, max(n_targets - seq_len, 0) + 1, stride))
  if starts[-1] + seq_len < n_targets:
    starts.append(n_targets - seq_len if n_targets >= seq_len else 0)
  inputs = np.zeros((len(starts), seq_len), np.int32)
  targets = np.zeros((len(starts), seq_len), np.int32)
  weights = np.zeros((len(starts), seq_len), np.float32)
  scored_up_to = 0  # targets ids[1:scored_up_to + 1] are scored already
  for row, start in enumerate(starts):
    n = min(seq_len, n_targets - start)
    inputs[row, :n] = ids[start:start + n]
    targets[row, :n] = ids[start + 1:start + n + 1]
    first = max(scored_up_to - start, 0)  # skip targets an earlier window scored
    weights[row, first:n] = 1.0
    scored_up_to = start + n
  return inputs, targets, weights


def make_eval_fn(model: LanguageModel):
  """Jitted (params, inputs, targets, weights) -> summed NLL in nats over weighted targets."""
  @xla.jit
  def nll_sum(params, inputs, targets, weights):
    logits, _ = model.apply({"params": params}, inputs, train=False)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # (B, L)
    return jnp.sum(nll * weights)
  return nll_sum


def evaluate_bpc(eval_fn, params, windows, batch_size: int = 256) -> float:
  """Bits per character of `params` over `validation_windows(...)` output."""
  inputs, targets, weights = windows
  total = 0.0
  for i in range(0, len(inputs), batch_size):
    chunk = slice(i, i + batch_size)
    # Pad the last chunk to the full batch so the program compiles once.
    pad = batch_size - len(inputs[chunk]) if len(inputs) > batch_size else 0
    padded = [np.pad(a[chunk], ((0, pad), (0, 0))) for a in (inputs, targets, weights)]
    total += float(eval_fn(params, *padded))
  return total / float(weights.sum()) / math.log(2)


@functools.partial(jax.jit, static_argnames=("model", "length", "window"))
def _sample_ids(model, params, prompt_ids, prompt_len, key, temperature, *, length: int, window: int):
  """Generates `length` ids after a prompt, in one compiled loop.

  The model reads a sliding buffer of the last `window` ids from a zero state
  (as in training, whose windows are `window` long); the prediction for the next
  id is the logits at the buffer's last filled position.

  Arguments:
    prompt_ids: (window,) int32, the prompt's last ids left-aligned, then zeros.
    prompt_len: how many of them are the prompt (1..window).
    temperature: softmax temperature; logits are divided by it.
  Returns:
    ids (length,) and the entropy in bits of each step's tempered distribution.
  """
  def body(i, carry):
    buffer, filled, out, entropy = carry
    logits, _ = model.apply({"params": params}, buffer[None], train=False)
    tempered = logits[0, filled - 1] / temperature  # (V,)
    log_p = jax.nn.log_softmax(tempered)
    entropy = entropy.at[i].set(-jnp.sum(jnp.exp(log_p) * log_p) / jnp.log(2.0))
    new = jax.random.categorical(jax.random.fold_in(key, i), tempered).astype(jnp.int32)
    full = filled == window
    buffer = jnp.where(full, jnp.roll(buffer, -1), buffer)  # drop the oldest id when full
    buffer = buffer.at[jnp.where(full, window - 1, filled)].set(new)
    return buffer, jnp.minimum(filled + 1, window), out.at[i].set(new), entropy

  init = (prompt_ids, prompt_len, jnp.zeros((length,), jnp.int32), jnp.zeros((length,)))
  _, _, out, entropy = jax.lax.fori_loop(0, length, body, init)
  return out, entropy


def sample(model: LanguageModel, params, vocab: Vocabulary, prompt: str, length: int,
           temperature: float, seed: int, window: int) -> Tuple[str, float]:
  """Continues `prompt` by `length` characters at softmax `temperature`.

  Deterministic for a given seed (on a given backend). Low temperatures sharpen
  the distribution towards the likeliest characters, high ones flatten it.

  Returns:
    (text, mean entropy in bits per character of the tempered distributions).
  """
  if not prompt:
    raise ConfigError("--prompt must not be empty")
  ids = vocab.encode(prompt)[-window:]
  buffer = np.zeros((window,), np.int32)
  buffer[:len(ids)] = ids
  key = jax.random.key(seed, impl=PRNG_IMPL)
  out, entropy = _sample_ids(model, params, jnp.asarray(buffer), jnp.int32(len(ids)), key,
                             jnp.float32(temperature), length=length, window=window)
  return vocab.decode(np.asarray(out)), float(np.mean(np.asarray(entropy)))


def samples_report(model, params, vocab, config: TextConfig) -> Tuple[str, list]:
  """Samples at each of config.temperatures; returns (printable text, rows)."""
  lines, rows = [], []
  for temperature in config.temperatures:
    text, entropy = sample(model, params, vocab, config.prompt, config.sample_length,
                           temperature, config.seed, config.seq_len)
    rows.append({"temperature": temperature, "mean_entropy_bits": entropy, "text": text})
    lines.append(f"--- temperature {temperature:g}: mean entropy {entropy:.2f} bits/char "
                 f"(lower = sharper) ---\n{config.prompt}{text}\n")
  return "\n".join(lines), rows


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------

def _restore_for_sampling(config: TextConfig):
  """(model, params, vocab) from a trained workdir's best (else latest) checkpoint."""
  workdir = config.workdir
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      known = {f.name for f in dataclasses.fields(TextConfig)}
      trained = TextConfig(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in json.load(f).items() if k in known})
    with open(os.path.join(workdir, "vocab.json")) as f:
      vocab = Vocabulary(json.load(f)["chars"])
  except (OSError, ValueError, TypeError, KeyError):
    raise ConfigError(f"{workdir} holds no trained text model (config.json and vocab.json); "
                      "train one first: python -m experiments.text --workdir=" + workdir) from None
  # The implementation is how to run, not what was learned: the parameters are
  # the same, so a model trained with cudnn on a GPU samples with scan on a CPU.
  trained = dataclasses.replace(trained, rnn_implementation=config.rnn_implementation)
  model = build_model(trained, len(vocab))
  state = create_state(model, trained, jax.random.key(0))
  ckpts = checkpoint.Checkpoints(workdir, best_mode="min")
  try:
    restored = ckpts.restore_best(state) or ckpts.restore_latest(state)
  finally:
    ckpts.close()
  if restored is None:
    raise CheckpointError(f"{workdir} has no checkpoint yet; train first: "
                          f"python -m experiments.text --workdir={workdir}")
  return model, restored[0].params, vocab, trained


def sample_only(config: TextConfig, log=print) -> str:
  """Prints and returns samples from a trained workdir at config.temperatures."""
  model, params, vocab, trained = _restore_for_sampling(config)
  report, _ = samples_report(model, params, vocab, dataclasses.replace(
      config, seq_len=trained.seq_len))
  log(report)
  return report


def fit(config: TextConfig, *, devices=None, progress: bool = True, log=print) -> dict:
  """Trains the character LSTM as `config` says, resuming from its workdir.

  Every `eval_every` steps (an evaluation period: the loop's epoch) it scores
  validation bits per character and checkpoints; the best by validation bpc
  is kept. Returns the dict also written to WORKDIR/results.json: validation
  bits per character of the best checkpoint, the bigram baseline's, the
  margin, and the samples at each temperature. With more than one device
  (`devices`, default all) each step is data parallel, as in jdl.train.fit.
  """
  validate(config)
  mesh = parallel.data_mesh(devices)
  parallel.check_batch_size(config.batch_size, mesh)
  corpus = load_corpus(config)
  workdir = config.workdir or engine.default_workdir("text", _text_name(config), seed=config.seed)
  record = {"task": "text", **dataclasses.asdict(config), "vocabulary": corpus.vocab.chars,
            "train_chars": len(corpus.train), "val_chars": len(corpus.val)}
  sampling = ("sample_only", "sample_length", "temperatures", "prompt")  # read after training
  with engine.workdir(workdir, record, may_change=sampling, extendable="steps") as record:
    write_json(os.path.join(workdir, "vocab.json"), {"chars": corpus.vocab.chars})
    bigram_bpc = bigram_bits_per_char(corpus.train, corpus.val, len(corpus.vocab))
    log(f"Text {corpus.name}: {len(corpus.train):,} training and {len(corpus.val):,} validation "
        f"characters, vocabulary {len(corpus.vocab)}; bigram baseline {bigram_bpc:.3f} bits/char")
    model = build_model(config, len(corpus.vocab))
    log(str(summarize(model, (config.seq_len,), input_dtype=jnp.int32)))

    init_key, step_key = jax.random.split(jax.random.key(config.seed, impl=PRNG_IMPL))
    state = parallel.replicate(create_state(model, config, init_key), mesh)  # before restoring
    parallel.announce(mesh, config.batch_size, log)
    tokens = parallel.replicate(corpus.train, mesh)
    windows = validation_windows(corpus.val, config.seq_len)
    # Under the mesh, the LSTM layers split their loops over the devices themselves.
    eval_fn = parallel.within(mesh, make_eval_fn(model))

    def evaluate(state, train):
      train_bpc = float(train["loss"]) / math.log(2)
      val_bpc = evaluate_bpc(eval_fn, state.params, windows)
      return {"train_loss": float(train["loss"]), "train_bpc": train_bpc,
              "val_loss": val_bpc * math.log(2), "val_bpc": val_bpc, "bigram_val_bpc": bigram_bpc}

    def describe(epoch, step, row):
      return (f"step {step}/{config.steps}  train {row['train_bpc']:.3f}  val {row['val_bpc']:.3f} "
              f"bits/char  (bigram {bigram_bpc:.3f})")

    def finish(state, best, info):
      params = best.params
      val_bpc = (info["best_value"] if info["best_value"] is not None
                 else evaluate_bpc(eval_fn, params, windows))
      report, sample_rows = samples_report(model, params, corpus.vocab, config)
      if parallel.is_primary():
        with open(os.path.join(workdir, "samples.txt"), "w", encoding="utf-8") as f:
          f.write(report)
      log(report)
      margin = bigram_bpc - val_bpc
      beats = bool(margin >= CLEAR_MARGIN_BPC)
      log(f"validation {val_bpc:.3f} bits/char vs bigram {bigram_bpc:.3f}: "
          f"{'beats' if beats else 'does NOT clearly beat'} it by {margin:.3f} "
          f"(clearly: by >= {CLEAR_MARGIN_BPC} bits/char); results in {workdir}/results.json")
      return {"text": {"name": corpus.name, "train_chars": len(corpus.train),
                       "val_chars": len(corpus.val), "vocab_size": len(corpus.vocab)},
              "val_bpc": val_bpc, "bigram_val_bpc": bigram_bpc, "margin_bpc": margin,
              "clear_margin_bpc": CLEAR_MARGIN_BPC, "beats_bigram": beats,
              "best_step": info["best_step"], "samples": sample_rows}

    task = engine.Task(
        state=state, step=make_step(config.batch_size, config.seq_len, parallel.shardings(mesh)[1]),
        inputs=lambda epoch: (tokens, step_key), steps_per_epoch=config.eval_every,
        epochs=math.ceil(config.steps / config.eval_every), total_steps=config.steps,
        evaluate=evaluate, describe=describe, finish=finish, best=("val_bpc", "min"),
        panels={"bits per character": ["train_bpc", "val_bpc", "bigram_val_bpc"]}, x="step",
        title=f"{config.num_layers}-layer LSTM on {os.path.basename(corpus.name)}",
        period="evaluation period", bar_metric=("loss", "bits/char", 1 / math.log(2)),
        nan_policy=config.nan_policy, keep_checkpoints=config.keep_checkpoints,
        log_every=config.log_every, mesh=mesh)
    _, results = engine.run(task, workdir, record, progress=progress, log=log)
  return results
