"""
Checkpoints of drcl2's Trainer:

* :func:`atomic_write`: drcl2's one way to write a file so that it holds the old content or the
  complete new one, never a part (checkpoints, exports, configs, reports);
* :class:`AtomicDetectionCheckpointer`: detectron2's checkpointer, writing every file that way, so
  a run killed while saving leaves the previous checkpoint and ``last_checkpoint`` intact; resuming
  falls back to the newest complete checkpoint when ``last_checkpoint`` is missing, empty or names
  a damaged file;
* :class:`DRCL2Checkpointer`: the same for DRCL2 models (ImageNet weights into the online network).

The transfer of pre-training to fine-tuning is :mod:`drcl2.export`.
"""

import glob
import logging
import os
import re
import socket
import time
import uuid
import zipfile
from typing import IO, Callable, List, Mapping, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.utils.file_io import PathManager

__all__ = [
    "AtomicDetectionCheckpointer",
    "DRCL2Checkpointer",
    "atomic_write",
    "checkpoint_iteration",
    "is_complete_checkpoint",
    "stale_tmp_reason",
]

logger = logging.getLogger(__name__)

_TMP_SUFFIX = ".tmp"
# .<name>.<host>-<pid>-<12 hex>.tmp: who is writing it, so another process can tell a live write
# from one left by a killed run.
_TMP_NAME = re.compile(
    r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9._-]+)-(?P<pid>\d+)-[0-9a-f]{12}\.tmp$"
)
STALE_TMP_SECONDS = 3600
"""A temporary file not written to for this long is taken as left by a killed run, whoever wrote it
(a checkpoint write that stalls for an hour has failed anyway)."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def _tmp_path(path: str) -> str:
    """A temporary name for ``path`` in its folder, naming this host and process."""
    folder, name = os.path.split(path)
    return os.path.join(
        folder, f".{name}.{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}"
    )


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def stale_tmp_reason(path: str, now: Optional[float] = None) -> Optional[str]:
    """
    Why the temporary file ``path`` (written by :func:`atomic_write`) was left by a writer that
    will not finish it, or None while it may still be written: its writer, a process of this host,
    is gone; or nobody has written to it for :data:`STALE_TMP_SECONDS` (a writer on another host,
    or a name from before writers were recorded). A live write in progress is never stale.
    """
    try:
        age = (time.time() if now is None else now) - os.path.getmtime(path)
    except OSError:
        return None  # gone already (renamed into place or removed)
    m = _TMP_NAME.match(os.path.basename(path))
    if m and m["host"] == _host() and not _process_exists(int(m["pid"])):
        return f"its writer (process {m['pid']} on this host) is gone"
    if age > STALE_TMP_SECONDS:
        return f"nobody has written to it for {age / 60:.0f} min"
    return None


def atomic_write(path: str, write: Callable[[IO], None], mode: str = "wb") -> None:
    """
    Write a file so that ``path`` holds either its old content or the complete new one, never a
    part: ``write(f)`` fills a temporary file in the same folder
    (``.<name>.<host>-<pid>-<unique>.tmp``), which is flushed to disk and renamed over ``path``.
    Paths with a URI scheme (``s3://``, ...) that iopath handles are written directly (no rename
    there).
    """
    if "://" in path:
        with PathManager.open(path, mode) as f:
            write(f)
        return
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _tmp_path(os.path.join(folder, name))
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666
    )  # the umask applies, as for open()
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_complete_checkpoint(path: str) -> bool:
    """
    Whether ``path`` is a complete ``torch.save`` file: a zip archive whose central directory (at
    the end of the file) is there and lists the pickle. A file cut short by a kill is not;
    non-zip files (legacy torch format, detectron2 ``.pkl``) are taken as complete if not empty.
    """
    try:
        if os.path.getsize(path) == 0:
            return False
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                return f.read(2) != b"PK"  # a zip's local header without its directory: cut short
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


_CHECKPOINT_NAME = re.compile(r"^model_(\d+|final)\.pth$")


def checkpoint_iteration(path: str) -> Optional[int]:
    """The ``iteration`` a detectron2 checkpoint file holds, or None (memory-mapped: no tensor is
    read)."""
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError:  # not the zip format: no memory map
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        logger.warning(f"Could not read the iteration of {path}: {e}")
        return None
    iteration = checkpoint.get("iteration") if isinstance(checkpoint, Mapping) else None
    return int(iteration) if iteration is not None else None


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """
    detectron2's :class:`DetectionCheckpointer` with safe writes and a safe resume:

    * every file (``model_*.pth``, ``last_checkpoint``) is written with :func:`atomic_write`;
    * a save at the same iteration as the previous save of this checkpointer (detectron2's
      ``model_final.pth`` right after the last periodic checkpoint) hard-links that file instead
      of writing a second full copy (a full copy where the file system has no hard links);
    * :meth:`get_checkpoint_file` returns the file ``last_checkpoint`` names when it is complete,
      else (no, empty or damaged ``last_checkpoint``, or it names a missing or cut-short file) the
      newest complete ``model_<iteration>.pth`` / ``model_final.pth``, with a log line;
    * temporary files left by a run killed while saving are removed (with a log line) when the
      main process builds its checkpointer — only those (:func:`stale_tmp_reason`): a file that
      another live process (a running training, an export, an evaluation in the same folder) is
      writing at that moment stays.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_save = None  # (iteration, path) of this checkpointer's last save
        if self.save_dir and self.save_to_disk and "://" not in self.save_dir:
            for tmp in glob.glob(os.path.join(self.save_dir, f".*{_TMP_SUFFIX}")):
                reason = stale_tmp_reason(tmp)
                if reason is None:
                    continue
                logger.warning(
                    f"Removing {tmp}: an incomplete write left by a run killed while saving "
                    f"({reason})."
                )
                try:
                    os.remove(tmp)
                except FileNotFoundError:  # another process cleaned it up first
                    pass

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        iteration = kwargs.get("iteration")
        if (
            iteration is not None
            and self._last_save is not None
            and self._last_save[0] == iteration
            and self._last_save[1] != save_file
            and os.path.isfile(self._last_save[1])
            and self._link(self._last_save[1], save_file)
        ):
            self.logger.info(
                f"Saving checkpoint to {save_file} (a hard link to {self._last_save[1]}: same "
                "iteration)"
            )
        else:
            data = {"model": self.model.state_dict()}
            for key, obj in self.checkpointables.items():
                data[key] = obj.state_dict()
            data.update(kwargs)
            self.logger.info(f"Saving checkpoint to {save_file}")
            atomic_write(save_file, lambda f: torch.save(data, f))
        self._last_save = (iteration, save_file)
        self.tag_last_checkpoint(basename)

    @staticmethod
    def _link(src: str, dst: str) -> bool:
        """Hard-link ``src`` to ``dst`` atomically; False where the file system refuses."""
        if "://" in dst:
            return False
        tmp = _tmp_path(dst)
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
            return True
        except OSError:
            if os.path.lexists(tmp):
                os.remove(tmp)
            return False

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename),
            mode="w",
        )

    def complete_checkpoints(self) -> List[str]:
        """
        The complete ``model_<iteration>.pth`` / ``model_final.pth`` in the folder, by iteration,
        oldest first: ``model_final.pth`` ranks by the iteration it holds (an extended run's
        ``model_0000599.pth`` is newer than the ``model_final.pth`` of iteration 499), before
        any other at that iteration, and first of all if it holds none.
        """
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        found = []
        for name in os.listdir(self.save_dir):
            m = _CHECKPOINT_NAME.match(name)
            path = os.path.join(self.save_dir, name)
            if m and is_complete_checkpoint(path):
                final = m.group(1) == "final"
                iteration = checkpoint_iteration(path) if final else int(m.group(1))
                found.append((-1 if iteration is None else iteration, final, path))
        return [p for *_, p in sorted(found)]

    def has_checkpoint(self) -> bool:
        return super().has_checkpoint() or bool(self.complete_checkpoints())

    def get_checkpoint_file(self) -> str:
        tagged = super().get_checkpoint_file()
        tag = os.path.join(self.save_dir, "last_checkpoint")
        if tagged and os.path.basename(tagged) and "://" in tagged:
            return tagged
        if tagged and os.path.basename(tagged) and is_complete_checkpoint(tagged):
            return tagged
        fallback = self.complete_checkpoints()
        why = (
            f"{tag} is missing"
            if not os.path.exists(tag)
            else f"{tag} is empty"
            if not os.path.basename(tagged)
            else f"{tag} names {tagged}, which is missing or incomplete"
        )
        if not fallback:
            logger.warning(f"{why}, and {self.save_dir} holds no complete checkpoint.")
            return tagged
        logger.warning(f"{why}; resuming from the newest complete checkpoint, {fallback[-1]}.")
        return fallback[-1]


