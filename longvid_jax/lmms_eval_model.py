"""An lmms-eval model that answers with a longvid_jax checkpoint ("longvid_jax").

    python -m lmms_eval --model longvid_jax --tasks videomme --batch_size 1 \\
        --model_args 'config="configs/tdc.py:stage=2,size=full,llm=qwen2_7b,bert_vocab=/bert/vocab.txt",checkpoint=/ckpt/run'

lmms-eval (EvolvingLMMs-Lab/lmms-eval) drives a model through its `lmms_eval.api.model.lmms`
base class: `generate_until(requests)` gets `Instance`s whose `args` are `(context, gen_kwargs,
doc_to_visual, doc_id, task, split)`; the model calls `doc_to_visual(self.task_dict[task][split]
[doc_id])` for the visuals (video paths), generates for `context` and cuts the text at the first
of `gen_kwargs["until"]`. Facts from lmms-eval @ 75571cf (`lmms_eval/api/model.py`,
`api/registry.py`, `models/__init__.py`, `models/registry_v2.py`, `utils.py`); no code copied.

This class is a "simple" lmms-eval model (`is_simple = True`): the task's text prompt plus one
video, answered by `infer.Predictor.answer` (the video read as in training, the config's chat
template, greedy unless `gen_kwargs["temperature"] > 0`). Log-likelihood requests (multiple
choice by scoring options) and multi-round generation raise NotImplementedError.

Registration, when `lmms_eval` is importable: under "longvid_jax" in the legacy registry
(`lmms_eval.api.registry.register_model`) and, where the package has it, in
`lmms_eval.models.MODEL_REGISTRY_V2`. The lmms-eval CLI of newer versions finds models that are
not built in through the Python entry-point group "lmms_eval.models"; the project's packaging can
point one at `lmms_eval_manifest` (see its docstring). Without lmms-eval this module imports
cleanly, `LongVidJaxLMM` then derives from `object` and can still be called directly.
"""

import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from tqdm import tqdm

try:  # lmms-eval is optional
    from lmms_eval.api.model import lmms as _LmmsBase

    HAVE_LMMS_EVAL = True
except ImportError:  # pragma: no cover - depends on the environment
    _LmmsBase = object
    HAVE_LMMS_EVAL = False

MODEL_NAME = "longvid_jax"
DEFAULT_MAX_NEW_TOKENS = 128  # when a task gives no max_new_tokens
# Keyword arguments lmms-eval's CLI adds to every model (`additional_config`); one video at a
# time is answered whatever they say.
_IGNORED_KWARGS = ("batch_size", "max_batch_size", "device", "device_map")


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _as_video_path(visuals: Any, where: str) -> str:
    """The one video file of a request's visuals (a path or a one-element list of paths)."""
    if isinstance(visuals, (str, os.PathLike)):
        visuals = [visuals]
    visuals = list(visuals or [])
    if len(visuals) != 1:
        raise ValueError(f"{where}: longvid_jax answers about one video per request, got "
                         f"{len(visuals)} visuals")
    if not isinstance(visuals[0], (str, os.PathLike)):
        raise TypeError(f"{where}: longvid_jax answers about video files; got a "
                        f"{type(visuals[0]).__name__} visual (images and audio-only inputs are "
                        "not supported)")
    return os.fspath(visuals[0])


def cut_at_stop(text: str, until: str | Sequence[str] | None) -> str:
    """`text` up to the first occurrence of any stop string in `until` (str or list; empty
    strings ignored), as lmms-eval's `generate_until` contract asks."""
    if until is None:
        return text
    stops = [until] if isinstance(until, str) else list(until)
    cut = len(text)
    for stop in stops:
        if stop:
            i = text.find(stop)
            if i >= 0:
                cut = min(cut, i)
    return text[:cut]


