"""Training checkpoints with orbax: parameters, optimizer state, step and data-iterator state.

Layout under `workdir/checkpoints/<step>/`: `state/` (an orbax PyTree of params, opt_state and step,
restored directly into the target shardings) and `data/` (the Grain iterator state as JSON).
Orbax writes each step to a temporary folder and renames it when complete, so a run killed
mid-save keeps its previous checkpoint; `max_to_keep` removes old ones only after a new one is
finalised.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored into this run (names the folder)."""


class Checkpointer:
    """Saves and restores `(train_state, data_state)` pairs under `directory`.

    Args:
      directory: checkpoint root (created if missing); absolute or relative to the CWD.
      max_to_keep: number of most recent checkpoints kept.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "data"))

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> None:
        """Saves asynchronously; call `wait()` before reading it back or exiting."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=ocp.args.JsonSave(data_state or {})),
            force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores step `step` into the shapes, dtypes and shardings of `abstract_state`.

        Args:
          abstract_state: a tree of `jax.ShapeDtypeStruct` with `.sharding` set, as made by
            `jax.eval_shape` plus the train state's shardings.

        Raises:
          CheckpointError: the stored tree does not match `abstract_state` (another model or
            config), naming the checkpoint folder.
        """
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"cannot restore {os.path.join(self.directory, str(step))} into this model: "
                f"{e}") from e
        return out["state"], dict(out["data"] or {})

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `tree` carrying `shardings` (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