class DRCL2Checkpointer(AtomicDetectionCheckpointer):
    """
    An :class:`AtomicDetectionCheckpointer` for DRCL2 models. Files loaded with detectron2's
    name-matching heuristics (ImageNet ``.pkl`` from the model zoo, pycls ``.pyth``) are matched
    against the *online* network only: with the target network's ``target_network.backbone.*``
    copies in the model, every ImageNet key would otherwise match two model keys and detectron2
    refuses to load. The target network then starts as a copy of the loaded online weights
    (``DRCL2`` copies it at its first training step). Other checkpoints (DRCL2 ``model_*.pth``,
    resume) load unchanged.
    """

    def _load_model(self, checkpoint):
        if checkpoint.get("matching_heuristics", False):
            self._convert_ndarray_to_tensor(checkpoint["model"])
            online = {
                k: v
                for k, v in self.model.state_dict().items()
                if not k.startswith("target_network.")
            }
            checkpoint["model"] = align_and_update_state_dicts(
                online,
                checkpoint["model"],
                c2_conversion=checkpoint.get("__author__", None) == "Caffe2",
            )
            checkpoint["matching_heuristics"] = False
            incompatible = super()._load_model(checkpoint)
            # The target network is expected to be absent; it is initialised from the online one.
            incompatible.missing_keys[:] = [
                k for k in incompatible.missing_keys if not k.startswith("target_network.")
            ]
            return incompatible
        return super()._load_model(checkpoint)