class LongVidJaxLMM(_LmmsBase):
    """lmms-eval model "longvid_jax": a trained longvid_jax checkpoint answering video tasks.

    Args:
      config: the training config spec `"path/to/config.py[:args]"` (quote it in
        `--model_args` when its args hold commas) or a ConfigDict.
      checkpoint: training workdir, checkpoints folder or step folder (`infer`).
      max_new_tokens: generation length when a task's gen_kwargs give none.
      predictor: an `infer.Predictor` to use instead of loading `config` / `checkpoint` (tests).
      log: stream for the per-request stage times (default stderr).
      **kwargs: lmms-eval's `batch_size`, `max_batch_size`, `device`, `device_map` are accepted
        and ignored (one request is answered at a time, on JAX's default devices).

    Raises:
      ValueError: another keyword argument, or neither `predictor` nor `config` and
        `checkpoint`.
      infer.InferenceError: an unreadable config or checkpoint.
    """

    is_simple = True

    def __init__(self, config: Any = None, checkpoint: str | None = None, *,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, predictor: Any = None,
                 log: TextIO | None = None, **kwargs: Any):
        if HAVE_LMMS_EVAL:
            super().__init__()
        else:  # what lmms.__init__ sets up
            self._rank, self._world_size = 0, 1
            self.cache_hook = None
            self.task_dict = {}
        unknown = sorted(set(kwargs) - set(_IGNORED_KWARGS))
        if unknown:
            raise ValueError(f"{MODEL_NAME}: unknown model_args {unknown} (known: config, "
                             "checkpoint, max_new_tokens)")
        self.max_new_tokens = int(max_new_tokens)
        if predictor is None:
            if config is None or checkpoint is None:
                raise ValueError(f"{MODEL_NAME}: model_args need config=... and checkpoint=...")
            from longvid_jax import infer  # pylint: disable=import-outside-toplevel

            if isinstance(config, str):
                config = infer.load_config(_unquote(config))
            predictor = infer.make_predictor(config, _unquote(str(checkpoint)),
                                             log=log if log is not None else sys.stderr)
        self.predictor = predictor

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{MODEL_NAME}: no document {doc_id!r} of task {task!r} split "
                             f"{split!r} in task_dict") from e

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Answers each request (lmms-eval `Instance`, `args` = (context, gen_kwargs,
        doc_to_visual, doc_id, task, split)).

        gen_kwargs read: `max_new_tokens` (default `self.max_new_tokens`), `temperature`
        (0: greedy), `top_p`, `until` (stop strings; the answer is cut at the first). Others
        (`do_sample`, `num_beams`) are ignored: decoding is greedy or sampled, no beams.

        Returns:
          The answers, one per request, in order.

        Raises:
          ValueError: a request without exactly one visual (names the task and doc id).
          TypeError: a visual that is not a video path (e.g. an image).
          decode.VideoDecodeError: an unreadable video (names the file).
        """
        out = []
        for req in tqdm(requests, desc="longvid_jax", disable=self.rank != 0,
                        dynamic_ncols=True):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            where = f"task {task!r} doc {doc_id!r}"
            if not callable(doc_to_visual):
                raise TypeError(f"{where}: doc_to_visual is not callable")
            video = _as_video_path(doc_to_visual(self._doc(task, split, doc_id)), where)
            temperature = float(gen_kwargs.get("temperature") or 0.0)
            res = self.predictor.answer(
                video, context,
                max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                temperature=temperature,
                top_p=float(gen_kwargs.get("top_p") or 1.0) if temperature > 0 else 1.0)
            text = cut_at_stop(res["answer"], gen_kwargs.get("until"))
            hook = getattr(self, "cache_hook", None)
            if hook is not None and hasattr(hook, "add_partial"):
                hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """Not supported: raises NotImplementedError."""
        raise NotImplementedError(
            f"{MODEL_NAME} answers by generation only: loglikelihood (scoring given "
            "continuations) is not implemented; use tasks whose output_type is generate_until")

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        """Not supported: raises NotImplementedError."""
        raise NotImplementedError(f"{MODEL_NAME}: multi-round generation is not implemented")


def lmms_eval_manifest() -> Any:
    """lmms-eval's `ModelManifest` for "longvid_jax" (a simple model), for the entry-point group
    "lmms_eval.models": `longvid_jax = "longvid_jax.lmms_eval_model:lmms_eval_manifest"`.

    Raises:
      ImportError: lmms-eval without `lmms_eval.models.registry_v2`.
    """
    from lmms_eval.models.registry_v2 import ModelManifest  # pylint: disable=C0415

    return ModelManifest(model_id=MODEL_NAME,
                         simple_class_path=f"{__name__}.{LongVidJaxLMM.__name__}")


def register() -> bool:
    """Registers `LongVidJaxLMM` under "longvid_jax" in the registries lmms-eval has.

    Called on import. Returns True when lmms-eval is importable (and something was registered).
    """
    if not HAVE_LMMS_EVAL:
        return False
    done = False
    try:
        from lmms_eval.api.registry import register_model  # pylint: disable=import-outside-toplevel
    except ImportError:
        register_model = None
    if register_model is not None:
        register_model(MODEL_NAME)(LongVidJaxLMM)
        done = True
    try:
        from lmms_eval import models as lmms_models  # pylint: disable=import-outside-toplevel
    except ImportError:
        lmms_models = None
    registry = getattr(lmms_models, "MODEL_REGISTRY_V2", None)
    if registry is not None and hasattr(registry, "register_manifest"):
        registry.register_manifest(lmms_eval_manifest(), overwrite=True)
        done = True
    return done


REGISTERED = register()

__all__ = [
    "HAVE_LMMS_EVAL",
    "MODEL_NAME",
    "REGISTERED",
    "LongVidJaxLMM",
    "cut_at_stop",
    "lmms_eval_manifest",
    "register",
]
