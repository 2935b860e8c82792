r"""The trainer: `python -m longvid_jax.train --config=configs/tdc.py [--workdir=DIR] [--config.x=y]`.

One trainer for every system and stage; what differs is config. Sections, in order: logging,
mesh, model, input, shape-first init and shardings, update step, checkpoint restore, loop.

Outputs under the workdir (default `runs/<config file name>`):
  checkpoints/<step>/   params, optimizer state, step and data-iterator state (orbax)
  metrics.jsonl         one JSON object per logged step (loss, lr, tokens/s, skipped records, ...)
  config.json           the resolved config of the run
A run whose workdir already holds a checkpoint resumes from the latest one, at the same step and
data position.
"""

import dataclasses
import functools
import json
import logging as std_logging
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from longvid_jax import checkpoints, distributed, losses, model_families, optim, sharding, xla_flags
from longvid_jax.input import pipeline
from longvid_jax.input import tokenizer as tokenizer_lib
from longvid_jax.models import lora, video_llm

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default runs/<config name>).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 in a multi-process job (see "
                                   "longvid_jax/distributed.py; clusters need no flags).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def example_batch(model_cfg: video_llm.VideoLLMConfig, input_cfg, *, batch: int = 1,
                  text_len: int = 8) -> dict[str, np.ndarray]:
    """A zero `VideoLLM` batch with the pipeline's shapes (see
    `model_families.VideoLLMFamily.example_batch`)."""
    return model_families.VideoLLMFamily(model_cfg).example_batch(input_cfg, batch=batch,
                                                                  text_len=text_len)


