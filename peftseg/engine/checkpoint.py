"""Detectron2's checkpointer, with saves made atomic (temp file + rename)."""

from __future__ import annotations

import os
import tempfile

import torch
from detectron2.checkpoint import DetectionCheckpointer


class AtomicCheckpointer(DetectionCheckpointer):
    """A run killed mid-save leaves the previous checkpoint, never a truncated one."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        os.makedirs(self.save_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.save_dir, prefix=f".{basename}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(data, f)
            os.replace(tmp, os.path.join(self.save_dir, basename))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.logger.info("Saved checkpoint %s", os.path.join(self.save_dir, basename))
        self.tag_last_checkpoint(basename)