@dataclasses.dataclass
class Trainer:
    """Everything built from a config: mesh, model, optimizer, shardings and compiled functions.

    Built once per run by `Trainer.create`; `train_step` is jitted with explicit in/out
    shardings over the mesh (one device is a mesh too).
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    family: Any  # a `model_families` family: module, config, batch shapes, forward
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any
    abstract_state: Any

    @property
    def model(self) -> nn.Module:
        return self.family.module

    @property
    def model_cfg(self):
        return self.family.config

    @classmethod
    def create(cls, config, devices=None) -> "Trainer":
        mesh = sharding.make_mesh(config.mesh, devices, config.get("dcn_mesh"))
        rules = sharding.check_rules(config.sharding_rules, mesh)
        family = model_families.from_config(config.model)
        dummy = family.example_batch(config.input)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules), lora.lora_context(
                config.get("lora")):
            boxed = jax.eval_shape(lambda r: family.init(r, dummy)["params"],
                                   jax.random.key(0))
        param_sh = sharding.tree_shardings(boxed, mesh, rules)
        abstract_params = nn.unbox(boxed)
        tx, schedule = optim.make_optimizer(config.optim, abstract_params, config.total_steps)
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        opt_sh = sharding.like_params_shardings(abstract_opt, abstract_params, param_sh, mesh)
        state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated}
        abstract_state = {"params": abstract_params, "opt_state": abstract_opt,
                          "step": jax.ShapeDtypeStruct((), jnp.int32)}
        return cls(config, mesh, rules, family, tx, schedule, state_sh, abstract_state)

    def init_state(self, seed: int) -> dict:
        """Initial train state, created directly in its shardings (never whole on one device)."""
        dummy = self.family.example_batch(self.config.input)

        def init(rng):
            params = nn.unbox(self.family.init(rng, dummy)["params"])
            return {"params": params, "opt_state": self.tx.init(params),
                    "step": jnp.zeros((), jnp.int32)}

        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules), lora.lora_context(
                self.config.get("lora")):
            return jax.jit(init, out_shardings=self.state_shardings)(jax.random.key(seed))

    def loss_fn(self, params, batch, rng=None):
        """Mean next-token loss over target tokens, and (nll sum, target count).

        With `config.loss_chunk > 0` the logits are computed that many tokens at a time
        (`losses.chunked_lm_loss`) and never exist for the whole batch at once. `rng` is the
        'dropout' key (LoRA dropout acts only inside `lora_context(..., deterministic=False)`).
        """
        rngs = {"dropout": rng} if rng is not None else None
        family = self.family

        def targets_of(prompt):  # the prompt the model saw (TDC compacts its video slots)
            return losses.next_token_targets(prompt["input_ids"], prompt["loss_mask"],
                                             prompt["segment_ids"])

        if self.config.loss_chunk:
            def forward(module, b):
                hidden, prompt = family.forward(module, b)
                return hidden, module.llm.head_weight(), prompt

            hidden, head, prompt = self.model.apply({"params": params}, batch, method=forward,
                                                    rngs=rngs)
            targets, weights = targets_of(prompt)
            nll, count = losses.chunked_lm_loss(hidden, head, targets, weights,
                                                chunk_size=self.config.loss_chunk,
                                                dtype=family.llm.compute_dtype,
                                                logits_dtype=self.config.get(
                                                    "loss_logits_dtype", "float32"))
        else:
            def forward(module, b):
                hidden, prompt = family.forward(module, b)
                return module.logits(hidden), prompt

            logits, prompt = self.model.apply({"params": params}, batch, method=forward,
                                              rngs=rngs)
            targets, weights = targets_of(prompt)
            nll, count = losses.lm_loss(logits, targets, weights)
        return nll / jnp.maximum(count, 1.0), (nll, count)

    def grads(self, params, batch, rng=None):
        """Summed next-token NLL, target count and the gradient of the mean loss.

        With `config.grad_accum_steps = n > 1` the batch is cut into n micro-batches (rows
        j, j + n, j + 2n, ... form micro-batch j, so each stays spread over the batch shards)
        that run one after another under `lax.scan`, accumulating float32 gradients of the
        summed NLL; the result equals one pass over the whole batch (the mean is over all
        target tokens of the batch), with the activation memory of one micro-batch.

        `rng` (the 'dropout' key, or None) is folded with the micro-batch index.

        Raises:
          ValueError: the batch rows per process are not a multiple of n.
        """
        n = int(self.config.get("grad_accum_steps", 1))
        if n == 1:
            (_, (nll, count)), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
                params, batch, rng)
            return nll, count, grads
        rows = batch["input_ids"].shape[0]
        if rows % n:
            raise ValueError(f"batch of {rows} rows does not split into grad_accum_steps={n}")

        def split(x):
            x = x.reshape(rows // n, n, *x.shape[1:]).swapaxes(0, 1)
            spec = sharding.batch_sharding(self.mesh, x.ndim - 1).spec
            return jax.lax.with_sharding_constraint(
                x, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, *spec)))

        def sum_loss(p, micro, micro_rng):
            _, (nll, count) = self.loss_fn(p, micro, micro_rng)
            return nll, count

        def body(carry, xs):
            nll, count, acc = carry
            micro, j = xs
            micro_rng = jax.random.fold_in(rng, j) if rng is not None else None
            (m_nll, m_count), g = jax.value_and_grad(sum_loss, has_aux=True)(params, micro,
                                                                             micro_rng)
            acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)
            return (nll + m_nll, count + m_count, acc), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (nll, count, acc), _ = jax.lax.scan(
            body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros),
            (jax.tree.map(split, batch), jnp.arange(n)))
        grads = jax.tree.map(lambda g, p: (g / jnp.maximum(count, 1.0)).astype(p.dtype),
                             acc, params)
        return nll, count, grads

    @functools.cached_property
    def train_step(self):
        """Jitted `(state, batch) -> (state, metrics)`; the state buffers are donated."""

        def step(state, batch):
            # LoRA dropout key: a function of the seed and step, so resumed runs match.
            rng = jax.random.fold_in(jax.random.key(self.config.seed), state["step"])
            nll, count, grads = self.grads(state["params"], batch, rng)
            updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            metrics = {"loss": nll / jnp.maximum(count, 1.0), "target_tokens": count,
                       "grad_norm": optax.tree.norm(grads),
                       "lr": self.schedule(state["step"])}
            return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

        jitted = jax.jit(step, out_shardings=(self.state_shardings, None), donate_argnums=0)

        def run(state, batch):
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules), lora.lora_context(
                    self.config.get("lora"), deterministic=False):
                return jitted(state, batch)

        return run

    def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host batch (this process's rows) -> global arrays sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(
                    sharding.batch_sharding(self.mesh, np.ndim(v)), np.asarray(v))
                for k, v in batch.items()}


def check_vocabularies(config, family) -> None:
    """Fails early if a tokenizer emits ids the LLM or the Q-Former cannot embed.

    Raises:
      ValueError: naming the tokenizer, its size and the too-small table.
    """
    llm_tok = config.input.tokenizer
    q_tok = config.input.get("qformer_tokenizer") or llm_tok
    for name, (size, qformer_side) in family.vocab_tables().items():
        spec = q_tok if qformer_side else llm_tok
        tok = (tokenizer_lib.wordpiece_tokenizer(spec) if qformer_side and spec != llm_tok
               else tokenizer_lib.load_tokenizer(spec))
        if len(tok) > size:
            raise ValueError(f"tokenizer {spec!r} has {len(tok)} tokens but {name} is {size}")


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
        devices=None) -> dict:
    """Trains (or resumes) according to `config`, writing into `workdir`.

    Args:
      config: a config from `configs/*.py`.
      workdir: output folder (created if missing); an existing checkpoint there is resumed.
      stop_at: stop after this step (a checkpoint is saved there), as if interrupted; the run
        resumes to `config.total_steps` next time. None trains to the end.
      devices: devices of the mesh (default all).

    Returns:
      The final train state (params, opt_state, step) as global arrays.

    Raises:
      FloatingPointError: the loss became NaN or infinite.
      RuntimeError: too many unreadable records (`config.max_skipped_fraction`).
    """
    # --- Logging.
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    logging.info("workdir %s; devices %s", workdir, jax.devices())

    # --- Mesh, model, optimizer, shardings.
    trainer = Trainer.create(config, devices)
    logging.info("mesh %s", dict(trainer.mesh.shape))
    global_batch = config.input.batch_size * jax.process_count()
    if global_batch % sharding.batch_size_divisor(trainer.mesh):
        raise ValueError(f"global batch {global_batch} (input.batch_size per process x "
                         f"{jax.process_count()} processes) does not split into the "
                         f"{sharding.batch_size_divisor(trainer.mesh)} batch shards of the mesh")
    check_vocabularies(config, trainer.family)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state["params"]))
    logging.info("model: %.2fM parameters", n_params / 1e6)

    # --- Input.
    data_it = pipeline.make_iterator(
        config.input,
        num_video_tokens=trainer.family.num_video_tokens,
        process_index=jax.process_index(), process_count=jax.process_count())

    # --- Checkpoint restore, or init.
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    max_to_keep=config.keep_ckpts)
    latest = ckpt.latest_step()
    if latest is not None:
        target = checkpoints.abstract_with_shardings(trainer.abstract_state,
                                                     trainer.state_shardings)
        state, data_state = ckpt.restore(latest, target)
        if data_state:
            data_it.set_state(data_state)
        logging.info("resumed from %s at step %d", ckpt.directory, latest)
    else:
        state = trainer.init_state(config.seed)
    step = int(jax.device_get(state["step"]))
    last = config.total_steps if stop_at is None else min(stop_at, config.total_steps)

    # --- Loop.
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    skipped_total, records_total = 0, 0
    bar = tqdm(total=last, initial=step, desc="train", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    t_last, step_last, tokens_since = time.perf_counter(), step, 0
    while step < last:
        host_batch = next(data_it)
        skipped = int(host_batch.pop("num_skipped", 0))
        host_batch.pop("record_index", None)
        skipped_total += skipped
        records_total += skipped + host_batch["input_ids"].shape[0]
        if skipped_total > config.max_skipped_fraction * max(records_total, 8):
            raise RuntimeError(f"{skipped_total} of {records_total} records were unreadable "
                               f"(see the warnings above); check config.input.annotations")
        trainer.family.check_placeholders(host_batch)
        tokens_since += int((host_batch["segment_ids"] > 0).sum()) * jax.process_count()
        state, metrics = trainer.train_step(state, trainer.device_batch(host_batch))
        step += 1
        if step % config.log_every == 0 or step == last or step == 1:
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            dt = (now - t_last) / (step - step_last)
            tokens_per_s = tokens_since / (now - t_last)
            t_last, step_last, tokens_since = now, step, 0
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}")
            record = {"step": step, "loss": loss, "lr": float(metrics["lr"]),
                      "grad_norm": float(metrics["grad_norm"]),
                      "target_tokens": int(metrics["target_tokens"]),
                      "tokens_per_s": tokens_per_s,
                      "step_time_s": dt, "skipped_records": skipped_total}
            if jax.process_index() != 0:  # process 0 shows the bar and writes the file
                logging.info("step %d: loss %.6f", step, loss)
            else:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            step_s=f"{dt:.2f}", skipped=skipped_total)
            bar.update(step - bar.n)
        if step % config.ckpt_every == 0 or step == last:
            ckpt.save(step, state, data_it.get_state(), force=step == last)
    bar.update(step - bar.n)
    bar.close()
    ckpt.close()
    if skipped_total:
        logging.warning("skipped %d unreadable records out of %d", skipped_total, records_total)
    return state


def main(argv):
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/tdc.py")
    workdir = _WORKDIR.value
    if workdir is None:
        name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
        workdir = os.path.join("runs", name)
    logging.set_verbosity(logging.INFO)
    xla_flags.apply_defaults()  # before the backend starts
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    # Orbax narrates every save at INFO; keep its warnings and errors only.
    std_logging.getLogger("absl").addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname)
    run(config, workdir)


if __name__ == "__main__":
    app.run(main)
